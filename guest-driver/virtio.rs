// SPDX-License-Identifier: GPL-2.0

//! A small virtio abstraction (6.12's `kernel` crate has none).
//!
//! C side: `virtio_shim.c`, for what the bindings lack (they have no virtio
//! types at all): the `struct virtio_driver` with its id table, callbacks
//! that pass the device (or its `priv` pointer) on to Rust, and one-line
//! wrappers of static inlines and config ops. This module wraps it once,
//! after the pattern of `rust/kernel/net/phy.rs`:
//!
//! - [`Driver`]: what a virtio driver implements; [`Registration`] registers
//!   it, and `Adapter<T>` holds the `extern "C"` trampolines the C callbacks
//!   call (the only place where a driver state pointer is cast back);
//! - `DeviceObjects`: the kernel objects of one bound device (work items,
//!   hint workqueue, wait queue, stop lock, OOM notifier, page list),
//!   allocated by the adapter and kept as the device's `priv` pointer;
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
use kernel::ffi::{c_char, c_int, c_uint, c_ulong};

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

/// `struct freehint_virtio_ops` (virtio_shim.h): what the C callbacks call.
/// `objs` is the device's `priv` pointer (its `DeviceObjects`).
#[repr(C)]
struct Ops {
    validate: unsafe extern "C" fn(*mut virtio_device) -> c_int,
    probe: unsafe extern "C" fn(*mut virtio_device) -> c_int,
    remove: unsafe extern "C" fn(*mut virtio_device),
    config_changed: unsafe extern "C" fn(objs: *mut c_void),
    vq_callback: unsafe extern "C" fn(objs: *mut c_void, which: c_uint),
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
    assert!(size_of::<Ops>() == 5 * WORD);
    assert!(offset_of!(Ops, validate) == 0);
    assert!(offset_of!(Ops, probe) == WORD);
    assert!(offset_of!(Ops, remove) == 2 * WORD);
    assert!(offset_of!(Ops, config_changed) == 3 * WORD);
    assert!(offset_of!(Ops, vq_callback) == 4 * WORD);
    assert!(size_of::<RawBuf>() == 3 * size_of::<c_ulong>());
    assert!(offset_of!(RawBuf, addr) == 0);
    assert!(offset_of!(RawBuf, pfn) == size_of::<c_ulong>());
    assert!(offset_of!(RawBuf, len) == 2 * size_of::<c_ulong>());
};

extern "C" {
    fn freehint_virtio_register(ops: *const Ops, features: *const c_uint, nr: c_uint) -> c_int;
    fn freehint_virtio_unregister();
    fn freehint_set_priv(vdev: *mut virtio_device, objs: *mut c_void);
    fn freehint_priv(vdev: *const virtio_device) -> *mut c_void;
    fn freehint_vq_wait_buf(
        wq: *mut kernel::bindings::wait_queue_head,
        vq: *mut virtqueue,
        len: *mut c_uint,
        ms: c_uint,
    ) -> *mut c_void;
    fn freehint_has_feature(vdev: *const virtio_device, bit: c_uint) -> bool;
    fn freehint_clear_feature(vdev: *mut virtio_device, bit: c_uint);
    fn freehint_config_read_le32(vdev: *mut virtio_device, offset: c_uint) -> u32;
    fn freehint_config_write_le32(vdev: *mut virtio_device, offset: c_uint, v: u32);
    fn freehint_device_ready(vdev: *mut virtio_device);
    fn freehint_del_vqs(vdev: *mut virtio_device);
    fn freehint_find_vqs(
        vdev: *mut virtio_device,
        nvqs: c_uint,
        vqs: *mut *mut virtqueue,
        names: *const *const c_char,
        cbs: *const u8,
    ) -> c_int;
    fn freehint_vq_add_bufs(
        vq: *mut virtqueue,
        bufs: *const RawBuf,
        out: c_uint,
        inb: c_uint,
    ) -> c_int;
    fn freehint_vq_num_free(vq: *const virtqueue) -> c_uint;
}

// Exported by the virtio core; the bindings do not declare them.
extern "C" {
    fn virtio_reset_device(vdev: *mut virtio_device);
    fn virtqueue_kick(vq: *mut virtqueue) -> bool;
    fn virtqueue_get_buf(vq: *mut virtqueue, len: *mut c_uint) -> *mut c_void;
    fn virtqueue_get_vring_size(vq: *const virtqueue) -> c_uint;
}

/// Transport feature: indirect descriptors.
pub(crate) const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Transport feature: the device sits behind an IOMMU / platform DMA.
pub(crate) const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// Work items of a device.
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

mod device;
mod driver;
mod objects;
mod queue;

pub(crate) use device::{Bound, Validator};
pub(crate) use driver::{Driver, Registration};
pub(crate) use queue::{Chain, DmaBuf, Queue, VqHandle};
