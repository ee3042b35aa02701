// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The virtio-balloon device (virtio 1.2 §5.5) with free page hinting.
//!
//! Split by concern, like Firecracker's `devices/virtio/balloon/`:
//! - this file: constants (re-exported, never defined twice: the
//!   balloon's own from [`freehint_protocol`], the generic virtio ones from
//!   [`virtio_bindings`]), [`BalloonConfig`] (what the VMM offers) and
//!   [`BalloonError`];
//! - [`device`]: [`Balloon`], the device: feature negotiation, the config
//!   space ([`ConfigSpace`](freehint_protocol::ConfigSpace)), the
//!   [`VirtioDevice`](crate::VirtioDevice) implementation (activation,
//!   reset, notifies);
//! - `handle`: [`BalloonHandle`], the host API (re-exported from
//!   [`device`]), and the stats poller (`poller`: its thread);
//! - `state`: what the device and its handles share, the device state under
//!   one lock;
//! - `queues`: queue processing, one handler module per queue (`inflate`,
//!   `stats`, `report`, `free_page`);
//! - `chain`: reading a descriptor chain out of guest memory, each
//!   descriptor once, with the indirect-descriptor rules, and handing it to
//!   virtio-queue's `Reader`/`Writer`;
//! - [`hints`]: the free page hint API and its rules ([`HintHandle`],
//!   [`EpochToken`], [`HintSet`]); `round`: the round state machine and the
//!   free page set behind it;
//! - `dirty`: the log of guest pages the device itself wrote or discarded
//!   ([`HintHandle::take_device_dirty`]);
//! - [`discard`]: the memory backend trait [`PageDiscard`] and the real
//!   implementation over `madvise`/`fallocate`;
//! - [`metrics`]: one counter per rejection path;
//! - [`persist`]: [`BalloonState`], save/restore with validation;
//! - [`stats`]: the statistics queue payload.

mod chain;
pub mod device;
mod dirty;
pub mod discard;
mod handle;
pub mod hints;
pub mod metrics;
pub mod persist;
mod poller;
mod queues;
mod round;
mod state;
pub mod stats;

pub use device::{Balloon, BalloonHandle};
pub use discard::{MmapDiscard, PageDiscard};
pub use hints::{EpochToken, HintError, HintHandle, HintSet, HintState, HintStatus, RoundState};
pub use metrics::{BalloonMetrics, MetricsSnapshot};
pub use persist::BalloonState;
pub use stats::BalloonStats;

pub use freehint_protocol::balloon::{
    feature, has_feature, QueueKind, QueueLayout, CONFIG_SIZE, FREE_PAGE_HINT_CMD_ID_DONE,
    FREE_PAGE_HINT_CMD_ID_MIN, FREE_PAGE_HINT_CMD_ID_STOP, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_BITMAP, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_PFN_SHIFT,
};
pub use freehint_protocol::layout::{Bit, Layout, Pfn, PAGE_SHIFT, PAGE_SIZE};
pub use freehint_protocol::Epoch;
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
pub use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// Default (and largest) virtqueue size offered.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Most descriptors the device follows in one chain. virtio-queue already
/// stops at the queue size; indirect tables may be longer, so the device
/// bounds them itself (a bitmap chunk of 1 MiB in 4 KiB pieces needs 257).
pub const MAX_CHAIN_DESCRIPTORS: usize = 512;

/// Most pfns one inflate/deflate descriptor may carry (Linux sends at most
/// 256 per request; the bound keeps a hostile descriptor from pinning the
/// device in one loop for long).
pub const MAX_PFNS_PER_DESCRIPTOR: usize = 4096;

/// What the device offers and how it is set up by the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer `VIRTIO_BALLOON_F_STATS_VQ`.
    pub stats: bool,
    /// Seconds between automatic statistics requests (0 = only on
    /// [`BalloonHandle::request_stats`]).
    pub stats_polling_interval_s: u32,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer `VIRTIO_BALLOON_F_FREE_PAGE_HINT`.
    pub free_page_hint: bool,
    /// Offer the freehint bitmap extension (needs `free_page_hint`).
    pub bitmap: bool,
    /// Offer `VIRTIO_BALLOON_F_PAGE_POISON`.
    pub page_poison: bool,
    /// Initial `poison_val` (the driver overwrites it when it negotiates
    /// PAGE_POISON).
    pub poison_val: u32,
    /// Offer `VIRTIO_BALLOON_F_REPORTING`.
    pub reporting: bool,
    /// Offer `VIRTIO_BALLOON_F_MUST_TELL_HOST`.
    pub must_tell_host: bool,
    /// Largest queue size the driver may set (a power of two, ≤ 32768).
    pub queue_size: u16,
    /// Guest RAM geometry: the bit space of the free page set and of the
    /// bitmap protocol (bit = RAM offset / 4 KiB).
    pub layout: Layout,
}

impl BalloonConfig {
    /// A configuration offering everything, for guest RAM described by
    /// `layout`.
    pub fn all_features(layout: Layout) -> Self {
        Self {
            stats: true,
            stats_polling_interval_s: 0,
            deflate_on_oom: true,
            free_page_hint: true,
            bitmap: true,
            page_poison: true,
            poison_val: 0,
            reporting: true,
            must_tell_host: false,
            queue_size: DEFAULT_QUEUE_SIZE,
            layout,
        }
    }

    /// The feature bits this configuration offers (with `VIRTIO_F_VERSION_1`
    /// and, as QEMU's devices do, `VIRTIO_RING_F_INDIRECT_DESC`).
    pub fn features(&self) -> u64 {
        let mut f = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_INDIRECT_DESC);
        for (on, bit) in [
            (self.must_tell_host, VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (self.stats, VIRTIO_BALLOON_F_STATS_VQ),
            (self.deflate_on_oom, VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            (self.free_page_hint, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            (
                self.free_page_hint && self.bitmap,
                VIRTIO_BALLOON_F_FREE_PAGE_BITMAP,
            ),
            (self.page_poison, VIRTIO_BALLOON_F_PAGE_POISON),
            (self.reporting, VIRTIO_BALLOON_F_REPORTING),
        ] {
            if on {
                f |= feature(bit);
            }
        }
        f
    }

    /// Checks the configuration is usable.
    pub fn validate(&self) -> Result<(), BalloonError> {
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return Err(BalloonError::InvalidQueueSize(self.queue_size));
        }
        if (self.free_page_hint || self.reporting) && self.layout.total_bits() == 0 {
            return Err(BalloonError::EmptyLayout);
        }
        Ok(())
    }
}

/// Errors of the balloon device and its host API.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The configured queue size is not a power of two in 1..=32768.
    #[error("invalid queue size {0}: must be a power of two in 1..=32768")]
    InvalidQueueSize(u16),
    /// Hinting or reporting was configured without a RAM layout.
    #[error("free page hinting/reporting needs a non-empty guest RAM layout")]
    EmptyLayout,
    /// The driver did not hand over the queues the negotiated features need.
    #[error("activation: expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues required by the negotiated features.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// A queue the device needs is not valid in guest memory.
    #[error("activation: queue {0} is not ready or not valid in guest memory")]
    InvalidQueue(u16),
    /// The operation needs an activated device.
    #[error("device is not activated")]
    NotActivated,
    /// The driver did not negotiate the feature the operation needs.
    #[error("feature bit {0} was not negotiated")]
    FeatureNotNegotiated(u32),
    /// A restored state acknowledges features this device does not offer.
    #[error("restore: features {0:#x} are not offered by this device")]
    RestoreFeatures(u64),
    /// A restored state holds a stats buffer outside the stats queue.
    #[error("restore: stats buffer head {0} is not in a ready stats queue")]
    InvalidStatsHead(u16),
    /// The device could not set up the host memory it copies accepted
    /// descriptor chains into (see `chain`).
    #[error("cannot map the device's private chain memory: {0}")]
    ShadowMemory(String),
    /// Writing to the used ring failed (guest memory gone): the device can no
    /// longer operate and the transport should set DEVICE_NEEDS_RESET.
    #[error("queue {queue}: used ring update failed: {source}")]
    UsedRing {
        /// Queue index.
        queue: u16,
        /// Cause.
        source: virtio_queue::Error,
    },
}
