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

use std::io::Write;
use std::path::PathBuf;

use freehint_vfio_user::pci::NOTIFY_CFG_OFFSET;
use libfuzzer_sys::fuzz_target;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags};

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

mod files;
mod input;
mod seeds;
mod session;

use files::open_fds;
use input::{gen_addr, gen_len, gen_offset, gen_region, gen_region_offset, gen_size, Cursor};
use session::Session;

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
    session::raw::install_panic_hook();
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

pub(crate) mod op {
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
                let at = s.pick_guest_address(&mut c);
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
