//! Write tracking inside QEMU, through the preload library.
//!
//! A userfaultfd works only on the memory of the process that creates it,
//! so the migrator cannot register QEMU's RAM itself. QEMU is started with
//! `LD_PRELOAD=libfreehint_uffd_preload.so` and `FREEHINT_UFFD_SOCKET=PATH`;
//! the library listens on `PATH` and, on request, registers QEMU's RAM for
//! asynchronous uffd-wp ([`AsyncWriteTracking`](crate::uffd::AsyncWriteTracking)
//! inside QEMU). The migrator then reads and re-arms the written set with
//! [`PagemapScanLog`]: no fault ever reaches user space, QEMU is unchanged.
//!
//! Hosts whose kernel has soft-dirty could read `/proc/PID/pagemap` without
//! the library, but soft-dirty is often compiled out, and reading and
//! clearing it are two steps (a write in between is lost unless QEMU is
//! frozen); uffd-wp with `PM_SCAN_WP_MATCHING` reads and re-arms each page
//! atomically.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bits::PageBits;
use crate::dirty::{DirtyLog, HookError};
use crate::pagemap_scan::PagemapScanLog;
use crate::uffd::request::{Request, MAX_LINE};

/// The environment variable that names the preload library's socket.
pub const SOCKET_ENV: &str = "FREEHINT_UFFD_SOCKET";

/// Why the preload library could not register QEMU's RAM.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// Nothing listens on the socket.
    #[error("cannot reach the preload library at {path} (is QEMU running with LD_PRELOAD=libfreehint_uffd_preload.so and {SOCKET_ENV}={path}?)", path = path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The exchange failed.
    #[error("talking to the preload library at {path} failed", path = path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The library refused.
    #[error("the preload library in QEMU refused {request:?}: {reply}")]
    Refused {
        /// The request.
        request: Request,
        /// Its reply.
        reply: String,
    },
    /// The socket belongs to another process than the QEMU being migrated.
    #[error("the preload socket {path} belongs to pid {found}, not to QEMU (pid {qemu})", path = path.display())]
    WrongProcess {
        /// The socket.
        path: PathBuf,
        /// Its owner.
        found: u32,
        /// QEMU.
        qemu: u32,
    },
}

/// A registration of QEMU's RAM made by the preload library; ended by
/// [`RemoteTracking::unregister`].
#[derive(Clone, Debug)]
pub struct RemoteTracking {
    path: PathBuf,
    qemu_pid: u32,
}

impl RemoteTracking {
    /// Asks the library at `path` inside QEMU (pid `qemu_pid`) to track
    /// `len` bytes at QEMU's address `start`; returns its reply.
    pub fn register(
        path: &Path,
        qemu_pid: u32,
        start: u64,
        len: u64,
    ) -> Result<(Self, String), TrackingError> {
        let tracking = Self {
            path: path.to_path_buf(),
            qemu_pid,
        };
        let reply = tracking.ask(Request::Register { start, len })?;
        Ok((tracking, reply))
    }

    /// Ends the tracking.
    pub fn unregister(&self) -> Result<(), TrackingError> {
        self.ask(Request::Unregister).map(drop)
    }

    fn ask(&self, request: Request) -> Result<String, TrackingError> {
        let stream = UnixStream::connect(&self.path).map_err(|source| TrackingError::Connect {
            path: self.path.clone(),
            source,
        })?;
        if let Some(found) = crate::qmp::peer_pid_of(&stream) {
            if found != self.qemu_pid {
                return Err(TrackingError::WrongProcess {
                    path: self.path.clone(),
                    found,
                    qemu: self.qemu_pid,
                });
            }
        }
        let io = |source| TrackingError::Io {
            path: self.path.clone(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        (&stream)
            .write_all(request.to_line().as_bytes())
            .map_err(io)?;
        let mut reply = String::new();
        BufReader::new(&stream)
            .take(MAX_LINE as u64)
            .read_line(&mut reply)
            .map_err(io)?;
        let reply = reply.trim_end().to_string();
        match reply.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(TrackingError::Refused { request, reply }),
        }
    }
}

/// QEMU's dirty log: the page-table scan of a registration. Stopping the
/// log leaves the registration alone: ending it takes tens of
/// milliseconds at several GiB, so the caller ends it once the guest runs
/// again ([`RemoteTracking::unregister`]).
#[derive(Debug)]
pub struct QemuLog {
    scan: PagemapScanLog,
    _tracking: RemoteTracking,
}

impl QemuLog {
    /// The log of a registration.
    pub fn new(scan: PagemapScanLog, tracking: RemoteTracking) -> Self {
        Self {
            scan,
            _tracking: tracking,
        }
    }
}

impl DirtyLog for QemuLog {
    fn start(&mut self) -> Result<(), HookError> {
        self.scan.start()
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        self.scan.sync(dirty)
    }
}
