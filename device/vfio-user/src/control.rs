//! A line-based control socket for tests and tools (not a stable API).
//!
//! One command per line, one JSON object per reply line:
//!
//! | command | effect |
//! |---|---|
//! | `status` | `virtio_status` (device status register), `target`, `actual` (pages), `acked_features` |
//! | `target N` | set the balloon target to N 4 KiB pages (config interrupt) |
//! | `stats` | ask the guest for statistics; reply has the latest values by tag |
//! | `hint-start` | open a new epoch and start a free page hint round |
//! | `hint-status` | state, cmd id, epoch, free pages collected |
//! | `hint-round [timeout_ms]` | start a round and wait (1 ms polls) until the guest ends it; reply has `ms` from request to the completed free set on the host |
//! | `hint-stop` / `hint-finish` | stop the round / send DONE |
//! | `hint-dump NAME` | write the round's free set to the file NAME inside the dump directory (`--dump-dir`; raw little-endian `u64` words, bit *i* = layout bit *i*) |
//! | `metrics` | the device's counters |
//!
//! `hint-start` is only meaningful for tests: a real migrator must start
//! dirty logging before a round (see docs/architecture.md).
//!
//! The socket has mode 0600 (only the server's user can connect). Dumps go
//! only into the directory given at start-up: NAME is one file name, the
//! file is created with mode 0600 and a symlink in its place is refused.
//! Without a dump directory `hint-dump` is refused.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use freehint_device::balloon::HintState;
use freehint_device::{BalloonHandle, HintHandle};
use log::{info, warn};

/// Longest command line accepted.
const MAX_LINE: u64 = 256;

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn err(msg: &str) -> String {
    format!("{{\"ok\":false,\"error\":{}}}", json_str(msg))
}

/// What the control socket acts on.
#[derive(Clone, Debug)]
pub struct Control {
    /// The balloon's host API.
    pub balloon: BalloonHandle,
    /// The hint API.
    pub hints: HintHandle,
    /// The virtio device status register.
    pub status: Arc<AtomicU8>,
    /// Where `hint-dump` may write (`None`: the command is refused).
    pub dump_dir: Option<PathBuf>,
}

/// The file `hint-dump NAME` writes: NAME must be one plain file name.
fn dump_path(dir: Option<&Path>, name: &str) -> Result<PathBuf, String> {
    let dir = dir.ok_or("hint-dump is off: start the server with --dump-dir DIR")?;
    let plain = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
    if !plain || name.len() > 255 {
        return Err(format!(
            "bad dump name {name:?}: give a file name (no '/'); it is written in {}",
            dir.display()
        ));
    }
    Ok(dir.join(name))
}

/// Writes `bytes` to `path` (mode 0600 when created; never through a symlink).
fn write_dump(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .write_all(bytes)
}

/// Executes one command line; returns the JSON reply.
pub fn execute(line: &str, c: &Control) -> String {
    let (balloon, hints) = (&c.balloon, &c.hints);
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("");
    let arg = words.next();
    match (cmd, arg) {
        ("status", None) => format!(
            "{{\"ok\":true,\"virtio_status\":{},\"target\":{},\"actual\":{},\"acked_features\":{}}}",
            c.status.load(Ordering::Acquire),
            balloon.target_pages(),
            balloon.actual_pages(),
            balloon.acked_features()
        ),
        ("target", Some(n)) => match n.parse::<u32>() {
            Ok(pages) => {
                balloon.set_target_pages(pages);
                format!("{{\"ok\":true,\"target\":{pages}}}")
            }
            Err(e) => err(&format!("bad page count {n:?}: {e}")),
        },
        ("stats", None) => {
            let requested = match balloon.request_stats() {
                Ok(r) => r,
                Err(e) => return err(&e.to_string()),
            };
            let values = balloon
                .latest_stats()
                .map(|s| {
                    s.values
                        .iter()
                        .map(|v| v.map_or("null".to_string(), |n| n.to_string()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            format!("{{\"ok\":true,\"requested\":{requested},\"values\":[{values}]}}")
        }
        ("hint-start", None) => {
            let epoch = hints.new_epoch();
            match hints.start_round(&epoch) {
                Ok(id) => format!("{{\"ok\":true,\"cmd_id\":{id},\"epoch\":{epoch}}}"),
                Err(e) => err(&e.to_string()),
            }
        }
        ("hint-status", None) => {
            let s = hints.status();
            format!(
                "{{\"ok\":true,\"state\":{},\"cmd_id\":{},\"epoch\":{},\"round_epoch\":{},\"free_pages\":{}}}",
                json_str(&format!("{:?}", s.state)),
                s.cmd_id,
                s.epoch,
                s.round_epoch,
                s.free_pages
            )
        }
        ("hint-round", timeout) => {
            let timeout_ms = match timeout.map(str::parse::<u64>) {
                None => 60_000,
                Some(Ok(t)) => t,
                Some(Err(e)) => return err(&format!("bad timeout: {e}")),
            };
            let t0 = Instant::now();
            let epoch = hints.new_epoch();
            let id = match hints.start_round(&epoch) {
                Ok(id) => id,
                Err(e) => return err(&e.to_string()),
            };
            loop {
                let s = hints.status();
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                if s.cmd_id != id {
                    return err("another round replaced this one");
                }
                if matches!(s.state, HintState::Stopped | HintState::Done) {
                    return format!(
                        "{{\"ok\":true,\"cmd_id\":{id},\"ms\":{ms:.3},\"free_pages\":{}}}",
                        s.free_pages
                    );
                }
                if ms > timeout_ms as f64 {
                    return err(&format!(
                        "round {id:#x} not completed after {timeout_ms} ms (state {:?})",
                        s.state
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        ("hint-dump", Some(name)) => {
            let path = match dump_path(c.dump_dir.as_deref(), name) {
                Ok(p) => p,
                Err(e) => return err(&e),
            };
            let set = hints.snapshot();
            let bytes: Vec<u8> = set.words().iter().flat_map(|w| w.to_le_bytes()).collect();
            match write_dump(&path, &bytes) {
                Ok(()) => format!(
                    "{{\"ok\":true,\"cmd_id\":{},\"epoch\":{},\"complete\":{},\"total_bits\":{},\"free_pages\":{}}}",
                    set.cmd_id(),
                    set.epoch(),
                    set.is_complete(),
                    set.total_bits(),
                    set.free_pages()
                ),
                Err(e) => err(&format!("cannot write {}: {e}", path.display())),
            }
        }
        ("hint-stop", None) => {
            hints.stop();
            "{\"ok\":true}".to_string()
        }
        ("hint-finish", None) => {
            hints.finish();
            "{\"ok\":true}".to_string()
        }
        ("metrics", None) => format!(
            "{{\"ok\":true,\"metrics\":{}}}",
            json_str(&format!("{:?}", balloon.metrics().snapshot()))
        ),
        _ => err(&format!("unknown command: {line}")),
    }
}

fn handle(stream: UnixStream, c: &Control) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.ends_with('\n') {
            execute(line.trim(), c)
        } else if line.len() as u64 >= MAX_LINE {
            warn!("control: line longer than {MAX_LINE} bytes, closing");
            let _ = writeln!(out, "{}", err("line too long"));
            return;
        } else {
            execute(line.trim(), c)
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// Binds `path` (mode 0600) and serves control connections (one at a
/// time) on a thread.
pub fn spawn(path: &Path, control: Control, force: bool) -> std::io::Result<()> {
    if force && path.exists() {
        let _ = std::fs::remove_file(path);
    }
    let listener = crate::sockets::bind_private(path)?;
    info!("control socket on {}", path.display());
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => handle(s, &control),
                    Err(e) => warn!("control: accept failed: {e}"),
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_device::balloon::Layout;
    use freehint_device::{Balloon, BalloonConfig};

    #[test]
    fn commands_and_errors() {
        let layout = Layout::from_ram_byte_ranges(&[(0, 1 << 30)]).unwrap();
        let b = Balloon::new(BalloonConfig::all_features(layout)).unwrap();
        let dir = std::env::temp_dir().join(format!("fh-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Control {
            balloon: b.handle(),
            hints: b.hint_handle(),
            status: Arc::new(AtomicU8::new(0xf)),
            dump_dir: Some(dir.clone()),
        };
        assert_eq!(execute("target 256", &c), "{\"ok\":true,\"target\":256}");
        let st = execute("status", &c);
        assert!(st.contains("\"target\":256") && st.contains("\"virtio_status\":15"));
        assert!(execute("target x", &c).starts_with("{\"ok\":false"));
        assert!(execute("bogus \"q\"", &c).contains("\\\"q\\\""));
        // Not activated: a hint round is refused with a clear error.
        assert!(execute("hint-start", &c).starts_with("{\"ok\":false"));
        assert!(execute("hint-round 10", &c).starts_with("{\"ok\":false"));
        assert!(execute("hint-round x", &c).contains("bad timeout"));
        assert!(execute("hint-status", &c).contains("\"state\":\"Idle\""));
        assert!(execute("metrics", &c).starts_with("{\"ok\":true"));
        // No round yet: an all-zero set of the layout's size.
        let reply = execute("hint-dump set.bin", &c);
        assert!(reply.contains("\"total_bits\":262144"), "{reply}");
        assert!(reply.contains("\"free_pages\":0"), "{reply}");
        assert_eq!(
            std::fs::read(dir.join("set.bin")).unwrap().len(),
            262144 / 8
        );
        c.dump_dir = None;
        assert!(execute("hint-dump set.bin", &c).contains("--dump-dir"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dumps_stay_inside_the_dump_dir() {
        use std::os::unix::fs::PermissionsExt;
        let layout = Layout::from_ram_byte_ranges(&[(0, 1 << 20)]).unwrap();
        let b = Balloon::new(BalloonConfig::all_features(layout)).unwrap();
        let base = std::env::temp_dir().join(format!("fh-dump-{}", std::process::id()));
        let dir = base.join("dumps");
        std::fs::create_dir_all(&dir).unwrap();
        let c = Control {
            balloon: b.handle(),
            hints: b.hint_handle(),
            status: Arc::new(AtomicU8::new(0)),
            dump_dir: Some(dir.clone()),
        };
        let outside = base.join("victim");
        std::fs::write(&outside, b"keep").unwrap();
        for name in [
            outside.display().to_string(),
            "../victim".into(),
            "..".into(),
            ".".into(),
            "a/b".into(),
            "x".repeat(300),
        ] {
            let reply = execute(&format!("hint-dump {name}"), &c);
            assert!(reply.starts_with("{\"ok\":false"), "{name}: {reply}");
        }
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        assert!(execute("hint-dump link", &c).starts_with("{\"ok\":false"));
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(execute("hint-dump ok.bin", &c).starts_with("{\"ok\":true"));
        let mode = std::fs::metadata(dir.join("ok.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(&base).unwrap().count(),
            2,
            "nothing else written"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
