//! Live migration between two QEMU processes on 127.0.0.1, with the guest's
//! integrity workload (`fhwork`, crate `tests/guest-workload`) checked on the
//! destination after every migration.
//!
//! One [`MigVm`] is one QEMU: the guest serial console is a UNIX socket
//! (so the harness both reads the guest's output and types a line to it),
//! QMP is another one, QEMU's own stdout/stderr go to a log file. Source and
//! destination get *identical* command lines; the destination adds
//! `-incoming tcp:127.0.0.1:PORT`. [`migrate`] raises max-bandwidth to
//! 10 GB/s (as in the project's reference runs of the stock driver), starts
//! the migration, polls `query-migrate` until it completes or fails and
//! returns the figures (`ram.transferred`, `normal`, `duplicate`,
//! `total-time`, `downtime`, `setup-time`). [`verify_integrity`] then asks
//! the destination guest to verify every live page and returns its verdict.
//!
//! QEMU migrates no state for a `vfio-user-pci` device: on the destination
//! such a device is dead. [`check_migratable`] refuses those VMs with an
//! error instead of letting a migration "pass".

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freehint_migrate::qmp::{Qmp, QmpError};
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::errors::{io_error, PathIoError};
use crate::guest::{GuestOutput, LineJoiner};
use crate::manifest::Manifest;
use crate::qemu::BootSpec;
use crate::runner::{object, HarnessError};
use crate::sockets;

/// Bandwidth cap set before every migration (bytes/s): 10 GB/s, i.e. never
/// the bottleneck on 127.0.0.1.
pub const MAX_BANDWIDTH: u64 = 10_000_000_000;
/// Most serial lines kept in memory per VM (the log file has all of them).
const MAX_LINES: usize = 200_000;
/// Longest serial line kept (longer ones are cut).
const MAX_LINE_LEN: usize = 64 * 1024;

/// Errors of the migration machinery.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// The VM has a device whose state QEMU does not migrate.
    #[error(
        "refusing to migrate a VM with a vfio-user-pci device: QEMU migrates no state for it \
         and the device would be dead on the destination (see docs/vfio-user.md); detach it first"
    )]
    VfioUser,
    /// A device server beside QEMU could not be started.
    #[error("device server: {0}")]
    Server(String),
    /// QEMU could not be started.
    #[error("cannot start QEMU {qemu}: {source}")]
    Spawn {
        /// The QEMU command.
        qemu: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file or socket failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// The manifest lacks the flavour asked for.
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    /// QMP failed.
    #[error("{}", freehint_migrate::qemu::receive::error_chain(.0))]
    Qmp(#[from] QmpError),
    /// The migration ended in a state other than `completed`.
    #[error("migration {status}: {error}")]
    Failed {
        /// The final status (`failed`, `cancelled`, ...).
        status: String,
        /// QEMU's error description, if any.
        error: String,
    },
    /// Something did not happen in time.
    #[error("timeout after {secs}s waiting for {what} ({log})")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        secs: u64,
        /// The serial log to look at.
        log: String,
    },
    /// The guest or QEMU exited while we waited for it.
    #[error("{role} QEMU exited while waiting for {what} (serial log {log})")]
    Exited {
        /// `src` or `dst`.
        role: String,
        /// What was awaited.
        what: String,
        /// The serial log.
        log: String,
    },
}

impl From<MigrateError> for HarnessError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Qmp(q) => HarnessError::Qmp(q),
            other => HarnessError::Other(other.to_string()),
        }
    }
}

/// Refuses VMs that cannot be migrated faithfully (a `vfio-user-pci` device).
pub fn check_migratable(spec: &BootSpec) -> Result<(), MigrateError> {
    if spec
        .extra_qemu_args
        .iter()
        .any(|a| a.contains("vfio-user-pci"))
    {
        return Err(MigrateError::VfioUser);
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound then released; the tiny race with
/// other processes is acceptable for tests).
pub fn free_port() -> Result<u16, MigrateError> {
    let l =
        TcpListener::bind("127.0.0.1:0").map_err(io_error("cannot bind a port on", "127.0.0.1"))?;
    let addr = l
        .local_addr()
        .map_err(io_error("cannot read the port of", "127.0.0.1"))?;
    Ok(addr.port())
}

/// The QEMU argument list of `spec` with the serial console moved to a UNIX
/// socket server at `serial` (QEMU waits for the harness to connect, so no
/// output is lost).
pub fn migration_args(args: Vec<String>, serial: &Path) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 4);
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        if a == "-serial" && it.peek().map(String::as_str) == Some("stdio") {
            it.next();
            continue;
        }
        out.push(a);
    }
    out.push("-chardev".into());
    out.push(format!(
        "socket,id=fhserial,path={},server=on,wait=on",
        serial.display()
    ));
    out.push("-serial".into());
    out.push("chardev:fhserial".into());
    out
}

#[derive(Debug, Default)]
struct SerialState {
    lines: Vec<String>,
    output: GuestOutput,
    closed: bool,
}

/// How the destination QEMU waits for its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// `-incoming tcp:127.0.0.1:PORT`.
    Tcp(u16),
    /// `-incoming defer` (a `migrate-incoming` over QMP starts it).
    Defer,
}

/// What [`MigVm::start_with`] adds to the spec's QEMU.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Destination: how it waits; `None` for a source.
    pub incoming: Option<Incoming>,
    /// More QEMU arguments, after the spec's.
    pub extra_args: Vec<String>,
    /// More environment variables of the QEMU process.
    pub env: Vec<(String, String)>,
    /// Files removed when the VM is dropped (its RAM file).
    pub owned_files: Vec<PathBuf>,
}

/// One QEMU of a migration pair. Killed on drop (its owned files removed).
#[derive(Debug)]
pub struct MigVm {
    /// `src`, `dst`, ... (for logs and errors).
    pub role: String,
    child: Option<Child>,
    /// QMP session.
    pub qmp: Qmp,
    serial_tx: UnixStream,
    state: Arc<Mutex<SerialState>>,
    /// Guest console log.
    pub serial_log: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
    sockets: Vec<PathBuf>,
    owned_files: Vec<PathBuf>,
}

fn connect_retry(
    path: &Path,
    timeout: Duration,
    child: &mut Child,
) -> Result<UnixStream, MigrateError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(source) => {
                if matches!(child.try_wait(), Ok(Some(_))) || start.elapsed() >= timeout {
                    return Err(io_error("cannot connect to serial socket", path)(source).into());
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

impl MigVm {
    /// Starts QEMU for `spec` (`incoming`: listen for a migration on that
    /// port). Files go to `log_dir/<label>-<role>.*`.
    pub fn start(
        manifest: &Manifest,
        spec: &BootSpec,
        log_dir: &Path,
        role: &str,
        incoming: Option<u16>,
    ) -> Result<MigVm, MigrateError> {
        let opts = VmOptions {
            incoming: incoming.map(Incoming::Tcp),
            ..VmOptions::default()
        };
        Self::start_with(manifest, spec, log_dir, role, &opts)
    }

    /// [`MigVm::start`] with more set-up (see [`VmOptions`]).
    pub fn start_with(
        manifest: &Manifest,
        spec: &BootSpec,
        log_dir: &Path,
        role: &str,
        opts: &VmOptions,
    ) -> Result<MigVm, MigrateError> {
        check_migratable(spec)?;
        let image = manifest.flavour(&spec.flavour)?;
        let base = format!("{}-{role}", spec.label());
        let serial_sock = sockets::socket_path(&format!("{base}.ser"))?;
        let qmp_sock = sockets::socket_path(&format!("{base}.qmp"))?;
        let serial_log = log_dir.join(format!("{base}.log"));
        let qemu_log = log_dir.join(format!("{base}.qemu.log"));
        let mut args = migration_args(spec.qemu_args(&image, Some(&qmp_sock)), &serial_sock);
        args.extend(opts.extra_args.iter().cloned());
        match opts.incoming {
            Some(Incoming::Tcp(port)) => {
                args.push("-incoming".into());
                args.push(format!("tcp:127.0.0.1:{port}"));
            }
            Some(Incoming::Defer) => {
                args.push("-incoming".into());
                args.push("defer".into());
            }
            None => {}
        }
        let out = File::create(&qemu_log).map_err(io_error("cannot create", &qemu_log))?;
        let err = out
            .try_clone()
            .map_err(io_error("cannot clone", &qemu_log))?;
        log::debug!("{role}: {} {}", manifest.qemu.display(), args.join(" "));
        let mut child = Command::new(&manifest.qemu)
            .args(&args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| MigrateError::Spawn {
                qemu: manifest.qemu.clone(),
                source,
            })?;
        let serial = match connect_retry(&serial_sock, Duration::from_secs(60), &mut child) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let qmp = match Qmp::connect_within(&qmp_sock, Duration::from_secs(60)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        let serial_tx = serial
            .try_clone()
            .map_err(io_error("cannot clone", &serial_sock))?;
        let log_file = File::create(&serial_log).map_err(io_error("cannot create", &serial_log))?;
        let state = Arc::new(Mutex::new(SerialState::default()));
        let st = Arc::clone(&state);
        std::thread::spawn(move || pump_serial(serial, log_file, st));
        Ok(MigVm {
            role: role.to_string(),
            child: Some(child),
            qmp,
            serial_tx,
            state,
            serial_log,
            qemu_log,
            sockets: vec![serial_sock, qmp_sock],
            owned_files: opts.owned_files.clone(),
        })
    }

    /// QEMU's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SerialState> {
        // A poisoned lock only means the pump thread panicked mid-update;
        // the data is still the best we have.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of serial lines seen so far.
    pub fn line_count(&self) -> usize {
        self.lock().lines.len()
    }

    /// A copy of the parsed guest output so far (results, splats, `@@DONE`).
    pub fn output(&self) -> GuestOutput {
        self.lock().output.clone()
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits for a guest `@@RESULT` line named `name` at index `>= from`.
    pub fn wait_result(
        &mut self,
        from: usize,
        name: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<ResultLine, MigrateError> {
        let key = format!("\"name\":\"{name}\"");
        let (at, line) = self.wait_line(from, what, timeout, |l| {
            l.contains(RESULT_MARKER) && l.contains(&key)
        })?;
        let obj = json_after(&line, RESULT_MARKER);
        Ok((at, line, obj))
    }

    /// Waits until a serial line at index `>= from` satisfies `pred`;
    /// returns its index and text.
    pub fn wait_line(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, String), MigrateError> {
        let start = Instant::now();
        let mut next = from;
        loop {
            let closed = {
                let st = self.lock();
                while next < st.lines.len() {
                    if pred(&st.lines[next]) {
                        return Ok((next, st.lines[next].clone()));
                    }
                    next += 1;
                }
                st.closed
            };
            if closed || !self.running() {
                return Err(MigrateError::Exited {
                    role: self.role.clone(),
                    what: what.to_string(),
                    log: self.serial_log.display().to_string(),
                });
            }
            if start.elapsed() >= timeout {
                return Err(MigrateError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    log: self.serial_log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `line` (plus a newline) on the guest console.
    pub fn send_line(&mut self, line: &str) -> Result<(), MigrateError> {
        let mut b = line.as_bytes().to_vec();
        b.push(b'\n');
        self.serial_tx.write_all(&b).map_err(io_error(
            "cannot write to the guest console of",
            &self.serial_log,
        ))?;
        Ok(())
    }

    /// Waits for QEMU to exit (the guest powers off with `reboot -f` and QEMU
    /// runs with `-no-reboot`); kills it after `timeout`. Returns whether it
    /// exited on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while let Some(c) = self.child.as_mut() {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                // Let the pump thread drain the last lines.
                let t = Instant::now();
                while !self.lock().closed && t.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return true;
            }
            if start.elapsed() >= timeout {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Kills QEMU (used for the paused source after a migration).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MigVm {
    fn drop(&mut self) {
        self.kill();
        for s in &self.sockets {
            sockets::release(s);
        }
        for f in &self.owned_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn pump_serial(stream: UnixStream, mut log: File, state: Arc<Mutex<SerialState>>) {
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    let mut joiner = LineJoiner::default();
    let keep = |line: &str| {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.output.feed_line(line);
        if st.lines.len() < MAX_LINES {
            st.lines.push(line.to_string());
        }
    };
    loop {
        buf.clear();
        match (&mut r)
            .take(MAX_LINE_LEN as u64)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let _ = log.write_all(&buf);
        joiner.push(&String::from_utf8_lossy(&buf), keep);
    }
    joiner.finish(keep);
    let _ = log.flush();
    state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
}

/// The figures of one migration, from the source's final `query-migrate`.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationStats {
    /// Final status (`completed` on success).
    pub status: String,
    /// `ram.transferred`: bytes sent for RAM.
    pub transferred: u64,
    /// `ram.normal`: pages sent whole.
    pub normal: u64,
    /// `ram.duplicate`: zero pages sent as markers.
    pub duplicate: u64,
    /// `ram.dirty-sync-count`.
    pub dirty_sync_count: u64,
    /// `total-time` in ms.
    pub total_ms: u64,
    /// `downtime` in ms.
    pub downtime_ms: u64,
    /// `setup-time` in ms.
    pub setup_ms: u64,
    /// Host wall clock from `migrate` to completion, ms.
    pub wall_ms: u64,
}

impl MigrationStats {
    /// Reads the figures out of a `query-migrate` reply.
    pub fn from_query(q: &Value, wall_ms: u64) -> MigrationStats {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        MigrationStats {
            status: q["status"].as_str().unwrap_or("?").to_string(),
            transferred: u(&q["ram"]["transferred"]),
            normal: u(&q["ram"]["normal"]),
            duplicate: u(&q["ram"]["duplicate"]),
            dirty_sync_count: u(&q["ram"]["dirty-sync-count"]),
            total_ms: u(&q["total-time"]),
            downtime_ms: u(&q["downtime"]),
            setup_ms: u(&q["setup-time"]),
            wall_ms,
        }
    }

    /// The figures as JSON fields.
    pub fn to_json(&self) -> Map<String, Value> {
        let v = json!({
            "bytes": self.transferred,
            "mb_sent": (self.transferred as f64 / 1e5).round() / 10.0,
            "normal_pages": self.normal,
            "zero_pages": self.duplicate,
            "dirty_syncs": self.dirty_sync_count,
            "total_ms": self.total_ms,
            "downtime_ms": self.downtime_ms,
            "setup_ms": self.setup_ms,
            "wall_ms": self.wall_ms,
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// Migrates `src` to the destination listening on `port` and waits for the
/// end. `timeout` bounds the whole migration.
pub fn migrate(
    src: &mut MigVm,
    port: u16,
    timeout: Duration,
) -> Result<MigrationStats, MigrateError> {
    migrate_to(src, &format!("tcp:127.0.0.1:{port}"), timeout)
}

/// [`migrate`] to any migration URI (e.g. `exec:cat > /dev/null`, a sink
/// that makes QEMU run one hint round without a destination); the source is
/// left paused (`postmigrate`) on success.
pub fn migrate_to(
    src: &mut MigVm,
    uri: &str,
    timeout: Duration,
) -> Result<MigrationStats, MigrateError> {
    let start = Instant::now();
    start_migration(src, uri, MAX_BANDWIDTH)?;
    let end = wait_migration(
        src,
        &["completed"],
        &["failed", "cancelled"],
        "migration",
        timeout,
    );
    if matches!(end, Err(MigrateError::Timeout { .. })) {
        let _ = src.qmp.execute("migrate_cancel", None);
    }
    let q = end?;
    Ok(MigrationStats::from_query(
        &q,
        start.elapsed().as_millis() as u64,
    ))
}

/// Sets the bandwidth cap (bytes/s) and starts migrating `src` to `uri`.
pub fn start_migration(src: &mut MigVm, uri: &str, max_bandwidth: u64) -> Result<(), MigrateError> {
    src.qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": max_bandwidth })),
    )?;
    src.qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    Ok(())
}

/// Polls `query-migrate` on `src` until its status is one of `want`
/// (returns that query), one of `fail_on` ([`MigrateError::Failed`]), or
/// `timeout` has passed ([`MigrateError::Timeout`]).
pub fn wait_migration(
    src: &mut MigVm,
    want: &[&str],
    fail_on: &[&str],
    what: &str,
    timeout: Duration,
) -> Result<Value, MigrateError> {
    let start = Instant::now();
    loop {
        let q = src.qmp.execute("query-migrate", None)?;
        let status = q["status"].as_str().unwrap_or("?").to_string();
        if want.contains(&status.as_str()) {
            return Ok(q);
        }
        if fail_on.contains(&status.as_str()) {
            return Err(MigrateError::Failed {
                status,
                error: q["error-desc"].as_str().unwrap_or("").to_string(),
            });
        }
        if start.elapsed() >= timeout {
            return Err(MigrateError::Timeout {
                what: format!("{what} (last status {status})"),
                secs: timeout.as_secs(),
                log: src.qemu_log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A guest result line found on the console: its index, its text and its
/// object (`None` if the JSON was malformed).
pub type ResultLine = (usize, String, Option<Map<String, Value>>);

/// Marker `fhwork` prints when its working set is in place.
pub const READY_MARKER: &str = "@@FHWORK ready";
/// Marker of a guest result line.
const RESULT_MARKER: &str = "@@RESULT ";

/// The JSON object that follows `marker` on a console line.
fn json_after(line: &str, marker: &str) -> Option<Map<String, Value>> {
    let (_, j) = line.split_once(marker)?;
    match serde_json::from_str::<Value>(j.trim()).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Waits for the workload on `vm` to be ready; returns the ready line's JSON.
pub fn wait_ready(vm: &mut MigVm, timeout: Duration) -> Result<Map<String, Value>, MigrateError> {
    let (_, line) = vm.wait_line(0, "the guest workload to start", timeout, |l| {
        l.contains(READY_MARKER)
    })?;
    Ok(json_after(&line, READY_MARKER).unwrap_or_default())
}

/// Asks the guest on `vm` to verify every live page (`stop`: and then exit)
/// and returns its `integrity` result.
pub fn verify_integrity(
    vm: &mut MigVm,
    stop: bool,
    timeout: Duration,
) -> Result<Map<String, Value>, MigrateError> {
    let from = vm.line_count();
    vm.send_line(if stop { "stop" } else { "verify" })?;
    let (_, line, obj) =
        vm.wait_result(from, "integrity", "the guest's integrity verdict", timeout)?;
    Ok(obj.unwrap_or_else(|| {
        let mut m = Map::new();
        m.insert("name".into(), json!("integrity"));
        m.insert("ok".into(), json!(false));
        m.insert("error".into(), json!(format!("malformed verdict: {line}")));
        m
    }))
}

/// The guest driver that answers QEMU's free page hint requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// No balloon driver loaded: no hints.
    None,
    /// Linux's `virtio_balloon.ko` (allocates the pages it reports).
    Stock,
    /// Our `freehint.ko` (walks the free lists).
    Freehint,
}

impl Driver {
    /// Short name (guest argument, JSON, labels).
    pub fn name(self) -> &'static str {
        match self {
            Driver::None => "none",
            Driver::Stock => "stock",
            Driver::Freehint => "freehint",
        }
    }

    /// Whether this driver column is measured. All are, unless
    /// `FREEHINT_MIGRATE_DRIVERS` (comma-separated names) leaves some out;
    /// a left-out column is reported as "pending", never as a pass.
    pub fn enabled(self) -> bool {
        match std::env::var("FREEHINT_MIGRATE_DRIVERS") {
            Ok(v) if !v.trim().is_empty() => v.split(',').any(|d| d.trim() == self.name()),
            _ => true,
        }
    }
}

/// What the guest did to its memory before the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Nothing beyond the small integrity working set.
    Idle,
    /// `pre_mib` dirtied and kept (verified after every migration).
    DirtyKeep,
    /// `pre_mib` dirtied, then freed.
    DirtyFree,
}

impl Workload {
    /// Short name (guest argument, JSON, labels).
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::DirtyKeep => "dirty-keep",
            Workload::DirtyFree => "dirty-free",
        }
    }
}

/// One guest migrated one or more times.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Hinting driver.
    pub driver: Driver,
    /// Memory history before the migration.
    pub workload: Workload,
    /// `init_on_alloc=` on the guest command line.
    pub init_on_alloc: bool,
    /// MiB dirtied (kept or freed) before migrating.
    pub pre_mib: u64,
    /// MiB of the churning integrity working set during migration.
    pub churn_mib: u64,
    /// Pause between churn steps in the guest (µs; 0 = flat out).
    pub pace_us: u64,
    /// Number of migrations (1 = one way; 2N = N round trips).
    pub migrations: usize,
    /// Kernel flavour.
    pub flavour: String,
    /// More `key=value` arguments of the guest script (`qemu-migrate.sh`),
    /// after the ones above (e.g. `lockdep=1`, `rmmod_at_end=1`).
    pub extra_guest_args: Vec<String>,
}

impl Cell {
    /// A one-migration cell with the workload of the project's reference
    /// runs of the stock driver (300 MiB dirtied) and a slow 32 MiB
    /// integrity working set.
    pub fn new(mem_mib: u64, driver: Driver, workload: Workload, init_on_alloc: bool) -> Cell {
        Cell {
            mem_mib,
            driver,
            workload,
            init_on_alloc,
            pre_mib: 300,
            churn_mib: 32,
            // ~4 chunk operations a second: the working set keeps changing
            // during the migration without adding more than a few MB/s of
            // dirty pages to the byte counts being compared.
            pace_us: 250_000,
            migrations: 1,
            flavour: "normal".into(),
            extra_guest_args: Vec::new(),
        }
    }

    /// `driver/workload/ioaN/MEMg`.
    pub fn label(&self) -> String {
        format!(
            "{}/{}/ioa{}/{}g",
            self.driver.name(),
            self.workload.name(),
            u8::from(self.init_on_alloc),
            self.mem_mib / 1024
        )
    }

    /// The boot of this cell (guest script `qemu-migrate`).
    pub fn boot_spec(&self) -> BootSpec {
        let mut spec = BootSpec::new("qemu-migrate");
        spec.flavour = self.flavour.clone();
        spec.mem_mib = self.mem_mib;
        spec.guest_args = vec![
            format!("driver={}", self.driver.name()),
            format!("workload={}", self.workload.name()),
            format!("pre_mib={}", self.pre_mib),
            format!("churn_mib={}", self.churn_mib),
            format!("pace_us={}", self.pace_us),
        ];
        spec.guest_args
            .extend(self.extra_guest_args.iter().cloned());
        spec.extra_cmdline = vec![format!("init_on_alloc={}", u8::from(self.init_on_alloc))];
        // Same device in every cell (the driver decides whether it hints).
        spec.extra_qemu_args = vec![
            "-object".into(),
            "iothread,id=fhio".into(),
            "-device".into(),
            "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=fhio".into(),
        ];
        spec.timeout = Duration::from_secs(600);
        spec
    }
}

/// What happened to one cell.
#[derive(Debug, Clone, Default)]
pub struct CellOutcome {
    /// One entry per completed migration.
    pub migrations: Vec<MigrationStats>,
    /// The destination's integrity verdict after each migration.
    pub integrity: Vec<Map<String, Value>>,
    /// The workload's ready line (used memory etc.).
    pub ready: Map<String, Value>,
    /// Problems seen (failed migration, splat, bad verdict, no clean exit).
    pub problems: Vec<String>,
    /// Serial logs of the VMs involved.
    pub logs: Vec<String>,
    /// The source's free page hint virtqueue after each migration
    /// (`x-query-virtio-queue-status`), `null` when it could not be read.
    pub hint_vq: Vec<Value>,
}

impl CellOutcome {
    /// Pages reported damaged over all verdicts.
    pub fn corrupt_pages(&self) -> u64 {
        self.integrity
            .iter()
            .map(|r| r.get("corrupt_pages").and_then(Value::as_u64).unwrap_or(0))
            .sum()
    }

    /// Verdicts that failed.
    pub fn integrity_failures(&self) -> usize {
        self.integrity
            .iter()
            .filter(|r| !crate::guest::result_ok(r))
            .count()
    }

    /// Whether everything went right.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.integrity_failures() == 0
    }

    /// The outcome of a cell that [`run_cell`] could not run (QEMU did not
    /// start, a socket failed, ...): no figures, one problem. Scenarios
    /// record it as a failed result and go on with their next cell.
    pub fn harness_error(e: &MigrateError) -> CellOutcome {
        CellOutcome {
            problems: vec![format!("harness error: {e}")],
            ..CellOutcome::default()
        }
    }
}

/// Failed `@@RESULT`s the guest printed (e.g. the driver did not load).
fn guest_failures(vm: &MigVm, out: &mut Vec<String>) {
    for r in vm.output().results {
        if !crate::guest::result_ok(&r) {
            out.push(format!(
                "{}: guest result failed: {}",
                vm.role,
                Value::Object(r)
            ));
        }
    }
}

/// Console markers of kernel complaints that [`crate::guest::SPLAT_MARKERS`]
/// does not catch on its own, matched anywhere in a line by
/// [`is_splat_line`]. Most lockdep, spinlock, atomic-sleep and list debug
/// reports start with `WARNING:` or `BUG:` (already matched); these are the
/// ones that do not, or that follow a report whose first line could be
/// missed: `BUG()`/`VM_BUG_ON` (`kernel BUG at`), a Rust panic in the
/// kernel (`panicked at`), UBSAN, DEBUG_LIST's double add, lockdep switching
/// itself off after a report (after which it reports nothing more).
pub const EXTRA_SPLAT_MARKERS: &[&str] = &[
    "kernel BUG at",
    "panicked at",
    "UBSAN:",
    "list_add double add",
    "DEBUG_LOCKS_WARN_ON",
    "turning off the locking correctness validator",
    "INFO: lockdep is turned off",
    "Unable to handle kernel",
];

/// Whether one console line is (part of) a kernel complaint: a marker of
/// [`crate::guest::SPLAT_MARKERS`] (with its exceptions) or of
/// [`EXTRA_SPLAT_MARKERS`]. `@@RESULT` and `@@DONE` lines never count
/// (they may quote an error text).
pub fn is_splat_line(line: &str) -> bool {
    if line.contains(RESULT_MARKER) || line.contains("@@DONE rc=") {
        return false;
    }
    crate::guest::is_splat(line) || EXTRA_SPLAT_MARKERS.iter().any(|m| line.contains(m))
}

/// The splat lines of a whole serial log (see [`is_splat_line`]).
pub fn splat_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| is_splat_line(l))
        .map(str::to_string)
        .collect()
}

/// Adds one problem to `out` if any console line of `vm` so far is a kernel
/// complaint ([`is_splat_line`]): count, first line, serial log.
pub fn splat_problems(vm: &MigVm, out: &mut Vec<String>) {
    let (count, first) = {
        let st = vm.lock();
        let mut it = st.lines.iter().filter(|l| is_splat_line(l));
        let first = it.next().cloned();
        (first.is_some() as usize + it.count(), first)
    };
    if count > 0 {
        out.push(format!(
            "{}: {} kernel splat line(s), first: {} ({})",
            vm.role,
            count,
            first.unwrap_or_default(),
            vm.serial_log.display()
        ));
    }
}

/// Boots `cell`'s guest, waits for its workload, migrates it
/// `cell.migrations` times (each time to a fresh destination QEMU with the
/// same command line), asks each destination to verify every live page, and
/// finally stops the workload and waits for a clean power-off. `progress`
/// receives one line per step (for stderr).
pub fn run_cell(
    manifest: &Manifest,
    log_dir: &Path,
    cell: &Cell,
    timeout_scale: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<CellOutcome, MigrateError> {
    run_cell_with(
        manifest,
        log_dir,
        cell,
        timeout_scale,
        progress,
        &mut |_, _| Ok(()),
    )
}

/// [`run_cell`] with one extra step on the last destination: `at_end`
/// runs after that destination's final integrity verdict (the workload has
/// stopped; the guest script goes on) and before the harness waits for the
/// guest to power off. It gets the VM and the scaled timeout unit (the
/// duration of one "second"); an error it returns becomes a problem of the
/// cell. Used by `qemu-lockdep` to unload the driver during a hint round.
pub fn run_cell_with(
    manifest: &Manifest,
    log_dir: &Path,
    cell: &Cell,
    timeout_scale: f64,
    progress: &mut dyn FnMut(&str),
    at_end: &mut dyn FnMut(&mut MigVm, Duration) -> Result<(), MigrateError>,
) -> Result<CellOutcome, MigrateError> {
    let spec = cell.boot_spec();
    check_migratable(&spec)?;
    let scale = |s: u64| Duration::from_secs(s).mul_f64(timeout_scale.max(0.1));
    let tag = cell.label().replace('/', "-");
    let mut out = CellOutcome::default();
    let mut src = MigVm::start(manifest, &spec, log_dir, &format!("{tag}-0"), None)?;
    out.logs.push(src.serial_log.display().to_string());
    out.ready = match wait_ready(&mut src, scale(300)) {
        Ok(r) => r,
        Err(e) => {
            guest_failures(&src, &mut out.problems);
            splat_problems(&src, &mut out.problems);
            out.problems.push(e.to_string());
            return Ok(out);
        }
    };
    progress(&format!(
        "{}: guest ready (used {} MiB)",
        cell.label(),
        out.ready
            .get("used_mib")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    ));
    for i in 0..cell.migrations {
        let port = free_port()?;
        let mut dst = match MigVm::start(
            manifest,
            &spec,
            log_dir,
            &format!("{tag}-{}", i + 1),
            Some(port),
        ) {
            Ok(d) => d,
            Err(e) => {
                out.problems
                    .push(format!("destination {} did not start: {e}", i + 1));
                return Ok(out);
            }
        };
        out.logs.push(dst.serial_log.display().to_string());
        let vq_before = free_page_vq(&mut src).ok();
        let stats = match migrate(&mut src, port, scale(600)) {
            Ok(s) => s,
            Err(e) => {
                splat_problems(&src, &mut out.problems);
                out.problems.push(format!("migration {}: {e}", i + 1));
                return Ok(out);
            }
        };
        splat_problems(&src, &mut out.problems);
        let mut vq = free_page_vq(&mut src).unwrap_or(Value::Null);
        // The queue's indices migrate with the device: count this round only.
        let used = |v: &Value| v.get("used_idx").and_then(Value::as_u64);
        if let (Some(a), Some(b)) = (vq_before.as_ref().and_then(used), used(&vq)) {
            vq["used_delta"] = json!(b.wrapping_sub(a) & 0xffff);
        }
        out.hint_vq.push(vq);
        src.kill();
        progress(&format!(
            "{}: migration {}/{}: {:.1} MB, {} ms total, {} ms downtime",
            cell.label(),
            i + 1,
            cell.migrations,
            stats.transferred as f64 / 1e6,
            stats.total_ms,
            stats.downtime_ms
        ));
        out.migrations.push(stats);
        let last = i + 1 == cell.migrations;
        match verify_integrity(&mut dst, last, scale(300)) {
            Ok(v) => {
                out.integrity.push(v);
                if last {
                    if let Err(e) = at_end(&mut dst, scale(1)) {
                        out.problems
                            .push(format!("{}: final step failed: {e}", dst.role));
                    }
                }
            }
            Err(e) => {
                splat_problems(&dst, &mut out.problems);
                out.problems
                    .push(format!("destination {} did not verify: {e}", i + 1));
                return Ok(out);
            }
        }
        src = dst;
    }
    let status = src
        .qmp
        .execute("query-status", None)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string));
    if !src.wait_exit(scale(180)) {
        out.problems.push(format!(
            "{}: guest did not power off within {}s after the workload stopped \
             (QEMU status before: {}; {})",
            src.role,
            scale(180).as_secs(),
            status.as_deref().unwrap_or("?"),
            src.serial_log.display()
        ));
    }
    let o = src.output();
    match o.done_rc {
        Some(0) => {}
        Some(rc) => out.problems.push(format!(
            "{}: guest script exited rc={rc} ({})",
            src.role,
            src.serial_log.display()
        )),
        None => out.problems.push(format!(
            "{}: no @@DONE from the guest ({})",
            src.role,
            src.serial_log.display()
        )),
    }
    splat_problems(&src, &mut out.problems);
    Ok(out)
}

/// QOM path of the balloon's virtio device (`-device virtio-balloon-pci,id=balloon0`).
pub const BALLOON_QOM: &str = "/machine/peripheral/balloon0/virtio-backend";
/// QEMU's index of the free page hint virtqueue (inflate, deflate, stats,
/// free page: QEMU always creates the stats queue).
pub const FREE_PAGE_VQ: u16 = 3;

/// The free page hint virtqueue's indices on `vm` (`used-idx` moving during
/// a migration means the device consumed hints; [`run_cell`] adds
/// `used_delta`, the movement during that migration). Uses `x-query-virtio-queue-status`, never
/// `x-query-virtio-status` (which aborts QEMU 11.1.3 on the balloon).
pub fn free_page_vq(vm: &mut MigVm) -> Result<Value, MigrateError> {
    let q = vm.qmp.execute(
        "x-query-virtio-queue-status",
        Some(json!({"path": BALLOON_QOM, "queue": FREE_PAGE_VQ})),
    )?;
    Ok(json!({
        "name": q.get("name"),
        "used_idx": q.get("used-idx"),
        "last_avail_idx": q.get("last-avail-idx"),
        "shadow_avail_idx": q.get("shadow-avail-idx"),
    }))
}

/// The JSON line of one migration of a cell.
pub fn cell_json(cell: &Cell, out: &CellOutcome, index: usize) -> Map<String, Value> {
    let mut m = object(json!({
        "name": format!("migrate/{}", cell.label()),
        "driver": cell.driver.name(),
        "workload": cell.workload.name(),
        "init_on_alloc": u8::from(cell.init_on_alloc),
        "mem_mib": cell.mem_mib,
        "migration": index + 1,
    }));
    if let Some(s) = out.migrations.get(index) {
        m.extend(s.to_json());
    }
    if let Some(u) = out.ready.get("used_mib") {
        m.insert("guest_used_mib".into(), u.clone());
    }
    if let Some(f) = out.ready.get("mem_free_mib").and_then(Value::as_u64) {
        m.insert(
            "guest_nonfree_mib".into(),
            json!(cell.mem_mib.saturating_sub(f)),
        );
    }
    let verdict = out.integrity.get(index);
    m.insert(
        "integrity".into(),
        json!(verdict.map(|v| if crate::guest::result_ok(v) {
            "ok"
        } else {
            "CORRUPT"
        })),
    );
    for k in ["pages_checked", "corrupt_pages", "first_corrupt"] {
        if let Some(v) = verdict.and_then(|v| v.get(k)) {
            m.insert(k.into(), v.clone());
        }
    }
    let ok = out.migrations.get(index).is_some()
        && verdict.is_some_and(crate::guest::result_ok)
        && (index + 1 < out.migrations.len() || out.problems.is_empty());
    m.insert("ok".into(), json!(ok));
    if !out.problems.is_empty() {
        m.insert("problems".into(), json!(out.problems));
        m.insert("logs".into(), json!(out.logs));
    }
    m
}

/// Median of `v` (None when empty).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The QEMU version string (`tests/vm/qemu --version`, first line).
pub fn qemu_version(manifest: &Manifest) -> String {
    Command::new(&manifest.qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_moves_to_a_socket_and_nothing_else_changes() {
        let args: Vec<String> = ["-m", "4096M", "-serial", "stdio", "-no-reboot"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = migration_args(args, Path::new("/x/s.ser"));
        assert_eq!(
            out,
            vec![
                "-m",
                "4096M",
                "-no-reboot",
                "-chardev",
                "socket,id=fhserial,path=/x/s.ser,server=on,wait=on",
                "-serial",
                "chardev:fhserial"
            ]
        );
    }

    #[test]
    fn vfio_user_vms_are_refused() {
        let mut spec = BootSpec::new("qemu-migrate");
        assert!(check_migratable(&spec).is_ok());
        spec.extra_qemu_args = vec![
            "-device".into(),
            r#"{"driver":"vfio-user-pci","socket":{"path":"/s","type":"unix"}}"#.into(),
        ];
        let e = check_migratable(&spec).unwrap_err();
        assert!(matches!(e, MigrateError::VfioUser));
        assert!(e.to_string().contains("dead on the destination"));
    }

    #[test]
    fn stats_come_from_query_migrate() {
        let q = json!({"status":"completed","total-time":1724,"downtime":31,"setup-time":4,
            "ram":{"transferred":236300000u64,"normal":50000,"duplicate":1000000,"dirty-sync-count":3}});
        let s = MigrationStats::from_query(&q, 1800);
        assert_eq!(s.status, "completed");
        assert_eq!(
            (s.transferred, s.normal, s.duplicate),
            (236_300_000, 50_000, 1_000_000)
        );
        assert_eq!(
            (s.total_ms, s.downtime_ms, s.setup_ms, s.wall_ms),
            (1724, 31, 4, 1800)
        );
        let j = s.to_json();
        assert_eq!(j["bytes"], 236_300_000u64);
        assert_eq!(j["mb_sent"], 236.3);
        // Missing fields read as zero, never a panic.
        let s = MigrationStats::from_query(&json!({"status": 3}), 0);
        assert_eq!((s.status.as_str(), s.transferred), ("?", 0));
    }

    #[test]
    fn cell_boot_spec_is_identical_hardware_for_every_driver() {
        let a = Cell::new(4096, Driver::None, Workload::DirtyFree, true).boot_spec();
        let b = Cell::new(4096, Driver::Stock, Workload::DirtyFree, true).boot_spec();
        assert_eq!(a.extra_qemu_args, b.extra_qemu_args);
        assert!(a
            .extra_qemu_args
            .iter()
            .any(|x| x.contains("free-page-hint=on,iothread=fhio")));
        assert!(a
            .cmdline()
            .contains("fh.args=driver=none,workload=dirty-free,pre_mib=300"));
        assert!(a.cmdline().ends_with("init_on_alloc=1"));
        assert!(check_migratable(&a).is_ok());
        assert_eq!(
            Cell::new(8192, Driver::Stock, Workload::Idle, false).label(),
            "stock/idle/ioa0/8g"
        );
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn outcome_counts_failed_verdicts() {
        let mut o = CellOutcome::default();
        let mut good = Map::new();
        good.insert("ok".into(), json!(true));
        good.insert("corrupt_pages".into(), json!(0));
        let mut bad = Map::new();
        bad.insert("ok".into(), json!(false));
        bad.insert("corrupt_pages".into(), json!(5));
        o.integrity = vec![good, bad];
        assert_eq!(o.integrity_failures(), 1);
        assert_eq!(o.corrupt_pages(), 5);
        assert!(!o.ok());
    }

    /// A real lockdep report, captured from the debug flavour's console on
    /// 2026-11-23: `tests/vm/run qemu-lockdep` with a throwaway module
    /// (never committed) that takes two mutexes in ABBA order, loaded on the
    /// last destination just before the unload. Between two lines of the
    /// guest's own output, one of them cut by the report.
    const REAL_LOCKDEP_SPLAT: &str = "\
@@RESULT {\"name\":\"integrity\",\"ok\":true,\"pages_checked\":16896,\"corrupt_pages\":0}
[    8.689319] ======================================================
[    8.689508] WARNING: possible circular locking dependency detected
[    8.689881] 6.12.117 #1 Tainted: G           O      
[    8.690173] ------------------------------------------------------
[    8.690320] insmod/59 is trying to acquire lock:
[    8.691174] ffffffffa0020068 (splat_a){+.+.}-{3:3}, at: init_module+0x54/0x1000 [splat]
[    8.693956] ffffffffa00200f8 (splat_b){+.+.}-{3:3}, at: init_module+0x46/0x1000 [splat]
[    8.694566] which lock already depends on the new lock.
[    8.695470] -> #1 (splat_b){+.+.}-{3:3}:
[    8.695687]        lock_acquire+0x13c/0x240
@@RMMOD waiting[    8.698661]        init_module+0x20/0x1000 [splat]
[    8.701175] -> #0 (splat_a){+.+.}-{3:3}:
[    8.701631]        check_noncircular+0x139/0x160
[    8.708866]  Possible unsafe locking scenario:
[    8.709014]        CPU0                    CPU1
[    8.709319]   lock(splat_b);
[    8.709771]                                lock(splat_a);
[    8.710269]  *** DEADLOCK ***
[    8.710441] 1 lock held by insmod/59:
[    8.714107] CPU: 1 UID: 0 PID: 59 Comm: insmod Tainted: G           O       6.12.117 #1 
[    8.714532] Call Trace:
[    8.714602]  <TASK>
[    8.714713]  ? print_circular_bug+0x2d9/0x2f0
[    8.715014]  </TASK>
go
[    8.733667] freehint: freehint: unloaded after 1 builds
";

    #[test]
    fn a_real_lockdep_report_is_a_splat() {
        let lines = splat_lines(REAL_LOCKDEP_SPLAT);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("WARNING: possible circular locking dependency detected"));
        assert!(lines[1].contains("Call Trace:"));
        // The guest's own lines around it are not.
        assert!(!is_splat_line(
            "[    8.733667] freehint: freehint: unloaded after 1 builds"
        ));
    }

    #[test]
    fn extra_markers_and_exceptions() {
        for l in [
            "[    3.1] kernel BUG at mm/page_alloc.c:1234!",
            "[    3.1] rust_kernel: panicked at guest-driver/hint.rs:10:5:",
            "[    3.1] UBSAN: shift-out-of-bounds in mm/x.c:1:2",
            "[    3.1] list_add double add: new=0, prev=0, next=0.",
            "[    3.1] DEBUG_LOCKS_WARN_ON(1)",
            "[    3.1] turning off the locking correctness validator.",
            "[    3.1] BUG: sleeping function called from invalid context at x.c:1",
            "[    3.1] list_del corruption, ffff->next is LIST_POISON1 (dead)",
            "[    3.1] Oops: general protection fault, probably for non-canonical address",
        ] {
            assert!(is_splat_line(l), "{l}");
        }
        for l in [
            "[    0.1] Lock dependency validator: Copyright (c) 2006 Red Hat, Inc., Ingo Molnar",
            "[    0.1] kmemleak: Kernel memory leak detector disabled",
            r#"@@RESULT {"name":"rmmod","ok":false,"error":"WARNING: x"}"#,
            "[   10.0] freehint: hint round 0x8000000b: 1 blocks, end=removing",
        ] {
            assert!(!is_splat_line(l), "{l}");
        }
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
