//! `vfio-freehint`: `freehint.ko` against `freehint-vfio-user`.
//!
//! Bitmap protocol (FREE_PAGE_BITMAP) at {1, 6} GiB × {pc, q35}, then the
//! standard protocol (server `--no-bitmap`) at pc 1 GiB and q35 6 GiB. Each
//! boot (guest script `vfio-freehint`): the driver binds, the host runs one
//! hint round and dumps the set it received; right after, the guest builds
//! freehint's bitmap over the device's layout (debugfs) and dumps it with
//! /proc/kpageflags and the pfns of 32 MiB it holds. Checks per boot:
//! `false_free` = 0 (no held page in the host's set) and
//! `bitmap_mismatch_bits` (host set vs the guest's bitmap a moment later,
//! the guest is quiet) at most 1 % of the free pages, for both protocols
//! (the standard round walks with the same builder and sends its runs); the
//! summary reports both summed over the boots.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::vfio_stock::{boot_round, Round};
use crate::qemu::Machine;
use crate::runner::{fields, Ctx, HarnessError};
use crate::vfio::{overlay_initramfs, server_binary};

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let bin = server_binary(&ctx.repo)?;
    let initramfs = overlay_initramfs(ctx)?;
    let cells: [(&str, Machine, u64, &[&str]); 6] = [
        ("bitmap", Machine::Pc, 1024, &["--no-reporting"]),
        ("bitmap", Machine::Q35, 1024, &["--no-reporting"]),
        ("bitmap", Machine::Pc, 6144, &["--no-reporting"]),
        ("bitmap", Machine::Q35, 6144, &["--no-reporting"]),
        (
            "standard",
            Machine::Pc,
            1024,
            &["--no-reporting", "--no-bitmap"],
        ),
        (
            "standard",
            Machine::Q35,
            6144,
            &["--no-reporting", "--no-bitmap"],
        ),
    ];
    let mut ok = true;
    let (mut mismatch, mut false_free, mut boots) = (0u64, 0u64, 0u64);
    let mut per = BTreeMap::new();
    for (proto, machine, mem, args) in cells {
        let tag = format!("freehint-{proto}");
        let r = boot_round(
            ctx,
            &Round {
                machine,
                mem_mib: mem,
                server_args: args,
                ..Round::new(&bin, &initramfs, "vfio-freehint", &tag)
            },
        )?;
        boots += 1;
        let n = |k: &str| r.get(k).and_then(Value::as_u64);
        let mm = n("bitmap_mismatch_bits");
        let host_free = n("host_free_pages").unwrap_or(0);
        // The guest is quiet, but not frozen: allow 1 % drift between the
        // host's set and the guest's rebuild, and report the count. Both
        // protocols walk with the same builder (buddy and per-CPU lists), so
        // the bound is the same.
        let drift_ok = mm.is_some_and(|m| m <= host_free / 100);
        let extra = n("host_not_in_guest");
        let missed = n("guest_not_in_host");
        let cell_ok =
            r.get("ok") == Some(&Value::Bool(true)) && drift_ok && n("false_free") == Some(0);
        // The bitmap protocol must have been used iff offered.
        let bitmap_acked = n("acked_features").is_some_and(|f| f & (1 << 23) != 0);
        let cell_ok = cell_ok && bitmap_acked == (proto == "bitmap");
        ok &= cell_ok;
        mismatch += mm.unwrap_or(0);
        false_free += n("false_free").unwrap_or(u64::MAX / 16);
        per.insert(
            format!("{proto}-{}-{}m", machine.name(), mem),
            CellSummary {
                ok: cell_ok,
                bitmap_mismatch_bits: mm,
                host_not_in_guest: extra,
                guest_not_in_host: missed,
                host_free_pages: host_free,
                round_ms: r.get("round_ms").cloned(),
                bitmap_acked,
            },
        );
    }
    Ok(fields(&Summary {
        ok,
        bitmap_mismatch_bits: mismatch,
        false_free,
        boots,
        cells: per,
    }))
}

/// A cell's entry in the scenario's summary.
#[derive(Serialize)]
struct CellSummary {
    ok: bool,
    bitmap_mismatch_bits: Option<u64>,
    host_not_in_guest: Option<u64>,
    guest_not_in_host: Option<u64>,
    host_free_pages: u64,
    round_ms: Option<Value>,
    /// Whether the driver acked the bitmap protocol.
    bitmap_acked: bool,
}

/// The scenario's summary: totals over the cells and every cell's entry.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    bitmap_mismatch_bits: u64,
    false_free: u64,
    boots: u64,
    cells: BTreeMap<String, CellSummary>,
}
