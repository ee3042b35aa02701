//! A hostile virtio driver for the guest (used by `vm-smoke --hostile`).
//!
//! Unbinds `virtio-pci` from our device (1af4:1045), maps BAR0 through
//! sysfs, and drives the modern virtio-pci registers with garbage: random
//! feature sets, queue sizes, ring addresses (into garbage-filled guest pages,
//! beyond RAM, unaligned), DRIVER_OK, notify storms, device config and common
//! config writes, while scribbling over the rings in between. It ends with a
//! reset and rebinds `virtio-pci`, so the stock driver probes again: the
//! server must have survived, and the device must work as before.
//!
//! std only, built for the guest with
//! `rustc -O -C target-feature=+crt-static hostile-guest.rs`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_SHARED: i32 = 1;
const MAP_PRIVATE: i32 = 2;
const MAP_ANONYMOUS: i32 = 0x20;
const MAP_POPULATE: i32 = 0x8000;
const BAR0_SIZE: usize = 0x4000;
const PAGES: usize = 16;

extern "C" {
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
    fn mlock(addr: *const u8, len: usize) -> i32;
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Bar(*mut u8);
impl Bar {
    fn w(&self, off: usize, len: usize, v: u64) {
        assert!(off + len <= BAR0_SIZE);
        // SAFETY: off + len is inside the 16 KiB BAR0 mapping; MMIO needs
        // volatile accesses of the exact width.
        unsafe {
            let p = self.0.add(off);
            match len {
                1 => std::ptr::write_volatile(p, v as u8),
                2 => std::ptr::write_volatile(p as *mut u16, v as u16),
                4 => std::ptr::write_volatile(p as *mut u32, v as u32),
                _ => std::ptr::write_volatile(p as *mut u64, v),
            }
        }
    }
    fn r(&self, off: usize, len: usize) -> u64 {
        assert!(off + len <= BAR0_SIZE);
        // SAFETY: as in `w`.
        unsafe {
            let p = self.0.add(off);
            match len {
                1 => u64::from(std::ptr::read_volatile(p)),
                2 => u64::from(std::ptr::read_volatile(p as *const u16)),
                4 => u64::from(std::ptr::read_volatile(p as *const u32)),
                _ => std::ptr::read_volatile(p as *const u64),
            }
        }
    }
}

fn find_device() -> Option<String> {
    for e in fs::read_dir("/sys/bus/pci/devices").ok()?.flatten() {
        let p = e.path();
        let v = fs::read_to_string(p.join("vendor")).unwrap_or_default();
        let d = fs::read_to_string(p.join("device")).unwrap_or_default();
        if v.trim() == "0x1af4" && d.trim() == "0x1045" {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// Physical address of the page at `va` (root reads PFNs in pagemap).
fn phys(va: usize) -> u64 {
    let mut f = File::open("/proc/self/pagemap").expect("pagemap");
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start((va / 4096 * 8) as u64)).unwrap();
    f.read_exact(&mut b).unwrap();
    let e = u64::from_le_bytes(b);
    assert!(e & (1 << 63) != 0, "page not present");
    (e & ((1 << 55) - 1)) * 4096
}

fn main() {
    let iterations: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let bdf = find_device().expect("no 1af4:1045 device");
    let dev = format!("/sys/bus/pci/devices/{bdf}");
    if fs::metadata(format!("{dev}/driver")).is_ok() {
        fs::write(format!("{dev}/driver/unbind"), &bdf).expect("unbind");
    }
    // Memory space + bus master on (unbind may have cleared bus master).
    let cfg = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("{dev}/config"))
        .expect("config");
    let mut cmd = [0u8; 2];
    cfg.read_exact_at(&mut cmd, 4).unwrap();
    let c = u16::from_le_bytes(cmd) | 0x6;
    cfg.write_all_at(&c.to_le_bytes(), 4).unwrap();

    let res = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("{dev}/resource0"))
        .expect("resource0");
    // SAFETY: mapping a 16 KiB BAR file; checked for MAP_FAILED below.
    let p = unsafe {
        mmap(
            std::ptr::null_mut(),
            BAR0_SIZE,
            PROT_READ | PROT_WRITE,
            MAP_SHARED,
            res.as_raw_fd(),
            0,
        )
    };
    assert!(p as isize != -1, "mmap resource0 failed");
    let bar = Bar(p);

    // Garbage pages the rings point into.
    // SAFETY: anonymous private mapping; checked below.
    let buf = unsafe {
        mmap(
            std::ptr::null_mut(),
            PAGES * 4096,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
            -1,
            0,
        )
    };
    assert!(buf as isize != -1, "mmap buffer failed");
    // SAFETY: buf is a valid mapping of PAGES pages.
    unsafe { mlock(buf, PAGES * 4096) };
    // SAFETY: buf is a valid, exclusively owned mapping of PAGES pages.
    let mem = unsafe { std::slice::from_raw_parts_mut(buf, PAGES * 4096) };
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // All-ones: descriptor addresses, lengths and pfns far outside RAM, so
    // the device never discards or writes a page this guest still uses
    // (a hostile guest may hurt itself; the test wants it alive).
    mem.fill(0xff);
    let pa: Vec<u64> = (0..PAGES).map(|i| phys(buf as usize + i * 4096)).collect();

    let regs: [(usize, usize); 14] = [
        (0x00, 4),
        (0x04, 4),
        (0x08, 4),
        (0x0c, 4),
        (0x10, 2),
        (0x14, 1),
        (0x16, 2),
        (0x18, 2),
        (0x1a, 2),
        (0x1c, 2),
        (0x20, 8),
        (0x28, 8),
        (0x30, 8),
        (0x3a, 2),
    ];
    let mut live = 0u64;
    let mut notifies = 0u64;
    for i in 0..iterations {
        if i % 100 == 0 {
            // A plausible bring-up with hostile queue setup.
            bar.w(0x14, 1, 0);
            bar.w(0x14, 1, 3);
            bar.w(0x08, 4, 0);
            bar.w(0x0c, 4, rng.next() & 0x3e);
            bar.w(0x08, 4, 1);
            bar.w(0x0c, 4, 1);
            bar.w(0x14, 1, 0xb);
            for q in 0..6u64 {
                bar.w(0x16, 2, q);
                // ≤ 64 entries: every ring fits in one of our pages even at
                // an unaligned offset below 2 KiB.
                bar.w(0x18, 2, 1 << rng.below(7));
                for reg in [0x20usize, 0x28, 0x30] {
                    let a = match rng.below(4) {
                        0 => rng.next(),                                  // anywhere
                        1 => pa[rng.below(PAGES as u64) as usize] + rng.below(2048), // unaligned
                        _ => pa[rng.below(PAGES as u64) as usize],
                    };
                    bar.w(reg, 8, a);
                }
                bar.w(0x1c, 2, 1);
            }
            bar.w(0x14, 1, 0xf);
            if bar.r(0x14, 1) & 4 != 0 {
                live += 1;
            }
        }
        match rng.below(8) {
            0..=2 => {
                bar.w(0x3000 + 4 * rng.below(8) as usize, 2, rng.next());
                notifies += 1;
            }
            3 => {
                let (off, len) = regs[rng.below(regs.len() as u64) as usize];
                bar.w(off, len, rng.next());
            }
            4 => {
                let len = [1usize, 2, 4][rng.below(3) as usize];
                bar.w(0x2000 + rng.below(0x40) as usize * len, len, rng.next());
            }
            5 => {
                // Scribble a small u16 (avail idx, ring entry, next, flags).
                let at = 2 * rng.below((PAGES * 4096 / 2) as u64) as usize;
                let v = rng.below(16) as u16;
                mem[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
            6 => {
                let _ = bar.r(0x1000, 1); // ISR read-to-clear
                let _ = bar.r(0x2000 + 4 * rng.below(8) as usize, 4);
            }
            _ => {
                let (off, len) = regs[rng.below(regs.len() as u64) as usize];
                let _ = bar.r(off, len);
            }
        }
    }
    bar.w(0x14, 1, 0);
    let status_after_reset = bar.r(0x14, 1);
    println!(
        "HOSTILE: iterations {iterations} live_rounds {live} notifies {notifies} status_after_reset {status_after_reset}"
    );
    drop(res);
    let mut bind = OpenOptions::new()
        .write(true)
        .open("/sys/bus/pci/drivers/virtio-pci/bind")
        .expect("bind");
    bind.write_all(bdf.as_bytes()).expect("rebind virtio-pci");
    println!("HOSTILE: rebound {bdf}");
}
