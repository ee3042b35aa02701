// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Word-level bitmap helpers over `[u64]`.
//!
//! This file is self-contained (only `core`): the guest kernel module
//! includes it with `#[path = ".../protocol/src/bitmap.rs"] mod bitmap;`.
//!
//! Bit numbering: bit `i` is bit `i % 64` of word `i / 64`, least significant
//! first. Serialising the words as little-endian u64s therefore gives the wire
//! order: bit `i` is bit `i % 8` of byte `i / 8`.
//!
//! ```
//! use freehint_protocol::bitmap::{count_ones, set_bit_run, set_runs, words_for_bits};
//! let mut w = [0u64; words_for_bits(200)];
//! assert!(set_bit_run(&mut w, 60, 70));
//! assert_eq!(count_ones(&w), 70);
//! assert!(set_runs(&w).eq([(60, 70)]));
//! assert!(!set_bit_run(&mut w, 250, 10)); // partly beyond the 256 bits
//! ```

/// Number of `u64` words needed for `bits` bits.
#[inline]
pub const fn words_for_bits(bits: u64) -> usize {
    (bits / 64 + (bits % 64 != 0) as u64) as usize
}

/// Bits held by `words` (saturating).
#[inline]
fn cap_bits(words: &[u64]) -> u64 {
    (words.len() as u64).saturating_mul(64)
}

/// Mask of bits `[lo, hi)` within one word (`lo < hi <= 64`).
#[inline]
const fn word_mask(lo: u32, hi: u32) -> u64 {
    let upper = if hi >= 64 { !0u64 } else { (1u64 << hi) - 1 };
    upper & (!0u64 << lo)
}

/// Sets bits `[first, first + nr)` in `words`, a word at a time for the
/// middle; bits beyond the slice are ignored (returns `false` if any were).
pub fn set_bit_run(words: &mut [u64], first: u64, nr: u64) -> bool {
    for_each_run_word(words, first, nr, |w, mask| *w |= mask)
}

/// Clears bits `[first, first + nr)` in `words`; bits beyond the slice are
/// ignored (returns `false` if any were).
pub fn clear_bit_run(words: &mut [u64], first: u64, nr: u64) -> bool {
    for_each_run_word(words, first, nr, |w, mask| *w &= !mask)
}

/// Calls `apply(word, mask)` for every word that bits `[first, first + nr)`
/// touch (clamped to the slice), with the mask of the run's bits in that
/// word: a partial mask at the two ends, all ones in the middle. Returns
/// `false` if part of the run lay beyond the slice.
#[inline]
fn for_each_run_word(
    words: &mut [u64],
    first: u64,
    nr: u64,
    mut apply: impl FnMut(&mut u64, u64),
) -> bool {
    let cap = cap_bits(words);
    let want_end = first.checked_add(nr);
    let end = match want_end {
        Some(e) if e <= cap => e,
        _ => cap,
    };
    let complete = nr == 0 || want_end.is_some_and(|e| e <= cap);
    if first >= end {
        return complete;
    }
    let (fw, fb) = ((first / 64) as usize, (first % 64) as u32);
    let (lw, lb) = (((end - 1) / 64) as usize, ((end - 1) % 64) as u32 + 1);
    if fw == lw {
        apply(&mut words[fw], word_mask(fb, lb));
    } else {
        apply(&mut words[fw], word_mask(fb, 64));
        for w in &mut words[fw + 1..lw] {
            apply(w, !0);
        }
        apply(&mut words[lw], word_mask(0, lb));
    }
    complete
}

/// Whether bit `bit` is set (`false` beyond the slice).
#[inline]
pub fn test_bit(words: &[u64], bit: u64) -> bool {
    usize::try_from(bit / 64)
        .ok()
        .and_then(|i| words.get(i))
        .is_some_and(|w| w >> (bit % 64) & 1 == 1)
}

/// Number of set bits.
pub fn count_ones(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// ORs `bytes` into the little-endian byte view of `words`, starting at byte
/// `first_byte` (so bit `8 * first_byte` is the first bit of `bytes[0]`).
/// Whole words are combined at a time where aligned. Bytes beyond the slice
/// are ignored (returns `false` if any were).
pub fn or_le_bytes(words: &mut [u64], first_byte: u64, bytes: &[u8]) -> bool {
    let cap = (words.len() as u64).saturating_mul(8);
    let avail = cap.saturating_sub(first_byte);
    let n = if (bytes.len() as u64) <= avail {
        bytes.len()
    } else {
        avail as usize
    };
    let complete = n == bytes.len();
    let mut pos = first_byte;
    let mut src = &bytes[..n];
    while !src.is_empty() {
        let wi = (pos / 8) as usize;
        let off = (pos % 8) as usize;
        if off == 0 && src.len() >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&src[..8]);
            words[wi] |= u64::from_le_bytes(b);
            src = &src[8..];
            pos += 8;
        } else {
            words[wi] |= u64::from(src[0]) << (off * 8);
            src = &src[1..];
            pos += 1;
        }
    }
    complete
}

/// Iterates maximal runs of set bits as `(first_bit, nr_bits)`, in order.
///
/// ```
/// use freehint_protocol::bitmap::set_runs;
/// let w = [0b0111_0001u64, 1 << 63, 1];
/// assert!(set_runs(&w).eq([(0, 1), (4, 3), (127, 2)]));
/// ```
pub fn set_runs(words: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    SetRuns { words, pos: 0 }
}

/// Iterator behind [`set_runs`].
struct SetRuns<'a> {
    words: &'a [u64],
    pos: u64,
}

impl SetRuns<'_> {
    /// First bit `>= from` whose value is `want`, or the bitmap's end.
    fn seek_bit(&self, from: u64, want: bool) -> u64 {
        let cap = cap_bits(self.words);
        let mut wi = (from / 64) as usize;
        if wi >= self.words.len() {
            return cap;
        }
        let flip = if want { 0 } else { !0u64 };
        let mut w = (self.words[wi] ^ flip) & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                return wi as u64 * 64 + u64::from(w.trailing_zeros());
            }
            wi += 1;
            match self.words.get(wi) {
                Some(&x) => w = x ^ flip,
                None => return cap,
            }
        }
    }
}

impl Iterator for SetRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.seek_bit(self.pos, true);
        if start >= cap_bits(self.words) {
            self.pos = start;
            return None;
        }
        let end = self.seek_bit(start, false);
        self.pos = end;
        Some((start, end - start))
    }
}
