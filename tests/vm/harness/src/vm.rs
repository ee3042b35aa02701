//! One running QEMU (TCG) guest: the process, its serial console, its QMP
//! session and its logs, for plain boots, migrations and vfio-user boots.
//!
//! A [`Vm`] comes in one of two console modes:
//!
//! - [`Vm::boot`]: the serial console goes straight to a log file (QEMU's own
//!   stdout/stderr too) and the harness only waits for the guest to power
//!   off ([`Vm::wait`], with the spec's hard timeout). The QMP socket, if
//!   the spec asks for one, is left to whoever wants to connect.
//! - [`Vm::start`] / [`Vm::start_with`]: the serial console is a UNIX socket
//!   (so the harness both reads the guest's output and types a line to it),
//!   QMP is another one with a session held by the harness, QEMU's own
//!   stdout/stderr go to a separate log file. Source and destination of a
//!   migration get *identical* command lines; the destination adds
//!   `-incoming`.
//!
//! Either way the process is killed when the value is dropped (a failing
//! test never leaves a QEMU behind), its sockets are released and its owned
//! files removed.
//!
//! QEMU migrates no state for a `vfio-user-pci` device: on the destination
//! such a device is dead. The console-socket mode is for migrations, so it
//! refuses those VMs ([`check_migratable`]) with an error instead of letting
//! a migration "pass".

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freehint_migrate::qmp::{Qmp, QmpError};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::errors::{io_error, PathIoError};
use crate::guest::{is_splat, json_after, GuestOutput, LineJoiner, RESULT_MARKER};
use crate::manifest::Manifest;
use crate::qemu::BootSpec;
use crate::runner::HarnessError;
use crate::sockets;

/// Most serial lines kept in memory per VM (the log file has all of them).
const MAX_LINES: usize = 200_000;
/// Longest serial line kept (longer ones are cut).
const MAX_LINE_LEN: usize = 64 * 1024;

/// Errors of a VM: its process, console and QMP session, and the
/// migrations between VMs.
#[derive(Debug, Error)]
pub enum VmError {
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
    /// Waiting for the process failed.
    #[error("waiting for QEMU failed: {0}")]
    Wait(#[source] std::io::Error),
    /// The VM was booted without a console socket ([`Vm::boot`]) and a
    /// caller asked to read or type console lines.
    #[error("{role} VM has no {what} (booted with Vm::boot)")]
    NoSession {
        /// The VM's role.
        role: String,
        /// What was asked for (`console socket`).
        what: &'static str,
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

impl From<VmError> for HarnessError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Qmp(q) => HarnessError::Qmp(q),
            other => HarnessError::Other(other.to_string()),
        }
    }
}

/// Refuses VMs that cannot be migrated faithfully (a `vfio-user-pci` device).
pub fn check_migratable(spec: &BootSpec) -> Result<(), VmError> {
    if spec
        .extra_qemu_args
        .iter()
        .any(|a| a.contains("vfio-user-pci"))
    {
        return Err(VmError::VfioUser);
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound then released; the tiny race with
/// other processes is acceptable for tests).
pub fn free_port() -> Result<u16, VmError> {
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

/// What [`Vm::start_with`] adds to the spec's QEMU.
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

/// The console socket of a [`Vm::start`]ed VM: the harness's writing end
/// and what the pump thread has read so far.
#[derive(Debug)]
struct Console {
    tx: UnixStream,
    state: Arc<Mutex<SerialState>>,
}

/// One QEMU. Killed on drop (its sockets released, its owned files removed).
#[derive(Debug)]
pub struct Vm {
    /// `src`, `dst`, `boot`, ... (for logs and errors).
    pub role: String,
    child: Option<Child>,
    started: Instant,
    timeout: Duration,
    /// The harness's QMP session ([`Vm::start`] only).
    qmp: Option<Qmp>,
    /// The console socket ([`Vm::start`] only; a [`Vm::boot`] logs to a file).
    console: Option<Console>,
    /// Guest console log.
    pub serial_log: PathBuf,
    /// QEMU's own stdout/stderr (the serial log itself for a [`Vm::boot`]).
    pub qemu_log: PathBuf,
    /// The QMP socket, if any.
    pub qmp_socket: Option<PathBuf>,
    sockets: Vec<PathBuf>,
    owned_files: Vec<PathBuf>,
}

/// The kernel complaint lines of a console ([`Vm::splats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Splats {
    /// How many lines are complaints.
    pub count: usize,
    /// The first of them.
    pub first: Option<String>,
}

/// A console line found by [`Vm::wait_line`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    /// Its index among the console lines.
    pub index: usize,
    /// Its text.
    pub line: String,
}

/// How a boot ended.
#[derive(Debug, Clone)]
pub struct BootExit {
    /// QEMU's exit status (None when killed on timeout).
    pub status: Option<ExitStatus>,
    /// Whether the hard timeout fired.
    pub timed_out: bool,
    /// Wall-clock time of the boot.
    pub elapsed: Duration,
}

fn connect_retry(path: &Path, timeout: Duration, child: &mut Child) -> Result<UnixStream, VmError> {
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

/// Starts QEMU with `args` and `env`, its stdout and stderr to `log`.
fn spawn_qemu(
    manifest: &Manifest,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<Child, VmError> {
    let out = File::create(log).map_err(io_error("cannot create", log))?;
    let err = out.try_clone().map_err(io_error("cannot clone", log))?;
    Command::new(&manifest.qemu)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| VmError::Spawn {
            qemu: manifest.qemu.clone(),
            source,
        })
}

impl Vm {
    /// Boots `spec` with its serial console (and QEMU's own output) written
    /// to `log_dir/<label>.log`; a QMP socket next to it if `spec.qmp`, for
    /// others to connect to. [`Vm::wait`] enforces `spec.timeout`.
    pub fn boot(manifest: &Manifest, spec: &BootSpec, log_dir: &Path) -> Result<Vm, VmError> {
        let image = manifest.flavour(&spec.flavour)?;
        let serial_log = log_dir.join(format!("{}.log", spec.label()));
        let qmp_socket = if spec.qmp {
            Some(sockets::socket_path(&format!("{}.qmp", spec.label()))?)
        } else {
            None
        };
        let args = spec.qemu_args(&image, qmp_socket.as_deref());
        log::debug!("{} {}", manifest.qemu.display(), args.join(" "));
        let child = spawn_qemu(manifest, &args, &[], &serial_log)?;
        Ok(Vm {
            role: "boot".to_string(),
            child: Some(child),
            started: Instant::now(),
            timeout: spec.timeout,
            qmp: None,
            console: None,
            qemu_log: serial_log.clone(),
            serial_log,
            sockets: qmp_socket.iter().cloned().collect(),
            qmp_socket,
            owned_files: Vec::new(),
        })
    }

    /// Starts QEMU for `spec` (`incoming`: listen for a migration on that
    /// port). Files go to `log_dir/<label>-<role>.*`.
    pub fn start(
        manifest: &Manifest,
        spec: &BootSpec,
        log_dir: &Path,
        role: &str,
        incoming: Option<u16>,
    ) -> Result<Vm, VmError> {
        let opts = VmOptions {
            incoming: incoming.map(Incoming::Tcp),
            ..VmOptions::default()
        };
        Self::start_with(manifest, spec, log_dir, role, &opts)
    }

    /// [`Vm::start`] with more set-up (see [`VmOptions`]).
    pub fn start_with(
        manifest: &Manifest,
        spec: &BootSpec,
        log_dir: &Path,
        role: &str,
        opts: &VmOptions,
    ) -> Result<Vm, VmError> {
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
        log::debug!("{role}: {} {}", manifest.qemu.display(), args.join(" "));
        let mut child = spawn_qemu(manifest, &args, &opts.env, &qemu_log)?;
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
        Ok(Vm {
            role: role.to_string(),
            child: Some(child),
            started: Instant::now(),
            timeout: spec.timeout,
            qmp: Some(qmp),
            console: Some(Console {
                tx: serial_tx,
                state,
            }),
            serial_log,
            qemu_log,
            qmp_socket: Some(qmp_sock.clone()),
            sockets: vec![serial_sock, qmp_sock],
            owned_files: opts.owned_files.clone(),
        })
    }

    /// QEMU's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The harness's QMP session. Only [`Vm::start`]ed VMs have one: asking
    /// a [`Vm::boot`] for it is a bug of the scenario (panics).
    pub fn qmp(&mut self) -> &mut Qmp {
        match self.qmp.as_mut() {
            Some(q) => q,
            None => panic!("{} VM has no QMP session (booted with Vm::boot)", self.role),
        }
    }

    /// What the console pump has read so far (`None` for a [`Vm::boot`]).
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, SerialState>> {
        // A poisoned lock only means the pump thread panicked mid-update;
        // the data is still the best we have.
        let c = self.console.as_ref()?;
        Some(c.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The serial log's text so far (lossy UTF-8; empty if unreadable).
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default()).into_owned()
    }

    /// Number of serial lines seen so far (0 for a [`Vm::boot`]).
    pub fn line_count(&self) -> usize {
        self.lock().map_or(0, |st| st.lines.len())
    }

    /// The parsed guest output so far (results, splats, `@@DONE`): from the
    /// console pump, or for a [`Vm::boot`] from its serial log.
    pub fn output(&self) -> GuestOutput {
        match self.lock() {
            Some(st) => st.output.clone(),
            None => GuestOutput::parse(&self.log_text()),
        }
    }

    /// The kernel complaint lines of the console so far ([`is_splat`]).
    pub fn splats(&self) -> Splats {
        let (count, first) = match self.lock() {
            Some(st) => {
                let mut it = st.lines.iter().filter(|l| is_splat(l));
                let first = it.next().cloned();
                (first.is_some() as usize + it.count(), first)
            }
            None => {
                let text = self.log_text();
                let mut it = text.lines().filter(|l| is_splat(l));
                let first = it.next().map(str::to_string);
                (first.is_some() as usize + it.count(), first)
            }
        };
        Splats { count, first }
    }

    /// Waits for QEMU to exit, killing it when the spec's hard timeout
    /// (counted from the start) expires.
    pub fn wait(&mut self) -> Result<BootExit, VmError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(BootExit {
                status: None,
                timed_out: false,
                elapsed: self.started.elapsed(),
            });
        };
        loop {
            if let Some(status) = child.try_wait().map_err(VmError::Wait)? {
                self.child = None;
                return Ok(BootExit {
                    status: Some(status),
                    timed_out: false,
                    elapsed: self.started.elapsed(),
                });
            }
            if self.started.elapsed() >= self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                return Ok(BootExit {
                    status: None,
                    timed_out: true,
                    elapsed: self.started.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
    ) -> Result<ResultLine, VmError> {
        let key = format!("\"name\":\"{name}\"");
        let ConsoleLine { index, line } = self.wait_line(from, what, timeout, |l| {
            l.contains(RESULT_MARKER) && l.contains(&key)
        })?;
        let obj = json_after(&line, RESULT_MARKER);
        Ok(ResultLine { index, line, obj })
    }

    /// Waits until a serial line at index `>= from` satisfies `pred`.
    pub fn wait_line(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<ConsoleLine, VmError> {
        let start = Instant::now();
        let mut next = from;
        loop {
            let closed = {
                let st = self.lock().ok_or_else(|| VmError::NoSession {
                    role: self.role.clone(),
                    what: "console socket",
                })?;
                while next < st.lines.len() {
                    if pred(&st.lines[next]) {
                        return Ok(ConsoleLine {
                            index: next,
                            line: st.lines[next].clone(),
                        });
                    }
                    next += 1;
                }
                st.closed
            };
            if closed || !self.running() {
                return Err(VmError::Exited {
                    role: self.role.clone(),
                    what: what.to_string(),
                    log: self.serial_log.display().to_string(),
                });
            }
            if start.elapsed() >= timeout {
                return Err(VmError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    log: self.serial_log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `line` (plus a newline) on the guest console.
    pub fn send_line(&mut self, line: &str) -> Result<(), VmError> {
        let mut b = line.as_bytes().to_vec();
        b.push(b'\n');
        let console = self.console.as_mut().ok_or_else(|| VmError::NoSession {
            role: self.role.clone(),
            what: "console socket",
        })?;
        console.tx.write_all(&b).map_err(io_error(
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
                while self.lock().is_some_and(|st| !st.closed)
                    && t.elapsed() < Duration::from_secs(2)
                {
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

impl Drop for Vm {
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

/// A guest result line found on the console.
#[derive(Debug, Clone)]
pub struct ResultLine {
    /// Its index among the console lines.
    pub index: usize,
    /// Its text.
    pub line: String,
    /// Its object (`None` if the JSON was malformed).
    pub obj: Option<Map<String, Value>>,
}

/// Adds one problem to `out` if any console line of `vm` so far is a kernel
/// complaint ([`is_splat`]): count, first line, serial log.
pub fn splat_problems(vm: &Vm, out: &mut Vec<String>) {
    let Splats { count, first } = vm.splats();
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
        assert!(matches!(e, VmError::VfioUser));
        assert!(e.to_string().contains("dead on the destination"));
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
