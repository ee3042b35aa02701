//! The whole chain: `own-hint` (CI), `own-hint-pingpong` (CI) and
//! `bench-own-hint` (benchmark).
//!
//! The guest's balloon is our device model served by `freehint-vhost-user`
//! through QEMU's generic vhost-user front end; `freehint-migrate send
//! --device-control --unplug-device` asks it for free page hints, skips
//! the hinted pages in the bulk pass, then unplugs it while pre-copy goes
//! on (QEMU cannot migrate a vhost-user device's state);
//! `freehint-migrate receive --plug-balloon` plugs a fresh one into the
//! destination once it runs and hands it the target the source carried in
//! the stream. Every destination is checked twice: every live page of the
//! integrity workload at resume, and a working balloon afterwards (the
//! same driver bound, `actual` back at the target, a hint round answered
//! by freehint.ko; with no driver, the device enabled by the guest's PCI
//! core and not started).
//!
//! `own-hint`: a 4 GiB guest (`init_on_alloc=1`), idle and dirtied then
//! freed, drivers none / stock `virtio_balloon` / `freehint.ko` over our
//! device with our migrator, and the reference row: QEMU's migrator with
//! QEMU's `virtio-balloon-pci` (`free-page-hint=on`) and `freehint.ko`.
//! Summary: `bytes_ours_freehint_over_qemu_freehint` and
//! `bytes_ours_freehint_over_ours_none` on the dirtied-then-freed guest,
//! `bytes_freed_over_idle` for ours with `freehint.ko`, `downtime_ms_max`
//! of our cells, `integrity_failures`, `destination_balloon_ok`.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::own_migrate::{
    abort_check, build_tools, each_matrix_cell, env_list, hop_json, run_cell,
    sweep_stale_ram_files, HopSeries, Migrator, OwnVm, Row, Run, RunOpts,
};
use super::{num, BenchDoc};
use crate::migrate::{median, qemu_version, Cell, Driver, Workload};
use crate::runner::{fields, Ctx, HarnessError};

/// The balloon target set on the first source (4 KiB pages: 16 MiB).
pub const TARGET_PAGES: u64 = 4096;
/// Guest RAM of `own-hint` (MiB).
pub const MEM_MIB: u64 = 4096;
/// freehint.ko's bitmap protocol feature bit.
const BITMAP_FEATURE: u64 = 1 << 23;
/// Virtio device status: ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK.
const STATUS_LIVE: u64 = 15;

/// Sets the target on `vm`'s balloon and, with a driver, waits until the
/// guest gave that many pages.
pub(crate) fn inflate(vm: &OwnVm, driver: Driver, timeout: Duration) -> Result<(), String> {
    let server = vm.balloon.as_ref().ok_or("no balloon server")?;
    server
        .ctl(&format!("target {TARGET_PAGES}"))
        .map_err(|e| e.to_string())?;
    if driver == Driver::None {
        return Ok(());
    }
    let t0 = Instant::now();
    loop {
        let st = server.ctl("status").map_err(|e| e.to_string())?;
        if st.get("actual").and_then(Value::as_u64) == Some(TARGET_PAGES) {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "the source's balloon never reached its target: {st:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `vm`'s balloon works as it did on the first source: the target
/// carried over; with a driver, the same driver bound (bitmap protocol
/// for freehint.ko only) and `actual` at the target, and for freehint.ko a
/// hint round answered; without one, the device enabled by the guest's PCI core and
/// not started.
pub(crate) fn destination_balloon(
    vm: &mut OwnVm,
    driver: Driver,
    timeout: Duration,
) -> Map<String, Value> {
    let mut r = BalloonCheck::default();
    if let Err(e) = check(vm, driver, timeout, &mut r) {
        r.problems = Some(vec![e]);
    }
    r.ok = r.problems.is_none();
    fields(&r)
}

/// What [`destination_balloon`] found; a field is there once the check
/// got that far.
#[derive(Debug, Default, Serialize)]
struct BalloonCheck {
    /// The guest's console line that shows the device enabled (no driver).
    #[serde(skip_serializing_if = "Option::is_none")]
    seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settled_ms: Option<u64>,
    /// The server's `status` figures once settled.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actual: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtio_status: Option<Value>,
    /// Whether the bitmap protocol was negotiated.
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmap: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint_free_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint_round_ms: Option<Value>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<Vec<String>>,
}

fn check(
    vm: &mut OwnVm,
    driver: Driver,
    timeout: Duration,
    r: &mut BalloonCheck,
) -> Result<(), String> {
    let t0 = Instant::now();
    if driver == Driver::None {
        // No driver: the device never starts, so its server sees no
        // status; the guest's PCI core enabling it is the proof it came.
        let line = vm
            .vm
            .wait_line(0, "the guest to enable the plugged balloon", timeout, |l| {
                l.contains("virtio-pci") && l.contains("enabling device")
            })
            .map_err(|e| e.to_string())?
            .line;
        r.seen = Some(line.trim().to_string());
    }
    let server = vm.balloon.as_ref().ok_or("no balloon server")?;
    let settled = |st: &Map<String, Value>| {
        let status = st.get("virtio_status").and_then(Value::as_u64).unwrap_or(0);
        let actual = st.get("actual").and_then(Value::as_u64);
        match driver {
            // Not started: nothing bound.
            Driver::None => status == 0,
            _ => status == STATUS_LIVE && actual == Some(TARGET_PAGES),
        }
    };
    let st = loop {
        let st = server.ctl("status").map_err(|e| e.to_string())?;
        if settled(&st) {
            break st;
        }
        if t0.elapsed() > timeout {
            return Err(format!("balloon never settled: {st:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    r.settled_ms = Some(t0.elapsed().as_millis() as u64);
    let status = |k: &str| Some(st.get(k).cloned().unwrap_or(Value::Null));
    r.target = status("target");
    r.actual = status("actual");
    r.virtio_status = status("virtio_status");
    if st.get("target").and_then(Value::as_u64) != Some(TARGET_PAGES) {
        return Err(format!("target not carried over: {st:?}"));
    }
    if driver == Driver::None {
        return Ok(());
    }
    let acked = st
        .get("acked_features")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let bitmap = acked & BITMAP_FEATURE != 0;
    r.bitmap = Some(bitmap);
    if bitmap != (driver == Driver::Freehint) {
        return Err(format!(
            "another driver bound: bitmap protocol negotiated {bitmap} with {}",
            driver.name()
        ));
    }
    if driver == Driver::Stock {
        // Bound, and inflated to the target: the balloon works. A hint
        // round is not asked of it here: Linux's driver answers by
        // allocating (and, with init_on_alloc=1, zeroing) every free page,
        // which took 50-65 s on a 16 GiB TCG guest and tripped an RCU stall
        // warning there (its rounds through our device are tested by the
        // `vhost-user` scenario).
        return Ok(());
    }
    let round = server.ctl("hint-round 120000").map_err(|e| e.to_string())?;
    let free = round.get("free_pages").and_then(Value::as_u64).unwrap_or(0);
    r.hint_free_pages = Some(free);
    r.hint_round_ms = Some(round.get("ms").cloned().unwrap_or(Value::Null));
    if free == 0 {
        return Err("the hint round reported no free page".into());
    }
    Ok(())
}

/// One cell of `own-hint`: who migrates, which balloon, which driver.
#[derive(Clone, Copy, Debug)]
struct Setup {
    migrator: Migrator,
    driver: Driver,
}

impl Setup {
    /// Our migrator with our device, or QEMU's with QEMU's.
    fn name(self) -> String {
        match self.migrator {
            Migrator::Ours => format!("ours-{}", self.driver.name()),
            Migrator::Qemu => format!("qemu-{}", self.driver.name()),
        }
    }
}

const SETUPS: [Setup; 4] = [
    Setup {
        migrator: Migrator::Ours,
        driver: Driver::None,
    },
    Setup {
        migrator: Migrator::Ours,
        driver: Driver::Stock,
    },
    Setup {
        migrator: Migrator::Ours,
        driver: Driver::Freehint,
    },
    Setup {
        migrator: Migrator::Qemu,
        driver: Driver::Freehint,
    },
];

/// Medians per (setup, workload, MiB).
#[derive(Debug, Default)]
struct Table {
    cells: std::collections::BTreeMap<(String, &'static str, u64), Figures>,
    runs: usize,
    failed: usize,
    integrity_failures: usize,
    balloon_failures: usize,
}

#[derive(Debug, Default)]
struct Figures {
    hops: HopSeries,
    hint_round_ms: Vec<f64>,
    hinted_pages: Vec<f64>,
}

impl Table {
    fn add(&mut self, setup: Setup, cell: &Cell, run: &Run) {
        self.runs += 1;
        self.integrity_failures += run
            .integrity_failures()
            .max(usize::from(run.hops.is_empty()));
        let balloon_bad = run.hops.iter().any(|h| {
            h.detail
                .get("destination_balloon")
                .is_some_and(|b| b.get("ok") != Some(&json!(true)))
        });
        self.balloon_failures += usize::from(balloon_bad);
        if !run.ok() || run.hops.is_empty() {
            self.failed += 1;
            return;
        }
        let f = self
            .cells
            .entry((setup.name(), cell.workload.name(), cell.mem_mib))
            .or_default();
        let h = &run.hops[0];
        f.hops.push(h);
        let send = h.detail.get("send");
        if let Some(p) = send
            .and_then(|s| s.pointer("/ram/hinted_pages"))
            .and_then(Value::as_f64)
        {
            f.hinted_pages.push(p);
        }
        if let Some(ms) = h
            .detail
            .get("destination_balloon")
            .and_then(|b| b.get("hint_round_ms"))
            .and_then(Value::as_f64)
        {
            f.hint_round_ms.push(ms);
        }
    }

    fn med(
        &self,
        setup: &str,
        w: Workload,
        mem: u64,
        pick: fn(&Figures) -> &Vec<f64>,
    ) -> Option<f64> {
        self.cells
            .get(&(setup.to_string(), w.name(), mem))
            .and_then(|f| median(pick(f)))
    }

    fn ratio(
        &self,
        a: (&str, Workload),
        b: (&str, Workload),
        mem: u64,
        pick: fn(&Figures) -> &Vec<f64>,
    ) -> Option<f64> {
        let (x, y) = (
            self.med(a.0, a.1, mem, pick)?,
            self.med(b.0, b.1, mem, pick)?,
        );
        (y > 0.0).then(|| ((x / y) * 1000.0).round() / 1000.0)
    }

    fn summary(&self, ctx: &Ctx, mem: u64) -> MatrixSummary {
        let free = Workload::DirtyFree;
        let bytes: fn(&Figures) -> &Vec<f64> = |f| &f.hops.bytes;
        let time: fn(&Figures) -> &Vec<f64> = |f| &f.hops.total_ms;
        let downtime_max = self
            .cells
            .iter()
            .filter(|((s, _, m), _)| *m == mem && s.starts_with("ours"))
            .flat_map(|(_, f)| f.hops.downtime_ms.iter().copied())
            .reduce(f64::max);
        let round_per_gib = self
            .med("ours-freehint", free, mem, |f| &f.hint_round_ms)
            .map(|ms| num((ms / (mem as f64 / 1024.0) * 1000.0).round() / 1000.0));
        let ours_free = ("ours-freehint", free);
        MatrixSummary {
            integrity_failures: self.integrity_failures,
            bytes_ours_freehint_over_qemu_freehint: self
                .ratio(ours_free, ("qemu-freehint", free), mem, bytes)
                .map(num),
            bytes_ours_freehint_over_ours_none: self
                .ratio(ours_free, ("ours-none", free), mem, bytes)
                .map(num),
            bytes_freed_over_idle: self
                .ratio(ours_free, ("ours-freehint", Workload::Idle), mem, bytes)
                .map(num),
            time_ours_freehint_over_qemu_freehint: self
                .ratio(ours_free, ("qemu-freehint", free), mem, time)
                .map(num),
            downtime_ms_max: downtime_max.map(num),
            hint_round_ms_per_gib: round_per_gib,
            destination_balloon_ok: self.balloon_failures == 0 && self.runs > 0,
            runs: self.runs,
            failed_runs: self.failed,
            qemu: qemu_version(&ctx.manifest),
            ok: self.failed == 0
                && self.integrity_failures == 0
                && self.balloon_failures == 0
                && self.runs > 0,
        }
    }

    fn rows(&self) -> Vec<Row<'_, CellRow<'_>>> {
        self.cells
            .iter()
            .map(|((setup, w, mem), f)| {
                f.hops.row(CellRow {
                    setup,
                    workload: w,
                    mem_mib: *mem,
                    hinted_pages_median: median(&f.hinted_pages),
                    destination_hint_round_ms_median: median(&f.hint_round_ms),
                })
            })
            .collect()
    }
}

/// The summary fields of the matrix at one memory size.
#[derive(Serialize)]
struct MatrixSummary {
    integrity_failures: usize,
    /// Bytes of ours with freehint.ko over QEMU's with it, dirty-free guest.
    bytes_ours_freehint_over_qemu_freehint: Option<Value>,
    /// Bytes of ours with freehint.ko over ours without a driver.
    bytes_ours_freehint_over_ours_none: Option<Value>,
    /// Bytes of ours with freehint.ko, dirty-free over idle.
    bytes_freed_over_idle: Option<Value>,
    /// Total time of ours with freehint.ko over QEMU's with it.
    time_ours_freehint_over_qemu_freehint: Option<Value>,
    downtime_ms_max: Option<Value>,
    hint_round_ms_per_gib: Option<Value>,
    destination_balloon_ok: bool,
    runs: usize,
    failed_runs: usize,
    qemu: String,
    ok: bool,
}

/// What a benchmark row says of its cell (before the runs' figures).
#[derive(Serialize)]
struct CellRow<'a> {
    setup: &'a str,
    workload: &'a str,
    mem_mib: u64,
    hinted_pages_median: Option<f64>,
    destination_hint_round_ms_median: Option<f64>,
}

/// The cell of `setup` on `workload` at `mem` MiB.
fn cell(mem: u64, driver: Driver, workload: Workload) -> Cell {
    Cell::new(mem, driver, workload)
}

/// Runs every setup on `workloads` at each of `sizes`, `reps` times.
fn matrix(
    ctx: &mut Ctx,
    sizes: &[u64],
    workloads: &[Workload],
    reps: usize,
) -> Result<Table, HarnessError> {
    let mut t = Table::default();
    each_matrix_cell(ctx, sizes, workloads, reps, |ctx, tools, rep, mem, w| {
        for setup in SETUPS {
            if !setup.driver.enabled() {
                continue;
            }
            let c = cell(mem, setup.driver, w);
            eprintln!(
                "[own-hint] run {}/{reps}: {} {}",
                rep + 1,
                setup.name(),
                c.label()
            );
            let opts = RunOpts {
                balloon: setup.migrator == Migrator::Ours,
                ..RunOpts::default()
            };
            let r = run_cell(ctx, tools, &c, setup.migrator, opts);
            let name = format!("own-hint/{}/{}/{}g", setup.name(), w.name(), mem / 1024);
            let mut line = hop_json(&name, &c, setup.migrator, &r, 0);
            line.driver = Some(setup.driver.name());
            ctx.record(line.of_rep(rep, &r));
            t.add(setup, &c, &r);
        }
    })?;
    Ok(t)
}

/// CI: the 4 GiB matrix, one run per cell.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let t = matrix(ctx, &[MEM_MIB], &[Workload::Idle, Workload::DirtyFree], 1)?;
    Ok(fields(&t.summary(ctx, MEM_MIB)))
}

/// `migrations` hops of a 4 GiB guest with freehint.ko and our device,
/// then a migration refused at the last moment: the source must run on
/// with its balloon plugged back, bound and inflated.
fn pingpong(ctx: &mut Ctx, migrations: usize) -> Result<Map<String, Value>, HarnessError> {
    sweep_stale_ram_files();
    let tools = build_tools(&ctx.repo)?;
    let mut c = cell(MEM_MIB, Driver::Freehint, Workload::DirtyFree);
    c.migrations = migrations;
    c.churn_mib = 64;
    c.pace_us = 50;
    let opts = RunOpts {
        balloon: true,
        ..RunOpts::default()
    };
    eprintln!(
        "[own-hint] pingpong: {migrations} migrations, balloon unplugged and plugged each time"
    );
    let r = run_cell(ctx, &tools, &c, Migrator::Ours, opts);
    for i in 0..r.hops.len().max(1) {
        let mut line = hop_json(
            &format!("own-hint-pingpong/{}", i + 1),
            &c,
            Migrator::Ours,
            &r,
            i,
        );
        line.driver = Some("freehint");
        ctx.record(line);
    }
    let mut one = c.clone();
    one.migrations = 1;
    eprintln!("[own-hint] abort at resume: the balloon must come back to the source");
    let aborted = abort_check(ctx, &tools, &one, true, "own-hint-pingpong/abort-at-resume");
    let abort_ok = aborted.ok;
    ctx.record(aborted);
    let downtimes: Vec<f64> = r.hops.iter().filter_map(|h| h.downtime_ms).collect();
    let balloons_ok = r.hops.iter().all(|h| {
        h.detail
            .get("destination_balloon")
            .is_some_and(|b| b.get("ok") == Some(&json!(true)))
    });
    Ok(fields(&PingpongSummary {
        migrations: r.hops.len(),
        integrity_failures: r.integrity_failures(),
        destination_balloon_ok: balloons_ok && !r.hops.is_empty(),
        abort_replugs_source_balloon: abort_ok,
        downtime_ms_median: median(&downtimes).map(num),
        downtime_ms_max: downtimes.iter().copied().reduce(f64::max).map(num),
        qemu: qemu_version(&ctx.manifest),
        problems: (!r.problems.is_empty()).then_some(&r.problems),
        ok: r.ok() && r.hops.len() == migrations && balloons_ok && abort_ok,
    }))
}

/// The summary of `own-hint-pingpong`.
#[derive(Serialize)]
struct PingpongSummary<'a> {
    migrations: usize,
    integrity_failures: usize,
    destination_balloon_ok: bool,
    /// The refused migration plugged the balloon back into the source.
    abort_replugs_source_balloon: bool,
    downtime_ms_median: Option<Value>,
    downtime_ms_max: Option<Value>,
    qemu: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a Vec<String>>,
    ok: bool,
}

/// CI: 10 migrations.
pub fn run_pingpong(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 10)
}

/// Benchmark: 20 migrations.
pub fn bench_pingpong(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 20)
}

/// Benchmark: the matrix at 4 GiB and at `FREEHINT_BENCH_SIZES` (default
/// 16 and 32 GiB), `FREEHINT_BENCH_REPS` (default 3) runs per cell, to
/// `target/bench/own-hint.json`, with the targets evaluated.
pub fn bench(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let reps = env_list("FREEHINT_BENCH_REPS", &[3])[0].max(1) as usize;
    let sizes = env_list("FREEHINT_BENCH_SIZES", &[MEM_MIB, 16384, 32768]);
    let t = matrix(ctx, &sizes, &[Workload::Idle, Workload::DirtyFree], reps)?;
    let mut sizes_summary = std::collections::BTreeMap::new();
    for &mem in &sizes {
        let m = t.summary(ctx, mem);
        let meets = |v: &Option<Value>, target: f64| {
            v.as_ref().and_then(Value::as_f64).map(|v| v <= target)
        };
        let targets = Targets {
            bytes_ours_freehint_over_qemu_freehint_le_1: meets(
                &m.bytes_ours_freehint_over_qemu_freehint,
                1.0,
            ),
            bytes_freed_over_idle_le_1_05: meets(&m.bytes_freed_over_idle, 1.05),
            downtime_ms_max_le_50: meets(&m.downtime_ms_max, 50.0),
            time_ours_freehint_over_qemu_freehint_le_1: meets(
                &m.time_ours_freehint_over_qemu_freehint,
                1.0,
            ),
        };
        sizes_summary.insert(
            format!("{}g", mem / 1024),
            SizeSummary { matrix: m, targets },
        );
    }
    let s = BenchSummary {
        sizes: sizes_summary,
        ok: t.failed == 0 && t.integrity_failures == 0 && t.balloon_failures == 0,
    };
    let doc = BenchDoc {
        benchmark: "own-hint",
        command: "tests/vm/run bench-own-hint",
        reps,
        sizes_mib: None,
        drivers_measured: None,
        summary: &s,
        cells: t.rows(),
    };
    crate::scenarios::write_bench(ctx, "own-hint.json", "own-hint", &doc)?;
    Ok(fields(&s))
}

/// The summary of `bench-own-hint`: one entry per memory size (`<N>g`).
#[derive(Serialize)]
struct BenchSummary {
    #[serde(flatten)]
    sizes: std::collections::BTreeMap<String, SizeSummary>,
    ok: bool,
}

/// The matrix at one memory size and its targets.
#[derive(Serialize)]
struct SizeSummary {
    #[serde(flatten)]
    matrix: MatrixSummary,
    targets: Targets,
}

/// The benchmark's targets at one memory size (none without the figure).
#[derive(Serialize)]
struct Targets {
    bytes_ours_freehint_over_qemu_freehint_le_1: Option<bool>,
    bytes_freed_over_idle_le_1_05: Option<bool>,
    downtime_ms_max_le_50: Option<bool>,
    time_ours_freehint_over_qemu_freehint_le_1: Option<bool>,
}
