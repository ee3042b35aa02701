//! `distro-migrate` (CI) and `bench-distro-migrate` (benchmark): the
//! `qemu-migrate` matrix on Debian's own kernel (flavour `distro`, built by
//! `tests/vm/build-distro`): a 4 GiB guest, workloads {idle, dirty-keep,
//! dirty-free} × drivers {none, the distribution's `virtio_balloon.ko`,
//! `freehint.ko`}, live-migrated between two QEMUs on 127.0.0.1, every live
//! page of the integrity workload (`fhwork`) verified on the destination.
//!
//! `init_on_alloc` as Debian ships it: its config has
//! `CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y`, so only the `init_on_alloc=1` column
//! is run (the cell's command line says `init_on_alloc=1`, the default).
//!
//! Summary: `{"scenario":"distro-migrate","kernel":…,
//! "bytes_freehint_over_stock":…, "bytes_freehint_freed_over_idle":…,
//! "time_hints_over_nohints_max":…, "integrity_failures":0, …}` with the
//! benchmark targets evaluated in `targets` (bytes with freehint.ko ≤ 0.75 ×
//! the stock driver's on the dirtied-then-freed guest and ≤ 1.05 × the same
//! guest idle, time with hints ≤ time without on every workload). CI runs
//! one run per cell and passes on clean migrations and integrity (one run is
//! not a benchmark); `bench-distro-migrate` runs `FREEHINT_BENCH_REPS`
//! (default 3) per cell, takes medians and writes
//! `target/bench/distro-migrate.json`.

use serde::Serialize;
use serde_json::{Map, Value};

use super::distro_hint::{distro_kernel, DistroKernel, FLAVOUR};
use super::qemu_migrate::{rows, run_matrix, summary, Key, Summary, Table};
use super::{bench_reps, write_bench, BenchDoc};
use crate::runner::{fields, Ctx, HarnessError};

/// Guest RAM (MiB).
pub const MEM_MIB: u64 = 4096;
/// Byte target: freehint.ko over the stock driver, dirtied-then-freed guest.
pub const TARGET_OVER_STOCK: f64 = 0.75;
/// Byte target: freehint.ko on the dirtied-then-freed guest over the same
/// guest idle.
pub const TARGET_FREED_OVER_IDLE: f64 = 1.05;
/// Time target: with hints over without, worst workload.
pub const TARGET_TIME: f64 = 1.0;

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 1000.0).round() / 1000.0),
        _ => None,
    }
}

/// Whether a measured ratio meets its target (`null` when not measured).
fn meets(v: Option<f64>, target: f64) -> Option<bool> {
    v.map(|v| v <= target)
}

/// The summary of the distro matrix: the migration matrix's, on Debian's
/// kernel, with its targets.
#[derive(Serialize)]
struct DistroSummary {
    /// The matrix summary (`bytes_freehint_over_stock` at this size).
    #[serde(flatten)]
    matrix: Summary,
    kernel: String,
    package: String,
    flavour: Option<String>,
    bytes_freehint_freed_over_idle: Option<f64>,
    init_on_alloc: &'static str,
    reps: usize,
    targets: Targets,
}

/// The distro matrix's targets (none without the figure).
#[derive(Serialize)]
struct Targets {
    bytes_freehint_over_stock_le_0_75: Option<bool>,
    bytes_freehint_freed_over_idle_le_1_05: Option<bool>,
    time_hints_over_nohints_max_le_1: Option<bool>,
}

/// The matrix on the distro kernel, `reps` runs per cell, and its summary.
fn matrix(ctx: &mut Ctx, reps: usize) -> Result<(Table, DistroSummary), HarnessError> {
    let DistroKernel { release, package } = distro_kernel(ctx)?;
    if ctx.flavour_override.is_none() {
        ctx.flavour_override = Some(FLAVOUR.into());
    }
    let sizes = [MEM_MIB];
    let ioas = [true];
    let t = run_matrix(ctx, &sizes, reps, &ioas);
    let mut matrix = summary(ctx, &t, &sizes, &ioas);
    let k = |d: &'static str, w: &'static str| -> Key { (MEM_MIB, d, w, true) };
    let over_stock = ratio(
        t.bytes_med(&k("freehint", "dirty-free")),
        t.bytes_med(&k("stock", "dirty-free")),
    );
    let freed_over_idle = ratio(
        t.bytes_med(&k("freehint", "dirty-free")),
        t.bytes_med(&k("freehint", "idle")),
    );
    let time_max = matrix.time_hints_over_nohints_max;
    matrix.bytes_freehint_over_stock = over_stock;
    let s = DistroSummary {
        matrix,
        kernel: release,
        package,
        flavour: ctx.flavour_override.clone(),
        bytes_freehint_freed_over_idle: freed_over_idle,
        init_on_alloc: "1, Debian's default (CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y)",
        reps,
        targets: Targets {
            bytes_freehint_over_stock_le_0_75: meets(over_stock, TARGET_OVER_STOCK),
            bytes_freehint_freed_over_idle_le_1_05: meets(freed_over_idle, TARGET_FREED_OVER_IDLE),
            time_hints_over_nohints_max_le_1: meets(time_max, TARGET_TIME),
        },
    };
    Ok((t, s))
}

/// CI: one run per cell.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let (_, s) = matrix(ctx, 1)?;
    Ok(fields(&s))
}

/// Benchmark: `FREEHINT_BENCH_REPS` (default 3) runs per cell, medians, in
/// `target/bench/distro-migrate.json`.
pub fn bench(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let reps = bench_reps(3);
    let (t, s) = matrix(ctx, reps)?;
    let doc = BenchDoc {
        benchmark: "distro-migrate",
        command: "tests/vm/run bench-distro-migrate",
        reps,
        sizes_mib: Some(vec![MEM_MIB]),
        drivers_measured: None,
        summary: &s,
        cells: rows(&t),
    };
    write_bench(ctx, "distro-migrate.json", "distro-migrate", &doc)?;
    Ok(fields(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_targets() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(meets(Some(0.75), TARGET_OVER_STOCK), Some(true));
        assert_eq!(meets(Some(0.751), TARGET_OVER_STOCK), Some(false));
        assert_eq!(meets(None, TARGET_TIME), None);
    }
}
