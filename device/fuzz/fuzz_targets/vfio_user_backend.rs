//! vfio_user_backend: the vfio-user server's backend as a hostile client
//! and a hostile guest drive it.
//!
//! The input is a sequence of operations, read by a small hand-written
//! decoder (one selector byte per operation, then its fields; bytes past the
//! end read as zero). They are played against the real
//! `freehint_vfio_user::VfioUserDevice` (the `vfio_user::ServerBackend` the
//! server hands to the vfio_user crate) around the real `Balloon`:
//!
//! - the messages a client sends, as the vfio_user crate passes them on:
//!   DMA_MAP (an fd the harness owns: a memfd for guest RAM, a second memfd,
//!   a one-page memfd, a pipe, or none; read-only, writable or odd flags;
//!   random, overlapping, unaligned and overflowing ranges), DMA_UNMAP (by
//!   range, UNMAP_ALL, dirty-page info), region reads and writes at any
//!   offset and length (virtio common cfg, ISR, device cfg, notify, MSI-X
//!   table and PBA, PCI config space including the PCI_CFG window, absent
//!   regions), SET_IRQS (any index/flags/start/count, with eventfds, an
//!   eventfd whose counter is full, pipes and memfds), DEVICE_RESET, a
//!   client that goes away, and the embedder's `run_pending_work`;
//! - a hostile guest: a driver bring-up through the registers, descriptor
//!   chains (pfn arrays, hint command ids, indirect tables, garbage) posted
//!   on the rings in the mapped memfd, raw scribbles anywhere in it, and
//!   notifies; plus the host API (balloon target, stats, hint rounds);
//! - raw client byte streams: `serve()` itself on a real socket, fed framed
//!   messages whose fields are fuzzed, including malformed VERSION messages
//!   that make the vfio_user crate panic. Our code does no pre-validation of
//!   raw messages (the crate parses them); what we own there is the serve
//!   loop: a crate panic must end only that client's session (it is
//!   counted, the device is reset and loses the client's memory and fds).
//!   Sizes the crate allocates before our checks run (region access
//!   `count`, VERSION `message_size`) are kept at 64 KiB or less: that
//!   upstream limit is documented in docs/vfio-user.md, not fuzzed.
//!
//! Invariants checked (any failure aborts):
//! - no panic of ours anywhere (log messages are formatted too: a sink
//!   logger at trace level is installed);
//! - region accesses succeed exactly when they lie inside a region of
//!   non-zero size (BARs: at most 8 bytes); a refused read leaves the
//!   buffer alone; two reads in a row return the same bytes (except the ISR
//!   and what reading it clears); offsets that hold nothing read as zero
//!   (BAR0 gaps and unknown common-cfg register/width pairs, device cfg past
//!   the balloon's 16 bytes, BAR1 outside table and PBA, config space past
//!   the last capability);
//! - DMA_MAP/UNMAP: the outcome the documented rules predict (fd-less maps
//!   are ignored, zero/overflowing/unaligned/past-EOF/non-file requests are
//!   refused, and so is one that would leave more than `MAX_MAPPINGS`,
//!   counting the split of a mapping it falls inside; a refused request
//!   changes nothing); after a writable map its range is
//!   one mapping; after a read-only map or an unmap nothing of the range
//!   is mapped; what lies outside the range is unchanged (remainders keep
//!   their place); the table stays sorted, disjoint and page aligned;
//! - SET_IRQS with any fd that is not an eventfd is refused and counted;
//!   signalling an eventfd whose counter is full never blocks (it would
//!   hang the run);
//! - DEVICE_RESET: status 0, config space back to its identity, DMA maps
//!   kept; a client gone: no DMA maps, status 0;
//! - work a notify left over ends within a bounded number of turns;
//! - **the device never writes memory that was not mapped writable**: every
//!   page of every memfd the harness passed keeps the harness's own image
//!   unless a writable DMA_MAP covered it at some point;
//! - nothing leaks: after the device is dropped no memfd is still mmapped
//!   in this process, and the number of open fds is what it was before.
//!
//! Seeds: run once with `FREEHINT_FUZZ_SEEDS=DIR` set and the seed inputs
//! are written to DIR before fuzzing starts (see device/fuzz/README.md).
#![no_main]

use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use freehint_device::balloon::Layout;
use freehint_device::{Balloon, BalloonConfig, BalloonHandle, HintHandle};
use freehint_vfio_user::memory::MAX_MAPPINGS;
use freehint_vfio_user::pci::{
    BAR0_SIZE, BAR1_SIZE, CAP_COMMON, CAP_DEVICE, CAP_ISR, CAP_MSIX, CAP_MSIX_CONTROL, CAP_NOTIFY,
    CAP_PCI_CFG, CAP_PCI_CFG_DATA, COMMON_CFG_LEN, CONFIG_SPACE_SIZE, DEVICE_CFG_LEN,
    DEVICE_CFG_OFFSET, ISR_CFG_OFFSET, MSIX_CONTROL_ENABLE, MSIX_PBA_OFFSET, NOTIFY_CFG_OFFSET,
    PCI_COMMAND, PCI_STATUS,
};
use freehint_vfio_user::virtio_pci::common as regs;
use freehint_vfio_user::VfioUserDevice;
use libfuzzer_sys::fuzz_target;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend};

const PAGE: u64 = 4096;
/// Guest RAM: one memfd mapped at 0 (the balloon's layout).
const W_SIZE: u64 = 256 << 10;
/// A second memfd (the harness never writes it after creation).
const R_SIZE: u64 = 64 << 10;
/// A one-page memfd.
const S_SIZE: u64 = PAGE;
/// Queue `q`'s rings when the bring-up lays them out: desc at
/// `q * Q_STRIDE`, avail at +0x1000, used at +0x2000, buffers from +0x3000.
const Q_STRIDE: u64 = 0x8000;
const Q_DATA: u64 = 0x3000;
const NUM_QUEUES: usize = 5;
const MAX_OPS: usize = 256;
const MAX_RAW_SESSIONS: usize = 2;
/// Most bytes a raw message makes the vfio_user crate allocate here.
const RAW_ALLOC_CAP: u32 = 64 << 10;
const CFG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// vfio-user header flags.
const HDR_NO_REPLY: u32 = 1 << 4;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

// ---------------------------------------------------------------------------
// Input decoding

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// A length byte (below `max`), then that many bytes.
    fn short_bytes(&mut self, max: u8) -> Vec<u8> {
        let n = self.u8() % max;
        self.bytes(usize::from(n))
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[usize::from(self.u8()) % xs.len()]
    }
}

/// Generator modes the seed encoder uses (the decoder's first byte).
mod gen {
    /// Address: a u8 page index follows.
    pub const ADDR_PAGE: u8 = 0;
    /// Address: a raw u64 follows.
    pub const ADDR_RAW: u8 = 5;
    /// Size: 1 + a u8 pages.
    pub const SIZE_PAGES: u8 = 0;
    /// Size: a raw u64 follows.
    pub const SIZE_RAW: u8 = 4;
    /// Fd offset: the address (what QEMU passes for RAM).
    pub const OFF_SAME: u8 = 0;
}

/// A guest address: a page (u8 or u16 index), raw, the top of the address
/// space, or unaligned.
fn gen_addr(c: &mut Cursor) -> u64 {
    match c.u8() % 8 {
        0..=3 => u64::from(c.u8()) * PAGE,
        4 => u64::from(c.u16()) * PAGE,
        5 => c.u64(),
        6 => 0u64.wrapping_sub((1 + u64::from(c.u8())) * PAGE),
        _ => u64::from(c.u8()),
    }
}

/// A DMA size: pages, raw, zero, or near overflow.
fn gen_size(c: &mut Cursor) -> u64 {
    match c.u8() % 8 {
        0..=3 => (1 + u64::from(c.u8())) * PAGE,
        4 => c.u64(),
        5 => 0,
        6 => u64::from(c.u32()),
        _ => u64::MAX - u64::from(c.u8()),
    }
}

fn gen_offset(c: &mut Cursor, addr: u64) -> u64 {
    match c.u8() % 8 {
        0..=3 => addr,
        4 | 5 => u64::from(c.u8()) * PAGE,
        6 => c.u64(),
        _ => u64::from(c.u16()),
    }
}

/// Interesting offsets of each region (the decoder adds -4..+11).
const BAR0_POINTS: &[u64] = &[
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x24, 0x28,
    0x2c, 0x30, 0x34, 0x38, 0x3a, 0x3c, 0x800, 0x1000, 0x2000, 0x2004, 0x2008, 0x200c, 0x2010,
    0x2ffc, 0x3000, 0x3004, 0x3008, 0x300c, 0x3010, 0x3014, 0x3ffc, 0x3ff8,
];
const BAR1_POINTS: &[u64] = &[
    0, 8, 12, 16, 28, 44, 60, 76, 92, 0x60, 0x7f8, 0x800, 0x808, 0xff8,
];
const CFG_POINTS: &[u64] = &[
    0x00,
    0x04,
    0x06,
    0x08,
    0x0c,
    0x10,
    0x14,
    0x18,
    0x2c,
    0x34,
    0x3c,
    CAP_COMMON as u64,
    CAP_NOTIFY as u64,
    CAP_ISR as u64,
    CAP_DEVICE as u64,
    CAP_PCI_CFG as u64,
    CAP_PCI_CFG as u64 + 4,
    CAP_PCI_CFG as u64 + 8,
    CAP_PCI_CFG as u64 + 12,
    CAP_PCI_CFG_DATA as u64,
    CAP_MSIX as u64,
    CAP_MSIX_CONTROL as u64,
    CAP_MSIX as u64 + 4,
    0xa4,
    0xfc,
];

fn gen_region(c: &mut Cursor) -> u32 {
    match c.u8() % 16 {
        0..=5 => 0,
        6..=8 => 1,
        9..=12 => CFG,
        13 => u32::from(c.u8() % 10),
        14 => c.u32(),
        _ => 8,
    }
}

fn gen_region_offset(c: &mut Cursor, region: u32) -> u64 {
    let points = match region {
        0 => BAR0_POINTS,
        1 => BAR1_POINTS,
        CFG => CFG_POINTS,
        _ => &[0u64][..],
    };
    match c.u8() % 8 {
        0..=4 => {
            let base = c.pick(points);
            base.wrapping_add(u64::from(c.u8() % 16)).wrapping_sub(4)
        }
        5 => u64::from(c.u16()) % 0x4100,
        6 => c.u64(),
        _ => u64::MAX - u64::from(c.u8()),
    }
}

fn gen_len(c: &mut Cursor) -> usize {
    match c.u8() % 16 {
        0..=3 => 1 << (c.u8() % 4),
        4..=5 => 4,
        6 => 0,
        7 => 3,
        8 => 16,
        9 => CONFIG_SPACE_SIZE,
        10 => usize::from(c.u8()),
        11 => usize::from(c.u16() % 4097),
        _ => 2,
    }
}

// ---------------------------------------------------------------------------
// Harness-owned memory and fds

/// The bytes page `p` of a memfd starts with (never zero, so a discard or
/// a stray write shows).
fn pattern(salt: u8, size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| {
            let (p, j) = (i / PAGE, i % PAGE);
            ((p * 131 + j * 7 + u64::from(salt)) % 251 + 1) as u8
        })
        .collect()
}

fn patterns() -> &'static [Vec<u8>; 3] {
    static P: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    P.get_or_init(|| [pattern(1, W_SIZE), pattern(2, R_SIZE), pattern(3, S_SIZE)])
}

fn memfd(name: &CStr) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned here.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd owned by nobody else.
    unsafe { File::from_raw_fd(fd) }
}

/// A memfd the harness passes to DMA_MAP, with the image it must hold.
struct MemFile {
    file: File,
    name: &'static str,
    image: Vec<u8>,
    /// Page `i` was covered by a writable DMA_MAP at some point: the
    /// device may have written it.
    dev_writable: Vec<bool>,
}

impl MemFile {
    fn new(which: usize) -> Self {
        let (name, cname) = [
            ("W", c"fz-vfio-w"),
            ("R", c"fz-vfio-r"),
            ("S", c"fz-vfio-s"),
        ][which];
        let image = patterns()[which].clone();
        let file = memfd(cname);
        file.write_all_at(&image, 0).unwrap();
        let pages = image.len() / PAGE as usize;
        MemFile {
            file,
            name,
            image,
            dev_writable: vec![false; pages],
        }
    }

    fn size(&self) -> u64 {
        self.image.len() as u64
    }

    /// The guest (or client) writes `data` at file offset `off`.
    fn write(&mut self, off: u64, data: &[u8]) {
        let Some(end) = off.checked_add(data.len() as u64) else {
            return;
        };
        if end > self.size() {
            return;
        }
        self.file.write_all_at(data, off).unwrap();
        self.image[off as usize..end as usize].copy_from_slice(data);
    }

    fn mark_writable(&mut self, off: u64, size: u64) {
        let end = off.saturating_add(size).min(self.size());
        let mut p = off / PAGE;
        while p * PAGE < end {
            self.dev_writable[p as usize] = true;
            p += 1;
        }
    }

    /// Pages no writable map ever covered hold exactly the harness's image.
    fn check(&self) {
        let mut now = vec![0u8; self.image.len()];
        self.file.read_exact_at(&mut now, 0).unwrap();
        for (p, writable) in self.dev_writable.iter().enumerate() {
            let r = p * PAGE as usize..(p + 1) * PAGE as usize;
            if !writable && now[r.clone()] != self.image[r.clone()] {
                let at = r.start
                    + now[r.clone()]
                        .iter()
                        .zip(&self.image[r.clone()])
                        .position(|(a, b)| a != b)
                        .unwrap();
                panic!(
                    "memfd {} page {p} was never mapped writable, yet byte {at:#x} changed \
                     ({:#x} → {:#x})",
                    self.name, self.image[at], now[at]
                );
            }
        }
    }
}

fn eventfd(full: bool) -> File {
    // SAFETY: plain syscall; the fd is owned here.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let mut f = unsafe { File::from_raw_fd(fd) };
    if full {
        // The largest counter value: a blocking write would now block.
        f.write_all(&(u64::MAX - 1).to_ne_bytes()).unwrap();
    }
    f
}

/// The write end of a fresh pipe (the read end is closed).
fn pipe() -> File {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds owned here.
    drop(unsafe { File::from_raw_fd(fds[0]) });
    // SAFETY: as above.
    unsafe { File::from_raw_fd(fds[1]) }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Mappings of the harness's memfds in this process.
fn memfd_mappings() -> usize {
    let mut s = String::new();
    File::open("/proc/self/maps")
        .and_then(|mut f| f.read_to_string(&mut s))
        .unwrap();
    s.lines().filter(|l| l.contains("memfd:fz-vfio-")).count()
}

// ---------------------------------------------------------------------------
// The session

#[derive(Clone, Copy, Default)]
struct QueueModel {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    next_desc: u16,
    slot: u64,
}

struct Session {
    dev: VfioUserDevice,
    balloon: BalloonHandle,
    hints: HintHandle,
    offered: u64,
    files: [Option<MemFile>; 3],
    queues: [QueueModel; NUM_QUEUES],
    raw_sessions: usize,
    /// A MAP_MANY went past `MAX_MAPPINGS` already (once per input: slow).
    filled_table: bool,
    /// Maps MAP_MANY may still make in this input (each one rebuilds the
    /// region table: thousands of them would make the input slow).
    maps_left: usize,
}

impl Session {
    fn new() -> Self {
        let layout = Layout::from_ram_byte_ranges(&[(0, W_SIZE)]).unwrap();
        let config = BalloonConfig::all_features(layout);
        let offered = config.features();
        let balloon = Balloon::new(config).unwrap();
        let (handle, hints) = (balloon.handle(), balloon.hint_handle());
        let mut dev = VfioUserDevice::new(Box::new(balloon));
        dev.set_expected_ram(vec![(0, W_SIZE)]);
        Session {
            dev,
            balloon: handle,
            hints,
            offered,
            files: [None, None, None],
            queues: [QueueModel::default(); NUM_QUEUES],
            raw_sessions: 0,
            filled_table: false,
            maps_left: 64,
        }
    }

    fn file(&mut self, which: usize) -> &mut MemFile {
        self.files[which].get_or_insert_with(|| MemFile::new(which))
    }

    // --- region accesses --------------------------------------------------

    fn region_size(&self, region: u32) -> u64 {
        match region {
            0 => BAR0_SIZE,
            1 => BAR1_SIZE,
            CFG => CONFIG_SPACE_SIZE as u64,
            _ => 0,
        }
    }

    fn access_ok(&self, region: u32, off: u64, len: usize) -> bool {
        let size = self.region_size(region);
        size > 0
            && (len <= 8 || region == CFG)
            && off.checked_add(len as u64).is_some_and(|e| e <= size)
    }

    fn bar0_write(&mut self, off: u64, len: usize, v: u64) {
        let r = self.dev.region_write(0, off, &v.to_le_bytes()[..len]);
        assert!(r.is_ok(), "BAR0 write {off:#x}/{len} refused: {r:?}");
    }

    fn bar0_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.region_read(0, off, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }

    fn read(&mut self, region: u32, off: u64, len: usize) {
        let mut a = vec![0xa5u8; len];
        let ra = self.dev.region_read(region, off, &mut a);
        let mut b = vec![0x5au8; len];
        let rb = self.dev.region_read(region, off, &mut b);
        let ok = self.access_ok(region, off, len);
        assert_eq!(
            ra.is_ok(),
            ok,
            "region {region} read {off:#x}+{len}: {ra:?}, expected ok={ok}"
        );
        assert_eq!(ra.is_ok(), rb.is_ok());
        if !ok {
            assert!(a.iter().all(|&x| x == 0xa5), "a refused read wrote data");
            return;
        }
        let vectors = u64::from(self.dev.msix_vectors());
        for i in 0..len {
            let at = off + i as u64;
            let volatile = match region {
                // Reading the ISR clears it.
                0 => at == ISR_CFG_OFFSET && len == 1,
                // The window may read the ISR; that changes status bit 3.
                CFG => {
                    (CAP_PCI_CFG_DATA as u64..CAP_PCI_CFG_DATA as u64 + 4).contains(&at)
                        || (PCI_STATUS as u64..PCI_STATUS as u64 + 2).contains(&at)
                }
                _ => false,
            };
            assert!(
                volatile || a[i] == b[i],
                "region {region} read {off:#x}+{len} not repeatable at {at:#x}: {a:02x?} then {b:02x?}"
            );
            let zero = match region {
                0 => bar0_reads_zero(off, len, at),
                1 => !(at < 16 * vectors || (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + 8).contains(&at)),
                CFG => at >= CAP_MSIX as u64 + 12,
                _ => false,
            };
            assert!(
                !zero || a[i] == 0,
                "region {region} read {off:#x}+{len}: byte {at:#x} holds nothing yet reads {:#x}",
                a[i]
            );
        }
    }

    fn write(&mut self, region: u32, off: u64, data: &[u8]) {
        let r = self.dev.region_write(region, off, data);
        let ok = self.access_ok(region, off, data.len());
        assert_eq!(
            r.is_ok(),
            ok,
            "region {region} write {off:#x}+{}: {r:?}, expected ok={ok}",
            data.len()
        );
    }

    // --- DMA --------------------------------------------------------------

    fn dma_map(&mut self, flags: u32, fd_sel: u8, addr: u64, size: u64, offset: u64) {
        enum Fd {
            Mem(usize),
            Other(File),
            None,
        }
        let which = match fd_sel % 8 {
            0..=3 => Fd::Mem(0),
            4 => Fd::Mem(1),
            5 => Fd::Mem(2),
            6 => Fd::None,
            _ => Fd::Other(if fd_sel & 0x80 != 0 {
                eventfd(false)
            } else {
                pipe()
            }),
        };
        let (fd, file_size) = match &which {
            Fd::Mem(i) => {
                let f = self.file(*i);
                (Some(f.file.try_clone().unwrap()), Some(f.size()))
            }
            Fd::Other(f) => (Some(f.try_clone().unwrap()), None),
            Fd::None => (None, None),
        };
        let writable = flags & DmaMapFlags::WRITE.bits() != 0;
        let before = self.dev.dma_ranges();
        let r = self
            .dev
            .dma_map(DmaMapFlags::from_bits_retain(flags), offset, addr, size, fd);
        let after = self.dev.dma_ranges();
        check_table(&after);
        let ctx = || {
            format!("DMA_MAP {addr:#x}+{size:#x} off {offset:#x} flags {flags:#x}: {r:?}, before {before:x?}, after {after:x?}")
        };
        if matches!(which, Fd::None) {
            assert!(r.is_ok() && after == before, "{}", ctx());
            return;
        }
        let end = addr.checked_add(size);
        let valid = size > 0
            && end.is_some()
            && offset.checked_add(size).is_some()
            && (addr | size | offset) % PAGE == 0;
        let fits = valid && file_size.is_some_and(|fs| offset + size <= fs);
        if !fits {
            assert!(r.is_err() && after == before, "{}", ctx());
            return;
        }
        let end = end.unwrap();
        // The limit counts what the table would hold after the cut (a cut
        // inside a mapping splits it), plus the new mapping.
        if cut_list(&before, addr, end).len() + usize::from(writable) > MAX_MAPPINGS {
            assert!(
                r.is_err() && after == before,
                "over the mapping limit: refused, nothing changed: {}",
                ctx()
            );
            return;
        }
        assert_eq!(
            cut_list(&before, addr, end),
            cut_list(&after, addr, end),
            "what lies outside the range changed: {}",
            ctx()
        );
        match r {
            Ok(()) if writable => {
                assert!(
                    after.contains(&(addr, size)) && overlapping(&after, addr, end).len() == 1,
                    "a writable map is one mapping: {}",
                    ctx()
                );
                if let Fd::Mem(i) = which {
                    self.file(i).mark_writable(offset, size);
                }
            }
            Ok(()) => assert!(
                overlapping(&after, addr, end).is_empty(),
                "a read-only map is left out: {}",
                ctx()
            ),
            Err(_) => panic!("refused for no reason: {}", ctx()),
        }
    }

    fn dma_unmap(&mut self, flags: u32, addr: u64, size: u64) {
        let before = self.dev.dma_ranges();
        let f = DmaUnmapFlags::from_bits_retain(flags);
        let r = self.dev.dma_unmap(f, addr, size);
        let after = self.dev.dma_ranges();
        check_table(&after);
        let ctx = || {
            format!("DMA_UNMAP {addr:#x}+{size:#x} flags {flags:#x}: {r:?}, before {before:x?}, after {after:x?}")
        };
        if f.contains(DmaUnmapFlags::GET_DIRTY_PAGE_INFO) {
            assert!(r.is_err() && after == before, "{}", ctx());
        } else if f.contains(DmaUnmapFlags::UNMAP_ALL) {
            assert!(r.is_ok() && after.is_empty(), "{}", ctx());
        } else {
            match addr.checked_add(size) {
                Some(end)
                    if size > 0
                        && (addr | size) % PAGE == 0
                        && cut_list(&before, addr, end).len() > MAX_MAPPINGS =>
                {
                    assert!(r.is_err() && after == before, "over the limit: {}", ctx());
                }
                Some(end) if size > 0 && (addr | size) % PAGE == 0 => {
                    assert!(r.is_ok(), "{}", ctx());
                    assert!(overlapping(&after, addr, end).is_empty(), "{}", ctx());
                    assert_eq!(
                        cut_list(&before, addr, end),
                        cut_list(&after, addr, end),
                        "{}",
                        ctx()
                    );
                }
                _ => assert!(r.is_err() && after == before, "{}", ctx()),
            }
        }
    }

    // --- interrupts ---------------------------------------------------------

    fn set_irqs(&mut self, index: u32, flags: u32, start: u32, count: u32, kinds: &[u8]) {
        let mut fds = Vec::with_capacity(kinds.len());
        let mut foreign = false;
        for &k in kinds {
            fds.push(match k % 8 {
                0..=3 => eventfd(false),
                4 | 5 => eventfd(true),
                6 => {
                    foreign = true;
                    pipe()
                }
                _ => {
                    foreign = true;
                    self.file(2).file.try_clone().unwrap()
                }
            });
        }
        let bad_before = self.dev.stats().bad_irq_fds;
        let r = self.dev.set_irqs(index, flags, start, count, fds);
        if foreign {
            assert!(r.is_err(), "SET_IRQS took an fd that is not an eventfd");
            assert_eq!(self.dev.stats().bad_irq_fds, bad_before + 1);
        }
    }

    // --- the guest --------------------------------------------------------

    /// A guest write at guest-physical `gpa` (the bring-up maps the RAM
    /// memfd at 0 with file offset = address; elsewhere the write lands in
    /// the memfd at that offset, or nowhere).
    fn guest_write(&mut self, gpa: u64, data: &[u8]) {
        self.file(0).write(gpa, data);
    }

    fn bring_up(&mut self, c: &mut Cursor) {
        let mode = c.u8();
        let feat_mask = c.u32();
        let hi = if mode % 8 == 6 { c.u32() } else { 1 };
        let enabled = c.u8() | 1;
        let msix = c.u8();
        let mut sizes = [0u8; NUM_QUEUES];
        for s in &mut sizes {
            *s = c.u8();
        }
        for s in [0, 1, 3] {
            self.bar0_write(regs::DEVICE_STATUS, 1, s);
        }
        let lo = (self.offered as u32) & feat_mask;
        self.bar0_write(regs::DRIVER_FEATURE_SELECT, 4, 0);
        self.bar0_write(regs::DRIVER_FEATURE, 4, u64::from(lo));
        self.bar0_write(regs::DRIVER_FEATURE_SELECT, 4, 1);
        self.bar0_write(regs::DRIVER_FEATURE, 4, u64::from(hi));
        // Mode 7: no FEATURES_OK (DRIVER_OK must then be refused).
        if mode % 8 != 7 {
            self.bar0_write(regs::DEVICE_STATUS, 1, 0xb);
        }
        for q in 0..NUM_QUEUES {
            let base = q as u64 * Q_STRIDE;
            let size = 1u16 << (sizes[q] % 10).max(1);
            let raw = sizes[q] >= 0xf0;
            let (desc, avail, used) = if raw {
                let a = c.u64();
                (a, a.wrapping_add(0x1000), a.wrapping_add(0x2000))
            } else {
                (base, base + 0x1000, base + 0x2000)
            };
            self.bar0_write(regs::QUEUE_SELECT, 2, q as u64);
            self.bar0_write(regs::QUEUE_SIZE, 2, u64::from(size));
            self.bar0_write(regs::QUEUE_DESC, 8, desc);
            self.bar0_write(regs::QUEUE_DRIVER, 8, avail);
            self.bar0_write(regs::QUEUE_DEVICE, 8, used);
            self.bar0_write(regs::QUEUE_MSIX_VECTOR, 2, q as u64 + 1);
            let on = enabled & (1 << q) != 0;
            if on {
                self.bar0_write(regs::QUEUE_ENABLE, 2, 1);
            }
            // What the device took (a bad size is refused).
            let size = self.bar0_read(regs::QUEUE_SIZE, 2) as u16;
            self.queues[q] = QueueModel {
                size: if on { size } else { 0 },
                desc,
                avail,
                used,
                ..Default::default()
            };
            if on {
                self.guest_write(avail, &[0; 4]);
                self.guest_write(used, &[0; 4]);
            }
        }
        self.bar0_write(regs::CONFIG_MSIX_VECTOR, 2, 0);
        if msix & 1 != 0 {
            // MSI-X on, with an eventfd per vector (some full).
            let n = u32::from(self.dev.msix_vectors());
            let kinds: Vec<u8> = (0..n)
                .map(|i| if msix & 2 != 0 && i == 1 { 4 } else { 0 })
                .collect();
            self.set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
                0,
                n,
                &kinds,
            );
            self.write(
                CFG,
                CAP_MSIX_CONTROL as u64,
                &MSIX_CONTROL_ENABLE.to_le_bytes(),
            );
        } else {
            self.set_irqs(
                VFIO_PCI_INTX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
                0,
                1,
                &[if msix & 2 != 0 { 4 } else { 0 }],
            );
        }
        self.bar0_write(regs::DEVICE_STATUS, 1, 0xf);
    }

    fn post_chain(&mut self, c: &mut Cursor) {
        let q = usize::from(c.u8()) % NUM_QUEUES;
        let n = 1 + usize::from(c.u8() % 4);
        let notify = c.u8();
        let m = self.queues[q];
        if m.size == 0 {
            return;
        }
        let size = u64::from(m.size);
        let base = q as u64 * Q_STRIDE;
        let mut idx = u64::from(m.next_desc) % size;
        let head = idx as u16;
        let mut slot = m.slot;
        for i in 0..n {
            let kind = c.u8();
            let mut flags = if kind & 0x80 != 0 {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            let (addr, len) = match kind % 8 {
                0..=3 => {
                    let addr = base + Q_DATA + (slot * 0x400) % (Q_STRIDE - Q_DATA - 0x400);
                    slot += 1;
                    let len = c.pick(&[4u32, 8, 16, 64, 256, 1024, 12, 0]);
                    self.payload(c, addr, len);
                    (addr, len)
                }
                4 => (c.u64(), c.u32()),
                5 => (0x28000 + u64::from(c.u8() % 16) * PAGE, PAGE as u32),
                6 => {
                    // An indirect table of k descriptors to pfn buffers.
                    flags |= VIRTQ_DESC_F_INDIRECT;
                    let table = base + Q_DATA + (slot * 0x400) % (Q_STRIDE - Q_DATA - 0x400);
                    slot += 1;
                    let k = 1 + u64::from(c.u8() % 4);
                    for j in 0..k {
                        let buf = table + 0x100 + j * 0x40;
                        self.payload(c, buf, 16);
                        let next = if j + 1 < k { j as u16 + 1 } else { 0 };
                        let f = if j + 1 < k { VIRTQ_DESC_F_NEXT } else { 0 } | (c.u8() & 7) as u16;
                        self.guest_write(table + 16 * j, &desc_bytes(buf, 16, f, next));
                    }
                    (table, 16 * k as u32)
                }
                _ => (
                    self.queues[usize::from(c.u8()) % NUM_QUEUES].used,
                    c.u32() % 0x1000,
                ),
            };
            let next_idx = if c.u8() == 0xff {
                u64::from(c.u16())
            } else {
                (idx + 1) % size
            };
            if i + 1 < n {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.guest_write(
                m.desc.wrapping_add(16 * idx),
                &desc_bytes(addr, len, flags, next_idx as u16),
            );
            idx = (idx + 1) % size;
        }
        let qm = &mut self.queues[q];
        qm.next_desc = idx as u16;
        qm.slot = slot;
        let ring_at = qm
            .avail
            .wrapping_add(4 + 2 * (u64::from(qm.avail_idx) % size));
        qm.avail_idx = qm.avail_idx.wrapping_add(1);
        let (avail, new_idx) = (qm.avail, qm.avail_idx);
        self.guest_write(ring_at, &head.to_le_bytes());
        self.guest_write(avail.wrapping_add(2), &new_idx.to_le_bytes());
        if notify & 1 != 0 {
            self.bar0_write(NOTIFY_CFG_OFFSET + 4 * q as u64, 2, q as u64);
        }
    }

    /// Fills a buffer the guest posts: pfns, a hint command id, bytes.
    fn payload(&mut self, c: &mut Cursor, addr: u64, len: u32) {
        let words = (len / 4).min(16) as usize;
        let data: Vec<u8> = match c.u8() % 5 {
            0 | 1 => (0..words)
                .flat_map(|_| {
                    // Mostly pfns inside the 64-page layout; 0xff: any u32.
                    let b = c.u8();
                    let pfn = if b == 0xff {
                        c.u32()
                    } else {
                        u32::from(b % 80)
                    };
                    pfn.to_le_bytes()
                })
                .collect(),
            2 => {
                // The current hint command id, as the guest reads it.
                let mut v = [0u8; 4];
                self.dev
                    .region_read(0, DEVICE_CFG_OFFSET + 8, &mut v)
                    .unwrap();
                let mut out = v.to_vec();
                out.extend(c.bytes(words.saturating_sub(1) * 4));
                out
            }
            3 => c.short_bytes(64),
            _ => return,
        };
        self.guest_write(addr, &data);
    }

    fn host(&mut self, c: &mut Cursor) {
        match c.u8() % 6 {
            0 => self.balloon.set_target_pages(u32::from(c.u8() % 80)),
            1 => {
                let _ = self.balloon.request_stats();
            }
            2 => {
                let epoch = self.hints.new_epoch();
                let _ = self.hints.start_round(&epoch);
            }
            3 => self.hints.stop(),
            4 => self.hints.finish(),
            _ => {
                let _ = self.hints.status();
            }
        }
    }

    fn window_access(&mut self, c: &mut Cursor) {
        let bar = c.pick(&[0u8, 0, 0, 1, 2, 0xff]);
        let off = match bar {
            0 => c.pick(BAR0_POINTS),
            1 => c.pick(BAR1_POINTS),
            _ => u64::from(c.u32()),
        } as u32;
        let len = c.pick(&[1u32, 2, 4, 4, 3, 8, 0]);
        self.write(CFG, CAP_PCI_CFG as u64 + 4, &[bar]);
        self.write(CFG, CAP_PCI_CFG as u64 + 8, &off.to_le_bytes());
        self.write(CFG, CAP_PCI_CFG as u64 + 12, &len.to_le_bytes());
        if c.u8() & 1 == 0 {
            self.read(CFG, CAP_PCI_CFG_DATA as u64, 4);
        } else {
            let v = c.u32();
            self.write(CFG, CAP_PCI_CFG_DATA as u64, &v.to_le_bytes());
        }
    }

    fn map_many(&mut self, c: &mut Cursor) {
        let base = u64::from(c.u16()) * PAGE;
        // Past the table's limit only on a marker byte: each map rebuilds
        // the whole region table, so 520 maps take a while.
        let n = match c.u8() {
            0xa5 if !self.filled_table => {
                self.filled_table = true;
                MAX_MAPPINGS + 1 + usize::from(c.u8() % 8)
            }
            k => usize::from(k % 32).min(self.maps_left),
        };
        self.maps_left = self.maps_left.saturating_sub(n);
        let flags = if c.u8() & 1 == 0 {
            DmaMapFlags::READ_WRITE
        } else {
            DmaMapFlags::READ
        };
        let f = self.file(0).file.try_clone().unwrap();
        for i in 0..n as u64 {
            let off = (i % (W_SIZE / PAGE)) * PAGE;
            let addr = base + 2 * i * PAGE;
            let r = self
                .dev
                .dma_map(flags, off, addr, PAGE, Some(f.try_clone().unwrap()));
            match r {
                Ok(()) if flags.contains(DmaMapFlags::WRITE) => {
                    self.file(0).mark_writable(off, PAGE)
                }
                Ok(()) => {}
                // Refused only when the table would overflow (it is unchanged).
                Err(e) => {
                    let now = self.dev.dma_ranges();
                    let need = cut_list(&now, addr, addr + PAGE).len()
                        + usize::from(flags.contains(DmaMapFlags::WRITE));
                    assert!(
                        need > MAX_MAPPINGS,
                        "map {i} refused with {} mappings: {e}",
                        now.len()
                    );
                }
            }
        }
        check_table(&self.dev.dma_ranges());
    }

    fn reset(&mut self) {
        let before = self.dev.dma_ranges();
        self.dev.reset().unwrap();
        assert_eq!(self.dev.transport().status(), 0);
        assert_eq!(
            self.dev.dma_ranges(),
            before,
            "DEVICE_RESET keeps the DMA maps"
        );
        let mut id = [0u8; 4];
        self.dev.region_read(CFG, 0, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x1045_1af4);
        let mut cmd = [0u8; 2];
        self.dev
            .region_read(CFG, PCI_COMMAND as u64, &mut cmd)
            .unwrap();
        assert_eq!(cmd, [0, 0], "config space back to power-on");
    }

    fn client_gone(&mut self) {
        self.dev.client_gone();
        assert!(self.dev.dma_ranges().is_empty());
        assert_eq!(self.dev.transport().status(), 0);
        self.queues = [QueueModel::default(); NUM_QUEUES];
    }

    // --- raw client byte streams through serve() --------------------------

    fn raw_session(&mut self, c: &mut Cursor) {
        if self.raw_sessions >= MAX_RAW_SESSIONS {
            return;
        }
        self.raw_sessions += 1;
        let n = 1 + usize::from(c.u8() % 12);
        let mut msgs = Vec::with_capacity(n);
        for _ in 0..n {
            msgs.push(self.raw_message(c));
        }
        if c.u8() % 8 == 0 {
            // A partial header at the end.
            let k = 1 + usize::from(c.u8() % 15);
            msgs.push((c.bytes(k), Vec::new()));
        }
        let stats = self.dev.stats();
        let path = socket_path();
        let stop = AtomicBool::new(false);
        let before_panics = RAW_PANICS.load(Ordering::SeqCst);
        let result = std::thread::scope(|s| {
            let client = s.spawn(|| raw_client(&path, msgs, &stop));
            IN_RAW_SESSION.store(true, Ordering::SeqCst);
            let r = freehint_vfio_user::serve(&path, &mut self.dev, false, false);
            IN_RAW_SESSION.store(false, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
            client.join().unwrap();
            r
        });
        let panicked = RAW_PANICS.load(Ordering::SeqCst) > before_panics;
        assert!(result.is_ok(), "serve: {result:?}");
        assert!(!path.exists(), "serve left its socket file");
        let after = self.dev.stats();
        assert_eq!(after.clients, stats.clients + 1);
        assert_eq!(
            after.panicked_sessions,
            stats.panicked_sessions + u64::from(panicked),
            "a panic of the vfio_user crate ends the session and is counted"
        );
        assert!(
            self.dev.dma_ranges().is_empty(),
            "the client's memory is dropped"
        );
        assert_eq!(self.dev.transport().status(), 0, "the device is reset");
        self.queues = [QueueModel::default(); NUM_QUEUES];
    }

    /// One framed message: exactly the bytes the vfio_user crate reads for
    /// it (so that the stream stays in step), with its fds.
    fn raw_message(&mut self, c: &mut Cursor) -> (Vec<u8>, Vec<File>) {
        let command = c.pick(&[
            1u16, 1, 2, 2, 3, 4, 5, 7, 8, 8, 9, 9, 10, 10, 13, 0, 6, 11, 14, 0xffff,
        ]);
        let flags = match c.u8() % 8 {
            0..=4 => 0,
            5 | 6 => HDR_NO_REPLY,
            _ => c.u32(),
        };
        let no_reply = flags & HDR_NO_REPLY != 0;
        let id = c.u16();
        let mut body = Vec::new();
        let mut fds = Vec::new();
        // VERSION: message_size says how much data follows; the other
        // commands' sizes are fixed (the crate ignores the field).
        let mut size: Option<u32> = None;
        match command {
            1 if !no_reply => {
                let data: Vec<u8> = match c.u8() % 6 {
                    0 | 1 => {
                        let mut j = format!(
                            "{{\"capabilities\":{{\"max_msg_fds\":{},\"max_data_xfer_size\":{}}}}}",
                            c.u8(),
                            c.u32()
                        )
                        .into_bytes();
                        j.push(0);
                        j
                    }
                    2 => {
                        let mut v: Vec<u8> = c.short_bytes(64).into_iter().map(|b| b | 1).collect();
                        v.push(0);
                        v
                    }
                    3 => c.short_bytes(64), // no NUL: the crate panics
                    4 => {
                        // message_size below the VERSION struct: the crate panics.
                        size = Some(u32::from(c.u8() % 20));
                        Vec::new()
                    }
                    _ => vec![b'{', 0, b'}', 0],
                };
                body.extend_from_slice(&c.u16().to_le_bytes()); // major
                body.extend_from_slice(&c.u16().to_le_bytes()); // minor
                if size.is_none() {
                    size = Some(20 + data.len().min(RAW_ALLOC_CAP as usize) as u32);
                    body.extend_from_slice(&data);
                }
            }
            2 => {
                let fl = c.pick(&[3u32, 3, 1, 2, 0, 0x1003]);
                let sel = c.u8();
                let addr = gen_addr(c);
                let sz = gen_size(c);
                let off = gen_offset(c, addr);
                body.extend_from_slice(&32u32.to_le_bytes());
                body.extend_from_slice(&fl.to_le_bytes());
                body.extend_from_slice(&off.to_le_bytes());
                body.extend_from_slice(&addr.to_le_bytes());
                body.extend_from_slice(&sz.to_le_bytes());
                let nfds = match sel % 8 {
                    0..=5 => 1,
                    6 => 0,
                    _ => 2,
                };
                for k in 0..nfds {
                    let which = usize::from(sel >> 4) % 3;
                    if k == 0 && sel & 8 == 0 {
                        let f = self.file(which);
                        if fl & 2 != 0 {
                            f.mark_writable(off, sz);
                        }
                        fds.push(f.file.try_clone().unwrap());
                    } else {
                        fds.push(pipe());
                    }
                }
            }
            3 => {
                let fl = c.pick(&[0u32, 0, 4, 2, 6]);
                body.extend_from_slice(&24u32.to_le_bytes());
                body.extend_from_slice(&fl.to_le_bytes());
                body.extend_from_slice(&gen_addr(c).to_le_bytes());
                body.extend_from_slice(&gen_size(c).to_le_bytes());
            }
            4 | 7 if !no_reply => {
                body.extend(c.bytes(16));
            }
            5 if !no_reply => {
                body.extend(c.bytes(8)); // argsz, flags
                body.extend_from_slice(&u32::from(c.u8() % 10).to_le_bytes()); // index
                body.extend(c.bytes(20));
            }
            8 => {
                let index = c.pick(&[2u32, 2, 0, 1, 3, 4, 5]);
                let fl = c.pick(&[
                    VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
                    VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE,
                    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
                    VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE,
                    VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_BOOL,
                ]);
                let start = u32::from(c.u8() % 8);
                let count = u32::from(c.u8() % 8);
                body.extend_from_slice(&20u32.to_le_bytes());
                body.extend_from_slice(&fl.to_le_bytes());
                body.extend_from_slice(&index.to_le_bytes());
                body.extend_from_slice(&start.to_le_bytes());
                body.extend_from_slice(&count.to_le_bytes());
                let kinds = c.u8();
                for k in 0..count.min(4) {
                    fds.push(match (kinds >> (2 * k)) & 3 {
                        0 | 1 => eventfd(false),
                        2 => eventfd(true),
                        _ => pipe(),
                    });
                }
            }
            9 | 10 if !(command == 9 && no_reply) => {
                let region = gen_region(c);
                let off = gen_region_offset(c, region);
                let count = match c.u8() % 4 {
                    0 | 1 => 1u32 << (c.u8() % 4),
                    2 => u32::from(c.u16()) % (RAW_ALLOC_CAP + 1),
                    _ => 256,
                };
                body.extend_from_slice(&off.to_le_bytes());
                body.extend_from_slice(&region.to_le_bytes());
                body.extend_from_slice(&count.to_le_bytes());
                if command == 10 && region < 9 {
                    let mut data = c.bytes(usize::min(count as usize, 8));
                    data.resize(count as usize, 0);
                    body.extend(data);
                }
            }
            _ => {}
        }
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&command.to_le_bytes());
        let size = size.unwrap_or(16 + body.len() as u32);
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend(body);
        (msg, fds)
    }

    // --- the end ------------------------------------------------------------

    fn finish(mut self) {
        // Left-over work ends: each turn is bounded and nothing re-posts now.
        let drained = (0..2048).any(|_| !self.dev.run_pending_work());
        assert!(drained, "pending queue work never ends");
        if std::env::var_os("FREEHINT_FUZZ_TRACE").is_some() {
            // What an input reached (to check seeds): counters of each layer.
            eprintln!(
                "status {:#x} server {:?}\ntransport {:?}\nballoon {:?}\nhints {:?}",
                self.dev.transport().status(),
                self.dev.stats(),
                self.dev.transport().stats(),
                self.balloon.metrics().snapshot(),
                self.hints.status()
            );
        }
        self.client_gone();
        let files = std::mem::take(&mut self.files);
        drop(self);
        if files.iter().any(Option::is_some) {
            assert_eq!(memfd_mappings(), 0, "guest memory still mapped after drop");
        }
        for f in files.iter().flatten() {
            f.check();
        }
    }
}

fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

/// Whether byte `at` of a BAR0 read of `off`+`len` must be zero.
fn bar0_reads_zero(off: u64, len: usize, at: u64) -> bool {
    let within = |start: u64, size: u64| {
        off >= start
            && off
                .checked_add(len as u64)
                .is_some_and(|e| e <= start + size)
    };
    if within(0, COMMON_CFG_LEN) {
        // Registers and the widths they are read with.
        const KNOWN: &[(u64, usize)] = &[
            (0x00, 4),
            (0x04, 4),
            (0x08, 4),
            (0x0c, 4),
            (0x10, 2),
            (0x12, 2),
            (0x14, 1),
            (0x15, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x1e, 2),
            (0x20, 8),
            (0x20, 4),
            (0x24, 4),
            (0x28, 8),
            (0x28, 4),
            (0x2c, 4),
            (0x30, 8),
            (0x30, 4),
            (0x34, 4),
        ];
        !KNOWN.contains(&(off, len))
    } else if within(ISR_CFG_OFFSET, 1) {
        false
    } else if within(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
        at >= DEVICE_CFG_OFFSET + 16
    } else {
        true
    }
}

/// The DMA table: sorted, disjoint, page aligned, bounded.
fn check_table(t: &[(u64, u64)]) {
    assert!(t.len() <= MAX_MAPPINGS, "{} mappings", t.len());
    for w in t.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping mappings {t:x?}");
    }
    for &(a, n) in t {
        assert!(n > 0 && (a | n) % PAGE == 0, "bad mapping {a:#x}+{n:#x}");
    }
}

fn overlapping(t: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    t.iter()
        .copied()
        .filter(|&(a, n)| a < end && a + n > start)
        .collect()
}

/// The table with [start, end) cut out (pieces of cut mappings kept).
fn cut_list(t: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, n) in t {
        let e = a + n;
        if e <= start || a >= end {
            out.push((a, e));
            continue;
        }
        if a < start {
            out.push((a, start));
        }
        if e > end {
            out.push((end, e));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Raw sessions: a client thread on a real socket

static IN_RAW_SESSION: AtomicBool = AtomicBool::new(false);
static RAW_PANICS: AtomicU64 = AtomicU64::new(0);

fn socket_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("fz-vfio-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    dir.join(format!("s{}", N.fetch_add(1, Ordering::Relaxed)))
}

fn send_with_fds(s: &UnixStream, buf: &[u8], fds: &[File]) -> bool {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    let mut sent = 0usize;
    while sent < buf.len() {
        let rest = &buf[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // The fds go with the first bytes only.
        if sent == 0 && !raw.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` bytes, enough for one
            // header with `raw.len()` fds.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    payload as usize,
                );
            }
        }
        // SAFETY: msg describes live buffers; MSG_NOSIGNAL: a closed peer
        // is an error, not SIGPIPE.
        let r = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r <= 0 {
            return false;
        }
        sent += r as usize;
    }
    true
}

fn raw_client(path: &Path, msgs: Vec<(Vec<u8>, Vec<File>)>, stop: &AtomicBool) {
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if !stop.load(Ordering::SeqCst) => std::thread::yield_now(),
            Err(_) => return,
        }
    };
    std::thread::scope(|s| {
        let mut rd = stream.try_clone().unwrap();
        let reader = s.spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(rd.read(&mut sink), Ok(n) if n > 0) {}
        });
        for (buf, fds) in &msgs {
            if !send_with_fds(&stream, buf, fds) {
                break;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Joined explicitly: the scope's own wait does not wait for the
        // thread's exit (its TLS destructors), which LeakSanitizer would
        // see as a leak.
        reader.join().unwrap();
    });
}

// ---------------------------------------------------------------------------
// Set-up: panic hook, logger, seeds

/// Formats every log record (at trace level) into nothing, so that the
/// arguments of every `log` call are evaluated as in a verbose server.
struct SinkLogger;

impl log::Log for SinkLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let _ = std::io::sink().write_fmt(*record.args());
    }

    fn flush(&self) {}
}

fn init() {
    static LOGGER: SinkLogger = SinkLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
    // A panic inside the vfio_user crate during a raw session is what the
    // server's catch_unwind is for: let it unwind. Any other panic aborts
    // (libFuzzer's hook).
    let fuzzer_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let upstream = info
            .location()
            .is_some_and(|l| l.file().contains("vfio_user-0."));
        if upstream && IN_RAW_SESSION.load(Ordering::SeqCst) {
            RAW_PANICS.fetch_add(1, Ordering::SeqCst);
            return;
        }
        fuzzer_hook(info);
    }));
    if let Some(dir) = std::env::var_os("FREEHINT_FUZZ_SEEDS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds::all() {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Operations

mod op {
    pub const DMA_MAP: u8 = 0;
    pub const DMA_UNMAP: u8 = 1;
    pub const READ: u8 = 2;
    pub const WRITE: u8 = 3;
    pub const SET_IRQS: u8 = 4;
    pub const RESET: u8 = 5;
    pub const CLIENT_GONE: u8 = 6;
    pub const PENDING: u8 = 7;
    pub const GUEST_WRITE: u8 = 8;
    pub const BRING_UP: u8 = 9;
    pub const POST: u8 = 10;
    pub const NOTIFY: u8 = 11;
    pub const HOST: u8 = 12;
    pub const WINDOW: u8 = 13;
    pub const MAP_MANY: u8 = 14;
    pub const RAW: u8 = 15;
    pub const COUNT: u8 = 16;
}

fn run(data: &[u8]) {
    let fds_before = open_fds();
    let mut s = Session::new();
    let mut c = Cursor::new(data);
    let mut ops = 0;
    while !c.done() && ops < MAX_OPS {
        ops += 1;
        match c.u8() % op::COUNT {
            op::DMA_MAP => {
                let flags = match c.u8() % 6 {
                    0..=2 => DmaMapFlags::READ_WRITE.bits(),
                    3 => DmaMapFlags::READ.bits(),
                    4 => DmaMapFlags::WRITE.bits(),
                    _ => c.u32(),
                };
                let fd_sel = c.u8();
                let addr = gen_addr(&mut c);
                let size = gen_size(&mut c);
                let offset = gen_offset(&mut c, addr);
                s.dma_map(flags, fd_sel, addr, size, offset);
            }
            op::DMA_UNMAP => {
                let flags = match c.u8() % 6 {
                    0..=2 => 0,
                    3 => DmaUnmapFlags::UNMAP_ALL.bits(),
                    4 => DmaUnmapFlags::GET_DIRTY_PAGE_INFO.bits(),
                    _ => c.u32(),
                };
                let addr = gen_addr(&mut c);
                let size = gen_size(&mut c);
                s.dma_unmap(flags, addr, size);
            }
            op::READ => {
                let region = gen_region(&mut c);
                let off = gen_region_offset(&mut c, region);
                let len = gen_len(&mut c);
                s.read(region, off, len);
            }
            op::WRITE => {
                let region = gen_region(&mut c);
                let off = gen_region_offset(&mut c, region);
                let len = gen_len(&mut c);
                let mut data = c.bytes(len.min(8));
                data.resize(len, 0);
                s.write(region, off, &data);
            }
            op::SET_IRQS => {
                let index = match c.u8() % 8 {
                    0..=2 => VFIO_PCI_MSIX_IRQ_INDEX,
                    3 | 4 => VFIO_PCI_INTX_IRQ_INDEX,
                    5 => 1,
                    6 => u32::from(c.u8() % 8),
                    _ => c.u32(),
                };
                let flags = match c.u8() % 8 {
                    0..=5 => {
                        c.pick(&[
                            VFIO_IRQ_SET_ACTION_TRIGGER,
                            VFIO_IRQ_SET_ACTION_TRIGGER,
                            VFIO_IRQ_SET_ACTION_MASK,
                            VFIO_IRQ_SET_ACTION_UNMASK,
                        ]) | c.pick(&[
                            VFIO_IRQ_SET_DATA_EVENTFD,
                            VFIO_IRQ_SET_DATA_EVENTFD,
                            VFIO_IRQ_SET_DATA_NONE,
                            VFIO_IRQ_SET_DATA_BOOL,
                        ])
                    }
                    _ => c.u32(),
                };
                let start = if c.u8() < 0xf0 {
                    u32::from(c.u8() % 8)
                } else {
                    c.u32()
                };
                let count = match c.u8() % 8 {
                    0..=5 => u32::from(c.u8() % 8),
                    6 => u32::MAX,
                    _ => c.u32(),
                };
                let n = if c.u8() & 1 == 0 {
                    count.min(16) as usize
                } else {
                    usize::from(c.u8() % 17)
                };
                let kinds = c.bytes(n);
                s.set_irqs(index, flags, start, count, &kinds);
            }
            op::RESET => s.reset(),
            op::CLIENT_GONE => s.client_gone(),
            op::PENDING => {
                s.dev.run_pending_work();
            }
            op::GUEST_WRITE => {
                let at = match c.u8() % 4 {
                    0 | 1 => {
                        let q = usize::from(c.u8()) % NUM_QUEUES;
                        let m = s.queues[q];
                        c.pick(&[
                            m.desc,
                            m.avail,
                            m.avail.wrapping_add(2),
                            m.used,
                            m.used.wrapping_add(2),
                        ])
                        .wrapping_add(u64::from(c.u8()))
                    }
                    _ => u64::from(c.u32()) % W_SIZE,
                };
                let n = 1 + usize::from(c.u8() % 64);
                let data = c.bytes(n);
                s.guest_write(at, &data);
            }
            op::BRING_UP => s.bring_up(&mut c),
            op::POST => s.post_chain(&mut c),
            op::NOTIFY => {
                let q = u64::from(c.u8() % 8);
                s.write(0, NOTIFY_CFG_OFFSET + 4 * q, &(q as u16).to_le_bytes());
            }
            op::HOST => s.host(&mut c),
            op::WINDOW => s.window_access(&mut c),
            op::MAP_MANY => s.map_many(&mut c),
            _ => s.raw_session(&mut c),
        }
    }
    s.finish();
    assert_eq!(open_fds(), fds_before, "fds leaked");
}

fuzz_target!(init: init(), |data: &[u8]| {
    run(data);
});

// ---------------------------------------------------------------------------
// Seeds (written when FREEHINT_FUZZ_SEEDS is set)

mod seeds {
    use super::{gen, op, NUM_QUEUES, W_SIZE};

    /// Writes exactly the bytes the decoder reads for each operation.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn u8(&mut self, v: u8) -> &mut Self {
            self.0.push(v);
            self
        }
        fn u16(&mut self, v: u16) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }

        /// DMA_MAP (`flags_mode`: 0 read-write, 3 read-only) of fd
        /// `fd_sel` (0 RAM memfd, 4 second memfd, 5 one-page memfd, 6 none,
        /// 7 pipe) at `addr`+`size`, file offset = address.
        fn map(&mut self, flags_mode: u8, fd_sel: u8, addr: u64, size: u64) -> &mut Self {
            self.u8(op::DMA_MAP).u8(flags_mode).u8(fd_sel);
            self.u8(gen::ADDR_RAW).u64(addr);
            self.u8(gen::SIZE_RAW).u64(size);
            self.u8(gen::OFF_SAME)
        }

        /// A full negotiation, all queues enabled with 2^`size_exp` entries
        /// at the harness's ring layout, MSI-X or INTx.
        fn bring_up(&mut self, msix: bool, size_exp: u8) -> &mut Self {
            self.u8(op::BRING_UP).u8(0).u32(u32::MAX).u8(0x1f);
            self.u8(u8::from(msix));
            for _ in 0..NUM_QUEUES {
                self.u8(size_exp);
            }
            self
        }

        /// One device-readable buffer of 1, 2 or 4 pfns on queue `q`.
        fn post_pfns(&mut self, q: u8, pfns: &[u8], notify: bool) -> &mut Self {
            let len_idx = match pfns.len() {
                1 => 0,
                2 => 1,
                4 => 2,
                n => panic!("{n} pfns"),
            };
            self.u8(op::POST).u8(q).u8(0).u8(u8::from(notify));
            self.u8(0).u8(len_idx).u8(0).raw(pfns);
            self.u8(0)
        }

        /// The current hint command id (a 4-byte buffer) on queue `q`.
        fn post_cmd_id(&mut self, q: u8) -> &mut Self {
            self.u8(op::POST).u8(q).u8(0).u8(1);
            self.u8(0).u8(0).u8(2).u8(0)
        }

        /// A device-writable page (a free page hint) on queue `q`.
        fn post_page(&mut self, q: u8, page: u8) -> &mut Self {
            self.u8(op::POST).u8(q).u8(0).u8(1);
            self.u8(0x85).u8(page).u8(0)
        }

        fn notify(&mut self, q: u8) -> &mut Self {
            self.u8(op::NOTIFY).u8(q)
        }

        /// 1 stats request, 2 new hint round, 3 stop, 4 finish.
        fn host(&mut self, what: u8) -> &mut Self {
            self.u8(op::HOST).u8(what)
        }

        fn done(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.0)
        }
    }

    pub fn all() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let mut e = Enc::default();

        // A clean driver: map RAM, bring up with MSI-X, inflate, deflate,
        // stats, a hint round (command id, then free pages), reset.
        e.map(0, 0, 0, W_SIZE).bring_up(true, 8);
        e.post_pfns(0, &[10, 11, 12, 13], true);
        e.post_pfns(1, &[10, 11], true);
        e.post_pfns(2, &[0, 0, 0, 0], true).host(1);
        e.host(2).post_cmd_id(3);
        for page in 0..8 {
            e.post_page(3, page);
        }
        e.host(4).u8(op::PENDING).u8(op::RESET);
        out.push(("clean-driver", e.done()));

        // INTx with a full eventfd; more buffers than one notify's budget.
        e.map(0, 0, 0, W_SIZE).bring_up(false, 8);
        // SET_IRQS INTx TRIGGER|EVENTFD 0..1, one full eventfd.
        e.u8(op::SET_IRQS).u8(3).raw(&[0, 0, 0, 0, 0, 0, 1, 0, 4]);
        for i in 0..150u8 {
            e.post_pfns(0, &[i % 60], false);
        }
        e.notify(0).u8(op::PENDING).u8(op::PENDING);
        out.push(("intx-storm", e.done()));

        // Read-only RAM: the device must never write it.
        e.map(3, 0, 0, W_SIZE).bring_up(true, 6);
        e.post_pfns(0, &[5, 6], true).post_pfns(3, &[1], true);
        out.push(("read-only-ram", e.done()));

        // Overlapping maps, partial unmaps, a map past EOF, a pipe, no fd,
        // UNMAP_ALL, and more maps than the table holds.
        e.map(0, 0, 0, W_SIZE)
            .map(0, 4, 0x4000, 0x8000)
            .map(3, 0, 0x10000, 0x3000);
        e.map(0, 7, 0x20000, 0x1000)
            .map(0, 5, 0, 0x2000)
            .map(0, 6, 0xc0000, 0x1000);
        e.u8(op::DMA_UNMAP)
            .u8(0)
            .u8(gen::ADDR_PAGE)
            .u8(3)
            .u8(gen::SIZE_PAGES)
            .u8(2);
        e.u8(op::DMA_UNMAP).u8(3).raw(&[0, 0, 0, 0]);
        e.u8(op::MAP_MANY).u16(0).u8(0xa5).u8(7).u8(0);
        out.push(("dma-table", e.done()));

        // Reads all over BAR0, BAR1, config space and an absent region,
        // then the PCI_CFG window onto device_status and the ISR.
        for region_sel in [0u8, 6, 9, 15] {
            for pt in 0..24u8 {
                e.u8(op::READ)
                    .u8(region_sel)
                    .u8(0)
                    .u8(pt)
                    .u8(4)
                    .u8(0)
                    .u8(pt % 4);
            }
        }
        e.u8(op::WINDOW).raw(&[0, 6, 0, 0]);
        e.u8(op::WINDOW).raw(&[0, 23, 0, 0]);
        out.push(("registers", e.done()));

        // A raw client: VERSION, DEVICE_GET_INFO, a config space read, a
        // status write, a DMA_MAP of the RAM memfd.
        e.map(0, 0, 0, W_SIZE);
        e.u8(op::RAW).u8(4);
        e.u8(0).u8(0).u16(1).u8(0).u8(1).u32(1 << 20).u16(0).u16(0);
        e.u8(5).u8(0).u16(2).raw(&[0; 16]);
        e.u8(10).u8(0).u16(3).u8(9).u8(0).u8(0).u8(4).u8(3);
        e.u8(12)
            .u8(0)
            .u16(4)
            .u8(0)
            .u8(0)
            .u8(6)
            .u8(4)
            .u8(0)
            .u8(0)
            .u8(1);
        e.u8(2).u8(0).u16(5).u8(0).u8(0);
        e.u8(gen::ADDR_PAGE)
            .u8(0)
            .u8(gen::SIZE_PAGES)
            .u8(15)
            .u8(gen::OFF_SAME);
        e.u8(1);
        out.push(("raw-client", e.done()));

        // Malformed VERSION messages: data without its NUL, then a
        // message_size below the VERSION struct (each panics the crate).
        e.u8(op::RAW).u8(1);
        e.u8(0)
            .u8(0)
            .u16(7)
            .u8(3)
            .u8(8)
            .raw(b"garbage!")
            .u16(0)
            .u16(0);
        e.u8(0).u8(0).u16(8).u8(4).u8(3).u16(0).u16(0);
        e.u8(1);
        e.u8(op::RAW).u8(0);
        e.u8(0).u8(0).u16(9).u8(4).u8(3).u16(0).u16(0);
        e.u8(1);
        out.push(("raw-bad-version", e.done()));
        out
    }
}
