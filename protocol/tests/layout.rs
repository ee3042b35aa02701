//! Layout table: construction, validation and pfn ↔ bit mapping, checked
//! exhaustively against a naive per-page model.

use std::collections::BTreeMap;

use freehint_protocol::layout::*;
use proptest::prelude::*;

mod common;
use common::Raw;

const GIB: u64 = 1 << 30;

fn r(first_pfn: u64, nr_pages: u64, first_bit: u64) -> LayoutRange {
    LayoutRange {
        first_pfn: Pfn(first_pfn),
        nr_pages,
        first_bit: Bit(first_bit),
    }
}

/// Naive model: every RAM pfn with its bit.
fn model(l: &Layout) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for r in l.ranges() {
        for i in 0..r.nr_pages {
            m.insert(r.first_pfn.raw() + i, r.first_bit.raw() + i);
        }
    }
    m
}

/// Naive validity of a peer table (mirrors the documented rules).
fn naive_valid(rs: &[LayoutRange]) -> bool {
    if rs.is_empty() || rs.len() > MAX_LAYOUT_RANGES {
        return false;
    }
    let mut prev: Option<(u128, u128)> = None;
    for r in rs {
        let (p, n, b) = (
            r.first_pfn.raw() as u128,
            r.nr_pages as u128,
            r.first_bit.raw() as u128,
        );
        if n == 0 || p + n > 1u128 << 52 || b + n > MAX_TOTAL_BITS as u128 {
            return false;
        }
        if let Some((pe, be)) = prev {
            if p < pe || b < be {
                return false;
            }
        }
        prev = Some((p + n, b + n));
    }
    true
}

/// Checks every pfn and bit in a window against the model, plus the runs.
fn check_against_model(l: &Layout) {
    let m = model(l);
    let inv: BTreeMap<u64, u64> = m.iter().map(|(&p, &b)| (b, p)).collect();
    assert_eq!(inv.len(), m.len(), "bits must be unique");
    let max_pfn = l.ranges().last().map_or(0, |r| r.end_pfn().raw());
    for pfn in 0..max_pfn + 5 {
        assert_eq!(l.p2b(pfn), m.get(&pfn).copied(), "pfn {pfn}");
    }
    for bit in 0..l.total_bits() + 5 {
        assert_eq!(l.b2p(bit), inv.get(&bit).copied(), "bit {bit}");
    }
    assert_eq!(l.ram_pages(), m.len() as u64);
    assert_eq!(l.total_bits(), inv.keys().last().map_or(0, |b| b + 1));
    for pfn in 0..max_pfn + 3 {
        for nr in 0..(max_pfn + 3 - pfn) {
            check_runs(l, &m, pfn, nr);
        }
    }
    let bits = l.total_bits();
    for bit in 0..bits + 3 {
        for nr in 0..(bits + 3 - bit) {
            check_pfn_runs(l, bit, nr);
        }
    }
}

/// `for_each_pfn_run(bit, nr)` yields exactly the pfns of bits
/// `bit..bit + nr` that the layout maps, in bit order, as maximal pieces of
/// one range each.
fn check_pfn_runs(l: &Layout, bit: u64, nr: u64) {
    let mut runs = Vec::new();
    l.pfn_runs(bit, nr, |p, k| runs.push((p, k)));
    let mut got = Vec::new();
    for &(p, k) in &runs {
        assert!(k > 0, "empty piece in {runs:?}");
        got.extend(p..p + k);
    }
    let want: Vec<u64> = (bit..bit + nr).filter_map(|b| l.b2p(b)).collect();
    assert_eq!(got, want, "for_each_pfn_run({bit}, {nr})");
    let n_ranges = l
        .ranges()
        .iter()
        .filter(|r| nr > 0 && r.first_bit.raw() < bit + nr && bit < r.end_bit().raw())
        .count();
    assert_eq!(
        runs.len(),
        n_ranges,
        "one piece per range touched: {runs:?}"
    );
}

fn check_runs(l: &Layout, m: &BTreeMap<u64, u64>, pfn: u64, nr: u64) {
    let mut runs = Vec::new();
    l.bit_runs(pfn, nr, |b, n| runs.push((b, n)));
    let mut got = Vec::new();
    for w in runs.windows(2) {
        assert!(
            w[0].0 + w[0].1 < w[1].0,
            "runs sorted and maximal: {runs:?}"
        );
    }
    for &(b, n) in &runs {
        assert!(n > 0);
        got.extend(b..b + n);
    }
    let want: Vec<u64> = m.range(pfn..pfn + nr).map(|(_, &b)| b).collect();
    let mut want_sorted = want.clone();
    want_sorted.sort_unstable();
    assert_eq!(got, want_sorted, "for_each_bit_run({pfn}, {nr})");
}

#[test]
fn x86_pc_4g_gap() {
    // 6 GiB pc guest: 3 GiB below the PCI hole, 3 GiB from 4 GiB.
    let low = 3 * GIB;
    let l = Layout::from_ram_byte_ranges(&[(0, low), (4 * GIB, 3 * GIB)]).unwrap();
    let pfn_gap = (4 * GIB - low) >> PAGE_SHIFT;
    assert_eq!(l.ranges().len(), 2);
    assert_eq!(l.total_bits(), (6 * GIB) >> PAGE_SHIFT);
    for pfn in [
        (4 * GIB) >> PAGE_SHIFT,
        ((4 * GIB) >> PAGE_SHIFT) + 1,
        ((7 * GIB) >> PAGE_SHIFT) - 1,
    ] {
        assert_eq!(l.p2b(pfn), Some(pfn - pfn_gap));
        assert_eq!(l.b2p(pfn - pfn_gap), Some(pfn));
    }
    assert_eq!(
        l.p2b((low >> PAGE_SHIFT) - 1),
        Some((low >> PAGE_SHIFT) - 1)
    );
    assert_eq!(l.p2b(low >> PAGE_SHIFT), None);
    assert_eq!(l.p2b(((4 * GIB) >> PAGE_SHIFT) - 1), None);
    assert_eq!(l.p2b((7 * GIB) >> PAGE_SHIFT), None);
    assert_eq!(l.b2p(l.total_bits()), None);
    // A free block straddling the hole: two pieces, adjacent in bit space.
    let mut runs = Vec::new();
    l.bit_runs((low >> PAGE_SHIFT) - 2, pfn_gap + 4, |b, n| {
        runs.push((b, n))
    });
    assert_eq!(runs, vec![((low >> PAGE_SHIFT) - 2, 4)]);
}

#[test]
fn max_sized_layout_16tib() {
    let l = Layout::from_ram_pfn_ranges(&[(0, MAX_TOTAL_BITS)]).unwrap();
    assert_eq!(l.total_bits(), MAX_TOTAL_BITS);
    assert_eq!(
        Layout::from_ram_pfn_ranges(&[(0, MAX_TOTAL_BITS - 1), (MAX_TOTAL_BITS + 1, 2)]),
        Err(LayoutError::TooManyBits)
    );
    assert_eq!(
        Layout::from_ranges(&[r(0, 1, MAX_TOTAL_BITS)]),
        Err(LayoutError::TooManyBits)
    );
}

#[test]
fn empty_layout_maps_nothing() {
    let l = Layout::empty();
    assert_eq!(l, Layout::default());
    assert_eq!(l.total_bits(), 0);
    assert!(l.ranges().is_empty());
    assert_eq!(l.p2b(0), None);
    assert_eq!(l.b2p(0), None);
    l.bit_runs(0, u64::MAX, |_, _| panic!("no runs in an empty layout"));
}

#[test]
fn adjacent_ram_ranges_merge_and_many_inputs_are_fine() {
    let pieces: Vec<(u64, u64)> = (0..100).map(|i| (i * 8, 8)).collect();
    let l = Layout::from_ram_pfn_ranges(&pieces).unwrap();
    assert_eq!(l.ranges(), &[r(0, 800, 0)]);
}

#[test]
fn too_many_ranges() {
    let ok: Vec<(u64, u64)> = (0..32).map(|i| (i * 10, 5)).collect();
    assert_eq!(Layout::from_ram_pfn_ranges(&ok).unwrap().ranges().len(), 32);
    let bad: Vec<(u64, u64)> = (0..33).map(|i| (i * 10, 5)).collect();
    assert_eq!(
        Layout::from_ram_pfn_ranges(&bad),
        Err(LayoutError::TooManyRanges)
    );
    let peer: Vec<LayoutRange> = (0..33).map(|i| r(i * 10, 5, i * 5)).collect();
    assert_eq!(Layout::from_ranges(&peer), Err(LayoutError::TooManyRanges));
    assert_eq!(Layout::from_ranges(&peer[..32]).unwrap().total_bits(), 160);
}

#[test]
fn every_layout_error_from_ram_ranges() {
    use LayoutError::*;
    let cases: &[(&[(u64, u64)], LayoutError)] = &[
        (&[], Empty),
        (&[(0, 0)], ZeroLength),
        (&[(0, 4), (10, 0)], ZeroLength),
        (&[(10, 4), (0, 4)], Unsorted),
        (&[(0, 10), (5, 10)], OverlappingPfns),
        (&[(0, 10), (0, 10)], OverlappingPfns),
        (&[(u64::MAX, 2)], Overflow),
        (&[(1 << 52, 1)], Overflow),
        (&[(0, MAX_TOTAL_BITS + 1)], TooManyBits),
    ];
    for (input, want) in cases {
        assert_eq!(Layout::from_ram_pfn_ranges(input), Err(*want), "{input:?}");
    }
}

#[test]
fn every_layout_error_from_byte_ranges() {
    use LayoutError::*;
    let cases: &[(&[(u64, u64)], LayoutError)] = &[
        (&[], Empty),
        (&[(0, 0)], ZeroLength),
        (&[(1, 4096)], Unaligned),
        (&[(0, 4095)], Unaligned),
        (&[(0, 4096), (8192 + 512, 4096)], Unaligned),
        (&[(u64::MAX - 4095, 8192)], Overflow),
        (&[(8192, 4096), (0, 4096)], Unsorted),
        (&[(0, 8192), (4096, 4096)], OverlappingPfns),
    ];
    for (input, want) in cases {
        assert_eq!(Layout::from_ram_byte_ranges(input), Err(*want), "{input:?}");
    }
    // The last byte-addressable page is fine.
    let top = u64::MAX - 4095;
    let l = Layout::from_ram_byte_ranges(&[(top, 4096)]).unwrap();
    assert_eq!(l.p2b(top >> PAGE_SHIFT), Some(0));
}

#[test]
fn every_layout_error_from_peer_table() {
    use LayoutError::*;
    let cases: &[(&[LayoutRange], LayoutError)] = &[
        (&[], Empty),
        (&[r(0, 0, 0)], ZeroLength),
        (&[r(10, 4, 0), r(0, 4, 4)], Unsorted),
        (&[r(0, 10, 0), r(9, 4, 10)], OverlappingPfns),
        (&[r(0, 10, 0), r(20, 4, 9)], OverlappingBits),
        // Bits that go down while pfns go up are rejected even if disjoint.
        (&[r(0, 10, 100), r(20, 4, 0)], OverlappingBits),
        (&[r(u64::MAX, 1, 0)], Overflow),
        (&[r(0, 2, u64::MAX)], Overflow),
        (&[r((1 << 52) - 1, 2, 0)], Overflow),
        (&[r(0, 1, MAX_TOTAL_BITS)], TooManyBits),
    ];
    for (input, want) in cases {
        assert_eq!(Layout::from_ranges(input), Err(*want), "{input:?}");
    }
}

#[test]
fn peer_table_with_bit_gaps() {
    // Host uses RAM offsets with a gap between blocks: bits 0..8 and 16..24.
    let l = Layout::from_ranges(&[r(0, 8, 0), r(100, 8, 16)]).unwrap();
    assert_eq!(l.total_bits(), 24);
    assert_eq!(l.ram_pages(), 16);
    assert_eq!(l.b2p(10), None);
    assert_eq!(l.b2p(17), Some(101));
    check_against_model(&l);
}

#[test]
fn error_messages_are_clear() {
    assert_eq!(
        LayoutError::Unaligned.to_string(),
        "RAM range is not page aligned"
    );
    assert!(LayoutError::TooManyBits.to_string().contains("16 TiB"));
}

#[test]
fn for_each_bit_run_huge_inputs_do_not_overflow() {
    let l = Layout::from_ram_pfn_ranges(&[(0, 10), ((1 << 52) - 10, 10)]).unwrap();
    let mut runs = Vec::new();
    l.bit_runs(5, u64::MAX, |b, n| runs.push((b, n)));
    assert_eq!(runs, vec![(5, 15)]);
    runs.clear();
    l.bit_runs(u64::MAX - 1, u64::MAX, |b, n| runs.push((b, n)));
    assert!(runs.is_empty());
}

/// Random RAM ranges: sorted, disjoint, optionally touching.
fn ram_ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0u64..6, 1u64..12), 1..7).prop_map(|v| {
        let mut out = Vec::new();
        let mut pfn = 0;
        for (gap, nr) in v {
            pfn += gap;
            out.push((pfn, nr));
            pfn += nr;
        }
        out
    })
}

/// Random valid peer tables with gaps in bit space.
fn peer_tables() -> impl Strategy<Value = Vec<LayoutRange>> {
    prop::collection::vec((0u64..6, 1u64..12, 0u64..5), 1..7).prop_map(|v| {
        let mut out = Vec::new();
        let (mut pfn, mut bit) = (0, 0);
        for (gap, nr, bgap) in v {
            pfn += gap;
            bit += bgap;
            out.push(r(pfn, nr, bit));
            pfn += nr;
            bit += nr;
        }
        out
    })
}

proptest! {
    #[test]
    fn ram_layouts_match_naive_model(v in ram_ranges()) {
        let l = Layout::from_ram_pfn_ranges(&v).unwrap();
        let m = model(&l);
        // Dense packing: bits are 0.. in pfn order.
        let want: Vec<u64> = v.iter().flat_map(|&(p, n)| p..p + n).collect();
        prop_assert_eq!(m.keys().copied().collect::<Vec<_>>(), want.clone());
        prop_assert_eq!(m.values().copied().collect::<Vec<_>>(), (0..want.len() as u64).collect::<Vec<_>>());
        check_against_model(&l);
        // The table round-trips through the peer validator, and the byte variant agrees.
        prop_assert_eq!(Layout::from_ranges(l.ranges()), Ok(l));
        let bytes: Vec<(u64, u64)> = v.iter().map(|&(p, n)| (p << PAGE_SHIFT, n << PAGE_SHIFT)).collect();
        prop_assert_eq!(Layout::from_ram_byte_ranges(&bytes), Ok(l));
    }

    #[test]
    fn peer_tables_match_naive_model(v in peer_tables()) {
        let l = Layout::from_ranges(&v).unwrap();
        prop_assert_eq!(l.ranges(), &v[..]);
        check_against_model(&l);
    }

    #[test]
    fn pfn_bit_round_trip_at_scale(
        v in prop::collection::vec((0u64..1 << 20, 1u64..1 << 24), 1..32),
        probes in prop::collection::vec(any::<u64>(), 64),
    ) {
        let mut ranges = Vec::new();
        let mut pfn = 0u64;
        for (gap, nr) in v {
            pfn += gap;
            ranges.push((pfn, nr));
            pfn += nr;
        }
        let l = Layout::from_ram_pfn_ranges(&ranges).unwrap();
        for p in probes {
            let bit = p % l.total_bits();
            let pfn = l.b2p(bit).unwrap();
            prop_assert_eq!(l.p2b(pfn), Some(bit));
            let pfn2 = p % (pfn + 1);
            if let Some(b) = l.p2b(pfn2) {
                prop_assert_eq!(l.b2p(b), Some(pfn2));
            }
        }
    }

    #[test]
    fn hostile_peer_tables_never_panic_and_match_naive_rules(
        v in prop::collection::vec(
            (prop_oneof![0u64..64, any::<u64>()], prop_oneof![0u64..16, any::<u64>()], prop_oneof![0u64..64, any::<u64>()]),
            0..40)
    ) {
        let rs: Vec<LayoutRange> = v.into_iter().map(|(p, n, b)| r(p, n, b)).collect();
        let got = Layout::from_ranges(&rs);
        prop_assert_eq!(got.is_ok(), naive_valid(&rs), "{:?} -> {:?}", rs, got);
        if let Ok(l) = got {
            prop_assert_eq!(l.ranges(), &rs[..]);
            prop_assert_eq!(l.total_bits(), rs.last().unwrap().end_bit().raw());
        }
    }

    #[test]
    fn hostile_ram_ranges_never_panic(
        v in prop::collection::vec((any::<u64>(), prop_oneof![0u64..16, any::<u64>()]), 0..40)
    ) {
        if let Ok(l) = Layout::from_ram_pfn_ranges(&v) {
            prop_assert_eq!(Layout::from_ranges(l.ranges()), Ok(l));
            prop_assert!(l.total_bits() <= MAX_TOTAL_BITS);
        }
        if let Ok(l) = Layout::from_ram_byte_ranges(&v) {
            prop_assert_eq!(Layout::from_ranges(l.ranges()), Ok(l));
        }
    }
}
