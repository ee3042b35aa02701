// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! freehint wire protocol: the virtio-balloon ABI, the bitmap free page hint
//! extension, and the pfn ↔ bit layout table shared by the host device model
//! and the guest kernel module.
//!
//! `no_std`. Its only dependency is vm-memory, for `ByteValued` on
//! [`ConfigSpace`] (feature `vm-memory`, on by default; build with
//! `--no-default-features` for none). The guest module reuses the source files
//! directly with `#[path]`:
//! - [`layout`], [`bitmap`] and [`balloon`] are standalone (only `core`);
//! - [`bitmap_hint`] needs `layout` and `bitmap` as sibling modules.
//!
//! The index types keep guest page frames ([`Pfn`]), bitmap bits ([`Bit`])
//! and the host's sync epochs ([`Epoch`], host side only) apart, the way
//! vm-memory's `GuestAddress` keeps guest addresses apart from offsets.
//!
//! The protocol itself is specified in `docs/protocol.md`.
#![no_std]
#![warn(missing_docs)]
// The one exception, `byte_valued` (an `unsafe impl` of vm-memory's
// `ByteValued`), allows it for itself.
#![deny(unsafe_code)]

pub mod balloon;
pub mod bitmap;
pub mod bitmap_hint;
#[cfg(feature = "vm-memory")]
mod byte_valued;
pub mod epoch;
pub mod layout;

pub use balloon::{next_cmd_id, ConfigSpace, QueueKind, QueueLayout};
pub use bitmap::{count_ones, set_bit_run, set_runs, words_for_bits};
pub use bitmap_hint::{BoundChunk, ChunkHeader, LayoutReply, Message, MsgHeader, WireError};
pub use epoch::Epoch;
pub use layout::{
    Bit, Layout, LayoutError, LayoutRange, Pfn, MAX_TOTAL_BITS, PAGE_SHIFT, PAGE_SIZE,
};
