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

use crate::migrate::{free_page_vq, migrate_to, qemu_version};
use crate::qemu::BootSpec;
use crate::runner::{fields, object, Ctx, HarnessError};
use crate::vm::{splat_problems, Vm, VmError};

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

/// The balloon's `actual` once it settled ([`Guest::wait_actual`]).
#[derive(Debug, Clone, Copy)]
struct Settled {
    /// `actual`, bytes.
    actual: u64,
    /// How long it took, ms.
    ms: u64,
}

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

/// One VM and its scaled timeout unit.
pub(crate) struct Guest {
    pub(crate) vm: Vm,
    pub(crate) unit: Duration,
}

impl Guest {
    /// Types `line` and returns the guest's `@@RESULT` named `name`.
    fn cmd(&mut self, line: &str, name: &str, secs: u64) -> Result<Map<String, Value>, VmError> {
        let from = self.vm.line_count();
        self.vm.send_line(line)?;
        self.answer(from, line, name, secs)
    }

    /// The first `@@RESULT` named `name` from console line `from` on.
    fn answer(
        &mut self,
        from: usize,
        line: &str,
        name: &str,
        secs: u64,
    ) -> Result<Map<String, Value>, VmError> {
        let what = format!("the guest's answer to `{line}`");
        let crate::vm::ResultLine { line: l, obj, .. } =
            self.vm
                .wait_result(from, name, &what, self.unit * secs as u32)?;
        Ok(obj.unwrap_or_else(|| object(json!({ "malformed": l }))))
    }

    /// `query-balloon` `actual` in bytes.
    fn actual(&mut self) -> Result<u64, VmError> {
        let q = self.vm.qmp().execute("query-balloon", None)?;
        Ok(q["actual"].as_u64().unwrap_or(0))
    }

    fn balloon(&mut self, mib: u64) -> Result<(), VmError> {
        self.vm
            .qmp()
            .execute("balloon", Some(json!({"value": mib * MIB})))?;
        Ok(())
    }

    /// Polls `actual` until `pred` holds (returns it and the wait in ms) or
    /// `secs` (scaled) pass (returns the last value as an error text).
    fn wait_actual(
        &mut self,
        what: &str,
        secs: u64,
        pred: impl Fn(u64) -> bool,
    ) -> Result<Settled, String> {
        let start = Instant::now();
        let limit = self.unit * secs as u32;
        loop {
            let a = self.actual().map_err(|e| e.to_string())?;
            if pred(a) {
                return Ok(Settled {
                    actual: a,
                    ms: start.elapsed().as_millis() as u64,
                });
            }
            if start.elapsed() >= limit {
                return Err(format!(
                    "{what}: actual still {} MiB after {}s",
                    a / MIB,
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn meminfo(&mut self, tag: &str) -> Result<MemInfo, VmError> {
        let r = self.cmd(&format!("meminfo {tag}"), "meminfo", 60)?;
        let kb = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(MemInfo {
            total_kb: kb("mem_total_kb"),
            free_kb: kb("mem_free_kb"),
            available_kb: kb("mem_available_kb"),
            pcp_kb: kb("pcp_kb"),
        })
    }
}

/// The guest's `/proc/meminfo` figures (KiB).
#[derive(Debug, Clone, Copy, Default)]
struct MemInfo {
    total_kb: u64,
    free_kb: u64,
    available_kb: u64,
    /// Pages on the per-CPU lists: free, but not in `MemFree`.
    pcp_kb: u64,
}

/// [`MemInfo`] in MiB, as result lines carry it.
#[derive(Debug, Clone, Copy, Serialize)]
struct MemInfoMib {
    mem_total_mib: u64,
    mem_free_mib: u64,
    mem_available_mib: u64,
    pcp_mib: u64,
}

impl MemInfo {
    fn mib(self) -> MemInfoMib {
        MemInfoMib {
            mem_total_mib: self.total_kb / 1024,
            mem_free_mib: self.free_kb / 1024,
            mem_available_mib: self.available_kb / 1024,
            pcp_mib: self.pcp_kb / 1024,
        }
    }

    /// Free bytes: `MemFree` plus the per-CPU lists (pages a deflate frees
    /// land there first, up to tens of MiB in a 1 GiB guest).
    fn free_bytes(self) -> u64 {
        (self.free_kb + self.pcp_kb) * 1024
    }
}

fn abs_diff_mib(a_bytes: u64, b_bytes: u64) -> u64 {
    a_bytes.abs_diff(b_bytes) / MIB
}

/// A check's result line: its outcome and fields, or a failed line
/// carrying the error.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CheckLine {
    /// Result name.
    pub(crate) name: String,
    /// Whether the check passed.
    pub(crate) ok: bool,
    /// Why it could not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// Its fields.
    #[serde(flatten)]
    pub(crate) fields: Map<String, Value>,
}

/// A result line `balloon/<name>` from `fields` (an error becomes a failed
/// line carrying it).
fn result(name: &str, r: Check) -> CheckLine {
    check_line(format!("balloon/{name}"), r)
}

/// The result line `name` of a check's outcome.
pub(crate) fn check_line(name: String, r: Check) -> CheckLine {
    match r {
        Ok(Checked { ok, fields }) => CheckLine {
            name,
            ok,
            error: None,
            fields,
        },
        Err(e) => CheckLine {
            name,
            ok: false,
            error: Some(e),
            fields: Map::new(),
        },
    }
}

/// What a check found: whether it passed and the fields of its line.
#[derive(Debug, Clone, Default)]
pub(crate) struct Checked {
    /// Whether it passed.
    pub(crate) ok: bool,
    /// The fields of its result line (each check's record, serialized).
    pub(crate) fields: Map<String, Value>,
}

/// A check's outcome (an error becomes a failed line carrying it).
pub(crate) type Check = Result<Checked, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Check 1 (and the poison boot's first half): load and bind; the features
/// must be those of `boot` (PAGE_POISON with `init_on_free`).
pub(crate) fn check_bind(g: &mut Guest, boot: BalloonBoot) -> Check {
    let BalloonBoot {
        init_on_free: poison,
        deflate_on_oom,
    } = boot;
    let r = g.cmd("bind", "bind", 120).map_err(err)?;
    let feats = r.get("features").and_then(Value::as_str).unwrap_or("");
    let driver = r.get("driver").and_then(Value::as_str).unwrap_or("");
    let log = r.get("log").and_then(Value::as_str).unwrap_or("");
    let has = |b| feature(feats, b);
    let want_poison_log = if poison {
        "poison=Some(0)"
    } else {
        "poison=None"
    };
    let ok = r.get("insmod_rc").and_then(Value::as_i64) == Some(0)
        && driver == "freehint"
        && has(F_STATS_VQ)
        && has(F_DEFLATE_ON_OOM) == deflate_on_oom
        && has(F_FREE_PAGE_HINT)
        && has(F_PAGE_POISON) == poison
        && log.contains(want_poison_log);
    let m = BindRecord {
        driver,
        features: feats.get(..8).unwrap_or(feats),
        stats_vq: has(F_STATS_VQ),
        deflate_on_oom: has(F_DEFLATE_ON_OOM),
        free_page_hint: has(F_FREE_PAGE_HINT),
        page_poison: has(F_PAGE_POISON),
        driver_log: log,
        guest: (!ok).then_some(&r),
    };
    Ok(Checked {
        ok,
        fields: fields(&m),
    })
}

/// The fields of the `bind` check's line.
#[derive(Serialize)]
struct BindRecord<'a> {
    driver: &'a str,
    /// The first eight feature bits.
    features: &'a str,
    stats_vq: bool,
    deflate_on_oom: bool,
    free_page_hint: bool,
    page_poison: bool,
    driver_log: &'a str,
    /// The guest's answer, on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest: Option<&'a Map<String, Value>>,
}

/// Check 2: inflate to 3/4 of RAM and back. With DEFLATE_ON_OOM the
/// inflated pages stay in the managed count (`MemTotal` unchanged), without
/// it they leave it (`MemTotal` falls by exactly the balloon), as Linux's
/// driver does.
pub(crate) fn check_inflate(g: &mut Guest, boot: BalloonBoot) -> Check {
    let deflate_on_oom = boot.deflate_on_oom;
    let full = MEM_MIB * MIB;
    let before = g.meminfo("before").map_err(err)?;
    g.balloon(INFLATE_TARGET_MIB).map_err(err)?;
    let Settled {
        actual: a_in,
        ms: ms_in,
    } = g.wait_actual("inflate", 120, |a| a == INFLATE_TARGET_MIB * MIB)?;
    let inflated = g.meminfo("inflated").map_err(err)?;
    g.balloon(MEM_MIB).map_err(err)?;
    let Settled {
        actual: a_out,
        ms: ms_out,
    } = g.wait_actual("deflate", 120, |a| a == full)?;
    let after = g.meminfo("deflated").map_err(err)?;
    let balloon_bytes = full - INFLATE_TARGET_MIB * MIB;
    let total_drop = before.total_kb.saturating_sub(inflated.total_kb) * 1024;
    let want_total_drop = if deflate_on_oom { 0 } else { balloon_bytes };
    let total_ok = total_drop == want_total_drop && after.total_kb == before.total_kb;
    let free_drop = before.free_bytes().saturating_sub(inflated.free_bytes());
    let drop_ok = abs_diff_mib(free_drop, balloon_bytes) <= FREE_TOLERANCE_MIB;
    let back_ok = abs_diff_mib(after.free_bytes(), before.free_bytes()) <= FREE_TOLERANCE_MIB;
    let ok = total_ok && drop_ok && back_ok;
    let m = InflateRecord {
        target_mib: INFLATE_TARGET_MIB,
        actual_mib: a_in / MIB,
        inflate_ms: ms_in,
        deflated_actual_mib: a_out / MIB,
        deflate_ms: ms_out,
        balloon_mib: balloon_bytes / MIB,
        free_drop_mib: free_drop / MIB,
        free_returned_diff_mib: abs_diff_mib(after.free_bytes(), before.free_bytes()),
        deflate_on_oom,
        mem_total_drop_mib: total_drop / MIB,
        mem_total_ok: total_ok,
        before: before.mib(),
        inflated: inflated.mib(),
        after: after.mib(),
    };
    Ok(Checked {
        ok,
        fields: fields(&m),
    })
}

/// The fields of the `inflate` check's line.
#[derive(Serialize)]
struct InflateRecord {
    target_mib: u64,
    actual_mib: u64,
    inflate_ms: u64,
    deflated_actual_mib: u64,
    deflate_ms: u64,
    balloon_mib: u64,
    free_drop_mib: u64,
    free_returned_diff_mib: u64,
    deflate_on_oom: bool,
    mem_total_drop_mib: u64,
    mem_total_ok: bool,
    before: MemInfoMib,
    inflated: MemInfoMib,
    after: MemInfoMib,
}

/// The balloon's `guest-stats` (bytes; [`STAT_UNSET`] when not reported).
#[derive(Debug, Clone, Copy)]
struct GuestStats {
    last_update: u64,
    free: u64,
    total: u64,
    available: u64,
}

/// Reads `guest-stats`.
fn guest_stats(g: &mut Guest) -> Result<GuestStats, String> {
    let v =
        g.vm.qmp()
            .execute(
                "qom-get",
                Some(json!({"path": BALLOON_DEV, "property": "guest-stats"})),
            )
            .map_err(|e| e.to_string())?;
    let s = |k: &str| v["stats"][k].as_u64().unwrap_or(STAT_UNSET);
    Ok(GuestStats {
        last_update: v["last-update"].as_u64().unwrap_or(0),
        free: s("stat-free-memory"),
        total: s("stat-total-memory"),
        available: s("stat-available-memory"),
    })
}

/// Check 3: the stats queue.
fn check_stats(g: &mut Guest) -> Check {
    g.vm.qmp()
        .execute(
            "qom-set",
            Some(
                json!({"path": BALLOON_DEV, "property": "guest-stats-polling-interval",
                "value": STATS_INTERVAL_S}),
            ),
        )
        .map_err(err)?;
    let start = Instant::now();
    let limit = g.unit * 60;
    let first = loop {
        let s = guest_stats(g)?;
        if s.last_update != 0 && s.free != STAT_UNSET {
            break s;
        }
        if start.elapsed() >= limit {
            return Err(format!("no guest-stats within {}s: {s:?}", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Wait for the next update, then read the guest's own figures.
    let second = loop {
        let s = guest_stats(g)?;
        if s.last_update > first.last_update {
            break s;
        }
        if start.elapsed() >= limit {
            return Err(format!(
                "guest-stats last-update stuck at {} for {}s",
                first.last_update,
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mi = g.meminfo("stats").map_err(err)?;
    let GuestStats {
        free,
        total,
        available: avail,
        ..
    } = second;
    let real = |v: u64| v != STAT_UNSET && v > 0;
    let total_ok = real(total) && abs_diff_mib(total, mi.total_kb * 1024) <= 1;
    let free_ok = real(free) && abs_diff_mib(free, mi.free_kb * 1024) <= FREE_TOLERANCE_MIB;
    let avail_ok = real(avail) && abs_diff_mib(avail, mi.available_kb * 1024) <= FREE_TOLERANCE_MIB;
    let ok = total_ok && free_ok && avail_ok && second.last_update > first.last_update;
    let m = StatsRecord {
        last_update: [first.last_update, second.last_update],
        stat_free_mib: free / MIB,
        stat_total_mib: total / MIB,
        stat_available_mib: avail / MIB,
        guest: mi.mib(),
        free_diff_mib: abs_diff_mib(free, mi.free_kb * 1024),
    };
    Ok(Checked {
        ok,
        fields: fields(&m),
    })
}

/// The fields of the `stats` check's line.
#[derive(Serialize)]
struct StatsRecord {
    /// `last-update` of the two readings.
    last_update: [u64; 2],
    stat_free_mib: u64,
    stat_total_mib: u64,
    stat_available_mib: u64,
    guest: MemInfoMib,
    free_diff_mib: u64,
}

/// Check 4: deflate on OOM.
fn check_oom(g: &mut Guest) -> Check {
    g.balloon(OOM_TARGET_MIB).map_err(err)?;
    let Settled { actual: a0, ms } =
        g.wait_actual("inflate before OOM", 180, |a| a == OOM_TARGET_MIB * MIB)?;
    let mi = g.meminfo("oom").map_err(err)?;
    let alloc_mib = mi.free_kb / 1024 + OOM_EXTRA_MIB;
    let r = g
        .cmd(&format!("oom {alloc_mib}"), "oom", 600)
        .map_err(err)?;
    let a1 = g.actual().map_err(err)?;
    let grown = a1.saturating_sub(a0) / MIB;
    let killed = r.get("killed").and_then(Value::as_u64);
    let rc = r.get("fhwork_rc").and_then(Value::as_i64);
    let verdict_ok = r.get("verdict").is_some_and(|v| v["ok"] == json!(true));
    let ok = grown >= OOM_MIN_DEFLATE_MIB && killed == Some(0) && rc == Some(0) && verdict_ok;
    // Back to full size for the next check.
    g.balloon(MEM_MIB).map_err(err)?;
    let back = g.wait_actual("deflate after OOM", 120, |a| a == MEM_MIB * MIB);
    let m = OomRecord {
        balloon_target_mib: OOM_TARGET_MIB,
        inflate_ms: ms,
        mem_free_mib: mi.free_kb / 1024,
        alloc_mib,
        actual_before_mib: a0 / MIB,
        actual_after_mib: a1 / MIB,
        deflated_on_oom_mib: grown,
        killed,
        fhwork_rc: rc,
        kept_pages_ok: verdict_ok,
        back_to_full: back.is_ok(),
        guest: (!ok).then_some(&r),
    };
    Ok(Checked {
        ok: ok && back.is_ok(),
        fields: fields(&m),
    })
}

/// The fields of the `oom_deflate` check's line.
#[derive(Serialize)]
struct OomRecord<'a> {
    balloon_target_mib: u64,
    inflate_ms: u64,
    mem_free_mib: u64,
    alloc_mib: u64,
    actual_before_mib: u64,
    actual_after_mib: u64,
    deflated_on_oom_mib: u64,
    killed: Option<u64>,
    fhwork_rc: Option<i64>,
    kept_pages_ok: bool,
    back_to_full: bool,
    /// The guest's answer, on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest: Option<&'a Map<String, Value>>,
}

/// Check 5: unload while inflating, load again, sysfs unbind/bind.
pub(crate) fn check_unload(g: &mut Guest) -> Check {
    let full = MEM_MIB * MIB;
    let target = UNLOAD_TARGET_MIB * MIB;
    // The guest unloads as soon as its free memory fell by
    // UNLOAD_TRIGGER_MIB, i.e. while the driver inflates (no round trip
    // through the host in between).
    let from = g.vm.line_count();
    let line = format!("rmmod {UNLOAD_TRIGGER_MIB}");
    g.vm.send_line(&line).map_err(err)?;
    g.vm.wait_line(from, "the guest to arm the unload", g.unit * 60, |l| {
        l.contains(ARMED_MARKER)
    })
    .map_err(err)?;
    g.balloon(UNLOAD_TARGET_MIB).map_err(err)?;
    let rm = g.answer(from, &line, "rmmod", 300).map_err(err)?;
    let a_after = g.wait_actual("deflate on rmmod", 60, |a| a == full);
    let returned = rm.get("pages_returned").and_then(Value::as_u64);
    let balloon_pages = (full - target) >> 12;
    let fell = rm.get("free_fell_mib").and_then(Value::as_u64);
    // Busy: the balloon held pages, but not yet all of the target.
    let busy = fell.is_some_and(|f| f >= UNLOAD_TRIGGER_MIB)
        && returned.is_some_and(|p| p > 0 && p < balloon_pages);
    let rm_ok = rm.get("rmmod_rc").and_then(Value::as_i64) == Some(0)
        && rm.get("unloaded") == Some(&json!(true))
        && rm.get("driver").and_then(Value::as_str) == Some("")
        && a_after.is_ok();
    g.balloon(MEM_MIB).map_err(err)?;
    let ins = g.cmd("insmod", "insmod", 120).map_err(err)?;
    let ins_ok = ins.get("insmod_rc").and_then(Value::as_i64) == Some(0)
        && ins.get("driver").and_then(Value::as_str) == Some("freehint");
    let rb = g.cmd("rebind", "rebind", 120).map_err(err)?;
    let rb_ok = rb.get("unbind_rc").and_then(Value::as_i64) == Some(0)
        && rb.get("driver_after_unbind").and_then(Value::as_str) == Some("")
        && rb.get("bind_rc").and_then(Value::as_i64) == Some(0)
        && rb.get("driver_after_bind").and_then(Value::as_str) == Some("freehint")
        && rb.get("bound_lines").and_then(Value::as_u64) == Some(1);
    // The rebound driver still works.
    g.balloon(REBIND_TARGET_MIB).map_err(err)?;
    let re_in = g.wait_actual("inflate after rebind", 120, |a| {
        a == REBIND_TARGET_MIB * MIB
    });
    g.balloon(MEM_MIB).map_err(err)?;
    let re_out = g.wait_actual("deflate after rebind", 120, |a| a == full);
    let ok = busy && rm_ok && ins_ok && rb_ok && re_in.is_ok() && re_out.is_ok();
    let mut m = UnloadRecord {
        target_mib: UNLOAD_TARGET_MIB,
        free_fell_at_rmmod_mib: fell,
        pages_returned: returned,
        balloon_target_pages: balloon_pages,
        busy,
        rmmod_ok: rm_ok,
        actual_after_rmmod_mib: a_after.as_ref().map(|a| a.actual / MIB).ok(),
        insmod_ok: ins_ok,
        rebind_ok: rb_ok,
        rebound_inflate_ok: re_in.is_ok() && re_out.is_ok(),
        guest: None,
        wait_error: None,
    };
    if !ok {
        m.guest = Some(UnloadGuest {
            rmmod: &rm,
            insmod: &ins,
            rebind: &rb,
        });
        // The last wait that failed.
        m.wait_error = [a_after.err(), re_in.err(), re_out.err()]
            .into_iter()
            .flatten()
            .last();
    }
    Ok(Checked {
        ok,
        fields: fields(&m),
    })
}

/// The fields of the `unload` check's line.
#[derive(Serialize)]
struct UnloadRecord<'a> {
    target_mib: u64,
    free_fell_at_rmmod_mib: Option<u64>,
    pages_returned: Option<u64>,
    balloon_target_pages: u64,
    busy: bool,
    rmmod_ok: bool,
    actual_after_rmmod_mib: Option<u64>,
    insmod_ok: bool,
    rebind_ok: bool,
    rebound_inflate_ok: bool,
    /// The guest's answers, on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest: Option<UnloadGuest<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait_error: Option<String>,
}

/// The guest's answers to the `unload` check's commands.
#[derive(Serialize)]
struct UnloadGuest<'a> {
    rmmod: &'a Map<String, Value>,
    insmod: &'a Map<String, Value>,
    rebind: &'a Map<String, Value>,
}

/// Name of the migration stream subsection QEMU writes for the balloon
/// only when PAGE_POISON is negotiated; it carries `poison_val` as QEMU
/// holds it (`hw/virtio/virtio-balloon.c`, `vmstate_virtio_balloon_page_poison`).
pub const POISON_SUBSECTION: &[u8] = b"virtio-balloon-device/page-poison";
/// `QEMU_VM_SUBSECTION` (`migration/savevm.c`).
const QEMU_VM_SUBSECTION: u8 = 0x05;

/// Finds the page-poison subsection in a migration stream: `0x05`, name
/// length, name, be32 version id, then the be32 `poison_val`. Returns
/// `poison_val` of the last occurrence, `None` when absent.
pub fn poison_val_in_stream(stream: &[u8]) -> Option<u32> {
    let n = POISON_SUBSECTION.len();
    let mut found = None;
    let mut i = 2;
    while i + n + 8 <= stream.len() {
        if &stream[i..i + n] == POISON_SUBSECTION
            && stream[i - 1] as usize == n
            && stream[i - 2] == QEMU_VM_SUBSECTION
        {
            let v = &stream[i + n + 4..i + n + 8];
            found = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            i += n;
        } else {
            i += 1;
        }
    }
    found
}

/// The driver's hint rounds so far ([`hint_rounds`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct HintRounds {
    /// How many rounds.
    pub(crate) count: u64,
    /// The `end=` word of each.
    pub(crate) ends: Vec<String>,
    /// The driver's round log.
    pub(crate) log: String,
}

/// The driver's hint rounds so far.
pub(crate) fn hint_rounds(g: &mut Guest) -> Result<HintRounds, String> {
    let h = g.cmd("hintlog", "hintlog", 60).map_err(err)?;
    let ends = h
        .get("ends")
        .and_then(Value::as_str)
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let log = h
        .get("log")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok(HintRounds {
        count: h.get("rounds").and_then(Value::as_u64).unwrap_or(0),
        ends,
        log,
    })
}

/// Migrates to a file (`exec:cat > FILE`): QEMU asks for hints (a new
/// round after every dirty bitmap sync; STOP when it no longer wants them)
/// and writes the device state; reads `poison_val` out of the stream, the
/// free page virtqueue's movement and the driver's round lines; resumes the
/// guest. ok: hints were consumed (`used-idx` moved) and at least one round
/// of this migration ended `complete` (or `done`: QEMU finished first); a
/// round may also end `stop` (QEMU stopped asking before it was sent).
pub(crate) fn check_stream(g: &mut Guest, file: &std::path::Path) -> Check {
    let _ = std::fs::remove_file(file);
    let r0 = hint_rounds(g)?.count;
    let vq0 = free_page_vq(&mut g.vm).map_err(err)?;
    let uri = format!("exec:cat > '{}'", file.display());
    let stats = migrate_to(&mut g.vm, &uri, g.unit * 300).map_err(err)?;
    let vq1 = free_page_vq(&mut g.vm).map_err(err)?;
    g.vm.qmp().execute("cont", None).map_err(err)?;
    let stream = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()));
    let _ = std::fs::remove_file(file);
    let stream = stream?;
    let poison_val = poison_val_in_stream(&stream);
    let stream_bytes = stream.len();
    drop(stream);
    let used = |v: &Value| v.get("used_idx").and_then(Value::as_u64);
    let delta = match (used(&vq0), used(&vq1)) {
        (Some(a), Some(b)) => Some(b.wrapping_sub(a) & 0xffff),
        _ => None,
    };
    // The last round logs once the guest runs again: poll (bounded).
    let start = Instant::now();
    let (ends, log) = loop {
        let HintRounds { ends, log, .. } = hint_rounds(g)?;
        let new: Vec<String> = ends.into_iter().skip(r0 as usize).collect();
        let done = new.iter().any(|e| e == "complete" || e == "done");
        if done || start.elapsed() >= g.unit * 30 {
            break (new, log);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let completed = ends.iter().any(|e| e == "complete" || e == "done");
    let ok = delta.is_some_and(|d| d > 0) && completed;
    let m = StreamRecord {
        poison_subsection: poison_val.is_some(),
        qemu_poison_val: poison_val,
        stream_bytes,
        free_page_vq_used_delta: delta,
        round_ends: ends,
        last_round_log: log,
        migration_mb: stats.transferred / 1_000_000,
        migration_ms: stats.total_ms,
    };
    Ok(Checked {
        ok,
        fields: fields(&m),
    })
}

/// The fields of a migration-stream check's line.
#[derive(Serialize)]
struct StreamRecord {
    poison_subsection: bool,
    qemu_poison_val: Option<u32>,
    stream_bytes: usize,
    free_page_vq_used_delta: Option<u64>,
    round_ends: Vec<String>,
    last_round_log: String,
    migration_mb: u64,
    migration_ms: u64,
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

    #[test]
    fn poison_val_is_read_from_the_subsection() {
        let mut st = vec![0u8, 0x05, 0x05];
        let mut sub = vec![QEMU_VM_SUBSECTION, POISON_SUBSECTION.len() as u8];
        sub.extend_from_slice(POISON_SUBSECTION);
        sub.extend_from_slice(&1u32.to_be_bytes());
        sub.extend_from_slice(&0xaaaa_aaaau32.to_be_bytes());
        st.extend_from_slice(&sub);
        st.extend_from_slice(&[0x04, 0, 0, 0]);
        assert_eq!(poison_val_in_stream(&st), Some(0xaaaa_aaaa));
        // The name alone (e.g. in the JSON description at the end) is not it.
        let name_only = [&[0u8, 7][..], POISON_SUBSECTION, &[0; 8]].concat();
        assert_eq!(poison_val_in_stream(&name_only), None);
        // Cut short: no read past the end.
        assert_eq!(poison_val_in_stream(&sub[..sub.len() - 1]), None);
        assert_eq!(poison_val_in_stream(&[]), None);
    }

    #[test]
    fn failed_check_lines_carry_the_error() {
        let r = fields(&result("stats", Err("no stats".into())));
        assert_eq!(r["name"], "balloon/stats");
        assert_eq!(r["ok"], false);
        assert_eq!(r["error"], "no stats");
        let mut f = Map::new();
        f.insert("x".into(), json!(1));
        let r = fields(&result(
            "bind",
            Ok(Checked {
                ok: true,
                fields: f,
            }),
        ));
        assert_eq!((r["ok"].clone(), r["x"].clone()), (json!(true), json!(1)));
    }
}
