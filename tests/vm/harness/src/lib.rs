//! freehint VM test harness: boots the guest image built by
//! `tests/vm/build-image` under QEMU (TCG), runs scenario scripts inside the
//! guest and turns their console output into JSON results.
//!
//! Layout: [`manifest`] (where the image is), [`qemu`] (what one boot
//! runs: machine, memory, command line), [`vm`] (one running QEMU: process,
//! serial console, QMP, logs; for boots, migrations and vfio-user boots),
//! [`guest`] (console protocol and the one splat list), [`migrate`]
//! (migrations, the integrity protocol and the migration matrix), [`vfio`]
//! (vfio-user device servers and boots),
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
pub mod vm;
