//! `freehint-vfio-user`: serves the freehint virtio-balloon to a vfio-user
//! client (QEMU ≥ 10.1 `-device vfio-user-pci`) as a modern virtio-pci
//! device. See docs/vfio-user.md.
//!
//! **No migration:** QEMU migrates no state for a vfio-user device; on a
//! migration destination the device is dead.

use std::process::ExitCode;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

use clap::Parser;
use freehint_device::Balloon;
use freehint_host::{server, CommandLine, ServerOptions, Transport};
use freehint_vfio_user::{serve, VfioUserDevice, MIGRATION_WARNING};
use log::warn;

/// Serve the freehint virtio-balloon over vfio-user.
///
/// WARNING: QEMU migrates no state for a vfio-user device; after a live
/// migration the device is dead on the destination. Do not migrate a VM with
/// this device attached.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    command_line: CommandLine,
}

/// The balloon as a virtio-pci function, checked against the guest RAM the
/// client maps.
struct VfioUser(VfioUserDevice);

impl Transport for VfioUser {
    const NAME: &'static str = "vfio-user";

    fn new(balloon: Balloon, ranges: Vec<(u64, u64)>) -> Self {
        warn!("{MIGRATION_WARNING}");
        let mut device = VfioUserDevice::new(Box::new(balloon));
        if !ranges.is_empty() {
            device.set_expected_ram(ranges);
        }
        VfioUser(device)
    }

    fn status(&self) -> Arc<AtomicU8> {
        self.0.status_handle()
    }

    fn serve(mut self, options: &ServerOptions) -> Result<(), String> {
        serve(&options.socket, &mut self.0, options.persist, options.force)
            .map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    server::run::<VfioUser>(&Args::parse().command_line)
}
