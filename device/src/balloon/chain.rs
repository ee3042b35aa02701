// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Reading one descriptor chain of a split virtqueue out of guest memory.
//!
//! The device walks chains itself rather than with virtio-queue's
//! `DescriptorChain` iterator:
//! - every descriptor is read from guest memory **once**, and its flags,
//!   address, length and `next` are all taken from that one copy, so a guest
//!   rewriting a descriptor meanwhile cannot make a check and the use see
//!   different values;
//! - `VIRTQ_DESC_F_INDIRECT` is refused on **any** descriptor of the chain
//!   unless `VIRTIO_RING_F_INDIRECT_DESC` was negotiated (the iterator
//!   follows an indirect table wherever it finds one).
//!
//! With the feature, an indirect descriptor must not also have NEXT and must
//! not sit inside an indirect table, and its table must be a non-empty
//! multiple of 16 bytes (virtio 1.2 §2.7.5.3.1). Chains are bounded by the
//! table they live in and by [`MAX_CHAIN_DESCRIPTORS`] (the iterator bounds
//! an indirect table only by its length, up to 65535 entries).
//!
//! The bytes of an accepted chain are then read and written with
//! virtio-queue's own [`Reader`] and [`Writer`]. Those are built only from a
//! `DescriptorChain`, which would walk the guest's table a second time (a
//! guest could change it in between). So [`ShadowQueue`] copies the
//! accepted descriptors, as one direct chain, into a small split queue in
//! host memory the guest cannot reach, and the `Reader`/`Writer` walk that
//! copy: they see exactly the descriptors that were checked.

use std::num::Wrapping;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{BalloonError, MAX_CHAIN_DESCRIPTORS};

/// Size of a split-queue descriptor.
const DESC_SIZE: u64 = 16;

/// One descriptor of a chain, as read from the descriptor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Desc {
    pub(super) addr: u64,
    pub(super) len: u32,
    pub(super) write: bool,
}

/// Why a chain was rejected before looking at its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChainError {
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors, more than its table
    /// holds (a loop), a `next` beyond the table, or over 4 GiB in total.
    TooLong,
    /// A descriptor, or the buffer it names, is not in guest memory.
    OutOfMemory,
    /// An indirect descriptor without `VIRTIO_RING_F_INDIRECT_DESC`.
    IndirectNotNegotiated,
    /// An indirect descriptor with NEXT, inside an indirect table, or with
    /// an empty or misaligned table.
    BadIndirect,
}

/// A descriptor table: guest-physical address and number of entries.
#[derive(Clone, Copy, Debug)]
pub(super) struct DescTable {
    pub(super) addr: u64,
    pub(super) entries: u16,
}

/// Walks the chain starting at `head` of `table`, reading each descriptor
/// with `read` exactly once, into `out` (cleared first). `read` returns
/// `None` for an address outside guest memory.
pub(super) fn read_chain(
    read: &mut impl FnMut(GuestAddress) -> Option<SplitDescriptor>,
    table: DescTable,
    head: u16,
    indirect_ok: bool,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = table;
    let mut index = head;
    let mut budget = table.entries;
    let mut in_indirect = false;
    let mut total = 0u32;
    loop {
        if index >= table.entries || budget == 0 {
            return Err(ChainError::TooLong);
        }
        budget -= 1;
        let addr = table
            .addr
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::OutOfMemory)?;
        let d = read(GuestAddress(addr)).ok_or(ChainError::OutOfMemory)?;
        if d.refers_to_indirect_table() {
            table = indirect_table(&d, indirect_ok, in_indirect)?;
            (index, budget, in_indirect) = (0, table.entries, true);
            continue;
        }
        if out.len() == MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        total = total.checked_add(d.len()).ok_or(ChainError::TooLong)?;
        out.push(Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        });
        if !d.has_next() {
            return Ok(());
        }
        index = d.next();
    }
}

/// The table an indirect descriptor `d` points to, if it may be followed.
fn indirect_table(
    d: &SplitDescriptor,
    indirect_ok: bool,
    in_indirect: bool,
) -> Result<DescTable, ChainError> {
    if !indirect_ok {
        return Err(ChainError::IndirectNotNegotiated);
    }
    let len = u64::from(d.len());
    if in_indirect || d.has_next() || len == 0 || len % DESC_SIZE != 0 {
        return Err(ChainError::BadIndirect);
    }
    // Longer tables than the device follows are cut by MAX_CHAIN_DESCRIPTORS.
    let entries = u16::try_from(len / DESC_SIZE).unwrap_or(u16::MAX);
    Ok(DescTable {
        addr: d.addr().0,
        entries,
    })
}

/// Reads the chain at `head` of `table` from `mem` (see [`read_chain`]) and
/// checks every buffer lies in guest memory.
pub(super) fn collect_chain(
    mem: &GuestMemoryMmap,
    table: DescTable,
    head: u16,
    indirect_ok: bool,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    let mut read = |a: GuestAddress| mem.read_obj::<SplitDescriptor>(a).ok();
    read_chain(&mut read, table, head, indirect_ok, out)?;
    let outside = out
        .iter()
        .any(|d| d.len > 0 && !mem.check_range(GuestAddress(d.addr), d.len as usize));
    if outside {
        Err(ChainError::OutOfMemory)
    } else {
        Ok(())
    }
}

/// Entries of the shadow queue: a whole accepted chain fits (a power of
/// two, as a split queue's size must be).
const SHADOW_ENTRIES: u16 = MAX_CHAIN_DESCRIPTORS as u16;
/// Shadow queue layout in its private memory: the descriptor table, then
/// the available ring (4 + 2 * entries + 2 bytes) and the used ring (never
/// written: the shadow only hands out chains).
const SHADOW_DESC_TABLE: u64 = 0;
const SHADOW_AVAIL_RING: u64 = SHADOW_ENTRIES as u64 * DESC_SIZE;
const SHADOW_USED_RING: u64 = SHADOW_AVAIL_RING + 4096;
const SHADOW_BYTES: usize = (SHADOW_USED_RING + 8192) as usize;

// The shadow must hold the longest chain the device accepts.
const _: () = assert!(SHADOW_ENTRIES.is_power_of_two());
const _: () = assert!(SHADOW_ENTRIES as usize == MAX_CHAIN_DESCRIPTORS);
const _: () = assert!(SHADOW_AVAIL_RING + 4 + 2 * SHADOW_ENTRIES as u64 + 2 <= SHADOW_USED_RING);

/// A split virtqueue in host memory the guest cannot reach, through which
/// accepted chains are handed to virtio-queue's [`Reader`] and [`Writer`]
/// (see the module docs).
pub(super) struct ShadowQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: Wrapping<u16>,
}

impl ShadowQueue {
    /// Maps the shadow queue's memory and sets the queue up.
    pub(super) fn new() -> Result<Self, BalloonError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SHADOW_BYTES)])
            .map_err(|e| BalloonError::ShadowMemory(e.to_string()))?;
        let mut queue =
            Queue::new(SHADOW_ENTRIES).map_err(|e| BalloonError::ShadowMemory(e.to_string()))?;
        let low = |a: u64| Some(a as u32);
        queue.set_size(SHADOW_ENTRIES);
        queue.set_desc_table_address(low(SHADOW_DESC_TABLE), Some(0));
        queue.set_avail_ring_address(low(SHADOW_AVAIL_RING), Some(0));
        queue.set_used_ring_address(low(SHADOW_USED_RING), Some(0));
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return Err(BalloonError::ShadowMemory("invalid queue layout".into()));
        }
        Ok(Self {
            mem,
            queue,
            avail_idx: Wrapping(0),
        })
    }

    /// A [`Reader`] over the readable and a [`Writer`] over the writable
    /// bytes of `descs` (an accepted chain, at most
    /// [`MAX_CHAIN_DESCRIPTORS`], every buffer checked against `mem`), in
    /// chain order. `None` if a buffer is not in `mem` after all.
    pub(super) fn reader_writer<'a>(
        &mut self,
        mem: &'a GuestMemoryMmap,
        descs: &[Desc],
    ) -> Option<(Reader<'a>, Writer<'a>)> {
        let chain = self.load(descs)?;
        let reader = Reader::new(mem, chain.clone()).ok()?;
        let writer = Writer::new(mem, chain).ok()?;
        Some((reader, writer))
    }

    /// Copies `descs` into the shadow table as one direct chain (empty
    /// buffers left out: they carry no bytes) and pops it.
    fn load(&mut self, descs: &[Desc]) -> Option<DescriptorChain<&GuestMemoryMmap>> {
        let descs = || descs.iter().filter(|d| d.len > 0);
        let n = descs().count();
        if n > usize::from(SHADOW_ENTRIES) {
            return None;
        }
        for (i, d) in descs().enumerate() {
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            // The flags are bits 0 and 1, and `i + 1 <= n <= SHADOW_ENTRIES`:
            // both fit in u16.
            let desc = SplitDescriptor::new(d.addr, d.len, flags as u16, (i + 1) as u16);
            let at = SHADOW_DESC_TABLE + i as u64 * DESC_SIZE;
            self.mem.write_obj(desc, GuestAddress(at)).ok()?;
        }
        if n == 0 {
            // An empty direct chain: one empty descriptor.
            let desc = SplitDescriptor::new(0, 0, 0, 0);
            self.mem
                .write_obj(desc, GuestAddress(SHADOW_DESC_TABLE))
                .ok()?;
        }
        let slot = u64::from(self.avail_idx.0 % SHADOW_ENTRIES);
        let ring = GuestAddress(SHADOW_AVAIL_RING + 4 + 2 * slot);
        self.mem.write_obj(0u16, ring).ok()?;
        self.avail_idx += 1;
        let idx = GuestAddress(SHADOW_AVAIL_RING + 2);
        self.mem.write_obj(self.avail_idx.0, idx).ok()?;
        self.queue.pop_descriptor_chain(&self.mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> SplitDescriptor {
        SplitDescriptor::new(addr, len, flags, next)
    }

    /// A descriptor table in a map; counts reads per address, and returns
    /// `flipped` instead of the stored descriptor on any read after the
    /// first (a guest rewriting the descriptor while the device looks).
    struct Guest {
        descs: HashMap<u64, SplitDescriptor>,
        flipped: HashMap<u64, SplitDescriptor>,
        reads: HashMap<u64, u32>,
    }

    impl Guest {
        fn new(descs: &[(u64, SplitDescriptor)]) -> Self {
            Self {
                descs: descs.iter().copied().collect(),
                flipped: HashMap::new(),
                reads: HashMap::new(),
            }
        }

        fn walk(
            &mut self,
            head: u16,
            entries: u16,
            indirect_ok: bool,
        ) -> Result<Vec<Desc>, ChainError> {
            let mut out = Vec::new();
            let mut read = |a: GuestAddress| {
                let n = self.reads.entry(a.0).or_default();
                *n += 1;
                let flipped = self.flipped.get(&a.0).filter(|_| *n > 1);
                flipped.or(self.descs.get(&a.0)).copied()
            };
            let table = DescTable { addr: 0, entries };
            read_chain(&mut read, table, head, indirect_ok, &mut out).map(|()| out)
        }
    }

    #[test]
    fn direct_chain_in_order() {
        let mut g = Guest::new(&[
            (0, desc(0x1000, 4, NEXT, 2)),
            (32, desc(0x2000, 8, WRITE, 0)),
        ]);
        let chain = g.walk(0, 4, false).unwrap();
        assert_eq!(
            chain,
            vec![
                Desc {
                    addr: 0x1000,
                    len: 4,
                    write: false
                },
                Desc {
                    addr: 0x2000,
                    len: 8,
                    write: true
                },
            ]
        );
    }

    #[test]
    fn each_descriptor_is_read_once() {
        // The head says "direct"; any second read would say "indirect".
        let mut g = Guest::new(&[(0, desc(0x1000, 4, NEXT, 1)), (16, desc(0x2000, 4, 0, 0))]);
        g.flipped.insert(0, desc(0x5000, 16, INDIRECT, 0));
        assert_eq!(g.walk(0, 2, false).unwrap().len(), 2);
        assert!(g.reads.values().all(|&n| n == 1), "reads: {:?}", g.reads);
    }

    #[test]
    fn indirect_anywhere_needs_the_feature() {
        let table = [(0x100, desc(0x3000, 4, 0, 0))];
        let chain = [
            (0, desc(0x1000, 4, NEXT, 1)),
            (16, desc(0x100, 16, INDIRECT, 0)),
        ];
        let mut g = Guest::new(&[table[0], chain[0], chain[1]]);
        assert_eq!(g.walk(0, 2, false), Err(ChainError::IndirectNotNegotiated));
        let mut g = Guest::new(&[table[0], chain[0], chain[1]]);
        assert_eq!(g.walk(0, 2, true).unwrap().len(), 2);
        // The head itself.
        let mut g = Guest::new(&[table[0], (0, desc(0x100, 16, INDIRECT, 0))]);
        assert_eq!(g.walk(0, 1, false), Err(ChainError::IndirectNotNegotiated));
    }

    #[test]
    fn malformed_indirect_descriptors() {
        let cases = [
            desc(0x100, 16, INDIRECT | NEXT, 1), // with NEXT
            desc(0x100, 0, INDIRECT, 0),         // empty table
            desc(0x100, 24, INDIRECT, 0),        // misaligned length
        ];
        for d in cases {
            let mut g = Guest::new(&[(0, d), (0x100, desc(0x3000, 4, 0, 0))]);
            assert_eq!(g.walk(0, 2, true), Err(ChainError::BadIndirect), "{d:?}");
        }
        // Nested: an indirect descriptor inside the table.
        let mut g = Guest::new(&[
            (0, desc(0x100, 16, INDIRECT, 0)),
            (0x100, desc(0x200, 16, INDIRECT, 0)),
        ]);
        assert_eq!(g.walk(0, 1, true), Err(ChainError::BadIndirect));
    }

    #[test]
    fn loops_and_bad_next_are_too_long() {
        let mut g = Guest::new(&[
            (0, desc(0x1000, 4, NEXT, 1)),
            (16, desc(0x1000, 4, NEXT, 0)),
        ]);
        assert_eq!(g.walk(0, 2, false), Err(ChainError::TooLong));
        let mut g = Guest::new(&[(0, desc(0x1000, 4, NEXT, 9))]);
        assert_eq!(g.walk(0, 2, false), Err(ChainError::TooLong));
        // Over 4 GiB in total.
        let mut g = Guest::new(&[(0, desc(0, u32::MAX, NEXT, 1)), (16, desc(0, 2, 0, 0))]);
        assert_eq!(g.walk(0, 2, false), Err(ChainError::TooLong));
        // Unreadable descriptor.
        let mut g = Guest::new(&[(0, desc(0x1000, 4, NEXT, 1))]);
        assert_eq!(g.walk(0, 2, false), Err(ChainError::OutOfMemory));
    }

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn d(addr: u64, len: u32, write: bool) -> Desc {
        Desc { addr, len, write }
    }

    #[test]
    fn shadow_reader_and_writer_follow_the_accepted_chain() {
        use std::io::{Read, Write};
        let mem = guest();
        mem.write_slice(b"head", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"tail", GuestAddress(0x3000)).unwrap();
        let chain = [
            d(0x1000, 4, false),
            d(0x9000, 0, false), // empty: left out
            d(0x3000, 4, false),
            d(0x5000, 2, true),
            d(0x6000, 3, true),
        ];
        let mut shadow = ShadowQueue::new().unwrap();
        // Many chains through the same shadow (its ring wraps).
        for _ in 0..(3 * SHADOW_ENTRIES) {
            let (mut r, mut w) = shadow.reader_writer(&mem, &chain).unwrap();
            assert_eq!((r.available_bytes(), w.available_bytes()), (8, 5));
            let mut got = [0u8; 8];
            r.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"headtail");
            w.write_all(b"abcde").unwrap();
        }
        let mut out = [0u8; 3];
        mem.read_slice(&mut out, GuestAddress(0x6000)).unwrap();
        assert_eq!(&out, b"cde");
    }

    #[test]
    fn shadow_takes_the_longest_chain_and_refuses_buffers_outside_memory() {
        let mem = guest();
        let long: Vec<Desc> = (0..MAX_CHAIN_DESCRIPTORS as u64)
            .map(|i| d(0x10 * i, 1, false))
            .collect();
        let mut shadow = ShadowQueue::new().unwrap();
        let (r, w) = shadow.reader_writer(&mem, &long).unwrap();
        assert_eq!((r.available_bytes(), w.available_bytes()), (long.len(), 0));
        assert!(shadow
            .reader_writer(&mem, &[d(0xff_0000, 4, false)])
            .is_none());
        let (r, w) = shadow.reader_writer(&mem, &[]).unwrap();
        assert_eq!((r.available_bytes(), w.available_bytes()), (0, 0));
    }
}
