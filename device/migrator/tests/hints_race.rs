//! Free page hints racing with page reuse: no page in use may be lost.
//!
//! The guest is simulated inside the hint source, so the run is
//! deterministic: each time the engine asks for hints the guest reports
//! its free pages (walked right after the latest dirty-log sync, as the
//! invariant requires) and then allocates, rewrites and frees some pages.
//! Scripted: right after the first report, the guest reuses a page it has
//! just reported free and never touches it again.

mod common;

use std::thread;
use std::time::Duration;

use common::*;
use freehint_migrate::{
    Engine, HintSource, HookError, PageBitmap, PageBits, Policy, RamLayout, SharedLog,
};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use vm_memory::GuestMemoryMmap;

/// The guest: which pages are in use, and how it changes them.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    layout: &'a RamLayout,
    log: SharedLog,
    in_use: PageBitmap,
    rng: SmallRng,
    generation: u64,
    /// The page reused right after the first report.
    reused: Option<u64>,
}

impl Guest<'_> {
    /// Even pages in use; odd pages free but dirty (used, then freed).
    fn boot(&mut self) {
        for page in 0..self.layout.total_pages() {
            write_page(self.mem, self.layout, page, &contents(page, 0));
            self.in_use.set(page as usize, page % 2 == 0);
        }
    }

    fn write(&mut self, page: u64) {
        self.generation += 1;
        write_page(
            self.mem,
            self.layout,
            page,
            &contents(page, self.generation),
        );
        self.log.mark(page as usize);
    }

    /// A few allocations, rewrites and frees, away from the scripted page.
    fn run(&mut self) {
        for _ in 0..4 {
            let page = self.rng.random_range(0..self.layout.total_pages());
            if Some(page) == self.reused {
                continue;
            }
            let used = self.in_use[page as usize];
            if used && self.rng.random_bool(0.5) {
                self.in_use.set(page as usize, false);
            } else {
                self.in_use.set(page as usize, true);
                self.write(page);
            }
        }
    }

    /// Reuses the highest free page (one the bulk pass has not reached).
    fn reuse_a_reported_page(&mut self) {
        let page = self.in_use.last_zero().expect("a free page") as u64;
        self.in_use.set(page as usize, true);
        self.write(page);
        self.reused = Some(page);
    }
}

/// Reports the free pages walked after the latest sync, once per epoch
/// (so a stale hint could only come from the engine keeping it); with
/// `stale` it walks only once and reports that first walk in every epoch
/// (the bug the invariant forbids).
struct FreeListWalk<'a> {
    guest: Guest<'a>,
    hints: PageBitmap,
    walks: u32,
    stale: bool,
    unreported: bool,
}

impl HintSource for FreeListWalk<'_> {
    fn on_sync(&mut self, _epoch: u64) {
        if self.walks == 0 || !self.stale {
            self.hints = !self.guest.in_use.clone();
            self.walks += 1;
        }
        self.unreported = true;
    }

    fn mark_free(&mut self, free: &mut PageBits) -> Result<(), HookError> {
        if std::mem::take(&mut self.unreported) {
            *free |= &self.hints[..];
        }
        if self.guest.reused.is_none() {
            self.guest.reuse_a_reported_page();
        } else {
            self.guest.run();
        }
        Ok(())
    }
}

struct Outcome {
    reused: u64,
    lost: Vec<u64>,
    hinted_in_bulk: u64,
}

fn migrate(stale: bool) -> Outcome {
    let (src, dst) = (pc_memory::<()>(), pc_memory::<()>());
    let policy = Policy {
        downtime: Duration::ZERO,
        min_shrink: 0.0,
        stall_passes: 0,
        max_passes: 3,
    };
    let engine = Engine::new(&src).unwrap().with_policy(policy);
    let layout = engine.layout().clone();
    let pages = layout.total_pages() as usize;
    let log = SharedLog::new(pages);
    let mut guest = Guest {
        mem: &src,
        layout: &layout,
        log: log.clone(),
        in_use: PageBitmap::repeat(false, pages),
        rng: SmallRng::seed_from_u64(11),
        generation: 0,
        reused: None,
    };
    guest.boot();
    let mut walk = FreeListWalk {
        guest,
        hints: PageBitmap::repeat(false, pages),
        walks: 0,
        stale,
        unreported: false,
    };
    let sent = thread::scope(|s| {
        let (stream, receiver) = spawn_receiver(s, into_memory(&dst));
        let pause = || -> Result<(), HookError> { Ok(()) };
        let sent = engine
            .run(stream, log, &mut walk, pause, |_: &_| {})
            .unwrap();
        receiver.join().unwrap().unwrap();
        sent
    });
    let in_use = walk.guest.in_use.iter_ones().map(|page| page as u64);
    Outcome {
        reused: walk.guest.reused.unwrap(),
        lost: differing(&src, &dst, &layout, in_use),
        hinted_in_bulk: sent.passes[0].hinted_pages,
    }
}

#[test]
fn pages_reused_after_a_hint_are_not_lost() {
    let outcome = migrate(false);
    assert!(
        outcome.hinted_in_bulk >= 600,
        "hints skipped pages: {}",
        outcome.hinted_in_bulk
    );
    assert_eq!(
        outcome.lost,
        Vec::<u64>::new(),
        "pages in use that differ after migration"
    );
}

/// Negative control: hints kept across a sync lose the reused page.
#[test]
fn stale_hints_lose_the_reused_page() {
    let outcome = migrate(true);
    assert!(
        outcome.lost.contains(&outcome.reused),
        "page {} survived: {:?}",
        outcome.reused,
        outcome.lost
    );
}
