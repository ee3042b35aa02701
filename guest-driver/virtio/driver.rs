// SPDX-License-Identifier: GPL-2.0

//! [`Driver`], its [`Registration`] and the `extern "C"` trampolines the
//! C callbacks call.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::pin::Pin;
use core::ptr::NonNull;
use kernel::ffi::{c_int, c_uint, c_ulong};
use kernel::prelude::*;

use super::device::{Bound, Device, Validator};
use super::ffi::virtio_device;
use super::{
    freehint_set_drvdata, freehint_virtio_register, freehint_virtio_unregister, Ops, Work,
};

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
        kernel::error::to_result(unsafe {
            freehint_virtio_register(ops, T::FEATURES.as_ptr(), nr)
        })?;
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
