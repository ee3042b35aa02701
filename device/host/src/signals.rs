//! Remove the server's socket files when it is killed by SIGINT/SIGTERM, so
//! the next start does not find a stale socket.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::OnceLock;

static PATHS: OnceLock<Vec<CString>> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    if let Some(paths) = PATHS.get() {
        for p in paths {
            // SAFETY: unlink is async-signal-safe; p is a valid C string that
            // lives for the whole program (a static).
            unsafe { libc::unlink(p.as_ptr()) };
        }
    }
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(128 + sig) };
}

/// Installs SIGINT/SIGTERM handlers that unlink `paths` and exit.
pub fn remove_on_signal(paths: Vec<PathBuf>) {
    let c: Vec<CString> = paths
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    if PATHS.set(c).is_err() {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: on_signal only calls async-signal-safe functions and reads
        // an initialised OnceLock.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}
