// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Giving guest pages back to the host: the [`PageDiscard`] trait a VMM may
//! implement, and [`MmapDiscard`], the real implementation over the
//! `GuestMemoryMmap` the device was activated with.
//!
//! | mapping of the region              | call                                   |
//! |------------------------------------|----------------------------------------|
//! | private (anonymous or file)        | `madvise(MADV_DONTNEED)`               |
//! | shared, backed by a file / memfd   | `fallocate(PUNCH_HOLE \| KEEP_SIZE)`, falling back to `madvise(MADV_REMOVE)` |
//! | shared anonymous                   | `madvise(MADV_REMOVE)`                 |
//!
//! In every case the guest reads zeros afterwards and the host frees the
//! backing pages (for shared memory, also in other processes mapping it,
//! such as a vfio-user client).

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
    } else {
        // SAFETY: as above; MADV_DONTNEED on a private mapping makes the
        // range read as zero (anonymous) or as the file (private file).
        let r = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(("madvise(MADV_DONTNEED)", io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, FileOffset};

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
