//! `demo`: the README's main job. One real 4 GiB guest, "dirtied then
//! freed" (300 MiB written, then freed; Debian's default `init_on_alloc=1`),
//! live-migrated to a second QEMU on 127.0.0.1 by QEMU's migrator without
//! hints, with the stock `virtio_balloon` driver + QEMU's free page hints,
//! and with freehint.ko + QEMU's free page hints; then by our migrator
//! (`freehint-migrate`) with our balloon device (`freehint-vhost-user`) and
//! freehint.ko answering in the bitmap protocol: four rows (a row left out
//! by `FREEHINT_MIGRATE_DRIVERS` says "pending"). Prints a side-by-side
//! table (bytes, total time, downtime, integrity), writes it to
//! `target/vm/demo/table.txt` (what `tests/demo` shows) and draws it as
//! `target/vm/demo/table.png`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::own_migrate::{self, build_tools, Migrator, RunOpts};
use crate::chart::{draw_png, ChartRow};
use crate::errors::io_error;
use crate::migrate::{median, qemu_version, run_cell, Cell, CellOutcome, Driver, Workload};
use crate::runner::{fields, Ctx, HarnessError};

/// The label of the row our migrator and device make.
const OURS: &str = "freehint migrator + freehint device + freehint.ko (bitmap)";

/// One row of the table: driver, runs, medians, integrity.
struct Row {
    label: &'static str,
    bytes: Option<f64>,
    total: Option<f64>,
    down: Option<f64>,
    integrity: String,
}

/// Formats the table.
fn table(rows: &[Row], qemu: &str, used: Option<f64>) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "freehint demo: live migration of a 4 GiB TCG guest, 300 MiB dirtied then freed, \
         init_on_alloc=1 ({qemu})\n"
    ));
    if let Some(u) = used {
        t.push_str(&format!(
            "guest memory in use before migrating: {u:.0} MiB\n"
        ));
    }
    t.push_str(&format!(
        "{:<58} {:>10} {:>10} {:>10} {:>10}  {}\n",
        "migrator, device, driver", "MB sent", "vs none", "total ms", "downtime", "integrity"
    ));
    let base = rows.first().and_then(|r| r.bytes);
    for r in rows {
        let f = |v: Option<f64>, div: f64| v.map_or("-".to_string(), |x| format!("{:.1}", x / div));
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
        let vs = match (r.bytes, base) {
            (Some(b), Some(n)) if n > 0.0 => format!("{:+.0} %", (b / n - 1.0) * 100.0),
            _ => "-".into(),
        };
        t.push_str(&format!(
            "{:<58} {:>10} {:>10} {:>10} {:>10}  {}\n",
            r.label,
            f(r.bytes, 1e6),
            vs,
            ms(r.total),
            ms(r.down),
            r.integrity
        ));
    }
    t
}

/// The demo's summary.
#[derive(Serialize)]
struct Summary {
    /// `bytes_<setup>` and `total_ms_<setup>`: medians of each setup that
    /// ran (none for a setup left out).
    #[serde(flatten)]
    medians: Medians,
    /// The text table.
    table: String,
    /// The chart.
    #[serde(skip_serializing_if = "Option::is_none")]
    picture: Option<String>,
    /// Why there is no chart.
    #[serde(skip_serializing_if = "Option::is_none")]
    picture_error: Option<String>,
    ok: bool,
}

/// Median figures per setup, keyed `<figure>_<setup>`.
type Medians = BTreeMap<String, Option<f64>>;

/// Runs the demo.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let reps = std::env::var("FREEHINT_DEMO_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let mut rows = Vec::new();
    let mut ok = true;
    let mut used = Vec::new();
    let mut s = Medians::new();
    for (d, label) in [
        (Driver::None, "QEMU migrator, no hints"),
        (
            Driver::Stock,
            "QEMU migrator + stock virtio_balloon + QEMU hints",
        ),
        (Driver::Freehint, "QEMU migrator + freehint.ko + QEMU hints"),
    ] {
        if !d.enabled() {
            rows.push(Row {
                label,
                bytes: None,
                total: None,
                down: None,
                integrity: "pending (left out by FREEHINT_MIGRATE_DRIVERS)".into(),
            });
            continue;
        }
        let (mut b, mut tt, mut dn) = (Vec::new(), Vec::new(), Vec::new());
        let mut verdicts = Vec::new();
        for rep in 0..reps {
            let cell = Cell::new(4096, d, Workload::DirtyFree);
            eprintln!("[demo] {label}: run {}/{reps}", rep + 1);
            let out = run_cell(
                &ctx.manifest,
                &ctx.log_dir,
                &cell,
                ctx.timeout_scale,
                &mut |l| eprintln!("[demo]   {l}"),
            )
            .unwrap_or_else(|e| CellOutcome::harness_error(&e));
            let good = out.ok() && !out.migrations.is_empty();
            ok &= good;
            verdicts.push(if good {
                let pages: u64 = out
                    .integrity
                    .iter()
                    .filter_map(|r| r.get("pages_checked").and_then(Value::as_u64))
                    .sum();
                format!("ok ({pages} pages checked)")
            } else {
                format!("FAILED: {}", out.problems.join("; "))
            });
            if let Some(m) = out.migrations.first() {
                b.push(m.transferred as f64);
                tt.push(m.total_ms as f64);
                dn.push(m.downtime_ms as f64);
            }
            if let Some(u) = out.ready.get("used_mib").and_then(Value::as_f64) {
                used.push(u);
            }
            let mut r = crate::migrate::cell_json(&cell, &out, 0);
            r.name = format!("demo/{}", d.name());
            ctx.record(r);
        }
        s.insert(format!("bytes_{}", d.name()), median(&b));
        s.insert(format!("total_ms_{}", d.name()), median(&tt));
        rows.push(Row {
            label,
            bytes: median(&b),
            total: median(&tt),
            down: median(&dn),
            integrity: verdicts.join(", "),
        });
    }
    let (row, good) = ours(ctx, reps, &mut s)?;
    ok &= good;
    rows.push(row);
    let text = table(&rows, &qemu_version(&ctx.manifest), median(&used));
    // tests/demo prints the table on stdout itself; a direct
    // `tests/vm/run demo` shows it on stderr beside the JSON lines.
    if std::env::var_os("FREEHINT_DEMO_TABLE_ON_STDOUT").is_none() {
        eprint!("\n{text}");
    }
    let dir = ctx.repo.join("target/vm/demo");
    let path = dir.join("table.txt");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, &text))
        .map_err(io_error("cannot write", &path))?;
    let mut summary = Summary {
        medians: s,
        table: path.display().to_string(),
        picture: None,
        picture_error: None,
        ok: false,
    };
    let png = dir.join("table.png");
    let chart: Vec<ChartRow> = rows.iter().map(chart_row).collect();
    let version = qemu_version(&ctx.manifest);
    let short = version
        .split(" (")
        .next()
        .unwrap_or(&version)
        .replace("QEMU emulator version", "QEMU");
    let title = format!("freehint demo: 4 GiB TCG guest, 300 MiB dirtied then freed, {short}");
    match draw_png(&chart, &title, &png) {
        Ok(()) => {
            summary.picture = Some(png.display().to_string());
        }
        Err(e) => {
            eprintln!("[demo] cannot draw {}: {e}", png.display());
            summary.picture_error = Some(e.to_string());
            ok = false;
        }
    }
    summary.ok = ok;
    Ok(fields(&summary))
}

/// The fourth row: our migrator, our device, freehint.ko.
fn ours(ctx: &mut Ctx, reps: usize, s: &mut Medians) -> Result<(Row, bool), HarnessError> {
    if !Driver::Freehint.enabled() {
        let row = Row {
            label: OURS,
            bytes: None,
            total: None,
            down: None,
            integrity: "pending (left out by FREEHINT_MIGRATE_DRIVERS)".into(),
        };
        return Ok((row, true));
    }
    own_migrate::sweep_stale_ram_files();
    let tools = build_tools(&ctx.repo)?;
    let cell = Cell::new(4096, Driver::Freehint, Workload::DirtyFree);
    let (mut b, mut tt, mut dn, mut verdicts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ok = true;
    for rep in 0..reps {
        eprintln!("[demo] {OURS}: run {}/{reps}", rep + 1);
        let opts = RunOpts {
            balloon: true,
            ..RunOpts::default()
        };
        let run = own_migrate::run_cell(ctx, &tools, &cell, Migrator::Ours, opts);
        let good = run.ok() && !run.hops.is_empty();
        ok &= good;
        let hop = run.hops.first();
        let pages = hop
            .and_then(|h| h.verdict.as_ref())
            .and_then(|v| v.get("pages_checked"))
            .and_then(Value::as_u64);
        verdicts.push(match (good, pages) {
            (true, Some(p)) => format!("ok ({p} pages checked)"),
            _ => format!("FAILED: {}", run.problems.join("; ")),
        });
        b.extend(hop.and_then(|h| h.bytes));
        tt.extend(hop.and_then(|h| h.total_ms));
        dn.extend(hop.and_then(|h| h.downtime_ms));
        let mut line = own_migrate::hop_json("demo/ours-freehint", &cell, Migrator::Ours, &run, 0);
        line.driver = Some("freehint");
        ctx.record(line);
    }
    s.insert("bytes_ours_freehint".into(), median(&b));
    s.insert("total_ms_ours_freehint".into(), median(&tt));
    let row = Row {
        label: OURS,
        bytes: median(&b),
        total: median(&tt),
        down: median(&dn),
        integrity: verdicts.join(", "),
    };
    Ok((row, ok))
}

fn chart_row(r: &Row) -> ChartRow {
    ChartRow {
        label: r.label.to_string(),
        mb_sent: r.bytes.map(|b| b / 1e6),
        downtime_ms: r.down,
        total_ms: r.total,
        integrity_ok: if r.integrity.starts_with("ok") {
            Some(true)
        } else if r.integrity.starts_with("FAILED") {
            Some(false)
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_driver_and_relative_bytes() {
        let rows = [
            Row {
                label: "no hints",
                bytes: Some(480e6),
                total: Some(2000.0),
                down: Some(30.0),
                integrity: "ok".into(),
            },
            Row {
                label: "stock",
                bytes: Some(240e6),
                total: Some(1700.0),
                down: Some(20.0),
                integrity: "ok".into(),
            },
            Row {
                label: "freehint.ko",
                bytes: None,
                total: None,
                down: None,
                integrity: "pending".into(),
            },
        ];
        let t = table(&rows, "QEMU 11.1.3", Some(350.0));
        assert!(t.contains("480.0"));
        assert!(t.contains("-50 %"));
        assert!(t
            .lines()
            .any(|l| l.starts_with("freehint.ko") && l.contains("pending")));
        assert_eq!(t.lines().count(), 6);
    }
}
