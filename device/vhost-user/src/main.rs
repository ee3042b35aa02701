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

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, RwLock};

use clap::Parser;
use freehint_device::Balloon;
use freehint_host::{control, DeviceOptions};
use freehint_vhost_user::BalloonBackend;
use log::{error, info};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Serve the freehint virtio-balloon over vhost-user.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// UNIX socket to listen on (QEMU: `-chardev socket,path=PATH`).
    #[arg(long)]
    socket: PathBuf,
    /// Replace an existing file at the socket path (a stale socket).
    #[arg(long)]
    force: bool,
    /// Keep serving after the front end disconnects (the device keeps its
    /// state; the next front end finds the balloon as it was left) instead
    /// of exiting.
    #[arg(long)]
    persist: bool,
    /// Line-based control socket (target, stats, hint rounds, the hint
    /// port; see docs/vhost-user.md).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Directory the control command `hint-dump NAME` writes into.
    #[arg(long, requires = "control")]
    dump_dir: Option<PathBuf>,
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
    if let Some(path) = &args.control {
        let dump_dir = match &args.dump_dir {
            Some(d) => Some(
                d.canonicalize()
                    .map_err(|e| format!("--dump-dir {}: {e}", d.display()))?,
            ),
            None => None,
        };
        let c = control::Control::new(
            handle,
            balloon.hint_handle(),
            layout,
            Arc::clone(&status),
            dump_dir,
        );
        control::spawn(path, c, args.force)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    }
    info!(
        "freehint virtio-balloon over vhost-user: features {features:#x}, RAM layout {:x?}",
        configured.ranges
    );
    let backend = Arc::new(RwLock::new(BalloonBackend::new(balloon, status)));
    if args.force && args.socket.exists() {
        let _ = std::fs::remove_file(&args.socket);
    }
    let listener = freehint_host::sockets::bind_private(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    let mut listener = Listener::from(listener);
    loop {
        let mut daemon = VhostUserDaemon::new(
            "freehint-balloon".into(),
            Arc::clone(&backend),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("cannot create the daemon: {e}"))?;
        info!("waiting for the front end on {}", args.socket.display());
        daemon
            .start(&mut listener)
            .map_err(|e| format!("cannot accept the front end: {e}"))?;
        match daemon.wait() {
            Ok(()) => info!("front end disconnected"),
            Err(e) => info!("front end gone: {e}"),
        }
        if !args.persist {
            break;
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    freehint_host::signals::remove_on_signal(
        [Some(args.socket.clone()), args.control.clone()]
            .into_iter()
            .flatten()
            .collect(),
    );
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
