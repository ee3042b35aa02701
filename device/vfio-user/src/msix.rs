//! MSI-X table and pending bit array (PCI Local Bus 3.0 §6.8.2), in BAR1.
//!
//! QEMU's vfio-user client emulates the MSI-X *table* itself (it masks
//! vectors by re-routing our eventfds) and forwards only *PBA* reads to the
//! server. Other clients may forward table accesses too. So the table here
//! is fully functional, but its per-vector mask bits only gate delivery once
//! the client has written the table at least once: a client that never
//! touches our table does its own masking, and holding interrupts back on
//! its behalf (entries reset to masked) would lose every interrupt.

use crate::pci::{MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};

const ENTRY_SIZE: u64 = 16;
const VECTOR_CTRL_MASKED: u32 = 1;

/// What to do with an interrupt for a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Send it now (write the vector's eventfd).
    Fire,
    /// Masked: recorded in the PBA, sent at unmask.
    Pending,
    /// MSI-X is disabled, or the vector does not exist.
    Dropped,
}

/// MSI-X state: table entries (addr lo/hi, data, vector control), PBA bits
/// and the enable/function-mask bits of Message Control.
#[derive(Debug)]
pub struct MsixTable {
    entries: Vec<[u32; 4]>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    table_written: bool,
}

impl MsixTable {
    /// A table with `vectors` entries, all masked (PCI reset state).
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors);
        MsixTable {
            entries: vec![[0, 0, 0, VECTOR_CTRL_MASKED]; n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            table_written: false,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    /// True when the table has no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether Message Control has MSI-X enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Applies Message Control (enable, function mask). Returns the vectors
    /// that became deliverable and were pending.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) -> Vec<u16> {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.drain_unmasked()
    }

    /// Back to the reset state.
    pub fn reset(&mut self) {
        *self = MsixTable::new(self.len());
    }

    fn masked(&self, vector: usize) -> bool {
        self.function_masked
            || (self.table_written
                && self
                    .entries
                    .get(vector)
                    .is_none_or(|e| e[3] & VECTOR_CTRL_MASKED != 0))
    }

    /// Decides delivery of an interrupt on `vector`.
    pub fn deliver(&mut self, vector: u16) -> Delivery {
        let v = usize::from(vector);
        if !self.enabled || v >= self.entries.len() {
            return Delivery::Dropped;
        }
        if self.masked(v) {
            self.pending[v / 64] |= 1 << (v % 64);
            Delivery::Pending
        } else {
            Delivery::Fire
        }
    }

    /// Records an interrupt that could not be sent (no eventfd for the
    /// vector yet: QEMU assigns one when the guest unmasks the vector in its
    /// own copy of the table). Readable in the PBA, sent by
    /// [`Self::take_pending`] once an eventfd arrives.
    pub fn set_pending(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v < self.entries.len() {
            self.pending[v / 64] |= 1 << (v % 64);
        }
    }

    /// Clears and returns whether `vector` was pending.
    pub fn take_pending(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        if v >= self.entries.len() || !self.enabled || self.masked(v) {
            return false;
        }
        let was = self.pending[v / 64] & (1 << (v % 64)) != 0;
        self.pending[v / 64] &= !(1 << (v % 64));
        was
    }

    fn drain_unmasked(&mut self) -> Vec<u16> {
        let mut out = Vec::new();
        if !self.enabled {
            return out;
        }
        for v in 0..self.entries.len() {
            if self.pending[v / 64] & (1 << (v % 64)) != 0 && !self.masked(v) {
                self.pending[v / 64] &= !(1 << (v % 64));
                out.push(v as u16);
            }
        }
        out
    }

    /// Reads BAR1 at `offset` (table or PBA). Unaligned or out-of-range
    /// bytes read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .map_or(0, |at| self.read_byte(at));
        }
    }

    fn read_byte(&self, at: u64) -> u8 {
        let table_end = MSIX_TABLE_OFFSET + ENTRY_SIZE * self.entries.len() as u64;
        if (MSIX_TABLE_OFFSET..table_end).contains(&at) {
            let rel = at - MSIX_TABLE_OFFSET;
            let entry = &self.entries[(rel / ENTRY_SIZE) as usize];
            let word = entry[((rel % ENTRY_SIZE) / 4) as usize];
            return word.to_le_bytes()[(rel % 4) as usize];
        }
        let pba_end = MSIX_PBA_OFFSET + 8 * self.pending.len() as u64;
        if (MSIX_PBA_OFFSET..pba_end).contains(&at) {
            let rel = at - MSIX_PBA_OFFSET;
            return self.pending[(rel / 8) as usize].to_le_bytes()[(rel % 8) as usize];
        }
        0
    }

    /// Writes BAR1 at `offset`. Only the table is writable (the PBA is
    /// read-only); the reserved bits of vector control stay zero. Returns the
    /// vectors to fire because they were pending and got unmasked.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<u16> {
        let table_end = MSIX_TABLE_OFFSET + ENTRY_SIZE * self.entries.len() as u64;
        let mut touched = false;
        for (i, &v) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if !(MSIX_TABLE_OFFSET..table_end).contains(&at) {
                continue;
            }
            let rel = at - MSIX_TABLE_OFFSET;
            let entry = &mut self.entries[(rel / ENTRY_SIZE) as usize];
            let word = &mut entry[((rel % ENTRY_SIZE) / 4) as usize];
            let shift = 8 * (rel % 4);
            *word = (*word & !(0xff << shift)) | (u32::from(v) << shift);
            entry[3] &= VECTOR_CTRL_MASKED;
            touched = true;
        }
        if touched {
            self.table_written = true;
        }
        self.drain_unmasked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctrl_offset(v: u64) -> u64 {
        MSIX_TABLE_OFFSET + v * ENTRY_SIZE + 12
    }

    #[test]
    fn disabled_drops() {
        let mut t = MsixTable::new(3);
        assert_eq!(t.deliver(0), Delivery::Dropped);
        t.set_control(true, false);
        assert_eq!(t.deliver(3), Delivery::Dropped);
        assert_eq!(t.deliver(2), Delivery::Fire);
    }

    #[test]
    fn client_emulated_table_is_not_gated_by_our_reset_mask() {
        let mut t = MsixTable::new(2);
        t.set_control(true, false);
        // Entries are masked at reset, but the client never wrote our table.
        assert_eq!(t.deliver(1), Delivery::Fire);
    }

    #[test]
    fn function_mask_sets_pba_then_fires_on_unmask() {
        let mut t = MsixTable::new(2);
        t.set_control(true, true);
        assert_eq!(t.deliver(1), Delivery::Pending);
        let mut pba = [0u8; 8];
        t.read(MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        assert_eq!(t.set_control(true, false), vec![1]);
        t.read(MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
    }

    #[test]
    fn table_entry_mask_and_roundtrip() {
        let mut t = MsixTable::new(4);
        t.set_control(true, false);
        // Program entry 2: address, data, keep masked.
        t.write(MSIX_TABLE_OFFSET + 32, &0xfee0_1000u32.to_le_bytes());
        t.write(MSIX_TABLE_OFFSET + 36, &0u32.to_le_bytes());
        t.write(MSIX_TABLE_OFFSET + 40, &0x4041u32.to_le_bytes());
        let mut e = [0u8; 16];
        t.read(MSIX_TABLE_OFFSET + 32, &mut e);
        assert_eq!(&e[0..4], &0xfee0_1000u32.to_le_bytes());
        assert_eq!(&e[8..12], &0x4041u32.to_le_bytes());
        assert_eq!(&e[12..16], &1u32.to_le_bytes());
        // Table now driven by the client: masked entries hold interrupts.
        assert_eq!(t.deliver(2), Delivery::Pending);
        // Reserved control bits are dropped; unmask fires the pending one.
        assert_eq!(
            t.write(ctrl_offset(2), &0xffff_fffeu32.to_le_bytes()),
            vec![2]
        );
        t.read(ctrl_offset(2), &mut e[..4]);
        assert_eq!(&e[..4], &0u32.to_le_bytes());
        assert_eq!(t.deliver(2), Delivery::Fire);
    }

    #[test]
    fn pending_without_eventfd_is_kept_until_taken() {
        let mut t = MsixTable::new(2);
        t.set_control(true, false);
        t.set_pending(1);
        t.set_pending(9); // out of range: ignored
        let mut pba = [0u8; 8];
        t.read(MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert!(!t.take_pending(0));
        assert!(t.take_pending(1));
        assert!(!t.take_pending(1));
    }

    #[test]
    fn pba_is_read_only_and_bounds_are_safe() {
        let mut t = MsixTable::new(2);
        t.set_control(true, true);
        t.deliver(0);
        t.write(MSIX_PBA_OFFSET, &[0; 8]);
        let mut pba = [0u8; 8];
        t.read(MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(pba[0], 1);
        t.write(u64::MAX - 2, &[1; 8]);
        let mut junk = [0xffu8; 8];
        t.read(u64::MAX - 2, &mut junk);
        assert_eq!(junk, [0; 8]);
        t.reset();
        assert!(!t.enabled());
        t.read(MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(pba[0], 0);
    }
}
