//! `freehint-vfio-user`: serves the freehint virtio-balloon to a vfio-user
//! client (QEMU ≥ 10.1 `-device vfio-user-pci`) as a modern virtio-pci
//! device. See docs/vfio-user.md.
//!
//! **No migration:** QEMU migrates no state for a vfio-user device; on a
//! migration destination the device is dead.

use std::process::ExitCode;

use clap::Parser;
use freehint_device::balloon::Layout;
use freehint_device::Balloon;
use freehint_host::{control, DeviceOptions, ServerOptions};
use freehint_vfio_user::{serve, VfioUserDevice, MIGRATION_WARNING};
use log::{error, info, warn};

/// Serve the freehint virtio-balloon over vfio-user.
///
/// WARNING: QEMU migrates no state for a vfio-user device; after a live
/// migration the device is dead on the destination. Do not migrate a VM with
/// this device attached.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Sockets and lifetime.
    #[command(flatten)]
    server: ServerOptions,
    /// The device: RAM layout and features.
    #[command(flatten)]
    device: DeviceOptions,
}

fn run(args: Args) -> Result<(), String> {
    let configured = args.device.configure()?;
    let layout: Layout = configured.config.layout;
    let features = configured.config.features();
    let ranges = configured.ranges;
    let balloon = Balloon::new(configured.config)
        .map_err(|e| format!("invalid device configuration: {e}"))?;
    let handle = balloon.handle();
    handle.set_target_pages(args.device.target_pages);
    let hint_handle = balloon.hint_handle();

    warn!("{MIGRATION_WARNING}");
    info!("freehint virtio-balloon over vfio-user: features {features:#x}, RAM layout {ranges:x?}");

    let mut device = VfioUserDevice::new(Box::new(balloon));
    if !ranges.is_empty() {
        device.set_expected_ram(ranges);
    }
    if let Some(path) = &args.server.control {
        let dump_dir = args.server.checked_dump_dir()?;
        let c = control::Control::new(
            handle,
            hint_handle,
            layout,
            device.status_handle(),
            dump_dir,
        );
        control::spawn(path, c, args.server.force)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    }
    serve(
        &args.server.socket,
        &mut device,
        args.server.persist,
        args.server.force,
    )
    .map_err(|e| e.to_string())?;
    if let Some(path) = &args.server.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    freehint_host::signals::remove_on_signal(args.server.socket_files());
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
