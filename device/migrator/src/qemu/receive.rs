//! `freehint-migrate receive`: receives a guest into a destination QEMU
//! started with `-S -incoming defer` (`-S`: the destination stays paused
//! after loading, whatever the source's run state was, until this program
//! resumes it).
//!
//! 1. QMP: the destination waits for a migration (`inmigrate`); its RAM is
//!    a shared file; its RAM layout.
//! 2. Sets `x-ignore-shared`, starts QEMU's incoming migration
//!    (`migrate-incoming`) on its own port, listens for the sender.
//! 3. Accepts one sender, says hello (QEMU's port), reads the stream into
//!    the RAM file (the layout must be the destination's own), says
//!    `stored`.
//! 4. Waits until QEMU has loaded the device state (the destination is
//!    then paused), asks `before_resume` (a gate: the test harness queues
//!    the guest's integrity check there), resumes it with `cont`, says
//!    `resumed` with QEMU's `RESUME` timestamp.
//!
//! 5. With [`ReceiveOptions::plug`]: plugs a balloon device served by the
//!    destination's `freehint-vhost-user` into the running guest and gives
//!    its back end the target the source carried (see
//!    [`hotplug`](super::hotplug)). The migration has succeeded by then; a
//!    failure here is reported in the summary, not to the sender.
//!
//! A failure before the resume is reported to the sender (`failed` or
//! `not_resumed`), which then resumes the source; the destination is never
//! resumed then.

use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::control::{write_reply, Reply, STREAM_SOCKET_BUFFER, VERSION};
use super::hotplug::plug_balloon;
use super::{discover, expect_status, QemuError};
use crate::control_port::ControlPort;
use crate::qmp::{Qmp, QmpError};
use crate::ram_file::RamFile;
use crate::receiver::{ReceiveError, Receiver};
use crate::sys::{set_socket_buffer, SocketBuffer};

/// What `receive` needs.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The destination QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Where to listen for the sender, `HOST:PORT`.
    pub listen: String,
    /// The port the destination QEMU listens on for the device state
    /// (default: the next one).
    pub qemu_port: Option<u16>,
    /// The RAM file to expect (default: the one QEMU maps).
    pub ram_file: Option<PathBuf>,
    /// How long to wait for the sender.
    pub accept_timeout: Duration,
    /// How long the stream and each switch-over step may take.
    pub switchover_timeout: Duration,
    /// The balloon device to plug in once the destination runs.
    pub plug: Option<PlugBalloon>,
}

/// A balloon device for the destination: `freehint-vhost-user` serving
/// `socket`, plugged in as device `id`.
#[derive(Clone, Debug)]
pub struct PlugBalloon {
    /// The device's QOM id.
    pub id: String,
    /// The back end's vhost-user socket.
    pub socket: PathBuf,
    /// The back end's control socket: the carried target is set there.
    pub control: Option<PathBuf>,
}

/// What plugging the balloon did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BalloonPlugged {
    /// From the resume until the device was added, ms.
    pub plugged_ms: Option<f64>,
    /// The target the source carried and the back end now holds (4 KiB
    /// pages).
    pub target_pages: Option<u32>,
    /// What failed, if anything did.
    pub error: Option<String>,
}

/// Why `receive` failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveFailure {
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The destination QEMU is not set up for this.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// Listening, accepting or answering failed.
    #[error("{what}")]
    Net {
        /// What was being done.
        what: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The stream was invalid, or storing it failed.
    #[error("receiving guest RAM failed")]
    Receive(#[from] ReceiveError),
    /// The sender announced another RAM layout than the destination's.
    #[error("the source's RAM layout differs from the destination's (same -m, -machine and memory backend on both sides?): source {source_layout}, destination {destination}")]
    Layout {
        /// The sender's.
        source_layout: String,
        /// Ours.
        destination: String,
    },
    /// The RAM file is not the one QEMU maps.
    #[error("--ram-file {given} is not the destination's RAM file {actual}")]
    RamFile {
        /// Given.
        given: PathBuf,
        /// QEMU's.
        actual: PathBuf,
    },
    /// QEMU's incoming migration failed.
    #[error("the destination QEMU's migration ended {status}: {error}")]
    QemuMigration {
        /// Its status.
        status: String,
        /// QEMU's description.
        error: String,
    },
    /// A step did not finish in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The gate said no.
    #[error("not resumed: {0}")]
    NotResumed(String),
}

/// A completed receive.
#[derive(Clone, Debug, Serialize)]
pub struct ReceiveSummary {
    /// Pages stored with their contents.
    pub pages_written: u64,
    /// Pages stored as zero.
    pub zero_pages: u64,
    /// Pass markers seen.
    pub passes: u32,
    /// Stream bytes.
    pub bytes: u64,
    /// From accepting the sender to the end of the stream, ms.
    pub stream_ms: f64,
    /// From the end of the stream until QEMU had loaded the device state, ms.
    pub device_state_ms: f64,
    /// QEMU's `RESUME` timestamp, µs since the Unix epoch.
    pub resume_us: Option<i64>,
    /// The balloon target the source carried (4 KiB pages).
    #[serde(skip)]
    pub carried_target: Option<u32>,
    /// The balloon plugged in after the resume (with [`ReceiveOptions::plug`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonPlugged>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn net(what: impl Into<String>) -> impl FnOnce(io::Error) -> ReceiveFailure {
    let what = what.into();
    move |source| ReceiveFailure::Net { what, source }
}

/// Receives one migration (see the module documentation). `before_resume`
/// runs when the destination is loaded and paused; `Err(reason)` leaves it
/// paused.
pub fn receive(
    opts: &ReceiveOptions,
    before_resume: &mut dyn FnMut() -> Result<(), String>,
) -> Result<ReceiveSummary, ReceiveFailure> {
    let mut qmp = Qmp::connect(&opts.qmp)?;
    qmp.timeout = opts.switchover_timeout;
    expect_status(&mut qmp, "inmigrate")?;
    let ram = discover(&mut qmp)?;
    if let Some(given) = &opts.ram_file {
        if given.canonicalize().ok() != ram.mem_path.canonicalize().ok() {
            return Err(ReceiveFailure::RamFile {
                given: given.clone(),
                actual: ram.mem_path,
            });
        }
    }
    let listen = resolve(&opts.listen)?;
    let qemu_port = opts
        .qemu_port
        .unwrap_or_else(|| listen.port().wrapping_add(1));
    let listener = TcpListener::bind(listen)
        .and_then(|l| {
            set_socket_buffer(&l, SocketBuffer::Receive, STREAM_SOCKET_BUFFER).map(|()| l)
        })
        .map_err(net(format!("cannot listen on {listen}")))?;
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )?;
    let qemu_uri = match listen.ip() {
        std::net::IpAddr::V6(ip) => format!("tcp:[{ip}]:{qemu_port}"),
        std::net::IpAddr::V4(ip) => format!("tcp:{ip}:{qemu_port}"),
    };
    qmp.execute("migrate-incoming", Some(json!({ "uri": qemu_uri })))?;
    log::info!(
        "destination QEMU pid {} listens on {qemu_uri}; waiting for the sender on {listen}",
        ram.pid
    );
    let stream = accept(&listener, opts.accept_timeout)?;
    let mut replies = stream
        .try_clone()
        .map_err(net("cannot clone the connection"))?;
    let result = serve(&mut qmp, opts, &ram, stream, qemu_port, before_resume);
    let reply = match &result {
        Ok(summary) => Reply::Resumed {
            resume_us: summary.resume_us,
        },
        Err(ReceiveFailure::NotResumed(reason)) => Reply::NotResumed {
            reason: reason.clone(),
        },
        Err(e) => Reply::Failed {
            error: error_chain(e),
        },
    };
    if let Err(e) = write_reply(&mut replies, &reply) {
        log::warn!("cannot tell the sender {reply:?}: {e}");
    }
    let mut summary = result?;
    if let Some(plug) = &opts.plug {
        summary.balloon = Some(plug_in(&mut qmp, plug, summary.carried_target, opts));
    }
    Ok(summary)
}

/// Step 5: the balloon device into the running destination.
fn plug_in(
    qmp: &mut Qmp,
    plug: &PlugBalloon,
    target: Option<u32>,
    opts: &ReceiveOptions,
) -> BalloonPlugged {
    let started = Instant::now();
    let mut out = BalloonPlugged::default();
    if let (Some(path), Some(target)) = (&plug.control, target) {
        let set = ControlPort::connect(path, opts.switchover_timeout)
            .and_then(|mut port| port.request(&format!("target {target}")));
        match set {
            Ok(_) => out.target_pages = Some(target),
            Err(e) => out.error = Some(format!("setting the carried target {target}: {e}")),
        }
    }
    match plug_balloon(qmp, &plug.id, &plug.socket) {
        Ok(()) => {
            out.plugged_ms = Some(ms(started.elapsed()));
            log::info!("balloon {} plugged in", plug.id);
        }
        Err(e) => {
            log::error!("the destination runs without its balloon: {e}");
            out.error = Some(error_chain(&e));
        }
    }
    out
}

/// `e` and its sources, one sentence.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn resolve(addr: &str) -> Result<SocketAddr, ReceiveFailure> {
    addr.to_socket_addrs()
        .map_err(net(format!("cannot resolve {addr}")))?
        .next()
        .ok_or_else(|| ReceiveFailure::Net {
            what: format!("{addr} names no address"),
            source: io::ErrorKind::NotFound.into(),
        })
}

fn accept(listener: &TcpListener, timeout: Duration) -> Result<TcpStream, ReceiveFailure> {
    listener
        .set_nonblocking(true)
        .map_err(net("cannot poll the listener"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                log::info!("sender connected from {peer}");
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_nodelay(true))
                    .map_err(net("cannot set up the connection"))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(ReceiveFailure::Timeout("the sender to connect"))
            }
            Err(e) => return Err(net("accepting the sender failed")(e)),
        }
    }
}

/// Steps 3 and 4 on an accepted connection.
fn serve(
    qmp: &mut Qmp,
    opts: &ReceiveOptions,
    ram: &super::QemuRam,
    stream: TcpStream,
    qemu_port: u16,
    before_resume: &mut dyn FnMut() -> Result<(), String>,
) -> Result<ReceiveSummary, ReceiveFailure> {
    let started = Instant::now();
    let mut out = stream
        .try_clone()
        .map_err(net("cannot clone the connection"))?;
    write_reply(
        &mut out,
        &Reply::Hello {
            version: VERSION,
            qemu_port,
        },
    )
    .map_err(net("cannot greet the sender"))?;
    stream
        .set_read_timeout(Some(opts.switchover_timeout))
        .map_err(net("cannot set a timeout"))?;
    let receiver =
        Receiver::with_max_ram_bytes(BufReader::with_capacity(1 << 20, stream), ram.size)?;
    if receiver.layout() != &ram.layout {
        return Err(ReceiveFailure::Layout {
            source_layout: format!("{:?}", receiver.layout().ranges()),
            destination: format!("{:?}", ram.layout.ranges()),
        });
    }
    let mut file = RamFile::open(&ram.mem_path, &ram.layout)?;
    let report = receiver.receive(&mut file)?;
    let stream_ms = ms(started.elapsed());
    log::info!(
        "stored {} pages and {} zero pages in {stream_ms} ms",
        report.pages_written,
        report.zero_pages
    );
    write_reply(
        &mut out,
        &Reply::Stored {
            pages_written: report.pages_written,
            zero_pages: report.zero_pages,
            bytes: report.bytes,
        },
    )
    .map_err(net("cannot tell the sender the pages are stored"))?;
    out.flush().map_err(net("cannot flush"))?;
    let stored = Instant::now();
    let running = wait_loaded(qmp, opts.switchover_timeout)?;
    let device_state_ms = ms(stored.elapsed());
    if running {
        // Never report a running destination as failed: the sender would
        // resume the source too.
        log::warn!(
            "the destination QEMU resumed on its own after loading: start it with -S \
             so that this program resumes it"
        );
    } else {
        before_resume().map_err(ReceiveFailure::NotResumed)?;
        qmp.execute("cont", None)?;
        log::info!("destination resumed");
    }
    let resume_us = qmp.last_event("RESUME").and_then(|e| e.timestamp_us);
    Ok(ReceiveSummary {
        pages_written: report.pages_written,
        zero_pages: report.zero_pages,
        passes: report.passes,
        bytes: report.bytes,
        stream_ms,
        device_state_ms,
        resume_us,
        carried_target: report.balloon_target_pages,
        balloon: None,
    })
}

/// Waits until the incoming migration completed and the destination is
/// paused, ready to run (`false`), or already running (`true`).
fn wait_loaded(qmp: &mut Qmp, timeout: Duration) -> Result<bool, ReceiveFailure> {
    let deadline = Instant::now() + timeout;
    loop {
        let q = qmp.execute("query-migrate", None)?;
        let status = q["status"].as_str().unwrap_or("none");
        if matches!(status, "failed" | "cancelled") {
            return Err(ReceiveFailure::QemuMigration {
                status: status.to_string(),
                error: q["error-desc"].as_str().unwrap_or("").to_string(),
            });
        }
        if status == "completed" {
            let run = super::status(qmp)?;
            match run.as_str() {
                "paused" => return Ok(false),
                "running" => return Ok(true),
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            return Err(ReceiveFailure::Timeout(
                "the destination QEMU to load the device state",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
