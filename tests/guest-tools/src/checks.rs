//! The subcommands: each runs one check in the guest and reports it.

use std::fs::{self, File};
use std::time::{Duration, Instant};

use freehint_protocol::bitmap::{count_ones, test_bit, words_for_bits};
use freehint_protocol::layout::{Bit, Layout, LayoutRange, Pfn};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::cli::{ChurnArgs, Machine};
use crate::debugfs::Freehint;
use crate::mem::{self, Region, PAGE};
use crate::result::Report;
use crate::Error;

/// `KPF_BUDDY`: the head page of a free buddy block.
const KPF_BUDDY: u64 = 1 << 10;
/// `KPF_NOPAGE`: no struct page at this pfn.
const KPF_NOPAGE: u64 = 1 << 20;
/// First pfn above 4 GiB.
const PFN_4G: Pfn = Pfn::from_addr(1 << 32);

/// Pages in `[0, pfn)` covered by `layout` (dense bits below `pfn`).
fn pages_below(layout: &Layout, pfn: Pfn) -> u64 {
    layout
        .ranges()
        .iter()
        .map(|r| {
            r.end_pfn()
                .min(pfn)
                .checked_offset_from(r.first_pfn)
                .unwrap_or(0)
        })
        .sum()
}

/// `fhtool false-free --mib N`: no page we hold may be marked free.
pub fn false_free(mib: Option<u64>) -> Result<bool, Error> {
    // Default: a quarter of RAM (at least 64 MiB), so that after the unmap
    // more is freed than the per-CPU page lists can absorb (their high mark
    // may reach 1/8 of a zone) and the liveness check below sees frees.
    let mib = mib.unwrap_or_else(|| (mem::mem_total_kib() / 4 / 1024).max(64));
    let fh = Freehint::open()?;
    let region = Region::filled(mib as usize * 1024 * 1024, 0x5a, true)?;
    let before = region.pfns()?;
    fh.build()?;
    let layout = fh.layout()?;
    let mut words = Vec::new();
    fh.read_bitmap(&mut words)?;
    let after = region.pfns()?;

    let (mut held, mut not_present, mut moved, mut outside, mut false_free) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (b, a) in before.iter().zip(&after) {
        let (Some(b), Some(a)) = (b, a) else {
            not_present += 1;
            continue;
        };
        if b != a {
            // Migrated during the build: the old frame may be free by now.
            moved += 1;
            continue;
        }
        held += 1;
        match layout.pfn_to_bit(Pfn(*b)) {
            None => outside += 1,
            Some(bit) if test_bit(&words, bit.raw()) => false_free += 1,
            Some(_) => {}
        }
    }

    // Liveness of the check itself: once unmapped, (most of) the same frames
    // are back on the free lists and a new bitmap shows them.
    let locked = region.locked;
    drop(region);
    fh.build()?;
    fh.read_bitmap(&mut words)?;
    let refreed = before
        .iter()
        .flatten()
        .filter(|p| {
            layout
                .pfn_to_bit(Pfn(**p))
                .is_some_and(|bit| test_bit(&words, bit.raw()))
        })
        .count() as u64;

    let ok = false_free == 0 && outside == 0 && held * 10 >= before.len() as u64 * 9 && refreed > 0;
    let mut r = Report::new("false-free");
    r.num("mib", mib)
        .num("pages", before.len() as u64)
        .num("held", held)
        .num("false_free", false_free)
        .num("outside_layout", outside)
        .num("moved", moved)
        .num("not_present", not_present)
        .flag("mlocked", locked)
        .num("refreed_seen_free", refreed)
        .float(
            "refreed_fraction",
            refreed as f64 / before.len().max(1) as f64,
        );
    Ok(r.emit(ok))
}

/// Ground truth from /proc/kpageflags: since Linux 4.x every page of a free
/// buddy block carries `KPF_BUDDY` (fs/proc/page.c: `PageBuddy` for the head,
/// `is_free_buddy_page` for the rest), so the free set is exactly the pages
/// with that flag. Sets their bits in `out`; returns how many there were.
fn ground_truth_free(flags: &[u64], first_pfn: Pfn, out: &mut [u64], layout: &Layout) -> u64 {
    let mut pages = 0;
    let mut i = 0usize;
    while i < flags.len() {
        if flags[i] & KPF_BUDDY == 0 {
            i += 1;
            continue;
        }
        let run = flags[i..]
            .iter()
            .take_while(|&&f| f & KPF_BUDDY != 0)
            .count();
        layout.for_each_bit_run(first_pfn.unchecked_add(i as u64), run as u64, |b, n| {
            freehint_protocol::bitmap::set_bit_run(out, b.raw(), n);
        });
        pages += run as u64;
        i += run;
    }
    pages
}

/// Bitmap vs ground truth, in pages.
#[derive(Debug, Default)]
struct Comparison {
    bitmap_free: u64,
    truth_free: u64,
    buddyinfo_free: u64,
    missing: u64,
    extra: u64,
    extra_flagged: u64,
}

/// Builds a bitmap and reads /proc/kpageflags right after it, then compares.
/// Buffers are allocated by the caller before, so that this program's own
/// allocations do not move pages between the two snapshots.
fn compare_once(
    fh: &Freehint,
    layout: &Layout,
    kpf: &File,
    words: &mut Vec<u64>,
    flags_of: &mut [Vec<u64>],
    truth: &mut [u64],
) -> Result<Comparison, Error> {
    fh.build()?;
    fh.read_bitmap(words)?;
    for (r, f) in layout.ranges().iter().zip(flags_of.iter_mut()) {
        mem::read_kpageflags(kpf, r.first_pfn.raw(), f)?;
    }
    let buddyinfo = fs::read_to_string("/proc/buddyinfo").unwrap_or_default();
    if words.len() != truth.len() {
        return Err(Error::msg(format!(
            "bitmap has {} words, layout needs {}",
            words.len(),
            truth.len()
        )));
    }
    truth.fill(0);
    for (r, f) in layout.ranges().iter().zip(flags_of.iter()) {
        ground_truth_free(f, r.first_pfn, truth, layout);
    }
    let mut c = Comparison {
        bitmap_free: count_ones(words),
        truth_free: count_ones(truth),
        buddyinfo_free: mem::parse_buddyinfo(&buddyinfo),
        ..Comparison::default()
    };
    for (wi, (&b, &t)) in words.iter().zip(truth.iter()).enumerate() {
        c.missing += u64::from((t & !b).count_ones());
        let ex = b & !t;
        c.extra += u64::from(ex.count_ones());
        let mut m = ex;
        while m != 0 {
            let bit = wi as u64 * 64 + u64::from(m.trailing_zeros());
            m &= m - 1;
            let Some(pfn) = layout.bit_to_pfn(Bit(bit)) else {
                continue;
            };
            let fl = layout
                .ranges()
                .iter()
                .zip(flags_of.iter())
                .find(|(r, _)| r.contains_pfn(pfn))
                .map_or(0, |(r, f)| {
                    f[pfn.unchecked_offset_from(r.first_pfn) as usize]
                });
            // A free page (buddy or per-CPU list) has no flags but BUDDY.
            if fl & !(KPF_BUDDY | KPF_NOPAGE) != 0 {
                c.extra_flagged += 1;
            }
        }
    }
    Ok(c)
}

/// `fhtool kpageflags`: the bitmap agrees with /proc/kpageflags on a quiet
/// guest. Pass 1 walks the buddy lists only and must match the `KPF_BUDDY`
/// pages within 1 % both ways. Pass 2 adds the per-CPU lists: their pages are
/// free but not `KPF_BUDDY`, so they show up as extra; every extra page must
/// carry no page flag (as free pages do), to within 1 %.
pub fn kpageflags() -> Result<bool, Error> {
    let fh = Freehint::open()?;
    let layout = fh.layout()?;
    let nwords = words_for_bits(layout.total_bits());
    let mut words = Vec::with_capacity(nwords);
    fh.read_bitmap(&mut words)?;
    let mut flags_of: Vec<Vec<u64>> = layout
        .ranges()
        .iter()
        .map(|r| vec![1; r.nr_pages as usize])
        .collect();
    let mut truth = vec![0u64; nwords];
    let kpf = File::open("/proc/kpageflags").map_err(|e| Error::io("open /proc/kpageflags", e))?;
    let was_pcp = fh.pcp()?;

    fh.set_pcp(false)?;
    let a = compare_once(&fh, &layout, &kpf, &mut words, &mut flags_of, &mut truth);
    fh.set_pcp(true)?;
    let b = compare_once(&fh, &layout, &kpf, &mut words, &mut flags_of, &mut truth);
    fh.set_pcp(was_pcp)?;
    let (a, b) = (a?, b?);

    let limit = a.truth_free / 100;
    let ok = a.truth_free > 0
        && a.missing <= limit
        && a.extra <= limit
        && b.missing <= limit
        && b.extra_flagged <= limit;
    let pct = |n: u64| n as f64 * 100.0 / a.truth_free.max(1) as f64;
    let mut r = Report::new("kpageflags");
    r.num("bitmap_free", a.bitmap_free)
        .num("truth_free", a.truth_free)
        .num("buddyinfo_free", a.buddyinfo_free)
        .num("missing_free", a.missing)
        .num("extra_free", a.extra)
        .num("extra_free_flagged", a.extra_flagged)
        .num("limit", limit)
        .float("missing_pct", pct(a.missing))
        .float("extra_pct", pct(a.extra))
        .num("pcp_bitmap_free", b.bitmap_free)
        .num("pcp_truth_free", b.truth_free)
        .num("pcp_missing_free", b.missing)
        .num("pcp_extra_free", b.extra)
        .num("pcp_extra_free_flagged", b.extra_flagged)
        .float("pcp_extra_flagged_pct", pct(b.extra_flagged));
    Ok(r.emit(ok))
}

/// `fhtool bits [--machine pc|q35]`: one bit per RAM page, hole folded out.
pub fn bits(machine: Option<Machine>) -> Result<bool, Error> {
    let fh = Freehint::open()?;
    let iomem = fs::read_to_string("/proc/iomem").map_err(|e| Error::io("read /proc/iomem", e))?;
    let ram = mem::parse_iomem(&iomem);
    let ram_pages: u64 = ram.iter().map(|r| r.nr_pages).sum();
    fh.build()?;
    let layout = fh.layout()?;
    let stats = fh.stats()?;
    let mut words = Vec::new();
    fh.read_bitmap(&mut words)?;
    let total_bits = Freehint::stat(&stats, "total_bits")?;
    let mut ok = ram_pages > 0
        && layout.total_bits() == ram_pages
        && total_bits == ram_pages
        && words.len() == words_for_bits(ram_pages)
        && layout.ram_pages() == ram_pages;
    // Every iomem RAM page maps to a bit; bits are dense (no gap in bit space).
    let mut unmapped = 0u64;
    for r in &ram {
        for pfn in [r.first_pfn, r.first_pfn + r.nr_pages - 1] {
            if layout.pfn_to_bit(Pfn(pfn)).is_none() {
                unmapped += 1;
            }
        }
    }
    ok &= unmapped == 0;

    let mut rep = Report::new("bits");
    let high = layout
        .ranges()
        .iter()
        .find(|r| r.first_pfn >= PFN_4G)
        .copied();
    let low_end_pfn = layout
        .ranges()
        .iter()
        .filter(|r| r.first_pfn < PFN_4G)
        .map(|r| r.end_pfn())
        .max();
    if let Some(h) = high {
        let below = pages_below(&layout, PFN_4G);
        let low_end_pfn = low_end_pfn.unwrap_or_default();
        let gap_pages = PFN_4G.unchecked_offset_from(low_end_pfn);
        ok &= h.first_pfn == PFN_4G && layout.pfn_to_bit(PFN_4G) == Some(Bit(below));
        rep.flag("gap", true)
            .num("low_end_mib", low_end_pfn.addr() >> 20)
            .num("gap_pages", gap_pages)
            .num(
                "bit_of_4g",
                layout.pfn_to_bit(PFN_4G).map_or(u64::MAX, Bit::raw),
            )
            .num("pages_below_4g", below);
        if let Some(end) = machine.map(Machine::low_ram_end) {
            // Firmware reserves a little at the top of low RAM (SeaBIOS: 128 KiB).
            let low_end = low_end_pfn.addr();
            let near = low_end <= end && end - low_end <= 16 << 20;
            rep.num("expected_low_end_mib", end >> 20)
                .flag("low_end_ok", near);
            ok &= near;
        }
    } else {
        rep.flag("gap", false);
        // With more RAM than fits below 2 GiB there must be a high range.
        if let Some(end) = machine.map(Machine::low_ram_end) {
            let expect_gap = mem::mem_total_kib() * 1024 > end;
            rep.flag("gap_expected", expect_gap);
            ok &= !expect_gap;
        }
    }
    rep.num("ram_pages", ram_pages)
        .num("total_bits", total_bits)
        .num("layout_ranges", layout.ranges().len() as u64)
        .num("iomem_ranges", ram.len() as u64)
        .num("bitmap_bytes", words.len() as u64 * 8)
        .num("unmapped_ram", unmapped);
    if let Some(m) = machine {
        rep.text("machine", m.name());
    }
    Ok(rep.emit(ok))
}

/// `fhtool host-layout`: a layout from outside is validated, used, and the
/// kernel's own map is restored.
pub fn host_layout() -> Result<bool, Error> {
    let fh = Freehint::open()?;
    let own = fh.layout()?;
    let io = |e: std::io::Error| Error::io("write layout", e);
    // Malformed tables are refused and leave the layout alone.
    let unsorted = [
        LayoutRange {
            first_pfn: Pfn(100),
            nr_pages: 10,
            first_bit: Bit(0),
        },
        LayoutRange {
            first_pfn: Pfn(0),
            nr_pages: 10,
            first_bit: Bit(10),
        },
    ];
    let overlapping = [
        LayoutRange {
            first_pfn: Pfn(0),
            nr_pages: 10,
            first_bit: Bit(0),
        },
        LayoutRange {
            first_pfn: Pfn(20),
            nr_pages: 10,
            first_bit: Bit(5),
        },
    ];
    let mut rejected = [&unsorted[..], &overlapping[..]]
        .iter()
        .filter(|t| fh.set_layout(Some(t)).is_err())
        .count() as u64;
    for text in ["1 2\n", "not a layout\n", "0 1 0\n0 1 1\n", "\n"] {
        rejected += u64::from(fh.write_layout_text(text).is_err());
    }
    let unchanged = fh.layout()? == own;

    // The host's view: only the first half of the guest's first big range,
    // placed at bit 64 (bits below it unused): the bitmap must follow it.
    let big = own
        .ranges()
        .iter()
        .max_by_key(|r| r.nr_pages)
        .copied()
        .unwrap_or_default();
    let host = [LayoutRange {
        first_pfn: big.first_pfn,
        nr_pages: big.nr_pages / 2,
        first_bit: Bit(64),
    }];
    fh.set_layout(Some(&host)).map_err(io)?;
    fh.build()?;
    let stats = fh.stats()?;
    let mut words = Vec::new();
    fh.read_bitmap(&mut words)?;
    let used = fh.layout()?;
    let host_ok = used.ranges() == host
        && crate::result::json_text(&stats, "layout_source").as_deref() == Some("host")
        && words.len() == words_for_bits(64 + host[0].nr_pages)
        && words[0] == 0
        && count_ones(&words) > 0;
    fh.set_layout(None).map_err(io)?;
    let restored = fh.layout()? == own;
    let ok = rejected == 6 && unchanged && host_ok && restored;
    let mut r = Report::new("host-layout");
    r.num("rejected", rejected)
        .flag("unchanged_after_reject", unchanged)
        .flag("host_layout_used", host_ok)
        .num("host_free", count_ones(&words))
        .flag("restored", restored);
    Ok(r.emit(ok))
}

/// `fhtool churn --seconds S [--max-mib M] [--stop-file F]`: allocation
/// churn, different in every process (seeded with the pid).
pub fn churn(args: &ChurnArgs) -> Result<bool, Error> {
    let secs = args.seconds;
    let max_bytes = args.max_mib as usize * 1024 * 1024;
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Stops early once this file exists (lets a script end the churn cleanly).
    let stopped = || args.stop_file.as_ref().is_some_and(|p| p.exists());
    let mut rng = SmallRng::seed_from_u64(u64::from(std::process::id()));
    let mut live: Vec<Region> = Vec::new();
    let (mut held, mut maps, mut unmaps, mut bytes) = (0usize, 0u64, 0u64, 0u64);
    let mut iter = 0u64;
    while Instant::now() < deadline {
        iter += 1;
        if iter % 64 == 0 && stopped() {
            break;
        }
        let grow = live.is_empty() || (held < max_bytes && rng.random_bool(0.5));
        if grow {
            // 4 KiB .. 8 MiB, biased towards small sizes.
            let pages = 1usize << rng.random_range(0..12);
            let pages = pages + rng.random_range(0..pages);
            let r = Region::filled(pages * PAGE, rng.random(), false)?;
            held += r.pages() * PAGE;
            bytes += (r.pages() * PAGE) as u64;
            maps += 1;
            live.push(r);
        } else {
            let i = rng.random_range(0..live.len());
            held -= live.swap_remove(i).pages() * PAGE;
            unmaps += 1;
        }
    }
    drop(live);
    let mut r = Report::new("churn");
    r.num("seconds", secs)
        .num("maps", maps)
        .num("unmaps", unmaps)
        .num("mib_touched", bytes >> 20);
    Ok(r.emit(maps > 0))
}

/// `fhtool builds --count N [--min-restarts R]`: N builds; every one must
/// succeed. Sums how often lists were resumed, restarted and truncated over
/// all builds. With R, builds go on past N (up to 4 N) until the walk has
/// restarted a list from its head R times: that proves the path ran. A
/// restart needs the allocator to take the kept block between two holds,
/// which under churn happened 8 to 19 times per 1000 builds here.
pub fn builds(count: u64, min_restarts: u64) -> Result<bool, Error> {
    let max_count = if min_restarts > 0 {
        count.saturating_mul(4)
    } else {
        count
    };
    let fh = Freehint::open()?;
    let before = Freehint::stat(&fh.stats()?, "builds")?;
    let t = Instant::now();
    let (mut failed, mut resumes, mut restarts, mut truncated, mut pages_free_min) =
        (0u64, 0u64, 0u64, 0u64, u64::MAX);
    let mut stats = String::new();
    let mut attempted = 0u64;
    while attempted < count || (restarts < min_restarts && attempted < max_count) {
        attempted += 1;
        if fh.build().is_err() {
            failed += 1;
            continue;
        }
        stats = fh.stats()?;
        resumes += Freehint::stat(&stats, "resumes")?;
        restarts += Freehint::stat(&stats, "restarts")?;
        truncated += Freehint::stat(&stats, "lists_truncated")?;
        pages_free_min = pages_free_min.min(Freehint::stat(&stats, "pages_free")?);
    }
    let done = Freehint::stat(&fh.stats()?, "builds")? - before;
    let mut r = Report::new("builds");
    r.num("count", attempted)
        .num("done", done)
        .num("failed", failed)
        .num("elapsed_ms", t.elapsed().as_millis() as u64)
        .num("budget", Freehint::stat(&stats, "budget").unwrap_or(0))
        .num("resumes", resumes)
        .num("restarts", restarts)
        .num("lists_truncated", truncated)
        .num(
            "pages_free_min",
            if pages_free_min == u64::MAX {
                0
            } else {
                pages_free_min
            },
        )
        .num(
            "max_lock_hold_us_all",
            Freehint::stat(&stats, "max_lock_hold_ns_all").unwrap_or(0) / 1000,
        );
    r.num("min_restarts", min_restarts);
    Ok(r.emit(failed == 0 && done == attempted && restarts >= min_restarts))
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Zone lock holds of all builds of a series, by duration bucket.
const HOLD_BUCKETS: [&str; 5] = [
    "holds_lt_10us",
    "holds_lt_50us",
    "holds_lt_200us",
    "holds_lt_1ms",
    "holds_ge_1ms",
];

/// One bench series: medians over `n` builds of (walk, max lock hold per
/// build, memset, pcp hold) in ns, the largest lock hold seen, the hold
/// histogram summed over the builds, and the last stats object.
struct Series {
    medians: [u64; 4],
    max_hold: u64,
    hist: [u64; 5],
    last: String,
}

fn bench_series(fh: &Freehint, n: u64) -> Result<Series, Error> {
    let mut series: [Vec<u64>; 4] = Default::default();
    let mut hist = [0u64; 5];
    let mut last = String::new();
    for _ in 0..n {
        fh.build()?;
        last = fh.stats()?;
        for (v, key) in series.iter_mut().zip([
            "walk_ns",
            "max_lock_hold_ns",
            "memset_ns",
            "max_pcp_hold_ns",
        ]) {
            v.push(Freehint::stat(&last, key)?);
        }
        for (h, key) in hist.iter_mut().zip(HOLD_BUCKETS) {
            *h += Freehint::stat(&last, key).unwrap_or(0);
        }
    }
    let max_hold = series[1].iter().copied().max().unwrap_or(0);
    let medians = series.map(|mut v| median(&mut v));
    Ok(Series {
        medians,
        max_hold,
        hist,
        last,
    })
}

/// `fhtool bench [--builds N]`: builds on an idle guest, medians; first with
/// the buddy lists only, then (the default configuration) with the per-CPU
/// lists too.
pub fn bench(builds: u64) -> Result<bool, Error> {
    let n = builds.max(1);
    let fh = Freehint::open()?;
    let was_pcp = fh.pcp()?;
    fh.set_pcp(false)?;
    let buddy = bench_series(&fh, n);
    fh.set_pcp(true)?;
    let all = bench_series(&fh, n);
    fh.set_pcp(was_pcp)?;
    let (buddy, all) = (buddy?, all?);
    let [bw, _, _, _] = buddy.medians;
    let [w, h, m, ph] = all.medians;
    let last = &all.last;
    let us = |ns: u64| ns as f64 / 1000.0;
    let holds: u64 = buddy.hist.iter().chain(&all.hist).sum();
    let over_200us: u64 = buddy.hist[3..].iter().chain(&all.hist[3..]).sum();
    let mut r = Report::new("bench-bitmap");
    r.num("mem_mib", mem::mem_total_kib() >> 10)
        .num("total_bits", Freehint::stat(last, "total_bits")?)
        .num("bitmap_bytes", Freehint::stat(last, "bitmap_bytes")?)
        .num("pages_free", Freehint::stat(last, "pages_free")?)
        .num("budget", Freehint::stat(last, "budget")?)
        .num("builds", n)
        .float("walk_us", us(w))
        .float("walk_us_buddy_only", us(bw))
        .float("lock_hold_us_median", us(h))
        .float("max_lock_hold_us", us(all.max_hold.max(buddy.max_hold)))
        .num("holds", holds)
        .num("holds_over_200us", over_200us)
        .num("holds_over_1ms", buddy.hist[4] + all.hist[4])
        .float("pcp_hold_us_median", us(ph))
        .float("memset_us", us(m))
        .float("walk_over_memset", w as f64 / m.max(1) as f64)
        .float("walk_buddy_only_over_memset", bw as f64 / m.max(1) as f64)
        .num(
            "lock_acquisitions",
            Freehint::stat(last, "lock_acquisitions")?,
        )
        .num("blocks", Freehint::stat(last, "blocks")?)
        .num("pcp_blocks", Freehint::stat(last, "pcp_blocks")?)
        .num("lists", Freehint::stat(last, "lists")?)
        .num("tsc_khz", Freehint::stat(last, "tsc_khz")?);
    Ok(r.emit(true))
}

/// `fhtool stats`: one build, its statistics as a result line.
pub fn stats() -> Result<bool, Error> {
    let fh = Freehint::open()?;
    fh.build()?;
    let s = fh.stats()?;
    let get = |k| Freehint::stat(&s, k);
    let mut r = Report::new("stats");
    r.float("walk_us", get("walk_ns")? as f64 / 1000.0)
        .float("max_lock_hold_us", get("max_lock_hold_ns")? as f64 / 1000.0)
        .float("memset_us", get("memset_ns")? as f64 / 1000.0)
        .num("pages_free", get("pages_free")?)
        .num("total_bits", get("total_bits")?)
        .num("bitmap_bytes", get("bitmap_bytes")?)
        .num("zones", get("zones")?)
        .num("lists", get("lists")?)
        .num("blocks", get("blocks")?)
        .num("lock_acquisitions", get("lock_acquisitions")?)
        .num("pages_outside_layout", get("pages_outside_layout")?)
        .num("pcp_blocks", get("pcp_blocks")?)
        .num("pcp_lists_capped", get("pcp_lists_capped")?)
        .float("max_pcp_hold_us", get("max_pcp_hold_ns")? as f64 / 1000.0)
        .num("tsc_khz", get("tsc_khz")?);
    let ok = get("pages_free")? > 0 && get("pages_outside_layout")? == 0;
    Ok(r.emit(ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ground_truth_is_the_kpf_buddy_pages() {
        let mut flags = vec![0u64; 16];
        for i in [0, 1, 2, 3, 9, 12, 13, 14, 15] {
            flags[i] = KPF_BUDDY;
        }
        flags[8] = 1 << 5; // LRU
        let layout = Layout::from_ram_pfn_ranges(&[(0, 16)]).unwrap();
        let mut out = vec![0u64; 1];
        assert_eq!(ground_truth_free(&flags, Pfn(0), &mut out, &layout), 9);
        assert_eq!(out[0], 0b1111_0010_0000_1111);
    }

    #[test]
    fn pages_below_counts_only_ram_under_the_limit() {
        let l = Layout::from_ram_pfn_ranges(&[(1, 9), (PFN_4G.raw(), 100)]).unwrap();
        assert_eq!(pages_below(&l, PFN_4G), 9);
        assert_eq!(pages_below(&l, Pfn(5)), 4);
    }
}
