//! UNIX sockets only their owner can connect to.
//!
//! A socket file takes the process umask when it is bound (often 0755, so
//! that anyone can connect). [`bind_private`] gives the socket mode 0600
//! before `bind` (Linux creates the file with the mode of the unbound
//! socket, minus the umask), so there is no moment in which another user
//! could connect, and sets it again after `bind` for systems that ignore it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Mode of every socket the server creates.
pub const SOCKET_MODE: u32 = 0o600;

/// Connections waiting to be accepted.
const BACKLOG: libc::c_int = 16;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // One byte stays for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} must be 1 to {} bytes without NUL",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"))?;
    Ok((addr, len))
}

/// Binds and listens on a new UNIX stream socket at `path` with mode
/// [`SOCKET_MODE`]. Fails if `path` exists.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let (addr, len) = sockaddr(path)?;
    // SAFETY: socket() has no memory-safety preconditions.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(raw)?;
    // SAFETY: raw is a fresh socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fchmod on an fd we own has no memory-safety preconditions.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), SOCKET_MODE as libc::mode_t) })?;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            len,
        )
    })?;
    let listener = UnixListener::from(fd);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    // SAFETY: listen on a bound socket we own has no memory preconditions.
    check(unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn socket_is_0600_whatever_the_umask_and_accepts() {
        let dir = std::env::temp_dir().join(format!("fh-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let l = bind_private(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        let _c = UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        assert!(bind_private(&path).is_err(), "an existing path is an error");
        assert!(bind_private(&dir.join("x".repeat(200))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
