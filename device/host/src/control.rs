//! A line-based control socket for tests, tools and a migrator in another
//! process (not a stable API).
//!
//! One command per line, one JSON object per reply line; the two commands
//! that return a bitmap follow their line with `bytes` raw bytes
//! (little-endian `u64` words, bit *i* = layout bit *i*).
//!
//! | command | effect |
//! |---|---|
//! | `status` | `virtio_status` (device status register), `target`, `actual` (pages), `acked_features` |
//! | `target N` | set the balloon target to N 4 KiB pages (config interrupt) |
//! | `stats` | ask the guest for statistics; reply has the latest values by tag |
//! | `hint-start` | open a new epoch and start a free page hint round |
//! | `hint-status` | state, cmd id, epoch, free pages collected |
//! | `hint-round [timeout_ms]` | start a round and wait (1 ms polls) until the guest ends it; reply has `ms` from request to the completed free set on the host |
//! | `hint-stop` / `hint-finish` | stop the round / send DONE (and drop the port's epoch) |
//! | `hint-dump NAME` | write the round's free set to the file NAME inside the dump directory (`--dump-dir`) |
//! | `metrics` | the device's counters |
//!
//! The hint port, for a migrator that runs in another process (the same
//! rules as [`HintHandle`]: the migrator opens an epoch right before each
//! dirty-log sync, and a set is served only while its epoch is current):
//!
//! | command | effect |
//! |---|---|
//! | `layout` | the device's RAM layout: `total_bits` and `ranges` (`first_pfn`, `nr_pages`, `first_bit`) |
//! | `epoch-new` | open a new epoch (the previous one goes stale); reply `epoch` |
//! | `round-start E` | start a hint round in epoch `E`, if it is still the current one |
//! | `hint-set E` | the free set collected in epoch `E` (`cmd_id`, `complete`, `free_pages`, `bytes`), followed by the bitmap; refused once `E` is over |
//! | `device-dirty` | the guest pages the device wrote or discarded since the last call (`bytes`), followed by the bitmap |
//!
//! `hint-start` and `hint-round` are only meaningful for tests: a real
//! migrator must start dirty logging before a round (see
//! docs/architecture.md).
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freehint_device::balloon::{Epoch, EpochToken, HintState, Layout};
use freehint_device::{BalloonHandle, HintHandle};
use log::{info, warn};
use serde_json::{json, Value};

/// Longest command line accepted.
const MAX_LINE: u64 = 256;

/// One reply: a JSON line, and the raw bytes that follow it (empty for all
/// but `hint-set` and `device-dirty`).
#[derive(Debug)]
pub struct Reply {
    /// The reply line.
    pub head: Value,
    /// Bytes sent after the line (`head["bytes"]` of them).
    pub payload: Vec<u8>,
}

impl Reply {
    fn ok(head: Value) -> Self {
        Self {
            head,
            payload: Vec::new(),
        }
    }

    fn with_words(mut head: Value, words: &[u64]) -> Self {
        let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        head["bytes"] = json!(payload.len());
        Self { head, payload }
    }

    fn err(msg: impl std::fmt::Display) -> Self {
        Self::ok(json!({"ok": false, "error": msg.to_string()}))
    }
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
    /// The device's RAM layout (`layout`).
    pub layout: Layout,
    /// The hint port's epoch (`epoch-new`).
    epoch: Arc<Mutex<Option<EpochToken>>>,
}

impl Control {
    /// A control over one device.
    pub fn new(
        balloon: BalloonHandle,
        hints: HintHandle,
        layout: Layout,
        status: Arc<AtomicU8>,
        dump_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            balloon,
            hints,
            status,
            dump_dir,
            layout,
            epoch: Arc::default(),
        }
    }
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

/// Executes one command line.
pub fn execute(line: &str, c: &Control) -> Reply {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("");
    let arg = words.next();
    match (cmd, arg) {
        ("status", None) => Reply::ok(json!({
            "ok": true,
            "virtio_status": c.status.load(Ordering::Acquire),
            "target": c.balloon.target_pages(),
            "actual": c.balloon.actual_pages(),
            "acked_features": c.balloon.acked_features(),
        })),
        ("target", Some(n)) => match n.parse::<u32>() {
            Ok(pages) => {
                c.balloon.set_target_pages(pages);
                Reply::ok(json!({"ok": true, "target": pages}))
            }
            Err(e) => Reply::err(format!("bad page count {n:?}: {e}")),
        },
        ("stats", None) => stats(c),
        ("hint-start", None) => {
            let epoch = c.hints.new_epoch();
            match c.hints.start_round(&epoch) {
                Ok(id) => {
                    Reply::ok(json!({"ok": true, "cmd_id": id, "epoch": epoch.epoch().raw()}))
                }
                Err(e) => Reply::err(e),
            }
        }
        ("hint-status", None) => {
            let s = c.hints.status();
            Reply::ok(json!({
                "ok": true,
                "state": format!("{:?}", s.state),
                "cmd_id": s.cmd_id,
                "epoch": s.epoch.raw(),
                "round_epoch": s.round_epoch.raw(),
                "free_pages": s.free_pages,
            }))
        }
        ("hint-round", timeout) => match timeout.map(str::parse::<u64>) {
            None => hint_round(c, 60_000),
            Some(Ok(t)) => hint_round(c, t),
            Some(Err(e)) => Reply::err(format!("bad timeout: {e}")),
        },
        ("hint-dump", Some(name)) => hint_dump(c, name),
        ("hint-stop", None) => {
            c.hints.stop();
            Reply::ok(json!({"ok": true}))
        }
        ("hint-finish", None) => {
            lock(&c.epoch).take();
            c.hints.finish();
            Reply::ok(json!({"ok": true}))
        }
        ("metrics", None) => Reply::ok(json!({
            "ok": true,
            "metrics": c.balloon.metrics().snapshot(),
        })),
        ("layout", None) => layout(c),
        ("epoch-new", None) => {
            let token = c.hints.new_epoch();
            let epoch = token.epoch().raw();
            *lock(&c.epoch) = Some(token);
            Reply::ok(json!({"ok": true, "epoch": epoch}))
        }
        ("round-start", Some(e)) => with_epoch(c, e, |token| match c.hints.start_round(token) {
            Ok(id) => Reply::ok(json!({"ok": true, "cmd_id": id, "epoch": token.epoch().raw()})),
            Err(e) => Reply::err(e),
        }),
        ("hint-set", Some(e)) => with_epoch(c, e, |token| hint_set(c, token)),
        ("device-dirty", None) => {
            Reply::with_words(json!({"ok": true}), &c.hints.take_device_dirty())
        }
        _ => Reply::err(format!("unknown command: {line}")),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` with the port's token if `given` names it.
fn with_epoch(c: &Control, given: &str, f: impl FnOnce(&EpochToken) -> Reply) -> Reply {
    let Ok(given) = given.parse::<u64>().map(Epoch) else {
        return Reply::err(format!("bad epoch {given:?}"));
    };
    let held = lock(&c.epoch);
    match held.as_ref() {
        Some(token) if token.epoch() == given => f(token),
        Some(token) => Reply::err(format!(
            "epoch {given} is over (the port's epoch is {})",
            token.epoch()
        )),
        None => Reply::err(format!("epoch {given} is over (no epoch open: epoch-new)")),
    }
}

fn stats(c: &Control) -> Reply {
    let requested = match c.balloon.request_stats() {
        Ok(r) => r,
        Err(e) => return Reply::err(e),
    };
    let values: Vec<Option<u64>> = c
        .balloon
        .latest_stats()
        .map(|s| s.values.to_vec())
        .unwrap_or_default();
    Reply::ok(json!({"ok": true, "requested": requested, "values": values}))
}

fn hint_round(c: &Control, timeout_ms: u64) -> Reply {
    let t0 = Instant::now();
    let epoch = c.hints.new_epoch();
    let id = match c.hints.start_round(&epoch) {
        Ok(id) => id,
        Err(e) => return Reply::err(e),
    };
    loop {
        let s = c.hints.status();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if s.cmd_id != id {
            return Reply::err("another round replaced this one");
        }
        if matches!(s.state, HintState::Stopped | HintState::Done) {
            let ms = (ms * 1e3).round() / 1e3;
            return Reply::ok(
                json!({"ok": true, "cmd_id": id, "ms": ms, "free_pages": s.free_pages}),
            );
        }
        if ms > timeout_ms as f64 {
            return Reply::err(format!(
                "round {id:#x} not completed after {timeout_ms} ms (state {:?})",
                s.state
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn hint_dump(c: &Control, name: &str) -> Reply {
    let path = match dump_path(c.dump_dir.as_deref(), name) {
        Ok(p) => p,
        Err(e) => return Reply::err(e),
    };
    let set = c.hints.snapshot();
    let bytes: Vec<u8> = set.words().iter().flat_map(|w| w.to_le_bytes()).collect();
    match write_dump(&path, &bytes) {
        Ok(()) => Reply::ok(json!({
            "ok": true,
            "cmd_id": set.cmd_id(),
            "epoch": set.epoch().raw(),
            "complete": set.is_complete(),
            "total_bits": set.total_bits(),
            "free_pages": set.free_pages(),
        })),
        Err(e) => Reply::err(format!("cannot write {}: {e}", path.display())),
    }
}

fn layout(c: &Control) -> Reply {
    let layout = &c.layout;
    let ranges: Vec<Value> = layout
        .ranges()
        .iter()
        .map(
            |r| json!({"first_pfn": r.first_pfn.raw(), "nr_pages": r.nr_pages, "first_bit": r.first_bit.raw()}),
        )
        .collect();
    Reply::ok(json!({"ok": true, "total_bits": layout.total_bits(), "ranges": ranges}))
}

/// The set, if it was collected in `token`'s epoch and that epoch is
/// current (the device checks both).
fn hint_set(c: &Control, token: &EpochToken) -> Reply {
    let set = c.hints.snapshot();
    let mut kept = vec![u64::MAX; set.words().len()];
    if let Err(e) = set.apply_to(token, &mut kept) {
        return Reply::err(e);
    }
    let free: Vec<u64> = kept.iter().map(|w| !w).collect();
    Reply::with_words(
        json!({
            "ok": true,
            "epoch": token.epoch().raw(),
            "cmd_id": set.cmd_id(),
            "complete": set.is_complete(),
            "free_pages": set.free_pages(),
        }),
        &free,
    )
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
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            warn!("control: line longer than {MAX_LINE} bytes, closing");
            let _ = writeln!(out, "{}", Reply::err("line too long").head);
            return;
        }
        let reply = execute(line.trim(), c);
        if writeln!(out, "{}", reply.head)
            .and_then(|()| out.write_all(&reply.payload))
            .is_err()
        {
            return;
        }
    }
}

/// Most control connections served at once (tests, tools and a migrator's
/// hint port and device log may be connected together).
const MAX_CONNECTIONS: usize = 8;

/// Binds `path` (mode 0600) and serves control connections, each on its
/// own thread, at most [`MAX_CONNECTIONS`] at once (more are closed).
pub fn spawn(path: &Path, control: Control, force: bool) -> std::io::Result<()> {
    if force && path.exists() {
        let _ = std::fs::remove_file(path);
    }
    let listener = crate::sockets::bind_private(path)?;
    info!("control socket on {}", path.display());
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let s = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("control: accept failed: {e}");
                        continue;
                    }
                };
                if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::AcqRel);
                    warn!("control: more than {MAX_CONNECTIONS} connections, closing one");
                    continue;
                }
                let (c, open) = (control.clone(), Arc::clone(&open));
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        handle(s, &c);
                        open.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    warn!("control: cannot start a connection thread: {e}");
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_device::{Balloon, BalloonConfig};

    fn control(bytes: u64, dump_dir: Option<PathBuf>) -> (Balloon, Control) {
        let layout = Layout::from_ram_byte_ranges(&[(0, bytes)]).unwrap();
        let b = Balloon::new(BalloonConfig::all_features(layout)).unwrap();
        let c = Control::new(
            b.handle(),
            b.hint_handle(),
            layout,
            Arc::new(AtomicU8::new(0xf)),
            dump_dir,
        );
        (b, c)
    }

    fn run(line: &str, c: &Control) -> String {
        execute(line, c).head.to_string()
    }

    #[test]
    fn commands_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (_b, mut c) = control(1 << 30, Some(dir.path().to_path_buf()));
        assert_eq!(run("target 256", &c), "{\"ok\":true,\"target\":256}");
        let st = run("status", &c);
        assert!(st.contains("\"target\":256") && st.contains("\"virtio_status\":15"));
        assert!(run("target x", &c).starts_with("{\"error\""));
        assert!(run("bogus \"q\"", &c).contains("\\\"q\\\""));
        // Not activated: a hint round is refused with a clear error.
        assert!(run("hint-start", &c).contains("\"ok\":false"));
        assert!(run("hint-round 10", &c).contains("\"ok\":false"));
        assert!(run("hint-round x", &c).contains("bad timeout"));
        assert!(run("hint-status", &c).contains("\"state\":\"Idle\""));
        let metrics: serde_json::Value = serde_json::from_str(&run("metrics", &c)).unwrap();
        assert_eq!(metrics["ok"], true);
        assert_eq!(metrics["metrics"]["inflate_pages"], 0, "{metrics}");
        // No round yet: an all-zero set of the layout's size.
        let reply = run("hint-dump set.bin", &c);
        assert!(reply.contains("\"total_bits\":262144"), "{reply}");
        assert!(reply.contains("\"free_pages\":0"), "{reply}");
        assert_eq!(
            std::fs::read(dir.path().join("set.bin")).unwrap().len(),
            262144 / 8
        );
        c.dump_dir = None;
        assert!(run("hint-dump set.bin", &c).contains("--dump-dir"));
    }

    #[test]
    fn the_port_serves_only_the_current_epoch() {
        let (_b, c) = control(3 << 30, None);
        let layout = run("layout", &c);
        assert!(layout.contains("\"total_bits\":786432"), "{layout}");
        // Nothing open yet, a wrong number, or a number that is not one.
        assert!(run("hint-set 0", &c).contains("no epoch open"));
        assert!(run("round-start x", &c).contains("bad epoch"));
        let e1 = execute("epoch-new", &c).head["epoch"].as_u64().unwrap();
        let e2 = execute("epoch-new", &c).head["epoch"].as_u64().unwrap();
        assert!(e2 > e1);
        let stale = run(&format!("hint-set {e1}"), &c);
        assert!(stale.contains("is over"), "{stale}");
        // The device is not activated: the round is refused by the device.
        let refused = run(&format!("round-start {e2}"), &c);
        assert!(refused.contains("not active"), "{refused}");
        // The set of the current epoch: layout-sized, all zero (no round).
        let set = execute(&format!("hint-set {e2}"), &c);
        assert!(set.head["ok"].as_bool().unwrap_or(false) || set.head["error"].is_string());
        // Device writes: a layout-sized bitmap, emptied by reading it.
        let dirty = execute("device-dirty", &c);
        assert_eq!(dirty.head["bytes"], json!(786432 / 8));
        assert_eq!(dirty.payload.len(), 786432 / 8);
        assert!(dirty.payload.iter().all(|&b| b == 0));
        // finish drops the port's epoch.
        assert!(run("hint-finish", &c).contains("\"ok\":true"));
        assert!(run(&format!("hint-set {e2}"), &c).contains("no epoch open"));
    }

    #[test]
    fn dumps_stay_inside_the_dump_dir() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("dumps");
        std::fs::create_dir_all(&dir).unwrap();
        let (_b, c) = control(1 << 20, Some(dir.clone()));
        let outside = base.path().join("victim");
        std::fs::write(&outside, b"keep").unwrap();
        for name in [
            outside.display().to_string(),
            "../victim".into(),
            "..".into(),
            ".".into(),
            "a/b".into(),
            "x".repeat(300),
        ] {
            let reply = run(&format!("hint-dump {name}"), &c);
            assert!(reply.contains("\"ok\":false"), "{name}: {reply}");
        }
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        assert!(run("hint-dump link", &c).contains("\"ok\":false"));
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(run("hint-dump ok.bin", &c).contains("\"ok\":true"));
        let mode = std::fs::metadata(dir.join("ok.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(base.path()).unwrap().count(),
            2,
            "nothing else written"
        );
    }
}
