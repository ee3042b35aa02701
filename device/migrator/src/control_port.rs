//! [`ControlPort`]: the hint port of a device server in another process
//! (`freehint-vhost-user`, `freehint-vfio-user`), over its control socket.
//!
//! The server keeps the device's epoch token; the port names the epoch by
//! number, and the server serves a set only while that number is its
//! current epoch (`epoch-new`, `round-start E`, `hint-set E`), so the
//! epoch rule holds across the process boundary. The server is treated as
//! a peer that may fail or lie about sizes: every reply is bounded (one
//! line of at most 64 KiB, bitmaps of exactly the layout's size) and read
//! with a timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bitvec::prelude::{BitVec, Lsb0};
use freehint_protocol::layout::{Bit, Layout, LayoutRange, Pfn};
use freehint_protocol::Epoch;
use serde_json::Value;

use crate::device_hints::{HintPort, PortError};

/// Longest reply line accepted.
const MAX_LINE: u64 = 64 << 10;

/// A connection to a device server's control socket.
#[derive(Debug)]
pub struct ControlPort {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    layout: Layout,
}

/// An epoch the server opened (`epoch-new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteEpoch(pub Epoch);

impl ControlPort {
    /// Connects to the control socket at `path` and reads the device's
    /// layout.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, PortError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| PortError::Failed(format!("control socket {}: {e}", path.display())))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(failed)?;
        let writer = stream.try_clone().map_err(failed)?;
        let mut port = Self {
            reader: BufReader::new(stream),
            writer,
            layout: Layout::empty(),
        };
        let reply = port.request("layout")?;
        port.layout = parse_layout(&reply)?;
        Ok(port)
    }

    /// The device's RAM layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Sends `cmd`; returns the reply object if it says `"ok":true`.
    pub fn request(&mut self, cmd: &str) -> Result<Value, PortError> {
        writeln!(self.writer, "{cmd}").map_err(failed)?;
        let mut line = String::new();
        (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(failed)?;
        if !line.ends_with('\n') {
            return Err(PortError::Failed(format!(
                "{cmd}: reply cut off or longer than {MAX_LINE} bytes"
            )));
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| PortError::Failed(format!("{cmd}: bad reply {line:?}: {e}")))?;
        if v["ok"] == Value::Bool(true) {
            return Ok(v);
        }
        let error = v["error"].as_str().unwrap_or("no reason given").to_string();
        Err(
            if error.contains("is over") || error.contains("epoch") && error.contains("stale") {
                PortError::Stale(error)
            } else {
                PortError::Refused(error)
            },
        )
    }

    /// Sends `cmd`, whose reply carries a bitmap of the layout's size.
    fn bitmap(&mut self, cmd: &str) -> Result<Vec<u64>, PortError> {
        let head = self.request(cmd)?;
        let words = self.layout.total_bits().div_ceil(64) as usize;
        let bytes = head["bytes"].as_u64().unwrap_or(u64::MAX);
        if bytes != (words * 8) as u64 {
            return Err(PortError::Failed(format!(
                "{cmd}: {bytes} bytes announced, the layout needs {}",
                words * 8
            )));
        }
        let mut raw = vec![0u8; words * 8];
        self.reader.read_exact(&mut raw).map_err(failed)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    }
}

fn failed(e: std::io::Error) -> PortError {
    PortError::Failed(e.to_string())
}

fn parse_layout(reply: &Value) -> Result<Layout, PortError> {
    let bad = |what: &str| PortError::Failed(format!("layout reply: {what}: {reply}"));
    let ranges = reply["ranges"].as_array().ok_or_else(|| bad("no ranges"))?;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let field = |k: &str| r[k].as_u64().ok_or_else(|| bad(k));
        out.push(LayoutRange {
            first_pfn: Pfn(field("first_pfn")?),
            nr_pages: field("nr_pages")?,
            first_bit: Bit(field("first_bit")?),
        });
    }
    Layout::from_ranges(&out).map_err(|e| bad(&e.to_string()))
}

impl HintPort for ControlPort {
    type Epoch = RemoteEpoch;

    fn new_epoch(&mut self) -> Result<RemoteEpoch, PortError> {
        let v = self.request("epoch-new")?;
        v["epoch"]
            .as_u64()
            .map(|e| RemoteEpoch(Epoch(e)))
            .ok_or_else(|| PortError::Failed(format!("epoch-new: {v}")))
    }

    fn start_round(&mut self, epoch: &RemoteEpoch) -> Result<u32, PortError> {
        let v = self.request(&format!("round-start {}", epoch.0))?;
        Ok(v["cmd_id"].as_u64().unwrap_or(0) as u32)
    }

    fn progress(&mut self) -> Result<(u64, u32), PortError> {
        let v = self.request("hint-status")?;
        Ok((
            v["free_pages"].as_u64().unwrap_or(0),
            v["cmd_id"].as_u64().unwrap_or(0) as u32,
        ))
    }

    fn free_set(
        &mut self,
        epoch: &RemoteEpoch,
        free: &mut BitVec<u64, Lsb0>,
    ) -> Result<(), PortError> {
        let words = self.bitmap(&format!("hint-set {}", epoch.0))?;
        let n = free.len();
        let src = BitVec::<u64, Lsb0>::from_vec(words);
        let len = n.min(src.len());
        free[..len].copy_from_bitslice(&src[..len]);
        Ok(())
    }

    fn finish(&mut self) {
        if let Err(e) = self.request("hint-finish") {
            log::warn!("hint-finish: {e}");
        }
    }

    fn take_device_dirty(&mut self) -> Result<Vec<u64>, PortError> {
        self.bitmap("device-dirty")
    }
}
