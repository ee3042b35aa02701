//! Interrupt routing: virtio queue/config interrupts → MSI-X eventfds, or
//! the ISR byte + INTx eventfd when MSI-X is off (virtio 1.2 §4.1.4.5).
//!
//! The device model calls [`InterruptRouter`] through the
//! [`freehint_device::Interrupt`] trait, possibly from another thread; the
//! transport updates the routing (vectors, MSI-X enable, INTx disable) under
//! the same lock. The lock is never held while calling into the device.
//! The client's interrupt fds must be eventfds ([`prepare_eventfd`]) and are
//! written non-blocking, so signalling never blocks under that lock.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use log::{debug, warn};

use crate::msix::{Delivery, MsixTable};

/// `VIRTIO_MSI_NO_VECTOR`: no vector assigned.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR bit: a queue interrupt.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: a configuration change.
pub const ISR_CONFIG: u8 = 2;

#[derive(Debug)]
struct State {
    msix: MsixTable,
    msix_fds: Vec<Option<File>>,
    intx_fd: Option<File>,
    /// PCI command INTx-disable bit.
    intx_disabled: bool,
    /// vfio SET_IRQS mask of the INTx line.
    intx_masked: bool,
    isr: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    config_generation: u8,
    signals: u64,
}

/// Shared interrupt state of one virtio-pci function.
#[derive(Debug)]
pub struct InterruptRouter {
    state: Mutex<State>,
}

/// Why the client's interrupt fd was refused.
#[derive(Debug, thiserror::Error)]
pub enum IrqFdError {
    /// The fd is not an eventfd (a pipe, a file, a socket, ...).
    #[error("interrupt fd {fd} is not an eventfd ({found}): pass eventfds only")]
    NotEventfd {
        /// The fd number in this process.
        fd: RawFd,
        /// What it is instead, from `/proc/self/fd`.
        found: String,
    },
    /// Making the fd non-blocking failed.
    #[error("cannot make interrupt fd {fd} non-blocking: {source}")]
    NonBlocking {
        /// The fd number in this process.
        fd: RawFd,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Accepts `f` as an interrupt fd only if it is an eventfd
/// (`/proc/self/fdinfo` has `eventfd-count`), and makes it non-blocking so
/// that signalling it can never block the server (a client can fill an
/// eventfd's counter). The eventfd's open file is shared with the client:
/// QEMU creates its eventfds non-blocking already.
pub fn prepare_eventfd(f: &File) -> Result<(), IrqFdError> {
    let fd = f.as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    if !info.lines().any(|l| l.starts_with("eventfd-count:")) {
        let found = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("unknown: {e}"));
        return Err(IrqFdError::NotEventfd { fd, found });
    }
    // SAFETY: fcntl(F_GETFL) on an fd we own has no memory preconditions.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above; F_SETFL only changes the file status flags.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        let source = io::Error::last_os_error();
        return Err(IrqFdError::NonBlocking { fd, source });
    }
    Ok(())
}

fn kick(fd: &Option<File>, what: &str) {
    match fd {
        Some(f) => {
            let mut f: &File = f;
            match f.write(&1u64.to_ne_bytes()) {
                Ok(_) => {}
                // The counter is full: the eventfd is readable, so the
                // interrupt is pending anyway.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    debug!("{what} eventfd counter full: interrupt already pending")
                }
                Err(e) => warn!("cannot signal {what} eventfd: {e}"),
            }
        }
        None => debug!("{what}: no eventfd registered, interrupt dropped"),
    }
}

impl InterruptRouter {
    /// A router for `num_queues` queues and `msix_vectors` MSI-X vectors.
    pub fn new(num_queues: usize, msix_vectors: u16) -> Self {
        InterruptRouter {
            state: Mutex::new(State {
                msix: MsixTable::new(msix_vectors),
                msix_fds: (0..msix_vectors).map(|_| None).collect(),
                intx_fd: None,
                intx_disabled: false,
                intx_masked: false,
                isr: 0,
                config_vector: VIRTIO_MSI_NO_VECTOR,
                queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
                config_generation: 0,
                signals: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain-data state
        // inconsistent in a way worse than a lost interrupt: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vector_valid(s: &State, vector: u16) -> bool {
        vector == VIRTIO_MSI_NO_VECTOR || vector < s.msix.len()
    }

    /// Sets the config vector; an invalid vector is stored as NO_VECTOR (the
    /// driver reads it back to detect the failure, virtio 1.2 §4.1.5.1.2).
    pub fn set_config_vector(&self, vector: u16) {
        let mut s = self.lock();
        s.config_vector = if Self::vector_valid(&s, vector) {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        };
    }

    /// The config vector.
    pub fn config_vector(&self) -> u16 {
        self.lock().config_vector
    }

    /// Sets queue `index`'s vector (invalid → NO_VECTOR, unknown queue ignored).
    pub fn set_queue_vector(&self, index: usize, vector: u16) {
        let mut s = self.lock();
        let v = if Self::vector_valid(&s, vector) {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        };
        if let Some(q) = s.queue_vectors.get_mut(index) {
            *q = v;
        }
    }

    /// Queue `index`'s vector (NO_VECTOR for an unknown queue).
    pub fn queue_vector(&self, index: usize) -> u16 {
        self.lock()
            .queue_vectors
            .get(index)
            .copied()
            .unwrap_or(VIRTIO_MSI_NO_VECTOR)
    }

    /// Config generation counter (bumped on every config change signal).
    pub fn config_generation(&self) -> u8 {
        self.lock().config_generation
    }

    /// Reads and clears the ISR (deasserts INTx).
    pub fn read_isr(&self) -> u8 {
        let mut s = self.lock();
        std::mem::take(&mut s.isr)
    }

    /// Whether INTx is asserted (PCI status bit 3).
    pub fn intx_asserted(&self) -> bool {
        let s = self.lock();
        !s.msix.enabled() && s.isr != 0
    }

    /// Number of interrupts signalled so far (for logs and tests).
    pub fn signals(&self) -> u64 {
        self.lock().signals
    }

    /// Virtio reset: ISR, vectors back to NO_VECTOR.
    pub fn virtio_reset(&self) {
        let mut s = self.lock();
        s.isr = 0;
        s.config_vector = VIRTIO_MSI_NO_VECTOR;
        s.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
    }

    /// PCI-level reset (vfio-user DEVICE_RESET) on top of the virtio reset:
    /// MSI-X table and enable, INTx disable.
    pub fn pci_reset(&self) {
        self.virtio_reset();
        let mut s = self.lock();
        s.msix.reset();
        s.intx_disabled = false;
        s.intx_masked = false;
    }

    /// Drops every eventfd (client went away).
    pub fn drop_eventfds(&self) {
        let mut s = self.lock();
        s.msix_fds.iter_mut().for_each(|f| *f = None);
        s.intx_fd = None;
    }

    /// Applies the PCI command register's INTx-disable bit.
    pub fn set_intx_disabled(&self, disabled: bool) {
        let mut s = self.lock();
        let was = s.intx_disabled;
        s.intx_disabled = disabled;
        if was && !disabled {
            Self::resend_intx(&s);
        }
    }

    /// Applies MSI-X Message Control; fires vectors that were pending.
    pub fn set_msix_control(&self, enabled: bool, function_masked: bool) {
        let mut s = self.lock();
        for v in s.msix.set_control(enabled, function_masked) {
            kick(&s.msix_fds[usize::from(v)], "MSI-X");
        }
    }

    /// BAR1 read (MSI-X table/PBA).
    pub fn msix_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().msix.read(offset, data);
    }

    /// BAR1 write (MSI-X table); fires vectors that became unmasked.
    pub fn msix_write(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        for v in s.msix.write(offset, data) {
            kick(&s.msix_fds[usize::from(v)], "MSI-X");
        }
    }

    /// vfio SET_IRQS for MSI-X, TRIGGER action: `fds` are the eventfds for
    /// vectors `start..start + count`, or empty to deassign them. Returns
    /// false for a request that does not fit the table.
    pub fn set_msix_eventfds(&self, start: u32, count: u32, fds: Vec<File>) -> bool {
        let mut s = self.lock();
        let len = u32::from(s.msix.len());
        let Some(end) = start.checked_add(count) else {
            return false;
        };
        if end > len || !(fds.is_empty() || fds.len() == count as usize) {
            return false;
        }
        let mut fds = fds.into_iter();
        for v in start..end {
            s.msix_fds[v as usize] = fds.next();
            // An interrupt raised while the vector had no eventfd is sent now.
            if s.msix_fds[v as usize].is_some() && s.msix.take_pending(v as u16) {
                kick(&s.msix_fds[v as usize], "MSI-X");
            }
        }
        true
    }

    /// vfio SET_IRQS for INTx: assign (Some) or deassign (None) the eventfd.
    pub fn set_intx_eventfd(&self, fd: Option<File>) {
        self.lock().intx_fd = fd;
    }

    /// vfio SET_IRQS INTx mask/unmask. An unmask while the line is still
    /// asserted re-sends the interrupt (level semantics).
    pub fn set_intx_masked(&self, masked: bool) {
        let mut s = self.lock();
        s.intx_masked = masked;
        if !masked {
            Self::resend_intx(&s);
        }
    }

    fn resend_intx(s: &State) {
        if s.isr != 0 && !s.msix.enabled() && !s.intx_disabled && !s.intx_masked {
            kick(&s.intx_fd, "INTx");
        }
    }

    fn raise(&self, vector: u16, isr_bit: u8) {
        let mut s = self.lock();
        s.signals += 1;
        if s.msix.enabled() {
            if vector == VIRTIO_MSI_NO_VECTOR {
                return;
            }
            match s.msix.deliver(vector) {
                Delivery::Fire if s.msix_fds[usize::from(vector)].is_none() => {
                    debug!("MSI-X vector {vector} has no eventfd yet: pending");
                    s.msix.set_pending(vector);
                }
                Delivery::Fire => kick(&s.msix_fds[usize::from(vector)], "MSI-X"),
                Delivery::Pending | Delivery::Dropped => {}
            }
        } else {
            s.isr |= isr_bit;
            if !s.intx_disabled && !s.intx_masked {
                kick(&s.intx_fd, "INTx");
            }
        }
    }
}

impl freehint_device::Interrupt for InterruptRouter {
    fn signal_queue(&self, index: u16) {
        let vector = self.queue_vector(usize::from(index));
        self.raise(vector, ISR_QUEUE);
    }

    fn signal_config(&self) {
        let vector = {
            let mut s = self.lock();
            s.config_generation = s.config_generation.wrapping_add(1);
            s.config_vector
        };
        self.raise(vector, ISR_CONFIG);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use freehint_device::Interrupt;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    /// A real eventfd (non-blocking) and a second handle to read it.
    pub(crate) fn eventfd() -> (File, File) {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd failed");
        // SAFETY: fd was just created and is owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        let g = f.try_clone().expect("dup eventfd");
        (f, g)
    }

    pub(crate) fn count(f: &mut File) -> u64 {
        let mut b = [0u8; 8];
        match f.read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    #[test]
    fn intx_sets_isr_and_read_clears() {
        let r = InterruptRouter::new(2, 3);
        let (fd, mut rd) = eventfd();
        r.set_intx_eventfd(Some(fd));
        r.signal_queue(1);
        assert_eq!(count(&mut rd), 1);
        assert!(r.intx_asserted());
        r.signal_config();
        assert_eq!(r.read_isr(), ISR_QUEUE | ISR_CONFIG);
        assert_eq!(r.read_isr(), 0);
        assert!(!r.intx_asserted());
        assert_eq!(r.config_generation(), 1);
    }

    #[test]
    fn intx_disable_and_unmask_resend() {
        let r = InterruptRouter::new(1, 2);
        let (fd, mut rd) = eventfd();
        r.set_intx_eventfd(Some(fd));
        r.set_intx_disabled(true);
        r.signal_queue(0);
        assert_eq!(count(&mut rd), 0);
        assert!(r.intx_asserted(), "status bit 3 still reflects the line");
        r.set_intx_disabled(false);
        assert_eq!(count(&mut rd), 1, "re-enabling resends a pending level");
        r.set_intx_masked(true);
        r.signal_queue(0);
        assert_eq!(count(&mut rd), 0);
        r.set_intx_masked(false);
        assert_eq!(count(&mut rd), 1);
        r.read_isr();
        r.set_intx_masked(false);
        assert_eq!(count(&mut rd), 0, "no resend once the ISR was read");
    }

    #[test]
    fn msix_routes_per_vector() {
        let r = InterruptRouter::new(2, 3);
        let (f0, mut r0) = eventfd();
        let (f1, mut r1) = eventfd();
        let (f2, mut r2) = eventfd();
        assert!(r.set_msix_eventfds(0, 3, vec![f0, f1, f2]));
        r.set_msix_control(true, false);
        r.set_config_vector(0);
        r.set_queue_vector(0, 1);
        r.set_queue_vector(1, 2);
        r.signal_queue(1);
        r.signal_config();
        assert_eq!((count(&mut r0), count(&mut r1), count(&mut r2)), (1, 0, 1));
        assert_eq!(r.read_isr(), 0, "MSI-X does not use the ISR");
        // NO_VECTOR: nothing fires.
        r.set_queue_vector(0, VIRTIO_MSI_NO_VECTOR);
        r.signal_queue(0);
        assert_eq!(count(&mut r1), 0);
        // Invalid vectors read back as NO_VECTOR.
        r.set_queue_vector(1, 3);
        assert_eq!(r.queue_vector(1), VIRTIO_MSI_NO_VECTOR);
        r.set_config_vector(77);
        assert_eq!(r.config_vector(), VIRTIO_MSI_NO_VECTOR);
        // Function mask holds, unmask delivers.
        r.set_queue_vector(0, 1);
        r.set_msix_control(true, true);
        r.signal_queue(0);
        assert_eq!(count(&mut r1), 0);
        r.set_msix_control(true, false);
        assert_eq!(count(&mut r1), 1);
    }

    #[test]
    fn interrupt_before_eventfd_is_delivered_when_it_arrives() {
        let r = InterruptRouter::new(1, 2);
        r.set_msix_control(true, false);
        r.set_queue_vector(0, 1);
        r.signal_queue(0);
        let mut pba = [0u8; 8];
        r.msix_read(crate::pci::MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(pba[0], 0b10, "pending in the PBA QEMU reads");
        let (f, mut rd) = eventfd();
        assert!(r.set_msix_eventfds(1, 1, vec![f]));
        assert_eq!(count(&mut rd), 1);
        r.msix_read(crate::pci::MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn set_irqs_validation() {
        let r = InterruptRouter::new(1, 2);
        let (f0, _) = eventfd();
        assert!(!r.set_msix_eventfds(1, 2, vec![]));
        assert!(!r.set_msix_eventfds(u32::MAX, 2, vec![]));
        assert!(!r.set_msix_eventfds(0, 2, vec![f0]));
        // QEMU's placeholder: a run of "-1" fds arrives with no fd at all.
        assert!(r.set_msix_eventfds(0, 2, vec![]));
    }
}
