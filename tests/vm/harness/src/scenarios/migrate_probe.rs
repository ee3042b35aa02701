//! `probe-floor` and `probe-downtime` (not in CI): the migration probes
//! behind two findings of docs/benchmarks.md ("freehint.ko sends the floor",
//! "Downtime follows QEMU's `downtime-limit`, not the driver").
//!
//! Each run boots one 4 GiB guest (`qemu-migrate.sh`: QEMU's
//! `virtio-balloon-pci,free-page-hint=on,iothread=…`, `init_on_alloc=1`,
//! 300 MiB dirtied then freed, the driver under test loaded) and migrates
//! it once to `exec:cat > /dev/null`, with no destination: the figures are
//! QEMU's (`query-migrate`), one JSON line per run.
//!
//! - `probe-floor`: per driver, once at full speed from the start
//!   (`prompt`) and once held at 1 byte/s for 2 s while the hint round runs
//!   (`held`); equal bytes mean the race between the round and QEMU's first
//!   pass costs nothing. The working set is 8 MiB, rewritten once a second.
//! - `probe-downtime`: per driver, with an 8 MiB working set rewritten a
//!   chunk every 20 ms, at QEMU's default `downtime-limit` (300 ms) and at
//!   30 ms, `FREEHINT_BENCH_REPS` runs each (default 2).
//!
//! `FREEHINT_MIGRATE_DRIVERS` (comma-separated `none,stock,freehint`)
//! chooses the drivers (default all three).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::migrate::{
    start_migration, wait_migration, wait_ready, Cell, Driver, MigrationStats, StatsRecord,
    Workload, MAX_BANDWIDTH,
};
use crate::runner::{fields, Ctx, HarnessError};
use crate::scenarios::qemu_migrate::DRIVERS;
use crate::vm::Vm;

/// Where the probes migrate to: QEMU runs its whole migration (and asks for
/// hints) with nothing to restore.
const SINK: &str = "exec:cat > /dev/null";

/// Guest memory, MiB.
const MEM_MIB: u64 = 4096;

/// How the guest's working set changes during the migration.
#[derive(Debug, Clone, Copy)]
struct Churn {
    mib: u64,
    pace_us: u64,
}

/// The floor probe's working set: small and nearly still.
const FLOOR_CHURN: Churn = Churn {
    mib: 8,
    pace_us: 1_000_000,
};
/// The downtime probe's working set: small and rewritten all the time.
const DOWNTIME_CHURN: Churn = Churn {
    mib: 8,
    pace_us: 20_000,
};

/// What a probe sets before `migrate`.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// Start at 1 byte/s and go to full speed after 2 s.
    held: bool,
    /// `downtime-limit` (ms), if set.
    downtime_limit_ms: Option<u64>,
}

/// The result line of one probe.
#[derive(Debug, Serialize)]
struct ProbeRecord {
    name: String,
    driver: &'static str,
    mem_mib: u64,
    held: bool,
    downtime_limit_ms: Option<u64>,
    /// The guest's `used_mib` when it was ready.
    used_mib: Option<Value>,
    /// The migration's figures, when it completed.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    figures: Option<StatsRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    ok: bool,
}

/// Boots a guest for `driver` and migrates it once to [`SINK`]; returns
/// the result line (`ok`: the migration completed).
fn probe(
    ctx: &mut Ctx,
    name: &str,
    driver: Driver,
    churn: Churn,
    setup: Setup,
) -> Result<ProbeRecord, HarnessError> {
    let mut cell = Cell::new(MEM_MIB, driver, Workload::DirtyFree);
    cell.churn_mib = churn.mib;
    cell.pace_us = churn.pace_us;
    let spec = cell.boot_spec();
    let tag = name.replace('/', "-");
    eprintln!("[probe] {name}");
    let mut vm = Vm::start(&ctx.manifest, &spec, &ctx.log_dir, &tag, None)?;
    let ready = wait_ready(&mut vm, ctx.scaled(Duration::from_secs(300)))?;
    if let Some(limit) = setup.downtime_limit_ms {
        vm.qmp().execute(
            "migrate-set-parameters",
            Some(json!({ "downtime-limit": limit })),
        )?;
    }
    let t0 = Instant::now();
    start_migration(&mut vm, SINK, if setup.held { 1 } else { MAX_BANDWIDTH })?;
    if setup.held {
        std::thread::sleep(Duration::from_secs(2));
        vm.qmp().execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": MAX_BANDWIDTH })),
        )?;
    }
    let end = wait_migration(
        &mut vm,
        &["completed"],
        &["failed", "cancelled"],
        "migration",
        ctx.scaled(Duration::from_secs(600)),
    );
    let mut r = ProbeRecord {
        name: name.to_string(),
        driver: driver.name(),
        mem_mib: MEM_MIB,
        held: setup.held,
        downtime_limit_ms: setup.downtime_limit_ms,
        used_mib: ready.get("used_mib").cloned(),
        figures: None,
        error: None,
        ok: false,
    };
    match end {
        Ok(q) => {
            let stats = MigrationStats::from_query(&q, t0.elapsed().as_millis() as u64);
            r.figures = Some(stats.record());
            r.ok = true;
        }
        Err(e) => {
            let _ = vm.qmp().execute("migrate_cancel", None);
            r.error = Some(e.to_string());
        }
    }
    vm.kill();
    ctx.record(&r);
    Ok(r)
}

fn drivers() -> Vec<Driver> {
    DRIVERS.into_iter().filter(|d| d.enabled()).collect()
}

/// The summary of `probe-floor`: MB sent per driver and mode.
#[derive(Serialize)]
struct FloorSummary {
    ok: bool,
    mb_sent: BTreeMap<&'static str, BTreeMap<&'static str, Option<f64>>>,
}

/// The summary of `probe-downtime`: each run's downtime per limit and
/// driver.
#[derive(Serialize)]
struct DowntimeSummary {
    ok: bool,
    runs_per_cell: usize,
    downtime_ms: BTreeMap<String, BTreeMap<&'static str, Vec<Option<u64>>>>,
}

/// `probe-floor`.
pub fn run_floor(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let mut ok = true;
    let mut per = BTreeMap::new();
    for d in drivers() {
        let mut mb = BTreeMap::new();
        for (mode, held) in [("prompt", false), ("held", true)] {
            let setup = Setup {
                held,
                downtime_limit_ms: None,
            };
            let r = probe(
                ctx,
                &format!("floor/{}/{mode}", d.name()),
                d,
                FLOOR_CHURN,
                setup,
            )?;
            ok &= r.ok;
            mb.insert(mode, r.figures.map(|f| f.mb_sent));
        }
        per.insert(d.name(), mb);
    }
    Ok(fields(&FloorSummary { ok, mb_sent: per }))
}

/// `probe-downtime`.
pub fn run_downtime(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let reps = super::bench_reps(2);
    let mut ok = true;
    let mut per = BTreeMap::new();
    for limit in [300u64, 30] {
        let mut row = BTreeMap::new();
        for d in drivers() {
            let mut ms = Vec::new();
            for i in 0..reps {
                let setup = Setup {
                    held: false,
                    downtime_limit_ms: Some(limit),
                };
                let name = format!("downtime/{}/{limit}ms/{i}", d.name());
                let r = probe(ctx, &name, d, DOWNTIME_CHURN, setup)?;
                ok &= r.ok;
                ms.push(r.figures.map(|f| f.downtime_ms));
            }
            row.insert(d.name(), ms);
        }
        per.insert(format!("{limit}ms"), row);
    }
    Ok(fields(&DowntimeSummary {
        ok,
        runs_per_cell: reps,
        downtime_ms: per,
    }))
}
