//! freehint VM test harness: boots the guest image built by
//! `tests/vm/build-image` under QEMU (TCG), runs scenario scripts inside the
//! guest and turns their console output into JSON results.
//!
//! Layout: [`manifest`] (where the image is), [`qemu`] (one QEMU process),
//! [`guest`] (console protocol and splat detection),
//! [`runner`] (boot + report), [`scenarios`] (the registry), [`errors`]
//! (the shared I/O error), [`sockets`]
//! (short UNIX socket paths), [`chart`] (the demo table as a PNG). QMP is
//! the migrator's client, `freehint_migrate::qmp`.
#![warn(missing_docs)]

pub mod chart;
pub mod errors;
pub mod guest;
pub mod manifest;
pub mod migrate;
pub mod qemu;
pub mod runner;
pub mod scenarios;
pub mod sockets;
pub mod vfio;
