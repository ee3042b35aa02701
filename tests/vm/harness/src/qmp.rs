//! A small QMP client (QEMU Machine Protocol) over a UNIX socket.
//!
//! ```no_run
//! # use freehint_vmtest::qmp::Qmp;
//! # use std::time::Duration;
//! let mut qmp = Qmp::connect("/tmp/vm.qmp".as_ref(), Duration::from_secs(10))?;
//! let status = qmp.execute("query-status", None)?;
//! qmp.execute("migrate", Some(serde_json::json!({"uri": "tcp:127.0.0.1:4444"})))?;
//! let ev = qmp.wait_event("MIGRATION", Duration::from_secs(60))?;
//! # Ok::<(), freehint_vmtest::qmp::QmpError>(())
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// Longest QMP line accepted (QEMU's replies are far smaller).
const MAX_LINE: usize = 16 << 20;

/// Errors of the QMP client.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket did not accept a connection in time.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU sent something that is not a QMP message.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP error description.
        desc: String,
    },
    /// No answer or event in time.
    #[error("QMP timeout waiting for {0}")]
    Timeout(String),
    /// QEMU closed the connection.
    #[error("QMP connection closed by QEMU")]
    Closed,
}

/// A connected QMP session (capabilities already negotiated).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    next_id: u64,
    /// Default timeout for command replies.
    pub timeout: Duration,
}

impl Qmp {
    /// Connects to `path`, retrying until `timeout` (QEMU creates the socket
    /// shortly after it starts), reads the greeting and sends `qmp_capabilities`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
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
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            next_id: 1,
            timeout: Duration::from_secs(30),
        };
        let greeting = qmp.read_message(timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut line = String::new();
        let n = match (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
        {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(QmpError::Timeout("a QMP message".into()))
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol("over-long or truncated message".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("invalid JSON ({e}): {}", line.trim())))
    }

    /// Runs `command` with optional `arguments`; returns its `return` value.
    /// Events that arrive meanwhile are queued for [`Qmp::wait_event`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg)
            .map_err(|e| QmpError::Protocol(format!("cannot encode command: {e}")))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(format!("reply to {command}")));
            }
            let reply = match self.read_message(left) {
                Err(QmpError::Timeout(_)) => {
                    return Err(QmpError::Timeout(format!("reply to {command}")))
                }
                r => r?,
            };
            if reply.get("event").is_some() {
                self.events.push_back(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                log::debug!("QMP: ignoring unrelated message {reply}");
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Waits for an event called `name` (queued ones first); returns it whole.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
            return self
                .events
                .remove(pos)
                .ok_or_else(|| QmpError::Protocol("event queue changed".into()));
        }
        let deadline = Instant::now() + timeout;
        loop {
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
            if msg["event"] == name {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            }
        }
    }

    /// Events received so far and not yet consumed.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP peer: greets, then answers each command by name.
    fn fake_qemu(listener: UnixListener) {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            buf.clear();
            loop {
                if s.read(&mut byte).unwrap_or(0) == 0 {
                    return;
                }
                if byte[0] == b'\n' {
                    break;
                }
                buf.push(byte[0]);
            }
            let cmd: Value = serde_json::from_slice(&buf).unwrap();
            let id = cmd["id"].clone();
            let reply = match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}),
                "query-status" => {
                    s.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n")
                        .unwrap();
                    json!({"return": {"status": "running"}, "id": id})
                }
                other => json!({"error": {"class": "CommandNotFound",
                                 "desc": format!("no {other}")}, "id": id}),
            };
            s.write_all(format!("{reply}\n").as_bytes()).unwrap();
        }
    }

    #[test]
    fn commands_errors_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || fake_qemu(listener));
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let st = q.execute("query-status", None).unwrap();
        assert_eq!(st["status"], "running");
        let err = q.execute("bogus", Some(json!({"x": 1}))).unwrap_err();
        assert!(matches!(err, QmpError::Command { ref class, .. } if class == "CommandNotFound"));
        let ev = q.wait_event("STOP", Duration::from_secs(1)).unwrap();
        assert_eq!(ev["event"], "STOP");
        assert!(matches!(
            q.wait_event("RESUME", Duration::from_millis(100)),
            Err(QmpError::Timeout(_))
        ));
        drop(q);
        t.join().unwrap();
    }
}
