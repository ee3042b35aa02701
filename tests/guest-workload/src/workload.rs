//! The churning working set: chunks of stamped pages that are verified,
//! rewritten, freed and reallocated continuously.

use std::io;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::region::{BadPage, Region};

/// At most this many damaged words are kept for the report.
pub const MAX_REPORTED: usize = 8;

/// One live chunk.
#[derive(Debug)]
struct Chunk {
    region: Region,
    id: u64,
    generation: u64,
}

/// Counters since the last report.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Pages verified.
    pub pages_checked: u64,
    /// Pages found damaged.
    pub corrupt_pages: u64,
    /// The first damaged pages (address, expected, found).
    pub first_bad: Vec<BadPage>,
}

impl Tally {
    fn note(&mut self, b: BadPage) {
        if self.first_bad.len() < MAX_REPORTED {
            self.first_bad.push(b);
        }
    }

    fn absorb(&mut self, checked: usize, corrupt: usize) {
        self.pages_checked += checked as u64;
        self.corrupt_pages += corrupt as u64;
    }
}

/// What one churn step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A free slot got a fresh chunk.
    Alloc,
    /// A chunk was verified and freed.
    Free,
    /// A chunk was verified and rewritten with the next generation.
    Rewrite,
}

/// The working set: `slots` chunks of `chunk_pages` pages, plus an optional
/// region that is written once and kept.
#[derive(Debug)]
pub struct WorkingSet {
    slots: Vec<Option<Chunk>>,
    chunk_pages: usize,
    keep: Option<Chunk>,
    next_id: u64,
    /// The churn's choices, reproducible from the seed.
    rng: SmallRng,
    /// Counters since the last [`WorkingSet::take_tally`].
    pub tally: Tally,
    /// Churn operations done.
    pub ops: u64,
}

impl WorkingSet {
    /// Creates and fills the working set.
    pub fn new(slots: usize, chunk_pages: usize, keep_pages: usize, seed: u64) -> io::Result<Self> {
        let mut ws = WorkingSet {
            slots: (0..slots).map(|_| None).collect(),
            chunk_pages,
            keep: None,
            // Id 0 is the kept region.
            next_id: 1,
            rng: SmallRng::seed_from_u64(seed),
            tally: Tally::default(),
            ops: 0,
        };
        if keep_pages > 0 {
            let mut region = Region::new(keep_pages)?;
            region.stamp(0, 0);
            ws.keep = Some(Chunk {
                region,
                id: 0,
                generation: 0,
            });
        }
        for i in 0..slots {
            ws.slots[i] = Some(ws.fresh_chunk()?);
        }
        Ok(ws)
    }

    fn fresh_chunk(&mut self) -> io::Result<Chunk> {
        let mut region = Region::new(self.chunk_pages)?;
        let id = self.next_id;
        self.next_id += 1;
        region.stamp(id, 0);
        Ok(Chunk {
            region,
            id,
            generation: 0,
        })
    }

    fn check(tally: &mut Tally, c: &Chunk) {
        let bad = c.region.verify(c.id, c.generation, |b| tally.note(b));
        tally.absorb(c.region.pages(), bad);
    }

    /// One churn step on a random slot: verify before every free or rewrite.
    /// Needs at least one slot.
    pub fn step(&mut self) -> io::Result<Op> {
        self.ops += 1;
        let i = self.rng.random_range(0..self.slots.len());
        let free_it = self.rng.random_bool(0.5);
        match self.slots[i].take() {
            None => {
                self.slots[i] = Some(self.fresh_chunk()?);
                Ok(Op::Alloc)
            }
            Some(mut c) => {
                Self::check(&mut self.tally, &c);
                if free_it {
                    drop(c);
                    Ok(Op::Free)
                } else {
                    c.generation += 1;
                    c.region.stamp(c.id, c.generation);
                    self.slots[i] = Some(c);
                    Ok(Op::Rewrite)
                }
            }
        }
    }

    /// Verifies every live page (kept region and live chunks).
    pub fn verify_all(&mut self) {
        if let Some(k) = &self.keep {
            Self::check(&mut self.tally, k);
        }
        for c in self.slots.iter().flatten() {
            Self::check(&mut self.tally, c);
        }
    }

    /// Live pages right now.
    pub fn live_pages(&self) -> usize {
        self.keep.as_ref().map_or(0, |k| k.region.pages())
            + self
                .slots
                .iter()
                .flatten()
                .map(|c| c.region.pages())
                .sum::<usize>()
    }

    /// Returns the counters and starts new ones.
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    /// Test hook: damages one byte of the first live chunk's page `page`.
    #[cfg(test)]
    fn damage_first(&mut self, page: usize) -> bool {
        for c in self.slots.iter_mut().flatten() {
            if page < c.region.pages() {
                // Rewrite that page with a stale generation.
                let mut tmp = vec![0u8; crate::pattern::PAGE_SIZE];
                crate::pattern::write_page(
                    &mut tmp,
                    crate::pattern::Stamp {
                        chunk: c.id,
                        page: page as u64,
                        generation: c.generation + 7,
                    },
                );
                c.region.overwrite_page(page, &tmp);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
impl Region {
    fn overwrite_page(&mut self, page: usize, data: &[u8]) {
        // Through the public API only: stamp writes whole regions, so copy
        // via a raw pointer on the test side.
        let dst = (self.addr() + page * crate::pattern::PAGE_SIZE) as *mut u8;
        // SAFETY: `page < self.pages()` (checked by the caller), so the
        // 4 KiB at `dst` lie inside this live mapping, and `&mut self` makes
        // the write exclusive.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_stays_clean_and_counts_pages() {
        let mut ws = WorkingSet::new(6, 4, 3, 99).expect("alloc");
        assert_eq!(ws.live_pages(), 6 * 4 + 3);
        let mut seen = [0usize; 3];
        for _ in 0..300 {
            match ws.step().expect("step") {
                Op::Alloc => seen[0] += 1,
                Op::Free => seen[1] += 1,
                Op::Rewrite => seen[2] += 1,
            }
        }
        assert!(
            seen.iter().all(|&n| n > 0),
            "all three ops happen: {seen:?}"
        );
        ws.verify_all();
        let t = ws.take_tally();
        assert_eq!(t.corrupt_pages, 0);
        assert!(t.pages_checked >= ws.live_pages() as u64);
        assert!(ws.take_tally().pages_checked == 0, "tally restarts");
    }

    #[test]
    fn damaged_page_is_reported_with_address() {
        let mut ws = WorkingSet::new(2, 4, 0, 1).expect("alloc");
        assert!(ws.damage_first(2));
        ws.verify_all();
        let t = ws.take_tally();
        assert_eq!(t.corrupt_pages, 1);
        assert_eq!(t.first_bad.len(), 1);
        // Generation word (offset 24) is the first difference.
        assert_eq!(t.first_bad[0].mismatch.offset, 24);
        assert_eq!(t.first_bad[0].addr % crate::pattern::PAGE_SIZE, 24);
    }

    fn ops(seed: u64) -> Vec<Op> {
        let mut ws = WorkingSet::new(5, 1, 0, seed).expect("alloc");
        (0..200).map(|_| ws.step().expect("step")).collect()
    }

    #[test]
    fn the_seed_fixes_the_churn() {
        assert_eq!(ops(7), ops(7), "same seed, same operations");
        assert_ne!(ops(7), ops(8), "another seed, other operations");
    }
}
