//! Live progress of a migration, for a progress bar: the engine updates a
//! few atomics as it goes, and another thread reads a [`ProgressSnapshot`]
//! whenever it likes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// A handle on the progress of one engine (cheap to clone and to read).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    pass: AtomicU32,
    pending: AtomicU64,
    done: AtomicU64,
    bytes: AtomicU64,
    paused: AtomicBool,
}

/// The progress at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgressSnapshot {
    /// The pass running (0: bulk).
    pub pass: u32,
    /// Pages the pass has to send.
    pub pending_pages: u64,
    /// Pages the pass handled so far.
    pub pages_done: u64,
    /// Bytes of stream written so far, all passes.
    pub bytes: u64,
    /// Whether the guest is stopped (the final pass).
    pub paused: bool,
}

impl Progress {
    /// What the engine did so far.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let s = &self.state;
        ProgressSnapshot {
            pass: s.pass.load(Ordering::Relaxed),
            pending_pages: s.pending.load(Ordering::Relaxed),
            pages_done: s.done.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            paused: s.paused.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn begin_pass(&self, pass: u32, pending: u64) {
        self.state.done.store(0, Ordering::Relaxed);
        self.state.pending.store(pending, Ordering::Relaxed);
        self.state.pass.store(pass, Ordering::Relaxed);
    }

    pub(crate) fn advance(&self, pages: u64, bytes: u64) {
        self.state.done.fetch_add(pages, Ordering::Relaxed);
        self.state.bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn paused(&self) {
        self.state.paused.store(true, Ordering::Relaxed);
    }
}
