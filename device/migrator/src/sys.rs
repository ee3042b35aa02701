//! Linux ABI used by the dirty logs of [`pagemap_scan`](crate::pagemap_scan)
//! and [`uffd`](crate::uffd): ioctl numbers and argument structures, as in
//! `include/uapi/linux/fs.h` and `include/uapi/linux/userfaultfd.h`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `_IOWR(ty, nr, size)` of `include/uapi/asm-generic/ioctl.h`.
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    const READ_WRITE: u64 = 3;
    (READ_WRITE << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `PAGE_IS_WRITTEN`: a page not write-protected by uffd-wp.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PM_SCAN_WP_MATCHING`: write-protect the matched pages.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail on a range without async uffd-wp.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: uffd-wp on shmem (a /dev/shm RAM file).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: pages never touched are protected too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write faults itself.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `UFFDIO_API`: `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u64 = iowr(0xaa, 0x3f, std::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`: `_IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u64 = iowr(0xaa, 0x00, std::mem::size_of::<UffdioRegister>());
/// `UFFDIO_WRITEPROTECT`: `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u64 = iowr(0xaa, 0x06, std::mem::size_of::<UffdioWriteprotect>());

/// Argument structures of the ioctls above: `repr(C)` integers that the
/// kernel reads and writes in place.
///
/// # Safety
///
/// Implementors must be `repr(C)` structures of the exact size the ioctl
/// number encodes, holding only integers, so any bytes the kernel writes
/// are a valid value.
pub unsafe trait IoctlArg {}

// SAFETY: repr(C) integers only; their sizes are encoded in the numbers
// above (checked by the test below).
unsafe impl IoctlArg for PmScanArg {}
// SAFETY: as above.
unsafe impl IoctlArg for UffdioApi {}
// SAFETY: as above.
unsafe impl IoctlArg for UffdioRegister {}
// SAFETY: as above.
unsafe impl IoctlArg for UffdioWriteprotect {}

/// `ioctl(fd, request, arg)`; the non-negative result or the error.
///
/// # Safety
///
/// `request` must be the ioctl whose argument is a `T`, and every address
/// in `arg` (such as `PmScanArg::vec`) must point at memory the kernel may
/// write as that ioctl defines, valid for the whole call.
pub unsafe fn ioctl<T: IoctlArg>(fd: &impl AsRawFd, request: u64, arg: &mut T) -> io::Result<u64> {
    // SAFETY: `arg` is a live, exclusive `IoctlArg` of the size `request`
    // encodes, and the addresses it holds are valid (this function's
    // contract); `fd` is borrowed for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as u64)
}

/// `userfaultfd(O_CLOEXEC | O_NONBLOCK)`.
pub fn userfaultfd() -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes only flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Which buffer of a socket [`set_socket_buffer`] sizes.
#[derive(Clone, Copy, Debug)]
pub enum SocketBuffer {
    /// `SO_SNDBUF`.
    Send,
    /// `SO_RCVBUF`.
    Receive,
}

impl SocketBuffer {
    /// The `SOL_SOCKET` option that sizes this buffer.
    fn option(self) -> libc::c_int {
        match self {
            Self::Send => libc::SO_SNDBUF,
            Self::Receive => libc::SO_RCVBUF,
        }
    }
}

/// Sets a socket's send or receive buffer to `bytes` (Linux doubles it for
/// its bookkeeping and caps it at `net.core.[wr]mem_max`); this also turns
/// the kernel's automatic growth of that buffer off.
pub fn set_socket_buffer(
    socket: &impl AsRawFd,
    which: SocketBuffer,
    bytes: usize,
) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).map_err(io::Error::other)?;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&value`,
    // which lives across the call; the descriptor is borrowed from `socket`.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            which.option(),
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size `getsockopt` reports for a socket's buffer (twice what was
/// set, see [`set_socket_buffer`]).
#[cfg(test)]
pub fn socket_buffer(socket: &impl AsRawFd, which: SocketBuffer) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to `&mut value`, which
    // lives across the call, and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            which.option(),
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(value).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_buffers_are_set_and_read_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        set_socket_buffer(&stream, SocketBuffer::Send, 256 << 10).unwrap();
        set_socket_buffer(&listener, SocketBuffer::Receive, 256 << 10).unwrap();
        assert_eq!(
            socket_buffer(&stream, SocketBuffer::Send).unwrap(),
            512 << 10
        );
        assert_eq!(
            socket_buffer(&listener, SocketBuffer::Receive).unwrap(),
            512 << 10
        );
    }

    /// The numbers `_IOWR` yields in C, computed by hand from the headers.
    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }
}
