// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The device's own writes reach the migrator: every guest page the device
//! changes (used rings, bitmap-protocol replies, discarded pages) is in
//! `take_device_dirty()`, found by comparing guest memory before and after
//! the device ran, so a write path nobody thought of is caught too.

use std::collections::BTreeSet;

use freehint_device::balloon::*;
use freehint_device::test_utils::*;
use freehint_protocol::bitmap::test_bit;
use freehint_protocol::bitmap_hint::{Message, MsgHeader, LAYOUT_REPLY_MAX, MSG_HEADER_SIZE};
use freehint_protocol::layout::{Bit, Pfn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

/// Guest RAM: 16 MiB low, and the driver's rings and buffers in RAM too.
fn layout() -> Layout {
    Layout::from_ram_byte_ranges(&[(0, 16 * MIB), (DRIVER_AREA, DRIVER_AREA_SIZE)]).unwrap()
}

/// A guest using every queue; RAM filled with a pattern, so discarded
/// pages change.
fn driver() -> BalloonDriver {
    let drv = BalloonDriver::new(BalloonConfig::all_features(layout()), !0, 64);
    drv.m()
        .write_slice(&vec![0x5a; (16 * MIB) as usize], GuestAddress(0))
        .unwrap();
    drv
}

/// Contents of every guest RAM page of the layout.
fn pages(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    (0..layout().total_bits())
        .map(|bit| {
            let pfn = layout().bit_to_pfn(Bit(bit)).unwrap();
            let mut b = vec![0u8; 4096];
            mem.read_slice(&mut b, GuestAddress(pfn.addr())).unwrap();
            b
        })
        .collect()
}

fn set(words: &[u64]) -> BTreeSet<u64> {
    (0..layout().total_bits())
        .filter(|&b| test_bit(words, b))
        .collect()
}

fn bit_of(gpa: u64) -> u64 {
    layout().pfn_to_bit(Pfn::from_addr(gpa)).unwrap().raw()
}

/// Runs `device_work` (which only notifies the device) and checks every page
/// it changed is reported; returns the reported set.
fn reported_writes(
    drv: &mut BalloonDriver,
    device_work: impl FnOnce(&mut BalloonDriver),
) -> BTreeSet<u64> {
    drv.handle().take_device_dirty();
    let before = pages(&drv.m());
    device_work(drv);
    let after = pages(&drv.m());
    let changed: BTreeSet<u64> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .map(|i| i as u64)
        .collect();
    assert!(!changed.is_empty(), "the device wrote nothing");
    let reported = set(&drv.hints().take_device_dirty());
    let missing: Vec<_> = changed.difference(&reported).collect();
    assert!(
        missing.is_empty(),
        "device wrote layout bits {missing:?} without reporting them"
    );
    reported
}

#[test]
fn used_rings_replies_and_discards_are_reported() {
    let mut drv = driver();
    // Inflate: a used ring entry and the discarded page.
    let pfns = drv.alloc(8);
    drv.m()
        .write_slice(&[7, 0, 0, 0, 9, 0, 0, 0], GuestAddress(pfns))
        .unwrap();
    let mem = drv.m();
    drv.queue(QueueKind::Inflate)
        .add_chain(&mem, &[(pfns, 8, false)])
        .unwrap();
    drop(mem);
    let r = reported_writes(&mut drv, |d| drop(d.kick(QueueKind::Inflate)));
    assert!(r.contains(&7) && r.contains(&9));
    assert!(!r.contains(&8), "page 8 was not touched");
    assert!(!r.contains(&bit_of(DRIVER_AREA + DRIVER_AREA_SIZE - 4096)));
    assert!(r.len() <= 4, "only what the device touched: {r:?}");

    // Stats: the held buffer is given back through the used ring.
    drv.send_stats(&[]);
    reported_writes(&mut drv, |d| assert!(d.handle().request_stats().unwrap()));

    // Free page reporting: discards and a used ring entry.
    let mem = drv.m();
    drv.queue(QueueKind::Reporting)
        .add_chain(&mem, &[(2 * MIB, 8192, true)])
        .unwrap();
    drop(mem);
    let r = reported_writes(&mut drv, |d| drop(d.kick(QueueKind::Reporting)));
    assert!(r.contains(&bit_of(2 * MIB)));

    // Bitmap protocol: the layout reply and a used ring entry.
    let id = drv.hints().start_round(&drv.hints().new_epoch()).unwrap();
    let hdr_at = drv.alloc(MSG_HEADER_SIZE as u64);
    let mut hdr = [0u8; MSG_HEADER_SIZE];
    let query: MsgHeader = Message::LayoutQuery { cmd_id: id }.header();
    query.write(&mut hdr).unwrap();
    drv.m().write_slice(&hdr, GuestAddress(hdr_at)).unwrap();
    // The reply buffer straddles a page boundary.
    let reply_at = (drv.alloc(8192) | 0xfff) - 7;
    let reply_len = LAYOUT_REPLY_MAX as u32;
    let mem = drv.m();
    drv.queue(QueueKind::FreePage)
        .add_chain(
            &mem,
            &[
                (hdr_at, MSG_HEADER_SIZE as u32, false),
                (reply_at, reply_len, true),
            ],
        )
        .unwrap();
    drop(mem);
    let r = reported_writes(&mut drv, |d| drop(d.kick(QueueKind::FreePage)));
    assert!(r.contains(&bit_of(reply_at)) && r.contains(&bit_of(reply_at + 8)));
    assert_eq!(
        drv.handle()
            .metrics()
            .snapshot()
            .device_dirty_outside_layout,
        0
    );
}

/// Rings outside the RAM layout cannot be expressed as layout bits: they
/// are counted instead of silently lost.
#[test]
fn writes_outside_the_layout_are_counted() {
    let layout = Layout::from_ram_byte_ranges(&[(0, 16 * MIB)]).unwrap();
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout), !0, 64);
    drv.handle().take_device_dirty();
    drv.inflate(&[3]);
    let words = drv.handle().take_device_dirty();
    assert_eq!(words.len(), 16 * MIB as usize / 4096 / 64);
    assert!(test_bit(&words, 3), "the discarded page");
    assert_eq!(freehint_protocol::bitmap::count_ones(&words), 1);
    // The used element and the used index (same page here).
    assert_eq!(
        drv.handle()
            .metrics()
            .snapshot()
            .device_dirty_outside_layout,
        2
    );
}
