//! The destination's RAM file: the file a destination QEMU maps as guest
//! RAM (`memory-backend-file,share=on`), filled by the receiver.
//!
//! A page that is a hole in the file reads as zero, so a zero run needs no
//! write there. The file remembers which pages may hold data: none when
//! [`RamFile::create`] made it, the file's data extents when
//! [`RamFile::open`] found it (a RAM file that QEMU just created is all
//! holes). A zero run over such pages punches holes
//! (`FALLOC_FL_PUNCH_HOLE`), or writes zeros where the file system cannot.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::bits::{one_runs, PageBitmap};
use crate::layout::{PagePlace, RamLayout};
use crate::receiver::{PageSink, ReceiveError};
use crate::PAGE_SIZE;

/// The destination's RAM file (see the module documentation).
#[derive(Debug)]
pub struct RamFile {
    file: File,
    /// Pages (by page index) that may hold non-zero data.
    maybe_data: PageBitmap,
    pages_cleared: u64,
}

impl RamFile {
    /// Creates `path` (it must not exist), sized for `layout` and sparse.
    pub fn create(path: impl AsRef<Path>, layout: &RamLayout) -> Result<Self, ReceiveError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(file_error(path, "creating it"))?;
        file.set_len(layout.file_size())
            .map_err(file_error(path, "sizing it"))?;
        Ok(Self {
            file,
            maybe_data: PageBitmap::repeat(false, page_count(layout)),
            pages_cleared: 0,
        })
    }

    /// Opens an existing RAM file of at least the layout's size, for
    /// example the one a destination QEMU created at start-up.
    pub fn open(path: impl AsRef<Path>, layout: &RamLayout) -> Result<Self, ReceiveError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(file_error(path, "opening it"))?;
        let size = file
            .metadata()
            .map_err(file_error(path, "reading its size"))?
            .len();
        if size < layout.file_size() {
            return Err(ReceiveError::RamFileTooSmall {
                path: path.into(),
                size,
                needed: layout.file_size(),
            });
        }
        let maybe_data =
            data_pages(&file, layout).map_err(file_error(path, "finding its data extents"))?;
        Ok(Self {
            file,
            maybe_data,
            pages_cleared: 0,
        })
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Pages that zero runs had to clear (punch or overwrite) so far.
    pub fn pages_cleared(&self) -> u64 {
        self.pages_cleared
    }

    /// Bits of `count` pages from `page`, or an error past the layout.
    fn bits(&self, page: u64, count: u64) -> io::Result<Range<usize>> {
        let start = usize::try_from(page).ok();
        let range = start.and_then(|s| Some(s..s.checked_add(usize::try_from(count).ok()?)?));
        range
            .filter(|r| r.end <= self.maybe_data.len())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "run beyond the RAM file's layout",
                )
            })
    }
}

impl PageSink for RamFile {
    fn write_pages(&mut self, at: PagePlace, data: &[u8]) -> io::Result<()> {
        let bits = self.bits(at.page, (data.len() / PAGE_SIZE) as u64)?;
        self.file.write_all_at(data, at.file_offset)?;
        self.maybe_data[bits].fill(true);
        Ok(())
    }

    fn zero_pages(&mut self, at: PagePlace, count: u64) -> io::Result<()> {
        let bits = self.bits(at.page, count)?;
        for run in one_runs(&self.maybe_data[bits.clone()]) {
            let offset = at.file_offset + (run.start * PAGE_SIZE) as u64;
            clear(&self.file, offset, (run.len() * PAGE_SIZE) as u64)?;
            self.pages_cleared += run.len() as u64;
        }
        self.maybe_data[bits].fill(false);
        Ok(())
    }
}

fn page_count(layout: &RamLayout) -> usize {
    // The layout's RAM cap keeps this far below usize::MAX.
    layout.total_pages() as usize
}

fn file_error<'p>(
    path: &'p Path,
    what: &'static str,
) -> impl FnOnce(io::Error) -> ReceiveError + 'p {
    move |source| ReceiveError::RamFile {
        path: PathBuf::from(path),
        what,
        source,
    }
}

/// Pages of `layout` that lie (partly) in a data extent of `file`.
pub(crate) fn data_pages(file: &File, layout: &RamLayout) -> io::Result<PageBitmap> {
    let mut bits = PageBitmap::repeat(false, page_count(layout));
    for (index, range) in layout.ranges().iter().enumerate() {
        let first = layout.pages_of(index).map_or(0, |p| p.start) as usize;
        let span = range.file_offset..range.file_offset + range.pages * PAGE_SIZE as u64;
        for extent in data_extents(file, span.clone())? {
            let start = (extent.start - span.start) as usize / PAGE_SIZE;
            let end = (extent.end - span.start).div_ceil(PAGE_SIZE as u64) as usize;
            bits[first + start..first + end].fill(true);
        }
    }
    Ok(bits)
}

/// The data extents of `file` within `span`, clipped to it.
fn data_extents(file: &File, span: Range<u64>) -> io::Result<Vec<Range<u64>>> {
    let mut extents = Vec::new();
    let mut pos = span.start;
    while pos < span.end {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= span.end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?
            .unwrap_or(span.end)
            .clamp(data + 1, span.end);
        extents.push(data..hole);
        pos = hole;
    }
    Ok(extents)
}

/// `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE`: `None` when there is no data at
/// or after `offset`. A file system without them reports all data.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = i64::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: lseek takes a file descriptor that `file` owns for the whole
    // call, and passes no memory.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        // No SEEK_DATA/SEEK_HOLE here: data from `offset` to the end.
        Some(libc::EINVAL) => Ok((whence == libc::SEEK_DATA).then_some(offset as u64)),
        _ => Err(err),
    }
}

/// Makes `len` bytes from `offset` read as zero: punches a hole, or writes
/// zeros where the file system cannot punch.
fn clear(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(size)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "offset beyond 2^63",
        ));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes a file descriptor that `file` owns for the
    // whole call, and passes no memory.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, size) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    write_zeros(file, offset, len)
}

fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 16 * PAGE_SIZE] = [0; 16 * PAGE_SIZE];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::Receiver;
    use crate::wire::{Encoder, PassKind};
    use std::io::Read;

    fn layout() -> RamLayout {
        RamLayout::split_for_tests(8, 1 << 20, 8)
    }

    /// Bulk: data on pages 2..4 and 9; final: zero on 0..8 and 8..16.
    fn stream() -> Vec<u8> {
        let mut encoder = Encoder::new(Vec::new(), &layout()).unwrap();
        encoder.pass(0, PassKind::Bulk).unwrap();
        encoder.pages(2, &[2u8; 2 * PAGE_SIZE]).unwrap();
        encoder.pages(9, &[9u8; PAGE_SIZE]).unwrap();
        encoder.pass(1, PassKind::Final).unwrap();
        encoder.zero(0, 8).unwrap();
        encoder.zero(8, 8).unwrap();
        encoder.finish().unwrap()
    }

    fn contents(path: &Path) -> Vec<u8> {
        let mut bytes = Vec::new();
        File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn a_new_file_is_sparse_and_clears_only_what_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let bytes = stream();
        let receiver = Receiver::new(&bytes[..]).unwrap();
        let mut ram = RamFile::create(&path, receiver.layout()).unwrap();
        receiver.receive(&mut ram).unwrap();
        assert_eq!(ram.pages_cleared(), 3, "only the pages written earlier");
        assert_eq!(contents(&path), vec![0u8; 16 * PAGE_SIZE]);
        assert!(
            RamFile::create(&path, &layout()).is_err(),
            "create never reuses a file"
        );
    }

    #[test]
    fn an_existing_file_is_cleared_where_it_has_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let file = File::create(&path).unwrap();
        file.set_len(16 * PAGE_SIZE as u64).unwrap();
        file.write_all_at(&[0xaa; 10], 5 * PAGE_SIZE as u64 + 4090)
            .unwrap();
        file.write_all_at(&[0xbb; 1], 12 * PAGE_SIZE as u64)
            .unwrap();
        let bytes = stream();
        let receiver = Receiver::new(&bytes[..]).unwrap();
        let mut ram = RamFile::open(&path, receiver.layout()).unwrap();
        receiver.receive(&mut ram).unwrap();
        assert_eq!(contents(&path), vec![0u8; 16 * PAGE_SIZE]);
        assert!(
            ram.pages_cleared() >= 6,
            "pages 2, 3, 5, 6 (the write straddles), 9, 12: {}",
            ram.pages_cleared()
        );
    }

    #[test]
    fn an_existing_file_must_be_large_enough() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        File::create(&path).unwrap().set_len(4096).unwrap();
        let err = RamFile::open(&path, &layout()).unwrap_err();
        assert!(
            matches!(
                err,
                ReceiveError::RamFileTooSmall {
                    size: 4096,
                    needed: 65536,
                    ..
                }
            ),
            "{err}"
        );
    }
}
