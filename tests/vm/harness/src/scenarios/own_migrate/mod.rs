//! Our migrator against QEMU's: `own-migrate` (CI), `own-pingpong` (CI)
//! and `bench-own-migrate` (benchmark).
//!
//! "Ours" is `freehint-migrate send|receive` (crate `device/migrator`):
//! both QEMUs keep guest RAM in a `/dev/shm` file
//! (`memory-backend-file,share=on`), the source runs with the preload
//! library (`libfreehint_uffd_preload.so`, `FREEHINT_UFFD_SOCKET`), the
//! destination with `-incoming defer`; each QEMU has a second QMP socket
//! for the program. "QEMU's" is QEMU's own pre-copy between two ordinary
//! QEMUs (anonymous RAM, `-incoming tcp:…`), as in `qemu-migrate`.
//!
//! Every cell is the `qemu-migrate` guest (the project's kernel, `fhwork`,
//! no balloon driver: no hints, `init_on_alloc=1`). The destination
//! verifies every live page the moment it resumes: the receiver holds the
//! destination paused (`--hold-before-resume`), the harness types `verify`
//! on its console, then lets it resume. Downtime for ours is QEMU's `STOP`
//! on the source to `RESUME` on the destination; for QEMU's it is QEMU's
//! own `downtime` (stop to completion on the source). Bytes for ours are
//! our stream plus QEMU's device-state stream.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::manifest::Manifest;
use crate::migrate::{
    median, migrate, qemu_version, verify_integrity, wait_ready, Cell, Driver, Then, Workload,
};
use crate::qemu::Machine;
use crate::runner::{object, Ctx, HarnessError};
use crate::scenarios::num;
use crate::vfio::{RamLayout, Server};
use crate::vm::{free_port, splat_problems, Incoming, Vm, VmError, VmOptions};

/// The program and the preload library, built in release mode.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `freehint-migrate`.
    pub migrate: PathBuf,
    /// `libfreehint_uffd_preload.so`.
    pub preload: PathBuf,
    /// `freehint-vhost-user`, the balloon device server.
    pub vhost_user: PathBuf,
}

/// Builds the tools (`cargo build --release -p freehint-migrate -p
/// freehint-uffd-preload -p freehint-vhost-user`) and returns their paths.
pub fn build_tools(repo: &Path) -> Result<Tools, HarnessError> {
    let st = Command::new("cargo")
        .args(["build", "--release", "-q", "-p", "freehint-migrate"])
        .args(["-p", "freehint-uffd-preload", "-p", "freehint-vhost-user"])
        .current_dir(repo)
        .status()
        .map_err(|e| HarnessError::Other(format!("cannot run cargo: {e}")))?;
    if !st.success() {
        return Err(HarnessError::Other(
            "cargo build -p freehint-migrate -p freehint-uffd-preload -p freehint-vhost-user failed"
                .into(),
        ));
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
        .join("release");
    let tools = Tools {
        migrate: dir.join("freehint-migrate"),
        preload: dir.join("libfreehint_uffd_preload.so"),
        vhost_user: dir.join("freehint-vhost-user"),
    };
    for f in [&tools.migrate, &tools.preload, &tools.vhost_user] {
        if !f.is_file() {
            return Err(HarnessError::Other(format!(
                "{} missing after the build",
                f.display()
            )));
        }
    }
    Ok(tools)
}

/// Prefix of the RAM files (`/dev/shm/fh-own-<harness pid>-…`).
const RAM_PREFIX: &str = "fh-own-";

/// Removes RAM files left by harness runs that no longer exist.
pub fn sweep_stale_ram_files() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(RAM_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Which migrator a cell uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrator {
    /// `freehint-migrate`.
    Ours,
    /// QEMU's pre-copy.
    Qemu,
}

impl Migrator {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Migrator::Ours => "ours",
            Migrator::Qemu => "qemu",
        }
    }
}

/// One QEMU set up for our migrator, with the program's QMP socket.
pub(crate) struct OwnVm {
    pub(crate) vm: Vm,
    /// The second QMP socket, for the program.
    program_qmp: PathBuf,
    /// The balloon's device server (`freehint-vhost-user`), with
    /// [`RunOpts::balloon`]: plugged in at boot on the first source, by
    /// the receiver on every destination.
    pub(crate) balloon: Option<Server>,
}

/// The balloon's QOM id in every QEMU of an own-hint run.
pub(crate) const BALLOON_ID: &str = "balloon0";

fn start_own(
    manifest: &Manifest,
    tools: &Tools,
    cell: &Cell,
    log_dir: &Path,
    role: &str,
    incoming: bool,
    balloon: bool,
) -> Result<OwnVm, VmError> {
    let tag = format!("{}-{role}", cell.label().replace('/', "-"));
    let server = balloon
        .then(|| {
            let layout = RamLayout::for_machine(cell.mem_mib, Machine::Pc);
            Server::start(&tools.vhost_user, log_dir, &tag, &layout, &["--persist"])
        })
        .transpose()
        .map_err(|e| VmError::Server(e.to_string()))?;
    let ram = PathBuf::from(format!("/dev/shm/{RAM_PREFIX}{}-{tag}", std::process::id()));
    let uffd = crate::sockets::socket_path(&format!("{tag}.uffd"))?;
    let program_qmp = crate::sockets::socket_path(&format!("{tag}.pqmp"))?;
    let mut opts = VmOptions {
        incoming: incoming.then_some(Incoming::Defer),
        extra_args: vec![
            "-object".into(),
            format!(
                "memory-backend-file,id=fhram,size={}M,mem-path={},share=on",
                cell.mem_mib,
                ram.display()
            ),
            "-machine".into(),
            "memory-backend=fhram".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", program_qmp.display()),
        ],
        env: vec![
            ("LD_PRELOAD".into(), tools.preload.display().to_string()),
            ("FREEHINT_UFFD_SOCKET".into(), uffd.display().to_string()),
        ],
        owned_files: vec![ram, uffd, program_qmp.clone()],
    };
    if incoming {
        // The receiver resumes the destination itself (`-S`, as libvirt
        // starts a destination): QEMU started it on its own otherwise,
        // since the source ran when QEMU's migration began.
        opts.extra_args.push("-S".into());
    }
    let mut spec = cell.boot_spec();
    if let Some(server) = &server {
        // Our device is the guest's only balloon; a destination gets it
        // from the receiver once it runs.
        spec.extra_qemu_args.clear();
        if !incoming {
            opts.extra_args.extend([
                "-chardev".into(),
                format!(
                    "socket,id={BALLOON_ID}-chardev,path={}",
                    server.socket.display()
                ),
                "-device".into(),
                format!(
                    "vhost-user-test-device-pci,id={BALLOON_ID},chardev={BALLOON_ID}-chardev,\
                     virtio-id=5,num_vqs=5,config_size=16"
                ),
            ]);
        }
    }
    let vm = Vm::start_with(manifest, &spec, log_dir, role, &opts)?;
    Ok(OwnVm {
        vm,
        program_qmp,
        balloon: server,
    })
}

/// What one migration gave.
#[derive(Debug, Default, Clone)]
pub struct Hop {
    /// Bytes on the wire.
    pub bytes: Option<f64>,
    /// Total time, ms.
    pub total_ms: Option<f64>,
    /// Downtime, ms.
    pub downtime_ms: Option<f64>,
    /// The destination's verdict at resume.
    pub verdict: Option<Map<String, Value>>,
    /// Everything the migrator said (summary fields, passes).
    pub detail: Map<String, Value>,
    /// Guest churn steps per second before and during the migration.
    pub ops_rate: Option<(f64, f64)>,
}

/// Reads a child's stdout lines into a channel.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

fn spawn(tools: &Tools, args: &[String], log: &Path) -> Result<Child, String> {
    let err = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    Command::new(&tools.migrate)
        .args(args)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", tools.migrate.display()))
}

fn json_line(line: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(line).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// One hop of our migrator ([`migrate_ours`]).
#[derive(Debug)]
struct Migrated {
    /// Its figures.
    hop: Hop,
    /// The destination's console index from which the verdict comes.
    verdict_from: usize,
}

/// Migrates `src` to `dst` with `freehint-migrate`; the destination
/// verifies at resume.
fn migrate_ours(
    tools: &Tools,
    src: &OwnVm,
    dst: &mut OwnVm,
    log_dir: &Path,
    label: &str,
    opts: RunOpts,
    timeout: Duration,
) -> Result<Migrated, String> {
    let (port, qemu_port) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let listen = format!("127.0.0.1:{port}");
    let mut send_args = vec![
        "send".into(),
        "--qmp".into(),
        src.program_qmp.display().to_string(),
        "--to".into(),
        listen.clone(),
    ];
    if let Some(server) = &src.balloon {
        send_args.extend([
            "--device-control".into(),
            server.control.display().to_string(),
            "--unplug-device".into(),
            BALLOON_ID.into(),
        ]);
    }
    let mut receive_args = vec![
        "receive".into(),
        "--qmp".into(),
        dst.program_qmp.display().to_string(),
        "--listen".into(),
        listen.clone(),
        "--qemu-port".into(),
        qemu_port.to_string(),
        "--hold-before-resume".into(),
    ];
    if let Some(server) = &dst.balloon {
        receive_args.extend([
            "--plug-balloon".into(),
            server.socket.display().to_string(),
            "--plug-control".into(),
            server.control.display().to_string(),
            "--plug-id".into(),
            BALLOON_ID.into(),
        ]);
    }
    if opts.negative_control {
        send_args.push("--negative-control-drop-final-pass".into());
    }
    if let Some(n) = opts.max_passes {
        send_args.push("--max-passes".into());
        send_args.push(n.to_string());
    }
    let mut receiver = spawn(
        tools,
        &receive_args,
        &log_dir.join(format!("{label}.receive.log")),
    )?;
    let mut sender = match spawn(
        tools,
        &send_args,
        &log_dir.join(format!("{label}.send.log")),
    ) {
        Ok(s) => s,
        Err(e) => {
            let _ = receiver.kill();
            let _ = receiver.wait();
            return Err(e);
        }
    };
    let result = drive(
        &mut receiver,
        &mut sender,
        dst,
        opts.abort_at_resume,
        timeout,
    );
    for child in [&mut receiver, &mut sender] {
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    result
}

/// Gates the receiver (types `verify` on the destination's console before
/// it resumes) and collects both programs' JSON lines.
fn drive(
    receiver: &mut Child,
    sender: &mut Child,
    dst: &mut OwnVm,
    abort: bool,
    timeout: Duration,
) -> Result<Migrated, String> {
    let deadline = Instant::now() + timeout;
    let (recv_lines, send_lines) = (lines_of(receiver), lines_of(sender));
    let mut gate = receiver.stdin.take();
    let mut verdict_from = None;
    let mut hop = Hop::default();
    let mut passes = Vec::new();
    let (mut recv_done, mut send_done) = (false, false);
    // Each program is done when its stdout closed and every line it wrote
    // was read (the reader thread hangs up after the last one): a summary
    // printed just before exiting is never lost.
    while !(recv_done && send_done) {
        if Instant::now() >= deadline {
            return Err(format!(
                "migration did not end within {}s",
                timeout.as_secs()
            ));
        }
        loop {
            let line = match recv_lines.try_recv() {
                Ok(line) => line,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    recv_done = true;
                    break;
                }
            };
            let Some(m) = json_line(&line) else { continue };
            match m.get("event").and_then(Value::as_str) {
                Some("ready_to_resume") if abort => {
                    verdict_from = Some(0);
                    if let Some(mut g) = gate.take() {
                        g.write_all(b"abort\n").map_err(|e| format!("gate: {e}"))?;
                    }
                }
                Some("ready_to_resume") => {
                    verdict_from = Some(dst.vm.line_count());
                    dst.vm.send_line("verify").map_err(|e| e.to_string())?;
                    if let Some(mut g) = gate.take() {
                        g.write_all(b"resume\n").map_err(|e| format!("gate: {e}"))?;
                    }
                }
                Some("summary") => {
                    hop.detail.insert("receive".into(), Value::Object(m));
                }
                _ => {}
            }
        }
        loop {
            let line = match send_lines.try_recv() {
                Ok(line) => line,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    send_done = true;
                    break;
                }
            };
            let Some(m) = json_line(&line) else { continue };
            match m.get("event").and_then(Value::as_str) {
                Some("pass") => passes.push(Value::Object(m)),
                Some("summary") => {
                    hop.bytes = m.get("bytes").and_then(Value::as_f64);
                    hop.total_ms = m.get("total_ms").and_then(Value::as_f64);
                    hop.downtime_ms = m.get("downtime_ms").and_then(Value::as_f64);
                    hop.detail.insert("send".into(), Value::Object(m));
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    hop.detail.insert("passes".into(), Value::Array(passes));
    let status = |k: &str| {
        hop.detail
            .get(k)
            .and_then(|m| m.get("status"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if abort {
        let from = verdict_from.ok_or("the receiver never held the destination")?;
        return Ok(Migrated {
            hop,
            verdict_from: from,
        });
    }
    if status("send").as_deref() != Some("completed")
        || status("receive").as_deref() != Some("completed")
    {
        return Err(format!(
            "freehint-migrate failed: send {}, receive {}",
            hop.detail
                .get("send")
                .map_or("no summary".into(), Value::to_string),
            hop.detail
                .get("receive")
                .map_or("no summary".into(), Value::to_string)
        ));
    }
    let from = verdict_from.ok_or("the receiver never held the destination")?;
    Ok(Migrated {
        hop,
        verdict_from: from,
    })
}

/// The integrity verdict at `from` on `vm`.
fn verdict_at(vm: &mut Vm, from: usize, timeout: Duration) -> Result<Map<String, Value>, String> {
    let crate::vm::ResultLine { line, obj, .. } = vm
        .wait_result(from, "integrity", "the destination's verdict", timeout)
        .map_err(|e| e.to_string())?;
    Ok(obj.unwrap_or_else(|| object(json!({"name": "integrity", "ok": false, "error": line}))))
}

/// The guest's churn steps (`ops`) at a moment of host time.
#[derive(Debug, Clone, Copy)]
struct OpsSample {
    /// `ops` of the verdict.
    ops: f64,
    /// When the verdict came.
    at: Instant,
}

/// The workload's churn rate before a migration ([`start_rate`]).
#[derive(Debug, Clone, Copy)]
struct RateBefore {
    /// Steps per second over the window.
    rate: f64,
    /// The last sample of the window.
    last: OpsSample,
}

/// `ops` and the host time of a fresh verdict (the guest's churn steps).
fn ops_now(vm: &mut Vm, timeout: Duration) -> Result<OpsSample, String> {
    let v = verify_integrity(vm, Then::Continue, timeout).map_err(|e| e.to_string())?;
    let ops = v
        .get("ops")
        .and_then(Value::as_f64)
        .ok_or("verdict without ops")?;
    if !crate::guest::result_ok(&v) {
        return Err(format!(
            "verdict before migrating failed: {}",
            Value::Object(v)
        ));
    }
    Ok(OpsSample {
        ops,
        at: Instant::now(),
    })
}

/// How a run measures.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOpts {
    /// Measure the guest's churn rate for this long before migrating.
    pub rate_window: Option<Duration>,
    /// Negative control: drop our final pass.
    pub negative_control: bool,
    /// Our live passes at most (`--max-passes`).
    pub max_passes: Option<u32>,
    /// Refuse to resume the destination (the gate answers `abort`): the
    /// migration must fail with the source running.
    pub abort_at_resume: bool,
    /// Our balloon device (`freehint-vhost-user`) instead of QEMU's: the
    /// sender takes its hints and unplugs it, the receiver plugs a fresh
    /// one into the destination (see `own_hint`).
    pub balloon: bool,
}

/// The outcome of one cell: every hop, problems, the verdicts.
#[derive(Debug, Default)]
pub struct Run {
    /// One per migration.
    pub hops: Vec<Hop>,
    /// What went wrong.
    pub problems: Vec<String>,
    /// A migration failed and its destination's console showed a kernel
    /// splat (a damaged guest that died at resume, before any verdict).
    pub destination_splat: bool,
}

impl Run {
    /// Verdicts that failed, or hops that have none.
    pub fn integrity_failures(&self) -> usize {
        self.hops
            .iter()
            .filter(|h| !h.verdict.as_ref().is_some_and(crate::guest::result_ok))
            .count()
    }

    /// Everything went right.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.integrity_failures() == 0
    }
}

/// Boots `cell`, migrates it `cell.migrations` times with `migrator`,
/// verifies each destination at resume, stops the workload at the end.
pub fn run_cell(ctx: &Ctx, tools: &Tools, cell: &Cell, migrator: Migrator, opts: RunOpts) -> Run {
    let mut run = Run::default();
    let scale = |s: u64| Duration::from_secs(s).mul_f64(ctx.timeout_scale.max(0.1));
    let label = format!("{}-{}", migrator.name(), cell.label().replace('/', "-"));
    let result = match migrator {
        Migrator::Ours => run_ours(ctx, tools, cell, &label, opts, &mut run, &scale),
        Migrator::Qemu => run_qemu(ctx, cell, &label, opts, &mut run, &scale),
    };
    if let Err(e) = result {
        run.problems.push(e);
    }
    run
}

fn start_rate(vm: &mut Vm, opts: RunOpts, unit: Duration) -> Result<Option<RateBefore>, String> {
    let Some(window) = opts.rate_window else {
        return Ok(None);
    };
    let first = ops_now(vm, unit * 60)?;
    std::thread::sleep(window);
    let last = ops_now(vm, unit * 60)?;
    Ok(Some(RateBefore {
        rate: (last.ops - first.ops) / (last.at - first.at).as_secs_f64(),
        last,
    }))
}

fn end_rate(hop: &mut Hop, before: Option<RateBefore>, at: Instant) {
    let (Some(RateBefore { rate, last }), Some(v)) = (before, &hop.verdict) else {
        return;
    };
    if let Some(ops2) = v.get("ops").and_then(Value::as_f64) {
        hop.ops_rate = Some((rate, (ops2 - last.ops) / (at - last.at).as_secs_f64()));
    }
}

fn run_ours(
    ctx: &Ctx,
    tools: &Tools,
    cell: &Cell,
    label: &str,
    opts: RunOpts,
    run: &mut Run,
    scale: &dyn Fn(u64) -> Duration,
) -> Result<(), String> {
    let e = |e: VmError| e.to_string();
    let mut src = start_own(
        &ctx.manifest,
        tools,
        cell,
        &ctx.log_dir,
        &format!("{label}-0"),
        false,
        opts.balloon,
    )
    .map_err(e)?;
    wait_ready(&mut src.vm, scale(300)).map_err(e)?;
    if opts.balloon {
        super::own_hint::inflate(&src, cell.driver, scale(120))?;
    }
    for i in 0..cell.migrations {
        let before = start_rate(&mut src.vm, opts, scale(1))?;
        let mut dst = start_own(
            &ctx.manifest,
            tools,
            cell,
            &ctx.log_dir,
            &format!("{label}-{}", i + 1),
            true,
            opts.balloon,
        )
        .map_err(e)?;
        let hop_label = format!("{label}-{}", i + 1);
        let migrated = migrate_ours(
            tools,
            &src,
            &mut dst,
            &ctx.log_dir,
            &hop_label,
            opts,
            scale(600),
        );
        splat_problems(&src.vm, &mut run.problems);
        if migrated.is_err() {
            // A destination that died at resume says why on its console.
            dst.vm.wait_exit(scale(10));
            let before = run.problems.len();
            splat_problems(&dst.vm, &mut run.problems);
            run.destination_splat |= run.problems.len() > before;
        }
        let Migrated {
            mut hop,
            verdict_from: from,
        } = migrated?;
        src.vm.kill();
        let verdict = verdict_at(&mut dst.vm, from, scale(300));
        let at = Instant::now();
        hop.verdict = Some(
            verdict
                .unwrap_or_else(|e| object(json!({"name": "integrity", "ok": false, "error": e}))),
        );
        end_rate(&mut hop, before, at);
        if opts.balloon {
            let check = super::own_hint::destination_balloon(&mut dst, cell.driver, scale(120));
            if check.get("ok") != Some(&json!(true)) {
                run.problems.push(format!(
                    "migration {}: destination balloon: {}",
                    i + 1,
                    Value::Object(check.clone())
                ));
            }
            hop.detail
                .insert("destination_balloon".into(), Value::Object(check));
        }
        eprintln!(
            "[own]   {label}: migration {}/{}: {:.1} MB, {:?} ms total, {:?} ms downtime, integrity {}",
            i + 1,
            cell.migrations,
            hop.bytes.unwrap_or(0.0) / 1e6,
            hop.total_ms,
            hop.downtime_ms,
            hop.verdict.as_ref().is_some_and(crate::guest::result_ok)
        );
        run.hops.push(hop);
        src = dst;
    }
    finish(&mut src.vm, run, scale)
}

fn run_qemu(
    ctx: &Ctx,
    cell: &Cell,
    label: &str,
    opts: RunOpts,
    run: &mut Run,
    scale: &dyn Fn(u64) -> Duration,
) -> Result<(), String> {
    let e = |e: VmError| e.to_string();
    let spec = cell.boot_spec();
    let ram = qemu_ram_args(cell);
    let with = |incoming| VmOptions {
        incoming,
        extra_args: ram.clone(),
        ..VmOptions::default()
    };
    let mut src = Vm::start_with(
        &ctx.manifest,
        &spec,
        &ctx.log_dir,
        &format!("{label}-0"),
        &with(None),
    )
    .map_err(e)?;
    wait_ready(&mut src, scale(300)).map_err(e)?;
    for i in 0..cell.migrations {
        let before = start_rate(&mut src, opts, scale(1))?;
        let port = free_port().map_err(e)?;
        let mut dst = Vm::start_with(
            &ctx.manifest,
            &spec,
            &ctx.log_dir,
            &format!("{label}-{}", i + 1),
            &with(Some(Incoming::Tcp(port))),
        )
        .map_err(e)?;
        let stats = migrate(&mut src, port, scale(600));
        splat_problems(&src, &mut run.problems);
        let stats = stats.map_err(e)?;
        src.kill();
        let verdict = verify_integrity(&mut dst, Then::Continue, scale(300));
        let at = Instant::now();
        let mut hop = Hop {
            bytes: Some(stats.transferred as f64),
            total_ms: Some(stats.total_ms as f64),
            downtime_ms: Some(stats.downtime_ms as f64),
            verdict: Some(verdict.unwrap_or_else(|err| {
                object(json!({"name": "integrity", "ok": false, "error": err.to_string()}))
            })),
            detail: stats.to_json(),
            ops_rate: None,
        };
        end_rate(&mut hop, before, at);
        run.hops.push(hop);
        src = dst;
    }
    finish(&mut src, run, scale)
}

/// Guest RAM of a QEMU's-migrator cell: QEMU's default (anonymous) up to
/// 16 GiB; above, anonymous RAM without swap reservation
/// (`memory-backend-ram,reserve=off`), since the kernel's overcommit
/// heuristic refuses to map 32 GiB of private memory on a 24 GiB host.
/// Unread pages cost nothing either way.
fn qemu_ram_args(cell: &Cell) -> Vec<String> {
    if cell.mem_mib <= 16384 {
        return Vec::new();
    }
    vec![
        "-object".into(),
        format!(
            "memory-backend-ram,id=fhram,size={}M,reserve=off",
            cell.mem_mib
        ),
        "-machine".into(),
        "memory-backend=fhram".into(),
    ]
}

/// Whether `FREEHINT_OWN_ONLY` (comma-separated substrings of
/// `migrator/workload/SIZEg`, e.g. `qemu/idle/32g`) selects a cell; unset:
/// all, and the slowdown runs too.
fn selected(name: &str) -> bool {
    match std::env::var("FREEHINT_OWN_ONLY") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|p| name.contains(p.trim())),
        _ => true,
    }
}

/// Stops the workload on the last destination and waits for a clean end.
fn finish(vm: &mut Vm, run: &mut Run, scale: &dyn Fn(u64) -> Duration) -> Result<(), String> {
    let last = verify_integrity(vm, Then::Stop, scale(300)).map_err(|e| e.to_string())?;
    if !crate::guest::result_ok(&last) {
        run.problems
            .push(format!("final verdict failed: {}", Value::Object(last)));
    }
    if !vm.wait_exit(scale(180)) {
        run.problems.push(format!(
            "guest did not power off ({})",
            vm.serial_log.display()
        ));
    }
    match vm.output().done_rc {
        Some(0) => {}
        rc => run.problems.push(format!(
            "guest script rc {rc:?} ({})",
            vm.serial_log.display()
        )),
    }
    splat_problems(vm, &mut run.problems);
    Ok(())
}

/// The JSON line of hop `i` of a run.
pub fn hop_json(
    name: &str,
    cell: &Cell,
    migrator: Migrator,
    run: &Run,
    i: usize,
) -> Map<String, Value> {
    let hop = run.hops.get(i);
    let verdict = hop.and_then(|h| h.verdict.as_ref());
    let mut m = object(json!({
        "name": name,
        "migrator": migrator.name(),
        "workload": cell.workload.name(),
        "mem_mib": cell.mem_mib,
        "init_on_alloc": u8::from(cell.init_on_alloc),
        "migration": i + 1,
        "bytes": hop.and_then(|h| h.bytes).map(num),
        "mb_sent": hop.and_then(|h| h.bytes).map(|b| num((b / 1e5).round() / 10.0)),
        "total_ms": hop.and_then(|h| h.total_ms).map(num),
        "downtime_ms": hop.and_then(|h| h.downtime_ms).map(num),
        "integrity": verdict.map(|v| if crate::guest::result_ok(v) { "ok" } else { "CORRUPT" }),
    }));
    for k in ["pages_checked", "corrupt_pages", "first_corrupt"] {
        if let Some(v) = verdict.and_then(|v| v.get(k)) {
            m.insert(k.into(), v.clone());
        }
    }
    if let Some((before, during)) = hop.and_then(|h| h.ops_rate) {
        m.insert("guest_ops_per_s_before".into(), num(before));
        m.insert("guest_ops_per_s_during".into(), num(during));
    }
    if let Some(h) = hop {
        m.insert("detail".into(), Value::Object(h.detail.clone()));
    }
    let last = i + 1 == run.hops.len();
    let ok = verdict.is_some_and(crate::guest::result_ok) && (!last || run.problems.is_empty());
    m.insert("ok".into(), json!(ok));
    if !run.problems.is_empty() && last {
        m.insert("problems".into(), json!(run.problems));
    }
    m
}

/// The CI matrix: 4 GiB, {idle, dirty-keep, dirty-free} × {ours, QEMU's}.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let t = matrix(ctx, &[4096], &WORKLOADS, 1)?;
    Ok(t.summary(ctx, 4096))
}

/// The workloads of the 4 GiB matrix.
pub const WORKLOADS: [Workload; 3] = [Workload::Idle, Workload::DirtyKeep, Workload::DirtyFree];

/// Figures per (mem, workload, migrator).
#[derive(Debug, Default)]
pub struct Table {
    rows: std::collections::BTreeMap<(u64, &'static str, &'static str), Figures>,
    /// Verdicts that failed.
    pub integrity_failures: usize,
    /// Runs that failed for any reason.
    pub failures: usize,
    /// Runs.
    pub runs: usize,
}

/// One cell's runs.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    bytes: Vec<f64>,
    total_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
    rate_before: Vec<f64>,
    rate_during: Vec<f64>,
}

fn cell_for(mem: u64, w: Workload) -> Cell {
    Cell::new(mem, Driver::None, w, true)
}

/// Runs `sizes` × `workloads` × both migrators, `reps` times.
pub fn matrix(
    ctx: &mut Ctx,
    sizes: &[u64],
    workloads: &[Workload],
    reps: usize,
) -> Result<Table, HarnessError> {
    sweep_stale_ram_files();
    let tools = build_tools(&ctx.repo)?;
    let mut t = Table::default();
    for rep in 0..reps {
        for &mem in sizes {
            for &w in workloads {
                for m in [Migrator::Ours, Migrator::Qemu] {
                    let cell = cell_for(mem, w);
                    if !selected(&format!("{}/{}/{}g", m.name(), w.name(), mem / 1024)) {
                        continue;
                    }
                    eprintln!(
                        "[own] run {}/{reps}: {} {}",
                        rep + 1,
                        m.name(),
                        cell.label()
                    );
                    let r = run_cell(ctx, &tools, &cell, m, RunOpts::default());
                    let mut line = hop_json(
                        &format!("own-migrate/{}/{}/{}g", m.name(), w.name(), mem / 1024),
                        &cell,
                        m,
                        &r,
                        0,
                    );
                    line.insert("rep".into(), json!(rep + 1));
                    if r.hops.is_empty() {
                        line.insert("ok".into(), json!(false));
                        line.insert("problems".into(), json!(r.problems));
                    }
                    ctx.record(line);
                    t.add(mem, w, m, &r);
                }
            }
        }
    }
    Ok(t)
}

impl Table {
    fn add(&mut self, mem: u64, w: Workload, m: Migrator, r: &Run) {
        self.runs += 1;
        self.integrity_failures += r.integrity_failures().max(usize::from(r.hops.is_empty()));
        if !r.ok() || r.hops.is_empty() {
            self.failures += 1;
            return;
        }
        let f = self.rows.entry((mem, w.name(), m.name())).or_default();
        let h = &r.hops[0];
        f.bytes.extend(h.bytes);
        f.total_ms.extend(h.total_ms);
        f.downtime_ms.extend(h.downtime_ms);
        if let Some((b, d)) = h.ops_rate {
            f.rate_before.push(b);
            f.rate_during.push(d);
        }
    }

    fn med(&self, mem: u64, w: &str, m: &str, pick: fn(&Figures) -> &Vec<f64>) -> Option<f64> {
        self.rows.get(&(mem, w, m)).and_then(|f| median(pick(f)))
    }

    /// Largest ours/QEMU ratio of the medians over the workloads at `mem`.
    fn ratio_max(&self, mem: u64, pick: fn(&Figures) -> &Vec<f64>) -> Option<f64> {
        WORKLOADS
            .iter()
            .filter_map(|w| {
                Some(
                    self.med(mem, w.name(), "ours", pick)?
                        / self.med(mem, w.name(), "qemu", pick)?,
                )
            })
            .reduce(f64::max)
    }

    /// The summary fields at `mem`.
    pub fn summary(&self, ctx: &Ctx, mem: u64) -> Map<String, Value> {
        let round = |v: Option<f64>| v.map(|x| num((x * 1000.0).round() / 1000.0));
        let downtime_max = self
            .rows
            .iter()
            .filter(|((m, _, g), _)| *m == mem && *g == "ours")
            .flat_map(|(_, f)| f.downtime_ms.iter().copied())
            .reduce(f64::max);
        object(json!({
            "integrity_failures": self.integrity_failures,
            "downtime_ms_max": round(downtime_max),
            "bytes_ours_over_qemu_max": round(self.ratio_max(mem, |f| &f.bytes)),
            "time_ours_over_qemu_max": round(self.ratio_max(mem, |f| &f.total_ms)),
            "runs": self.runs,
            "failed_runs": self.failures,
            "qemu": qemu_version(&ctx.manifest),
            "ok": self.failures == 0 && self.integrity_failures == 0 && self.runs > 0,
        }))
    }

    /// Per-cell medians, for the benchmark file.
    pub fn rows(&self) -> Vec<Value> {
        self.rows
            .iter()
            .map(|((mem, w, m), f)| {
                json!({
                    "mem_mib": mem, "workload": w, "migrator": m, "runs": f.bytes.len(),
                    "bytes_median": median(&f.bytes), "total_ms_median": median(&f.total_ms),
                    "downtime_ms_median": median(&f.downtime_ms),
                    "guest_ops_per_s_before_median": median(&f.rate_before),
                    "guest_ops_per_s_during_median": median(&f.rate_during),
                    "bytes": f.bytes, "total_ms": f.total_ms, "downtime_ms": f.downtime_ms,
                })
            })
            .collect()
    }
}

/// `own-pingpong` with `migrations` hops, plus the negative control.
fn pingpong(ctx: &mut Ctx, migrations: usize) -> Result<Map<String, Value>, HarnessError> {
    sweep_stale_ram_files();
    let tools = build_tools(&ctx.repo)?;
    let mut cell = cell_for(4096, Workload::DirtyFree);
    cell.migrations = migrations;
    cell.churn_mib = 64;
    cell.pace_us = 50;
    eprintln!("[own] pingpong: {migrations} migrations with freehint-migrate");
    let r = run_cell(ctx, &tools, &cell, Migrator::Ours, RunOpts::default());
    for i in 0..r.hops.len().max(1) {
        ctx.record(hop_json(
            &format!("own-pingpong/{}", i + 1),
            &cell,
            Migrator::Ours,
            &r,
            i,
        ));
    }
    let mut control = cell.clone();
    control.migrations = 1;
    eprintln!("[own] abort at resume: the source must run on, intact");
    let aborted = abort_check(ctx, &tools, &control, false, "own-pingpong/abort-at-resume");
    let abort_ok = aborted.get("ok").and_then(Value::as_bool) == Some(true);
    ctx.record(aborted);
    eprintln!("[own] negative control: the final pass dropped; the destination must see damage");
    let c = run_cell(
        ctx,
        &tools,
        &control,
        Migrator::Ours,
        // One live pass: the final pass then carries what the churn wrote
        // during the bulk pass (thousands of pages), and dropping it must
        // show on the destination.
        RunOpts {
            negative_control: true,
            max_passes: Some(1),
            ..RunOpts::default()
        },
    );
    let verdict_failed = c
        .hops
        .first()
        .and_then(|h| h.verdict.as_ref())
        .is_some_and(|v| !crate::guest::result_ok(v));
    let caught = verdict_failed || c.destination_splat;
    let corrupt = c
        .hops
        .first()
        .and_then(|h| h.verdict.as_ref())
        .and_then(|v| v.get("corrupt_pages"))
        .cloned();
    ctx.record(object(json!({
        "name": "own-pingpong/negative-control",
        "ok": caught,
        "note": "final pass dropped on purpose: ok means the destination did not verify clean (damaged pages, or a guest that died at resume)",
        "caught_by": caught.then(|| if corrupt.as_ref().and_then(Value::as_u64).unwrap_or(0) > 0 {
            "corrupt pages"
        } else if verdict_failed {
            "guest died"
        } else {
            "destination kernel splat at resume"
        }),
        "corrupt_pages": corrupt,
        "problems": c.problems,
    })));
    let downtimes: Vec<f64> = r.hops.iter().filter_map(|h| h.downtime_ms).collect();
    let mut s = object(json!({
        "migrations": r.hops.len(),
        "integrity_failures": r.integrity_failures(),
        "negative_control_caught": caught,
        "abort_leaves_source_running": abort_ok,
        "downtime_ms_median": median(&downtimes).map(num),
        "pages_checked": r.hops.iter().filter_map(|h| h.verdict.as_ref()?.get("pages_checked")?.as_u64()).sum::<u64>(),
        "qemu": qemu_version(&ctx.manifest),
    }));
    if !r.problems.is_empty() {
        s.insert("problems".into(), json!(r.problems));
    }
    s.insert(
        "ok".into(),
        json!(r.ok() && r.hops.len() == migrations && caught && abort_ok),
    );
    Ok(s)
}

/// A migration refused at the last moment (the destination loaded, the
/// gate says `abort`): the program must fail, say the source runs, and
/// the source must run on with every page intact.
pub(crate) fn abort_check(
    ctx: &mut Ctx,
    tools: &Tools,
    cell: &Cell,
    balloon: bool,
    name: &str,
) -> Map<String, Value> {
    let scale = |s: u64| Duration::from_secs(s).mul_f64(ctx.timeout_scale.max(0.1));
    let mut problems = Vec::new();
    let mut summary = Value::Null;
    let result = (|| -> Result<(), String> {
        let e = |e: VmError| e.to_string();
        let label = "abort";
        let mut src = start_own(
            &ctx.manifest,
            tools,
            cell,
            &ctx.log_dir,
            "abort-0",
            false,
            balloon,
        )
        .map_err(e)?;
        wait_ready(&mut src.vm, scale(300)).map_err(e)?;
        if balloon {
            super::own_hint::inflate(&src, cell.driver, scale(120))?;
        }
        let mut dst = start_own(
            &ctx.manifest,
            tools,
            cell,
            &ctx.log_dir,
            "abort-1",
            true,
            balloon,
        )
        .map_err(e)?;
        let opts = RunOpts {
            abort_at_resume: true,
            balloon,
            ..RunOpts::default()
        };
        let hop = migrate_ours(tools, &src, &mut dst, &ctx.log_dir, label, opts, scale(600))?.hop;
        summary = hop.detail.get("send").cloned().unwrap_or(Value::Null);
        if summary["status"] != "failed" || summary["source"] != "running" {
            problems.push(format!(
                "the sender should fail with the source running: {summary}"
            ));
        }
        let status = src
            .vm
            .qmp()
            .execute("query-status", None)
            .map_err(|e| e.to_string())?;
        if status["status"] != "running" {
            problems.push(format!(
                "the source is {} after the refused migration",
                status["status"]
            ));
        }
        dst.vm.kill();
        if balloon {
            // Plugged back into the source, bound again, inflated again.
            let check = super::own_hint::destination_balloon(&mut src, cell.driver, scale(120));
            if check.get("ok") != Some(&json!(true)) {
                problems.push(format!(
                    "the source's balloon after the refused migration: {}",
                    Value::Object(check)
                ));
            }
        }
        let mut run = Run::default();
        finish(&mut src.vm, &mut run, &scale)?;
        problems.extend(run.problems);
        Ok(())
    })();
    if let Err(e) = result {
        problems.push(e);
    }
    object(json!({
        "name": name,
        "ok": problems.is_empty(),
        "note": "the destination is refused at the last moment: the source must run on, intact",
        "sender": summary,
        "problems": problems,
    }))
}

/// CI: 10 migrations.
pub fn run_pingpong(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 10)
}

/// Benchmark: 20 migrations.
pub fn bench_pingpong(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    pingpong(ctx, 20)
}

/// The numbers of the comma-separated variable `name`, or `default`.
pub(crate) fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// Benchmark: the 4 GiB matrix, 16 and 32 GiB (idle, dirty-free) and the
/// guest's slowdown, `FREEHINT_BENCH_REPS` (default 3) runs per cell, to
/// `target/bench/own-migrate.json`.
pub fn bench(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let reps = env_list("FREEHINT_BENCH_REPS", &[3])[0].max(1) as usize;
    let big = env_list("FREEHINT_BENCH_SIZES", &[16384, 32768]);
    let small = matrix(ctx, &[4096], &WORKLOADS, reps)?;
    let large = matrix(ctx, &big, &[Workload::Idle, Workload::DirtyFree], reps)?;
    let slow = slowdown(ctx, reps)?;
    let mut s = small.summary(ctx, 4096);
    for &mem in &big {
        let l = large.summary(ctx, mem);
        for k in [
            "bytes_ours_over_qemu_max",
            "time_ours_over_qemu_max",
            "downtime_ms_max",
        ] {
            s.insert(
                format!("{k}_{}g", mem / 1024),
                l.get(k).cloned().unwrap_or(Value::Null),
            );
        }
    }
    s.insert("slowdown".into(), slow.clone());
    let ok = small.failures + large.failures == 0
        && small.integrity_failures + large.integrity_failures == 0;
    s.insert("ok".into(), json!(ok));
    let doc = json!({
        "benchmark": "own-migrate",
        "command": "tests/vm/run bench-own-migrate",
        "reps": reps,
        "summary": s,
        "cells": small.rows().into_iter().chain(large.rows()).collect::<Vec<_>>(),
    });
    let dir = ctx.repo.join("target/bench");
    let path = dir.join("own-migrate.json");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, format!("{doc:#}\n")))
        .map_err(crate::errors::io_error("cannot write", &path))?;
    eprintln!("[own] wrote {}", path.display());
    Ok(s)
}

/// The guest's churn rate (64 MiB, no pause) before and during a
/// migration, per migrator.
fn slowdown(ctx: &mut Ctx, reps: usize) -> Result<Value, HarnessError> {
    let tools = build_tools(&ctx.repo)?;
    let mut out = Map::new();
    for m in [Migrator::Ours, Migrator::Qemu] {
        if !selected(&format!("{}/slowdown", m.name())) {
            continue;
        }
        let (mut before, mut during) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let mut cell = cell_for(4096, Workload::Idle);
            cell.churn_mib = 64;
            cell.pace_us = 0;
            let opts = RunOpts {
                rate_window: Some(Duration::from_secs(3)),
                ..RunOpts::default()
            };
            let r = run_cell(ctx, &tools, &cell, m, opts);
            let mut line = hop_json(
                &format!("own-migrate/slowdown/{}", m.name()),
                &cell,
                m,
                &r,
                0,
            );
            line.insert("rep".into(), json!(rep + 1));
            ctx.record(line);
            if let Some((b, d)) = r.hops.first().and_then(|h| h.ops_rate) {
                before.push(b);
                during.push(d);
            }
        }
        let (b, d) = (median(&before), median(&during));
        out.insert(
            m.name().into(),
            json!({
                "guest_ops_per_s_before": b.map(num), "guest_ops_per_s_during": d.map(num),
                "slowdown": b.zip(d).map(|(b, d)| num(((1.0 - d / b) * 1000.0).round() / 1000.0)),
            }),
        );
    }
    Ok(Value::Object(out))
}
