//! `qemu-hint`: one free page hint round with the driver under test against
//! QEMU's `virtio-balloon-pci,free-page-hint=on`. QEMU asks for hints only
//! while it migrates, so the round is driven by one migration of a 2 GiB
//! "dirtied then freed" guest; QEMU's side shows the hints were consumed when
//! the free page virtqueue's `used-idx` moved (`x-query-virtio-queue-status`),
//! and the migration sends fewer bytes than the same guest without hints.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::qemu_migrate::Pending;
use crate::migrate::{qemu_version, run_cell, Cell, CellOutcome, Driver, Workload};
use crate::runner::{emit, fields, Ctx, HarnessError};

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let mut ok = true;
    let mut bytes = BTreeMap::new();
    for d in [Driver::None, Driver::Stock, Driver::Freehint] {
        if !d.enabled() {
            emit(&Pending {
                name: format!("hint/{}", d.name()),
                ok: None,
                pending: true,
                note: "left out by FREEHINT_MIGRATE_DRIVERS",
            });
            continue;
        }
        let mut cell = Cell::new(2048, d, Workload::DirtyFree);
        cell.init_on_alloc = false;
        cell.pre_mib = 512;
        cell.churn_mib = 8;
        eprintln!("[hint] {}", cell.label());
        let out = run_cell(
            &ctx.manifest,
            &ctx.log_dir,
            &cell,
            ctx.timeout_scale,
            &mut |l| eprintln!("[hint]   {l}"),
        )
        .unwrap_or_else(|e| CellOutcome::harness_error(&e));
        let used = out
            .hint_vq
            .first()
            .and_then(|v| v.get("used_delta"))
            .and_then(Value::as_u64);
        let sent = out.migrations.first().map(|m| m.transferred);
        // No driver: QEMU's queue must stay untouched; a hinting driver: it moved.
        let hinted = used.is_some_and(|u| u > 0);
        let want = d != Driver::None;
        let r_ok = out.ok() && used.is_some() && hinted == want;
        ok &= r_ok;
        if let Some(b) = sent {
            bytes.insert(d.name(), b);
        }
        let failed = !out.problems.is_empty();
        ctx.record(HintRecord {
            name: format!("hint/{}", d.name()),
            ok: r_ok,
            free_page_vq_used_delta: used,
            hints_consumed: hinted,
            bytes: sent,
            integrity_failures: out.integrity_failures(),
            problems: failed.then_some(&out.problems),
            logs: failed.then_some(&out.logs),
        });
    }
    let b = |k: &str| bytes.get(k).map(|&b| b as f64);
    // init_on_alloc=0, 512 MiB freed: every hinting driver must save bytes.
    let mut ratios = BTreeMap::new();
    for d in ["stock", "freehint"] {
        if let (Some(h), Some(none)) = (b(d), b("none")) {
            ratios.insert(
                format!("bytes_{d}_over_nohints"),
                (h / none * 1000.0).round() / 1000.0,
            );
            ok &= h < none;
        }
    }
    Ok(fields(&Summary {
        ratios,
        bytes,
        qemu: qemu_version(&ctx.manifest),
        ok,
    }))
}

/// The line of one driver.
#[derive(Serialize)]
struct HintRecord<'a> {
    name: String,
    ok: bool,
    free_page_vq_used_delta: Option<u64>,
    hints_consumed: bool,
    /// Bytes the migration sent.
    bytes: Option<u64>,
    integrity_failures: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logs: Option<&'a Vec<String>>,
}

/// The scenario's summary.
#[derive(Serialize)]
struct Summary {
    /// `bytes_<driver>_over_nohints` of each hinting driver measured.
    #[serde(flatten)]
    ratios: BTreeMap<String, f64>,
    /// Bytes sent per driver.
    bytes: BTreeMap<&'static str, u64>,
    qemu: String,
    ok: bool,
}
