// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Host device model benchmark (a bench binary writing JSON).
//!
//! ```text
//! cargo bench -p freehint-device --bench device [-- --runs N] [-- --out FILE]
//! ```
//!
//! Writes `target/bench/device.json` (under `$CARGO_TARGET_DIR` if set) and
//! prints a table. Everything goes through the real device: the driver model
//! of `freehint_device::test_utils` lays out split virtqueues in a
//! `GuestMemoryMmap`, and the real [`Balloon`] processes them.
//!
//! 1. **Guest memory described per second** (GiB of RAM covered by hints
//!    per second of round time), for 1, 8 and 64 GiB of guest RAM laid out
//!    like an x86 PC (at most 3 GiB below the PCI hole, the rest from 4 GiB),
//!    all of it free:
//!    - `standard/linux`: the driver model behaves like Linux's
//!      `virtio_balloon` on the config interrupt: id outbuf, one order-10
//!      (4 MiB) inbuf per kick, STOP. Round time = driver model + device.
//!    - `standard/batched`: 255 blocks per kick; device time only (the
//!      kicks), i.e. what the device costs per block.
//!    - `bitmap/round`: the freehint bitmap driver model: LAYOUT_QUERY,
//!      builds the bitmap, chunks of 2^20 bits (128 KiB, 4 GiB of RAM) in
//!      4 KiB descriptors, ROUND_END. Round time = driver model + device.
//!    - `bitmap/device`: chunks of 2^23 bits (1 MiB, 32 GiB of RAM), one
//!      payload descriptor each, written beforehand; device time only.
//!      Standard-protocol guest RAM is mapped (untouched, `MAP_NORESERVE`)
//!      because the device checks each block lies in guest memory; bitmap
//!      runs map no RAM at all (only the driver's rings and buffers).
//! 2. **Applying a hint set to a to-send bitmap** (`to_send &= !free`) for
//!    an 8 GiB guest (2^21 pages) and a 1 TiB guest (2^28 pages, 32 MiB of
//!    bitmap), the set filled through bitmap rounds with a mixed pattern:
//!    [`HintSet::apply_to`] (a snapshot), [`HintHandle::apply_to`] (the live
//!    set, under the device lock) and [`HintHandle::snapshot`].
//!
//! Each figure is the median of `--runs` runs (default 5); min is kept too.

use std::time::{Duration, Instant};

use freehint_device::balloon::{
    feature, Balloon, BalloonConfig, EpochToken, HintHandle, Layout, QueueKind,
    FREE_PAGE_HINT_CMD_ID_STOP, VIRTIO_BALLOON_F_FREE_PAGE_BITMAP, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
};
use freehint_device::test_utils::{BalloonDriver, HINT_BLOCK_SIZE};
use freehint_protocol::bitmap::words_for_bits;
use freehint_protocol::bitmap_hint::{ChunkHeader, Message, MAX_CHUNK_BITS, MSG_HEADER_SIZE};
use freehint_protocol::layout::Bit;
use vm_memory::{Bytes, GuestAddress};

const GIB: u64 = 1 << 30;
/// Largest RAM below the x86 PCI hole.
const LOW_MAX: u64 = 3 * GIB;
/// Where RAM continues above the hole.
const HIGH_BASE: u64 = 4 * GIB;
/// Chunk size of the driver model's whole round: 2^20 bits (128 KiB of
/// bitmap, 4 GiB of RAM) sent as 32 descriptors of 4 KiB plus the header
/// (a 2^23-bit chunk in 4 KiB pieces would need 257 descriptors, more than a
/// 256-entry queue holds without indirect descriptors).
const ROUND_CHUNK_BITS: u32 = 1 << 20;
/// Chunks the driver area (16 MiB) holds between two kicks.
const CHUNKS_PER_KICK: u64 = 8;

/// Guest RAM ranges `(start, len)` of an x86 PC with `gib` GiB.
fn ram_ranges(gib: u64) -> Vec<(u64, u64)> {
    let total = gib * GIB;
    let low = total.min(LOW_MAX);
    let mut r = vec![(0, low)];
    if total > low {
        r.push((HIGH_BASE, total - low));
    }
    r
}

fn layout(gib: u64) -> Layout {
    Layout::from_ram_byte_ranges(&ram_ranges(gib)).expect("x86 layout")
}

#[derive(Clone, Copy, Debug)]
struct Stat {
    median: Duration,
    min: Duration,
}

fn stat(mut v: Vec<Duration>) -> Stat {
    v.sort();
    Stat {
        median: v[v.len() / 2],
        min: v[0],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One "guest memory described" result.
struct Describe {
    protocol: &'static str,
    mode: &'static str,
    ram_gib: u64,
    kicks: u64,
    time: Stat,
}

impl Describe {
    fn gib_per_s(&self) -> f64 {
        self.ram_gib as f64 / self.time.median.as_secs_f64()
    }

    fn json(&self) -> String {
        format!(
            "{{\"protocol\":\"{}\",\"mode\":\"{}\",\"ram_gib\":{},\"kicks\":{},\
\"median_ms\":{:.3},\"min_ms\":{:.3},\"gib_per_s\":{:.2}}}",
            self.protocol,
            self.mode,
            self.ram_gib,
            self.kicks,
            ms(self.time.median),
            ms(self.time.min),
            self.gib_per_s()
        )
    }
}

fn free_blocks(gib: u64) -> Vec<u64> {
    ram_ranges(gib)
        .iter()
        .flat_map(|&(s, l)| (0..l / HINT_BLOCK_SIZE).map(move |i| s + i * HINT_BLOCK_SIZE))
        .collect()
}

fn standard_driver(gib: u64) -> BalloonDriver {
    BalloonDriver::new(
        BalloonConfig::all_features(layout(gib)),
        feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
        256,
    )
}

/// Linux's behaviour: one block per kick, config re-read per block.
fn standard_linux(gib: u64, runs: usize) -> Describe {
    let mut d = standard_driver(gib);
    let h = d.hints();
    let blocks = free_blocks(gib);
    let pages = gib * GIB / 4096;
    let mut times = Vec::new();
    for _ in 0..runs {
        h.start_round(&h.new_epoch()).expect("round");
        let t = Instant::now();
        let rep = d.on_config_change(&blocks);
        times.push(t.elapsed());
        assert_eq!(rep.blocks_sent, blocks.len());
        assert!(rep.stopped);
        assert_eq!(h.status().free_pages, pages, "every page hinted");
    }
    Describe {
        protocol: "standard",
        mode: "linux",
        ram_gib: gib,
        kicks: blocks.len() as u64 + 2,
        time: stat(times),
    }
}

/// 255 blocks per kick, device time only.
fn standard_batched(gib: u64, runs: usize) -> Describe {
    let mut d = standard_driver(gib);
    let h = d.hints();
    let blocks = free_blocks(gib);
    let pages = gib * GIB / 4096;
    let mut times = Vec::new();
    let mut kicks = 0;
    for _ in 0..runs {
        let id = h.start_round(&h.new_epoch()).expect("round");
        d.send_cmd_id(id);
        let mut t = Duration::ZERO;
        kicks = 0;
        for batch in blocks.chunks(255) {
            let mem = d.m();
            for &b in batch {
                d.queue(QueueKind::FreePage)
                    .add_chain(&mem, &[(b, HINT_BLOCK_SIZE as u32, true)])
                    .expect("slot");
            }
            drop(mem);
            let s = Instant::now();
            let used = d.kick(QueueKind::FreePage);
            t += s.elapsed();
            kicks += 1;
            assert_eq!(used.len(), batch.len());
        }
        d.send_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP);
        assert_eq!(h.status().free_pages, pages, "every page hinted");
        times.push(t);
    }
    Describe {
        protocol: "standard",
        mode: "batched",
        ram_gib: gib,
        kicks,
        time: stat(times),
    }
}

/// A bitmap-protocol driver with no guest RAM mapped (only its own area).
fn bitmap_driver(layout: Layout) -> BalloonDriver {
    let dev = Balloon::new(BalloonConfig::all_features(layout)).expect("balloon");
    let mem = BalloonDriver::guest_memory(&[]);
    BalloonDriver::with_device(
        dev,
        mem,
        feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT) | feature(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP),
        256,
    )
}

/// Sends the bitmap `words` as chunks of `MAX_CHUNK_BITS` (one payload
/// descriptor each), `CHUNKS_PER_KICK` per kick. Returns the device time
/// (kicks only) and the number of kicks.
fn send_bitmap(d: &mut BalloonDriver, id: u32, words: &[u64], total_bits: u64) -> (Duration, u64) {
    let mut t = Duration::ZERO;
    let mut kicks = 0;
    let mut first = 0u64;
    while first < total_bits {
        let mut n = 0;
        while first < total_bits && n < CHUNKS_PER_KICK {
            let nr = (total_bits - first).min(u64::from(MAX_CHUNK_BITS)) as u32;
            let hdr = Message::Chunk(ChunkHeader {
                cmd_id: id,
                first_bit: Bit(first),
                nr_bits: nr,
            })
            .header();
            let mut hb = [0u8; MSG_HEADER_SIZE];
            hdr.write(&mut hb).expect("header");
            let w0 = (first / 64) as usize;
            let nw = (nr as usize).div_ceil(64);
            let payload: Vec<u8> = words[w0..w0 + nw]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let ha = d.alloc(MSG_HEADER_SIZE as u64);
            let pa = d.alloc(payload.len() as u64);
            let mem = d.m();
            mem.write_slice(&hb, GuestAddress(ha)).expect("header");
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
            drop(mem);
            first += u64::from(nr);
            n += 1;
        }
        let s = Instant::now();
        let used = d.kick(QueueKind::FreePage);
        t += s.elapsed();
        kicks += 1;
        assert_eq!(used.len() as u64, n);
    }
    (t, kicks)
}

fn end_round(d: &mut BalloonDriver, id: u32) {
    let end = Message::RoundEnd {
        cmd_id: id,
        free_pages: u32::MAX,
    };
    d.send_msg(&end.header(), &[], 0, 0);
}

/// The bitmap driver model's whole round (layout query, bitmap build,
/// chunks, ROUND_END).
fn bitmap_round(gib: u64, runs: usize) -> Describe {
    let l = layout(gib);
    let mut d = bitmap_driver(l);
    let h = d.hints();
    let free: Vec<(u64, u64)> = ram_ranges(gib)
        .iter()
        .map(|&(s, len)| (s >> 12, len >> 12))
        .collect();
    let mut times = Vec::new();
    for _ in 0..runs {
        let id = h.start_round(&h.new_epoch()).expect("round");
        let t = Instant::now();
        d.bitmap_round(id, &free, ROUND_CHUNK_BITS)
            .expect("layout reply");
        times.push(t.elapsed());
        assert_eq!(h.status().free_pages, l.total_bits(), "every page hinted");
    }
    let chunks = l.total_bits().div_ceil(u64::from(ROUND_CHUNK_BITS));
    Describe {
        protocol: "bitmap",
        mode: "round",
        ram_gib: gib,
        kicks: chunks + 2,
        time: stat(times),
    }
}

/// Chunks prepared by the driver, device time only.
fn bitmap_device(gib: u64, runs: usize) -> Describe {
    let l = layout(gib);
    let mut d = bitmap_driver(l);
    let h = d.hints();
    let words = vec![!0u64; words_for_bits(l.total_bits())];
    let mut times = Vec::new();
    let mut kicks = 0;
    for _ in 0..runs {
        let id = h.start_round(&h.new_epoch()).expect("round");
        d.layout_query(id).expect("layout reply");
        let (t, k) = send_bitmap(&mut d, id, &words, l.total_bits());
        kicks = k;
        end_round(&mut d, id);
        assert_eq!(h.status().free_pages, l.total_bits(), "every page hinted");
        times.push(t);
    }
    Describe {
        protocol: "bitmap",
        mode: "device",
        ram_gib: gib,
        kicks,
        time: stat(times),
    }
}

/// One "apply" result.
struct Apply {
    ram_gib: u64,
    bits: u64,
    free_pages: u64,
    hintset: Stat,
    live: Stat,
    snapshot: Stat,
}

impl Apply {
    fn json(&self) -> String {
        let bytes = self.bits / 8;
        let gbs = |s: Stat| bytes as f64 / s.median.as_secs_f64() / GIB as f64;
        format!(
            "{{\"ram_gib\":{},\"bits\":{},\"bitmap_bytes\":{bytes},\"free_pages\":{},\
\"hintset_apply_median_ms\":{:.3},\"hintset_apply_min_ms\":{:.3},\"hintset_apply_bitmap_gib_per_s\":{:.2},\
\"live_apply_median_ms\":{:.3},\"live_apply_min_ms\":{:.3},\
\"snapshot_median_ms\":{:.3},\"snapshot_min_ms\":{:.3}}}",
            self.ram_gib,
            self.bits,
            self.free_pages,
            ms(self.hintset.median),
            ms(self.hintset.min),
            gbs(self.hintset),
            ms(self.live.median),
            ms(self.live.min),
            ms(self.snapshot.median),
            ms(self.snapshot.min),
        )
    }
}

/// Fills the free set of a `pages`-page guest through one bitmap round
/// (words alternate: all free, none free, `0x00ff..`, `0x5555..`).
fn filled_hints(pages: u64) -> (HintHandle, EpochToken, BalloonDriver, u64) {
    let l = Layout::from_ram_pfn_ranges(&[(0, pages)]).expect("layout");
    let mut d = bitmap_driver(l);
    let h = d.hints();
    let pattern = [!0u64, 0, 0x00ff_00ff_00ff_00ff, 0x5555_5555_5555_5555];
    let words: Vec<u64> = (0..words_for_bits(pages))
        .map(|i| pattern[i % pattern.len()])
        .collect();
    let free: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    let token = h.new_epoch();
    let id = h.start_round(&token).expect("round");
    d.layout_query(id).expect("layout reply");
    send_bitmap(&mut d, id, &words, pages);
    end_round(&mut d, id);
    assert_eq!(h.status().free_pages, free);
    (h, token, d, free)
}

fn apply(pages: u64, runs: usize) -> Apply {
    let (h, token, _d, free) = filled_hints(pages);
    let mut to_send = vec![!0u64; words_for_bits(pages)];
    let (mut t_set, mut t_live, mut t_snap) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let s = Instant::now();
        let set = h.snapshot();
        t_snap.push(s.elapsed());

        to_send.fill(!0);
        let s = Instant::now();
        let n = set.apply_to(&token, &mut to_send).expect("apply snapshot");
        t_set.push(s.elapsed());
        assert_eq!(n, free);

        to_send.fill(!0);
        let s = Instant::now();
        let n = h.apply_to(&token, &mut to_send).expect("apply live");
        t_live.push(s.elapsed());
        assert_eq!(n, free);
    }
    Apply {
        ram_gib: pages * 4096 / GIB,
        bits: pages,
        free_pages: free,
        hintset: stat(t_set),
        live: stat(t_live),
        snapshot: stat(t_snap),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn out_path(args: &[String]) -> std::path::PathBuf {
    if let Some(p) = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
    {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench/device.json")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    let sizes = [1u64, 8, 64];

    let mut describe = Vec::new();
    for &gib in &sizes {
        for r in [
            standard_linux(gib, runs),
            standard_batched(gib, runs),
            bitmap_round(gib, runs),
            bitmap_device(gib, runs),
        ] {
            eprintln!(
                "describe {:>8}/{:<7} {:>3} GiB: {:>9.3} ms median ({:>9.3} min), {:>9.1} GiB/s, {} kicks",
                r.protocol,
                r.mode,
                r.ram_gib,
                ms(r.time.median),
                ms(r.time.min),
                r.gib_per_s(),
                r.kicks
            );
            describe.push(r);
        }
    }

    let mut applies = Vec::new();
    for pages in [1u64 << 21, 1 << 28] {
        let a = apply(pages, runs.max(5));
        eprintln!(
            "apply {:>5} GiB ({} bits): HintSet {:.3} ms, live {:.3} ms, snapshot {:.3} ms (medians)",
            a.ram_gib,
            a.bits,
            ms(a.hintset.median),
            ms(a.live.median),
            ms(a.snapshot.median)
        );
        applies.push(a);
    }

    let json = format!(
        "{{\"bench\":\"freehint-device\",\"machine\":{{\"cpu\":\"{}\",\"cpus\":{}}},\"runs\":{runs},\
\"describe\":[{}],\"apply\":[{}]}}\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        describe
            .iter()
            .map(Describe::json)
            .collect::<Vec<_>>()
            .join(","),
        applies
            .iter()
            .map(Apply::json)
            .collect::<Vec<_>>()
            .join(","),
    );
    let path = out_path(&args);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the output directory");
    }
    std::fs::write(&path, &json).expect("write the JSON result");
    eprintln!("wrote {}", path.display());
}
