// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! [`BalloonHandle`]: the host API of a [`Balloon`](super::Balloon) (target
//! size, `actual`, statistics, metrics, the hint API, the device's own dirty
//! pages), and the stats poller that uses it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use log::{info, warn};
use vm_memory::GuestAddressSpace;

use super::hints::HintHandle;
use super::metrics::BalloonMetrics;
use super::queues::stats::return_stats_buffer;
use super::state::Shared;
use super::stats::BalloonStats;
use super::{BalloonError, VIRTIO_BALLOON_F_STATS_VQ};

/// Host-side API of a [`Balloon`](super::Balloon): target size, `actual`,
/// statistics, metrics and the hint API. Cheap to clone, usable from any
/// thread.
#[derive(Clone)]
pub struct BalloonHandle {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle").finish_non_exhaustive()
    }
}

impl BalloonHandle {
    /// Sets `num_pages` (4 KiB pages the host wants the guest to give up)
    /// and raises a config interrupt if the device is active.
    pub fn set_target_pages(&self, pages: u32) {
        let irq = {
            let mut st = self.shared.lock();
            st.num_pages = pages;
            st.interrupt()
        };
        info!("balloon target set to {pages} pages");
        if let Some(irq) = irq {
            irq.signal_config();
        }
    }

    /// The target (`num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.shared.lock().num_pages
    }

    /// Pages the driver says are in the balloon (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.shared.lock().actual
    }

    /// The features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.shared.lock().acked_features
    }

    /// Asks the guest for fresh statistics by returning the stats buffer the
    /// device holds. Returns `Ok(false)` if no buffer is held (the guest has
    /// not sent one yet, or a request is in flight).
    pub fn request_stats(&self) -> Result<bool, BalloonError> {
        let (index, irq) = {
            let mut st = self.shared.lock();
            if !st.has_feature(VIRTIO_BALLOON_F_STATS_VQ) {
                return Err(BalloonError::FeatureNotNegotiated(
                    VIRTIO_BALLOON_F_STATS_VQ,
                ));
            }
            if st.stats_head.is_none() {
                return Ok(false);
            }
            let mem = st.mem.clone().ok_or(BalloonError::NotActivated)?;
            let index = return_stats_buffer(&self.shared, &mut st, &mem.memory())?;
            (index, st.interrupt())
        };
        if let (Some(index), Some(irq)) = (index, irq) {
            irq.signal_queue(index);
        }
        Ok(true)
    }

    /// The latest statistics the guest sent.
    pub fn latest_stats(&self) -> Option<BalloonStats> {
        self.shared.lock().latest_stats.clone()
    }

    /// The device's counters.
    pub fn metrics(&self) -> &BalloonMetrics {
        &self.shared.metrics
    }

    /// The migrator's hint API.
    pub fn hints(&self) -> HintHandle {
        HintHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Takes the guest pages the device changed since the last call, as a
    /// bitmap in layout order (see [`HintHandle::take_device_dirty`]).
    pub fn take_device_dirty(&self) -> Vec<u64> {
        self.shared.dirty.take()
    }
}

/// Starts the stats poller of `shared` for activation `generation`: every
/// `every` it asks the guest for statistics, until the device is reset,
/// activated again or dropped.
pub(super) fn start_stats_poller(shared: &Arc<Shared>, generation: u64, every: Duration) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    shared.poller.start(every, move || {
        let Some(s) = weak.upgrade() else {
            return false;
        };
        if !s.is_generation(generation) {
            return false;
        }
        if let Err(e) = (BalloonHandle { shared: s }).request_stats() {
            warn!("stats polling: {e}");
            return false;
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balloon::{feature, Balloon, BalloonConfig, HintError, Layout};
    use crate::VirtioDevice;

    fn balloon() -> Balloon {
        let layout = Layout::from_ram_pfn_ranges(&[(0, 64)]).unwrap();
        Balloon::new(BalloonConfig::all_features(layout)).unwrap()
    }

    #[test]
    fn the_target_is_kept_before_activation() {
        let b = balloon();
        let h = b.handle();
        h.set_target_pages(42);
        assert_eq!((h.target_pages(), h.actual_pages()), (42, 0));
        assert!(h.latest_stats().is_none());
    }

    #[test]
    fn stats_requests_need_the_feature_and_a_held_buffer() {
        let mut b = balloon();
        let h = b.handle();
        assert!(matches!(
            h.request_stats(),
            Err(BalloonError::FeatureNotNegotiated(
                VIRTIO_BALLOON_F_STATS_VQ
            ))
        ));
        b.ack_features(feature(VIRTIO_BALLOON_F_STATS_VQ));
        assert!(matches!(h.request_stats(), Ok(false)));
    }

    #[test]
    fn every_handle_speaks_for_the_same_device() {
        let b = balloon();
        let from_handle = b.handle().hints();
        let token = b.hint_handle().new_epoch();
        // Not active, but not foreign either.
        assert_eq!(from_handle.start_round(&token), Err(HintError::NotActive));
        assert_eq!(from_handle.status().epoch, token.epoch());
        let other = balloon();
        assert_eq!(
            other.hint_handle().start_round(&token),
            Err(HintError::ForeignToken)
        );
    }
}
