//! How a Rust VMM embeds freehint: the balloon device model
//! (`freehint-device`) and the migrator (`freehint-migrate`) over one
//! vm-memory guest memory, with no QEMU and no preload library.
//!
//! The guest is the device crate's driver model (`BalloonDriver`, feature
//! `test-utils`), which behaves like Linux's `virtio_balloon`: it lays out
//! its virtqueues in guest RAM, inflates and deflates the balloon and sends
//! statistics, while a "vCPU" rewrites guest pages. The migration:
//!
//! - the vCPU's and the driver's writes (through this process's page
//!   tables) are tracked with asynchronous uffd-wp on the VMM's own memory
//!   ([`AsyncWriteTracking`], read by [`PagemapScanLog::for_this_process`]);
//!   a VMM on KVM would use KVM's dirty log instead;
//! - the device's own writes (used rings, discarded pages) come from its
//!   dirty log (`BalloonHandle::take_device_dirty`);
//! - [`AnyOf`] merges the two; no hints ([`NoHints`]);
//! - the destination is an in-process [`Receiver`] writing a second guest
//!   memory, compared with the source page by page at the end.
//!
//! ```text
//! cargo run -p freehint-migrate --example embed
//! ```
//!
//! The tests run it too (`tests/example.rs`). It needs userfaultfd (root,
//! or `vm.unprivileged_userfaultfd=1`); without it, it says so and exits.

use std::error::Error;
use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use freehint_device::balloon::{BalloonConfig, BalloonHandle, Layout};
use freehint_device::test_utils::{BalloonDriver, DRIVER_AREA, DRIVER_AREA_SIZE};
use freehint_migrate::pagemap_scan::PagemapScanLog;
use freehint_migrate::uffd::{AsyncWriteTracking, UffdError};
use freehint_migrate::{
    AnyOf, DirtyLog, Engine, GuestMemorySink, HookError, NoHints, PageBits, Policy, Receiver,
    PAGE_SIZE,
};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// Guest RAM: 16 MiB at 0, and 32 MiB below 4 GiB that hold the driver's
/// rings and buffers (as guest RAM does in a real guest).
const RAM: [(u64, u64); 2] = [
    (0, 16 << 20),
    (DRIVER_AREA - DRIVER_AREA_SIZE, 2 * DRIVER_AREA_SIZE),
];

/// What the example did.
#[derive(Debug)]
pub struct Outcome {
    /// Pages compared between source and destination.
    pub pages_compared: u64,
    /// Pages that differ (must be 0).
    pub pages_differing: u64,
    /// Passes the migration made.
    pub passes: usize,
    /// Pages the vCPU rewrote while the migration ran.
    pub guest_writes: u64,
    /// Balloon inflate/deflate rounds the driver made meanwhile.
    pub balloon_rounds: u64,
}

fn main() -> Result<(), BoxError> {
    match run()? {
        Some(o) => {
            println!("{o:#?}");
            if o.pages_differing > 0 {
                return Err(format!("{} pages differ", o.pages_differing).into());
            }
            println!("destination equals source, page by page");
        }
        None => println!("skipped: this process may not use userfaultfd"),
    }
    Ok(())
}

/// Runs the example; `None` when userfaultfd is not available.
pub fn run() -> Result<Option<Outcome>, BoxError> {
    let layout = Layout::from_ram_byte_ranges(&RAM).map_err(|e| format!("{e:?}"))?;
    let mut driver = BalloonDriver::new(BalloonConfig::all_features(layout), u64::MAX, 64);
    let memory = driver.mem.clone();
    let source = memory.memory();
    let engine = Engine::new(&*source)?.with_policy(Policy {
        downtime: Duration::from_millis(5),
        max_passes: 8,
        ..Policy::default()
    });
    let Some(_tracking) = track_writes(&source)? else {
        return Ok(None);
    };
    let addrs = host_addresses(&source);
    let guest_log = PagemapScanLog::for_this_process(&addrs, engine.layout())?;
    let device_log = DeviceLog(driver.handle());
    let log = AnyOf::new().with(guest_log).with(device_log);
    let destination = GuestMemoryMmap::<()>::from_ranges(
        &RAM.map(|(gpa, len)| (GuestAddress(gpa), len as usize)),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = UnixStream::pair()?;
    let (passes, guest_writes, balloon_rounds) = thread::scope(|s| -> Result<_, BoxError> {
        let receiver = s.spawn(|| -> Result<_, BoxError> {
            let receiver = Receiver::new(BufReader::new(rx))?;
            let mut sink = GuestMemorySink::new(&destination, receiver.layout())?;
            Ok(receiver.receive(&mut sink)?)
        });
        let guest_stop = Arc::clone(&stop);
        let mut guest = Some(s.spawn(move || guest(&mut driver, &guest_stop)));
        let mut counts = (0, 0);
        let pause = || -> Result<(), HookError> {
            // Pausing the VM: the vCPU and the device stop.
            stop.store(true, Ordering::SeqCst);
            let handle = guest.take().ok_or("paused twice")?;
            counts = handle.join().map_err(|_| "the guest thread panicked")?;
            Ok(())
        };
        let report = engine.run(BufWriter::new(tx), log, NoHints, pause, |_: &_| {})?;
        receiver.join().map_err(|_| "the receiver panicked")??;
        Ok((report.passes.len(), counts.0, counts.1))
    })?;
    let (pages_compared, pages_differing) = compare(&source, &destination)?;
    Ok(Some(Outcome {
        pages_compared,
        pages_differing,
        passes,
        guest_writes,
        balloon_rounds,
    }))
}

/// The device's own writes, as a dirty log (bit *i* = page *i* of the
/// device's layout, which here is the migrator's page order too).
struct DeviceLog(BalloonHandle);

impl DirtyLog for DeviceLog {
    fn start(&mut self) -> Result<(), HookError> {
        self.0.take_device_dirty();
        Ok(())
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        let words = self.0.take_device_dirty();
        let bits = PageBits::from_slice(&words);
        let len = bits.len().min(dirty.len());
        dirty[..len] |= &bits[..len];
        Ok(())
    }
}

/// Registers every region of this process's guest memory for write
/// tracking; `None` when the kernel or the permissions refuse.
fn track_writes(mem: &GuestMemoryMmap) -> Result<Option<Vec<AsyncWriteTracking>>, BoxError> {
    let mut tracking = Vec::new();
    for region in mem.iter() {
        let start = mem
            .get_host_address(region.start_addr())
            .map_err(|e| format!("{e}"))? as u64;
        match AsyncWriteTracking::register(start, region.len()) {
            Ok(t) => tracking.push(t),
            Err(e @ (UffdError::Unavailable(_) | UffdError::Unsupported { .. })) => {
                eprintln!("no write tracking: {e}");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(tracking))
}

fn host_addresses(mem: &GuestMemoryMmap) -> Vec<u64> {
    mem.iter()
        .filter_map(|r| mem.get_host_address(r.start_addr()).ok())
        .map(|p| p as u64)
        .collect()
}

/// The guest: a vCPU stamping pages of the low RAM while the driver model
/// inflates and deflates the balloon and reports statistics, until `stop`.
/// Returns (pages written, balloon rounds).
fn guest(driver: &mut BalloonDriver, stop: &AtomicBool) -> (u64, u64) {
    let (mut writes, mut rounds) = (0u64, 0u64);
    let pages = RAM[0].1 / PAGE_SIZE as u64;
    while !stop.load(Ordering::SeqCst) {
        for _ in 0..64 {
            writes += 1;
            let page = writes.wrapping_mul(0x9e37_79b9) % pages;
            let stamp = [writes.to_le_bytes(), page.to_le_bytes()].concat();
            // The guest's own RAM: failures cannot happen inside RAM.
            let _ = driver
                .m()
                .write_slice(&stamp, GuestAddress(page * PAGE_SIZE as u64));
        }
        // A few pages of the low RAM go into the balloon and come back.
        let pfns: Vec<u32> = (0..8)
            .map(|i| (1024 + (rounds % 64) * 8 + i) as u32)
            .collect();
        driver.inflate(&pfns);
        driver.deflate(&pfns);
        driver.send_stats(&[(0, rounds), (4, writes)]);
        rounds += 1;
        thread::yield_now();
    }
    (writes, rounds)
}

/// Pages compared and pages that differ between two guest memories of the
/// same ranges.
fn compare(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Result<(u64, u64), BoxError> {
    let (mut pa, mut pb) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    let (mut compared, mut differing) = (0, 0);
    for (gpa, len) in RAM {
        for page in 0..len / PAGE_SIZE as u64 {
            let at = GuestAddress(gpa + page * PAGE_SIZE as u64);
            a.read_slice(&mut pa, at)?;
            b.read_slice(&mut pb, at)?;
            compared += 1;
            if pa != pb {
                differing += 1;
            }
        }
    }
    Ok((compared, differing))
}
