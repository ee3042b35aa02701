//! The back end's request channel to the front end, for config-change
//! notifications (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`).
//!
//! rust-vmm's `vhost` 0.18 hands the back end the channel only as a
//! `Backend`, which does not send that message (its
//! `handle_config_change` answers `ENOSYS`) and keeps its socket private.
//! So the back end finds the socket itself when the front end passes it
//! (`SET_BACKEND_REQ_FD`): it is the one connected UNIX stream socket of
//! this process with no local name (the front end made it with
//! `socketpair`; every socket this process accepts is named after its
//! listener) whose peer is another process. It keeps a duplicate of it.

use std::io::{self, Write};
use std::mem::{size_of, zeroed};
#[cfg(test)]
use std::os::fd::AsRawFd;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;

/// A duplicate of the front end's request channel.
#[derive(Debug)]
pub struct RequestChannel(UnixStream);

impl RequestChannel {
    /// Finds the channel the front end just passed (see the module docs).
    pub fn find() -> io::Result<Self> {
        let mut best: Option<(u64, RawFd)> = None;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let Some(fd) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<RawFd>().ok())
            else {
                continue;
            };
            if let Some(ino) = unnamed_peer_socket(fd) {
                if best.is_none_or(|(i, _)| ino > i) {
                    best = Some((ino, fd));
                }
            }
        }
        let (_, fd) = best
            .ok_or_else(|| io::Error::other("no request channel among this process's sockets"))?;
        // SAFETY: `fd` was open a moment ago and is owned by the vhost
        // library for as long as the channel lives; it is only borrowed to
        // duplicate it.
        let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        Ok(Self(UnixStream::from(dup)))
    }

    /// Tells the front end the device's config space changed (it raises
    /// the config interrupt).
    pub fn config_changed(&self) -> io::Result<()> {
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        (&self.0).write_all(&msg)
    }
}

/// The inode of `fd` if it is a connected, unnamed UNIX stream socket whose
/// peer is another process.
fn unnamed_peer_socket(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat only writes the stat buffer; a closed fd gives an error.
    let mut st: libc::stat = unsafe { zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let named = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut len) };
    if named != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    if len as usize > size_of::<libc::sa_family_t>() {
        return None;
    }
    let stream = int_opt(fd, libc::SO_TYPE)? == libc::SOCK_STREAM;
    let listening = int_opt(fd, libc::SO_ACCEPTCONN)? != 0;
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut clen = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred of at most `clen` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut clen,
        )
    };
    let other_peer = rc == 0 && cred.pid > 0 && cred.pid as u32 != std::process::id();
    (stream && !listening && other_peer).then_some(st.st_ino)
}

fn int_opt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option is an int; getsockopt writes at most `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    (rc == 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sockets this process made itself (a pair whose peer is this
    /// process, a listener) are never taken for the front end's channel.
    #[test]
    fn own_sockets_are_never_taken() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        assert!(unnamed_peer_socket(ours.as_raw_fd()).is_none());
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        assert!(unnamed_peer_socket(l.as_raw_fd()).is_none());
        assert!(RequestChannel::find().is_err());
    }
}
