//! The I/O error every harness error type shares: what was being done, on
//! which path, and the OS error.

use std::io;
use std::path::{Path, PathBuf};

/// A file, directory or socket operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct PathIoError {
    /// What was being done ("cannot create", "cannot read serial log", ...).
    pub what: &'static str,
    /// The path (or socket name, or address) it was done on.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// A `map_err` adapter: `File::create(&p).map_err(io_error("cannot create", &p))?`
/// (`?` then converts into the caller's error type).
pub fn io_error(
    what: &'static str,
    path: impl AsRef<Path>,
) -> impl FnOnce(io::Error) -> PathIoError {
    let path = path.as_ref().to_path_buf();
    move |source| PathIoError { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_what_where_and_why() {
        let e = std::fs::read("/nonexistent/x").map_err(io_error("cannot read", "/nonexistent/x"));
        let msg = e.unwrap_err().to_string();
        assert!(msg.starts_with("cannot read /nonexistent/x: "), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }
}
