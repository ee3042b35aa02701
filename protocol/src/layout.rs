// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Guest-physical layout table: which page frames are RAM and which bitmap
//! bit each of them maps to.
//!
//! This file is self-contained (only `core`): the guest kernel module
//! includes it with `#[path = ".../protocol/src/layout.rs"] mod layout;`.
//!
//! A [`Layout`] is a short, sorted table of [`LayoutRange`]s. Each range says
//! "`nr_pages` page frames starting at `first_pfn` are RAM, and they map to
//! bits `first_bit..first_bit + nr_pages`". Bits grow with pfns (a later range
//! never maps below an earlier one), so holes in the physical address space,
//! such as the x86 PCI hole below 4 GiB, are folded out of the bitmap.
//!
//! ```
//! use freehint_protocol::layout::{Bit, Layout, Pfn, PAGE_SHIFT};
//! // x86 `pc` machine with 4 GiB: 3 GiB low RAM, 1 GiB above 4 GiB.
//! let gib = 1u64 << 30;
//! let l = Layout::from_ram_byte_ranges(&[(0, 3 * gib), (4 * gib, gib)]).unwrap();
//! let pfn_gap = gib >> PAGE_SHIFT; // (4 GiB - low_mem) >> 12
//! let pfn = Pfn::from_addr(4 * gib).unchecked_add(7);
//! assert_eq!(l.pfn_to_bit(pfn), Some(Bit(pfn.raw() - pfn_gap)));
//! assert_eq!(l.total_bits(), 4 * gib >> PAGE_SHIFT);
//! assert_eq!(l.pfn_to_bit(Pfn::from_addr(3 * gib)), None); // in the hole
//! ```

use core::fmt;

/// Page shift of the pfns and bits in a layout (4 KiB pages).
pub const PAGE_SHIFT: u32 = 12;
/// Page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Most ranges a layout table may hold (on the wire and in memory).
pub const MAX_LAYOUT_RANGES: usize = 32;
/// Largest bitmap we accept: covers 16 TiB of RAM at 4 KiB pages.
pub const MAX_TOTAL_BITS: u64 = 1 << 32;
/// Pfns above this cannot be turned back into a 64-bit byte address.
const MAX_PFN_END: u64 = 1 << (64 - PAGE_SHIFT);

/// Defines a `u64` index newtype with the arithmetic the layout needs.
macro_rules! index_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            #[doc = concat!("The raw ", $what, ".")]
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }

            #[doc = concat!("The ", $what, " `n` further on, or `None` on overflow.")]
            #[inline]
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            #[doc = concat!("The ", $what, " `n` further on (wraps on overflow; for")]
            /// values a validated layout has already bounded).
            #[inline]
            pub const fn unchecked_add(self, n: u64) -> Self {
                Self(self.0.wrapping_add(n))
            }

            /// How far `self` lies past `base`, or `None` if it lies before.
            #[inline]
            pub const fn checked_offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// How far `self` lies past `base` (wraps if it lies before; for
            /// values known to be in order).
            #[inline]
            pub const fn unchecked_offset_from(self, base: Self) -> u64 {
                self.0.wrapping_sub(base.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

index_newtype!(
    /// A guest page frame number: the guest-physical byte address shifted
    /// right by [`PAGE_SHIFT`]. Like vm-memory's `GuestAddress`, but counting
    /// 4 KiB pages, so it cannot be mixed up with a byte address or a
    /// [`Bit`].
    ///
    /// ```
    /// use freehint_protocol::layout::Pfn;
    /// let p = Pfn::from_addr(0x1_0000_0fff);
    /// assert_eq!(p, Pfn(0x10_0000));
    /// assert_eq!(p.addr(), 0x1_0000_0000);
    /// assert_eq!(Pfn::from_addr_up(0x1001), Some(Pfn(2)));
    /// assert_eq!(p.checked_add(3), Some(Pfn(0x10_0003)));
    /// assert_eq!(Pfn(7).checked_offset_from(Pfn(5)), Some(2));
    /// ```
    Pfn,
    "page frame number"
);

index_newtype!(
    /// An index into the free page bitmap of a [`Layout`]: RAM pages
    /// numbered densely with holes (the x86 PCI hole below 4 GiB) folded
    /// out. Only a layout turns a [`Pfn`] into a `Bit` and back.
    ///
    /// ```
    /// use freehint_protocol::layout::Bit;
    /// assert_eq!(Bit(130).word(), 2);
    /// assert_eq!(Bit(130).bit_in_word(), 2);
    /// assert_eq!(Bit(64).unchecked_add(64), Bit(128));
    /// ```
    Bit,
    "bit index"
);

impl Pfn {
    /// The page frame holding byte address `addr` (rounds down).
    #[inline]
    pub const fn from_addr(addr: u64) -> Self {
        Self(addr >> PAGE_SHIFT)
    }

    /// The first page frame that starts at or after byte address `addr`
    /// (rounds up), or `None` if `addr` lies in the last, partial page of
    /// the 64-bit address space.
    #[inline]
    pub const fn from_addr_up(addr: u64) -> Option<Self> {
        match addr.checked_add(PAGE_SIZE - 1) {
            Some(a) => Some(Self(a >> PAGE_SHIFT)),
            None => None,
        }
    }

    /// Byte address of the frame's first byte (the high bits are lost for
    /// pfns at or above 2^52, which no layout holds).
    #[inline]
    pub const fn addr(self) -> u64 {
        self.0 << PAGE_SHIFT
    }

    /// Byte address of the frame's first byte, or `None` if it does not fit
    /// in 64 bits.
    #[inline]
    pub const fn checked_addr(self) -> Option<u64> {
        if self.0 < MAX_PFN_END {
            Some(self.0 << PAGE_SHIFT)
        } else {
            None
        }
    }
}

impl Bit {
    /// The bit as an index into an in-memory bitmap (a valid layout's bits
    /// are below [`MAX_TOTAL_BITS`], which fits a 64-bit `usize`).
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Index of the 64-bit bitmap word holding this bit.
    #[inline]
    pub const fn word(self) -> usize {
        (self.0 / 64) as usize
    }

    /// Position of this bit within its word (`0..64`).
    #[inline]
    pub const fn bit_in_word(self) -> u32 {
        (self.0 % 64) as u32
    }
}

/// A QEMU x86 machine type, for [`qemu_x86_ram_ranges`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuX86Machine {
    /// `pc` (i440FX): from 3.5 GiB of RAM on, 3 GiB stay below the PCI hole.
    Pc,
    /// `q35`: from 2.75 GiB of RAM on, 2 GiB stay below the PCI hole.
    Q35,
}

impl QemuX86Machine {
    /// QEMU's `-machine` name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pc => "pc",
            Self::Q35 => "q35",
        }
    }

    /// Where low RAM ends once the guest has more than fits below the PCI
    /// hole.
    pub const fn low_ram_end(self) -> u64 {
        match self {
            Self::Pc => 0xc000_0000,
            Self::Q35 => 0x8000_0000,
        }
    }

    /// Guest RAM from which QEMU splits it at [`Self::low_ram_end`].
    const fn split_threshold(self) -> u64 {
        match self {
            Self::Pc => 0xe000_0000,
            Self::Q35 => 0xb000_0000,
        }
    }
}

/// A machine name that is neither `pc` nor `q35`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownMachine;

impl fmt::Display for UnknownMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown machine (known: pc, q35)")
    }
}

impl core::error::Error for UnknownMachine {}

/// Parses QEMU's machine name (`pc`, `q35`).
///
/// ```
/// use freehint_protocol::layout::QemuX86Machine;
/// assert_eq!("q35".parse(), Ok(QemuX86Machine::Q35));
/// assert!("virt".parse::<QemuX86Machine>().is_err());
/// ```
impl core::str::FromStr for QemuX86Machine {
    type Err = UnknownMachine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pc" => Ok(Self::Pc),
            "q35" => Ok(Self::Q35),
            _ => Err(UnknownMachine),
        }
    }
}

/// Where QEMU puts `ram_bytes` of RAM in an x86 guest of `machine`:
/// `(start, len)` byte ranges, below the PCI hole and from 4 GiB on. The
/// one description of the split that the device servers, the test harness
/// and the layout tables share.
///
/// ```
/// use freehint_protocol::layout::{qemu_x86_ram_ranges, QemuX86Machine};
/// let gib = 1u64 << 30;
/// let small: Vec<_> = qemu_x86_ram_ranges(gib, QemuX86Machine::Pc).collect();
/// assert_eq!(small, [(0, gib)]);
/// let big: Vec<_> = qemu_x86_ram_ranges(6 * gib, QemuX86Machine::Q35).collect();
/// assert_eq!(big, [(0, 2 * gib), (4 * gib, 4 * gib)]);
/// ```
pub fn qemu_x86_ram_ranges(
    ram_bytes: u64,
    machine: QemuX86Machine,
) -> impl Iterator<Item = (u64, u64)> {
    const GIB4: u64 = 4 << 30;
    let low = machine.low_ram_end();
    let split = ram_bytes >= machine.split_threshold();
    let below = if split { (0, low) } else { (0, ram_bytes) };
    let above = split.then(|| (GIB4, ram_bytes - low));
    core::iter::once(below).chain(above)
}

/// One entry of a layout table: `nr_pages` frames from `first_pfn` are RAM
/// and map to bits `first_bit..first_bit + nr_pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LayoutRange {
    /// First page frame number of the range.
    pub first_pfn: Pfn,
    /// Number of pages in the range (never 0 in a valid layout).
    pub nr_pages: u64,
    /// Bitmap bit of `first_pfn`.
    pub first_bit: Bit,
}

impl LayoutRange {
    /// One past the last pfn (unchecked; valid layouts never overflow).
    #[inline]
    pub const fn end_pfn(&self) -> Pfn {
        self.first_pfn.unchecked_add(self.nr_pages)
    }

    /// One past the last bit (unchecked; valid layouts never overflow).
    #[inline]
    pub const fn end_bit(&self) -> Bit {
        self.first_bit.unchecked_add(self.nr_pages)
    }

    /// Whether `pfn` lies in the range.
    #[inline]
    pub fn contains_pfn(&self, pfn: Pfn) -> bool {
        self.first_pfn <= pfn && pfn < self.end_pfn()
    }
}

/// Why a layout table was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// More than [`MAX_LAYOUT_RANGES`] ranges.
    TooManyRanges,
    /// No range at all.
    Empty,
    /// A range of zero pages.
    ZeroLength,
    /// Ranges not sorted by ascending pfn.
    Unsorted,
    /// Two ranges cover the same pfn.
    OverlappingPfns,
    /// Two ranges map to the same bit, or bits do not grow with pfns.
    OverlappingBits,
    /// `first + nr` overflows (pfns, bits or byte addresses).
    Overflow,
    /// The bitmap would exceed [`MAX_TOTAL_BITS`].
    TooManyBits,
    /// Byte addresses or lengths that are not page aligned.
    Unaligned,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            Self::TooManyRanges => "layout has more than 32 ranges",
            Self::Empty => "layout has no ranges",
            Self::ZeroLength => "layout range has zero pages",
            Self::Unsorted => "layout ranges are not sorted by pfn",
            Self::OverlappingPfns => "layout ranges overlap in pfn space",
            Self::OverlappingBits => {
                "layout ranges overlap in bit space or their bits do not grow with pfns"
            }
            Self::Overflow => "layout range end overflows",
            Self::TooManyBits => "layout bitmap exceeds 2^32 bits (16 TiB of RAM)",
            Self::Unaligned => "RAM range is not page aligned",
        };
        f.write_str(msg)
    }
}

/// A validated layout table (see the module documentation).
///
/// Invariants: `1 <= len <= MAX_LAYOUT_RANGES` (or `len == 0` only for
/// [`Layout::empty`]); ranges sorted by pfn, non-overlapping, each non-empty;
/// bits non-overlapping and ascending with pfns; no end overflows;
/// `total_bits` = end bit of the last range `<= MAX_TOTAL_BITS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    ranges: [LayoutRange; MAX_LAYOUT_RANGES],
    len: usize,
    total_bits: u64,
}

impl Default for Layout {
    fn default() -> Self {
        Self::empty()
    }
}

impl Layout {
    /// A layout with no ranges (maps nothing; `total_bits() == 0`).
    pub const fn empty() -> Self {
        Self {
            ranges: [LayoutRange {
                first_pfn: Pfn(0),
                nr_pages: 0,
                first_bit: Bit(0),
            }; MAX_LAYOUT_RANGES],
            len: 0,
            total_bits: 0,
        }
    }

    /// Appends RAM `[first_pfn, first_pfn + nr)` packed right after the
    /// previous range's bits; merges with the previous range when contiguous.
    fn push_ram(&mut self, first_pfn: Pfn, nr: u64) -> Result<(), LayoutError> {
        if nr == 0 {
            return Err(LayoutError::ZeroLength);
        }
        let end = first_pfn.checked_add(nr).ok_or(LayoutError::Overflow)?;
        if end.raw() > MAX_PFN_END {
            return Err(LayoutError::Overflow);
        }
        let first_bit = self.total_bits;
        if self.len > 0 {
            let prev = &mut self.ranges[self.len - 1];
            if first_pfn < prev.first_pfn {
                return Err(LayoutError::Unsorted);
            }
            if first_pfn < prev.end_pfn() {
                return Err(LayoutError::OverlappingPfns);
            }
            if first_pfn == prev.end_pfn() {
                let total = first_bit.checked_add(nr).ok_or(LayoutError::Overflow)?;
                if total > MAX_TOTAL_BITS {
                    return Err(LayoutError::TooManyBits);
                }
                prev.nr_pages += nr;
                self.total_bits = total;
                return Ok(());
            }
        }
        if self.len == MAX_LAYOUT_RANGES {
            return Err(LayoutError::TooManyRanges);
        }
        let total = first_bit.checked_add(nr).ok_or(LayoutError::Overflow)?;
        if total > MAX_TOTAL_BITS {
            return Err(LayoutError::TooManyBits);
        }
        self.ranges[self.len] = LayoutRange {
            first_pfn,
            nr_pages: nr,
            first_bit: Bit(first_bit),
        };
        self.len += 1;
        self.total_bits = total;
        Ok(())
    }

    /// RAM ranges in pfns `(first_pfn, nr_pages)` (sorted, non-overlapping);
    /// bits are packed densely in order, so holes (the x86 PCI hole) are
    /// folded out. Ranges that touch are merged into one table entry, so more
    /// than [`MAX_LAYOUT_RANGES`] inputs are fine if they merge down.
    ///
    /// ```
    /// use freehint_protocol::layout::{Layout, LayoutError};
    /// let l = Layout::from_ram_pfn_ranges(&[(0, 16), (16, 16), (100, 4)]).unwrap();
    /// assert_eq!(l.ranges().len(), 2);
    /// assert_eq!(l.total_bits(), 36);
    /// assert_eq!(l.pfn_to_bit(freehint_protocol::layout::Pfn(101)), Some(freehint_protocol::layout::Bit(33)));
    /// assert_eq!(Layout::from_ram_pfn_ranges(&[(8, 8), (0, 4)]), Err(LayoutError::Unsorted));
    /// ```
    pub fn from_ram_pfn_ranges(ranges: &[(u64, u64)]) -> Result<Self, LayoutError> {
        if ranges.is_empty() {
            return Err(LayoutError::Empty);
        }
        let mut l = Self::empty();
        for &(first_pfn, nr) in ranges {
            l.push_ram(Pfn(first_pfn), nr)?;
        }
        Ok(l)
    }

    /// Byte-address variant of [`Layout::from_ram_pfn_ranges`]: `(start, len)`
    /// pairs; rejects ranges whose start or length is not page aligned.
    pub fn from_ram_byte_ranges(ranges: &[(u64, u64)]) -> Result<Self, LayoutError> {
        if ranges.is_empty() {
            return Err(LayoutError::Empty);
        }
        let mut l = Self::empty();
        for &(start, len) in ranges {
            if len == 0 {
                return Err(LayoutError::ZeroLength);
            }
            if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned);
            }
            // The last byte must be addressable (the end may be 2^64).
            start.checked_add(len - 1).ok_or(LayoutError::Overflow)?;
            l.push_ram(Pfn::from_addr(start), len >> PAGE_SHIFT)?;
        }
        Ok(l)
    }

    /// Explicit table as received from a peer: validates every field (sorted
    /// by pfn, non-overlapping pfns, non-overlapping bits ascending with pfns,
    /// no overflow, total ≤ [`MAX_TOTAL_BITS`]). Gaps in bit space are allowed
    /// (a host may use its own RAM offsets as bit numbers); such bits are
    /// never set. Entries are kept as given (no merging).
    ///
    /// ```
    /// use freehint_protocol::layout::{Bit, Layout, LayoutError, LayoutRange, Pfn};
    /// let r = |pfn, nr_pages, bit| LayoutRange { first_pfn: Pfn(pfn), nr_pages, first_bit: Bit(bit) };
    /// assert!(Layout::from_ranges(&[r(0, 8, 0), r(16, 8, 8)]).is_ok());
    /// assert_eq!(
    ///     Layout::from_ranges(&[r(0, 8, 0), r(16, 8, 4)]),
    ///     Err(LayoutError::OverlappingBits)
    /// );
    /// ```
    pub fn from_ranges(ranges: &[LayoutRange]) -> Result<Self, LayoutError> {
        if ranges.is_empty() {
            return Err(LayoutError::Empty);
        }
        if ranges.len() > MAX_LAYOUT_RANGES {
            return Err(LayoutError::TooManyRanges);
        }
        let mut l = Self::empty();
        for r in ranges {
            l.push_range(*r)?;
        }
        Ok(l)
    }

    /// Appends one explicit entry after validating it against the entries
    /// already present (the rules of [`Layout::from_ranges`]). On error the
    /// layout is unchanged. Lets a parser build a layout without a
    /// temporary table.
    ///
    /// ```
    /// use freehint_protocol::layout::{Bit, Layout, LayoutError, LayoutRange, Pfn};
    /// let mut l = Layout::empty();
    /// l.push_range(LayoutRange { first_pfn: Pfn(0), nr_pages: 4, first_bit: Bit(0) }).unwrap();
    /// let bad = LayoutRange { first_pfn: Pfn(2), nr_pages: 4, first_bit: Bit(4) };
    /// assert_eq!(l.push_range(bad), Err(LayoutError::OverlappingPfns));
    /// assert_eq!(l.total_bits(), 4);
    /// ```
    pub fn push_range(&mut self, r: LayoutRange) -> Result<(), LayoutError> {
        if self.len == MAX_LAYOUT_RANGES {
            return Err(LayoutError::TooManyRanges);
        }
        if r.nr_pages == 0 {
            return Err(LayoutError::ZeroLength);
        }
        let end_pfn = r
            .first_pfn
            .checked_add(r.nr_pages)
            .ok_or(LayoutError::Overflow)?;
        if end_pfn.raw() > MAX_PFN_END {
            return Err(LayoutError::Overflow);
        }
        let end_bit = r
            .first_bit
            .checked_add(r.nr_pages)
            .ok_or(LayoutError::Overflow)?;
        if let Some(prev) = self.ranges().last() {
            if r.first_pfn < prev.first_pfn {
                return Err(LayoutError::Unsorted);
            }
            if r.first_pfn < prev.end_pfn() {
                return Err(LayoutError::OverlappingPfns);
            }
            if r.first_bit < prev.end_bit() {
                return Err(LayoutError::OverlappingBits);
            }
        }
        if end_bit.raw() > MAX_TOTAL_BITS {
            return Err(LayoutError::TooManyBits);
        }
        self.ranges[self.len] = r;
        self.len += 1;
        self.total_bits = end_bit.raw();
        Ok(())
    }

    /// The table entries, sorted by pfn (and by bit).
    #[inline]
    pub fn ranges(&self) -> &[LayoutRange] {
        &self.ranges[..self.len]
    }

    /// Bits in the bitmap (= end bit of the last range). For a layout built
    /// from RAM ranges this is the number of RAM pages covered.
    #[inline]
    pub fn total_bits(&self) -> u64 {
        self.total_bits
    }

    /// Number of RAM pages covered (sum of `nr_pages`).
    pub fn ram_pages(&self) -> u64 {
        self.ranges().iter().map(|r| r.nr_pages).sum()
    }

    /// Index of the range containing `pfn`, if any.
    #[inline]
    fn range_of_pfn(&self, pfn: Pfn) -> Option<&LayoutRange> {
        let rs = self.ranges();
        let i = rs.partition_point(|r| r.first_pfn <= pfn);
        let r = rs.get(i.checked_sub(1)?)?;
        (pfn < r.end_pfn()).then_some(r)
    }

    /// Bit of `pfn`, or `None` if the pfn is not RAM covered by the layout.
    #[inline]
    pub fn pfn_to_bit(&self, pfn: Pfn) -> Option<Bit> {
        let r = self.range_of_pfn(pfn)?;
        Some(
            r.first_bit
                .unchecked_add(pfn.unchecked_offset_from(r.first_pfn)),
        )
    }

    /// Pfn of `bit`, or `None` if no range maps to that bit.
    #[inline]
    pub fn bit_to_pfn(&self, bit: Bit) -> Option<Pfn> {
        let rs = self.ranges();
        let i = rs.partition_point(|r| r.first_bit <= bit);
        let r = rs.get(i.checked_sub(1)?)?;
        (bit < r.end_bit()).then(|| {
            r.first_pfn
                .unchecked_add(bit.unchecked_offset_from(r.first_bit))
        })
    }

    /// Calls `f(first_pfn, nr_pages)` for every piece of the bit run
    /// `[bit, bit + nr)` that the layout maps (bits beyond the last range are
    /// skipped), in bit order: the inverse of [`Layout::for_each_bit_run`]. A
    /// run that crosses from one range into the next becomes two pieces,
    /// because the pfns jump over the hole between them.
    ///
    /// ```
    /// use freehint_protocol::layout::{Bit, Layout};
    /// // pfns 0..10 are bits 0..10, pfns 20..30 are bits 10..20.
    /// let l = Layout::from_ram_pfn_ranges(&[(0, 10), (20, 10)]).unwrap();
    /// let mut runs = [(0u64, 0u64); 4];
    /// let mut n = 0;
    /// l.for_each_pfn_run(Bit(5), 10, |p, k| { runs[n] = (p.raw(), k); n += 1; });
    /// assert_eq!(&runs[..n], &[(5, 5), (20, 5)]);
    /// ```
    pub fn for_each_pfn_run(&self, bit: Bit, nr: u64, mut f: impl FnMut(Pfn, u64)) {
        let end = Bit(bit.raw().saturating_add(nr));
        let rs = self.ranges();
        let start = rs.partition_point(|r| r.end_bit() <= bit);
        for r in &rs[start..] {
            if r.first_bit >= end {
                break;
            }
            let lo = if bit > r.first_bit { bit } else { r.first_bit };
            let hi = if end < r.end_bit() { end } else { r.end_bit() };
            if lo < hi {
                let pfn = r
                    .first_pfn
                    .unchecked_add(lo.unchecked_offset_from(r.first_bit));
                f(pfn, hi.unchecked_offset_from(lo));
            }
        }
    }

    /// Calls `f(first_bit, nr_bits)` for every piece of `[pfn, pfn + nr)` that
    /// lies in RAM covered by the layout (pieces outside are skipped; pieces
    /// adjacent in bit space are merged into one call). Binary search for the
    /// first range, then a walk: no per-page work.
    ///
    /// ```
    /// use freehint_protocol::layout::{Layout, Pfn};
    /// let l = Layout::from_ram_pfn_ranges(&[(0, 10), (20, 10)]).unwrap();
    /// let mut runs = [(0u64, 0u64); 4];
    /// let mut n = 0;
    /// // pfns 5..25: 5..10 are bits 5..10, 10..20 is a hole, 20..25 are
    /// // bits 10..15, adjacent to the first piece, so one call.
    /// l.for_each_bit_run(Pfn(5), 20, |b, k| { runs[n] = (b.raw(), k); n += 1; });
    /// assert_eq!(&runs[..n], &[(5, 10)]);
    /// ```
    pub fn for_each_bit_run(&self, pfn: Pfn, nr: u64, mut f: impl FnMut(Bit, u64)) {
        if nr == 0 {
            return;
        }
        let end = Pfn(pfn.raw().saturating_add(nr));
        let rs = self.ranges();
        let start = rs.partition_point(|r| r.end_pfn() <= pfn);
        let mut pending: Option<(Bit, u64)> = None;
        for r in &rs[start..] {
            if r.first_pfn >= end {
                break;
            }
            let lo = if pfn > r.first_pfn { pfn } else { r.first_pfn };
            let hi = if end < r.end_pfn() { end } else { r.end_pfn() };
            if lo >= hi {
                continue;
            }
            let bit = r
                .first_bit
                .unchecked_add(lo.unchecked_offset_from(r.first_pfn));
            let n = hi.unchecked_offset_from(lo);
            pending = match pending {
                Some((pb, pn)) if pb.unchecked_add(pn) == bit => Some((pb, pn + n)),
                Some((pb, pn)) => {
                    f(pb, pn);
                    Some((bit, n))
                }
                None => Some((bit, n)),
            };
        }
        if let Some((pb, pn)) = pending {
            f(pb, pn);
        }
    }
}
