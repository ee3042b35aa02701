//! `qemu-balloon` (CI): `freehint.ko` as a full virtio-balloon driver
//! against QEMU's own device (`-device virtio-balloon-pci,free-page-hint=on,
//! iothread=…,deflate-on-oom=on`): bind, inflate/deflate, stats, OOM
//! deflate, unload while busy, page poison.
//!
//! One [`Vm`] (QMP plus a serial console the harness reads and types
//! into) per boot; the guest half (`tests/vm/guest/scenarios/qemu-balloon.sh`)
//! answers one command per console line with one `@@RESULT` line, and this
//! side makes every verdict. Three boots of [`MEM_MIB`], normal kernel.
//! First boot:
//!
//! 1. **bind**: `insmod freehint.ko` binds the balloon (sysfs driver link
//!    `freehint`); the negotiated features (sysfs `features`) have STATS_VQ,
//!    DEFLATE_ON_OOM and FREE_PAGE_HINT (bits 1–3) and, without
//!    `init_on_free`, not PAGE_POISON (bit 4: free pages hold nothing
//!    particular, so the driver must not claim a poison value);
//! 2. **inflate/deflate**: QMP `balloon` to 3/4 of RAM, `query-balloon`
//!    `actual` reaches it; with DEFLATE_ON_OOM the driver (as Linux's) keeps
//!    inflated pages in the managed count, so `MemTotal` stays and free
//!    memory (`MemFree` plus the per-CPU lists) drops by the inflated
//!    amount; back to full size, `actual` and free memory return;
//! 3. **stats**: `guest-stats-polling-interval` 2 s, then `guest-stats`
//!    until `last-update` advances: free, total and available memory are
//!    real values that agree with the guest's `/proc/meminfo`;
//! 4. **deflate on OOM**: balloon to [`OOM_TARGET_MIB`], then the guest
//!    maps and keeps [`OOM_EXTRA_MIB`] more than it has free (`fhwork
//!    dirty-keep`): the driver's OOM notifier must deflate (`actual` grows)
//!    and no process is killed; the kept pages verify;
//! 5. **unload while busy**: balloon to [`UNLOAD_TARGET_MIB`] and, while
//!    `actual` is still on its way, `rmmod freehint`: succeeds, the driver
//!    gave back fewer pages than the target (it was still inflating), the
//!    pages come back (`actual` = RAM), the balloon is left unbound;
//!    `insmod` binds again; sysfs unbind/bind works and the rebound driver
//!    inflates and deflates.
//!
//! At the end of that boot a migration to a file (`exec:cat > FILE`)
//! makes QEMU ask for hints and write the device state: the reference for
//! check 6 (no PAGE_POISON: no page-poison subsection in the stream).
//!
//! Second boot, `deflate-on-oom=off`: bind (bit 2 not negotiated) and
//! inflate/deflate again: now the inflated pages leave the managed count,
//! `MemTotal` falls by exactly the balloon and comes back.
//!
//! Third boot, `init_on_free=1` (freed pages are zeroed): 6. **poison**:
//! PAGE_POISON negotiated (bit 4), the driver says it reported
//! `poison_val` 0, and QEMU holds 0: QMP has no read-out of `poison_val`
//! (`x-query-virtio-status` on the balloon aborts QEMU 11.1.3), so it is
//! read from the migration stream, whose
//! `virtio-balloon-device/page-poison` subsection QEMU writes only when
//! PAGE_POISON is negotiated; and hinting still works: during that
//! migration the free page virtqueue's `used-idx` moves and a round ends
//! `complete` (or `done`).
//!
//! Every boot's console must be free of kernel complaints
//! ([`splat_problems`]) and the guest script must end with rc 0.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::migrate::qemu_version;
use crate::qemu::BootSpec;
use crate::runner::{fields, Ctx, HarnessError};
use crate::vm::{splat_problems, Vm};

/// Guest RAM (MiB).
pub const MEM_MIB: u64 = 1024;
/// Guest size of the inflate check (3/4 of RAM).
pub const INFLATE_TARGET_MIB: u64 = MEM_MIB * 3 / 4;
/// Guest size before the OOM allocation.
pub const OOM_TARGET_MIB: u64 = 384;
/// MiB the OOM allocation asks for beyond the guest's `MemFree`.
pub const OOM_EXTRA_MIB: u64 = 128;
/// Least growth of `actual` (MiB) that counts as deflation on OOM.
pub const OOM_MIN_DEFLATE_MIB: u64 = 64;
/// Far guest size of the unload check (an inflation of 3/4 of RAM).
pub const UNLOAD_TARGET_MIB: u64 = MEM_MIB / 4;
/// The guest unloads the driver once its free memory fell by this much
/// (MiB) after the far inflation began.
pub const UNLOAD_TRIGGER_MIB: u64 = 16;
/// Line the guest prints when it watches its free memory for the unload.
pub const ARMED_MARKER: &str = "@@BALLOON armed";
/// Guest size the rebound driver inflates to.
pub const REBIND_TARGET_MIB: u64 = MEM_MIB * 7 / 8;
/// Allowed gap (MiB) between the inflated amount and the fall of free
/// memory (`MemFree` + per-CPU lists), between free memory before the
/// inflation and after the deflation, and between `guest-stats` free
/// memory and `MemFree`.
pub const FREE_TOLERANCE_MIB: u64 = 16;
/// Stats polling interval (s).
pub const STATS_INTERVAL_S: u64 = 2;
/// QOM path of the balloon proxy (`id=balloon0`; see [`crate::migrate::BALLOON_QOM`]).
pub const BALLOON_DEV: &str = "/machine/peripheral/balloon0";
/// Line the guest script prints when it waits for commands.
pub const READY_MARKER: &str = "@@BALLOON ready";
/// Feature bits (virtio 1.2 §5.5.3).
const F_STATS_VQ: usize = 1;
const F_DEFLATE_ON_OOM: usize = 2;
const F_FREE_PAGE_HINT: usize = 3;
const F_PAGE_POISON: usize = 4;
/// QEMU's "not set" value of a guest stat.
const STAT_UNSET: u64 = u64::MAX;
const MIB: u64 = 1 << 20;

mod checks;
mod guest;
mod stream;

pub(crate) use checks::{check_bind, check_inflate, check_line, check_unload, Check, Checked};
use checks::{check_oom, check_stats, result, CheckLine};
pub(crate) use guest::Guest;
pub(crate) use stream::check_stream;

/// What differs between the boots of the scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonBoot {
    /// `init_on_free=1` on the kernel command line (the poison boot).
    pub init_on_free: bool,
    /// The balloon offers DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
}

impl BalloonBoot {
    /// The usual boot: DEFLATE_ON_OOM, no `init_on_free`.
    pub const PLAIN: BalloonBoot = BalloonBoot {
        init_on_free: false,
        deflate_on_oom: true,
    };
}

/// The boot without DEFLATE_ON_OOM.
const NO_DOOM: BalloonBoot = BalloonBoot {
    deflate_on_oom: false,
    ..BalloonBoot::PLAIN
};

/// The poison boot (`init_on_free=1`).
const POISON: BalloonBoot = BalloonBoot {
    init_on_free: true,
    ..BalloonBoot::PLAIN
};

/// The boot: 1 GiB, QEMU's balloon with hints (on an iothread) and
/// DEFLATE_ON_OOM if asked; `init_on_free=1` for the poison boot.
pub fn boot_spec(boot: BalloonBoot) -> BootSpec {
    let BalloonBoot {
        init_on_free,
        deflate_on_oom,
    } = boot;
    let mut spec = BootSpec::new("qemu-balloon");
    spec.mem_mib = MEM_MIB;
    spec.extra_qemu_args = vec![
        "-object".into(),
        "iothread,id=fhio".into(),
        "-device".into(),
        format!(
            "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=fhio,deflate-on-oom={}",
            if deflate_on_oom { "on" } else { "off" }
        ),
    ];
    if init_on_free {
        spec.extra_cmdline = vec!["init_on_free=1".into()];
    }
    spec
}

/// Whether feature `bit` is set in a sysfs `features` string (one `0`/`1`
/// per bit, bit 0 first).
pub fn feature(features: &str, bit: usize) -> bool {
    features.as_bytes().get(bit) == Some(&b'1')
}

/// Boots one guest, waits for the script, runs `body`, ends the guest and
/// records the boot (clean exit, rc 0, no kernel complaint).
pub(crate) fn with_guest(
    ctx: &mut Ctx,
    role: &str,
    mut spec: BootSpec,
    body: &mut dyn FnMut(&mut Guest, &mut Ctx),
) -> Result<bool, HarnessError> {
    ctx.apply_overrides(&mut spec);
    let unit = ctx.scaled(Duration::from_secs(1));
    eprintln!(
        "[balloon] boot {role} ({} flavour): {}",
        spec.flavour,
        spec.cmdline()
    );
    let started = Instant::now();
    let vm = Vm::start(&ctx.manifest, &spec, &ctx.log_dir, role, None)?;
    let mut g = Guest { vm, unit };
    let mut problems = Vec::new();
    match g.vm.wait_line(0, "the guest script", unit * 300, |l| {
        l.contains(READY_MARKER)
    }) {
        Ok(_) => {
            body(&mut g, ctx);
            if let Err(e) = g.vm.send_line("quit") {
                problems.push(e.to_string());
            }
            if !g.vm.wait_exit(unit * 120) {
                problems.push("guest did not power off after quit".into());
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    let out = g.vm.output();
    if out.done_rc != Some(0) {
        problems.push(format!("guest script rc {:?}", out.done_rc));
    }
    splat_problems(&g.vm, &mut problems);
    let ok = problems.is_empty();
    ctx.record(GuestBootRecord {
        name: format!("balloon/boot/{role}"),
        ok,
        flavour: &spec.flavour,
        cmdline: &spec.extra_cmdline,
        device: spec.extra_qemu_args.get(3),
        elapsed_s: started.elapsed().as_secs(),
        problems: (!ok).then_some(&problems),
        log: (!ok).then(|| g.vm.serial_log.display().to_string()),
    });
    Ok(ok)
}

/// The `balloon/boot/<role>` line of a guest [`with_guest`] ran.
#[derive(Serialize)]
struct GuestBootRecord<'a> {
    name: String,
    ok: bool,
    flavour: &'a str,
    cmdline: &'a [String],
    /// The balloon device's `-device` argument.
    device: Option<&'a String>,
    elapsed_s: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<String>,
}

/// Runs one named check, records its line, returns whether it passed.
fn step(ctx: &mut Ctx, name: &str, r: Check) -> bool {
    let line = result(name, r);
    let ok = line.ok;
    ctx.record(line);
    ok
}

/// Runs the scenario: three boots (DEFLATE_ON_OOM; without it; with
/// `init_on_free=1`).
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let started = Instant::now();
    let stream_file = ctx.log_dir.join("migration-stream.bin");
    let (mut bind_ok, mut inflate_ok, mut stats_ok, mut oom_ok, mut unload_ok) =
        (false, false, false, false, false);
    let mut normal_stream: Check = Err("not run".into());
    let b1 = with_guest(ctx, "bal", boot_spec(BalloonBoot::PLAIN), &mut |g, ctx| {
        eprintln!("[balloon]   bind, inflate, stats, oom_deflate, unload");
        bind_ok = step(ctx, "bind", check_bind(g, BalloonBoot::PLAIN));
        inflate_ok = step(ctx, "inflate", check_inflate(g, BalloonBoot::PLAIN));
        stats_ok = step(ctx, "stats", check_stats(g));
        oom_ok = step(ctx, "oom_deflate", check_oom(g));
        unload_ok = step(ctx, "unload", check_unload(g));
        // The reference for the poison check: no PAGE_POISON, no subsection.
        normal_stream = check_stream(g, &stream_file);
    })?;
    let b2 = with_guest(ctx, "nodoom", boot_spec(NO_DOOM), &mut |g, ctx| {
        eprintln!("[balloon]   bind and inflate without DEFLATE_ON_OOM");
        let b = step(ctx, "bind_no_deflate_on_oom", check_bind(g, NO_DOOM));
        let i = step(ctx, "inflate_no_deflate_on_oom", check_inflate(g, NO_DOOM));
        bind_ok &= b;
        inflate_ok &= i;
    })?;
    let mut poison_ok = false;
    let b3 = with_guest(ctx, "poison", boot_spec(POISON), &mut |g, ctx| {
        eprintln!("[balloon]   poison");
        let bind = check_bind(g, POISON);
        let stream = if bind.as_ref().is_ok_and(|b| b.ok) {
            check_stream(g, &stream_file)
        } else {
            Err("not bound with PAGE_POISON".into())
        };
        let normal = std::mem::replace(&mut normal_stream, Err("taken".into()));
        // QEMU holds poison_val 0 only where PAGE_POISON was negotiated.
        let normal_ok = normal
            .as_ref()
            .is_ok_and(|c| c.ok && c.fields.get("poison_subsection") == Some(&json!(false)));
        let poison_stream_ok = stream
            .as_ref()
            .is_ok_and(|c| c.ok && c.fields.get("qemu_poison_val") == Some(&json!(0)));
        let f = PoisonRecord {
            bind: result("bind", bind),
            stream: result("stream", stream),
            normal_boot_stream: result("normal_boot_stream", normal),
        };
        let ok =
            normal_ok && poison_stream_ok && f.bind.ok && f.stream.ok && f.normal_boot_stream.ok;
        poison_ok = step(
            ctx,
            "poison",
            Ok(Checked {
                ok,
                fields: fields(&f),
            }),
        );
    })?;
    Ok(fields(&checks_summary(
        ctx,
        started,
        &[
            ("bind_ok", bind_ok),
            ("inflate_ok", inflate_ok),
            ("stats_ok", stats_ok),
            ("oom_deflate_ok", oom_ok),
            ("unload_ok", unload_ok),
            ("poison_ok", poison_ok),
            ("boots_clean", b1 && b2 && b3),
        ],
    )))
}

/// The fields of the `poison` check's line: the poison boot's bind and
/// stream checks and the normal boot's stream check, each as its own line.
#[derive(Serialize)]
struct PoisonRecord {
    bind: CheckLine,
    stream: CheckLine,
    normal_boot_stream: CheckLine,
}

/// A balloon scenario's summary (see [`checks_summary`]).
#[derive(Serialize)]
pub(crate) struct ChecksSummary<'a> {
    /// Each named check's outcome, one key per check.
    #[serde(flatten)]
    checks: std::collections::BTreeMap<&'a str, bool>,
    elapsed_s: u64,
    qemu: String,
    ok: bool,
}

/// A balloon scenario's summary: each named check's outcome, `elapsed_s`
/// since `started`, the QEMU version and `ok` when every check passed.
pub(crate) fn checks_summary<'a>(
    ctx: &Ctx,
    started: Instant,
    checks: &[(&'a str, bool)],
) -> ChecksSummary<'a> {
    ChecksSummary {
        checks: checks.iter().copied().collect(),
        elapsed_s: started.elapsed().as_secs(),
        qemu: qemu_version(&ctx.manifest),
        ok: checks.iter().all(|&(_, ok)| ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_bits_read_from_sysfs_string() {
        // What QEMU 11.1.3 + freehint.ko negotiate without init_on_free:
        // STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT; VERSION_1 is bit 32.
        let s = "0111000000000000000000000000000010000000000000000000000000000000";
        assert!(feature(s, F_STATS_VQ) && feature(s, F_DEFLATE_ON_OOM));
        assert!(feature(s, F_FREE_PAGE_HINT) && !feature(s, F_PAGE_POISON));
        assert!(feature(s, 32) && !feature(s, 0));
        assert!(!feature("", 1) && !feature("01", 5));
    }

    #[test]
    fn boot_spec_has_the_device_and_poison_only_when_asked() {
        let a = boot_spec(BalloonBoot::PLAIN);
        assert!(a.extra_qemu_args.iter().any(|x| x.contains(
            "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=fhio,deflate-on-oom=on"
        )));
        assert!(!a.cmdline().contains("init_on_free"));
        assert!(a.cmdline().contains("fh.scenario=qemu-balloon"));
        assert!(boot_spec(BalloonBoot {
            init_on_free: true,
            ..BalloonBoot::PLAIN
        })
        .cmdline()
        .ends_with("init_on_free=1"));
        assert!(boot_spec(BalloonBoot {
            deflate_on_oom: false,
            ..BalloonBoot::PLAIN
        })
        .extra_qemu_args[3]
            .ends_with("deflate-on-oom=off"));
        assert!(crate::migrate::BALLOON_QOM.starts_with(BALLOON_DEV));
    }
}
