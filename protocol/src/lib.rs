// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! freehint wire protocol: the virtio-balloon ABI, the bitmap free page hint
//! extension, and the pfn ↔ bit layout table shared by the host device model
//! and the guest kernel module.
//!
//! `no_std`, no dependencies. The guest module reuses the source files
//! directly with `#[path]`:
//! - [`layout`], [`bitmap`] and [`balloon`] are standalone (only `core`);
//! - [`bitmap_hint`] needs `layout` and `bitmap` as sibling modules.
//!
//! The protocol itself is specified in `docs/protocol.md`.
#![no_std]
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod balloon;
pub mod bitmap;
pub mod bitmap_hint;
pub mod layout;

pub use balloon::{next_cmd_id, BalloonConfig, QueueKind, QueueLayout};
pub use bitmap::{count_ones, set_bit_run, set_runs, words_for_bits};
pub use bitmap_hint::{ChunkHeader, LayoutReply, Message, MsgHeader, WireError};
pub use layout::{Layout, LayoutError, LayoutRange, MAX_TOTAL_BITS, PAGE_SHIFT, PAGE_SIZE};
