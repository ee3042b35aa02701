// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The free page queue: free page hints in both protocols.
//!
//! - Standard (virtio 1.2 §5.5.6.4): a 4-byte command id outbuf (the
//!   round's id to start it, STOP to end it), and free blocks as inbufs
//!   whose address and length *are* the hint.
//! - Bitmap extension (`docs/protocol.md`): a readable message header,
//!   then, by kind, a writable buffer for the layout reply
//!   (LAYOUT_QUERY), the chunk's payload (CHUNK), or nothing (ROUND_END).
//!
//! Whether a message is merged is the round machine's call
//! (`HintCore`); this module reads the
//! chain, checks its shape and counts what it drops.

use std::io::{Read, Write};

use freehint_protocol::balloon::bitmap_hints;
use freehint_protocol::bitmap_hint::{
    BoundChunk, ChunkHeader, LayoutReply, Message, LAYOUT_REPLY_MAX, MSG_HEADER_SIZE,
};
use log::{debug, warn};
use virtio_queue::{Reader, Writer};

use super::super::chain::Desc;
use super::super::metrics::BalloonMetrics;
use super::super::round::HintCore;
use super::super::state::{DeviceState, Shared};
use super::Chain;

/// Bytes of chunk payload merged at a time.
const PIECE: usize = 4096;

/// free_page_vq: one chain of either protocol. Returns the used length
/// (the layout reply's, else 0).
pub(in super::super) fn receive_hints(
    shared: &Shared,
    st: &mut DeviceState,
    chain: &Chain<'_>,
) -> u32 {
    let m = &shared.metrics;
    let Some((readable, writable)) = split_directions(chain.descs) else {
        BalloonMetrics::inc(&m.wrong_direction);
        warn!("free_page_vq: readable descriptor after a writable one; dropped");
        return 0;
    };
    if readable.is_empty() {
        take_free_blocks(shared, st, writable);
        return 0;
    }
    let Some((mut reader, writer)) = st.scratch.shadow.reader_writer(chain.mem, chain.descs) else {
        BalloonMetrics::inc(&m.descriptor_out_of_memory);
        return 0;
    };
    let rlen = reader.available_bytes();
    if rlen == 4 && writable.is_empty() {
        take_cmd_id(shared, st, &mut reader);
        return 0;
    }
    receive_message(shared, st, reader, writer, writable)
}

/// Bitmap protocol: a message header, then what its kind carries. Returns
/// the used length.
fn receive_message(
    shared: &Shared,
    st: &mut DeviceState,
    mut reader: Reader<'_>,
    writer: Writer<'_>,
    writable: &[Desc],
) -> u32 {
    let m = &shared.metrics;
    let rlen = reader.available_bytes();
    if !bitmap_hints(st.acked_features) || rlen < MSG_HEADER_SIZE {
        BalloonMetrics::inc(&m.hint_bad_cmd_buffer);
        warn!("free_page_vq: command buffer of {rlen} bytes (need 4); dropped");
        return 0;
    }
    match read_message(shared, &mut reader) {
        Some(Message::LayoutQuery { cmd_id }) => {
            answer_layout_query(shared, st, writable, writer, cmd_id)
        }
        Some(Message::Chunk(h)) => {
            if writable.is_empty() {
                merge_chunk(shared, st, reader, &h);
            } else {
                BalloonMetrics::inc(&m.wrong_direction);
                warn!("free_page_vq: chunk with writable descriptors; dropped");
            }
            0
        }
        Some(Message::RoundEnd { cmd_id, free_pages }) => {
            end_round(shared, st, cmd_id, free_pages);
            0
        }
        None => 0,
    }
}

/// The readable descriptors and the writable ones after them; `None` if a
/// readable one follows a writable one (virtio 2.7.4.2).
fn split_directions(descs: &[Desc]) -> Option<(&[Desc], &[Desc])> {
    let n_read = descs.iter().take_while(|d| !d.write).count();
    let (readable, writable) = descs.split_at(n_read);
    writable
        .iter()
        .all(|d| d.write)
        .then_some((readable, writable))
}

/// Standard protocol: each writable descriptor is a free block.
fn take_free_blocks(shared: &Shared, st: &mut DeviceState, blocks: &[Desc]) {
    let m = &shared.metrics;
    for d in blocks {
        match st.hints.on_free_block(d.addr, u64::from(d.len)) {
            Ok(block) => {
                BalloonMetrics::add(&m.hint_pages, block.merged_pages);
                if block.partial_bytes > 0 {
                    BalloonMetrics::inc(&m.hint_partial_pages);
                }
                if block.outside_bytes > 0 {
                    BalloonMetrics::inc(&m.hint_out_of_layout);
                }
            }
            Err(drop) => HintCore::count_drop(m, drop),
        }
    }
}

/// Standard protocol: the 4-byte command id (the round's id, or STOP).
fn take_cmd_id(shared: &Shared, st: &mut DeviceState, reader: &mut Reader<'_>) {
    let mut id = [0u8; 4];
    if reader.read_exact(&mut id).is_err() {
        BalloonMetrics::inc(&shared.metrics.descriptor_out_of_memory);
        return;
    }
    let id = u32::from_le_bytes(id);
    if let Err(drop) = st.hints.on_cmd_id(id) {
        debug!("free_page_vq: command id {id:#x} ignored ({drop:?})");
        HintCore::count_drop(&shared.metrics, drop);
    }
}

/// Bitmap protocol: reads and validates the message header.
fn read_message(shared: &Shared, reader: &mut Reader<'_>) -> Option<Message> {
    let m = &shared.metrics;
    let mut hdr = [0u8; MSG_HEADER_SIZE];
    if reader.read_exact(&mut hdr).is_err() {
        BalloonMetrics::inc(&m.descriptor_out_of_memory);
        return None;
    }
    match Message::parse(&hdr) {
        Ok(msg) => Some(msg),
        Err(e) => {
            BalloonMetrics::inc(&m.bitmap_bad_message);
            warn!("free_page_vq: bad bitmap message: {e:?}; dropped");
            None
        }
    }
}

/// Bitmap protocol: LAYOUT_QUERY. Writes the layout reply into the
/// writable buffers and returns its length (0 if none was written).
fn answer_layout_query(
    shared: &Shared,
    st: &mut DeviceState,
    writable: &[Desc],
    mut writer: Writer<'_>,
    cmd_id: u32,
) -> u32 {
    let m = &shared.metrics;
    let layout = match st.hints.on_layout_query(cmd_id) {
        Ok(layout) => layout,
        Err(drop) => {
            HintCore::count_drop(m, drop);
            return 0;
        }
    };
    let reply = LayoutReply { cmd_id, layout };
    let room = writer.available_bytes();
    let len = reply.encoded_len();
    if room < len {
        BalloonMetrics::inc(&m.bitmap_bad_reply_buffer);
        warn!("free_page_vq: layout reply buffer of {room} bytes, need {len}");
        return 0;
    }
    let mut out = [0u8; LAYOUT_REPLY_MAX];
    let n = match reply.encode(&mut out) {
        Ok(n) => n,
        Err(e) => {
            warn!("free_page_vq: cannot encode the layout reply: {e:?}");
            return 0;
        }
    };
    mark_written(shared, writable, n);
    if writer.write_all(&out[..n]).is_err() {
        BalloonMetrics::inc(&m.descriptor_out_of_memory);
        return 0;
    }
    n as u32
}

/// Marks the first `n` bytes of the writable buffers in the device's dirty
/// log (before writing them: a failure half-way still changed memory).
fn mark_written(shared: &Shared, writable: &[Desc], mut n: usize) {
    for d in writable {
        if n == 0 {
            break;
        }
        let k = (d.len as usize).min(n);
        shared.marker().mark(d.addr, k as u64);
        n -= k;
    }
}

/// Bitmap protocol: CHUNK. Checks the header against the layout once, then
/// merges the payload piece by piece.
fn merge_chunk(shared: &Shared, st: &mut DeviceState, mut reader: Reader<'_>, h: &ChunkHeader) {
    let m = &shared.metrics;
    let chunk = match h.bind(st.hints.total_bits()) {
        Ok(chunk) => chunk,
        Err(e) => {
            BalloonMetrics::inc(&m.bitmap_beyond_layout);
            warn!("free_page_vq: chunk {e:?}; dropped");
            return;
        }
    };
    let payload = h.payload_len();
    let have = reader.available_bytes();
    if have < payload {
        BalloonMetrics::inc(&m.bitmap_short_payload);
        warn!("free_page_vq: chunk payload {have} bytes, header says {payload}; dropped");
        return;
    }
    if let Err(drop) = st.hints.chunk_accepted(h) {
        HintCore::count_drop(m, drop);
        return;
    }
    if merge_payload(shared, st, &mut reader, &chunk, payload) {
        BalloonMetrics::add(&m.hint_pages, u64::from(h.nr_bits));
    }
}

/// Reads `payload` bytes and ORs them into the free set. Returns whether
/// all of it was merged.
fn merge_payload(
    shared: &Shared,
    st: &mut DeviceState,
    reader: &mut Reader<'_>,
    chunk: &BoundChunk,
    payload: usize,
) -> bool {
    let m = &shared.metrics;
    let mut piece = [0u8; PIECE];
    let mut off = 0;
    while off < payload {
        let n = (payload - off).min(PIECE);
        if reader.read_exact(&mut piece[..n]).is_err() {
            BalloonMetrics::inc(&m.descriptor_out_of_memory);
            return false;
        }
        if let Err(e) = st.hints.merge_chunk_piece(chunk, off, &piece[..n]) {
            BalloonMetrics::inc(&m.bitmap_beyond_layout);
            warn!("free_page_vq: chunk merge failed: {e:?}");
            return false;
        }
        off += n;
    }
    true
}

/// Bitmap protocol: ROUND_END (the bitmap protocol's STOP).
fn end_round(shared: &Shared, st: &mut DeviceState, cmd_id: u32, free_pages: u32) {
    match st.hints.on_round_end(cmd_id) {
        Ok(()) => debug!("round {cmd_id:#x} ended, guest counted {free_pages} free pages"),
        Err(drop) => HintCore::count_drop(&shared.metrics, drop),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{buffer, fixture};
    use super::*;
    use crate::balloon::{
        feature, RoundState, VIRTIO_BALLOON_F_FREE_PAGE_BITMAP, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    };
    use freehint_protocol::bitmap_hint::MsgHeader;
    use freehint_protocol::layout::Bit;
    use vm_memory::Bytes;

    fn d(write: bool) -> Desc {
        Desc {
            addr: 0x1000,
            len: 4,
            write,
        }
    }

    fn run(shared: &Shared, mem: &vm_memory::GuestMemoryMmap, descs: &[Desc]) -> u32 {
        let chain = Chain {
            head: 0,
            descs,
            mem,
        };
        receive_hints(shared, &mut shared.lock(), &chain)
    }

    /// A LAYOUT_QUERY for round `id`, as the driver's out-buffer.
    fn layout_query(mem: &vm_memory::GuestMemoryMmap, id: u32) -> Desc {
        buffer(
            mem,
            0x100,
            &message(Message::LayoutQuery { cmd_id: id }),
            false,
        )
    }

    /// A device with hinting (and the bitmap extension if `bitmap`) in a
    /// requested round; returns its command id.
    fn requested(bitmap: bool) -> (Shared, vm_memory::GuestMemoryMmap, u32) {
        let mut f = feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        if bitmap {
            f |= feature(VIRTIO_BALLOON_F_FREE_PAGE_BITMAP);
        }
        let (shared, mem, _) = fixture(f);
        let id = {
            let mut st = shared.lock();
            st.hints.activate(true, None, true);
            st.hints.begin_round()
        };
        (shared, mem, id)
    }

    fn message(msg: Message) -> [u8; MSG_HEADER_SIZE] {
        let mut b = [0u8; MSG_HEADER_SIZE];
        msg.encode(&mut b).unwrap();
        b
    }

    #[test]
    fn readable_then_writable_only() {
        let chain = [d(false), d(false), d(true)];
        let (r, w) = split_directions(&chain).unwrap();
        assert_eq!((r.len(), w.len()), (2, 1));
        assert_eq!(split_directions(&[d(true), d(true)]).unwrap().0.len(), 0);
        assert!(split_directions(&[d(false), d(true), d(false)]).is_none());
        assert!(split_directions(&[]).is_some());
    }

    #[test]
    fn standard_protocol_round() {
        let (shared, mem, id) = requested(false);
        run(
            &shared,
            &mem,
            &[buffer(&mem, 0x100, &(id + 1).to_le_bytes(), false)],
        );
        assert_eq!(shared.metrics.snapshot().hint_stale, 1);
        run(
            &shared,
            &mem,
            &[buffer(&mem, 0x100, &id.to_le_bytes(), false)],
        );
        assert_eq!(shared.lock().hints.status().state, RoundState::Started);
        let blocks = [
            Desc {
                addr: 0x10000,
                len: 0x4000,
                write: true,
            },
            Desc {
                addr: 0x20800,
                len: 0x1000,
                write: true,
            },
        ];
        run(&shared, &mem, &blocks);
        run(&shared, &mem, &[buffer(&mem, 0x100, &[0; 4], false)]);
        let st = shared.lock();
        assert_eq!(st.hints.status().state, RoundState::Stopped);
        assert_eq!(st.hints.free_pages(), 4);
        let m = shared.metrics.snapshot();
        assert_eq!((m.hint_pages, m.hint_partial_pages), (4, 1));
    }

    #[test]
    fn bitmap_protocol_round() {
        let (shared, mem, id) = requested(true);
        let query = layout_query(&mem, id);
        let reply = Desc {
            addr: 0x2000,
            len: LAYOUT_REPLY_MAX as u32,
            write: true,
        };
        let n = run(&shared, &mem, &[query, reply]);
        let mut got = [0u8; LAYOUT_REPLY_MAX];
        mem.read_slice(&mut got, vm_memory::GuestAddress(0x2000))
            .unwrap();
        let parsed = LayoutReply::parse(&got[..n as usize]).unwrap();
        assert_eq!(parsed.cmd_id, id);
        assert_eq!(parsed.layout.total_bits(), 256);
        assert_eq!(shared.dirty.take()[0] & 0b100, 0b100, "reply page marked");
        // A chunk: the header in one descriptor, the payload in two.
        let h = ChunkHeader {
            cmd_id: id,
            first_bit: Bit(64),
            nr_bits: 70,
        };
        let descs = [
            buffer(&mem, 0x3000, &message(Message::Chunk(h)), false),
            buffer(&mem, 0x4000, &[0xff; 5], false),
            buffer(&mem, 0x5000, &[0xff; 11], false),
        ];
        assert_eq!(run(&shared, &mem, &descs), 0);
        assert_eq!(shared.lock().hints.free_pages(), 70);
        let end = Message::RoundEnd {
            cmd_id: id,
            free_pages: 70,
        };
        run(&shared, &mem, &[buffer(&mem, 0x100, &message(end), false)]);
        assert_eq!(shared.lock().hints.status().state, RoundState::Stopped);
        assert_eq!(shared.metrics.snapshot().hint_pages, 70);
    }

    #[test]
    fn bad_bitmap_messages_are_counted() {
        let (shared, mem, id) = requested(true);
        let query = layout_query(&mem, id);
        let small = Desc {
            addr: 0x2000,
            len: 8,
            write: true,
        };
        assert_eq!(run(&shared, &mem, &[query, small]), 0);
        let chunk = |first_bit, nr_bits| {
            message(Message::Chunk(ChunkHeader {
                cmd_id: id,
                first_bit: Bit(first_bit),
                nr_bits,
            }))
        };
        // Beyond the 256-bit layout.
        run(
            &shared,
            &mem,
            &[buffer(&mem, 0x100, &chunk(256, 64), false)],
        );
        // Payload shorter than the header says.
        let short = [
            buffer(&mem, 0x100, &chunk(0, 128), false),
            buffer(&mem, 0x4000, &[0xff; 8], false),
        ];
        run(&shared, &mem, &short);
        // A header that does not parse.
        let mut bad = MsgHeader::read(&chunk(0, 64)).unwrap();
        bad.reserved = 1;
        let mut bytes = [0u8; MSG_HEADER_SIZE];
        bad.write(&mut bytes).unwrap();
        run(&shared, &mem, &[buffer(&mem, 0x100, &bytes, false)]);
        // A command buffer of the wrong size.
        run(&shared, &mem, &[buffer(&mem, 0x100, &[0; 6], false)]);
        let m = shared.metrics.snapshot();
        assert_eq!(m.bitmap_bad_reply_buffer, 1);
        assert_eq!(m.bitmap_beyond_layout, 1);
        assert_eq!(m.bitmap_short_payload, 1);
        assert_eq!(m.bitmap_bad_message, 1);
        assert_eq!(m.hint_bad_cmd_buffer, 1);
        assert_eq!(shared.lock().hints.free_pages(), 0);
    }
}
