//! freehint-migrate: pre-copy live migration of guest RAM, with free page
//! hints.
#![warn(missing_docs, missing_debug_implementations)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("freehint-migrate indexes pages with usize and needs a 64-bit host");

pub mod bits;
pub mod layout;
pub mod ram_file;
pub mod receiver;
pub mod wire;

pub use layout::{LayoutError, PagePlace, RamLayout, RamRange, RunError};
pub use ram_file::RamFile;
pub use receiver::{GuestMemorySink, PageSink, ReceiveError, ReceiveReport, Receiver};
pub use wire::{Decoder, Encoder, PassKind, Record, RecordError, WireError};

/// The page size of the stream and of every bitmap: 4 KiB.
pub const PAGE_SIZE: usize = 4096;
