//! `distro-hint` (CI): `freehint.ko` on Debian's own kernel, unmodified
//! (flavour `distro`, built by `tests/vm/build-distro`: the kernel package
//! trixie-backports serves, its own `virtio_balloon.ko`, our module built
//! against rust/ metadata regenerated from the matching linux-source).
//!
//! One 1 GiB boot against QEMU's `virtio-balloon-pci,free-page-hint=on,
//! iothread=…,deflate-on-oom=on`; the guest half is
//! `tests/vm/guest/scenarios/distro-hint.sh`, which first checks the stock
//! driver and then runs the `qemu-balloon` command loop:
//!
//! 1. **stock**: the distribution's `virtio_balloon.ko` binds the balloon;
//!    `freehint.ko` loads beside it but takes nothing; both unload and the
//!    balloon is left unbound; the kernel is the manifest's release;
//! 2. **bind**: `insmod freehint.ko` binds (features STATS_VQ,
//!    DEFLATE_ON_OOM, FREE_PAGE_HINT, no PAGE_POISON), as `qemu-balloon`;
//! 3. **inflate**: to 3/4 of RAM and back, `actual` and free memory follow;
//! 4. **hint**: a migration to a file makes QEMU ask for free page hints:
//!    the free page virtqueue's `used-idx` moves and a round ends `complete`
//!    (or `done`);
//! 5. **unload**: `rmmod` while inflating, `insmod` again, sysfs
//!    unbind/bind, the rebound driver inflates and deflates.
//!
//! The boot must end cleanly with no kernel complaint on the console (an
//! unsigned module's taint message is not one).

use std::path::PathBuf;

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::qemu_balloon::{
    boot_spec, check_bind, check_inflate, check_line, check_stream, check_unload, checks_summary,
    with_guest, BalloonBoot, Check, Checked, ChecksSummary, Guest,
};
use crate::runner::{fields, Ctx, HarnessError};

/// The flavour of Debian's kernel in the (merged) manifest.
pub const FLAVOUR: &str = "distro";

/// The distro kernel of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistroKernel {
    /// Its release (`uname -r`).
    pub release: String,
    /// Its Debian package.
    pub package: String,
}

/// The distro kernel, or the error that tells the user to build it.
pub fn distro_kernel(ctx: &Ctx) -> Result<DistroKernel, HarnessError> {
    let f = ctx.manifest.flavours.get(FLAVOUR).ok_or_else(|| {
        HarnessError::Other(
            "no distro kernel image (flavour 'distro' in target/vm/distro/manifest.json): \
             run tests/vm/build-distro"
                .into(),
        )
    })?;
    Ok(DistroKernel {
        release: f.release.clone().unwrap_or_default(),
        package: f.package.clone().unwrap_or_default(),
    })
}

/// Check 1: the guest's `stock` line (printed before the command loop).
fn check_stock(g: &mut Guest, release: &str) -> Check {
    let crate::vm::ResultLine { line, obj, .. } =
        g.vm.wait_result(0, "stock", "the guest's stock driver check", g.unit * 60)
            .map_err(|e| e.to_string())?;
    let r = obj.ok_or_else(|| format!("malformed stock line: {line}"))?;
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let kernel_ok = s("kernel") == release;
    let ok = crate::guest::result_ok(&r)
        && kernel_ok
        && s("stock_bound") == "virtio_balloon"
        && s("bound_with_both") == "virtio_balloon"
        && r.get("freehint_loaded_beside") == Some(&json!(true))
        && s("bound_after_unload").is_empty();
    let mut m = r.clone();
    m.remove("name");
    m.remove("ok");
    m.insert("expected_kernel".into(), json!(release));
    Ok(Checked { ok, fields: m })
}

/// Records one check as `distro-hint/<name>` (an error becomes a failed
/// line carrying it); returns whether it passed.
fn record(ctx: &mut Ctx, name: &str, r: Check) -> bool {
    let line = check_line(format!("distro-hint/{name}"), r);
    let ok = line.ok;
    ctx.record(line);
    ok
}

/// The scenario's summary: the balloon checks' and the distro kernel.
#[derive(Serialize)]
struct Summary<'a> {
    #[serde(flatten)]
    checks: ChecksSummary<'a>,
    kernel: String,
    package: String,
}

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let DistroKernel { release, package } = distro_kernel(ctx)?;
    let started = std::time::Instant::now();
    let stream_file: PathBuf = ctx.log_dir.join("migration-stream.bin");
    let mut spec = boot_spec(BalloonBoot::PLAIN);
    spec.flavour = FLAVOUR.into();
    spec.guest_scenario = "distro-hint".into();
    let mut oks = [false; 5];
    let boot_ok = with_guest(ctx, "distro", spec, &mut |g, ctx| {
        eprintln!("[distro-hint]   stock, bind, inflate, hint, unload ({release})");
        oks[0] = record(ctx, "stock", check_stock(g, &release));
        oks[1] = record(ctx, "bind", check_bind(g, BalloonBoot::PLAIN));
        oks[2] = record(ctx, "inflate", check_inflate(g, BalloonBoot::PLAIN));
        oks[3] = record(ctx, "hint", check_stream(g, &stream_file));
        oks[4] = record(ctx, "unload", check_unload(g));
    })?;
    let [stock_ok, bind_ok, inflate_ok, hint_ok, unload_ok] = oks;
    let checks = checks_summary(
        ctx,
        started,
        &[
            ("stock_ok", stock_ok),
            ("bind_ok", bind_ok),
            ("inflate_ok", inflate_ok),
            ("hint_ok", hint_ok),
            ("unload_ok", unload_ok),
            ("boot_clean", boot_ok),
        ],
    );
    Ok(fields(&Summary {
        checks,
        kernel: release,
        package,
    }))
}
