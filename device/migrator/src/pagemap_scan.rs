//! The dirty log of a process's guest RAM, read from its page tables with
//! the `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` (Linux 6.7 or later).
//!
//! The RAM must be registered for asynchronous uffd-wp *inside* that
//! process ([`AsyncWriteTracking`](crate::uffd::AsyncWriteTracking); for
//! QEMU, a library preloaded into it). Then one scan with
//! `PAGE_IS_WRITTEN` and `PM_SCAN_WP_MATCHING` reports the pages written
//! since the last scan and write-protects them again, page by page
//! atomically: a write after its page was scanned is reported by the next
//! scan. Soft-dirty bits are not used: they may be compiled out, and
//! reading them and clearing them are two steps.
//!
//! Only writes made through that process's page tables are seen (its
//! threads, its device emulation, the kernel acting for it). Other
//! processes that map the same RAM file (vhost-user back ends, a vfio-user
//! server, this migrator) need their own log, merged with
//! [`AnyOf`](crate::AnyOf).

use std::fs::File;
use std::io;
use std::path::PathBuf;

use crate::bits::PageBits;
use crate::dirty::{DirtyLog, HookError};
use crate::layout::RamLayout;
use crate::sys::{self, PageRegion, PmScanArg};
use crate::PAGE_SIZE;

/// Regions one ioctl may return.
const REGIONS_PER_SCAN: usize = 1024;

/// Why the log could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum PagemapScanError {
    /// The pagemap file could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Not one host address per RAM range.
    #[error("{given} host addresses for {ranges} RAM ranges")]
    AddressCount {
        /// Addresses given.
        given: usize,
        /// Ranges in the layout.
        ranges: usize,
    },
    /// A host address that is not page aligned, or a range past 2^64.
    #[error("RAM range {index} at host address {hva:#x} is unaligned or ends beyond 2^64")]
    BadAddress {
        /// Range index.
        index: usize,
        /// Its host address.
        hva: u64,
    },
    /// A scan failed (for example: the range has no async uffd-wp).
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} failed")]
    Scan {
        /// Scan start.
        start: u64,
        /// Scan end.
        end: u64,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The kernel reported no progress.
    #[error("PAGEMAP_SCAN made no progress at {at:#x}")]
    NoProgress {
        /// Where.
        at: u64,
    },
}

/// One RAM range in the scanned process.
#[derive(Debug)]
struct Mapped {
    hva: u64,
    end: u64,
    /// Page index of its first page.
    first: usize,
}

/// The dirty log of a process's guest RAM (see the module documentation).
#[derive(Debug)]
pub struct PagemapScanLog {
    pagemap: File,
    ranges: Vec<Mapped>,
    regions: Vec<PageRegion>,
}

impl PagemapScanLog {
    /// The log of process `pid`, where RAM range *i* of `layout` is mapped
    /// at `host_addrs[i]`. QEMU maps a memory backend in one piece, so
    /// there range *i* is at the backend's address plus its file offset.
    pub fn for_process(
        pid: u32,
        host_addrs: &[u64],
        layout: &RamLayout,
    ) -> Result<Self, PagemapScanError> {
        Self::open(
            PathBuf::from(format!("/proc/{pid}/pagemap")),
            host_addrs,
            layout,
        )
    }

    /// The log of this process's own memory (a VMM that embeds this crate).
    pub fn for_this_process(
        host_addrs: &[u64],
        layout: &RamLayout,
    ) -> Result<Self, PagemapScanError> {
        Self::open(PathBuf::from("/proc/self/pagemap"), host_addrs, layout)
    }

    fn open(
        path: PathBuf,
        host_addrs: &[u64],
        layout: &RamLayout,
    ) -> Result<Self, PagemapScanError> {
        let ranges = mapped_ranges(host_addrs, layout)?;
        let pagemap =
            File::open(&path).map_err(|source| PagemapScanError::Open { path, source })?;
        Ok(Self {
            pagemap,
            ranges,
            regions: vec![PageRegion::default(); REGIONS_PER_SCAN],
        })
    }

    /// Scans every range, write-protecting what it finds; marks the written
    /// pages in `dirty` if given.
    fn scan_all(&mut self, mut dirty: Option<&mut PageBits>) -> Result<(), PagemapScanError> {
        for index in 0..self.ranges.len() {
            self.scan(index, dirty.as_deref_mut())?;
        }
        Ok(())
    }

    fn scan(
        &mut self,
        index: usize,
        mut dirty: Option<&mut PageBits>,
    ) -> Result<(), PagemapScanError> {
        let (hva, end) = (self.ranges[index].hva, self.ranges[index].end);
        let mut cursor = hva;
        while cursor < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start: cursor,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN takes a `pm_scan_arg`; `vec` and `vec_len`
            // describe `self.regions`, which lives through the call and
            // holds plain integers the kernel may overwrite.
            let scanned = unsafe { sys::ioctl(&self.pagemap, sys::PAGEMAP_SCAN, &mut arg) };
            let found = scanned.map_err(|source| PagemapScanError::Scan {
                start: cursor,
                end,
                source,
            })?;
            if let Some(dirty) = dirty.as_deref_mut() {
                let count = (found as usize).min(self.regions.len());
                self.regions[..count]
                    .iter()
                    .for_each(|region| mark(&self.ranges[index], region, dirty));
            }
            if arg.walk_end <= cursor {
                return Err(PagemapScanError::NoProgress { at: cursor });
            }
            cursor = arg.walk_end;
        }
        Ok(())
    }
}

/// Checks the host addresses and pairs them with the layout's ranges.
fn mapped_ranges(host_addrs: &[u64], layout: &RamLayout) -> Result<Vec<Mapped>, PagemapScanError> {
    let ranges = layout.ranges();
    if host_addrs.len() != ranges.len() {
        return Err(PagemapScanError::AddressCount {
            given: host_addrs.len(),
            ranges: ranges.len(),
        });
    }
    let mut mapped = Vec::with_capacity(ranges.len());
    for (index, (&hva, range)) in host_addrs.iter().zip(ranges).enumerate() {
        let end = range
            .pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|len| hva.checked_add(len));
        let (Some(end), true) = (end, hva % PAGE_SIZE as u64 == 0) else {
            return Err(PagemapScanError::BadAddress { index, hva });
        };
        let first = layout.pages_of(index).map_or(0, |pages| pages.start) as usize;
        mapped.push(Mapped { hva, end, first });
    }
    Ok(mapped)
}

/// Marks the pages of a returned region, clipped to its range.
fn mark(range: &Mapped, region: &PageRegion, dirty: &mut PageBits) {
    let start = region.start.clamp(range.hva, range.end) - range.hva;
    let end = region.end.clamp(range.hva, range.end) - range.hva;
    let pages = range.first + (start / PAGE_SIZE as u64) as usize
        ..range.first + end.div_ceil(PAGE_SIZE as u64) as usize;
    if let Some(bits) = dirty.get_mut(pages) {
        bits.fill(true);
    }
}

impl DirtyLog for PagemapScanLog {
    /// Write-protects every page again, forgetting earlier writes.
    fn start(&mut self) -> Result<(), HookError> {
        Ok(self.scan_all(None)?)
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        Ok(self.scan_all(Some(dirty))?)
    }
}
