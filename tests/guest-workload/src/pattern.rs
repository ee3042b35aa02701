//! Page stamps: what every page of the workload holds, and how it is checked.
//!
//! A stamped 4 KiB page is 512 little-endian `u64` words:
//!
//! | word | content |
//! |---|---|
//! | 0 | [`MAGIC`] |
//! | 1 | chunk id |
//! | 2 | page index inside the chunk |
//! | 3 | generation (bumped on every rewrite of the chunk) |
//! | 4 | checksum of words 5..512 |
//! | 5..512 | pattern derived from (chunk id, page index, generation) |
//!
//! The pattern is a pure function of the three numbers, so a verifier knows
//! every expected word without keeping a copy. A page the migration lost reads
//! as zeroes (or as an older generation) on the destination, which the stamp
//! catches; a page with the right header but a torn body fails the checksum.

/// Page size of the guest (x86-64).
pub const PAGE_SIZE: usize = 4096;
/// Words in a page.
pub const WORDS: usize = PAGE_SIZE / 8;
/// Header words before the pattern body.
pub const HEADER_WORDS: usize = 5;
/// First word of every stamped page: `"FHWKPAGE"`.
pub const MAGIC: u64 = 0x4648_574b_5041_4745;

/// The identity of a stamped page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Chunk id (unique per allocation over the process lifetime).
    pub chunk: u64,
    /// Page index inside the chunk.
    pub page: u64,
    /// Generation of the chunk's contents.
    pub generation: u64,
}

/// One word that differs from what the stamp says it should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Byte offset of the word inside the page.
    pub offset: usize,
    /// Expected value.
    pub expected: u64,
    /// Value found.
    pub found: u64,
}

fn seed(s: Stamp) -> u64 {
    // splitmix64 finaliser over the three fields.
    let mut z = s
        .chunk
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(s.page.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(s.generation.wrapping_mul(0x94D0_49BB_1331_11EB))
        .wrapping_add(1);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The expected body word `i` (`HEADER_WORDS <= i < WORDS`) for `seed`. Never
/// zero for the stamps the workload uses (the `| 1`), so a zeroed page never
/// passes.
#[inline]
fn body_word(seed: u64, i: usize) -> u64 {
    ((seed ^ i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)) | 1
}

#[inline]
fn checksum_step(acc: u64, w: u64) -> u64 {
    acc.rotate_left(5) ^ w
}

fn checksum(seed: u64) -> u64 {
    (HEADER_WORDS..WORDS).fold(0, |acc, i| checksum_step(acc, body_word(seed, i)))
}

#[inline]
fn read_word(page: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

#[inline]
fn write_word(page: &mut [u8], i: usize, w: u64) {
    page[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
}

/// Writes the stamp `s` into `page` (exactly [`PAGE_SIZE`] bytes).
pub fn write_page(page: &mut [u8], s: Stamp) {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    let sd = seed(s);
    let mut acc = 0u64;
    for i in HEADER_WORDS..WORDS {
        let w = body_word(sd, i);
        acc = checksum_step(acc, w);
        write_word(page, i, w);
    }
    write_word(page, 0, MAGIC);
    write_word(page, 1, s.chunk);
    write_word(page, 2, s.page);
    write_word(page, 3, s.generation);
    write_word(page, 4, acc);
}

/// Checks `page` against the stamp `s`. Returns `None` when the page is
/// intact, otherwise the first differing word (header first, then body) and
/// the number of differing words.
pub fn check_page(page: &[u8], s: Stamp) -> Option<(Mismatch, usize)> {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    let sd = seed(s);
    let header = [MAGIC, s.chunk, s.page, s.generation, checksum(sd)];
    let mut first = None;
    let mut bad = 0usize;
    let mut note = |i: usize, expected: u64, found: u64| {
        if expected != found {
            bad += 1;
            if first.is_none() {
                first = Some(Mismatch {
                    offset: i * 8,
                    expected,
                    found,
                });
            }
        }
    };
    for (i, &e) in header.iter().enumerate() {
        note(i, e, read_word(page, i));
    }
    for i in HEADER_WORDS..WORDS {
        note(i, body_word(sd, i), read_word(page, i));
    }
    first.map(|m| (m, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(chunk: u64, page: u64, generation: u64) -> Stamp {
        Stamp {
            chunk,
            page,
            generation,
        }
    }

    #[test]
    fn written_page_checks_clean() {
        let mut p = vec![0u8; PAGE_SIZE];
        for s in [st(0, 0, 0), st(7, 255, 3), st(u64::MAX, u64::MAX, u64::MAX)] {
            write_page(&mut p, s);
            assert_eq!(check_page(&p, s), None);
        }
    }

    #[test]
    fn zero_page_is_corrupt_everywhere() {
        let p = vec![0u8; PAGE_SIZE];
        let (m, bad) = check_page(&p, st(1, 2, 3)).expect("zero page must fail");
        assert_eq!(m.offset, 0);
        assert_eq!(m.expected, MAGIC);
        assert_eq!(m.found, 0);
        assert_eq!(bad, WORDS, "every word of a zero page differs");
    }

    #[test]
    fn stale_generation_is_caught() {
        let mut p = vec![0u8; PAGE_SIZE];
        write_page(&mut p, st(4, 9, 1));
        let (m, _) = check_page(&p, st(4, 9, 2)).expect("old generation must fail");
        assert_eq!(m.offset, 3 * 8);
        assert_eq!((m.expected, m.found), (2, 1));
    }

    #[test]
    fn single_flipped_body_word_is_caught() {
        let mut p = vec![0u8; PAGE_SIZE];
        let s = st(5, 6, 7);
        write_page(&mut p, s);
        p[4000] ^= 0x10;
        let (m, bad) = check_page(&p, s).expect("flipped byte must fail");
        assert_eq!(m.offset, 4000 / 8 * 8);
        assert_eq!(bad, 1);
    }

    #[test]
    fn pages_of_one_chunk_differ() {
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        write_page(&mut a, st(1, 0, 0));
        write_page(&mut b, st(1, 1, 0));
        let same = a
            .chunks(8)
            .zip(b.chunks(8))
            .skip(HEADER_WORDS)
            .filter(|(x, y)| x == y)
            .count();
        assert_eq!(same, 0, "a page copied onto its neighbour must not pass");
        assert!(check_page(&a, st(1, 1, 0)).is_some());
    }
}
