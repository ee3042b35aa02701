//! freehint-migrate: pre-copy live migration of guest RAM, with free page
//! hints.
//!
//! The library a Rust VMM embeds to move its guest's RAM to another host,
//! and the base of the program that migrates a QEMU guest (QEMU then moves
//! only CPU and device state, with `x-ignore-shared`).
//!
//! - [`Engine`] (source): a bulk pass over all RAM, dirty passes while the
//!   guest runs, a [`Policy`] that decides when to stop, a
//!   [`VmControl::pause`], the final pass. Zero pages go as zero runs;
//!   pages a [`HintSource`] reports free go as zero runs without being
//!   read. One [`PassStats`] per pass, serializable as a JSON line.
//! - [`DirtyLog`] (source): which pages were written;
//!   [`VmMemoryLog`] reads vm-memory's dirty bitmaps, [`SharedLog`] is
//!   marked by hand (a device model's own writes),
//!   [`PagemapScanLog`](pagemap_scan::PagemapScanLog) reads a process's
//!   page tables (uffd-wp, see [`uffd`]), [`AnyOf`] merges logs.
//! - [`device_hints`]: hints and device writes from the balloon device
//!   model through a [`HintPort`](device_hints::HintPort): its
//!   `HintHandle` in the same process (feature `device`), or the control
//!   socket of a device server ([`ControlPort`](control_port::ControlPort)).
//! - [`wire`]: the versioned stream between the two; the [`Decoder`]
//!   treats the sender as untrusted.
//! - [`Receiver`] (destination): stores pages into a [`PageSink`]: the
//!   destination's [`RamFile`], a vm-memory guest memory
//!   ([`GuestMemorySink`]) or a byte buffer.
//!
//! Hints follow the project's correctness invariant (see [`hints`]): the
//! dirty log is on before any hint is used, every dirty-log sync drops the
//! hints gathered before it, and the final pass uses none.
//!
//! # Example
//!
//! A VMM whose guest memory keeps vm-memory dirty bitmaps migrates it to a
//! destination (here a thread of the same process, over a UNIX socket; a
//! `TcpStream` between hosts):
//!
//! ```
//! use std::io::{BufReader, BufWriter};
//! use std::os::unix::net::UnixStream;
//!
//! use freehint_migrate::{Engine, GuestMemorySink, HookError, NoHints, Receiver, VmMemoryLog};
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // RAM below 1 MiB and above 4 GiB, as around x86's PCI hole.
//! let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)];
//! let source = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges)?;
//! source.write_obj(0xfeed_u64, GuestAddress((1 << 32) + 0x1000))?;
//!
//! let (tx, rx) = UnixStream::pair()?;
//! let destination = std::thread::spawn(move || -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
//!     let memory = GuestMemoryMmap::<()>::from_ranges(&ranges)?;
//!     let receiver = Receiver::new(BufReader::new(rx))?;
//!     let mut sink = GuestMemorySink::new(&memory, receiver.layout())?;
//!     let report = receiver.receive(&mut sink)?;
//!     assert_eq!(report.pages_written, 1, "the other pages went as zero runs");
//!     Ok(memory)
//! });
//!
//! let engine = Engine::new(&source)?;
//! let dirty_log = VmMemoryLog::new(&source)?;
//! let pause = || -> Result<(), HookError> {
//!     // Stop the vCPUs and the devices here.
//!     Ok(())
//! };
//! let on_pass = |pass: &_| log::info!("{}", serde_json::to_string(pass).unwrap_or_default());
//! let report = engine.run(BufWriter::new(tx), dirty_log, NoHints, pause, on_pass)?;
//!
//! let memory = destination.join().expect("the destination thread panicked")?;
//! assert_eq!(memory.read_obj::<u64>(GuestAddress((1 << 32) + 0x1000))?, 0xfeed);
//! assert_eq!(report.passes.len(), 2, "bulk, then final: nothing was dirty");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs, missing_debug_implementations)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("freehint-migrate indexes pages with usize and needs a 64-bit host");

pub mod bits;
pub mod control_port;
pub mod device_hints;
pub mod dirty;
pub mod engine;
pub mod hints;
pub mod layout;
pub mod pagemap_scan;
pub mod policy;
pub mod progress;
pub mod qemu;
pub mod qmp;
pub mod ram_file;
pub mod receiver;
pub mod sparse;
pub mod stats;
mod sys;
pub mod uffd;
pub mod wire;

pub use bits::{PageBitmap, PageBits};
pub use dirty::{AnyOf, DirtyLog, HookError, SharedLog, VmMemoryLog};
pub use engine::{Engine, MigrateError, VmControl};
pub use hints::{HintSource, NoHints};
pub use layout::{LayoutError, PagePlace, RamLayout, RamRange, RunError};
pub use policy::{Decision, Policy, StopReason};
pub use progress::{Progress, ProgressSnapshot};
pub use ram_file::RamFile;
pub use receiver::{GuestMemorySink, PageSink, ReceiveError, ReceiveReport, Receiver};
pub use sparse::{FileHoles, HoleMap};
pub use stats::{MigrationReport, PassStats};
/// How `freehint-migrate send|receive` size their stream socket's buffers,
/// for embedders and benchmarks that want the same stream.
pub use sys::{set_socket_buffer, SocketBuffer};
pub use wire::{Decoder, Encoder, PassKind, Record, RecordError, WireError};

/// The page size of the stream and of every bitmap: 4 KiB.
pub const PAGE_SIZE: usize = 4096;
