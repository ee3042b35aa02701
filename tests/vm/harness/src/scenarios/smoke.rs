//! `smoke`: the image boots to userspace on both kernel flavours, and the
//! stock `virtio_balloon.ko` and our `freehint.ko` load and unload cleanly
//! (the guest half is built into `tests/vm/guest/init` as scenario `smoke`).

use serde_json::{json, Map, Value};

use crate::qemu::BootSpec;
use crate::runner::{Ctx, HarnessError};

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let mut reports = Vec::new();
    for flavour in ["normal", "debug"] {
        let mut spec = BootSpec::new("smoke");
        spec.flavour = flavour.into();
        spec.timeout = std::time::Duration::from_secs(180);
        reports.push(ctx.boot(spec)?);
    }
    let mut s = Map::new();
    s.insert("ok".into(), json!(reports.iter().all(|r| r.ok)));
    s.insert("boots".into(), json!(reports.len()));
    for r in &reports {
        s.insert(
            format!("boot_s_{}", r.spec.flavour),
            super::num((r.elapsed_s * 10.0).round() / 10.0),
        );
    }
    Ok(s)
}
