// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! [`Balloon`], the device: feature negotiation, the config space, the
//! [`VirtioDevice`] implementation (activation, reset, notifies). Queue
//! processing is in `queues`, the host API in
//! [`BalloonHandle`] (re-exported here, where it has always been).

use std::sync::Arc;
use std::time::Duration;

use freehint_protocol::balloon::{ConfigSpace, CONFIG_ACTUAL, CONFIG_POISON_VAL, CONFIG_SIZE};
use log::{debug, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, GuestAddressSpace};

use super::discard::{MmapDiscard, PageDiscard};
use super::handle::start_stats_poller;
pub use super::handle::BalloonHandle;
use super::hints::HintHandle;
use super::metrics::BalloonMetrics;
use super::queues::process_queue;
use super::state::{DeviceState, Shared};
use super::{
    BalloonConfig, BalloonError, VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_ID_BALLOON,
};
use crate::virtio_device::{GuestMemoryHandle, Interrupt, VirtioDevice};

/// The virtio-balloon device. Owned by the transport (through
/// [`VirtioDevice`]); the VMM and the migrator use a [`BalloonHandle`] /
/// [`HintHandle`] obtained before handing it over.
pub struct Balloon {
    pub(super) config: BalloonConfig,
    pub(super) avail_features: u64,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config)
            .field(
                "avail_features",
                &format_args!("{:#x}", self.avail_features),
            )
            .finish_non_exhaustive()
    }
}

impl Balloon {
    /// A balloon offering what `config` says, discarding pages with
    /// [`MmapDiscard`].
    pub fn new(config: BalloonConfig) -> Result<Self, BalloonError> {
        Self::with_discard(config, Arc::new(MmapDiscard))
    }

    /// A balloon with a VMM-specific discard backend.
    pub fn with_discard(
        config: BalloonConfig,
        discard: Arc<dyn PageDiscard>,
    ) -> Result<Self, BalloonError> {
        config.validate()?;
        let shared = Arc::new(Shared::new(&config, discard)?);
        Ok(Self {
            avail_features: config.features(),
            config,
            shared,
        })
    }

    /// The host API (cheap to clone, usable from any thread).
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The migrator's hint API.
    pub fn hint_handle(&self) -> HintHandle {
        HintHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &BalloonConfig {
        &self.config
    }

    /// Starts the stats poller for activation `generation` if configured
    /// and negotiated.
    pub(super) fn start_stats_polling(&self, acked: u64, generation: u64) {
        let every = self.config.stats_polling_interval_s;
        if every > 0 && freehint_protocol::balloon::has_feature(acked, VIRTIO_BALLOON_F_STATS_VQ) {
            let every = Duration::from_secs(u64::from(every));
            start_stats_poller(&self.shared, generation, every);
        }
    }

    /// The config space as the driver sees it.
    fn config_space(&self, st: &DeviceState) -> ConfigSpace {
        ConfigSpace {
            num_pages: st.num_pages,
            actual: st.actual,
            free_page_hint_cmd_id: st.hints.config_cmd_id(),
            poison_val: st.poison_val,
        }
    }

    /// Checks the queues the negotiated features need are there and valid.
    fn check_queues(
        st: &DeviceState,
        mem: &GuestMemoryHandle,
        queues: &[Queue],
    ) -> Result<(), BalloonError> {
        let expected = st.queue_layout.num_queues();
        if queues.len() < expected {
            return Err(BalloonError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        let guard = mem.memory();
        for (i, q) in queues.iter().enumerate().take(expected) {
            if q.ready() && !q.is_valid(&*guard) {
                return Err(BalloonError::InvalidQueue(i as u16));
            }
        }
        Ok(())
    }

    /// Processes what the driver made available before activation (Linux
    /// adds and kicks the stats buffer before DRIVER_OK), at most a queue's
    /// worth each: a driver has no more outstanding, and a transport with
    /// budgets comes back for the rest.
    fn process_pending(&mut self) -> Result<(), crate::Error> {
        let n = self.shared.lock().queue_layout.num_queues() as u16;
        for index in 0..n {
            self.queue_notify_budget(index, usize::from(self.config.queue_size))?;
        }
        Ok(())
    }
}

/// Whether config byte `offset` is driver-writable: `actual`, and
/// `poison_val` once PAGE_POISON is negotiated (virtio 1.2 §5.5.4).
fn config_byte_writable(offset: usize, poison_negotiated: bool) -> bool {
    let field = |start: usize| (start..start + 4).contains(&offset);
    field(CONFIG_ACTUAL) || (poison_negotiated && field(CONFIG_POISON_VAL))
}

/// The config byte at `offset + i`, if in range.
fn config_offset(offset: u64, i: usize) -> Option<usize> {
    usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_add(i))
        .filter(|&o| o < CONFIG_SIZE)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        let acked = features & self.avail_features;
        if acked != features {
            warn!(
                "driver acked features {:#x} not offered; dropped",
                features & !self.avail_features
            );
        }
        self.shared.lock().set_features(acked);
        debug!("balloon features acked: {acked:#x}");
    }

    fn num_queues(&self) -> usize {
        freehint_protocol::balloon::QueueLayout::for_features(self.avail_features).num_queues()
    }

    fn queue_max_size(&self) -> u16 {
        self.config.queue_size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let image = self.config_space(&self.shared.lock()).to_le();
        let bytes = image.as_slice();
        for (i, b) in data.iter_mut().enumerate() {
            *b = config_offset(offset, i).map_or(0, |o| bytes[o]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut st = self.shared.lock();
        let mut image = self.config_space(&st).to_le();
        let poison_ok = st.has_feature(VIRTIO_BALLOON_F_PAGE_POISON);
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                continue;
            };
            if o < CONFIG_SIZE && config_byte_writable(o, poison_ok) {
                image.as_mut_slice()[o] = b;
            } else {
                warn!("driver wrote read-only balloon config byte {o}; ignored");
            }
        }
        let new = image.from_le();
        if new.actual != st.actual {
            debug!("balloon actual: {} -> {} pages", st.actual, new.actual);
        }
        st.actual = new.actual;
        if new.poison_val != st.poison_val {
            st.poison_val = new.poison_val;
            st.hints.set_poison(Some(new.poison_val));
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), crate::Error> {
        let (acked, generation) = {
            let mut st = self.shared.lock();
            Self::check_queues(&st, &mem, &queues)?;
            st.queues = queues;
            st.mem = Some(mem);
            st.interrupt = Some(interrupt);
            st.stats_head = None;
            if st.has_feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT) && !self.config.page_poison {
                warn!("PAGE_POISON not offered: the device cannot tell whether the guest poisons free pages; hint rounds will be refused");
            }
            st.arm_hints(self.config.page_poison);
            (st.acked_features, self.shared.next_generation())
        };
        info!("balloon activated, features {acked:#x}");
        self.process_pending()?;
        self.start_stats_polling(acked, generation);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) -> Result<(), crate::Error> {
        self.queue_notify_budget(index, usize::MAX).map(|_| ())
    }

    fn queue_notify_budget(&mut self, index: u16, budget: usize) -> Result<bool, crate::Error> {
        let mut st = self.shared.lock();
        let Some(mem) = st.mem.clone() else {
            debug!("notify on queue {index} before activation; processed at activation");
            return Ok(false);
        };
        let Some(kind) = st.queue_layout.kind_of(index) else {
            BalloonMetrics::inc(&self.shared.metrics.unknown_queue);
            warn!("notify on unknown queue {index}; ignored");
            return Ok(false);
        };
        let done = process_queue(&self.shared, &mut st, &mem.memory(), index, kind, budget)?;
        // Signal without holding the device lock (the interrupt is a leaf,
        // but a transport may call back into the device).
        let irq = st.interrupt();
        drop(st);
        if let (true, Some(irq)) = (done.used, irq) {
            irq.signal_queue(index);
        }
        Ok(done.more)
    }

    fn reset(&mut self) {
        self.shared.poller.stop();
        let mut st = self.shared.lock();
        self.shared.next_generation();
        st.reset(&self.config);
        info!("balloon reset");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balloon::{feature, Layout, CONFIG_SIZE};

    fn balloon() -> Balloon {
        let layout = Layout::from_ram_pfn_ranges(&[(0, 256)]).unwrap();
        Balloon::new(BalloonConfig::all_features(layout)).unwrap()
    }

    fn read(b: &Balloon, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xeeu8; len];
        b.read_config(offset, &mut data);
        data
    }

    #[test]
    fn config_reads_are_little_endian_and_zero_outside() {
        let b = balloon();
        b.handle().set_target_pages(0x0102_0304);
        assert_eq!(read(&b, 0, 4), [4, 3, 2, 1]);
        assert_eq!(read(&b, 2, 4), [2, 1, 0, 0]);
        assert_eq!(read(&b, CONFIG_SIZE as u64 - 1, 3), [0, 0, 0]);
        assert_eq!(read(&b, u64::MAX, 2), [0, 0]);
    }

    #[test]
    fn driver_writes_only_actual_and_negotiated_poison() {
        let mut b = balloon();
        b.handle().set_target_pages(9);
        b.write_config(0, &[0xff; CONFIG_SIZE]);
        assert_eq!(b.handle().target_pages(), 9);
        assert_eq!(b.handle().actual_pages(), u32::MAX);
        assert_eq!(read(&b, 12, 4), [0; 4], "poison_val needs PAGE_POISON");
        b.ack_features(feature(VIRTIO_BALLOON_F_PAGE_POISON));
        b.write_config(12, &[0xaa, 0, 0, 0]);
        assert_eq!(read(&b, 12, 4), [0xaa, 0, 0, 0]);
        b.write_config(u64::MAX, &[1, 2]);
        assert_eq!(b.handle().actual_pages(), u32::MAX);
    }

    #[test]
    fn writable_config_bytes() {
        let w: Vec<usize> = (0..CONFIG_SIZE)
            .filter(|&o| config_byte_writable(o, true))
            .collect();
        assert_eq!(w, [4, 5, 6, 7, 12, 13, 14, 15]);
        assert!(!(0..CONFIG_SIZE).any(|o| config_byte_writable(o, false) && o >= 8));
    }

    #[test]
    fn ack_drops_features_not_offered() {
        let layout = Layout::from_ram_pfn_ranges(&[(0, 256)]).unwrap();
        let config = BalloonConfig {
            stats: false,
            ..BalloonConfig::all_features(layout)
        };
        let mut b = Balloon::new(config).unwrap();
        b.ack_features(
            feature(VIRTIO_BALLOON_F_STATS_VQ) | feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
        );
        assert_eq!(
            b.handle().acked_features(),
            feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT)
        );
    }

    #[test]
    fn notify_before_activation_and_on_unknown_queues_is_harmless() {
        let mut b = balloon();
        assert!(!b.queue_notify_budget(0, 1).unwrap());
        assert_eq!(b.handle().metrics().snapshot().unknown_queue, 0);
    }
}
