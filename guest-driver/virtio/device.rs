// SPDX-License-Identifier: GPL-2.0

//! [`Device`], [`Validator`] and [`Bound`]: a virtio device at each stage
//! of its life with the driver.

use core::ptr::NonNull;
use kernel::ffi::{c_char, c_uint};
use kernel::prelude::*;
use kernel::types::Opaque;

use super::objects::DeviceObjects;
use super::queue::{Virtqueue, VqHandle};
use super::{
    ffi::{virtio_device, virtqueue},
    Callback, Work,
};
use super::{
    freehint_clear_feature, freehint_config_read_le32, freehint_config_write_le32,
    freehint_del_vqs, freehint_device_ready, freehint_find_vqs, freehint_has_feature,
    freehint_priv, virtio_reset_device,
};

/// A virtio device.
///
/// # Invariants
///
/// A `&Device` is only made from a `struct virtio_device` that is valid for
/// the reference's lifetime and, outside `validate`, whose `priv` pointer
/// holds the [`DeviceObjects`] the adapter's probe allocated.
#[repr(transparent)]
pub(crate) struct Device(Opaque<virtio_device>);

impl Device {
    /// # Safety
    ///
    /// For `'a`, `ptr` must be a valid `struct virtio_device` whose objects
    /// the adapter set (or one in `validate`, where only the feature calls
    /// are made).
    pub(super) unsafe fn from_raw<'a>(ptr: *mut virtio_device) -> &'a Self {
        // CAST: `Self` is a `repr(transparent)` wrapper around `virtio_device`.
        // SAFETY: by the function's safety contract.
        unsafe { &*ptr.cast::<Self>() }
    }

    fn as_raw(&self) -> *mut virtio_device {
        self.0.get()
    }

    /// The device's kernel objects.
    pub(super) fn objects(&self) -> &DeviceObjects {
        // SAFETY: the device is valid and its `priv` holds its objects, which
        // outlive the reference (type invariant). The one `&Device` without
        // objects, a device in `validate`, stays inside its `Validator`,
        // which makes feature calls only.
        unsafe { &*freehint_priv(self.as_raw()).cast::<DeviceObjects>() }
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
        self.objects().queue_work(w)
    }

    /// Creates the workqueue [`Work::Hint`] runs on.
    pub(crate) fn alloc_hint_wq(&self) -> Result {
        self.objects().alloc_hint_wq()
    }

    /// Stops queueing work and waits until no work item runs or is queued;
    /// destroys the hint workqueue. Idempotent.
    pub(crate) fn stop_and_cancel(&self) {
        self.objects().stop_and_cancel();
    }

    /// Registers the OOM notifier ([`Driver::oom`]).
    pub(crate) fn register_oom(&self) -> Result {
        self.objects().register_oom()
    }

    /// Unregisters the OOM notifier; waits for running notifications. Only
    /// after a successful [`Device::register_oom`].
    pub(crate) fn unregister_oom(&self) {
        self.objects().unregister_oom();
    }

    /// Finds the virtqueues `specs` (name, callback) in this order: the index
    /// of a queue is its position, so passing only the queues whose feature
    /// was negotiated gives the compacted numbering.
    pub(crate) fn find_vqs(
        &self,
        specs: &[(&'static CStr, Option<Callback>)],
    ) -> Result<KVec<VqHandle>> {
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
            freehint_find_vqs(
                self.as_raw(),
                specs.len() as c_uint,
                vqs.as_mut_ptr(),
                names.as_ptr(),
                cbs.as_ptr(),
            )
        })?;
        let mut out = KVec::with_capacity(specs.len(), GFP_KERNEL)?;
        for vq in vqs.iter().take(specs.len()) {
            let Some(vq) = NonNull::new(vq.cast::<Virtqueue>()) else {
                return Err(ENODEV);
            };
            // INVARIANT: `vq` was just created for this device and stays
            // valid until `reset_and_del_vqs`.
            out.push(
                VqHandle {
                    vq,
                    dev: NonNull::from(self),
                },
                GFP_KERNEL,
            )?;
        }
        Ok(out)
    }

    /// Resets the device (it lets go of every buffer) and deletes its
    /// virtqueues; afterwards every [`Queue`] of it refuses to touch its
    /// virtqueue. Only the adapter calls it, once the driver stopped using
    /// the queues (after [`Driver::teardown`], or when probe failed).
    pub(super) fn reset_and_del_vqs(&self) {
        // SAFETY: the device is valid (type invariant). Queues check
        // `vqs_deleted` before every virtqueue call, and the adapter calls
        // this only when no queue operation runs.
        unsafe {
            virtio_reset_device(self.as_raw());
            freehint_del_vqs(self.as_raw());
        }
        self.objects().set_vqs_deleted();
    }

    /// Whether [`Device::reset_and_del_vqs`] ran.
    pub(super) fn vqs_deleted(&self) -> bool {
        self.objects().vqs_deleted()
    }
}

/// A virtio device during `validate` (features not yet final).
pub(crate) struct Validator<'a> {
    pub(super) dev: &'a Device,
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
/// `dev` has its objects set and stays valid until the adapter's remove
/// returns; the adapter drops the driver state, which owns this handle, in
/// remove (or in probe, on failure). `pages_taken` is set once the device's
/// page list has an owner.
pub(crate) struct Bound {
    pub(super) dev: NonNull<Device>,
    pub(super) pages_taken: bool,
}

impl Bound {
    /// The list of balloon pages of this device (a list head in its C
    /// object); `None` after the first call: there is one owner.
    pub(crate) fn take_page_list(&mut self) -> Option<crate::mm::PageList> {
        if core::mem::replace(&mut self.pages_taken, true) {
            return None;
        }
        // The objects initialised the list head.
        let head = NonNull::new(self.objects().pages())?;
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
