//! `freehint-migrate send`: migrates the guest of a running source QEMU.
//!
//! 1. QMP: the source runs; its RAM is a shared file; its pid and where it
//!    maps the file (see [`super`]).
//! 2. Connects to the receiver and reads its hello (where the destination
//!    QEMU listens).
//! 3. Sets `x-ignore-shared` and `pause-before-switchover` on the source;
//!    asks the preload library inside QEMU to track writes to the RAM.
//! 4. Runs the [`Engine`]: bulk pass (file holes as zero runs), dirty
//!    passes read from QEMU's page tables, the [`Policy`] decides when to
//!    stop. To stop: `migrate` to the destination QEMU while the guest
//!    still runs. QEMU sets its migration up and sends its own small
//!    non-shared blocks live, then stops the guest itself and waits before
//!    the switch-over (`pause-before-switchover`); the guest is down from
//!    that `STOP` on, and the final pass runs then. QEMU's setup (146 ms
//!    for a 32 GiB guest when it ran after a QMP `stop`) stays out of the
//!    downtime.
//! 5. When the receiver has stored every page, `migrate-continue`: QEMU
//!    moves CPU and device state.
//! 6. The receiver resumes the destination and says so.
//!
//! Whatever fails before the receiver says the destination runs, the
//! source is left running: QEMU's migration is cancelled and the source
//! resumed, the tracking ended, and the migration capabilities and
//! parameters this program set are put back as they were (a guest left
//! with `x-ignore-shared` would have its RAM skipped by a later QEMU
//! migration). Only when the connection to the receiver is
//! lost after the device state moved is the source left paused
//! ([`SourceState::Paused`]): the destination may run, and two running
//! copies of one guest must never happen.

use std::io::{self, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::control::{read_reply, ControlError, Reply, STREAM_SOCKET_BUFFER};
use super::hotplug::{HotplugError, Unplugged};
use super::tracking::{QemuLog, RemoteTracking, TrackingError, SOCKET_ENV};
use super::{discover, environment_of, expect_status, host_address, map_ram, QemuError};
use crate::control_port::ControlPort;
use crate::device_hints::{DeviceDirtyLog, DeviceHints, RoundPolicy};
use crate::engine::{Engine, MigrateError};
use crate::hints::{HintSource, NoHints};
use crate::layout::RamLayout;
use crate::pagemap_scan::{PagemapScanError, PagemapScanLog};
use crate::policy::Policy;
use crate::progress::Progress;
use crate::qmp::{Qmp, QmpError};
use crate::sparse::FileHoles;
use crate::stats::{MigrationReport, PassStats};
use crate::sys::{set_socket_buffer, SocketBuffer};
use crate::AnyOf;

mod rollback;
mod stop;

use rollback::{roll_back, Phase, Settings, CAPABILITIES};
use stop::{BalloonUnplug, Stop, UnplugState};

/// What `send` needs.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The receiver, `HOST:PORT`.
    pub to: String,
    /// The preload library's socket (default: QEMU's `FREEHINT_UFFD_SOCKET`).
    pub uffd_socket: Option<PathBuf>,
    /// When to stop pre-copy.
    pub policy: Policy,
    /// How long to try to reach the receiver.
    pub connect_timeout: Duration,
    /// How long each step of the switch-over may take.
    pub switchover_timeout: Duration,
    /// Negative control only: the final pass sends nothing.
    pub drop_final_pass: bool,
    /// The control socket of the guest's balloon device server
    /// (`freehint-vhost-user`): free page hints skip pages, and the
    /// device's own writes join the dirty log. `None`: no hints.
    pub device_control: Option<PathBuf>,
    /// When to ask the guest for a hint round (with `device_control`).
    pub rounds: RoundPolicy,
    /// The QOM id of the guest's balloon device (`freehint-vhost-user`
    /// behind `vhost-user-test-device-pci`): unplugged once its hints are
    /// used (or before the stop), plugged back if the migration fails; its
    /// target (read through `device_control`) rides in the stream. See
    /// [`hotplug`](super::hotplug).
    pub unplug_device: Option<String>,
    /// Set to cancel the migration (for example on Ctrl-C).
    pub cancel: Arc<AtomicBool>,
}

/// The source after a failed or cancelled migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// The guest runs on the source, as before.
    Running,
    /// The guest is paused on the source; the destination may run it.
    Paused,
}

/// Why `send` failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The source QEMU is not set up for this.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// Write tracking could not be set up.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// The dirty log could not be opened.
    #[error(transparent)]
    DirtyLog(#[from] PagemapScanError),
    /// The preload socket is unknown.
    #[error("QEMU (pid {0}) has no {SOCKET_ENV} in its environment: start it with LD_PRELOAD=libfreehint_uffd_preload.so and {SOCKET_ENV}=PATH, or pass --uffd-socket")]
    NoPreload(u32),
    /// The receiver could not be reached.
    #[error("cannot connect to the receiver at {to}")]
    Connect {
        /// Where.
        to: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The receiver's reply could not be read.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The balloon device's hint port failed or does not fit the guest.
    #[error("balloon device: {0}")]
    Device(String),
    /// Unplugging the balloon device failed.
    #[error("unplugging the balloon device failed")]
    Unplug(#[from] HotplugError),
    /// The receiver said something else than expected.
    #[error("the receiver {0}")]
    Receiver(String),
    /// The RAM copy failed.
    #[error("copying guest RAM failed")]
    Migrate(#[from] MigrateError),
    /// QEMU's own migration of the device state failed.
    #[error("QEMU's migration ended {status}: {error}")]
    QemuMigration {
        /// Its status.
        status: String,
        /// QEMU's description.
        error: String,
    },
    /// A step did not finish in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The migration was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// A failed `send`, and where the guest is left.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SendFailure {
    /// What failed.
    #[source]
    pub error: SendError,
    /// The source afterwards.
    pub source_state: SourceState,
}

/// A completed migration.
#[derive(Clone, Debug, Serialize)]
pub struct SendReport {
    /// Bytes on the wire: the RAM stream plus QEMU's stream.
    pub bytes: u64,
    /// Bytes of the RAM stream.
    pub ram_stream_bytes: u64,
    /// Bytes of QEMU's stream (device state, ROMs), its `ram.transferred`.
    pub qemu_bytes: u64,
    /// From the start of `send` until the destination ran, ms.
    pub total_ms: f64,
    /// From the source's stop to the destination's resume, ms, by QEMU's
    /// `STOP` and `RESUME` event timestamps (host clocks: the same host, or
    /// synchronised ones); `null` without them.
    pub downtime_ms: Option<f64>,
    /// From the source's stop to the receiver's word that the destination
    /// runs, ms, on this host's clock (an upper bound of the downtime).
    pub downtime_local_ms: f64,
    /// Registering the write tracking inside QEMU, ms.
    pub tracking_setup_ms: f64,
    /// From `migrate-continue` until the receiver's word, ms.
    pub switchover_ms: f64,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// The RAM copy, pass by pass.
    pub ram: MigrationReport,
}

fn since(t: Option<Instant>) -> f64 {
    t.map_or(0.0, |t| ms(t.elapsed()))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Migrates the guest of the QEMU at `opts.qmp` to the receiver at
/// `opts.to`. `progress` gets the engine's progress handle once the copy
/// starts; `on_pass` sees each pass.
pub fn send(
    opts: &SendOptions,
    progress: &mut dyn FnMut(Progress),
    on_pass: &mut dyn FnMut(&PassStats),
) -> Result<SendReport, SendFailure> {
    let started = Instant::now();
    let running = |error: SendError| SendFailure {
        error,
        source_state: SourceState::Running,
    };
    let mut qmp = Qmp::connect(&opts.qmp).map_err(|e| running(e.into()))?;
    qmp.timeout = opts.switchover_timeout;
    let saved = Settings::save(&mut qmp).map_err(running)?;
    let prepared = Source::prepare(&mut qmp, opts);
    let mut source = match prepared {
        Ok(source) => source,
        Err(e) => {
            saved.restore(&mut qmp);
            return Err(running(e));
        }
    };
    let outcome = source.migrate(opts, started, progress, on_pass);
    let unplugged = source.unplugged.take();
    let tracking = source.tracking.clone();
    let end_tracking = || {
        if let Err(e) = tracking.unregister() {
            log::warn!("ending the write tracking in QEMU failed: {e}");
        }
    };
    match outcome {
        Ok(report) => {
            end_tracking();
            saved.restore(&mut qmp);
            Ok(report)
        }
        Err((error, phase)) => {
            let source_state = roll_back(&mut qmp, phase);
            if let (Some(device), SourceState::Running) = (&unplugged, source_state) {
                if let Err(e) = device.replug(&mut qmp) {
                    log::error!(
                        "the guest runs on the source without its balloon: plugging {} back failed: {e}",
                        device.id
                    );
                }
            }
            end_tracking();
            saved.restore(&mut qmp);
            Err(SendFailure {
                error,
                source_state,
            })
        }
    }
}

/// The source side of one migration.
struct Source<'q> {
    qmp: &'q mut Qmp,
    ram: super::QemuRam,
    tracking: RemoteTracking,
    tracking_setup: Duration,
    stream: TcpStream,
    qemu_uri: String,
    /// The balloon device, once unplugged.
    unplugged: Option<Unplugged>,
}

type Step<T> = Result<T, (SendError, Phase)>;

impl<'q> Source<'q> {
    /// Steps 1 to 3 (see the module documentation); the guest keeps running.
    fn prepare(qmp: &'q mut Qmp, opts: &SendOptions) -> Result<Self, SendError> {
        expect_status(qmp, "running")?;
        let ram = discover(qmp)?;
        log::info!(
            "source QEMU pid {}, RAM {} ({} MiB, {} ranges)",
            ram.pid,
            ram.mem_path.display(),
            ram.size >> 20,
            ram.layout.ranges().len()
        );
        let socket = match &opts.uffd_socket {
            Some(path) => path.clone(),
            None => environment_of(ram.pid, SOCKET_ENV)?
                .map(PathBuf::from)
                .ok_or(SendError::NoPreload(ram.pid))?,
        };
        let (stream, qemu_uri) = connect(opts)?;
        for capability in CAPABILITIES {
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": capability, "state": true}]})),
            )?;
        }
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 100u64 << 30})),
        )?;
        let hva = host_address(ram.pid, &ram.mem_path, ram.size)?;
        let t = Instant::now();
        let (tracking, reply) = RemoteTracking::register(&socket, ram.pid, hva, ram.size)?;
        let tracking_setup = t.elapsed();
        log::info!(
            "write tracking registered in QEMU in {:.1} ms ({reply})",
            ms(tracking_setup)
        );
        Ok(Self {
            qmp,
            ram,
            tracking,
            tracking_setup,
            stream,
            qemu_uri,
            unplugged: None,
        })
    }

    /// Steps 4 to 6.
    fn migrate(
        &mut self,
        opts: &SendOptions,
        started: Instant,
        progress: &mut dyn FnMut(Progress),
        on_pass: &mut dyn FnMut(&PassStats),
    ) -> Step<SendReport> {
        let live = |e: SendError| (e, Phase::Live);
        let mem = map_ram(&self.ram.mem_path, &self.ram.layout).map_err(|e| live(e.into()))?;
        let holes = FileHoles::open(&self.ram.mem_path).map_err(|source| {
            live(SendError::Qemu(QemuError::Io {
                path: self.ram.mem_path.clone(),
                source,
            }))
        })?;
        let addrs: Vec<u64> = self
            .ram
            .layout
            .ranges()
            .iter()
            .map(|r| host_address_of(&self.ram, r.file_offset))
            .collect::<Result<_, _>>()
            .map_err(live)?;
        let scan = PagemapScanLog::for_process(self.ram.pid, &addrs, &self.ram.layout)
            .map_err(|e| live(e.into()))?;
        let qemu_log = QemuLog::new(scan, self.tracking_handle());
        let mut engine = Engine::new(&mem)
            .map_err(|e| live(e.into()))?
            .with_policy(opts.policy.clone())
            .with_holes(&holes);
        if opts.drop_final_pass {
            engine = engine.dropping_final_pass_for_negative_control();
        }
        let (mut hints, device_log) = device_hints(opts, engine.layout()).map_err(live)?;
        let mut log = AnyOf::new().with(qemu_log);
        if let Some(device_log) = device_log {
            log = log.with(device_log);
        }
        progress(engine.progress());
        let writer = self
            .stream
            .try_clone()
            .map_err(|e| live(connect_error(opts, e)))?;
        let out = BufWriter::with_capacity(
            1 << 20,
            Cancellable {
                inner: writer,
                cancel: Arc::clone(&opts.cancel),
            },
        );
        let mut stop = Stop {
            qmp: self.qmp,
            uri: &self.qemu_uri,
            cancel: &opts.cancel,
            stop_us: None,
            stopped_at: None,
            migrating: false,
            timeout: opts.switchover_timeout,
            balloon: opts.unplug_device.as_deref().map(|id| BalloonUnplug {
                id,
                after_pass: opts
                    .device_control
                    .as_ref()
                    .map_or(Some(0), |_| opts.rounds.last_hinted_pass()),
                control: opts.device_control.as_deref(),
                timeout: opts.switchover_timeout,
                target: None,
                state: UnplugState::Plugged,
            }),
        };
        let result = engine.run(out, log, &mut *hints, &mut stop, |pass: &PassStats| {
            on_pass(pass)
        });
        drop(hints);
        let (stop_us, stopped_at, migrating) = (stop.stop_us, stop.stopped_at, stop.migrating);
        self.unplugged = match stop.balloon.map(|b| b.state) {
            Some(UnplugState::Unplugged(device)) => Some(device),
            // The guest was asked to let go and has not said it did: give
            // it a moment, so that the device can be plugged back.
            Some(UnplugState::Unplugging(mut pending)) => {
                let never = AtomicBool::new(false);
                match pending.wait(stop.qmp, Duration::from_secs(10), &never) {
                    Ok(()) => Some(pending.finish()),
                    Err(e) => {
                        log::error!("{e}");
                        None
                    }
                }
            }
            _ => None,
        };
        let phase = if migrating {
            Phase::Stopped
        } else {
            Phase::Live
        };
        log::debug!("final pass done {:.1} ms after the stop", since(stopped_at));
        let ram = match result {
            Ok(ram) => ram,
            Err(e) if opts.cancel.load(Ordering::SeqCst) => {
                log::debug!("engine stopped: {e}");
                return Err((SendError::Cancelled, phase));
            }
            Err(e) => return Err((self.explain(e.into()), phase)),
        };
        let stopped_at = stopped_at.unwrap_or_else(Instant::now);
        self.switch_over(opts, ram, started, stopped_at, stop_us)
    }

    /// A second handle on the registration, for the dirty log to end it.
    fn tracking_handle(&self) -> RemoteTracking {
        self.tracking.clone()
    }

    /// Prefers the receiver's reason over a broken pipe.
    fn explain(&mut self, error: SendError) -> SendError {
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(500)));
        match read_reply(&mut BufReader::new(&self.stream)) {
            Ok(Reply::Failed { error }) => SendError::Receiver(format!("failed: {error}")),
            _ => error,
        }
    }

    /// Steps 5 and 6: the guest is stopped and every page sent.
    fn switch_over(
        &mut self,
        opts: &SendOptions,
        ram: MigrationReport,
        started: Instant,
        stopped_at: Instant,
        stop_us: Option<i64>,
    ) -> Step<SendReport> {
        let stopped = |e: SendError| (e, Phase::Stopped);
        self.stream
            .set_read_timeout(Some(opts.switchover_timeout))
            .map_err(|e| stopped(connect_error(opts, e)))?;
        let mut replies = BufReader::new(
            self.stream
                .try_clone()
                .map_err(|e| stopped(connect_error(opts, e)))?,
        );
        match read_reply(&mut replies).map_err(|e| stopped(e.into()))? {
            Reply::Stored { .. } => {}
            other => return Err(stopped(unexpected("after the stream", &other))),
        }
        log::debug!("stored {:.1} ms after the stop", ms(stopped_at.elapsed()));
        wait_status(self.qmp, &["pre-switchover"], opts.switchover_timeout).map_err(stopped)?;
        log::debug!(
            "QEMU ready to switch over {:.1} ms after the stop",
            ms(stopped_at.elapsed())
        );
        if opts.cancel.load(Ordering::SeqCst) {
            return Err(stopped(SendError::Cancelled));
        }
        let handed_at = Instant::now();
        self.qmp
            .execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
            .map_err(|e| stopped(e.into()))?;
        let done = wait_status(self.qmp, &["completed"], opts.switchover_timeout)
            .map_err(|e| (e, Phase::Handed))?;
        log::debug!(
            "device state sent {:.1} ms after the stop",
            ms(stopped_at.elapsed())
        );
        let reply = read_reply(&mut replies).map_err(|e| (e.into(), Phase::Handed));
        let resume_us = match reply? {
            Reply::Resumed { resume_us } => resume_us,
            Reply::NotResumed { reason } => {
                return Err(stopped(SendError::Receiver(format!(
                    "did not resume the destination: {reason}"
                ))))
            }
            other => return Err(stopped(unexpected("after the switch-over", &other))),
        };
        let now = Instant::now();
        let qemu_bytes = done["ram"]["transferred"].as_u64().unwrap_or(0);
        let downtime_ms = match (stop_us, resume_us) {
            (Some(stop), Some(resume)) => Some((resume - stop) as f64 / 1e3),
            _ => None,
        };
        Ok(SendReport {
            bytes: ram.bytes + qemu_bytes,
            ram_stream_bytes: ram.bytes,
            qemu_bytes,
            total_ms: ms(now - started),
            downtime_ms,
            downtime_local_ms: ms(now - stopped_at),
            tracking_setup_ms: ms(self.tracking_setup),
            switchover_ms: ms(now - handed_at),
            ram_bytes: self.ram.size,
            ram,
        })
    }
}

/// QEMU's address of file offset `offset` of the RAM file.
fn host_address_of(ram: &super::QemuRam, offset: u64) -> Result<u64, SendError> {
    let base = host_address(ram.pid, &ram.mem_path, ram.size)?;
    Ok(base + offset)
}

fn unexpected(when: &str, reply: &Reply) -> SendError {
    match reply {
        Reply::Failed { error } => SendError::Receiver(format!("failed: {error}")),
        other => SendError::Receiver(format!("sent {other:?} {when}")),
    }
}

fn connect_error(opts: &SendOptions, source: io::Error) -> SendError {
    SendError::Connect {
        to: opts.to.clone(),
        source,
    }
}

/// Connects to the receiver (retrying until the timeout) and reads its
/// hello; returns the stream and the destination QEMU's URI.
fn connect(opts: &SendOptions) -> Result<(TcpStream, String), SendError> {
    let deadline = Instant::now() + opts.connect_timeout;
    let stream = loop {
        match TcpStream::connect(&opts.to) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline && !opts.cancel.load(Ordering::SeqCst) => {
                log::debug!("connecting to {}: {e}; retrying", opts.to);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(connect_error(opts, e)),
        }
    };
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(opts.connect_timeout)))
        .and_then(|()| set_socket_buffer(&stream, SocketBuffer::Send, STREAM_SOCKET_BUFFER))
        .map_err(|e| connect_error(opts, e))?;
    let hello = read_reply(&mut BufReader::new(&stream))?;
    let Reply::Hello { version, qemu_port } = hello else {
        return Err(unexpected("instead of hello", &hello));
    };
    if version != super::control::VERSION {
        return Err(SendError::Receiver(format!(
            "speaks version {version}, this program {}",
            super::control::VERSION
        )));
    }
    let host = stream.peer_addr().map_err(|e| connect_error(opts, e))?.ip();
    let uri = match host {
        std::net::IpAddr::V6(ip) => format!("tcp:[{ip}]:{qemu_port}"),
        std::net::IpAddr::V4(ip) => format!("tcp:{ip}:{qemu_port}"),
    };
    Ok((stream, uri))
}

/// Polls `query-migrate` until its status is in `want`.
fn wait_status(qmp: &mut Qmp, want: &[&str], timeout: Duration) -> Result<Value, SendError> {
    wait_status_or_cancel(qmp, want, timeout, &AtomicBool::new(false))
}

/// [`wait_status`] that gives up once `cancel` is set.
fn wait_status_or_cancel(
    qmp: &mut Qmp,
    want: &[&str],
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Value, SendError> {
    let deadline = Instant::now() + timeout;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(SendError::Cancelled);
        }
        let q = qmp.execute("query-migrate", None)?;
        let status = q["status"].as_str().unwrap_or("none");
        if want.contains(&status) {
            return Ok(q);
        }
        if matches!(status, "failed" | "cancelled") {
            return Err(SendError::QemuMigration {
                status: status.to_string(),
                error: q["error-desc"].as_str().unwrap_or("").to_string(),
            });
        }
        if Instant::now() >= deadline {
            return Err(SendError::Timeout("QEMU's migration"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A writer that fails once `cancel` is set.
struct Cancellable<W> {
    inner: W,
    cancel: Arc<AtomicBool>,
}

impl<W: Write> Write for Cancellable<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("cancelled"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How often the bulk pass looks for new hints on a device server's control
/// socket.
const CONTROL_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A hint source, and the log of the device's own writes that goes with it.
type DeviceSources = (Box<dyn HintSource>, Option<DeviceDirtyLog<ControlPort>>);

/// The hint source and device log `opts` ask for: the balloon device's
/// server through its control socket, or no hints.
fn device_hints(opts: &SendOptions, ram: &RamLayout) -> Result<DeviceSources, SendError> {
    let Some(path) = &opts.device_control else {
        return Ok((Box::new(NoHints), None));
    };
    let device = |e: &dyn std::fmt::Display| SendError::Device(format!("{}: {e}", path.display()));
    let connect = || ControlPort::connect(path, opts.switchover_timeout).map_err(|e| device(&e));
    let port = connect()?;
    let layout = *port.layout();
    let hints = DeviceHints::new(port, &layout, ram, opts.rounds)
        .map_err(|e| device(&e))?
        .with_poll_interval(CONTROL_POLL_INTERVAL);
    let log = DeviceDirtyLog::new(connect()?, &layout, ram).map_err(|e| device(&e))?;
    log::info!(
        "free page hints from the balloon device at {}",
        path.display()
    );
    Ok((Box::new(hints), Some(log)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::VmControl;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::Mutex;

    /// A fake source QEMU: answers QMP commands by name from `replies`,
    /// records every command it gets.
    fn fake_qemu(
        replies: Vec<(&'static str, Value)>,
    ) -> (tempfile::TempDir, PathBuf, Arc<Mutex<Vec<Value>>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            s.write_all(b"{\"QMP\":{}}\n").unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                line.clear();
                let name = cmd["execute"].as_str().unwrap_or("").to_string();
                log.lock().unwrap().push(cmd);
                let reply = replies
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(json!({}), |(_, v)| v.clone());
                if name == "query-migrate" && reply["status"] == "pre-switchover" {
                    // QEMU stopped the guest on its way there.
                    let stop = json!({"event": "STOP",
                        "timestamp": {"seconds": 1_700_000_000, "microseconds": 250}});
                    s.write_all(format!("{stop}\n").as_bytes()).unwrap();
                }
                s.write_all(format!("{}\n", json!({ "return": reply })).as_bytes())
                    .unwrap();
            }
        });
        (dir, path, seen)
    }

    fn options(qmp: PathBuf) -> SendOptions {
        SendOptions {
            qmp,
            to: "127.0.0.1:1".into(),
            uffd_socket: None,
            policy: Policy::default(),
            connect_timeout: Duration::from_millis(10),
            switchover_timeout: Duration::from_secs(5),
            drop_final_pass: false,
            device_control: None,
            rounds: RoundPolicy::default(),
            unplug_device: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn a_failed_start_leaves_the_source_running_and_its_settings_as_they_were() {
        let (_dir, path, seen) = fake_qemu(vec![
            (
                "query-migrate-capabilities",
                json!([{"capability": "x-ignore-shared", "state": false},
                       {"capability": "events", "state": true},
                       {"capability": "pause-before-switchover", "state": false}]),
            ),
            ("query-migrate-parameters", json!({"max-bandwidth": 12345})),
            (
                "query-status",
                json!({"status": "running", "running": true}),
            ),
            // Guest RAM that is not a file: the migration cannot start.
            ("qom-get", json!("")),
        ]);
        let failure = send(&options(path), &mut |_| {}, &mut |_: &_| {}).unwrap_err();
        assert_eq!(failure.source_state, SourceState::Running);
        assert!(
            matches!(failure.error, SendError::Qemu(QemuError::NotAFile { .. })),
            "{}",
            failure.error
        );
        let seen = seen.lock().unwrap();
        let names: Vec<&str> = seen.iter().filter_map(|c| c["execute"].as_str()).collect();
        assert!(
            !names.contains(&"stop") && !names.contains(&"migrate"),
            "{names:?}"
        );
        let restored = seen
            .iter()
            .find(|c| c["execute"] == "migrate-set-capabilities")
            .expect("capabilities put back");
        assert_eq!(
            restored["arguments"]["capabilities"],
            json!([{"capability": "x-ignore-shared", "state": false},
                   {"capability": "pause-before-switchover", "state": false}])
        );
        let params = seen
            .iter()
            .find(|c| c["execute"] == "migrate-set-parameters")
            .expect("max-bandwidth put back");
        assert_eq!(params["arguments"]["max-bandwidth"], 12345);
    }

    #[test]
    fn a_paused_source_is_refused() {
        let (_dir, path, _) = fake_qemu(vec![
            ("query-migrate-capabilities", json!([])),
            ("query-status", json!({"status": "paused"})),
        ]);
        let failure = send(&options(path), &mut |_| {}, &mut |_: &_| {}).unwrap_err();
        assert!(matches!(
            failure.error,
            SendError::Qemu(QemuError::State { ref found, .. }) if found == "paused"
        ));
    }

    fn stop_for<'a>(qmp: &'a mut Qmp, cancel: &'a AtomicBool) -> Stop<'a> {
        Stop {
            qmp,
            uri: "tcp:127.0.0.1:4444",
            cancel,
            stop_us: None,
            stopped_at: None,
            migrating: false,
            timeout: Duration::from_secs(5),
            balloon: None,
        }
    }

    #[test]
    fn the_pause_starts_qemus_migration_on_a_running_guest_and_takes_its_stop() {
        let (_dir, path, seen) =
            fake_qemu(vec![("query-migrate", json!({"status": "pre-switchover"}))]);
        let mut qmp = Qmp::connect(&path).unwrap();
        let cancel = AtomicBool::new(false);
        let mut stop = stop_for(&mut qmp, &cancel);
        (&mut stop).pause().unwrap();
        assert!(stop.migrating);
        assert_eq!(stop.stop_us, Some(1_700_000_000_000_250));
        assert!(stop.stopped_at.is_some());
        let names: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| c["execute"].as_str().map(String::from))
            .collect();
        // No QMP `stop`: QEMU stops the guest after its own setup.
        assert!(!names.iter().any(|n| n == "stop"), "{names:?}");
        assert_eq!(names, ["qmp_capabilities", "migrate", "query-migrate"]);
    }

    #[test]
    fn a_migration_qemu_fails_before_the_stop_is_a_pause_error_to_roll_back() {
        let (_dir, path, _) = fake_qemu(vec![(
            "query-migrate",
            json!({"status": "failed", "error-desc": "no route"}),
        )]);
        let mut qmp = Qmp::connect(&path).unwrap();
        let cancel = AtomicBool::new(false);
        let mut stop = stop_for(&mut qmp, &cancel);
        let error = (&mut stop).pause().unwrap_err();
        assert!(error.to_string().contains("no route"), "{error}");
        assert!(stop.migrating, "the roll-back must cancel QEMU's migration");
        assert!(stop.stopped_at.is_none());
    }
}
