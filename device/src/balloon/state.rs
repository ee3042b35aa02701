// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! What a [`Balloon`](super::Balloon), its [`BalloonHandle`](super::BalloonHandle)
//! and its [`HintHandle`](super::HintHandle) share: [`Shared`].
//!
//! Everything that changes with the driver or the host sits in one
//! [`DeviceState`] behind one lock: negotiation, config fields, queues,
//! guest memory, the interrupt (stored once), the stats buffer, the hint
//! round machine and its free set, and the scratch space queue processing
//! reuses. The rest needs no lock: the counters and the device's dirty log
//! are atomics, the generation stops stale stats pollers, and the poller has
//! its own handle.
//!
//! Lock rules: an interrupt is raised, and the poller stopped, only after
//! the lock is dropped (a transport may call back into the device, and a
//! poller tick takes the lock).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use freehint_protocol::balloon::{has_feature, QueueLayout};
use virtio_queue::Queue;

use super::chain::{Desc, ShadowQueue};
use super::dirty::{DeviceDirtyLog, DirtyMarker};
use super::discard::PageDiscard;
use super::metrics::BalloonMetrics;
use super::poller::StatsPoller;
use super::round::HintCore;
use super::stats::BalloonStats;
use super::{
    BalloonConfig, BalloonError, VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_PAGE_POISON,
};
use crate::virtio_device::{GuestMemoryHandle, Interrupt};

/// Source of device ids, so an epoch token of one device is refused by
/// another.
static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// The device's state, under [`Shared`]'s one lock. Fields are grouped as
/// in Firecracker's balloon: virtio, transport, implementation.
pub(super) struct DeviceState {
    // Virtio: negotiation and the config space fields.
    /// Features the driver acknowledged.
    pub(super) acked_features: u64,
    /// Queue numbering for `acked_features`.
    pub(super) queue_layout: QueueLayout,
    /// Config `num_pages` (the host's target).
    pub(super) num_pages: u32,
    /// Config `actual` (the driver's count).
    pub(super) actual: u32,
    /// Config `poison_val`.
    pub(super) poison_val: u32,

    // Transport: what activation hands over.
    /// The driver's queues, by index (empty until activation).
    pub(super) queues: Vec<Queue>,
    /// Guest memory while activated.
    pub(super) mem: Option<GuestMemoryHandle>,
    /// The transport's interrupt while activated.
    pub(super) interrupt: Option<Arc<dyn Interrupt>>,

    // Implementation.
    /// How inflated and reported pages are given back to the host.
    pub(super) discard: Arc<dyn PageDiscard>,
    /// Head of the stats buffer the device holds (returned on request).
    pub(super) stats_head: Option<u16>,
    /// The statistics of the latest stats buffer.
    pub(super) latest_stats: Option<BalloonStats>,
    /// The hint round machine and the free page set.
    pub(super) hints: HintCore,
    /// Buffers reused from chain to chain.
    pub(super) scratch: Scratch,
    /// A buffer other than the chain being processed was returned used (the
    /// driver must be notified).
    pub(super) returned_extra: bool,
}

/// Buffers queue processing reuses, so a chain costs no allocation.
pub(super) struct Scratch {
    /// The descriptors of the chain being processed (at most
    /// `MAX_CHAIN_DESCRIPTORS`).
    pub(super) descs: Vec<Desc>,
    /// The host-private copy of that chain virtio-queue's `Reader` and
    /// `Writer` walk.
    pub(super) shadow: ShadowQueue,
    /// Bytes of one inflate/deflate descriptor (bounded by
    /// `MAX_PFNS_PER_DESCRIPTOR`).
    pub(super) pfns: Vec<u8>,
}

impl DeviceState {
    /// The interrupt, if activated (raise it after dropping the lock).
    pub(super) fn interrupt(&self) -> Option<Arc<dyn Interrupt>> {
        self.interrupt.clone()
    }

    /// Whether the driver negotiated feature `bit`.
    pub(super) fn has_feature(&self, bit: u32) -> bool {
        has_feature(self.acked_features, bit)
    }

    /// Sets the negotiated features and the queue numbering they imply.
    pub(super) fn set_features(&mut self, acked: u64) {
        self.acked_features = acked;
        self.queue_layout = QueueLayout::for_features(acked);
    }

    /// Arms (or disarms) hinting for the current features, activation and
    /// poison value; `poison_offered` is whether the device offered
    /// PAGE_POISON. Moves the hint epoch.
    pub(super) fn arm_hints(&mut self, poison_offered: bool) {
        let active = self.mem.is_some() && self.has_feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        let poison = self
            .has_feature(VIRTIO_BALLOON_F_PAGE_POISON)
            .then_some(self.poison_val);
        self.hints.activate(active, poison, poison_offered);
    }

    /// Back to the state of a device never activated (the target
    /// `num_pages` stays: it is the host's).
    pub(super) fn reset(&mut self, config: &BalloonConfig) {
        self.queues.clear();
        self.mem = None;
        self.interrupt = None;
        self.set_features(0);
        self.actual = 0;
        self.stats_head = None;
        self.poison_val = config.poison_val;
        self.arm_hints(config.page_poison);
    }
}

/// Shared by the device, its handles and its stats poller.
pub(super) struct Shared {
    /// Identity of this device in its epoch tokens.
    pub(super) id: u64,
    state: Mutex<DeviceState>,
    /// The device's counters.
    pub(super) metrics: BalloonMetrics,
    /// Guest pages the device wrote or discarded.
    pub(super) dirty: DeviceDirtyLog,
    /// Bumped at every activation, reset and restore (ends stale stats
    /// pollers).
    pub(super) generation: AtomicU64,
    /// The stats polling thread (stopped and joined at reset).
    pub(super) poller: StatsPoller,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The state of a new device offering `config`.
    pub(super) fn new(
        config: &BalloonConfig,
        discard: Arc<dyn PageDiscard>,
    ) -> Result<Self, BalloonError> {
        let state = DeviceState {
            acked_features: 0,
            queue_layout: QueueLayout::for_features(0),
            num_pages: 0,
            actual: 0,
            poison_val: config.poison_val,
            queues: Vec::new(),
            mem: None,
            interrupt: None,
            discard,
            stats_head: None,
            latest_stats: None,
            hints: HintCore::new(config.layout),
            scratch: Scratch {
                descs: Vec::with_capacity(16),
                shadow: ShadowQueue::new()?,
                pfns: Vec::new(),
            },
            returned_extra: false,
        };
        Ok(Self {
            id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(state),
            metrics: BalloonMetrics::default(),
            dirty: DeviceDirtyLog::new(config.layout),
            generation: AtomicU64::new(0),
            poller: StatsPoller::default(),
        })
    }

    /// Locks the device state. A poisoned lock (a panic elsewhere) still
    /// yields the data: every update is a single step that leaves it
    /// consistent.
    pub(super) fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records device writes in the device's dirty log.
    pub(super) fn marker(&self) -> DirtyMarker<'_> {
        DirtyMarker {
            log: &self.dirty,
            metrics: &self.metrics,
        }
    }

    /// Starts a new generation (activation, reset, restore) and returns it.
    pub(super) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether `generation` is still the current one.
    pub(super) fn is_generation(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) == generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balloon::{feature, Layout, MmapDiscard, VIRTIO_BALLOON_F_STATS_VQ};

    fn shared() -> Shared {
        let layout = Layout::from_ram_pfn_ranges(&[(0, 64)]).unwrap();
        Shared::new(&BalloonConfig::all_features(layout), Arc::new(MmapDiscard)).unwrap()
    }

    #[test]
    fn devices_get_distinct_ids_and_generations_move() {
        let (a, b) = (shared(), shared());
        assert_ne!(a.id, b.id);
        let g = a.next_generation();
        assert!(a.is_generation(g));
        a.next_generation();
        assert!(!a.is_generation(g));
    }

    #[test]
    fn features_set_the_queue_numbering() {
        let s = shared();
        let mut st = s.lock();
        st.set_features(feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT));
        assert_eq!(st.queue_layout.num_queues(), 3);
        assert!(!st.has_feature(VIRTIO_BALLOON_F_STATS_VQ));
        st.set_features(feature(VIRTIO_BALLOON_F_STATS_VQ));
        assert_eq!(st.queue_layout.num_queues(), 3);
        assert!(st.has_feature(VIRTIO_BALLOON_F_STATS_VQ));
    }

    #[test]
    fn reset_keeps_the_target_and_restores_the_configured_poison() {
        let layout = Layout::from_ram_pfn_ranges(&[(0, 64)]).unwrap();
        let config = BalloonConfig {
            poison_val: 0xaa,
            ..BalloonConfig::all_features(layout)
        };
        let s = Shared::new(&config, Arc::new(MmapDiscard)).unwrap();
        let mut st = s.lock();
        st.num_pages = 7;
        st.actual = 5;
        st.poison_val = 0;
        st.stats_head = Some(3);
        st.set_features(feature(VIRTIO_BALLOON_F_STATS_VQ));
        st.reset(&config);
        assert_eq!((st.num_pages, st.actual, st.poison_val), (7, 0, 0xaa));
        assert_eq!((st.acked_features, st.stats_head), (0, None));
        assert!(st.interrupt().is_none());
    }
}
