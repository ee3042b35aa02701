//! `own-pingpong` and `bench-own-pingpong`: many hops back and forth,
//! and the abort checks.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::cell::{finish, hop_json, run_cell, AtResume, Migrator, Run, RunOpts};
use super::program::migrate_ours;
use super::table::cell_for;
use super::tools::{build_tools, start_own, sweep_stale_ram_files, Side, Tools};
use crate::migrate::{median, qemu_version, wait_ready, Cell, Workload};
use crate::runner::{fields, Ctx, HarnessError};
use crate::scenarios::num;
use crate::vm::VmError;

/// `own-pingpong` with `migrations` hops, plus the negative control.
pub(super) fn pingpong(
    ctx: &mut Ctx,
    migrations: usize,
) -> Result<Map<String, Value>, HarnessError> {
    sweep_stale_ram_files();
    let tools = build_tools(&ctx.repo)?;
    let mut cell = cell_for(4096, Workload::DirtyFree);
    cell.migrations = migrations;
    cell.churn_mib = 64;
    cell.pace_us = 50;
    eprintln!("[own] pingpong: {migrations} migrations with freehint-migrate");
    let r = run_cell(ctx, &tools, &cell, Migrator::Ours, RunOpts::default());
    for i in 0..r.hops.len().max(1) {
        ctx.record(hop_json(
            &format!("own-pingpong/{}", i + 1),
            &cell,
            Migrator::Ours,
            &r,
            i,
        ));
    }
    let mut control = cell.clone();
    control.migrations = 1;
    eprintln!("[own] abort at resume: the source must run on, intact");
    let aborted = abort_check(ctx, &tools, &control, false, "own-pingpong/abort-at-resume");
    let abort_ok = aborted.ok;
    ctx.record(aborted);
    eprintln!("[own] negative control: the final pass dropped; the destination must see damage");
    let c = run_cell(
        ctx,
        &tools,
        &control,
        Migrator::Ours,
        // One live pass: the final pass then carries what the churn wrote
        // during the bulk pass (thousands of pages), and dropping it must
        // show on the destination.
        RunOpts {
            negative_control: true,
            max_passes: Some(1),
            ..RunOpts::default()
        },
    );
    let verdict_failed = c
        .hops
        .first()
        .and_then(|h| h.verdict.as_ref())
        .is_some_and(|v| !crate::guest::result_ok(v));
    let caught = verdict_failed || c.destination_splat;
    let corrupt = c
        .hops
        .first()
        .and_then(|h| h.verdict.as_ref())
        .and_then(|v| v.get("corrupt_pages"))
        .cloned();
    let corrupt_seen = corrupt.as_ref().and_then(Value::as_u64).unwrap_or(0) > 0;
    ctx.record(NegativeControl {
        name: "own-pingpong/negative-control",
        ok: caught,
        note: "final pass dropped on purpose: ok means the destination did not verify clean \
               (damaged pages, or a guest that died at resume)",
        caught_by: caught.then_some(if corrupt_seen {
            "corrupt pages"
        } else if verdict_failed {
            "guest died"
        } else {
            "destination kernel splat at resume"
        }),
        corrupt_pages: corrupt,
        problems: &c.problems,
    });
    let downtimes: Vec<f64> = r.hops.iter().filter_map(|h| h.downtime_ms).collect();
    Ok(fields(&Summary {
        migrations: r.hops.len(),
        integrity_failures: r.integrity_failures(),
        negative_control_caught: caught,
        abort_leaves_source_running: abort_ok,
        downtime_ms_median: median(&downtimes).map(num),
        pages_checked: r
            .hops
            .iter()
            .filter_map(|h| h.verdict.as_ref()?.get("pages_checked")?.as_u64())
            .sum(),
        qemu: qemu_version(&ctx.manifest),
        problems: (!r.problems.is_empty()).then_some(&r.problems),
        ok: r.ok() && r.hops.len() == migrations && caught && abort_ok,
    }))
}

/// The negative control's line.
#[derive(Serialize)]
struct NegativeControl<'a> {
    name: &'static str,
    ok: bool,
    note: &'static str,
    /// How the destination showed the damage.
    caught_by: Option<&'static str>,
    corrupt_pages: Option<Value>,
    problems: &'a [String],
}

/// The summary of `own-pingpong`.
#[derive(Serialize)]
struct Summary<'a> {
    migrations: usize,
    integrity_failures: usize,
    /// The negative control's damage was seen.
    negative_control_caught: bool,
    abort_leaves_source_running: bool,
    downtime_ms_median: Option<Value>,
    pages_checked: u64,
    qemu: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a Vec<String>>,
    ok: bool,
}

/// The line of an abort check ([`abort_check`]).
#[derive(Debug, Serialize)]
pub(crate) struct AbortRecord {
    /// Result name.
    pub(crate) name: String,
    /// The source ran on, intact.
    pub(crate) ok: bool,
    /// What the check does.
    pub(crate) note: &'static str,
    /// The sender's summary of the refused migration.
    pub(crate) sender: Value,
    /// What went wrong.
    pub(crate) problems: Vec<String>,
}

/// A migration refused at the last moment (the destination loaded, the
/// gate says `abort`): the program must fail, say the source runs, and
/// the source must run on with every page intact.
pub(crate) fn abort_check(
    ctx: &mut Ctx,
    tools: &Tools,
    cell: &Cell,
    balloon: bool,
    name: &str,
) -> AbortRecord {
    let scale = |s: u64| Duration::from_secs(s).mul_f64(ctx.timeout_scale.max(0.1));
    let mut problems = Vec::new();
    let mut summary = Value::Null;
    let result = (|| -> Result<(), String> {
        let e = |e: VmError| e.to_string();
        let label = "abort";
        let mut src = start_own(
            &ctx.manifest,
            tools,
            cell,
            &ctx.log_dir,
            "abort-0",
            Side::Source,
            balloon,
        )
        .map_err(e)?;
        wait_ready(&mut src.vm, scale(300)).map_err(e)?;
        if balloon {
            crate::scenarios::own_hint::inflate(&src, cell.driver, scale(120))?;
        }
        let mut dst = start_own(
            &ctx.manifest,
            tools,
            cell,
            &ctx.log_dir,
            "abort-1",
            Side::Destination,
            balloon,
        )
        .map_err(e)?;
        let opts = RunOpts {
            at_resume: AtResume::Abort,
            balloon,
            ..RunOpts::default()
        };
        let hop = migrate_ours(tools, &src, &mut dst, &ctx.log_dir, label, opts, scale(600))?.hop;
        summary = hop.detail.get("send").cloned().unwrap_or(Value::Null);
        if summary["status"] != "failed" || summary["source"] != "running" {
            problems.push(format!(
                "the sender should fail with the source running: {summary}"
            ));
        }
        let status = src
            .vm
            .qmp()
            .execute("query-status", None)
            .map_err(|e| e.to_string())?;
        if status["status"] != "running" {
            problems.push(format!(
                "the source is {} after the refused migration",
                status["status"]
            ));
        }
        dst.vm.kill();
        if balloon {
            // Plugged back into the source, bound again, inflated again.
            let check =
                crate::scenarios::own_hint::destination_balloon(&mut src, cell.driver, scale(120));
            if check.get("ok") != Some(&json!(true)) {
                problems.push(format!(
                    "the source's balloon after the refused migration: {}",
                    Value::Object(check)
                ));
            }
        }
        let mut run = Run::default();
        finish(&mut src.vm, &mut run, &scale)?;
        problems.extend(run.problems);
        Ok(())
    })();
    if let Err(e) = result {
        problems.push(e);
    }
    AbortRecord {
        name: name.to_string(),
        ok: problems.is_empty(),
        note: "the destination is refused at the last moment: the source must run on, intact",
        sender: summary,
        problems,
    }
}

/// CI: 10 migrations.
pub fn run_pingpong(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 10)
}

/// Benchmark: 20 migrations.
pub fn bench_pingpong(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 20)
}
