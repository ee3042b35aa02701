//! Properties of the migration stream: what is encoded decodes to the same
//! records; no input makes the decoder panic; every cut stream is an error.

use freehint_migrate::{
    Decoder, Encoder, PassKind, RamLayout, RamRange, Record, WireError, PAGE_SIZE,
};
use proptest::prelude::*;
use vm_memory::GuestAddress;

/// A record with owned data; page runs split into single pages so that a
/// run and its decoded chunks compare equal.
#[derive(Clone, Debug, PartialEq)]
enum Item {
    Pass(u32, PassKind),
    Page(u64, Vec<u8>),
    Zero(u64, u64),
    Balloon(u32),
    End(u64, u64),
}

fn items(record: Record<'_>) -> Vec<Item> {
    match record {
        Record::Pass { number, kind } => vec![Item::Pass(number, kind)],
        Record::Pages { start, data } => data
            .chunks(PAGE_SIZE)
            .zip(start..)
            .map(|(page, index)| Item::Page(index, page.to_vec()))
            .collect(),
        Record::Zero { start, count } => vec![Item::Zero(start, count)],
        Record::Balloon { target_pages } => vec![Item::Balloon(target_pages)],
        Record::End { pages, zero_pages } => vec![Item::End(pages, zero_pages)],
    }
}

/// Range lengths and gaps (in pages) → a layout stored back to back.
fn layout_from(shape: &[(u64, u64)]) -> RamLayout {
    let mut ranges = Vec::new();
    let (mut gpa, mut file_offset) = (0u64, 0u64);
    for &(pages, gap) in shape {
        gpa += gap * PAGE_SIZE as u64;
        ranges.push(RamRange {
            gpa: GuestAddress(gpa),
            pages,
            file_offset,
        });
        gpa += pages * PAGE_SIZE as u64;
        file_offset += pages * PAGE_SIZE as u64;
    }
    RamLayout::new(ranges).unwrap()
}

/// A run chosen by raw numbers, fitted to the layout.
#[derive(Clone, Debug)]
struct RawRun {
    zero: bool,
    range: usize,
    start: u64,
    count: u64,
    fill: u8,
}

fn raw_run() -> impl Strategy<Value = RawRun> {
    (
        any::<bool>(),
        any::<usize>(),
        any::<u64>(),
        any::<u64>(),
        any::<u8>(),
    )
        .prop_map(|(zero, range, start, count, fill)| RawRun {
            zero,
            range,
            start,
            count,
            fill,
        })
}

/// Owned records for one stream: a bulk pass, dirty passes, a final pass.
fn records_for(layout: &RamLayout, passes: &[Vec<RawRun>]) -> Vec<(Item, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let last = passes.len() - 1;
    for (index, runs) in passes.iter().enumerate() {
        let kind = match index {
            0 => PassKind::Bulk,
            i if i == last => PassKind::Final,
            _ => PassKind::Dirty,
        };
        out.push((Item::Pass(index as u32 * 2, kind), None));
        for run in runs {
            let pages = layout.pages_of(run.range % layout.ranges().len()).unwrap();
            let start = pages.start + run.start % (pages.end - pages.start);
            let count = 1 + run.count % (pages.end - start).min(40);
            if run.zero {
                out.push((Item::Zero(start, count), None));
            } else {
                let data: Vec<u8> = (0..count as usize * PAGE_SIZE)
                    .map(|i| run.fill ^ (i / 7) as u8)
                    .collect();
                out.push((Item::Page(start, Vec::new()), Some(data)));
            }
        }
    }
    out
}

fn encode(layout: &RamLayout, records: &[(Item, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut encoder = Encoder::new(Vec::new(), layout).unwrap();
    for (item, data) in records {
        match (item, data) {
            (Item::Pass(number, kind), _) => encoder.pass(*number, *kind),
            (Item::Page(start, _), Some(data)) => encoder.pages(*start, data),
            (Item::Zero(start, count), _) => encoder.zero(*start, *count),
            other => unreachable!("not generated: {other:?}"),
        }
        .unwrap();
    }
    encoder.finish().unwrap()
}

/// What the records are expected to decode to, end record included.
fn expected(records: &[(Item, Option<Vec<u8>>)]) -> Vec<Item> {
    let (mut pages, mut zero_pages) = (0, 0);
    let mut out = Vec::new();
    for (item, data) in records {
        match (item, data) {
            (Item::Page(start, _), Some(data)) => {
                pages += (data.len() / PAGE_SIZE) as u64;
                out.extend(items(Record::Pages {
                    start: *start,
                    data,
                }));
            }
            (Item::Zero(_, count), _) => {
                zero_pages += count;
                out.push(item.clone());
            }
            _ => out.push(item.clone()),
        }
    }
    out.push(Item::End(pages, zero_pages));
    out
}

/// Decodes to the end; the items seen and how it ended.
fn decode(bytes: &[u8]) -> (Vec<Item>, Result<(), WireError>) {
    let mut seen = Vec::new();
    let mut decoder = match Decoder::new(bytes) {
        Ok(decoder) => decoder,
        Err(err) => return (seen, Err(err)),
    };
    loop {
        match decoder.next_record() {
            Ok(Some(record)) => seen.extend(items(record)),
            Ok(None) => return (seen, Ok(())),
            Err(err) => return (seen, Err(err)),
        }
    }
}

fn shape() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((1u64..64, 0u64..16), 1..4)
}

fn passes() -> impl Strategy<Value = Vec<Vec<RawRun>>> {
    prop::collection::vec(prop::collection::vec(raw_run(), 0..5), 2..5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn roundtrip(shape in shape(), passes in passes()) {
        let layout = layout_from(&shape);
        let records = records_for(&layout, &passes);
        let bytes = encode(&layout, &records);
        let (seen, end) = decode(&bytes);
        prop_assert!(end.is_ok(), "{end:?}");
        prop_assert_eq!(seen, expected(&records));
    }

    #[test]
    fn every_cut_is_an_error(shape in shape(), passes in passes(), cut in any::<prop::sample::Index>()) {
        let layout = layout_from(&shape);
        let bytes = encode(&layout, &records_for(&layout, &passes));
        let cut = cut.index(bytes.len());
        let (_, end) = decode(&bytes[..cut]);
        prop_assert!(matches!(end, Err(WireError::Truncated { .. })), "cut at {cut} of {}: {end:?}", bytes.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn corrupted_streams_never_panic(
        shape in shape(),
        passes in passes(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let layout = layout_from(&shape);
        let mut bytes = encode(&layout, &records_for(&layout, &passes));
        for (at, value) in edits {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        let _ = decode(&bytes);
    }
}

/// Every proper prefix of a stream is an error, at every byte.
#[test]
fn every_prefix_of_a_small_stream_is_an_error() {
    let layout = layout_from(&[(8, 0), (4, 3)]);
    let raw = |zero, range, start, count| RawRun {
        zero,
        range,
        start,
        count,
        fill: 0x5a,
    };
    let passes = vec![
        vec![raw(false, 0, 1, 2), raw(true, 1, 0, 3)],
        vec![raw(false, 1, 2, 1)],
        vec![],
    ];
    let bytes = encode(&layout, &records_for(&layout, &passes));
    for cut in 0..bytes.len() {
        assert!(
            matches!(decode(&bytes[..cut]).1, Err(WireError::Truncated { .. })),
            "cut at {cut}"
        );
    }
    assert!(decode(&bytes).1.is_ok());
}
