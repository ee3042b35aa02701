//! `smoke`: the image boots to userspace on both kernel flavours with every
//! vCPU online, and the stock `virtio_balloon.ko` and our `freehint.ko` load
//! and unload cleanly (the guest half is built into `tests/vm/guest/init` as
//! scenario `smoke`).

use serde_json::{json, Map, Value};

use crate::qemu::BootSpec;
use crate::runner::{Ctx, HarnessError};

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let mut reports = Vec::new();
    let mut smp_ok = true;
    for flavour in ["normal", "debug"] {
        let mut spec = BootSpec::new("smoke");
        spec.flavour = flavour.into();
        spec.timeout = std::time::Duration::from_secs(180);
        let report = ctx.boot(spec)?;
        let cpus = report
            .results
            .iter()
            .find(|r| r.get("name").and_then(Value::as_str) == Some("userspace"))
            .and_then(|r| r.get("cpus"))
            .and_then(Value::as_u64);
        let ok = cpus == Some(u64::from(report.spec.smp));
        smp_ok &= ok;
        let mut r = Map::new();
        r.insert("name".into(), json!("smp"));
        r.insert("ok".into(), json!(ok));
        r.insert("cpus".into(), json!(cpus));
        r.insert("expected".into(), json!(report.spec.smp));
        r.insert("flavour".into(), json!(report.spec.flavour));
        ctx.record(r);
        reports.push(report);
    }
    let mut s = Map::new();
    s.insert("ok".into(), json!(smp_ok && reports.iter().all(|r| r.ok)));
    s.insert("boots".into(), json!(reports.len()));
    for r in &reports {
        s.insert(
            format!("boot_s_{}", r.spec.flavour),
            super::num((r.elapsed_s * 10.0).round() / 10.0),
        );
    }
    Ok(s)
}
