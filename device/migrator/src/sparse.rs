//! Holes: pages that read as zero without being read.
//!
//! Guest RAM in a sparse file (a `/dev/shm` file behind QEMU's
//! `memory-backend-file`) has holes where the guest never wrote. Reading a
//! hole through a shared mapping allocates a page for it (shmem does so on
//! a read fault), so a bulk pass that read every page would fill the host's
//! memory with zeros. A [`HoleMap`] tells the engine which pages are holes;
//! the bulk pass sends them as zero runs without touching them.
//!
//! A hole map is a statement about one moment, taken after the dirty log
//! started: a page that was a hole then and is written later is dirty, so a
//! later pass sends it. Only the bulk pass uses holes; the pages of later
//! passes were written, so they hold data.

use std::fs::File;
use std::path::Path;

use crate::bits::PageBits;
use crate::dirty::HookError;
use crate::layout::RamLayout;
use crate::ram_file::data_pages;

/// Where the holes are.
pub trait HoleMap: std::fmt::Debug {
    /// Sets in `holes` (by page index of `layout`) the bit of every page
    /// that reads as zero without being read, now. Never clears bits.
    fn mark_holes(&self, layout: &RamLayout, holes: &mut PageBits) -> Result<(), HookError>;
}

/// The holes of a RAM file, found with `lseek(SEEK_DATA/SEEK_HOLE)`; a
/// swapped-out page counts as data. A file system without these reports
/// no holes.
#[derive(Debug)]
pub struct FileHoles {
    file: File,
}

impl FileHoles {
    /// The holes of `file`, laid out as the RAM ranges' file offsets say.
    pub fn new(file: File) -> Self {
        Self { file }
    }

    /// Opens the RAM file at `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        File::open(path).map(Self::new)
    }
}

impl HoleMap for FileHoles {
    fn mark_holes(&self, layout: &RamLayout, holes: &mut PageBits) -> Result<(), HookError> {
        let data = data_pages(&self.file, layout)?;
        let len = data.len().min(holes.len());
        let holes = &mut holes[..len];
        *holes |= !data[..len].to_bitvec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bits::PageBitmap;
    use crate::layout::RamRange;
    use std::os::unix::fs::FileExt;
    use vm_memory::GuestAddress;

    #[test]
    fn pages_never_written_are_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let file = File::create(&path).unwrap();
        file.set_len(64 * 4096).unwrap();
        file.write_all_at(&[1], 3 * 4096 + 100).unwrap();
        file.write_all_at(&[1], 40 * 4096).unwrap();
        let layout = RamLayout::new(vec![
            RamRange {
                gpa: GuestAddress(0),
                pages: 32,
                file_offset: 0,
            },
            RamRange {
                gpa: GuestAddress(1 << 32),
                pages: 32,
                file_offset: 32 * 4096,
            },
        ])
        .unwrap();
        let mut holes = PageBitmap::repeat(false, 64);
        FileHoles::open(&path)
            .unwrap()
            .mark_holes(&layout, &mut holes)
            .unwrap();
        // tmpfs and ext4 report holes page by page; a file system that
        // cannot see holes reports none, which is also correct.
        let data: Vec<usize> = holes.iter_zeros().collect();
        if data.len() < 64 {
            assert_eq!(data, vec![3, 40]);
        }
    }
}
