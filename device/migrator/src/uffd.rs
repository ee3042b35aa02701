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

/// The request protocol of the preload library that registers tracking
/// inside QEMU (`device/migrator/preload`): one request line per
/// connection, one reply line (`ok ...` or `error ...`).
///
/// - `register START LEN` (hexadecimal with `0x`, or decimal): tracks
///   `LEN` bytes at address `START` of QEMU's memory, replacing an earlier
///   registration; the range must be one shared file mapping.
/// - `unregister`: ends the tracking (closes the userfaultfd).
pub mod request {
    /// Longest request or reply line.
    pub const MAX_LINE: usize = 256;

    /// One request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Request {
        /// Track `len` bytes at `start`.
        Register {
            /// First byte (page aligned).
            start: u64,
            /// Length in bytes (page aligned).
            len: u64,
        },
        /// Stop tracking.
        Unregister,
    }

    impl Request {
        /// Parses one line (without its newline).
        pub fn parse(line: &str) -> Result<Self, String> {
            let mut words = line.split_whitespace();
            let request = match words.next() {
                Some("register") => {
                    let mut number = || {
                        words
                            .next()
                            .and_then(parse_number)
                            .ok_or("register needs START and LEN")
                    };
                    let (start, len) = (number()?, number()?);
                    if start % 4096 != 0 || len % 4096 != 0 || len == 0 {
                        return Err("START and LEN must be non-zero multiples of 4096".into());
                    }
                    Self::Register { start, len }
                }
                Some("unregister") => Self::Unregister,
                _ => return Err(format!("unknown request {line:?}")),
            };
            match words.next() {
                None => Ok(request),
                Some(extra) => Err(format!("unexpected {extra:?}")),
            }
        }

        /// The request as a line, newline included.
        pub fn to_line(&self) -> String {
            match self {
                Self::Register { start, len } => format!("register {start:#x} {len:#x}\n"),
                Self::Unregister => "unregister\n".into(),
            }
        }
    }

    fn parse_number(word: &str) -> Option<u64> {
        match word.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => word.parse().ok(),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn requests_round_trip_and_bad_ones_are_refused() {
            for r in [
                Request::Register {
                    start: 0x7f00_0000_0000,
                    len: 4 << 30,
                },
                Request::Unregister,
            ] {
                assert_eq!(Request::parse(r.to_line().trim_end()), Ok(r));
            }
            assert_eq!(
                Request::parse("register 4096 8192"),
                Ok(Request::Register {
                    start: 4096,
                    len: 8192
                })
            );
            for bad in [
                "",
                "register",
                "register 0x1000",
                "register 0x1001 0x1000",
                "register 0x1000 0",
                "register 0x1000 0x1000 9",
                "register -1 0x1000",
                "unregister now",
                "format c:",
            ] {
                assert!(Request::parse(bad).is_err(), "{bad}");
            }
        }
    }
}
