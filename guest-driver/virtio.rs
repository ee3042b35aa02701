// SPDX-License-Identifier: GPL-2.0

//! Safe wrappers over the virtio core for the balloon driver.
//!
//! The `kernel` crate of 6.12 has no virtio abstraction, so the driver is
//! registered and its callbacks are dispatched by `virtio_shim.c`, which
//! calls the `freehint_rs_*` entry points at the bottom of this file. This is
//! the one module of the driver with `unsafe` code: it turns the raw pointers
//! the C side hands over into the small safe types the driver logic
//! (`balloon.rs`, `hint.rs`) uses:
//!
//! - [`Registration`]: the registered `struct virtio_driver` (module scope);
//! - [`Validator`]: a device during `validate`, before features are final;
//! - [`Device`]: a bound balloon device (features, config space, work items,
//!   OOM notifier, reset);
//! - [`Virtqueue`]: a virtqueue with a synchronous "send and wait" request;
//! - [`StatsQueue`] and [`HintQueue`]: the stats queue and the free page
//!   queue with the buffers they lend to the device;
//! - [`BalloonPage`]: one page owned by the balloon, and [`PageList`]: the
//!   balloon's pages linked through `page->lru` (no allocation to track
//!   them, so the OOM path never allocates);
//! - [`MemStats`] and [`Poisoning`]: the kernel's memory figures for the
//!   stats queue and how it treats freed pages.

use core::ffi::c_void;
use core::pin::Pin;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::ffi::{c_char, c_int, c_long, c_uint, c_ulong};
use kernel::prelude::*;

use crate::balloon::Balloon;

extern "C" {
    fn freehint_virtio_register() -> c_int;
    fn freehint_virtio_unregister();
    fn freehint_vb_set_rust(vb: *mut c_void, rust: *mut c_void);
    fn freehint_queue_work(vb: *mut c_void, which: c_uint) -> bool;
    fn freehint_alloc_hint_wq(vb: *mut c_void) -> c_int;
    fn freehint_stop_and_cancel(vb: *mut c_void);
    fn freehint_register_oom(vb: *mut c_void) -> c_int;
    fn freehint_unregister_oom(vb: *mut c_void);
    fn freehint_has_feature(vdev: *const c_void, bit: c_uint) -> bool;
    fn freehint_clear_feature(vdev: *mut c_void, bit: c_uint);
    fn freehint_cread_num_pages(vdev: *mut c_void) -> u32;
    fn freehint_cread_cmd_id(vdev: *mut c_void) -> u32;
    fn freehint_cwrite_actual(vdev: *mut c_void, v: u32);
    fn freehint_cwrite_poison_val(vdev: *mut c_void, v: u32);
    fn freehint_device_ready(vdev: *mut c_void);
    fn freehint_reset_device(vdev: *mut c_void);
    fn freehint_del_vqs(vdev: *mut c_void);
    fn freehint_find_vqs(
        vdev: *mut c_void,
        nvqs: c_uint,
        vqs: *mut *mut c_void,
        names: *const *const c_char,
        cbs: *const u8,
    ) -> c_int;
    fn freehint_vq_add_outbuf(vq: *mut c_void, buf: *const c_void, len: c_uint, token: *mut c_void) -> c_int;
    fn freehint_vq_add_out_in(
        vq: *mut c_void,
        out: *const c_void,
        out_len: c_uint,
        inb: *mut c_void,
        in_len: c_uint,
        token: *mut c_void,
    ) -> c_int;
    fn freehint_vq_add_out2(
        vq: *mut c_void,
        a: *const c_void,
        a_len: c_uint,
        b: *const c_void,
        b_len: c_uint,
        token: *mut c_void,
    ) -> c_int;
    fn freehint_vq_add_inbuf_pfn(vq: *mut c_void, pfn: c_ulong, len: c_uint, token: *mut c_void) -> c_int;
    fn freehint_vq_kick(vq: *mut c_void) -> bool;
    fn freehint_vq_get_buf(vq: *mut c_void, len: *mut c_uint) -> *mut c_void;
    fn freehint_vq_num_free(vq: *const c_void) -> c_uint;
    fn freehint_vq_size(vq: *const c_void) -> c_uint;
    fn freehint_vq_wait_buf(vb: *mut c_void, vq: *mut c_void, len: *mut c_uint) -> *mut c_void;
    fn freehint_vq_wait_buf_timeout(vb: *mut c_void, vq: *mut c_void, len: *mut c_uint, ms: c_uint) -> *mut c_void;
    fn freehint_balloon_page_alloc() -> *mut c_void;
    fn freehint_balloon_page_free(page: *mut c_void);
    fn freehint_vb_pages(vb: *mut c_void) -> *mut c_void;
    fn freehint_page_list_add(head: *mut c_void, page: *mut c_void);
    fn freehint_page_list_pop(head: *mut c_void) -> *mut c_void;
    fn freehint_vb_page_to_pfn(page: *const c_void) -> c_ulong;
    fn freehint_adjust_managed_page_count(page: *mut c_void, count: c_long);
    fn freehint_page_poisoning_enabled() -> bool;
    fn freehint_want_init_on_free() -> bool;
    fn freehint_mem_stats(s: *mut MemStats);
}

/// Transport feature: indirect descriptors.
pub(crate) const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Transport feature: the device sits behind an IOMMU / platform DMA.
pub(crate) const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// The registered virtio driver; unregistered (which removes every bound
/// device first) when dropped.
pub(crate) struct Registration(());

impl Registration {
    /// Registers the balloon driver with the virtio bus. Harmless without a
    /// balloon device: the driver just stays unbound.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: registers a static driver whose callbacks are all defined
        // in virtio_shim.c; undone in Drop before the module text goes away.
        kernel::error::to_result(unsafe { freehint_virtio_register() })?;
        Ok(Self(()))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: the driver was registered in `new` (type invariant: a
        // `Registration` exists only after a successful registration).
        unsafe { freehint_virtio_unregister() };
    }
}

/// Work items of a device (same numbering as `enum freehint_work` in C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// Inflate/deflate towards the host's target.
    Size = 0,
    /// Refill the stats queue (queued by the C stats callback, not by Rust).
    #[allow(dead_code)]
    Stats = 1,
    /// Free page hinting (runs on the device's own workqueue).
    Hint = 2,
}

/// Callback a virtqueue gets (same numbering as `enum freehint_cb` in C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Callback {
    /// Wakes the device's wait queue (used buffers are back).
    Ack = 1,
    /// Queues [`Work::Stats`] (the host asks for fresh statistics).
    Stats = 2,
}

/// A virtio device during `validate` (features not yet final).
///
/// # Invariants
///
/// `vdev` is the `struct virtio_device` being validated by the virtio core.
pub(crate) struct Validator {
    vdev: NonNull<c_void>,
}

impl Validator {
    /// Whether the device offers (and the driver table lists) `bit`.
    pub(crate) fn has(&self, bit: u32) -> bool {
        // SAFETY: `vdev` is valid (type invariant).
        unsafe { freehint_has_feature(self.vdev.as_ptr(), bit) }
    }

    /// Drops `bit` from the features to be negotiated.
    pub(crate) fn clear(&self, bit: u32) {
        // SAFETY: `vdev` is valid (type invariant); `validate` is where the
        // virtio core lets a driver change features.
        unsafe { freehint_clear_feature(self.vdev.as_ptr(), bit) };
    }
}

/// A bound balloon device.
///
/// # Invariants
///
/// `vb` is the `struct freehint_vb` of virtio_shim.c and `vdev` its virtio
/// device. Both stay valid from `probe` until `freehint_rs_remove` returns
/// (the C side frees `vb` only after that), and the Rust driver state that
/// owns this `Device` is dropped inside `freehint_rs_remove`, or in probe on
/// failure before `probe` returns.
pub(crate) struct Device {
    vb: NonNull<c_void>,
    vdev: NonNull<c_void>,
    list_taken: AtomicBool,
}

// SAFETY: the virtio core and the work/notifier functions may use the device
// from any CPU; every operation below is one the C API allows concurrently
// (config access, queue_work) or is serialised by the driver's own locks.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Device {
    fn new(vb: NonNull<c_void>, vdev: NonNull<c_void>) -> Self {
        Self {
            vb,
            vdev,
            list_taken: AtomicBool::new(false),
        }
    }

    /// The list of balloon pages of this device; `None` after the first
    /// call (there is one owner).
    pub(crate) fn take_page_list(&self) -> Option<PageList> {
        if self.list_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: `vb` is valid (type invariant); its list head was
        // initialised in the C probe.
        let head = NonNull::new(unsafe { freehint_vb_pages(self.vb.as_ptr()) })?;
        // INVARIANT: first and only handle to this list.
        Some(PageList { head, len: 0 })
    }

    /// Whether feature `bit` was negotiated.
    pub(crate) fn has_feature(&self, bit: u32) -> bool {
        // SAFETY: `vdev` is valid (type invariant).
        unsafe { freehint_has_feature(self.vdev.as_ptr(), bit) }
    }

    /// Config `num_pages`: the balloon size the host wants (4 KiB pages).
    pub(crate) fn num_pages(&self) -> u32 {
        // SAFETY: `vdev` is valid (type invariant).
        unsafe { freehint_cread_num_pages(self.vdev.as_ptr()) }
    }

    /// Config `free_page_hint_cmd_id`.
    pub(crate) fn cmd_id(&self) -> u32 {
        // SAFETY: `vdev` is valid (type invariant).
        unsafe { freehint_cread_cmd_id(self.vdev.as_ptr()) }
    }

    /// Writes config `actual` (pages in the balloon).
    pub(crate) fn set_actual(&self, pages: u32) {
        // SAFETY: `vdev` is valid (type invariant).
        unsafe { freehint_cwrite_actual(self.vdev.as_ptr(), pages) };
    }

    /// Writes config `poison_val`.
    pub(crate) fn set_poison_val(&self, v: u32) {
        // SAFETY: `vdev` is valid (type invariant).
        unsafe { freehint_cwrite_poison_val(self.vdev.as_ptr(), v) };
    }

    /// Sets DRIVER_OK.
    pub(crate) fn ready(&self) {
        // SAFETY: `vdev` is valid (type invariant); queues are set up.
        unsafe { freehint_device_ready(self.vdev.as_ptr()) };
    }

    /// Queues a work item; `false` if it was already queued or removal began.
    pub(crate) fn queue_work(&self, w: Work) -> bool {
        // SAFETY: `vb` is valid (type invariant); its work items were
        // initialised in probe before any Rust code ran.
        unsafe { freehint_queue_work(self.vb.as_ptr(), w as c_uint) }
    }

    /// Creates the workqueue free page hinting runs on.
    pub(crate) fn alloc_hint_wq(&self) -> Result {
        // SAFETY: `vb` is valid (type invariant).
        kernel::error::to_result(unsafe { freehint_alloc_hint_wq(self.vb.as_ptr()) })
    }

    /// Stops queueing work and waits until no work item runs or is queued;
    /// destroys the hint workqueue. Idempotent.
    pub(crate) fn stop_and_cancel(&self) {
        // SAFETY: `vb` is valid (type invariant).
        unsafe { freehint_stop_and_cancel(self.vb.as_ptr()) };
    }

    /// Registers the OOM notifier (DEFLATE_ON_OOM).
    pub(crate) fn register_oom(&self) -> Result {
        // SAFETY: `vb` is valid (type invariant); the notifier calls
        // `freehint_rs_oom` only while `vb->rust` is set.
        kernel::error::to_result(unsafe { freehint_register_oom(self.vb.as_ptr()) })
    }

    /// Unregisters the OOM notifier; waits for running notifications.
    pub(crate) fn unregister_oom(&self) {
        // SAFETY: `vb` is valid and the notifier was registered (caller).
        unsafe { freehint_unregister_oom(self.vb.as_ptr()) };
    }

    /// Finds the virtqueues `specs` (name, callback) in this order: the index
    /// of a queue is its position, so passing only the queues whose feature
    /// was negotiated gives the compacted numbering.
    pub(crate) fn find_vqs(&self, specs: &[(&'static CStr, Option<Callback>)]) -> Result<KVec<Virtqueue>> {
        const MAX: usize = 5;
        if specs.len() > MAX {
            return Err(EINVAL);
        }
        let mut names = [core::ptr::null::<c_char>(); MAX];
        let mut cbs = [0u8; MAX];
        for (i, (name, cb)) in specs.iter().enumerate() {
            names[i] = name.as_char_ptr();
            cbs[i] = cb.map_or(0, |c| c as u8);
        }
        let mut vqs = [core::ptr::null_mut::<c_void>(); MAX];
        // SAFETY: `vdev` is valid (type invariant); the arrays hold at least
        // `specs.len()` entries; names are static C strings.
        kernel::error::to_result(unsafe {
            freehint_find_vqs(
                self.vdev.as_ptr(),
                specs.len() as c_uint,
                vqs.as_mut_ptr(),
                names.as_ptr(),
                cbs.as_ptr(),
            )
        })?;
        let mut out = KVec::with_capacity(specs.len(), GFP_KERNEL)?;
        for vq in vqs.iter().take(specs.len()) {
            let Some(vq) = NonNull::new(*vq) else {
                self.reset_and_del_vqs();
                return Err(ENODEV);
            };
            // INVARIANT: `vq` was just created for this device.
            out.push(Virtqueue { vq, vb: self.vb }, GFP_KERNEL)?;
        }
        Ok(out)
    }

    /// Resets the device (it stops using every buffer) and deletes the
    /// virtqueues. The caller must not use any [`Virtqueue`] afterwards.
    pub(crate) fn reset_and_del_vqs(&self) {
        // SAFETY: `vdev` is valid (type invariant). After the reset the
        // device touches no buffer; the owner drops its queues and buffers
        // only after this (documented contract of the queue types).
        unsafe {
            freehint_reset_device(self.vdev.as_ptr());
            freehint_del_vqs(self.vdev.as_ptr());
        }
    }
}

/// A virtqueue of a bound device.
///
/// # Invariants
///
/// `vq` was returned by `find_vqs` for the device whose `struct freehint_vb`
/// is `vb`, and stays valid until [`Device::reset_and_del_vqs`], which the
/// driver calls only in teardown after every user of the queue stopped.
/// Callers serialise operations on one queue (the driver holds a lock or is
/// the only user), as the virtqueue API requires.
pub(crate) struct Virtqueue {
    vq: NonNull<c_void>,
    vb: NonNull<c_void>,
}

// SAFETY: see the type invariant: operations on a queue are serialised by the
// driver's locks, from whatever CPU the work runs on.
unsafe impl Send for Virtqueue {}

impl Virtqueue {
    /// Ring size.
    pub(crate) fn size(&self) -> u32 {
        // SAFETY: `vq` is valid (type invariant).
        unsafe { freehint_vq_size(self.vq.as_ptr()) }
    }

    /// Free descriptors.
    pub(crate) fn num_free(&self) -> u32 {
        // SAFETY: `vq` is valid (type invariant).
        unsafe { freehint_vq_num_free(self.vq.as_ptr()) }
    }

    /// Notifies the device of new buffers.
    pub(crate) fn kick(&self) {
        // SAFETY: `vq` is valid (type invariant).
        unsafe { freehint_vq_kick(self.vq.as_ptr()) };
    }

    /// Takes one used buffer back, `None` if there is none.
    fn get_buf(&self) -> Option<NonNull<c_void>> {
        let mut len = 0;
        // SAFETY: `vq` is valid (type invariant).
        NonNull::new(unsafe { freehint_vq_get_buf(self.vq.as_ptr(), &mut len) })
    }

    /// Sends the first `len` bytes of `buf` as one device-readable buffer and
    /// sleeps until the device returns it (as Linux's `tell_host`). The
    /// queue must be otherwise idle (the caller's lock guarantees it).
    pub(crate) fn send_and_wait<const N: usize>(&self, buf: &DmaBuf<N>, len: usize) -> Result {
        let len = len.min(N);
        // SAFETY: `vq` is valid; `buf` is kmalloc memory (direct-mapped, as
        // the ring's address translation needs) and stays borrowed, so
        // alive and unchanged, until the device returned it below.
        kernel::error::to_result(unsafe {
            freehint_vq_add_outbuf(
                self.vq.as_ptr(),
                buf.as_ptr().cast(),
                len as c_uint,
                buf.as_ptr().cast_mut().cast(),
            )
        })?;
        self.kick();
        let mut used = 0;
        // SAFETY: `vb` and `vq` are valid (type invariant). The queue is idle
        // apart from this buffer, so the buffer returned is ours.
        unsafe { freehint_vq_wait_buf(self.vb.as_ptr(), self.vq.as_ptr(), &mut used) };
        Ok(())
    }

    /// Sleeps until the device returns a buffer, at most `ms` milliseconds.
    fn wait_buf(&self, ms: u32) -> Option<NonNull<c_void>> {
        self.wait_buf_len(ms).map(|(t, _)| t)
    }

    /// As [`Self::wait_buf`], with the used length the device reported.
    fn wait_buf_len(&self, ms: u32) -> Option<(NonNull<c_void>, u32)> {
        let mut len = 0;
        // SAFETY: `vb` and `vq` are valid (type invariant).
        let t = NonNull::new(unsafe { freehint_vq_wait_buf_timeout(self.vb.as_ptr(), self.vq.as_ptr(), &mut len, ms) })?;
        Some((t, len))
    }
}

/// A small kmalloc'd buffer the driver lends to the device.
pub(crate) struct DmaBuf<const N: usize>(KBox<[u8; N]>);

impl<const N: usize> DmaBuf<N> {
    /// A zeroed buffer.
    pub(crate) fn new() -> Result<Self> {
        Ok(Self(KBox::new([0u8; N], GFP_KERNEL)?))
    }

    /// The bytes (only to be written while the device does not hold them:
    /// the owners below guarantee that with `&mut`).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8; N] {
        &mut self.0
    }

    fn as_ptr(&self) -> *const u8 {
        self.0.as_ptr()
    }
}

/// The stats virtqueue and the buffer it keeps lent to the device.
///
/// Contract: the owner calls [`Device::reset_and_del_vqs`] before dropping
/// it, so the device never reads a freed buffer.
pub(crate) struct StatsQueue {
    vq: Virtqueue,
    buf: DmaBuf<{ STATS_BUF_BYTES }>,
    posted: bool,
}

/// Bytes of the stats buffer: one entry per stat tag Linux 6.12 knows.
pub(crate) const STATS_BUF_BYTES: usize =
    crate::abi::VIRTIO_BALLOON_S_NR * crate::abi::VIRTIO_BALLOON_STAT_SIZE;

impl StatsQueue {
    /// Wraps the stats queue.
    pub(crate) fn new(vq: Virtqueue) -> Result<Self> {
        Ok(Self {
            vq,
            buf: DmaBuf::new()?,
            posted: false,
        })
    }

    /// Takes the buffer back if the device returned it (it does so to ask
    /// for fresh statistics). Returns whether the driver now holds it.
    pub(crate) fn take_back(&mut self) -> bool {
        while self.vq.get_buf().is_some() {
            self.posted = false;
        }
        !self.posted
    }

    /// Fills the buffer with `fill` (which returns the bytes used) and lends
    /// it to the device. `EBUSY` if the device still holds it.
    pub(crate) fn post(&mut self, fill: impl FnOnce(&mut [u8; STATS_BUF_BYTES]) -> usize) -> Result {
        if self.posted {
            return Err(EBUSY);
        }
        let len = fill(self.buf.bytes_mut()).min(STATS_BUF_BYTES);
        // SAFETY: `vq` is valid (invariant of `Virtqueue`); the buffer is
        // kmalloc memory owned by `self`, not written again until the device
        // returned it (`posted`), and not freed before the device is reset
        // (contract of this type).
        kernel::error::to_result(unsafe {
            freehint_vq_add_outbuf(
                self.vq.vq.as_ptr(),
                self.buf.as_ptr().cast(),
                len as c_uint,
                self.buf.as_ptr().cast_mut().cast(),
            )
        })?;
        self.posted = true;
        self.vq.kick();
        Ok(())
    }
}

/// The free page virtqueue (standard hinting) with its command buffers.
///
/// Tracks the buffers the device holds (`in_flight`), so the command-id
/// buffer is rewritten only while the device holds nothing.
///
/// Contract: the owner calls [`Device::reset_and_del_vqs`] before dropping
/// it, so the device never reads a freed buffer.
pub(crate) struct HintQueue {
    vq: Virtqueue,
    cmd: DmaBuf<4>,
    stop: DmaBuf<4>,
    in_flight: u32,
    /// Bitmap protocol buffers (only with FREE_PAGE_BITMAP).
    bm: Option<BitmapBufs>,
}

/// Buffers of the bitmap hint protocol. Like `cmd`, each is written only
/// while the device holds no buffer of the queue (`in_flight == 0`).
struct BitmapBufs {
    msg: DmaBuf<{ crate::bitmap_hint::MSG_HEADER_SIZE }>,
    reply: DmaBuf<{ crate::bitmap_hint::LAYOUT_REPLY_MAX }>,
    /// Chunk payload, [`CHUNK_BYTES`] bytes of kmalloc memory.
    chunk: KVec<u8>,
    /// Used length of the last layout reply.
    reply_len: usize,
}

/// Payload bytes per bitmap chunk: 64 KiB = 2^19 bits = 2 GiB of RAM.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

impl HintQueue {
    /// Wraps the free page queue (its ring must hold at least 2 buffers).
    pub(crate) fn new(vq: Virtqueue) -> Result<Self> {
        if vq.size() < 2 {
            return Err(ENOSPC);
        }
        // The STOP buffer never changes: 0 in little endian.
        Ok(Self {
            vq,
            cmd: DmaBuf::new()?,
            stop: DmaBuf::new()?,
            in_flight: 0,
            bm: None,
        })
    }

    /// Allocates the bitmap protocol's buffers.
    pub(crate) fn enable_bitmap(&mut self) -> Result {
        self.bm = Some(BitmapBufs {
            msg: DmaBuf::new()?,
            reply: DmaBuf::new()?,
            chunk: KVec::from_elem(0u8, CHUNK_BYTES, GFP_KERNEL)?,
            reply_len: 0,
        });
        Ok(())
    }

    /// Waits at most `ms` for the one buffer chain the device holds (bitmap
    /// messages are sent one at a time) and records its used length.
    /// Returns whether the queue is idle now.
    pub(crate) fn wait_idle_once(&mut self, ms: u32) -> bool {
        if self.in_flight == 0 {
            return true;
        }
        if let Some((_, len)) = self.vq.wait_buf_len(ms) {
            self.in_flight = self.in_flight.saturating_sub(1);
            if let Some(bm) = self.bm.as_mut() {
                bm.reply_len = len as usize;
            }
            self.reclaim();
        }
        self.in_flight == 0
    }

    fn bm_idle(&mut self) -> Result<&mut BitmapBufs> {
        self.reclaim();
        if self.in_flight != 0 {
            return Err(EBUSY);
        }
        self.bm.as_mut().ok_or(EINVAL)
    }

    /// Sends a LAYOUT_QUERY header with a writable reply buffer in one chain.
    pub(crate) fn send_layout_query(&mut self, hdr: &[u8]) -> Result {
        let bm = self.bm_idle()?;
        let n = hdr.len().min(bm.msg.bytes_mut().len());
        bm.msg.bytes_mut()[..n].copy_from_slice(&hdr[..n]);
        bm.reply.bytes_mut().fill(0);
        bm.reply_len = 0;
        let (msg, reply) = (bm.msg.as_ptr(), bm.reply.as_ptr());
        // SAFETY: `vq` is valid (invariant of `Virtqueue`); both buffers are
        // kmalloc memory owned by `self`, written only while the device holds
        // none of them (`bm_idle`), freed only after the device reset
        // (contract of this type). The device writes at most the reply
        // buffer's length into it.
        kernel::error::to_result(unsafe {
            freehint_vq_add_out_in(
                self.vq.vq.as_ptr(),
                msg.cast(),
                n as c_uint,
                reply.cast_mut().cast(),
                crate::bitmap_hint::LAYOUT_REPLY_MAX as c_uint,
                msg.cast_mut().cast(),
            )
        })?;
        self.in_flight += 1;
        self.vq.kick();
        Ok(())
    }

    /// The layout reply of the last query, once the device returned it
    /// (empty while it still holds the buffers).
    pub(crate) fn layout_reply(&self) -> &[u8] {
        match self.bm.as_ref() {
            Some(bm) if self.in_flight == 0 => {
                let n = bm.reply_len.min(crate::bitmap_hint::LAYOUT_REPLY_MAX);
                &bm.reply.0[..n]
            }
            _ => &[],
        }
    }

    /// Sends a message header alone (ROUND_END) or followed by `payload`
    /// (CHUNK, at most [`CHUNK_BYTES`]) in one device-readable chain.
    pub(crate) fn send_message(&mut self, hdr: &[u8], payload: &[u8]) -> Result {
        if payload.len() > CHUNK_BYTES {
            return Err(EINVAL);
        }
        let bm = self.bm_idle()?;
        let n = hdr.len().min(bm.msg.bytes_mut().len());
        bm.msg.bytes_mut()[..n].copy_from_slice(&hdr[..n]);
        bm.chunk[..payload.len()].copy_from_slice(payload);
        let (msg, chunk) = (bm.msg.as_ptr(), bm.chunk.as_ptr());
        // SAFETY: as in `send_layout_query`; the device only reads.
        kernel::error::to_result(unsafe {
            if payload.is_empty() {
                freehint_vq_add_outbuf(self.vq.vq.as_ptr(), msg.cast(), n as c_uint, msg.cast_mut().cast())
            } else {
                freehint_vq_add_out2(
                    self.vq.vq.as_ptr(),
                    msg.cast(),
                    n as c_uint,
                    chunk.cast(),
                    payload.len() as c_uint,
                    msg.cast_mut().cast(),
                )
            }
        })?;
        self.in_flight += 1;
        self.vq.kick();
        Ok(())
    }

    /// Ring size.
    pub(crate) fn ring_size(&self) -> u32 {
        self.vq.size()
    }

    /// Buffers the device holds.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Free descriptors.
    pub(crate) fn free_slots(&self) -> u32 {
        self.vq.num_free()
    }

    /// Takes back every used buffer; returns how many.
    pub(crate) fn reclaim(&mut self) -> u32 {
        let mut n = 0;
        while self.vq.get_buf().is_some() {
            n += 1;
        }
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    /// Waits at most `ms` for the device to return at least one buffer,
    /// then takes back every used one. Returns how many came back.
    pub(crate) fn wait_used(&mut self, ms: u32) -> u32 {
        let n = self.reclaim();
        if n > 0 || self.in_flight == 0 {
            return n;
        }
        match self.vq.wait_buf(ms) {
            Some(_) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                1 + self.reclaim()
            }
            None => 0,
        }
    }

    /// Notifies the device.
    pub(crate) fn kick(&self) {
        self.vq.kick();
    }

    /// Sends `id` (le32 outbuf): the start of a hint round. Only while the
    /// device holds no buffer (`EBUSY` otherwise), so the buffer is never
    /// rewritten under the device.
    pub(crate) fn send_cmd_id(&mut self, id: u32) -> Result {
        self.reclaim();
        if self.in_flight != 0 {
            return Err(EBUSY);
        }
        *self.cmd.bytes_mut() = id.to_le_bytes();
        self.add_out(false)
    }

    /// Sends STOP (le32 0 outbuf): the end of a hint round.
    pub(crate) fn send_stop(&mut self) -> Result {
        self.add_out(true)
    }

    fn add_out(&mut self, stop: bool) -> Result {
        let buf = if stop { &self.stop } else { &self.cmd };
        // SAFETY: `vq` is valid (invariant of `Virtqueue`); the buffer is
        // kmalloc memory owned by `self`. `stop` is never written; `cmd` is
        // written only when `in_flight == 0` (send_cmd_id). Neither is freed
        // before the device is reset (contract of this type).
        kernel::error::to_result(unsafe {
            freehint_vq_add_outbuf(self.vq.vq.as_ptr(), buf.as_ptr().cast(), 4, buf.as_ptr().cast_mut().cast())
        })?;
        self.in_flight += 1;
        self.vq.kick();
        Ok(())
    }

    /// Adds the free range `[pfn, pfn + pages)` as one device-writable
    /// buffer (addr = pfn << 12, len = pages << 12, at most `u32::MAX`
    /// bytes). Not kicked.
    pub(crate) fn add_range(&mut self, pfn: u64, pages: u64) -> Result {
        let len = pages
            .checked_mul(4096)
            .filter(|l| *l > 0 && *l <= u64::from(u32::MAX))
            .ok_or(EINVAL)?;
        let pfn = c_ulong::try_from(pfn).map_err(|_| EINVAL)?;
        // SAFETY: `vq` is valid (invariant of `Virtqueue`). The buffer names
        // guest memory the driver does not own: the device only records the
        // range (QEMU completes it with length 0) and, as the host, could
        // access any guest memory anyway, so lending it grants nothing. The
        // C side turns the pfn into a page only if `pfn_valid` (always true
        // for a pfn found on a free list). The token is any non-null pointer
        // (nothing is done with it).
        kernel::error::to_result(unsafe {
            freehint_vq_add_inbuf_pfn(self.vq.vq.as_ptr(), pfn, len as c_uint, self.stop.as_ptr().cast_mut().cast())
        })?;
        self.in_flight += 1;
        Ok(())
    }
}

/// One page held by the balloon; freed when dropped.
///
/// # Invariants
///
/// `page` was allocated by `freehint_balloon_page_alloc` (order 0) and is
/// owned by this value.
pub(crate) struct BalloonPage {
    page: NonNull<c_void>,
}

// SAFETY: a page the driver owns may be handed between CPUs.
unsafe impl Send for BalloonPage {}

impl BalloonPage {
    /// Allocates a page for the balloon (no retry, no warning, no reserves).
    pub(crate) fn alloc() -> Option<Self> {
        // SAFETY: plain page allocation; may sleep (process context).
        let page = NonNull::new(unsafe { freehint_balloon_page_alloc() })?;
        // INVARIANT: just allocated, owned by us.
        Some(Self { page })
    }

    /// Its pfn in 4 KiB units as the balloon ABI carries it (le32); `None`
    /// if it does not fit 32 bits.
    pub(crate) fn pfn32(&self) -> Option<u32> {
        // SAFETY: `page` is a valid page (type invariant).
        let pfn = unsafe { freehint_vb_page_to_pfn(self.page.as_ptr()) };
        u32::try_from(pfn).ok()
    }

    /// Adds `count` to the managed page count of the page's zone (Linux
    /// takes inflated pages out of the totals unless DEFLATE_ON_OOM).
    pub(crate) fn adjust_managed(&self, count: isize) {
        // SAFETY: `page` is a valid page (type invariant).
        unsafe { freehint_adjust_managed_page_count(self.page.as_ptr(), count) };
    }
}

impl Drop for BalloonPage {
    fn drop(&mut self) {
        // SAFETY: the page is owned by us (type invariant) and freed once.
        unsafe { freehint_balloon_page_free(self.page.as_ptr()) };
    }
}

/// The pages in the balloon: an intrusive list through `page->lru` (no
/// allocation to add or remove a page, so it works in the OOM path).
///
/// # Invariants
///
/// `head` is the initialised list head in the device's `struct freehint_vb`
/// (valid as long as the [`Device`]; the driver state owning this list is
/// dropped before the C side frees it), this is its only handle, and every
/// entry is the `lru` of a page owned by the list (from a [`BalloonPage`]);
/// `len` counts them.
pub(crate) struct PageList {
    head: NonNull<c_void>,
    len: usize,
}

// SAFETY: the list is only reached through this handle, used under a lock.
unsafe impl Send for PageList {}

impl PageList {
    /// Pages on the list.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds a page.
    pub(crate) fn push(&mut self, page: BalloonPage) {
        let page = core::mem::ManuallyDrop::new(page);
        // SAFETY: `head` is valid (type invariant); the page is owned and its
        // `lru` unused; ownership moves to the list (not freed: ManuallyDrop).
        unsafe { freehint_page_list_add(self.head.as_ptr(), page.page.as_ptr()) };
        self.len += 1;
    }

    /// Removes a page.
    pub(crate) fn pop(&mut self) -> Option<BalloonPage> {
        // SAFETY: `head` is valid (type invariant).
        let page = NonNull::new(unsafe { freehint_page_list_pop(self.head.as_ptr()) })?;
        self.len = self.len.saturating_sub(1);
        // INVARIANT: the page came from a `BalloonPage` pushed above and is
        // unlinked now, so ownership returns to the new value.
        Some(BalloonPage { page })
    }
}

impl Drop for PageList {
    fn drop(&mut self) {
        // Frees whatever is left (teardown deflates everything first).
        while self.pop().is_some() {}
    }
}

/// Removes and returns the last element of `v` (7.3 has `KVec::pop`, 6.12
/// only `set_len`).
#[cfg(freehint_kernel_7_3)]
pub(crate) fn vec_pop<T>(v: &mut KVec<T>) -> Option<T> {
    v.pop()
}

/// Removes and returns the last element of `v`.
#[cfg(not(freehint_kernel_7_3))]
pub(crate) fn vec_pop<T>(v: &mut KVec<T>) -> Option<T> {
    let len = v.len();
    if len == 0 {
        return None;
    }
    // SAFETY: `len - 1 < len`, so the element is initialised; the length is
    // shrunk right after, so it is moved out exactly once.
    let item = unsafe { core::ptr::read(v.as_ptr().add(len - 1)) };
    // SAFETY: `len - 1 <= len`, and the element beyond is moved out above.
    unsafe { v.set_len(len - 1) };
    Some(item)
}

/// Memory figures for the stats queue (mirrors `struct freehint_mem_stats`).
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct MemStats {
    pub(crate) free_bytes: u64,
    pub(crate) total_bytes: u64,
    pub(crate) avail_bytes: u64,
    pub(crate) caches_bytes: u64,
    pub(crate) major_faults: u64,
    pub(crate) minor_faults: u64,
    pub(crate) swap_in_bytes: u64,
    pub(crate) swap_out_bytes: u64,
    pub(crate) oom_kills: u64,
    pub(crate) have_events: u8,
}

/// Current memory figures (event counters only with VM_EVENT_COUNTERS).
pub(crate) fn mem_stats() -> MemStats {
    let mut s = MemStats::default();
    // SAFETY: `s` is a valid, writable `struct freehint_mem_stats`.
    unsafe { freehint_mem_stats(&mut s) };
    s
}

/// How this kernel treats freed pages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Poisoning {
    /// `page_poison=1`: freed pages are filled with PAGE_POISON (0xaa).
    pub(crate) page_poisoning: bool,
    /// `init_on_free=1`: freed pages are zeroed.
    pub(crate) init_on_free: bool,
}

/// The kernel's page poisoning state.
pub(crate) fn poisoning() -> Poisoning {
    Poisoning {
        // SAFETY: reads static keys.
        page_poisoning: unsafe { freehint_page_poisoning_enabled() },
        // SAFETY: reads static keys.
        init_on_free: unsafe { freehint_want_init_on_free() },
    }
}

/// Sleeps `ms` milliseconds (process context: work items only).
pub(crate) fn msleep(ms: u32) {
    crate::clock::sleep_ms(ms);
}

// ---- entry points called by virtio_shim.c ----

/// Borrows the driver state behind a `vb->rust` pointer.
///
/// # Safety
///
/// `rust` must come from `freehint_rs_probe` (a leaked `Pin<KBox<Balloon>>`)
/// and `freehint_rs_remove` must not have started freeing it.
unsafe fn state<'a>(rust: *mut c_void) -> &'a Balloon {
    // SAFETY: by the function's safety contract.
    unsafe { &*rust.cast::<Balloon>() }
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_validate(vdev: *mut c_void) -> c_int {
    let Some(vdev) = NonNull::new(vdev) else {
        return EINVAL.to_errno();
    };
    // INVARIANT: called by the virtio core's validate with its device.
    crate::balloon::validate(&Validator { vdev });
    0
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_probe(vb: *mut c_void, vdev: *mut c_void) -> c_int {
    let (Some(vbp), Some(vdevp)) = (NonNull::new(vb), NonNull::new(vdev)) else {
        return EINVAL.to_errno();
    };
    // INVARIANT: `vb` and `vdev` come from the C probe, which frees `vb`
    // only after remove or after this returns an error.
    let b = match Balloon::new(Device::new(vbp, vdevp)) {
        Ok(b) => b,
        Err(e) => {
            // Nothing was lent to the device yet; undo find_vqs and the
            // hint workqueue with a fresh handle on the same device.
            let dev = Device::new(vbp, vdevp);
            dev.stop_and_cancel();
            dev.reset_and_del_vqs();
            return e.to_errno();
        }
    };
    // SAFETY: the state is never moved out of its box (it is only borrowed
    // through the raw pointer until `freehint_rs_remove` rebuilds the box).
    let raw = KBox::into_raw(unsafe { Pin::into_inner_unchecked(b) });
    // SAFETY: `vb` is valid; from here work items and callbacks may borrow
    // the state, which lives until `freehint_rs_remove`.
    unsafe { freehint_vb_set_rust(vb, raw.cast()) };
    // SAFETY: `raw` is the state just leaked.
    let st = unsafe { &*raw };
    match st.start() {
        Ok(()) => 0,
        Err(e) => {
            st.teardown();
            // SAFETY: `vb` is valid; no work can run any more (teardown
            // stopped and cancelled all of it).
            unsafe { freehint_vb_set_rust(vb, core::ptr::null_mut()) };
            // SAFETY: `raw` came from `KBox::into_raw` above and nothing
            // borrows it any more.
            drop(unsafe { KBox::from_raw(raw) });
            e.to_errno()
        }
    }
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_remove(rust: *mut c_void) {
    if rust.is_null() {
        return;
    }
    // SAFETY: `rust` is the state from probe; the virtio core disabled
    // config-change callbacks before calling remove.
    let st = unsafe { state(rust) };
    st.teardown();
    // SAFETY: teardown stopped every work item, the OOM notifier and the
    // device; nothing borrows the state any more. It was leaked in probe.
    drop(unsafe { KBox::from_raw(rust.cast::<Balloon>()) });
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_config_changed(rust: *mut c_void) {
    // SAFETY: called with `vb->rust` set, between probe and remove.
    unsafe { state(rust) }.config_changed();
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_size_work(rust: *mut c_void) {
    // SAFETY: work runs only while `vb->rust` is set; remove cancels it
    // before freeing the state.
    unsafe { state(rust) }.size_work();
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_stats_work(rust: *mut c_void) {
    // SAFETY: as `freehint_rs_size_work`.
    unsafe { state(rust) }.stats_work();
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_hint_work(rust: *mut c_void) {
    // SAFETY: as `freehint_rs_size_work`.
    unsafe { state(rust) }.hint_work();
}

#[no_mangle]
unsafe extern "C" fn freehint_rs_oom(rust: *mut c_void) -> c_ulong {
    // SAFETY: the notifier is unregistered in teardown before the state is
    // freed, and unregistering waits for running notifications.
    unsafe { state(rust) }.oom() as c_ulong
}
