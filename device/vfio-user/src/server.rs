//! The vfio-user [`ServerBackend`]: one modern virtio-pci function around a
//! [`VirtioDevice`], plus the accept/serve loop.
//!
//! vfio regions: 0 = BAR0 (virtio structures), 1 = BAR1 (MSI-X table and
//! PBA), 7 = PCI config space; the others have size 0. IRQ indices: INTx
//! (1, maskable), MSI-X ([`VfioUserDevice::msix_vectors`]), MSI/ERR/REQ (0).
//!
//! The serve loop is the only thread that reads client messages. A second
//! thread ([`serve`] starts it) processes the queue buffers a notify left
//! over once it used its budget, one budget per turn, and lets the loop in
//! between turns. A panic inside the upstream `vfio_user` crate (it trusts
//! its client: a malformed VERSION message panics it) ends that client's
//! session only.
//!
//! **Migration:** QEMU migrates no state for a vfio-user device and tells
//! the server nothing; on a migration destination this device is dead.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use freehint_device::VirtioDevice;
use log::{debug, error, info, warn};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

use crate::interrupt::{prepare_eventfd, InterruptRouter};
use crate::memory::DmaMemory;
use crate::pci::{
    PciConfigSpace, PciIdentity, BAR0_SIZE, BAR1_SIZE, CAP_MSIX_CONTROL, CAP_PCI_CFG_DATA,
    CONFIG_SPACE_SIZE, MSIX_BAR, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE, VIRTIO_BAR,
};
use crate::virtio_pci::{PendingWork, VirtioPciTransport};

/// The warning printed at start-up and in docs/vfio-user.md.
pub const MIGRATION_WARNING: &str = "QEMU migrates NO state for a vfio-user device: \
     after a live migration the device is dead on the destination. Do not migrate a VM \
     with this device attached (the freehint tooling refuses to).";

/// Errors of the serve loop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path exists already.
    #[error("socket {0} exists: another server runs there, or a stale socket (remove it or pass --force)")]
    SocketExists(String),
    /// The socket cannot be created.
    #[error("cannot create socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// vfio-user library error (accept).
    #[error("vfio-user: {0}")]
    VfioUser(#[from] vfio_user::Error),
}

fn invalid(msg: String) -> io::Error {
    warn!("{msg}");
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Counters a test or log can look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Region accesses refused (bad region, offset or length).
    pub bad_accesses: u64,
    /// DMA requests refused.
    pub bad_dma: u64,
    /// SET_IRQS requests refused because an fd was not an eventfd.
    pub bad_irq_fds: u64,
    /// Client sessions that ended in a panic of the vfio-user library.
    pub panicked_sessions: u64,
    /// Clients served so far.
    pub clients: u64,
}

/// A virtio device presented as a vfio-user PCI function.
#[derive(Debug)]
pub struct VfioUserDevice {
    config: PciConfigSpace,
    transport: VirtioPciTransport,
    irq: Arc<InterruptRouter>,
    memory: DmaMemory,
    msix_vectors: u16,
    stats: ServerStats,
    expected_ram: Option<Vec<(u64, u64)>>,
}

impl VfioUserDevice {
    /// Wraps `device` with one MSI-X vector per queue plus one for config.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let num_queues = device.num_queues();
        let msix_vectors = u16::try_from(num_queues + 1)
            .unwrap_or(u16::MAX)
            .clamp(1, crate::pci::MSIX_MAX_VECTORS);
        let config = PciConfigSpace::new(PciIdentity {
            virtio_device_type: u16::try_from(device.device_type()).unwrap_or(0),
            msix_vectors,
        });
        let irq = Arc::new(InterruptRouter::new(num_queues, msix_vectors));
        let memory = DmaMemory::new();
        let transport = VirtioPciTransport::new(device, irq.clone(), memory.handle());
        VfioUserDevice {
            config,
            transport,
            irq,
            memory,
            msix_vectors,
            stats: ServerStats::default(),
            expected_ram: None,
        }
    }

    /// The RAM layout the device was configured with (`--ram-size` or
    /// `--ram-layout`), checked against the client's fd-backed DMA maps at
    /// DRIVER_OK: a mismatch means hints would describe the wrong pages.
    pub fn set_expected_ram(&mut self, ranges: Vec<(u64, u64)>) {
        self.expected_ram = Some(ranges);
    }

    /// Compares the mapped guest RAM with the configured layout. Returns a
    /// description of the mismatch, if any. Holes of less than 1 MiB
    /// (the legacy VGA/ROM window below 1 MiB) are tolerated.
    pub fn check_ram_layout(&self) -> Option<String> {
        let expected = self.expected_ram.as_ref()?;
        let mapped = self.memory.ranges();
        let inside = |a: u64, l: u64| {
            expected
                .iter()
                .any(|&(s, n)| a >= s && a.saturating_add(l) <= s.saturating_add(n))
        };
        if let Some(&(a, l)) = mapped.iter().find(|&&(a, l)| !inside(a, l)) {
            return Some(format!(
                "guest RAM {a:#x}+{l:#x} mapped by the client lies outside the configured \
                 layout {expected:x?}: pass the VM's real --ram-size/--machine or --ram-layout"
            ));
        }
        let want: u64 = expected.iter().map(|&(_, n)| n).sum();
        let have: u64 = mapped.iter().map(|&(_, n)| n).sum();
        (want.saturating_sub(have) >= 1 << 20).then(|| {
            format!(
                "the configured layout {expected:x?} has {want:#x} bytes of RAM but the client \
                 mapped only {have:#x} ({mapped:x?}): pass the VM's real --ram-size/--machine \
                 or --ram-layout"
            )
        })
    }

    /// The virtio device status, readable from any thread.
    pub fn status_handle(&self) -> Arc<std::sync::atomic::AtomicU8> {
        self.transport.status_handle()
    }

    /// Number of MSI-X vectors.
    pub fn msix_vectors(&self) -> u16 {
        self.msix_vectors
    }

    /// The virtio transport (status, negotiated features, counters).
    pub fn transport(&self) -> &VirtioPciTransport {
        &self.transport
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Processes one more budget of the queue buffers that notifies left
    /// over; returns whether some remain. [`serve`] calls it on its work
    /// thread; an embedder with its own loop calls it between messages.
    pub fn run_pending_work(&mut self) -> bool {
        self.transport.run_pending_work()
    }

    /// Mapped guest memory ranges (address, size).
    pub fn dma_ranges(&self) -> Vec<(u64, u64)> {
        self.memory.ranges()
    }

    /// Region table for [`Server::new`].
    pub fn regions(&self) -> Vec<ServerRegion> {
        (0..VFIO_PCI_NUM_REGIONS)
            .map(|index| {
                let size = match index {
                    i if i == u32::from(VIRTIO_BAR) => BAR0_SIZE,
                    i if i == u32::from(MSIX_BAR) => BAR1_SIZE,
                    VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SPACE_SIZE as u64,
                    _ => 0,
                };
                let flags = if size > 0 {
                    VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                } else {
                    0
                };
                ServerRegion {
                    region_info: vfio_region_info {
                        argsz: std::mem::size_of::<vfio_region_info>() as u32,
                        flags,
                        index,
                        cap_offset: 0,
                        size,
                        offset: 0,
                    },
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                }
            })
            .collect()
    }

    /// IRQ table for [`Server::new`].
    pub fn irqs(&self) -> Vec<IrqInfo> {
        (0..VFIO_PCI_NUM_IRQS)
            .map(|index| {
                let (count, flags) = match index {
                    VFIO_PCI_INTX_IRQ_INDEX => (1, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE),
                    VFIO_PCI_MSIX_IRQ_INDEX => (
                        u32::from(self.msix_vectors),
                        VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                    ),
                    _ => (0, 0),
                };
                IrqInfo {
                    index,
                    flags,
                    count,
                }
            })
            .collect()
    }

    fn region_size(region: u32) -> u64 {
        match region {
            r if r == u32::from(VIRTIO_BAR) => BAR0_SIZE,
            r if r == u32::from(MSIX_BAR) => BAR1_SIZE,
            VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SPACE_SIZE as u64,
            _ => 0,
        }
    }

    fn check_access(&mut self, region: u32, offset: u64, len: usize) -> io::Result<()> {
        let size = Self::region_size(region);
        let ok = len <= 8 || region == VFIO_PCI_CONFIG_REGION_INDEX;
        let end = offset.checked_add(len as u64);
        if !ok || size == 0 || end.is_none_or(|e| e > size) {
            self.stats.bad_accesses += 1;
            return Err(invalid(format!(
                "bad region access: region {region} offset {offset:#x} len {len} (region size {size:#x})"
            )));
        }
        Ok(())
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            VIRTIO_BAR => self.transport.read(offset, data),
            MSIX_BAR => self.irq.msix_read(offset, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            VIRTIO_BAR => self.transport.write(offset, data),
            MSIX_BAR => self.irq.msix_write(offset, data),
            _ => debug!("write to unimplemented BAR {bar} ignored"),
        }
    }

    /// The `VIRTIO_PCI_CAP_PCI_CFG` window: (bar, offset, length) if usable.
    fn pci_cfg_window(&self) -> Option<(u8, u64, usize)> {
        let (bar, off, len) = self.config.pci_cfg_window();
        let size = Self::region_size(u32::from(bar));
        let len_ok = matches!(len, 1 | 2 | 4);
        (bar <= MSIX_BAR && len_ok && u64::from(off) + u64::from(len) <= size).then_some((
            bar,
            u64::from(off),
            len as usize,
        ))
    }

    fn overlaps(offset: u64, len: usize, start: usize, size: usize) -> bool {
        offset < (start + size) as u64 && offset + len as u64 > start as u64
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.config
            .read(offset as usize, data, self.irq.intx_asserted());
        if Self::overlaps(offset, data.len(), CAP_PCI_CFG_DATA, 4) {
            let mut window = [0u8; 4];
            match self.pci_cfg_window() {
                Some((bar, off, len)) => self.bar_read(bar, off, &mut window[..len]),
                // QEMU reads the whole config space at start-up.
                None => debug!("pci_cfg_data read with an invalid window"),
            }
            for (i, b) in data.iter_mut().enumerate() {
                let at = offset as usize + i;
                if (CAP_PCI_CFG_DATA..CAP_PCI_CFG_DATA + 4).contains(&at) {
                    *b = window[at - CAP_PCI_CFG_DATA];
                }
            }
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset as usize, data);
        if Self::overlaps(offset, data.len(), PCI_COMMAND, 2) {
            let cmd = self.config.command();
            self.irq
                .set_intx_disabled(cmd & PCI_COMMAND_INTX_DISABLE != 0);
        }
        if Self::overlaps(offset, data.len(), CAP_MSIX_CONTROL, 2) {
            let ctl = self.config.msix_control();
            let enabled = ctl & MSIX_CONTROL_ENABLE != 0;
            info!(
                "MSI-X {} (function mask {})",
                if enabled { "enabled" } else { "disabled" },
                ctl & MSIX_CONTROL_FUNCTION_MASK != 0
            );
            self.irq
                .set_msix_control(enabled, ctl & MSIX_CONTROL_FUNCTION_MASK != 0);
        }
        if Self::overlaps(offset, data.len(), CAP_PCI_CFG_DATA, 4) {
            match self.pci_cfg_window() {
                Some((bar, off, len)) => {
                    let mut window = [0u8; 4];
                    self.config.read(CAP_PCI_CFG_DATA, &mut window, false);
                    self.bar_write(bar, off, &window[..len]);
                }
                None => warn!("pci_cfg_data write with an invalid window ignored"),
            }
        }
    }

    /// PCI-level reset (vfio-user DEVICE_RESET): config space, MSI-X, virtio
    /// state. DMA mappings stay (they belong to the client, not the device).
    pub fn pci_reset(&mut self) {
        info!("device reset");
        self.transport.reset();
        self.irq.pci_reset();
        self.config.reset();
    }

    /// The client went away: reset everything and drop its eventfds and
    /// guest memory, ready for the next client.
    pub fn client_gone(&mut self) {
        self.pci_reset();
        self.irq.drop_eventfds();
        self.memory.unmap_all();
    }
}

impl ServerBackend for VfioUserDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.check_access(region, offset, data.len())?;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config_read(offset, data),
            r => self.bar_read(r as u8, offset, data),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_access(region, offset, data.len())?;
        let was_live = self.transport.status() & crate::virtio_pci::status::DRIVER_OK != 0;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config_write(offset, data),
            r => self.bar_write(r as u8, offset, data),
        }
        if !was_live && self.transport.status() & crate::virtio_pci::status::DRIVER_OK != 0 {
            info!(
                "guest RAM mapped by the client: {:x?}",
                self.memory.ranges()
            );
            if let Some(problem) = self.check_ram_layout() {
                error!("RAM layout mismatch: {problem}");
            }
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        let writable = flags.contains(DmaMapFlags::WRITE);
        self.memory
            .map(address, size, offset, writable, fd)
            .map_err(|e| {
                self.stats.bad_dma += 1;
                invalid(format!("DMA_MAP refused: {e}"))
            })
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        if flags.contains(DmaUnmapFlags::GET_DIRTY_PAGE_INFO) {
            self.stats.bad_dma += 1;
            return Err(invalid(
                "DMA_UNMAP with dirty page info: not supported".into(),
            ));
        }
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            self.memory.unmap_all();
            return Ok(());
        }
        self.memory.unmap(address, size).map_err(|e| {
            self.stats.bad_dma += 1;
            invalid(format!("DMA_UNMAP refused: {e}"))
        })
    }

    fn reset(&mut self) -> io::Result<()> {
        self.pci_reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let nfds = fds.len();
        if let Some(e) = fds.iter().find_map(|f| prepare_eventfd(f).err()) {
            self.stats.bad_irq_fds += 1;
            return Err(invalid(format!("SET_IRQS index {index} refused: {e}")));
        }
        let bad = |what: &str| {
            invalid(format!(
                "SET_IRQS {what}: index {index} flags {flags:#x} start {start} count {count} fds {nfds}"
            ))
        };
        match (index, action) {
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER) => {
                if start != 0 || count > 1 || fds.len() > 1 {
                    return Err(bad("INTx range"));
                }
                if data == VFIO_IRQ_SET_DATA_EVENTFD || count == 0 {
                    let fd = fds.into_iter().next();
                    info!(
                        "INTx eventfd {}",
                        if fd.is_some() { "set" } else { "cleared" }
                    );
                    self.irq.set_intx_eventfd(fd);
                }
                Ok(())
            }
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_MASK) => {
                self.irq.set_intx_masked(true);
                Ok(())
            }
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_UNMASK) => {
                self.irq.set_intx_masked(false);
                Ok(())
            }
            (VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER) => {
                if data == VFIO_IRQ_SET_DATA_NONE && count == 0 {
                    let all = u32::from(self.msix_vectors);
                    self.irq.set_msix_eventfds(0, all, Vec::new());
                    debug!("MSI-X eventfds cleared");
                    return Ok(());
                }
                if data != VFIO_IRQ_SET_DATA_EVENTFD {
                    return Err(bad("MSI-X trigger without eventfd data"));
                }
                let n = fds.len();
                if !self.irq.set_msix_eventfds(start, count, fds) {
                    return Err(bad("MSI-X range"));
                }
                debug!("MSI-X vectors {start}..{}: {n} eventfds", start + count);
                Ok(())
            }
            (VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK) => {
                // The client masks MSI-X vectors itself (QEMU re-routes the
                // eventfd); nothing to do here.
                Ok(())
            }
            (_, _) if count == 0 => Ok(()),
            _ => Err(bad("unsupported")),
        }
    }
}

/// The device shared by the serve loop and the work thread.
struct SharedDevice<'a> {
    device: Mutex<&'a mut VfioUserDevice>,
    /// Messages waiting for the lock: the work thread steps aside for them.
    waiting: AtomicUsize,
}

impl<'a> SharedDevice<'a> {
    fn lock(&self) -> MutexGuard<'_, &'a mut VfioUserDevice> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the device for one client message.
    fn message<T>(&self, f: impl FnOnce(&mut VfioUserDevice) -> T) -> T {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.lock();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        f(&mut guard)
    }

    /// The work thread: one budget of left-over queue work per turn, with
    /// the serve loop let in between turns.
    fn work(&self, pending: &PendingWork) {
        while pending.wait() {
            let more = self.lock().run_pending_work();
            // Hand the lock to a waiting message before the next turn.
            while more && self.waiting.load(Ordering::Acquire) > 0 {
                std::thread::yield_now();
            }
        }
    }
}

/// [`ServerBackend`] over the [`SharedDevice`]: one lock per message.
struct Locked<'s, 'a>(&'s SharedDevice<'a>);

impl ServerBackend for Locked<'_, '_> {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.0.message(|d| d.region_read(region, offset, data))
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.message(|d| d.region_write(region, offset, data))
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        self.0
            .message(|d| d.dma_map(flags, offset, address, size, fd))
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        self.0.message(|d| d.dma_unmap(flags, address, size))
    }

    fn reset(&mut self) -> io::Result<()> {
        self.0.message(ServerBackend::reset)
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        self.0
            .message(|d| d.set_irqs(index, flags, start, count, fds))
    }
}

/// Removes the socket file when serving ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Serves one client, then resets the device; an error means the server
/// must stop (accepting failed).
fn serve_client(server: &Server, shared: &SharedDevice<'_>) -> Result<(), ServerError> {
    let session = catch_unwind(AssertUnwindSafe(|| server.run(&mut Locked(shared))));
    let mut device = shared.lock();
    device.stats.clients += 1;
    match session {
        Ok(Ok(())) => info!("client disconnected"),
        Ok(Err(vfio_user::Error::SocketAccept(e))) => {
            return Err(vfio_user::Error::SocketAccept(e).into())
        }
        Ok(Err(e)) => error!("client connection ended with an error: {e}"),
        Err(p) => {
            device.stats.panicked_sessions += 1;
            error!(
                "the vfio-user library panicked on a malformed client message ({}); \
                 dropping that client",
                panic_text(p.as_ref())
            );
        }
    }
    info!(
        "resetting device after disconnect (final status {:#x}, stats {:?})",
        device.transport.status(),
        device.transport.stats()
    );
    device.client_gone();
    Ok(())
}

/// Serves clients on `socket` (created with mode 0600) until the first one
/// leaves (or forever with `persist`). Each disconnect resets the device and
/// drops the client's memory and eventfds.
pub fn serve(
    socket: &Path,
    device: &mut VfioUserDevice,
    persist: bool,
    force: bool,
) -> Result<(), ServerError> {
    if socket.exists() {
        if !force {
            return Err(ServerError::SocketExists(socket.display().to_string()));
        }
        warn!("removing existing socket {}", socket.display());
        let _ = std::fs::remove_file(socket);
    }
    let listener =
        freehint_host::sockets::bind_private(socket).map_err(|source| ServerError::Bind {
            path: socket.display().to_string(),
            source,
        })?;
    let _file = SocketFile(socket.to_path_buf());
    let server = Server::from_owned_fd(
        OwnedFd::from(listener),
        true,
        device.irqs(),
        device.regions(),
    );
    info!("listening on {}", socket.display());
    let pending = device.transport.pending_work();
    pending.restart();
    let shared = SharedDevice {
        device: Mutex::new(device),
        waiting: AtomicUsize::new(0),
    };
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("queue-work".into())
            .spawn_scoped(scope, || shared.work(&pending));
        if let Err(e) = &worker {
            warn!("cannot start the queue work thread ({e}): left-over buffers wait for the next notify");
        }
        let result = loop {
            if let Err(e) = serve_client(&server, &shared) {
                break Err(e);
            }
            if !persist {
                break Ok(());
            }
            info!("waiting for the next client on {}", socket.display());
        };
        pending.stop();
        // Joined here, not by the end of the scope: the scope waits only for
        // the thread's closure, so the thread could still be exiting when
        // serve returns.
        if let Ok(worker) = worker {
            let _ = worker.join();
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::tests::{count, eventfd};
    use crate::pci::{
        CAP_PCI_CFG, ISR_CFG_OFFSET, MSIX_PBA_OFFSET, NOTIFY_CFG_OFFSET, PCI_STATUS,
        PCI_STATUS_INTERRUPT,
    };
    use crate::virtio_pci::common;
    use crate::virtio_pci::tests::StubDevice;
    use std::os::fd::FromRawFd;

    const CFG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

    fn dev() -> VfioUserDevice {
        VfioUserDevice::new(Box::new(StubDevice {
            seen: Default::default(),
            fail_notify: false,
            irq: None,
        }))
    }

    fn cfg_read(d: &mut VfioUserDevice, off: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        d.region_read(CFG, off, &mut b).unwrap();
        let mut w = [0u8; 8];
        w[..len].copy_from_slice(&b);
        u64::from_le_bytes(w)
    }

    fn bar0_write(d: &mut VfioUserDevice, off: u64, len: usize, v: u64) {
        d.region_write(0, off, &v.to_le_bytes()[..len]).unwrap();
    }

    #[test]
    fn region_and_irq_tables() {
        let d = dev();
        let regions = d.regions();
        assert_eq!(regions.len(), VFIO_PCI_NUM_REGIONS as usize);
        assert_eq!(regions[0].region_info.size, BAR0_SIZE);
        assert_eq!(regions[1].region_info.size, BAR1_SIZE);
        assert_eq!(regions[7].region_info.size, 256);
        assert_eq!(regions[2].region_info.size, 0);
        let irqs = d.irqs();
        assert_eq!(irqs[0].count, 1);
        assert_eq!(irqs[2].count, 4, "3 queues + config");
        assert_eq!(irqs[1].count, 0);
    }

    #[test]
    fn bad_region_accesses_are_refused_without_panic() {
        let mut d = dev();
        let mut b = [0u8; 4];
        assert!(d.region_read(9, 0, &mut b).is_err());
        assert!(d.region_read(2, 0, &mut b).is_err());
        assert!(d.region_read(0, BAR0_SIZE - 2, &mut b).is_err());
        assert!(d.region_read(0, u64::MAX - 1, &mut b).is_err());
        assert!(d.region_write(CFG, 254, &b).is_err());
        let mut big = vec![0u8; 64];
        assert!(d.region_read(0, 0, &mut big).is_err());
        assert_eq!(d.stats().bad_accesses, 6);
        // Whole config space in one read is fine (QEMU does this).
        let mut all = vec![0u8; 256];
        d.region_read(CFG, 0, &mut all).unwrap();
        assert_eq!(&all[0..4], &[0xf4, 0x1a, 0x45, 0x10]);
    }

    #[test]
    fn intx_path_end_to_end_with_status_bit() {
        let mut d = dev();
        let (fd, mut rd) = eventfd();
        d.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            1,
            vec![fd],
        )
        .unwrap();
        // Linux: reset, ack, driver, features, FEATURES_OK, enable queue 0, DRIVER_OK.
        use common::*;
        bar0_write(&mut d, DEVICE_STATUS, 1, 0);
        bar0_write(&mut d, DEVICE_STATUS, 1, 3);
        bar0_write(&mut d, DRIVER_FEATURE_SELECT, 4, 1);
        bar0_write(&mut d, DRIVER_FEATURE, 4, 1);
        bar0_write(&mut d, DEVICE_STATUS, 1, 0xb);
        bar0_write(&mut d, QUEUE_ENABLE, 2, 1);
        bar0_write(&mut d, DEVICE_STATUS, 1, 0xf);
        bar0_write(&mut d, NOTIFY_CFG_OFFSET, 2, 0);
        assert_eq!(count(&mut rd), 1);
        assert_ne!(
            cfg_read(&mut d, PCI_STATUS as u64, 2) as u16 & PCI_STATUS_INTERRUPT,
            0
        );
        let mut isr = [0u8; 1];
        d.region_read(0, ISR_CFG_OFFSET, &mut isr).unwrap();
        assert_eq!(isr[0], 1);
        assert_eq!(
            cfg_read(&mut d, PCI_STATUS as u64, 2) as u16 & PCI_STATUS_INTERRUPT,
            0
        );
        // INTx disable in the command register stops delivery.
        d.region_write(
            CFG,
            PCI_COMMAND as u64,
            &PCI_COMMAND_INTX_DISABLE.to_le_bytes(),
        )
        .unwrap();
        bar0_write(&mut d, NOTIFY_CFG_OFFSET, 2, 0);
        assert_eq!(count(&mut rd), 0);
    }

    #[test]
    fn msix_enable_via_config_and_qemu_placeholder() {
        let mut d = dev();
        // QEMU's first SET_IRQS: one vector, no fd.
        d.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            1,
            vec![],
        )
        .unwrap();
        let (f1, mut r1) = eventfd();
        d.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            1,
            1,
            vec![f1],
        )
        .unwrap();
        assert!(d
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
                3,
                2,
                vec![],
            )
            .is_err());
        d.region_write(
            CFG,
            CAP_MSIX_CONTROL as u64,
            &MSIX_CONTROL_ENABLE.to_le_bytes(),
        )
        .unwrap();
        use common::*;
        bar0_write(&mut d, CONFIG_MSIX_VECTOR, 2, 1);
        freehint_device::Interrupt::signal_config(d.irq.as_ref());
        assert_eq!(count(&mut r1), 1);
        // PBA readable through BAR1.
        let mut pba = [0u8; 8];
        d.region_read(1, MSIX_PBA_OFFSET, &mut pba).unwrap();
        assert_eq!(pba, [0; 8]);
    }

    #[test]
    fn pci_cfg_access_window_reaches_bar0() {
        let mut d = dev();
        // bar 0, offset NUM_QUEUES, length 2.
        d.region_write(CFG, CAP_PCI_CFG as u64 + 4, &[0]).unwrap();
        d.region_write(
            CFG,
            CAP_PCI_CFG as u64 + 8,
            &(common::NUM_QUEUES as u32).to_le_bytes(),
        )
        .unwrap();
        d.region_write(CFG, CAP_PCI_CFG as u64 + 12, &2u32.to_le_bytes())
            .unwrap();
        assert_eq!(cfg_read(&mut d, CAP_PCI_CFG_DATA as u64, 4), 3);
        // Write device_status = ACKNOWLEDGE through the window.
        d.region_write(
            CFG,
            CAP_PCI_CFG as u64 + 8,
            &(common::DEVICE_STATUS as u32).to_le_bytes(),
        )
        .unwrap();
        d.region_write(CFG, CAP_PCI_CFG as u64 + 12, &1u32.to_le_bytes())
            .unwrap();
        d.region_write(CFG, CAP_PCI_CFG_DATA as u64, &[1, 0, 0, 0])
            .unwrap();
        assert_eq!(d.transport().status(), 1);
        // Invalid window (length 3): ignored.
        d.region_write(CFG, CAP_PCI_CFG as u64 + 12, &3u32.to_le_bytes())
            .unwrap();
        d.region_write(CFG, CAP_PCI_CFG_DATA as u64, &[0, 0, 0, 0])
            .unwrap();
        assert_eq!(d.transport().status(), 1);
    }

    #[test]
    fn dma_errors_and_reset_keep_serving() {
        let mut d = dev();
        assert!(d
            .dma_map(DmaMapFlags::READ_WRITE, 0, 0x1000, 0, None)
            .is_ok());
        // SAFETY: memfd_create with a valid C string; the fd is owned here.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), 0) };
        // SAFETY: fresh fd.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(0x2000).unwrap();
        assert!(d
            .dma_map(DmaMapFlags::READ_WRITE, 0, 0, 0x4000, Some(f))
            .is_err());
        assert!(d
            .dma_unmap(DmaUnmapFlags::GET_DIRTY_PAGE_INFO, 0, 0x1000)
            .is_err());
        assert_eq!(d.stats().bad_dma, 2);
        d.reset().unwrap();
        d.client_gone();
        assert!(d.dma_ranges().is_empty());
        assert_eq!(cfg_read(&mut d, 0, 4), 0x1045_1af4);
    }

    #[test]
    fn ram_layout_check() {
        let mut d = dev();
        assert_eq!(d.check_ram_layout(), None, "nothing configured");
        d.set_expected_ram(vec![(0, 64 << 20)]);
        // SAFETY: memfd_create with a valid C string; the fd is owned here.
        let fd = unsafe { libc::memfd_create(c"l".as_ptr(), 0) };
        // SAFETY: fresh fd.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(64 << 20).unwrap();
        let map = |d: &mut VfioUserDevice, a: u64, l: u64| {
            d.dma_map(
                DmaMapFlags::READ_WRITE,
                a,
                a,
                l,
                Some(f.try_clone().unwrap()),
            )
            .unwrap()
        };
        // QEMU's pc layout: RAM below 0xa0000, then from 1 MiB.
        map(&mut d, 0, 0xa0000);
        assert!(d.check_ram_layout().is_some(), "most RAM missing");
        map(&mut d, 0x10_0000, (64 << 20) - 0x10_0000);
        assert_eq!(d.check_ram_layout(), None);
        d.set_expected_ram(vec![(0, 32 << 20)]);
        assert!(d.check_ram_layout().unwrap().contains("outside"));
    }

    /// A hostile driver against the real Balloon: random register writes,
    /// status sequences, queue addresses into (random) guest memory and
    /// notifies. The server must never panic and must come back clean after
    /// a reset.
    #[test]
    fn hostile_driver_against_the_real_balloon() {
        use freehint_device::balloon::Layout;
        use freehint_device::{Balloon, BalloonConfig};
        use rand::rngs::SmallRng;
        use rand::{Rng, RngExt, SeedableRng};
        use std::io::Write;

        const MEM: u64 = 1 << 20;
        const RING_STRIDE: u64 = 0x10000;
        let layout = Layout::from_ram_byte_ranges(&[(0, MEM)]).unwrap();
        let balloon = Balloon::new(BalloonConfig::all_features(layout)).unwrap();
        let handle = balloon.handle();
        let hints = balloon.hint_handle();
        let mut d = VfioUserDevice::new(Box::new(balloon));
        // SAFETY: memfd_create with a valid C string; the fd is owned here.
        let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let mut f = unsafe { File::from_raw_fd(fd) };
        let mut rng = SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let garbage: Vec<u8> = (0..MEM).map(|_| rng.next_u64() as u8).collect();
        f.write_all(&garbage).unwrap();
        d.dma_map(
            DmaMapFlags::READ_WRITE,
            0,
            0,
            MEM,
            Some(f.try_clone().unwrap()),
        )
        .unwrap();
        let (irq_fd, _keep) = eventfd();
        d.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            1,
            vec![irq_fd],
        )
        .unwrap();
        let regs = [
            common::DEVICE_FEATURE_SELECT,
            common::DRIVER_FEATURE_SELECT,
            common::DRIVER_FEATURE,
            common::CONFIG_MSIX_VECTOR,
            common::DEVICE_STATUS,
            common::QUEUE_SELECT,
            common::QUEUE_SIZE,
            common::QUEUE_MSIX_VECTOR,
            common::QUEUE_ENABLE,
            common::QUEUE_DESC,
            common::QUEUE_DRIVER,
            common::QUEUE_DEVICE,
        ];
        let mut driver_ok_seen = 0;
        for round in 0..20000u64 {
            // A plausible negotiation now and then, so queues go live.
            if round % 50 == 0 {
                for (reg, len, v) in [
                    (common::DEVICE_STATUS, 1, 0u64),
                    (common::DEVICE_STATUS, 1, 3),
                    (common::DRIVER_FEATURE_SELECT, 4, 0),
                    (common::DRIVER_FEATURE, 4, rng.next_u64() & 0x3e),
                    (common::DRIVER_FEATURE_SELECT, 4, 1),
                    (common::DRIVER_FEATURE, 4, 1),
                    (common::DEVICE_STATUS, 1, 0xb),
                ] {
                    bar0_write(&mut d, reg, len, v);
                }
                if rng.random_range(0..2) == 0 {
                    f.set_len(0).unwrap();
                    f.set_len(MEM).unwrap();
                }
                for q in 0..6u64 {
                    bar0_write(&mut d, common::QUEUE_SELECT, 2, q);
                    bar0_write(&mut d, common::QUEUE_SIZE, 2, 1 << rng.random_range(0..9));
                    let base = if rng.random_range(0..8) == 0 {
                        rng.random_range(0..MEM + 0x2000) & !0xf
                    } else {
                        q * RING_STRIDE
                    };
                    bar0_write(&mut d, common::QUEUE_DESC, 8, base);
                    bar0_write(&mut d, common::QUEUE_DRIVER, 8, base + 0x4000);
                    bar0_write(&mut d, common::QUEUE_DEVICE, 8, base + 0x8000);
                    bar0_write(&mut d, common::QUEUE_ENABLE, 2, 1);
                }
                bar0_write(&mut d, common::DEVICE_STATUS, 1, 0xf);
                if d.transport().status() & 4 != 0 {
                    driver_ok_seen += 1;
                }
            }
            match rng.random_range(0..10) {
                0..=3 => {
                    let q = rng.random_range(0..8);
                    let _ = d.region_write(0, NOTIFY_CFG_OFFSET + 4 * q, &[0, 0]);
                    if q == 0 {
                        d.run_pending_work();
                    }
                }
                4 => {
                    let reg = regs[rng.random_range(0..regs.len() as u64) as usize];
                    let len = [1usize, 2, 4, 8][rng.random_range(0..4) as usize];
                    let v = rng.next_u64().to_le_bytes();
                    let _ = d.region_write(0, reg, &v[..len]);
                }
                5 => {
                    // Scribble on the rings: a small avail index, an avail
                    // entry, or a random descriptor (addr, len, flags, next).
                    let base = rng.random_range(0..6) * RING_STRIDE;
                    let (at, v): (u64, Vec<u8>) = match rng.random_range(0..3) {
                        0 => (
                            base + 0x4002,
                            (rng.random_range(0..8) as u16).to_le_bytes().to_vec(),
                        ),
                        1 => (
                            base + 0x4004 + 2 * rng.random_range(0..8),
                            (rng.random_range(0..300) as u16).to_le_bytes().to_vec(),
                        ),
                        _ => {
                            let mut desc = Vec::with_capacity(16);
                            let addr = if rng.random_range(0..4) == 0 {
                                rng.next_u64()
                            } else {
                                rng.random_range(0..MEM)
                            };
                            desc.extend_from_slice(&addr.to_le_bytes());
                            desc.extend_from_slice(
                                &(rng.random_range(0..0x3000) as u32).to_le_bytes(),
                            );
                            desc.extend_from_slice(&(rng.random_range(0..8) as u16).to_le_bytes());
                            desc.extend_from_slice(
                                &(rng.random_range(0..300) as u16).to_le_bytes(),
                            );
                            (base + 16 * rng.random_range(0..256), desc)
                        }
                    };
                    let _ = std::os::unix::fs::FileExt::write_at(&f, &v, at);
                }
                6 => {
                    let off = rng.random_range(0..0x40);
                    let len = [1usize, 2, 4, 8][rng.random_range(0..4) as usize];
                    let v = rng.next_u64().to_le_bytes();
                    let _ = d.region_write(0, crate::pci::DEVICE_CFG_OFFSET + off, &v[..len]);
                }
                7 => {
                    let mut b = [0u8; 8];
                    let len = 1 + rng.random_range(0..8) as usize;
                    let _ = d.region_read(
                        rng.random_range(0..8) as u32,
                        rng.random_range(0..0x5000),
                        &mut b[..len],
                    );
                }
                8 => {
                    let v = rng.next_u64().to_le_bytes();
                    let len = 1 + rng.random_range(0..4) as usize;
                    let _ = d.region_write(CFG, rng.random_range(0..260), &v[..len]);
                }
                _ => {
                    handle.set_target_pages(rng.random_range(0..300) as u32);
                    if rng.random_range(0..4) == 0 {
                        let _ = hints.start_round(&hints.new_epoch());
                    }
                    let _ = handle.request_stats();
                }
            }
        }
        assert!(driver_ok_seen > 0, "the test never got a live device");
        // The garbage was seen and refused, at every layer.
        let t = d.transport().stats();
        assert!(
            t.ignored_writes > 0 && t.bad_notifies > 0 && t.out_of_range > 0,
            "{t:?}"
        );
        assert!(d.stats().bad_accesses > 0, "{:?}", d.stats());
        let m = handle.metrics().snapshot();
        let refused = m.bad_head_index
            + m.wrong_direction
            + m.unknown_queue
            + m.descriptor_out_of_memory
            + m.chain_too_long
            + m.bad_pfn_descriptor
            + m.pfn_out_of_range
            + m.hint_bad_cmd_buffer;
        assert!(refused > 0, "{m:?}");
        // Left-over work ends (each turn is bounded; nothing re-posts now).
        assert!(
            (0..1000).any(|_| !d.run_pending_work()),
            "pending work never ends"
        );
        // Still serving: a reset brings back a clean device that works.
        d.reset().unwrap();
        assert_eq!(d.transport().status(), 0);
        assert_eq!(cfg_read(&mut d, 0, 4), 0x1045_1af4);
        f.set_len(MEM).unwrap();
        let inflated = m.inflate_pages;
        clean_inflate(&mut d, &f, MEM);
        assert_eq!(handle.metrics().snapshot().inflate_pages, inflated + 2);
    }

    /// A well-behaved driver on `f` (mapped at 0): negotiates, sets up the
    /// inflate queue and inflates pfns 100 and 101; the buffer comes back.
    fn clean_inflate(d: &mut VfioUserDevice, f: &File, size: u64) {
        use freehint_device::test_utils::DriverQueue;
        use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
        let region = vm_memory::mmap::MmapRegion::build(
            Some(FileOffset::new(f.try_clone().unwrap(), 0)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap();
        let r = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![r]).unwrap();
        let mut q = DriverQueue::new(&mem, 0x8_0000, 16);
        for (reg, len, v) in [
            (common::DEVICE_STATUS, 1, 0u64),
            (common::DEVICE_STATUS, 1, 3),
            (common::DRIVER_FEATURE_SELECT, 4, 0),
            (common::DRIVER_FEATURE, 4, 0),
            (common::DRIVER_FEATURE_SELECT, 4, 1),
            (common::DRIVER_FEATURE, 4, 1),
            (common::DEVICE_STATUS, 1, 0xb),
            (common::QUEUE_SELECT, 2, 0),
            (common::QUEUE_SIZE, 2, 16),
            (common::QUEUE_DESC, 8, q.desc_table),
            (common::QUEUE_DRIVER, 8, q.avail),
            (common::QUEUE_DEVICE, 8, q.used),
            (common::QUEUE_ENABLE, 2, 1),
            (common::DEVICE_STATUS, 1, 0xf),
        ] {
            bar0_write(d, reg, len, v);
        }
        assert_eq!(d.transport().status(), 0xf);
        mem.write_obj(100u32, GuestAddress(0xF_0000)).unwrap();
        mem.write_obj(101u32, GuestAddress(0xF_0004)).unwrap();
        q.add_chain(&mem, &[(0xF_0000, 8, false)]).unwrap();
        bar0_write(d, NOTIFY_CFG_OFFSET, 2, 0);
        assert_eq!(q.take_used(&mem).len(), 1, "the inflate buffer came back");
    }
}
