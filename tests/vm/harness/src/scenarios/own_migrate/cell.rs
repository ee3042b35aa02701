//! One cell (ours or QEMU's migrator × workload × memory) run end to end:
//! boot, migrations, verdicts, the result line ([`hop_json`]).

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::program::{migrate_ours, Hop, Migrated};
use super::tools::{qemu_ram_args, start_own, Side, Tools};
use crate::migrate::{
    failed_verdict, migrate, verify_integrity, wait_ready, Cell, Then, VerdictFields,
};
use crate::runner::Ctx;
use crate::scenarios::num;
use crate::vm::{free_port, splat_problems, Incoming, Vm, VmError, VmOptions};

/// Which migrator a cell uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrator {
    /// `freehint-migrate`.
    Ours,
    /// QEMU's pre-copy.
    Qemu,
}

impl Migrator {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Migrator::Ours => "ours",
            Migrator::Qemu => "qemu",
        }
    }
}

/// The integrity verdict at `from` on `vm`.
pub(super) fn verdict_at(
    vm: &mut Vm,
    from: usize,
    timeout: Duration,
) -> Result<Map<String, Value>, String> {
    let crate::vm::ResultLine { line, obj, .. } = vm
        .wait_result(from, "integrity", "the destination's verdict", timeout)
        .map_err(|e| e.to_string())?;
    Ok(obj.unwrap_or_else(|| failed_verdict(line)))
}

/// The guest's churn steps (`ops`) at a moment of host time.
#[derive(Debug, Clone, Copy)]
pub(super) struct OpsSample {
    /// `ops` of the verdict.
    pub(super) ops: f64,
    /// When the verdict came.
    pub(super) at: Instant,
}

/// The workload's churn rate before a migration ([`start_rate`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct RateBefore {
    /// Steps per second over the window.
    pub(super) rate: f64,
    /// The last sample of the window.
    pub(super) last: OpsSample,
}

/// `ops` and the host time of a fresh verdict (the guest's churn steps).
pub(super) fn ops_now(vm: &mut Vm, timeout: Duration) -> Result<OpsSample, String> {
    let v = verify_integrity(vm, Then::Continue, timeout).map_err(|e| e.to_string())?;
    let ops = v
        .get("ops")
        .and_then(Value::as_f64)
        .ok_or("verdict without ops")?;
    if !crate::guest::result_ok(&v) {
        return Err(format!(
            "verdict before migrating failed: {}",
            Value::Object(v)
        ));
    }
    Ok(OpsSample {
        ops,
        at: Instant::now(),
    })
}

/// What the receiver's gate answers when the destination is ready to
/// resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AtResume {
    /// `resume`, after typing `verify` on the destination's console.
    #[default]
    Resume,
    /// `abort`: the migration must fail with the source running.
    Abort,
}

/// How a run measures.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOpts {
    /// Measure the guest's churn rate for this long before migrating.
    pub rate_window: Option<Duration>,
    /// Negative control: drop our final pass.
    pub negative_control: bool,
    /// Our live passes at most (`--max-passes`).
    pub max_passes: Option<u32>,
    /// What the gate answers when the destination is ready to resume.
    pub at_resume: AtResume,
    /// Our balloon device (`freehint-vhost-user`) instead of QEMU's: the
    /// sender takes its hints and unplugs it, the receiver plugs a fresh
    /// one into the destination (see `own_hint`).
    pub balloon: bool,
}

/// The outcome of one cell: every hop, problems, the verdicts.
#[derive(Debug, Default)]
pub struct Run {
    /// One per migration.
    pub hops: Vec<Hop>,
    /// What went wrong.
    pub problems: Vec<String>,
    /// A migration failed and its destination's console showed a kernel
    /// splat (a damaged guest that died at resume, before any verdict).
    pub destination_splat: bool,
}

impl Run {
    /// Verdicts that failed, or hops that have none.
    pub fn integrity_failures(&self) -> usize {
        self.hops
            .iter()
            .filter(|h| !h.verdict.as_ref().is_some_and(crate::guest::result_ok))
            .count()
    }

    /// Everything went right.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.integrity_failures() == 0
    }
}

/// Boots `cell`, migrates it `cell.migrations` times with `migrator`,
/// verifies each destination at resume, stops the workload at the end.
pub fn run_cell(ctx: &Ctx, tools: &Tools, cell: &Cell, migrator: Migrator, opts: RunOpts) -> Run {
    let mut run = Run::default();
    let scale = |s: u64| Duration::from_secs(s).mul_f64(ctx.timeout_scale.max(0.1));
    let label = format!("{}-{}", migrator.name(), cell.label().replace('/', "-"));
    let job = CellJob {
        ctx,
        cell,
        label: &label,
        opts,
        scale: &scale,
    };
    let result = match migrator {
        Migrator::Ours => run_ours(job, tools, &mut run),
        Migrator::Qemu => run_qemu(job, &mut run),
    };
    if let Err(e) = result {
        run.problems.push(e);
    }
    run
}

pub(super) fn start_rate(
    vm: &mut Vm,
    opts: RunOpts,
    unit: Duration,
) -> Result<Option<RateBefore>, String> {
    let Some(window) = opts.rate_window else {
        return Ok(None);
    };
    let first = ops_now(vm, unit * 60)?;
    std::thread::sleep(window);
    let last = ops_now(vm, unit * 60)?;
    Ok(Some(RateBefore {
        rate: (last.ops - first.ops) / (last.at - first.at).as_secs_f64(),
        last,
    }))
}

pub(super) fn end_rate(hop: &mut Hop, before: Option<RateBefore>, at: Instant) {
    let (Some(RateBefore { rate, last }), Some(v)) = (before, &hop.verdict) else {
        return;
    };
    if let Some(ops2) = v.get("ops").and_then(Value::as_f64) {
        hop.ops_rate = Some((rate, (ops2 - last.ops) / (at - last.at).as_secs_f64()));
    }
}

/// What both migrators' runs of one cell take.
#[derive(Clone, Copy)]
pub(super) struct CellJob<'a> {
    /// The scenario's context (manifest, log directory).
    pub ctx: &'a Ctx,
    /// The cell to boot and migrate.
    pub cell: &'a Cell,
    /// Prefix of the VMs' log names (`LABEL-0` is the first source).
    pub label: &'a str,
    /// How the run measures.
    pub opts: RunOpts,
    /// A timeout in seconds, scaled to this machine.
    pub scale: &'a dyn Fn(u64) -> Duration,
}

/// Runs `job` with our migration programs, recording hops and problems in
/// `run`.
pub(super) fn run_ours(job: CellJob, tools: &Tools, run: &mut Run) -> Result<(), String> {
    let (label, scale) = (job.label, job.scale);
    let e = |e: VmError| e.to_string();
    let mut src = start_own(
        &job.ctx.manifest,
        tools,
        job.cell,
        &job.ctx.log_dir,
        &format!("{label}-0"),
        Side::Source,
        job.opts.balloon,
    )
    .map_err(e)?;
    wait_ready(&mut src.vm, scale(300)).map_err(e)?;
    if job.opts.balloon {
        crate::scenarios::own_hint::inflate(&src, job.cell.driver, scale(120))?;
    }
    for i in 0..job.cell.migrations {
        let before = start_rate(&mut src.vm, job.opts, scale(1))?;
        let mut dst = start_own(
            &job.ctx.manifest,
            tools,
            job.cell,
            &job.ctx.log_dir,
            &format!("{label}-{}", i + 1),
            Side::Destination,
            job.opts.balloon,
        )
        .map_err(e)?;
        let hop_label = format!("{label}-{}", i + 1);
        let migrated = migrate_ours(
            tools,
            &src,
            &mut dst,
            &job.ctx.log_dir,
            &hop_label,
            job.opts,
            scale(600),
        );
        splat_problems(&src.vm, &mut run.problems);
        if migrated.is_err() {
            // A destination that died at resume says why on its console.
            dst.vm.wait_exit(scale(10));
            let before = run.problems.len();
            splat_problems(&dst.vm, &mut run.problems);
            run.destination_splat |= run.problems.len() > before;
        }
        let Migrated {
            mut hop,
            verdict_from: from,
        } = migrated?;
        src.vm.kill();
        let verdict = verdict_at(&mut dst.vm, from, scale(300));
        let at = Instant::now();
        hop.verdict = Some(verdict.unwrap_or_else(failed_verdict));
        end_rate(&mut hop, before, at);
        if job.opts.balloon {
            let check = crate::scenarios::own_hint::destination_balloon(
                &mut dst,
                job.cell.driver,
                scale(120),
            );
            if check.get("ok") != Some(&json!(true)) {
                run.problems.push(format!(
                    "migration {}: destination balloon: {}",
                    i + 1,
                    Value::Object(check.clone())
                ));
            }
            hop.detail
                .insert("destination_balloon".into(), Value::Object(check));
        }
        let ms = |v: Option<f64>| v.map_or_else(|| "?".to_string(), |v| format!("{v:.0}"));
        let integrity = hop.verdict.as_ref().is_some_and(crate::guest::result_ok);
        eprintln!(
            "[own]   {label}: migration {}/{}: {:.1} MB, {} ms total, {} ms downtime, integrity {}",
            i + 1,
            job.cell.migrations,
            hop.bytes.unwrap_or(0.0) / 1e6,
            ms(hop.total_ms),
            ms(hop.downtime_ms),
            if integrity { "ok" } else { "FAILED" }
        );
        run.hops.push(hop);
        src = dst;
    }
    finish(&mut src.vm, run, scale)
}

/// Runs `job` with QEMU's own migration, recording hops and problems in
/// `run`.
pub(super) fn run_qemu(job: CellJob, run: &mut Run) -> Result<(), String> {
    let (label, scale) = (job.label, job.scale);
    let e = |e: VmError| e.to_string();
    let spec = job.cell.boot_spec();
    let ram = qemu_ram_args(job.cell);
    let with = |incoming| VmOptions {
        incoming,
        extra_args: ram.clone(),
        ..VmOptions::default()
    };
    let mut src = Vm::start_with(
        &job.ctx.manifest,
        &spec,
        &job.ctx.log_dir,
        &format!("{label}-0"),
        &with(None),
    )
    .map_err(e)?;
    wait_ready(&mut src, scale(300)).map_err(e)?;
    for i in 0..job.cell.migrations {
        let before = start_rate(&mut src, job.opts, scale(1))?;
        let port = free_port().map_err(e)?;
        let mut dst = Vm::start_with(
            &job.ctx.manifest,
            &spec,
            &job.ctx.log_dir,
            &format!("{label}-{}", i + 1),
            &with(Some(Incoming::Tcp(port))),
        )
        .map_err(e)?;
        let stats = migrate(&mut src, port, scale(600));
        splat_problems(&src, &mut run.problems);
        let stats = stats.map_err(e)?;
        src.kill();
        let verdict = verify_integrity(&mut dst, Then::Continue, scale(300));
        let at = Instant::now();
        let mut hop = Hop {
            bytes: Some(stats.transferred as f64),
            total_ms: Some(stats.total_ms as f64),
            downtime_ms: Some(stats.downtime_ms as f64),
            verdict: Some(verdict.unwrap_or_else(|err| failed_verdict(err.to_string()))),
            detail: stats.to_json(),
            ops_rate: None,
        };
        end_rate(&mut hop, before, at);
        run.hops.push(hop);
        src = dst;
    }
    finish(&mut src, run, scale)
}

/// Whether `FREEHINT_OWN_ONLY` (comma-separated substrings of
/// `migrator/workload/SIZEg`, e.g. `qemu/idle/32g`) selects a cell; unset:
/// all, and the slowdown runs too.
pub(super) fn selected(name: &str) -> bool {
    match std::env::var("FREEHINT_OWN_ONLY") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|p| name.contains(p.trim())),
        _ => true,
    }
}

/// Stops the workload on the last destination and waits for a clean end.
pub(super) fn finish(
    vm: &mut Vm,
    run: &mut Run,
    scale: &dyn Fn(u64) -> Duration,
) -> Result<(), String> {
    let last = verify_integrity(vm, Then::Stop, scale(300)).map_err(|e| e.to_string())?;
    if !crate::guest::result_ok(&last) {
        run.problems
            .push(format!("final verdict failed: {}", Value::Object(last)));
    }
    if !vm.wait_exit(scale(180)) {
        run.problems.push(format!(
            "guest did not power off ({})",
            vm.serial_log.display()
        ));
    }
    match vm.output().done_rc {
        Some(0) => {}
        rc => run.problems.push(format!(
            "guest script rc {rc:?} ({})",
            vm.serial_log.display()
        )),
    }
    splat_problems(vm, &mut run.problems);
    Ok(())
}

/// The result line of one hop of a run ([`hop_json`]).
#[derive(Debug, Clone, Serialize)]
pub struct HopRecord {
    /// Result name.
    pub name: String,
    /// `ours` or `qemu`.
    pub migrator: &'static str,
    /// The guest's balloon driver, where the scenario varies it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<&'static str>,
    /// The guest workload.
    pub workload: &'static str,
    /// Guest RAM.
    pub mem_mib: u64,
    /// 1 when the guest ran with `init_on_alloc=1`.
    pub init_on_alloc: u8,
    /// Which migration of the run (from 1).
    pub migration: usize,
    /// Bytes on the wire.
    pub bytes: Option<Value>,
    /// Megabytes on the wire, to a tenth.
    pub mb_sent: Option<Value>,
    /// Total time, ms.
    pub total_ms: Option<Value>,
    /// Downtime, ms.
    pub downtime_ms: Option<Value>,
    /// The integrity verdict.
    #[serde(flatten)]
    pub verdict: VerdictFields,
    /// Guest churn steps per second before the migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_ops_per_s_before: Option<Value>,
    /// Guest churn steps per second during the migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_ops_per_s_during: Option<Value>,
    /// Everything the migrator said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Map<String, Value>>,
    /// Which repetition of a benchmark matrix (from 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rep: Option<usize>,
    /// The verdict passed (and, on the last hop, the run had no problem).
    pub ok: bool,
    /// What went wrong in the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
}

/// The result line of hop `i` of a run.
pub fn hop_json(name: &str, cell: &Cell, migrator: Migrator, run: &Run, i: usize) -> HopRecord {
    let hop = run.hops.get(i);
    let verdict = hop.and_then(|h| h.verdict.as_ref());
    let last = i + 1 == run.hops.len();
    let ok = verdict.is_some_and(crate::guest::result_ok) && (!last || run.problems.is_empty());
    HopRecord {
        name: name.to_string(),
        migrator: migrator.name(),
        driver: None,
        workload: cell.workload.name(),
        mem_mib: cell.mem_mib,
        init_on_alloc: u8::from(cell.init_on_alloc),
        migration: i + 1,
        bytes: hop.and_then(|h| h.bytes).map(num),
        mb_sent: hop
            .and_then(|h| h.bytes)
            .map(|b| num((b / 1e5).round() / 10.0)),
        total_ms: hop.and_then(|h| h.total_ms).map(num),
        downtime_ms: hop.and_then(|h| h.downtime_ms).map(num),
        verdict: VerdictFields::of(verdict),
        guest_ops_per_s_before: hop.and_then(|h| h.ops_rate).map(|(b, _)| num(b)),
        guest_ops_per_s_during: hop.and_then(|h| h.ops_rate).map(|(_, d)| num(d)),
        detail: hop.map(|h| h.detail.clone()),
        rep: None,
        ok,
        problems: (!run.problems.is_empty() && last).then(|| run.problems.clone()),
    }
}

impl HopRecord {
    /// The line of repetition `rep` (from 0) of a benchmark matrix: a run
    /// that migrated nothing fails with its problems.
    pub fn of_rep(mut self, rep: usize, run: &Run) -> HopRecord {
        self.rep = Some(rep + 1);
        if run.hops.is_empty() {
            self.ok = false;
            self.problems = Some(run.problems.clone());
        }
        self
    }
}
