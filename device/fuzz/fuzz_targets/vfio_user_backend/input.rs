//! The input decoder: a cursor over the fuzzer's bytes and the generators
//! of addresses, sizes, regions and offsets worth trying.

use crate::{CFG, PAGE};
use freehint_vfio_user::pci::{
    CAP_COMMON, CAP_DEVICE, CAP_ISR, CAP_MSIX, CAP_MSIX_CONTROL, CAP_NOTIFY, CAP_PCI_CFG,
    CAP_PCI_CFG_DATA, CONFIG_SPACE_SIZE,
};

pub(crate) struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    pub(crate) fn done(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// A length byte (below `max`), then that many bytes.
    pub(crate) fn short_bytes(&mut self, max: u8) -> Vec<u8> {
        let n = self.u8() % max;
        self.bytes(usize::from(n))
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    pub(crate) fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[usize::from(self.u8()) % xs.len()]
    }
}

/// Generator modes the seed encoder uses (the decoder's first byte).
pub(crate) mod gen {
    /// Address: a u8 page index follows.
    pub const ADDR_PAGE: u8 = 0;
    /// Address: a raw u64 follows.
    pub const ADDR_RAW: u8 = 5;
    /// Size: 1 + a u8 pages.
    pub const SIZE_PAGES: u8 = 0;
    /// Size: a raw u64 follows.
    pub const SIZE_RAW: u8 = 4;
    /// Fd offset: the address (what QEMU passes for RAM).
    pub const OFF_SAME: u8 = 0;
}

/// A guest address: a page (u8 or u16 index), raw, the top of the address
/// space, or unaligned.
pub(crate) fn gen_addr(c: &mut Cursor) -> u64 {
    match c.u8() % 8 {
        0..=3 => u64::from(c.u8()) * PAGE,
        4 => u64::from(c.u16()) * PAGE,
        5 => c.u64(),
        6 => 0u64.wrapping_sub((1 + u64::from(c.u8())) * PAGE),
        _ => u64::from(c.u8()),
    }
}

/// A DMA size: pages, raw, zero, or near overflow.
pub(crate) fn gen_size(c: &mut Cursor) -> u64 {
    match c.u8() % 8 {
        0..=3 => (1 + u64::from(c.u8())) * PAGE,
        4 => c.u64(),
        5 => 0,
        6 => u64::from(c.u32()),
        _ => u64::MAX - u64::from(c.u8()),
    }
}

pub(crate) fn gen_offset(c: &mut Cursor, addr: u64) -> u64 {
    match c.u8() % 8 {
        0..=3 => addr,
        4 | 5 => u64::from(c.u8()) * PAGE,
        6 => c.u64(),
        _ => u64::from(c.u16()),
    }
}

/// Interesting offsets of each region (the decoder adds -4..+11).
pub(crate) const BAR0_POINTS: &[u64] = &[
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x24, 0x28,
    0x2c, 0x30, 0x34, 0x38, 0x3a, 0x3c, 0x800, 0x1000, 0x2000, 0x2004, 0x2008, 0x200c, 0x2010,
    0x2ffc, 0x3000, 0x3004, 0x3008, 0x300c, 0x3010, 0x3014, 0x3ffc, 0x3ff8,
];
pub(crate) const BAR1_POINTS: &[u64] = &[
    0, 8, 12, 16, 28, 44, 60, 76, 92, 0x60, 0x7f8, 0x800, 0x808, 0xff8,
];
pub(crate) const CFG_POINTS: &[u64] = &[
    0x00,
    0x04,
    0x06,
    0x08,
    0x0c,
    0x10,
    0x14,
    0x18,
    0x2c,
    0x34,
    0x3c,
    CAP_COMMON as u64,
    CAP_NOTIFY as u64,
    CAP_ISR as u64,
    CAP_DEVICE as u64,
    CAP_PCI_CFG as u64,
    CAP_PCI_CFG as u64 + 4,
    CAP_PCI_CFG as u64 + 8,
    CAP_PCI_CFG as u64 + 12,
    CAP_PCI_CFG_DATA as u64,
    CAP_MSIX as u64,
    CAP_MSIX_CONTROL as u64,
    CAP_MSIX as u64 + 4,
    0xa4,
    0xfc,
];

pub(crate) fn gen_region(c: &mut Cursor) -> u32 {
    match c.u8() % 16 {
        0..=5 => 0,
        6..=8 => 1,
        9..=12 => CFG,
        13 => u32::from(c.u8() % 10),
        14 => c.u32(),
        _ => 8,
    }
}

pub(crate) fn gen_region_offset(c: &mut Cursor, region: u32) -> u64 {
    let points = match region {
        0 => BAR0_POINTS,
        1 => BAR1_POINTS,
        CFG => CFG_POINTS,
        _ => &[0u64][..],
    };
    match c.u8() % 8 {
        0..=4 => {
            let base = c.pick(points);
            base.wrapping_add(u64::from(c.u8() % 16)).wrapping_sub(4)
        }
        5 => u64::from(c.u16()) % 0x4100,
        6 => c.u64(),
        _ => u64::MAX - u64::from(c.u8()),
    }
}

pub(crate) fn gen_len(c: &mut Cursor) -> usize {
    match c.u8() % 16 {
        0..=3 => 1 << (c.u8() % 4),
        4..=5 => 4,
        6 => 0,
        7 => 3,
        8 => 16,
        9 => CONFIG_SPACE_SIZE,
        10 => usize::from(c.u8()),
        11 => usize::from(c.u16() % 4097),
        _ => 2,
    }
}
