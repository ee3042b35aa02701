//! The contract between a virtio transport (virtio-pci over vfio-user, a VMM's
//! own virtio-mmio, a test driver model) and a device model.
//!
//! The transport owns feature-select windows, queue registers, notify and ISR;
//! the device owns features, config space and queue processing. Everything is
//! synchronous: the transport calls [`VirtioDevice::queue_notify`] when the
//! driver kicks a queue, from whichever thread serves the transport.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the device sees it: swappable as the VMM maps and unmaps
/// regions (vfio-user DMA_MAP/DMA_UNMAP).
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// Interrupts a device raises; the transport maps them to MSI-X vectors or INTx.
pub trait Interrupt: Send + Sync {
    /// Signal that the used ring of queue `index` was updated.
    fn signal_queue(&self, index: u16);
    /// Signal a configuration change (sets ISR bit 1 on INTx).
    fn signal_config(&self);
}

/// A virtio device model, independent of transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (5 for the balloon).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn device_features(&self) -> u64;
    /// The driver's accepted features; called once before activation, with a
    /// subset of [`Self::device_features`]. Unknown bits are dropped.
    fn ack_features(&mut self, features: u64);
    /// Number of queues for the offered features (compacted numbering), and
    /// thus the number the transport exposes.
    fn num_queues(&self) -> usize;
    /// Largest size the driver may set for any queue.
    fn queue_max_size(&self) -> u16;
    /// Reads device config space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; read-only or out-of-range bytes are ignored
    /// (and logged).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called at DRIVER_OK with the queues the driver enabled, index by index
    /// (a disabled queue is passed as not ready).
    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), crate::Error>;
    /// The driver notified queue `index`; process what it made available.
    /// Malformed guest input is logged and counted, never returned as a
    /// fatal error unless the device can no longer operate (then the
    /// transport sets DEVICE_NEEDS_RESET).
    fn queue_notify(&mut self, index: u16) -> Result<(), crate::Error>;
    /// Like [`Self::queue_notify`], but processes at most `budget` buffers
    /// and returns `Ok(true)` when the queue may hold more. The transport
    /// then comes back later (a device may process available buffers
    /// lazily), so a driver that keeps re-posting buffers cannot hold the
    /// transport's only thread. The default processes everything.
    fn queue_notify_budget(&mut self, index: u16, budget: usize) -> Result<bool, crate::Error> {
        let _ = budget;
        self.queue_notify(index).map(|()| false)
    }
    /// Device reset (status written to 0): drop queues and negotiated state.
    fn reset(&mut self);
}
