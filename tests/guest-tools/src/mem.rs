//! Anonymous memory, /proc/self/pagemap, /proc/kpageflags, /proc/iomem.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::Error;

/// Page size of the guest (x86-64: 4 KiB).
pub const PAGE: usize = 4096;

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    /// Whether `mlock` succeeded.
    pub locked: bool,
}

impl Region {
    /// Maps `len` bytes (rounded up to pages), writes `seed`-dependent data to
    /// every page and tries to `mlock` it.
    pub fn filled(len: usize, seed: u8, lock: bool) -> Result<Self, Error> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        // SAFETY: anonymous private mapping with no address hint; the result
        // is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io("mmap", io::Error::last_os_error()));
        }
        let mut r = Region {
            ptr: ptr.cast(),
            len,
            locked: false,
        };
        r.touch(seed);
        if lock {
            // SAFETY: the range is our own mapping.
            r.locked = unsafe { libc::mlock(r.ptr.cast(), r.len) } == 0;
        }
        Ok(r)
    }

    /// Writes one byte in every page (so every page is backed and dirty).
    pub fn touch(&mut self, seed: u8) {
        for (i, off) in (0..self.len).step_by(PAGE).enumerate() {
            // SAFETY: `off < len`, inside our mapping.
            unsafe {
                self.ptr
                    .add(off)
                    .write_volatile(seed.wrapping_add(i as u8) | 1)
            };
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// The mapping's bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is our live mapping of `len` bytes, readable and
        // writable; `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The pfn of every page (from /proc/self/pagemap); `None` for a page
    /// that is not present.
    pub fn pfns(&self) -> Result<Vec<Option<u64>>, Error> {
        let f = File::open("/proc/self/pagemap")
            .map_err(|e| Error::io("open /proc/self/pagemap", e))?;
        let mut raw = vec![0u8; self.pages() * 8];
        let off = (self.ptr as u64 / PAGE as u64) * 8;
        f.read_exact_at(&mut raw, off)
            .map_err(|e| Error::io("read /proc/self/pagemap", e))?;
        let out: Vec<Option<u64>> = raw
            .chunks_exact(8)
            .map(|c| {
                let e = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                let present = e >> 63 & 1 == 1;
                let pfn = e & ((1 << 55) - 1);
                (present && pfn != 0).then_some(pfn)
            })
            .collect();
        if out.iter().all(Option::is_none) {
            return Err(Error::msg(
                "pagemap shows no pfns (not root, or pages not present)",
            ));
        }
        Ok(out)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `filled`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A top-level "System RAM" range of /proc/iomem, in whole pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// First whole page.
    pub first_pfn: u64,
    /// Whole pages.
    pub nr_pages: u64,
}

/// Parses the top-level "System RAM" entries of /proc/iomem text (partial
/// pages at the ends are left out, as the kernel does).
pub fn parse_iomem(text: &str) -> Vec<RamRange> {
    text.lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (range, name) = l.split_once(" : ")?;
            if name.trim() != "System RAM" {
                return None;
            }
            let (a, b) = range.trim().split_once('-')?;
            let start = u64::from_str_radix(a, 16).ok()?;
            let end = u64::from_str_radix(b, 16).ok()?.checked_add(1)?;
            let first = start.div_ceil(PAGE as u64);
            let last = end / PAGE as u64;
            (last > first).then_some(RamRange {
                first_pfn: first,
                nr_pages: last - first,
            })
        })
        .collect()
}

/// Reads /proc/kpageflags for `nr` pfns from `first_pfn` into `out`.
pub fn read_kpageflags(f: &File, first_pfn: u64, out: &mut [u64]) -> Result<(), Error> {
    let mut raw = vec![0u8; out.len() * 8];
    f.read_exact_at(&mut raw, first_pfn * 8)
        .map_err(|e| Error::io("read /proc/kpageflags", e))?;
    for (o, c) in out.iter_mut().zip(raw.chunks_exact(8)) {
        *o = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
    }
    Ok(())
}

/// Free pages per /proc/buddyinfo (sum of count × 2^order over all zones).
pub fn parse_buddyinfo(text: &str) -> u64 {
    text.lines()
        .map(|l| {
            l.split_whitespace()
                .skip(4) // "Node 0, zone DMA32"
                .enumerate()
                .map(|(order, n)| n.parse::<u64>().unwrap_or(0) << order)
                .sum::<u64>()
        })
        .sum()
}

/// MemTotal from /proc/meminfo, in KiB.
pub fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iomem_keeps_top_level_system_ram_in_whole_pages() {
        let t = "00000000-00000fff : Reserved\n\
                 00001000-0009fbff : System RAM\n\
                 00100000-bffdffff : System RAM\n  01000000-01ffffff : Kernel code\n\
                 100000000-17fffffff : System RAM\n";
        let r = parse_iomem(t);
        assert_eq!(
            r,
            vec![
                RamRange {
                    first_pfn: 1,
                    nr_pages: 0x9f - 1
                },
                RamRange {
                    first_pfn: 0x100,
                    nr_pages: 0xbffe0 - 0x100
                },
                RamRange {
                    first_pfn: 0x100000,
                    nr_pages: 0x80000
                },
            ]
        );
    }

    #[test]
    fn buddyinfo_sums_pages() {
        let t = "Node 0, zone      DMA      1      2      0\nNode 0, zone    DMA32      0      0      3\n";
        assert_eq!(parse_buddyinfo(t), 1 + 2 * 2 + 3 * 4);
    }
}
