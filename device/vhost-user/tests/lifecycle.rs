//! The server's life around one front end: it exits (and removes its
//! sockets) when the front end leaves, and with `--persist` serves the
//! next one.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn start(dir: &Path, extra: &[&str]) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_freehint-vhost-user"))
        .arg("--socket")
        .arg(dir.join("vhost.sock"))
        .arg("--control")
        .arg(dir.join("ctl.sock"))
        .args(["--ram-size", "64M"])
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !(dir.join("vhost.sock").exists() && dir.join("ctl.sock").exists()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no sockets");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn exited_within(child: &mut Child, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn the_server_exits_when_its_front_end_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = start(dir.path(), &[]);
    let mode = std::fs::metadata(dir.path().join("vhost.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(UnixStream::connect(dir.path().join("vhost.sock")).unwrap());
    let exited = exited_within(&mut child, Duration::from_secs(10));
    if !exited {
        let _ = child.kill();
    }
    assert!(exited, "still running after the front end left");
    assert!(!dir.path().join("vhost.sock").exists());
    assert!(!dir.path().join("ctl.sock").exists());
}

#[test]
fn with_persist_the_server_serves_the_next_front_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = start(dir.path(), &["--persist"]);
    for _ in 0..3 {
        drop(UnixStream::connect(dir.path().join("vhost.sock")).unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "a persistent server exited"
    );
    let _ = child.kill();
    let _ = child.wait();
}
