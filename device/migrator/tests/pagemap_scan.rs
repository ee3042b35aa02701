//! The page-table dirty log on this test's own memory: guest RAM in a
//! memfd (shmem, like QEMU's RAM file in /dev/shm), registered for async
//! uffd-wp, read back with `PAGEMAP_SCAN`. Where the kernel refuses a
//! userfaultfd or lacks async write protection, each test prints why and
//! passes without checking anything.

mod common;

use std::error::Error;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use freehint_migrate::pagemap_scan::PagemapScanLog;
use freehint_migrate::uffd::{AsyncWriteTracking, UffdError};
use freehint_migrate::{
    DirtyLog, Engine, HookError, NoHints, PageBitmap, Policy, RamLayout, PAGE_SIZE,
};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The PC-shaped guest memory, both ranges in one memfd back to back.
fn memfd_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and
    // returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let file = std::sync::Arc::new(unsafe { File::from_raw_fd(fd) });
    let ranges = pc_ranges();
    file.set_len(ranges.iter().map(|r| r.1 as u64).sum())
        .unwrap();
    let mut offset = 0;
    let with_files = ranges.map(|(gpa, len)| {
        let region = (gpa, len, Some(FileOffset::from_arc(file.clone(), offset)));
        offset += len as u64;
        region
    });
    GuestMemoryMmap::from_ranges_with_files(with_files).unwrap()
}

/// Host addresses of the regions, in layout order.
fn host_addrs(mem: &GuestMemoryMmap) -> Vec<u64> {
    mem.iter()
        .map(|region| mem.get_host_address(region.start_addr()).unwrap() as u64)
        .collect()
}

/// Registers every region, or says why the kernel does not allow it.
fn track(mem: &GuestMemoryMmap) -> Option<Vec<AsyncWriteTracking>> {
    let regions = mem.iter().map(|region| {
        (
            mem.get_host_address(region.start_addr()).unwrap() as u64,
            region.len(),
        )
    });
    match regions
        .map(|(start, len)| AsyncWriteTracking::register(start, len))
        .collect()
    {
        Ok(tracking) => Some(tracking),
        Err(err @ (UffdError::Unavailable(_) | UffdError::Unsupported { .. })) => {
            eprintln!(
                "SKIPPED: {err}: {}",
                err.source().map(ToString::to_string).unwrap_or_default()
            );
            None
        }
        Err(err) => panic!("{err}: {:?}", err.source()),
    }
}

fn ones(bits: &PageBitmap) -> Vec<usize> {
    bits.iter_ones().collect()
}

#[test]
fn written_pages_are_reported_once() {
    let mem = memfd_memory();
    let layout = RamLayout::from_guest_memory(&mem).unwrap();
    let Some(_tracking) = track(&mem) else { return };
    let mut log = PagemapScanLog::for_this_process(&host_addrs(&mem), &layout).unwrap();
    log.start().unwrap();
    let mut dirty = PageBitmap::repeat(false, layout.total_pages() as usize);
    log.sync(&mut dirty).unwrap();
    assert_eq!(ones(&dirty), Vec::<usize>::new(), "nothing written yet");

    let written = [3, 767, 768, 900, 1279];
    for page in written {
        write_page(&mem, &layout, page as u64, &contents(page as u64, 1));
    }
    log.sync(&mut dirty).unwrap();
    assert_eq!(ones(&dirty), written, "both ranges, both edges of the hole");

    dirty.fill(false);
    log.sync(&mut dirty).unwrap();
    assert_eq!(ones(&dirty), Vec::<usize>::new(), "write-protected again");
    write_page(&mem, &layout, 900, &contents(900, 2));
    log.sync(&mut dirty).unwrap();
    assert_eq!(ones(&dirty), vec![900]);
}

#[test]
fn a_range_without_tracking_is_an_error() {
    let mem = memfd_memory();
    let layout = RamLayout::from_guest_memory(&mem).unwrap();
    let mut log = PagemapScanLog::for_this_process(&host_addrs(&mem), &layout).unwrap();
    let err = log.start().unwrap_err();
    assert!(err.to_string().contains("PAGEMAP_SCAN"), "{err}");
}

/// The engine with the page-table log while a thread writes the memory.
#[test]
fn migrates_with_the_page_table_log() {
    let (src, dst) = (memfd_memory(), pc_memory::<()>());
    let engine = Engine::new(&src).unwrap().with_policy(Policy {
        downtime: Duration::ZERO,
        min_shrink: 0.0,
        stall_passes: 0,
        max_passes: 4,
    });
    let layout = engine.layout().clone();
    let Some(_tracking) = track(&src) else { return };
    let log = PagemapScanLog::for_this_process(&host_addrs(&src), &layout).unwrap();
    let stop = AtomicBool::new(false);
    let sent = thread::scope(|s| {
        let (stream, receiver) = spawn_receiver(s, into_memory(&dst));
        let mut writer = Some(s.spawn(|| {
            let mut rng = SmallRng::seed_from_u64(3);
            let mut generation = 0;
            while !stop.load(Ordering::SeqCst) {
                generation += 1;
                let page = rng.random_range(0..layout.total_pages());
                write_page(&src, &layout, page, &contents(page, generation));
            }
        }));
        let pause = || -> Result<(), HookError> {
            stop.store(true, Ordering::SeqCst);
            writer
                .take()
                .ok_or("paused twice")?
                .join()
                .map_err(|_| "the writer panicked")?;
            write_page(&src, &layout, 5, &[0xee; PAGE_SIZE]);
            Ok(())
        };
        let sent = engine.run(stream, log, NoHints, pause, |_: &_| {}).unwrap();
        receiver.join().unwrap().unwrap();
        sent
    });
    assert!(
        sent.passes.last().unwrap().pages_sent >= 1,
        "the last write went in the final pass"
    );
    assert_eq!(
        differing(&src, &dst, &layout, 0..layout.total_pages()),
        Vec::<u64>::new()
    );
}
