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
