//! A small QMP client (QEMU Machine Protocol) over a UNIX socket, for the
//! program that migrates a QEMU guest.
//!
//! QEMU is the program's peer here: its replies are parsed with bounds
//! (line length, JSON shape) and a malformed one is an error, never a
//! panic. Events that arrive while a command waits are kept, with QEMU's
//! timestamp, for [`Qmp::wait_event`]. Each command carries an id; a
//! reply with another id (one to a command that timed out earlier) is
//! skipped.
//!
//! ```no_run
//! # use freehint_migrate::qmp::Qmp;
//! # use std::time::Duration;
//! // QEMU creates the socket shortly after it starts: retry for 10 s.
//! let mut qmp = Qmp::connect_within("/tmp/vm.qmp".as_ref(), Duration::from_secs(10))?;
//! let status = qmp.execute("query-status", None)?;
//! qmp.execute("migrate", Some(serde_json::json!({"uri": "tcp:127.0.0.1:4444"})))?;
//! let done = qmp.wait_event(Duration::from_secs(60), |e| e.name == "MIGRATION")?;
//! # Ok::<(), freehint_migrate::qmp::QmpError>(())
//! ```

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP message accepted (`info mtree` is the largest we ask for).
const MAX_LINE: u64 = 8 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection.
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O failed")]
    Io(#[from] io::Error),
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
    /// No answer in time.
    #[error("no QMP {0} in time")]
    Timeout(String),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
}

/// One QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Its name (`STOP`, `RESUME`, `MIGRATION`, ...).
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
    /// QEMU's timestamp: microseconds since the Unix epoch, host clock.
    pub timestamp_us: Option<i64>,
}

/// A QMP session, capabilities negotiated.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Event>,
    peer_pid: Option<u32>,
    next_id: u64,
    /// How long a command may take.
    pub timeout: Duration,
}

impl Qmp {
    /// Connects to the QMP socket at `path` and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::start(stream, Duration::from_secs(30))
    }

    /// Connects to `path`, retrying until `timeout` (QEMU creates the
    /// socket shortly after it starts), waits up to `timeout` for the
    /// greeting and negotiates capabilities.
    pub fn connect_within(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    log::trace!("QMP connect {}: {e}; retrying", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        Self::start(stream, timeout)
    }

    /// Reads the greeting of a connected `stream` (within `greeting`) and
    /// negotiates capabilities.
    fn start(stream: UnixStream, greeting: Duration) -> Result<Self, QmpError> {
        let peer_pid = peer_pid_of(&stream);
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
            peer_pid,
            next_id: 1,
            timeout: Duration::from_secs(30),
        };
        let greeting = qmp.read_message(greeting)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The process id of the QEMU at the other end (from the socket's
    /// peer credentials).
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// Runs `command` with `arguments`; returns its `return` member.
    /// Events that arrive meanwhile are queued for [`Qmp::wait_event`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = match self.read_message(left) {
                Err(QmpError::Timeout(_)) => {
                    return Err(QmpError::Timeout(format!("reply to {command}")))
                }
                r => r?,
            };
            if let Some(event) = as_event(&reply) {
                self.events.push_back(event);
                continue;
            }
            // QEMU echoes the id; only a message it could not parse gets
            // an error without one.
            if reply.get("id").is_some_and(|r| r.as_u64() != Some(id)) {
                log::debug!("QMP: skipping a reply to another command: {reply}");
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply: {reply}")));
        }
    }

    /// Runs an HMP command line; returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let out = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        out.as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("HMP returned {out}")))
    }

    /// Waits up to `timeout` for an event that `want` accepts (events
    /// already queued first); earlier events it passes over are dropped.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Result<Event, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(event) = self.events.pop_front() {
                if want(&event) {
                    return Ok(event);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout("event".into()));
            }
            let msg = self.read_message(left)?;
            match as_event(&msg) {
                Some(event) => self.events.push_back(event),
                None => return Err(QmpError::Protocol(format!("unasked reply: {msg}"))),
            }
        }
    }

    /// Waits up to `timeout` for an event named `name` (queued ones first)
    /// and takes it; unlike [`Qmp::wait_event`], other events stay queued.
    pub fn wait_event_named(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            if let Some(pos) = self.events.iter().skip(seen).position(|e| e.name == name) {
                if let Some(event) = self.events.remove(seen + pos) {
                    return Ok(event);
                }
            }
            seen = self.events.len();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(format!("event {name}")));
            }
            let msg = match self.read_message(left) {
                Err(QmpError::Timeout(_)) => {
                    return Err(QmpError::Timeout(format!("event {name}")))
                }
                r => r?,
            };
            match as_event(&msg) {
                Some(event) => self.events.push_back(event),
                None => return Err(QmpError::Protocol(format!("unasked reply: {msg}"))),
            }
        }
    }

    /// The latest queued event named `name`, if any (the queue keeps it).
    pub fn last_event(&self, name: &str) -> Option<&Event> {
        self.events.iter().rev().find(|e| e.name == name)
    }

    fn read_message(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut line = String::new();
        let read = (&mut self.reader).take(MAX_LINE).read_line(&mut line);
        match read {
            Ok(0) => Err(QmpError::Closed),
            Ok(_) if !line.ends_with('\n') => {
                Err(QmpError::Protocol("over-long or cut message".into()))
            }
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| QmpError::Protocol(format!("invalid JSON ({e})"))),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpError::Timeout("message".into()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The message as an event, if it is one.
fn as_event(msg: &Value) -> Option<Event> {
    let name = msg.get("event")?.as_str()?.to_string();
    let ts = msg.get("timestamp");
    let field = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_i64);
    let timestamp_us = match (field("seconds"), field("microseconds")) {
        (Some(s), Some(us)) => s.checked_mul(1_000_000).and_then(|s| s.checked_add(us)),
        _ => None,
    };
    Some(Event {
        name,
        data: msg.get("data").cloned().unwrap_or(Value::Null),
        timestamp_us,
    })
}

/// The pid of the process at the other end of a connected UNIX socket.
pub fn peer_pid_of(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a local
    // `ucred` that outlives the call; the descriptor is borrowed from
    // `stream` for the call.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (ret == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake QEMU: greets, then answers each line with the next reply.
    fn fake_qemu(replies: Vec<&'static str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            s.write_all(b"{\"QMP\":{\"version\":{}}}\n").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            s.write_all(b"{\"return\":{}}\n").unwrap();
            for reply in replies {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        (dir, path)
    }

    #[test]
    fn commands_events_and_errors() {
        let (_dir, path) = fake_qemu(vec![
            "{\"event\":\"STOP\",\"timestamp\":{\"seconds\":2,\"microseconds\":5}}\n{\"return\":{\"status\":\"paused\"}}\n",
            "{\"error\":{\"class\":\"GenericError\",\"desc\":\"no\"}}\n",
            "[1,2]\n",
        ]);
        let mut qmp = Qmp::connect(&path).unwrap();
        assert_eq!(qmp.peer_pid(), Some(std::process::id()));
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "paused");
        assert_eq!(
            qmp.last_event("STOP").unwrap().timestamp_us,
            Some(2_000_005)
        );
        let stop = qmp
            .wait_event(Duration::from_millis(10), |e| e.name == "STOP")
            .unwrap();
        assert_eq!(stop.data, Value::Null);
        let err = qmp.execute("cont", None).unwrap_err();
        assert!(matches!(err, QmpError::Command { ref class, .. } if class == "GenericError"));
        assert!(matches!(qmp.execute("x", None), Err(QmpError::Protocol(_))));
        assert!(matches!(
            qmp.wait_event(Duration::from_millis(20), |_| true),
            Err(QmpError::Timeout(_) | QmpError::Closed)
        ));
    }

    #[test]
    fn waits_for_the_socket_skips_stale_replies_and_keeps_other_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let p = path.clone();
        // The socket appears only after a while, as when QEMU starts.
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            let listener = UnixListener::bind(&p).unwrap();
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            s.write_all(b"{\"QMP\":{\"version\":{}}}\n").unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let id = cmd["id"].as_u64().unwrap();
                let reply = match cmd["execute"].as_str().unwrap() {
                    // A late reply to an earlier command, then events, then ours.
                    "query-status" => format!(
                        "{{\"return\":{{\"status\":\"stale\"}},\"id\":{}}}\n\
                         {{\"event\":\"STOP\"}}\n{{\"event\":\"RESET\"}}\n\
                         {{\"return\":{{\"status\":\"running\"}},\"id\":{id}}}\n",
                        id - 1
                    ),
                    _ => format!("{{\"return\":{{}},\"id\":{id}}}\n"),
                };
                s.write_all(reply.as_bytes()).unwrap();
                line.clear();
            }
        });
        let mut qmp = Qmp::connect_within(&path, Duration::from_secs(10)).unwrap();
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        let reset = qmp
            .wait_event_named("RESET", Duration::from_millis(10))
            .unwrap();
        assert_eq!(reset.name, "RESET");
        // STOP, passed over, stays queued.
        assert!(qmp.last_event("STOP").is_some());
        assert!(matches!(
            qmp.wait_event_named("RESUME", Duration::from_millis(50)),
            Err(QmpError::Timeout(ref what)) if what == "event RESUME"
        ));
    }

    #[test]
    fn connect_within_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qmp::connect_within(&dir.path().join("none"), Duration::from_millis(100));
        assert!(matches!(err, Err(QmpError::Connect { .. })));
    }
}
