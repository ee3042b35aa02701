//! `vfio-stock`: Linux's stock `virtio_balloon` driver against
//! `freehint-vfio-user` (our device as a vfio-user PCI device in QEMU 11.1).
//!
//! One pc 1 GiB boot (guest script `vfio-stock`): the driver binds and
//! reaches DRIVER_OK; the host inflates to 64 MiB and the guest RAM QEMU's
//! memfd holds drops by about that much, deflates back; statistics arrive;
//! a standard hint round completes and the server dumps the free set it
//! collected (`hint-dump`); after DONE the guest dumps /proc/kpageflags and
//! the pfns of 32 MiB it holds. Checks: no held page in the host's set
//! (`false_free`), host-free pages not free in the guest afterwards
//! (`not_buddy`) under 1 %, the set covers part of the ground truth.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::errors::io_error;
use crate::qemu::{BootSpec, Machine};
use crate::runner::{fields, Ctx, HarnessError};
use crate::vfio::{
    compare, memfd_kb, overlay_initramfs, read_dump, server_binary, Comparison, RamLayout, Server,
    VfioBoot, VfioOutcome,
};

/// Inflate target of the host step, 4 KiB pages (64 MiB).
const INFLATE_PAGES: u64 = 16384;

fn other(msg: impl Into<String>) -> HarnessError {
    HarnessError::Other(msg.into())
}

fn field(m: &Map<String, Value>, k: &str) -> u64 {
    m.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Polls `status` until `actual` equals `want` (60 s).
fn wait_actual(server: &Server, want: u64) -> Result<(), HarnessError> {
    let t0 = Instant::now();
    loop {
        let st = server.ctl("status")?;
        if field(&st, "actual") == want {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(other(format!(
                "balloon actual {} never reached {want}",
                field(&st, "actual")
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the host step inflates and deflates the balloon (with the memfd
/// check and the statistics) before its hint round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalloonStep {
    /// Inflate to [`INFLATE_PAGES`], deflate, wait for statistics.
    Inflate,
    /// The hint round only.
    Skip,
}

/// The host step while the guest waits: DRIVER_OK, optionally inflate/
/// deflate with the memfd check and stats, then one hint round, its dump
/// to the server's dump file `dump_name`, and DONE. Returns the figures; an
/// error fails the boot.
pub fn host_round(
    server: &Server,
    qemu_pid: u32,
    balloon: BalloonStep,
    dump_name: &str,
    figures: &mut HostFigures,
) -> Result<(), HarnessError> {
    // Here the guest has run whatever it ran before (the hostile driver).
    figures.server_anon_kb_guest_ready = Some(server.status_kb("RssAnon"));
    let st = server.ctl("status")?;
    figures.virtio_status = Some(field(&st, "virtio_status"));
    figures.acked_features = Some(field(&st, "acked_features"));
    if field(&st, "virtio_status") != 15 {
        return Err(other(format!("server-side virtio status {st:?}, want 15")));
    }
    if balloon == BalloonStep::Inflate {
        let before = memfd_kb(qemu_pid).unwrap_or(0);
        server.ctl(&format!("target {INFLATE_PAGES}"))?;
        wait_actual(server, INFLATE_PAGES)?;
        let inflated = memfd_kb(qemu_pid).unwrap_or(0);
        server.ctl("target 0")?;
        wait_actual(server, 0)?;
        figures.host_ram_kb_before = Some(before);
        figures.host_ram_kb_inflated = Some(inflated);
        figures.inflate_freed_kb = Some(before.saturating_sub(inflated));
        let mut stats = Value::Null;
        for _ in 0..50 {
            let s = server.ctl("stats")?;
            let has = s
                .get("values")
                .and_then(Value::as_array)
                .is_some_and(|v| v.iter().any(|x| x.as_u64().is_some_and(|n| n >= 1000)));
            if has {
                stats = s.get("values").cloned().unwrap_or(Value::Null);
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        figures.stats = Some(stats);
    }
    let round = server.ctl("hint-round 120000")?;
    figures.round_ms = Some(round.get("ms").cloned().unwrap_or(Value::Null));
    figures.round_free_pages = Some(field(&round, "free_pages"));
    let d = server.ctl(&format!("hint-dump {dump_name}"))?;
    figures.dump_complete = Some(d.get("complete").cloned().unwrap_or(Value::Null));
    figures.dump_free_pages = Some(field(&d, "free_pages"));
    server.ctl("hint-finish")?;
    Ok(())
}

/// What a boot's host step measured ([`host_round`]); a figure is there
/// once the step got that far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostFigures {
    /// Bytes the free page reporting queue reported (reporting cases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_bytes: Option<u64>,
    /// The server's anonymous RSS once the guest was ready, KiB (`null`
    /// when unreadable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_anon_kb_guest_ready: Option<Option<u64>>,
    /// The server's virtio status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtio_status: Option<u64>,
    /// The features the driver acked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_features: Option<u64>,
    /// QEMU's guest RAM resident before the inflate, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ram_kb_before: Option<u64>,
    /// The same once inflated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ram_kb_inflated: Option<u64>,
    /// What the inflate gave back to the host, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inflate_freed_kb: Option<u64>,
    /// The statistics the driver sent (`null` when none came).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Value>,
    /// The hint round's time, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_ms: Option<Value>,
    /// Free pages the hint round reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_free_pages: Option<u64>,
    /// Whether the dump is of a complete round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_complete: Option<Value>,
    /// Free pages in the dump.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_free_pages: Option<u64>,
}

/// The name and path of the hint dump of the boot `label`, with any dump
/// an earlier run left there removed.
pub fn fresh_dump(server: &Server, label: &str) -> (String, PathBuf) {
    let name = format!("{label}.hint-set.bin");
    let path = server.dump_path(&name);
    let _ = std::fs::remove_file(&path);
    (name, path)
}

/// What a boot's host step left behind.
#[derive(Debug, Default)]
pub struct HostStep {
    /// The figures it gathered.
    pub figures: HostFigures,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Runs `boot` against `server` with `step(qemu_pid, figures)` as its host
/// step (an error also fails the boot); returns the boot's outcome and
/// what the step left.
pub fn boot_with_step(
    ctx: &mut Ctx,
    boot: &VfioBoot,
    server: &Server,
    layout: &RamLayout,
    mut step: impl FnMut(u32, &mut HostFigures) -> Result<(), HarnessError>,
) -> Result<(VfioOutcome, HostStep), HarnessError> {
    let mut left = HostStep::default();
    let out = boot.run(ctx, server, layout, &mut |pid| {
        let r = step(pid, &mut left.figures);
        if let Err(e) = &r {
            left.error = Some(e.to_string());
        }
        r
    })?;
    Ok((out, left))
}

/// One boot of a guest script against a fresh device server.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    /// The device server binary.
    pub bin: &'a Path,
    /// The guest's overlay initramfs.
    pub initramfs: &'a Path,
    /// Guest scenario script.
    pub script: &'a str,
    /// Tag of the round (result name, log directory).
    pub tag: &'a str,
    /// Machine type.
    pub machine: Machine,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Server feature switches.
    pub server_args: &'a [&'a str],
    /// Words for the guest script.
    pub guest_args: &'a [&'a str],
    /// Whether the host step runs the balloon part.
    pub balloon: BalloonStep,
}

impl<'a> Round<'a> {
    /// A round of `script` (tag `tag`) on a 1 GiB pc guest: server with
    /// `--no-reporting`, guest `hold=32`, no balloon step.
    pub fn new(bin: &'a Path, initramfs: &'a Path, script: &'a str, tag: &'a str) -> Self {
        Round {
            bin,
            initramfs,
            script,
            tag,
            machine: Machine::Pc,
            mem_mib: 1024,
            server_args: &["--no-reporting"],
            guest_args: &["hold=32"],
            balloon: BalloonStep::Skip,
        }
    }
}

/// One boot against a fresh server ([`Round`]); records the `round` result
/// and returns it (with `ok`).
pub fn boot_round(ctx: &mut Ctx, round: &Round) -> Result<Map<String, Value>, HarnessError> {
    let Round {
        bin,
        initramfs,
        script,
        tag,
        machine,
        mem_mib,
        server_args,
        guest_args,
        balloon,
    } = *round;
    let layout = RamLayout::for_machine(mem_mib, machine);
    let dir = ctx.log_dir.join(tag);
    std::fs::create_dir_all(&dir).map_err(io_error("cannot create log dir", &dir))?;
    let label = format!("{}-{}m", machine.name(), mem_mib);
    let mut server = Server::start(bin, &dir, &label, &layout, server_args)?;
    let anon_before = server.status_kb("RssAnon");
    let mut spec = BootSpec::new(script);
    spec.machine = machine;
    spec.mem_mib = mem_mib;
    spec.smp = 1;
    spec.guest_args = guest_args.iter().map(|s| s.to_string()).collect();
    spec.timeout = Duration::from_secs(if mem_mib > 4096 { 400 } else { 240 });
    let boot = VfioBoot::new(spec, initramfs, tag);
    let (dump_name, dump) = fresh_dump(&server, &label);
    let (out, step) = boot_with_step(ctx, &boot, &server, &layout, |pid, figures| {
        host_round(&server, pid, balloon, &dump_name, figures)
    })?;
    let anon_after = server.status_kb("RssAnon");
    let server_alive = server.running();
    let exited = server.wait_exit(Duration::from_secs(5));
    let log = server.log_text();

    let mut ok = out.ok && step.error.is_none();
    let comparison = if dump.is_file() {
        Some(compare(&read_dump(&dump)?, &out.runs, &layout))
    } else {
        ok = false;
        None
    };
    let f = &step.figures;
    let n = |v: Option<u64>| v.unwrap_or(u64::MAX);
    let c = comparison.as_ref();
    let host_free = n(c.map(|c| c.host_free_pages));
    ok &= n(c.map(|c| c.false_free)) == 0 && n(c.map(|c| c.held_pages)) > 0;
    ok &= host_free > 0 && host_free != u64::MAX && n(f.dump_free_pages) == host_free;
    ok &= f.dump_complete == Some(Value::Bool(true));
    if balloon == BalloonStep::Inflate {
        // The balloon takes freshly freed pages first: the host must drop
        // at least 75 % of the target.
        ok &= n(f.inflate_freed_kb) * 4 >= INFLATE_PAGES * 4 * 3;
        ok &= f.stats.as_ref().is_some_and(|s| !s.is_null());
    }
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    ok &= log.contains("migrates NO state");
    let error_dump = comparison.is_none().then_some("no hint dump");
    let r = RoundRecord {
        name: format!("round/{tag}/{label}"),
        machine: machine.name(),
        mem_mib,
        error: step.error,
        comparison,
        error_dump,
        figures: step.figures,
        server_anon_kb_before: anon_before,
        server_anon_kb_after: anon_after,
        server_alive_at_end: server_alive,
        server_exited_after_client: exited,
        server_warnings: warnings,
        boot_s: (out.elapsed_s * 10.0).round() / 10.0,
        ok,
    };
    let r = fields(&r);
    ctx.record(&r);
    Ok(r)
}

/// The `round/<tag>/<machine>-<mem>m` line of one [`boot_round`].
#[derive(Serialize)]
struct RoundRecord {
    name: String,
    machine: &'static str,
    mem_mib: u64,
    /// Why the host step failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The host's free set against the guest's dumps, when there was a
    /// hint dump.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    comparison: Option<Comparison>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_dump: Option<&'static str>,
    #[serde(flatten)]
    figures: HostFigures,
    server_anon_kb_before: Option<u64>,
    server_anon_kb_after: Option<u64>,
    server_alive_at_end: bool,
    server_exited_after_client: bool,
    server_warnings: usize,
    boot_s: f64,
    ok: bool,
}

/// One [`boot_round`] of `script` (tag `tag`) with the balloon step, on
/// the built device server and the overlay initramfs.
pub fn balloon_round(
    ctx: &mut Ctx,
    script: &str,
    tag: &str,
) -> Result<Map<String, Value>, HarnessError> {
    let bin = server_binary(&ctx.repo)?;
    let initramfs = overlay_initramfs(ctx)?;
    boot_round(
        ctx,
        &Round {
            balloon: BalloonStep::Inflate,
            ..Round::new(&bin, &initramfs, script, tag)
        },
    )
}

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let r = balloon_round(ctx, "vfio-stock", "stock")?;
    let ok = r.get("ok") == Some(&Value::Bool(true));
    // Host-free pages that are not free in the guest after DONE: pages
    // reused in the moment between DONE and the guest's dump. Bounded.
    let not_buddy = r
        .get("not_buddy")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let host_free = r
        .get("host_free_pages")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let ok = ok && not_buddy <= (host_free / 100).max(512);
    let pick = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
    Ok(fields(&Summary {
        false_free: pick("false_free"),
        not_buddy: pick("not_buddy"),
        host_free_pages: pick("host_free_pages"),
        truth_free_pages: pick("truth_free_pages"),
        truth_covered: pick("truth_covered"),
        inflate_freed_kb: pick("inflate_freed_kb"),
        round_ms: pick("round_ms"),
        server_anon_kb_after: pick("server_anon_kb_after"),
        ok,
    }))
}

/// The scenario's summary: figures of the round's line.
#[derive(Serialize)]
struct Summary {
    false_free: Value,
    not_buddy: Value,
    host_free_pages: Value,
    truth_free_pages: Value,
    truth_covered: Value,
    inflate_freed_kb: Value,
    round_ms: Value,
    server_anon_kb_after: Value,
    ok: bool,
}
