//! `vfio-hostile`: a hostile guest driver against `freehint-vfio-user`.
//!
//! The guest program `fhtool hostile` (tests/guest-tools/src/hostile.rs)
//! unbinds `virtio-pci`, drives BAR0 with 4000 rounds of garbage (random
//! features, queue sizes and ring addresses, DRIVER_OK, notify storms,
//! config writes, ring scribbles), resets and rebinds. Then the stock
//! driver must reach DRIVER_OK again and the whole `vfio-stock` host step
//! must pass (inflate with the memfd check, stats, a hint round with no held
//! page in the set). The server must have logged the rejections and its
//! anonymous memory must stay bounded (reported before the boot and after
//! the hostile run, at most 64 MiB).

use serde::Serialize;
use serde_json::{Map, Value};

use super::vfio_stock::balloon_round;
use crate::runner::{fields, Ctx, HarnessError};

/// Bound on the server's anonymous memory after the hostile run, kB.
const MAX_ANON_KB: u64 = 64 * 1024;

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let r = balloon_round(ctx, "vfio-hostile", "hostile")?;
    let n = |k: &str| r.get(k).and_then(Value::as_u64);
    // The server exits when QEMU goes: its memory is taken while the guest
    // waits after the hostile run (and the stock driver's rebind).
    let anon_after = n("server_anon_kb_guest_ready");
    let warnings = n("server_warnings").unwrap_or(0);
    let ok = r.get("ok") == Some(&Value::Bool(true))
        && anon_after.is_some_and(|a| a <= MAX_ANON_KB)
        && warnings > 0;
    let pick = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
    Ok(fields(&Summary {
        ok,
        server_anon_kb_before: pick("server_anon_kb_before"),
        server_anon_kb_guest_ready: pick("server_anon_kb_guest_ready"),
        server_warnings: pick("server_warnings"),
        false_free: pick("false_free"),
        inflate_freed_kb: pick("inflate_freed_kb"),
        host_free_pages: pick("host_free_pages"),
        round_ms: pick("round_ms"),
    }))
}

/// The scenario's summary: figures of the round's line.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    server_anon_kb_before: Value,
    server_anon_kb_guest_ready: Value,
    server_warnings: Value,
    false_free: Value,
    inflate_freed_kb: Value,
    host_free_pages: Value,
    round_ms: Value,
}
