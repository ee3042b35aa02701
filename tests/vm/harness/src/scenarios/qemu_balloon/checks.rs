//! The checks of a bound driver: bind, inflate/deflate, stats, deflate on
//! OOM, unload while busy; each returns its result line.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::guest::{abs_diff_mib, Guest, MemInfoMib, Settled};
use super::{
    feature, BalloonBoot, ARMED_MARKER, BALLOON_DEV, FREE_TOLERANCE_MIB, F_DEFLATE_ON_OOM,
    F_FREE_PAGE_HINT, F_PAGE_POISON, F_STATS_VQ, INFLATE_TARGET_MIB, MEM_MIB, MIB, OOM_EXTRA_MIB,
    OOM_MIN_DEFLATE_MIB, OOM_TARGET_MIB, REBIND_TARGET_MIB, STATS_INTERVAL_S, STAT_UNSET,
    UNLOAD_TARGET_MIB, UNLOAD_TRIGGER_MIB,
};
use crate::runner::fields;

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
pub(crate) fn result(name: &str, r: Check) -> CheckLine {
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

pub(crate) fn err(e: impl std::fmt::Display) -> String {
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
pub(crate) fn check_stats(g: &mut Guest) -> Check {
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
pub(crate) fn check_oom(g: &mut Guest) -> Check {
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

#[cfg(test)]
mod tests {
    use super::*;

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
