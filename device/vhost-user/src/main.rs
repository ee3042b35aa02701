//! `freehint-vhost-user`: serves the freehint virtio-balloon over
//! vhost-user. QEMU side:
//!
//! ```text
//! -chardev socket,id=fhb,path=SOCKET
//! -device vhost-user-test-device-pci,id=balloon0,chardev=fhb,virtio-id=5,num_vqs=5,config_size=12
//! ```
//!
//! Guest RAM must be shared with this process (`memory-backend-file` or
//! `memory-backend-memfd` with `share=on`). See docs/vhost-user.md.

use std::process::ExitCode;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, RwLock};

use clap::Parser;
use freehint_device::Balloon;
use freehint_host::{control, DeviceOptions, ServerOptions};
use freehint_vhost_user::BalloonBackend;
use log::{error, info};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Serve the freehint virtio-balloon over vhost-user.
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
    let layout = configured.config.layout;
    let features = configured.config.features();
    let balloon = Balloon::new(configured.config)
        .map_err(|e| format!("invalid device configuration: {e}"))?;
    let handle = balloon.handle();
    handle.set_target_pages(args.device.target_pages);
    let status = Arc::new(AtomicU8::new(0));
    if let Some(path) = &args.server.control {
        let dump_dir = args.server.checked_dump_dir()?;
        let c = control::Control::new(
            handle,
            balloon.hint_handle(),
            layout,
            Arc::clone(&status),
            dump_dir,
        );
        control::spawn(path, c, args.server.force)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    }
    info!(
        "freehint virtio-balloon over vhost-user: features {features:#x}, RAM layout {:x?}",
        configured.ranges
    );
    let backend = Arc::new(RwLock::new(BalloonBackend::new(balloon, status)));
    if args.server.force && args.server.socket.exists() {
        let _ = std::fs::remove_file(&args.server.socket);
    }
    let listener = freehint_host::sockets::bind_private(&args.server.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.server.socket.display()))?;
    let mut listener = Listener::from(listener);
    loop {
        let mut daemon = VhostUserDaemon::new(
            "freehint-balloon".into(),
            Arc::clone(&backend),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("cannot create the daemon: {e}"))?;
        info!(
            "waiting for the front end on {}",
            args.server.socket.display()
        );
        daemon
            .start(&mut listener)
            .map_err(|e| format!("cannot accept the front end: {e}"))?;
        match daemon.wait() {
            Ok(()) => info!("front end disconnected"),
            Err(e) => info!("front end gone: {e}"),
        }
        if !args.server.persist {
            break;
        }
    }
    let _ = std::fs::remove_file(&args.server.socket);
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
