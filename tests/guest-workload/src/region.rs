//! Anonymous memory that really goes back to the kernel when dropped.
//!
//! The workload must free pages to the guest kernel's buddy allocator (that is
//! what free page hinting reports) and get fresh ones on the next allocation.
//! `malloc` would keep freed chunks in its heap, so regions are `mmap`ed and
//! `munmap`ed directly (the symbols come from the C library std links anyway).

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;

use crate::pattern::{self, Mismatch, Stamp, PAGE_SIZE};

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_PRIVATE: i32 = 0x02;
const MAP_ANONYMOUS: i32 = 0x20;
const MAP_POPULATE: i32 = 0x8000;
const MAP_FAILED: *mut c_void = !0usize as *mut c_void;

extern "C" {
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64)
        -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> i32;
}

/// A private anonymous mapping of whole pages.
///
/// # Invariants
/// `ptr` is the start of a live `len`-byte read/write mapping owned by this
/// value, `len` is a non-zero multiple of [`PAGE_SIZE`].
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

/// A damaged page found by [`Region::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPage {
    /// Virtual address of the damaged word.
    pub addr: usize,
    /// The first damaged word.
    pub mismatch: Mismatch,
    /// How many words of the page are damaged.
    pub bad_words: usize,
}

impl Region {
    /// Maps `pages` fresh pages (populated, so they are backed right away).
    pub fn new(pages: usize) -> io::Result<Region> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad region size"))?;
        // SAFETY: an anonymous private mapping at a kernel-chosen address
        // touches no existing memory; the result is checked below.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        // INVARIANT: mmap succeeded for `len` bytes, read/write, owned by us.
        Ok(Region { ptr, len })
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Start address (for reports).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: by the type invariant `ptr..ptr+len` is a live mapping we
        // own; `&self` prevents concurrent mutation through this value.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Stamps every page with (chunk, page index, generation).
    pub fn stamp(&mut self, chunk: u64, generation: u64) {
        for (i, page) in self.bytes_mut().chunks_exact_mut(PAGE_SIZE).enumerate() {
            pattern::write_page(
                page,
                Stamp {
                    chunk,
                    page: i as u64,
                    generation,
                },
            );
        }
    }

    /// Makes every page non-zero (the "dirtied" guest): one junk word every
    /// 512 bytes. A migrator must then send each page whole (a zero page goes
    /// as a tiny marker); writing every byte would only cost TCG time.
    pub fn scribble(&mut self, salt: u64) {
        for (i, w) in self.bytes_mut().chunks_exact_mut(512).enumerate() {
            let v = (i as u64 ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            w[..8].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Checks every page against its stamp; calls `bad` for each damaged page
    /// and returns the number of damaged pages.
    pub fn verify(&self, chunk: u64, generation: u64, mut bad: impl FnMut(BadPage)) -> usize {
        let base = self.addr();
        let mut n = 0;
        for (i, page) in self.bytes().chunks_exact(PAGE_SIZE).enumerate() {
            let s = Stamp {
                chunk,
                page: i as u64,
                generation,
            };
            if let Some((m, words)) = pattern::check_page(page, s) {
                n += 1;
                bad(BadPage {
                    addr: base + i * PAGE_SIZE + m.offset,
                    mismatch: m,
                    bad_words: words,
                });
            }
        }
        n
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: by the type invariant we own this mapping; nothing borrows
        // it once `drop` runs.
        let rc = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            eprintln!("fhwork: munmap failed: {}", io::Error::last_os_error());
        }
    }
}

/// Physical frame number of the page holding `addr`, from
/// `/proc/self/pagemap` (needs root; `None` when unavailable).
pub fn pfn_of(addr: usize) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").ok()?;
    f.seek(SeekFrom::Start((addr / PAGE_SIZE * 8) as u64))
        .ok()?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b).ok()?;
    let e = u64::from_le_bytes(b);
    let present = e >> 63 & 1 == 1;
    let pfn = e & ((1 << 55) - 1);
    (present && pfn != 0).then_some(pfn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_region_verifies_and_catches_damage() {
        let mut r = Region::new(8).expect("mmap");
        r.stamp(3, 1);
        assert_eq!(r.verify(3, 1, |_| panic!("clean region reported bad")), 0);
        // Damage page 5 through the mapping and expect exactly that page.
        r.bytes_mut()[5 * PAGE_SIZE + 100] ^= 0xff;
        let mut seen = Vec::new();
        assert_eq!(r.verify(3, 1, |b| seen.push(b)), 1);
        assert_eq!(seen[0].addr, r.addr() + 5 * PAGE_SIZE + 96);
        assert_eq!(seen[0].bad_words, 1);
        // The wrong generation fails every page.
        assert_eq!(r.verify(3, 2, |_| {}), 8);
    }

    #[test]
    fn scribbled_region_is_not_zero_and_not_stamped() {
        let mut r = Region::new(2).expect("mmap");
        r.scribble(42);
        for page in r.bytes().chunks(PAGE_SIZE) {
            assert!(page.iter().any(|&b| b != 0), "every page is dirtied");
        }
        assert_eq!(r.verify(0, 0, |_| {}), 2);
    }

    #[test]
    fn zero_pages_rejected() {
        assert!(Region::new(0).is_err());
    }
}
