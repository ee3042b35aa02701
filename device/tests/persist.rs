// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Save/restore: a restored device continues with the driver's live queues,
//! hints never cross (DONE on the destination), and a hostile state is
//! rejected without changing the device.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use freehint_device::balloon::*;
use freehint_device::test_utils::*;
use freehint_protocol::balloon::VIRTIO_BALLOON_S_MEMFREE;

const MIB: u64 = 1 << 20;

fn config() -> BalloonConfig {
    BalloonConfig::all_features(Layout::from_ram_byte_ranges(&[(0, 64 * MIB)]).unwrap())
}

#[test]
fn restored_device_continues_with_live_queues() {
    let mut drv = BalloonDriver::new(config(), !0, 64);
    let feats = drv.features;
    drv.send_stats(&[(VIRTIO_BALLOON_S_MEMFREE, 7)]);
    drv.inflate(&[10, 11]);
    drv.handle().set_target_pages(100);
    let id = drv.hints().start_round(&drv.hints().new_epoch()).unwrap();
    // The standard driver holds its blocks until DONE.
    let mut std_drv_blocks = Vec::new();
    {
        drv.send_cmd_id(id);
        for b in [0, 4 * MIB] {
            drv.send_block(b, (4 * MIB) as u32).unwrap();
            std_drv_blocks.push(b);
        }
        drv.held_blocks = std_drv_blocks;
    }
    let state = drv.dev.save_state();
    assert!(state.activated);
    assert_eq!(state.acked_features, feats);
    assert!(state.stats_head.is_some());
    assert_eq!((state.hint_cmd_id, state.hint_round_requested), (id, true));

    // Destination: a fresh device, same config, same guest memory.
    let mut dst = Balloon::new(config()).unwrap();
    let irq = Arc::new(TestInterrupt::default());
    dst.restore_state(&state, Some(drv.mem.clone()), Some(irq.clone()))
        .unwrap();
    drv.dev = dst;
    drv.irq = irq;

    let c = drv.config();
    assert_eq!((c.num_pages, c.actual), (100, 2));
    // Hints did not cross: DONE is shown and signalled; the guest gives its
    // blocks back.
    assert_eq!(c.free_page_hint_cmd_id, FREE_PAGE_HINT_CMD_ID_DONE);
    assert_eq!(drv.irq.config.load(Ordering::SeqCst), 1);
    assert!(drv.on_config_change(&[]).done);
    assert!(drv.held_blocks.is_empty());
    assert_eq!(drv.hints().status().free_pages, 0);
    // The held stats buffer is still held by the destination device.
    assert!(drv.handle().request_stats().unwrap());
    assert_eq!(drv.stats_returned(), 1);
    // Queues continue where the source left them (used index continuity).
    assert_eq!(drv.inflate(&[12]).len(), 1);
    assert_eq!(drv.handle().metrics().snapshot().inflate_pages, 1);
    // Command ids continue: an old round's id is stale.
    let id2 = drv.hints().start_round(&drv.hints().new_epoch()).unwrap();
    assert_eq!(id2, id + 1);
    drv.send_cmd_id(id);
    assert_eq!(drv.handle().metrics().snapshot().hint_stale, 1);
    assert!(drv.on_config_change(&[8 * MIB]).stopped);
    assert_eq!(drv.hints().status().free_pages, 1024);
}

#[test]
fn inactive_state_round_trips() {
    let b = Balloon::new(config()).unwrap();
    b.handle().set_target_pages(5);
    let s = b.save_state();
    assert!(!s.activated);
    let mut d = Balloon::new(config()).unwrap();
    d.restore_state(&s, None, None).unwrap();
    assert_eq!(d.save_state(), s);
}

fn live_state() -> (BalloonDriver, BalloonState) {
    let mut drv = BalloonDriver::new(config(), !0, 64);
    drv.send_stats(&[(VIRTIO_BALLOON_S_MEMFREE, 1)]);
    let s = drv.dev.save_state();
    (drv, s)
}

fn restore(drv: &BalloonDriver, s: &BalloonState) -> (Balloon, Result<(), BalloonError>) {
    let mut d = Balloon::new(config()).unwrap();
    let irq: Arc<dyn freehint_device::Interrupt> = Arc::new(TestInterrupt::default());
    let r = d.restore_state(s, Some(drv.mem.clone()), Some(irq));
    (d, r)
}

#[test]
fn hostile_state_is_rejected_and_device_unchanged() {
    let (drv, good) = live_state();
    let mut cases: Vec<(&str, BalloonState)> = Vec::new();
    let mut s = good.clone();
    s.acked_features |= 1 << 40;
    cases.push(("feature not offered", s));
    let mut s = good.clone();
    s.queues[0].size = 3;
    cases.push(("queue size not a power of two", s));
    let mut s = good.clone();
    s.queues[1].desc_table = 0x7000_0000_0000;
    cases.push(("ring outside guest memory", s));
    let mut s = good.clone();
    s.queues[2].max_size = 4096;
    cases.push(("queue larger than offered", s));
    let mut s = good.clone();
    s.queues.truncate(2);
    cases.push(("missing queues", s));
    let mut s = good.clone();
    s.stats_head = Some(999);
    cases.push(("stats head beyond queue", s));
    for (what, s) in &cases {
        let (d, r) = restore(&drv, s);
        assert!(r.is_err(), "{what}: accepted");
        let now = d.save_state();
        assert_eq!(now, BalloonState::default(), "{what}: device changed");
    }
    // Activated state without memory.
    let mut d = Balloon::new(config()).unwrap();
    assert!(matches!(
        d.restore_state(&good, None, None),
        Err(BalloonError::NotActivated)
    ));
    // And the good one is accepted.
    assert!(restore(&drv, &good).1.is_ok());
}
