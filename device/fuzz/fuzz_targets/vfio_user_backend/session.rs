//! The session: the device under test, the harness's model of its queues
//! and memory, and the client messages with the outcome each must have.

mod guest;
pub(crate) mod raw;

use std::fs::File;

use crate::files::{eventfd, memfd_mappings, pipe, MemFile};
use crate::{CFG, NUM_QUEUES, PAGE, W_SIZE};
use freehint_device::balloon::Layout;
use freehint_device::{Balloon, BalloonConfig, BalloonHandle, HintHandle};
use freehint_vfio_user::memory::MAX_MAPPINGS;
use freehint_vfio_user::pci::{
    BAR0_SIZE, BAR1_SIZE, CAP_MSIX, CAP_PCI_CFG_DATA, COMMON_CFG_LEN, CONFIG_SPACE_SIZE,
    DEVICE_CFG_LEN, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET, MSIX_PBA_OFFSET, PCI_COMMAND, PCI_STATUS,
};
use freehint_vfio_user::VfioUserDevice;
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend};

#[derive(Clone, Copy, Default)]
pub(crate) struct QueueModel {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    next_desc: u16,
    slot: u64,
}

pub(crate) struct Session {
    pub(crate) dev: VfioUserDevice,
    balloon: BalloonHandle,
    hints: HintHandle,
    offered: u64,
    files: [Option<MemFile>; 3],
    pub(crate) queues: [QueueModel; NUM_QUEUES],
    raw_sessions: usize,
    /// A MAP_MANY went past `MAX_MAPPINGS` already (once per input: slow).
    filled_table: bool,
    /// Maps MAP_MANY may still make in this input (each one rebuilds the
    /// region table: thousands of them would make the input slow).
    maps_left: usize,
}

impl Session {
    pub(crate) fn new() -> Self {
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

    pub(crate) fn file(&mut self, which: usize) -> &mut MemFile {
        self.files[which].get_or_insert_with(|| MemFile::new(which))
    }

    // --- region accesses --------------------------------------------------

    pub(crate) fn region_size(&self, region: u32) -> u64 {
        match region {
            0 => BAR0_SIZE,
            1 => BAR1_SIZE,
            CFG => CONFIG_SPACE_SIZE as u64,
            _ => 0,
        }
    }

    pub(crate) fn access_ok(&self, region: u32, off: u64, len: usize) -> bool {
        let size = self.region_size(region);
        size > 0
            && (len <= 8 || region == CFG)
            && off.checked_add(len as u64).is_some_and(|e| e <= size)
    }

    pub(crate) fn bar0_write(&mut self, off: u64, len: usize, v: u64) {
        let r = self.dev.region_write(0, off, &v.to_le_bytes()[..len]);
        assert!(r.is_ok(), "BAR0 write {off:#x}/{len} refused: {r:?}");
    }

    pub(crate) fn bar0_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.region_read(0, off, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }

    pub(crate) fn read(&mut self, region: u32, off: u64, len: usize) {
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

    pub(crate) fn write(&mut self, region: u32, off: u64, data: &[u8]) {
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

    pub(crate) fn dma_map(&mut self, flags: u32, fd_sel: u8, addr: u64, size: u64, offset: u64) {
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

    pub(crate) fn dma_unmap(&mut self, flags: u32, addr: u64, size: u64) {
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

    pub(crate) fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        kinds: &[u8],
    ) {
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

    pub(crate) fn reset(&mut self) {
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

    pub(crate) fn client_gone(&mut self) {
        self.dev.client_gone();
        assert!(self.dev.dma_ranges().is_empty());
        assert_eq!(self.dev.transport().status(), 0);
        self.queues = [QueueModel::default(); NUM_QUEUES];
    }

    // --- the end ------------------------------------------------------------

    pub(crate) fn finish(mut self) {
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

/// Whether byte `at` of a BAR0 read of `off`+`len` must be zero.
pub(crate) fn bar0_reads_zero(off: u64, len: usize, at: u64) -> bool {
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
pub(crate) fn check_table(t: &[(u64, u64)]) {
    assert!(t.len() <= MAX_MAPPINGS, "{} mappings", t.len());
    for w in t.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping mappings {t:x?}");
    }
    for &(a, n) in t {
        assert!(n > 0 && (a | n) % PAGE == 0, "bad mapping {a:#x}+{n:#x}");
    }
}

pub(crate) fn overlapping(t: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    t.iter()
        .copied()
        .filter(|&(a, n)| a < end && a + n > start)
        .collect()
}

/// The table with [start, end) cut out (pieces of cut mappings kept).
pub(crate) fn cut_list(t: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
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
