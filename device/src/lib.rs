//! freehint-device: a VMM-agnostic virtio-balloon device model with free page
//! hinting (standard virtio protocol and the freehint bitmap extension).
#![warn(missing_docs)]

pub mod virtio_device;

pub use virtio_device::{GuestMemoryHandle, Interrupt, VirtioDevice};

/// Device errors (placeholder; the device model owner replaces this).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Activation failed.
    #[error("activation failed: {0}")]
    Activate(String),
}
