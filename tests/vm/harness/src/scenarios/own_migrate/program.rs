//! Driving `freehint-migrate send|receive`: one hop of our migrator, its
//! JSON event lines and figures.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::cell::{AtResume, RunOpts};
use super::tools::{OwnVm, Tools, BALLOON_ID};
use crate::vm::free_port;

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
pub(super) fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
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

pub(super) fn spawn(tools: &Tools, args: &[String], log: &Path) -> Result<Child, String> {
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

pub(super) fn json_line(line: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(line).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// One hop of our migrator ([`migrate_ours`]).
#[derive(Debug)]
pub(super) struct Migrated {
    /// Its figures.
    pub(super) hop: Hop,
    /// The destination's console index from which the verdict comes.
    pub(super) verdict_from: usize,
}

/// Migrates `src` to `dst` with `freehint-migrate`; the destination
/// verifies at resume.
pub(super) fn migrate_ours(
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
    let result = drive(&mut receiver, &mut sender, dst, opts.at_resume, timeout);
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
pub(super) fn drive(
    receiver: &mut Child,
    sender: &mut Child,
    dst: &mut OwnVm,
    at_resume: AtResume,
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
                Some("ready_to_resume") if at_resume == AtResume::Abort => {
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
    if at_resume == AtResume::Abort {
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
