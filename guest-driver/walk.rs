// SPDX-License-Identifier: GPL-2.0

//! The free-list walk: turns every buddy free list of every populated zone,
//! and then (unless turned off) every per-CPU page list of the zone, into
//! bits of a free-page bitmap.
//!
//! No raw kernel access here: zones, locks and lists come from `zone.rs`.
//!
//! # Bounded interrupts-off time
//!
//! `zone->lock` is taken with interrupts disabled, so one hold must stay
//! short. The walk takes the lock once per list and drops it again after at
//! most [`Walker::budget`] entries; a long list (idle guests keep most memory
//! in a few thousand order-10 blocks on one list) is walked in several holds.
//! Between holds the scheduler may run (`cond_resched` between zones).
//!
//! # Resuming a list without a dangling pointer
//!
//! When a hold ends mid-list, only the first pfn of the last visited block is
//! kept (a number). The next hold asks `ZoneLockGuard::resume_after` to
//! re-derive the page from the pfn and check, under the new hold, that it is
//! still a free block head of the same order in the same zone; only then does
//! the walk continue from its successor. Otherwise the list restarts from its
//! head (already-marked blocks are marked again; setting a bit twice is
//! harmless). Restarts per list are capped ([`MAX_RESTARTS`]); a list that
//! keeps changing under heavy churn is then left partly walked, which only
//! loses hints (counted in `lists_truncated`).
//!
//! # Why a union of snapshots is still a correct hint
//!
//! Every bit is set while the lock is held and the block it describes is on
//! a free list at that instant. Blocks allocated between holds stay marked,
//! so the bitmap is the union of several snapshots, not one. That is fine:
//! a hint is a statement about the past, and the host applies it only to
//! pages whose dirty logging was already on before the hint round began, so
//! a page reused after being marked is dirtied and sent again (design.md,
//! "Correctness invariant"). A block freed between holds may be missed: a
//! lost hint, never a lost page.

use crate::bitmap;
use crate::layout::{Layout, Pfn};
use crate::zone::{self, PcpPass, PerCpuPages, Zone};

/// Default budget of free-list entries visited per lock hold.
pub(crate) const DEFAULT_BUDGET: u32 = 256;
/// Largest budget accepted from the diagnostic interface.
pub(crate) const MAX_BUDGET: u32 = 1 << 16;
/// Restarts from the head allowed per list before giving it up (visits are
/// also capped at twice the blocks the zone could hold, see `walk_list`).
pub(crate) const MAX_RESTARTS: u32 = 8;

/// Figures of one bitmap build.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BuildStats {
    /// Populated zones walked.
    pub(crate) zones: u64,
    /// Free lists walked (zones × orders × migrate types).
    pub(crate) lists: u64,
    /// Free blocks visited (a block re-visited after a restart counts twice).
    pub(crate) blocks: u64,
    /// Pages of visited blocks that lie outside the layout (not RAM per the
    /// layout; should stay 0).
    pub(crate) pages_outside_layout: u64,
    /// `zone->lock` acquisitions.
    pub(crate) lock_acquisitions: u64,
    /// Lists resumed from a kept pfn after a lock drop.
    pub(crate) resumes: u64,
    /// Lists restarted from their head because the kept block was gone.
    pub(crate) restarts: u64,
    /// Lists left partly walked after [`MAX_RESTARTS`].
    pub(crate) lists_truncated: u64,
    /// Walk time, from the first lock to the last unlock (ns).
    pub(crate) walk_ns: u64,
    /// Longest single hold of a zone lock (ns).
    pub(crate) max_lock_hold_ns: u64,
    /// Sum of all lock holds (ns).
    pub(crate) total_lock_hold_ns: u64,
    /// Per-CPU lists walked.
    pub(crate) pcp_lists: u64,
    /// Blocks found on per-CPU lists.
    pub(crate) pcp_blocks: u64,
    /// Per-CPU list passes ended by their visit limit (churn).
    pub(crate) pcp_lists_capped: u64,
    /// `pcp->lock` acquisitions.
    pub(crate) pcp_holds: u64,
    /// Longest hold of a per-CPU lock (ns; interrupts stay on).
    pub(crate) max_pcp_hold_ns: u64,
    /// Zone lock holds by duration: < 10 µs, < 50 µs, < 200 µs, < 1 ms, more.
    pub(crate) hold_hist: [u64; 5],
}

/// Upper bounds (ns) of the first buckets of [`BuildStats::hold_hist`].
pub(crate) const HOLD_HIST_NS: [u64; 4] = [10_000, 50_000, 200_000, 1_000_000];

/// Walks the free lists into a bitmap with a fixed entry budget per lock hold.
pub(crate) struct Walker<'a> {
    layout: &'a Layout,
    words: &'a mut [u64],
    budget: u32,
    pcp: bool,
    stats: BuildStats,
}

impl<'a> Walker<'a> {
    /// A walker over `words` (already zeroed), which must hold
    /// `layout.total_bits()` bits; `budget` entries per lock hold (≥ 1).
    /// With `pcp`, the per-CPU page lists are walked too.
    pub(crate) fn new(layout: &'a Layout, words: &'a mut [u64], budget: u32, pcp: bool) -> Self {
        Self {
            layout,
            words,
            budget: budget.clamp(1, MAX_BUDGET),
            pcp,
            stats: BuildStats::default(),
        }
    }

    /// Walks every free list of every populated zone of every online node.
    pub(crate) fn run(mut self) -> BuildStats {
        let t0 = zone::now_ns();
        let (orders, mts) = (zone::nr_orders(), zone::nr_migrate_types());
        Zone::for_each_populated(|z| {
            self.stats.zones += 1;
            for order in 0..orders {
                for mt in 0..mts {
                    self.walk_list(z, order, mt);
                }
            }
            if self.pcp {
                z.for_each_pcp(|pcp| self.walk_pcp(pcp));
            }
            // No guard is alive here: every hold ended inside walk_list.
            zone::cond_resched();
        });
        self.stats.walk_ns = zone::now_ns().saturating_sub(t0);
        self.stats
    }

    /// Walks `free_area[order].free_list[mt]` of `z` in holds of at most
    /// `budget` entries.
    fn walk_list(&mut self, z: &Zone, order: u32, mt: u32) {
        self.stats.lists += 1;
        let block_pages = 1u64 << order;
        // First pfn of the last block visited by the previous hold: a number,
        // never a pointer, so nothing is dereferenced across an unlock.
        let mut resume: Option<Pfn> = None;
        let mut restarts = 0;
        // A list cannot hold more blocks than fit in the zone; visiting twice
        // that many means churn keeps moving the kept block back up the list.
        // Stop there, so the walk always ends (the rest is a lost hint).
        let max_visits = (z.spanned_pages() >> order)
            .saturating_mul(2)
            .saturating_add(u64::from(self.budget));
        let mut visits = 0u64;
        loop {
            let guard = z.lock();
            self.stats.lock_acquisitions += 1;
            let cursor = match resume {
                None => guard.free_list(order, mt),
                Some(pfn) => {
                    self.stats.resumes += 1;
                    match guard.resume_after(order, mt, pfn) {
                        Some(c) => Some(c),
                        None => {
                            self.stats.restarts += 1;
                            restarts += 1;
                            if restarts > MAX_RESTARTS {
                                self.stats.lists_truncated += 1;
                                None
                            } else {
                                guard.free_list(order, mt)
                            }
                        }
                    }
                }
            };
            let mut next_resume = None;
            if let Some(cursor) = cursor {
                let mut visited = 0u32;
                for pfn in cursor {
                    self.mark(pfn, block_pages);
                    visited += 1;
                    if visited >= self.budget {
                        next_resume = Some(pfn);
                        break;
                    }
                }
                visits += u64::from(visited);
            }
            // The cursor (and with it every list pointer) is gone; only the
            // pfn in `next_resume` crosses the unlock.
            let held = guard.unlock();
            self.stats.total_lock_hold_ns += held;
            self.stats.max_lock_hold_ns = self.stats.max_lock_hold_ns.max(held);
            let bucket = HOLD_HIST_NS.iter().take_while(|&&b| held >= b).count();
            if let Some(n) = self.stats.hold_hist.get_mut(bucket) {
                *n += 1;
            }
            match next_resume {
                Some(_) if visits >= max_visits => {
                    self.stats.lists_truncated += 1;
                    return;
                }
                Some(pfn) => resume = Some(pfn),
                None => return,
            }
        }
    }

    /// Walks one CPU's page lists of a zone: free pages of order 0..3
    /// cached per CPU instead of on the buddy lists (after a process frees
    /// a large mapping, hundreds of MiB can sit here: `pcp->high` may grow
    /// to 1/8 of the zone). Each list is walked as one rotating pass in
    /// holds of at most `budget` entries (`PcpLockGuard::rotate_front`: no
    /// pointer survives an unlock), ended when it comes round to its first
    /// moved entry, or after as many entries as the lists held pages when
    /// the pass began plus one budget (`pcp_lists_capped`: churn; the rest
    /// is a lost hint).
    fn walk_pcp(&mut self, pcp: &PerCpuPages<'_>) {
        for pindex in 0..PerCpuPages::nr_lists() {
            let order = PerCpuPages::list_order(pindex);
            let block_pages = 1u64 << order;
            self.stats.pcp_lists += 1;
            let mut pass = PcpPass::default();
            // Entries this pass may visit: the list's length when the pass
            // began, plus one budget.
            let mut pass_limit = None;
            let mut visits = 0u64;
            loop {
                let guard = pcp.lock();
                self.stats.pcp_holds += 1;
                let limit = *pass_limit
                    .get_or_insert_with(|| (guard.count() >> order) + u64::from(self.budget));
                // CAST: at most `self.budget`, a u32.
                let budget = limit.saturating_sub(visits).min(u64::from(self.budget)) as u32;
                let (n, done) = guard.rotate_front(pindex, budget, &mut pass, |pfn| {
                    self.stats.pcp_blocks += 1;
                    self.mark(pfn, block_pages);
                });
                let held = guard.unlock();
                self.stats.max_pcp_hold_ns = self.stats.max_pcp_hold_ns.max(held);
                visits += u64::from(n);
                if done {
                    break;
                }
                if visits >= limit {
                    self.stats.pcp_lists_capped += 1;
                    break;
                }
                // No lock is held between holds.
                zone::cond_resched();
            }
        }
    }

    /// Marks the block `[pfn, pfn + pages)` free, a run of bits at a time.
    fn mark(&mut self, pfn: Pfn, pages: u64) {
        self.stats.blocks += 1;
        let mut inside = 0u64;
        let words = &mut *self.words;
        self.layout.for_each_bit_run(pfn, pages, |bit, nr| {
            // The bitmap holds total_bits() bits, so nothing is ignored.
            bitmap::set_bit_run(words, bit.raw(), nr);
            inside += nr;
        });
        self.stats.pages_outside_layout += pages - inside;
    }
}
