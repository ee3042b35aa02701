// SPDX-License-Identifier: GPL-2.0

//! Zones, their buddy free lists and per-CPU page lists, the pages on them,
//! and the kernel's "System RAM" ranges.
//!
//! This is the one module of freehint.ko with raw access to `struct zone`,
//! `struct free_area`, `struct per_cpu_pages` and `struct page` (through the
//! C shims in helpers.c, because the accessors are static inlines and
//! macros). Everything above it (`walk.rs`, `builder.rs`) sees only small
//! safe types:
//!
//! - [`Zone`]: a populated zone of an online node;
//! - [`ZoneLockGuard`]: `zone->lock` held with interrupts disabled,
//!   released in `Drop` (or by [`ZoneLockGuard::unlock`], which reports how
//!   long it was held);
//! - [`FreeListCursor`]: an iterator over the free blocks of one
//!   `free_area[order].free_list[migratetype]`, borrowing the guard, so no
//!   list pointer can outlive the lock hold that made it valid;
//! - [`PerCpuPages`] and [`PcpLockGuard`]: one CPU's page lists of a zone
//!   and its `pcp->lock` held, walked by [`PcpLockGuard::rotate_front`]
//!   (state of a pass in [`PcpPass`]);
//! - [`system_ram_ranges`]: the "System RAM" resources as pfn ranges, for
//!   the layout.
//!
//! Resuming a list after the lock was dropped never reuses a pointer: the
//! walker keeps only a pfn (a number) and [`ZoneLockGuard::resume_after`]
//! re-derives and re-validates the page from it under the new lock hold.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::ptr::NonNull;
use kernel::bindings;

use crate::layout::Pfn;
use kernel::ffi::{c_int, c_uint, c_ulong};

// `*mut bindings::zone` trips `improper_ctypes` on some configurations (a
// zero-sized `spinlock_t` without SMP), so zones and nodes cross the C
// boundary as `*mut c_void`; they are cast back only in this module.
extern "C" {
    #[cfg(not(freehint_kernel_7_3))]
    fn freehint_spin_lock_irqsave(lock: *mut bindings::spinlock_t) -> c_ulong;
    #[cfg(not(freehint_kernel_7_3))]
    fn freehint_spin_unlock_irqrestore(lock: *mut bindings::spinlock_t, flags: c_ulong);
    fn freehint_nr_node_ids() -> c_int;
    fn freehint_node_online(nid: c_int) -> bool;
    fn freehint_node_data(nid: c_int) -> *mut c_void;
    fn freehint_zone_populated(zone: *mut c_void) -> bool;
    fn freehint_free_list_head(zone: *mut c_void, order: c_uint, mt: c_uint) -> *mut c_void;
    fn freehint_buddy_list_page(entry: *mut c_void) -> *mut c_void;
    fn freehint_page_buddy_list(page: *mut c_void) -> *mut c_void;
    fn freehint_page_to_pfn(page: *const c_void) -> c_ulong;
    fn freehint_pfn_valid(pfn: c_ulong) -> bool;
    fn freehint_pfn_to_page(pfn: c_ulong) -> *mut c_void;
    fn freehint_page_buddy(page: *const c_void) -> bool;
    fn freehint_page_private(page: *const c_void) -> c_ulong;
    fn freehint_page_zone(page: *const c_void) -> *mut c_void;
    fn freehint_next_online_cpu(cpu: c_int) -> c_int;
    #[cfg(not(freehint_kernel_7_3))]
    fn freehint_nr_cpu_ids() -> c_uint;
    fn freehint_zone_pcp(zone: *mut c_void, cpu: c_int) -> *mut c_void;
    #[cfg(not(freehint_kernel_7_3))]
    fn freehint_pcp_lock(pcp: *mut c_void) -> c_ulong;
    #[cfg(not(freehint_kernel_7_3))]
    fn freehint_pcp_unlock(pcp: *mut c_void, flags: c_ulong);
    fn freehint_nr_pcp_lists() -> c_uint;
    fn freehint_pcp_list_head(pcp: *mut c_void, pindex: c_uint) -> *mut c_void;
    fn freehint_pcp_lists_size() -> usize;
    fn freehint_pcp_list_page(entry: *mut c_void) -> *mut c_void;
    fn freehint_pcp_pindex_order(pindex: c_uint) -> c_uint;
    fn freehint_pcp_count(pcp: *mut c_void) -> c_int;
    fn freehint_list_bulk_move_tail(head: *mut c_void, first: *mut c_void, last: *mut c_void);
    fn freehint_nr_page_orders() -> c_uint;
    fn freehint_migrate_types() -> c_uint;
    fn freehint_cond_resched();
}

/// Length of the array behind a raw pointer, without dereferencing it.
const fn array_len<T, const N: usize>(_: *const [T; N]) -> usize {
    N
}

pub(crate) use crate::clock::now_ns;

// How a held lock is released. 7.3 has lock abstractions that take a
// `spinlock_t` embedded in a C structure (`Lock::from_raw`): the guard is
// the kernel's own. 6.12 has none for this: C shims take the lock and the
// guard keeps what the unlock needs (the saved interrupt flags).
#[cfg(freehint_kernel_7_3)]
type ZoneHeld<'a> = kernel::sync::SpinLockIrqGuard<'a, ()>;
#[cfg(not(freehint_kernel_7_3))]
type ZoneHeld<'a> = c_ulong;
#[cfg(freehint_kernel_7_3)]
type PcpHeld<'a> = kernel::sync::SpinLockGuard<'a, ()>;
#[cfg(not(freehint_kernel_7_3))]
type PcpHeld<'a> = c_ulong;

/// Lets the scheduler run something else (`cond_resched`). Must not be
/// called with a [`ZoneLockGuard`] alive; the borrow checker cannot see
/// that, so every caller is in `walk.rs` between lock holds.
pub(crate) fn cond_resched() {
    // SAFETY: `cond_resched` may sleep; callers hold no spinlock (see above)
    // and run in process context (debugfs write or module init).
    unsafe { freehint_cond_resched() }
}

/// Number of buddy orders (`NR_PAGE_ORDERS`, 11 on x86-64).
pub(crate) fn nr_orders() -> u32 {
    // SAFETY: returns a compile-time constant of the kernel.
    unsafe { freehint_nr_page_orders() }
}

/// Number of migrate types, i.e. free lists per order (`MIGRATE_TYPES`).
pub(crate) fn nr_migrate_types() -> u32 {
    // SAFETY: returns a compile-time constant of the kernel.
    unsafe { freehint_migrate_types() }
}

/// A populated zone of an online node.
///
/// # Invariants
///
/// `ptr` points to a `struct zone` inside the `pglist_data` of an online
/// node. Node data is never freed while the system runs (this kernel has no
/// node hot-remove; `contig_page_data` is static without NUMA), so the
/// pointer stays valid for the lifetime of the module.
pub(crate) struct Zone {
    ptr: NonNull<bindings::zone>,
}

impl Zone {
    /// Every populated zone of every online node, in node then zone order.
    pub(crate) fn for_each_populated(mut f: impl FnMut(&Zone)) {
        // SAFETY: reads `nr_node_ids`, fixed after boot.
        let nr_nodes = unsafe { freehint_nr_node_ids() };
        for nid in 0..nr_nodes {
            // SAFETY: `nid < nr_node_ids`, the range `node_online` accepts.
            if !unsafe { freehint_node_online(nid) } {
                continue;
            }
            // SAFETY: the node is online, so `NODE_DATA(nid)` is its
            // permanent `pglist_data` (`&contig_page_data` without NUMA).
            let pgdat = unsafe { freehint_node_data(nid) }.cast::<bindings::pglist_data>();
            if pgdat.is_null() {
                continue;
            }
            // SAFETY: `pgdat` is valid (above); this computes the address of
            // its `node_zones` array without reading or referencing it.
            let zones = unsafe { core::ptr::addr_of_mut!((*pgdat).node_zones) };
            for i in 0..array_len(zones) {
                // SAFETY: `i < nr_zones`, so the element is in the array.
                let zone = unsafe { zones.cast::<bindings::zone>().add(i) };
                // SAFETY: `zone` is a zone of an online node;
                // `populated_zone` reads `present_pages` only.
                if !unsafe { freehint_zone_populated(zone.cast()) } {
                    continue;
                }
                // INVARIANT: `zone` is in the `pglist_data` of an online node.
                if let Some(ptr) = NonNull::new(zone) {
                    f(&Zone { ptr });
                }
            }
        }
    }

    fn raw(&self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }

    /// `zone->lock`.
    #[cfg(not(freehint_kernel_7_3))]
    fn lock_ptr(&self) -> *mut bindings::spinlock_t {
        // SAFETY: the zone is valid (type invariant); this computes a field
        // address only.
        unsafe { core::ptr::addr_of_mut!((*self.ptr.as_ptr()).lock) }
    }

    /// Pages the zone spans (holes included): an upper bound on the pages
    /// any of its lists can describe.
    pub(crate) fn spanned_pages(&self) -> u64 {
        // SAFETY: the zone is valid (type invariant); `spanned_pages` only
        // changes on memory hotplug, which this kernel does not do. A plain
        // read of an aligned word.
        let pages =
            unsafe { core::ptr::addr_of!((*self.ptr.as_ptr()).spanned_pages).read_volatile() };
        // CAST: `unsigned long` is 64 bits on x86-64.
        pages as u64
    }

    /// Takes `zone->lock` with interrupts disabled, as mm/page_alloc.c does
    /// (`spin_lock_irqsave`): 7.3's `SpinLockIrq` over the zone's own lock,
    /// a C shim on 6.12.
    pub(crate) fn lock(&self) -> ZoneLockGuard<'_> {
        #[cfg(freehint_kernel_7_3)]
        // SAFETY: the zone is valid (type invariant) for as long as `self`
        // is borrowed, which bounds the lock reference and its guard; its
        // `lock` is a `spinlock_t` initialised at boot, the state of a
        // `Lock<(), _>`. The guard unlocks when dropped.
        let held = unsafe {
            kernel::sync::SpinLockIrq::<()>::from_raw(core::ptr::addr_of_mut!(
                (*self.ptr.as_ptr()).lock
            ))
        }
        .lock();
        #[cfg(not(freehint_kernel_7_3))]
        // SAFETY: by the type invariant the zone is valid; its lock was
        // initialised at boot. The matching unlock is in the guard's Drop.
        let held = unsafe { freehint_spin_lock_irqsave(self.lock_ptr()) };
        // INVARIANT: the lock is held and `held` releases it.
        ZoneLockGuard {
            zone: self,
            held,
            taken_ns: now_ns(),
            _not_send: PhantomData,
        }
    }
}

/// `zone->lock` held with interrupts disabled; released on drop.
///
/// # Invariants
///
/// The lock of `zone` is held by this CPU and `held` releases it: the
/// kernel's guard (7.3) or the interrupt state saved when it was taken.
#[must_use = "the zone lock is released when the guard is dropped"]
pub(crate) struct ZoneLockGuard<'a> {
    zone: &'a Zone,
    // 7.3: the kernel's guard, which does its work by being dropped.
    #[cfg_attr(freehint_kernel_7_3, allow(dead_code))]
    held: ZoneHeld<'a>,
    taken_ns: u64,
    /// A spinlock must be released on the CPU that took it.
    _not_send: PhantomData<*mut ()>,
}

impl<'a> ZoneLockGuard<'a> {
    /// Releases the lock and returns for how long it was held (ns).
    pub(crate) fn unlock(self) -> u64 {
        let held = now_ns().saturating_sub(self.taken_ns);
        drop(self);
        held
    }

    /// The free list `free_area[order].free_list[mt]` from its head, or
    /// `None` if `order`/`mt` are out of range.
    pub(crate) fn free_list(&self, order: u32, mt: u32) -> Option<FreeListCursor<'_>> {
        let head = self.head(order, mt)?;
        // SAFETY: the lock is held (type invariant), so `head` and every
        // entry linked from it are valid until the guard (which this cursor
        // borrows) is dropped.
        let first = unsafe { (*head.cast::<bindings::list_head>()).next }.cast::<c_void>();
        Some(self.cursor(first))
    }

    /// Resumes a free list after the lock was dropped, from the block whose
    /// first pfn is `pfn`, which the previous hold visited last.
    ///
    /// No pointer survives an unlock: the page is re-derived from the pfn and
    /// used only if, under this lock hold, it is still the head of a free
    /// block of `order` in this zone (so it is linked in one of this zone's
    /// `free_area[order]` lists). If it moved to another migratetype's list,
    /// the cursor stops at that list's head (every head of this zone stops
    /// it), so it never walks beyond a list. Returns `None` when the block is
    /// gone: the caller restarts the list from its head.
    pub(crate) fn resume_after(&self, order: u32, mt: u32, pfn: Pfn) -> Option<FreeListCursor<'_>> {
        self.head(order, mt)?;
        let pfn = c_ulong::try_from(pfn.raw()).ok()?;
        // SAFETY: `pfn_valid` accepts any pfn.
        if !unsafe { freehint_pfn_valid(pfn) } {
            return None;
        }
        // SAFETY: `pfn` is valid, so its `struct page` exists; without
        // memory hot-remove it stays mapped.
        let page = unsafe { freehint_pfn_to_page(pfn) };
        // SAFETY: `page` is a valid `struct page`; reading its zone link is
        // always allowed.
        if unsafe { freehint_page_zone(page) } != self.zone.raw() {
            return None;
        }
        // SAFETY: `page` is valid; PageBuddy and page_private of a page of
        // this zone are stable while this zone's lock is held (the buddy
        // allocator changes them only under it).
        let is_head = unsafe { freehint_page_buddy(page) }
            // SAFETY: as above.
            && unsafe { freehint_page_private(page) } == order as c_ulong;
        if !is_head {
            return None;
        }
        // SAFETY: a PageBuddy page of this zone is linked through
        // `buddy_list` into a free list of this zone while the lock is held.
        let entry = unsafe { freehint_page_buddy_list(page) };
        // SAFETY: as above, the entry is linked and valid under the lock.
        let next = unsafe { (*entry.cast::<bindings::list_head>()).next }.cast::<c_void>();
        Some(self.cursor(next))
    }

    fn head(&self, order: u32, mt: u32) -> Option<*mut c_void> {
        if order >= nr_orders() || mt >= nr_migrate_types() {
            return None;
        }
        // SAFETY: the zone is valid and `order`/`mt` are in range.
        Some(unsafe { freehint_free_list_head(self.zone.raw(), order, mt) })
    }

    fn cursor(&self, first: *mut c_void) -> FreeListCursor<'_> {
        // Every list head of this zone lies inside `zone->free_area`; an entry
        // in that address range is a head, never a page.
        // SAFETY: the zone is valid; this computes a field address only (no
        // reference to memory other CPUs may be changing).
        let area = unsafe { core::ptr::addr_of!((*self.zone.ptr.as_ptr()).free_area) };
        let start = area as usize;
        let end = start + array_len(area) * core::mem::size_of::<bindings::free_area>();
        FreeListCursor {
            pos: first,
            heads: start..end,
            _guard: PhantomData,
        }
    }
}

impl Drop for ZoneLockGuard<'_> {
    fn drop(&mut self) {
        // On 7.3 `held`, the kernel's guard, unlocks right after this.
        #[cfg(not(freehint_kernel_7_3))]
        // SAFETY: by the type invariant the lock is held by us with `held`.
        unsafe {
            freehint_spin_unlock_irqrestore(self.zone.lock_ptr(), self.held)
        };
    }
}

/// Iterates the first pfns of the free blocks on one buddy free list (the
/// per-CPU lists are walked by `PcpLockGuard::rotate_front` instead).
///
/// # Invariants
///
/// `pos` is an entry of a zone free list (pages linked by `buddy_list`)
/// protected by the `zone->lock` the borrowed guard holds; every head of the
/// zone's free lists lies in `heads`.
pub(crate) struct FreeListCursor<'g> {
    pos: *mut c_void,
    heads: core::ops::Range<usize>,
    _guard: PhantomData<&'g ()>,
}

impl Iterator for FreeListCursor<'_> {
    type Item = Pfn;

    fn next(&mut self) -> Option<Pfn> {
        if self.pos.is_null() || self.heads.contains(&(self.pos as usize)) {
            return None;
        }
        // SAFETY: `pos` is not a head, so it is the link of a free page on a
        // list protected by the held lock, valid while the lock is held (type
        // invariant; the guard outlives `self`).
        let page = unsafe { freehint_buddy_list_page(self.pos) };
        // SAFETY: `page` is a valid `struct page` (above).
        let pfn = unsafe { freehint_page_to_pfn(page) };
        // SAFETY: as above; the successor is linked in the same list.
        self.pos = unsafe { (*self.pos.cast::<bindings::list_head>()).next }.cast();
        // CAST: `unsigned long` is 64 bits on every target this builds for.
        Some(Pfn(pfn as u64))
    }
}

impl Zone {
    /// Calls `f` with each online CPU's per-CPU page lists of this zone.
    pub(crate) fn for_each_pcp(&self, mut f: impl FnMut(&PerCpuPages<'_>)) {
        // CAST: a CPU count fits `c_int`, as it does in C.
        #[cfg(freehint_kernel_7_3)]
        let nr_cpus = kernel::cpu::nr_cpu_ids() as c_int;
        #[cfg(not(freehint_kernel_7_3))]
        // SAFETY: reads `nr_cpu_ids`, fixed after boot.
        let nr_cpus = unsafe { freehint_nr_cpu_ids() } as c_int;
        let mut cpu: c_int = -1;
        loop {
            // SAFETY: `cpumask_next` accepts -1 and any cpu < nr_cpu_ids.
            cpu = unsafe { freehint_next_online_cpu(cpu) };
            if cpu < 0 || cpu >= nr_cpus {
                return;
            }
            // SAFETY: the zone is valid (type invariant) and `cpu` is a
            // possible CPU; its `per_cpu_pages` live as long as the zone.
            let pcp = unsafe { freehint_zone_pcp(self.raw(), cpu) };
            if let Some(ptr) = NonNull::new(pcp) {
                // INVARIANT: a zone's `per_cpu_pages` of a possible CPU.
                f(&PerCpuPages {
                    ptr,
                    _zone: PhantomData,
                });
            }
        }
    }
}

/// One CPU's cache of free pages for one zone (`struct per_cpu_pages`):
/// free pages of order 0..3 that are not on the buddy lists.
///
/// # Invariants
///
/// `ptr` is the `per_cpu_pages` of a possible CPU in a valid zone.
pub(crate) struct PerCpuPages<'z> {
    ptr: NonNull<c_void>,
    _zone: PhantomData<&'z Zone>,
}

impl PerCpuPages<'_> {
    /// Number of lists (`NR_PCP_LISTS`).
    pub(crate) fn nr_lists() -> u32 {
        // SAFETY: returns a compile-time constant of the kernel.
        unsafe { freehint_nr_pcp_lists() }
    }

    /// Order of the pages on list `pindex`.
    pub(crate) fn list_order(pindex: u32) -> u32 {
        // SAFETY: pure arithmetic on kernel constants.
        unsafe { freehint_pcp_pindex_order(pindex) }
    }

    /// Takes `pcp->lock` as the kernel's remote drain does. 7.3: plain
    /// `spin_lock` (`pcp_spin_lock_nopin`; interrupt-context users only
    /// trylock, and on UP never take it), with its `SpinLock` over the
    /// pcp's own lock. 6.12 (C shim): plain `spin_lock` on SMP, irqsave on
    /// UP (`pcp_spin_lock_maybe_irqsave`).
    pub(crate) fn lock(&self) -> PcpLockGuard<'_> {
        #[cfg(freehint_kernel_7_3)]
        // SAFETY: `ptr` is a valid `per_cpu_pages` (type invariant) for as
        // long as `self` is borrowed, which bounds the lock reference and
        // its guard; its `lock` is an initialised `spinlock_t`, the state of
        // a `Lock<(), _>`. The guard unlocks when dropped.
        let held = unsafe {
            kernel::sync::SpinLock::<()>::from_raw(core::ptr::addr_of_mut!(
                (*self.ptr.as_ptr().cast::<bindings::per_cpu_pages>()).lock
            ))
        }
        .lock();
        #[cfg(not(freehint_kernel_7_3))]
        // SAFETY: by the type invariant the lock is initialised.
        let held = unsafe { freehint_pcp_lock(self.ptr.as_ptr()) };
        // INVARIANT: the lock is held; `held` releases it.
        PcpLockGuard {
            pcp: self,
            held,
            taken_ns: now_ns(),
            _not_send: PhantomData,
        }
    }
}

/// `pcp->lock` held; released on drop.
///
/// # Invariants
///
/// The lock of `pcp` is held by this CPU and `held` releases it: the
/// kernel's guard (7.3) or what the C unlock needs.
#[must_use = "the per-CPU lock is released when the guard is dropped"]
pub(crate) struct PcpLockGuard<'a> {
    pcp: &'a PerCpuPages<'a>,
    // 7.3: the kernel's guard, which does its work by being dropped.
    #[cfg_attr(freehint_kernel_7_3, allow(dead_code))]
    held: PcpHeld<'a>,
    taken_ns: u64,
    _not_send: PhantomData<*mut ()>,
}

impl PcpLockGuard<'_> {
    /// Releases the lock and returns for how long it was held (ns).
    pub(crate) fn unlock(self) -> u64 {
        let held = now_ns().saturating_sub(self.taken_ns);
        drop(self);
        held
    }

    /// Pages on all lists of this `per_cpu_pages` (`pcp->count`).
    pub(crate) fn count(&self) -> u64 {
        // SAFETY: the lock is held (type invariant); `pcp` is valid.
        let n = unsafe { freehint_pcp_count(self.pcp.ptr.as_ptr()) };
        // CAST: a negative count would be a kernel bug; read it as empty.
        u64::try_from(n).unwrap_or(0)
    }

    /// The head of list `pindex` and the address range of all heads of this
    /// `per_cpu_pages`, or `None` if `pindex` is out of range.
    fn head(&self, pindex: u32) -> Option<(*mut c_void, core::ops::Range<usize>)> {
        if pindex >= PerCpuPages::nr_lists() {
            return None;
        }
        let pcp = self.pcp.ptr.as_ptr();
        // SAFETY: `pcp` is valid and `pindex` in range.
        let head = unsafe { freehint_pcp_list_head(pcp, pindex) };
        // SAFETY: computes the address of the array of heads; reads nothing.
        let start = unsafe { freehint_pcp_list_head(pcp, 0) } as usize;
        // SAFETY: returns a compile-time size.
        let end = start + unsafe { freehint_pcp_lists_size() };
        Some((head, start..end))
    }

    /// One hold's share of a rotating walk over list `pindex`: visits up to
    /// `budget` entries from the head, calls `f(pfn)` for each, then moves
    /// the visited run, in order, to the tail. Returns the entries visited
    /// and whether the pass is complete.
    ///
    /// Repeated holds walk the whole list without keeping any entry pointer
    /// across an unlock: every hold starts again at the head, where the
    /// entries not visited yet now are. When every entry has moved once, the
    /// list is back in its original order. `pass` keeps the *address* of the
    /// first entry the pass moved; finding it at the head again ends the
    /// pass. That address is only compared, never dereferenced, so a stale
    /// one (the page was allocated meanwhile) is harmless: the caller's
    /// visit limit then ends the pass. The kernel takes pages from, and
    /// adds pages to, both ends of these lists and relies on no order for
    /// correctness (order only decides which pages are reused first).
    pub(crate) fn rotate_front(
        &self,
        pindex: u32,
        budget: u32,
        pass: &mut PcpPass,
        mut f: impl FnMut(Pfn),
    ) -> (u32, bool) {
        let Some((head, heads)) = self.head(pindex) else {
            return (0, true);
        };
        let ends = |pos: *mut c_void| {
            pos.is_null() || heads.contains(&(pos as usize)) || pass.mark == Some(pos as usize)
        };
        // SAFETY: the lock is held (type invariant): the head and the
        // entries linked from it are valid while `self` lives.
        let first = unsafe { (*head.cast::<bindings::list_head>()).next }.cast::<c_void>();
        let (mut pos, mut last, mut n) = (first, first, 0u32);
        while n < budget && !ends(pos) {
            // SAFETY: `pos` is an entry (not a head) of this locked list.
            let page = unsafe { freehint_pcp_list_page(pos) };
            // SAFETY: `page` is a valid `struct page` (above).
            // CAST: `unsigned long` is 64 bits on every target this builds for.
            f(Pfn(unsafe { freehint_page_to_pfn(page) } as u64));
            last = pos;
            n += 1;
            // SAFETY: as above; the successor is linked in the same list.
            pos = unsafe { (*pos.cast::<bindings::list_head>()).next }.cast();
        }
        let done = ends(pos);
        if n > 0 {
            // SAFETY: `first..=last` is a run of `n` consecutive entries of
            // `head`'s list, starting right after the head; the lock is held.
            unsafe { freehint_list_bulk_move_tail(head, first, last) };
            pass.mark.get_or_insert(first as usize);
        }
        (n, done)
    }
}

/// State of one rotating pass over a per-CPU list
/// ([`PcpLockGuard::rotate_front`]): the address of the first entry moved,
/// a token compared by value only.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PcpPass {
    mark: Option<usize>,
}

impl Drop for PcpLockGuard<'_> {
    fn drop(&mut self) {
        // On 7.3 `held`, the kernel's guard, unlocks right after this.
        #[cfg(not(freehint_kernel_7_3))]
        // SAFETY: by the type invariant the lock is held by us.
        unsafe {
            freehint_pcp_unlock(self.pcp.ptr.as_ptr(), self.held)
        };
    }
}

extern "C" {
    // Exported (GPL) by kernel/resource.c; `walk_system_ram_range` is not.
    fn walk_iomem_res_desc(
        desc: c_ulong,
        flags: c_ulong,
        start: u64,
        end: u64,
        arg: *mut c_void,
        func: Option<unsafe extern "C" fn(*mut bindings::resource, *mut c_void) -> c_int>,
    ) -> c_int;
}

/// Collects "System RAM" ranges for [`system_ram_ranges`].
struct RamCollector<'a> {
    out: &'a mut [(u64, u64)],
    len: usize,
    overflow: bool,
}

/// `walk_iomem_res_desc` callback: appends the whole pages of a "System
/// RAM" resource as `(first_pfn, nr_pages)`, merging a range that starts
/// where the previous one ends.
///
/// # Safety
///
/// `res` must point to a valid `struct resource` and `arg` to a live
/// `RamCollector` not otherwise borrowed.
unsafe extern "C" fn collect_ram(res: *mut bindings::resource, arg: *mut c_void) -> c_int {
    // SAFETY: the caller (system_ram_ranges) passes its exclusive collector.
    let c = unsafe { &mut *arg.cast::<RamCollector<'_>>() };
    // SAFETY: `res` is the walker's valid copy of the resource.
    let (start, end) = unsafe { ((*res).start, (*res).end) };
    // Whole pages only, as the kernel's walk_system_ram_range does:
    // PFN_UP(start) .. PFN_DOWN(end + 1).
    let first = start.div_ceil(PAGE_SIZE);
    let last = end.saturating_add(1) / PAGE_SIZE;
    if last <= first {
        return 0;
    }
    let nr = last - first;
    if let Some(prev) = c.len.checked_sub(1).and_then(|i| c.out.get_mut(i)) {
        if prev.0.checked_add(prev.1) == Some(first) {
            prev.1 += nr;
            return 0;
        }
    }
    match c.out.get_mut(c.len) {
        Some(slot) => {
            *slot = (first, nr);
            c.len += 1;
            0
        }
        None => {
            c.overflow = true;
            1 // stops the walk
        }
    }
}

const PAGE_SIZE: u64 = 4096;

/// The kernel's "System RAM" resources as `(first_pfn, nr_pages)` ranges,
/// sorted and with adjacent ranges merged, written to `out`; returns how many.
/// Partial pages at the ends of a resource are left out (as the kernel's own
/// `walk_system_ram_range` does).
pub(crate) fn system_ram_ranges(out: &mut [(u64, u64)]) -> kernel::error::Result<usize> {
    let mut c = RamCollector {
        out,
        len: 0,
        overflow: false,
    };
    let flags = bindings::IORESOURCE_MEM | bindings::IORESOURCE_SYSRAM | bindings::IORESOURCE_BUSY;
    // SAFETY: `collect_ram` matches the callback type; `c` outlives the call
    // and is only accessed through `arg` while the walk runs.
    let ret = unsafe {
        walk_iomem_res_desc(
            bindings::IORES_DESC_NONE as c_ulong,
            flags as c_ulong,
            0,
            u64::MAX,
            core::ptr::addr_of_mut!(c).cast(),
            Some(collect_ram),
        )
    };
    if c.overflow {
        kernel::pr_err!("freehint: more System RAM ranges than a layout can hold\n");
        return Err(kernel::error::code::E2BIG);
    }
    if ret < 0 || c.len == 0 {
        kernel::pr_err!("freehint: no System RAM found ({})\n", ret);
        return Err(kernel::error::code::ENODEV);
    }
    Ok(c.len)
}
