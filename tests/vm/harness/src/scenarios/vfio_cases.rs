//! `vfio-cases`: `freehint-vfio-user` in the cases `vfio-stock` leaves
//! out, one boot each (pc 1 GiB unless said otherwise), the stock
//! `virtio_balloon` driver and the whole `vfio-stock` host step (DRIVER_OK
//! on the server, inflate to 64 MiB and back, statistics, a standard hint
//! round whose set holds no page the guest holds):
//!
//! - `intx`: the guest boots with `pci=nomsi`, so the device interrupts
//!   through its INTx line;
//! - `q35-6g`: q35, 6 GiB: RAM above 4 GiB, around the PCI hole
//!   (`vfio-stock`'s checks and its kpageflags comparison);
//! - `reporting`: q35, free page reporting offered: the memory the guest
//!   freed before the host step is reported (`report_bytes` > 0); the
//!   inflate's host RAM check is left out (reported pages are already gone
//!   from the host, so inflating them frees nothing);
//! - `reconnect`: the server runs with `--persist`; a first QEMU reaches
//!   DRIVER_OK, inflates a little and is killed (`SIGKILL`); the server
//!   goes back to listening and serves a second QEMU, and leaves no socket
//!   behind after `SIGTERM`;
//! - `system-reset`: QMP `system_reset` after the first boot (QEMU sends a
//!   vfio-user DEVICE_RESET): the guest boots again and the stock driver
//!   reaches DRIVER_OK on the same server and client;
//! - `freehint-no-stats`: `freehint.ko` with the server's stats queue off
//!   (`--no-stats`: the free page queue is index 2 in the compacted
//!   numbering): the `vfio-freehint` checks (bitmap round, host set equals
//!   the guest's bitmap).
//!
//! Without `--persist` the server must exit when its client leaves.
//! `FREEHINT_VFIO_CASES` (comma-separated names) runs only those cases.
//! The hostile driver is `vfio-hostile`; hint round latency is `bench-vfio`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use freehint_migrate::qmp::Qmp;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::vfio_stock::{
    boot_round, boot_with_step, fresh_dump, host_round, BalloonStep, HostFigures, Round,
};
use crate::errors::io_error;
use crate::qemu::{BootSpec, Machine};
use crate::runner::{fields, Ctx, HarnessError};
use crate::vfio::{
    attach_args, compare, overlay_initramfs, read_dump, server_binary, Comparison, RamLayout,
    Server, VfioBoot,
};
use crate::vm::Vm;

/// The least host RAM an inflate to 64 MiB must give back (75 %), kB.
const INFLATE_FREED_MIN_KB: u64 = 48 * 1024;

fn other(msg: impl Into<String>) -> HarnessError {
    HarnessError::Other(msg.into())
}

/// One stock-driver boot of [`stock_case`].
#[derive(Debug, Clone, Copy)]
struct Case {
    tag: &'static str,
    q35: bool,
    mem_mib: u64,
    /// Guest `pci=nomsi`.
    intx: bool,
    /// Offer free page reporting and require reports.
    reporting: bool,
    /// `--persist`, and a first client killed before the checked one.
    reconnect: bool,
    /// QMP `system_reset` once the guest is up; the host step runs after
    /// the second boot.
    system_reset: bool,
}

/// pc, 1 GiB, MSI-X, no reporting, one client, no reset.
const PLAIN: Case = Case {
    tag: "",
    q35: false,
    mem_mib: 1024,
    intx: false,
    reporting: false,
    reconnect: false,
    system_reset: false,
};

/// The stock-driver cases run by [`stock_case`].
const CASES: [Case; 4] = [
    Case {
        tag: "intx",
        intx: true,
        ..PLAIN
    },
    Case {
        tag: "reporting",
        q35: true,
        reporting: true,
        ..PLAIN
    },
    Case {
        tag: "reconnect",
        reconnect: true,
        ..PLAIN
    },
    Case {
        tag: "system-reset",
        system_reset: true,
        ..PLAIN
    },
];

/// Whether `FREEHINT_VFIO_CASES` selects `name` (all when unset or empty).
fn wanted(name: &str) -> bool {
    match std::env::var("FREEHINT_VFIO_CASES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|c| c.trim() == name),
        _ => true,
    }
}

/// The QEMU arguments that attach `server` with memfd RAM (as
/// [`VfioBoot::run`] adds them), for a boot that [`VfioBoot`] does not run.
fn vfio_qemu_args(spec: &BootSpec, server: &Server, initramfs: &Path) -> Vec<String> {
    let mut args = attach_args(spec.mem_mib, server);
    args.extend(["-initrd".into(), initramfs.display().to_string()]);
    args
}

/// Polls `text()` until `done` accepts it or `timeout` passes.
fn wait_text(timeout: Duration, text: impl Fn() -> String, done: impl Fn(&str) -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if done(&text()) {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The reconnect case's first client: boots, waits for the stock driver's
/// `bind` result, checks DRIVER_OK on the server, inflates 4 MiB, then
/// kills QEMU; the server must go back to listening. Returns the problems.
fn first_client(
    ctx: &Ctx,
    server: &Server,
    spec: &BootSpec,
    initramfs: &Path,
    dir: &Path,
) -> Result<Vec<String>, HarnessError> {
    let mut spec = spec.clone();
    spec.extra_qemu_args = vfio_qemu_args(&spec, server, initramfs);
    let first_dir = dir.join("first");
    std::fs::create_dir_all(&first_dir).map_err(io_error("cannot create log dir", &first_dir))?;
    let mut problems = Vec::new();
    let vm = Vm::boot(&ctx.manifest, &spec, &first_dir)?;
    let log = vm.serial_log.clone();
    let bound = wait_text(
        ctx.scaled(spec.timeout),
        || std::fs::read_to_string(&log).unwrap_or_default(),
        |t| t.contains("\"name\":\"bind\"") || t.contains("@@DONE"),
    );
    let status = server.ctl("status")?;
    if !bound || status.get("virtio_status").and_then(Value::as_u64) != Some(15) {
        problems.push(format!(
            "first client: no DRIVER_OK (server status {status:?}, log {})",
            log.display()
        ));
    }
    server.ctl("target 1024")?;
    std::thread::sleep(Duration::from_secs(1));
    // Dropping the VM kills QEMU (SIGKILL): the client vanishes.
    drop(vm);
    if !wait_text(
        Duration::from_secs(10),
        || server.log_text(),
        |t| t.contains("waiting for the next client"),
    ) {
        problems.push("server did not go back to listening".into());
    }
    server.ctl("target 0")?;
    Ok(problems)
}

/// The QMP socket of QEMU `pid`, from its command line (`-qmp unix:PATH,…`).
fn qmp_socket_of(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let pos = args.iter().position(|a| a == "-qmp")?;
    let arg = args.get(pos + 1)?.strip_prefix("unix:")?;
    Some(PathBuf::from(arg.split(',').next()?))
}

/// QMP `system_reset` on QEMU `pid` (with `set-action reboot=reset` for
/// the while: the harness's `-no-reboot` would turn the reset into an
/// exit), then waits for the guest in `serial_log` to be ready a second
/// time; the guest's own reboot at the end exits QEMU again.
fn system_reset(pid: u32, serial_log: &Path, timeout: Duration) -> Result<(), HarnessError> {
    let sock = qmp_socket_of(pid).ok_or_else(|| other("QEMU has no -qmp socket"))?;
    let mut qmp = Qmp::connect_within(&sock, Duration::from_secs(10))?;
    qmp.execute("set-action", Some(json!({"reboot": "reset"})))?;
    qmp.execute("system_reset", None)?;
    qmp.wait_event_named("RESET", Duration::from_secs(30))?;
    let again = wait_text(
        timeout,
        || std::fs::read_to_string(serial_log).unwrap_or_default(),
        |t| t.matches("@@VFIO ready").count() >= 2,
    );
    qmp.execute("set-action", Some(json!({"reboot": "shutdown"})))?;
    if again {
        Ok(())
    } else {
        Err(other("guest not ready again after system_reset"))
    }
}

/// Waits for the server to have discarded reported free pages; returns the
/// bytes reported.
fn wait_reported(server: &Server, timeout: Duration) -> Result<u64, HarnessError> {
    let t0 = Instant::now();
    loop {
        let m = server.ctl("metrics")?;
        let bytes = m
            .get("metrics")
            .and_then(|m| m.get("report_bytes"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if bytes > 0 || t0.elapsed() > timeout {
            return Ok(bytes);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One stock-driver boot of `case` against a fresh server; records and
/// returns its result.
fn stock_case(
    ctx: &mut Ctx,
    bin: &Path,
    initramfs: &Path,
    case: &Case,
) -> Result<Map<String, Value>, HarnessError> {
    let machine = if case.q35 { Machine::Q35 } else { Machine::Pc };
    let layout = RamLayout::for_machine(case.mem_mib, machine);
    let dir = ctx.log_dir.join(case.tag);
    std::fs::create_dir_all(&dir).map_err(io_error("cannot create log dir", &dir))?;
    let label = format!("{}-{}-{}m", case.tag, machine.name(), case.mem_mib);
    let mut args = Vec::new();
    if !case.reporting {
        args.push("--no-reporting");
    }
    if case.reconnect {
        args.push("--persist");
    }
    let mut server = Server::start(bin, &dir, &label, &layout, &args)?;
    let mut spec = BootSpec::new("vfio-stock");
    spec.machine = machine;
    spec.mem_mib = case.mem_mib;
    spec.smp = 1;
    spec.guest_args = vec!["hold=32".into()];
    spec.timeout = Duration::from_secs(if case.mem_mib > 4096 { 400 } else { 240 });
    if case.intx {
        spec.extra_cmdline.push("pci=nomsi".into());
    }
    spec.qmp = case.system_reset;
    let mut problems = Vec::new();
    if case.reconnect {
        problems.extend(first_client(ctx, &server, &spec, initramfs, &dir)?);
    }
    // Where VfioBoot::run writes the console (one directory per tag).
    let serial_log = ctx
        .log_dir
        .join(case.tag)
        .join(format!("{}.log", spec.label()));
    let reset_timeout = ctx.scaled(spec.timeout);
    let boot = VfioBoot::new(spec, initramfs, case.tag);
    let (dump_name, dump) = fresh_dump(&server, &label);
    let (out, step) = boot_with_step(ctx, &boot, &server, &layout, |pid, figures| {
        if case.system_reset {
            system_reset(pid, &serial_log, reset_timeout)?;
        }
        if case.reporting {
            let bytes = wait_reported(&server, Duration::from_secs(30))?;
            figures.reported_bytes = Some(bytes);
        }
        host_round(&server, pid, BalloonStep::Inflate, &dump_name, figures)
    })?;
    let log = server.log_text();
    if case.reconnect {
        // SIGTERM: the server must remove its socket on the way out.
        if let Ok(pid) = i32::try_from(server.pid().unwrap_or(0)) {
            if pid > 0 {
                // SAFETY: `kill` has no memory preconditions; the pid is the
                // server, our child, not reaped yet.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        if !server.wait_exit(Duration::from_secs(5)) {
            problems.push("server did not exit on SIGTERM".into());
        } else if server.socket.exists() {
            problems.push("server left its socket behind after SIGTERM".into());
        }
    } else if !server.wait_exit(Duration::from_secs(5)) {
        problems.push("server did not exit after its client left".into());
    }
    if !(log.contains("client disconnected") || log.contains("connection ended")) {
        problems.push("server did not log the disconnect".into());
    }
    if !log.contains("migrates NO state") {
        problems.push("start-up warning 'migrates NO state' missing".into());
    }
    if case.system_reset && !log.contains("device reset") {
        problems.push("server saw no DEVICE_RESET".into());
    }
    if let Some(e) = step.error {
        problems.push(format!("host step: {e}"));
    }
    let comparison = if dump.is_file() {
        Some(compare(&read_dump(&dump)?, &out.runs, &layout))
    } else {
        problems.push("no hint dump".into());
        None
    };
    let f = &step.figures;
    let false_free = comparison.as_ref().map(|c| c.false_free);
    if false_free != Some(0) {
        problems.push(format!("false_free {false_free:?}, want 0"));
    }
    if f.round_free_pages.unwrap_or(0) == 0 {
        problems.push("hint round reported no free pages".into());
    }
    if f.stats.as_ref().is_none_or(Value::is_null) {
        problems.push("no statistics from the guest".into());
    }
    if case.reporting {
        if f.reported_bytes.unwrap_or(0) == 0 {
            problems.push("no free page reporting".into());
        }
    } else if f.inflate_freed_kb.unwrap_or(0) < INFLATE_FREED_MIN_KB {
        problems.push(format!(
            "inflating 64 MiB freed {:?} kB of host RAM, want >= {INFLATE_FREED_MIN_KB}",
            f.inflate_freed_kb
        ));
    }
    let ok = out.ok && problems.is_empty();
    let r = fields(&CaseRecord {
        name: format!("case/{}", case.tag),
        machine: machine.name(),
        mem_mib: case.mem_mib,
        boot_s: (out.elapsed_s * 10.0).round() / 10.0,
        comparison,
        figures: step.figures,
        problems: (!problems.is_empty()).then_some(problems),
        ok,
    });
    ctx.record(&r);
    Ok(r)
}

/// The `case/<tag>` line of one stock case.
#[derive(Serialize)]
struct CaseRecord {
    name: String,
    machine: &'static str,
    mem_mib: u64,
    boot_s: f64,
    /// The host's free set against the guest's dumps, when there was a
    /// hint dump.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    comparison: Option<Comparison>,
    #[serde(flatten)]
    figures: HostFigures,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<Vec<String>>,
    ok: bool,
}

/// A case's entry in the scenario's summary.
#[derive(Serialize)]
struct CaseSummary {
    ok: bool,
    false_free: Value,
    round_free_pages: Value,
    inflate_freed_kb: Value,
    reported_bytes: Value,
}

/// The scenario's summary: every case's entry by tag.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    cases: BTreeMap<String, CaseSummary>,
}

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let bin = server_binary(&ctx.repo)?;
    let initramfs = overlay_initramfs(ctx)?;
    let mut ok = true;
    let mut per = BTreeMap::new();
    let mut keep = |name: &str, r: &Map<String, Value>, cell_ok: bool| {
        ok &= cell_ok;
        let pick = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
        per.insert(
            name.to_string(),
            CaseSummary {
                ok: cell_ok,
                false_free: pick("false_free"),
                round_free_pages: pick("round_free_pages"),
                inflate_freed_kb: pick("inflate_freed_kb"),
                reported_bytes: pick("reported_bytes"),
            },
        );
    };
    for case in &CASES {
        if wanted(case.tag) {
            let r = stock_case(ctx, &bin, &initramfs, case)?;
            keep(case.tag, &r, r["ok"] == true);
        }
    }
    if wanted("q35-6g") {
        let r = boot_round(
            ctx,
            &Round {
                machine: Machine::Q35,
                mem_mib: 6144,
                balloon: BalloonStep::Inflate,
                ..Round::new(&bin, &initramfs, "vfio-stock", "q35-6g")
            },
        )?;
        keep("q35-6g", &r, r["ok"] == true);
    }
    if wanted("freehint-no-stats") {
        let r = boot_round(
            ctx,
            &Round {
                server_args: &["--no-reporting", "--no-stats"],
                ..Round::new(&bin, &initramfs, "vfio-freehint", "freehint-no-stats")
            },
        )?;
        let n = |k: &str| r.get(k).and_then(Value::as_u64);
        // As in vfio-freehint: the host's set and the guest's bitmap a
        // moment later differ by at most 1 % of the free pages.
        let drift_ok =
            n("bitmap_mismatch_bits").is_some_and(|m| m <= n("host_free_pages").unwrap_or(0) / 100);
        let cell_ok = r["ok"] == true && drift_ok && n("false_free") == Some(0);
        keep("freehint-no-stats", &r, cell_ok);
    }
    Ok(fields(&Summary { ok, cases: per }))
}
