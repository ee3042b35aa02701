//! Dirty logs: which pages were written since the last look.
//!
//! A [`DirtyLog`] reports writes by page index (see
//! [`RamLayout`](crate::RamLayout)). Several writers may touch guest RAM
//! (the vCPUs, the VMM's device models, other processes that map the RAM
//! file); each needs a log, and [`AnyOf`] merges them.

use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::bits::{PageBitmap, PageBits};
use crate::PAGE_SIZE;

/// An error from a caller-provided hook (dirty log, hint source, VM control).
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A source of dirty pages.
///
/// A writer must mark a page *after* its write is visible to readers of
/// guest memory: then a sync that misses the mark comes before the write
/// was readable, and the next sync reports it.
pub trait DirtyLog {
    /// Starts logging. Writes before this need not be reported.
    fn start(&mut self) -> Result<(), HookError>;
    /// Sets in `dirty` the bit of every page written since `start` or the
    /// previous `sync`, and forgets them. Never clears bits. A write racing
    /// with a sync is reported by that sync or the next one.
    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError>;
    /// Stops logging.
    fn stop(&mut self) -> Result<(), HookError> {
        Ok(())
    }
}

impl<L: DirtyLog + ?Sized> DirtyLog for &mut L {
    fn start(&mut self) -> Result<(), HookError> {
        (**self).start()
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        (**self).sync(dirty)
    }

    fn stop(&mut self) -> Result<(), HookError> {
        (**self).stop()
    }
}

impl<L: DirtyLog + ?Sized> DirtyLog for Box<L> {
    fn start(&mut self) -> Result<(), HookError> {
        (**self).start()
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        (**self).sync(dirty)
    }

    fn stop(&mut self) -> Result<(), HookError> {
        (**self).stop()
    }
}

/// Several logs as one: a page is dirty when any of them says so.
#[derive(Default)]
pub struct AnyOf<'a> {
    logs: Vec<Box<dyn DirtyLog + Send + 'a>>,
}

impl std::fmt::Debug for AnyOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyOf")
            .field("logs", &self.logs.len())
            .finish()
    }
}

impl<'a> AnyOf<'a> {
    /// No logs yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a log.
    pub fn with(mut self, log: impl DirtyLog + Send + 'a) -> Self {
        self.logs.push(Box::new(log));
        self
    }
}

impl DirtyLog for AnyOf<'_> {
    fn start(&mut self) -> Result<(), HookError> {
        self.logs.iter_mut().try_for_each(|log| log.start())
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        self.logs.iter_mut().try_for_each(|log| log.sync(dirty))
    }

    fn stop(&mut self) -> Result<(), HookError> {
        self.logs.iter_mut().try_for_each(|log| log.stop())
    }
}

/// A log that writers mark by hand, shared between threads: for writes the
/// other logs cannot see (a device model's own writes into guest RAM), and
/// as a test double.
#[derive(Clone, Debug)]
pub struct SharedLog {
    pages: Arc<Mutex<PageBitmap>>,
}

impl SharedLog {
    /// A log for `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            pages: Arc::new(Mutex::new(PageBitmap::repeat(false, pages))),
        }
    }

    /// Marks page `page` written (ignored past the end).
    pub fn mark(&self, page: usize) {
        if let Some(mut bit) = self.lock().get_mut(page) {
            *bit = true;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PageBitmap> {
        // A bitmap is valid whatever a panicking writer left behind.
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl DirtyLog for SharedLog {
    fn start(&mut self) -> Result<(), HookError> {
        self.lock().fill(false);
        Ok(())
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        let mut pages = self.lock();
        let len = pages.len().min(dirty.len());
        dirty[..len] |= &pages[..len];
        pages.fill(false);
        Ok(())
    }
}

/// The dirty bitmaps vm-memory keeps for a `GuestMemoryMmap<AtomicBitmap>`:
/// every write through vm-memory's `Bytes` API is logged, so a Rust VMM
/// whose vCPUs and devices write guest memory that way needs nothing else.
/// Regions map to the layout of
/// [`RamLayout::from_guest_memory`](crate::RamLayout::from_guest_memory).
#[derive(Debug)]
pub struct VmMemoryLog<'m> {
    mem: &'m GuestMemoryMmap<AtomicBitmap>,
}

/// Why a vm-memory bitmap cannot serve as a log.
#[derive(Debug, thiserror::Error)]
#[error("the dirty bitmap of the region at {gpa:#x} has {bits} bits for {pages} pages (not 4 KiB granular)")]
pub struct BitmapGranularity {
    /// Region start.
    pub gpa: u64,
    /// Bits in its bitmap.
    pub bits: usize,
    /// 4 KiB pages in the region.
    pub pages: u64,
}

impl<'m> VmMemoryLog<'m> {
    /// A log over `mem`'s bitmaps, which must track 4 KiB pages.
    pub fn new(mem: &'m GuestMemoryMmap<AtomicBitmap>) -> Result<Self, BitmapGranularity> {
        for region in mem.iter() {
            let (bits, pages) = (region.bitmap_all().len(), region.len() / PAGE_SIZE as u64);
            if bits as u64 != pages {
                return Err(BitmapGranularity {
                    gpa: region.start_addr().0,
                    bits,
                    pages,
                });
            }
        }
        Ok(Self { mem })
    }
}

/// The whole bitmap of a region (vm-memory's trait method gives a slice).
trait WholeBitmap {
    fn bitmap_all(&self) -> &AtomicBitmap;
}

impl WholeBitmap for vm_memory::GuestRegionMmap<AtomicBitmap> {
    fn bitmap_all(&self) -> &AtomicBitmap {
        vm_memory::MmapRegion::bitmap(self)
    }
}

impl DirtyLog for VmMemoryLog<'_> {
    fn start(&mut self) -> Result<(), HookError> {
        self.mem
            .iter()
            .for_each(|region| region.bitmap_all().reset());
        Ok(())
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        let mut first = 0;
        for region in self.mem.iter() {
            let bitmap = region.bitmap_all();
            let words = bitmap.get_and_reset();
            let pages = bitmap.len();
            let target = dirty
                .get_mut(first..first + pages)
                .ok_or("guest memory is larger than the layout")?;
            *target |= &PageBits::from_slice(&words)[..pages];
            first += pages;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn ones(bits: &PageBits) -> Vec<usize> {
        bits.iter_ones().collect()
    }

    #[test]
    fn shared_logs_merge_and_forget() {
        let (a, b) = (SharedLog::new(16), SharedLog::new(16));
        let mut both = AnyOf::new().with(a.clone()).with(b.clone());
        both.start().unwrap();
        a.mark(1);
        b.mark(9);
        b.mark(1000);
        let mut dirty = PageBitmap::repeat(false, 16);
        dirty.set(4, true);
        both.sync(&mut dirty).unwrap();
        assert_eq!(ones(&dirty), vec![1, 4, 9], "ORed in, nothing cleared");
        dirty.fill(false);
        both.sync(&mut dirty).unwrap();
        assert_eq!(ones(&dirty), Vec::<usize>::new(), "forgotten after a sync");
    }

    #[test]
    fn vm_memory_writes_are_logged_by_page_index() {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10000), 0x2000),
        ])
        .unwrap();
        let mut log = VmMemoryLog::new(&mem).unwrap();
        log.start().unwrap();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[1u8; 2], GuestAddress(0x10fff)).unwrap();
        let mut dirty = PageBitmap::repeat(false, 6);
        log.sync(&mut dirty).unwrap();
        assert_eq!(ones(&dirty), vec![1, 4, 5]);
        dirty.fill(false);
        log.sync(&mut dirty).unwrap();
        assert!(dirty.not_any());
    }
}
