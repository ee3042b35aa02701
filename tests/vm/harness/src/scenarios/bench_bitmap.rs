//! `bench-bitmap` (benchmark, not in CI): walk time and longest lock hold of
//! the bitmap builder in idle 1, 4 and 8 GiB guests (guest script
//! `bench-bitmap`). Writes every result to `target/bench/bitmap.json`.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{max_of, num, walk_ms};
use crate::errors::io_error;
use crate::qemu::BootSpec;
use crate::runner::{Ctx, HarnessError};

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
    let mut s = Map::new();
    s.insert("ok".into(), json!(reports.iter().all(|r| r.ok)));
    for r in &reports {
        let key = format!("walk_ms_{}g", r.spec.mem_mib / 1024);
        s.insert(key, walk_ms(r).map_or(Value::Null, num));
    }
    s.insert(
        "max_lock_hold_us".into(),
        max_of(&reports, "max_lock_hold_us").map_or(Value::Null, num),
    );
    s.insert("boots".into(), json!(reports.len()));

    let bench_dir = ctx.repo.join("target/bench");
    let path = bench_dir.join("bitmap.json");
    let doc = json!({
        "command": "tests/vm/run bench-bitmap",
        "machine": "QEMU TCG (no KVM), 2 host cores",
        "summary": Value::Object(s.clone()),
        "boots": reports.iter().map(|r| json!({
            "mem_mib": r.spec.mem_mib,
            "machine": r.spec.machine.name(),
            "flavour": r.spec.flavour,
            "ok": r.ok,
            "results": r.results,
        })).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&bench_dir)
        .and_then(|()| {
            std::fs::write(
                &path,
                serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n",
            )
        })
        .map_err(io_error("cannot write", &path))?;
    eprintln!("[vmtest] wrote {}", path.display());
    s.insert("json".into(), json!(path.display().to_string()));
    Ok(s)
}
