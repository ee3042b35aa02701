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
use freehint_host::{server, CommandLine, ServerOptions, Transport};
use freehint_vhost_user::BalloonBackend;
use log::info;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Serve the freehint virtio-balloon over vhost-user.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    command_line: CommandLine,
}

/// The balloon behind a vhost-user daemon, one per front-end connection.
struct VhostUser {
    backend: Arc<RwLock<BalloonBackend>>,
    status: Arc<AtomicU8>,
}

impl Transport for VhostUser {
    const NAME: &'static str = "vhost-user";

    fn new(balloon: Balloon, _ranges: Vec<(u64, u64)>) -> Self {
        let status = Arc::new(AtomicU8::new(0));
        let backend = BalloonBackend::new(balloon, Arc::clone(&status));
        VhostUser {
            backend: Arc::new(RwLock::new(backend)),
            status,
        }
    }

    fn status(&self) -> Arc<AtomicU8> {
        Arc::clone(&self.status)
    }

    fn serve(self, options: &ServerOptions) -> Result<(), String> {
        if options.force && options.socket.exists() {
            let _ = std::fs::remove_file(&options.socket);
        }
        let listener = freehint_host::sockets::bind_private(&options.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", options.socket.display()))?;
        let mut listener = Listener::from(listener);
        loop {
            let mut daemon = VhostUserDaemon::new(
                "freehint-balloon".into(),
                Arc::clone(&self.backend),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .map_err(|e| format!("cannot create the daemon: {e}"))?;
            info!("waiting for the front end on {}", options.socket.display());
            daemon
                .start(&mut listener)
                .map_err(|e| format!("cannot accept the front end: {e}"))?;
            match daemon.wait() {
                Ok(()) => info!("front end disconnected"),
                Err(e) => info!("front end gone: {e}"),
            }
            if !options.persist {
                break;
            }
        }
        let _ = std::fs::remove_file(&options.socket);
        Ok(())
    }
}

fn main() -> ExitCode {
    server::run::<VhostUser>(&Args::parse().command_line)
}
