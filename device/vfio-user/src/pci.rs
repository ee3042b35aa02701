//! PCI configuration space of the modern virtio-pci balloon (virtio 1.2 §4.1).
//!
//! Layout (all little endian):
//!
//! | config offset | what |
//! |---|---|
//! | 0x00 | type 0 header: vendor 0x1af4, device 0x1040 + device type, revision 1 |
//! | 0x10 | BAR0: 32-bit memory, [`BAR0_SIZE`]: common cfg, ISR, device cfg, notify |
//! | 0x14 | BAR1: 32-bit memory, [`BAR1_SIZE`]: MSI-X table and PBA |
//! | 0x34 | capability pointer → [`CAP_COMMON`] |
//! | [`CAP_COMMON`] .. | virtio caps COMMON, NOTIFY, ISR, DEVICE, PCI_CFG, then MSI-X |
//!
//! This module only keeps the bytes and their write masks. Side effects of
//! writes (MSI-X enable, the `PCI_CFG` access window, INTx disable) are applied
//! by [`crate::server`], which owns the other pieces.

/// PCI vendor id of virtio devices (Red Hat / Qumranet).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Device id of a modern (non-transitional) virtio device is this plus the
/// virtio device type (virtio 1.2 §4.1.2.1).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id (QEMU uses the same for its virtio devices).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// Revision id: 1 marks a modern device (virtio 1.2 §4.1.2.1).
pub const VIRTIO_PCI_REVISION: u8 = 1;
/// Class code "other" (what QEMU reports for virtio-balloon-pci).
pub const PCI_CLASS_OTHERS: u8 = 0xff;

/// Size of the PCI configuration space we serve.
pub const CONFIG_SPACE_SIZE: usize = 256;

/// Standard header registers.
pub const PCI_VENDOR_ID: usize = 0x00;
/// Device id register.
pub const PCI_DEVICE_ID: usize = 0x02;
/// Command register.
pub const PCI_COMMAND: usize = 0x04;
/// Status register.
pub const PCI_STATUS: usize = 0x06;
/// Revision id register.
pub const PCI_REVISION_ID: usize = 0x08;
/// First BAR register.
pub const PCI_BAR0: usize = 0x10;
/// Subsystem vendor id register.
pub const PCI_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem id register.
pub const PCI_SUBSYSTEM_ID: usize = 0x2e;
/// Capability list pointer.
pub const PCI_CAPABILITY_LIST: usize = 0x34;
/// Interrupt line register (written by firmware/OS, no effect).
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin register (1 = INTA#).
pub const PCI_INTERRUPT_PIN: usize = 0x3d;

/// Command: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command: INTx emulation disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: INTx asserted.
pub const PCI_STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: capability list present.
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability id of vendor-specific capabilities (the virtio ones).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Capability id of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

/// `cfg_type` of the virtio common configuration structure.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// `cfg_type` of the notification structure.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR status structure.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// `cfg_type` of the device-specific configuration structure.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// `cfg_type` of the PCI configuration access window.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// BAR index (and vfio region index) of the virtio structures.
pub const VIRTIO_BAR: u8 = 0;
/// BAR index (and vfio region index) of the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x4000;
/// Offset of the common configuration structure in BAR0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure (virtio 1.2, with
/// `queue_notify_data` and `queue_reset`).
pub const COMMON_CFG_LEN: u64 = 0x3c;
/// Offset of the ISR status byte in BAR0.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Length of the ISR structure.
pub const ISR_CFG_LEN: u64 = 1;
/// Offset of the device configuration in BAR0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in BAR0.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// Length of the notification area.
pub const NOTIFY_CFG_LEN: u64 = 0x1000;
/// Queue `i` is notified at `NOTIFY_CFG_OFFSET + i * NOTIFY_OFF_MULTIPLIER`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// Size of BAR1.
pub const BAR1_SIZE: u64 = 0x1000;
/// Offset of the MSI-X table in BAR1.
pub const MSIX_TABLE_OFFSET: u64 = 0;
/// Offset of the MSI-X PBA in BAR1.
pub const MSIX_PBA_OFFSET: u64 = 0x800;
/// Most vectors the BAR1 layout holds (the table must end before the PBA).
pub const MSIX_MAX_VECTORS: u16 = (MSIX_PBA_OFFSET / 16) as u16;

/// Config offset of the common cfg capability.
pub const CAP_COMMON: usize = 0x40;
/// Config offset of the notify capability (20 bytes).
pub const CAP_NOTIFY: usize = 0x50;
/// Config offset of the ISR capability.
pub const CAP_ISR: usize = 0x64;
/// Config offset of the device cfg capability.
pub const CAP_DEVICE: usize = 0x74;
/// Config offset of the PCI_CFG access capability (20 bytes).
pub const CAP_PCI_CFG: usize = 0x84;
/// Config offset of the `pci_cfg_data` window inside [`CAP_PCI_CFG`].
pub const CAP_PCI_CFG_DATA: usize = CAP_PCI_CFG + 16;
/// Config offset of the MSI-X capability (12 bytes).
pub const CAP_MSIX: usize = 0x98;
/// Config offset of the MSI-X Message Control register.
pub const CAP_MSIX_CONTROL: usize = CAP_MSIX + 2;
/// Message Control: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message Control: function mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// The identity of the device the config space describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    /// Virtio device type (5 = balloon).
    pub virtio_device_type: u16,
    /// Number of MSI-X vectors (1..=[`MSIX_MAX_VECTORS`]).
    pub msix_vectors: u16,
}

/// A BAR as seen in config space.
#[derive(Clone, Copy, Debug)]
struct Bar {
    size: u64,
    /// The address bits the OS wrote (low flag bits excluded).
    address: u32,
}

/// The 256-byte configuration space with its write masks.
#[derive(Debug)]
pub struct PciConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bit set ⇒ the guest may change that bit.
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Bar; 2],
    initial: [u8; CONFIG_SPACE_SIZE],
}

/// One capability found by [`PciConfigSpace::capabilities`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability id.
    pub id: u8,
    /// Config space offset of the capability.
    pub offset: usize,
    /// For vendor (virtio) caps: `cfg_type`; 0 otherwise.
    pub cfg_type: u8,
}

impl PciConfigSpace {
    /// Builds the config space of a modern virtio-pci device.
    pub fn new(id: PciIdentity) -> Self {
        let mut c = PciConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [
                Bar {
                    size: BAR0_SIZE,
                    address: 0,
                },
                Bar {
                    size: BAR1_SIZE,
                    address: 0,
                },
            ],
            initial: [0; CONFIG_SPACE_SIZE],
        };
        c.put16(PCI_VENDOR_ID, VIRTIO_PCI_VENDOR_ID);
        c.put16(
            PCI_DEVICE_ID,
            VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(id.virtio_device_type),
        );
        c.put16(PCI_STATUS, PCI_STATUS_CAP_LIST);
        c.bytes[PCI_REVISION_ID] = VIRTIO_PCI_REVISION;
        // Class code: base class at 0x0b, subclass 0x0a, prog-if 0x09.
        c.bytes[0x0b] = PCI_CLASS_OTHERS;
        c.put16(PCI_SUBSYSTEM_VENDOR_ID, VIRTIO_PCI_VENDOR_ID);
        c.put16(PCI_SUBSYSTEM_ID, VIRTIO_PCI_SUBSYSTEM_ID);
        c.bytes[PCI_CAPABILITY_LIST] = CAP_COMMON as u8;
        c.bytes[PCI_INTERRUPT_PIN] = 1;

        c.virtio_cap(
            CAP_COMMON,
            CAP_NOTIFY,
            16,
            VIRTIO_PCI_CAP_COMMON_CFG,
            VIRTIO_BAR,
            COMMON_CFG_OFFSET,
            COMMON_CFG_LEN,
        );
        c.virtio_cap(
            CAP_NOTIFY,
            CAP_ISR,
            20,
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            VIRTIO_BAR,
            NOTIFY_CFG_OFFSET,
            NOTIFY_CFG_LEN,
        );
        c.put32(CAP_NOTIFY + 16, NOTIFY_OFF_MULTIPLIER);
        c.virtio_cap(
            CAP_ISR,
            CAP_DEVICE,
            16,
            VIRTIO_PCI_CAP_ISR_CFG,
            VIRTIO_BAR,
            ISR_CFG_OFFSET,
            ISR_CFG_LEN,
        );
        c.virtio_cap(
            CAP_DEVICE,
            CAP_PCI_CFG,
            16,
            VIRTIO_PCI_CAP_DEVICE_CFG,
            VIRTIO_BAR,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_LEN,
        );
        c.virtio_cap(CAP_PCI_CFG, CAP_MSIX, 20, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0);
        // The driver programs bar, offset and length of the access window,
        // and reads/writes pci_cfg_data (handled by the server).
        c.writable[CAP_PCI_CFG + 4] = 0xff;
        c.writable[CAP_PCI_CFG + 8..CAP_PCI_CFG + 16].fill(0xff);
        c.writable[CAP_PCI_CFG_DATA..CAP_PCI_CFG_DATA + 4].fill(0xff);

        c.bytes[CAP_MSIX] = PCI_CAP_ID_MSIX;
        c.bytes[CAP_MSIX + 1] = 0;
        let vectors = id.msix_vectors.clamp(1, MSIX_MAX_VECTORS);
        c.put16(CAP_MSIX_CONTROL, vectors - 1);
        c.put32(CAP_MSIX + 4, MSIX_TABLE_OFFSET as u32 | u32::from(MSIX_BAR));
        c.put32(CAP_MSIX + 8, MSIX_PBA_OFFSET as u32 | u32::from(MSIX_BAR));
        c.writable[CAP_MSIX_CONTROL + 1] = 0xc0;

        let cmd = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
        c.writable[PCI_COMMAND..PCI_COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c.writable[0x0c] = 0xff; // cache line size
        c.writable[0x0d] = 0xff; // latency timer
        c.writable[PCI_INTERRUPT_LINE] = 0xff;
        c.initial = c.bytes;
        c
    }

    #[allow(clippy::too_many_arguments)]
    fn virtio_cap(
        &mut self,
        at: usize,
        next: usize,
        len: u8,
        cfg_type: u8,
        bar: u8,
        offset: u64,
        length: u64,
    ) {
        self.bytes[at] = PCI_CAP_ID_VNDR;
        self.bytes[at + 1] = next as u8;
        self.bytes[at + 2] = len;
        self.bytes[at + 3] = cfg_type;
        self.bytes[at + 4] = bar;
        self.put32(at + 8, offset as u32);
        self.put32(at + 12, length as u32);
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Little-endian u16 at `at` (0 when out of range).
    pub fn read16(&self, at: usize) -> u16 {
        match self.bytes.get(at..at + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]),
            None => 0,
        }
    }

    /// Little-endian u32 at `at` (0 when out of range).
    pub fn read32(&self, at: usize) -> u32 {
        match self.bytes.get(at..at + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    /// Back to the power-on state (vfio-user DEVICE_RESET).
    pub fn reset(&mut self) {
        self.bytes = self.initial;
        for bar in &mut self.bars {
            bar.address = 0;
        }
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as 0.
    /// BAR registers and the live status bits are composed here;
    /// `intx_asserted` becomes status bit 3.
    pub fn read(&self, offset: usize, data: &mut [u8], intx_asserted: bool) {
        for (i, out) in data.iter_mut().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                *out = 0;
                continue;
            };
            *out = self.byte(at, intx_asserted);
        }
    }

    fn byte(&self, at: usize, intx_asserted: bool) -> u8 {
        if (PCI_BAR0..PCI_BAR0 + 24).contains(&at) {
            let index = (at - PCI_BAR0) / 4;
            let value = match self.bars.get(index) {
                Some(bar) => bar.address & !((bar.size as u32).wrapping_sub(1)),
                None => 0,
            };
            return value.to_le_bytes()[(at - PCI_BAR0) % 4];
        }
        if at == PCI_STATUS && intx_asserted {
            return self.bytes[at] | PCI_STATUS_INTERRUPT as u8;
        }
        self.bytes.get(at).copied().unwrap_or(0)
    }

    /// Writes `data` at `offset`, honouring the write masks; read-only and
    /// out-of-range bytes are ignored. BAR writes follow the PCI sizing
    /// protocol (the low `size - 1` bits read back as zero).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                return;
            };
            if at >= CONFIG_SPACE_SIZE {
                return;
            }
            if (PCI_BAR0..PCI_BAR0 + 8).contains(&at) {
                let index = (at - PCI_BAR0) / 4;
                let shift = 8 * ((at - PCI_BAR0) % 4);
                let bar = &mut self.bars[index];
                bar.address = (bar.address & !(0xff << shift)) | (u32::from(v) << shift);
                continue;
            }
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (v & mask);
        }
    }

    /// Command register.
    pub fn command(&self) -> u16 {
        self.read16(PCI_COMMAND)
    }

    /// MSI-X Message Control register.
    pub fn msix_control(&self) -> u16 {
        self.read16(CAP_MSIX_CONTROL)
    }

    /// The `PCI_CFG` access window as programmed by the driver:
    /// (bar, offset in the BAR, length).
    pub fn pci_cfg_window(&self) -> (u8, u32, u32) {
        (
            self.bytes[CAP_PCI_CFG + 4],
            self.read32(CAP_PCI_CFG + 8),
            self.read32(CAP_PCI_CFG + 12),
        )
    }

    /// Walks the capability list like a driver does (bounded: at most 48
    /// entries, pointers must stay inside the space and past the header).
    pub fn capabilities(&self) -> Vec<Capability> {
        let mut caps = Vec::new();
        let mut at = usize::from(self.bytes[PCI_CAPABILITY_LIST] & !3);
        while at != 0 && caps.len() < 48 {
            if !(0x40..CONFIG_SPACE_SIZE - 1).contains(&at) {
                break;
            }
            let id = self.bytes[at];
            let cfg_type = if id == PCI_CAP_ID_VNDR {
                self.bytes.get(at + 3).copied().unwrap_or(0)
            } else {
                0
            };
            caps.push(Capability {
                id,
                offset: at,
                cfg_type,
            });
            at = usize::from(self.bytes[at + 1] & !3);
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> PciConfigSpace {
        PciConfigSpace::new(PciIdentity {
            virtio_device_type: 5,
            msix_vectors: 6,
        })
    }

    fn r32(c: &PciConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b, false);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_registers() {
        let c = space();
        assert_eq!(r32(&c, 0), 0x1045_1af4);
        assert_eq!(c.read16(PCI_SUBSYSTEM_VENDOR_ID), 0x1af4);
        assert_eq!(c.bytes[PCI_REVISION_ID], 1);
        assert_eq!(c.bytes[PCI_INTERRUPT_PIN], 1);
        assert_ne!(c.read16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
    }

    #[test]
    fn capability_chain_parses_like_a_driver() {
        let c = space();
        let caps = c.capabilities();
        let kinds: Vec<(u8, u8)> = caps.iter().map(|c| (c.id, c.cfg_type)).collect();
        assert_eq!(
            kinds,
            vec![
                (PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_COMMON_CFG),
                (PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_NOTIFY_CFG),
                (PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_ISR_CFG),
                (PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_DEVICE_CFG),
                (PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_PCI_CFG),
                (PCI_CAP_ID_MSIX, 0),
            ]
        );
        // Each virtio cap points into BAR0 at a distinct, in-bounds window.
        for cap in caps
            .iter()
            .filter(|c| c.id == PCI_CAP_ID_VNDR && c.cfg_type != 5)
        {
            let bar = c.bytes[cap.offset + 4];
            let off = u64::from(c.read32(cap.offset + 8));
            let len = u64::from(c.read32(cap.offset + 12));
            assert_eq!(bar, VIRTIO_BAR);
            assert!(len > 0 && off + len <= BAR0_SIZE, "cap {cap:?}");
        }
        let notify = caps[1].offset;
        assert_eq!(c.bytes[notify + 2], 20);
        assert_eq!(c.read32(notify + 16), NOTIFY_OFF_MULTIPLIER);
        // MSI-X: 6 vectors, table and PBA in BAR1.
        assert_eq!(c.msix_control() & 0x7ff, 5);
        assert_eq!(c.read32(CAP_MSIX + 4), u32::from(MSIX_BAR));
        assert_eq!(c.read32(CAP_MSIX + 8), MSIX_PBA_OFFSET as u32 | 1);
    }

    #[test]
    fn capability_walk_is_bounded_on_a_loop() {
        let mut c = space();
        c.bytes[CAP_MSIX + 1] = CAP_COMMON as u8; // cycle
        assert_eq!(c.capabilities().len(), 48);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = space();
        c.write(PCI_BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(r32(&c, PCI_BAR0), !(BAR0_SIZE as u32 - 1));
        c.write(PCI_BAR0 + 4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(r32(&c, PCI_BAR0 + 4), !(BAR1_SIZE as u32 - 1));
        c.write(PCI_BAR0, &0xfebf_1234u32.to_le_bytes());
        assert_eq!(r32(&c, PCI_BAR0), 0xfebf_0000);
        // Unimplemented BARs stay zero.
        c.write(PCI_BAR0 + 8, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(r32(&c, PCI_BAR0 + 8), 0);
        c.reset();
        assert_eq!(r32(&c, PCI_BAR0), 0);
    }

    #[test]
    fn write_masks() {
        let mut c = space();
        c.write(PCI_VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(r32(&c, 0), 0x1045_1af4);
        c.write(PCI_COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.command(),
            PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE
        );
        c.write(CAP_MSIX_CONTROL, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.msix_control(),
            MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK | 5
        );
        // Capability structure itself is read-only.
        c.write(CAP_COMMON, &[0; 16]);
        assert_eq!(c.capabilities().len(), 6);
        // Out of range: ignored, no panic.
        c.write(250, &[1; 64]);
        c.write(usize::MAX, &[1; 4]);
        let mut big = [0xaau8; 8];
        c.read(252, &mut big, false);
        assert_eq!(&big[4..], &[0, 0, 0, 0]);
    }

    #[test]
    fn interrupt_status_bit_is_live() {
        let c = space();
        let mut b = [0u8; 2];
        c.read(PCI_STATUS, &mut b, true);
        assert_ne!(u16::from_le_bytes(b) & PCI_STATUS_INTERRUPT, 0);
        c.read(PCI_STATUS, &mut b, false);
        assert_eq!(u16::from_le_bytes(b) & PCI_STATUS_INTERRUPT, 0);
    }

    #[test]
    fn pci_cfg_window_is_programmable() {
        let mut c = space();
        c.write(CAP_PCI_CFG + 4, &[0]);
        c.write(CAP_PCI_CFG + 8, &0x2000u32.to_le_bytes());
        c.write(CAP_PCI_CFG + 12, &4u32.to_le_bytes());
        assert_eq!(c.pci_cfg_window(), (0, 0x2000, 4));
    }
}
