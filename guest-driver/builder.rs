// SPDX-License-Identifier: GPL-2.0

//! The free-page bitmap builder: owns the layout table, the bitmap buffer
//! and the figures of the last build. Each bound balloon device owns one
//! (`balloon.rs`, for its hint rounds); the module keeps another behind a
//! mutex for the debugfs interface.

use core::fmt::{self, Write};
use kernel::alloc::flags::GFP_KERNEL;
use kernel::prelude::*;

use crate::bitmap;
use crate::layout::{Bit, Layout, LayoutRange, Pfn, MAX_LAYOUT_RANGES};
use crate::walk::{BuildStats, Walker, DEFAULT_BUDGET, MAX_BUDGET};
use crate::zone;

/// Where the current layout table came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayoutSource {
    /// The kernel's "System RAM" resources (`walk_system_ram_range`).
    Iomem,
    /// A table given from outside (the host, or debugfs for tests).
    Host,
}

impl LayoutSource {
    fn name(self) -> &'static str {
        match self {
            Self::Iomem => "iomem",
            Self::Host => "host",
        }
    }
}

/// Layout, bitmap buffer and statistics.
///
/// # Invariants
///
/// `bitmap.len() == bitmap::words_for_bits(layout.total_bits())`.
pub(crate) struct Builder {
    layout: Layout,
    source: LayoutSource,
    bitmap: VVec<u64>,
    budget: u32,
    pcp: bool,
    builds: u64,
    last: BuildStats,
    memset_ns: u64,
    pages_free: u64,
    max_lock_hold_all_ns: u64,
}

/// The guest's RAM as a layout: "System RAM" ranges, holes folded out.
fn layout_from_iomem() -> Result<Layout> {
    let mut ranges = [(0u64, 0u64); MAX_LAYOUT_RANGES];
    let n = zone::system_ram_ranges(&mut ranges)?;
    Layout::from_ram_pfn_ranges(&ranges[..n]).map_err(|e| {
        pr_err!(
            "freehint: cannot build a layout from System RAM: {}\n",
            format_args!("{e}")
        );
        EINVAL
    })
}

/// A zeroed bitmap buffer for `layout`, from vmalloc.
fn alloc_bitmap(layout: &Layout) -> Result<VVec<u64>> {
    let words = bitmap::words_for_bits(layout.total_bits());
    Ok(VVec::from_elem(0u64, words, GFP_KERNEL)?)
}

impl Builder {
    /// A builder for the kernel's own memory map.
    pub(crate) fn new() -> Result<Self> {
        let layout = layout_from_iomem()?;
        let bitmap = alloc_bitmap(&layout)?;
        // INVARIANT: the bitmap was sized for `layout`.
        Ok(Self {
            layout,
            source: LayoutSource::Iomem,
            bitmap,
            budget: DEFAULT_BUDGET,
            pcp: true,
            builds: 0,
            last: BuildStats::default(),
            memset_ns: 0,
            pages_free: 0,
            max_lock_hold_all_ns: 0,
        })
    }

    /// Replaces the layout (a validated table from the host, or the kernel's
    /// own with `None`) and reallocates the bitmap for it (unless the table
    /// is unchanged: the buffer is allocated once per layout). The previous
    /// bitmap content is not kept.
    pub(crate) fn set_layout(&mut self, layout: Option<Layout>) -> Result {
        let (layout, source) = match layout {
            Some(l) => (l, LayoutSource::Host),
            None => (layout_from_iomem()?, LayoutSource::Iomem),
        };
        if layout == self.layout {
            // Same table (a host repeats it every round): keep the buffer.
            self.source = source;
            return Ok(());
        }
        let bitmap = alloc_bitmap(&layout)?;
        // INVARIANT: both fields change together.
        self.layout = layout;
        self.bitmap = bitmap;
        self.source = source;
        self.pages_free = 0;
        Ok(())
    }

    /// Sets the number of free-list entries visited per lock hold.
    pub(crate) fn set_budget(&mut self, budget: u32) -> Result {
        if budget == 0 || budget > MAX_BUDGET {
            return Err(EINVAL);
        }
        self.budget = budget;
        Ok(())
    }

    /// Whether the per-CPU page lists are walked too (default: yes).
    pub(crate) fn set_pcp(&mut self, on: bool) {
        self.pcp = on;
    }

    /// Builds the bitmap now: zeroes it (timed: the memset baseline), then
    /// walks every free list.
    pub(crate) fn build(&mut self) {
        let t0 = zone::now_ns();
        self.bitmap.fill(0);
        self.memset_ns = zone::now_ns().saturating_sub(t0);
        let stats = Walker::new(&self.layout, &mut self.bitmap, self.budget, self.pcp).run();
        self.pages_free = bitmap::count_ones(&self.bitmap);
        self.max_lock_hold_all_ns = self.max_lock_hold_all_ns.max(stats.max_lock_hold_ns);
        self.last = stats;
        self.builds += 1;
    }

    /// The bitmap as little-endian bytes (bit i = byte i/8, bit i%8).
    pub(crate) fn bitmap_bytes(&self) -> &[u8] {
        let words: &[u64] = &self.bitmap;
        // SAFETY: any initialised `u64` slice is also a valid `u8` slice of
        // 8 times the length with the same lifetime; x86-64 is little-endian,
        // so the bytes are in wire order.
        unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
    }

    /// The layout table, one "first_pfn nr_pages first_bit" line per range.
    pub(crate) fn write_layout(&self, out: &mut impl Write) -> fmt::Result {
        for r in self.layout.ranges() {
            writeln!(out, "{} {} {}", r.first_pfn, r.nr_pages, r.first_bit)?;
        }
        Ok(())
    }

    /// The statistics as one JSON object and a newline.
    pub(crate) fn write_stats(&self, out: &mut impl Write) -> fmt::Result {
        let s = &self.last;
        write!(
            out,
            "{{\"builds\":{},\"layout_source\":\"{}\",\"ranges\":{},\"total_bits\":{},\
             \"bitmap_bytes\":{},\"budget\":{},\"pages_free\":{},\"zones\":{},\"lists\":{},\
             \"blocks\":{},\"lock_acquisitions\":{},\"resumes\":{},\"restarts\":{},\
             \"lists_truncated\":{},\"pages_outside_layout\":{},\"walk_ns\":{},\
             \"memset_ns\":{},\"max_lock_hold_ns\":{},\"total_lock_hold_ns\":{},\
             \"max_lock_hold_ns_all\":{},\"tsc_khz\":{},\"tsc_calibrated\":{},\"pcp\":{},\
             \"pcp_lists\":{},\"pcp_blocks\":{},\"pcp_lists_capped\":{},\"pcp_holds\":{},\"max_pcp_hold_ns\":{},\
             \"holds_lt_10us\":{},\"holds_lt_50us\":{},\"holds_lt_200us\":{},\"holds_lt_1ms\":{},\
             \"holds_ge_1ms\":{}}}\n",
            self.builds,
            self.source.name(),
            self.layout.ranges().len(),
            self.layout.total_bits(),
            self.bitmap.len() * 8,
            self.budget,
            self.pages_free,
            s.zones,
            s.lists,
            s.blocks,
            s.lock_acquisitions,
            s.resumes,
            s.restarts,
            s.lists_truncated,
            s.pages_outside_layout,
            s.walk_ns,
            self.memset_ns,
            s.max_lock_hold_ns,
            s.total_lock_hold_ns,
            self.max_lock_hold_all_ns,
            crate::clock::tsc_khz().0,
            crate::clock::tsc_khz().1,
            self.pcp,
            s.pcp_lists,
            s.pcp_blocks,
            s.pcp_lists_capped,
            s.pcp_holds,
            s.max_pcp_hold_ns,
            s.hold_hist[0],
            s.hold_hist[1],
            s.hold_hist[2],
            s.hold_hist[3],
            s.hold_hist[4],
        )
    }

    /// Figures of the last build.
    pub(crate) fn last_stats(&self) -> &BuildStats {
        &self.last
    }

    /// Calls `f(first_pfn, nr_pages)` for every run of free pages of the
    /// last build, in layout (address) order, until `f` returns `false`.
    /// A run never spans a hole of the layout.
    pub(crate) fn for_each_free_run(&self, mut f: impl FnMut(Pfn, u64) -> bool) {
        let mut go = true;
        for (bit, nr) in bitmap::set_runs(&self.bitmap) {
            self.layout.for_each_pfn_run(Bit(bit), nr, |pfn, pages| {
                if go {
                    go = f(pfn, pages);
                }
            });
            if !go {
                return;
            }
        }
    }

    /// Headline figures of the last build.
    pub(crate) fn summary(&self) -> BuildSummary {
        BuildSummary {
            total_bits: self.layout.total_bits(),
            free_pages: self.pages_free,
            walk_ns: self.last.walk_ns,
        }
    }

    /// Number of builds since the module was loaded.
    pub(crate) fn builds(&self) -> u64 {
        self.builds
    }

    /// Current budget (entries per lock hold), as text.
    pub(crate) fn write_budget(&self, out: &mut impl Write) -> fmt::Result {
        writeln!(out, "{}", self.budget)
    }

    /// Whether per-CPU lists are walked, as text (`1` or `0`).
    pub(crate) fn write_pcp(&self, out: &mut impl Write) -> fmt::Result {
        writeln!(out, "{}", u8::from(self.pcp))
    }
}

/// Headline figures of a build ([`Builder::summary`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BuildSummary {
    /// Bits in the bitmap (RAM pages the layout covers).
    pub(crate) total_bits: u64,
    /// Pages found free.
    pub(crate) free_pages: u64,
    /// Time the walk took, in nanoseconds.
    pub(crate) walk_ns: u64,
}

/// Parses a layout table in the text form of [`Builder::write_layout`]:
/// lines of three decimal numbers `first_pfn nr_pages first_bit`. Returns
/// `Ok(None)` for the single word `iomem` (back to the kernel's own map).
pub(crate) fn parse_layout(text: &[u8]) -> Result<Option<Layout>> {
    let text = core::str::from_utf8(text).map_err(|_| EINVAL)?;
    if text.trim() == "iomem" {
        return Ok(None);
    }
    let mut ranges = [LayoutRange::default(); MAX_LAYOUT_RANGES];
    let mut n = 0;
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        let num = |s: Option<&str>| -> Result<u64> {
            s.ok_or(EINVAL)?.parse::<u64>().map_err(|_| EINVAL)
        };
        let range = LayoutRange {
            first_pfn: Pfn(num(Some(first))?),
            nr_pages: num(fields.next())?,
            first_bit: Bit(num(fields.next())?),
        };
        if fields.next().is_some() {
            return Err(EINVAL);
        }
        *ranges.get_mut(n).ok_or(E2BIG)? = range;
        n += 1;
    }
    Layout::from_ranges(&ranges[..n]).map(Some).map_err(|e| {
        pr_warn!("freehint: layout rejected: {}\n", format_args!("{e}"));
        EINVAL
    })
}
