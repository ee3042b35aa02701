// SPDX-License-Identifier: GPL-2.0

//! Memory the balloon driver deals in, apart from the free lists
//! (`zone.rs`): balloon pages ([`BalloonPage`], [`PageList`]), the kernel's
//! memory figures for the stats queue ([`mem_stats`]) and how it treats
//! freed pages ([`poisoning`]).
//!
//! `kernel::page::Page` cannot be used for balloon pages: it frees its page
//! on drop and cannot be linked into a list through `page->lru`, which the
//! OOM path needs (it must not allocate to give pages back).

use core::ffi::c_void;
use core::ptr::NonNull;
use kernel::bindings;
use kernel::ffi::{c_long, c_uint, c_ulong};
use kernel::prelude::*;

extern "C" {
    // helpers.c (shared with zone.rs).
    fn freehint_page_to_pfn(page: *const c_void) -> c_ulong;
    // helpers.c.
    // `struct page *` as `void *`: `bindings::page` is not FFI-safe for
    // rustc's `improper_ctypes` (a field type without members).
    fn freehint_page_list_add(head: *mut bindings::list_head, page: *mut c_void);
    fn freehint_page_list_pop(head: *mut bindings::list_head) -> *mut c_void;
    fn freehint_page_poisoning_enabled() -> bool;
    fn freehint_want_init_on_free() -> bool;
    fn freehint_file_pages() -> c_ulong;
    fn freehint_vm_events(out: *mut u64, n: c_uint) -> bool;
}

/// `1 << bit` as a `gfp_t`, for the `___GFP_*_BIT` numbers the bindings
/// have where they lack the `__GFP_*` macros.
const fn gfp_bit(bit: u32) -> bindings::gfp_t {
    1 << bit
}

/// How balloon pages are allocated: `GFP_HIGHUSER | __GFP_NOMEMALLOC |
/// __GFP_NORETRY | __GFP_NOWARN`. Not `GFP_HIGHUSER_MOVABLE`: this driver
/// registers no balloon migration callback, so compaction could not move
/// the pages, and unmovable allocations must stay out of movable pageblocks.
/// No retry, no reserves, no warning: an inflation that fails is retried
/// later ("out of puff").
const BALLOON_GFP: bindings::gfp_t = bindings::GFP_KERNEL // __GFP_RECLAIM | __GFP_IO | __GFP_FS
    | gfp_bit(bindings::___GFP_HARDWALL_BIT) // GFP_USER
    | bindings::__GFP_HIGHMEM // GFP_HIGHUSER
    | gfp_bit(bindings::___GFP_NOMEMALLOC_BIT)
    | gfp_bit(bindings::___GFP_NORETRY_BIT)
    | bindings::__GFP_NOWARN;

/// One page held by the balloon; freed when dropped.
///
/// # Invariants
///
/// `page` is an order-0 page allocated with `alloc_pages` and owned by this
/// value.
pub(crate) struct BalloonPage {
    page: NonNull<bindings::page>,
}

// SAFETY: a page the driver owns may be handed between CPUs.
unsafe impl Send for BalloonPage {}

impl BalloonPage {
    /// Allocates a page for the balloon ([`BALLOON_GFP`]).
    pub(crate) fn alloc() -> Option<Self> {
        // SAFETY: plain order-0 allocation; may sleep (process context).
        let page = NonNull::new(unsafe { bindings::alloc_pages(BALLOON_GFP, 0) })?;
        // INVARIANT: just allocated, owned by us.
        Some(Self { page })
    }

    /// Its pfn in 4 KiB units as the balloon ABI carries it (le32); `None`
    /// if it does not fit 32 bits.
    pub(crate) fn pfn32(&self) -> Option<u32> {
        // SAFETY: `page` is a valid page (type invariant).
        let pfn = unsafe { freehint_page_to_pfn(self.page.as_ptr().cast()) };
        u32::try_from(pfn).ok()
    }

    /// Adds `count` to the managed page count of the page's zone (Linux
    /// takes inflated pages out of the totals unless DEFLATE_ON_OOM).
    pub(crate) fn adjust_managed(&self, count: isize) {
        // SAFETY: `page` is a valid page (type invariant).
        unsafe { bindings::adjust_managed_page_count(self.page.as_ptr(), count as c_long) };
    }
}

impl Drop for BalloonPage {
    fn drop(&mut self) {
        // SAFETY: the page is owned by us (type invariant) and freed once.
        unsafe { bindings::__free_pages(self.page.as_ptr(), 0) };
    }
}

/// The pages in the balloon: an intrusive list through `page->lru` (no
/// allocation to add or remove a page, so it works in the OOM path).
///
/// # Invariants
///
/// `head` is an initialised list head that outlives this value, this is its
/// only handle, and every entry is the `lru` of a page owned by the list
/// (from a [`BalloonPage`]); `len` counts them.
pub(crate) struct PageList {
    head: NonNull<bindings::list_head>,
    len: usize,
}

// SAFETY: the list is only reached through this handle, used under a lock.
unsafe impl Send for PageList {}

impl PageList {
    /// Takes ownership of an empty list.
    ///
    /// # Safety
    ///
    /// `head` must be an initialised, empty `struct list_head` that outlives
    /// the returned value and that nothing else uses.
    pub(crate) unsafe fn from_head(head: NonNull<bindings::list_head>) -> Self {
        // INVARIANT: by the function's safety contract; empty, so `len` 0.
        Self { head, len: 0 }
    }

    /// Pages on the list.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds a page.
    pub(crate) fn push(&mut self, page: BalloonPage) {
        let page = core::mem::ManuallyDrop::new(page);
        // SAFETY: `head` is valid (type invariant); the page is owned and its
        // `lru` unused; ownership moves to the list (not freed: ManuallyDrop).
        unsafe { freehint_page_list_add(self.head.as_ptr(), page.page.as_ptr().cast()) };
        self.len += 1;
    }

    /// Removes a page.
    pub(crate) fn pop(&mut self) -> Option<BalloonPage> {
        // SAFETY: `head` is valid (type invariant).
        let page = NonNull::new(unsafe { freehint_page_list_pop(self.head.as_ptr()) })?;
        self.len = self.len.saturating_sub(1);
        // INVARIANT: the page came from a `BalloonPage` pushed above and is
        // unlinked now, so ownership returns to the new value.
        Some(BalloonPage { page: page.cast() })
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

/// The kernel's memory figures, as the stats queue reports them.
#[derive(Default, Clone, Copy)]
pub(crate) struct MemStats {
    pub(crate) free_bytes: u64,
    pub(crate) total_bytes: u64,
    pub(crate) avail_bytes: u64,
    pub(crate) caches_bytes: u64,
    /// VM event counters, `None` without `CONFIG_VM_EVENT_COUNTERS`.
    pub(crate) events: Option<VmEvents>,
}

/// The VM event counters the stats queue reports.
#[derive(Default, Clone, Copy)]
pub(crate) struct VmEvents {
    pub(crate) major_faults: u64,
    pub(crate) minor_faults: u64,
    pub(crate) swap_in_bytes: u64,
    pub(crate) swap_out_bytes: u64,
    pub(crate) oom_kills: u64,
}

/// Current memory figures (event counters only with VM_EVENT_COUNTERS).
pub(crate) fn mem_stats() -> MemStats {
    let shift = kernel::page::PAGE_SHIFT;
    let pages = |n: u64| n << shift;
    // SAFETY: `sysinfo` is plain data; all zeroes is a valid value.
    let mut i: bindings::sysinfo = unsafe { core::mem::zeroed() };
    // SAFETY: `i` is a valid, writable `struct sysinfo`.
    unsafe { bindings::si_meminfo(&mut i) };
    // SAFETY: reads global counters; no requirement.
    let avail = unsafe { bindings::si_mem_available() };
    // SAFETY: as above.
    let file = unsafe { freehint_file_pages() };
    let mut ev = [0u64; 5];
    // SAFETY: `ev` holds the 5 counters the function writes.
    let events =
        unsafe { freehint_vm_events(ev.as_mut_ptr(), ev.len() as c_uint) }.then(|| VmEvents {
            major_faults: ev[0],
            minor_faults: ev[1],
            swap_in_bytes: pages(ev[2]),
            swap_out_bytes: pages(ev[3]),
            oom_kills: ev[4],
        });
    MemStats {
        free_bytes: pages(i.freeram as u64),
        total_bytes: pages(i.totalram as u64),
        avail_bytes: pages(avail.max(0) as u64),
        caches_bytes: pages(file as u64),
        events,
    }
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
        // SAFETY: reads a static key.
        page_poisoning: unsafe { freehint_page_poisoning_enabled() },
        // SAFETY: reads a static key.
        init_on_free: unsafe { freehint_want_init_on_free() },
    }
}
