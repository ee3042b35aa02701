// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Balloon counters: one per rejection path, plus activity counters.
//!
//! Counters are relaxed atomics, readable any time as a [`MetricsSnapshot`]
//! which serializes (serde) as one JSON object, e.g.
//!
//! ```text
//! {"inflate_pages":256,"deflate_pages":0,"discard_fail":0,...}
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Live counters of one balloon device.
        #[derive(Debug, Default)]
        pub struct BalloonMetrics {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A point-in-time copy of [`BalloonMetrics`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct MetricsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl BalloonMetrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl MetricsSnapshot {
            /// The snapshot as one JSON object (counter name → value).
            pub fn to_json(&self) -> String {
                serde_json::to_string(self).unwrap_or_default()
            }
        }
    };
}

metrics! {
    /// Pages the driver put into the balloon (valid pfns).
    inflate_pages,
    /// Pages the driver took back.
    deflate_pages,
    /// Inflate/deflate pfns outside guest RAM (skipped).
    pfn_out_of_range,
    /// Inflate/deflate descriptors that were write-only, not a multiple of 4
    /// bytes, or too long (skipped, still returned used).
    bad_pfn_descriptor,
    /// Discard calls that failed (the pages stay populated).
    discard_fail,
    /// Bytes of guest RAM discarded (inflate + reporting).
    discard_bytes,
    /// Discards skipped because the guest poisons free pages.
    discard_skipped_poison,
    /// Chains rejected because they had more than `MAX_CHAIN_DESCRIPTORS`
    /// descriptors or ended in a cut-off loop.
    chain_too_long,
    /// Chains with an indirect descriptor (anywhere in the chain) although
    /// the driver did not accept `VIRTIO_RING_F_INDIRECT_DESC`.
    indirect_not_negotiated,
    /// Chains with a malformed indirect descriptor: with NEXT, inside an
    /// indirect table, or with an empty or misaligned table.
    bad_indirect,
    /// Available ring entries naming a descriptor beyond the queue size
    /// (skipped; they cannot be returned used).
    bad_head_index,
    /// Chains with a descriptor outside guest memory.
    descriptor_out_of_memory,
    /// Chains whose descriptors go the wrong direction for their queue.
    wrong_direction,
    /// Stats buffers received.
    stats_updates,
    /// Stats entries with a tag this device does not know (ignored).
    stats_unknown_tag,
    /// Stats buffers whose length is not a multiple of 10 (tail ignored).
    stats_bad_length,
    /// Free page reports received (chains).
    report_chains,
    /// Bytes of guest RAM reported free by free page reporting.
    report_bytes,
    /// Hint rounds started.
    hint_rounds,
    /// Hint rounds refused (poisoning guest, device not ready, ...).
    hint_rounds_refused,
    /// Pages covered by merged hints (standard blocks: whole pages inside
    /// the layout; bitmap chunks: `nr_bits`, set or not).
    hint_pages,
    /// Hint messages dropped because their command id was stale or the round
    /// was not accepting hints.
    hint_stale,
    /// Hint messages dropped because the sync epoch moved.
    hint_epoch_dropped,
    /// Command id outbufs that were not exactly 4 bytes.
    hint_bad_cmd_buffer,
    /// Hint free blocks with only partial pages (ignored bytes).
    hint_partial_pages,
    /// Hint bytes outside the RAM layout (ignored).
    hint_out_of_layout,
    /// Bitmap-protocol messages that failed to parse (bad magic, kind,
    /// reserved fields, misaligned or oversize chunk, ...).
    bitmap_bad_message,
    /// Bitmap chunks reaching beyond the layout.
    bitmap_beyond_layout,
    /// Bitmap chunks whose payload was shorter than their header says.
    bitmap_short_payload,
    /// Layout queries without a large enough writable buffer.
    bitmap_bad_reply_buffer,
    /// Chains on a queue the device does not know how to handle.
    unknown_queue,
    /// Guest pages the device wrote or discarded that lie outside the RAM
    /// layout, so the device dirty log cannot report them.
    device_dirty_outside_layout,
}

impl BalloonMetrics {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Increments a counter.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_json() {
        let m = BalloonMetrics::default();
        BalloonMetrics::inc(&m.hint_stale);
        BalloonMetrics::add(&m.inflate_pages, 5);
        let s = m.snapshot();
        assert_eq!(s.hint_stale, 1);
        assert_eq!(s.inflate_pages, 5);
        let j = s.to_json();
        assert!(j.starts_with("{\"inflate_pages\":5,"));
        assert!(j.contains("\"hint_stale\":1"));
        assert!(j.ends_with('}'));
    }
}
