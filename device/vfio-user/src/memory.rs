//! Guest memory from vfio-user DMA_MAP/DMA_UNMAP.
//!
//! Every DMA_MAP with a file descriptor is mmapped (shared) and the whole
//! region set is rebuilt into a fresh [`GuestMemoryMmap`] that is swapped into
//! the [`GuestMemoryAtomic`] the device holds, so the device sees each change
//! at its next memory access. Mappings without an fd (QEMU's ROM and VRAM
//! sections) are logged and ignored. Read-only mappings are left out of the
//! device's memory (the device writes used rings and hint replies, and a
//! write through a read-only mapping would kill the server); like any map,
//! they still replace what they overlap. During boot QEMU maps and unmaps
//! overlapping ranges many times, so unmaps work by range: a partly covered
//! mapping is cut and its remainder mapped again from the same fd.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use log::{debug, info, warn};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

/// Most DMA mappings kept at once (bounds our memory whatever the client sends).
pub const MAX_MAPPINGS: usize = 512;

/// Errors of DMA map/unmap requests.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size zero, or address/offset + size overflows.
    #[error("invalid DMA range: address {address:#x} size {size:#x} offset {offset:#x}")]
    InvalidRange {
        /// Guest-physical address.
        address: u64,
        /// Length.
        size: u64,
        /// Offset in the fd.
        offset: u64,
    },
    /// Address, size or offset not page aligned (mmap needs it).
    #[error("DMA range not page aligned: address {address:#x} size {size:#x} offset {offset:#x}")]
    Unaligned {
        /// Guest-physical address.
        address: u64,
        /// Length.
        size: u64,
        /// Offset in the fd.
        offset: u64,
    },
    /// The range ends past the end of the file (access would SIGBUS).
    #[error("DMA range {address:#x}+{size:#x} at fd offset {offset:#x} ends past the file's end ({file_size:#x})")]
    PastEof {
        /// Guest-physical address.
        address: u64,
        /// Length.
        size: u64,
        /// Offset in the fd.
        offset: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// The fd is not a regular file (memfd, tmpfs, hugetlbfs file).
    #[error("DMA fd is not a regular file: {0}")]
    NotRegularFile(String),
    /// The request would leave more than [`MAX_MAPPINGS`] mappings (a map
    /// adds one; an unmap or map inside a mapping splits it in two).
    #[error("too many DMA mappings (limit {MAX_MAPPINGS})")]
    TooManyMappings,
    /// mmap failed.
    #[error("cannot mmap DMA region at {address:#x} (size {size:#x}): {source}")]
    Mmap {
        /// Guest-physical address.
        address: u64,
        /// Length.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Building the region collection failed (should not happen: we keep
    /// the set sorted and disjoint).
    #[error("cannot build guest memory: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, MemoryError>;

#[derive(Debug)]
struct Mapping {
    size: u64,
    file: Arc<File>,
    file_offset: u64,
    writable: bool,
    region: Arc<GuestRegionMmap>,
}

/// The DMA mappings of one client and the guest memory built from them.
#[derive(Debug)]
pub struct DmaMemory {
    mappings: BTreeMap<u64, Mapping>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    page_size: u64,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|&p| p > 0).unwrap_or(4096)
}

fn map_region(
    file: &Arc<File>,
    file_offset: u64,
    address: u64,
    size: u64,
    writable: bool,
) -> Result<Arc<GuestRegionMmap>> {
    let bad = || MemoryError::InvalidRange {
        address,
        size,
        offset: file_offset,
    };
    let len = usize::try_from(size).map_err(|_| bad())?;
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let mmap = MmapRegion::build(
        Some(FileOffset::from_arc(file.clone(), file_offset)),
        len,
        prot,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    )
    .map_err(|source| MemoryError::Mmap {
        address,
        size,
        source,
    })?;
    GuestRegionMmap::new(mmap, GuestAddress(address))
        .map(Arc::new)
        .ok_or_else(bad)
}

impl Default for DmaMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl DmaMemory {
    /// No mappings yet; the handle for the device is [`Self::handle`].
    pub fn new() -> Self {
        DmaMemory {
            mappings: BTreeMap::new(),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            page_size: page_size(),
        }
    }

    /// The swappable guest memory the device uses.
    pub fn handle(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.mem.clone()
    }

    /// Mapped ranges (address, size), sorted.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.mappings.iter().map(|(&a, m)| (a, m.size)).collect()
    }

    fn check(&self, address: u64, size: u64, offset: u64) -> Result<u64> {
        let end = address
            .checked_add(size)
            .filter(|_| size > 0 && offset.checked_add(size).is_some())
            .ok_or(MemoryError::InvalidRange {
                address,
                size,
                offset,
            })?;
        let mask = self.page_size - 1;
        if (address | size | offset) & mask != 0 {
            return Err(MemoryError::Unaligned {
                address,
                size,
                offset,
            });
        }
        Ok(end)
    }

    /// DMA_MAP. Without an fd the range is ignored (QEMU sends ROM/VRAM
    /// sections that way). A read-only map is checked, then left out of the
    /// device's memory: the device must never write through it. A new map
    /// replaces what it overlaps. A refused map changes nothing.
    pub fn map(
        &mut self,
        address: u64,
        size: u64,
        offset: u64,
        writable: bool,
        fd: Option<File>,
    ) -> Result<()> {
        let Some(fd) = fd else {
            debug!("DMA_MAP {address:#x}+{size:#x} without fd ignored (ROM/VRAM section)");
            return Ok(());
        };
        let end = self.check(address, size, offset)?;
        let meta = fd
            .metadata()
            .map_err(|e| MemoryError::NotRegularFile(e.to_string()))?;
        if !meta.is_file() {
            return Err(MemoryError::NotRegularFile(format!(
                "{:?}",
                meta.file_type()
            )));
        }
        if offset + size > meta.len() {
            return Err(MemoryError::PastEof {
                address,
                size,
                offset,
                file_size: meta.len(),
            });
        }
        if self.count_after_cut(address, end) + usize::from(writable) > MAX_MAPPINGS {
            return Err(MemoryError::TooManyMappings);
        }
        if !writable {
            info!(
                "read-only DMA_MAP {address:#x}+{size:#x} left out of the device's memory \
                 (the device writes guest memory)"
            );
            return self.cut_and_publish(address, end);
        }
        let file = Arc::new(fd);
        let region = map_region(&file, offset, address, size, writable)?;
        if let Err(e) = self.cut(address, end) {
            // Keep what the device sees equal to our table, then report.
            self.publish()?;
            return Err(e);
        }
        debug!("DMA_MAP {address:#x}+{size:#x} fd offset {offset:#x} writable {writable}");
        self.mappings.insert(
            address,
            Mapping {
                size,
                file,
                file_offset: offset,
                writable,
                region,
            },
        );
        self.publish()
    }

    /// DMA_UNMAP of a range (partly covered mappings keep their remainder).
    /// Refused, changing nothing, if splitting a mapping would leave more
    /// than [`MAX_MAPPINGS`].
    pub fn unmap(&mut self, address: u64, size: u64) -> Result<()> {
        let end = self.check(address, size, 0)?;
        if self.count_after_cut(address, end) > MAX_MAPPINGS {
            return Err(MemoryError::TooManyMappings);
        }
        debug!("DMA_UNMAP {address:#x}+{size:#x}");
        self.cut_and_publish(address, end)
    }

    /// Removes [start, end) and publishes the result (also after an error,
    /// so that what the device sees always equals the table).
    fn cut_and_publish(&mut self, start: u64, end: u64) -> Result<()> {
        let cut = self.cut(start, end);
        self.publish()?;
        cut
    }

    /// DMA_UNMAP with the UNMAP_ALL flag, or a client that went away.
    pub fn unmap_all(&mut self) {
        if !self.mappings.is_empty() {
            info!("dropping all {} DMA mappings", self.mappings.len());
        }
        self.mappings.clear();
        // An empty collection cannot fail to build.
        let _ = self.publish();
    }

    /// How many mappings are left once [start, end) is cut out: each
    /// mapping it touches goes, and comes back as up to two remainders.
    fn count_after_cut(&self, start: u64, end: u64) -> usize {
        self.mappings
            .range(..end)
            .filter(|(&a, m)| a + m.size > start)
            .fold(self.mappings.len(), |n, (&a, m)| {
                n - 1 + usize::from(a < start) + usize::from(a + m.size > end)
            })
    }

    /// Removes [start, end) from the mapping set, re-mapping remainders.
    fn cut(&mut self, start: u64, end: u64) -> Result<()> {
        let hit: Vec<u64> = self
            .mappings
            .range(..end)
            .filter(|(&a, m)| a + m.size > start)
            .map(|(&a, _)| a)
            .collect();
        for a in hit {
            let Some(m) = self.mappings.remove(&a) else {
                continue;
            };
            let m_end = a + m.size;
            if a < start {
                let size = start - a;
                let region = map_region(&m.file, m.file_offset, a, size, m.writable)?;
                self.mappings.insert(
                    a,
                    Mapping {
                        size,
                        file: m.file.clone(),
                        file_offset: m.file_offset,
                        writable: m.writable,
                        region,
                    },
                );
            }
            if m_end > end {
                let size = m_end - end;
                let file_offset = m.file_offset + (end - a);
                let region = map_region(&m.file, file_offset, end, size, m.writable)?;
                self.mappings.insert(
                    end,
                    Mapping {
                        size,
                        file: m.file.clone(),
                        file_offset,
                        writable: m.writable,
                        region,
                    },
                );
            }
            if a < start || m_end > end {
                warn!(
                    "DMA range {start:#x}..{end:#x} cuts mapping {a:#x}..{m_end:#x}; remainder kept"
                );
            }
        }
        Ok(())
    }

    fn publish(&mut self) -> Result<()> {
        let regions: Vec<Arc<GuestRegionMmap>> =
            self.mappings.values().map(|m| m.region.clone()).collect();
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(regions)?
        };
        let guard = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        guard.replace(mem);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, GuestAddressSpace};

    const PAGE: u64 = 4096;

    /// A memfd of `pages` pages whose page i starts with byte i.
    fn memfd(pages: u64) -> File {
        let name = c"freehint-test";
        // SAFETY: name is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.set_len(pages * PAGE).unwrap();
        for i in 0..pages {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(i * PAGE)).unwrap();
            f.write_all(&[i as u8]).unwrap();
        }
        f
    }

    fn byte_at(m: &DmaMemory, gpa: u64) -> Option<u8> {
        let mem = m.handle();
        let mut b = [0u8; 1];
        mem.memory().read_slice(&mut b, GuestAddress(gpa)).ok()?;
        Some(b[0])
    }

    #[test]
    fn map_with_fd_offset_is_visible_through_the_handle() {
        let mut m = DmaMemory::new();
        let handle = m.handle();
        // gpa 0x100000.. maps file pages 2..6 (QEMU passes offset = gpa
        // within the memfd; here any offset works).
        m.map(0x10_0000, 4 * PAGE, 2 * PAGE, true, Some(memfd(8)))
            .unwrap();
        assert_eq!(byte_at(&m, 0x10_0000), Some(2));
        assert_eq!(byte_at(&m, 0x10_0000 + 3 * PAGE), Some(5));
        assert_eq!(byte_at(&m, 0x10_0000 + 4 * PAGE), None);
        // The device's clone of the handle sees the same memory.
        handle
            .memory()
            .write_obj(0xabu8, GuestAddress(0x10_0001))
            .unwrap();
        assert_eq!(byte_at(&m, 0x10_0001), Some(0xab));
    }

    #[test]
    fn read_only_map_is_left_out_and_replaces_what_it_covers() {
        let mut m = DmaMemory::new();
        m.map(0, 4 * PAGE, 0, true, Some(memfd(4))).unwrap();
        m.map(PAGE, 2 * PAGE, PAGE, false, Some(memfd(4))).unwrap();
        assert_eq!(m.ranges(), vec![(0, PAGE), (3 * PAGE, PAGE)]);
        assert_eq!(byte_at(&m, 2 * PAGE), None, "the device cannot reach it");
        m.map(4 * PAGE, PAGE, 0, false, Some(memfd(1))).unwrap();
        assert_eq!(m.ranges(), vec![(0, PAGE), (3 * PAGE, PAGE)]);
        // Still checked like any map.
        assert!(matches!(
            m.map(0, 2 * PAGE, 0, false, Some(memfd(1))),
            Err(MemoryError::PastEof { .. })
        ));
    }

    #[test]
    fn map_without_fd_is_ignored() {
        let mut m = DmaMemory::new();
        m.map(0xc0000, PAGE, 0, false, None).unwrap();
        assert!(m.ranges().is_empty());
    }

    #[test]
    fn unmap_by_range_keeps_remainders() {
        let mut m = DmaMemory::new();
        m.map(0, 8 * PAGE, 0, true, Some(memfd(8))).unwrap();
        m.unmap(2 * PAGE, 3 * PAGE).unwrap();
        assert_eq!(m.ranges(), vec![(0, 2 * PAGE), (5 * PAGE, 3 * PAGE)]);
        assert_eq!(byte_at(&m, PAGE), Some(1));
        assert_eq!(byte_at(&m, 3 * PAGE), None);
        assert_eq!(
            byte_at(&m, 6 * PAGE),
            Some(6),
            "remainder keeps its fd offset"
        );
        // Unmap spanning both pieces and a hole.
        m.unmap(0, 8 * PAGE).unwrap();
        assert!(m.ranges().is_empty());
    }

    #[test]
    fn overlapping_map_replaces() {
        let mut m = DmaMemory::new();
        m.map(0, 4 * PAGE, 0, true, Some(memfd(4))).unwrap();
        m.map(PAGE, 2 * PAGE, 0, true, Some(memfd(2))).unwrap();
        assert_eq!(
            m.ranges(),
            vec![(0, PAGE), (PAGE, 2 * PAGE), (3 * PAGE, PAGE)]
        );
        assert_eq!(byte_at(&m, 2 * PAGE), Some(1));
        assert_eq!(byte_at(&m, 3 * PAGE), Some(3));
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let mut m = DmaMemory::new();
        let f = || Some(memfd(1));
        assert!(matches!(
            m.map(0, 0, 0, true, f()),
            Err(MemoryError::InvalidRange { .. })
        ));
        assert!(matches!(
            m.map(u64::MAX - PAGE + 1, 2 * PAGE, 0, true, f()),
            Err(MemoryError::InvalidRange { .. })
        ));
        assert!(matches!(
            m.map(0, PAGE, u64::MAX - 10, true, f()),
            Err(MemoryError::InvalidRange { .. })
        ));
        assert!(matches!(
            m.map(1, PAGE, 0, true, f()),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            m.map(0, 1 << 40, 1 << 30, true, f()),
            Err(MemoryError::PastEof { .. })
        ));
        assert!(matches!(
            m.map(0, 2 * PAGE, 0, true, f()),
            Err(MemoryError::PastEof { .. })
        ));
        assert!(m.unmap(0, 0).is_err());
        assert!(m.unmap(u64::MAX, 2).is_err());
        m.unmap_all();
        assert!(m.ranges().is_empty());
    }

    #[test]
    fn mapping_count_is_bounded() {
        let mut m = DmaMemory::new();
        let f = Arc::new(memfd(1));
        for i in 0..MAX_MAPPINGS as u64 {
            let fd = f.try_clone().unwrap();
            m.map(i * 2 * PAGE, PAGE, 0, true, Some(fd)).unwrap();
        }
        let fd = f.try_clone().unwrap();
        assert!(matches!(
            m.map(u64::MAX - 2 * PAGE + 1, PAGE, 0, true, Some(fd)),
            Err(MemoryError::TooManyMappings)
        ));
        assert_eq!(m.ranges().len(), MAX_MAPPINGS);
    }

    /// Splitting a mapping adds one: with a full table, an unmap or a map
    /// inside a mapping is refused and changes nothing (found by the
    /// vfio_user_backend fuzz target: the table grew past the limit).
    #[test]
    fn splitting_past_the_limit_is_refused() {
        let mut m = DmaMemory::new();
        let f = Arc::new(memfd(4));
        let fd = || Some(f.try_clone().unwrap());
        m.map(0, 4 * PAGE, 0, true, fd()).unwrap();
        for i in 1..MAX_MAPPINGS as u64 {
            m.map((2 * i + 4) * PAGE, PAGE, 0, true, fd()).unwrap();
        }
        let full = m.ranges();
        assert_eq!(full.len(), MAX_MAPPINGS);
        for r in [
            m.unmap(PAGE, PAGE),
            m.map(PAGE, PAGE, 0, false, fd()),
            m.map(PAGE, PAGE, 0, true, fd()),
        ] {
            assert!(matches!(r, Err(MemoryError::TooManyMappings)), "{r:?}");
            assert_eq!(m.ranges(), full, "a refused request changes nothing");
        }
        // Trimming and replacing keep the count: allowed.
        m.unmap(0, PAGE).unwrap();
        m.map(6 * PAGE, PAGE, 0, true, fd()).unwrap();
        m.map(8 * PAGE, PAGE, 0, false, fd()).unwrap();
        assert_eq!(m.ranges().len(), MAX_MAPPINGS - 1);
    }
}
