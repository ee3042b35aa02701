//! What the harness owns and checks: memfds with a known image, eventfds,
//! pipes, and the process's open fds and memfd mappings.

use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::{PAGE, R_SIZE, S_SIZE, W_SIZE};

/// The bytes page `p` of a memfd starts with (never zero, so a discard or
/// a stray write shows).
pub(crate) fn pattern(salt: u8, size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| {
            let (p, j) = (i / PAGE, i % PAGE);
            ((p * 131 + j * 7 + u64::from(salt)) % 251 + 1) as u8
        })
        .collect()
}

pub(crate) fn patterns() -> &'static [Vec<u8>; 3] {
    static P: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    P.get_or_init(|| [pattern(1, W_SIZE), pattern(2, R_SIZE), pattern(3, S_SIZE)])
}

pub(crate) fn memfd(name: &CStr) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned here.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd owned by nobody else.
    unsafe { File::from_raw_fd(fd) }
}

/// A memfd the harness passes to DMA_MAP, with the image it must hold.
pub(crate) struct MemFile {
    pub(crate) file: File,
    name: &'static str,
    image: Vec<u8>,
    /// Page `i` was covered by a writable DMA_MAP at some point: the
    /// device may have written it.
    dev_writable: Vec<bool>,
}

impl MemFile {
    pub(crate) fn new(which: usize) -> Self {
        let (name, cname) = [
            ("W", c"fz-vfio-w"),
            ("R", c"fz-vfio-r"),
            ("S", c"fz-vfio-s"),
        ][which];
        let image = patterns()[which].clone();
        let file = memfd(cname);
        file.write_all_at(&image, 0).unwrap();
        let pages = image.len() / PAGE as usize;
        MemFile {
            file,
            name,
            image,
            dev_writable: vec![false; pages],
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.image.len() as u64
    }

    /// The guest (or client) writes `data` at file offset `off`.
    pub(crate) fn write(&mut self, off: u64, data: &[u8]) {
        let Some(end) = off.checked_add(data.len() as u64) else {
            return;
        };
        if end > self.size() {
            return;
        }
        self.file.write_all_at(data, off).unwrap();
        self.image[off as usize..end as usize].copy_from_slice(data);
    }

    pub(crate) fn mark_writable(&mut self, off: u64, size: u64) {
        let end = off.saturating_add(size).min(self.size());
        let mut p = off / PAGE;
        while p * PAGE < end {
            self.dev_writable[p as usize] = true;
            p += 1;
        }
    }

    /// Pages no writable map ever covered hold exactly the harness's image.
    pub(crate) fn check(&self) {
        let mut now = vec![0u8; self.image.len()];
        self.file.read_exact_at(&mut now, 0).unwrap();
        for (p, writable) in self.dev_writable.iter().enumerate() {
            let r = p * PAGE as usize..(p + 1) * PAGE as usize;
            if !writable && now[r.clone()] != self.image[r.clone()] {
                let at = r.start
                    + now[r.clone()]
                        .iter()
                        .zip(&self.image[r.clone()])
                        .position(|(a, b)| a != b)
                        .unwrap();
                panic!(
                    "memfd {} page {p} was never mapped writable, yet byte {at:#x} changed \
                     ({:#x} → {:#x})",
                    self.name, self.image[at], now[at]
                );
            }
        }
    }
}

pub(crate) fn eventfd(full: bool) -> File {
    // SAFETY: plain syscall; the fd is owned here.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let mut f = unsafe { File::from_raw_fd(fd) };
    if full {
        // The largest counter value: a blocking write would now block.
        f.write_all(&(u64::MAX - 1).to_ne_bytes()).unwrap();
    }
    f
}

/// The write end of a fresh pipe (the read end is closed).
pub(crate) fn pipe() -> File {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds owned here.
    drop(unsafe { File::from_raw_fd(fds[0]) });
    // SAFETY: as above.
    unsafe { File::from_raw_fd(fds[1]) }
}

pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Mappings of the harness's memfds in this process.
pub(crate) fn memfd_mappings() -> usize {
    let mut s = String::new();
    File::open("/proc/self/maps")
        .and_then(|mut f| f.read_to_string(&mut s))
        .unwrap();
    s.lines().filter(|l| l.contains("memfd:fz-vfio-")).count()
}
