//! The engine with hints from the real balloon device: the driver model
//! (`freehint_device::test_utils`) is the guest. It answers hint rounds
//! (standard or bitmap protocol) with its free 4 MiB blocks, then reuses
//! pages of a block it has just reported free and never touches them
//! again, while a "vCPU" keeps rewriting its in-use pages. The destination
//! must equal the source page by page, with pages skipped thanks to hints.
//!
//! Negative control: a source that keeps the first epoch's free set and
//! applies it after later syncs loses the reused pages, and the comparison
//! sees it.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use freehint_device::balloon::{BalloonConfig, HintHandle, HintSet, Layout};
use freehint_device::test_utils::{BalloonDriver, DRIVER_AREA, DRIVER_AREA_SIZE, HINT_BLOCK_SIZE};
use freehint_migrate::control_port::ControlPort;
use freehint_migrate::device_hints::{DeviceDirtyLog, DeviceHints, HintPort, PageMap, RoundPolicy};
use freehint_migrate::{
    AnyOf, DirtyLog, Engine, HintSource, HookError, MigrationReport, PageBits, Policy, RamLayout,
    SharedLog, PAGE_SIZE,
};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};

/// Guest RAM: 32 MiB at 0 (the pages the test looks at), and 32 MiB below
/// 4 GiB that hold the driver's rings and buffers.
const RAM: [(u64, u64); 2] = [
    (0, 32 << 20),
    (DRIVER_AREA - DRIVER_AREA_SIZE, 2 * DRIVER_AREA_SIZE),
];
const BLOCK_PAGES: u64 = HINT_BLOCK_SIZE / PAGE_SIZE as u64;
/// Blocks 0..4 of the low RAM are in use, 4..8 free (and zero).
const IN_USE_PAGES: u64 = 4 * BLOCK_PAGES;
const FREE_BLOCKS: std::ops::Range<u64> = 4..8;
/// Pages of the first free block the guest reuses after reporting it.
const REUSED: [u64; 8] = [0, 1, 63, 64, 200, 511, 512, 1023];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Standard,
    Bitmap,
}

/// What one migration did.
#[derive(Debug)]
struct Outcome {
    report: MigrationReport,
    differing: Vec<u64>,
    reused: Vec<u64>,
    rounds_started: u64,
    rounds_answered: u64,
    guest_writes: u64,
}

/// The driver area is written by the driver model through no dirty log:
/// the test treats it as dirty at every sync.
struct DriverArea {
    pages: std::ops::Range<usize>,
}

impl DirtyLog for DriverArea {
    fn start(&mut self) -> Result<(), HookError> {
        Ok(())
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        dirty[self.pages.clone()].fill(true);
        Ok(())
    }
}

/// The hint source under test, [`DeviceHints`], with test scaffolding:
/// after epoch 0 begins it waits until the guest answered the round and
/// reused its pages, so the bulk pass sees the hints and the reuse
/// deterministically. With `stale` set it is the broken adapter of the
/// negative control.
struct TestHints<P: HintPort> {
    inner: DeviceHints<P>,
    answered: Arc<AtomicU32>,
    stale: Option<Stale>,
}

/// The broken part: keeps the first free set it sees and applies it after
/// every later sync too, bypassing the token.
struct Stale {
    handle: HintHandle,
    map: PageMap,
    kept: Option<HintSet>,
}

impl<P: HintPort> HintSource for TestHints<P> {
    fn before_sync(&mut self) {
        self.inner.before_sync();
    }

    fn on_sync(&mut self, epoch: u64) {
        self.inner.on_sync(epoch);
        if epoch == 0 {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.answered.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn mark_free(&mut self, free: &mut PageBits) -> Result<(), HookError> {
        self.inner.mark_free(free)?;
        if let Some(stale) = &mut self.stale {
            if stale.kept.is_none() {
                let set = stale.handle.snapshot();
                if set.free_pages() > 0 {
                    stale.kept = Some(set);
                }
            }
            if let Some(set) = &stale.kept {
                stale.map.or_into(PageBits::from_slice(set.words()), free);
            }
        }
        Ok(())
    }
}

fn migrate(protocol: Protocol, broken: bool) -> Outcome {
    migrate_with(protocol, broken, |driver, _| {
        (driver.hints(), driver.hints())
    })
}

/// [`migrate`] with the device reached through its control socket, as the
/// program reaches a device server in another process.
fn migrate_through_the_control_socket(protocol: Protocol) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    migrate_with(protocol, false, |driver, layout| {
        let control = freehint_host::Control::new(
            driver.dev.handle(),
            driver.hints(),
            *layout,
            Arc::new(std::sync::atomic::AtomicU8::new(0x0f)),
            None,
        );
        freehint_host::control::spawn(&path, control, false).unwrap();
        let connect = || ControlPort::connect(&path, Duration::from_secs(10)).unwrap();
        (connect(), connect())
    })
}

fn migrate_with<P: HintPort + Send + 'static>(
    protocol: Protocol,
    broken: bool,
    ports: impl FnOnce(&BalloonDriver, &Layout) -> (P, P),
) -> Outcome {
    let layout = Layout::from_ram_byte_ranges(&RAM).unwrap();
    let mut driver = BalloonDriver::new(BalloonConfig::all_features(layout), u64::MAX, 64);
    let (hint_port, dirty_port) = ports(&driver, &layout);
    let memory = driver.mem.clone();
    let source = memory.memory();
    let engine = Engine::new(&*source).unwrap().with_policy(Policy {
        downtime: Duration::ZERO,
        stall_passes: 0,
        max_passes: 3,
        ..Policy::default()
    });
    let ram: RamLayout = engine.layout().clone();
    for page in 0..IN_USE_PAGES {
        write_page(&*source, &ram, page, &contents(page, 0));
    }

    let guest_log = SharedLog::new(ram.total_pages() as usize);
    let driver_area = ram.pages_of(1).unwrap();
    let log = AnyOf::new()
        .with(guest_log.clone())
        .with(DeviceDirtyLog::new(dirty_port, &layout, &ram).unwrap())
        .with(DriverArea {
            pages: driver_area.start as usize..driver_area.end as usize,
        });
    let device_hints = DeviceHints::new(hint_port, &layout, &ram, RoundPolicy::EveryEpoch).unwrap();
    let answered = Arc::new(AtomicU32::new(0));
    let mut hints = TestHints {
        inner: device_hints,
        answered: Arc::clone(&answered),
        stale: broken.then(|| Stale {
            handle: driver.hints(),
            map: PageMap::new(&layout, &ram).unwrap(),
            kept: None,
        }),
    };

    let destination = GuestMemoryMmap::<()>::from_ranges(
        &RAM.map(|(gpa, len)| (GuestAddress(gpa), len as usize)),
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    let (report, guest) = thread::scope(|s| {
        let (out, receiver) = spawn_receiver(s, into_memory(&destination));
        let mut guest = Some(s.spawn(|| {
            let mut g = Guest {
                driver: &mut driver,
                log: &guest_log,
                ram: &ram,
                protocol,
                free_blocks: FREE_BLOCKS.collect(),
                last_id: 0,
                reused: Vec::new(),
                rounds: 0,
                writes: 0,
            };
            g.run(&stop, &answered);
            (g.reused, g.rounds, g.writes)
        }));
        let mut result = None;
        let pause = || -> Result<(), HookError> {
            stop.store(true, Ordering::SeqCst);
            let handle = guest.take().ok_or("paused twice")?;
            result = Some(handle.join().map_err(|_| "the guest panicked")?);
            Ok(())
        };
        let report = engine.run(out, log, &mut hints, pause, |_: &_| {}).unwrap();
        receiver.join().unwrap().unwrap();
        (report, result.unwrap())
    });
    let rounds_started = hints.inner.rounds_started();
    hints.inner.finish();
    let differing = differing(&*source, &destination, &ram, 0..ram.total_pages());
    Outcome {
        report,
        differing,
        reused: guest.0,
        rounds_started,
        rounds_answered: guest.1,
        guest_writes: guest.2,
    }
}

/// The guest: the driver model answering hint rounds, and a vCPU.
struct Guest<'a> {
    driver: &'a mut BalloonDriver,
    log: &'a SharedLog,
    ram: &'a RamLayout,
    protocol: Protocol,
    /// Free 4 MiB blocks of the low RAM, by block number.
    free_blocks: Vec<u64>,
    last_id: u32,
    reused: Vec<u64>,
    rounds: u64,
    writes: u64,
}

impl Guest<'_> {
    fn run(&mut self, stop: &AtomicBool, answered: &AtomicU32) {
        while !stop.load(Ordering::SeqCst) {
            if let Some(id) = self.answer_round() {
                self.rounds += 1;
                if self.reused.is_empty() {
                    self.reuse_first_block();
                }
                answered.store(id, Ordering::SeqCst);
            }
            for _ in 0..16 {
                self.writes += 1;
                let page = self.writes.wrapping_mul(0x9e37_79b9) % IN_USE_PAGES;
                self.write(page, self.writes);
            }
            thread::yield_now();
        }
    }

    /// Answers a new hint round with the free blocks; its command id.
    fn answer_round(&mut self) -> Option<u32> {
        match self.protocol {
            Protocol::Standard => {
                let addrs: Vec<u64> = self
                    .free_blocks
                    .iter()
                    .map(|b| b * HINT_BLOCK_SIZE)
                    .collect();
                let rep = self.driver.on_config_change(&addrs);
                (rep.cmd_id != 0).then_some(rep.cmd_id)
            }
            Protocol::Bitmap => {
                let id = self.driver.config().free_page_hint_cmd_id;
                if id == self.last_id || id < 0x8000_0000 || id == u32::MAX {
                    return None;
                }
                self.last_id = id;
                let free: Vec<(u64, u64)> = self
                    .free_blocks
                    .iter()
                    .map(|b| (b * BLOCK_PAGES, BLOCK_PAGES))
                    .collect();
                self.driver.bitmap_round(id, &free, 4096).map(|_| id)
            }
        }
    }

    /// Allocates the first free block again (after reporting it free) and
    /// writes some of its pages, once.
    fn reuse_first_block(&mut self) {
        let block = self.free_blocks.remove(0);
        for offset in REUSED {
            let page = block * BLOCK_PAGES + offset;
            self.write(page, u64::MAX - page);
            self.reused.push(page);
        }
    }

    /// A write, then its dirty bit (after the write is visible).
    fn write(&mut self, page: u64, generation: u64) {
        write_page(
            &*self.driver.m(),
            self.ram,
            page,
            &contents(page, generation),
        );
        self.log.mark(page as usize);
    }
}

fn check(protocol: Protocol) {
    check_outcome(protocol, migrate(protocol, false));
}

fn check_outcome(protocol: Protocol, o: Outcome) {
    eprintln!(
        "{protocol:?}: {} passes, {} pages skipped by hints, {} rounds started, {} answered, \
         {} guest writes, {} pages differ",
        o.report.passes.len(),
        o.report.hinted_pages,
        o.rounds_started,
        o.rounds_answered,
        o.guest_writes,
        o.differing.len()
    );
    assert_eq!(o.differing, Vec::<u64>::new(), "{o:?}");
    assert_eq!(o.reused.len(), REUSED.len(), "{o:?}");
    assert_eq!(
        o.report.passes[0].hinted_pages,
        FREE_BLOCKS.count() as u64 * BLOCK_PAGES,
        "the bulk pass skipped every reported block, the reused one too: {o:?}"
    );
    assert!(o.rounds_started >= 2 && o.rounds_answered >= 1, "{o:?}");
    assert_eq!(o.report.passes.len(), 4, "bulk, two dirty passes, final");
}

#[test]
fn standard_protocol_hints_lose_no_reused_page() {
    check(Protocol::Standard);
}

#[test]
fn bitmap_protocol_hints_lose_no_reused_page() {
    check(Protocol::Bitmap);
}

#[test]
fn hints_through_the_control_socket_lose_no_reused_page() {
    for protocol in [Protocol::Standard, Protocol::Bitmap] {
        check_outcome(protocol, migrate_through_the_control_socket(protocol));
    }
}

#[test]
fn negative_control_hints_applied_across_a_sync_are_caught() {
    let o = migrate(Protocol::Standard, true);
    eprintln!(
        "stale hints: {} pages skipped by hints, {} pages differ: {:?}",
        o.report.hinted_pages,
        o.differing.len(),
        o.differing
    );
    assert!(o.report.hinted_pages > 0, "{o:?}");
    assert_eq!(
        o.differing, o.reused,
        "the reused pages, and only they, are lost: {o:?}"
    );
}
