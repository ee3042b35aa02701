// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The migrator's copy rate (a bench binary writing JSON).
//!
//! ```text
//! cargo bench -p freehint-migrate --bench stream [-- --runs N] [-- --out FILE]
//! ```
//!
//! Writes `target/bench/stream.json` (under `$CARGO_TARGET_DIR` if set) and
//! prints a table. The source is a sparse 4 GiB RAM file on tmpfs
//! (`/dev/shm`, else the temp directory) laid out like an x86 PC (3 GiB
//! below the PCI hole, 1 GiB from 4 GiB), mapped as `qemu::map_ram` maps
//! QEMU's: 8 % of its pages are in use and 8 % more were used and freed
//! since, both random bytes in clusters of 1–3 MiB at random places; the
//! rest are holes. One migration is the real [`Engine`] with [`FileHoles`],
//! a dirty log that reports nothing and a pause that does nothing: the bulk
//! pass, then an empty final pass.
//!
//! 1. **`sender`**: the engine into `io::sink()`.
//! 2. **`loopback`**: the engine into a TCP socket on 127.0.0.1 (1 MiB
//!    `BufWriter`, `TCP_NODELAY`, 1 MiB `SO_SNDBUF`, as
//!    `freehint-migrate send`), a [`Receiver`] on another thread writing a
//!    fresh [`RamFile`] on the same tmpfs (1 MiB `BufReader` and
//!    `SO_RCVBUF`, as `receive`). Timed from connect to
//!    the receiver's end; the split: the sender's time blocked in socket
//!    writes and the receiver's time in the RAM file (`pwrite`).
//!
//! Each mode runs without hints (the freed pages are read and sent) and
//! with a hint set marking the freed pages free, handed over whole at the
//! start of the epoch (a finished hint round; the device's round itself
//! is not timed here). Per case: seconds, GB/s of RAM covered (RAM bytes /
//! s) and MB/s of stream (bytes written / s); the time the hole scan
//! (`lseek` `SEEK_DATA`/`SEEK_HOLE`) took is kept too. Each figure is the
//! median of `--runs` runs (default 5); min is kept too.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use freehint_migrate::qemu::control::STREAM_SOCKET_BUFFER;
use freehint_migrate::qemu::map_ram;
use freehint_migrate::{
    set_socket_buffer, Engine, FileHoles, HintSource, HoleMap, HookError, PageBitmap, PageBits,
    PagePlace, PageSink, RamFile, RamLayout, RamRange, Receiver, SharedLog, SocketBuffer,
    PAGE_SIZE,
};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use vm_memory::GuestAddress;

const GIB: u64 = 1 << 30;
/// Guest RAM: 3 GiB at 0, 1 GiB at 4 GiB.
const RAM_GIB: [(u64, u64); 2] = [(0, 3), (4, 1)];
/// Share of pages in use, and of pages used then freed (hinted).
const USED: f64 = 0.08;
const FREED: f64 = 0.08;
/// Cluster length in pages: 1 to 3 MiB.
const CLUSTER_PAGES: std::ops::Range<usize> = 256..768;

/// The source RAM file and what it holds.
struct Source {
    dir: tempfile::TempDir,
    path: PathBuf,
    layout: RamLayout,
    freed: PageBitmap,
    data_pages: usize,
}

fn layout() -> RamLayout {
    let mut offset = 0;
    let ranges = RAM_GIB
        .iter()
        .map(|&(at, gib)| {
            let range = RamRange {
                gpa: GuestAddress(at * GIB),
                pages: gib * GIB / PAGE_SIZE as u64,
                file_offset: offset,
            };
            offset += gib * GIB;
            range
        })
        .collect();
    RamLayout::new(ranges).expect("layout")
}

/// Marks random clusters outside `taken` until `share` of the pages are.
fn clusters(rng: &mut SmallRng, taken: &PageBits, share: f64) -> PageBitmap {
    let pages = taken.len();
    let mut set = PageBitmap::repeat(false, pages);
    let goal = (pages as f64 * share) as usize;
    let mut count = 0;
    while count < goal {
        let len = rng.random_range(CLUSTER_PAGES);
        let start = rng.random_range(0..pages - len);
        for page in start..start + len {
            if !taken[page] && !set[page] {
                set.set(page, true);
                count += 1;
            }
        }
    }
    set
}

/// Writes random bytes into every page of `set` (page index = file page).
fn write_pages(file: &File, set: &PageBits, rng: &mut SmallRng) {
    let mut buf = vec![0u8; 64 * PAGE_SIZE];
    let mut page = 0;
    while let Some(offset) = set[page..].first_one() {
        let start = page + offset;
        let len = set[start..]
            .first_zero()
            .unwrap_or(set.len() - start)
            .min(64);
        let bytes = &mut buf[..len * PAGE_SIZE];
        rng.fill(bytes);
        file.write_all_at(bytes, (start * PAGE_SIZE) as u64)
            .expect("write the RAM file");
        page = start + len;
    }
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("freehint-stream").clone();
    match shm.is_dir() {
        true => builder.tempdir_in(shm),
        false => builder.tempdir(),
    }
    .expect("a scratch directory")
}

fn source() -> Source {
    let dir = scratch_dir();
    let path = dir.path().join("source-ram");
    let layout = layout();
    let file = File::create(&path).expect("create the RAM file");
    file.set_len(layout.file_size()).expect("size the RAM file");
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let none = PageBitmap::repeat(false, layout.total_pages() as usize);
    let used = clusters(&mut rng, &none, USED);
    let freed = clusters(&mut rng, &used, FREED);
    write_pages(&file, &used, &mut rng);
    write_pages(&file, &freed, &mut rng);
    let data_pages = used.count_ones() + freed.count_ones();
    Source {
        dir,
        path,
        layout,
        freed,
        data_pages,
    }
}

/// A hint set given whole, once per epoch (a hint round that finished).
struct FixedHints<'a> {
    free: Option<&'a PageBits>,
    given: bool,
}

impl HintSource for FixedHints<'_> {
    fn on_sync(&mut self, _epoch: u64) {
        self.given = false;
    }

    fn mark_free(&mut self, free: &mut PageBits) -> Result<(), HookError> {
        if let (Some(set), false) = (self.free, self.given) {
            *free |= set;
            self.given = true;
        }
        Ok(())
    }
}

/// Adds the time spent in `inner` to `time`.
struct Timed<T> {
    inner: T,
    time: Duration,
}

impl<T> Timed<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            time: Duration::ZERO,
        }
    }

    fn time<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        let t = Instant::now();
        let r = f(&mut self.inner);
        self.time += t.elapsed();
        r
    }
}

impl<W: Write> Write for Timed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.time(|w| w.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.time(|w| w.flush())
    }
}

impl<S: PageSink> PageSink for Timed<S> {
    fn write_pages(&mut self, at: PagePlace, data: &[u8]) -> io::Result<()> {
        self.time(|s| s.write_pages(at, data))
    }

    fn zero_pages(&mut self, at: PagePlace, count: u64) -> io::Result<()> {
        self.time(|s| s.zero_pages(at, count))
    }
}

/// [`FileHoles`], timed.
#[derive(Debug)]
struct TimedHoles {
    holes: FileHoles,
    time: std::sync::Mutex<Duration>,
}

impl HoleMap for TimedHoles {
    fn mark_holes(&self, layout: &RamLayout, holes: &mut PageBits) -> Result<(), HookError> {
        let t = Instant::now();
        let r = self.holes.mark_holes(layout, holes);
        *self.time.lock().expect("timer") += t.elapsed();
        r
    }
}

/// One migration's figures.
#[derive(Clone, Copy, Default)]
struct Run {
    total: Duration,
    holes: Duration,
    /// Loopback only: the sender blocked in socket writes, the receiver in
    /// its RAM file.
    socket_write: Duration,
    ram_file: Duration,
    bytes: u64,
    pages_sent: u64,
    hinted: u64,
    hole_pages: u64,
}

/// Migrates the source into `out` (one bulk pass, an empty final pass).
fn migrate<W: Write>(src: &Source, hints: bool, out: W) -> Run {
    let mem = map_ram(&src.path, &src.layout).expect("map the RAM file");
    let holes = TimedHoles {
        holes: FileHoles::open(&src.path).expect("open the RAM file"),
        time: Default::default(),
    };
    let engine = Engine::new(&mem).expect("engine").with_holes(&holes);
    let log = SharedLog::new(src.layout.total_pages() as usize);
    let hints = FixedHints {
        free: hints.then_some(&src.freed[..]),
        given: false,
    };
    let pause = || -> Result<(), HookError> { Ok(()) };
    let t = Instant::now();
    let report = engine
        .run(out, log, hints, pause, |_: &_| {})
        .expect("migrate");
    let total = t.elapsed();
    let holes = *holes.time.lock().expect("timer");
    Run {
        total,
        holes,
        bytes: report.bytes,
        pages_sent: report.pages_sent,
        hinted: report.hinted_pages,
        hole_pages: report.hole_pages,
        ..Run::default()
    }
}

fn sender_only(src: &Source, hints: bool) -> Run {
    migrate(src, hints, io::sink())
}

/// Receives one stream from `listener` into a new RAM file at `path`;
/// returns the time spent in the RAM file.
fn receive(listener: &TcpListener, path: &Path) -> Duration {
    let (stream, _) = listener.accept().expect("accept");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let receiver = Receiver::new(BufReader::with_capacity(1 << 20, stream)).expect("header");
    let file = RamFile::create(path, receiver.layout()).expect("the destination RAM file");
    let mut sink = Timed::new(file);
    receiver.receive(&mut sink).expect("receive");
    sink.time
}

fn loopback(src: &Source, hints: bool) -> Run {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    set_socket_buffer(&listener, SocketBuffer::Receive, STREAM_SOCKET_BUFFER).expect("SO_RCVBUF");
    let addr = listener.local_addr().expect("address");
    let dest = src.dir.path().join("destination-ram");
    let t = Instant::now();
    let (mut run, ram_file, socket_write) = thread::scope(|s| {
        let receiver = s.spawn(|| receive(&listener, &dest));
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        set_socket_buffer(&stream, SocketBuffer::Send, STREAM_SOCKET_BUFFER).expect("SO_SNDBUF");
        let mut out = BufWriter::with_capacity(1 << 20, Timed::new(stream));
        let run = migrate(src, hints, &mut out);
        let socket_write = out.get_ref().time;
        (run, receiver.join().expect("receiver"), socket_write)
    });
    run.total = t.elapsed();
    run.ram_file = ram_file;
    run.socket_write = socket_write;
    std::fs::remove_file(&dest).expect("remove the destination RAM file");
    run
}

fn median(runs: &[Run], f: impl Fn(&Run) -> Duration) -> (f64, f64) {
    let mut v: Vec<f64> = runs.iter().map(|r| f(r).as_secs_f64()).collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}

/// The figures of one case as JSON, and a line of the table.
fn case(mode: &str, hints: bool, ram_bytes: u64, runs: &[Run]) -> Value {
    let r = runs[0];
    let (secs, min) = median(runs, |r| r.total);
    let mb = r.bytes as f64 / 1e6;
    let (holes, _) = median(runs, |r| r.holes);
    let (socket, _) = median(runs, |r| r.socket_write);
    let (ram_file, _) = median(runs, |r| r.ram_file);
    let gbps = ram_bytes as f64 / 1e9 / secs;
    eprintln!(
        "{mode:<8} {:<8} {:>5.1} {:>8.1} {:>7.3} {:>7.3} {:>7.2} {:>7.0} {:>7.3} {:>7.3} {:>7.3}",
        if hints { "hints" } else { "none" },
        ram_bytes as f64 / GIB as f64,
        mb,
        secs,
        min,
        gbps,
        mb / secs,
        holes,
        socket,
        ram_file
    );
    json!({
        "mode": mode, "hints": hints, "ram_gib": ram_bytes / GIB,
        "pages_sent": r.pages_sent, "hinted_pages": r.hinted, "hole_pages": r.hole_pages,
        "stream_mb": mb, "median_s": secs, "min_s": min,
        "ram_gb_per_s": gbps, "stream_mb_per_s": mb / secs,
        "holes_median_s": holes, "socket_write_median_s": socket,
        "ram_file_median_s": ram_file,
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
}

fn out_path(args: &[String]) -> PathBuf {
    if let Some(p) = arg(args, "--out") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("bench/stream.json")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--runs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    let t = Instant::now();
    let src = source();
    let ram_bytes = src.layout.ram_bytes();
    eprintln!(
        "source: {} GiB, {} data pages ({:.1} MB), {} of them freed; set up in {:.1} s",
        ram_bytes / GIB,
        src.data_pages,
        (src.data_pages * PAGE_SIZE) as f64 / 1e6,
        src.freed.count_ones(),
        t.elapsed().as_secs_f64()
    );
    eprintln!(
        "{:<8} {:<8} {:>5} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "mode", "hints", "GiB", "MB sent", "s", "min s", "GB/s", "MB/s", "holes", "sock w", "ram f"
    );
    let mut cases = Vec::new();
    type Mode = fn(&Source, bool) -> Run;
    for (mode, f) in [("sender", sender_only as Mode), ("loopback", loopback)] {
        for hints in [false, true] {
            let results: Vec<Run> = (0..runs).map(|_| f(&src, hints)).collect();
            cases.push(case(mode, hints, ram_bytes, &results));
        }
    }
    let report = json!({
        "bench": "freehint-migrate stream",
        "machine": {
            "cpu": cpu_model(),
            "cpus": thread::available_parallelism().map_or(0, |n| n.get()),
        },
        "runs": runs,
        "ram_gib": ram_bytes / GIB,
        "scratch": src.dir.path().parent().map(|p| p.display().to_string()),
        "data_pages": src.data_pages,
        "freed_pages": src.freed.count_ones(),
        "cases": cases,
    });
    let path = out_path(&args);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the output directory");
    }
    std::fs::write(&path, format!("{report}\n")).expect("write the JSON result");
    eprintln!(
        "wrote {} in {:.1} s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
}
