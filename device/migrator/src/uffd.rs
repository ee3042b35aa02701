//! Asynchronous uffd-wp write tracking on a range of this process's
//! memory: the state [`PagemapScanLog`](crate::pagemap_scan::PagemapScanLog)
//! reads.
//!
//! A userfaultfd works only on the address space of the process that made
//! it. A VMM that embeds this crate registers its own guest RAM with
//! [`AsyncWriteTracking::register`]; for QEMU, a small library preloaded
//! into QEMU does the same there. With `UFFD_FEATURE_WP_ASYNC` a write to a
//! protected page is resolved by the kernel without any fault reaching
//! user space: it only clears the page's protection, which is what
//! `PAGEMAP_SCAN` reports as written.

use std::io;
use std::os::fd::OwnedFd;

use crate::sys;

/// Why write tracking could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel refused a userfaultfd (no permission, or none built in).
    #[error("userfaultfd is not available to this process")]
    Unavailable(#[source] io::Error),
    /// The kernel lacks asynchronous write protection (Linux 6.7 or later).
    #[error("userfaultfd lacks asynchronous write protection (features {wanted:#x} wanted)")]
    Unsupported {
        /// The features asked for.
        wanted: u64,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Registering or protecting the range failed.
    #[error("cannot {what} {len:#x} bytes at {start:#x}")]
    Range {
        /// register or write-protect.
        what: &'static str,
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// Asynchronous write protection of a range; it lasts as long as this value
/// (closing the userfaultfd unregisters the range).
#[derive(Debug)]
pub struct AsyncWriteTracking {
    _fd: OwnedFd,
}

impl AsyncWriteTracking {
    /// Registers `len` bytes at address `start` of this process (page
    /// aligned, mapped) and write-protects them, so every later write is
    /// visible to `PAGEMAP_SCAN` as `PAGE_IS_WRITTEN`. Nothing is read or
    /// written through the addresses, and writes to the range proceed as
    /// before.
    pub fn register(start: u64, len: u64) -> Result<Self, UffdError> {
        let fd = sys::userfaultfd().map_err(UffdError::Unavailable)?;
        let wanted = sys::UFFD_FEATURE_WP_ASYNC
            | sys::UFFD_FEATURE_WP_UNPOPULATED
            | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `uffdio_api`, which holds no address.
        unsafe { sys::ioctl(&fd, sys::UFFDIO_API, &mut api) }
            .map_err(|source| UffdError::Unsupported { wanted, source })?;
        let range = sys::UffdioRange { start, len };
        let range_error = |what| {
            move |source| UffdError::Range {
                what,
                start,
                len,
                source,
            }
        };
        let mut register = sys::UffdioRegister {
            range,
            mode: sys::UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `uffdio_register`; its range is
        // only looked up in this process's mappings, never dereferenced.
        unsafe { sys::ioctl(&fd, sys::UFFDIO_REGISTER, &mut register) }
            .map_err(range_error("register"))?;
        let mut protect = sys::UffdioWriteprotect {
            range,
            mode: sys::UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `uffdio_writeprotect`; the
        // range changes page protection only (writes still succeed: async).
        unsafe { sys::ioctl(&fd, sys::UFFDIO_WRITEPROTECT, &mut protect) }
            .map_err(range_error("write-protect"))?;
        Ok(Self { _fd: fd })
    }
}
