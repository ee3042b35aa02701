// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! [`Balloon`]: config space, feature negotiation, the
//! [`VirtioDevice`] implementation and queue processing;
//! [`BalloonHandle`]: the host API (target size, statistics, metrics, hints,
//! the device's own dirty pages).
//!
//! Guest input is hostile: every chain is bounded
//! ([`MAX_CHAIN_DESCRIPTORS`](super::MAX_CHAIN_DESCRIPTORS)), every
//! descriptor is checked against guest memory before use, and every
//! rejection is logged, counted in [`BalloonMetrics`] and still returned to
//! the driver as used ("skip, log, count, complete").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use freehint_protocol::balloon::{
    has_feature, QueueKind, QueueLayout, CONFIG_SIZE, VIRTIO_RING_F_INDIRECT_DESC,
};
use freehint_protocol::bitmap_hint::{LayoutReply, Message, MSG_HEADER_SIZE};
use freehint_protocol::layout::{PAGE_SHIFT, PAGE_SIZE};
use log::{debug, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};

use super::chain::{collect_chain, ChainError, Desc, DescTable};
use super::dirty::{DeviceDirtyLog, DirtyMarker};
use super::discard::{MmapDiscard, PageDiscard};
use super::hints::{HintHandle, HintShared};
use super::metrics::BalloonMetrics;
use super::poller::StatsPoller;
use super::stats::BalloonStats;
use super::{
    BalloonConfig, BalloonError, MAX_PFNS_PER_DESCRIPTOR, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_ID_BALLOON,
};
use crate::virtio_device::{GuestMemoryHandle, Interrupt, VirtioDevice};

/// Largest stats buffer the device reads (the rest is ignored and counted).
const MAX_STATS_BYTES: usize = 4096;

/// Runtime state, under one lock (`Shared::state`).
pub(super) struct DeviceState {
    pub(super) acked_features: u64,
    pub(super) num_pages: u32,
    pub(super) actual: u32,
    pub(super) poison_val: u32,
    pub(super) queue_layout: QueueLayout,
    pub(super) queues: Vec<Queue>,
    pub(super) mem: Option<GuestMemoryHandle>,
    pub(super) interrupt: Option<Arc<dyn Interrupt>>,
    pub(super) discard: Arc<dyn PageDiscard>,
    /// Head of the stats buffer the device holds (returned on request).
    pub(super) stats_head: Option<u16>,
    pub(super) latest_stats: Option<BalloonStats>,
    /// Reused descriptor list (bounded by `MAX_CHAIN_DESCRIPTORS`).
    pub(super) descs: Vec<Desc>,
    /// Reused byte buffer (bounded).
    pub(super) buf: Vec<u8>,
    /// A buffer other than the chain being processed was returned used
    /// (the driver must be notified).
    pub(super) returned_extra: bool,
}

pub(super) struct Shared {
    pub(super) state: Mutex<DeviceState>,
    pub(super) hints: Arc<HintShared>,
    pub(super) metrics: Arc<BalloonMetrics>,
    /// Guest pages the device wrote or discarded.
    pub(super) dirty: Arc<DeviceDirtyLog>,
    /// Bumped at every activation and reset (stops the stats poller).
    pub(super) generation: AtomicU64,
    /// The stats polling thread (stopped and joined at reset).
    pub(super) poller: StatsPoller,
}

impl Shared {
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
}

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
        let metrics = Arc::new(BalloonMetrics::default());
        let dirty = Arc::new(DeviceDirtyLog::new(config.layout));
        let hints = Arc::new(HintShared::new(
            config.layout,
            Arc::clone(&metrics),
            Arc::clone(&dirty),
        ));
        let state = DeviceState {
            acked_features: 0,
            num_pages: 0,
            actual: 0,
            poison_val: config.poison_val,
            queue_layout: QueueLayout::for_features(0),
            queues: Vec::new(),
            mem: None,
            interrupt: None,
            discard,
            stats_head: None,
            latest_stats: None,
            descs: Vec::with_capacity(16),
            buf: Vec::new(),
            returned_extra: false,
        };
        Ok(Self {
            avail_features: config.features(),
            config,
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                hints,
                metrics,
                dirty,
                generation: AtomicU64::new(0),
                poller: StatsPoller::default(),
            }),
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
            shared: Arc::clone(&self.shared.hints),
        }
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &BalloonConfig {
        &self.config
    }
}

/// Host-side API of a [`Balloon`]: target size, `actual`, statistics,
/// metrics and the hint API.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
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
            st.interrupt.clone()
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
        let mut st = self.shared.lock();
        if !has_feature(st.acked_features, super::VIRTIO_BALLOON_F_STATS_VQ) {
            return Err(BalloonError::FeatureNotNegotiated(
                super::VIRTIO_BALLOON_F_STATS_VQ,
            ));
        }
        let Some(head) = st.stats_head.take() else {
            return Ok(false);
        };
        let idx = st
            .queue_layout
            .index_of(QueueKind::Stats)
            .ok_or(BalloonError::NotActivated)?;
        let mem = st.mem.clone().ok_or(BalloonError::NotActivated)?;
        let guard = mem.memory();
        let q = st
            .queues
            .get_mut(usize::from(idx))
            .ok_or(BalloonError::NotActivated)?;
        self.shared
            .marker()
            .add_used(q, &guard, head, 0)
            .map_err(|source| BalloonError::UsedRing { queue: idx, source })?;
        let irq = st.interrupt.clone();
        drop(st);
        if let Some(irq) = irq {
            irq.signal_queue(idx);
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
            shared: Arc::clone(&self.shared.hints),
        }
    }

    /// Takes the guest pages the device changed since the last call, as a
    /// bitmap in layout order (see [`HintHandle::take_device_dirty`]).
    pub fn take_device_dirty(&self) -> Vec<u64> {
        self.shared.dirty.take()
    }
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
        let mut st = self.shared.lock();
        st.acked_features = acked;
        st.queue_layout = QueueLayout::for_features(acked);
        debug!("balloon features acked: {acked:#x}");
    }

    fn num_queues(&self) -> usize {
        QueueLayout::for_features(self.avail_features).num_queues()
    }

    fn queue_max_size(&self) -> u16 {
        self.config.queue_size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let image = {
            let st = self.shared.lock();
            freehint_protocol::ConfigSpace {
                num_pages: st.num_pages,
                actual: st.actual,
                free_page_hint_cmd_id: self.shared.hints.lock().config_cmd_id(),
                poison_val: st.poison_val,
            }
            .to_bytes()
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| image.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut st = self.shared.lock();
        let mut image = freehint_protocol::ConfigSpace {
            num_pages: st.num_pages,
            actual: st.actual,
            free_page_hint_cmd_id: 0,
            poison_val: st.poison_val,
        }
        .to_bytes();
        // poison_val exists only once PAGE_POISON is negotiated (virtio 1.2
        // §5.5.4).
        let poison_ok = has_feature(st.acked_features, VIRTIO_BALLOON_F_PAGE_POISON);
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                continue;
            };
            let writable = (4..8).contains(&o) || (poison_ok && (12..16).contains(&o));
            if writable && o < CONFIG_SIZE {
                image[o] = b;
            } else {
                warn!("driver wrote read-only balloon config byte {o}; ignored");
            }
        }
        let new = freehint_protocol::ConfigSpace::from_bytes(&image);
        if new.actual != st.actual {
            debug!("balloon actual: {} -> {} pages", st.actual, new.actual);
        }
        st.actual = new.actual;
        if new.poison_val != st.poison_val {
            st.poison_val = new.poison_val;
            self.shared.hints.set_poison(Some(new.poison_val));
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), crate::Error> {
        let mut st = self.shared.lock();
        let expected = st.queue_layout.num_queues();
        if queues.len() < expected {
            return Err(BalloonError::QueueCount {
                expected,
                got: queues.len(),
            }
            .into());
        }
        {
            let guard = mem.memory();
            for (i, q) in queues.iter().enumerate().take(expected) {
                if q.ready() && !q.is_valid(&*guard) {
                    return Err(BalloonError::InvalidQueue(i as u16).into());
                }
            }
        }
        st.queues = queues;
        st.mem = Some(mem);
        st.interrupt = Some(Arc::clone(&interrupt));
        st.stats_head = None;
        let acked = st.acked_features;
        let poison = has_feature(acked, VIRTIO_BALLOON_F_PAGE_POISON).then_some(st.poison_val);
        if has_feature(acked, VIRTIO_BALLOON_F_FREE_PAGE_HINT) && !self.config.page_poison {
            warn!("PAGE_POISON not offered: the device cannot tell whether the guest poisons free pages; hint rounds will be refused");
        }
        self.shared.hints.set_active(
            has_feature(acked, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            Some(interrupt),
            poison,
            self.config.page_poison,
        );
        let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        drop(st);
        info!("balloon activated, features {acked:#x}");
        // Linux adds and kicks the stats buffer before DRIVER_OK (init_vqs
        // runs before virtio_device_ready), so a notify may have come before
        // activation: process whatever is already available.
        // At most a queue's worth each: a driver has no more outstanding
        // (a transport with budgets comes back for the rest).
        let n = self.shared.lock().queue_layout.num_queues() as u16;
        for index in 0..n {
            self.queue_notify_budget(index, usize::from(self.config.queue_size))?;
        }
        if self.config.stats_polling_interval_s > 0
            && has_feature(acked, super::VIRTIO_BALLOON_F_STATS_VQ)
        {
            spawn_stats_poller(
                Arc::downgrade(&self.shared),
                generation,
                Duration::from_secs(u64::from(self.config.stats_polling_interval_s)),
            );
        }
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
        let guard = mem.memory();
        let ctx = Ctx {
            shared: &self.shared,
            mem: &guard,
        };
        let (used_any, more) = ctx.process_queue(&mut st, index, kind, budget)?;
        // Signal without holding the device lock (the interrupt is a leaf,
        // but a transport may call back into the device).
        let irq = st.interrupt.clone();
        drop(st);
        if let (true, Some(irq)) = (used_any, irq) {
            irq.signal_queue(index);
        }
        Ok(more)
    }

    fn reset(&mut self) {
        self.shared.poller.stop();
        let mut st = self.shared.lock();
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        st.queues.clear();
        st.mem = None;
        st.interrupt = None;
        st.acked_features = 0;
        st.queue_layout = QueueLayout::for_features(0);
        st.actual = 0;
        st.stats_head = None;
        st.poison_val = self.config.poison_val;
        self.shared
            .hints
            .set_active(false, None, None, self.config.page_poison);
        info!("balloon reset");
    }
}

pub(super) fn spawn_stats_poller(shared: Weak<Shared>, generation: u64, every: Duration) {
    let Some(owner) = shared.upgrade() else {
        return;
    };
    owner.poller.start(every, move || {
        let Some(s) = shared.upgrade() else {
            return false;
        };
        if s.generation.load(Ordering::Acquire) != generation {
            return false;
        }
        if let Err(e) = (BalloonHandle { shared: s }).request_stats() {
            warn!("stats polling: {e}");
            return false;
        }
        true
    });
}

/// Queue processing context.
struct Ctx<'a> {
    shared: &'a Shared,
    mem: &'a GuestMemoryMmap,
}

impl Ctx<'_> {
    fn metrics(&self) -> &BalloonMetrics {
        &self.shared.metrics
    }

    /// Processes at most `budget` chains of queue `index`. Returns whether
    /// the driver must be interrupted and whether the budget ran out (more
    /// buffers may wait).
    fn process_queue(
        &self,
        st: &mut DeviceState,
        index: u16,
        kind: QueueKind,
        mut budget: usize,
    ) -> Result<(bool, bool), BalloonError> {
        st.returned_extra = false;
        let mut used_any = false;
        let indirect_ok = has_feature(st.acked_features, VIRTIO_RING_F_INDIRECT_DESC);
        loop {
            let Some(q) = st.queues.get_mut(usize::from(index)) else {
                return Ok((used_any, false));
            };
            if !q.ready() {
                return Ok((used_any, false));
            }
            if budget == 0 {
                return Ok((used_any || st.returned_extra, true));
            }
            let Some(chain) = q.pop_descriptor_chain(self.mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            if head >= q.size() {
                // Cannot be returned through the used ring either.
                BalloonMetrics::inc(&self.metrics().bad_head_index);
                warn!("{kind}: available ring names descriptor {head} beyond the queue; skipped");
                continue;
            }
            let table = DescTable {
                addr: q.desc_table(),
                entries: q.size(),
            };
            let mut descs = std::mem::take(&mut st.descs);
            let used_len = match collect_chain(self.mem, table, head, indirect_ok, &mut descs) {
                Err(e) => {
                    self.count_chain_error(kind, head, e);
                    Some(0)
                }
                Ok(()) => match kind {
                    QueueKind::Inflate => Some(self.pfns(st, &descs, true)),
                    QueueKind::Deflate => Some(self.pfns(st, &descs, false)),
                    QueueKind::Stats => self.stats(st, &descs, head),
                    QueueKind::Reporting => Some(self.report(st, &descs)),
                    QueueKind::FreePage => Some(self.free_page(st, &descs)),
                },
            };
            st.descs = descs;
            if let Some(len) = used_len {
                let q = st
                    .queues
                    .get_mut(usize::from(index))
                    .ok_or(BalloonError::NotActivated)?;
                self.shared
                    .marker()
                    .add_used(q, self.mem, head, len)
                    .map_err(|source| BalloonError::UsedRing {
                        queue: index,
                        source,
                    })?;
                used_any = true;
            }
        }
        Ok((used_any || st.returned_extra, false))
    }

    /// Counts and logs a rejected chain.
    fn count_chain_error(&self, kind: QueueKind, head: u16, e: ChainError) {
        let m = self.metrics();
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

    /// Inflate (`inflate = true`) or deflate: an array of le32 pfns.
    fn pfns(&self, st: &mut DeviceState, descs: &[Desc], inflate: bool) -> u32 {
        let m = self.metrics();
        for d in descs {
            if d.write || d.len % 4 != 0 || d.len as usize / 4 > MAX_PFNS_PER_DESCRIPTOR {
                BalloonMetrics::inc(&m.bad_pfn_descriptor);
                warn!(
                    "{}: bad pfn descriptor (len {}, write-only {}); skipped",
                    if inflate { "inflateq" } else { "deflateq" },
                    d.len,
                    d.write
                );
                continue;
            }
            st.buf.resize(d.len as usize, 0);
            if self
                .mem
                .read_slice(&mut st.buf, GuestAddress(d.addr))
                .is_err()
            {
                BalloonMetrics::inc(&m.descriptor_out_of_memory);
                continue;
            }
            // Coalesce runs of consecutive pfns into one discard each.
            let mut run: Option<(u64, u64)> = None;
            let mut pages = 0u64;
            let buf = std::mem::take(&mut st.buf);
            for p in buf.chunks_exact(4) {
                let pfn = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
                let gpa = pfn << PAGE_SHIFT;
                if !self.mem.check_range(GuestAddress(gpa), PAGE_SIZE as usize) {
                    BalloonMetrics::inc(&m.pfn_out_of_range);
                    continue;
                }
                pages += 1;
                if !inflate {
                    continue;
                }
                run = match run {
                    Some((s, n)) if s + n == pfn => Some((s, n + 1)),
                    Some(r) => {
                        self.discard(st, r.0, r.1);
                        Some((pfn, 1))
                    }
                    None => Some((pfn, 1)),
                };
            }
            st.buf = buf;
            if let Some(r) = run {
                self.discard(st, r.0, r.1);
            }
            if inflate {
                BalloonMetrics::add(&m.inflate_pages, pages);
            } else {
                BalloonMetrics::add(&m.deflate_pages, pages);
            }
        }
        0
    }

    fn discard(&self, st: &DeviceState, pfn: u64, pages: u64) {
        let len = pages << PAGE_SHIFT;
        // The pages read as zero from now on (or partly, if it fails
        // half-way): the migrator must send them again.
        self.shared.marker().mark(pfn << PAGE_SHIFT, len);
        match st
            .discard
            .discard(self.mem, GuestAddress(pfn << PAGE_SHIFT), len)
        {
            Ok(()) => BalloonMetrics::add(&self.metrics().discard_bytes, len),
            Err(e) => {
                BalloonMetrics::inc(&self.metrics().discard_fail);
                warn!("discard failed: {e}");
            }
        }
    }

    /// Stats: parse and hold the buffer (returns `None`: not used yet).
    fn stats(&self, st: &mut DeviceState, descs: &[Desc], head: u16) -> Option<u32> {
        let m = self.metrics();
        if descs.iter().any(|d| d.write) {
            BalloonMetrics::inc(&m.wrong_direction);
            warn!("statsq: write-only descriptor in the stats buffer; returned");
            return Some(0);
        }
        let total: usize = descs.iter().map(|d| d.len as usize).sum();
        let n = total.min(MAX_STATS_BYTES);
        let mut bytes = Vec::with_capacity(n);
        for d in descs {
            let take = (d.len as usize).min(n - bytes.len());
            let start = bytes.len();
            bytes.resize(start + take, 0);
            if self
                .mem
                .read_slice(&mut bytes[start..], GuestAddress(d.addr))
                .is_err()
            {
                BalloonMetrics::inc(&m.descriptor_out_of_memory);
                return Some(0);
            }
        }
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
        let old = st.stats_head.replace(head);
        if let Some(old) = old {
            let idx = st.queue_layout.index_of(QueueKind::Stats);
            if let Some(q) = idx.and_then(|i| st.queues.get_mut(usize::from(i))) {
                match self.shared.marker().add_used(q, self.mem, old, 0) {
                    Ok(()) => st.returned_extra = true,
                    Err(e) => warn!("statsq: cannot return the previous buffer: {e}"),
                }
            }
        }
        None
    }

    /// Free page reporting: discard the reported ranges (unless the guest
    /// poisons free pages), return the buffers.
    fn report(&self, st: &DeviceState, descs: &[Desc]) -> u32 {
        let m = self.metrics();
        BalloonMetrics::inc(&m.report_chains);
        let poisoned =
            has_feature(st.acked_features, VIRTIO_BALLOON_F_PAGE_POISON) && st.poison_val != 0;
        for d in descs {
            if !d.write {
                BalloonMetrics::inc(&m.wrong_direction);
                warn!("reporting_vq: read-only descriptor; skipped");
                continue;
            }
            BalloonMetrics::add(&m.report_bytes, u64::from(d.len));
            if poisoned {
                // QEMU: "we must not discard the page if ... the guest is
                // expecting it to retain a non-zero value".
                BalloonMetrics::inc(&m.discard_skipped_poison);
                continue;
            }
            let start = d.addr.div_ceil(PAGE_SIZE);
            let end = d.addr.saturating_add(u64::from(d.len)) >> PAGE_SHIFT;
            if end > start {
                self.discard(st, start, end - start);
            }
        }
        0
    }

    /// The free page vq: standard protocol (id outbufs, free block inbufs)
    /// and the bitmap extension (messages with a header).
    fn free_page(&self, st: &mut DeviceState, descs: &[Desc]) -> u32 {
        let m = self.metrics();
        let n_read = descs.iter().take_while(|d| !d.write).count();
        let (readable, writable) = descs.split_at(n_read);
        if writable.iter().any(|d| !d.write) {
            BalloonMetrics::inc(&m.wrong_direction);
            warn!("free_page_vq: readable descriptor after a writable one; dropped");
            return 0;
        }
        let hints = &self.shared.hints;
        if readable.is_empty() {
            // Standard protocol: each writable descriptor is a free block.
            let mut core = hints.lock();
            for d in writable {
                match core.on_free_block(d.addr, u64::from(d.len)) {
                    Ok((pages, partial, outside)) => {
                        BalloonMetrics::add(&m.hint_pages, pages);
                        if partial > 0 {
                            BalloonMetrics::inc(&m.hint_partial_pages);
                        }
                        if outside > 0 {
                            BalloonMetrics::inc(&m.hint_out_of_layout);
                        }
                    }
                    Err(drop) => hints.count_drop(drop),
                }
            }
            return 0;
        }
        let rlen: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        let bitmap = freehint_protocol::balloon::bitmap_hints(st.acked_features);
        if rlen == 4 && writable.is_empty() {
            let mut id = [0u8; 4];
            if self.read_gather(readable, 0, &mut id).is_err() {
                return 0;
            }
            let id = u32::from_le_bytes(id);
            let mut core = hints.lock();
            if let Err(drop) = core.on_cmd_id(id) {
                debug!("free_page_vq: command id {id:#x} ignored ({drop:?})");
                hints.count_drop(drop);
            }
            return 0;
        }
        if !bitmap || rlen < MSG_HEADER_SIZE as u64 {
            BalloonMetrics::inc(&m.hint_bad_cmd_buffer);
            warn!("free_page_vq: command buffer of {rlen} bytes (need 4); dropped");
            return 0;
        }
        let mut hdr = [0u8; MSG_HEADER_SIZE];
        if self.read_gather(readable, 0, &mut hdr).is_err() {
            return 0;
        }
        let msg = match Message::parse(&hdr) {
            Ok(msg) => msg,
            Err(e) => {
                BalloonMetrics::inc(&m.bitmap_bad_message);
                warn!("free_page_vq: bad bitmap message: {e:?}; dropped");
                return 0;
            }
        };
        match msg {
            Message::LayoutQuery { cmd_id } => self.layout_query(cmd_id, writable),
            Message::Chunk(h) => {
                if !writable.is_empty() {
                    BalloonMetrics::inc(&m.wrong_direction);
                    warn!("free_page_vq: chunk with writable descriptors; dropped");
                    return 0;
                }
                let mut core = hints.lock();
                if let Err(e) = h.check_bounds(core.total_bits()) {
                    BalloonMetrics::inc(&m.bitmap_beyond_layout);
                    warn!("free_page_vq: chunk {e:?}; dropped");
                    return 0;
                }
                let payload = h.payload_len() as u64;
                if rlen - (MSG_HEADER_SIZE as u64) < payload {
                    BalloonMetrics::inc(&m.bitmap_short_payload);
                    warn!(
                        "free_page_vq: chunk payload {} bytes, header says {payload}; dropped",
                        rlen - MSG_HEADER_SIZE as u64
                    );
                    return 0;
                }
                if let Err(drop) = core.chunk_accepted(&h) {
                    hints.count_drop(drop);
                    return 0;
                }
                let mut piece = [0u8; 4096];
                let mut off = 0usize;
                let payload = payload as usize;
                while off < payload {
                    let n = (payload - off).min(piece.len());
                    if self
                        .read_gather(
                            readable,
                            MSG_HEADER_SIZE as u64 + off as u64,
                            &mut piece[..n],
                        )
                        .is_err()
                    {
                        return 0;
                    }
                    if let Err(e) = core.merge_chunk_piece(&h, off, &piece[..n]) {
                        BalloonMetrics::inc(&m.bitmap_beyond_layout);
                        warn!("free_page_vq: chunk merge failed: {e:?}");
                        return 0;
                    }
                    off += n;
                }
                BalloonMetrics::add(&m.hint_pages, u64::from(h.nr_bits));
                0
            }
            Message::RoundEnd { cmd_id, free_pages } => {
                let mut core = hints.lock();
                match core.on_round_end(cmd_id) {
                    Ok(()) => {
                        debug!("round {cmd_id:#x} ended, guest counted {free_pages} free pages")
                    }
                    Err(drop) => hints.count_drop(drop),
                }
                0
            }
        }
    }

    fn layout_query(&self, cmd_id: u32, writable: &[Desc]) -> u32 {
        let m = self.metrics();
        let hints = &self.shared.hints;
        let wlen: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
        let layout = {
            let mut core = hints.lock();
            match core.on_layout_query(cmd_id) {
                Ok(l) => l,
                Err(drop) => {
                    hints.count_drop(drop);
                    return 0;
                }
            }
        };
        let reply = LayoutReply { cmd_id, layout };
        let len = reply.encoded_len();
        if wlen < len as u64 {
            BalloonMetrics::inc(&m.bitmap_bad_reply_buffer);
            warn!("free_page_vq: layout reply buffer of {wlen} bytes, need {len}");
            return 0;
        }
        let mut out = [0u8; freehint_protocol::bitmap_hint::LAYOUT_REPLY_MAX];
        let n = match reply.encode(&mut out) {
            Ok(n) => n,
            Err(e) => {
                warn!("free_page_vq: cannot encode the layout reply: {e:?}");
                return 0;
            }
        };
        let mut done = 0usize;
        for d in writable {
            if done == n {
                break;
            }
            let k = (d.len as usize).min(n - done);
            self.shared.marker().mark(d.addr, k as u64);
            if self
                .mem
                .write_slice(&out[done..done + k], GuestAddress(d.addr))
                .is_err()
            {
                BalloonMetrics::inc(&m.descriptor_out_of_memory);
                return 0;
            }
            done += k;
        }
        n as u32
    }

    /// Reads `out.len()` bytes at byte `offset` of the concatenated readable
    /// descriptors.
    fn read_gather(&self, descs: &[Desc], mut offset: u64, out: &mut [u8]) -> Result<(), ()> {
        let mut done = 0usize;
        for d in descs {
            if done == out.len() {
                break;
            }
            let len = u64::from(d.len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let k = ((len - offset) as usize).min(out.len() - done);
            if self
                .mem
                .read_slice(&mut out[done..done + k], GuestAddress(d.addr + offset))
                .is_err()
            {
                BalloonMetrics::inc(&self.metrics().descriptor_out_of_memory);
                return Err(());
            }
            done += k;
            offset = 0;
        }
        if done == out.len() {
            Ok(())
        } else {
            Err(())
        }
    }
}
