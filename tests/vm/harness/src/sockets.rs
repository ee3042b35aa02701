//! Where the harness puts UNIX sockets (QMP, serial console, vfio-user).
//!
//! A UNIX socket path must fit in `sun_path` (108 bytes with its NUL), and the
//! log directory lives under the checkout, whose depth the harness does not
//! control (CI checks out under `/check/...`). So sockets never go next to the
//! logs: they go in one short per-process directory under the temp dir, and a
//! name that would still not fit is replaced by a hash of itself.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::errors::{io_error, PathIoError};

/// Longest socket path accepted: `sun_path` is 108 bytes including the NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// A fresh path for the socket called `name`, in a short directory that
/// exists; a stale socket of that name (from a killed run) is removed.
///
/// The directory is `$TMPDIR/fh-<pid>` (or `/tmp/fh-<pid>` when `$TMPDIR`
/// is itself too long); the result is at most [`MAX_SOCKET_PATH`] bytes.
pub fn socket_path(name: &str) -> Result<PathBuf, PathIoError> {
    let dir = socket_dir();
    std::fs::create_dir_all(&dir).map_err(io_error("cannot create socket dir", &dir))?;
    let path = fit(&dir, name);
    release(&path);
    Ok(path)
}

/// Removes a socket made by [`socket_path`]. The directory stays (another
/// VM may be about to bind in it) until [`remove_dir`] at the end of the run.
pub fn release(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Removes this process's socket directory if it is empty (call at exit).
pub fn remove_dir() {
    let _ = std::fs::remove_dir(socket_dir());
}

fn socket_dir() -> PathBuf {
    let leaf = format!("fh-{}", std::process::id());
    let tmp = std::env::temp_dir();
    // Leave room for a hashed name (16 hex digits and an extension).
    if tmp.as_os_str().len() + leaf.len() + 24 <= MAX_SOCKET_PATH {
        tmp.join(leaf)
    } else {
        Path::new("/tmp").join(leaf)
    }
}

fn fit(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return path;
    }
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| e.len() <= 4)
        .unwrap_or("sock");
    dir.join(format!("{:016x}.{ext}", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept() {
        let p = fit(Path::new("/tmp/fh-1"), "a-src.qmp");
        assert_eq!(p, Path::new("/tmp/fh-1/a-src.qmp"));
    }

    #[test]
    fn long_names_are_hashed_to_fit_and_stay_distinct() {
        let dir = Path::new("/tmp/fh-4194304");
        let long_a = format!("{}-src.ser", "x".repeat(120));
        let long_b = format!("{}-dst.ser", "x".repeat(120));
        let a = fit(dir, &long_a);
        let b = fit(dir, &long_b);
        assert!(a.as_os_str().len() <= MAX_SOCKET_PATH, "{}", a.display());
        assert_eq!(a.extension().unwrap(), "ser");
        assert_ne!(a, b);
    }

    #[test]
    fn the_ci_path_that_failed_now_fits_and_binds() {
        // The label CI failed on (its log dir made the path 109 bytes).
        let name = "qemu-migrate-normal-pc-4096m-freehint-dirty-free-ioa1-4g-0.ser";
        let p = socket_path(name).unwrap();
        assert!(p.as_os_str().len() <= MAX_SOCKET_PATH);
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        drop(l);
        release(&p);
        assert!(!p.exists());
        assert!(
            p.parent().unwrap().is_dir(),
            "the directory stays for other sockets"
        );
    }
}
