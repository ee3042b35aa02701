// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The device's own dirty log: guest pages the device changed.
//!
//! A migrator's dirty log sees what the guest writes through its page
//! tables. The device changes guest memory too — used ring elements and
//! indexes, bitmap-protocol layout replies, pages it discards (which then
//! read as zero) — from the VMM's or a vfio-user server's own mapping, which
//! such a log may not cover. Every write path of the device marks this log,
//! and the migrator takes it at each sync
//! ([`HintHandle::take_device_dirty`](super::HintHandle::take_device_dirty),
//! [`BalloonHandle::take_device_dirty`](super::BalloonHandle::take_device_dirty)).
//!
//! The log is one vm-memory [`AtomicBitmap`] (lock-free marking from the
//! queue thread, atomic take-and-clear from the migrator) indexed like the
//! free page set: bit `i` = the `i`-th 4 KiB page of the device's
//! [`Layout`]. It does not depend on the guest memory object, so it
//! survives the region set being rebuilt (vfio-user DMA_MAP/UNMAP), and its
//! bits can be OR-ed straight into a to-send bitmap. Pages outside the
//! layout are counted (`device_dirty_outside_layout`), not recorded.

use std::num::NonZeroUsize;

use freehint_protocol::layout::{Layout, Pfn};
use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

use super::metrics::BalloonMetrics;

/// Bytes of a split virtqueue used ring header (`flags`, `idx`).
const USED_RING_HEADER: u64 = 4;
/// Bytes of one used ring element (`id`, `len`).
const USED_ELEMENT: u64 = 8;
/// Offset of `idx` in the used ring.
const USED_IDX_OFFSET: u64 = 2;

/// Guest pages the device wrote or discarded since the last take.
#[derive(Debug)]
pub(crate) struct DeviceDirtyLog {
    layout: Layout,
    /// One bit per layout bit (the bitmap's "page" is one bit).
    bits: AtomicBitmap,
}

impl DeviceDirtyLog {
    /// An empty log over `layout`.
    pub(crate) fn new(layout: Layout) -> Self {
        let bits = usize::try_from(layout.total_bits()).unwrap_or_else(|_| {
            warn!("guest RAM layout too large to log device writes on this host");
            0
        });
        Self {
            layout,
            bits: AtomicBitmap::new(bits, NonZeroUsize::MIN),
        }
    }

    /// Marks every page touched by the `len` bytes at guest-physical `gpa`.
    /// Returns the pages that lie outside the layout (not recorded).
    pub(crate) fn mark(&self, gpa: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let first = Pfn::from_addr(gpa);
        let last = Pfn::from_addr(gpa.saturating_add(len - 1));
        let pages = last.unchecked_offset_from(first) + 1;
        let mut inside = 0;
        self.layout.for_each_bit_run(first, pages, |bit, nr| {
            if let (Ok(bit), Ok(nr)) = (usize::try_from(bit.raw()), usize::try_from(nr)) {
                self.bits.set_addr_range(bit, nr);
            }
            inside += nr;
        });
        pages - inside
    }

    /// Takes the log as layout-order words and clears it.
    pub(crate) fn take(&self) -> Vec<u64> {
        self.bits.get_and_reset()
    }
}

/// Marks device writes in the log and counts those outside the layout.
#[derive(Clone, Copy)]
pub(crate) struct DirtyMarker<'a> {
    pub(crate) log: &'a DeviceDirtyLog,
    pub(crate) metrics: &'a BalloonMetrics,
}

impl DirtyMarker<'_> {
    /// Records that the device changed `len` bytes at guest-physical `gpa`.
    pub(crate) fn mark(&self, gpa: u64, len: u64) {
        let outside = self.log.mark(gpa, len);
        if outside > 0 {
            BalloonMetrics::add(&self.metrics.device_dirty_outside_layout, outside);
        }
    }

    /// `Queue::add_used`, recording the used ring bytes it writes (the
    /// element at the current used index, then `idx`) — also when it fails
    /// half-way, since the element may already be written.
    pub(crate) fn add_used(
        &self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let slot = u64::from(q.next_used() % q.size().max(1));
        let ring = q.used_ring();
        let r = q.add_used(mem, head, len);
        self.mark(
            ring.saturating_add(USED_RING_HEADER + USED_ELEMENT * slot),
            USED_ELEMENT,
        );
        self.mark(ring.saturating_add(USED_IDX_OFFSET), 2);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_protocol::bitmap::test_bit;
    use freehint_protocol::layout::PAGE_SHIFT;

    #[test]
    fn marks_pages_in_layout_order_and_counts_the_rest() {
        // RAM: pfns 0..16 (bits 0..16) and 32..48 (bits 16..32).
        let layout = Layout::from_ram_pfn_ranges(&[(0, 16), (32, 16)]).unwrap();
        let log = DeviceDirtyLog::new(layout);
        assert_eq!(log.mark(0x1ff8, 16), 0); // straddles pages 1 and 2
        assert_eq!(log.mark(33 << PAGE_SHIFT, 1), 0); // pfn 33 = bit 17
        assert_eq!(log.mark(20 << PAGE_SHIFT, 4096), 1); // in the hole
        assert_eq!(log.mark(u64::MAX - 3, 100), 1); // clamped, outside
        assert_eq!(log.mark(5 << PAGE_SHIFT, 0), 0);
        let words = log.take();
        assert_eq!(words.len(), 1);
        let set: Vec<u64> = (0..32).filter(|&b| test_bit(&words, b)).collect();
        assert_eq!(set, vec![1, 2, 17]);
        assert_eq!(log.take(), vec![0], "taking clears the log");
    }
}
