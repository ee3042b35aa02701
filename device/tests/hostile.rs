// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! A hostile guest: one named test per malformed input. Each must end in a
//! counted drop (asserted on the metric) or a clear error, never a panic,
//! and the device must keep working afterwards.

use freehint_device::balloon::*;
use freehint_device::test_utils::*;
use freehint_device::VirtioDevice;
use freehint_protocol::balloon::{encode_stat, VIRTIO_BALLOON_S_MEMFREE};
use freehint_protocol::bitmap_hint::{
    ChunkHeader, Message, MsgHeader, KIND_CHUNK, LAYOUT_REPLY_MAX, MAX_CHUNK_BITS, MSG_MAGIC,
};
use freehint_protocol::layout::Bit;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const MIB: u64 = 1 << 20;
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

fn drv() -> BalloonDriver {
    let layout = Layout::from_ram_byte_ranges(&[(0, 16 * MIB)]).unwrap();
    BalloonDriver::new(BalloonConfig::all_features(layout), !0, 64)
}

fn standard_drv() -> BalloonDriver {
    let layout = Layout::from_ram_byte_ranges(&[(0, 16 * MIB)]).unwrap();
    let f = !feature(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP);
    BalloonDriver::new(BalloonConfig::all_features(layout), f, 64)
}

fn metrics(d: &BalloonDriver) -> MetricsSnapshot {
    d.handle().metrics().snapshot()
}

/// The device still works: an inflate of one page is processed.
/// A guest vCPU rewriting one descriptor's flags, between `F_INDIRECT` and
/// another value, while the device reads the chain.
struct Flipper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Flipper {
    /// Starts flipping the flags at `flags_at` in `d`'s guest memory.
    fn start(d: &BalloonDriver, flags_at: GuestAddress, other: u16) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mem, flag) = (d.mem.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let m = mem.memory();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                m.write_obj(F_INDIRECT, flags_at).unwrap();
                m.write_obj(other, flags_at).unwrap();
            }
        });
        Self { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// Kicks `kind`'s queue, whose descriptor 0 is in the available ring, then
/// republishes it and kicks again until `done(d, chains)`; returns the
/// chains kicked.
fn kick_until(
    d: &mut BalloonDriver,
    kind: QueueKind,
    mut done: impl FnMut(&BalloonDriver, u32) -> bool,
) -> u32 {
    let mut chains = 1;
    d.kick(kind);
    while !done(d, chains) {
        let mem = d.m();
        d.queue(kind).publish(&mem, 0);
        drop(mem);
        d.kick(kind);
        chains += 1;
    }
    chains
}

fn still_works(d: &mut BalloonDriver) {
    let before = metrics(d).inflate_pages;
    let used = d.inflate(&[3]);
    assert_eq!(used.len(), 1);
    assert_eq!(metrics(d).inflate_pages, before + 1);
}

fn started_round(d: &mut BalloonDriver) -> u32 {
    let h = d.hints();
    let id = h.start_round(&h.new_epoch()).unwrap();
    assert!(d.layout_query(id).is_some());
    id
}

#[test]
fn descriptor_chain_too_long() {
    let mut d = drv();
    // An indirect table of 600 descriptors (> MAX_CHAIN_DESCRIPTORS).
    let pfns = d.alloc(4);
    d.m().write_obj(5u32, GuestAddress(pfns)).unwrap();
    let table = d.alloc(16 * 600);
    let descs: Vec<Descriptor> = (0..600u16)
        .map(|i| Descriptor::new(pfns, 4, if i < 599 { F_NEXT } else { 0 }, i + 1))
        .collect();
    let mem = d.m();
    d.queue(QueueKind::Inflate)
        .add_indirect(&mem, table, &descs)
        .unwrap();
    drop(mem);
    let used = d.kick(QueueKind::Inflate);
    assert_eq!(used.len(), 1, "still returned to the driver");
    assert_eq!(metrics(&d).chain_too_long, 1);
    assert_eq!(metrics(&d).inflate_pages, 0, "nothing of it was processed");
    still_works(&mut d);
}

/// An inflate of pfn 5 through a one-entry indirect table.
fn inflate_indirect(d: &mut BalloonDriver) -> Vec<(u16, u32)> {
    let pfns = d.alloc(4);
    d.m().write_obj(5u32, GuestAddress(pfns)).unwrap();
    let table = d.alloc(16);
    let desc = Descriptor::new(pfns, 4, 0, 0);
    let mem = d.m();
    d.queue(QueueKind::Inflate)
        .add_indirect(&mem, table, &[desc])
        .unwrap();
    drop(mem);
    d.kick(QueueKind::Inflate)
}

#[test]
fn indirect_chain_is_followed_when_negotiated() {
    let mut d = drv();
    assert!(has_feature(
        d.handle().acked_features(),
        VIRTIO_RING_F_INDIRECT_DESC
    ));
    assert_eq!(inflate_indirect(&mut d).len(), 1);
    assert_eq!(metrics(&d).inflate_pages, 1);
    assert_eq!(metrics(&d).indirect_not_negotiated, 0);
}

#[test]
fn indirect_chain_without_the_feature() {
    let layout = Layout::from_ram_byte_ranges(&[(0, 16 * MIB)]).unwrap();
    let f = !feature(VIRTIO_RING_F_INDIRECT_DESC);
    let mut d = BalloonDriver::new(BalloonConfig::all_features(layout), f, 64);
    let used = inflate_indirect(&mut d);
    assert_eq!(used.len(), 1, "still returned to the driver");
    assert_eq!(metrics(&d).indirect_not_negotiated, 1);
    assert_eq!(metrics(&d).inflate_pages, 0, "nothing of it was processed");
    still_works(&mut d);
}

fn no_indirect_drv() -> BalloonDriver {
    let layout = Layout::from_ram_byte_ranges(&[(0, 16 * MIB)]).unwrap();
    let f = !feature(VIRTIO_RING_F_INDIRECT_DESC);
    BalloonDriver::new(BalloonConfig::all_features(layout), f, 64)
}

/// An indirect table at `table` holding one buffer with pfn `pfn`.
fn pfn_table(d: &mut BalloonDriver, pfn: u32) -> u64 {
    let buf = d.alloc(4);
    d.m().write_obj(pfn, GuestAddress(buf)).unwrap();
    let table = d.alloc(16);
    let entry = Descriptor::new(buf, 4, 0, 0);
    write_descs(&d.m(), table, &[entry]);
    table
}

/// A chain whose second descriptor is indirect: refused as a whole
/// without INDIRECT_DESC, like an indirect head.
#[test]
fn indirect_descriptor_after_the_head_without_the_feature() {
    let mut d = no_indirect_drv();
    let first = d.alloc(4);
    d.m().write_obj(3u32, GuestAddress(first)).unwrap();
    let table = pfn_table(&mut d, 5);
    let descs = [
        Descriptor::new(first, 4, F_NEXT, 1),
        Descriptor::new(table, 16, F_INDIRECT, 0),
    ];
    let mem = d.m();
    d.queue(QueueKind::Inflate).add_raw(&mem, &descs, 0);
    drop(mem);
    assert_eq!(d.kick(QueueKind::Inflate).len(), 1, "still returned");
    assert_eq!(metrics(&d).indirect_not_negotiated, 1);
    assert_eq!(metrics(&d).inflate_pages, 0, "nothing of it was processed");
    still_works(&mut d);
}

/// With INDIRECT_DESC: an indirect descriptor that also has NEXT, and one
/// inside an indirect table, are malformed (virtio 1.2 §2.7.5.3.1).
#[test]
fn malformed_indirect_descriptors() {
    let mut d = drv();
    let table = pfn_table(&mut d, 5);
    let buf = d.alloc(4);
    let with_next = [
        Descriptor::new(table, 16, F_INDIRECT | F_NEXT, 1),
        Descriptor::new(buf, 4, 0, 0),
    ];
    let mem = d.m();
    d.queue(QueueKind::Inflate).add_raw(&mem, &with_next, 0);
    drop(mem);
    assert_eq!(d.kick(QueueKind::Inflate).len(), 1);
    assert_eq!(metrics(&d).bad_indirect, 1);
    let nested = Descriptor::new(table, 16, F_INDIRECT, 0);
    let outer = d.alloc(16);
    let mem = d.m();
    d.queue(QueueKind::Inflate)
        .add_indirect(&mem, outer, &[nested])
        .unwrap();
    drop(mem);
    assert_eq!(d.kick(QueueKind::Inflate).len(), 1);
    assert_eq!(metrics(&d).bad_indirect, 2);
    assert_eq!(metrics(&d).inflate_pages, 0);
    still_works(&mut d);
}

/// A guest flips the head descriptor's flags between NEXT (a chain that
/// loops back to itself) and INDIRECT while the device processes it, over
/// and over, without INDIRECT_DESC. The device reads each descriptor once:
/// it either refuses the indirect descriptor or drops the loop, and never
/// follows the table (which would inflate pfn 5). Reading the flags twice
/// (once to check, once to walk) lets the table through.
#[test]
fn head_flags_rewritten_during_processing_are_read_once() {
    const MIN_CHAINS: u32 = 20_000;
    const MAX_CHAINS: u32 = 1_000_000;
    let mut d = no_indirect_drv();
    let table = pfn_table(&mut d, 5);
    let head = Descriptor::new(table, 16, F_NEXT, 0);
    let flags_at = GuestAddress(d.queue(QueueKind::Inflate).desc_table + 12);
    let mem = d.m();
    d.queue(QueueKind::Inflate).add_raw(&mem, &[head], 0);
    drop(mem);
    let flipper = Flipper::start(&d, flags_at, F_NEXT);
    let chains = kick_until(&mut d, QueueKind::Inflate, |d, chains| {
        let m = metrics(d);
        let both_seen = m.indirect_not_negotiated > 0 && m.chain_too_long > 0;
        m.inflate_pages > 0 || chains >= MAX_CHAINS || (both_seen && chains >= MIN_CHAINS)
    });
    flipper.stop();
    let m = metrics(&d);
    assert_eq!(
        m.inflate_pages, 0,
        "an indirect table was followed without INDIRECT_DESC ({chains} chains)"
    );
    assert!(
        m.indirect_not_negotiated > 0 && m.chain_too_long > 0,
        "the guest's flips were never seen: {m:?}"
    );
    assert_eq!(
        m.indirect_not_negotiated + m.chain_too_long,
        u64::from(chains)
    );
}

/// The bytes of a free page chain are read from the descriptors the device
/// checked, not from the guest's table again: the head of a command id
/// chain flips between a direct 16-byte buffer and an indirect table (no
/// INDIRECT_DESC) whose one buffer holds the round's id. The device either
/// refuses the indirect head or reads 16 bytes (not a command); it never
/// reads the id through the table, so the round is never started.
#[test]
fn free_page_chain_bytes_come_from_the_checked_descriptors() {
    const MIN_CHAINS: u32 = 5_000;
    const MAX_CHAINS: u32 = 500_000;
    let layout = Layout::from_ram_byte_ranges(&[(0, 16 * MIB)]).unwrap();
    let f = !feature(VIRTIO_RING_F_INDIRECT_DESC) & !feature(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP);
    let mut d = BalloonDriver::new(BalloonConfig::all_features(layout), f, 64);
    let id = d.hints().start_round(&d.hints().new_epoch()).unwrap();
    let buf = d.alloc(4);
    d.m().write_obj(id, GuestAddress(buf)).unwrap();
    let table = d.alloc(16);
    let entry = Descriptor::new(buf, 4, 0, 0);
    write_descs(&d.m(), table, &[entry]);
    let head = Descriptor::new(table, 16, 0, 0);
    let flags_at = GuestAddress(d.queue(QueueKind::FreePage).desc_table + 12);
    let mem = d.m();
    d.queue(QueueKind::FreePage).add_raw(&mem, &[head], 0);
    drop(mem);
    let flipper = Flipper::start(&d, flags_at, 0);
    let chains = kick_until(&mut d, QueueKind::FreePage, |d, chains| {
        let m = metrics(d);
        let both_seen = m.indirect_not_negotiated > 0 && m.hint_bad_cmd_buffer > 0;
        let started = d.hints().status().state != RoundState::Requested;
        started || chains >= MAX_CHAINS || (both_seen && chains >= MIN_CHAINS)
    });
    flipper.stop();
    assert_eq!(
        d.hints().status().state,
        RoundState::Requested,
        "the id was read through an indirect table without INDIRECT_DESC ({chains} chains)"
    );
    let m = metrics(&d);
    assert!(
        m.indirect_not_negotiated > 0 && m.hint_bad_cmd_buffer > 0,
        "the guest's flips were never seen: {m:?}"
    );
    assert_eq!(
        m.indirect_not_negotiated + m.hint_bad_cmd_buffer,
        u64::from(chains)
    );
}

#[test]
fn looping_descriptor_chain() {
    let mut d = drv();
    let buf = d.alloc(4);
    let descs = [
        Descriptor::new(buf, 4, F_NEXT, 1),
        Descriptor::new(buf, 4, F_NEXT, 0),
    ];
    let mem = d.m();
    d.queue(QueueKind::FreePage).add_raw(&mem, &descs, 0);
    drop(mem);
    let used = d.kick(QueueKind::FreePage);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(metrics(&d).chain_too_long, 1);
    still_works(&mut d);
}

#[test]
fn chain_next_beyond_queue() {
    let mut d = drv();
    let buf = d.alloc(4);
    let descs = [Descriptor::new(buf, 4, F_NEXT, 1000)];
    let mem = d.m();
    d.queue(QueueKind::Deflate).add_raw(&mem, &descs, 0);
    drop(mem);
    assert_eq!(d.kick(QueueKind::Deflate).len(), 1);
    assert_eq!(metrics(&d).chain_too_long, 1);
}

#[test]
fn available_head_beyond_queue() {
    let mut d = drv();
    let mem = d.m();
    d.queue(QueueKind::Inflate).publish(&mem, 500);
    drop(mem);
    assert!(d.kick(QueueKind::Inflate).is_empty());
    assert_eq!(metrics(&d).bad_head_index, 1);
    still_works(&mut d);
}

#[test]
fn available_index_jumps_too_far() {
    let mut d = drv();
    let avail = d.queue(QueueKind::Inflate).avail;
    d.m().write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    let i = d.index(QueueKind::Inflate);
    // virtio-queue refuses the ring; the device processes nothing.
    assert!(d.dev.queue_notify(i).is_ok());
    assert_eq!(metrics(&d).inflate_pages, 0);
}

#[test]
fn descriptor_outside_guest_memory() {
    let mut d = drv();
    let mem = d.m();
    d.queue(QueueKind::Inflate)
        .add_chain(&mem, &[(0x7000_0000_0000, 64, false)])
        .unwrap();
    // Straddles the end of RAM (16 MiB) into unmapped space.
    d.queue(QueueKind::Inflate)
        .add_chain(&mem, &[(16 * MIB - 8, 64, false)])
        .unwrap();
    // Address overflow.
    d.queue(QueueKind::Inflate)
        .add_chain(&mem, &[(u64::MAX - 3, 64, false)])
        .unwrap();
    drop(mem);
    assert_eq!(d.kick(QueueKind::Inflate).len(), 3);
    assert_eq!(metrics(&d).descriptor_out_of_memory, 3);
    still_works(&mut d);
}

#[test]
fn wrong_direction_descriptors() {
    let mut d = drv();
    let buf = d.alloc(64);
    let mem = d.m();
    // Inflate with a write-only pfn array.
    d.queue(QueueKind::Inflate)
        .add_chain(&mem, &[(buf, 4, true)])
        .unwrap();
    // Reporting with a read-only range.
    d.queue(QueueKind::Reporting)
        .add_chain(&mem, &[(MIB, 4096, false)])
        .unwrap();
    // Stats with a write-only buffer.
    d.queue(QueueKind::Stats)
        .add_chain(&mem, &[(buf, 10, true)])
        .unwrap();
    // Free page vq: readable after writable.
    d.queue(QueueKind::FreePage)
        .add_chain(&mem, &[(MIB, 4096, true), (buf, 4, false)])
        .unwrap();
    drop(mem);
    d.kick(QueueKind::Inflate);
    d.kick(QueueKind::Reporting);
    assert_eq!(
        d.kick(QueueKind::Stats).len(),
        1,
        "bad stats buffer is returned"
    );
    d.kick(QueueKind::FreePage);
    let m = metrics(&d);
    assert_eq!(m.bad_pfn_descriptor, 1);
    assert_eq!(m.wrong_direction, 3);
    assert_eq!(m.discard_bytes, 0);
    // A chunk carrying a writable descriptor.
    let id = started_round(&mut d);
    let hdr = Message::Chunk(ChunkHeader {
        cmd_id: id,
        first_bit: Bit(0),
        nr_bits: 64,
    })
    .header();
    d.send_msg(&hdr, &[0xff; 8], 8, 16);
    assert_eq!(metrics(&d).wrong_direction, 4);
    assert_eq!(d.hints().status().free_pages, 0);
}

#[test]
fn cmd_id_outbuf_not_4_bytes() {
    let mut d = standard_drv();
    let id = d.hints().start_round(&d.hints().new_epoch()).unwrap();
    let b = id.to_le_bytes();
    d.send_msg(&MsgHeader::default(), &[], 0, 0); // 24 zero bytes
    let a = d.alloc(8);
    d.m()
        .write_slice(&[b[0], b[1], b[2], b[3], 0, 0, 0, 0], GuestAddress(a))
        .unwrap();
    let mem = d.m();
    d.queue(QueueKind::FreePage)
        .add_chain(&mem, &[(a, 3, false)])
        .unwrap();
    d.queue(QueueKind::FreePage)
        .add_chain(&mem, &[(a, 8, false)])
        .unwrap();
    drop(mem);
    d.kick(QueueKind::FreePage);
    assert_eq!(metrics(&d).hint_bad_cmd_buffer, 3);
    assert_eq!(
        d.hints().status().state,
        RoundState::Requested,
        "round not started"
    );
    // Split over two descriptors (2 + 2 bytes) is still a 4-byte id: fine.
    let mem = d.m();
    d.queue(QueueKind::FreePage)
        .add_chain(&mem, &[(a, 2, false), (a + 2, 2, false)])
        .unwrap();
    drop(mem);
    d.kick(QueueKind::FreePage);
    assert_eq!(d.hints().status().state, RoundState::Started);
}

#[test]
fn bitmap_chunk_beyond_ram() {
    let mut d = drv();
    let id = started_round(&mut d);
    let total = (16 * MIB) >> 12; // 4096 bits
    let words = vec![!0u64; 200];
    d.send_chunk(id, &words, total, 64);
    d.send_chunk(id, &words, total - 64, 128);
    let hdr = Message::Chunk(ChunkHeader {
        cmd_id: id,
        first_bit: Bit(1 << 40),
        nr_bits: 64,
    })
    .header();
    d.send_msg(&hdr, &[0xff; 8], 8, 0);
    assert_eq!(metrics(&d).bitmap_beyond_layout, 3);
    assert_eq!(d.hints().status().free_pages, 0);
}

#[test]
fn bitmap_chunk_misaligned() {
    let mut d = drv();
    let id = started_round(&mut d);
    let mut h = Message::Chunk(ChunkHeader {
        cmd_id: id,
        first_bit: Bit(64),
        nr_bits: 64,
    })
    .header();
    h.first_bit = 32;
    d.send_msg(&h, &[0xff; 8], 8, 0);
    assert_eq!(metrics(&d).bitmap_bad_message, 1);
    assert_eq!(d.hints().status().free_pages, 0);
}

#[test]
fn bitmap_chunk_oversize() {
    let mut d = drv();
    let id = started_round(&mut d);
    let mut h = Message::Chunk(ChunkHeader {
        cmd_id: id,
        first_bit: Bit(0),
        nr_bits: 64,
    })
    .header();
    h.nr_bits = MAX_CHUNK_BITS + 1;
    d.send_msg(&h, &[0xff; 8], 8, 0);
    h.nr_bits = 0;
    d.send_msg(&h, &[], 8, 0);
    assert_eq!(metrics(&d).bitmap_bad_message, 2);
}

#[test]
fn bitmap_chunk_short_payload() {
    let mut d = drv();
    let id = started_round(&mut d);
    let hdr = Message::Chunk(ChunkHeader {
        cmd_id: id,
        first_bit: Bit(0),
        nr_bits: 256,
    })
    .header();
    d.send_msg(&hdr, &[0xff; 16], 8, 0); // header says 32 bytes
    assert_eq!(metrics(&d).bitmap_short_payload, 1);
    assert_eq!(d.hints().status().free_pages, 0, "nothing partially merged");
}

#[test]
fn bitmap_bad_headers() {
    let mut d = drv();
    let id = started_round(&mut d);
    let good = Message::Chunk(ChunkHeader {
        cmd_id: id,
        first_bit: Bit(0),
        nr_bits: 64,
    })
    .header();
    let cases = [
        MsgHeader {
            magic: 0x1234_5678,
            ..good
        },
        MsgHeader { kind: 0, ..good },
        MsgHeader { kind: 99, ..good },
        MsgHeader {
            reserved: 1,
            ..good
        },
        MsgHeader { cmd_id: 1, ..good },
        MsgHeader {
            magic: MSG_MAGIC,
            kind: KIND_CHUNK,
            ..MsgHeader::default()
        },
    ];
    for h in &cases {
        d.send_msg(h, &[0xff; 8], 8, 0);
    }
    assert_eq!(metrics(&d).bitmap_bad_message, cases.len() as u64);
    assert_eq!(d.hints().status().free_pages, 0);
}

#[test]
fn layout_query_reply_buffer_too_small() {
    let mut d = drv();
    let id = d.hints().start_round(&d.hints().new_epoch()).unwrap();
    let hdr = Message::LayoutQuery { cmd_id: id }.header();
    let (used, _) = d.send_msg(&hdr, &[], 0, 16);
    assert_eq!(used.last().unwrap().1, 0, "nothing written");
    assert_eq!(metrics(&d).bitmap_bad_reply_buffer, 1);
    // Reply buffer pointing outside guest memory.
    let h = {
        let b = d.alloc(24);
        let mut bytes = [0u8; 24];
        hdr.write(&mut bytes).unwrap();
        d.m().write_slice(&bytes, GuestAddress(b)).unwrap();
        b
    };
    let mem = d.m();
    d.queue(QueueKind::FreePage)
        .add_chain(
            &mem,
            &[
                (h, 24, false),
                (0x7000_0000_0000, LAYOUT_REPLY_MAX as u32, true),
            ],
        )
        .unwrap();
    drop(mem);
    d.kick(QueueKind::FreePage);
    assert_eq!(metrics(&d).descriptor_out_of_memory, 1);
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
fn flood_of_reports_keeps_memory_bounded() {
    let mut d = standard_drv();
    let h = d.hints();
    let words = h.snapshot().words().len();
    // Warm up, then flood: 50k free blocks with no round, 50k in a round,
    // 20k reporting chains, 20k stale bitmap-less command ids.
    d.send_block(0, 4096);
    let rss0 = rss_kib();
    for i in 0..50_000u64 {
        d.send_block((i % 4096) << 12, 4096).unwrap();
    }
    let id = h.start_round(&h.new_epoch()).unwrap();
    d.send_cmd_id(id);
    for i in 0..50_000u64 {
        d.send_block((i % 4096) << 12, 8192).unwrap();
    }
    for _ in 0..20_000 {
        d.report(&[(MIB, 4096)]);
        d.send_cmd_id(0x9000_0000);
    }
    let grown = rss_kib().saturating_sub(rss0);
    let m = metrics(&d);
    assert_eq!(m.hint_stale, 50_001 + 20_000);
    assert_eq!(m.report_chains, 20_000);
    assert_eq!(h.status().free_pages, 4096);
    assert_eq!(h.snapshot().words().len(), words, "free set never grows");
    assert!(grown < 8 * 1024, "RSS grew by {grown} KiB under the flood");
}

#[test]
fn inflate_pfn_out_of_range() {
    let mut d = drv();
    d.inflate(&[u32::MAX, 0x10_0000, 7]);
    let m = metrics(&d);
    assert_eq!(m.pfn_out_of_range, 2);
    assert_eq!(m.inflate_pages, 1);
    assert_eq!(m.discard_fail, 0);
}

#[test]
fn inflate_bad_descriptor_lengths() {
    let mut d = drv();
    let a = d.alloc(64 * 1024);
    let mem = d.m();
    d.queue(QueueKind::Inflate)
        .add_chain(&mem, &[(a, 6, false)])
        .unwrap();
    d.queue(QueueKind::Inflate)
        .add_chain(&mem, &[(a, 64 * 1024, false)])
        .unwrap();
    drop(mem);
    assert_eq!(d.kick(QueueKind::Inflate).len(), 2);
    assert_eq!(metrics(&d).bad_pfn_descriptor, 2);
}

#[test]
fn stats_with_odd_length() {
    let mut d = drv();
    let mut bytes = encode_stat(VIRTIO_BALLOON_S_MEMFREE, 42).to_vec();
    bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
    let a = d.alloc(bytes.len() as u64);
    d.m().write_slice(&bytes, GuestAddress(a)).unwrap();
    let mem = d.m();
    d.queue(QueueKind::Stats)
        .add_chain(&mem, &[(a, bytes.len() as u32, false)])
        .unwrap();
    drop(mem);
    d.kick(QueueKind::Stats);
    let m = metrics(&d);
    assert_eq!((m.stats_bad_length, m.stats_updates), (1, 1));
    let s = d.handle().latest_stats().unwrap();
    assert_eq!(s.get(VIRTIO_BALLOON_S_MEMFREE), Some(42));
    assert_eq!(s.trailing_bytes, 5);
}

#[test]
fn free_block_with_partial_pages_and_outside_ram() {
    let mut d = standard_drv();
    let id = d.hints().start_round(&d.hints().new_epoch()).unwrap();
    d.send_cmd_id(id);
    d.send_block(100, 8192); // one whole page (1), two partial ends
    d.send_block(16 * MIB - 4096, 8192); // last page of RAM + one outside
    d.send_block(u64::MAX - 4095, 4096); // overflows
    let m = metrics(&d);
    assert_eq!(m.hint_partial_pages, 1);
    assert!(m.descriptor_out_of_memory >= 1);
    let s = d.hints().snapshot();
    assert!(s.contains(1) && !s.contains(0) && !s.contains(2));
}

#[test]
fn notify_on_unknown_queue() {
    let mut d = drv();
    assert!(d.dev.queue_notify(9).is_ok());
    assert_eq!(metrics(&d).unknown_queue, 1);
}

#[test]
fn bitmap_chunk_before_layout_reply() {
    let mut d = drv();
    let h = d.hints();
    let id = h.start_round(&h.new_epoch()).unwrap();
    // The round is started with a standard id outbuf, not a LAYOUT_QUERY:
    // chunks are still refused until the layout was replied.
    d.send_cmd_id(id);
    let words = vec![!0u64; 2];
    d.send_chunk(id, &words, 0, 64);
    assert_eq!(metrics(&d).hint_stale, 1);
    assert_eq!(h.status().free_pages, 0);
    assert!(d.layout_query(id).is_some());
    d.send_chunk(id, &words, 0, 64);
    assert_eq!(h.status().free_pages, 64);
}
