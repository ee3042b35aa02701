//! The guest RAM layout: which guest-physical ranges hold RAM and where each
//! one sits in the RAM file.
//!
//! Pages are numbered by a *page index* that runs through the ranges in
//! order, so the index of a page is its RAM offset / 4 KiB when the ranges
//! are stored back to back (the x86 PC case: RAM below the PCI hole, then
//! RAM above 4 GiB). Every bitmap in this crate is indexed the same way.

use std::ops::Range;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::PAGE_SIZE;

/// Most RAM ranges a layout may have (x86 PC machines have two; memory
/// hotplug adds one per DIMM).
pub const MAX_RANGES: usize = 1024;

/// Default cap on the RAM a layout may describe: 1 TiB. A receiver keeps
/// one bit per page of the announced RAM (32 MiB at this cap); raise it
/// with [`Decoder::with_max_ram_bytes`](crate::Decoder::with_max_ram_bytes).
pub const DEFAULT_MAX_RAM_BYTES: u64 = 1 << 40;

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical address of the first byte (page aligned).
    pub gpa: GuestAddress,
    /// Length in 4 KiB pages (at least one).
    pub pages: u64,
    /// Byte offset of the first page in the RAM file (page aligned).
    pub file_offset: u64,
}

impl RamRange {
    fn bytes(&self) -> Option<u64> {
        self.pages.checked_mul(PAGE_SIZE as u64)
    }

    fn gpa_span(&self) -> Option<Range<u64>> {
        let start = self.gpa.raw_value();
        Some(start..start.checked_add(self.bytes()?)?)
    }

    fn file_span(&self) -> Option<Range<u64>> {
        Some(self.file_offset..self.file_offset.checked_add(self.bytes()?)?)
    }
}

/// Where a page (or the first page of a run) lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagePlace {
    /// Page index in the layout.
    pub page: u64,
    /// Guest-physical address.
    pub gpa: GuestAddress,
    /// Byte offset in the RAM file.
    pub file_offset: u64,
}

/// What is wrong with a RAM layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No RAM ranges at all.
    #[error("the layout has no RAM ranges")]
    Empty,
    /// More ranges than [`MAX_RANGES`].
    #[error("{count} RAM ranges, at most {max} are accepted")]
    TooManyRanges {
        /// Ranges announced.
        count: u64,
        /// The cap.
        max: usize,
    },
    /// A range of zero pages.
    #[error("RAM range {index} is empty")]
    EmptyRange {
        /// Range index.
        index: usize,
    },
    /// A guest address or file offset that is not 4 KiB aligned.
    #[error("RAM range {index} is not 4 KiB aligned (gpa {gpa:#x}, file offset {file_offset:#x})")]
    Unaligned {
        /// Range index.
        index: usize,
        /// Its guest-physical address.
        gpa: u64,
        /// Its file offset.
        file_offset: u64,
    },
    /// A range whose end does not fit in 64 bits.
    #[error("RAM range {index} ends beyond 2^64")]
    Overflow {
        /// Range index.
        index: usize,
    },
    /// Ranges not in ascending guest-physical order, or overlapping.
    #[error("RAM range {index} overlaps or precedes range {}", index - 1)]
    GpaOrder {
        /// Index of the later range.
        index: usize,
    },
    /// Two ranges share bytes of the RAM file.
    #[error("RAM ranges {a} and {b} overlap in the RAM file")]
    FileOverlap {
        /// One range.
        a: usize,
        /// The other.
        b: usize,
    },
    /// More RAM than the configured cap.
    #[error("the layout describes {bytes} bytes of RAM, more than the cap of {max}")]
    TooLarge {
        /// RAM announced.
        bytes: u64,
        /// The cap.
        max: u64,
    },
    /// A guest memory region that is not a whole number of pages.
    #[error("guest memory region at {gpa:#x} is {len} bytes, not a multiple of 4 KiB")]
    RegionSize {
        /// Region start.
        gpa: u64,
        /// Region length.
        len: u64,
    },
}

/// Why a run of pages does not fit the layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    /// A run of zero pages.
    #[error("empty run at page {start}")]
    Empty {
        /// First page.
        start: u64,
    },
    /// A run reaching past the last page.
    #[error("run of {count} pages at page {start} ends beyond the {total} pages of RAM")]
    OutOfBounds {
        /// First page.
        start: u64,
        /// Pages.
        count: u64,
        /// Pages in the layout.
        total: u64,
    },
    /// A run that spans two RAM ranges.
    #[error(
        "run of {count} pages at page {start} crosses the end of its RAM range at page {range_end}"
    )]
    CrossesRange {
        /// First page.
        start: u64,
        /// Pages.
        count: u64,
        /// First page index past the range holding `start`.
        range_end: u64,
    },
}

/// A validated RAM layout: ranges in ascending guest-physical order, page
/// aligned, not overlapping in guest-physical space nor in the RAM file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    ranges: Vec<RamRange>,
    /// Page index of the first page of each range, plus the total at the end.
    firsts: Vec<u64>,
}

impl RamLayout {
    /// Test fixture: `low` pages at guest address 0 and `high` pages at
    /// `high_gpa`, back to back in the RAM file (RAM split around a hole,
    /// as a PC's is around the PCI hole).
    #[cfg(test)]
    pub(crate) fn split_for_tests(low: u64, high_gpa: u64, high: u64) -> Self {
        Self::new(vec![
            RamRange {
                gpa: GuestAddress(0),
                pages: low,
                file_offset: 0,
            },
            RamRange {
                gpa: GuestAddress(high_gpa),
                pages: high,
                file_offset: low * PAGE_SIZE as u64,
            },
        ])
        .expect("a valid split layout")
    }
    /// Validates `ranges` with the default RAM cap.
    pub fn new(ranges: Vec<RamRange>) -> Result<Self, LayoutError> {
        Self::with_max_bytes(ranges, DEFAULT_MAX_RAM_BYTES)
    }

    /// Validates `ranges`, refusing more than `max_bytes` of RAM.
    pub fn with_max_bytes(ranges: Vec<RamRange>, max_bytes: u64) -> Result<Self, LayoutError> {
        check_count(ranges.len() as u64)?;
        let mut firsts = Vec::with_capacity(ranges.len() + 1);
        let mut total: u64 = 0;
        for (index, range) in ranges.iter().enumerate() {
            check_range(index, range)?;
            if index > 0 && range.gpa.raw_value() < end_of(&ranges[index - 1]) {
                return Err(LayoutError::GpaOrder { index });
            }
            firsts.push(total);
            total = total
                .checked_add(range.pages)
                .ok_or(LayoutError::Overflow { index })?;
        }
        firsts.push(total);
        let bytes = total.saturating_mul(PAGE_SIZE as u64);
        if bytes > max_bytes {
            return Err(LayoutError::TooLarge {
                bytes,
                max: max_bytes,
            });
        }
        check_file_overlap(&ranges)?;
        Ok(Self { ranges, firsts })
    }

    /// The layout of a vm-memory guest memory: one range per region, in
    /// guest-physical order, stored back to back in the RAM file (as QEMU
    /// stores one memory backend split around the PCI hole).
    pub fn from_guest_memory<M: GuestMemoryBackend + ?Sized>(mem: &M) -> Result<Self, LayoutError> {
        let mut ranges = Vec::new();
        let mut file_offset = 0u64;
        for region in mem.iter() {
            let (gpa, len) = (region.start_addr(), region.len());
            if len % PAGE_SIZE as u64 != 0 {
                return Err(LayoutError::RegionSize {
                    gpa: gpa.raw_value(),
                    len,
                });
            }
            ranges.push(RamRange {
                gpa,
                pages: len / PAGE_SIZE as u64,
                file_offset,
            });
            file_offset = file_offset.saturating_add(len);
        }
        Self::new(ranges)
    }

    /// The ranges, in page index order.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Number of pages of RAM.
    pub fn total_pages(&self) -> u64 {
        self.firsts[self.ranges.len()]
    }

    /// Bytes of RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.total_pages() * PAGE_SIZE as u64
    }

    /// Smallest RAM file that holds every range.
    pub fn file_size(&self) -> u64 {
        self.ranges
            .iter()
            .filter_map(|r| r.file_span())
            .map(|s| s.end)
            .max()
            .unwrap_or(0)
    }

    /// Page indices of range `index`.
    pub fn pages_of(&self, index: usize) -> Option<Range<u64>> {
        Some(*self.firsts.get(index)?..*self.firsts.get(index + 1)?)
    }

    /// Where page `page` lives, or `None` past the end.
    pub fn place(&self, page: u64) -> Option<PagePlace> {
        let index = self.range_index(page)?;
        let (range, delta) = (&self.ranges[index], page - self.firsts[index]);
        let bytes = delta * PAGE_SIZE as u64;
        Some(PagePlace {
            page,
            gpa: range.gpa.unchecked_add(bytes),
            file_offset: range.file_offset + bytes,
        })
    }

    /// First page index past the range that holds `page`.
    pub fn range_end(&self, page: u64) -> Option<u64> {
        Some(self.firsts[self.range_index(page)? + 1])
    }

    /// Checks that `count` pages from `start` are non-empty and lie in one
    /// range; returns where the run starts.
    pub fn check_run(&self, start: u64, count: u64) -> Result<PagePlace, RunError> {
        let total = self.total_pages();
        if count == 0 {
            return Err(RunError::Empty { start });
        }
        let place = self.place(start).ok_or(RunError::OutOfBounds {
            start,
            count,
            total,
        })?;
        let range_end = self.firsts[self.range_index(start).unwrap_or(0) + 1];
        match start.checked_add(count) {
            Some(end) if end <= range_end => Ok(place),
            Some(end) if end <= total => Err(RunError::CrossesRange {
                start,
                count,
                range_end,
            }),
            _ => Err(RunError::OutOfBounds {
                start,
                count,
                total,
            }),
        }
    }

    fn range_index(&self, page: u64) -> Option<usize> {
        if page >= self.total_pages() {
            return None;
        }
        // `firsts` is ascending; the range is the last one starting at or
        // before `page`.
        Some(self.firsts.partition_point(|&first| first <= page) - 1)
    }
}

fn check_count(count: u64) -> Result<(), LayoutError> {
    if count == 0 {
        return Err(LayoutError::Empty);
    }
    if count > MAX_RANGES as u64 {
        return Err(LayoutError::TooManyRanges {
            count,
            max: MAX_RANGES,
        });
    }
    Ok(())
}

/// Wire-level check of a range count before anything is allocated for it.
pub(crate) fn check_range_count(count: u64) -> Result<(), LayoutError> {
    check_count(count)
}

fn check_range(index: usize, range: &RamRange) -> Result<(), LayoutError> {
    if range.pages == 0 {
        return Err(LayoutError::EmptyRange { index });
    }
    let (gpa, file_offset) = (range.gpa.raw_value(), range.file_offset);
    if gpa % PAGE_SIZE as u64 != 0 || file_offset % PAGE_SIZE as u64 != 0 {
        return Err(LayoutError::Unaligned {
            index,
            gpa,
            file_offset,
        });
    }
    if range.gpa_span().is_none() || range.file_span().is_none() {
        return Err(LayoutError::Overflow { index });
    }
    Ok(())
}

/// End of a range already checked by `check_range`.
fn end_of(range: &RamRange) -> u64 {
    range.gpa_span().map_or(u64::MAX, |s| s.end)
}

fn check_file_overlap(ranges: &[RamRange]) -> Result<(), LayoutError> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].file_offset);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // Spans were checked in `check_range`.
        let a_end = ranges[a].file_span().map_or(u64::MAX, |s| s.end);
        if a_end > ranges[b].file_offset {
            return Err(LayoutError::FileOverlap {
                a: a.min(b),
                b: a.max(b),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn range(gpa: u64, pages: u64, file_offset: u64) -> RamRange {
        RamRange {
            gpa: GuestAddress(gpa),
            pages,
            file_offset,
        }
    }

    /// RAM below a hole at 3 MiB..4 MiB, then above it.
    fn pc_like() -> RamLayout {
        RamLayout::new(vec![range(0, 768, 0), range(4 * MIB, 256, 3 * MIB)]).unwrap()
    }

    #[test]
    fn places_pages_across_the_hole() {
        let layout = pc_like();
        assert_eq!(layout.total_pages(), 1024);
        assert_eq!(layout.file_size(), 4 * MIB);
        let last_low = layout.place(767).unwrap();
        assert_eq!(
            (last_low.gpa, last_low.file_offset),
            (GuestAddress(3 * MIB - 4096), 3 * MIB - 4096)
        );
        let first_high = layout.place(768).unwrap();
        assert_eq!(
            (first_high.gpa, first_high.file_offset),
            (GuestAddress(4 * MIB), 3 * MIB)
        );
        assert_eq!(layout.place(1024), None);
        assert_eq!(layout.range_end(0), Some(768));
        assert_eq!(layout.range_end(1023), Some(1024));
        assert_eq!(layout.pages_of(1), Some(768..1024));
    }

    #[test]
    fn runs_must_stay_in_one_range() {
        let layout = pc_like();
        assert!(layout.check_run(760, 8).is_ok());
        assert_eq!(
            layout.check_run(760, 9),
            Err(RunError::CrossesRange {
                start: 760,
                count: 9,
                range_end: 768
            })
        );
        assert_eq!(
            layout.check_run(1000, 25),
            Err(RunError::OutOfBounds {
                start: 1000,
                count: 25,
                total: 1024
            })
        );
        assert_eq!(
            layout.check_run(1, u64::MAX),
            Err(RunError::OutOfBounds {
                start: 1,
                count: u64::MAX,
                total: 1024
            })
        );
        assert_eq!(layout.check_run(5, 0), Err(RunError::Empty { start: 5 }));
    }

    #[test]
    fn rejects_bad_layouts() {
        assert_eq!(RamLayout::new(vec![]), Err(LayoutError::Empty));
        assert_eq!(
            RamLayout::new(vec![range(0, 0, 0)]),
            Err(LayoutError::EmptyRange { index: 0 })
        );
        assert!(matches!(
            RamLayout::new(vec![range(1, 1, 0)]),
            Err(LayoutError::Unaligned { .. })
        ));
        assert_eq!(
            RamLayout::new(vec![range(u64::MAX - 4095, 2, 0)]),
            Err(LayoutError::Overflow { index: 0 })
        );
        assert_eq!(
            RamLayout::new(vec![range(0, 2, 0), range(4096, 1, 8192)]),
            Err(LayoutError::GpaOrder { index: 1 })
        );
        assert_eq!(
            RamLayout::new(vec![range(0, 2, 4096), range(MIB, 1, 8192)]),
            Err(LayoutError::FileOverlap { a: 0, b: 1 })
        );
        assert!(matches!(
            RamLayout::with_max_bytes(vec![range(0, 3, 0)], 8192),
            Err(LayoutError::TooLarge {
                bytes: 12288,
                max: 8192
            })
        ));
        let too_many = (0..=MAX_RANGES as u64)
            .map(|i| range(i * 8192, 1, i * 4096))
            .collect();
        assert!(matches!(
            RamLayout::new(too_many),
            Err(LayoutError::TooManyRanges { .. })
        ));
    }

    #[test]
    fn from_guest_memory_stores_regions_back_to_back() {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 3 * MIB as usize),
            (GuestAddress(4 * MIB), MIB as usize),
        ])
        .unwrap();
        assert_eq!(RamLayout::from_guest_memory(&mem).unwrap(), pc_like());
    }
}
