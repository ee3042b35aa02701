//! [`BalloonBackend`]: the vhost-user back end over the balloon device model.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use freehint_device::balloon::DEFAULT_QUEUE_SIZE;
use freehint_device::{Balloon, GuestMemoryHandle, Interrupt, VirtioDevice};
use freehint_protocol::balloon::{CONFIG_FREE_PAGE_HINT_CMD_ID, CONFIG_NUM_PAGES, CONFIG_SIZE};
use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;

use crate::channel::RequestChannel;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Config fields only the device writes.
const DEVICE_FIELDS: [usize; 2] = [CONFIG_NUM_PAGES, CONFIG_FREE_PAGE_HINT_CMD_ID];

/// Queues the front end must create (`num_vqs`): inflate, deflate, stats,
/// free page and reporting, the most a balloon with every feature uses.
/// A driver that negotiates fewer uses the first ones (Linux numbers the
/// queues it asks for back to back).
pub const QUEUES: usize = 5;

/// Where the rings of one queue live, as the driver set them up.
type RingAddrs = Option<(u64, u64, u64, u16)>;

/// The vhost-user back end of one balloon device.
pub struct BalloonBackend {
    device: Balloon,
    status: Arc<AtomicU8>,
    mem: Option<GuestMemoryHandle>,
    acked: u64,
    frontend: Arc<Mutex<Option<RequestChannel>>>,
    /// The rings the device was activated with (`None`: not active).
    active: Option<Vec<RingAddrs>>,
    vrings: Vec<VringRwLock>,
}

impl BalloonBackend {
    /// A back end serving `device`; `status` follows the device status the
    /// driver reached (0x0f while active, 0 after a reset).
    pub fn new(device: Balloon, status: Arc<AtomicU8>) -> Self {
        Self {
            device,
            status,
            mem: None,
            acked: 0,
            frontend: Arc::default(),
            active: None,
            vrings: Vec::new(),
        }
    }

    /// The rings as the driver set them up, queue by queue, once the
    /// front end finished starting them: every ring that has its kick and
    /// call eventfds is also enabled (QEMU enables the rings last, one
    /// message each, so a kick can arrive while later rings are still
    /// disabled). `None` while the start is under way.
    fn started_rings(vrings: &[VringRwLock]) -> Option<Vec<RingAddrs>> {
        let mut any = false;
        let mut addrs = Vec::with_capacity(vrings.len());
        for v in vrings {
            let state = v.get_ref();
            let q = state.get_queue();
            if q.ready() && !state.is_enabled() {
                return None;
            }
            any |= q.ready();
            addrs.push(
                q.ready()
                    .then(|| (q.desc_table(), q.avail_ring(), q.used_ring(), q.size())),
            );
        }
        any.then_some(addrs)
    }

    /// Activates the device once the front end started the rings, and again
    /// when the driver set up new rings (after it reset the device).
    /// Returns whether the device is active.
    fn ensure_active(&mut self, vrings: &[VringRwLock]) -> io::Result<bool> {
        let Some(addrs) = Self::started_rings(vrings) else {
            return Ok(false);
        };
        if self.active.as_ref() == Some(&addrs) {
            return Ok(true);
        }
        let mem = self
            .mem
            .clone()
            .ok_or_else(|| io::Error::other("a queue was kicked before the memory table came"))?;
        if self.active.is_some() {
            info!("the driver set up new rings: reactivating the device");
            self.device.reset();
        }
        self.device.ack_features(self.acked);
        let queues = vrings
            .iter()
            .take(self.device.num_queues())
            .map(|v| Queue::try_from(v.get_ref().get_queue().state()))
            .collect::<Result<Vec<Queue>, _>>()
            .map_err(|e| io::Error::other(format!("invalid ring: {e}")))?;
        let irq = Arc::new(VhostIrq {
            vrings: vrings.to_vec(),
            frontend: Arc::clone(&self.frontend),
        });
        self.device
            .activate(mem, irq, queues)
            .map_err(|e| io::Error::other(format!("activation failed: {e}")))?;
        self.vrings = vrings.to_vec();
        let started: Vec<u16> = (0..self.device.num_queues().min(addrs.len()) as u16)
            .filter(|&i| addrs[usize::from(i)].is_some())
            .collect();
        self.active = Some(addrs);
        self.status.store(0x0f, Ordering::Release);
        info!("device active: features {:#x}", self.acked);
        // Kicks that came while the start was under way were consumed
        // without processing: look at every queue once.
        for index in started {
            self.notify(index);
        }
        Ok(true)
    }

    fn notify(&mut self, index: u16) {
        if let Err(e) = self.device.queue_notify(index) {
            warn!("queue {index}: {e}");
        }
    }
}

impl VhostUserBackendMut for BalloonBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(DEFAULT_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.device.device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.acked = features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        debug!("driver features {:#x}", self.acked);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&mut self) {
        info!("front end reset the device");
        self.device.reset();
        self.active = None;
        self.status.store(0, Ordering::Release);
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is never offered.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0; size.min(256) as usize];
        self.device.read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // QEMU's generic front end writes its cached copy of the whole
        // config image when the driver writes one field: pass on only the
        // fields (all 32-bit) that change. In such a write-back a device
        // field (`num_pages`, `free_page_hint_cmd_id`) that differs is
        // QEMU's stale copy, not the driver's doing: it is dropped here,
        // not reported as a driver writing a read-only field.
        let whole_image = offset == 0 && buf.len() == CONFIG_SIZE;
        let mut current = vec![0; buf.len()];
        self.device.read_config(u64::from(offset), &mut current);
        let start = offset as usize;
        let mut at = 0;
        while at < buf.len() {
            let end = ((start + at) / 4 * 4 + 4 - start).min(buf.len());
            let field = (start + at) / 4 * 4;
            if buf[at..end] == current[at..end] {
                // Unchanged.
            } else if whole_image && DEVICE_FIELDS.contains(&field) {
                debug!("stale config write-back of device field {field} dropped");
            } else {
                self.device.write_config((start + at) as u64, &buf[at..end]);
            }
            at = end;
        }
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryHandle) -> io::Result<()> {
        // The daemon swaps the contents of this one handle on every update,
        // so the device, holding a clone, always sees the current table.
        self.mem = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        let mut slot = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        *slot = None;
        match RequestChannel::find() {
            Ok(channel) => *slot = Some(channel),
            Err(e) => warn!("config changes cannot be signalled: {e}"),
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the library's worker thread never ends, and dropping
        // the daemon after the front end left would wait for it forever.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create the worker's exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE answers with the vring's next_avail: give it the
        // device's, so the front end restarts the ring where the device is.
        let i = queue_index as usize;
        if self.active.is_some() {
            if let (Some(state), Some(v)) =
                (self.device.save_state().queues.get(i), self.vrings.get(i))
            {
                v.set_queue_next_avail(state.next_avail);
                v.set_queue_next_used(state.next_used);
            }
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !self.ensure_active(vrings)? {
            debug!("kick on queue {device_event} before the rings are started: deferred");
            return Ok(());
        }
        if usize::from(device_event) >= self.device.num_queues() {
            debug!("kick on queue {device_event}, which the device does not use");
            return Ok(());
        }
        self.notify(device_event);
        Ok(())
    }
}

/// Interrupts over vhost-user: the queues' call eventfds, and the
/// back end's request channel for config changes.
struct VhostIrq {
    vrings: Vec<VringRwLock>,
    frontend: Arc<Mutex<Option<RequestChannel>>>,
}

impl Interrupt for VhostIrq {
    fn signal_queue(&self, index: u16) {
        if let Some(v) = self.vrings.get(usize::from(index)) {
            if let Err(e) = v.signal_used_queue() {
                warn!("cannot signal queue {index}: {e}");
            }
        }
    }

    fn signal_config(&self) {
        match self
            .frontend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(b) => {
                if let Err(e) = b.config_changed() {
                    warn!("cannot signal a config change: {e}");
                }
            }
            None => warn!("config change not signalled: the front end gave no request channel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_device::balloon::Layout;
    use freehint_device::BalloonConfig;

    fn backend() -> BalloonBackend {
        let layout = Layout::from_ram_pfn_ranges(&[(0, 256)]).unwrap();
        let balloon = Balloon::new(BalloonConfig::all_features(layout)).unwrap();
        BalloonBackend::new(balloon, Arc::default())
    }

    fn image(b: &BalloonBackend) -> [u8; CONFIG_SIZE] {
        let mut out = [0u8; CONFIG_SIZE];
        b.device.read_config(0, &mut out);
        out
    }

    #[test]
    fn a_whole_image_write_back_passes_the_drivers_field_and_keeps_the_devices() {
        let mut b = backend();
        let stale = image(&b);
        b.device.handle().set_target_pages(64);
        // QEMU's cached image, with the driver's new `actual`.
        let mut write_back = stale;
        write_back[4..8].copy_from_slice(&32u32.to_le_bytes());
        b.set_config(0, &write_back).unwrap();
        let now = image(&b);
        assert_eq!(now[0..4], 64u32.to_le_bytes(), "num_pages is the device's");
        assert_eq!(now[4..8], 32u32.to_le_bytes(), "actual is the driver's");
    }
}
