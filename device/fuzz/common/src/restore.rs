// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Restoring an untrusted [`BalloonState`]: the fuzz model of a migration
//! stream or snapshot file that arrives from another host.
//!
//! A [`RestoreInput`] runs a source session (a [`BalloonInput`]), saves the
//! source device's state, edits it with hostile [`StateEdit`]s (any field,
//! any queue, queues added or dropped), copies the source's guest memory to
//! a destination device built with the same configuration, and restores the
//! edited state there. [`run_restore`] then checks the contract of
//! `Balloon::restore_state`:
//!
//! - a refused state leaves the destination device exactly as it was;
//! - an accepted state is what the device reports afterwards (features,
//!   target, actual size, poison value);
//! - the restored device then serves the rest of the session (`ops`, with
//!   its rings wherever the restored queues say) with the same hint API
//!   invariants as [`run`](crate::run).

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
};

use crate::{BalloonInput, DriverQueue, Harness, Op, Outcome, MAX_OPS};
use freehint_device::balloon::BalloonState;

/// Most state edits applied per input.
pub const MAX_EDITS: usize = 64;

/// One field of a saved queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueField {
    /// `max_size`.
    MaxSize(u16),
    /// `next_avail`.
    NextAvail(u16),
    /// `next_used`.
    NextUsed(u16),
    /// `event_idx_enabled`.
    EventIdx(bool),
    /// `size`.
    Size(u16),
    /// `ready`.
    Ready(bool),
    /// Descriptor table address.
    DescTable(u64),
    /// Available ring address.
    AvailRing(u64),
    /// Used ring address.
    UsedRing(u64),
}

/// A hostile change to the saved state before it is restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateEdit {
    /// Replaces the acknowledged features.
    AckedFeatures(u64),
    /// Replaces `num_pages`.
    NumPages(u32),
    /// Replaces `actual`.
    Actual(u32),
    /// Replaces `poison_val`.
    PoisonVal(u32),
    /// Claims the device was (not) activated.
    Activated(bool),
    /// Drops the last queue.
    DropQueue,
    /// Appends a copy of queue `index` (modulo the count), or a zeroed one.
    DuplicateQueue(u8),
    /// Changes one field of queue `index` (modulo the count).
    Queue {
        /// Which queue.
        index: u8,
        /// What to change.
        field: QueueField,
    },
    /// Replaces the held stats buffer head.
    StatsHead(Option<u16>),
    /// Replaces the latest hint command id.
    HintCmdId(u32),
    /// Claims a hint round was (not) requested.
    HintRoundRequested(bool),
}

/// A whole restore fuzz input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreInput {
    /// The source session whose state is saved.
    pub source: BalloonInput,
    /// Edits to the saved state.
    pub edits: Vec<StateEdit>,
    /// The session continued on the destination after a successful restore.
    pub ops: Vec<Op>,
}

/// Decodes fuzz bytes (`None` if they are not a valid input).
pub fn decode(data: &[u8]) -> Option<RestoreInput> {
    use bincode::Options;
    crate::options().deserialize(data).ok()
}

/// Encodes an input (for seeds).
pub fn encode(input: &RestoreInput) -> Vec<u8> {
    use bincode::Options;
    crate::options()
        .serialize(input)
        .expect("serialising an in-memory input cannot fail")
}

/// Runs one input. Panics (through `assert!`) only when the device breaks
/// the restore contract or a hint API invariant.
pub fn run_restore(input: &RestoreInput) -> Outcome {
    let (Some(mut src), Some(mut dst)) = (Harness::new(&input.source), Harness::new(&input.source))
    else {
        return Outcome::default();
    };
    src.outcome.activated = src.activate();
    src.play(&input.source.ops);
    let mut state = src.balloon.save_state();
    for edit in input.edits.iter().take(MAX_EDITS) {
        edit.apply(&mut state);
    }
    copy_memory(&src, &dst);

    let before = dst.balloon.save_state();
    let irq: std::sync::Arc<dyn freehint_device::Interrupt> = dst.irq.clone();
    match dst
        .balloon
        .restore_state(&state, Some(dst.mem.clone()), Some(irq))
    {
        Err(_) => assert_eq!(
            dst.balloon.save_state(),
            before,
            "a refused state changed the device"
        ),
        Ok(()) => {
            check_restored(&dst, &state);
            dst.outcome.activated = state.activated;
            dst.driver = driver_queues(&dst, &state);
            dst.play(&input.ops[..input.ops.len().min(MAX_OPS)]);
        }
    }
    dst.finish()
}

impl StateEdit {
    fn apply(self, s: &mut BalloonState) {
        match self {
            Self::AckedFeatures(v) => s.acked_features = v,
            Self::NumPages(v) => s.num_pages = v,
            Self::Actual(v) => s.actual = v,
            Self::PoisonVal(v) => s.poison_val = v,
            Self::Activated(v) => s.activated = v,
            Self::DropQueue => {
                s.queues.pop();
            }
            Self::DuplicateQueue(i) => {
                let q = pick(&s.queues, i).copied().unwrap_or_default();
                s.queues.push(q);
            }
            Self::Queue { index, field } => {
                let n = s.queues.len();
                if n > 0 {
                    field.apply(&mut s.queues[usize::from(index) % n]);
                }
            }
            Self::StatsHead(v) => s.stats_head = v,
            Self::HintCmdId(v) => s.hint_cmd_id = v,
            Self::HintRoundRequested(v) => s.hint_round_requested = v,
        }
    }
}

impl QueueField {
    fn apply(self, q: &mut QueueState) {
        match self {
            Self::MaxSize(v) => q.max_size = v,
            Self::NextAvail(v) => q.next_avail = v,
            Self::NextUsed(v) => q.next_used = v,
            Self::EventIdx(v) => q.event_idx_enabled = v,
            Self::Size(v) => q.size = v,
            Self::Ready(v) => q.ready = v,
            Self::DescTable(v) => q.desc_table = v,
            Self::AvailRing(v) => q.avail_ring = v,
            Self::UsedRing(v) => q.used_ring = v,
        }
    }
}

fn pick<T>(v: &[T], i: u8) -> Option<&T> {
    (!v.is_empty()).then(|| &v[usize::from(i) % v.len()])
}

/// Migration carries guest memory: the destination starts with the source's.
fn copy_memory(src: &Harness, dst: &Harness) {
    let (from, to) = (src.mem.memory(), dst.mem.memory());
    let mut buf = vec![0u8; 4096];
    for region in from.iter() {
        let start = region.start_addr().raw_value();
        for off in (0..region.len()).step_by(buf.len()) {
            let addr = GuestAddress(start + off);
            if from.read_slice(&mut buf, addr).is_ok() {
                let _ = to.write_slice(&buf, addr);
            }
        }
    }
}

/// What the device shows after an accepted restore is the state restored.
fn check_restored(dst: &Harness, state: &BalloonState) {
    let now = dst.balloon.save_state();
    assert_eq!(now.acked_features, state.acked_features, "features");
    assert_eq!(now.num_pages, state.num_pages, "num_pages");
    assert_eq!(now.actual, state.actual, "actual");
    assert_eq!(now.poison_val, state.poison_val, "poison_val");
    assert_eq!(now.activated, state.activated, "activation");
    let handle = dst.balloon.handle();
    assert_eq!(handle.target_pages(), state.num_pages);
    assert_eq!(handle.actual_pages(), state.actual);
}

/// The driver side of the restored queues: rings where the state says,
/// the avail index as the guest memory holds it.
fn driver_queues(dst: &Harness, state: &BalloonState) -> Vec<DriverQueue> {
    if !state.activated {
        return Vec::new();
    }
    let m = dst.mem.memory();
    state
        .queues
        .iter()
        .map(|q| DriverQueue {
            size: q.size,
            desc: q.desc_table,
            avail: q.avail_ring,
            avail_idx: m
                .read_obj::<u16>(GuestAddress(q.avail_ring.wrapping_add(2)))
                .map(u16::from_le)
                .unwrap_or(0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    fn input(source: BalloonInput, edits: Vec<StateEdit>) -> RestoreInput {
        let ops = source.ops.clone();
        RestoreInput { source, edits, ops }
    }

    /// Every seed session restores unedited and goes on serving; the
    /// restored device does the same work again (its counters move).
    #[test]
    fn unedited_states_restore_and_serve() {
        for (name, seed) in seeds::all() {
            let out = run_restore(&input(seed, Vec::new()));
            assert!(out.activated, "{name}: restore of an activated state");
        }
    }

    /// States pointing outside the offered features or guest memory are
    /// refused (the assertion that the device is unchanged runs inside).
    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let hostile = [
            StateEdit::AckedFeatures(u64::MAX),
            StateEdit::Queue {
                index: 0,
                field: QueueField::DescTable(u64::MAX - 7),
            },
            StateEdit::Queue {
                index: 0,
                field: QueueField::Size(3),
            },
            StateEdit::Queue {
                index: 0,
                field: QueueField::MaxSize(u16::MAX),
            },
            StateEdit::DropQueue,
            StateEdit::StatsHead(Some(u16::MAX)),
        ];
        let (_, seed) = seeds::all().into_iter().next().expect("a seed");
        for edit in hostile {
            let out = run_restore(&input(seed.clone(), vec![edit]));
            assert!(!out.activated, "{edit:?} was accepted");
        }
    }

    /// Writes the seed corpus of `balloon_restore`: every seed session,
    /// restored unedited.
    #[test]
    fn write_seed_corpus() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/balloon_restore");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, seed) in seeds::all() {
            std::fs::write(dir.join(name), encode(&input(seed, Vec::new()))).unwrap();
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let (_, seed) = seeds::all().into_iter().next().expect("a seed");
        let i = input(seed, vec![StateEdit::NumPages(7), StateEdit::DropQueue]);
        assert_eq!(decode(&encode(&i)), Some(i));
    }
}
