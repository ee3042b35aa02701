// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The statistics queue. The driver sends one buffer of
//! `struct virtio_balloon_stat` entries; the device keeps it (not used)
//! until the host wants fresh numbers, then returns it and the driver
//! refills and resends it (virtio 1.2 §5.5.6.3).

use std::io::Read;

use freehint_protocol::balloon::QueueKind;
use log::warn;

use super::super::metrics::BalloonMetrics;
use super::super::state::{DeviceState, Shared};
use super::super::stats::BalloonStats;
use super::super::BalloonError;
use super::Chain;
use vm_memory::GuestMemoryMmap;

/// Largest stats buffer the device reads (the rest is ignored and counted).
const MAX_STATS_BYTES: usize = 4096;

/// statsq: parses the buffer and holds it. Returns `None` (not used yet),
/// or `Some(0)` for a buffer the device cannot read (returned at once).
pub(in super::super) fn receive_stats(
    shared: &Shared,
    st: &mut DeviceState,
    chain: &Chain<'_>,
) -> Option<u32> {
    let m = &shared.metrics;
    if chain.descs.iter().any(|d| d.write) {
        BalloonMetrics::inc(&m.wrong_direction);
        warn!("statsq: write-only descriptor in the stats buffer; returned");
        return Some(0);
    }
    let Some((bytes, total)) = read_stats(st, chain) else {
        BalloonMetrics::inc(&m.descriptor_out_of_memory);
        return Some(0);
    };
    let stats = BalloonStats::parse(&bytes);
    BalloonMetrics::add(&m.stats_unknown_tag, u64::from(stats.unknown_tags));
    if stats.trailing_bytes != 0 || total > MAX_STATS_BYTES {
        BalloonMetrics::inc(&m.stats_bad_length);
        warn!("statsq: buffer of {total} bytes is not a whole number of entries");
    }
    BalloonMetrics::inc(&m.stats_updates);
    st.latest_stats = Some(stats);
    // A driver sends one buffer at a time; if it sent another, give the
    // older one back.
    if let Some(old) = st.stats_head.replace(chain.head) {
        match give_back(shared, st, chain.mem, old) {
            Ok(Some(_)) => st.returned_extra = true,
            Ok(None) => {}
            Err(e) => warn!("statsq: cannot return the previous buffer: {e}"),
        }
    }
    None
}

/// The first [`MAX_STATS_BYTES`] of the buffer and its whole length.
fn read_stats(st: &mut DeviceState, chain: &Chain<'_>) -> Option<(Vec<u8>, usize)> {
    let (reader, _) = st.scratch.shadow.reader_writer(chain.mem, chain.descs)?;
    let total = reader.available_bytes();
    let mut bytes = Vec::with_capacity(total.min(MAX_STATS_BYTES));
    reader
        .take(MAX_STATS_BYTES as u64)
        .read_to_end(&mut bytes)
        .ok()?;
    Some((bytes, total))
}

/// Returns the stats buffer the device holds, so the driver sends fresh
/// statistics. `Ok(None)` if no buffer is held (the guest has not sent one
/// yet, or a request is in flight); else the stats queue's index (to
/// interrupt, after dropping the lock).
pub(in super::super) fn return_stats_buffer(
    shared: &Shared,
    st: &mut DeviceState,
    mem: &GuestMemoryMmap,
) -> Result<Option<u16>, BalloonError> {
    let Some(head) = st.stats_head.take() else {
        return Ok(None);
    };
    give_back(shared, st, mem, head)?
        .ok_or(BalloonError::NotActivated)
        .map(Some)
}

/// Returns buffer `head` of the stats queue used (0 bytes). `Ok(None)` if
/// there is no stats queue.
fn give_back(
    shared: &Shared,
    st: &mut DeviceState,
    mem: &GuestMemoryMmap,
    head: u16,
) -> Result<Option<u16>, BalloonError> {
    let Some(index) = st.queue_layout.index_of(QueueKind::Stats) else {
        return Ok(None);
    };
    let Some(q) = st.queues.get_mut(usize::from(index)) else {
        return Ok(None);
    };
    shared
        .marker()
        .add_used(q, mem, head, 0)
        .map_err(|source| BalloonError::UsedRing {
            queue: index,
            source,
        })?;
    Ok(Some(index))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{buffer, fixture};
    use super::*;
    use freehint_protocol::balloon::{encode_stat, VIRTIO_BALLOON_S_MEMFREE};

    #[test]
    fn a_stats_buffer_is_parsed_and_held() {
        let (shared, mem, _) = fixture(0);
        let mut bytes = encode_stat(VIRTIO_BALLOON_S_MEMFREE, 4096).to_vec();
        bytes.extend(encode_stat(999, 1));
        // Split over two descriptors, in the middle of an entry.
        let descs = [
            buffer(&mem, 0x1000, &bytes[..7], false),
            buffer(&mem, 0x2000, &bytes[7..], false),
        ];
        let chain = Chain {
            head: 3,
            descs: &descs,
            mem: &mem,
        };
        let mut st = shared.lock();
        assert_eq!(receive_stats(&shared, &mut st, &chain), None);
        assert_eq!(st.stats_head, Some(3));
        let stats = st.latest_stats.clone().unwrap();
        assert_eq!(stats.get(VIRTIO_BALLOON_S_MEMFREE), Some(4096));
        let m = shared.metrics.snapshot();
        assert_eq!((m.stats_updates, m.stats_unknown_tag), (1, 1));
        assert_eq!(m.stats_bad_length, 0);
    }

    #[test]
    fn bad_stats_buffers() {
        let (shared, mem, _) = fixture(0);
        let mut st = shared.lock();
        // Write-only: returned at once, nothing held.
        let descs = [buffer(&mem, 0x1000, &[0; 10], true)];
        let chain = Chain {
            head: 1,
            descs: &descs,
            mem: &mem,
        };
        assert_eq!(receive_stats(&shared, &mut st, &chain), Some(0));
        assert_eq!(st.stats_head, None);
        // Too long, and not whole entries: read up to the bound, counted.
        let descs = [buffer(&mem, 0x2000, &[0; MAX_STATS_BYTES + 3], false)];
        let chain = Chain {
            head: 2,
            descs: &descs,
            mem: &mem,
        };
        assert_eq!(receive_stats(&shared, &mut st, &chain), None);
        let m = shared.metrics.snapshot();
        assert_eq!((m.wrong_direction, m.stats_bad_length), (1, 1));
    }

    #[test]
    fn nothing_to_return_without_a_held_buffer_or_a_stats_queue() {
        let (shared, mem, _) = fixture(0);
        let mut st = shared.lock();
        assert!(matches!(
            return_stats_buffer(&shared, &mut st, &mem),
            Ok(None)
        ));
        st.stats_head = Some(0);
        assert!(matches!(
            return_stats_buffer(&shared, &mut st, &mem),
            Err(BalloonError::NotActivated)
        ));
    }
}
