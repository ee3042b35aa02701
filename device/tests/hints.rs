// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Free page hints through real virtqueues: the standard protocol as Linux's
//! `virtio_balloon` drives it, the bitmap protocol as the freehint driver
//! drives it, and the epoch rule.

use std::sync::atomic::Ordering;

use freehint_device::balloon::*;
use freehint_device::test_utils::*;
use freehint_device::VirtioDevice;
use freehint_protocol::bitmap_hint::Message;
use freehint_protocol::layout::{Bit, Pfn};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// x86 pc-like RAM: 16 MiB low, 16 MiB above the 4 GiB line.
fn pc_layout() -> Layout {
    Layout::from_ram_byte_ranges(&[(0, 16 * MIB), (4 * GIB, 16 * MIB)]).unwrap()
}

fn bit_of(gpa: u64) -> u64 {
    pc_layout().pfn_to_bit(Pfn::from_addr(gpa)).unwrap().raw()
}

fn standard_driver(queue_size: u16) -> BalloonDriver {
    let feats = !feature(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP);
    BalloonDriver::new(BalloonConfig::all_features(pc_layout()), feats, queue_size)
}

#[test]
fn standard_round_like_linux() {
    let mut drv = standard_driver(64);
    let h = drv.hints();
    let token = h.new_epoch();
    let id = h.start_round(&token).unwrap();
    assert_eq!(id, FREE_PAGE_HINT_CMD_ID_MIN);
    assert_eq!(drv.irq.config.load(Ordering::SeqCst), 1);
    assert_eq!(h.status().state, RoundState::Requested);
    let blocks = [4 * MIB, 8 * MIB, 4 * GIB + 4 * MIB];
    let rep = drv.on_config_change(&blocks);
    assert_eq!(rep.cmd_id, id);
    assert_eq!((rep.blocks_sent, rep.stopped), (3, true));
    let st = h.status();
    assert_eq!(st.state, RoundState::Stopped);
    assert_eq!(st.free_pages, 3 * 1024);
    let set = h.snapshot();
    assert!(set.is_complete());
    for &b in &blocks {
        for off in [0, HINT_BLOCK_SIZE - 4096] {
            assert!(set.contains(bit_of(b + off)), "block {b:#x}+{off:#x}");
        }
        assert!(!set.contains(bit_of(b + HINT_BLOCK_SIZE) % 8192) || b == 4 * MIB);
    }
    // High RAM folds onto bits 4096.. (the gap is folded out).
    assert_eq!(bit_of(4 * GIB + 4 * MIB), 4096 + 1024);
    assert!(!set.contains(0));
    // Apply to an all-dirty bitmap.
    let mut to_send = vec![!0u64; 8192 / 64];
    assert_eq!(set.apply_to(&token, &mut to_send), Ok(3 * 1024));
    assert_eq!(
        freehint_protocol::bitmap::count_ones(&to_send),
        8192 - 3 * 1024
    );
    // DONE: the driver gives its blocks back.
    h.finish();
    assert_eq!(
        drv.config().free_page_hint_cmd_id,
        FREE_PAGE_HINT_CMD_ID_DONE
    );
    let rep = drv.on_config_change(&[]);
    assert!(rep.done);
    assert!(drv.held_blocks.is_empty());
    assert_eq!(h.status().state, RoundState::Done);
    let m = drv.handle().metrics().snapshot();
    assert_eq!((m.hint_rounds, m.hint_pages, m.hint_stale), (1, 3072, 0));
}

#[test]
fn standard_round_keeps_one_slot_for_stop() {
    let mut drv = standard_driver(8);
    let h = drv.hints();
    h.start_round(&h.new_epoch()).unwrap();
    let blocks: Vec<u64> = (0..4)
        .map(|i| i * HINT_BLOCK_SIZE)
        .chain((0..4).map(|i| 4 * GIB + i * HINT_BLOCK_SIZE))
        .chain([4 * GIB])
        .collect();
    let rep = drv.on_config_change_with(&blocks, false);
    // 8 slots (the id outbuf was already used and returned): 7 blocks, and
    // the last slot is the reserve for STOP; 2 blocks stay back.
    assert_eq!((rep.blocks_sent, rep.blocks_held_back), (7, 2));
    assert!(rep.stopped);
    assert_eq!(h.status().state, RoundState::Stopped);
    assert_eq!(h.status().free_pages, 7 * 1024);
}

#[test]
fn stale_cmd_id_and_late_blocks_are_dropped() {
    let mut drv = standard_driver(64);
    let h = drv.hints();
    let id = h.start_round(&h.new_epoch()).unwrap();
    // A block before the id outbuf: no round accepting yet.
    drv.send_block(0, 4096);
    drv.send_cmd_id(id + 5);
    assert_eq!(h.status().state, RoundState::Requested);
    drv.send_cmd_id(id);
    drv.send_block(4096, 4096);
    drv.send_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
    drv.send_block(8192, 4096); // after STOP
    let m = drv.handle().metrics().snapshot();
    assert_eq!(m.hint_stale, 3);
    assert_eq!(h.status().free_pages, 1);
    assert!(h.snapshot().contains(1));
    // A new round gets a new id; the old id is now stale.
    let id2 = h.start_round(&h.new_epoch()).unwrap();
    assert_eq!(id2, id + 1);
    drv.send_cmd_id(id);
    assert_eq!(drv.handle().metrics().snapshot().hint_stale, 4);
    assert_eq!(h.status().free_pages, 0, "a new round starts empty");
}

#[test]
fn new_epoch_stops_the_round_and_drops_late_hints() {
    let mut drv = standard_driver(64);
    let h = drv.hints();
    let t0 = h.new_epoch();
    let id = h.start_round(&t0).unwrap();
    drv.send_cmd_id(id);
    drv.send_block(0, 4 * MIB as u32);
    let old = h.snapshot();
    assert_eq!(old.free_pages(), 1024);
    let irqs = drv.irq.config.load(Ordering::SeqCst);
    let t1 = h.new_epoch();
    assert_eq!(t1.epoch(), t0.epoch().next());
    // The guest is told to stop.
    assert_eq!(drv.irq.config.load(Ordering::SeqCst), irqs + 1);
    assert_eq!(
        drv.config().free_page_hint_cmd_id,
        FREE_PAGE_HINT_CMD_ID_STOP
    );
    // Hints still in flight for the old round are dropped as epoch drops.
    drv.send_block(4 * MIB, 4 * MIB as u32);
    assert_eq!(drv.handle().metrics().snapshot().hint_epoch_dropped, 1);
    assert_eq!(h.status().free_pages, 0);
    let mut to_send = vec![!0u64; 128];
    let stale = Err(HintError::StaleEpoch {
        given: t0.epoch(),
        current: t1.epoch(),
    });
    assert_eq!(old.apply_to(&t0, &mut to_send), stale);
    assert_eq!(old.apply_to(&t1, &mut to_send), stale);
    assert_eq!(h.apply_to(&t1, &mut to_send), Ok(0));
    assert_eq!(h.start_round(&t0), stale.map(|_| 0));
    let id2 = h.start_round(&t1).unwrap();
    assert_ne!(id2, id);
}

/// The driver ends every round with STOP. A STOP for the previous round
/// that arrives after the host requested the next one (the host moved on
/// before the driver finished) must not end the new round: QEMU acts on STOP
/// only once the round has started, and so does the device.
#[test]
fn late_stop_of_the_previous_round_does_not_end_the_next() {
    let mut drv = standard_driver(64);
    let h = drv.hints();
    let id1 = h.start_round(&h.new_epoch()).unwrap();
    drv.send_cmd_id(id1);
    drv.send_block(0, 4 * MIB as u32);
    // Next sync: a new epoch and round 2, before the driver's STOP for
    // round 1 got through.
    let t2 = h.new_epoch();
    let id2 = h.start_round(&t2).unwrap();
    drv.send_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
    assert_eq!(h.status().state, RoundState::Requested);
    assert_eq!(drv.config().free_page_hint_cmd_id, id2);
    assert_eq!(drv.handle().metrics().snapshot().hint_stale, 1);
    // The driver answers round 2 as usual.
    let rep = drv.on_config_change(&[8 * MIB]);
    assert_eq!((rep.cmd_id, rep.blocks_sent, rep.stopped), (id2, 1, true));
    assert_eq!(h.status().state, RoundState::Stopped);
    assert_eq!(h.status().free_pages, 1024);
    let mut to_send = vec![!0u64; 128];
    assert_eq!(h.apply_to(&t2, &mut to_send), Ok(1024));
}

/// Every way the host moves the epoch ends the round in progress: hints
/// still arriving for it are dropped (counted as epoch drops), the set is
/// empty, and the token of the old epoch is refused.
#[test]
fn every_epoch_move_ends_the_round_and_drops_its_hints() {
    type EpochMove = fn(&HintHandle);
    let moves: [(&str, EpochMove); 3] = [
        ("new_epoch", |h| {
            h.new_epoch();
        }),
        ("stop", HintHandle::stop),
        ("finish", HintHandle::finish),
    ];
    for (name, move_epoch) in moves {
        let mut drv = standard_driver(64);
        let h = drv.hints();
        let t = h.new_epoch();
        let id = h.start_round(&t).unwrap();
        drv.send_cmd_id(id);
        drv.send_block(0, 4 * MIB as u32);
        assert_eq!(h.status().free_pages, 1024);
        move_epoch(&h);
        drv.send_block(4 * MIB, 4 * MIB as u32);
        drv.send_cmd_id(id);
        let m = drv.handle().metrics().snapshot();
        assert_eq!((m.hint_epoch_dropped, m.hint_pages), (2, 1024), "{name}");
        assert_eq!(h.status().free_pages, 0, "{name}");
        assert_eq!(h.snapshot().free_pages(), 0, "{name}");
        let mut to_send = vec![!0u64; 128];
        assert!(
            matches!(
                h.apply_to(&t, &mut to_send),
                Err(HintError::StaleEpoch { .. })
            ),
            "{name}"
        );
        assert!(
            matches!(h.start_round(&t), Err(HintError::StaleEpoch { .. })),
            "{name}"
        );
    }
}

/// A device reset (and the activation after it) moves the epoch too.
#[test]
fn reset_makes_tokens_stale() {
    let mut drv = standard_driver(64);
    let h = drv.hints();
    let t = h.new_epoch();
    h.start_round(&t).unwrap();
    drv.dev.reset();
    assert!(matches!(
        h.apply_to(&t, &mut [!0u64; 128]),
        Err(HintError::StaleEpoch { .. })
    ));
    assert_eq!(h.start_round(&h.new_epoch()), Err(HintError::NotActive));
}

#[test]
fn bitmap_round_over_the_pci_gap() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(pc_layout()), !0, 64);
    assert!(freehint_protocol::balloon::bitmap_hints(drv.features));
    let h = drv.hints();
    let id = h.start_round(&h.new_epoch()).unwrap();
    // Free: pfns 10..20, a run across the low/high boundary of bits, and a
    // high range; plus a range outside RAM (ignored by the driver's layout).
    let high = (4 * GIB) >> 12;
    let free = [
        (10, 10),
        (4000, 96),
        (high, 100),
        (high + 4000, 96),
        (0x50000, 10),
    ];
    let layout = drv.bitmap_round(id, &free, 1024).unwrap();
    assert_eq!(layout, pc_layout());
    let st = h.status();
    assert_eq!(st.state, RoundState::Stopped);
    assert_eq!(st.free_pages, 10 + 96 + 100 + 96);
    let set = h.snapshot();
    let expect = |bit: u64| {
        (10..20).contains(&bit)
            || (4000..4096).contains(&bit)
            || (4096..4196).contains(&bit)
            || (8096..8192).contains(&bit)
    };
    for bit in 0..8192 {
        assert_eq!(set.contains(bit), expect(bit), "bit {bit}");
    }
    assert_eq!(drv.handle().metrics().snapshot().bitmap_bad_message, 0);
}

#[test]
fn bitmap_and_standard_protocols_build_the_same_set() {
    let blocks = [0, 8 * MIB, 4 * GIB + 12 * MIB];
    let mut std_drv = standard_driver(64);
    let h = std_drv.hints();
    h.start_round(&h.new_epoch()).unwrap();
    std_drv.on_config_change(&blocks);
    let a = h.snapshot();

    let mut bm = BalloonDriver::new(BalloonConfig::all_features(pc_layout()), !0, 64);
    let h2 = bm.hints();
    let id = h2.start_round(&h2.new_epoch()).unwrap();
    let free: Vec<(u64, u64)> = blocks.iter().map(|&b| (b >> 12, 1024)).collect();
    bm.bitmap_round(id, &free, 1 << 23).unwrap();
    let b = h2.snapshot();
    assert_eq!(a.words(), b.words());
    assert_eq!(a.free_pages(), 3072);
}

#[test]
fn bitmap_stale_id_and_after_round_end_are_dropped() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(pc_layout()), !0, 64);
    let h = drv.hints();
    let id = h.start_round(&h.new_epoch()).unwrap();
    assert!(
        drv.layout_query(id + 1).is_none(),
        "stale query gets no reply"
    );
    let words = vec![!0u64; 128];
    drv.send_chunk(id, &words, 0, 64); // before the query: not started
    assert!(drv.layout_query(id).is_some());
    drv.send_chunk(id + 1, &words, 0, 64);
    drv.send_chunk(id, &words, 64, 64);
    drv.send_msg(
        &Message::RoundEnd {
            cmd_id: id,
            free_pages: 64,
        }
        .header(),
        &[],
        0,
        0,
    );
    drv.send_chunk(id, &words, 128, 64); // after ROUND_END
    let m = drv.handle().metrics().snapshot();
    assert_eq!(m.hint_stale, 4);
    assert_eq!(h.status().free_pages, 64);
    assert!(h.snapshot().contains(64) && !h.snapshot().contains(0));
}

#[test]
fn chunk_payload_split_over_many_descriptors_and_masked() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(pc_layout()), !0, 64);
    let h = drv.hints();
    let id = h.start_round(&h.new_epoch()).unwrap();
    drv.layout_query(id).unwrap();
    // 100 bits from bit 64, payload 2 words of all ones: bits beyond
    // nr_bits must be ignored. Payload in 3-byte descriptors.
    let hdr = Message::Chunk(freehint_protocol::ChunkHeader {
        cmd_id: id,
        first_bit: Bit(64),
        nr_bits: 100,
    })
    .header();
    drv.send_msg(&hdr, &[0xff; 16], 3, 0);
    let s = h.snapshot();
    assert_eq!(s.free_pages(), 100);
    assert!(s.contains(64) && s.contains(163) && !s.contains(164) && !s.contains(63));
}

#[test]
fn cmd_ids_wrap_without_reaching_stop_or_done() {
    let mut drv = standard_driver(64);
    let h = drv.hints();
    let mut last = 0;
    for _ in 0..3 {
        last = h.start_round(&h.new_epoch()).unwrap();
        drv.on_config_change(&[0]);
    }
    assert_eq!(last, FREE_PAGE_HINT_CMD_ID_MIN + 2);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// A free block anywhere near RAM (low, high, across the gap, beyond).
    fn block() -> impl Strategy<Value = (u64, u32)> {
        let base = prop_oneof![
            0u64..16 * MIB + 8192,
            (4 * GIB - 8192)..(4 * GIB + 16 * MIB + 8192),
        ];
        (base, 0u32..(64 << 10))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Standard-protocol blocks set exactly the whole pages inside RAM
        /// (partial pages and bytes outside the layout ignored).
        #[test]
        fn blocks_set_exactly_whole_pages_in_ram(blocks in proptest::collection::vec(block(), 1..24)) {
            let mut drv = standard_driver(64);
            let h = drv.hints();
            let id = h.start_round(&h.new_epoch()).unwrap();
            drv.send_cmd_id(id);
            let layout = pc_layout();
            let mut expect = vec![false; 8192];
            for &(addr, len) in &blocks {
                drv.send_block(addr, len).unwrap();
                // A descriptor not entirely in guest memory is malformed and
                // dropped as a whole (counted as descriptor_out_of_memory).
                let in_memory = len == 0
                    || vm_memory::GuestMemoryBackend::check_range(
                        &*drv.m(),
                        vm_memory::GuestAddress(addr),
                        len as usize,
                    );
                if !in_memory {
                    continue;
                }
                let first = addr.div_ceil(4096);
                let end = (addr + u64::from(len)) / 4096;
                for pfn in first..end.max(first) {
                    if let Some(bit) = layout.pfn_to_bit(Pfn(pfn)) {
                        expect[bit.index()] = true;
                    }
                }
            }
            let set = h.snapshot();
            for (bit, &e) in expect.iter().enumerate() {
                prop_assert_eq!(set.contains(bit as u64), e, "bit {}", bit);
            }
        }
    }
}
