// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Seed corpus: well-formed sessions a real driver would produce, plus a few
//! hostile ones, so the fuzzer starts deep inside every queue's processing.
//! `cargo test` (in `device/fuzz/common`) writes them to
//! `device/fuzz/corpus/balloon_queues/` and checks each one reaches the code
//! it is meant for.

use std::path::Path;

use freehint_protocol::balloon::{
    feature, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_FREE_PAGE_BITMAP,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use freehint_protocol::bitmap_hint::{
    KIND_CHUNK, KIND_LAYOUT_QUERY, KIND_ROUND_END, LAYOUT_REPLY_MAX,
};

use super::{encode, BalloonInput, CmdId, FuzzDesc, LayoutChoice, Offer, Op, DATA_BASE, HIGH_BASE};

/// Descriptor flag: next.
const NEXT: u16 = 1;
/// Descriptor flag: device writes.
const WRITE: u16 = 2;

/// Queue indices when every standard feature is acknowledged.
const INFLATEQ: u8 = 0;
const DEFLATEQ: u8 = 1;
const STATSQ: u8 = 2;
const FREEQ: u8 = 3;
const REPORTQ: u8 = 4;

fn offer_all() -> Offer {
    Offer {
        stats: true,
        deflate_on_oom: true,
        free_page_hint: true,
        bitmap: true,
        page_poison: true,
        reporting: true,
        must_tell_host: false,
        poison_val: 0,
    }
}

fn ack(bits: &[u32]) -> u64 {
    bits.iter()
        .fold(feature(VIRTIO_F_VERSION_1), |f, &b| f | feature(b))
}

fn ack_standard() -> u64 {
    ack(&[
        VIRTIO_BALLOON_F_STATS_VQ,
        VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        VIRTIO_BALLOON_F_FREE_PAGE_HINT,
        VIRTIO_BALLOON_F_PAGE_POISON,
        VIRTIO_BALLOON_F_REPORTING,
    ])
}

fn d(addr: u64, len: u32, flags: u16) -> FuzzDesc {
    FuzzDesc {
        addr,
        len,
        flags,
        next: 0,
    }
}

fn chain(queue: u8, start: u16, descs: Vec<FuzzDesc>) -> Op {
    Op::AddChain {
        queue,
        start,
        raw: false,
        descs,
    }
}

fn notify(queue: u8) -> Op {
    Op::Notify {
        queue: queue.into(),
    }
}

fn input(ack: u64, ops: Vec<Op>) -> BalloonInput {
    BalloonInput {
        offer: offer_all(),
        layout: LayoutChoice::Exact,
        ack,
        queues: Vec::new(),
        ops,
    }
}

/// A Linux-style standard hint round: id outbuf, two free blocks (64 pages
/// low, 16 pages high), STOP; then apply, snapshot, new epoch, finish.
pub fn standard_round() -> BalloonInput {
    let id = DATA_BASE;
    let stop = DATA_BASE + 8;
    input(
        ack_standard(),
        vec![
            Op::StartRound { stale_epoch: false },
            Op::ReadConfig { offset: 8, len: 4 },
            Op::WriteCmdId {
                addr: id,
                id: CmdId::Current,
            },
            chain(FREEQ, 0, vec![d(id, 4, 0)]),
            notify(FREEQ),
            chain(FREEQ, 1, vec![d(0x40000, 0x40000, WRITE)]),
            chain(FREEQ, 2, vec![d(HIGH_BASE, 0x10000, WRITE)]),
            notify(FREEQ),
            Op::Apply,
            Op::Snapshot,
            Op::WriteCmdId {
                addr: stop,
                id: CmdId::Raw(0),
            },
            chain(FREEQ, 3, vec![d(stop, 4, 0)]),
            notify(FREEQ),
            Op::ApplySnapshot,
            Op::Snapshot,
            Op::NewEpoch,
            Op::ApplySnapshot,
            // A block for the old round after the epoch moved: dropped.
            chain(FREEQ, 4, vec![d(0x80000, 0x1000, WRITE)]),
            notify(FREEQ),
            Op::Apply,
            Op::Finish,
        ],
    )
}

/// A freehint bitmap round: LAYOUT_QUERY with a reply buffer, one chunk of
/// 256 bits (128 free), ROUND_END, apply.
pub fn bitmap_round() -> BalloonInput {
    let q = DATA_BASE;
    let reply = DATA_BASE + 0x100;
    let chunk = DATA_BASE + 0x1000;
    let end = DATA_BASE + 0x2000;
    let mut payload = vec![0xffu8; 16];
    payload.extend_from_slice(&[0u8; 16]);
    input(
        ack_standard() | feature(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP),
        vec![
            Op::StartRound { stale_epoch: false },
            Op::WriteMsg {
                addr: q,
                kind: KIND_LAYOUT_QUERY,
                reserved: 0,
                cmd_id: CmdId::Current,
                nr_bits: 0,
                first_bit: 0,
                payload: Vec::new(),
            },
            chain(
                FREEQ,
                0,
                vec![d(q, 24, 0), d(reply, LAYOUT_REPLY_MAX as u32, WRITE)],
            ),
            notify(FREEQ),
            Op::WriteMsg {
                addr: chunk,
                kind: KIND_CHUNK,
                reserved: 0,
                cmd_id: CmdId::Current,
                nr_bits: 256,
                first_bit: 64,
                payload,
            },
            // Header and payload split over two descriptors.
            chain(FREEQ, 2, vec![d(chunk, 24, 0), d(chunk + 24, 32, 0)]),
            notify(FREEQ),
            Op::Apply,
            Op::WriteMsg {
                addr: end,
                kind: KIND_ROUND_END,
                reserved: 0,
                cmd_id: CmdId::Current,
                nr_bits: 128,
                first_bit: 0,
                payload: Vec::new(),
            },
            chain(FREEQ, 4, vec![d(end, 24, 0)]),
            notify(FREEQ),
            Op::Snapshot,
            Op::ApplySnapshot,
            Op::NewEpoch,
            Op::Apply,
        ],
    )
}

/// Inflate 16 pages (one out of range), deflate 8, update `actual`.
pub fn inflate_deflate() -> BalloonInput {
    let a = DATA_BASE;
    let b = DATA_BASE + 0x100;
    let mut pfns: Vec<u32> = (0x30..0x40).collect();
    pfns.push(0x7fff_ffff);
    input(
        ack_standard(),
        vec![
            Op::SetTarget(16),
            Op::WritePfns { addr: a, pfns },
            chain(INFLATEQ, 0, vec![d(a, 17 * 4, 0)]),
            notify(INFLATEQ),
            Op::WriteConfig {
                offset: 4,
                data: 16u32.to_le_bytes().to_vec(),
            },
            Op::WritePfns {
                addr: b,
                pfns: (0x30..0x38).collect(),
            },
            chain(DEFLATEQ, 0, vec![d(b, 8 * 4, 0)]),
            notify(DEFLATEQ),
            Op::WriteConfig {
                offset: 4,
                data: 8u32.to_le_bytes().to_vec(),
            },
        ],
    )
}

/// A stats buffer (three known tags, one unknown), requested twice.
pub fn stats() -> BalloonInput {
    let s = DATA_BASE;
    let mut bytes = Vec::new();
    for (tag, val) in [(4u16, 1u64 << 30), (5, 2 << 30), (6, 1 << 29), (99, 7)] {
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes.extend_from_slice(&val.to_le_bytes());
    }
    input(
        ack_standard(),
        vec![
            Op::WriteMem {
                addr: s,
                data: bytes,
            },
            chain(STATSQ, 0, vec![d(s, 40, 0)]),
            notify(STATSQ),
            Op::RequestStats,
            chain(STATSQ, 1, vec![d(s, 40, 0)]),
            notify(STATSQ),
        ],
    )
}

/// Free page reporting of two ranges, then the same with a poisoning guest.
pub fn reporting() -> BalloonInput {
    input(
        ack_standard(),
        vec![
            chain(
                REPORTQ,
                0,
                vec![
                    d(0x60000, 0x8000, WRITE),
                    d(HIGH_BASE + 0x1000, 0x3000, WRITE),
                ],
            ),
            notify(REPORTQ),
            Op::WriteConfig {
                offset: 12,
                data: 0xaau32.to_le_bytes().to_vec(),
            },
            chain(REPORTQ, 2, vec![d(0x70000, 0x4000, WRITE)]),
            notify(REPORTQ),
            Op::StartRound { stale_epoch: false },
        ],
    )
}

/// Hostile chains: a loop, a chain out of guest memory, a wrong direction,
/// an avail index far ahead, a notify on a queue that does not exist,
/// reset and reactivation.
pub fn hostile() -> BalloonInput {
    let a = DATA_BASE;
    input(
        ack_standard(),
        vec![
            Op::StartRound { stale_epoch: false },
            Op::AddChain {
                queue: FREEQ,
                start: 5,
                raw: true,
                descs: vec![FuzzDesc {
                    addr: a,
                    len: 4,
                    flags: NEXT | WRITE,
                    next: 5,
                }],
            },
            notify(FREEQ),
            chain(INFLATEQ, 0, vec![d(0x7_0000_0000, 64, 0)]),
            notify(INFLATEQ),
            chain(INFLATEQ, 1, vec![d(a, 64, WRITE)]),
            notify(INFLATEQ),
            Op::BumpAvailIdx {
                queue: DEFLATEQ,
                delta: 1000,
            },
            notify(DEFLATEQ),
            Op::Notify { queue: 17 },
            Op::StartRound { stale_epoch: true },
            Op::Reset,
            notify(FREEQ),
            Op::Reactivate,
            Op::Apply,
        ],
    )
}

/// Indirect descriptors (VIRTIO_RING_F_INDIRECT_DESC acknowledged): a
/// standard round whose free blocks come in one indirect table, then a table
/// of 600 entries (more than the device follows).
pub fn indirect() -> BalloonInput {
    input(
        ack_standard() | feature(VIRTIO_RING_F_INDIRECT_DESC),
        indirect_ops(),
    )
}

fn indirect_ops() -> Vec<Op> {
    let id = DATA_BASE;
    let table = DATA_BASE + 0x1000;
    let big = DATA_BASE + 0x4000;
    vec![
        Op::StartRound { stale_epoch: false },
        Op::WriteCmdId {
            addr: id,
            id: CmdId::Current,
        },
        chain(FREEQ, 0, vec![d(id, 4, 0)]),
        notify(FREEQ),
        Op::AddIndirect {
            queue: FREEQ,
            slot: 1,
            table,
            head_len: None,
            raw: false,
            descs: vec![
                d(0x40000, 0x10000, WRITE),
                d(0x50000, 0x10000, WRITE),
                d(HIGH_BASE, 0x8000, WRITE),
            ],
        },
        notify(FREEQ),
        Op::AddIndirect {
            queue: FREEQ,
            slot: 2,
            table: big,
            head_len: None,
            raw: false,
            descs: vec![d(0x60000, 0x1000, WRITE); 600],
        },
        notify(FREEQ),
        Op::Apply,
    ]
}

/// Every seed with its file name.
pub fn all() -> Vec<(&'static str, BalloonInput)> {
    vec![
        ("standard_round", standard_round()),
        ("bitmap_round", bitmap_round()),
        ("inflate_deflate", inflate_deflate()),
        ("stats", stats()),
        ("reporting", reporting()),
        ("hostile", hostile()),
        ("indirect", indirect()),
    ]
}

/// Writes the seeds into `dir` (created if missing).
pub fn write_corpus(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, input) in all() {
        std::fs::write(dir.join(format!("seed-{name}")), encode(&input))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run;

    #[test]
    fn write_seed_corpus() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/balloon_queues");
        write_corpus(&dir).unwrap();
        for (name, input) in all() {
            let bytes = std::fs::read(dir.join(format!("seed-{name}"))).unwrap();
            assert_eq!(crate::decode(&bytes), Some(input), "seed {name}");
        }
    }

    #[test]
    fn standard_seed_hints_80_pages() {
        let o = run(&standard_round());
        assert!(o.activated);
        assert_eq!(o.metrics.hint_pages, 64 + 16);
        assert_eq!(o.metrics.hint_rounds, 1);
        // Applied live while collecting and from the snapshot after STOP.
        assert_eq!(o.cleared, 2 * 80);
        assert!(o.metrics.hint_epoch_dropped + o.metrics.hint_stale >= 1);
        assert!(o.config_irqs >= 2, "round request and DONE");
    }

    #[test]
    fn bitmap_seed_merges_chunk() {
        let o = run(&bitmap_round());
        assert!(o.activated);
        assert_eq!(o.metrics.bitmap_bad_message, 0);
        assert_eq!(o.metrics.bitmap_bad_reply_buffer, 0);
        // 128 free bits, applied live and from the snapshot.
        assert_eq!(o.cleared, 2 * 128);
    }

    #[test]
    fn inflate_deflate_seed_discards() {
        let o = run(&inflate_deflate());
        assert_eq!(o.metrics.inflate_pages, 16);
        assert_eq!(o.metrics.pfn_out_of_range, 1);
        assert_eq!(o.metrics.deflate_pages, 8);
        assert_eq!(o.metrics.discard_bytes, 16 * 4096);
    }

    #[test]
    fn stats_seed_updates() {
        let o = run(&stats());
        assert_eq!(o.metrics.stats_updates, 2);
        assert_eq!(o.metrics.stats_unknown_tag, 2);
    }

    #[test]
    fn reporting_seed_discards_then_respects_poison() {
        let o = run(&reporting());
        assert_eq!(o.metrics.report_chains, 2);
        assert_eq!(o.metrics.discard_bytes, 0x8000 + 0x3000);
        assert_eq!(o.metrics.discard_skipped_poison, 1);
        assert_eq!(o.metrics.hint_rounds_refused, 1);
    }

    #[test]
    fn indirect_seed_merges_table_and_bounds_long_one() {
        let o = run(&indirect());
        assert_eq!(o.metrics.hint_pages, 16 + 16 + 8);
        // Applied by the Apply op and again by the final invariant check.
        assert_eq!(o.cleared, 2 * 40);
        assert_eq!(o.metrics.chain_too_long, 1);
    }

    #[test]
    fn indirect_tables_are_dropped_when_the_feature_is_not_acked() {
        let o = run(&input(ack_standard(), indirect_ops()));
        assert_eq!(o.metrics.indirect_not_negotiated, 2);
        assert_eq!(o.metrics.hint_pages, 0, "nothing of the tables is merged");
        assert_eq!(o.metrics.chain_too_long, 0);
    }

    #[test]
    fn hostile_seed_counts_drops() {
        let o = run(&hostile());
        assert!(o.metrics.chain_too_long >= 1);
        assert!(o.metrics.descriptor_out_of_memory >= 1);
        assert!(o.metrics.bad_pfn_descriptor >= 1);
        assert_eq!(o.metrics.unknown_queue, 1);
    }
}
