// SPDX-License-Identifier: GPL-2.0

//! [`Driver`], its [`Registration`] and the `extern "C"` trampolines the
//! C callbacks call.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::pin::Pin;
use core::ptr::NonNull;
use kernel::ffi::{c_int, c_uint};
use kernel::prelude::*;

use super::device::{Bound, Device, Validator};
use super::ffi::virtio_device;
use super::objects::{DeviceObjects, DriverCalls};
use super::{
    freehint_priv, freehint_set_priv, freehint_virtio_register, freehint_virtio_unregister, Ops,
    Work,
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
        vq_callback: DeviceObjects::vq_callback,
    };

    const CALLS: DriverCalls = DriverCalls {
        work: Self::work_call,
        oom: Self::oom_call,
    };

    /// Borrows the state behind a driver data pointer.
    ///
    /// # Safety
    ///
    /// `rust` must be the driver state `probe_callback` leaked (a
    /// `Pin<KBox<T>>`), and `remove_callback` must not have dropped it yet.
    unsafe fn state<'a>(rust: *mut c_void) -> &'a T {
        // SAFETY: by the function's safety contract.
        unsafe { &*rust.cast::<T>() }
    }

    /// # Safety
    ///
    /// Called by the virtio core's `validate` with its device.
    unsafe extern "C" fn validate_callback(vdev: *mut virtio_device) -> c_int {
        // SAFETY: the virtio core passes a valid device for the call; only
        // feature calls are made on it.
        let dev = unsafe { Device::from_raw(vdev) };
        T::validate(&Validator { dev });
        0
    }

    /// Allocates the device's objects, sets them as its `priv` pointer,
    /// then probes and starts the driver; undoes all of it on failure.
    ///
    /// # Safety
    ///
    /// Called by the virtio core's `probe` with its device, which stays
    /// valid until `remove_callback` returned (or until this returns an
    /// error).
    unsafe extern "C" fn probe_callback(vdev: *mut virtio_device) -> c_int {
        let objs = match KBox::pin_init(DeviceObjects::new(&Self::CALLS), GFP_KERNEL) {
            Ok(objs) => objs,
            Err(e) => return e.to_errno(),
        };
        // SAFETY: the objects are never moved out of their box: they are
        // only borrowed through the raw pointer until it is rebuilt below
        // or in `remove_callback`.
        let objs = KBox::into_raw(unsafe { Pin::into_inner_unchecked(objs) });
        // SAFETY: `vdev` is valid; the objects live until they are freed
        // below or in `remove_callback`, after the pointer is cleared.
        unsafe { freehint_set_priv(vdev, objs.cast()) };
        // SAFETY: `vdev` is valid and its objects are set (as above).
        let err = unsafe { Self::probe_and_start(vdev, &*objs) };
        if err != 0 {
            // SAFETY: as above; nothing uses the objects any more (the
            // failure paths stopped the work and deleted the queues).
            unsafe {
                freehint_set_priv(vdev, core::ptr::null_mut());
                drop(KBox::from_raw(objs));
            }
        }
        err
    }

    /// # Safety
    ///
    /// `vdev` is valid and `objs` are its objects, set as its `priv`.
    unsafe fn probe_and_start(vdev: *mut virtio_device, objs: &DeviceObjects) -> c_int {
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
                // driver may have queued, drop its queues.
                dev.stop_and_cancel();
                dev.reset_and_del_vqs();
                return e.to_errno();
            }
        };
        // SAFETY: the state is never moved out of its box: it is only
        // borrowed through the raw pointer until `remove_callback` (or the
        // error path below) rebuilds the box.
        let raw = KBox::into_raw(unsafe { Pin::into_inner_unchecked(state) });
        // From here work items and the notifier may borrow the state, which
        // lives until `remove_callback`.
        objs.set_state(raw.cast());
        // SAFETY: `raw` is the state just leaked.
        let st = unsafe { &*raw };
        match st.start() {
            Ok(()) => 0,
            Err(e) => {
                st.teardown();
                dev.reset_and_del_vqs();
                // No work can run any more (teardown stopped all of it).
                objs.set_state(core::ptr::null_mut());
                // SAFETY: `raw` came from `KBox::into_raw` above and nothing
                // borrows it any more.
                drop(unsafe { KBox::from_raw(raw) });
                e.to_errno()
            }
        }
    }

    /// # Safety
    ///
    /// Called by the virtio core's `remove` with its device, once, after a
    /// successful probe.
    unsafe extern "C" fn remove_callback(vdev: *mut virtio_device) {
        // SAFETY: the device is valid during remove.
        let objs_ptr = unsafe { freehint_priv(vdev) };
        // SAFETY: probe set the pointer to live objects; only this function
        // frees them.
        let Some(objs) = (unsafe { DeviceObjects::from_priv(objs_ptr) }) else {
            return;
        };
        // SAFETY: the device is valid during remove.
        let dev = unsafe { Device::from_raw(vdev) };
        let rust = objs.state();
        if let Some(rust) = rust {
            // SAFETY: `rust` is the state from probe; the virtio core
            // disabled config-change callbacks before calling remove.
            unsafe { Self::state(rust) }.teardown();
        }
        // After teardown nothing uses the queues: reset (the device lets go
        // of every buffer) and delete them, then free the state and the
        // objects.
        dev.reset_and_del_vqs();
        objs.set_state(core::ptr::null_mut());
        // SAFETY: teardown stopped every work item, the OOM notifier and
        // every queue user, and the queues are gone: nothing borrows the
        // state or the objects any more. Both were leaked in probe.
        unsafe {
            if let Some(rust) = rust {
                drop(KBox::from_raw(rust.cast::<T>()));
            }
            freehint_set_priv(vdev, core::ptr::null_mut());
            drop(KBox::from_raw(objs_ptr.cast::<DeviceObjects>()));
        }
    }

    /// # Safety
    ///
    /// Called by the virtio core's `config_changed` with the device's
    /// `priv` pointer, between probe and remove.
    unsafe extern "C" fn config_changed_callback(objs: *mut c_void) {
        // SAFETY: by the function's safety contract.
        let Some(objs) = (unsafe { DeviceObjects::from_priv(objs) }) else {
            return;
        };
        if let Some(rust) = objs.state() {
            // SAFETY: the state is valid while set (invariant of
            // `DeviceObjects`).
            unsafe { Self::state(rust) }.config_changed();
        }
    }

    /// # Safety
    ///
    /// `rust` is the driver state, valid for the call (work items run only
    /// while it is set; removal cancels them before freeing it).
    unsafe fn work_call(rust: *mut c_void, w: Work) {
        // SAFETY: by the function's safety contract.
        unsafe { Self::state(rust) }.work(w);
    }

    /// # Safety
    ///
    /// As [`Self::work_call`]; teardown unregisters the notifier (waiting
    /// for running calls) before the state is freed.
    unsafe fn oom_call(rust: *mut c_void) -> usize {
        // SAFETY: by the function's safety contract.
        unsafe { Self::state(rust) }.oom()
    }
}
