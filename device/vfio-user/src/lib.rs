//! freehint-vfio-user: the freehint virtio-balloon as a modern virtio-pci
//! device served over vfio-user (QEMU ≥ 10.1 `-device vfio-user-pci`).
//!
//! **No migration:** QEMU migrates no state for a vfio-user device and tells
//! the server nothing; on a migration destination the device is dead. See
//! `docs/vfio-user.md`.
//!
//! Modules: [`pci`] (config space and capabilities), [`virtio_pci`] (common
//! config, ISR, device config, notify), [`msix`] (table and PBA),
//! [`interrupt`] (MSI-X/INTx routing), [`memory`] (DMA_MAP → guest memory),
//! [`server`] (the `ServerBackend` and the serve loop). The device options,
//! the start-up, the control socket and socket hygiene come from
//! `freehint-host`, shared with the vhost-user server.
#![warn(missing_docs)]

pub mod interrupt;
pub mod memory;
pub mod msix;
pub mod pci;
pub mod server;
pub mod virtio_pci;

pub use server::{serve, VfioUserDevice, MIGRATION_WARNING};
