//! `bitmap` (CI): the freehint bitmap builder in a real kernel.
//!
//! Boots the normal flavour at {1, 6} GiB × {pc, q35} running guest script
//! `bitmap` (no false free, agreement with /proc/kpageflags, one bit per RAM
//! page with the PCI-hole gap folded out), then one debug (lockdep) boot
//! running `bitmap-lockdep` (load, 1000 builds under allocation churn,
//! unload). Summary: `false_free` summed, `max_lock_hold_us` maximum,
//! `walk_ms_6g` the largest walk of the 6 GiB boots.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{max_of, num, sum_of, walk_ms};
use crate::qemu::{BootSpec, Machine};
use crate::runner::{fields, Ctx, HarnessError};

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let mut reports = Vec::new();
    for mem_mib in [1024, 6144] {
        for machine in [Machine::Pc, Machine::Q35] {
            let mut spec = BootSpec::new("bitmap");
            spec.machine = machine;
            spec.mem_mib = mem_mib;
            spec.guest_args = vec![format!("machine={}", machine.name())];
            spec.timeout = Duration::from_secs(if mem_mib > 4096 { 600 } else { 300 });
            reports.push(ctx.boot(spec)?);
        }
    }
    let mut lockdep = BootSpec::new("bitmap-lockdep");
    lockdep.flavour = "debug".into();
    lockdep.timeout = Duration::from_secs(900);
    reports.push(ctx.boot(lockdep)?);

    let walk_6g = reports
        .iter()
        .filter(|r| r.spec.mem_mib == 6144)
        .filter_map(walk_ms)
        .reduce(f64::max);
    Ok(fields(&Summary {
        ok: reports.iter().all(|r| r.ok),
        false_free: sum_of(&reports, "false_free").map(num),
        walk_ms_6g: walk_6g.map(num),
        max_lock_hold_us: max_of(&reports, "max_lock_hold_us").map(num),
        boots: reports.len(),
    }))
}

/// The scenario's summary.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    /// Held pages the bitmaps called free, over every boot.
    false_free: Option<Value>,
    /// The slowest walk of a 6 GiB guest.
    walk_ms_6g: Option<Value>,
    max_lock_hold_us: Option<Value>,
    boots: usize,
}
