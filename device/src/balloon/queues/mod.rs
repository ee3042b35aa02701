// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Queue processing: [`process_queue`] pops the chains the driver made
//! available, reads each one with [`collect_chain`], hands it to the
//! handler of its queue and returns it used:
//! - [`inflate`]: `inflate` and `deflate` (pfn arrays);
//! - [`stats`]: `receive_stats` (the buffer is held until the host asks
//!   again) and `return_stats_buffer`;
//! - [`report`]: `discard_reported` (free page reporting);
//! - [`free_page`]: `receive_hints` (free page hints: standard protocol and
//!   the bitmap extension).
//!
//! Guest input is hostile: every chain is bounded
//! ([`MAX_CHAIN_DESCRIPTORS`](super::MAX_CHAIN_DESCRIPTORS)), every
//! descriptor is checked against guest memory before use, and every
//! rejection is logged, counted in [`BalloonMetrics`] and still returned to
//! the driver as used ("skip, log, count, complete").

pub(super) mod free_page;
pub(super) mod inflate;
pub(super) mod report;
pub(super) mod stats;

use freehint_protocol::balloon::QueueKind;
use log::warn;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::chain::{collect_chain, ChainError, Desc, DescTable};
use super::metrics::BalloonMetrics;
use super::state::{DeviceState, Shared};
use super::BalloonError;

/// A chain the device accepted: its descriptors, each read once from the
/// guest and checked against guest memory.
pub(super) struct Chain<'a> {
    /// Head descriptor index (what goes back in the used ring).
    pub(super) head: u16,
    /// The descriptors in chain order (indirect tables flattened).
    pub(super) descs: &'a [Desc],
    /// Guest memory the buffers live in.
    pub(super) mem: &'a GuestMemoryMmap,
}

/// What processing some chains of a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Processed {
    /// Buffers were returned used: interrupt the driver.
    pub(super) used: bool,
    /// The budget ran out; more chains may be waiting.
    pub(super) more: bool,
}

/// Processes at most `budget` chains of queue `index`, of role `kind`.
pub(super) fn process_queue(
    shared: &Shared,
    st: &mut DeviceState,
    mem: &GuestMemoryMmap,
    index: u16,
    kind: QueueKind,
    mut budget: usize,
) -> Result<Processed, BalloonError> {
    st.returned_extra = false;
    let mut used = false;
    let more = loop {
        if !st.queues.get(usize::from(index)).is_some_and(|q| q.ready()) {
            break false;
        }
        if budget == 0 {
            break true;
        }
        let Some(head) = pop_head(shared, st, mem, index, kind) else {
            break false;
        };
        budget -= 1;
        let Some(head) = head else {
            continue;
        };
        if let Some(len) = process_chain(shared, st, mem, index, kind, head) {
            add_used(shared, st, mem, index, head, len)?;
            used = true;
        }
    };
    Ok(Processed {
        used: used || st.returned_extra,
        more,
    })
}

/// The head of the next available chain: `None` when there is none,
/// `Some(None)` for a head beyond the queue (counted: it cannot be returned
/// either).
fn pop_head(
    shared: &Shared,
    st: &mut DeviceState,
    mem: &GuestMemoryMmap,
    index: u16,
    kind: QueueKind,
) -> Option<Option<u16>> {
    let q = st.queues.get_mut(usize::from(index))?;
    let head = q.pop_descriptor_chain(mem)?.head_index();
    if head >= q.size() {
        BalloonMetrics::inc(&shared.metrics.bad_head_index);
        warn!("{kind}: available ring names descriptor {head} beyond the queue; skipped");
        return Some(None);
    }
    Some(Some(head))
}

/// Reads the chain at `head` and runs its queue's handler. Returns the
/// used length, or `None` if the buffer is held (stats).
fn process_chain(
    shared: &Shared,
    st: &mut DeviceState,
    mem: &GuestMemoryMmap,
    index: u16,
    kind: QueueKind,
    head: u16,
) -> Option<u32> {
    let q = st.queues.get(usize::from(index))?;
    let table = DescTable {
        addr: q.desc_table(),
        entries: q.size(),
    };
    let indirect_ok = st.has_feature(VIRTIO_RING_F_INDIRECT_DESC);
    let mut descs = std::mem::take(&mut st.scratch.descs);
    let used_len = match collect_chain(mem, table, head, indirect_ok, &mut descs) {
        Err(e) => {
            count_chain_error(&shared.metrics, kind, head, e);
            Some(0)
        }
        Ok(()) => {
            let chain = Chain {
                head,
                descs: &descs,
                mem,
            };
            handle_chain(shared, st, kind, &chain)
        }
    };
    st.scratch.descs = descs;
    used_len
}

/// Runs the handler of a `kind` queue on an accepted chain.
fn handle_chain(
    shared: &Shared,
    st: &mut DeviceState,
    kind: QueueKind,
    chain: &Chain<'_>,
) -> Option<u32> {
    match kind {
        QueueKind::Inflate => Some(inflate::inflate(shared, st, chain)),
        QueueKind::Deflate => Some(inflate::deflate(shared, st, chain)),
        QueueKind::Stats => stats::receive_stats(shared, st, chain),
        QueueKind::Reporting => Some(report::discard_reported(shared, st, chain)),
        QueueKind::FreePage => Some(free_page::receive_hints(shared, st, chain)),
    }
}

/// Returns chain `head` of queue `index` used with `len` bytes written.
fn add_used(
    shared: &Shared,
    st: &mut DeviceState,
    mem: &GuestMemoryMmap,
    index: u16,
    head: u16,
    len: u32,
) -> Result<(), BalloonError> {
    let q = st
        .queues
        .get_mut(usize::from(index))
        .ok_or(BalloonError::NotActivated)?;
    shared
        .marker()
        .add_used(q, mem, head, len)
        .map_err(|source| BalloonError::UsedRing {
            queue: index,
            source,
        })
}

/// Counts and logs a rejected chain.
fn count_chain_error(m: &BalloonMetrics, kind: QueueKind, head: u16, e: ChainError) {
    let (counter, why) = match e {
        ChainError::IndirectNotNegotiated => (
            &m.indirect_not_negotiated,
            "has an indirect descriptor but INDIRECT_DESC was not negotiated",
        ),
        ChainError::BadIndirect => (&m.bad_indirect, "has a malformed indirect descriptor"),
        ChainError::TooLong => (&m.chain_too_long, "is too long or looping"),
        ChainError::OutOfMemory => (
            &m.descriptor_out_of_memory,
            "has a descriptor outside guest memory",
        ),
    };
    BalloonMetrics::inc(counter);
    warn!("{kind}: chain {head} {why}; dropped");
}

/// A device state and guest memory to run handlers on, without a driver.
#[cfg(test)]
pub(super) mod test_support {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::super::chain::Desc;
    use super::super::discard::{DiscardError, PageDiscard};
    use super::super::state::Shared;
    use super::super::{BalloonConfig, Layout, PAGE_SIZE};

    /// Pages of guest RAM (and of the layout) in the fixture.
    pub(crate) const PAGES: u64 = 256;

    /// Records discards instead of doing them.
    #[derive(Debug, Default)]
    pub(crate) struct RecordingDiscard(pub(crate) Mutex<Vec<(u64, u64)>>);

    impl PageDiscard for RecordingDiscard {
        fn discard(
            &self,
            _mem: &GuestMemoryMmap,
            addr: GuestAddress,
            len: u64,
        ) -> Result<(), DiscardError> {
            self.0.lock().unwrap().push((addr.0, len));
            Ok(())
        }
    }

    impl RecordingDiscard {
        /// The discards so far as (first pfn, pages).
        pub(crate) fn pfn_runs(&self) -> Vec<(u64, u64)> {
            let calls = self.0.lock().unwrap();
            calls
                .iter()
                .map(|&(a, l)| (a / PAGE_SIZE, l / PAGE_SIZE))
                .collect()
        }
    }

    /// A device (all features offered, `features` acked) over [`PAGES`]
    /// pages of guest RAM at 0.
    pub(crate) fn fixture(features: u64) -> (Shared, GuestMemoryMmap, Arc<RecordingDiscard>) {
        let layout = Layout::from_ram_pfn_ranges(&[(0, PAGES)]).unwrap();
        let discard = Arc::new(RecordingDiscard::default());
        let shared = Shared::new(&BalloonConfig::all_features(layout), discard.clone()).unwrap();
        shared.lock().set_features(features);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)])
            .unwrap();
        (shared, mem, discard)
    }

    /// Writes `bytes` at `addr` and returns a descriptor for them.
    pub(crate) fn buffer(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8], write: bool) -> Desc {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        Desc {
            addr,
            len: bytes.len() as u32,
            write,
        }
    }
}
