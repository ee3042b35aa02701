//! The hostile guest: a driver bring-up through the registers, descriptor
//! chains on the rings in the mapped memfd, and the host API.

use super::{check_table, cut_list, QueueModel, Session};
use crate::input::{Cursor, BAR0_POINTS, BAR1_POINTS};
use crate::{
    CFG, NUM_QUEUES, PAGE, Q_DATA, Q_STRIDE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, W_SIZE,
};
use freehint_vfio_user::memory::MAX_MAPPINGS;
use freehint_vfio_user::pci::{
    CAP_MSIX_CONTROL, CAP_PCI_CFG, CAP_PCI_CFG_DATA, DEVICE_CFG_OFFSET, MSIX_CONTROL_ENABLE,
    NOTIFY_CFG_OFFSET,
};
use freehint_vfio_user::virtio_pci::common as regs;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::{DmaMapFlags, ServerBackend};

impl Session {
    /// A guest-physical address worth writing: near a queue's rings, or
    /// anywhere in guest RAM.
    pub(crate) fn pick_guest_address(&self, c: &mut Cursor) -> u64 {
        match c.u8() % 4 {
            0 | 1 => {
                let q = usize::from(c.u8()) % NUM_QUEUES;
                let m = self.queues[q];
                c.pick(&[
                    m.desc,
                    m.avail,
                    m.avail.wrapping_add(2),
                    m.used,
                    m.used.wrapping_add(2),
                ])
                .wrapping_add(u64::from(c.u8()))
            }
            _ => u64::from(c.u32()) % W_SIZE,
        }
    }

    // --- the guest --------------------------------------------------------

    /// A guest write at guest-physical `gpa` (the bring-up maps the RAM
    /// memfd at 0 with file offset = address; elsewhere the write lands in
    /// the memfd at that offset, or nowhere).
    pub(crate) fn guest_write(&mut self, gpa: u64, data: &[u8]) {
        self.file(0).write(gpa, data);
    }

    pub(crate) fn bring_up(&mut self, c: &mut Cursor) {
        let mode = c.u8();
        let feat_mask = c.u32();
        let hi = if mode % 8 == 6 { c.u32() } else { 1 };
        let enabled = c.u8() | 1;
        let msix = c.u8();
        let mut sizes = [0u8; NUM_QUEUES];
        for s in &mut sizes {
            *s = c.u8();
        }
        for s in [0, 1, 3] {
            self.bar0_write(regs::DEVICE_STATUS, 1, s);
        }
        let lo = (self.offered as u32) & feat_mask;
        self.bar0_write(regs::DRIVER_FEATURE_SELECT, 4, 0);
        self.bar0_write(regs::DRIVER_FEATURE, 4, u64::from(lo));
        self.bar0_write(regs::DRIVER_FEATURE_SELECT, 4, 1);
        self.bar0_write(regs::DRIVER_FEATURE, 4, u64::from(hi));
        // Mode 7: no FEATURES_OK (DRIVER_OK must then be refused).
        if mode % 8 != 7 {
            self.bar0_write(regs::DEVICE_STATUS, 1, 0xb);
        }
        for q in 0..NUM_QUEUES {
            let base = q as u64 * Q_STRIDE;
            let size = 1u16 << (sizes[q] % 10).max(1);
            let raw = sizes[q] >= 0xf0;
            let (desc, avail, used) = if raw {
                let a = c.u64();
                (a, a.wrapping_add(0x1000), a.wrapping_add(0x2000))
            } else {
                (base, base + 0x1000, base + 0x2000)
            };
            self.bar0_write(regs::QUEUE_SELECT, 2, q as u64);
            self.bar0_write(regs::QUEUE_SIZE, 2, u64::from(size));
            self.bar0_write(regs::QUEUE_DESC, 8, desc);
            self.bar0_write(regs::QUEUE_DRIVER, 8, avail);
            self.bar0_write(regs::QUEUE_DEVICE, 8, used);
            self.bar0_write(regs::QUEUE_MSIX_VECTOR, 2, q as u64 + 1);
            let on = enabled & (1 << q) != 0;
            if on {
                self.bar0_write(regs::QUEUE_ENABLE, 2, 1);
            }
            // What the device took (a bad size is refused).
            let size = self.bar0_read(regs::QUEUE_SIZE, 2) as u16;
            self.queues[q] = QueueModel {
                size: if on { size } else { 0 },
                desc,
                avail,
                used,
                ..Default::default()
            };
            if on {
                self.guest_write(avail, &[0; 4]);
                self.guest_write(used, &[0; 4]);
            }
        }
        self.bar0_write(regs::CONFIG_MSIX_VECTOR, 2, 0);
        if msix & 1 != 0 {
            // MSI-X on, with an eventfd per vector (some full).
            let n = u32::from(self.dev.msix_vectors());
            let kinds: Vec<u8> = (0..n)
                .map(|i| if msix & 2 != 0 && i == 1 { 4 } else { 0 })
                .collect();
            self.set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
                0,
                n,
                &kinds,
            );
            self.write(
                CFG,
                CAP_MSIX_CONTROL as u64,
                &MSIX_CONTROL_ENABLE.to_le_bytes(),
            );
        } else {
            self.set_irqs(
                VFIO_PCI_INTX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
                0,
                1,
                &[if msix & 2 != 0 { 4 } else { 0 }],
            );
        }
        self.bar0_write(regs::DEVICE_STATUS, 1, 0xf);
    }

    pub(crate) fn post_chain(&mut self, c: &mut Cursor) {
        let q = usize::from(c.u8()) % NUM_QUEUES;
        let n = 1 + usize::from(c.u8() % 4);
        let notify = c.u8();
        let m = self.queues[q];
        if m.size == 0 {
            return;
        }
        let size = u64::from(m.size);
        let base = q as u64 * Q_STRIDE;
        let mut idx = u64::from(m.next_desc) % size;
        let head = idx as u16;
        let mut slot = m.slot;
        for i in 0..n {
            let kind = c.u8();
            let mut flags = if kind & 0x80 != 0 {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            let (addr, len) = match kind % 8 {
                0..=3 => {
                    let addr = base + Q_DATA + (slot * 0x400) % (Q_STRIDE - Q_DATA - 0x400);
                    slot += 1;
                    let len = c.pick(&[4u32, 8, 16, 64, 256, 1024, 12, 0]);
                    self.payload(c, addr, len);
                    (addr, len)
                }
                4 => (c.u64(), c.u32()),
                5 => (0x28000 + u64::from(c.u8() % 16) * PAGE, PAGE as u32),
                6 => {
                    // An indirect table of k descriptors to pfn buffers.
                    flags |= VIRTQ_DESC_F_INDIRECT;
                    let table = base + Q_DATA + (slot * 0x400) % (Q_STRIDE - Q_DATA - 0x400);
                    slot += 1;
                    let k = 1 + u64::from(c.u8() % 4);
                    for j in 0..k {
                        let buf = table + 0x100 + j * 0x40;
                        self.payload(c, buf, 16);
                        let next = if j + 1 < k { j as u16 + 1 } else { 0 };
                        let f = if j + 1 < k { VIRTQ_DESC_F_NEXT } else { 0 } | (c.u8() & 7) as u16;
                        self.guest_write(table + 16 * j, &desc_bytes(buf, 16, f, next));
                    }
                    (table, 16 * k as u32)
                }
                _ => (
                    self.queues[usize::from(c.u8()) % NUM_QUEUES].used,
                    c.u32() % 0x1000,
                ),
            };
            let next_idx = if c.u8() == 0xff {
                u64::from(c.u16())
            } else {
                (idx + 1) % size
            };
            if i + 1 < n {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.guest_write(
                m.desc.wrapping_add(16 * idx),
                &desc_bytes(addr, len, flags, next_idx as u16),
            );
            idx = (idx + 1) % size;
        }
        let qm = &mut self.queues[q];
        qm.next_desc = idx as u16;
        qm.slot = slot;
        let ring_at = qm
            .avail
            .wrapping_add(4 + 2 * (u64::from(qm.avail_idx) % size));
        qm.avail_idx = qm.avail_idx.wrapping_add(1);
        let (avail, new_idx) = (qm.avail, qm.avail_idx);
        self.guest_write(ring_at, &head.to_le_bytes());
        self.guest_write(avail.wrapping_add(2), &new_idx.to_le_bytes());
        if notify & 1 != 0 {
            self.bar0_write(NOTIFY_CFG_OFFSET + 4 * q as u64, 2, q as u64);
        }
    }

    /// Fills a buffer the guest posts: pfns, a hint command id, bytes.
    pub(crate) fn payload(&mut self, c: &mut Cursor, addr: u64, len: u32) {
        let words = (len / 4).min(16) as usize;
        let data: Vec<u8> = match c.u8() % 5 {
            0 | 1 => (0..words)
                .flat_map(|_| {
                    // Mostly pfns inside the 64-page layout; 0xff: any u32.
                    let b = c.u8();
                    let pfn = if b == 0xff {
                        c.u32()
                    } else {
                        u32::from(b % 80)
                    };
                    pfn.to_le_bytes()
                })
                .collect(),
            2 => {
                // The current hint command id, as the guest reads it.
                let mut v = [0u8; 4];
                self.dev
                    .region_read(0, DEVICE_CFG_OFFSET + 8, &mut v)
                    .unwrap();
                let mut out = v.to_vec();
                out.extend(c.bytes(words.saturating_sub(1) * 4));
                out
            }
            3 => c.short_bytes(64),
            _ => return,
        };
        self.guest_write(addr, &data);
    }

    pub(crate) fn host(&mut self, c: &mut Cursor) {
        match c.u8() % 6 {
            0 => self.balloon.set_target_pages(u32::from(c.u8() % 80)),
            1 => {
                let _ = self.balloon.request_stats();
            }
            2 => {
                let epoch = self.hints.new_epoch();
                let _ = self.hints.start_round(&epoch);
            }
            3 => self.hints.stop(),
            4 => self.hints.finish(),
            _ => {
                let _ = self.hints.status();
            }
        }
    }

    pub(crate) fn window_access(&mut self, c: &mut Cursor) {
        let bar = c.pick(&[0u8, 0, 0, 1, 2, 0xff]);
        let off = match bar {
            0 => c.pick(BAR0_POINTS),
            1 => c.pick(BAR1_POINTS),
            _ => u64::from(c.u32()),
        } as u32;
        let len = c.pick(&[1u32, 2, 4, 4, 3, 8, 0]);
        self.write(CFG, CAP_PCI_CFG as u64 + 4, &[bar]);
        self.write(CFG, CAP_PCI_CFG as u64 + 8, &off.to_le_bytes());
        self.write(CFG, CAP_PCI_CFG as u64 + 12, &len.to_le_bytes());
        if c.u8() & 1 == 0 {
            self.read(CFG, CAP_PCI_CFG_DATA as u64, 4);
        } else {
            let v = c.u32();
            self.write(CFG, CAP_PCI_CFG_DATA as u64, &v.to_le_bytes());
        }
    }

    pub(crate) fn map_many(&mut self, c: &mut Cursor) {
        let base = u64::from(c.u16()) * PAGE;
        // Past the table's limit only on a marker byte: each map rebuilds
        // the whole region table, so 520 maps take a while.
        let n = match c.u8() {
            0xa5 if !self.filled_table => {
                self.filled_table = true;
                MAX_MAPPINGS + 1 + usize::from(c.u8() % 8)
            }
            k => usize::from(k % 32).min(self.maps_left),
        };
        self.maps_left = self.maps_left.saturating_sub(n);
        let flags = if c.u8() & 1 == 0 {
            DmaMapFlags::READ_WRITE
        } else {
            DmaMapFlags::READ
        };
        let f = self.file(0).file.try_clone().unwrap();
        for i in 0..n as u64 {
            let off = (i % (W_SIZE / PAGE)) * PAGE;
            let addr = base + 2 * i * PAGE;
            let r = self
                .dev
                .dma_map(flags, off, addr, PAGE, Some(f.try_clone().unwrap()));
            match r {
                Ok(()) if flags.contains(DmaMapFlags::WRITE) => {
                    self.file(0).mark_writable(off, PAGE)
                }
                Ok(()) => {}
                // Refused only when the table would overflow (it is unchanged).
                Err(e) => {
                    let now = self.dev.dma_ranges();
                    let need = cut_list(&now, addr, addr + PAGE).len()
                        + usize::from(flags.contains(DmaMapFlags::WRITE));
                    assert!(
                        need > MAX_MAPPINGS,
                        "map {i} refused with {} mappings: {e}",
                        now.len()
                    );
                }
            }
        }
        check_table(&self.dev.dma_ranges());
    }
}

pub(crate) fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}
