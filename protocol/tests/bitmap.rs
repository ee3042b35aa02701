//! Bitmap helpers against a naive per-bit model, all alignments.

use freehint_protocol::bitmap::*;
use proptest::prelude::*;

fn naive_get(words: &[u64], bit: u64) -> bool {
    let i = (bit / 64) as usize;
    i < words.len() && (words[i] >> (bit % 64)) & 1 == 1
}

fn naive_runs(words: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for bit in 0..words.len() as u64 * 64 {
        if naive_get(words, bit) {
            match out.last_mut() {
                Some((b, n)) if *b + *n == bit => *n += 1,
                _ => out.push((bit, 1)),
            }
        }
    }
    out
}

#[test]
fn words_for_bits_edges() {
    assert_eq!(words_for_bits(0), 0);
    assert_eq!(words_for_bits(1), 1);
    assert_eq!(words_for_bits(64), 1);
    assert_eq!(words_for_bits(65), 2);
    assert_eq!(words_for_bits(1 << 32), 1 << 26);
    assert_eq!(words_for_bits(u64::MAX), 1 << 58);
}

/// Every (first, nr) with first, first + nr in 0..=260 over 3 words
/// (192 bits), starting from three different backgrounds.
#[test]
fn set_and_clear_bit_run_exhaustive() {
    for background in [0u64, !0, 0x5555_5555_5555_5555] {
        for first in 0..=260u64 {
            for nr in 0..=(260 - first) {
                let mut w = [background; 3];
                let complete = set_bit_run(&mut w, first, nr);
                assert_eq!(complete, nr == 0 || first + nr <= 192, "set({first},{nr})");
                for bit in 0..192 {
                    let want =
                        (first..first + nr).contains(&bit) || naive_get(&[background; 3], bit);
                    assert_eq!(naive_get(&w, bit), want, "set({first},{nr}) bit {bit}");
                }
                let mut w = [background; 3];
                let complete = clear_bit_run(&mut w, first, nr);
                assert_eq!(
                    complete,
                    nr == 0 || first + nr <= 192,
                    "clear({first},{nr})"
                );
                for bit in 0..192 {
                    let want =
                        !(first..first + nr).contains(&bit) && naive_get(&[background; 3], bit);
                    assert_eq!(naive_get(&w, bit), want, "clear({first},{nr}) bit {bit}");
                }
            }
        }
    }
}

#[test]
fn bit_runs_beyond_slice_and_overflow() {
    let mut w = [0u64; 2];
    assert!(!set_bit_run(&mut w, 100, u64::MAX));
    assert_eq!(w, [0, !0u64 << 36]);
    assert!(!set_bit_run(&mut w, u64::MAX, 1));
    assert!(set_bit_run(&mut w, u64::MAX, 0));
    assert!(!set_bit_run(&mut [], 0, 1));
    assert!(set_bit_run(&mut [], 0, 0));
    assert!(!clear_bit_run(&mut w, 0, u64::MAX));
    assert_eq!(w, [0, 0]);
}

#[test]
fn test_bit_and_count() {
    let w = [1u64 << 5, 1 << 63];
    assert!(test_bit(&w, 5));
    assert!(test_bit(&w, 127));
    assert!(!test_bit(&w, 6));
    assert!(!test_bit(&w, 128));
    assert!(!test_bit(&w, u64::MAX));
    assert_eq!(count_ones(&w), 2);
    assert_eq!(count_ones(&[]), 0);
}

#[test]
fn set_runs_hand_readable() {
    assert!(set_runs(&[]).eq([]));
    assert!(set_runs(&[0, 0]).eq([]));
    assert!(set_runs(&[!0, !0]).eq([(0, 128)]));
    assert!(set_runs(&[0b11_0011_0011_0011]).eq([(0, 2), (4, 2), (8, 2), (12, 2)]));
    assert!(set_runs(&[1 << 63, !0, 1]).eq([(63, 66)]));
    assert!(set_runs(&[0, 0, 1 << 63]).eq([(191, 1)]));
}

#[test]
fn or_le_bytes_matches_wire_order() {
    let mut w = [0u64; 2];
    // bit i = bit i%8 of byte i/8
    assert!(or_le_bytes(&mut w, 0, &[0x01, 0x80]));
    assert_eq!(w[0], 0x8001);
    assert!(or_le_bytes(&mut w, 3, &[0xff; 8]));
    assert_eq!(w, [0xffff_ffff_ff00_8001, 0xff_ffff]);
    assert!(!or_le_bytes(&mut w, 15, &[1, 2]));
    assert_eq!(w[1] >> 56, 0x01);
    assert!(!or_le_bytes(&mut w, u64::MAX, &[1]));
    assert!(or_le_bytes(&mut w, u64::MAX, &[]));
}

fn words_strategy() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(
        prop_oneof![
            Just(0u64),
            Just(!0u64),
            any::<u64>(),
            (0u32..64).prop_map(|s| 1u64 << s)
        ],
        0..8,
    )
}

proptest! {
    #[test]
    fn set_runs_matches_naive(w in words_strategy()) {
        let got: Vec<_> = set_runs(&w).collect();
        prop_assert_eq!(&got, &naive_runs(&w));
        prop_assert_eq!(got.iter().map(|r| r.1).sum::<u64>(), count_ones(&w));
        // Rebuilding from the runs gives the same bitmap.
        let mut back = vec![0u64; w.len()];
        for (b, n) in got {
            prop_assert!(set_bit_run(&mut back, b, n));
        }
        prop_assert_eq!(back, w);
    }

    #[test]
    fn or_le_bytes_matches_naive(
        w in words_strategy(),
        first in 0u64..80,
        bytes in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut got = w.clone();
        let complete = or_le_bytes(&mut got, first, &bytes);
        let cap = w.len() as u64 * 8;
        prop_assert_eq!(complete, bytes.is_empty() || first + bytes.len() as u64 <= cap);
        let mut want: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        for (i, b) in bytes.iter().enumerate() {
            if let Some(d) = want.get_mut(first as usize + i) {
                *d |= b;
            }
        }
        let got_bytes: Vec<u8> = got.iter().flat_map(|x| x.to_le_bytes()).collect();
        prop_assert_eq!(got_bytes, want);
    }

    #[test]
    fn set_bit_run_large_random(first in 0u64..5000, nr in 0u64..5000) {
        let mut w = vec![0u64; 64];
        let complete = set_bit_run(&mut w, first, nr);
        prop_assert_eq!(complete, nr == 0 || first + nr <= 4096);
        let end = (first + nr).min(4096);
        let want: Vec<(u64, u64)> = if first < end { vec![(first, end - first)] } else { vec![] };
        prop_assert_eq!(set_runs(&w).collect::<Vec<_>>(), want);
    }
}
