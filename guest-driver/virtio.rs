// SPDX-License-Identifier: GPL-2.0

//! A small virtio abstraction (6.12's `kernel` crate has none).
//!
//! C side: `virtio_shim.c` (the `struct virtio_driver`, the per-device C
//! objects and one-line wrappers of static inlines). This module wraps it
//! once, after the pattern of `rust/kernel/net/phy.rs`:
//!
//! - [`Driver`]: what a virtio driver implements; [`Registration`] registers
//!   it, and `Adapter<T>` holds the `extern "C"` trampolines the C callbacks
//!   call (the only place where a driver state pointer is cast back);
//! - [`Device`] and [`Virtqueue`]: `#[repr(transparent)]` wrappers around the
//!   opaque C types, reached only through references, so a device cannot be
//!   passed where a queue is expected; [`Bound`] is the driver's handle on
//!   its device between probe and remove;
//! - [`Queue`]: a virtqueue together with the driver memory it lends to the
//!   device, with the one call that adds buffers ([`Queue::add`]), where the
//!   buffer lifetime argument is made once;
//! - [`DmaBuf`] and [`Chain`]: that memory, and one buffer chain.
//!
//! Driver logic (`balloon.rs`, `hint.rs`) uses these types without
//! `unsafe` and without `bindings::`.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::pin::Pin;
use core::ptr::NonNull;
use kernel::ffi::{c_char, c_int, c_uint, c_ulong};
use kernel::prelude::*;
use kernel::types::Opaque;

use crate::layout::Pfn;

/// The C types behind the handles, opaque to Rust (no bindings exist for
/// them). Distinct types, so one cannot be passed for the other.
mod ffi {
    use core::marker::{PhantomData, PhantomPinned};

    /// `struct virtio_device`.
    #[repr(C)]
    pub(super) struct virtio_device {
        _opaque: [u8; 0],
        _pin: PhantomData<(*mut u8, PhantomPinned)>,
    }

    /// `struct virtqueue`.
    #[repr(C)]
    pub(super) struct virtqueue {
        _opaque: [u8; 0],
        _pin: PhantomData<(*mut u8, PhantomPinned)>,
    }
}

use ffi::{virtio_device, virtqueue};

/// `struct freehint_virtio_ops` (virtio_shim.h): the driver's callbacks.
#[repr(C)]
struct Ops {
    validate: unsafe extern "C" fn(*mut virtio_device) -> c_int,
    probe: unsafe extern "C" fn(*mut virtio_device) -> c_int,
    remove: unsafe extern "C" fn(*mut virtio_device, *mut c_void),
    config_changed: unsafe extern "C" fn(*mut c_void),
    work: unsafe extern "C" fn(*mut c_void, c_uint),
    oom: unsafe extern "C" fn(*mut c_void) -> c_ulong,
}

/// `struct freehint_buf` (virtio_shim.h): one buffer of a chain.
#[repr(C)]
struct RawBuf {
    addr: *const c_void,
    pfn: c_ulong,
    len: c_ulong,
}

// The same layouts virtio_shim.c asserts for the C structures.
const _: () = {
    use core::mem::{offset_of, size_of};
    const WORD: usize = size_of::<*const c_void>();
    assert!(size_of::<Ops>() == 6 * WORD);
    assert!(offset_of!(Ops, validate) == 0);
    assert!(offset_of!(Ops, probe) == WORD);
    assert!(offset_of!(Ops, remove) == 2 * WORD);
    assert!(offset_of!(Ops, config_changed) == 3 * WORD);
    assert!(offset_of!(Ops, work) == 4 * WORD);
    assert!(offset_of!(Ops, oom) == 5 * WORD);
    assert!(size_of::<RawBuf>() == 3 * size_of::<c_ulong>());
    assert!(offset_of!(RawBuf, addr) == 0);
    assert!(offset_of!(RawBuf, pfn) == size_of::<c_ulong>());
    assert!(offset_of!(RawBuf, len) == 2 * size_of::<c_ulong>());
};

extern "C" {
    fn freehint_virtio_register(ops: *const Ops, features: *const c_uint, nr: c_uint) -> c_int;
    fn freehint_virtio_unregister();
    fn freehint_set_drvdata(vdev: *mut virtio_device, rust: *mut c_void);
    fn freehint_queue_work(vdev: *mut virtio_device, which: c_uint) -> bool;
    fn freehint_alloc_hint_wq(vdev: *mut virtio_device) -> c_int;
    fn freehint_stop_and_cancel(vdev: *mut virtio_device);
    fn freehint_register_oom(vdev: *mut virtio_device) -> c_int;
    fn freehint_unregister_oom(vdev: *mut virtio_device);
    fn freehint_vdev_pages(vdev: *mut virtio_device) -> *mut kernel::bindings::list_head;
    fn freehint_vq_wait_buf(vq: *mut virtqueue, len: *mut c_uint, ms: c_uint) -> *mut c_void;
    fn freehint_has_feature(vdev: *const virtio_device, bit: c_uint) -> bool;
    fn freehint_clear_feature(vdev: *mut virtio_device, bit: c_uint);
    fn freehint_config_read_le32(vdev: *mut virtio_device, offset: c_uint) -> u32;
    fn freehint_config_write_le32(vdev: *mut virtio_device, offset: c_uint, v: u32);
    fn freehint_device_ready(vdev: *mut virtio_device);
    fn freehint_reset_and_del_vqs(vdev: *mut virtio_device);
    fn freehint_vqs_deleted(vdev: *const virtio_device) -> bool;
    fn freehint_find_vqs(
        vdev: *mut virtio_device,
        nvqs: c_uint,
        vqs: *mut *mut virtqueue,
        names: *const *const c_char,
        cbs: *const u8,
    ) -> c_int;
    fn freehint_vq_add_bufs(vq: *mut virtqueue, bufs: *const RawBuf, out: c_uint, inb: c_uint) -> c_int;
    fn freehint_vq_kick(vq: *mut virtqueue) -> bool;
    fn freehint_vq_get_buf(vq: *mut virtqueue, len: *mut c_uint) -> *mut c_void;
    fn freehint_vq_num_free(vq: *const virtqueue) -> c_uint;
    fn freehint_vq_size(vq: *const virtqueue) -> c_uint;
}

/// Transport feature: indirect descriptors.
pub(crate) const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Transport feature: the device sits behind an IOMMU / platform DMA.
pub(crate) const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// Work items of a device (same numbering as `enum freehint_work` in C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// Inflate/deflate towards the host's target.
    Size = 0,
    /// Refill the stats queue (queued by the stats queue's callback).
    Stats = 1,
    /// Free page hinting (runs on the device's own workqueue).
    Hint = 2,
}

impl Work {
    fn from_raw(which: c_uint) -> Option<Self> {
        match which {
            0 => Some(Work::Size),
            1 => Some(Work::Stats),
            2 => Some(Work::Hint),
            _ => None,
        }
    }
}

/// Callback a virtqueue gets (same numbering as `enum freehint_cb` in C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Callback {
    /// Wakes the device's wait queue (used buffers are back).
    Ack = 1,
    /// Queues [`Work::Stats`] (the host asks for fresh statistics).
    Stats = 2,
}

/// A virtio driver.
///
/// The virtio core calls `validate`, then `probe` for each device; the
/// adapter sets the returned state as the device's driver data and calls
/// [`Driver::start`]. Work items, config changes and the OOM notifier reach
/// the state through the other methods until removal, which calls
/// [`Driver::teardown`], then resets the device (it lets go of every
/// buffer), deletes its queues and drops the state.
pub(crate) trait Driver: Send + Sync + Sized + 'static {
    /// Feature bits the driver knows (the virtio core negotiates from them).
    const FEATURES: &'static [u32];

    /// Feature negotiation, before the features are final.
    fn validate(dev: &Validator<'_>);

    /// Sets up the state of a device that is not ready yet. Nothing may be
    /// lent to the device here.
    fn probe(dev: Bound) -> Result<Pin<KBox<Self>>>;

    /// Starts the device (lends buffers, sets DRIVER_OK). On error the
    /// adapter tears it down as on removal.
    fn start(&self) -> Result;

    /// Stops everything that uses the device: after it returns no work item,
    /// notifier or queue operation runs. Called once.
    fn teardown(&self);

    /// Config space changed (interrupt context).
    fn config_changed(&self);

    /// A work item runs (process context).
    fn work(&self, w: Work);

    /// The OOM notifier: returns the pages given back.
    fn oom(&self) -> usize;
}

/// The registered virtio driver `T`; unregistered (which removes every
/// bound device first) when dropped.
///
/// # Invariants
///
/// The driver was registered with `Adapter::<T>::OPS` and `T::FEATURES`.
pub(crate) struct Registration<T: Driver>(PhantomData<T>);

impl<T: Driver> Registration<T> {
    /// Registers the driver with the virtio bus. Harmless without a
    /// matching device: the driver just stays unbound.
    pub(crate) fn new() -> Result<Self> {
        let ops: &'static Ops = &Adapter::<T>::OPS;
        let nr = c_uint::try_from(T::FEATURES.len()).map_err(|_| EINVAL)?;
        // SAFETY: `ops` and the feature table are statics that outlive the
        // registration (undone in `Drop` before the module text goes away);
        // the callbacks follow the contract of `struct freehint_virtio_ops`.
        kernel::error::to_result(unsafe { freehint_virtio_register(ops, T::FEATURES.as_ptr(), nr) })?;
        // INVARIANT: registered just above.
        Ok(Self(PhantomData))
    }
}

impl<T: Driver> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: the driver was registered in `new` (type invariant).
        unsafe { freehint_virtio_unregister() };
    }
}

/// The `extern "C"` callbacks of driver `T`.
struct Adapter<T: Driver>(PhantomData<T>);

impl<T: Driver> Adapter<T> {
    const OPS: Ops = Ops {
        validate: Self::validate_callback,
        probe: Self::probe_callback,
        remove: Self::remove_callback,
        config_changed: Self::config_changed_callback,
        work: Self::work_callback,
        oom: Self::oom_callback,
    };

    /// Borrows the state behind a driver data pointer.
    ///
    /// # Safety
    ///
    /// `rust` must be the driver data `probe_callback` set (a leaked
    /// `Pin<KBox<T>>`), and `remove_callback` must not have dropped it yet.
    unsafe fn state<'a>(rust: *mut c_void) -> &'a T {
        // SAFETY: by the function's safety contract.
        unsafe { &*rust.cast::<T>() }
    }

    /// # Safety
    ///
    /// Called by the virtio core's `validate` with its device.
    unsafe extern "C" fn validate_callback(vdev: *mut virtio_device) -> c_int {
        // SAFETY: the virtio core passes a valid device for the call.
        let dev = unsafe { Device::from_raw(vdev) };
        T::validate(&Validator { dev });
        0
    }

    /// # Safety
    ///
    /// Called by the C probe with a device whose per-device C objects are
    /// initialised; they stay valid until `remove_callback` returned (or
    /// until this returns an error).
    unsafe extern "C" fn probe_callback(vdev: *mut virtio_device) -> c_int {
        let Some(ptr) = NonNull::new(vdev.cast::<Device>()) else {
            return EINVAL.to_errno();
        };
        // INVARIANT: valid until remove returns, by this function's contract;
        // the state that holds it is dropped in remove (or below).
        let bound = Bound {
            dev: ptr,
            pages_taken: false,
        };
        // SAFETY: as above.
        let dev = unsafe { Device::from_raw(vdev) };
        let state = match T::probe(bound) {
            Ok(s) => s,
            Err(e) => {
                // Nothing was lent to the device: stop the work items the
                // driver may have created, drop its queues.
                dev.stop_and_cancel();
                dev.reset_and_del_vqs();
                return e.to_errno();
            }
        };
        // SAFETY: the state is never moved out of its box: it is only
        // borrowed through the raw pointer until `remove_callback` (or the
        // error path below) rebuilds the box.
        let raw = KBox::into_raw(unsafe { Pin::into_inner_unchecked(state) });
        // SAFETY: `vdev` is valid; from here work items and callbacks may
        // borrow the state, which lives until `remove_callback`.
        unsafe { freehint_set_drvdata(vdev, raw.cast()) };
        // SAFETY: `raw` is the state just leaked.
        let st = unsafe { &*raw };
        match st.start() {
            Ok(()) => 0,
            Err(e) => {
                st.teardown();
                dev.reset_and_del_vqs();
                // SAFETY: `vdev` is valid; no work can run any more
                // (teardown stopped all of it).
                unsafe { freehint_set_drvdata(vdev, core::ptr::null_mut()) };
                // SAFETY: `raw` came from `KBox::into_raw` above and nothing
                // borrows it any more.
                drop(unsafe { KBox::from_raw(raw) });
                e.to_errno()
            }
        }
    }

    /// # Safety
    ///
    /// Called by the C remove with the device and its driver data, once.
    unsafe extern "C" fn remove_callback(vdev: *mut virtio_device, rust: *mut c_void) {
        // SAFETY: the device is valid during remove.
        let dev = unsafe { Device::from_raw(vdev) };
        if rust.is_null() {
            return;
        }
        // SAFETY: `rust` is the state from probe; the virtio core disabled
        // config-change callbacks before calling remove.
        unsafe { Self::state(rust) }.teardown();
        // After teardown nothing uses the queues: reset (the device lets go
        // of every buffer) and delete them, then free the state.
        dev.reset_and_del_vqs();
        // SAFETY: teardown stopped every work item, the OOM notifier and
        // every queue user; nothing borrows the state any more. It was
        // leaked in probe.
        drop(unsafe { KBox::from_raw(rust.cast::<T>()) });
    }

    /// # Safety
    ///
    /// Called with the driver data set, between probe and remove.
    unsafe extern "C" fn config_changed_callback(rust: *mut c_void) {
        // SAFETY: by the function's safety contract.
        unsafe { Self::state(rust) }.config_changed();
    }

    /// # Safety
    ///
    /// Called by a work item with the driver data set; removal cancels every
    /// work item before the state is freed.
    unsafe extern "C" fn work_callback(rust: *mut c_void, which: c_uint) {
        if let Some(w) = Work::from_raw(which) {
            // SAFETY: by the function's safety contract.
            unsafe { Self::state(rust) }.work(w);
        }
    }

    /// # Safety
    ///
    /// Called by the OOM notifier with the driver data set; teardown
    /// unregisters it (waiting for running calls) before the state is freed.
    unsafe extern "C" fn oom_callback(rust: *mut c_void) -> c_ulong {
        // SAFETY: by the function's safety contract.
        unsafe { Self::state(rust) }.oom() as c_ulong
    }
}

/// A virtio device.
///
/// # Invariants
///
/// A `&Device` is only made from a `struct virtio_device` that freehint's C
/// probe set up (its per-device C objects exist) and that is valid for the
/// reference's lifetime.
#[repr(transparent)]
pub(crate) struct Device(Opaque<virtio_device>);

impl Device {
    /// # Safety
    ///
    /// For `'a`, `ptr` must be a valid `struct virtio_device` that went
    /// through freehint's C probe (or is in `validate`, where only the
    /// feature calls are made).
    unsafe fn from_raw<'a>(ptr: *mut virtio_device) -> &'a Self {
        // CAST: `Self` is a `repr(transparent)` wrapper around `virtio_device`.
        // SAFETY: by the function's safety contract.
        unsafe { &*ptr.cast::<Self>() }
    }

    fn as_raw(&self) -> *mut virtio_device {
        self.0.get()
    }

    /// Whether feature `bit` was negotiated (offered, during `validate`).
    pub(crate) fn has_feature(&self, bit: u32) -> bool {
        // SAFETY: the device is valid (type invariant).
        unsafe { freehint_has_feature(self.as_raw(), bit) }
    }

    /// Reads a little-endian 32-bit config field at `offset`.
    pub(crate) fn config_read_le32(&self, offset: usize) -> u32 {
        // SAFETY: the device is valid (type invariant); the transport
        // bounds-checks config accesses.
        unsafe { freehint_config_read_le32(self.as_raw(), offset as c_uint) }
    }

    /// Writes a little-endian 32-bit config field at `offset`.
    pub(crate) fn config_write_le32(&self, offset: usize, v: u32) {
        // SAFETY: as `config_read_le32`.
        unsafe { freehint_config_write_le32(self.as_raw(), offset as c_uint, v) };
    }

    /// Sets DRIVER_OK.
    pub(crate) fn ready(&self) {
        // SAFETY: the device is valid (type invariant).
        unsafe { freehint_device_ready(self.as_raw()) };
    }

    /// Queues a work item; `false` if it was already queued or removal began.
    pub(crate) fn queue_work(&self, w: Work) -> bool {
        // SAFETY: the device is valid and its work items were initialised
        // in the C probe (type invariant).
        unsafe { freehint_queue_work(self.as_raw(), w as c_uint) }
    }

    /// Creates the workqueue [`Work::Hint`] runs on.
    pub(crate) fn alloc_hint_wq(&self) -> Result {
        // SAFETY: the device is valid (type invariant).
        kernel::error::to_result(unsafe { freehint_alloc_hint_wq(self.as_raw()) })
    }

    /// Stops queueing work and waits until no work item runs or is queued;
    /// destroys the hint workqueue. Idempotent.
    pub(crate) fn stop_and_cancel(&self) {
        // SAFETY: the device is valid (type invariant).
        unsafe { freehint_stop_and_cancel(self.as_raw()) };
    }

    /// Registers the OOM notifier ([`Driver::oom`]).
    pub(crate) fn register_oom(&self) -> Result {
        // SAFETY: the device is valid (type invariant); the notifier calls
        // the driver only while its driver data is set.
        kernel::error::to_result(unsafe { freehint_register_oom(self.as_raw()) })
    }

    /// Unregisters the OOM notifier; waits for running notifications. Only
    /// after a successful [`Device::register_oom`].
    pub(crate) fn unregister_oom(&self) {
        // SAFETY: the device is valid (type invariant); the caller
        // registered the notifier.
        unsafe { freehint_unregister_oom(self.as_raw()) };
    }

    /// Finds the virtqueues `specs` (name, callback) in this order: the index
    /// of a queue is its position, so passing only the queues whose feature
    /// was negotiated gives the compacted numbering.
    pub(crate) fn find_vqs(&self, specs: &[(&'static CStr, Option<Callback>)]) -> Result<KVec<VqHandle>> {
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
        let mut vqs = [core::ptr::null_mut::<virtqueue>(); MAX];
        // SAFETY: the device is valid (type invariant); the arrays hold at
        // least `specs.len()` entries; names are static C strings.
        kernel::error::to_result(unsafe {
            freehint_find_vqs(self.as_raw(), specs.len() as c_uint, vqs.as_mut_ptr(), names.as_ptr(), cbs.as_ptr())
        })?;
        let mut out = KVec::with_capacity(specs.len(), GFP_KERNEL)?;
        for vq in vqs.iter().take(specs.len()) {
            let Some(vq) = NonNull::new(vq.cast::<Virtqueue>()) else {
                return Err(ENODEV);
            };
            // INVARIANT: `vq` was just created for this device and stays
            // valid until `reset_and_del_vqs`.
            out.push(VqHandle { vq, dev: NonNull::from(self) }, GFP_KERNEL)?;
        }
        Ok(out)
    }

    /// Resets the device (it lets go of every buffer) and deletes its
    /// virtqueues; afterwards every [`Queue`] of it refuses to touch its
    /// virtqueue. Only the adapter calls it, once the driver stopped using
    /// the queues (after [`Driver::teardown`], or when probe failed).
    fn reset_and_del_vqs(&self) {
        // SAFETY: the device is valid (type invariant). Queues check
        // `vqs_deleted` before every virtqueue call, and the adapter calls
        // this only when no queue operation runs.
        unsafe { freehint_reset_and_del_vqs(self.as_raw()) };
    }

    /// Whether [`Device::reset_and_del_vqs`] ran.
    fn vqs_deleted(&self) -> bool {
        // SAFETY: the device is valid (type invariant).
        unsafe { freehint_vqs_deleted(self.as_raw()) }
    }
}

/// A virtio device during `validate` (features not yet final).
pub(crate) struct Validator<'a> {
    dev: &'a Device,
}

impl Validator<'_> {
    /// Whether the device offers (and the driver table lists) `bit`.
    pub(crate) fn has(&self, bit: u32) -> bool {
        self.dev.has_feature(bit)
    }

    /// Drops `bit` from the features to be negotiated.
    pub(crate) fn clear(&self, bit: u32) {
        // SAFETY: the device is valid (invariant of `Device`); `validate` is
        // where the virtio core lets a driver change features.
        unsafe { freehint_clear_feature(self.dev.as_raw(), bit) };
    }
}

/// A driver's handle on its bound device.
///
/// # Invariants
///
/// `dev` went through freehint's C probe and stays valid until the C remove
/// returns; the adapter drops the driver state, which owns this handle, in
/// remove (or in probe, on failure). `pages_taken` is set once the device's
/// page list has an owner.
pub(crate) struct Bound {
    dev: NonNull<Device>,
    pages_taken: bool,
}

impl Bound {
    /// The list of balloon pages of this device (a list head in its C
    /// object); `None` after the first call: there is one owner.
    pub(crate) fn take_page_list(&mut self) -> Option<crate::mm::PageList> {
        if core::mem::replace(&mut self.pages_taken, true) {
            return None;
        }
        // SAFETY: the device is valid (type invariant) and went through the
        // C probe, which initialised the list head.
        let head = NonNull::new(unsafe { freehint_vdev_pages(self.as_raw()) })?;
        // SAFETY: the head is initialised and empty, outlives the driver
        // state that owns this handle (and so the list), and this is its
        // first and only owner (`pages_taken`).
        Some(unsafe { crate::mm::PageList::from_head(head) })
    }
}

// SAFETY: the virtio core, the work items and the notifier use the device
// from any CPU; every `Device` operation is one the C API allows
// concurrently (config access, queue_work) or one the driver serialises.
unsafe impl Send for Bound {}
// SAFETY: as above.
unsafe impl Sync for Bound {}

impl core::ops::Deref for Bound {
    type Target = Device;

    fn deref(&self) -> &Device {
        // SAFETY: valid while the handle exists (type invariant).
        unsafe { self.dev.as_ref() }
    }
}

/// A virtqueue.
///
/// # Invariants
///
/// A `&Virtqueue` is only made from a live `struct virtqueue` whose device
/// has not deleted its queues.
#[repr(transparent)]
pub(crate) struct Virtqueue(Opaque<virtqueue>);

impl Virtqueue {
    fn as_raw(&self) -> *mut virtqueue {
        self.0.get()
    }

    /// Ring size.
    fn size(&self) -> u32 {
        // SAFETY: the queue is live (type invariant).
        unsafe { freehint_vq_size(self.as_raw()) }
    }

    /// Free descriptors.
    fn num_free(&self) -> u32 {
        // SAFETY: the queue is live (type invariant).
        unsafe { freehint_vq_num_free(self.as_raw()) }
    }

    /// Notifies the device of new buffers.
    fn kick(&self) {
        // SAFETY: the queue is live (type invariant); callers serialise
        // operations on it (`Queue` methods take `&mut`).
        unsafe { freehint_vq_kick(self.as_raw()) };
    }

    /// Takes one used buffer back; its used length, `None` if there is none.
    fn get_buf(&self) -> Option<u32> {
        let mut len = 0;
        // SAFETY: as `kick`.
        let token = unsafe { freehint_vq_get_buf(self.as_raw(), &mut len) };
        (!token.is_null()).then_some(len)
    }

    /// Sleeps until the device returns a buffer, at most `ms` milliseconds
    /// (`u32::MAX`: no limit); its used length, `None` on timeout.
    fn wait_buf(&self, ms: u32) -> Option<u32> {
        let mut len = 0;
        // SAFETY: as `kick`; the wait queue belongs to the queue's device.
        let token = unsafe { freehint_vq_wait_buf(self.as_raw(), &mut len, ms) };
        (!token.is_null()).then_some(len)
    }
}

/// A virtqueue of a bound device, not yet tied to its buffers.
///
/// # Invariants
///
/// `vq` was created by `find_vqs` of `dev` and is valid until `dev`'s
/// `reset_and_del_vqs`; `dev` is valid as long as the driver state that
/// holds this handle (invariant of [`Bound`]).
pub(crate) struct VqHandle {
    vq: NonNull<Virtqueue>,
    dev: NonNull<Device>,
}

// SAFETY: the handle is only used through a `Queue`, whose methods take
// `&mut self`: operations on one queue are serialised, from any CPU.
unsafe impl Send for VqHandle {}

/// Driver memory lent to a device: kmalloc'd (linear-mapped, so the ring's
/// address translation works), written by the driver only while not lent.
pub(crate) struct DmaBuf(KVec<u8>);

impl DmaBuf {
    /// A zeroed buffer of `len` bytes.
    pub(crate) fn new(len: usize) -> Result<Self> {
        Ok(Self(KVec::from_elem(0u8, len, GFP_KERNEL)?))
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, to write (a [`Queue`] hands out `&mut` only while the
    /// device holds none of its buffers).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// One buffer of a [`Chain`].
#[derive(Clone, Copy)]
enum Seg<'a> {
    /// The first `len` bytes of a buffer.
    Mem(&'a DmaBuf, usize),
    /// Guest memory the driver does not own: `pages` pages from `pfn`.
    Free { pfn: Pfn, pages: u64 },
}

/// A buffer chain for [`Queue::add`]: device-readable buffers first, then
/// device-writable ones (at most two in all).
pub(crate) struct Chain<'a> {
    segs: [Option<Seg<'a>>; 2],
    out: usize,
    inb: usize,
    /// Too long, or readable after writable: `add` refuses it.
    bad: bool,
}

impl<'a> Chain<'a> {
    fn push(mut self, seg: Seg<'a>, writable: bool) -> Self {
        let n = self.out + self.inb;
        match self.segs.get_mut(n) {
            Some(slot) if !self.bad && (writable || self.inb == 0) => {
                *slot = Some(seg);
                if writable {
                    self.inb += 1;
                } else {
                    self.out += 1;
                }
            }
            _ => self.bad = true,
        }
        self
    }

    /// A chain [`Queue::add`] refuses (`EINVAL`): for a caller that finds
    /// nothing to lend.
    pub(crate) fn empty() -> Self {
        Self {
            segs: [None; 2],
            out: 0,
            inb: 0,
            bad: false,
        }
    }

    /// A chain starting with the first `len` bytes of `buf`, device-readable.
    pub(crate) fn read(buf: &'a DmaBuf, len: usize) -> Self {
        Self::empty().push(Seg::Mem(buf, len), false)
    }

    /// A chain of the free guest range `[pfn, pfn + pages)`, device-writable
    /// (the standard hint: the device only records the range).
    pub(crate) fn free_range(pfn: Pfn, pages: u64) -> Self {
        Self::empty().push(Seg::Free { pfn, pages }, true)
    }

    /// Adds the first `len` bytes of `buf`, device-readable.
    pub(crate) fn then_read(self, buf: &'a DmaBuf, len: usize) -> Self {
        self.push(Seg::Mem(buf, len), false)
    }

    /// Adds all of `buf`, device-writable.
    pub(crate) fn then_write(self, buf: &'a DmaBuf) -> Self {
        self.push(Seg::Mem(buf, buf.bytes().len()), true)
    }
}

/// A virtqueue with the driver memory `B` it lends to the device.
///
/// `add` lends parts of `B`; the device holds them until it returns them
/// (`reclaim`, `wait_*`) or is reset. `bufs_mut` hands out `B` for writing
/// only while the device holds none of them.
///
/// # Invariants
///
/// - `in_flight` counts the chains the device holds (added, not returned);
/// - while `in_flight > 0`, `bufs` is only reachable through `&self`;
/// - the virtqueue is touched only while its device has not deleted its
///   queues (checked before every call).
pub(crate) struct Queue<B> {
    vq: VqHandle,
    bufs: ManuallyDrop<B>,
    in_flight: u32,
}

impl<B> Queue<B> {
    /// Ties a virtqueue to the memory it will lend.
    pub(crate) fn new(vq: VqHandle, bufs: B) -> Self {
        Self {
            vq,
            bufs: ManuallyDrop::new(bufs),
            in_flight: 0,
        }
    }

    /// The virtqueue, `None` once the device deleted it.
    fn vq(&self) -> Option<&Virtqueue> {
        // SAFETY: the device outlives the queue (invariant of `VqHandle`).
        let dev = unsafe { self.vq.dev.as_ref() };
        if dev.vqs_deleted() {
            return None;
        }
        // SAFETY: not deleted (checked above), so live (invariant of
        // `VqHandle`); `Virtqueue` is `repr(transparent)` over it.
        Some(unsafe { self.vq.vq.as_ref() })
    }

    /// The one call that lends memory to the device: adds the chain `pick`
    /// builds from `B` (or from memory that is never freed). Not kicked.
    pub(crate) fn add(&mut self, pick: impl for<'b> FnOnce(&'b B) -> Chain<'b>) -> Result
    where
        B: 'static,
    {
        let vq = self.vq().ok_or(ENODEV)?;
        let chain = pick(&self.bufs);
        let n = chain.out + chain.inb;
        if chain.bad || n == 0 || n > chain.segs.len() {
            return Err(EINVAL);
        }
        let mut raw: [RawBuf; 2] = [const {
            RawBuf {
                addr: core::ptr::null(),
                pfn: 0,
                len: 0,
            }
        }; 2];
        for (i, seg) in chain.segs.iter().enumerate().take(n) {
            raw[i] = match seg.ok_or(EINVAL)? {
                Seg::Mem(buf, len) => RawBuf {
                    addr: buf.0.as_ptr().cast(),
                    pfn: 0,
                    len: len.min(buf.0.len()) as c_ulong,
                },
                Seg::Free { pfn, pages } => RawBuf {
                    addr: core::ptr::null(),
                    pfn: c_ulong::try_from(pfn.raw()).map_err(|_| EINVAL)?,
                    len: pages
                        .checked_mul(kernel::page::PAGE_SIZE as u64)
                        .filter(|l| *l > 0 && *l <= u64::from(u32::MAX))
                        .ok_or(EINVAL)? as c_ulong,
                },
            };
        }
        // SAFETY: the virtqueue is live (checked in `vq()`) and `&mut self`
        // serialises operations on it. The buffer lifetime argument, made
        // once for every caller:
        // - `Seg::Mem` buffers are `DmaBuf`s (kmalloc memory) borrowed from
        //   `self.bufs` (the closure's `&'b B`) or from memory that outlives
        //   every `'b` (`B: 'static`, so `'b` may be `'static`), i.e. is
        //   never freed. From here the device may read or write them until
        //   it returns the chain or is reset; `bufs_mut` gives out no
        //   `&mut B` while `in_flight > 0`, and `Drop` leaks `B` if the
        //   queue is dropped with chains out and the device not reset. So
        //   the memory stays allocated and unwritten by the driver for as
        //   long as the device may use it.
        // - `Seg::Free` names guest memory the driver does not own: the
        //   device only records the range (QEMU completes it with length 0)
        //   and, as the host, could access any guest memory anyway, so
        //   lending it grants nothing. The C side checks `pfn_valid`.
        kernel::error::to_result(unsafe {
            freehint_vq_add_bufs(vq.as_raw(), raw.as_ptr(), chain.out as c_uint, chain.inb as c_uint)
        })?;
        self.in_flight += 1;
        Ok(())
    }

    /// The buffers, to write: only while the device holds none of them
    /// (used ones are taken back first); `EBUSY` otherwise.
    pub(crate) fn bufs_mut(&mut self) -> Result<&mut B> {
        self.reclaim();
        if self.in_flight != 0 {
            return Err(EBUSY);
        }
        Ok(&mut self.bufs)
    }

    /// The buffers, to read what the device wrote: only while it holds none
    /// of them.
    pub(crate) fn bufs(&self) -> Option<&B> {
        (self.in_flight == 0).then_some(&*self.bufs)
    }

    /// Ring size (0 once the queue is deleted).
    pub(crate) fn ring_size(&self) -> u32 {
        self.vq().map_or(0, |vq| vq.size())
    }

    /// Free descriptors.
    pub(crate) fn free_slots(&self) -> u32 {
        self.vq().map_or(0, |vq| vq.num_free())
    }

    /// Chains the device holds.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Notifies the device.
    pub(crate) fn kick(&mut self) {
        if let Some(vq) = self.vq() {
            vq.kick();
        }
    }

    /// Takes back every used chain; returns how many.
    pub(crate) fn reclaim(&mut self) -> u32 {
        let Some(vq) = self.vq() else { return 0 };
        let mut n = 0;
        while vq.get_buf().is_some() {
            n += 1;
        }
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    /// Sleeps until the device returns one chain, at most `ms` milliseconds
    /// (`u32::MAX`: no limit), then takes back every other used one.
    /// Returns the used length of the first, `None` on timeout (or with
    /// nothing in flight).
    pub(crate) fn wait_one(&mut self, ms: u32) -> Option<u32> {
        if self.in_flight == 0 {
            return None;
        }
        let len = self.vq()?.wait_buf(ms)?;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.reclaim();
        Some(len)
    }

    /// Waits at most `ms` for the device to return at least one chain,
    /// then takes back every used one. Returns how many came back.
    pub(crate) fn wait_used(&mut self, ms: u32) -> u32 {
        let n = self.reclaim();
        if n > 0 || self.in_flight == 0 {
            return n;
        }
        let before = self.in_flight;
        match self.wait_one(ms) {
            Some(_) => before - self.in_flight,
            None => 0,
        }
    }

    /// Lends a chain, kicks and sleeps until the device returned everything
    /// (as Linux's `tell_host`). Meant for a queue with no other chain out.
    pub(crate) fn send_and_wait(&mut self, pick: impl for<'b> FnOnce(&'b B) -> Chain<'b>) -> Result
    where
        B: 'static,
    {
        self.add(pick)?;
        self.kick();
        while self.in_flight > 0 {
            if self.wait_one(u32::MAX).is_none() && self.vq().is_none() {
                return Err(ENODEV);
            }
        }
        Ok(())
    }
}

impl<B> Drop for Queue<B> {
    fn drop(&mut self) {
        // SAFETY: the device outlives the queue (invariant of `VqHandle`).
        let dev = unsafe { self.vq.dev.as_ref() };
        if self.in_flight > 0 && !dev.vqs_deleted() {
            // The device may still use the memory: leak it.
            pr_warn!("virtqueue dropped with {} chains out: buffers leaked\n", self.in_flight);
            return;
        }
        // SAFETY: dropped once, here; the device holds none of it (nothing
        // in flight, or the device was reset).
        unsafe { ManuallyDrop::drop(&mut self.bufs) };
    }
}
