// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The correctness invariant under races: a page reported free and then
//! reused while a hint round is in progress is never lost.
//!
//! Model: a guest with a page allocator (the "zone lock"), page contents
//! (a version number per page) and a dirty log (set on every write, as dirty
//! logging does); a guest balloon driver that answers hint rounds through
//! real virtqueues (standard protocol or bitmap protocol, via the driver
//! model); a migrator that keeps a to-send bitmap, sends pages (copies the
//! version to a destination), applies hints, and at every dirty bitmap sync
//! calls `new_epoch()` first, then syncs, then (maybe after applying hints
//! once more) starts a new round. At the end the guest stops, a final sync
//! sends everything left, and every page in use must have the same version
//! on the destination as on the source.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freehint_device::balloon::*;
use freehint_device::test_utils::*;
use freehint_protocol::bitmap::{set_bit_run, words_for_bits};
use freehint_protocol::bitmap_hint::Message;
use freehint_protocol::layout::Pfn;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

const PAGES: u64 = 2048;

/// The guest's memory as far as migration is concerned.
struct Guest {
    /// The allocator state under the zone lock: `true` = in use.
    zone: Mutex<Vec<bool>>,
    content: Vec<AtomicU64>,
    dirty: Vec<AtomicU64>,
    /// Dirty logging is on (between migration attempts it is off).
    logging: AtomicBool,
}

impl Guest {
    fn new() -> Self {
        Self {
            zone: Mutex::new(vec![false; PAGES as usize]),
            content: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
            dirty: (0..words_for_bits(PAGES))
                .map(|_| AtomicU64::new(0))
                .collect(),
            logging: AtomicBool::new(true),
        }
    }

    /// A store to page `p`: new content, and the dirty log records it if
    /// dirty logging is on.
    fn write(&self, p: u64) {
        self.content[p as usize].fetch_add(1, Ordering::SeqCst);
        if self.logging.load(Ordering::SeqCst) {
            self.dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::SeqCst);
        }
    }

    /// Allocates `p` if free (and writes it, as every user of a page does).
    fn alloc(&self, p: u64) -> bool {
        let fresh = {
            let mut z = self.zone.lock().unwrap();
            !std::mem::replace(&mut z[p as usize], true)
        };
        if fresh {
            self.write(p);
        }
        fresh
    }

    fn free(&self, p: u64) {
        self.zone.lock().unwrap()[p as usize] = false;
    }

    /// Walks the free "lists" under the zone lock: runs of free pfns.
    fn free_runs(&self) -> Vec<(u64, u64)> {
        let z = self.zone.lock().unwrap();
        let mut runs = Vec::new();
        let mut p = 0u64;
        while p < PAGES {
            if z[p as usize] {
                p += 1;
                continue;
            }
            let s = p;
            while p < PAGES && !z[p as usize] {
                p += 1;
            }
            runs.push((s, p - s));
        }
        runs
    }
}

/// The migrator's side: to-send bitmap, destination contents and the token
/// of the current epoch.
struct Migrator {
    token: EpochToken,
    to_send: Vec<u64>,
    dest: Vec<u64>,
    /// Bits cleared by hints in the current epoch.
    hinted: Vec<u64>,
    cleared_total: u64,
    /// Pages hinted and then found dirty at the next sync (the race
    /// actually happened).
    reused_after_hint: u64,
}

impl Migrator {
    /// Dirty logging is on: the first epoch opens, with everything to send.
    fn new(h: &HintHandle) -> Self {
        let w = words_for_bits(PAGES);
        Self {
            token: h.new_epoch(),
            to_send: vec![!0u64; w],
            dest: vec![0; PAGES as usize],
            hinted: vec![0; w],
            cleared_total: 0,
            reused_after_hint: 0,
        }
    }

    fn apply(&mut self, h: &HintHandle, via_snapshot: bool) {
        let before = self.to_send.clone();
        let n = if via_snapshot {
            h.snapshot()
                .apply_to(&self.token, &mut self.to_send)
                .unwrap()
        } else {
            h.apply_to(&self.token, &mut self.to_send).unwrap()
        };
        for (i, (b, a)) in before.iter().zip(&self.to_send).enumerate() {
            self.hinted[i] |= b & !a;
        }
        self.cleared_total += n;
    }

    fn send_some(&mut self, g: &Guest, rng: &mut SmallRng, percent: u64) {
        for p in 0..PAGES {
            let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
            if self.to_send[w] & b != 0 && rng.random_range(0..100) < percent {
                self.dest[p as usize] = g.content[p as usize].load(Ordering::SeqCst);
                self.to_send[w] &= !b;
            }
        }
    }

    /// Dirty bitmap sync: `new_epoch()` first, then fetch-and-clear the log.
    /// Returns the token of the epoch that ended.
    fn sync(&mut self, g: &Guest, h: &HintHandle) -> EpochToken {
        let old = std::mem::replace(&mut self.token, h.new_epoch());
        for (i, d) in g.dirty.iter().enumerate() {
            let bits = d.swap(0, Ordering::SeqCst);
            self.reused_after_hint += u64::from((bits & self.hinted[i]).count_ones());
            self.to_send[i] |= bits;
        }
        self.hinted.fill(0);
        old
    }

    fn start_round(&self, h: &HintHandle) -> Result<u32, HintError> {
        h.start_round(&self.token)
    }

    fn must_send(&self, p: u64) -> bool {
        self.to_send[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    fn final_check(&mut self, g: &Guest, h: &HintHandle) -> Result<(), String> {
        self.sync(g, h);
        let mut rng = SmallRng::seed_from_u64(1);
        self.send_some(g, &mut rng, 100);
        let z = g.zone.lock().unwrap();
        for p in 0..PAGES as usize {
            let src = g.content[p].load(Ordering::SeqCst);
            if z[p] && self.dest[p] != src {
                return Err(format!(
                    "page {p} in use lost: destination has version {}, source {src}",
                    self.dest[p]
                ));
            }
        }
        Ok(())
    }
}

fn driver(bitmap: bool) -> BalloonDriver {
    let layout = Layout::from_ram_pfn_ranges(&[(0, PAGES)]).unwrap();
    let mut feats = feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    if bitmap {
        feats |= feature(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP);
    }
    BalloonDriver::new(BalloonConfig::all_features(layout), feats, 64)
}

/// The guest driver's work for one round, split so sends can interleave.
enum Pending {
    Blocks(Vec<(u64, u64)>),
    Chunks { words: Vec<u64>, next_bit: u64 },
}

struct Hinter {
    drv: BalloonDriver,
    bitmap: bool,
    active: u32,
    pending: Option<(u32, Pending)>,
}

impl Hinter {
    /// Config interrupt: a new id starts a round; the free lists are walked
    /// only after the id was seen.
    fn poll(&mut self, g: &Guest) {
        let id = self.drv.config().free_page_hint_cmd_id;
        if id < FREE_PAGE_HINT_CMD_ID_MIN || id == self.active {
            return;
        }
        self.active = id;
        if self.bitmap {
            let Some(reply) = self.drv.layout_query(id) else {
                return;
            };
            let runs = g.free_runs();
            let mut words = vec![0u64; words_for_bits(reply.layout.total_bits())];
            for (pfn, nr) in runs {
                reply.layout.for_each_bit_run(Pfn(pfn), nr, |b, n| {
                    set_bit_run(&mut words, b.raw(), n);
                });
            }
            self.pending = Some((id, Pending::Chunks { words, next_bit: 0 }));
        } else {
            self.drv.send_cmd_id(id);
            self.pending = Some((id, Pending::Blocks(g.free_runs())));
        }
    }

    /// Sends up to `n` more pieces; ends the round when nothing is left.
    fn send(&mut self, n: usize) {
        let Some((id, p)) = self.pending.as_mut() else {
            return;
        };
        let id = *id;
        let mut done = false;
        match p {
            Pending::Blocks(runs) => {
                for _ in 0..n {
                    match runs.pop() {
                        Some((pfn, nr)) => {
                            self.drv.send_block(pfn << 12, (nr << 12) as u32);
                        }
                        None => {
                            done = true;
                            break;
                        }
                    }
                }
            }
            Pending::Chunks { words, next_bit } => {
                for _ in 0..n {
                    let total = PAGES;
                    if *next_bit >= total {
                        done = true;
                        break;
                    }
                    let nr = (total - *next_bit).min(256) as u32;
                    self.drv.send_chunk(id, words, *next_bit, nr);
                    *next_bit += u64::from(nr);
                }
            }
        }
        if done {
            if self.bitmap {
                let end = Message::RoundEnd {
                    cmd_id: id,
                    free_pages: 0,
                };
                self.drv.send_msg(&end.header(), &[], 0, 0);
            } else {
                self.drv.send_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
            }
            self.pending = None;
        }
    }
}

fn threaded(bitmap: bool, seed: u64, duration: Duration) -> Migrator {
    let guest = Arc::new(Guest::new());
    let drv = driver(bitmap);
    let h = drv.hints();
    let stop = Arc::new(AtomicBool::new(false));

    // Half the guest starts in use.
    for p in (0..PAGES).step_by(2) {
        guest.alloc(p);
    }

    let mutator = {
        let (g, stop) = (guest.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(seed | 1);
            while !stop.load(Ordering::Relaxed) {
                let p = rng.random_range(0..PAGES);
                if !g.alloc(p) {
                    match rng.random_range(0..10) {
                        0..=5 => g.write(p),
                        _ => g.free(p),
                    }
                }
                if rng.random_range(0..64) == 0 {
                    std::thread::yield_now();
                }
            }
        })
    };
    let hinter = {
        let (g, stop) = (guest.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut hi = Hinter {
                drv,
                bitmap,
                active: 0,
                pending: None,
            };
            while !stop.load(Ordering::Relaxed) {
                hi.poll(&g);
                hi.send(2);
                std::thread::yield_now();
            }
            hi.drv.handle().metrics().snapshot()
        })
    };

    let mut m = Migrator::new(&h);
    let mut rng = SmallRng::seed_from_u64(seed.rotate_left(17) | 1);
    let start = Instant::now();
    m.start_round(&h).unwrap();
    let mut it = 0u64;
    while start.elapsed() < duration {
        for _ in 0..4 {
            std::thread::sleep(Duration::from_micros(200));
            m.apply(&h, rng.random_range(0..2) == 0);
            m.send_some(&guest, &mut rng, 20);
        }
        m.sync(&guest, &h);
        // Between the sync and the next round: the guest may still be
        // sending hints of the round the sync ended; none may clear a page.
        m.apply(&h, rng.random_range(0..2) == 0);
        m.start_round(&h).unwrap();
        it += 1;
    }
    stop.store(true, Ordering::Relaxed);
    mutator.join().unwrap();
    let metrics = hinter.join().unwrap();
    m.final_check(&guest, &h).unwrap();
    eprintln!(
        "bitmap={bitmap} iterations={it} cleared_by_hints={} reused_after_hint={} metrics={}",
        m.cleared_total,
        m.reused_after_hint,
        metrics.to_json()
    );
    assert!(it > 5);
    m
}

/// Runs four seeded threaded races for one protocol and asserts they were
/// not vacuous: hints cleared pages and pages were reused after a hint.
fn race_four_seeds(bitmap: bool, seed_step: u64) {
    let mut cleared = 0;
    let mut reused = 0;
    for seed in 1..=4u64 {
        let m = threaded(bitmap, seed * seed_step, Duration::from_millis(400));
        cleared += m.cleared_total;
        reused += m.reused_after_hint;
    }
    assert!(
        cleared > 0,
        "hints cleared nothing: the test would be vacuous"
    );
    assert!(reused > 0, "no page was reused after being hinted");
}

#[test]
fn race_reuse_against_standard_rounds_never_loses_a_page() {
    race_four_seeds(false, 0x9e37_79b9);
}

#[test]
fn race_reuse_against_bitmap_rounds_never_loses_a_page() {
    race_four_seeds(true, 0x85eb_ca6b);
}

/// Why the epoch rule exists: a set taken before a sync would clear a page
/// that was reused between the hint and the sync. The device refuses it.
#[test]
fn stale_set_would_lose_a_reused_page_and_is_refused() {
    let g = Guest::new();
    let mut drv = driver(false);
    let h = drv.hints();
    let mut m = Migrator::new(&h);
    m.send_some(&g, &mut SmallRng::seed_from_u64(3), 100); // bulk phase sent everything
    let id = m.start_round(&h).unwrap();
    drv.send_cmd_id(id);
    drv.send_block(5 << 12, 4096); // page 5 is free
    let set = h.snapshot();
    assert!(g.alloc(5)); // reused: written, dirty
    let old_token = m.sync(&g, &h); // to_send now has page 5
    assert!(m.must_send(5));
    // Naively applying the old set would clear page 5 and lose it.
    let mut naive = m.to_send.clone();
    naive[0] &= !set.words()[0];
    assert_eq!(naive[0] & (1 << 5), 0);
    // The device's rule refuses, with the old token and with the new one.
    for token in [&old_token, &m.token] {
        assert!(matches!(
            set.apply_to(token, &mut m.to_send),
            Err(HintError::StaleEpoch { .. })
        ));
    }
    assert!(m.must_send(5));
    m.final_check(&g, &h).unwrap();
}

/// Hints applied after a sync but before the next round starts (the guest
/// may still be sending the old round's hints) clear nothing: the sync's
/// `new_epoch()` discarded the set, so a page hinted, reused and synced is
/// still sent.
#[test]
fn hints_applied_between_sync_and_next_round_keep_a_reused_page() {
    let g = Guest::new();
    let mut drv = driver(false);
    let h = drv.hints();
    let mut m = Migrator::new(&h);
    m.send_some(&g, &mut SmallRng::seed_from_u64(3), 100);
    let id = m.start_round(&h).unwrap();
    drv.send_cmd_id(id);
    drv.send_block(0, 64 << 12); // pages 0..64 are free
    assert!(g.alloc(5)); // reused: written, dirty
    m.sync(&g, &h);
    assert!(m.must_send(5));
    drv.send_block(64 << 12, 64 << 12); // a late hint of the old round
    m.apply(&h, false);
    m.apply(&h, true);
    assert!(
        m.must_send(5),
        "a hint of the old round cleared a reused page"
    );
    assert_eq!(m.cleared_total, 0);
    m.start_round(&h).unwrap();
    m.final_check(&g, &h).unwrap();
}

/// Two migration attempts. Attempt 1 starts a round and the guest hints
/// pages 0..1024; then the migration ends early (`end`: cancelled with
/// `stop()`, or given up with `finish()`). With dirty logging off, the guest
/// reuses page 5. Attempt 2 turns dirty logging on and starts over: nothing
/// of attempt 1 (its token, its set) can clear page 5 or start a round, and
/// attempt 2's own epoch starts with no hints, so page 5 is sent.
fn second_attempt_sends_a_page_reused_in_between(end: fn(&HintHandle)) {
    let g = Guest::new();
    let mut drv = driver(false);
    let h = drv.hints();
    // Attempt 1.
    let m1 = Migrator::new(&h);
    let id = m1.start_round(&h).unwrap();
    let rep = drv.on_config_change(&[0]); // one 4 MiB block: pages 0..1024
    assert_eq!((rep.cmd_id, rep.blocks_sent), (id, 1));
    assert_eq!(h.status().free_pages, 1024);
    let set1 = h.snapshot();
    assert!(set1.contains(5));
    end(&h);
    // Between attempts: dirty logging is off, the guest reuses page 5.
    g.logging.store(false, Ordering::SeqCst);
    assert!(g.alloc(5));
    g.logging.store(true, Ordering::SeqCst);
    // Attempt 2, with dirty logging on again: what is left of attempt 1 is
    // refused...
    let mut to_send = vec![!0u64; words_for_bits(PAGES)];
    let stale = |r: Result<u64, HintError>| matches!(r, Err(HintError::StaleEpoch { .. }));
    assert!(stale(h.apply_to(&m1.token, &mut to_send)));
    assert!(stale(set1.apply_to(&m1.token, &mut to_send)));
    assert!(matches!(
        h.start_round(&m1.token),
        Err(HintError::StaleEpoch { .. })
    ));
    assert_eq!(to_send, vec![!0u64; words_for_bits(PAGES)]);
    // ... and its own first epoch has no hints.
    let mut m2 = Migrator::new(&h);
    assert!(stale(set1.apply_to(&m2.token, &mut m2.to_send)));
    assert_eq!(h.apply_to(&m2.token, &mut m2.to_send), Ok(0));
    assert!(m2.must_send(5), "page 5 would never be sent");
    m2.final_check(&g, &h).unwrap();
}

#[test]
fn cancelled_migration_hints_never_reach_the_next_attempt() {
    second_attempt_sends_a_page_reused_in_between(HintHandle::stop);
}

#[test]
fn finished_migration_hints_never_reach_the_next_attempt() {
    second_attempt_sends_a_page_reused_in_between(HintHandle::finish);
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(u64),
    Free(u64),
    Write(u64),
    Poll,
    Send(usize),
    Apply(bool),
    SendSome(u64),
    /// `new_epoch()` and the dirty log sync, then a new round.
    Sync,
    /// `new_epoch()` and the dirty log sync only: applies may follow
    /// before [`Op::StartRound`].
    SyncOnly,
    StartRound,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES).prop_map(Op::Alloc),
        3 => (0..PAGES).prop_map(Op::Free),
        3 => (0..PAGES).prop_map(Op::Write),
        2 => Just(Op::Poll),
        3 => (1usize..4).prop_map(Op::Send),
        2 => any::<bool>().prop_map(Op::Apply),
        2 => (0u64..100).prop_map(Op::SendSome),
        1 => Just(Op::Sync),
        1 => Just(Op::SyncOnly),
        1 => Just(Op::StartRound),
    ]
}

fn run_ops(bitmap: bool, ops: &[Op]) -> Result<(), String> {
    let g = Guest::new();
    for p in (0..PAGES).step_by(3) {
        g.alloc(p);
    }
    let drv = driver(bitmap);
    let h = drv.hints();
    let mut hi = Hinter {
        drv,
        bitmap,
        active: 0,
        pending: None,
    };
    let mut m = Migrator::new(&h);
    let mut rng = SmallRng::seed_from_u64(7);
    m.start_round(&h).map_err(|e| e.to_string())?;
    for op in ops {
        match *op {
            Op::Alloc(p) => {
                g.alloc(p);
            }
            Op::Free(p) => g.free(p),
            Op::Write(p) => {
                if g.zone.lock().unwrap()[p as usize] {
                    g.write(p)
                }
            }
            Op::Poll => hi.poll(&g),
            Op::Send(n) => hi.send(n),
            Op::Apply(snap) => m.apply(&h, snap),
            Op::SendSome(pct) => m.send_some(&g, &mut rng, pct),
            Op::Sync => {
                m.sync(&g, &h);
                m.start_round(&h).map_err(|e| e.to_string())?;
            }
            Op::SyncOnly => {
                m.sync(&g, &h);
            }
            Op::StartRound => {
                m.start_round(&h).map_err(|e| e.to_string())?;
            }
        }
    }
    m.final_check(&g, &h)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_never_lose_a_page_standard(ops in proptest::collection::vec(op(), 1..120)) {
        prop_assert_eq!(run_ops(false, &ops), Ok(()));
    }

    #[test]
    fn interleavings_never_lose_a_page_bitmap(ops in proptest::collection::vec(op(), 1..120)) {
        prop_assert_eq!(run_ops(true, &ops), Ok(()));
    }
}
