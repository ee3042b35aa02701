//! The receiver's replies to the sender, on the connection that carries the
//! migration stream (which flows the other way): one JSON object per line.
//!
//! | message | when |
//! |---|---|
//! | `{"event":"hello","version":1,"qemu_port":P}` | on accepting: QEMU on the destination listens on port `P` of the same host |
//! | `{"event":"stored",...}` | the stream's end record was read and every page stored |
//! | `{"event":"resumed","resume_us":T}` | the destination runs (`T`: QEMU's `RESUME` event, µs since the epoch) |
//! | `{"event":"not_resumed","reason":"..."}` | the destination was not resumed and never will be by the receiver: the source may resume |
//! | `{"event":"failed","error":"..."}` | the receive failed before the destination could run |
//!
//! The sender treats the receiver as untrusted: a line is at most
//! [`MAX_LINE`] bytes and must parse as one of the messages.

use std::io::{self, BufRead, Read, Write};

use serde::{Deserialize, Serialize};

/// The protocol version of the hello message.
pub const VERSION: u32 = 1;
/// Longest line accepted.
pub const MAX_LINE: usize = 4096;

/// Socket buffer (each of the sender's send buffer and the receiver's
/// receive buffer) for the migration stream. It bounds what is in flight
/// when the guest stops, and with it how far the receiver can lag: with
/// Linux's automatic sizing (up to `net.ipv4.tcp_rmem`'s 32 MiB here) it
/// lagged up to 50 ms behind the sender on a 4 GiB guest, and every such
/// millisecond is downtime, since the switch-over waits for the receiver.
pub const STREAM_SOCKET_BUFFER: usize = 1 << 20;

/// One message from the receiver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Reply {
    /// The receiver is ready for the stream.
    Hello {
        /// [`VERSION`].
        version: u32,
        /// Where the destination QEMU listens for the device state.
        qemu_port: u16,
    },
    /// Every page is stored.
    Stored {
        /// Pages stored with their contents.
        pages_written: u64,
        /// Pages stored as zero.
        zero_pages: u64,
        /// Stream bytes read.
        bytes: u64,
    },
    /// The destination runs.
    Resumed {
        /// QEMU's `RESUME` timestamp, µs since the Unix epoch.
        resume_us: Option<i64>,
    },
    /// The destination was left paused.
    NotResumed {
        /// Why.
        reason: String,
    },
    /// The receive failed.
    Failed {
        /// What failed.
        error: String,
    },
}

/// Why a reply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The connection failed or timed out.
    #[error("reading the receiver's reply failed")]
    Io(#[from] io::Error),
    /// The receiver closed the connection.
    #[error("the receiver closed the connection")]
    Closed,
    /// Not a valid message.
    #[error("invalid reply from the receiver: {0}")]
    Invalid(String),
}

/// Writes `reply` as one line.
pub fn write_reply(out: &mut impl Write, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(io::Error::other)?;
    line.push('\n');
    out.write_all(line.as_bytes())?;
    out.flush()
}

/// Reads one reply.
pub fn read_reply(input: &mut impl BufRead) -> Result<Reply, ControlError> {
    let mut line = String::new();
    let n = input.take(MAX_LINE as u64).read_line(&mut line)?;
    if n == 0 {
        return Err(ControlError::Closed);
    }
    if !line.ends_with('\n') {
        return Err(ControlError::Invalid("over-long or cut line".into()));
    }
    serde_json::from_str(&line).map_err(|e| ControlError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Hello {
                version: VERSION,
                qemu_port: 4444,
            },
            Reply::Stored {
                pages_written: 3,
                zero_pages: 4,
                bytes: 5,
            },
            Reply::Resumed {
                resume_us: Some(1_700_000_000_000_000),
            },
            Reply::NotResumed {
                reason: "told so".into(),
            },
            Reply::Failed { error: "x".into() },
        ];
        let mut wire = Vec::new();
        for r in &replies {
            write_reply(&mut wire, r).unwrap();
        }
        let mut input = &wire[..];
        for r in &replies {
            assert_eq!(&read_reply(&mut input).unwrap(), r);
        }
        assert!(matches!(read_reply(&mut input), Err(ControlError::Closed)));
    }

    #[test]
    fn hostile_lines_are_errors() {
        for bad in [
            &b"{\"event\":\"hello\"}\n"[..],
            b"{\"event\":\"reboot\"}\n",
            b"[]\n",
            b"{\"event\":\"hello\",\"version\":1,\"qemu_port\":70000}\n",
            b"{\"event\":\"failed\",\"error\":\"no newline\"}",
        ] {
            assert!(
                matches!(read_reply(&mut &bad[..]), Err(ControlError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'x'; MAX_LINE + 10];
        assert!(read_reply(&mut &long[..]).is_err());
    }
}
