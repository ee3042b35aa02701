//! `fhtool hostile [--iterations N]`: a hostile virtio driver for the guest
//! (scenario `vfio-hostile`).
//!
//! Unbinds `virtio-pci` from the balloon (1af4:1045), maps BAR0 through
//! sysfs, and drives the modern virtio-pci registers with garbage: random
//! feature sets, queue sizes, ring addresses (into garbage-filled guest pages,
//! beyond RAM, unaligned), DRIVER_OK, notify storms, device config and common
//! config writes, while scribbling over the rings in between. It ends with a
//! reset and rebinds `virtio-pci`, so the stock driver probes again: the
//! device must have survived, and work as before.
//!
//! Prints `HOSTILE: iterations N live_rounds L notifies K status_after_reset
//! S`, `HOSTILE: rebound BDF` and one `@@RESULT` line named [`RESULT_NAME`].
//! The garbage is the same on every run (a fixed seed).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};

use crate::mem::{Region, PAGE};
use crate::result::Report;
use crate::Error;

/// The `name` of the result line.
pub const RESULT_NAME: &str = "hostile-driver";
/// Size of the modern virtio-pci BAR0 of the device.
const BAR0_SIZE: usize = 0x4000;
/// Garbage pages the rings point into.
const PAGES: usize = 16;
/// Seed of the garbage.
const SEED: u64 = 0x1234_5678_9abc_def1;
/// Virtqueues the bring-up configures.
const QUEUES: u64 = 6;
/// Common config registers (offset, width) read and written at random.
const REGS: [(usize, usize); 14] = [
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
/// Common config: device status.
const STATUS: usize = 0x14;
/// ISR status (read to clear).
const ISR: usize = 0x1000;
/// Device config.
const DEVICE_CFG: usize = 0x2000;
/// Notify area.
const NOTIFY: usize = 0x3000;

/// BAR0 mapped from sysfs `resource0`; unmapped on drop.
struct Bar {
    ptr: *mut u8,
    _file: File,
}

impl Bar {
    fn map(path: &str) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // SAFETY: maps BAR0 of the device through its sysfs resource file;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BAR0_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io("mmap resource0", io::Error::last_os_error()));
        }
        Ok(Bar {
            ptr: ptr.cast(),
            _file: file,
        })
    }

    /// Writes the low `len` bytes of `v` at `off`.
    fn w(&self, off: usize, len: usize, v: u64) {
        assert!(off + len <= BAR0_SIZE, "BAR0 write at {off:#x}+{len}");
        // SAFETY: `off + len` is inside the BAR0 mapping; MMIO needs volatile
        // accesses of the exact width (the offsets used are aligned to it).
        unsafe {
            let p = self.ptr.add(off);
            match len {
                1 => p.write_volatile(v as u8),
                2 => p.cast::<u16>().write_volatile(v as u16),
                4 => p.cast::<u32>().write_volatile(v as u32),
                _ => p.cast::<u64>().write_volatile(v),
            }
        }
    }

    /// Reads `len` bytes at `off`.
    fn r(&self, off: usize, len: usize) -> u64 {
        assert!(off + len <= BAR0_SIZE, "BAR0 read at {off:#x}+{len}");
        // SAFETY: as in `w`.
        unsafe {
            let p = self.ptr.add(off);
            match len {
                1 => u64::from(p.read_volatile()),
                2 => u64::from(p.cast::<u16>().read_volatile()),
                4 => u64::from(p.cast::<u32>().read_volatile()),
                _ => p.cast::<u64>().read_volatile(),
            }
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), BAR0_SIZE) };
    }
}

/// The PCI address of the 1af4:1045 device.
fn find_device() -> Result<String, Error> {
    let dir = "/sys/bus/pci/devices";
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries.flatten() {
        let p = e.path();
        let read = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
        if read("vendor").trim() == "0x1af4" && read("device").trim() == "0x1045" {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(Error::msg("no 1af4:1045 device"))
}

/// Memory space and bus master on (unbinding may have cleared bus master).
fn enable_device(dev: &str) -> Result<(), Error> {
    let path = format!("{dev}/config");
    let cfg = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let mut cmd = [0u8; 2];
    cfg.read_exact_at(&mut cmd, 4)
        .and_then(|()| cfg.write_all_at(&(u16::from_le_bytes(cmd) | 0x6).to_le_bytes(), 4))
        .map_err(|e| Error::io(&path, e))
}

/// Garbage pages, mlocked, and their physical addresses.
fn garbage_pages() -> Result<(Region, Vec<u64>), Error> {
    let mut region = Region::filled(PAGES * PAGE, 0xff, true)?;
    // All-ones: descriptor addresses, lengths and pfns far outside RAM, so
    // the device never discards or writes a page this guest still uses
    // (a hostile guest may hurt itself; the test wants it alive).
    region.bytes_mut().fill(0xff);
    let pa = region
        .pfns()?
        .into_iter()
        .map(|p| p.map(|pfn| pfn * PAGE as u64))
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| Error::msg("a garbage page is not present"))?;
    Ok((region, pa))
}

/// A plausible bring-up with hostile queue setup; whether the device then
/// reports DRIVER_OK.
fn bring_up(bar: &Bar, rng: &mut SmallRng, pa: &[u64]) -> bool {
    bar.w(STATUS, 1, 0);
    bar.w(STATUS, 1, 3);
    bar.w(0x08, 4, 0);
    bar.w(0x0c, 4, rng.next_u64() & 0x3e);
    bar.w(0x08, 4, 1);
    bar.w(0x0c, 4, 1);
    bar.w(STATUS, 1, 0xb);
    for q in 0..QUEUES {
        bar.w(0x16, 2, q);
        // ≤ 64 entries: every ring fits in one of our pages even at an
        // unaligned offset below 2 KiB.
        bar.w(0x18, 2, 1 << rng.random_range(0..7));
        for reg in [0x20, 0x28, 0x30] {
            let a = match rng.random_range(0..4) {
                0 => rng.next_u64(),                                                // anywhere
                1 => pa[rng.random_range(0..pa.len())] + rng.random_range(0..2048), // unaligned
                _ => pa[rng.random_range(0..pa.len())],
            };
            bar.w(reg, 8, a);
        }
        bar.w(0x1c, 2, 1);
    }
    bar.w(STATUS, 1, 0xf);
    bar.r(STATUS, 1) & 4 != 0
}

/// One random access (or ring scribble); whether it was a notify.
fn poke(bar: &Bar, rng: &mut SmallRng, mem: &mut [u8]) -> bool {
    match rng.random_range(0..8) {
        0..=2 => {
            bar.w(NOTIFY + 4 * rng.random_range(0..8), 2, rng.next_u64());
            return true;
        }
        3 => {
            let (off, len) = REGS[rng.random_range(0..REGS.len())];
            bar.w(off, len, rng.next_u64());
        }
        4 => {
            let len = [1, 2, 4][rng.random_range(0..3)];
            bar.w(
                DEVICE_CFG + rng.random_range(0..0x40) * len,
                len,
                rng.next_u64(),
            );
        }
        5 => {
            // Scribble a small u16 (avail idx, ring entry, next, flags).
            let at = 2 * rng.random_range(0..mem.len() / 2);
            let v = rng.random_range(0..16u16);
            mem[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        6 => {
            let _ = bar.r(ISR, 1); // read-to-clear
            let _ = bar.r(DEVICE_CFG + 4 * rng.random_range(0..8), 4);
        }
        _ => {
            let (off, len) = REGS[rng.random_range(0..REGS.len())];
            let _ = bar.r(off, len);
        }
    }
    false
}

/// `fhtool hostile`: see the module documentation.
pub fn run(iterations: u64) -> Result<bool, Error> {
    let bdf = find_device()?;
    let dev = format!("/sys/bus/pci/devices/{bdf}");
    if fs::metadata(format!("{dev}/driver")).is_ok() {
        fs::write(format!("{dev}/driver/unbind"), &bdf).map_err(|e| Error::io("unbind", e))?;
    }
    enable_device(&dev)?;
    let bar = Bar::map(&format!("{dev}/resource0"))?;
    let (mut garbage, pa) = garbage_pages()?;
    let mut rng = SmallRng::seed_from_u64(SEED);
    let (mut live, mut notifies) = (0u64, 0u64);
    for i in 0..iterations {
        if i % 100 == 0 && bring_up(&bar, &mut rng, &pa) {
            live += 1;
        }
        if poke(&bar, &mut rng, garbage.bytes_mut()) {
            notifies += 1;
        }
    }
    bar.w(STATUS, 1, 0);
    let status_after_reset = bar.r(STATUS, 1);
    println!(
        "HOSTILE: iterations {iterations} live_rounds {live} notifies {notifies} status_after_reset {status_after_reset}"
    );
    drop(bar);
    let bind = "/sys/bus/pci/drivers/virtio-pci/bind";
    fs::write(bind, &bdf).map_err(|e| Error::io("rebind virtio-pci", e))?;
    println!("HOSTILE: rebound {bdf}");
    let mut r = Report::new(RESULT_NAME);
    r.num("rounds", iterations)
        .num("live_rounds", live)
        .num("notifies", notifies)
        .num("status_after_reset", status_after_reset)
        .text("rebound", &bdf);
    Ok(r.emit(true))
}
