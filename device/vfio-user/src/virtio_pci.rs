//! Virtio-pci modern transport registers in BAR0 (virtio 1.2 §4.1.4):
//! common configuration, ISR, device configuration and notifications.
//!
//! Driver input is hostile: every register access is bounds-checked, bad
//! values are ignored (and logged) or read back as the spec's failure value,
//! never a panic. A notify processes at most a queue's worth of buffers; what
//! is left waits in [`PendingWork`] for [`VirtioPciTransport::run_pending_work`]
//! (the serve loop's work thread), so a driver that keeps re-posting buffers
//! cannot hold the loop that serves every other message.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use freehint_device::{GuestMemoryHandle, VirtioDevice};
use log::{debug, error, info, warn};
use virtio_bindings::{virtio_config, virtio_ring::VIRTIO_RING_F_EVENT_IDX};
use virtio_queue::{Queue, QueueT};

use crate::interrupt::{InterruptRouter, VIRTIO_MSI_NO_VECTOR};
use crate::pci::{
    COMMON_CFG_LEN, COMMON_CFG_OFFSET, DEVICE_CFG_LEN, DEVICE_CFG_OFFSET, ISR_CFG_LEN,
    ISR_CFG_OFFSET, NOTIFY_CFG_LEN, NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER,
};

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// Guest OS found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest OS knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation complete.
    pub const FEATURES_OK: u8 = 8;
    /// Device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// Driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// The `VERSION_1` feature bit, as a mask.
pub const VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;

/// Common configuration register offsets (virtio 1.2 §4.1.4.3).
pub mod common {
    /// le32 RW.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// le32 RO.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// le32 RW.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// le32 RW.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// le16 RW.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// le16 RO.
    pub const NUM_QUEUES: u64 = 0x12;
    /// u8 RW.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// u8 RO.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// le16 RW.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// le16 RW.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// le16 RW.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// le16 RW.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// le16 RO.
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// le64 RW.
    pub const QUEUE_DESC: u64 = 0x20;
    /// le64 RW.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// le64 RW.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// le16 RO (VIRTIO_F_NOTIF_CONFIG_DATA not offered: 0).
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    /// le16 RW (VIRTIO_F_RING_RESET not offered: reads 0, writes ignored).
    pub const QUEUE_RESET: u64 = 0x3a;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueRegs {
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// Counters of rejected driver writes, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Register writes ignored (read-only, wrong state, bad value).
    pub ignored_writes: u64,
    /// FEATURES_OK refused (bad feature set).
    pub features_refused: u64,
    /// Notifications for queues that do not exist or before DRIVER_OK.
    pub bad_notifies: u64,
    /// Accesses outside any structure of BAR0.
    pub out_of_range: u64,
    /// Notifies that used up their budget (the rest was processed later).
    pub deferred_notifies: u64,
}

/// Queues with buffers left after a notify used up its budget, and the
/// wake-up of the thread that processes them ([`crate::serve`] runs one).
#[derive(Debug, Default)]
pub struct PendingWork {
    state: Mutex<PendingState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct PendingState {
    /// Bit `i`: queue `i` has buffers left.
    queues: u64,
    /// The work thread must end.
    stopped: bool,
}

impl PendingWork {
    fn lock(&self) -> MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, index: usize) {
        if let Some(bit) = 1u64.checked_shl(index as u32) {
            self.lock().queues |= bit;
            self.wake.notify_all();
        }
    }

    fn take(&self) -> u64 {
        std::mem::take(&mut self.lock().queues)
    }

    fn clear(&self) {
        self.lock().queues = 0;
    }

    /// Whether some queue has buffers left.
    pub fn is_pending(&self) -> bool {
        self.lock().queues != 0
    }

    /// Waits until some queue has buffers left (true) or [`Self::stop`]
    /// was called (false).
    pub fn wait(&self) -> bool {
        let mut st = self.lock();
        while st.queues == 0 && !st.stopped {
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        !st.stopped
    }

    /// Ends [`Self::wait`] for good (until [`Self::restart`]).
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Lets [`Self::wait`] wait again after a [`Self::stop`].
    pub fn restart(&self) {
        self.lock().stopped = false;
    }
}

/// The virtio-pci function's transport state around one device.
pub struct VirtioPciTransport {
    device: Box<dyn VirtioDevice>,
    irq: Arc<InterruptRouter>,
    mem: GuestMemoryHandle,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    /// Queues kicked before DRIVER_OK (Linux's virtio_balloon kicks the
    /// stats queue during probe, before DRIVER_OK); delivered at activation.
    early_kicks: Vec<bool>,
    stats: TransportStats,
    /// Copy of `status` readable from other threads (control socket).
    status_mirror: Arc<AtomicU8>,
    /// Warnings logged so far (a hostile driver must not flood the log).
    warnings: u64,
    /// Queues whose last notify ran out of budget.
    pending: Arc<PendingWork>,
}

impl std::fmt::Debug for VirtioPciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciTransport")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn put_le(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = b.get(i).copied().unwrap_or(0);
    }
}

impl VirtioPciTransport {
    /// Wraps `device`; interrupts go through `irq`, memory is `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        irq: Arc<InterruptRouter>,
        mem: GuestMemoryHandle,
    ) -> Self {
        let n = device.num_queues();
        let max = device.queue_max_size();
        VirtioPciTransport {
            device,
            irq,
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: vec![
                QueueRegs {
                    size: max,
                    ..Default::default()
                };
                n
            ],
            early_kicks: vec![false; n],
            stats: TransportStats::default(),
            status_mirror: Arc::new(AtomicU8::new(0)),
            warnings: 0,
            pending: Arc::default(),
        }
    }

    /// Queues with buffers left, shared with the thread that calls
    /// [`Self::run_pending_work`].
    pub fn pending_work(&self) -> Arc<PendingWork> {
        Arc::clone(&self.pending)
    }

    /// Processes one more budget of every queue that had buffers left;
    /// returns whether some queue still has. Call it without holding up the
    /// serve loop for longer than that (once per lock).
    pub fn run_pending_work(&mut self) -> bool {
        let queues = self.pending.take();
        let has = |i: usize| 1u64.checked_shl(i as u32).is_some_and(|b| queues & b != 0);
        for index in (0..self.queues.len()).filter(|&i| has(i)) {
            if self.queue_live(index as u64) {
                self.process(index as u64);
            }
        }
        self.pending.is_pending()
    }

    /// Device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The device status as seen from other threads (updated after every
    /// BAR0 write and reset).
    pub fn status_handle(&self) -> Arc<AtomicU8> {
        Arc::clone(&self.status_mirror)
    }

    /// Features the driver accepted (valid after FEATURES_OK).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Rejection counters.
    pub fn stats(&self) -> TransportStats {
        self.stats
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Logs a driver-caused warning: the first [`WARN_BURST`] in full, then
    /// only every power of two (with the running count), so a hostile
    /// driver cannot flood the host's log. The rest go to `debug`.
    fn warn_limited(&mut self, msg: std::fmt::Arguments<'_>) {
        self.warnings += 1;
        let n = self.warnings;
        if n <= WARN_BURST || n.is_power_of_two() {
            warn!("{msg} [driver warning #{n}]");
        } else {
            debug!("{msg}");
        }
    }

    /// Virtio reset (status 0, vfio-user reset, client gone).
    pub fn reset(&mut self) {
        if self.status != 0 {
            info!("virtio reset (status was {:#x})", self.status);
        }
        self.device.reset();
        self.irq.virtio_reset();
        let max = self.device.queue_max_size();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.status_mirror.store(0, Ordering::Release);
        self.queue_select = 0;
        self.early_kicks.fill(false);
        self.pending.clear();
        for q in &mut self.queues {
            *q = QueueRegs {
                size: max,
                ..Default::default()
            };
        }
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Reads BAR0 at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let within = |start: u64, size: u64| {
            offset >= start && offset.checked_add(len).is_some_and(|e| e <= start + size)
        };
        if within(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            let v = self.read_common(offset - COMMON_CFG_OFFSET, data.len());
            put_le(data, v);
        } else if within(ISR_CFG_OFFSET, ISR_CFG_LEN) {
            put_le(data, u64::from(self.irq.read_isr()));
        } else if within(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.read_config(offset - DEVICE_CFG_OFFSET, data);
        } else {
            // The notify area reads as zero too.
            if !within(NOTIFY_CFG_OFFSET, NOTIFY_CFG_LEN) {
                self.stats.out_of_range += 1;
                debug!("BAR0 read outside any structure: {offset:#x}+{len}");
            }
            data.fill(0);
        }
    }

    /// Writes BAR0 at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_inner(offset, data);
        self.status_mirror.store(self.status, Ordering::Release);
    }

    fn write_inner(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let within = |start: u64, size: u64| {
            offset >= start && offset.checked_add(len).is_some_and(|e| e <= start + size)
        };
        if within(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            self.write_common(offset - COMMON_CFG_OFFSET, data.len(), le_value(data));
        } else if within(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if within(NOTIFY_CFG_OFFSET, NOTIFY_CFG_LEN) {
            let rel = offset - NOTIFY_CFG_OFFSET;
            if rel % u64::from(NOTIFY_OFF_MULTIPLIER) != 0 {
                self.stats.bad_notifies += 1;
                self.warn_limited(format_args!("unaligned queue notify at {offset:#x}"));
                return;
            }
            let index = rel / u64::from(NOTIFY_OFF_MULTIPLIER);
            self.notify(index);
        } else {
            self.stats.out_of_range += 1;
            self.warn_limited(format_args!(
                "BAR0 write outside any writable structure: {offset:#x}+{len} ignored"
            ));
        }
    }

    fn notify(&mut self, index: u64) {
        let early = self.status & status::DRIVER_OK == 0
            && self.status & status::FEATURES_OK != 0
            && (index as usize) < self.queues.len()
            && self.queues[index as usize].enabled;
        if early {
            debug!("queue {index} kicked before DRIVER_OK: delivered at activation");
            self.early_kicks[index as usize] = true;
            return;
        }
        if !self.queue_live(index) {
            self.stats.bad_notifies += 1;
            debug!(
                "notify of queue {index} ignored (status {:#x}, {} queues)",
                self.status,
                self.queues.len()
            );
            return;
        }
        self.process(index);
    }

    /// Whether queue `index` exists, is enabled and the device is live.
    fn queue_live(&self, index: u64) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & status::DEVICE_NEEDS_RESET == 0
            && self.queues.get(index as usize).is_some_and(|q| q.enabled)
    }

    /// Processes at most [`NOTIFY_BUDGET`] buffers (and no more than the
    /// queue's size) of live queue `index`; if more wait, they go to
    /// [`PendingWork`].
    fn process(&mut self, index: u64) {
        let budget = self
            .queues
            .get(index as usize)
            .map_or(0, |q| usize::from(q.size).min(NOTIFY_BUDGET));
        match self.device.queue_notify_budget(index as u16, budget) {
            Ok(false) => {}
            Ok(true) => {
                self.stats.deferred_notifies += 1;
                debug!("queue {index}: budget of {budget} buffers used up, the rest comes later");
                self.pending.add(index as usize);
            }
            Err(e) => {
                self.warn_limited(format_args!(
                    "queue {index}: device failed: {e}; setting DEVICE_NEEDS_RESET"
                ));
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        freehint_device::Interrupt::signal_config(self.irq.as_ref());
    }

    fn read_common(&self, reg: u64, len: usize) -> u64 {
        use common::*;
        let q = self.selected();
        match (reg, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => self.device.device_features() & 0xffff_ffff,
                1 => self.device.device_features() >> 32,
                _ => 0,
            },
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.irq.config_vector()),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.status),
            (CONFIG_GENERATION, 1) => u64::from(self.irq.config_generation()),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => {
                if q.is_some() {
                    u64::from(self.irq.queue_vector(usize::from(self.queue_select)))
                } else {
                    u64::from(VIRTIO_MSI_NO_VECTOR)
                }
            }
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (QUEUE_NOTIFY_OFF, 2) => {
                if q.is_some() {
                    u64::from(self.queue_select)
                } else {
                    0
                }
            }
            (QUEUE_DESC, 8) => q.map_or(0, |q| q.desc),
            (QUEUE_DESC, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (r, 4) if r == QUEUE_DESC + 4 => q.map_or(0, |q| q.desc >> 32),
            (QUEUE_DRIVER, 8) => q.map_or(0, |q| q.driver),
            (QUEUE_DRIVER, 4) => q.map_or(0, |q| q.driver & 0xffff_ffff),
            (r, 4) if r == QUEUE_DRIVER + 4 => q.map_or(0, |q| q.driver >> 32),
            (QUEUE_DEVICE, 8) => q.map_or(0, |q| q.device),
            (QUEUE_DEVICE, 4) => q.map_or(0, |q| q.device & 0xffff_ffff),
            (r, 4) if r == QUEUE_DEVICE + 4 => q.map_or(0, |q| q.device >> 32),
            (QUEUE_NOTIFY_DATA, 2) | (QUEUE_RESET, 2) => 0,
            _ => {
                debug!("common cfg read of {len} bytes at {reg:#x}: not a register");
                0
            }
        }
    }

    fn ignore(&mut self, what: &str) {
        self.stats.ignored_writes += 1;
        let status = self.status;
        self.warn_limited(format_args!("common cfg: {what} (status {status:#x})"));
    }

    fn write_common(&mut self, reg: u64, len: usize, v: u64) {
        use common::*;
        // Queue registers may only change before DRIVER_OK on a queue that
        // is not enabled (virtio 1.2 §4.1.4.3.2).
        let queue_writable =
            self.status & status::DRIVER_OK == 0 && self.selected().is_some_and(|q| !q.enabled);
        let sel = usize::from(self.queue_select);
        match (reg, len) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    return self.ignore("driver_feature write outside negotiation");
                }
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {
                        if v != 0 {
                            self.ignore("driver_feature bits beyond 64 set");
                        }
                    }
                }
            }
            (CONFIG_MSIX_VECTOR, 2) => self.irq.set_config_vector(v as u16),
            (DEVICE_STATUS, 1) => self.write_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_SIZE, 2) => {
                let max = self.device.queue_max_size();
                let size = v as u16;
                if !queue_writable {
                    self.ignore("queue_size write on enabled/absent queue or after DRIVER_OK");
                } else if size == 0 || size > max || !size.is_power_of_two() {
                    self.ignore("queue_size not a power of two within queue_max_size");
                } else {
                    self.queues[sel].size = size;
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                if sel < self.queues.len() {
                    self.irq.set_queue_vector(sel, v as u16);
                } else {
                    self.ignore("queue_msix_vector of an absent queue");
                }
            }
            (QUEUE_ENABLE, 2) => {
                if v != 1 {
                    self.ignore("queue_enable written with a value other than 1");
                } else if !queue_writable {
                    self.ignore("queue_enable on enabled/absent queue or after DRIVER_OK");
                } else {
                    self.queues[sel].enabled = true;
                }
            }
            (QUEUE_DESC, _) | (QUEUE_DRIVER, _) | (QUEUE_DEVICE, _) if len == 4 || len == 8 => {
                self.write_queue_addr(reg, v, len, queue_writable)
            }
            (r, 4) if r == QUEUE_DESC + 4 || r == QUEUE_DRIVER + 4 || r == QUEUE_DEVICE + 4 => {
                self.write_queue_addr(r, v, 4, queue_writable)
            }
            (QUEUE_RESET, 2) | (QUEUE_NOTIFY_DATA, 2) => {
                self.ignore("queue_reset/notify_data: feature not offered")
            }
            _ => self.ignore("write to a read-only or non-existent register"),
        }
    }

    fn write_queue_addr(&mut self, reg: u64, v: u64, len: usize, writable: bool) {
        if !writable {
            return self.ignore("queue address write on enabled/absent queue or after DRIVER_OK");
        }
        let q = &mut self.queues[usize::from(self.queue_select)];
        let base = reg & !7;
        let field = match base {
            common::QUEUE_DESC => &mut q.desc,
            common::QUEUE_DRIVER => &mut q.driver,
            _ => &mut q.device,
        };
        *field = match (len, reg & 4) {
            (8, _) => v,
            (_, 0) => (*field & !0xffff_ffff) | (v & 0xffff_ffff),
            _ => (*field & 0xffff_ffff) | (v << 32),
        };
    }

    fn write_status(&mut self, new: u8) {
        use status::*;
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if new & !old & FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let f = self.driver_features;
            if f & !offered != 0 || f & VERSION_1 == 0 {
                self.stats.features_refused += 1;
                self.warn_limited(format_args!(
                    "FEATURES_OK refused: driver features {f:#x}, offered {offered:#x} \
                     (VERSION_1 required, no unoffered bits)"
                ));
                self.status = new & !FEATURES_OK;
                return;
            }
            self.device.ack_features(f);
            info!("features negotiated: {f:#x}");
        }
        if new & !old & DRIVER_OK != 0 {
            if new & FEATURES_OK == 0 {
                self.stats.ignored_writes += 1;
                self.warn_limited(format_args!("DRIVER_OK without FEATURES_OK: ignored"));
                self.status = new & !DRIVER_OK;
                return;
            }
            self.status = new;
            self.activate();
            return;
        }
        if old & !new & !DEVICE_NEEDS_RESET != 0 {
            // Clearing bits other than by reset is not allowed; keep them.
            self.stats.ignored_writes += 1;
            self.warn_limited(format_args!(
                "status write {new:#x} clears bits of {old:#x} without reset: kept"
            ));
            self.status = old | new;
            return;
        }
        self.status = new | (old & DEVICE_NEEDS_RESET);
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, regs) in self.queues.iter().enumerate() {
            let mut q = match Queue::new(self.device.queue_max_size()) {
                Ok(q) => q,
                Err(e) => {
                    error!("queue {i}: cannot create: {e:?}");
                    self.needs_reset();
                    return;
                }
            };
            if regs.enabled {
                let ok = q.try_set_size(regs.size).is_ok()
                    && q.try_set_desc_table_address(vm_memory::GuestAddress(regs.desc))
                        .is_ok()
                    && q.try_set_avail_ring_address(vm_memory::GuestAddress(regs.driver))
                        .is_ok()
                    && q.try_set_used_ring_address(vm_memory::GuestAddress(regs.device))
                        .is_ok();
                if !ok {
                    let regs = *regs;
                    self.warn_limited(format_args!(
                        "queue {i}: driver programmed an invalid layout {regs:?}; \
                         setting DEVICE_NEEDS_RESET"
                    ));
                    self.needs_reset();
                    return;
                }
                q.set_event_idx(self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
                q.set_ready(true);
            }
            queues.push(q);
        }
        let irq: Arc<dyn freehint_device::Interrupt> = self.irq.clone();
        match self.device.activate(self.mem.clone(), irq, queues) {
            Ok(()) => {
                info!(
                    "DRIVER_OK: device activated with {} queues ({} enabled)",
                    self.queues.len(),
                    self.queues.iter().filter(|q| q.enabled).count()
                );
                let early =
                    std::mem::replace(&mut self.early_kicks, vec![false; self.queues.len()]);
                for (i, _) in early.iter().enumerate().filter(|(_, &k)| k) {
                    self.notify(i as u64);
                }
            }
            Err(e) => {
                self.warn_limited(format_args!(
                    "device activation failed: {e}; setting DEVICE_NEEDS_RESET"
                ));
                self.needs_reset();
            }
        }
    }
}

/// Driver warnings logged in full before rate limiting starts.
pub const WARN_BURST: u64 = 64;

/// Most buffers one notify (or one turn of left-over work) processes before
/// the serve loop gets to answer the next message.
pub const NOTIFY_BUDGET: usize = 64;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    use freehint_device::Interrupt;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    /// What the stub saw, shared with the test.
    #[derive(Default, Debug)]
    pub(crate) struct Seen {
        pub acked: Option<u64>,
        pub activated: Vec<(u16, bool, u64)>,
        pub notified: Vec<u16>,
        pub resets: u32,
        pub config: [u8; 8],
    }

    /// A minimal `VirtioDevice` (unit tests only, never shipped).
    pub(crate) struct StubDevice {
        pub seen: Arc<Mutex<Seen>>,
        pub fail_notify: bool,
        pub irq: Option<Arc<dyn Interrupt>>,
    }

    impl VirtioDevice for StubDevice {
        fn device_type(&self) -> u32 {
            5
        }
        fn device_features(&self) -> u64 {
            VERSION_1 | 0b1011
        }
        fn ack_features(&mut self, features: u64) {
            self.seen.lock().unwrap().acked = Some(features);
        }
        fn num_queues(&self) -> usize {
            3
        }
        fn queue_max_size(&self) -> u16 {
            128
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let s = self.seen.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                *b = s.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut s = self.seen.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = s.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryHandle,
            interrupt: Arc<dyn Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), freehint_device::Error> {
            let mut s = self.seen.lock().unwrap();
            s.activated = queues
                .iter()
                .map(|q| (q.size(), q.ready(), q.desc_table()))
                .collect();
            self.irq = Some(interrupt);
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) -> Result<(), freehint_device::Error> {
            self.seen.lock().unwrap().notified.push(index);
            if let Some(irq) = &self.irq {
                irq.signal_queue(index);
            }
            if self.fail_notify {
                return Err(freehint_device::Error::Activate("stub failure".into()));
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.seen.lock().unwrap().resets += 1;
            self.irq = None;
        }
    }

    pub(crate) fn transport(fail_notify: bool) -> (VirtioPciTransport, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let dev = StubDevice {
            seen: seen.clone(),
            fail_notify,
            irq: None,
        };
        let irq = Arc::new(InterruptRouter::new(3, 4));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        (VirtioPciTransport::new(Box::new(dev), irq, mem), seen)
    }

    fn w(t: &mut VirtioPciTransport, reg: u64, len: usize, v: u64) {
        t.write(reg, &v.to_le_bytes()[..len]);
    }

    fn r(t: &mut VirtioPciTransport, reg: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        t.read(reg, &mut b);
        le_value(&b)
    }

    /// Drives the transport like Linux's virtio_pci_modern up to FEATURES_OK.
    fn negotiate(t: &mut VirtioPciTransport, features: u64) -> u8 {
        use common::*;
        w(t, DEVICE_STATUS, 1, 0);
        w(t, DEVICE_STATUS, 1, 1);
        w(t, DEVICE_STATUS, 1, 3);
        w(t, DRIVER_FEATURE_SELECT, 4, 0);
        w(t, DRIVER_FEATURE, 4, features & 0xffff_ffff);
        w(t, DRIVER_FEATURE_SELECT, 4, 1);
        w(t, DRIVER_FEATURE, 4, features >> 32);
        w(t, DEVICE_STATUS, 1, 0xb);
        r(t, DEVICE_STATUS, 1) as u8
    }

    #[test]
    fn feature_select_windows() {
        use common::*;
        let (mut t, _) = transport(false);
        w(&mut t, DEVICE_FEATURE_SELECT, 4, 0);
        assert_eq!(r(&mut t, DEVICE_FEATURE, 4), 0b1011);
        w(&mut t, DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(r(&mut t, DEVICE_FEATURE, 4), 1);
        w(&mut t, DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(r(&mut t, DEVICE_FEATURE, 4), 0);
        w(&mut t, DEVICE_FEATURE_SELECT, 4, 0xffff_ffff);
        assert_eq!(r(&mut t, DEVICE_FEATURE_SELECT, 4), 0xffff_ffff);
        assert_eq!(r(&mut t, DEVICE_FEATURE, 4), 0);
        // Driver features only writable between DRIVER and FEATURES_OK.
        w(&mut t, DRIVER_FEATURE, 4, 0b11);
        assert_eq!(r(&mut t, DRIVER_FEATURE, 4), 0);
        assert_eq!(t.stats().ignored_writes, 1);
    }

    #[test]
    fn status_state_machine_and_features_ok() {
        use common::*;
        let (mut t, seen) = transport(false);
        // Unoffered bit 2 → FEATURES_OK refused and reads back clear.
        assert_eq!(negotiate(&mut t, VERSION_1 | 0b100), 0x3);
        assert_eq!(t.stats().features_refused, 1);
        // No VERSION_1 → refused.
        assert_eq!(negotiate(&mut t, 0b1), 0x3);
        assert!(seen.lock().unwrap().acked.is_none());
        // Good set → accepted and passed to the device.
        assert_eq!(negotiate(&mut t, VERSION_1 | 0b1001), 0xb);
        assert_eq!(seen.lock().unwrap().acked, Some(VERSION_1 | 0b1001));
        // Driver features frozen after FEATURES_OK.
        w(&mut t, DRIVER_FEATURE_SELECT, 4, 0);
        w(&mut t, DRIVER_FEATURE, 4, 0);
        assert_eq!(t.driver_features(), VERSION_1 | 0b1001);
        // Clearing bits without reset is refused.
        w(&mut t, DEVICE_STATUS, 1, 0x1);
        assert_eq!(r(&mut t, DEVICE_STATUS, 1), 0xb);
        // Reset.
        w(&mut t, DEVICE_STATUS, 1, 0);
        assert_eq!(r(&mut t, DEVICE_STATUS, 1), 0);
        assert_eq!(t.driver_features(), 0);
        assert!(seen.lock().unwrap().resets >= 1);
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused() {
        use common::*;
        let (mut t, seen) = transport(false);
        w(&mut t, DEVICE_STATUS, 1, 1);
        w(&mut t, DEVICE_STATUS, 1, 3);
        w(&mut t, DEVICE_STATUS, 1, 7);
        assert_eq!(r(&mut t, DEVICE_STATUS, 1), 3);
        assert!(seen.lock().unwrap().activated.is_empty());
    }

    #[test]
    fn queue_config_and_activation() {
        use common::*;
        let (mut t, seen) = transport(false);
        assert_eq!(r(&mut t, NUM_QUEUES, 2), 3);
        negotiate(&mut t, VERSION_1);
        w(&mut t, QUEUE_SELECT, 2, 1);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 128);
        assert_eq!(r(&mut t, QUEUE_NOTIFY_OFF, 2), 1);
        w(&mut t, QUEUE_SIZE, 2, 100); // not a power of two
        w(&mut t, QUEUE_SIZE, 2, 256); // above max
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 128);
        w(&mut t, QUEUE_SIZE, 2, 64);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 64);
        // 64-bit addresses as two 32-bit halves (Linux) and as one write.
        w(&mut t, QUEUE_DESC, 4, 0x1000);
        w(&mut t, QUEUE_DESC + 4, 4, 0x1);
        w(&mut t, QUEUE_DRIVER, 8, 0x1_0000_2000);
        w(&mut t, QUEUE_DEVICE, 4, 0x3000);
        assert_eq!(r(&mut t, QUEUE_DESC, 8), 0x1_0000_1000);
        assert_eq!(r(&mut t, QUEUE_DESC + 4, 4), 1);
        assert_eq!(r(&mut t, QUEUE_DRIVER, 4), 0x2000);
        w(&mut t, QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(r(&mut t, QUEUE_MSIX_VECTOR, 2), 2);
        w(&mut t, QUEUE_MSIX_VECTOR, 2, 9);
        assert_eq!(r(&mut t, QUEUE_MSIX_VECTOR, 2), 0xffff);
        w(&mut t, QUEUE_ENABLE, 2, 0);
        assert_eq!(r(&mut t, QUEUE_ENABLE, 2), 0);
        w(&mut t, QUEUE_ENABLE, 2, 1);
        assert_eq!(r(&mut t, QUEUE_ENABLE, 2), 1);
        // Enabled queue is frozen.
        w(&mut t, QUEUE_SIZE, 2, 32);
        w(&mut t, QUEUE_DESC, 4, 0x5000);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 64);
        assert_eq!(r(&mut t, QUEUE_DESC, 8), 0x1_0000_1000);
        // Absent queue: size 0, writes ignored, no panic.
        w(&mut t, QUEUE_SELECT, 2, 7);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 0);
        w(&mut t, QUEUE_SIZE, 2, 16);
        w(&mut t, QUEUE_ENABLE, 2, 1);
        w(&mut t, QUEUE_DESC, 8, 0x1234);
        assert_eq!(r(&mut t, QUEUE_MSIX_VECTOR, 2), 0xffff);
        // DRIVER_OK activates with queue 1 enabled only.
        w(&mut t, DEVICE_STATUS, 1, 0xf);
        assert_eq!(r(&mut t, DEVICE_STATUS, 1), 0xf);
        let act = seen.lock().unwrap().activated.clone();
        assert_eq!(act.len(), 3);
        assert_eq!(act[1], (64, true, 0x1_0000_1000));
        assert!(!act[0].1 && !act[2].1);
    }

    #[test]
    fn notify_reaches_device_only_when_live() {
        use common::*;
        let (mut t, seen) = transport(false);
        let notify = |t: &mut VirtioPciTransport, q: u64| {
            t.write(NOTIFY_CFG_OFFSET + q * 4, &(q as u16).to_le_bytes())
        };
        notify(&mut t, 0);
        assert_eq!(t.stats().bad_notifies, 1);
        negotiate(&mut t, VERSION_1);
        w(&mut t, QUEUE_SELECT, 2, 0);
        w(&mut t, QUEUE_ENABLE, 2, 1);
        // A kick between FEATURES_OK and DRIVER_OK (Linux's stats queue) is
        // held and delivered at activation.
        notify(&mut t, 0);
        assert!(seen.lock().unwrap().notified.is_empty());
        w(&mut t, DEVICE_STATUS, 1, 0xf);
        assert_eq!(seen.lock().unwrap().notified, vec![0]);
        notify(&mut t, 0);
        notify(&mut t, 1); // not enabled
        notify(&mut t, 500); // absent
        t.write(NOTIFY_CFG_OFFSET + 2, &[0, 0]); // unaligned
        assert_eq!(seen.lock().unwrap().notified, vec![0, 0]);
        assert_eq!(t.stats().bad_notifies, 4);
    }

    #[test]
    fn failing_device_sets_needs_reset() {
        use common::*;
        let (mut t, _) = transport(true);
        negotiate(&mut t, VERSION_1);
        w(&mut t, QUEUE_ENABLE, 2, 1);
        w(&mut t, DEVICE_STATUS, 1, 0xf);
        t.write(NOTIFY_CFG_OFFSET, &[0, 0]);
        assert_eq!(r(&mut t, DEVICE_STATUS, 1), 0x4f);
        assert_eq!(r(&mut t, CONFIG_GENERATION, 1), 1);
        // Further notifies are ignored until reset.
        t.write(NOTIFY_CFG_OFFSET, &[0, 0]);
        assert_eq!(t.stats().bad_notifies, 1);
        w(&mut t, DEVICE_STATUS, 1, 0);
        assert_eq!(r(&mut t, DEVICE_STATUS, 1), 0);
    }

    #[test]
    fn isr_read_to_clear_and_device_config() {
        let (mut t, seen) = transport(false);
        // A queue interrupt with MSI-X off sets ISR bit 0.
        negotiate(&mut t, VERSION_1);
        w(&mut t, common::QUEUE_ENABLE, 2, 1);
        w(&mut t, common::DEVICE_STATUS, 1, 0xf);
        t.write(NOTIFY_CFG_OFFSET, &[0, 0]);
        assert_eq!(r(&mut t, ISR_CFG_OFFSET, 1), 1);
        assert_eq!(r(&mut t, ISR_CFG_OFFSET, 1), 0);
        // Device config goes through the device, with offsets relative.
        t.write(DEVICE_CFG_OFFSET + 4, &7u32.to_le_bytes());
        assert_eq!(seen.lock().unwrap().config[4], 7);
        assert_eq!(r(&mut t, DEVICE_CFG_OFFSET + 4, 4), 7);
        assert_eq!(r(&mut t, DEVICE_CFG_OFFSET + 0x800, 4), 0);
    }

    #[test]
    fn warnings_are_rate_limited() {
        let (mut t, _) = transport(false);
        for _ in 0..10_000 {
            t.write(common::NUM_QUEUES, &[1, 0]);
        }
        assert_eq!(t.stats().ignored_writes, 10_000);
        // 64 in full + powers of two from 128 to 8192 (7 more).
        let logged = (1..=10_000u64)
            .filter(|&n| n <= WARN_BURST || n.is_power_of_two())
            .count();
        assert_eq!(logged, 71);
        assert_eq!(t.warnings, 10_000);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut t, _) = transport(false);
        for off in [
            0u64,
            1,
            3,
            0x13,
            0x3b,
            0x3c,
            0xfff,
            0x1001,
            0x3ffe,
            0x4000,
            u64::MAX - 1,
        ] {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut b = vec![0u8; len];
                t.read(off, &mut b);
                t.write(off, &b);
            }
        }
        assert!(t.stats().out_of_range > 0);
    }
}
