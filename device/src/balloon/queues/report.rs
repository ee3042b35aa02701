// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Free page reporting (virtio 1.2 §5.5.6.5): the driver hands over free
//! blocks as device-writable buffers; their address and length *are* the
//! report (the device neither reads nor writes them).

use freehint_protocol::layout::{PAGE_SHIFT, PAGE_SIZE};
use log::warn;

use super::super::metrics::BalloonMetrics;
use super::super::state::{DeviceState, Shared};
use super::super::VIRTIO_BALLOON_F_PAGE_POISON;
use super::inflate::discard_pages;
use super::Chain;

/// reporting_vq: discards the whole pages of each reported block, unless
/// the guest poisons free pages. Returns the used length (0).
pub(in super::super) fn discard_reported(
    shared: &Shared,
    st: &mut DeviceState,
    chain: &Chain<'_>,
) -> u32 {
    let m = &shared.metrics;
    BalloonMetrics::inc(&m.report_chains);
    let poisoned = st.has_feature(VIRTIO_BALLOON_F_PAGE_POISON) && st.poison_val != 0;
    for d in chain.descs {
        if !d.write {
            BalloonMetrics::inc(&m.wrong_direction);
            warn!("reporting_vq: read-only descriptor; skipped");
            continue;
        }
        BalloonMetrics::add(&m.report_bytes, u64::from(d.len));
        if poisoned {
            // QEMU: "we must not discard the page if ... the guest is
            // expecting it to retain a non-zero value".
            BalloonMetrics::inc(&m.discard_skipped_poison);
            continue;
        }
        let start = d.addr.div_ceil(PAGE_SIZE);
        let end = d.addr.saturating_add(u64::from(d.len)) >> PAGE_SHIFT;
        if end > start {
            discard_pages(shared, st, chain, start, end - start);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::super::test_support::fixture;
    use super::*;
    use crate::balloon::chain::Desc;
    use crate::balloon::feature;

    fn block(addr: u64, len: u32, write: bool) -> Desc {
        Desc { addr, len, write }
    }

    #[test]
    fn whole_pages_of_reported_blocks_are_discarded() {
        let (shared, mem, discard) = fixture(0);
        let descs = [
            block(0x10000, 0x4000, true),
            block(0x20800, 0x3000, true), // pages 0x21 and 0x22 whole
            block(0x30000, 0x800, true),  // no whole page
            block(0x40000, 0x1000, false),
        ];
        let chain = Chain {
            head: 0,
            descs: &descs,
            mem: &mem,
        };
        assert_eq!(discard_reported(&shared, &mut shared.lock(), &chain), 0);
        assert_eq!(discard.pfn_runs(), [(0x10, 4), (0x21, 2)]);
        let m = shared.metrics.snapshot();
        assert_eq!((m.report_chains, m.wrong_direction), (1, 1));
        assert_eq!(m.report_bytes, 0x4000 + 0x3000 + 0x800);
    }

    #[test]
    fn a_poisoning_guest_keeps_its_pages() {
        let (shared, mem, discard) = fixture(feature(VIRTIO_BALLOON_F_PAGE_POISON));
        shared.lock().poison_val = 0xaa;
        let descs = [block(0x10000, 0x4000, true)];
        let chain = Chain {
            head: 0,
            descs: &descs,
            mem: &mem,
        };
        discard_reported(&shared, &mut shared.lock(), &chain);
        assert!(discard.pfn_runs().is_empty());
        assert_eq!(shared.metrics.snapshot().discard_skipped_poison, 1);
        // Poison 0 is as good as none.
        shared.lock().poison_val = 0;
        discard_reported(&shared, &mut shared.lock(), &chain);
        assert_eq!(discard.pfn_runs(), [(0x10, 4)]);
    }
}
