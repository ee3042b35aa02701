//! `qemu-pingpong` (CI: 5 round trips = 10 migrations) and `bench-pingpong`
//! (20 migrations): one guest migrated back and forth under the integrity
//! workload with the hinting driver under test (freehint when enabled, else
//! the stock `virtio_balloon`), `init_on_alloc=1`. Every destination verifies
//! every live page; the guest must be alive and power off cleanly at the end.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::migrate::{cell_json, qemu_version, run_cell, Cell, Driver, Workload};
use crate::runner::{fields, Ctx, HarnessError};

fn pingpong(ctx: &mut Ctx, migrations: usize) -> Result<Map<String, Value>, HarnessError> {
    let driver = if Driver::Freehint.enabled() {
        Driver::Freehint
    } else {
        Driver::Stock
    };
    let mut cell = Cell::new(4096, driver, Workload::DirtyFree);
    cell.migrations = migrations;
    cell.churn_mib = 64;
    cell.pace_us = 50;
    eprintln!(
        "[pingpong] {} migrations, driver {}",
        migrations,
        driver.name()
    );
    let out = run_cell(
        &ctx.manifest,
        &ctx.log_dir,
        &cell,
        ctx.timeout_scale,
        &mut |l| eprintln!("[pingpong]   {l}"),
    )?;
    for i in 0..migrations {
        let mut line = cell_json(&cell, &out, i);
        line.name = format!("pingpong/{}", i + 1);
        line.free_page_vq = out.hint_vq.get(i).cloned();
        ctx.record(line);
    }
    Ok(fields(&Summary {
        migrations: out.migrations.len(),
        integrity_failures: out.integrity_failures(),
        corrupt_pages: out.corrupt_pages(),
        driver: driver.name(),
        guest_alive_at_end: out.problems.is_empty(),
        pages_checked: out
            .integrity
            .iter()
            .filter_map(|r| r.get("pages_checked").and_then(Value::as_u64))
            .sum(),
        qemu: qemu_version(&ctx.manifest),
        problems: (!out.problems.is_empty()).then_some(&out.problems),
        ok: out.ok() && out.migrations.len() == migrations,
    }))
}

/// The scenario's summary.
#[derive(Serialize)]
struct Summary<'a> {
    migrations: usize,
    integrity_failures: usize,
    corrupt_pages: u64,
    driver: &'static str,
    guest_alive_at_end: bool,
    pages_checked: u64,
    qemu: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a Vec<String>>,
    ok: bool,
}

/// CI: 10 migrations.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 10)
}

/// Benchmark: 20 migrations.
pub fn bench(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 20)
}
