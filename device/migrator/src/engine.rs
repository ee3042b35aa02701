//! The pre-copy engine: copies a running guest's RAM to a stream.
//!
//! 1. The dirty log starts, then hint epoch 0 begins.
//! 2. The bulk pass sends every page; pages hinted free go as zero runs,
//!    zero pages as zero runs, the rest with their contents.
//! 3. After each pass the dirty log is synced ([`HintSource::before_sync`]
//!    right before, a new hint epoch begins right after) and
//!    the [`Policy`] decides: another dirty pass over what was written, or
//!    stop.
//! 4. [`VmControl::pause`] stops the guest; a last sync, then the final
//!    pass (no hints), then the end record.
//!
//! Each pass walks one to-send bitmap by runs, at most [`CHUNK_PAGES`]
//! pages at a time and never across a RAM range. If `run` fails after the
//! pause, the guest stays paused: resuming it is the caller's decision.
//!
//! With a [`HoleMap`] (guest RAM in a sparse file) the bulk pass sends the
//! holes as zero runs without reading them. [`Engine::progress`] gives a
//! handle that another thread reads for a progress bar.

use std::io::Write;
use std::ops::Range;
use std::time::Instant;

use bitvec::prelude::{bitarr, Lsb0};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryError};

use crate::bits::{runs, PageBitmap, PageBits};
use crate::dirty::{DirtyLog, HookError};
use crate::hints::HintSource;
use crate::layout::{LayoutError, RamLayout, RunError};
use crate::policy::{Decision, Policy, StopReason};
use crate::progress::Progress;
use crate::sparse::HoleMap;
use crate::stats::{MigrationReport, PassStats};
use crate::wire::{Encoder, PassKind, WireError};
use crate::PAGE_SIZE;

/// Pages read from guest memory at once.
pub const CHUNK_PAGES: usize = 64;

/// What the engine asks of the VM: chiefly, to stop the guest before the
/// final pass (a VMM pauses its vCPUs and devices; `freehint-migrate send`
/// starts QEMU's own migration, which stops the guest once it is set up).
pub trait VmControl {
    /// Stops the guest; when this returns, nothing writes guest RAM.
    fn pause(&mut self) -> Result<(), HookError>;

    /// A live pass ended (the guest runs; the next dirty-log sync is still
    /// to come, so whatever the VM writes now is sent later). Does nothing
    /// by default.
    fn after_pass(&mut self, _pass: &PassStats) -> Result<(), HookError> {
        Ok(())
    }

    /// The balloon target (4 KiB pages) the destination's balloon device
    /// takes over, asked for once after the final pass. `None` by default:
    /// nothing is carried.
    fn balloon_target(&mut self) -> Option<u32> {
        None
    }
}

impl<F: FnMut() -> Result<(), HookError>> VmControl for F {
    fn pause(&mut self) -> Result<(), HookError> {
        self()
    }
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The guest memory cannot be described as a layout.
    #[error("the guest memory has no valid RAM layout")]
    Layout(#[from] LayoutError),
    /// A run did not fit the layout (an engine bug).
    #[error(transparent)]
    Run(#[from] RunError),
    /// Writing the stream failed.
    #[error("writing the migration stream failed")]
    Wire(#[from] WireError),
    /// The dirty log failed.
    #[error("the dirty log failed to {what}")]
    DirtyLog {
        /// start, sync or stop.
        what: &'static str,
        /// What failed.
        #[source]
        source: HookError,
    },
    /// The hint source failed.
    #[error("the hint source failed")]
    Hints(#[source] HookError),
    /// The hole map failed.
    #[error("finding the holes of guest RAM failed")]
    Holes(#[source] HookError),
    /// Pausing the guest failed.
    #[error("pausing the guest failed")]
    Pause(#[source] HookError),
    /// The VM's step after a live pass failed.
    #[error("the step after a live pass failed")]
    AfterPass(#[source] HookError),
    /// Reading guest memory failed.
    #[error("reading {pages} pages of guest memory at {gpa:#x} failed")]
    Memory {
        /// First address.
        gpa: u64,
        /// Pages.
        pages: usize,
        /// What failed.
        #[source]
        source: GuestMemoryError,
    },
}

/// The pre-copy engine over a vm-memory guest memory.
#[derive(Debug)]
pub struct Engine<'m, M: ?Sized> {
    mem: &'m M,
    layout: RamLayout,
    policy: Policy,
    holes: Option<&'m (dyn HoleMap + Sync)>,
    progress: Progress,
    drop_final_pass: bool,
}

impl<'m, M: GuestMemoryBackend + ?Sized> Engine<'m, M> {
    /// An engine for `mem`, with the layout
    /// [`RamLayout::from_guest_memory`] gives and the default policy.
    pub fn new(mem: &'m M) -> Result<Self, MigrateError> {
        let layout = RamLayout::from_guest_memory(mem)?;
        Ok(Self {
            mem,
            layout,
            policy: Policy::default(),
            holes: None,
            progress: Progress::default(),
            drop_final_pass: false,
        })
    }

    /// Lets the bulk pass send the holes `holes` reports as zero runs
    /// without reading them (see [`crate::sparse`]).
    pub fn with_holes(mut self, holes: &'m (dyn HoleMap + Sync)) -> Self {
        self.holes = Some(holes);
        self
    }

    /// Fault injection for negative controls only: the final pass sends no
    /// pages, so whatever the guest wrote after the last live pass is lost
    /// on the destination. A test that checks the destination's memory must
    /// fail with this set; never use it to migrate a guest.
    pub fn dropping_final_pass_for_negative_control(mut self) -> Self {
        self.drop_final_pass = true;
        self
    }

    /// A handle on this engine's progress (see [`Progress`]).
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Uses `policy` to decide when to stop.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The layout the stream announces.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Migrates to `out`: `log` reports writes, `hints` free pages, `vm`
    /// stops the guest, and `on_pass` sees each pass when it ends.
    pub fn run<W, L, H, V, F>(
        &self,
        out: W,
        log: L,
        hints: H,
        mut vm: V,
        mut on_pass: F,
    ) -> Result<MigrationReport, MigrateError>
    where
        W: Write,
        L: DirtyLog,
        H: HintSource,
        V: VmControl,
        F: FnMut(&PassStats),
    {
        let started = Instant::now();
        let mut session = Session::start(self, out, log, hints)?;
        let mut done = Vec::new();
        let mut record = |stats: PassStats, done: &mut Vec<PassStats>| {
            log::info!("pass {} ({:?}): {stats:?}", stats.pass, stats.kind);
            on_pass(&stats);
            done.push(stats);
        };
        let mut live = |stats: PassStats, done: &mut Vec<PassStats>| {
            let ended = vm.after_pass(&stats);
            record(stats, done);
            ended.map_err(MigrateError::AfterPass)
        };
        live(session.pass(0, PassKind::Bulk, true)?, &mut done)?;
        let stop_reason = loop {
            let pending = session.sync()?;
            match self.policy.decide(&done, pending) {
                Decision::Stop(reason) => break reason,
                Decision::Continue => live(
                    session.pass(done.len() as u32, PassKind::Dirty, true)?,
                    &mut done,
                )?,
            }
        };
        log::info!("stopping the guest: {stop_reason:?}");
        vm.pause().map_err(MigrateError::Pause)?;
        let paused = Instant::now();
        self.progress.paused();
        session.sync()?;
        if self.drop_final_pass {
            log::warn!("negative control: the final pass sends nothing");
            session.to_send.fill(false);
        }
        record(
            session.pass(done.len() as u32, PassKind::Final, false)?,
            &mut done,
        );
        if let Some(target) = vm.balloon_target() {
            session.out.enc.balloon(target)?;
        }
        let bytes = session.finish()?;
        Ok(report(done, stop_reason, bytes, paused, started))
    }
}

fn report(
    passes: Vec<PassStats>,
    stop_reason: StopReason,
    bytes: u64,
    paused: Instant,
    started: Instant,
) -> MigrationReport {
    let sum = |f: fn(&PassStats) -> u64| passes.iter().map(f).sum();
    MigrationReport {
        stop_reason,
        pages_sent: sum(|p| p.pages_sent),
        zero_pages: sum(|p| p.zero_pages),
        hinted_pages: sum(|p| p.hinted_pages),
        hole_pages: sum(|p| p.hole_pages),
        bytes,
        downtime_us: micros(paused),
        total_us: micros(started),
        passes,
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// One migration in progress.
struct Session<'e, M: ?Sized, W: Write, L, H> {
    mem: &'e M,
    layout: &'e RamLayout,
    out: Output<W>,
    log: L,
    hints: H,
    /// Pages the current pass still has to send.
    to_send: PageBitmap,
    /// Pages hinted free in the current epoch.
    free: PageBitmap,
    epoch: u64,
    holes: Option<&'e (dyn HoleMap + Sync)>,
    progress: Progress,
}

impl<'e, M, W, L, H> Session<'e, M, W, L, H>
where
    M: GuestMemoryBackend + ?Sized,
    W: Write,
    L: DirtyLog,
    H: HintSource,
{
    /// Writes the header, starts the dirty log, then begins hint epoch 0;
    /// every page is to be sent.
    fn start(
        engine: &'e Engine<'_, M>,
        out: W,
        mut log: L,
        mut hints: H,
    ) -> Result<Self, MigrateError> {
        let layout = &engine.layout;
        let out = Output::new(Encoder::new(out, layout)?);
        let pages = layout.total_pages() as usize;
        log.start().map_err(|source| MigrateError::DirtyLog {
            what: "start",
            source,
        })?;
        hints.on_sync(0);
        let (to_send, free) = (
            PageBitmap::repeat(true, pages),
            PageBitmap::repeat(false, pages),
        );
        Ok(Self {
            mem: engine.mem,
            layout,
            out,
            log,
            hints,
            to_send,
            free,
            epoch: 0,
            holes: engine.holes,
            progress: engine.progress.clone(),
        })
    }

    /// Adds the pages written since the last sync to the to-send bitmap,
    /// drops all hints and begins a new epoch; returns the pages to send.
    fn sync(&mut self) -> Result<u64, MigrateError> {
        let started = Instant::now();
        self.hints.before_sync();
        self.log
            .sync(&mut self.to_send)
            .map_err(|source| MigrateError::DirtyLog {
                what: "sync",
                source,
            })?;
        self.free.fill(false);
        self.epoch += 1;
        self.hints.on_sync(self.epoch);
        let pending = self.to_send.count_ones() as u64;
        log::debug!(
            "dirty-log sync: {pending} pages pending, {} µs",
            micros(started)
        );
        Ok(pending)
    }

    /// Sends every page of the to-send bitmap, clearing it.
    fn pass(
        &mut self,
        number: u32,
        kind: PassKind,
        use_hints: bool,
    ) -> Result<PassStats, MigrateError> {
        let started = Instant::now();
        let bytes_before = self.out.enc.bytes_written();
        let mut stats = PassStats::new(number, kind, self.to_send.count_ones() as u64);
        self.progress.begin_pass(number, stats.pending_pages);
        let holes = self.holes_of(kind)?;
        self.out.enc.pass(number, kind)?;
        let mut cursor = 0;
        while let Some(offset) = self.to_send[cursor..].first_one() {
            let start = cursor + offset;
            if use_hints {
                self.hints
                    .mark_free(&mut self.free)
                    .map_err(MigrateError::Hints)?;
            }
            let end = self.chunk_end(start);
            let hole_bits: &PageBits = match &holes {
                Some(holes) => &holes[start..end],
                None => &NO_HINTS[..end - start],
            };
            for (hole, pages) in runs(hole_bits) {
                let pages = start + pages.start..start + pages.end;
                if hole {
                    stats.hole_pages += pages.len() as u64;
                    self.out.zero(self.layout, pages)?;
                } else {
                    self.send_unless_hinted(pages, use_hints, &mut stats)?;
                }
            }
            self.to_send[start..end].fill(false);
            self.progress
                .advance((end - start) as u64, self.out.enc.bytes_written());
            cursor = end;
        }
        self.out.flush_zero()?;
        stats.bytes = self.out.enc.bytes_written() - bytes_before;
        stats.elapsed_us = micros(started);
        Ok(stats)
    }

    /// The holes of guest RAM now, for the bulk pass (see
    /// [`crate::sparse`]); `None` for other passes or without a hole map.
    fn holes_of(&self, kind: PassKind) -> Result<Option<PageBitmap>, MigrateError> {
        let Some(map) = self.holes.filter(|_| kind == PassKind::Bulk) else {
            return Ok(None);
        };
        let mut holes = PageBitmap::repeat(false, self.to_send.len());
        map.mark_holes(self.layout, &mut holes)
            .map_err(MigrateError::Holes)?;
        log::debug!("{} of {} pages are holes", holes.count_ones(), holes.len());
        Ok(Some(holes))
    }

    /// Sends `pages` (within one chunk): the ones hinted free as zero runs
    /// (when hints are used), the others read from guest memory.
    fn send_unless_hinted(
        &mut self,
        pages: Range<usize>,
        use_hints: bool,
        stats: &mut PassStats,
    ) -> Result<(), MigrateError> {
        let hinted: &PageBits = if use_hints {
            &self.free[pages.clone()]
        } else {
            &NO_HINTS[..pages.len()]
        };
        for (free, run) in runs(hinted) {
            let run = pages.start + run.start..pages.start + run.end;
            if free {
                stats.hinted_pages += run.len() as u64;
                self.out.zero(self.layout, run)?;
            } else {
                self.out.send(self.mem, self.layout, run, stats)?;
            }
        }
        Ok(())
    }

    /// End of the run of to-send pages from `start`: at most
    /// [`CHUNK_PAGES`] pages, within one RAM range.
    fn chunk_end(&self, start: usize) -> usize {
        let range_end = self
            .layout
            .range_end(start as u64)
            .map_or(start + 1, |end| end as usize);
        let limit = range_end.min(start + CHUNK_PAGES);
        start
            + self.to_send[start..limit]
                .first_zero()
                .unwrap_or(limit - start)
    }

    /// Writes the end record, stops the dirty log; returns the stream size.
    fn finish(self) -> Result<u64, MigrateError> {
        let Self {
            mut out, mut log, ..
        } = self;
        out.enc.end()?;
        log.stop().map_err(|source| MigrateError::DirtyLog {
            what: "stop",
            source,
        })?;
        Ok(out.enc.bytes_written())
    }
}

/// Hint bits for a pass that uses none.
static NO_HINTS: bitvec::BitArr!(for CHUNK_PAGES, in u64, Lsb0) =
    bitarr![const u64, Lsb0; 0; CHUNK_PAGES];

/// The stream side of a session: the encoder, a zero run being gathered,
/// and the page buffer.
struct Output<W: Write> {
    enc: Encoder<W>,
    zero_run: Option<Range<u64>>,
    buf: Vec<u8>,
}

impl<W: Write> Output<W> {
    fn new(enc: Encoder<W>) -> Self {
        Self {
            enc,
            zero_run: None,
            buf: vec![0; CHUNK_PAGES * PAGE_SIZE],
        }
    }

    /// Reads `pages` (within one range) and sends them, zero pages as zero
    /// runs.
    fn send<M>(
        &mut self,
        mem: &M,
        layout: &RamLayout,
        pages: Range<usize>,
        stats: &mut PassStats,
    ) -> Result<(), MigrateError>
    where
        M: GuestMemoryBackend + ?Sized,
    {
        let count = pages.len();
        let at = layout.check_run(pages.start as u64, count as u64)?;
        let data = &mut self.buf[..count * PAGE_SIZE];
        mem.read_slice(data, at.gpa)
            .map_err(|source| MigrateError::Memory {
                gpa: at.gpa.0,
                pages: count,
                source,
            })?;
        let mut zero = bitarr![u64, Lsb0; 0; CHUNK_PAGES];
        for (index, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            zero.set(index, is_zero(page));
        }
        for (is_zero, run) in runs(&zero[..count]) {
            let first = (pages.start + run.start) as u64;
            if is_zero {
                stats.zero_pages += run.len() as u64;
                gather_zero(
                    &mut self.zero_run,
                    &mut self.enc,
                    layout,
                    first..first + run.len() as u64,
                )?;
            } else {
                stats.pages_sent += run.len() as u64;
                self.enc
                    .pages(first, &self.buf[run.start * PAGE_SIZE..run.end * PAGE_SIZE])?;
            }
        }
        Ok(())
    }

    /// Sends `pages` as zero, merged with adjacent zero pages.
    fn zero(&mut self, layout: &RamLayout, pages: Range<usize>) -> Result<(), MigrateError> {
        gather_zero(
            &mut self.zero_run,
            &mut self.enc,
            layout,
            pages.start as u64..pages.end as u64,
        )
    }

    fn flush_zero(&mut self) -> Result<(), MigrateError> {
        if let Some(run) = self.zero_run.take() {
            self.enc.zero(run.start, run.end - run.start)?;
        }
        Ok(())
    }
}

/// Extends the gathered zero run by `pages` when they follow it in the same
/// RAM range; otherwise sends it and starts a new one.
fn gather_zero<W: Write>(
    gathered: &mut Option<Range<u64>>,
    enc: &mut Encoder<W>,
    layout: &RamLayout,
    pages: Range<u64>,
) -> Result<(), MigrateError> {
    if let Some(run) = gathered {
        if run.end == pages.start && layout.range_end(run.start) == layout.range_end(pages.start) {
            run.end = pages.end;
            return Ok(());
        }
        enc.zero(run.start, run.end - run.start)?;
    }
    *gathered = Some(pages);
    Ok(())
}

/// Whether a page is all zero (blocks of 256 bytes, each a vectorisable OR).
fn is_zero(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|block| block.iter().fold(0, |acc, &byte| acc | byte) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SharedLog;
    use crate::hints::NoHints;
    use std::io;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn zero_detection() {
        let mut page = [0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&page));
    }

    /// Accepts `left` bytes, then fails like a peer that went away.
    struct Closing {
        left: usize,
    }

    impl Write for Closing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct FailingLog;

    impl DirtyLog for FailingLog {
        fn start(&mut self) -> Result<(), HookError> {
            Ok(())
        }

        fn sync(&mut self, _dirty: &mut PageBits) -> Result<(), HookError> {
            Err("the log is gone".into())
        }
    }

    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE)]).unwrap();
        mem.write_slice(&[1u8; 64 * PAGE_SIZE], GuestAddress(0))
            .unwrap();
        mem
    }

    fn no_pause() -> Result<(), HookError> {
        Ok(())
    }

    /// Says pages 8..16 are holes, whatever they hold.
    #[derive(Debug)]
    struct FakeHoles;

    impl HoleMap for FakeHoles {
        fn mark_holes(&self, _: &RamLayout, holes: &mut PageBits) -> Result<(), HookError> {
            holes[8..16].fill(true);
            Ok(())
        }
    }

    /// Receives `bytes` into a buffer of 64 pages.
    fn received(bytes: &[u8]) -> Vec<u8> {
        let receiver = crate::Receiver::new(bytes).unwrap();
        let mut ram = vec![0xeeu8; 64 * PAGE_SIZE];
        receiver.receive(&mut ram[..]).unwrap();
        ram
    }

    #[test]
    fn holes_go_as_zero_in_the_bulk_pass_and_dirty_pages_are_read_again() {
        let mem = memory();
        let engine = Engine::new(&mem).unwrap().with_holes(&FakeHoles);
        let progress = engine.progress();
        let log = SharedLog::new(64);
        let writer = log.clone();
        let pause = move || -> Result<(), HookError> {
            writer.mark(9);
            Ok(())
        };
        let report = engine
            .run(Vec::new(), log.clone(), NoHints, pause, |_: &_| {})
            .map(|r| r.passes.clone())
            .unwrap();
        assert_eq!(report[0].hole_pages, 8, "the holes, unread");
        assert_eq!(report[0].pages_sent, 56);
        assert_eq!(report.last().unwrap().pages_sent, 1, "page 9, read");
        let snap = progress.snapshot();
        assert!(snap.paused && snap.pages_done == 1 && snap.bytes > 56 * 4096);
        let mut out = Vec::new();
        Engine::new(&mem)
            .unwrap()
            .with_holes(&FakeHoles)
            .run(&mut out, SharedLog::new(64), NoHints, no_pause, |_: &_| {})
            .unwrap();
        let ram = received(&out);
        assert!(ram[8 * PAGE_SIZE..16 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(ram[16 * PAGE_SIZE..].iter().all(|&b| b == 1));
    }

    #[test]
    fn the_negative_control_drops_the_final_pass() {
        let mem = memory();
        let log = SharedLog::new(64);
        let writer = log.clone();
        let pause = move || -> Result<(), HookError> {
            writer.mark(3);
            Ok(())
        };
        let report = Engine::new(&mem)
            .unwrap()
            .dropping_final_pass_for_negative_control()
            .run(io::sink(), log, NoHints, pause, |_: &_| {})
            .unwrap();
        let last = report.passes.last().unwrap();
        assert_eq!((last.kind, last.pages_done()), (PassKind::Final, 0));
    }

    #[test]
    fn a_broken_stream_is_an_error() {
        let mem = memory();
        let engine = Engine::new(&mem).unwrap();
        let log = SharedLog::new(64);
        let err = engine
            .run(Closing { left: 5000 }, log, NoHints, no_pause, |_: &_| {})
            .unwrap_err();
        assert!(
            matches!(err, MigrateError::Wire(WireError::Io { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_failing_dirty_log_is_an_error_before_the_pause() {
        let mem = memory();
        let engine = Engine::new(&mem).unwrap();
        let mut paused = false;
        let pause = || -> Result<(), HookError> {
            paused = true;
            Ok(())
        };
        let err = engine
            .run(io::sink(), FailingLog, NoHints, pause, |_: &_| {})
            .unwrap_err();
        assert!(
            matches!(err, MigrateError::DirtyLog { what: "sync", .. }),
            "{err}"
        );
        assert!(!paused, "the guest keeps running");
    }
}
