// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The host's sync epoch, shared by the device model, the device servers
//! and the migrator (the guest never sees it).
//!
//! This file is self-contained (only `core`).

use core::fmt;

/// A sync epoch of the host: the span between two dirty-log syncs that a
/// hint round belongs to. The device opens a new epoch right before each
/// sync, and a free set collected in one epoch may clear pages only while
/// that epoch is the current one. Epochs count up from 0 and wrap; only
/// equality is meaningful across a wrap.
///
/// Never on the virtio wire: the guest answers command ids
/// (`free_page_hint_cmd_id`), and the device ties each command id to the
/// epoch it was issued in.
///
/// ```
/// use freehint_protocol::Epoch;
/// let e = Epoch::default();
/// assert_eq!(e.next(), Epoch(1));
/// assert_eq!(Epoch(u64::MAX).next(), Epoch(0));
/// assert_eq!(Epoch(7).to_string(), "7");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one (wraps).
    #[inline]
    pub const fn next(self) -> Self {
        Self(self.0.wrapping_add(1))
    }

    /// The raw epoch number (for logs, status output and text protocols).
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}
