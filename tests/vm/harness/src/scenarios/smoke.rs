//! `smoke`: the image boots to userspace on both kernel flavours with every
//! vCPU online, and the stock `virtio_balloon.ko` and our `freehint.ko` load
//! and unload cleanly (the guest half is built into `tests/vm/guest/init` as
//! scenario `smoke`).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::qemu::BootSpec;
use crate::runner::{fields, Ctx, HarnessError};

/// The `smp` line of one boot: every vCPU online.
#[derive(Serialize)]
struct Smp<'a> {
    name: &'static str,
    ok: bool,
    /// vCPUs the guest saw.
    cpus: Option<u64>,
    expected: u32,
    flavour: &'a str,
}

/// The scenario's summary.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    boots: usize,
    /// `boot_s_<flavour>`: each boot's wall time, to a tenth.
    #[serde(flatten)]
    boot_s: BTreeMap<String, Value>,
}

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
        ctx.record(Smp {
            name: "smp",
            ok,
            cpus,
            expected: report.spec.smp,
            flavour: &report.spec.flavour,
        });
        reports.push(report);
    }
    Ok(fields(&Summary {
        ok: smp_ok && reports.iter().all(|r| r.ok),
        boots: reports.len(),
        boot_s: reports
            .iter()
            .map(|r| {
                (
                    format!("boot_s_{}", r.spec.flavour),
                    super::num((r.elapsed_s * 10.0).round() / 10.0),
                )
            })
            .collect(),
    }))
}
