// SPDX-License-Identifier: GPL-2.0

//! The virtio-balloon driver logic (no `bindings::`, no `unsafe`: the
//! virtio core is reached through `virtio.rs`, pages and memory figures
//! through `mm.rs`).
//!
//! Behaviour follows Linux 6.12's `drivers/virtio/virtio_balloon.c` so the
//! module can replace `virtio_balloon` (never load both: the first one bound
//! keeps the device):
//!
//! - features: MUST_TELL_HOST, STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT,
//!   PAGE_POISON (free page reporting is not offered); queues are numbered
//!   with the compacted rule of the protocol crate (`QueueLayout`);
//! - inflate/deflate towards config `num_pages` in steps of 256 pfns (le32)
//!   per buffer, `actual` written back after each step; deflate tells the
//!   host before the pages are reused (required with MUST_TELL_HOST);
//! - DEFLATE_ON_OOM: an OOM notifier gives back 256 pages per call; without
//!   it, inflated pages leave the managed page count (as Linux);
//! - stats queue: free, total, available memory and caches, plus faults,
//!   swap and OOM kills when the kernel counts VM events;
//! - PAGE_POISON: `poison_val` reported; hinting is refused (the feature is
//!   not negotiated) if the kernel poisons free pages with a non-zero value
//!   and the device does not offer PAGE_POISON, because pages the host
//!   skipped would arrive as zeroes, not poison;
//! - free page hinting: `hint.rs`, without allocating: the standard protocol
//!   (free blocks as buffers) or, with the freehint extension
//!   FREE_PAGE_BITMAP negotiated, the bitmap protocol (layout query, bitmap
//!   chunks built by `builder.rs`, ROUND_END).

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use kernel::prelude::*;
use kernel::sync::Mutex;
use kernel::{c_str, new_mutex};

use crate::abi;
use crate::hint::{self, HintQueue};
use crate::mm::{self, BalloonPage, PageList};
use crate::virtio::{self, Bound, Callback, Chain, DmaBuf, Queue, Validator, Work};

/// Pfns per inflate/deflate buffer (as Linux).
const PFNS_PER_BUF: usize = 256;
/// Bytes of one pfn buffer (le32 pfns).
const PFN_BUF_BYTES: usize = PFNS_PER_BUF * 4;
/// Pages given back per OOM notification (as Linux).
const OOM_NR_PAGES: usize = 256;
/// Linux's PAGE_POISON byte (include/linux/poison.h).
const PAGE_POISON: u8 = 0xaa;
/// Retry delay after a failed balloon page allocation (as Linux).
const OUT_OF_PUFF_MS: u32 = 200;

/// Feature negotiation, before the features are final: what to refuse.
fn validate(v: &Validator<'_>) {
    let p = mm::poisoning();
    if !p.page_poisoning && !p.init_on_free {
        // Free pages hold no particular value: nothing to report.
        v.clear(abi::VIRTIO_BALLOON_F_PAGE_POISON);
    } else if p.page_poisoning && !v.has(abi::VIRTIO_BALLOON_F_PAGE_POISON) {
        // Pages the host skips because they were hinted arrive as zeroes on
        // the destination, and the poison check would report them corrupt.
        pr_warn!(
            "page poisoning is on and the device lacks PAGE_POISON: free page hinting refused\n"
        );
        v.clear(abi::VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        // The bitmap extension is only valid together with FREE_PAGE_HINT.
        v.clear(abi::VIRTIO_BALLOON_F_FREE_PAGE_BITMAP);
    }
    // As Linux: no indirect descriptors (no allocation when adding buffers),
    // guest-physical addresses in descriptors.
    v.clear(virtio::VIRTIO_RING_F_INDIRECT_DESC);
    v.clear(virtio::VIRTIO_F_ACCESS_PLATFORM);
}

/// Negotiated features the driver acts on.
#[derive(Clone, Copy, Debug)]
struct Features {
    bits: u64,
    must_tell_host: bool,
    deflate_on_oom: bool,
    hint: bool,
    poison: bool,
}

impl Features {
    fn read(dev: &Bound) -> Self {
        let mut bits = 0u64;
        for &bit in <Balloon as virtio::Driver>::FEATURES {
            if dev.has_feature(bit) {
                bits |= abi::feature(bit);
            }
        }
        Self {
            bits,
            must_tell_host: abi::has_feature(bits, abi::VIRTIO_BALLOON_F_MUST_TELL_HOST),
            deflate_on_oom: abi::has_feature(bits, abi::VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            hint: abi::has_feature(bits, abi::VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            poison: abi::has_feature(bits, abi::VIRTIO_BALLOON_F_PAGE_POISON),
        }
    }
}

/// Inflate/deflate state, under one lock (size work, OOM notifier, remove).
struct Inflated {
    /// The inflate queue and its buffer of le32 pfns.
    inflate_vq: Queue<DmaBuf>,
    /// The deflate queue and its buffer of le32 pfns.
    deflate_vq: Queue<DmaBuf>,
    pages: PageList,
    /// Pages being deflated (capacity [`PFNS_PER_BUF`], allocated at probe:
    /// the OOM path must not allocate).
    leaking: KVec<BalloonPage>,
}

/// Free page hinting state (hint work only).
struct HintState {
    q: HintQueue,
    /// The free-list walk of both protocols: over the kernel's own RAM
    /// layout (standard protocol), or the device's (bitmap protocol).
    builder: crate::builder::Builder,
    /// FREE_PAGE_BITMAP negotiated: rounds use the bitmap protocol.
    bitmap: bool,
    /// Bits of the kernel's own RAM layout (bounds the device's layout).
    own_bits: u64,
    /// The id of the last round started (STOP before the first).
    active: u32,
    rounds: u64,
}

/// The stats virtqueue and the buffer it keeps lent to the device.
struct StatsQueue(Queue<DmaBuf>);

/// Bytes of the stats buffer: one entry per stat tag Linux 6.12 knows.
const STATS_BUF_BYTES: usize = abi::VIRTIO_BALLOON_S_NR * abi::VIRTIO_BALLOON_STAT_SIZE;

impl StatsQueue {
    /// Takes the buffer back if the device returned it (it does so to ask
    /// for fresh statistics). Returns whether the driver now holds it.
    fn take_back(&mut self) -> bool {
        self.0.reclaim();
        self.0.in_flight() == 0
    }

    /// Fills the buffer with the current statistics and lends it to the
    /// device. `EBUSY` if the device still holds it.
    fn post(&mut self) -> Result {
        let len = fill_stats(self.0.bufs_mut()?.bytes_mut());
        self.0.add(|buf| Chain::read(buf, len))?;
        self.0.kick();
        Ok(())
    }
}

/// One bound balloon device.
#[pin_data]
pub(crate) struct Balloon {
    dev: Bound,
    feat: Features,
    #[pin]
    inflated: Mutex<Inflated>,
    #[pin]
    stats: Mutex<Option<StatsQueue>>,
    #[pin]
    hint: Mutex<Option<HintState>>,
    /// Config changed since the command id was last read.
    cmd_dirty: AtomicBool,
    /// Last command id read from config.
    cmd_cache: AtomicU32,
    /// Removal started: long work ends early.
    stopping: AtomicBool,
    oom_registered: AtomicBool,
    torn_down: AtomicBool,
    /// Pages given back by the OOM notifier (for the removal log line).
    oom_returned: AtomicU32,
    /// An "out of puff" was logged and no inflation succeeded since.
    puff_logged: AtomicBool,
}

impl Balloon {
    /// Sets up queues and state (the device is not ready yet and holds no
    /// buffer of ours). On error the caller resets the device.
    fn new(mut dev: Bound) -> Result<Pin<KBox<Self>>> {
        let feat = Features::read(&dev);
        let layout = abi::QueueLayout::for_features(feat.bits);
        let mut specs: KVec<(&'static CStr, Option<Callback>)> =
            KVec::with_capacity(abi::MAX_QUEUES, GFP_KERNEL)?;
        for kind in layout.kinds() {
            let spec = match kind {
                abi::QueueKind::Inflate => (c_str!("inflate"), Some(Callback::Ack)),
                abi::QueueKind::Deflate => (c_str!("deflate"), Some(Callback::Ack)),
                abi::QueueKind::Stats => (c_str!("stats"), Some(Callback::Stats)),
                abi::QueueKind::FreePage => (c_str!("free_page_vq"), Some(Callback::Ack)),
                abi::QueueKind::Reporting => (c_str!("reporting_vq"), Some(Callback::Ack)),
            };
            specs.push(spec, GFP_KERNEL)?;
        }
        let vqs = dev.find_vqs(&specs)?;
        let (mut inflate_vq, mut deflate_vq, mut stats_vq, mut free_vq) = (None, None, None, None);
        for (kind, vq) in layout.kinds().iter().zip(vqs) {
            match kind {
                abi::QueueKind::Inflate => inflate_vq = Some(vq),
                abi::QueueKind::Deflate => deflate_vq = Some(vq),
                abi::QueueKind::Stats => stats_vq = Some(vq),
                abi::QueueKind::FreePage => free_vq = Some(vq),
                abi::QueueKind::Reporting => {}
            }
        }
        let (Some(inflate_vq), Some(deflate_vq)) = (inflate_vq, deflate_vq) else {
            return Err(ENODEV);
        };
        let stats = match stats_vq {
            Some(vq) => Some(StatsQueue(Queue::new(vq, DmaBuf::new(STATS_BUF_BYTES)?))),
            None => None,
        };
        let hint = match free_vq {
            Some(vq) => {
                let bitmap = abi::bitmap_hints(feat.bits);
                let q = HintQueue::new(vq, bitmap)?;
                let builder = crate::builder::Builder::new()?;
                let own_bits = builder.summary().total_bits;
                dev.alloc_hint_wq()?;
                Some(HintState {
                    q,
                    builder,
                    bitmap,
                    own_bits,
                    active: abi::FREE_PAGE_HINT_CMD_ID_STOP,
                    rounds: 0,
                })
            }
            None => None,
        };
        let pages = dev.take_page_list().ok_or(EINVAL)?;
        let inflated = Inflated {
            inflate_vq: Queue::new(inflate_vq, DmaBuf::new(PFN_BUF_BYTES)?),
            deflate_vq: Queue::new(deflate_vq, DmaBuf::new(PFN_BUF_BYTES)?),
            pages,
            leaking: KVec::with_capacity(PFNS_PER_BUF, GFP_KERNEL)?,
        };
        KBox::pin_init(
            try_pin_init!(Self {
                dev,
                feat,
                inflated <- new_mutex!(inflated, "freehint::inflated"),
                stats <- new_mutex!(stats, "freehint::stats"),
                hint <- new_mutex!(hint, "freehint::hint"),
                cmd_dirty: AtomicBool::new(false),
                cmd_cache: AtomicU32::new(abi::FREE_PAGE_HINT_CMD_ID_STOP),
                stopping: AtomicBool::new(false),
                oom_registered: AtomicBool::new(false),
                torn_down: AtomicBool::new(false),
                oom_returned: AtomicU32::new(0),
                puff_logged: AtomicBool::new(false),
            }),
            GFP_KERNEL,
        )
    }

    /// Lends the stats buffer, registers the OOM notifier, reports the
    /// poison value, sets DRIVER_OK and starts towards the target. On error
    /// the caller runs [`Balloon::teardown`].
    fn start(&self) -> Result {
        // `Option::as_mut` by path: 7.3's lock guard has an `as_mut` of its
        // own (a pinned reference), which method syntax would pick.
        if let Some(s) = Option::as_mut(&mut self.stats.lock()) {
            s.post()?;
        }
        if self.feat.deflate_on_oom {
            self.dev.register_oom()?;
            self.oom_registered.store(true, Ordering::Release);
        }
        let poison_val = if self.feat.poison {
            // 0 stands for init_on_free (pages are zeroed), else the poison
            // byte repeated (a single byte, so no byte order issue).
            let v = if mm::poisoning().init_on_free {
                0
            } else {
                u32::from_le_bytes([PAGE_POISON; 4])
            };
            self.dev.config_write_le32(abi::CONFIG_POISON_VAL, v);
            Some(v)
        } else {
            None
        };
        self.dev.ready();
        let hint_ring = self.hint.lock().as_ref().map(|h| h.q.ring_size());
        pr_info!(
            "virtio-balloon bound: features {:#x} (must_tell_host={} deflate_on_oom={} hint={} poison={:?}), hint ring {:?}\n",
            self.feat.bits,
            self.feat.must_tell_host,
            self.feat.deflate_on_oom,
            self.feat.hint,
            poison_val,
            hint_ring
        );
        self.config_changed();
        Ok(())
    }

    /// Stops everything and deflates fully (the adapter then resets the
    /// device and deletes its queues). Idempotent. After it returns nothing
    /// uses the state.
    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stopping.store(true, Ordering::Release);
        if self.oom_registered.swap(false, Ordering::AcqRel) {
            self.dev.unregister_oom();
        }
        // Waits for the size, stats and hint work (the hint round sees
        // `stopping` and ends within one wait).
        self.dev.stop_and_cancel();
        let returned = {
            let mut inf = self.inflated.lock();
            let mut total = 0;
            while inf.pages.len() > 0 {
                let n = self.leak_locked(&mut inf, PFNS_PER_BUF);
                if n == 0 {
                    break;
                }
                total += n;
            }
            self.set_actual(clamp_u32(inf.pages.len()));
            total
        };
        let rounds = self.hint.lock().as_ref().map_or(0, |h| h.rounds);
        pr_info!(
            "virtio-balloon removed: {} pages returned, {} given back on OOM before, {} hint rounds\n",
            returned,
            self.oom_returned.load(Ordering::Relaxed),
            rounds
        );
    }

    /// Config `num_pages`: the balloon size the host wants (4 KiB pages).
    fn num_pages(&self) -> u32 {
        self.dev.config_read_le32(abi::CONFIG_NUM_PAGES)
    }

    /// Writes config `actual` (pages in the balloon).
    fn set_actual(&self, pages: u32) {
        self.dev.config_write_le32(abi::CONFIG_ACTUAL, pages);
    }

    /// Config space changed (interrupt context): queue the work it needs.
    fn config_changed(&self) {
        self.dev.queue_work(Work::Size);
        if self.feat.hint && !self.cmd_dirty.swap(true, Ordering::AcqRel) {
            self.dev.queue_work(Work::Hint);
        }
    }

    /// The command id from config, read again only after a config change.
    fn cmd_id_received(&self) -> u32 {
        if self.cmd_dirty.swap(false, Ordering::AcqRel) {
            let id = self.dev.config_read_le32(abi::CONFIG_FREE_PAGE_HINT_CMD_ID);
            self.cmd_cache.store(id, Ordering::Release);
        }
        self.cmd_cache.load(Ordering::Acquire)
    }

    /// Inflate or deflate one step towards `num_pages`, write `actual`,
    /// requeue while not there.
    fn size_work(&self) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let target = i64::from(self.num_pages());
        let have = self.inflated.lock().pages.len() as i64;
        let diff = target - have;
        if diff == 0 {
            return;
        }
        let step = diff.unsigned_abs().min(PFNS_PER_BUF as u64) as usize;
        let done = if diff > 0 {
            self.fill(step)
        } else {
            let mut inf = self.inflated.lock();
            self.leak_locked(&mut inf, step)
        };
        let now = self.inflated.lock().pages.len();
        self.set_actual(clamp_u32(now));
        if done == 0 && diff > 0 {
            if !self.puff_logged.swap(true, Ordering::Relaxed) {
                pr_info!(
                    "out of puff: cannot inflate to {} pages (at {}); retrying every {} ms\n",
                    target,
                    now,
                    OUT_OF_PUFF_MS
                );
            }
            crate::clock::sleep_ms(OUT_OF_PUFF_MS);
        } else if done > 0 {
            self.puff_logged.store(false, Ordering::Relaxed);
        }
        if i64::from(self.num_pages()) != now as i64 {
            self.dev.queue_work(Work::Size);
        }
    }

    /// Allocates up to `n` pages (outside the lock) and inflates them.
    fn fill(&self, n: usize) -> usize {
        let Ok(mut new) = KVec::<BalloonPage>::with_capacity(n, GFP_KERNEL) else {
            return 0;
        };
        while new.len() < n {
            let Some(p) = BalloonPage::alloc() else { break };
            if p.pfn32().is_none() {
                // Above 16 TiB: not expressible in the le32 pfn ABI.
                break;
            }
            if new.push(p, GFP_NOWAIT).is_err() {
                break;
            }
        }
        if new.is_empty() {
            return 0;
        }
        let mut guard = self.inflated.lock();
        let inf = &mut *guard;
        let k = new.len();
        if let Err(e) = tell_host(&mut inf.inflate_vq, new.iter()) {
            // Not told to the host: the pages go straight back (dropped).
            pr_warn!("inflate buffer refused ({:?})\n", e);
            return 0;
        }
        while let Some(p) = mm::vec_pop(&mut new) {
            if !self.feat.deflate_on_oom {
                p.adjust_managed(-1);
            }
            inf.pages.push(p);
        }
        k
    }

    /// Deflates up to `n` pages: tells the host, then frees them.
    fn leak_locked(&self, inf: &mut Inflated, n: usize) -> usize {
        let n = n.min(PFNS_PER_BUF).min(inf.pages.len());
        while inf.leaking.len() < n {
            let Some(p) = inf.pages.pop() else { break };
            // Capacity PFNS_PER_BUF was reserved at probe: no allocation.
            if let Err(e) = inf.leaking.push(p, GFP_NOWAIT) {
                pr_warn!("deflate scratch full ({:?})\n", e);
                break;
            }
        }
        let k = inf.leaking.len();
        if k == 0 {
            return 0;
        }
        if let Err(e) = tell_host(&mut inf.deflate_vq, inf.leaking.iter()) {
            pr_warn!("deflate buffer refused ({:?})\n", e);
            if self.feat.must_tell_host {
                // The host was not told: the pages stay in the balloon.
                while let Some(p) = mm::vec_pop(&mut inf.leaking) {
                    inf.pages.push(p);
                }
                return 0;
            }
        }
        while let Some(p) = mm::vec_pop(&mut inf.leaking) {
            if !self.feat.deflate_on_oom {
                p.adjust_managed(1);
            }
            drop(p);
        }
        k
    }

    /// OOM notifier: gives back up to 256 pages; returns how many.
    fn oom(&self) -> usize {
        let mut inf = self.inflated.lock();
        let n = self.leak_locked(&mut inf, OOM_NR_PAGES);
        self.set_actual(clamp_u32(inf.pages.len()));
        self.oom_returned.fetch_add(clamp_u32(n), Ordering::Relaxed);
        n
    }

    /// The host took the stats buffer back: refill and lend it again.
    fn stats_work(&self) {
        let mut s = self.stats.lock();
        let Some(q) = Option::as_mut(&mut s) else {
            return;
        };
        if !q.take_back() {
            return;
        }
        if let Err(e) = q.post() {
            pr_warn!("stats buffer refused ({:?})\n", e);
        }
    }

    /// A config change arrived with hinting negotiated: start a round if
    /// the command id is new.
    fn hint_work(&self) {
        let mut guard = self.hint.lock();
        let Some(h) = Option::as_mut(&mut guard) else {
            return;
        };
        let id = self.cmd_id_received();
        if id == abi::FREE_PAGE_HINT_CMD_ID_DONE {
            // Nothing to give back: this driver never allocates to hint.
            return;
        }
        if id == abi::FREE_PAGE_HINT_CMD_ID_STOP || id == h.active {
            return;
        }
        h.active = id;
        h.rounds += 1;
        let ctl = Ctl { b: self, id };
        if h.bitmap {
            let st = hint::run_bitmap_round(&mut h.q, &mut h.builder, h.own_bits, id, &ctl);
            pr_info!(
                "bitmap round {:#x}: layout {} ranges / {} bits, {} free pages marked, {} chunks, build {} us, {} ms, end={}\n",
                st.cmd_id,
                st.ranges,
                st.total_bits,
                st.free_pages,
                st.chunks,
                st.build_ns / 1000,
                st.round_ns / 1_000_000,
                st.end.name()
            );
            return;
        }
        let st = hint::run_round(&mut h.q, &mut h.builder, id, &ctl);
        pr_info!(
            "hint round {:#x}: {} blocks in {} ranges, {} pages ({} MiB), walk {} us, {} lock holds (max {} us), {} ring-full waits, {} returned, STOP after {} ms, {} ms, end={}\n",
            st.cmd_id,
            st.blocks,
            st.descs,
            st.pages,
            st.pages >> 8,
            st.build_ns / 1000,
            st.lock_holds,
            st.max_hold_ns / 1000,
            st.ring_full_waits,
            st.returned,
            st.walk_ns / 1_000_000,
            st.round_ns / 1_000_000,
            st.end.name()
        );
    }
}

impl virtio::Driver for Balloon {
    /// Offered: MUST_TELL_HOST, STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT,
    /// PAGE_POISON and freehint's FREE_PAGE_BITMAP (docs/protocol.md). Not
    /// REPORTING: free page reporting is not implemented.
    const FEATURES: &'static [u32] = &[
        abi::VIRTIO_BALLOON_F_MUST_TELL_HOST,
        abi::VIRTIO_BALLOON_F_STATS_VQ,
        abi::VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        abi::VIRTIO_BALLOON_F_FREE_PAGE_HINT,
        abi::VIRTIO_BALLOON_F_PAGE_POISON,
        abi::VIRTIO_BALLOON_F_FREE_PAGE_BITMAP,
    ];

    fn validate(dev: &Validator<'_>) {
        validate(dev);
    }

    fn probe(dev: Bound) -> Result<Pin<KBox<Self>>> {
        Balloon::new(dev)
    }

    fn start(&self) -> Result {
        Balloon::start(self)
    }

    fn teardown(&self) {
        Balloon::teardown(self);
    }

    fn config_changed(&self) {
        Balloon::config_changed(self);
    }

    fn work(&self, w: Work) {
        match w {
            Work::Size => self.size_work(),
            Work::Stats => self.stats_work(),
            Work::Hint => self.hint_work(),
        }
    }

    fn oom(&self) -> usize {
        Balloon::oom(self)
    }
}

/// Stop conditions of a hint round.
struct Ctl<'a> {
    b: &'a Balloon,
    id: u32,
}

impl hint::Control for Ctl<'_> {
    fn should_stop(&self) -> Option<hint::End> {
        if self.b.stopping.load(Ordering::Acquire) {
            return Some(hint::End::Removing);
        }
        match self.b.cmd_id_received() {
            id if id == self.id => None,
            abi::FREE_PAGE_HINT_CMD_ID_STOP => Some(hint::End::Stop),
            abi::FREE_PAGE_HINT_CMD_ID_DONE => Some(hint::End::Done),
            id => Some(hint::End::NewId(id)),
        }
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Sends the le32 pfns of `pages` (at most [`PFNS_PER_BUF`]) on the inflate
/// or deflate queue and waits until the host returned them (Linux's
/// `tell_host`).
fn tell_host<'a>(q: &mut Queue<DmaBuf>, pages: impl Iterator<Item = &'a BalloonPage>) -> Result {
    let buf = q.bufs_mut()?.bytes_mut();
    let mut len = 0;
    for p in pages {
        let Some(dst) = buf.get_mut(len..len + 4) else {
            break;
        };
        dst.copy_from_slice(&p.pfn32().unwrap_or(0).to_le_bytes());
        len += 4;
    }
    q.send_and_wait(|pfns| Chain::read(pfns, len))
}

/// Writes the stat entries (le16 tag, le64 value) into `buf`; returns the
/// bytes used.
fn fill_stats(buf: &mut [u8]) -> usize {
    let m = mm::mem_stats();
    let events = m.events.map(|ev| {
        [
            (abi::VIRTIO_BALLOON_S_SWAP_IN, ev.swap_in_bytes),
            (abi::VIRTIO_BALLOON_S_SWAP_OUT, ev.swap_out_bytes),
            (abi::VIRTIO_BALLOON_S_MAJFLT, ev.major_faults),
            (abi::VIRTIO_BALLOON_S_MINFLT, ev.minor_faults),
            (abi::VIRTIO_BALLOON_S_OOM_KILL, ev.oom_kills),
        ]
    });
    let memory = [
        (abi::VIRTIO_BALLOON_S_MEMFREE, m.free_bytes),
        (abi::VIRTIO_BALLOON_S_MEMTOT, m.total_bytes),
        (abi::VIRTIO_BALLOON_S_AVAIL, m.avail_bytes),
        (abi::VIRTIO_BALLOON_S_CACHES, m.caches_bytes),
    ];
    // `Iterator::chain`: the kernel prelude's `Init` has a `chain` too.
    let entries = Iterator::chain(events.iter().flatten(), &memory);
    let mut used = 0;
    for (dst, &(tag, val)) in buf
        .chunks_exact_mut(abi::VIRTIO_BALLOON_STAT_SIZE)
        .zip(entries)
    {
        dst.copy_from_slice(&abi::encode_stat(tag, val));
        used += abi::VIRTIO_BALLOON_STAT_SIZE;
    }
    used
}
