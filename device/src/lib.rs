//! freehint-device: a VMM-agnostic virtio-balloon device model with free page
//! hinting (standard virtio protocol and the freehint bitmap extension).
//!
//! See `docs/architecture.md` for how a VMM wires it in, and
//! [`balloon::hints`] for the API a migrator calls.
#![warn(missing_docs)]

pub mod balloon;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod virtio_device;

pub use balloon::{
    Balloon, BalloonConfig, BalloonError, BalloonHandle, EpochToken, HintHandle, HintSet,
};
pub use virtio_device::{GuestMemoryHandle, Interrupt, VirtioDevice};

/// Errors a device returns to its transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Activation failed.
    #[error("activation failed: {0}")]
    Activate(String),
    /// The balloon device failed.
    #[error(transparent)]
    Balloon(#[from] BalloonError),
}
