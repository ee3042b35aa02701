//! End to end over a real vfio-user socket, without QEMU: rust-vmm's
//! `vfio_user::Client` plays the VMM (DMA_MAP of a memfd, SET_IRQS with
//! eventfds, region accesses), a split-ring driver model in the same memfd
//! plays Linux's virtio_balloon, and the server runs the real `Balloon`.
//! Checks enumeration, feature negotiation, queue setup, MSI-X delivery,
//! an inflate that really discards the guest page, a client disconnect
//! (device reset, mappings dropped) and a second client on the same server.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use freehint_device::balloon::Layout;
use freehint_device::test_utils::DriverQueue;
use freehint_device::{Balloon, BalloonConfig};
use freehint_vfio_user::pci::{
    CAP_MSIX_CONTROL, DEVICE_CFG_OFFSET, MSIX_CONTROL_ENABLE, NOTIFY_CFG_OFFSET,
};
use freehint_vfio_user::virtio_pci::common as regs;
use freehint_vfio_user::{serve, VfioUserDevice};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod common;
use common::{guest_memory, memfd, RAM};

const CFG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

fn eventfd() -> File {
    // SAFETY: no preconditions.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    unsafe { File::from_raw_fd(fd) }
}

fn count(f: &mut File) -> u64 {
    let mut b = [0u8; 8];
    match f.read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

struct Vmm {
    c: Client,
}

impl Vmm {
    fn connect(path: &Path) -> Vmm {
        let t0 = Instant::now();
        loop {
            if let Ok(c) = Client::new(path) {
                return Vmm { c };
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "server never listened"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    fn rd(&mut self, region: u32, off: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        self.c.region_read(region, off, &mut b).unwrap();
        let mut w = [0u8; 8];
        w[..len].copy_from_slice(&b);
        u64::from_le_bytes(w)
    }
    fn wr(&mut self, region: u32, off: u64, len: usize, v: u64) {
        self.c
            .region_write(region, off, &v.to_le_bytes()[..len])
            .unwrap();
    }
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("freehint-vfio-{tag}-{}.sock", std::process::id()))
}

/// Enumerates and drives the device like Linux up to DRIVER_OK with
/// VERSION_1 | STATS_VQ (queues: inflate 0, deflate 1, stats 2).
fn bring_up(vmm: &mut Vmm, mem: &GuestMemoryMmap, vectors: &mut [File]) -> Vec<DriverQueue> {
    assert_eq!(vmm.rd(CFG, 0, 4), 0x1045_1af4);
    assert_eq!(vmm.rd(CFG, 8, 1), 1, "revision 1 (modern)");
    let info = vmm.c.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(info.count as usize, vectors.len());
    let fds: Vec<i32> = vectors.iter().map(|f| f.as_raw_fd()).collect();
    vmm.c
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            fds.len() as u32,
            &fds,
        )
        .unwrap();
    vmm.wr(
        CFG,
        CAP_MSIX_CONTROL as u64,
        2,
        u64::from(MSIX_CONTROL_ENABLE),
    );

    vmm.wr(0, regs::DEVICE_STATUS, 1, 0);
    vmm.wr(0, regs::DEVICE_STATUS, 1, 1);
    vmm.wr(0, regs::DEVICE_STATUS, 1, 3);
    vmm.wr(0, regs::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(vmm.rd(0, regs::DEVICE_FEATURE, 4), 1, "VERSION_1 offered");
    vmm.wr(0, regs::DEVICE_FEATURE_SELECT, 4, 0);
    assert_ne!(
        vmm.rd(0, regs::DEVICE_FEATURE, 4) & 2,
        0,
        "STATS_VQ offered"
    );
    vmm.wr(0, regs::DRIVER_FEATURE_SELECT, 4, 0);
    vmm.wr(0, regs::DRIVER_FEATURE, 4, 2);
    vmm.wr(0, regs::DRIVER_FEATURE_SELECT, 4, 1);
    vmm.wr(0, regs::DRIVER_FEATURE, 4, 1);
    vmm.wr(0, regs::DEVICE_STATUS, 1, 0xb);
    assert_eq!(
        vmm.rd(0, regs::DEVICE_STATUS, 1),
        0xb,
        "FEATURES_OK accepted"
    );
    vmm.wr(0, regs::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(vmm.rd(0, regs::CONFIG_MSIX_VECTOR, 2), 0);

    let mut queues = Vec::new();
    for q in 0..3u16 {
        let dq = DriverQueue::new(mem, 0x80_0000 + u64::from(q) * 0x10_0000, 64);
        vmm.wr(0, regs::QUEUE_SELECT, 2, u64::from(q));
        vmm.wr(0, regs::QUEUE_SIZE, 2, 64);
        vmm.wr(0, regs::QUEUE_DESC, 4, dq.desc_table & 0xffff_ffff);
        vmm.wr(0, regs::QUEUE_DESC + 4, 4, dq.desc_table >> 32);
        vmm.wr(0, regs::QUEUE_DRIVER, 8, dq.avail);
        vmm.wr(0, regs::QUEUE_DEVICE, 8, dq.used);
        vmm.wr(0, regs::QUEUE_MSIX_VECTOR, 2, u64::from(q) + 1);
        assert_eq!(vmm.rd(0, regs::QUEUE_MSIX_VECTOR, 2), u64::from(q) + 1);
        vmm.wr(0, regs::QUEUE_ENABLE, 2, 1);
        queues.push(dq);
    }
    vmm.wr(0, regs::DEVICE_STATUS, 1, 0xf);
    assert_eq!(vmm.rd(0, regs::DEVICE_STATUS, 1), 0xf, "DRIVER_OK");
    queues
}

#[test]
fn balloon_over_a_real_vfio_user_socket() {
    let layout = Layout::from_ram_byte_ranges(&[(0, RAM)]).unwrap();
    let balloon = Balloon::new(BalloonConfig::all_features(layout)).unwrap();
    let handle = balloon.handle();
    let device = VfioUserDevice::new(Box::new(balloon));
    let nvec = usize::from(device.msix_vectors());
    let path = Arc::new(socket_path("e2e"));
    let p = Arc::clone(&path);
    let server = thread::spawn(move || {
        let mut device = device;
        // Two clients, then stop (persist = true would loop forever): serve
        // twice with persist = false.
        serve(&p, &mut device, false, true).unwrap();
        let after_first = (device.transport().status(), device.dma_ranges().len());
        serve(&p, &mut device, false, true).unwrap();
        (device, after_first)
    });

    // ---- client 1: full bring-up, MSI-X, inflate with a real discard ----
    let ram = memfd(RAM);
    let mem = guest_memory(&ram);
    let mut vmm = Vmm::connect(&path);
    vmm.c.dma_map(0, 0, RAM, ram.as_raw_fd()).unwrap();
    let mut vectors: Vec<File> = (0..nvec).map(|_| eventfd()).collect();
    let mut queues = bring_up(&mut vmm, &mem, &mut vectors);
    // The stats queue gets its first buffer after DRIVER_OK here.
    let stats_buf = 0xC0_0000;
    queues[2]
        .add_chain(&mem, &[(stats_buf, 10, false)])
        .unwrap();
    vmm.wr(0, NOTIFY_CFG_OFFSET + 8, 2, 2);

    // Host asks for 2 pages: config interrupt on vector 0, num_pages in
    // device config.
    handle.set_target_pages(2);
    assert!(count(&mut vectors[0]) >= 1, "config interrupt on vector 0");
    assert_eq!(vmm.rd(0, DEVICE_CFG_OFFSET, 4), 2);
    assert_eq!(vmm.rd(0, regs::CONFIG_GENERATION, 1), 1);

    // The guest dirties pfn 100 and 101, then gives them to the balloon.
    mem.write_slice(&[0xaa; 8192], GuestAddress(100 << 12))
        .unwrap();
    let pfns = 0xD0_0000;
    mem.write_obj(100u32, GuestAddress(pfns)).unwrap();
    mem.write_obj(101u32, GuestAddress(pfns + 4)).unwrap();
    queues[0].add_chain(&mem, &[(pfns, 8, false)]).unwrap();
    vmm.wr(0, NOTIFY_CFG_OFFSET, 2, 0);
    let used = queues[0].take_used(&mem);
    assert_eq!(used.len(), 1, "inflate buffer completed");
    assert!(
        count(&mut vectors[1]) >= 1,
        "inflate queue interrupt on vector 1"
    );
    let mut page = [0u8; 8192];
    mem.read_slice(&mut page, GuestAddress(100 << 12)).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "inflated pages were discarded"
    );
    vmm.wr(0, DEVICE_CFG_OFFSET + 4, 4, 2);
    assert_eq!(handle.actual_pages(), 2);

    // Stats: host requests, device returns the buffer, guest answers.
    assert!(handle.request_stats().unwrap());
    assert_eq!(queues[2].take_used(&mem).len(), 1);
    assert!(
        count(&mut vectors[3]) >= 1,
        "stats queue interrupt on vector 3"
    );
    let mut entry = [0u8; 10];
    entry[0..2].copy_from_slice(&4u16.to_le_bytes()); // MEMFREE
    entry[2..10].copy_from_slice(&(123u64 << 12).to_le_bytes());
    mem.write_slice(&entry, GuestAddress(stats_buf)).unwrap();
    queues[2]
        .add_chain(&mem, &[(stats_buf, 10, false)])
        .unwrap();
    vmm.wr(0, NOTIFY_CFG_OFFSET + 8, 2, 2);
    let stats = handle.latest_stats().expect("stats arrived");
    assert_eq!(stats.values[4], Some(123 << 12));

    // Client goes away without a reset.
    vmm.c.shutdown().unwrap();
    drop(vmm);

    // ---- client 2 on the same server: clean device again ----
    let ram2 = memfd(RAM);
    let mem2 = guest_memory(&ram2);
    let mut vmm = Vmm::connect(&path);
    assert_eq!(
        vmm.rd(0, regs::DEVICE_STATUS, 1),
        0,
        "reset after disconnect"
    );
    vmm.c.dma_map(0, 0, RAM, ram2.as_raw_fd()).unwrap();
    let mut vectors: Vec<File> = (0..nvec).map(|_| eventfd()).collect();
    let _queues = bring_up(&mut vmm, &mem2, &mut vectors);
    // vfio-user DEVICE_RESET brings status back to 0, keeps the mapping.
    vmm.c.reset().unwrap();
    assert_eq!(vmm.rd(0, regs::DEVICE_STATUS, 1), 0);
    vmm.c.shutdown().unwrap();
    drop(vmm);

    let (device, (status_after_first, maps_after_first)) = server.join().unwrap();
    assert_eq!(status_after_first, 0);
    assert_eq!(maps_after_first, 0, "first client's mappings dropped");
    assert_eq!(device.transport().status(), 0);
    assert!(device.dma_ranges().is_empty());
    assert!(!path.exists(), "socket removed when the server stops");
}
