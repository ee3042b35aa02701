//! `qemu-migrate` (CI) and `bench-migrate` (benchmark): live migration of a
//! TCG guest between two QEMUs on 127.0.0.1, matrix workload {idle,
//! dirty-keep, dirty-free} × driver {none, stock `virtio_balloon`, freehint}
//! × `init_on_alloc` {1, 0}. CI: 4 GiB, one run per cell. Benchmark: 4 and
//! 8 GiB, `FREEHINT_BENCH_REPS` (default 3) runs per cell, medians, JSON in
//! `target/bench/migrate.json`.
//!
//! Every cell prints one JSON line (bytes, total ms, downtime, integrity
//! verdict of the destination guest); the summary carries the ratios that
//! docs/benchmarks.md holds to their targets (`null` for a column left out
//! by `FREEHINT_MIGRATE_DRIVERS`).
//!
//! One bad cell never ends the matrix: a harness error (timeout, a QEMU that
//! would not start) is a failed line with `error`, and the next cell runs. A
//! stock-driver cell (the reference peer) that fails without damaged pages is
//! run once more; the first attempt is printed with `"reference_flake":true`,
//! not counted, and the summary says how many (`reference_flakes`).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{bench_reps, write_bench, BenchDoc};
use crate::migrate::{
    cell_json, median, qemu_version, run_cell, Cell, CellOutcome, Driver, Workload,
};
use crate::runner::{emit, fields, Ctx, HarnessError};
use crate::vm::VmError;

/// All drivers, in column order.
pub const DRIVERS: [Driver; 3] = [Driver::None, Driver::Stock, Driver::Freehint];
/// All workloads, in row order.
pub const WORKLOADS: [Workload; 3] = [Workload::Idle, Workload::DirtyKeep, Workload::DirtyFree];

/// Key of a cell in the result table: (mem MiB, driver, workload, init_on_alloc).
pub type Key = (u64, &'static str, &'static str, bool);

/// Measured figures per cell (one entry per run).
#[derive(Debug, Default)]
pub struct Table {
    /// Bytes sent per run.
    pub bytes: BTreeMap<Key, Vec<f64>>,
    /// Total ms per run.
    pub total_ms: BTreeMap<Key, Vec<f64>>,
    /// Downtime ms per run.
    pub downtime_ms: BTreeMap<Key, Vec<f64>>,
    /// Guest used MiB (`MemTotal - MemFree`) at ready time per run.
    pub used_mib: BTreeMap<Key, Vec<f64>>,
    /// Guest RAM not free (VM RAM size - `MemFree`: also counts the memory
    /// the kernel reserved, e.g. `struct page`s) at ready time per run.
    pub nonfree_mib: BTreeMap<Key, Vec<f64>>,
    /// Runs that failed for any reason (verdict, migration, splat, hang).
    pub failures: usize,
    /// Destination verdicts that found damaged pages (or none came back).
    pub integrity_failures: usize,
    /// Runs done (counted attempts).
    pub runs: usize,
    /// Labels of the stock-driver attempts set aside as reference flakes
    /// (failed without damaged pages, run once more, not counted).
    pub reference_flakes: Vec<String>,
}

impl Table {
    /// Counts one attempt of `cell` that ended with `end`.
    fn add(&mut self, cell: &Cell, out: &CellOutcome, end: AttemptEnd) {
        self.runs += 1;
        self.integrity_failures +=
            out.integrity_failures() + usize::from(out.integrity.len() < out.migrations.len());
        if end != AttemptEnd::Passed {
            self.failures += 1;
            return;
        }
        let k: Key = (
            cell.mem_mib,
            cell.driver.name(),
            cell.workload.name(),
            cell.init_on_alloc,
        );
        if let Some(s) = out.migrations.first() {
            self.bytes.entry(k).or_default().push(s.transferred as f64);
            self.total_ms.entry(k).or_default().push(s.total_ms as f64);
            self.downtime_ms
                .entry(k)
                .or_default()
                .push(s.downtime_ms as f64);
        }
        if let Some(u) = out.ready.get("used_mib").and_then(Value::as_f64) {
            self.used_mib.entry(k).or_default().push(u);
        }
        if let Some(f) = out.ready.get("mem_free_mib").and_then(Value::as_f64) {
            self.nonfree_mib
                .entry(k)
                .or_default()
                .push(cell.mem_mib as f64 - f);
        }
    }

    fn med(m: &BTreeMap<Key, Vec<f64>>, k: &Key) -> Option<f64> {
        m.get(k).and_then(|v| median(v))
    }

    /// Median bytes of a cell.
    pub fn bytes_med(&self, k: &Key) -> Option<f64> {
        Self::med(&self.bytes, k)
    }

    /// Median total ms of a cell.
    pub fn total_med(&self, k: &Key) -> Option<f64> {
        Self::med(&self.total_ms, k)
    }

    /// Median downtime of a cell.
    pub fn downtime_med(&self, k: &Key) -> Option<f64> {
        Self::med(&self.downtime_ms, k)
    }

    /// Median used MiB of a cell.
    pub fn used_med(&self, k: &Key) -> Option<f64> {
        Self::med(&self.used_mib, k)
    }

    /// Median non-free MiB of a cell.
    pub fn nonfree_med(&self, k: &Key) -> Option<f64> {
        Self::med(&self.nonfree_mib, k)
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 1000.0).round() / 1000.0),
        _ => None,
    }
}

/// Whether `FREEHINT_MIGRATE_ONLY` (comma-separated substrings of cell
/// labels such as `stock/dirty-free/ioa1`) selects the cell; unset: all.
fn selected(label: &str) -> bool {
    match std::env::var("FREEHINT_MIGRATE_ONLY") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|p| label.contains(p.trim())),
        _ => true,
    }
}

/// How one attempt of a cell ended, as far as the retry decision goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Migrated, every destination verdict clean, clean power-off.
    Passed,
    /// A destination verdict failed (pages damaged, or a malformed verdict):
    /// never retried, whatever the driver.
    Damaged,
    /// Failed with no verdict showing damage: a hang, a timeout, a failed
    /// migration, a guest that died or splatted, a harness error.
    Broken,
}

impl AttemptEnd {
    /// Classifies what [`run_cell`] returned.
    pub fn of(res: &Result<CellOutcome, VmError>) -> AttemptEnd {
        match res {
            Err(_) => AttemptEnd::Broken,
            Ok(out) if out.integrity_failures() > 0 || out.corrupt_pages() > 0 => {
                AttemptEnd::Damaged
            }
            Ok(out)
                if out.ok()
                    && !out.migrations.is_empty()
                    && out.integrity.len() >= out.migrations.len() =>
            {
                AttemptEnd::Passed
            }
            Ok(_) => AttemptEnd::Broken,
        }
    }
}

/// Whether attempt `attempt` (0 = first) of a `driver` cell that ended with
/// `end` is set aside as a reference flake and the cell run again. Only the
/// stock `virtio_balloon` column (the reference peer, not our code; its
/// destination hung once in ~40 `init_on_alloc=1` migrations here) gets one
/// retry, and only when nothing showed damaged pages. A freehint or none
/// cell, and any integrity failure, always counts.
pub fn retry_as_reference_flake(driver: Driver, end: AttemptEnd, attempt: usize) -> bool {
    driver == Driver::Stock && end == AttemptEnd::Broken && attempt == 0
}

/// Runs `cell` until it counts: once, or twice when the first attempt is a
/// [`retry_as_reference_flake`]. A harness error becomes a failed result
/// line (with `error`) instead of ending the matrix. The set-aside attempt
/// is printed with `"reference_flake":true` but not counted.
fn run_counted(ctx: &mut Ctx, t: &mut Table, cell: &Cell, rep: usize) {
    let mut attempt = 0;
    loop {
        let res = run_cell(
            &ctx.manifest,
            &ctx.log_dir,
            cell,
            ctx.timeout_scale,
            &mut |l| eprintln!("[migrate]   {l}"),
        );
        let end = AttemptEnd::of(&res);
        let (out, error) = match res {
            Ok(out) => (out, None),
            Err(e) => {
                let out = CellOutcome::harness_error(&e);
                let msg = out.problems.join("; ");
                eprintln!("[migrate] {}: {msg}", cell.label());
                (out, Some(msg))
            }
        };
        let mut line = cell_json(cell, &out, 0);
        line.rep = Some(rep + 1);
        line.attempt = (attempt > 0).then_some(attempt + 1);
        line.error = error;
        line.free_page_vq = out.hint_vq.first().cloned();
        if retry_as_reference_flake(cell.driver, end, attempt) {
            eprintln!(
                "[migrate] {}: reference driver failed without damaged pages \
                 ({}); running the cell once more",
                cell.label(),
                out.problems.join("; ")
            );
            line.reference_flake = Some(true);
            line.note = Some(
                "stock virtio_balloon (reference peer) failed with no damaged page; \
                 not counted, the cell is run once more",
            );
            emit(&line);
            t.reference_flakes.push(cell.label());
            attempt += 1;
            continue;
        }
        ctx.record(line);
        t.add(cell, &out, end);
        return;
    }
}

/// Runs the cells for `sizes` × `reps`, records every line, fills a table.
/// No cell ends the matrix: a harness error is a failed line, and the next
/// cell runs. The guests boot the `--flavour` kernel if one was given.
pub fn run_matrix(ctx: &mut Ctx, sizes: &[u64], reps: usize, ioas: &[bool]) -> Table {
    let mut t = Table::default();
    for d in DRIVERS {
        if !d.enabled() {
            let note = "pending: left out by FREEHINT_MIGRATE_DRIVERS (not measured)";
            eprintln!("[migrate] driver {}: {note}", d.name());
            emit(&Pending {
                name: format!("migrate/{}", d.name()),
                ok: None,
                pending: true,
                note,
            });
        }
    }
    for rep in 0..reps {
        for &mem in sizes {
            for &ioa in ioas {
                for w in WORKLOADS {
                    for d in DRIVERS.into_iter().filter(|d| d.enabled()) {
                        let mut cell = Cell::new(mem, d, w);
                        cell.init_on_alloc = ioa;
                        if let Some(f) = &ctx.flavour_override {
                            cell.flavour = f.clone();
                        }
                        if !selected(&cell.label()) {
                            continue;
                        }
                        eprintln!("[migrate] run {}/{reps}: {}", rep + 1, cell.label());
                        run_counted(ctx, &mut t, &cell, rep);
                    }
                }
            }
        }
    }
    t
}

/// The line of a driver left out by `FREEHINT_MIGRATE_DRIVERS`.
#[derive(Serialize)]
pub(crate) struct Pending {
    /// Result name.
    pub(crate) name: String,
    /// Neither passed nor failed: `null`.
    pub(crate) ok: Option<bool>,
    /// Always true.
    pub(crate) pending: bool,
    /// Why.
    pub(crate) note: &'static str,
}

/// The summary of a migration matrix ([`summary`]).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// freehint.ko's bytes over the stock driver's, 4 GiB dirty-free guest.
    pub bytes_freehint_over_stock: Option<f64>,
    /// freehint.ko's bytes over the guest's used memory.
    pub bytes_freehint_over_used: Option<f64>,
    /// freehint.ko's bytes over the guest's non-free memory.
    pub bytes_freehint_over_nonfree: Option<f64>,
    /// Worst total time with freehint.ko over without hints.
    pub time_hints_over_nohints_max: Option<f64>,
    /// Verdicts that failed.
    pub integrity_failures: usize,
    /// Runs that failed.
    pub failed_runs: usize,
    /// Reference-driver flakes run again.
    pub reference_flakes: usize,
    /// The cells that flaked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_flake_cells: Option<Vec<String>>,
    /// The stock driver's bytes over no driver's.
    pub bytes_stock_over_nohints: Option<f64>,
    /// The stock driver's bytes over the guest's used memory.
    pub bytes_stock_over_used: Option<f64>,
    /// The stock driver's bytes over the guest's non-free memory.
    pub bytes_stock_over_nonfree: Option<f64>,
    /// Worst total time with the stock driver over without hints.
    pub time_stock_over_nohints_max: Option<f64>,
    /// `measured`, or `pending` when freehint.ko was left out.
    pub freehint: &'static str,
    /// Runs.
    pub runs: usize,
    /// `qemu --version`.
    pub qemu: String,
    /// No run failed.
    pub ok: bool,
}

/// A benchmark file's row: one cell's medians and runs.
#[derive(Serialize)]
pub struct Row<'a> {
    mem_mib: u64,
    driver: &'static str,
    workload: &'static str,
    init_on_alloc: u8,
    runs: usize,
    bytes_median: Option<f64>,
    mb_sent_median: Option<f64>,
    total_ms_median: Option<f64>,
    downtime_ms_median: Option<f64>,
    guest_used_mib_median: Option<f64>,
    guest_nonfree_mib_median: Option<f64>,
    bytes: Option<&'a Vec<f64>>,
    total_ms: Option<&'a Vec<f64>>,
}

/// The summary fields, the ratios docs/benchmarks.md holds to targets, from
/// a table (4 GiB, `init_on_alloc=1` for the byte ratios; the worst workload
/// and both `init_on_alloc` for time).
pub fn summary(ctx: &Ctx, t: &Table, sizes: &[u64], ioas: &[bool]) -> Summary {
    let df = |d: &'static str| -> Key { (4096, d, "dirty-free", true) };
    let used_bytes = |k: &Key| t.used_med(k).map(|u| u * 1048576.0);
    let nonfree_bytes = |k: &Key| t.nonfree_med(k).map(|u| u * 1048576.0);
    let time_max = |d: &'static str| -> Option<f64> {
        let mut worst: Option<f64> = None;
        for &mem in sizes {
            for &ioa in ioas {
                for w in WORKLOADS {
                    let h = t.total_med(&(mem, d, w.name(), ioa));
                    let n = t.total_med(&(mem, "none", w.name(), ioa));
                    if let (Some(h), Some(n)) = (h, n) {
                        if n > 0.0 {
                            worst = Some(worst.map_or(h / n, |x: f64| x.max(h / n)));
                        }
                    }
                }
            }
        }
        worst.map(|x| (x * 1000.0).round() / 1000.0)
    };
    let free = t.bytes_med(&df("freehint"));
    let stock = t.bytes_med(&df("stock"));
    Summary {
        bytes_freehint_over_stock: ratio(free, stock),
        bytes_freehint_over_used: ratio(free, used_bytes(&df("freehint"))),
        bytes_freehint_over_nonfree: ratio(free, nonfree_bytes(&df("freehint"))),
        time_hints_over_nohints_max: time_max("freehint"),
        integrity_failures: t.integrity_failures,
        failed_runs: t.failures,
        reference_flakes: t.reference_flakes.len(),
        reference_flake_cells: (!t.reference_flakes.is_empty()).then(|| t.reference_flakes.clone()),
        bytes_stock_over_nohints: ratio(stock, t.bytes_med(&df("none"))),
        bytes_stock_over_used: ratio(stock, used_bytes(&df("stock"))),
        bytes_stock_over_nonfree: ratio(stock, nonfree_bytes(&df("stock"))),
        time_stock_over_nohints_max: time_max("stock"),
        freehint: if Driver::Freehint.enabled() {
            "measured"
        } else {
            "pending"
        },
        runs: t.runs,
        qemu: qemu_version(&ctx.manifest),
        ok: t.failures == 0 && t.runs > 0,
    }
}

/// The per-cell medians as rows (for the benchmark file).
pub fn rows(t: &Table) -> Vec<Row<'_>> {
    t.bytes
        .keys()
        .map(|k| Row {
            mem_mib: k.0,
            driver: k.1,
            workload: k.2,
            init_on_alloc: u8::from(k.3),
            runs: t.bytes.get(k).map_or(0, Vec::len),
            bytes_median: t.bytes_med(k),
            mb_sent_median: t.bytes_med(k).map(|b| (b / 1e5).round() / 10.0),
            total_ms_median: t.total_med(k),
            downtime_ms_median: t.downtime_med(k),
            guest_used_mib_median: t.used_med(k),
            guest_nonfree_mib_median: t.nonfree_med(k),
            bytes: t.bytes.get(k),
            total_ms: t.total_ms.get(k),
        })
        .collect()
}

/// CI: 4 GiB, one run per cell.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let sizes = [4096];
    let ioas = [true, false];
    let t = run_matrix(ctx, &sizes, 1, &ioas);
    Ok(fields(&summary(ctx, &t, &sizes, &ioas)))
}

/// Benchmark: 4 and 8 GiB (`FREEHINT_BENCH_SIZES`, MiB, comma-separated),
/// `FREEHINT_BENCH_REPS` (default 3) runs per cell, written to
/// `target/bench/migrate.json`.
pub fn bench(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let reps = bench_reps(3);
    let sizes: Vec<u64> = std::env::var("FREEHINT_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| vec![4096, 8192]);
    let ioas = [true, false];
    let t = run_matrix(ctx, &sizes, reps, &ioas);
    let s = summary(ctx, &t, &sizes, &ioas);
    let doc = BenchDoc {
        benchmark: "migrate",
        command: "tests/vm/run bench-migrate",
        reps,
        sizes_mib: Some(sizes),
        drivers_measured: Some(
            DRIVERS
                .iter()
                .filter(|d| d.enabled())
                .map(|d| d.name())
                .collect(),
        ),
        summary: &s,
        cells: rows(&t),
    };
    write_bench(ctx, "migrate.json", "migrate", &doc)?;
    Ok(fields(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::MigrationStats;
    use serde_json::json;

    fn verdict(ok: bool, corrupt: u64) -> Map<String, Value> {
        let v = json!({"name": "integrity", "ok": ok, "corrupt_pages": corrupt});
        v.as_object().cloned().unwrap_or_default()
    }

    fn migrated(verdicts: Vec<Map<String, Value>>, problems: &[&str]) -> CellOutcome {
        CellOutcome {
            migrations: vec![MigrationStats::from_query(
                &json!({"status": "completed"}),
                1000,
            )],
            integrity: verdicts,
            problems: problems.iter().map(|p| p.to_string()).collect(),
            ..CellOutcome::default()
        }
    }

    fn ends() -> Vec<(&'static str, Result<CellOutcome, VmError>, AttemptEnd)> {
        vec![
            (
                "clean",
                Ok(migrated(vec![verdict(true, 0)], &[])),
                AttemptEnd::Passed,
            ),
            (
                "pages damaged",
                Ok(migrated(vec![verdict(false, 12)], &[])),
                AttemptEnd::Damaged,
            ),
            (
                "malformed verdict",
                Ok(migrated(vec![verdict(false, 0)], &[])),
                AttemptEnd::Damaged,
            ),
            (
                "damage and a hang after it",
                Ok(migrated(
                    vec![verdict(false, 3)],
                    &["dst: guest did not power off"],
                )),
                AttemptEnd::Damaged,
            ),
            (
                "destination hung before its verdict",
                Ok(migrated(
                    vec![],
                    &["destination 1 did not verify: timeout after 300s"],
                )),
                AttemptEnd::Broken,
            ),
            (
                "migration failed",
                Ok(CellOutcome {
                    problems: vec!["migration 1: migration failed: x".into()],
                    ..CellOutcome::default()
                }),
                AttemptEnd::Broken,
            ),
            (
                "guest died after a clean verdict",
                Ok(migrated(
                    vec![verdict(true, 0)],
                    &["1: 3 kernel splat line(s), first: BUG"],
                )),
                AttemptEnd::Broken,
            ),
            (
                "no problem but no migration",
                Ok(CellOutcome::default()),
                AttemptEnd::Broken,
            ),
            (
                "harness timeout",
                Err(VmError::Timeout {
                    what: "the guest's ready line".into(),
                    secs: 300,
                    log: "x.log".into(),
                }),
                AttemptEnd::Broken,
            ),
            (
                "QEMU exited",
                Err(VmError::Exited {
                    role: "dst".into(),
                    what: "serial socket".into(),
                    log: "x.log".into(),
                }),
                AttemptEnd::Broken,
            ),
        ]
    }

    #[test]
    fn attempts_are_classified() {
        for (what, res, want) in ends() {
            assert_eq!(AttemptEnd::of(&res), want, "{what}");
        }
    }

    #[test]
    fn only_a_first_broken_stock_attempt_is_retried() {
        for (what, res, end) in ends() {
            let got = AttemptEnd::of(&res);
            assert_eq!(got, end, "{what}");
            for d in DRIVERS {
                let first = retry_as_reference_flake(d, got, 0);
                assert_eq!(
                    first,
                    d == Driver::Stock && end == AttemptEnd::Broken,
                    "{what}, driver {}",
                    d.name()
                );
                assert!(
                    !retry_as_reference_flake(d, got, 1),
                    "{what}, driver {}: retried twice",
                    d.name()
                );
            }
        }
        // Spelled out: the cases the brief names.
        for (driver, end, retried) in [
            (Driver::Stock, AttemptEnd::Broken, true),
            (Driver::Stock, AttemptEnd::Damaged, false),
            (Driver::Freehint, AttemptEnd::Broken, false),
            (Driver::None, AttemptEnd::Broken, false),
            (Driver::Stock, AttemptEnd::Passed, false),
        ] {
            assert_eq!(
                retry_as_reference_flake(driver, end, 0),
                retried,
                "{} {end:?}",
                driver.name()
            );
        }
    }

    #[test]
    fn a_failed_attempt_is_counted_without_figures() {
        let cell = Cell::new(4096, Driver::Freehint, Workload::DirtyFree);
        let mut t = Table::default();
        let hung = migrated(vec![], &["destination 1 did not verify"]);
        t.add(&cell, &hung, AttemptEnd::of(&Ok(hung.clone())));
        assert_eq!((t.runs, t.failures, t.integrity_failures), (1, 1, 1));
        assert!(t.bytes.is_empty());
        let clean = migrated(vec![verdict(true, 0)], &[]);
        t.add(&cell, &clean, AttemptEnd::Passed);
        assert_eq!((t.runs, t.failures, t.integrity_failures), (2, 1, 1));
        let k: Key = (4096, "freehint", "dirty-free", true);
        assert_eq!(t.bytes.get(&k).map(Vec::len), Some(1));
    }
}
