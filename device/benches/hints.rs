// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Hint throughput benchmark (a bench binary that prints JSON).
//!
//! `cargo bench -p freehint-device --bench hints [-- --out FILE]`
//!
//! - `standard_gib_per_s`: guest RAM described per second by the standard
//!   protocol: 4 MiB free blocks (Linux's order-10 inbufs) through a real
//!   split virtqueue, 255 per kick, device-side time only (the kick).
//! - `bitmap_gib_per_s`: the same for the bitmap protocol: 1 TiB layout,
//!   chunks of 2^23 bits (1 MiB of bitmap = 32 GiB of RAM) with every bit
//!   set, device-side time only.
//! - `apply_1tib_ms`: applying a 1 TiB hint set (2^28 bits, 32 MiB) to a
//!   to-send bitmap (`to_send &= !free`), via `HintSet::apply_to` and the
//!   live `HintHandle::apply_to`.
//!
//! Each figure is the median of several runs.

use std::time::{Duration, Instant};

use freehint_device::balloon::*;
use freehint_device::test_utils::*;
use freehint_protocol::bitmap_hint::{ChunkHeader, Message, MAX_CHUNK_BITS, MSG_HEADER_SIZE};
use vm_memory::{Bytes, GuestAddress};

const GIB: u64 = 1 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn standard(ram_gib: u64, runs: usize) -> (f64, u64) {
    // x86 pc: 3 GiB below the PCI hole (where the driver model's rings
    // live), the rest above 4 GiB.
    let layout = Layout::from_ram_byte_ranges(&[(0, 3 * GIB), (4 * GIB, (ram_gib - 3) * GIB)])
        .expect("layout");
    let block_addr = |b: u64| {
        let a = b * HINT_BLOCK_SIZE;
        if a < 3 * GIB {
            a
        } else {
            a + GIB
        }
    };
    let feats = feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    let mut d = BalloonDriver::new(BalloonConfig::all_features(layout), feats, 256);
    let h = d.hints();
    let blocks = ram_gib * GIB / HINT_BLOCK_SIZE;
    let mut times = Vec::new();
    for _ in 0..runs {
        let id = h.start_round(h.epoch()).expect("round");
        d.send_cmd_id(id);
        let mut t = Duration::ZERO;
        let mut b = 0;
        while b < blocks {
            let mem = d.m();
            let mut n = 0;
            while b < blocks && n < 255 {
                d.queue(QueueKind::FreePage)
                    .add_chain(&mem, &[(block_addr(b), HINT_BLOCK_SIZE as u32, true)])
                    .expect("slot");
                b += 1;
                n += 1;
            }
            drop(mem);
            let s = Instant::now();
            let used = d.kick(QueueKind::FreePage);
            t += s.elapsed();
            assert_eq!(used.len(), n);
        }
        d.send_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
        assert_eq!(h.status().free_pages, blocks * 1024);
        times.push(t);
    }
    let t = median(times);
    ((ram_gib as f64) / t.as_secs_f64(), blocks)
}

fn bitmap(runs: usize) -> (f64, HintHandle, BalloonDriver) {
    let pages = 1u64 << 28; // 1 TiB
    let layout = Layout::from_ram_pfn_ranges(&[(0, pages)]).expect("layout");
    let dev = Balloon::new(BalloonConfig::all_features(layout)).expect("balloon");
    let mem = BalloonDriver::guest_memory(&[(0, 16 << 20)]);
    let mut d = BalloonDriver::with_device(dev, mem, !0, 256);
    let h = d.hints();
    let chunks = pages / u64::from(MAX_CHUNK_BITS);
    let payload = vec![0xffu8; (MAX_CHUNK_BITS / 8) as usize];
    let mut times = Vec::new();
    for _ in 0..runs {
        let id = h.start_round(h.epoch()).expect("round");
        d.layout_query(id).expect("layout reply");
        let mut t = Duration::ZERO;
        let mut c = 0;
        while c < chunks {
            // 8 chunks (8 MiB of payload) per kick: the driver area is 16 MiB.
            let mut n = 0;
            while c < chunks && n < 8 {
                let hdr = Message::Chunk(ChunkHeader {
                    cmd_id: id,
                    first_bit: c * u64::from(MAX_CHUNK_BITS),
                    nr_bits: MAX_CHUNK_BITS,
                })
                .header();
                let mut hb = [0u8; MSG_HEADER_SIZE];
                hdr.write(&mut hb).expect("hdr");
                let ha = d.alloc(MSG_HEADER_SIZE as u64);
                let pa = d.alloc(payload.len() as u64);
                let mem = d.m();
                mem.write_slice(&hb, GuestAddress(ha)).expect("hdr");
                mem.write_slice(&payload, GuestAddress(pa))
                    .expect("payload");
                d.queue(QueueKind::FreePage)
                    .add_chain(
                        &mem,
                        &[
                            (ha, MSG_HEADER_SIZE as u32, false),
                            (pa, payload.len() as u32, false),
                        ],
                    )
                    .expect("slot");
                c += 1;
                n += 1;
            }
            let s = Instant::now();
            let used = d.kick(QueueKind::FreePage);
            t += s.elapsed();
            assert_eq!(used.len(), n);
        }
        let end = Message::RoundEnd {
            cmd_id: id,
            free_pages: u32::MAX,
        }
        .header();
        d.send_msg(&end, &[], 0, 0);
        assert_eq!(h.status().free_pages, pages);
        times.push(t);
    }
    let t = median(times);
    (1024.0 / t.as_secs_f64(), h, d)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned());
    let runs = 5;

    let (std_gibs, blocks) = standard(8, runs);
    eprintln!("standard: {std_gibs:.1} GiB/s of RAM described ({blocks} blocks of 4 MiB)");

    let (bm_gibs, h, _d) = bitmap(runs);
    eprintln!("bitmap:   {bm_gibs:.1} GiB/s of RAM described (1 TiB, 2^23-bit chunks)");

    let set = h.snapshot();
    let words = set.words().len();
    let mut to_send = vec![!0u64; words];
    let mut t_set = Vec::new();
    let mut t_live = Vec::new();
    for _ in 0..10 {
        to_send.fill(!0);
        let s = Instant::now();
        let n = set.apply_to(&mut to_send).expect("apply");
        t_set.push(s.elapsed());
        assert_eq!(n, 1 << 28);
        to_send.fill(!0);
        let s = Instant::now();
        h.apply_to(&mut to_send).expect("apply");
        t_live.push(s.elapsed());
    }
    let set_ms = median(t_set).as_secs_f64() * 1e3;
    let live_ms = median(t_live).as_secs_f64() * 1e3;
    eprintln!("apply 1 TiB set: {set_ms:.2} ms (HintSet), {live_ms:.2} ms (HintHandle)");

    let json = format!(
        "{{\"bench\":\"freehint-device hints\",\"runs\":{runs},\
\"standard_gib_per_s\":{std_gibs:.2},\"standard_ram_gib\":8,\
\"bitmap_gib_per_s\":{bm_gibs:.2},\"bitmap_ram_gib\":1024,\
\"apply_1tib_ms\":{set_ms:.3},\"apply_1tib_live_ms\":{live_ms:.3}}}"
    );
    println!("{json}");
    if let Some(path) = out {
        std::fs::write(&path, format!("{json}\n")).expect("write --out");
    }
}
