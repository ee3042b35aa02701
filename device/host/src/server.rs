//! What every server binary does around its transport: logging, the
//! balloon its options describe, the control socket, the socket files
//! removed when it is killed or done, the exit code. A binary adds its
//! [`Transport`]: the device it wraps the balloon in and how it serves it.

use std::process::ExitCode;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

use freehint_device::Balloon;
use log::{error, info};

use crate::control::{self, Control};
use crate::{CommandLine, DeviceOptions, ServerOptions};

/// What a server binary adds to the start-up every server shares.
pub trait Transport: Sized {
    /// The transport's name in the log (`vfio-user`).
    const NAME: &'static str;

    /// Wraps `balloon` for the transport; `ranges` is the guest RAM it was
    /// configured for, as `(start, len)` byte ranges (empty when not
    /// given).
    fn new(balloon: Balloon, ranges: Vec<(u64, u64)>) -> Self;

    /// The virtio device status register, as the control socket reports
    /// it.
    fn status(&self) -> Arc<AtomicU8>;

    /// Serves the VMM on `options.socket` until the server is done.
    fn serve(self, options: &ServerOptions) -> Result<(), String>;
}

/// Runs a server over transport `T`: logs at `info` unless `RUST_LOG` says
/// otherwise, removes the socket files on SIGINT/SIGTERM, builds the
/// balloon the command line describes with its starting target, opens the
/// control socket if asked to, and serves. An error is logged and makes
/// the exit code a failure.
pub fn run<T: Transport>(command_line: &CommandLine) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let CommandLine { server, device } = command_line;
    crate::signals::remove_on_signal(server.socket_files());
    match start_and_serve::<T>(server, device) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn start_and_serve<T: Transport>(
    server: &ServerOptions,
    device: &DeviceOptions,
) -> Result<(), String> {
    let configured = device.configure()?;
    let layout = configured.config.layout;
    let features = configured.config.features();
    let balloon = Balloon::new(configured.config)
        .map_err(|e| format!("invalid device configuration: {e}"))?;
    let handle = balloon.handle();
    handle.set_target_pages(device.target_pages);
    let hint_handle = balloon.hint_handle();
    info!(
        "freehint virtio-balloon over {}: features {features:#x}, RAM layout {:x?}",
        T::NAME,
        configured.ranges
    );
    let transport = T::new(balloon, configured.ranges);
    if let Some(path) = &server.control {
        let dump_dir = server.checked_dump_dir()?;
        let c = Control::new(handle, hint_handle, layout, transport.status(), dump_dir);
        control::spawn(path, c, server.force)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    }
    transport.serve(server)?;
    if let Some(path) = &server.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
