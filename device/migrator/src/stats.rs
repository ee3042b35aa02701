//! What a migration did, pass by pass. Every type serializes itself, so a
//! program prints one JSON line per pass with `serde_json::to_string`.

use serde::Serialize;

use crate::policy::StopReason;
use crate::wire::PassKind;

/// One pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PassStats {
    /// Pass number (0 for the bulk pass).
    pub pass: u32,
    /// Its kind.
    pub kind: PassKind,
    /// Pages to send when the pass began.
    pub pending_pages: u64,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages found zero and sent as zero runs.
    pub zero_pages: u64,
    /// Pages hinted free and sent as zero runs instead of being read.
    pub hinted_pages: u64,
    /// Pages that were holes of the RAM file, sent as zero runs without
    /// being read (bulk pass, see [`crate::sparse`]).
    pub hole_pages: u64,
    /// Bytes of stream the pass wrote.
    pub bytes: u64,
    /// Wall time of the pass, in microseconds.
    pub elapsed_us: u64,
}

impl PassStats {
    /// Pass `pass` of kind `kind` with `pending_pages` to send, nothing
    /// done yet.
    pub fn new(pass: u32, kind: PassKind, pending_pages: u64) -> Self {
        Self {
            pass,
            kind,
            pending_pages,
            pages_sent: 0,
            zero_pages: 0,
            hinted_pages: 0,
            hole_pages: 0,
            bytes: 0,
            elapsed_us: 0,
        }
    }

    /// Pages the pass handled (sent, zero, hinted or holes).
    pub fn pages_done(&self) -> u64 {
        self.pages_sent + self.zero_pages + self.hinted_pages + self.hole_pages
    }

    /// Pages the pass read from guest memory (sent, or found zero).
    pub fn pages_read(&self) -> u64 {
        self.pages_sent + self.zero_pages
    }
}

/// A whole migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MigrationReport {
    /// Every pass, the final one last.
    pub passes: Vec<PassStats>,
    /// Why pre-copy stopped.
    pub stop_reason: StopReason,
    /// Pages sent with their contents, all passes.
    pub pages_sent: u64,
    /// Zero pages, all passes.
    pub zero_pages: u64,
    /// Hinted pages, all passes.
    pub hinted_pages: u64,
    /// Holes of the RAM file, all passes.
    pub hole_pages: u64,
    /// Bytes of stream, header and end record included.
    pub bytes: u64,
    /// From the VM pause to the end of the stream, in microseconds.
    pub downtime_us: u64,
    /// From start to end, in microseconds.
    pub total_us: u64,
}
