//! Bitmap-hint wire format: round trips and rejection of every malformed
//! shape with the right error.

use freehint_protocol::bitmap::{set_runs, words_for_bits};
use freehint_protocol::bitmap_hint::*;
use freehint_protocol::layout::{Bit, Layout, LayoutError, LayoutRange, Pfn, MAX_LAYOUT_RANGES};
use proptest::prelude::*;

mod common;
use common::Raw;

const ID: u32 = 0x8000_0000;

fn bytes_of(h: &MsgHeader) -> [u8; MSG_HEADER_SIZE] {
    let mut b = [0u8; MSG_HEADER_SIZE];
    assert_eq!(h.write(&mut b), Ok(MSG_HEADER_SIZE));
    b
}

fn chunk(first_bit: u64, nr_bits: u32) -> ChunkHeader {
    ChunkHeader {
        cmd_id: ID,
        first_bit: Bit(first_bit),
        nr_bits,
    }
}

#[test]
fn header_wire_image() {
    let m = Message::Chunk(chunk(0x0102_0304_0506_0700, 0x7f_ffff));
    let mut b = [0u8; 30];
    assert_eq!(m.encode(&mut b), Ok(24));
    assert_eq!(&b[0..4], b"FHBM");
    assert_eq!(&b[4..8], &[2, 0, 0, 0]);
    assert_eq!(&b[8..12], &ID.to_le_bytes());
    assert_eq!(Message::parse(&b), Ok(m));
    assert_eq!(MSG_MAGIC, 0x4d42_4846);
    assert_eq!(LAYOUT_REPLY_MAX, 24 + 32 * 24);
    assert_eq!(MAX_CHUNK_BYTES, 1 << 20);
}

#[test]
fn each_message_kind_round_trips() {
    let msgs = [
        Message::LayoutQuery { cmd_id: ID },
        Message::Chunk(chunk(0, 1)),
        Message::Chunk(chunk(64 * 1000, MAX_CHUNK_BITS)),
        Message::RoundEnd {
            cmd_id: u32::MAX,
            free_pages: u32::MAX,
        },
        Message::RoundEnd {
            cmd_id: 2,
            free_pages: 0,
        },
    ];
    for m in msgs {
        let mut b = [0u8; MSG_HEADER_SIZE];
        assert_eq!(m.encode(&mut b), Ok(MSG_HEADER_SIZE));
        assert_eq!(Message::parse(&b), Ok(m));
        assert_eq!(Message::parse(&b).unwrap().cmd_id(), m.cmd_id());
    }
}

#[test]
fn truncated_header_every_length() {
    let b = bytes_of(&MsgHeader::new(KIND_LAYOUT_QUERY, ID, 0, 0));
    for len in 0..MSG_HEADER_SIZE {
        assert_eq!(
            Message::parse(&b[..len]),
            Err(WireError::Truncated {
                needed: MSG_HEADER_SIZE,
                got: len
            })
        );
    }
    let mut small = [0u8; 23];
    assert_eq!(
        Message::LayoutQuery { cmd_id: ID }.encode(&mut small),
        Err(WireError::BufferTooSmall {
            needed: 24,
            got: 23
        })
    );
}

/// Every malformed header shape, each with its own error.
#[test]
fn malformed_headers_rejected_with_right_error() {
    let mut bad_magic = MsgHeader::new(KIND_CHUNK, ID, 64, 0);
    bad_magic.magic = u32::from_le_bytes(*b"FHBN");
    let mut reserved = MsgHeader::new(KIND_CHUNK, ID, 64, 0);
    reserved.reserved = 1;
    let cases = [
        (bad_magic, WireError::BadMagic(u32::from_le_bytes(*b"FHBN"))),
        (
            MsgHeader::default(),
            WireError::BadMagic(0), // an all-zero buffer
        ),
        (
            MsgHeader::new(KIND_INVALID, ID, 0, 0),
            WireError::InvalidKind,
        ),
        (MsgHeader::new(4, ID, 0, 0), WireError::UnknownKind(4)),
        (
            MsgHeader::new(u16::MAX, ID, 0, 0),
            WireError::UnknownKind(u16::MAX),
        ),
        (reserved, WireError::ReservedNonZero),
        (
            MsgHeader::new(KIND_CHUNK, 0, 64, 0),
            WireError::ReservedCmdId(0),
        ),
        (
            MsgHeader::new(KIND_ROUND_END, 1, 0, 0),
            WireError::ReservedCmdId(1),
        ),
        (
            MsgHeader::new(KIND_LAYOUT_QUERY, 0, 0, 0),
            WireError::ReservedCmdId(0),
        ),
        (
            MsgHeader::new(KIND_LAYOUT_QUERY, ID, 1, 0),
            WireError::UnexpectedField,
        ),
        (
            MsgHeader::new(KIND_LAYOUT_QUERY, ID, 0, 64),
            WireError::UnexpectedField,
        ),
        (
            MsgHeader::new(KIND_ROUND_END, ID, 5, 64),
            WireError::UnexpectedField,
        ),
        (
            MsgHeader::new(KIND_CHUNK, ID, 64, 1),
            WireError::MisalignedFirstBit(1),
        ),
        (
            MsgHeader::new(KIND_CHUNK, ID, 64, 63),
            WireError::MisalignedFirstBit(63),
        ),
        (MsgHeader::new(KIND_CHUNK, ID, 0, 64), WireError::EmptyChunk),
        (
            MsgHeader::new(KIND_CHUNK, ID, MAX_CHUNK_BITS + 1, 0),
            WireError::ChunkTooLarge(MAX_CHUNK_BITS + 1),
        ),
        (
            MsgHeader::new(KIND_CHUNK, ID, u32::MAX, 0),
            WireError::ChunkTooLarge(u32::MAX),
        ),
    ];
    for (h, want) in cases {
        assert_eq!(Message::parse(&bytes_of(&h)), Err(want), "{h:?}");
        assert_eq!(Message::from_header(&h), Err(want));
        // Messages the encoder would refuse to produce.
        assert!(!want.to_string().is_empty());
    }
    // encode validates too.
    let mut b = [0u8; 24];
    assert_eq!(
        Message::Chunk(chunk(3, 1)).encode(&mut b),
        Err(WireError::MisalignedFirstBit(3))
    );
    assert_eq!(
        Message::LayoutQuery { cmd_id: 1 }.encode(&mut b),
        Err(WireError::ReservedCmdId(1))
    );
}

#[test]
fn chunk_bounds_against_layout() {
    let c = chunk(128, 100);
    assert_eq!(c.payload_len(), 16);
    assert_eq!(c.end_bit(), Bit(228));
    assert_eq!(c.check_bounds(228), Ok(()));
    assert_eq!(
        c.check_bounds(227),
        Err(WireError::BeyondLayout {
            end_bit: 228,
            total_bits: 227
        })
    );
    let far = chunk(!63, 64);
    assert!(far.check_bounds(u64::MAX - 1).is_err());
    assert_eq!(chunk(0, MAX_CHUNK_BITS).payload_len(), MAX_CHUNK_BYTES);
}

#[test]
fn or_payload_masks_bits_beyond_nr_bits() {
    // Chunk covering bits 64..(64+12): payload is one word; the driver sets
    // every bit but only 12 may land.
    let c = chunk(64, 12);
    let mut w = [0u64; 4];
    assert_eq!(c.or_payload(&mut w, 0, &[0xff; 8]), Ok(()));
    assert_eq!(w, [0, 0xfff, 0, 0]);
    // Split over descriptors: byte 0 then bytes 1..8.
    let mut w2 = [0u64; 4];
    c.or_payload(&mut w2, 0, &[0xff]).unwrap();
    c.or_payload(&mut w2, 1, &[0xff; 7]).unwrap();
    assert_eq!(w2, w);
    // Piece past the payload.
    assert_eq!(
        c.or_payload(&mut w2, 1, &[0; 8]),
        Err(WireError::PayloadOverrun {
            end: 9,
            payload_len: 8
        })
    );
    // Chunk beyond the bitmap.
    let mut small = [0u64; 1];
    assert_eq!(
        c.or_payload(&mut small, 0, &[1]),
        Err(WireError::BeyondLayout {
            end_bit: 76,
            total_bits: 64
        })
    );
    assert_eq!(small, [0]);
    // Unvalidated headers are refused.
    let mut w3 = [0u64; 4];
    assert_eq!(
        chunk(8, 8).or_payload(&mut w3, 0, &[0xff]),
        Err(WireError::MisalignedFirstBit(8))
    );
    assert_eq!(
        chunk(0, 0).or_payload(&mut w3, 0, &[]),
        Err(WireError::EmptyChunk)
    );
    assert_eq!(w3, [0; 4]);
}

#[test]
fn chunk_spans_cover_the_bitmap() {
    assert!(chunk_spans(0, 64).eq([]));
    assert!(chunk_spans(64, 0).eq([(Bit(0), 64)]));
    assert!(chunk_spans(130, 100).eq([(Bit(0), 64), (Bit(64), 64), (Bit(128), 2)]));
    let total = 3 * u64::from(MAX_CHUNK_BITS) + 5;
    let spans: Vec<_> = chunk_spans(total, u32::MAX).collect();
    assert_eq!(spans.len(), 4);
    assert_eq!(spans[3], (Bit(3 * u64::from(MAX_CHUNK_BITS)), 5));
    for (first, nr) in spans {
        let m = Message::Chunk(ChunkHeader {
            cmd_id: ID,
            first_bit: first,
            nr_bits: nr,
        });
        let mut b = [0u8; MSG_HEADER_SIZE];
        m.encode(&mut b).unwrap();
        let Message::Chunk(c) = Message::parse(&b).unwrap() else {
            panic!()
        };
        c.check_bounds(total).unwrap();
    }
}

fn layout_4g() -> Layout {
    Layout::from_ram_byte_ranges(&[(0, 3 << 30), (4 << 30, 1 << 30)]).unwrap()
}

fn reply_bytes(l: Layout) -> Vec<u8> {
    let mut b = vec![0u8; LAYOUT_REPLY_MAX];
    let n = LayoutReply {
        cmd_id: ID,
        layout: l,
    }
    .encode(&mut b)
    .unwrap();
    b.truncate(n);
    b
}

fn raw_reply(nr: u16, total: u64, ranges: &[LayoutRange]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&REPLY_MAGIC.to_le_bytes());
    b.extend_from_slice(&ID.to_le_bytes());
    b.extend_from_slice(&12u16.to_le_bytes());
    b.extend_from_slice(&nr.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&total.to_le_bytes());
    for r in ranges {
        b.extend_from_slice(&r.first_pfn.raw().to_le_bytes());
        b.extend_from_slice(&r.nr_pages.to_le_bytes());
        b.extend_from_slice(&r.first_bit.raw().to_le_bytes());
    }
    b
}

fn lr(first_pfn: u64, nr_pages: u64, first_bit: u64) -> LayoutRange {
    LayoutRange {
        first_pfn: Pfn(first_pfn),
        nr_pages,
        first_bit: Bit(first_bit),
    }
}

#[test]
fn layout_reply_wire_image_and_round_trip() {
    let l = layout_4g();
    let b = reply_bytes(l);
    assert_eq!(b.len(), 24 + 2 * 24);
    assert_eq!(&b[0..4], b"FHLR");
    assert_eq!(&b[8..12], &[12, 0, 2, 0]);
    assert_eq!(
        u64::from_le_bytes(b[16..24].try_into().unwrap()),
        l.total_bits()
    );
    // second range: first_pfn = 4 GiB >> 12, first_bit = 3 GiB >> 12
    assert_eq!(u64::from_le_bytes(b[48..56].try_into().unwrap()), 1 << 20);
    assert_eq!(u64::from_le_bytes(b[64..72].try_into().unwrap()), 3 << 18);
    let r = LayoutReply::parse(&b).unwrap();
    assert_eq!(r.cmd_id, ID);
    assert_eq!(r.layout, l);
    // Trailing bytes (the rest of the driver's buffer) are ignored.
    let mut padded = b.clone();
    padded.resize(LAYOUT_REPLY_MAX, 0xee);
    assert_eq!(LayoutReply::parse(&padded).unwrap().layout, l);
    // Encoding needs room, a non-empty layout and a real id.
    let mut small = vec![0u8; b.len() - 1];
    assert_eq!(
        LayoutReply {
            cmd_id: ID,
            layout: l
        }
        .encode(&mut small),
        Err(WireError::BufferTooSmall {
            needed: b.len(),
            got: b.len() - 1
        })
    );
    assert_eq!(
        LayoutReply {
            cmd_id: ID,
            layout: Layout::empty()
        }
        .encode(&mut padded),
        Err(WireError::Layout(LayoutError::Empty))
    );
    assert_eq!(
        LayoutReply {
            cmd_id: 0,
            layout: l
        }
        .encode(&mut padded),
        Err(WireError::ReservedCmdId(0))
    );
}

#[test]
fn layout_reply_truncated_at_every_length() {
    let b = reply_bytes(layout_4g());
    for len in 0..b.len() {
        let want = if len < 24 { 24 } else { b.len() };
        assert_eq!(
            LayoutReply::parse(&b[..len]),
            Err(WireError::Truncated {
                needed: want,
                got: len
            }),
            "len {len}"
        );
    }
}

/// Every malformed layout reply shape, each with its own error.
#[test]
fn malformed_layout_replies_rejected_with_right_error() {
    let ok = [lr(0, 16, 0), lr(32, 16, 16)];
    assert!(LayoutReply::parse(&raw_reply(2, 32, &ok)).is_ok());

    let mut bad_magic = raw_reply(2, 32, &ok);
    bad_magic[0] = b'X';
    let mut bad_id = raw_reply(2, 32, &ok);
    bad_id[4..8].copy_from_slice(&1u32.to_le_bytes());
    let mut bad_shift = raw_reply(2, 32, &ok);
    bad_shift[8] = 21;
    let mut reserved = raw_reply(2, 32, &ok);
    reserved[13] = 1;
    let many: Vec<LayoutRange> = (0..33).map(|i| lr(i * 2, 1, i)).collect();

    use LayoutError as L;
    let cases: Vec<(Vec<u8>, WireError)> = vec![
        (bad_magic, WireError::BadMagic(u32::from_le_bytes(*b"XHLR"))),
        (vec![0; 100], WireError::BadMagic(0)),
        (bad_id, WireError::ReservedCmdId(1)),
        (bad_shift, WireError::UnsupportedPageShift(21)),
        (reserved, WireError::ReservedNonZero),
        (raw_reply(0, 0, &[]), WireError::Layout(L::Empty)),
        (
            raw_reply(33, 33, &many),
            WireError::Layout(L::TooManyRanges),
        ),
        (
            raw_reply(u16::MAX, 0, &ok),
            WireError::Layout(L::TooManyRanges),
        ),
        (
            raw_reply(2, 32, &[lr(32, 16, 0), lr(0, 16, 16)]),
            WireError::Layout(L::Unsorted),
        ),
        (
            raw_reply(2, 32, &[lr(0, 16, 0), lr(8, 16, 16)]),
            WireError::Layout(L::OverlappingPfns),
        ),
        (
            raw_reply(2, 24, &[lr(0, 16, 0), lr(32, 16, 8)]),
            WireError::Layout(L::OverlappingBits),
        ),
        (
            raw_reply(1, 0, &[lr(0, 0, 0)]),
            WireError::Layout(L::ZeroLength),
        ),
        (
            raw_reply(1, 0, &[lr(u64::MAX - 1, 16, 0)]),
            WireError::Layout(L::Overflow),
        ),
        (
            raw_reply(1, 0, &[lr(0, 16, u64::MAX - 1)]),
            WireError::Layout(L::Overflow),
        ),
        (
            raw_reply(1, 0, &[lr(0, 1 << 32, 1)]),
            WireError::Layout(L::TooManyBits),
        ),
        (
            raw_reply(2, 33, &ok),
            WireError::TotalBitsMismatch {
                declared: 33,
                computed: 32,
            },
        ),
        (
            raw_reply(2, 32, &ok[..1]),
            WireError::Truncated {
                needed: 72,
                got: 48,
            },
        ),
    ];
    for (b, want) in cases {
        assert_eq!(LayoutReply::parse(&b), Err(want), "{want}");
    }
}

/// Driver-side encoding of a bitmap through the layout, device-side merge:
/// the pages come back exactly.
#[test]
fn chunked_bitmap_end_to_end() {
    let l = Layout::from_ram_pfn_ranges(&[(0, 300), (1000, 500)]).unwrap();
    let free_pfns: Vec<(u64, u64)> = vec![(3, 7), (250, 60), (990, 20), (1400, 200)];
    // Driver: build the whole bitmap, then send it in 128-bit chunks.
    let mut guest = vec![0u64; words_for_bits(l.total_bits())];
    for &(pfn, nr) in &free_pfns {
        l.bit_runs(pfn, nr, |b, n| {
            assert!(freehint_protocol::bitmap::set_bit_run(&mut guest, b, n));
        });
    }
    let mut host = vec![0u64; words_for_bits(l.total_bits())];
    let mut first = 0u64;
    while first < l.total_bits() {
        let nr = (l.total_bits() - first).min(128) as u32;
        let mut msg = vec![0u8; MSG_HEADER_SIZE];
        Message::Chunk(chunk(first, nr)).encode(&mut msg).unwrap();
        let words = &guest[(first / 64) as usize..][..words_for_bits(u64::from(nr))];
        for w in words {
            msg.extend_from_slice(&w.to_le_bytes());
        }
        // Device side.
        let Message::Chunk(c) = Message::parse(&msg).unwrap() else {
            panic!("not a chunk")
        };
        c.check_bounds(l.total_bits()).unwrap();
        c.or_payload(&mut host, 0, &msg[MSG_HEADER_SIZE..]).unwrap();
        first += 128;
    }
    assert_eq!(host, guest);
    let mut pfns = Vec::new();
    for (b, n) in set_runs(&host) {
        for bit in b..b + n {
            pfns.push(l.b2p(bit).unwrap());
        }
    }
    let mut want = Vec::new();
    for &(pfn, nr) in &free_pfns {
        want.extend((pfn..pfn + nr).filter(|&p| l.p2b(p).is_some()));
    }
    assert_eq!(pfns, want);
}

proptest! {
    #[test]
    fn message_round_trip(
        kind in 0u8..3,
        cmd_id in 2u32..,
        first_word in 0u64..(1 << 40),
        nr_bits in 1u32..=MAX_CHUNK_BITS,
        free in any::<u32>(),
    ) {
        let m = match kind {
            0 => Message::LayoutQuery { cmd_id },
            1 => Message::Chunk(ChunkHeader { cmd_id, first_bit: Bit(first_word * 64), nr_bits }),
            _ => Message::RoundEnd { cmd_id, free_pages: free },
        };
        let mut b = [0u8; MSG_HEADER_SIZE];
        prop_assert_eq!(m.encode(&mut b), Ok(MSG_HEADER_SIZE));
        prop_assert_eq!(Message::parse(&b), Ok(m));
    }

    #[test]
    fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..900)) {
        let _ = Message::parse(&b);
        let _ = LayoutReply::parse(&b);
        // With the right magics, deeper paths are reached.
        let mut m = b.clone();
        if m.len() >= 4 {
            m[..4].copy_from_slice(&MSG_MAGIC.to_le_bytes());
            if let Ok(Message::Chunk(c)) = Message::parse(&m) {
                let mut w = vec![0u64; 64];
                let _ = c.or_payload(&mut w, 0, &m[MSG_HEADER_SIZE..]);
            }
            m[..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
            if let Ok(r) = LayoutReply::parse(&m) {
                // Whatever parses re-encodes to the same prefix.
                let mut out = vec![0u8; LAYOUT_REPLY_MAX];
                let n = r.encode(&mut out).unwrap();
                prop_assert_eq!(&out[..n], &m[..n]);
            }
        }
    }

    #[test]
    fn layout_reply_round_trip(
        v in prop::collection::vec((0u64..1 << 30, 1u64..1 << 28, 0u64..1 << 20), 1..=MAX_LAYOUT_RANGES),
        cmd_id in 2u32..,
    ) {
        let mut ranges = Vec::new();
        let (mut pfn, mut bit) = (0u64, 0u64);
        for (gap, nr, bgap) in v {
            pfn += gap;
            bit += bgap;
            ranges.push(lr(pfn, nr, bit));
            pfn += nr;
            bit += nr;
        }
        let layout = match Layout::from_ranges(&ranges) {
            Ok(l) => l,
            Err(e) => {
                prop_assert_eq!(e, LayoutError::TooManyBits);
                return Ok(());
            }
        };
        let mut b = [0u8; LAYOUT_REPLY_MAX];
        let n = LayoutReply { cmd_id, layout }.encode(&mut b).unwrap();
        prop_assert_eq!(n, 24 + 24 * ranges.len());
        prop_assert_eq!(LayoutReply::parse(&b[..n]), Ok(LayoutReply { cmd_id, layout }));
    }

    #[test]
    fn or_payload_matches_naive(
        first_word in 0u64..4,
        nr_bits in 1u32..300,
        payload in prop::collection::vec(any::<u8>(), 40),
        split in 0usize..40,
    ) {
        let c = ChunkHeader { cmd_id: ID, first_bit: Bit(first_word * 64), nr_bits };
        let len = c.payload_len();
        let payload = &payload[..len.min(40)];
        if payload.len() < len {
            return Ok(());
        }
        let mut got = vec![0u64; 10];
        let s = split.min(len);
        c.or_payload(&mut got, 0, &payload[..s]).unwrap();
        c.or_payload(&mut got, s, &payload[s..]).unwrap();
        let mut want = vec![0u64; 10];
        for i in 0..u64::from(nr_bits) {
            if payload[(i / 8) as usize] >> (i % 8) & 1 == 1 {
                let bit = c.first_bit.raw() + i;
                want[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        prop_assert_eq!(got, want);
    }
}

/// The worked example of docs/protocol.md §5.5.x.4, byte for byte.
#[test]
fn docs_example_8gib_pc_guest() {
    let gib = 1u64 << 30;
    let l = Layout::from_ram_byte_ranges(&[(0, 3 * gib), (4 * gib, 5 * gib)]).unwrap();
    assert_eq!(
        l.ranges(),
        &[lr(0, 0xc0000, 0), lr(0x100000, 0x140000, 0xc0000)]
    );
    assert_eq!(l.total_bits(), 0x200000);
    assert_eq!(words_for_bits(l.total_bits()) * 8, 256 << 10);
    let pfn_gap = 0x40000;
    let pfn = 0x100000 + 12345;
    assert_eq!(l.p2b(pfn), Some(pfn - pfn_gap));
    let b = reply_bytes(l);
    assert_eq!(&b[..4], b"FHLR");
    assert_eq!(&b[4..8], &0x8000_0000u32.to_le_bytes());
    assert_eq!(&b[8..12], &[12, 0, 2, 0]);
    assert_eq!(&b[16..24], &0x200000u64.to_le_bytes());
}
