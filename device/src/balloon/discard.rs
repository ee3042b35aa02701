// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Giving guest pages back to the host: the [`PageDiscard`] trait a VMM may
//! implement, and [`MmapDiscard`], the real implementation over the
//! `GuestMemoryMmap` the device was activated with.
//!
//! | mapping of the region              | call                                   |
//! |------------------------------------|----------------------------------------|
//! | private anonymous                  | `madvise(MADV_DONTNEED)`               |
//! | private, backed by a file          | `mmap(MAP_FIXED \| MAP_PRIVATE \| MAP_ANONYMOUS)` over the range |
//! | shared, backed by a file / memfd   | `fallocate(PUNCH_HOLE \| KEEP_SIZE)`, falling back to `madvise(MADV_REMOVE)` |
//! | shared anonymous                   | `madvise(MADV_REMOVE)`                 |
//!
//! In every case the guest reads zeros afterwards and the host frees the
//! backing pages (for shared memory, also in other processes mapping it,
//! such as a vfio-user client).
//!
//! A private file mapping (e.g. guest RAM restored from a snapshot file) is
//! the odd one: `MADV_DONTNEED` there drops the private copy and the page
//! reads the **file's** data again, not zeros, and `MADV_REMOVE` and
//! `fallocate` would change the file that the mapping only copies. So the
//! range is replaced by a fresh private anonymous mapping with the region's
//! protection, as Firecracker does for snapshot-restored memory: zeros, and
//! the copied pages are freed. The file is left unchanged.

use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::PAGE_SIZE;

/// Why a discard failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not page aligned.
    #[error("range {addr:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Part of the range is not guest memory.
    #[error("range {addr:#x}+{len:#x} is not (entirely) guest memory")]
    OutOfRange {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The system call failed.
    #[error("{call} failed on {addr:#x}+{len:#x}: {source}")]
    Syscall {
        /// `madvise` or `fallocate`.
        call: &'static str,
        /// Guest-physical start of the piece.
        addr: u64,
        /// Length of the piece.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
}

/// Releases guest pages to the host (after which the guest reads zeros).
pub trait PageDiscard: Send + Sync {
    /// Discards the page-aligned range `[addr, addr + len)` of `mem`.
    fn discard(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), DiscardError>;
}

/// The real discard over mmapped guest memory (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct MmapDiscard;

impl PageDiscard for MmapDiscard {
    fn discard(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), DiscardError> {
        let a = addr.0;
        if a % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(DiscardError::Unaligned { addr: a, len });
        }
        let end = a
            .checked_add(len)
            .ok_or(DiscardError::OutOfRange { addr: a, len })?;
        // Check the whole range first, so a failure leaves memory untouched.
        let mut pos = a;
        while pos < end {
            let region = mem
                .find_region(GuestAddress(pos))
                .ok_or(DiscardError::OutOfRange { addr: a, len })?;
            let region_end = region.start_addr().0.saturating_add(region.len());
            pos = region_end.min(end);
        }
        let mut pos = a;
        while pos < end {
            let region = mem
                .find_region(GuestAddress(pos))
                .ok_or(DiscardError::OutOfRange { addr: a, len })?;
            let off = pos - region.start_addr().0;
            let piece = (region.len() - off).min(end - pos);
            discard_in_region(region, off, piece).map_err(|(call, source)| {
                DiscardError::Syscall {
                    call,
                    addr: pos,
                    len: piece,
                    source,
                }
            })?;
            pos += piece;
        }
        Ok(())
    }
}

/// Discards `[off, off + len)` of one region (checked by the caller to lie
/// inside it).
fn discard_in_region(
    region: &vm_memory::GuestRegionMmap,
    off: u64,
    len: u64,
) -> Result<(), (&'static str, io::Error)> {
    let off_usize = usize::try_from(off).map_err(|_| ("madvise", io::Error::other("offset")))?;
    let len_usize = usize::try_from(len).map_err(|_| ("madvise", io::Error::other("length")))?;
    // SAFETY: the caller checked `off + len <= region.len()`, so the pointer
    // stays inside the region's mapping.
    let host = unsafe { region.as_ptr().add(off_usize) };
    let shared = region.flags() & libc::MAP_SHARED != 0;
    if shared {
        if let Some(fo) = region.file_offset() {
            let file_off = fo
                .start()
                .checked_add(off)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or(("fallocate", io::Error::other("file offset overflow")))?;
            let flen = libc::off_t::try_from(len)
                .map_err(|_| ("fallocate", io::Error::other("length overflow")))?;
            // SAFETY: plain syscall on a file descriptor the region keeps
            // open; punching a hole only changes file contents, which the
            // guest expects to become zero after a discard.
            let r = unsafe {
                libc::fallocate(
                    fo.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    file_off,
                    flen,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(("fallocate", err));
            }
        }
        // SAFETY: `host..host+len` is inside this mapping (see above), page
        // aligned (checked by the caller), and MADV_REMOVE only drops pages
        // of guest memory, which no Rust reference points into.
        let r = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_REMOVE) };
        if r != 0 {
            return Err(("madvise(MADV_REMOVE)", io::Error::last_os_error()));
        }
    } else if region.file_offset().is_some() {
        zero_private_file_range(host, len_usize, region.prot(), region.flags())?;
    } else {
        // SAFETY: as above; MADV_DONTNEED on a private anonymous mapping
        // makes the range read as zero.
        let r = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(("madvise(MADV_DONTNEED)", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Replaces `[host, host + len)` of a private file mapping (protection
/// `prot`, flags `flags`) with private anonymous memory, which reads as zero.
fn zero_private_file_range(
    host: *mut u8,
    len: usize,
    prot: i32,
    flags: i32,
) -> Result<(), (&'static str, io::Error)> {
    let flags =
        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | (flags & libc::MAP_NORESERVE);
    // SAFETY: `host..host+len` is a page-aligned piece of this region's own
    // mapping (checked by the callers), so MAP_FIXED replaces only guest
    // memory, which no Rust reference points into; the region unmaps the
    // whole range, whatever backs it, when it is dropped.
    let p = unsafe { libc::mmap(host.cast(), len, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(("mmap(MAP_FIXED|MAP_ANONYMOUS)", io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::FromRawFd;
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{Bytes, FileOffset, GuestRegionMmap};

    const BASE: u64 = 0x10_0000;
    const PAGES: u64 = 64;

    /// A real file of `PAGES` pages of 0x5a.
    fn data_file() -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0x5a; (PAGES << 12) as usize]).unwrap();
        f
    }

    /// Guest memory at `BASE` mapping `file` (or anonymous memory) with
    /// `flags`.
    fn mapped(file: Option<&File>, flags: i32) -> GuestMemoryMmap {
        let fo = file.map(|f| FileOffset::new(f.try_clone().unwrap(), 0));
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let region = MmapRegion::build(fo, (PAGES << 12) as usize, prot, flags).unwrap();
        let r = GuestRegionMmap::new(region, GuestAddress(BASE)).unwrap();
        GuestMemoryMmap::from_regions(vec![r]).unwrap()
    }

    /// Discards pages 8..24 and checks they read zero (and stay writable)
    /// while the rest keeps `fill`.
    fn discard_reads_zero(mem: &GuestMemoryMmap, fill: u8) {
        mem.write_slice(&vec![fill; (PAGES << 12) as usize], GuestAddress(BASE))
            .unwrap();
        MmapDiscard
            .discard(mem, GuestAddress(BASE + (8 << 12)), 16 << 12)
            .unwrap();
        let mut b = vec![0u8; (PAGES << 12) as usize];
        mem.read_slice(&mut b, GuestAddress(BASE)).unwrap();
        assert!(b[..8 << 12].iter().all(|&x| x == fill));
        assert!(
            b[8 << 12..24 << 12].iter().all(|&x| x == 0),
            "discarded pages must read zero"
        );
        assert!(b[24 << 12..].iter().all(|&x| x == fill));
        mem.write_obj(0x77u8, GuestAddress(BASE + (9 << 12)))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(BASE + (9 << 12))).unwrap(),
            0x77
        );
    }

    fn file_bytes(f: &File) -> Vec<u8> {
        let mut f = f.try_clone().unwrap();
        let mut b = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut b).unwrap();
        b
    }

    #[test]
    fn private_file_backed_reads_zero_and_leaves_the_file() {
        let f = data_file();
        let mem = mapped(Some(&f), libc::MAP_PRIVATE | libc::MAP_NORESERVE);
        // The guest's view differs from the file (0x11), as after a restore
        // from a snapshot file followed by guest writes.
        discard_reads_zero(&mem, 0x11);
        assert!(
            file_bytes(&f).iter().all(|&x| x == 0x5a),
            "a private mapping never writes its file"
        );
    }

    #[test]
    fn shared_file_backed_reads_zero_and_punches_the_file() {
        let f = data_file();
        let mem = mapped(Some(&f), libc::MAP_SHARED | libc::MAP_NORESERVE);
        discard_reads_zero(&mem, 0x22);
        let bytes = file_bytes(&f);
        assert!(bytes[8 << 12..9 << 12].iter().all(|&x| x == 0));
        assert!(bytes[24 << 12..].iter().all(|&x| x == 0x22));
    }

    #[test]
    fn shared_and_private_anonymous_read_zero() {
        discard_reads_zero(&mapped(None, libc::MAP_SHARED | libc::MAP_ANONYMOUS), 0x33);
        discard_reads_zero(&mapped(None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS), 0x44);
    }

    fn memfd(size: u64) -> File {
        let name = c"freehint-test";
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    fn allocated_blocks(f: &File) -> i64 {
        // SAFETY: fstat into a zeroed stat struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        let r = unsafe { libc::fstat(f.as_raw_fd(), &mut st) };
        assert_eq!(r, 0);
        st.st_blocks
    }

    #[test]
    fn private_anonymous_reads_zero_after_discard() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 12)]).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress(4096)).unwrap();
        MmapDiscard.discard(&mem, GuestAddress(4096), 4096).unwrap();
        let mut b = [0u8; 8192];
        mem.read_slice(&mut b, GuestAddress(4096)).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 0xab));
    }

    #[test]
    fn memfd_shared_punches_holes() {
        let size = 256u64 << 12;
        let f = memfd(size);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0x10_0000),
            size as usize,
            Some(FileOffset::new(f.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        mem.write_slice(&vec![0x5a; size as usize], GuestAddress(0x10_0000))
            .unwrap();
        let before = allocated_blocks(&f);
        MmapDiscard
            .discard(&mem, GuestAddress(0x10_0000 + (16 << 12)), 128 << 12)
            .unwrap();
        let after = allocated_blocks(&f);
        assert!(after < before, "blocks {before} -> {after}");
        let mut b = vec![0u8; size as usize];
        mem.read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
        assert!(b[..16 << 12].iter().all(|&x| x == 0x5a));
        assert!(b[16 << 12..144 << 12].iter().all(|&x| x == 0));
        assert!(b[144 << 12..].iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn spans_regions_and_rejects_holes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 4 << 12),
            (GuestAddress(4 << 12), 4 << 12),
            (GuestAddress(16 << 12), 4 << 12),
        ])
        .unwrap();
        mem.write_slice(&[1u8; 8 << 12], GuestAddress(0)).unwrap();
        MmapDiscard
            .discard(&mem, GuestAddress(2 << 12), 4 << 12)
            .unwrap();
        let mut b = [0u8; 8 << 12];
        mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(b[2 << 12..6 << 12].iter().all(|&x| x == 0));
        assert!(b[6 << 12..].iter().all(|&x| x == 1));
        assert!(matches!(
            MmapDiscard.discard(&mem, GuestAddress(6 << 12), 4 << 12),
            Err(DiscardError::OutOfRange { .. })
        ));
        // Nothing was discarded by the failed call.
        mem.read_slice(&mut b[..4096], GuestAddress(6 << 12))
            .unwrap();
        assert!(b[..4096].iter().all(|&x| x == 1));
        assert!(matches!(
            MmapDiscard.discard(&mem, GuestAddress(100), 4096),
            Err(DiscardError::Unaligned { .. })
        ));
        assert!(matches!(
            MmapDiscard.discard(&mem, GuestAddress(!4095), 8192),
            Err(DiscardError::OutOfRange { .. })
        ));
    }
}
