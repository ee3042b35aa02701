//! virtio-balloon ABI: command ids, queue numbering, config, stats.

use freehint_protocol::balloon::*;
use proptest::prelude::*;

#[test]
fn feature_bits_match_linux_uapi() {
    assert_eq!(
        [
            VIRTIO_BALLOON_F_MUST_TELL_HOST,
            VIRTIO_BALLOON_F_STATS_VQ,
            VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
            VIRTIO_BALLOON_F_FREE_PAGE_HINT,
            VIRTIO_BALLOON_F_PAGE_POISON,
            VIRTIO_BALLOON_F_REPORTING,
        ],
        [0, 1, 2, 3, 4, 5]
    );
    assert_eq!(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP, 23);
    assert_eq!(feature(VIRTIO_F_VERSION_1), 1 << 32);
    assert_eq!(feature(64), 0);
    assert_eq!(VIRTIO_BALLOON_PFN_SHIFT, 12);
    assert!(bitmap_hints(feature(3) | feature(23)));
    assert!(!bitmap_hints(feature(23)));
    assert!(!bitmap_hints(feature(3)));
}

#[test]
fn cmd_id_sequence_and_wrap() {
    assert_eq!(FREE_PAGE_HINT_CMD_ID_STOP, 0);
    assert_eq!(FREE_PAGE_HINT_CMD_ID_DONE, 1);
    assert_eq!(next_cmd_id(0), 0x8000_0000);
    assert_eq!(next_cmd_id(1), 0x8000_0000);
    assert_eq!(next_cmd_id(0x7fff_ffff), 0x8000_0000);
    assert_eq!(next_cmd_id(0x8000_0000), 0x8000_0001);
    assert_eq!(next_cmd_id(u32::MAX - 1), u32::MAX);
    assert_eq!(next_cmd_id(u32::MAX), 0x8000_0000);
    // A long run from the start never yields STOP/DONE or repeats early.
    let mut id = FREE_PAGE_HINT_CMD_ID_STOP;
    let mut prev = 0;
    for _ in 0..1000 {
        id = next_cmd_id(id);
        assert!(id >= FREE_PAGE_HINT_CMD_ID_MIN);
        assert_ne!(id, prev);
        prev = id;
    }
}

proptest! {
    #[test]
    fn cmd_id_never_stop_or_done(prev in any::<u32>()) {
        let n = next_cmd_id(prev);
        prop_assert!(n >= FREE_PAGE_HINT_CMD_ID_MIN);
        prop_assert_ne!(n, prev);
        if (FREE_PAGE_HINT_CMD_ID_MIN..u32::MAX).contains(&prev) {
            prop_assert_eq!(n, prev + 1);
        }
    }

    #[test]
    fn queue_layout_ignores_unrelated_bits(features in any::<u64>()) {
        let relevant = features & (feature(1) | feature(3) | feature(5));
        prop_assert_eq!(QueueLayout::for_features(features), QueueLayout::for_features(relevant));
    }

    #[test]
    fn config_round_trip(a in any::<u32>(), b in any::<u32>(), c in any::<u32>(), d in any::<u32>()) {
        let cfg = ConfigSpace { num_pages: a, actual: b, free_page_hint_cmd_id: c, poison_val: d };
        prop_assert_eq!(ConfigSpace::from_bytes(&cfg.to_bytes()), cfg);
    }
}

/// All 64 combinations of feature bits 0..6: the compacted numbering.
#[test]
fn queue_layout_all_combinations() {
    for f in 0u64..64 {
        let q = QueueLayout::for_features(f);
        let mut want = vec![QueueKind::Inflate, QueueKind::Deflate];
        if f & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
            want.push(QueueKind::Stats);
        }
        if f & (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT) != 0 {
            want.push(QueueKind::FreePage);
        }
        if f & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
            want.push(QueueKind::Reporting);
        }
        assert_eq!(q.num_queues(), want.len(), "features {f:#x}");
        assert_eq!(q.kinds(), &want[..]);
        for (i, &k) in want.iter().enumerate() {
            assert_eq!(q.index_of(k), Some(i as u16), "features {f:#x} {k}");
            assert_eq!(q.kind_of(i as u16), Some(k));
        }
        for k in [
            QueueKind::Inflate,
            QueueKind::Deflate,
            QueueKind::Stats,
            QueueKind::FreePage,
            QueueKind::Reporting,
        ] {
            assert_eq!(q.index_of(k).is_some(), want.contains(&k));
        }
        assert_eq!(q.kind_of(want.len() as u16), None);
        assert_eq!(q.kind_of(u16::MAX), None);
        // Other feature bits (including our bitmap bit) never add a queue.
        let with_others = f | feature(0) | feature(2) | feature(4) | feature(23) | feature(32);
        assert_eq!(QueueLayout::for_features(with_others), q);
    }
    // The cases named in the design: stats absent => free page vq is index 2.
    let q = QueueLayout::for_features(feature(3) | feature(5));
    assert_eq!(q.index_of(QueueKind::FreePage), Some(2));
    assert_eq!(q.index_of(QueueKind::Reporting), Some(3));
    let q = QueueLayout::for_features(feature(1) | feature(3) | feature(5));
    assert_eq!(q.index_of(QueueKind::Reporting), Some(4));
}

#[test]
fn config_layout() {
    assert_eq!(
        (
            CONFIG_NUM_PAGES,
            CONFIG_ACTUAL,
            CONFIG_FREE_PAGE_HINT_CMD_ID,
            CONFIG_POISON_VAL,
            CONFIG_SIZE
        ),
        (0, 4, 8, 12, 16)
    );
    let cfg = ConfigSpace {
        num_pages: 0x0403_0201,
        actual: 5,
        free_page_hint_cmd_id: 0x8000_0000,
        poison_val: 0xaa,
    };
    assert_eq!(
        cfg.to_bytes(),
        [1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0x80, 0xaa, 0, 0, 0]
    );
}

#[test]
fn stat_tags_and_names() {
    assert_eq!(VIRTIO_BALLOON_S_NR, 16);
    assert_eq!(VIRTIO_BALLOON_S_SWAP_IN, 0);
    assert_eq!(VIRTIO_BALLOON_S_CACHES, 7);
    assert_eq!(VIRTIO_BALLOON_S_HTLB_PGALLOC, 8);
    assert_eq!(VIRTIO_BALLOON_S_HTLB_PGFAIL, 9);
    assert_eq!(VIRTIO_BALLOON_S_DIRECT_RECLAIM, 15);
    assert_eq!(stat_name(VIRTIO_BALLOON_S_MEMFREE), Some("free-memory"));
    assert_eq!(
        stat_name(VIRTIO_BALLOON_S_HTLB_PGFAIL),
        Some("hugetlb-failures")
    );
    assert_eq!(
        stat_name(VIRTIO_BALLOON_S_DIRECT_RECLAIM),
        Some("direct-reclaims")
    );
    assert_eq!(stat_name(16), None);
    assert_eq!(stat_name(u16::MAX), None);
    let b = encode_stat(VIRTIO_BALLOON_S_MEMTOT, 1 << 32);
    assert_eq!(b, [5, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(parse_stat(&b), Some((5, 1 << 32)));
    assert_eq!(parse_stat(&b[..9]), None);
    assert_eq!(QueueKind::FreePage.to_string(), "free_page_vq");
}
