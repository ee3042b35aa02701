//! Page bitmaps (one bit per page index, `u64` words, least significant bit
//! first, as the kernel and vm-memory lay out dirty bitmaps) and run
//! iteration over them.

use std::ops::Range;

use bitvec::prelude::{BitSlice, BitVec, Lsb0};

/// An owned page bitmap.
pub type PageBitmap = BitVec<u64, Lsb0>;
/// A borrowed page bitmap.
pub type PageBits = BitSlice<u64, Lsb0>;

/// Maximal runs of equal bits, in order: `(value, range)`.
pub fn runs(bits: &PageBits) -> Runs<'_> {
    Runs { bits, pos: 0 }
}

/// Maximal runs of set bits, in order.
pub fn one_runs(bits: &PageBits) -> impl Iterator<Item = Range<usize>> + '_ {
    runs(bits).filter_map(|(value, range)| value.then_some(range))
}

/// Iterator returned by [`runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    bits: &'a PageBits,
    pos: usize,
}

impl Iterator for Runs<'_> {
    type Item = (bool, Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.bits.get(self.pos..)?;
        let value = *rest.first()?;
        let len = if value {
            rest.first_zero()
        } else {
            rest.first_one()
        }
        .unwrap_or(rest.len());
        let start = self.pos;
        self.pos += len;
        Some((value, start..self.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitvec::prelude::bitvec;
    use proptest::prelude::*;

    #[test]
    fn splits_into_runs() {
        let bits = bitvec![u64, Lsb0; 1, 1, 0, 1, 0, 0, 0, 1];
        let all: Vec<_> = runs(&bits).collect();
        assert_eq!(
            all,
            vec![
                (true, 0..2),
                (false, 2..3),
                (true, 3..4),
                (false, 4..7),
                (true, 7..8)
            ]
        );
        assert_eq!(one_runs(&bits).collect::<Vec<_>>(), vec![0..2, 3..4, 7..8]);
        assert_eq!(runs(&bits[..0]).count(), 0);
    }

    proptest! {
        #[test]
        fn runs_rebuild_the_bitmap(raw in prop::collection::vec(any::<bool>(), 0..300)) {
            let bits: PageBitmap = raw.iter().copied().collect();
            let mut rebuilt = PageBitmap::new();
            let mut last = None;
            for (value, range) in runs(&bits) {
                prop_assert!(!range.is_empty());
                prop_assert_ne!(last, Some(value), "runs are maximal");
                rebuilt.extend(std::iter::repeat_n(value, range.len()));
                last = Some(value);
            }
            prop_assert_eq!(rebuilt, bits);
        }
    }
}
