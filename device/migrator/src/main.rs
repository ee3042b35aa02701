//! `freehint-migrate`: live migration of a QEMU guest, RAM copied by this
//! program, CPU and device state moved by QEMU (`x-ignore-shared`).
//!
//! ```text
//! destination$ freehint-migrate receive --qmp dst.qmp --listen 0.0.0.0:7100
//! source$      freehint-migrate send --qmp src.qmp --to dsthost:7100
//! ```
//!
//! stdout: one JSON object per line: each pass (`"event":"pass"`), then a
//! summary (`"event":"summary"`, `"status":"completed"|"failed"`). A
//! progress bar goes to stderr when it is a terminal; logs go to stderr
//! (`RUST_LOG`). Exit status: 0 migrated; 1 failed, the source runs (or
//! the destination was not resumed); 3 failed after the device state
//! moved, the source is left paused (see `docs/migration.md`).

use freehint_migrate::device_hints::RoundPolicy;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use freehint_migrate::qemu::receive::{error_chain, receive, PlugBalloon, ReceiveOptions};
use freehint_migrate::qemu::send::{send, SendOptions, SourceState};
use freehint_migrate::{PassStats, Policy, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

/// Live migration of a QEMU guest with freehint's RAM copy.
#[derive(Debug, Parser)]
#[command(name = "freehint-migrate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrates the guest of a running QEMU (started with the preload
    /// library and a shared RAM file) to a receiver.
    Send(SendArgs),
    /// Receives a guest into a QEMU started with `-incoming defer`.
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
struct SendArgs {
    /// The source QEMU's QMP socket (a UNIX socket no one else uses).
    #[arg(long)]
    qmp: PathBuf,
    /// The receiver, HOST:PORT.
    #[arg(long)]
    to: String,
    /// The preload library's socket (default: QEMU's FREEHINT_UFFD_SOCKET).
    #[arg(long)]
    uffd_socket: Option<PathBuf>,
    /// Time the final pass (guest stopped) may take by the rate of the
    /// last pass, ms; pre-copy goes on until what is left fits. The
    /// downtime adds the final dirty-log scan and QEMU's switch-over
    /// (about 10 to 25 ms at 4 GiB under TCG).
    #[arg(long, default_value_t = 5)]
    downtime_ms: u64,
    /// Live passes at most.
    #[arg(long, default_value_t = 30)]
    max_passes: u32,
    /// Stop pre-copy after this many passes in a row that shrank the
    /// pending pages by less than 10 % (0: never).
    #[arg(long, default_value_t = 3)]
    stall_passes: u32,
    /// Seconds to keep trying to reach the receiver.
    #[arg(long, default_value_t = 30)]
    connect_timeout_s: u64,
    /// Seconds each switch-over step may take.
    #[arg(long, default_value_t = 120)]
    switchover_timeout_s: u64,
    /// For negative controls only: send nothing in the final pass (the
    /// destination then lacks what the guest wrote last).
    #[arg(long, hide = true)]
    negative_control_drop_final_pass: bool,
    /// Control socket of the guest's balloon device server
    /// (`freehint-vhost-user --control PATH`): pages the guest reports free
    /// are not copied, and the device's own writes join the dirty log.
    #[arg(long)]
    device_control: Option<PathBuf>,
    /// With --device-control: ask the guest for free pages before the bulk
    /// pass only (`bulk`), before every pass (`every`), or before the first
    /// N passes (a number).
    #[arg(long, default_value = "bulk", value_parser = parse_rounds)]
    hint_rounds: RoundPolicy,
    /// The guest's balloon device (QOM id of a `vhost-user-test-device-pci`
    /// served by `freehint-vhost-user --persist`), which cannot migrate
    /// with QEMU's device state: unplugged while the guest runs once its
    /// hints are used, plugged back if the migration fails. With
    /// --device-control its target travels to the destination.
    #[arg(long, value_name = "ID")]
    unplug_device: Option<String>,
}

#[derive(Debug, Args)]
struct ReceiveArgs {
    /// The destination QEMU's QMP socket (a UNIX socket no one else uses).
    #[arg(long)]
    qmp: PathBuf,
    /// Where to listen for the sender, HOST:PORT.
    #[arg(long)]
    listen: String,
    /// The port the destination QEMU listens on for the device state
    /// (default: the --listen port + 1).
    #[arg(long)]
    qemu_port: Option<u16>,
    /// The destination's RAM file, checked against QEMU's.
    #[arg(long)]
    ram_file: Option<PathBuf>,
    /// Seconds to wait for the sender.
    #[arg(long, default_value_t = 300)]
    accept_timeout_s: u64,
    /// Seconds the stream and each switch-over step may take.
    #[arg(long, default_value_t = 600)]
    switchover_timeout_s: u64,
    /// Before resuming the destination, print {"event":"ready_to_resume"}
    /// and wait for a line on stdin: `resume` resumes, anything else (or
    /// end of input) leaves the destination paused and the source resumes.
    #[arg(long)]
    hold_before_resume: bool,
    /// Once the destination runs, plug in a balloon device served by the
    /// `freehint-vhost-user` listening on this socket.
    #[arg(long, value_name = "SOCKET")]
    plug_balloon: Option<PathBuf>,
    /// The QOM id of the plugged balloon.
    #[arg(
        long,
        value_name = "ID",
        default_value = "balloon0",
        requires = "plug_balloon"
    )]
    plug_id: String,
    /// The plugged balloon's control socket: the target the source carried
    /// is set there.
    #[arg(long, value_name = "PATH", requires = "plug_balloon")]
    plug_control: Option<PathBuf>,
}

/// Set by SIGINT and SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set [`INTERRUPTED`] instead of killing us.
fn catch_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only stores to an atomic, which is
        // async-signal-safe; `signal` installs it for a valid signal number.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    catch_signals();
    match cli.command {
        Command::Send(args) => run_send(args),
        Command::Receive(args) => run_receive(args),
    }
}

fn emit(value: Value) {
    let mut out = std::io::stdout().lock();
    // stdout closed: nothing left to tell anyone.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn run_send(args: SendArgs) -> ExitCode {
    let cancel = Arc::new(AtomicBool::new(false));
    let watcher = Arc::clone(&cancel);
    std::thread::spawn(move || loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            log::warn!("interrupted: cancelling the migration");
            watcher.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    let opts = SendOptions {
        qmp: args.qmp,
        to: args.to,
        uffd_socket: args.uffd_socket,
        policy: Policy {
            downtime: Duration::from_millis(args.downtime_ms),
            max_passes: args.max_passes.max(1),
            stall_passes: args.stall_passes,
            ..Policy::default()
        },
        connect_timeout: Duration::from_secs(args.connect_timeout_s),
        switchover_timeout: Duration::from_secs(args.switchover_timeout_s),
        drop_final_pass: args.negative_control_drop_final_pass,
        device_control: args.device_control,
        rounds: args.hint_rounds,
        unplug_device: args.unplug_device,
        cancel,
    };
    let bar = Bar::new();
    let mut on_progress = |p: Progress| bar.watch(p);
    let mut on_pass = |pass: &PassStats| {
        let mut line = json!({"event": "pass"});
        extend(&mut line, serde_json::to_value(pass).unwrap_or(Value::Null));
        bar.println(&line);
    };
    let result = send(&opts, &mut on_progress, &mut on_pass);
    bar.finish();
    match result {
        Ok(report) => {
            let mut line = json!({"event": "summary", "status": "completed"});
            extend(
                &mut line,
                serde_json::to_value(&report).unwrap_or(Value::Null),
            );
            if let Some(ram) = line.get_mut("ram").and_then(Value::as_object_mut) {
                ram.remove("passes");
            }
            emit(line);
            ExitCode::SUCCESS
        }
        Err(failure) => {
            let error = error_chain(&failure.error);
            log::error!("migration failed: {error}");
            emit(
                json!({"event": "summary", "status": "failed", "error": error,
                        "source": failure.source_state}),
            );
            match failure.source_state {
                SourceState::Running => ExitCode::from(1),
                SourceState::Paused => ExitCode::from(3),
            }
        }
    }
}

fn parse_rounds(s: &str) -> Result<RoundPolicy, String> {
    match s {
        "bulk" => Ok(RoundPolicy::BulkOnly),
        "every" => Ok(RoundPolicy::EveryEpoch),
        n => n
            .parse::<u64>()
            .map(RoundPolicy::FirstEpochs)
            .map_err(|_| format!("--hint-rounds {n:?}: give bulk, every or a number")),
    }
}

fn run_receive(args: ReceiveArgs) -> ExitCode {
    let opts = ReceiveOptions {
        qmp: args.qmp,
        listen: args.listen,
        qemu_port: args.qemu_port,
        ram_file: args.ram_file,
        accept_timeout: Duration::from_secs(args.accept_timeout_s),
        switchover_timeout: Duration::from_secs(args.switchover_timeout_s),
        plug: args.plug_balloon.map(|socket| PlugBalloon {
            id: args.plug_id,
            socket,
            control: args.plug_control,
        }),
    };
    let hold = args.hold_before_resume;
    let mut gate = || -> Result<(), String> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        if !hold {
            return Ok(());
        }
        emit(json!({"event": "ready_to_resume"}));
        let mut line = String::new();
        let read = std::io::stdin().lock().read_line(&mut line);
        match (read, line.trim()) {
            (Ok(_), "resume") => Ok(()),
            (Ok(0), _) => Err("stdin closed before `resume`".into()),
            (Ok(_), other) => Err(format!("told {other:?} instead of `resume`")),
            (Err(e), _) => Err(format!("cannot read stdin: {e}")),
        }
    };
    match receive(&opts, &mut gate) {
        Ok(summary) => {
            let mut line = json!({"event": "summary", "status": "completed"});
            extend(
                &mut line,
                serde_json::to_value(&summary).unwrap_or(Value::Null),
            );
            emit(line);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let error = error_chain(&e);
            log::error!("receive failed: {error}");
            emit(json!({"event": "summary", "status": "failed", "error": error}));
            ExitCode::from(1)
        }
    }
}

/// Adds the fields of `more` (an object) to `line`.
fn extend(line: &mut Value, more: Value) {
    if let (Some(line), Value::Object(more)) = (line.as_object_mut(), more) {
        line.extend(more);
    }
}

/// The progress bar on stderr (hidden when stderr is not a terminal).
struct Bar {
    bar: ProgressBar,
    done: Arc<AtomicBool>,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{spinner} pass {prefix}: [{bar:30}] {pos}/{len} pages, {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        Self {
            bar,
            done: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Follows `progress` from a thread until [`Bar::finish`].
    fn watch(&self, progress: Progress) {
        let (bar, done) = (self.bar.clone(), Arc::clone(&self.done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let s = progress.snapshot();
                bar.set_prefix(format!(
                    "{}{}",
                    s.pass,
                    if s.paused { " (final)" } else { "" }
                ));
                bar.set_length(s.pending_pages.max(1));
                bar.set_position(s.pages_done);
                bar.set_message(format!("{:.1} MB sent", s.bytes as f64 / 1e6));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }

    /// Prints a JSON line on stdout without tearing the bar.
    fn println(&self, line: &Value) {
        self.bar.suspend(|| emit(line.clone()));
    }

    fn finish(&self) {
        self.done.store(true, Ordering::Relaxed);
        self.bar.finish_and_clear();
    }
}
