//! freehint-host: what every process that serves the freehint
//! virtio-balloon to a VMM shares, whatever the transport (vfio-user,
//! vhost-user):
//! - [`options`]: the command-line options (sockets; the device's RAM
//!   layout and features, and the
//!   [`BalloonConfig`](freehint_device::BalloonConfig) they make);
//! - [`control`]: the line-based control socket (target, stats, hint
//!   rounds for tests, and the hint port a migrator in another process
//!   uses: epochs, rounds, the free set and the device's own writes);
//! - [`sockets`]: UNIX sockets only their owner can connect to;
//! - [`signals`]: socket files removed when the server is killed;
//! - [`server`]: the start-up, control socket and exit every server
//!   binary shares around its [`Transport`].
#![warn(missing_docs)]

pub mod control;
pub mod options;
pub mod server;
pub mod signals;
pub mod sockets;

pub use control::Control;
pub use options::{CommandLine, DeviceOptions, ServerOptions};
pub use server::Transport;
