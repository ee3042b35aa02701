//! `bench-bitmap` (benchmark, not in CI): walk time and longest lock hold of
//! the bitmap builder in idle 1, 4 and 8 GiB guests (guest script
//! `bench-bitmap`). Writes every result to `target/bench/bitmap.json`.

use std::time::Duration;

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{max_of, num, walk_ms};
use crate::errors::io_error;
use crate::qemu::BootSpec;
use crate::runner::{fields, Ctx, HarnessError};

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let mut reports = Vec::new();
    for gib in [1u64, 4, 8] {
        let mut spec = BootSpec::new("bench-bitmap");
        spec.mem_mib = gib * 1024;
        spec.extra_cmdline = crate::qemu::host_tsc_cmdline();
        spec.timeout = Duration::from_secs(300 + 60 * gib);
        reports.push(ctx.boot(spec)?);
    }
    let mut s = Summary {
        ok: reports.iter().all(|r| r.ok),
        walk_ms: reports
            .iter()
            .map(|r| {
                (
                    format!("walk_ms_{}g", r.spec.mem_mib / 1024),
                    walk_ms(r).map(num),
                )
            })
            .collect(),
        max_lock_hold_us: max_of(&reports, "max_lock_hold_us").map(num),
        boots: reports.len(),
        json: None,
    };

    let bench_dir = ctx.repo.join("target/bench");
    let path = bench_dir.join("bitmap.json");
    let doc = BenchDoc {
        command: "tests/vm/run bench-bitmap",
        machine: "QEMU TCG (no KVM), 2 host cores",
        summary: &s,
        boots: reports
            .iter()
            .map(|r| Boot {
                mem_mib: r.spec.mem_mib,
                machine: r.spec.machine.name(),
                flavour: &r.spec.flavour,
                ok: r.ok,
                results: &r.results,
            })
            .collect(),
    };
    // Through a `Value`: its keys come out sorted, as the file has them.
    let doc = serde_json::to_value(&doc).unwrap_or_default();
    std::fs::create_dir_all(&bench_dir)
        .and_then(|()| {
            std::fs::write(
                &path,
                serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n",
            )
        })
        .map_err(io_error("cannot write", &path))?;
    eprintln!("[vmtest] wrote {}", path.display());
    s.json = Some(path.display().to_string());
    Ok(fields(&s))
}

/// The benchmark's summary.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    /// `walk_ms_<N>g`: the walk of each guest size.
    #[serde(flatten)]
    walk_ms: BTreeMap<String, Option<Value>>,
    max_lock_hold_us: Option<Value>,
    boots: usize,
    /// Where the benchmark file went (not in the file itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    json: Option<String>,
}

/// The benchmark file.
#[derive(Serialize)]
struct BenchDoc<'a> {
    command: &'static str,
    machine: &'static str,
    summary: &'a Summary,
    boots: Vec<Boot<'a>>,
}

/// One boot in the benchmark file, with the guest's results.
#[derive(Serialize)]
struct Boot<'a> {
    mem_mib: u64,
    machine: &'static str,
    flavour: &'a str,
    ok: bool,
    results: &'a [Map<String, Value>],
}
