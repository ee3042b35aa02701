// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Saving and restoring the device (snapshot, live migration).
//!
//! [`BalloonState`] is plain data. On restore it is **untrusted**: it may
//! come from another host or from a file. [`Balloon::restore_state`]
//! re-validates every field the way the device validates the driver:
//! features ⊆ offered, each queue through virtio-queue's validating
//! `TryFrom<QueueState>` and `is_valid` against the destination's guest
//! memory, and a held stats buffer inside its queue. A bad state is a typed
//! error and leaves the device unchanged.
//!
//! Hints never cross a migration. The free page set and the epoch stay on
//! the source. If a hint round had been requested, the restored device shows
//! DONE in `free_page_hint_cmd_id` and raises a config interrupt, so a guest
//! that set pages aside for the round gives them back. Command ids continue
//! after the saved one, so a late message for an old round is stale.

use std::sync::Arc;

use freehint_protocol::balloon::{QueueKind, QueueLayout};
use log::info;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddressSpace;

use super::{Balloon, BalloonError};
use crate::virtio_device::{GuestMemoryHandle, Interrupt};

/// Everything the device needs to continue on another host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonState {
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// `num_pages` (the host's target).
    pub num_pages: u32,
    /// `actual` (what the driver reported).
    pub actual: u32,
    /// `poison_val`.
    pub poison_val: u32,
    /// Whether the device was activated (queues below are live).
    pub activated: bool,
    /// Queue states by index (compacted numbering of `acked_features`).
    pub queues: Vec<QueueState>,
    /// Head of the stats buffer the device holds, if any.
    pub stats_head: Option<u16>,
    /// Latest free page hint command id (0: none yet).
    pub hint_cmd_id: u32,
    /// Whether a hint round had been requested since activation.
    pub hint_round_requested: bool,
}

impl Balloon {
    /// Captures the device state. Call it with the device quiesced (the
    /// transport not processing notifies).
    pub fn save_state(&self) -> BalloonState {
        let st = self.shared.lock();
        let (hint_cmd_id, hint_round_requested) = st.hints.saved_round();
        BalloonState {
            acked_features: st.acked_features,
            num_pages: st.num_pages,
            actual: st.actual,
            poison_val: st.poison_val,
            activated: st.mem.is_some(),
            queues: st.queues.iter().map(|q| q.state()).collect(),
            stats_head: st.stats_head,
            hint_cmd_id,
            hint_round_requested,
        }
    }

    /// Restores `state` (untrusted) into this device, created with the same
    /// [`BalloonConfig`](super::BalloonConfig) as the source. Needs the
    /// destination's guest memory and interrupt if the state is activated.
    /// On error the device is left as it was.
    pub fn restore_state(
        &mut self,
        state: &BalloonState,
        mem: Option<GuestMemoryHandle>,
        interrupt: Option<Arc<dyn Interrupt>>,
    ) -> Result<(), BalloonError> {
        let acked = state.acked_features;
        if acked & !self.avail_features != 0 {
            return Err(BalloonError::RestoreFeatures(acked & !self.avail_features));
        }
        let layout = QueueLayout::for_features(acked);
        let (queues, active) = if state.activated {
            let (Some(mem), Some(irq)) = (mem, interrupt) else {
                return Err(BalloonError::NotActivated);
            };
            (self.restored_queues(state, layout, &mem)?, Some((mem, irq)))
        } else {
            (Vec::new(), None)
        };
        let generation = self.install(state, queues, active.clone());
        let activated = active.is_some();
        info!("balloon state restored (activated: {activated}, features {acked:#x})");
        if let Some((_, irq)) = active {
            self.resume(state, layout, &irq);
            self.start_stats_polling(acked, generation);
        }
        Ok(())
    }

    /// The queues of an activated `state`, each validated against `mem`
    /// like a driver's, and its held stats buffer checked against them.
    fn restored_queues(
        &self,
        state: &BalloonState,
        layout: QueueLayout,
        mem: &GuestMemoryHandle,
    ) -> Result<Vec<Queue>, BalloonError> {
        if state.queues.len() < layout.num_queues() {
            return Err(BalloonError::QueueCount {
                expected: layout.num_queues(),
                got: state.queues.len(),
            });
        }
        let guard = mem.memory();
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, qs) in state.queues.iter().enumerate() {
            let i = i as u16;
            if qs.max_size > self.config.queue_size {
                return Err(BalloonError::InvalidQueue(i));
            }
            let q = Queue::try_from(*qs).map_err(|_| BalloonError::InvalidQueue(i))?;
            if q.ready() && !q.is_valid(&*guard) {
                return Err(BalloonError::InvalidQueue(i));
            }
            queues.push(q);
        }
        if let Some(head) = state.stats_head {
            let ok = layout
                .index_of(QueueKind::Stats)
                .and_then(|i| queues.get(usize::from(i)))
                .is_some_and(|q| q.ready() && head < q.size());
            if !ok {
                return Err(BalloonError::InvalidStatsHead(head));
            }
        }
        Ok(queues)
    }

    /// Puts a validated `state` into the device; returns the new
    /// generation.
    fn install(
        &self,
        state: &BalloonState,
        queues: Vec<Queue>,
        active: Option<(GuestMemoryHandle, Arc<dyn Interrupt>)>,
    ) -> u64 {
        let mut st = self.shared.lock();
        st.set_features(state.acked_features);
        st.num_pages = state.num_pages;
        st.actual = state.actual;
        st.poison_val = state.poison_val;
        st.queues = queues;
        let activated = active.is_some();
        (st.mem, st.interrupt) = active.unzip();
        st.stats_head = state.stats_head.filter(|_| activated);
        st.arm_hints(self.config.page_poison);
        st.hints
            .restore_round(state.hint_cmd_id, activated && state.hint_round_requested);
        self.shared.next_generation()
    }

    /// After restoring an activated device: processes what the driver made
    /// available (kicks that reached the source after it was quiesced are
    /// lost) and, if a hint round was pending, tells the guest it is DONE.
    fn resume(&mut self, state: &BalloonState, layout: QueueLayout, irq: &Arc<dyn Interrupt>) {
        for index in 0..layout.num_queues() as u16 {
            if let Err(e) = crate::VirtioDevice::queue_notify(self, index) {
                log::warn!("after restore, queue {index}: {e}");
            }
        }
        if state.hint_round_requested {
            irq.signal_config();
        }
    }
}
