// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Fuzz target: every decoder of `freehint-protocol` that reads bytes a peer
//! wrote (the driver's bitmap-protocol messages and chunk payloads, the
//! device's layout reply, config space images, stats entries).
//!
//! The first byte picks the decoder; the rest is the peer's bytes. Beyond
//! "no panic", each decoder's contract is checked: whatever decodes encodes
//! back to the same value, a chunk payload only ever sets bits inside its
//! own span, and a decoded layout maps every pfn it accepts to a bit and back.
#![no_main]

use freehint_protocol::balloon::{parse_stat, ConfigSpace, CONFIG_SIZE};
use freehint_protocol::bitmap_hint::{LayoutReply, Message, LAYOUT_REPLY_MAX, MSG_HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => message(bytes),
        1 => layout_reply(bytes),
        2 => config(bytes),
        _ => {
            let _ = parse_stat(bytes);
        }
    }
});

/// A driver → device message, and for a chunk its payload OR-ed into a
/// small bitmap.
fn message(bytes: &[u8]) {
    let Ok(msg) = Message::parse(bytes) else {
        return;
    };
    let mut out = [0u8; MSG_HEADER_SIZE];
    let n = msg.encode(&mut out).expect("a parsed message encodes");
    assert_eq!(
        Message::parse(&out[..n]),
        Ok(msg),
        "re-encoding changed the message"
    );
    let Message::Chunk(chunk) = msg else {
        return;
    };
    let mut words = [0u64; 64]; // 4096 bits
    let payload = &bytes[MSG_HEADER_SIZE.min(bytes.len())..];
    let split = payload.len() / 2;
    for (offset, piece) in [(0, &payload[..split]), (split, &payload[split..])] {
        if chunk.or_payload(&mut words, offset, piece).is_err() {
            continue;
        }
        for bit in 0..4096u64 {
            if words[(bit / 64) as usize] & (1 << (bit % 64)) != 0 {
                assert!(
                    bit >= chunk.first_bit.raw() && bit < chunk.end_bit().raw(),
                    "bit {bit} set outside the chunk {chunk:?}"
                );
            }
        }
    }
}

/// The device → driver layout reply.
fn layout_reply(bytes: &[u8]) {
    let Ok(reply) = LayoutReply::parse(bytes) else {
        return;
    };
    let mut out = [0u8; LAYOUT_REPLY_MAX];
    let n = reply.encode(&mut out).expect("a parsed reply encodes");
    assert_eq!(LayoutReply::parse(&out[..n]), Ok(reply));
    let layout = reply.layout;
    for r in layout.ranges() {
        for pfn in [r.first_pfn, r.first_pfn.unchecked_add(r.nr_pages - 1)] {
            let bit = layout
                .pfn_to_bit(pfn)
                .expect("a pfn inside a range has a bit");
            assert!(bit.raw() < layout.total_bits());
            assert_eq!(layout.bit_to_pfn(bit), Some(pfn));
        }
    }
}

/// A config space image.
fn config(bytes: &[u8]) {
    let Some(image) = bytes.get(..CONFIG_SIZE) else {
        return;
    };
    let mut b = [0u8; CONFIG_SIZE];
    b.copy_from_slice(image);
    assert_eq!(ConfigSpace::from_bytes(&b).to_bytes(), b);
}
