// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Device behaviour through the driver model: negotiation, config space,
//! inflate/deflate with real discards, stats, reporting, page poison.

use std::sync::atomic::Ordering;

use freehint_device::balloon::*;
use freehint_device::test_utils::*;
use freehint_device::VirtioDevice;
use freehint_protocol::balloon::{
    VIRTIO_BALLOON_S_HTLB_PGFAIL, VIRTIO_BALLOON_S_MEMFREE, VIRTIO_BALLOON_S_MEMTOT,
};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn layout_64m() -> Layout {
    Layout::from_ram_byte_ranges(&[(0, 64 * MIB)]).unwrap()
}

fn all() -> u64 {
    !0
}

#[test]
fn offered_features_follow_config() {
    let mut c = BalloonConfig::all_features(layout_64m());
    let b = Balloon::new(c.clone()).unwrap();
    let f = b.device_features();
    for bit in [1, 2, 3, 4, 5, 23, 32] {
        assert!(has_feature(f, bit), "bit {bit}");
    }
    assert!(!has_feature(f, VIRTIO_BALLOON_F_MUST_TELL_HOST));
    assert_eq!(b.device_type(), 5);
    assert_eq!(b.num_queues(), 5);
    assert_eq!(b.queue_max_size(), 256);
    // Bitmap is only offered with free page hints.
    c.free_page_hint = false;
    c.must_tell_host = true;
    let f = Balloon::new(c.clone()).unwrap().device_features();
    assert!(!has_feature(f, VIRTIO_BALLOON_F_FREE_PAGE_BITMAP));
    assert!(has_feature(f, VIRTIO_BALLOON_F_MUST_TELL_HOST));
    c.queue_size = 100;
    assert!(matches!(
        Balloon::new(c),
        Err(BalloonError::InvalidQueueSize(100))
    ));
}

#[test]
fn queues_are_numbered_by_negotiated_features() {
    // Driver without stats: the free page vq is index 2, reporting 3.
    let drv = BalloonDriver::new(
        BalloonConfig::all_features(layout_64m()),
        feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT) | feature(VIRTIO_BALLOON_F_REPORTING),
        64,
    );
    assert_eq!(drv.index(QueueKind::FreePage), 2);
    assert_eq!(drv.index(QueueKind::Reporting), 3);
    assert_eq!(drv.queues.len(), 4);
    // Unknown bits acked by a driver are dropped.
    let mut b = Balloon::new(BalloonConfig {
        reporting: false,
        ..BalloonConfig::all_features(layout_64m())
    })
    .unwrap();
    b.ack_features(feature(VIRTIO_BALLOON_F_REPORTING) | feature(40));
    assert_eq!(b.handle().acked_features(), 0);
}

#[test]
fn config_space_only_actual_and_poison_are_writable() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    drv.handle().set_target_pages(1234);
    assert_eq!(drv.irq.config.load(Ordering::SeqCst), 1);
    assert_eq!(drv.config().num_pages, 1234);
    // A driver write to num_pages or the cmd id is ignored.
    drv.dev.write_config(0, &[9, 9, 9, 9, 7, 0, 0, 0]);
    drv.dev.write_config(8, &[1, 0, 0, 0]);
    let c = drv.config();
    assert_eq!(
        (c.num_pages, c.actual, c.free_page_hint_cmd_id),
        (1234, 7, 0)
    );
    assert_eq!(drv.handle().actual_pages(), 7);
    drv.dev.write_config(12, &0xaau32.to_le_bytes());
    assert_eq!(drv.config().poison_val, 0xaa);
    // Partial and out-of-range accesses.
    let mut b = [0xffu8; 4];
    drv.dev.read_config(14, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    drv.dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    drv.dev.write_config(u64::MAX - 1, &[1, 2, 3, 4]);
    let mut one = [0u8; 1];
    drv.dev.read_config(4, &mut one);
    assert_eq!(one, [7]);
}

#[test]
fn inflate_discards_pages_and_deflate_counts() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    let mem = drv.m();
    mem.write_slice(&[0x77; 3 * 4096], GuestAddress(100 * 4096))
        .unwrap();
    drop(mem);
    let used = drv.inflate(&[100, 101, 300]);
    assert_eq!(used.len(), 1);
    let mut b = [0u8; 3 * 4096];
    drv.m()
        .read_slice(&mut b, GuestAddress(100 * 4096))
        .unwrap();
    assert!(
        b[..2 * 4096].iter().all(|&x| x == 0),
        "pages 100,101 discarded"
    );
    assert!(b[2 * 4096..].iter().all(|&x| x == 0x77), "page 102 kept");
    assert_eq!(drv.handle().actual_pages(), 3);
    let m = drv.handle().metrics().snapshot();
    assert_eq!(m.inflate_pages, 3);
    assert_eq!(m.discard_bytes, 3 * 4096);
    assert_eq!(m.discard_fail, 0);
    drv.deflate(&[100, 101]);
    assert_eq!(drv.handle().actual_pages(), 1);
    assert_eq!(drv.handle().metrics().snapshot().deflate_pages, 2);
    // Queue interrupts were raised for both queues.
    let q = drv.irq.queues.lock().unwrap().clone();
    assert!(q.contains(&0) && q.contains(&1));
}

#[test]
fn must_tell_host_and_deflate_on_oom_are_offered() {
    let c = BalloonConfig {
        must_tell_host: true,
        ..BalloonConfig::all_features(layout_64m())
    };
    let mut drv = BalloonDriver::new(c, all(), 64);
    assert!(has_feature(drv.features, VIRTIO_BALLOON_F_MUST_TELL_HOST));
    assert!(has_feature(drv.features, VIRTIO_BALLOON_F_DEFLATE_ON_OOM));
    // With MUST_TELL_HOST the guest tells before reuse; deflate never
    // discards (the page is the guest's again).
    drv.m().write_slice(&[5; 4096], GuestAddress(4096)).unwrap();
    drv.deflate(&[1]);
    let mut b = [0u8; 4096];
    drv.m().read_slice(&mut b, GuestAddress(4096)).unwrap();
    assert!(b.iter().all(|&x| x == 5));
}

#[test]
fn stats_buffer_is_held_and_returned_on_request() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    assert!(drv.handle().latest_stats().is_none());
    let used = drv.send_stats(&[
        (VIRTIO_BALLOON_S_MEMFREE, 1 << 30),
        (VIRTIO_BALLOON_S_MEMTOT, 4 << 30),
        (VIRTIO_BALLOON_S_HTLB_PGFAIL, 3),
        (77, 1),
    ]);
    assert!(used.is_empty(), "device keeps the stats buffer");
    let s = drv.handle().latest_stats().unwrap();
    assert_eq!(s.get(VIRTIO_BALLOON_S_MEMFREE), Some(1 << 30));
    assert_eq!(s.get(VIRTIO_BALLOON_S_MEMTOT), Some(4 << 30));
    assert_eq!(s.get(VIRTIO_BALLOON_S_HTLB_PGFAIL), Some(3));
    assert_eq!(s.unknown_tags, 1);
    assert_eq!(drv.handle().metrics().snapshot().stats_unknown_tag, 1);
    assert!(drv.handle().request_stats().unwrap());
    assert_eq!(drv.stats_returned(), 1);
    // Nothing held any more until the driver refills.
    assert!(!drv.handle().request_stats().unwrap());
    drv.send_stats(&[(VIRTIO_BALLOON_S_MEMFREE, 5)]);
    assert_eq!(
        drv.handle()
            .latest_stats()
            .unwrap()
            .get(VIRTIO_BALLOON_S_MEMFREE),
        Some(5)
    );
}

#[test]
fn stats_polling_interval_returns_the_buffer() {
    let c = BalloonConfig {
        stats_polling_interval_s: 1,
        ..BalloonConfig::all_features(layout_64m())
    };
    let mut drv = BalloonDriver::new(c, all(), 64);
    drv.send_stats(&[(VIRTIO_BALLOON_S_MEMFREE, 1)]);
    let mut returned = 0;
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        returned += drv.stats_returned();
        if returned > 0 {
            break;
        }
    }
    assert_eq!(returned, 1, "the poller returned the held buffer");
}

#[test]
fn request_stats_without_feature_is_an_error() {
    let drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), 0, 64);
    assert!(matches!(
        drv.handle().request_stats(),
        Err(BalloonError::FeatureNotNegotiated(1))
    ));
}

#[test]
fn free_page_reporting_discards_and_acknowledges() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    drv.m()
        .write_slice(&vec![0x11; 8 * MIB as usize], GuestAddress(8 * MIB))
        .unwrap();
    let used = drv.report(&[(8 * MIB, 2 * MIB as u32), (12 * MIB, 2 * MIB as u32)]);
    assert_eq!(used.len(), 1);
    let mut b = vec![0u8; 8 * MIB as usize];
    drv.m().read_slice(&mut b, GuestAddress(8 * MIB)).unwrap();
    let mb = MIB as usize;
    assert!(b[..2 * mb].iter().all(|&x| x == 0));
    assert!(b[2 * mb..4 * mb].iter().all(|&x| x == 0x11));
    assert!(b[4 * mb..6 * mb].iter().all(|&x| x == 0));
    let m = drv.handle().metrics().snapshot();
    assert_eq!((m.report_chains, m.report_bytes), (1, 4 * MIB));
}

#[test]
fn page_poison_keeps_reported_pages_and_refuses_hints() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    assert!(has_feature(drv.features, VIRTIO_BALLOON_F_PAGE_POISON));
    // Linux writes poison_val when it poisons (0xaa bytes).
    drv.dev.write_config(12, &0xaaaa_aaaau32.to_le_bytes());
    drv.m()
        .write_slice(&vec![0xaa; 2 * MIB as usize], GuestAddress(8 * MIB))
        .unwrap();
    drv.report(&[(8 * MIB, 2 * MIB as u32)]);
    let mut b = vec![0u8; 2 * MIB as usize];
    drv.m().read_slice(&mut b, GuestAddress(8 * MIB)).unwrap();
    assert!(b.iter().all(|&x| x == 0xaa), "poisoned content preserved");
    assert_eq!(drv.handle().metrics().snapshot().discard_skipped_poison, 1);
    assert_eq!(
        drv.hints().start_round(&drv.hints().new_epoch()),
        Err(HintError::GuestPoisons(0xaaaa_aaaa))
    );
    // poison_val 0 (init_on_free): content is zero anyway; discard allowed.
    drv.dev.write_config(12, &0u32.to_le_bytes());
    assert!(drv.hints().start_round(&drv.hints().new_epoch()).is_ok());
}

/// `poison_val` exists only once PAGE_POISON is negotiated: a driver
/// write to it is ignored when the feature is merely offered, or not
/// offered at all.
#[test]
fn poison_val_write_is_ignored_unless_negotiated() {
    for offered in [true, false] {
        let config = BalloonConfig {
            page_poison: offered,
            ..BalloonConfig::all_features(layout_64m())
        };
        let feats = !feature(VIRTIO_BALLOON_F_PAGE_POISON);
        let mut drv = BalloonDriver::new(config, feats, 64);
        assert!(!has_feature(drv.features, VIRTIO_BALLOON_F_PAGE_POISON));
        drv.dev.write_config(12, &0xaau32.to_le_bytes());
        drv.dev.write_config(4, &[3, 0, 0, 0, 0xbb]);
        let c = drv.config();
        assert_eq!((c.actual, c.poison_val), (3, 0), "offered: {offered}");
    }
}

#[test]
fn poison_val_not_negotiated_does_not_block() {
    let feats = !feature(VIRTIO_BALLOON_F_PAGE_POISON);
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), feats, 64);
    drv.dev.write_config(12, &0xaau32.to_le_bytes());
    assert!(drv.hints().start_round(&drv.hints().new_epoch()).is_ok());
}

#[test]
fn reset_drops_negotiated_state() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    drv.write_actual(5);
    let id = drv.hints().start_round(&drv.hints().new_epoch()).unwrap();
    assert_eq!(drv.config().free_page_hint_cmd_id, id);
    drv.dev.reset();
    assert_eq!(drv.handle().acked_features(), 0);
    assert_eq!(drv.config().actual, 0);
    assert_eq!(drv.config().free_page_hint_cmd_id, 0);
    assert_eq!(drv.hints().status().state, RoundState::Idle);
    assert_eq!(
        drv.hints().start_round(&drv.hints().new_epoch()),
        Err(HintError::NotActive)
    );
    // Notifies after reset are ignored, not errors.
    assert!(drv.dev.queue_notify(0).is_ok());
}

#[test]
fn activation_checks_queues() {
    let mem = BalloonDriver::guest_memory(&[(0, 64 * MIB)]);
    let mut b = Balloon::new(BalloonConfig::all_features(layout_64m())).unwrap();
    b.ack_features(b.device_features());
    let irq = std::sync::Arc::new(TestInterrupt::default());
    let gm = vm_memory::GuestMemoryAtomic::new(mem.clone());
    let err = b.activate(gm.clone(), irq.clone(), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("expected 5 queues"), "{err}");
    // A ready queue whose rings lie outside guest memory.
    let q = DriverQueue::new(&mem, DRIVER_AREA, 16);
    let mut bad = q.device_queue(256);
    use virtio_queue::QueueT;
    bad.set_desc_table_address(Some(0x4000_0000), Some(0));
    let queues = vec![
        bad,
        q.device_queue(256),
        q.device_queue(256),
        q.device_queue(256),
        q.device_queue(256),
    ];
    let err = b.activate(gm, irq, queues).unwrap_err();
    assert!(err.to_string().contains("queue 0"), "{err}");
}

#[test]
fn metrics_render_as_json() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    drv.inflate(&[1]);
    let j = drv.handle().metrics().snapshot().to_json();
    assert!(j.contains("\"inflate_pages\":1"), "{j}");
}

#[test]
fn hints_refused_when_page_poison_not_offered() {
    let c = BalloonConfig {
        page_poison: false,
        ..BalloonConfig::all_features(layout_64m())
    };
    let drv = BalloonDriver::new(c, all(), 64);
    assert_eq!(
        drv.hints().start_round(&drv.hints().new_epoch()),
        Err(HintError::PoisonUnknown)
    );
    assert_eq!(drv.handle().metrics().snapshot().hint_rounds_refused, 1);
}

#[test]
fn second_stats_buffer_returns_the_first_and_interrupts() {
    let mut drv = BalloonDriver::new(BalloonConfig::all_features(layout_64m()), all(), 64);
    drv.send_stats(&[(VIRTIO_BALLOON_S_MEMFREE, 1)]);
    drv.irq.queues.lock().unwrap().clear();
    // A driver that sends another buffer without being asked.
    let used = drv.send_stats(&[(VIRTIO_BALLOON_S_MEMFREE, 2)]);
    assert_eq!(used.len(), 1, "the older buffer came back");
    let stats_q = drv.index(QueueKind::Stats);
    assert_eq!(drv.irq.queues.lock().unwrap().clone(), vec![stats_q]);
    assert_eq!(
        drv.handle()
            .latest_stats()
            .unwrap()
            .get(VIRTIO_BALLOON_S_MEMFREE),
        Some(2)
    );
    assert!(
        drv.handle().request_stats().unwrap(),
        "the newer one is held"
    );
}

/// Linux's `init_vqs` adds and kicks the stats buffer before DRIVER_OK: the
/// device must pick it up at activation.
#[test]
fn stats_buffer_kicked_before_driver_ok_is_seen() {
    use freehint_protocol::balloon::encode_stat;
    use vm_memory::GuestMemoryAtomic;
    let mem = BalloonDriver::guest_memory(&[(0, 64 * MIB)]);
    let mut dev = Balloon::new(BalloonConfig::all_features(layout_64m())).unwrap();
    let feats = dev.device_features();
    dev.ack_features(feats);
    let qs: Vec<DriverQueue> = (0..5)
        .map(|i| DriverQueue::new(&mem, DRIVER_AREA + i * 0x4000, 64))
        .collect();
    let mut qs = qs;
    let buf = DRIVER_AREA + 0x10_0000;
    mem.write_slice(
        &encode_stat(VIRTIO_BALLOON_S_MEMFREE, 99),
        GuestAddress(buf),
    )
    .unwrap();
    qs[2].add_chain(&mem, &[(buf, 10, false)]).unwrap();
    // The early kick reaches an inactive device: ignored for now.
    dev.queue_notify(2).unwrap();
    assert!(dev.handle().latest_stats().is_none());
    let dq = qs.iter().map(|q| q.device_queue(256)).collect();
    let irq = std::sync::Arc::new(TestInterrupt::default());
    dev.activate(GuestMemoryAtomic::new(mem.clone()), irq, dq)
        .unwrap();
    let s = dev
        .handle()
        .latest_stats()
        .expect("stats seen at activation");
    assert_eq!(s.get(VIRTIO_BALLOON_S_MEMFREE), Some(99));
    assert!(dev.handle().request_stats().unwrap());
    assert_eq!(qs[2].take_used(&mem).len(), 1);
}
