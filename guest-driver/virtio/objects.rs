// SPDX-License-Identifier: GPL-2.0

//! [`DeviceObjects`]: the kernel objects one bound device needs next to its
//! driver state, as Linux's `virtio_balloon` keeps them in its `struct
//! virtio_balloon`: the work items and the hint workqueue, the wait queue
//! the virtqueue callbacks wake, the stop lock, the OOM notifier and the
//! list head of the balloon pages.
//!
//! The adapter allocates them in probe, before the driver sees the device,
//! and stores them as the device's `priv` pointer: the virtqueue and config
//! callbacks of `virtio_shim.c` pass that pointer on. Work items and the OOM
//! notifier find them again from their embedded C structures.

use core::ffi::c_void;
use core::mem::offset_of;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use kernel::bindings;
use kernel::c_str;
use kernel::ffi::{c_char, c_int, c_uint, c_ulong};
use kernel::prelude::*;
use kernel::types::Opaque;

use super::{Callback, Work};

extern "C" {
    // helpers.c: `spin_lock_irqsave` and `spin_unlock_irqrestore` are macros.
    fn freehint_spin_lock_irqsave(lock: *mut bindings::spinlock_t) -> c_ulong;
    fn freehint_spin_unlock_irqrestore(lock: *mut bindings::spinlock_t, flags: c_ulong);
    // virtio_shim.c: the workqueue flags depend on the kernel version.
    fn freehint_alloc_hint_wq() -> *mut bindings::workqueue_struct;
    // mm/oom_kill.c: exported functions the bindings do not declare.
    fn register_oom_notifier(nb: *mut bindings::notifier_block) -> c_int;
    fn unregister_oom_notifier(nb: *mut bindings::notifier_block) -> c_int;
}

/// A lock class key in static memory, for lockdep: what C's
/// `static struct lock_class_key` next to each init call is (6.12's
/// `LockClassKey` does not hand out its pointer outside the kernel crate).
struct StaticKey(Opaque<bindings::lock_class_key>);

// SAFETY: lockdep, the key's only user, synchronises its accesses.
unsafe impl Sync for StaticKey {}

impl StaticKey {
    /// Uninitialised, as lockdep expects of a static key.
    const fn new() -> Self {
        Self(Opaque::uninit())
    }

    fn as_ptr(&self) -> *mut bindings::lock_class_key {
        self.0.get()
    }
}

/// A pointer to a key of its own for each place it is written.
macro_rules! static_key {
    () => {{
        static KEY: StaticKey = StaticKey::new();
        KEY.as_ptr()
    }};
}

/// The OOM notifier's priority (`VIRTIO_BALLOON_OOM_NOTIFY_PRIORITY`).
const OOM_NOTIFY_PRIORITY: c_int = 80;

/// The driver functions the objects call with the driver state
/// (`Adapter<T>`'s).
pub(super) struct DriverCalls {
    /// Runs a work item.
    pub(super) work: unsafe fn(*mut c_void, Work),
    /// The OOM notifier: pages given back.
    pub(super) oom: unsafe fn(*mut c_void) -> usize,
}

/// The kernel objects of one bound device.
///
/// # Invariants
///
/// - The three work items run [`DeviceObjects::run_work`] for their own
///   field, the notifier block [`DeviceObjects::oom_notify`]; both find the
///   objects again through the field's offset.
/// - `state` is null or the driver state the adapter leaked, and stays
///   valid while it is set.
/// - `stopping` is written with `stop_lock` held; once set, no work item is
///   queued again.
#[pin_data(PinnedDrop)]
pub(super) struct DeviceObjects {
    calls: &'static DriverCalls,
    state: AtomicPtr<c_void>,
    #[pin]
    size_work: Opaque<bindings::work_struct>,
    #[pin]
    stats_work: Opaque<bindings::work_struct>,
    #[pin]
    hint_work: Opaque<bindings::work_struct>,
    /// Free page hinting runs on its own workqueue (as Linux); null until
    /// allocated and after [`DeviceObjects::stop_and_cancel`].
    hint_wq: AtomicPtr<bindings::workqueue_struct>,
    /// Woken by every virtqueue callback that returns buffers.
    #[pin]
    acked: Opaque<bindings::wait_queue_head>,
    #[pin]
    stop_lock: Opaque<bindings::spinlock_t>,
    stopping: AtomicBool,
    /// The device was reset and its virtqueues deleted.
    vqs_deleted: AtomicBool,
    #[pin]
    oom_nb: Opaque<bindings::notifier_block>,
    /// Balloon pages, linked through `page->lru` (a lock of the driver
    /// state guards the list).
    #[pin]
    pages: Opaque<bindings::list_head>,
}

/// Initialises a work item that runs `func`.
fn work_item(
    func: unsafe extern "C" fn(*mut bindings::work_struct),
    name: &'static CStr,
    key: *mut bindings::lock_class_key,
) -> impl PinInit<Opaque<bindings::work_struct>> {
    Opaque::ffi_init(move |slot| {
        // SAFETY: `slot` is valid, pinned memory for a work item; the name
        // and the lock class key are static.
        unsafe { bindings::init_work_with_key(slot, Some(func), false, name.as_char_ptr(), key) }
    })
}

/// Initialises a kernel object with its C init function, which takes the
/// lockdep name and class (`__init_waitqueue_head`, `__spin_lock_init`).
fn with_class<T>(
    init: unsafe extern "C" fn(*mut T, *const c_char, *mut bindings::lock_class_key),
    name: &'static CStr,
    key: *mut bindings::lock_class_key,
) -> impl PinInit<Opaque<T>> {
    Opaque::ffi_init(move |slot| {
        // SAFETY: `slot` is valid, pinned memory for the object `init` sets
        // up; the name and the lock class key are static.
        unsafe { init(slot, name.as_char_ptr(), key) }
    })
}

impl DeviceObjects {
    /// Objects whose work items and notifier call into `calls`.
    pub(super) fn new(calls: &'static DriverCalls) -> impl PinInit<Self> {
        pin_init!(Self {
            calls,
            state: AtomicPtr::new(null_mut()),
            size_work <- work_item(
                Self::run_work::<{ Work::Size as u32 }>,
                c_str!("freehint::size_work"),
                static_key!(),
            ),
            stats_work <- work_item(
                Self::run_work::<{ Work::Stats as u32 }>,
                c_str!("freehint::stats_work"),
                static_key!(),
            ),
            hint_work <- work_item(
                Self::run_work::<{ Work::Hint as u32 }>,
                c_str!("freehint::hint_work"),
                static_key!(),
            ),
            hint_wq: AtomicPtr::new(null_mut()),
            acked <- with_class(
                bindings::__init_waitqueue_head,
                c_str!("freehint::acked"),
                static_key!(),
            ),
            stop_lock <- with_class(
                bindings::__spin_lock_init,
                c_str!("freehint::stop_lock"),
                static_key!(),
            ),
            stopping: AtomicBool::new(false),
            vqs_deleted: AtomicBool::new(false),
            oom_nb: Opaque::new(bindings::notifier_block {
                notifier_call: Some(Self::oom_notify),
                next: null_mut(),
                priority: OOM_NOTIFY_PRIORITY,
            }),
            pages <- Opaque::ffi_init(|head: *mut bindings::list_head| {
                // SAFETY: `head` is valid, pinned memory; an empty list
                // points at itself (`INIT_LIST_HEAD`).
                unsafe {
                    (*head).next = head;
                    (*head).prev = head;
                }
            }),
        })
    }

    /// Borrows the objects behind a device's `priv` pointer.
    ///
    /// # Safety
    ///
    /// `ptr` must be null or point to objects the adapter allocated and
    /// has not freed yet, for `'a`.
    pub(super) unsafe fn from_priv<'a>(ptr: *mut c_void) -> Option<&'a Self> {
        // SAFETY: by the function's safety contract.
        unsafe { ptr.cast::<Self>().as_ref() }
    }

    /// Sets the driver state the work items and the notifier call with
    /// (null: none).
    pub(super) fn set_state(&self, state: *mut c_void) {
        self.state.store(state, Ordering::Release);
    }

    /// The driver state, if set.
    pub(super) fn state(&self) -> Option<*mut c_void> {
        let state = self.state.load(Ordering::Acquire);
        (!state.is_null()).then_some(state)
    }

    fn work_ptr(&self, w: Work) -> *mut bindings::work_struct {
        match w {
            Work::Size => self.size_work.get(),
            Work::Stats => self.stats_work.get(),
            Work::Hint => self.hint_work.get(),
        }
    }

    /// Queues a work item; `false` if it was already queued, removal began
    /// or (for [`Work::Hint`]) there is no hint workqueue.
    pub(super) fn queue_work(&self, w: Work) -> bool {
        // SAFETY: the lock was initialised in `new`; taken with interrupts
        // off, since the stats queue's callback queues work in interrupt
        // context.
        let flags = unsafe { freehint_spin_lock_irqsave(self.stop_lock.get()) };
        let queued = !self.stopping.load(Ordering::Relaxed) && self.queue_work_locked(w);
        // SAFETY: taken above with these flags.
        unsafe { freehint_spin_unlock_irqrestore(self.stop_lock.get(), flags) };
        queued
    }

    fn queue_work_locked(&self, w: Work) -> bool {
        let wq = match w {
            Work::Hint => self.hint_wq.load(Ordering::Acquire),
            // SAFETY: a workqueue of the kernel's, set up before any module.
            Work::Size | Work::Stats => unsafe { bindings::system_freezable_wq },
        };
        if wq.is_null() {
            return false;
        }
        let cpu = bindings::wq_misc_consts_WORK_CPU_UNBOUND as c_int;
        // SAFETY: `wq` is live (the hint workqueue is destroyed only after
        // `stopping` was set, under the same lock); the work item was
        // initialised in `new` and is pinned.
        unsafe { bindings::queue_work_on(cpu, wq, self.work_ptr(w)) }
    }

    /// Creates the workqueue [`Work::Hint`] runs on; keeps the first one
    /// if called again.
    pub(super) fn alloc_hint_wq(&self) -> Result {
        // SAFETY: no precondition.
        let wq = unsafe { freehint_alloc_hint_wq() };
        if wq.is_null() {
            return Err(ENOMEM);
        }
        let set =
            self.hint_wq
                .compare_exchange(null_mut(), wq, Ordering::AcqRel, Ordering::Acquire);
        if set.is_err() {
            // SAFETY: `wq` was just allocated and nothing knows it.
            unsafe { bindings::destroy_workqueue(wq) };
        }
        Ok(())
    }

    /// Stops queueing work, waits until no work item runs or is queued and
    /// destroys the hint workqueue (as `virtballoon_remove`). Idempotent.
    pub(super) fn stop_and_cancel(&self) {
        // SAFETY: as in `queue_work`.
        let flags = unsafe { freehint_spin_lock_irqsave(self.stop_lock.get()) };
        self.stopping.store(true, Ordering::Relaxed);
        // SAFETY: taken above with these flags.
        unsafe { freehint_spin_unlock_irqrestore(self.stop_lock.get(), flags) };
        for w in [Work::Size, Work::Stats, Work::Hint] {
            // SAFETY: the work item was initialised in `new`; nothing queues
            // it again (`stopping`).
            unsafe { bindings::cancel_work_sync(self.work_ptr(w)) };
        }
        let wq = self.hint_wq.swap(null_mut(), Ordering::AcqRel);
        if !wq.is_null() {
            // SAFETY: `wq` came from `freehint_alloc_hint_wq`; its work item
            // was cancelled and cannot be queued again.
            unsafe { bindings::destroy_workqueue(wq) };
        }
    }

    /// Registers the OOM notifier.
    pub(super) fn register_oom(&self) -> Result {
        // SAFETY: the notifier block is pinned and lives until the objects
        // are freed, after `unregister_oom` (the driver's teardown).
        kernel::error::to_result(unsafe { register_oom_notifier(self.oom_nb.get()) })
    }

    /// Unregisters the OOM notifier; waits for running notifications.
    pub(super) fn unregister_oom(&self) {
        // SAFETY: registered by `register_oom` (the caller's contract).
        unsafe { unregister_oom_notifier(self.oom_nb.get()) };
    }

    /// The wait queue the virtqueue callbacks wake.
    pub(super) fn acked(&self) -> *mut bindings::wait_queue_head {
        self.acked.get()
    }

    /// The head of the balloon page list (initialised, empty at first).
    pub(super) fn pages(&self) -> *mut bindings::list_head {
        self.pages.get()
    }

    /// Notes that the device was reset and its virtqueues deleted.
    pub(super) fn set_vqs_deleted(&self) {
        self.vqs_deleted.store(true, Ordering::Release);
    }

    /// Whether the device's virtqueues were deleted.
    pub(super) fn vqs_deleted(&self) -> bool {
        self.vqs_deleted.load(Ordering::Acquire)
    }

    /// A virtqueue callback of `virtio_shim.c` (interrupt context):
    /// [`Callback::Ack`] wakes the waiters, [`Callback::Stats`] queues
    /// [`Work::Stats`].
    ///
    /// # Safety
    ///
    /// `objs` is the device's `priv` pointer (see [`Self::from_priv`]).
    pub(super) unsafe extern "C" fn vq_callback(objs: *mut c_void, which: c_uint) {
        // SAFETY: by the function's safety contract.
        let Some(objs) = (unsafe { Self::from_priv(objs) }) else {
            return;
        };
        if which == Callback::Ack as c_uint {
            // SAFETY: the wait queue head was initialised in `new`.
            unsafe { bindings::__wake_up(objs.acked(), bindings::TASK_NORMAL, 1, null_mut()) };
        } else if which == Callback::Stats as c_uint {
            objs.queue_work(Work::Stats);
        }
    }

    /// Recovers the objects from a pointer to one of their fields.
    ///
    /// # Safety
    ///
    /// `field` points to the field at `offset` of live objects.
    unsafe fn container_of<'a, F>(field: *mut F, offset: usize) -> &'a Self {
        // SAFETY: by the function's safety contract the objects start
        // `offset` bytes before the field.
        unsafe { &*field.cast::<u8>().sub(offset).cast::<Self>() }
    }

    /// Runs work item `W` (a [`Work`] number).
    ///
    /// # Safety
    ///
    /// Called by the workqueue for a work item `new` initialised with this
    /// function; removal cancels it before the objects are freed.
    unsafe extern "C" fn run_work<const W: u32>(work: *mut bindings::work_struct) {
        let Some(w) = Work::from_raw(W) else {
            return;
        };
        let offset = match w {
            Work::Size => offset_of!(Self, size_work),
            Work::Stats => offset_of!(Self, stats_work),
            Work::Hint => offset_of!(Self, hint_work),
        };
        // SAFETY: `work` is that field of live objects (type invariant and
        // this function's contract); `Opaque` is `repr(transparent)`.
        let objs = unsafe { Self::container_of(work, offset) };
        if let Some(state) = objs.state() {
            // SAFETY: the state is valid while set (type invariant).
            unsafe { (objs.calls.work)(state, w) };
        }
    }

    /// The OOM notifier: adds the pages the driver gave back to `*freed`.
    ///
    /// # Safety
    ///
    /// Called by the OOM notifier chain for the block `new` set up, with
    /// `freed` pointing to the count of freed pages.
    unsafe extern "C" fn oom_notify(
        nb: *mut bindings::notifier_block,
        _event: c_ulong,
        freed: *mut c_void,
    ) -> c_int {
        // SAFETY: `nb` is the `oom_nb` field of live objects: the driver
        // unregisters the notifier before they are freed.
        let objs = unsafe { Self::container_of(nb, offset_of!(Self, oom_nb)) };
        if let Some(state) = objs.state() {
            // SAFETY: the state is valid while set (type invariant).
            let pages = unsafe { (objs.calls.oom)(state) };
            // SAFETY: the notifier chain passes the count of freed pages.
            unsafe { *freed.cast::<c_ulong>() += pages as c_ulong };
        }
        bindings::NOTIFY_OK as c_int
    }
}

#[pinned_drop]
impl PinnedDrop for DeviceObjects {
    fn drop(self: Pin<&mut Self>) {
        // No work item may outlive the objects it is embedded in.
        self.stop_and_cancel();
    }
}
