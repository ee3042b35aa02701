//! The benchmark matrix of `bench-own-migrate`: cells, the table of
//! figures and the slowdown runs.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::cell::{hop_json, run_cell, selected, Migrator, Run, RunOpts};
use super::program::Hop;
use super::tools::{build_tools, sweep_stale_ram_files, Tools};
use crate::migrate::{median, qemu_version, Cell, Driver, Workload};
use crate::runner::{fields, Ctx, HarnessError};
use crate::scenarios::{num, BenchDoc};

/// The workloads of the 4 GiB matrix.
pub const WORKLOADS: [Workload; 3] = [Workload::Idle, Workload::DirtyKeep, Workload::DirtyFree];

/// Figures per (mem, workload, migrator).
#[derive(Debug, Default)]
pub struct Table {
    rows: std::collections::BTreeMap<(u64, &'static str, &'static str), Figures>,
    /// Verdicts that failed.
    pub integrity_failures: usize,
    /// Runs that failed for any reason.
    pub failures: usize,
    /// Runs.
    pub runs: usize,
}

/// One cell's runs.
#[derive(Debug, Default)]
pub struct Figures {
    hops: HopSeries,
    rate_before: Vec<f64>,
    rate_during: Vec<f64>,
}

/// Bytes, total time and downtime of a cell's runs, the figures every
/// migration benchmark keeps.
#[derive(Debug, Default)]
pub struct HopSeries {
    /// Bytes sent, per run.
    pub bytes: Vec<f64>,
    /// Total time, ms, per run.
    pub total_ms: Vec<f64>,
    /// Downtime, ms, per run.
    pub downtime_ms: Vec<f64>,
}

impl HopSeries {
    /// Adds one run's hop.
    pub fn push(&mut self, hop: &Hop) {
        self.bytes.extend(hop.bytes);
        self.total_ms.extend(hop.total_ms);
        self.downtime_ms.extend(hop.downtime_ms);
    }

    /// A cell's row: the fields of `cell` (what the cell is, its own
    /// figures), then the runs, their medians and every value.
    pub fn row<C: Serialize>(&self, cell: C) -> Row<'_, C> {
        Row {
            cell,
            runs: self.bytes.len(),
            bytes_median: median(&self.bytes),
            total_ms_median: median(&self.total_ms),
            downtime_ms_median: median(&self.downtime_ms),
            bytes: &self.bytes,
            total_ms: &self.total_ms,
            downtime_ms: &self.downtime_ms,
        }
    }
}

/// A benchmark file's row of one cell ([`HopSeries::row`]).
#[derive(Debug, Serialize)]
pub struct Row<'a, C> {
    /// What the cell is, and its own figures.
    #[serde(flatten)]
    pub cell: C,
    /// How many runs.
    pub runs: usize,
    /// Median bytes sent.
    pub bytes_median: Option<f64>,
    /// Median total time, ms.
    pub total_ms_median: Option<f64>,
    /// Median downtime, ms.
    pub downtime_ms_median: Option<f64>,
    /// Bytes sent, per run.
    pub bytes: &'a [f64],
    /// Total time, ms, per run.
    pub total_ms: &'a [f64],
    /// Downtime, ms, per run.
    pub downtime_ms: &'a [f64],
}

pub(super) fn cell_for(mem: u64, w: Workload) -> Cell {
    Cell::new(mem, Driver::None, w)
}

/// Runs `each` on every memory size and workload of a benchmark matrix,
/// `reps` times over, with stale RAM files swept and the tools built first;
/// `each` gets the repetition (from 0), the size (MiB) and the workload.
pub fn each_matrix_cell(
    ctx: &mut Ctx,
    sizes: &[u64],
    workloads: &[Workload],
    reps: usize,
    mut each: impl FnMut(&mut Ctx, &Tools, usize, u64, Workload),
) -> Result<(), HarnessError> {
    sweep_stale_ram_files();
    let tools = build_tools(&ctx.repo)?;
    for rep in 0..reps {
        for &mem in sizes {
            for &w in workloads {
                each(ctx, &tools, rep, mem, w);
            }
        }
    }
    Ok(())
}

/// Runs `sizes` × `workloads` × both migrators, `reps` times.
pub fn matrix(
    ctx: &mut Ctx,
    sizes: &[u64],
    workloads: &[Workload],
    reps: usize,
) -> Result<Table, HarnessError> {
    let mut t = Table::default();
    each_matrix_cell(ctx, sizes, workloads, reps, |ctx, tools, rep, mem, w| {
        for m in [Migrator::Ours, Migrator::Qemu] {
            let cell = cell_for(mem, w);
            let id = format!("{}/{}/{}g", m.name(), w.name(), mem / 1024);
            if !selected(&id) {
                continue;
            }
            eprintln!(
                "[own] run {}/{reps}: {} {}",
                rep + 1,
                m.name(),
                cell.label()
            );
            let r = run_cell(ctx, tools, &cell, m, RunOpts::default());
            ctx.record(hop_json(&format!("own-migrate/{id}"), &cell, m, &r, 0).of_rep(rep, &r));
            t.add(mem, w, m, &r);
        }
    })?;
    Ok(t)
}

impl Table {
    fn add(&mut self, mem: u64, w: Workload, m: Migrator, r: &Run) {
        self.runs += 1;
        self.integrity_failures += r.integrity_failures().max(usize::from(r.hops.is_empty()));
        if !r.ok() || r.hops.is_empty() {
            self.failures += 1;
            return;
        }
        let f = self.rows.entry((mem, w.name(), m.name())).or_default();
        let h = &r.hops[0];
        f.hops.push(h);
        if let Some((b, d)) = h.ops_rate {
            f.rate_before.push(b);
            f.rate_during.push(d);
        }
    }

    fn med(&self, mem: u64, w: &str, m: &str, pick: fn(&Figures) -> &Vec<f64>) -> Option<f64> {
        self.rows.get(&(mem, w, m)).and_then(|f| median(pick(f)))
    }

    /// Largest ours/QEMU ratio of the medians over the workloads at `mem`.
    fn ratio_max(&self, mem: u64, pick: fn(&Figures) -> &Vec<f64>) -> Option<f64> {
        WORKLOADS
            .iter()
            .filter_map(|w| {
                Some(
                    self.med(mem, w.name(), "ours", pick)?
                        / self.med(mem, w.name(), "qemu", pick)?,
                )
            })
            .reduce(f64::max)
    }

    /// The summary fields at `mem`.
    pub fn summary(&self, ctx: &Ctx, mem: u64) -> Summary {
        let round = |v: Option<f64>| v.map(|x| num((x * 1000.0).round() / 1000.0));
        let downtime_max = self
            .rows
            .iter()
            .filter(|((m, _, g), _)| *m == mem && *g == "ours")
            .flat_map(|(_, f)| f.hops.downtime_ms.iter().copied())
            .reduce(f64::max);
        Summary {
            integrity_failures: self.integrity_failures,
            downtime_ms_max: round(downtime_max),
            bytes_ours_over_qemu_max: round(self.ratio_max(mem, |f| &f.hops.bytes)),
            time_ours_over_qemu_max: round(self.ratio_max(mem, |f| &f.hops.total_ms)),
            runs: self.runs,
            failed_runs: self.failures,
            qemu: qemu_version(&ctx.manifest),
            ok: self.failures == 0 && self.integrity_failures == 0 && self.runs > 0,
        }
    }

    /// Per-cell medians, for the benchmark file.
    pub fn rows(&self) -> Vec<Row<'_, CellRow>> {
        self.rows
            .iter()
            .map(|(&(mem_mib, workload, migrator), f)| {
                f.hops.row(CellRow {
                    mem_mib,
                    workload,
                    migrator,
                    guest_ops_per_s_before_median: median(&f.rate_before),
                    guest_ops_per_s_during_median: median(&f.rate_during),
                })
            })
            .collect()
    }
}

/// The summary of the matrix at one memory size.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Verdicts that failed.
    pub integrity_failures: usize,
    /// Largest downtime of ours, ms.
    pub downtime_ms_max: Option<Value>,
    /// Largest ours/QEMU ratio of the median bytes over the workloads.
    pub bytes_ours_over_qemu_max: Option<Value>,
    /// Largest ours/QEMU ratio of the median total time over the workloads.
    pub time_ours_over_qemu_max: Option<Value>,
    /// Runs.
    pub runs: usize,
    /// Runs that failed for any reason.
    pub failed_runs: usize,
    /// `qemu --version`.
    pub qemu: String,
    /// No run failed.
    pub ok: bool,
}

/// What a benchmark row says of its cell (before the runs' figures).
#[derive(Debug, Serialize)]
pub struct CellRow {
    /// Guest RAM.
    pub mem_mib: u64,
    /// The guest workload.
    pub workload: &'static str,
    /// `ours` or `qemu`.
    pub migrator: &'static str,
    /// Median guest churn rate before the migration.
    pub guest_ops_per_s_before_median: Option<f64>,
    /// Median guest churn rate during the migration.
    pub guest_ops_per_s_during_median: Option<f64>,
}

/// The numbers of the comma-separated variable `name`, or `default`.
pub(crate) fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// Benchmark: the 4 GiB matrix, 16 and 32 GiB (idle, dirty-free) and the
/// guest's slowdown, `FREEHINT_BENCH_REPS` (default 3) runs per cell, to
/// `target/bench/own-migrate.json`.
pub fn bench(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let reps = env_list("FREEHINT_BENCH_REPS", &[3])[0].max(1) as usize;
    let big = env_list("FREEHINT_BENCH_SIZES", &[16384, 32768]);
    let small = matrix(ctx, &[4096], &WORKLOADS, reps)?;
    let large = matrix(ctx, &big, &[Workload::Idle, Workload::DirtyFree], reps)?;
    let slow = slowdown(ctx, reps)?;
    let mut s = BenchSummary {
        at_4g: small.summary(ctx, 4096),
        large: Map::new(),
        slowdown: slow,
    };
    for &mem in &big {
        let l = large.summary(ctx, mem);
        for (k, v) in [
            ("bytes_ours_over_qemu_max", l.bytes_ours_over_qemu_max),
            ("time_ours_over_qemu_max", l.time_ours_over_qemu_max),
            ("downtime_ms_max", l.downtime_ms_max),
        ] {
            s.large
                .insert(format!("{k}_{}g", mem / 1024), v.unwrap_or(Value::Null));
        }
    }
    s.at_4g.ok = small.failures + large.failures == 0
        && small.integrity_failures + large.integrity_failures == 0;
    let doc = BenchDoc {
        benchmark: "own-migrate",
        command: "tests/vm/run bench-own-migrate",
        reps,
        sizes_mib: None,
        drivers_measured: None,
        summary: &s,
        cells: small.rows().into_iter().chain(large.rows()).collect(),
    };
    crate::scenarios::write_bench(ctx, "own-migrate.json", "own", &doc)?;
    Ok(fields(&s))
}

/// The summary of `bench-own-migrate`.
#[derive(Debug, Serialize)]
struct BenchSummary {
    /// The 4 GiB matrix (its `ok` covers every size).
    #[serde(flatten)]
    at_4g: Summary,
    /// The ratios and downtime at each larger size, `<figure>_<N>g`.
    #[serde(flatten)]
    large: Map<String, Value>,
    /// The guest's slowdown per migrator.
    slowdown: std::collections::BTreeMap<&'static str, Slowdown>,
}

/// The guest's churn rate before and during a migration, medians.
#[derive(Debug, Serialize)]
pub(super) struct Slowdown {
    guest_ops_per_s_before: Option<Value>,
    guest_ops_per_s_during: Option<Value>,
    /// 1 - during / before.
    slowdown: Option<Value>,
}

/// The guest's churn rate (64 MiB, no pause) before and during a
/// migration, per migrator.
pub(super) fn slowdown(
    ctx: &mut Ctx,
    reps: usize,
) -> Result<std::collections::BTreeMap<&'static str, Slowdown>, HarnessError> {
    let tools = build_tools(&ctx.repo)?;
    let mut out = std::collections::BTreeMap::new();
    for m in [Migrator::Ours, Migrator::Qemu] {
        if !selected(&format!("{}/slowdown", m.name())) {
            continue;
        }
        let (mut before, mut during) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let mut cell = cell_for(4096, Workload::Idle);
            cell.churn_mib = 64;
            cell.pace_us = 0;
            let opts = RunOpts {
                rate_window: Some(Duration::from_secs(3)),
                ..RunOpts::default()
            };
            let r = run_cell(ctx, &tools, &cell, m, opts);
            let mut line = hop_json(
                &format!("own-migrate/slowdown/{}", m.name()),
                &cell,
                m,
                &r,
                0,
            );
            line.rep = Some(rep + 1);
            ctx.record(line);
            if let Some((b, d)) = r.hops.first().and_then(|h| h.ops_rate) {
                before.push(b);
                during.push(d);
            }
        }
        let (b, d) = (median(&before), median(&during));
        out.insert(
            m.name(),
            Slowdown {
                guest_ops_per_s_before: b.map(num),
                guest_ops_per_s_during: d.map(num),
                slowdown: b
                    .zip(d)
                    .map(|(b, d)| num(((1.0 - d / b) * 1000.0).round() / 1000.0)),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hop(bytes: f64, total_ms: f64, downtime_ms: Option<f64>) -> Hop {
        Hop {
            bytes: Some(bytes),
            total_ms: Some(total_ms),
            downtime_ms,
            verdict: None,
            detail: Map::new(),
            ops_rate: None,
        }
    }

    #[test]
    fn a_row_holds_the_cell_then_every_run_and_the_medians() {
        let mut series = HopSeries::default();
        series.push(&hop(300.0, 30.0, Some(3.0)));
        series.push(&hop(100.0, 10.0, Some(1.0)));
        series.push(&hop(200.0, 20.0, None));
        let row = fields(&series.row(json!({"setup": "ours-freehint", "mem_mib": 4096})));
        assert_eq!(row["setup"], "ours-freehint");
        assert_eq!(row["mem_mib"], 4096);
        assert_eq!(row["runs"], 3);
        assert_eq!(row["bytes"], json!([300.0, 100.0, 200.0]));
        assert_eq!(row["bytes_median"], 200.0);
        assert_eq!(row["total_ms_median"], 20.0);
        // A run without a downtime figure adds none.
        assert_eq!(row["downtime_ms"], json!([3.0, 1.0]));
        assert_eq!(row["downtime_ms_median"], 2.0);
    }
}
