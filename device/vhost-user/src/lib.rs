//! freehint-vhost-user: the freehint virtio-balloon served over vhost-user,
//! to QEMU's generic front end
//! `-device vhost-user-test-device-pci,virtio-id=5,num_vqs=5,config_size=12,chardev=ID`
//! (the chardev a UNIX socket this back end listens on).
//!
//! A thin transport: the device model is [`freehint_device::Balloon`]
//! unchanged. vhost-user gives the back end the guest RAM (the memory
//! table's file descriptors), the rings' addresses and their kick and call
//! eventfds; [`BalloonBackend`] hands them to the device as it would get
//! them from any transport, and relays config-space reads, writes and
//! change notifications over the vhost-user socket.
//!
//! Why vhost-user for migration: QEMU refuses to migrate a VM with a
//! vhost-user device it cannot migrate, and unplugs it cleanly
//! (`device_del`), so a migrator unplugs the balloon on the source before
//! the switch-over and plugs a new one, served by a back end on the
//! destination with the source's target, after it (docs/migration.md).
#![warn(missing_docs)]

mod backend;
mod channel;

pub use backend::{BalloonBackend, QUEUES};
