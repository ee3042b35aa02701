//! End to end, in one process: a guest memory shaped like an x86 PC, a
//! writer thread dirtying it during pre-copy, the engine sending over a
//! UNIX socket pair, a receiver storing on the other end; then every page
//! is compared byte for byte.

mod common;

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use freehint_migrate::{
    AnyOf, Decoder, Encoder, Engine, HookError, MigrationReport, NoHints, PassKind, Policy,
    RamFile, RamLayout, ReceiveReport, Record, SharedLog, VmMemoryLog, WireError, PAGE_SIZE,
};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::GuestMemoryMmap;

/// Pages the guest writes right before it stops (both RAM ranges, both
/// edges of the hole): the final pass must carry them.
const LAST_WRITES: [u64; 6] = [0, 1, 500, 767, 768, 1279];
/// A page the guest zeroes right before it stops.
const LAST_ZEROED: u64 = 2;

/// Four live passes whatever happens (unless nothing is dirty).
fn policy() -> Policy {
    Policy {
        downtime: Duration::ZERO,
        min_shrink: 0.0,
        stall_passes: 0,
        max_passes: 4,
    }
}

/// Every third page zero, the others stamped with generation 0.
fn fill<B: Bitmap>(mem: &GuestMemoryMmap<B>, layout: &RamLayout) {
    for page in (0..layout.total_pages()).filter(|page| page % 3 != 0) {
        write_page(mem, layout, page, &contents(page, 0));
    }
}

/// The guest's vCPU: rewrites random pages until `stop`, each 8th one to
/// zero (dirty, then zero), marking `log` (if any) after each write.
fn guest<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    layout: &RamLayout,
    log: Option<&SharedLog>,
    stop: &AtomicBool,
) {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut writes: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        writes += 1;
        let page = rng.random_range(0..layout.total_pages());
        let bytes = if writes % 8 == 0 {
            vec![0; PAGE_SIZE]
        } else {
            contents(page, writes)
        };
        write_page(mem, layout, page, &bytes);
        if let Some(log) = log {
            log.mark(page as usize);
        }
        if writes % 64 == 0 {
            thread::yield_now();
        }
    }
}

/// Stops the guest thread, then makes the last writes (marked in `log`).
fn stop_guest<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    layout: &RamLayout,
    log: &SharedLog,
    stop: &AtomicBool,
    thread: thread::ScopedJoinHandle<'_, ()>,
) -> Result<(), HookError> {
    stop.store(true, Ordering::SeqCst);
    thread.join().map_err(|_| "the guest thread panicked")?;
    for page in LAST_WRITES {
        write_page(mem, layout, page, &contents(page, 1 << 40));
        log.mark(page as usize);
    }
    write_page(mem, layout, LAST_ZEROED, &[0; PAGE_SIZE]);
    log.mark(LAST_ZEROED as usize);
    Ok(())
}

/// Copies a stream, leaving out the page and zero runs of the final pass;
/// the copy is a valid stream (its end record counts what it carries).
fn drop_final_pass(input: impl Read, output: impl Write) -> Result<(), WireError> {
    let mut decoder = Decoder::new(input)?;
    let mut encoder = Encoder::new(output, decoder.layout())?;
    let mut in_final = false;
    while let Some(record) = decoder.next_record()? {
        match record {
            Record::Pass { kind, .. } => {
                in_final = kind == PassKind::Final;
                encoder.write(record)?;
            }
            Record::Pages { .. } | Record::Zero { .. } if in_final => {}
            Record::End { .. } => encoder.end()?,
            record => encoder.write(record)?,
        }
    }
    Ok(())
}

struct Outcome {
    sent: MigrationReport,
    received: ReceiveReport,
    json_lines: Vec<String>,
    differing: Vec<u64>,
}

/// Migrates a running guest into another guest memory; `drop_final`
/// leaves the final pass out of the stream (the negative control).
fn migrate(drop_final: bool) -> Outcome {
    let (src, dst) = (pc_memory::<()>(), pc_memory::<()>());
    let engine = Engine::new(&src).unwrap().with_policy(policy());
    let layout = engine.layout().clone();
    fill(&src, &layout);
    let log = SharedLog::new(layout.total_pages() as usize);
    let stop = AtomicBool::new(false);
    let mut json_lines = Vec::new();
    let (sent, received) = thread::scope(|s| {
        let (mut stream, receiver) = spawn_receiver(s, into_memory(&dst));
        if drop_final {
            let (tx, rx) = UnixStream::pair().unwrap();
            s.spawn(move || drop_final_pass(BufReader::new(rx), stream).unwrap());
            stream = BufWriter::new(tx);
        }
        let mut writer = Some(s.spawn(|| guest(&src, &layout, Some(&log), &stop)));
        let pause = || {
            stop_guest(
                &src,
                &layout,
                &log,
                &stop,
                writer.take().ok_or("paused twice")?,
            )
        };
        let on_pass = |pass: &_| json_lines.push(serde_json::to_string(pass).unwrap());
        let sent = engine
            .run(stream, log.clone(), NoHints, pause, on_pass)
            .unwrap();
        (sent, receiver.join().unwrap().unwrap())
    });
    let differing = differing(&src, &dst, &layout, 0..layout.total_pages());
    Outcome {
        sent,
        received,
        json_lines,
        differing,
    }
}

#[test]
fn migrates_a_running_guest_page_for_page() {
    let Outcome {
        sent,
        received,
        json_lines,
        differing,
    } = migrate(false);
    assert_eq!(
        differing,
        Vec::<u64>::new(),
        "pages that differ after migration"
    );

    let kinds: Vec<_> = sent.passes.iter().map(|pass| pass.kind).collect();
    assert_eq!(kinds.first(), Some(&PassKind::Bulk));
    assert_eq!(kinds.last(), Some(&PassKind::Final));
    assert!(
        kinds[1..kinds.len() - 1]
            .iter()
            .all(|&kind| kind == PassKind::Dirty),
        "{kinds:?}"
    );
    assert_eq!(
        sent.passes[0].pending_pages, 1280,
        "the bulk pass covers all RAM"
    );
    let last = sent.passes.last().unwrap();
    assert!(
        last.pages_sent >= LAST_WRITES.len() as u64,
        "the final pass carries the last writes: {last:?}"
    );
    assert!(
        last.zero_pages >= 1,
        "and the page zeroed last, as a zero run: {last:?}"
    );

    assert_eq!(received.pages_written, sent.pages_sent);
    assert_eq!(received.zero_pages, sent.zero_pages + sent.hinted_pages);
    assert_eq!(received.passes as usize, sent.passes.len());
    assert_eq!(received.bytes, sent.bytes);

    assert_eq!(json_lines.len(), sent.passes.len());
    let first: serde_json::Value = serde_json::from_str(&json_lines[0]).unwrap();
    assert_eq!(first["kind"], "bulk");
    assert_eq!(first["pending_pages"], 1280);
    assert!(serde_json::to_string(&sent)
        .unwrap()
        .contains("\"stop_reason\":"));
}

/// Negative control: without the final pass the comparison must fail, on
/// at least the pages written right before the pause.
#[test]
fn a_lost_final_pass_is_detected() {
    let Outcome {
        sent,
        received,
        differing,
        ..
    } = migrate(true);
    assert!(
        received.pages_written < sent.pages_sent,
        "the final pass was dropped"
    );
    for page in LAST_WRITES {
        assert!(
            differing.contains(&page),
            "page {page} was not caught: {differing:?}"
        );
    }
}

/// A Rust VMM's own setup: vm-memory's dirty bitmaps log the guest's
/// writes, a device log is merged in, and the destination is a RAM file.
#[test]
fn migrates_with_vm_memory_bitmaps_into_a_ram_file() {
    let src = pc_memory::<AtomicBitmap>();
    let engine = Engine::new(&src).unwrap().with_policy(policy());
    let layout = engine.layout().clone();
    fill(&src, &layout);
    let device_log = SharedLog::new(layout.total_pages() as usize);
    let stop = AtomicBool::new(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest-ram");
    let sent = thread::scope(|s| {
        let (stream, receiver) = spawn_receiver(s, |layout| RamFile::create(&path, layout));
        let mut writer = Some(s.spawn(|| guest(&src, &layout, None, &stop)));
        let pause = || {
            stop_guest(
                &src,
                &layout,
                &device_log,
                &stop,
                writer.take().ok_or("paused twice")?,
            )
        };
        let logs = AnyOf::new()
            .with(VmMemoryLog::new(&src).unwrap())
            .with(device_log.clone());
        let sent = engine
            .run(stream, logs, NoHints, pause, |_: &_| {})
            .unwrap();
        receiver.join().unwrap().unwrap();
        sent
    });
    assert!(sent.passes.len() >= 2);
    let mut file = Vec::new();
    File::open(&path).unwrap().read_to_end(&mut file).unwrap();
    assert_eq!(file.len() as u64, layout.file_size());
    let differing: Vec<u64> = (0..layout.total_pages())
        .filter(|&page| {
            let offset = layout.place(page).unwrap().file_offset as usize;
            file[offset..offset + PAGE_SIZE] != read_page(&src, &layout, page)[..]
        })
        .collect();
    assert_eq!(
        differing,
        Vec::<u64>::new(),
        "pages that differ between the guest and the RAM file"
    );
}
