// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Wire format of the bitmap free page hint extension
//! (`VIRTIO_BALLOON_F_FREE_PAGE_BITMAP`, see docs/protocol.md).
//!
//! Only `core` and the sibling modules `layout` and `bitmap` (as
//! `super::layout`, `super::bitmap`) are used, so the guest module can include
//! this file next to `layout.rs` and `bitmap.rs`.
//!
//! Messages, all little-endian, on the free page virtqueue:
//!
//! ```text
//! MsgHeader (24 bytes, driver -> device, out buffer)
//!   0  le32 magic      MSG_MAGIC = "FHBM"
//!   4  le16 kind       1 LAYOUT_QUERY, 2 CHUNK, 3 ROUND_END (0 invalid)
//!   6  le16 reserved   0
//!   8  le32 cmd_id     the free_page_hint_cmd_id being answered
//!  12  le32 nr_bits    CHUNK: bits in the chunk; ROUND_END: free pages; else 0
//!  16  le64 first_bit  CHUNK: first bit (multiple of 64); else 0
//!
//! LayoutReply (device -> driver, in buffer of LAYOUT_REPLY_MAX bytes)
//!   0  le32 magic      REPLY_MAGIC = "FHLR"
//!   4  le32 cmd_id
//!   8  le16 page_shift 12
//!  10  le16 nr_ranges  1..=32
//!  12  le32 reserved   0
//!  16  le64 total_bits
//!  24  nr_ranges x { le64 first_pfn, le64 nr_pages, le64 first_bit }
//! ```
//!
//! ```
//! use freehint_protocol::bitmap_hint::*;
//! use freehint_protocol::layout::Layout;
//! let mut buf = [0u8; MSG_HEADER_SIZE];
//! use freehint_protocol::layout::Bit;
//! let m = Message::Chunk(ChunkHeader { cmd_id: 0x8000_0000, first_bit: Bit(128), nr_bits: 100 });
//! assert_eq!(m.encode(&mut buf), Ok(MSG_HEADER_SIZE));
//! assert_eq!(Message::parse(&buf), Ok(m));
//!
//! let layout = Layout::from_ram_pfn_ranges(&[(0, 1024), (4096, 1024)]).unwrap();
//! let mut reply = [0u8; LAYOUT_REPLY_MAX];
//! let n = LayoutReply { cmd_id: 0x8000_0000, layout }.encode(&mut reply).unwrap();
//! let back = LayoutReply::parse(&reply[..n]).unwrap();
//! assert_eq!(back.layout, layout);
//! ```

use core::fmt;

use super::bitmap::or_le_bytes;
use super::layout::{Bit, Layout, LayoutError, LayoutRange, Pfn, MAX_LAYOUT_RANGES, PAGE_SHIFT};

/// Magic of every driver → device message: `b"FHBM"` read as le32.
pub const MSG_MAGIC: u32 = u32::from_le_bytes(*b"FHBM");
/// Magic of the layout reply: `b"FHLR"` read as le32.
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"FHLR");
/// Size of [`MsgHeader`] on the wire.
pub const MSG_HEADER_SIZE: usize = 24;
/// Size of the layout reply header.
pub const LAYOUT_REPLY_HEADER_SIZE: usize = 24;
/// Size of one layout range on the wire.
pub const LAYOUT_RANGE_SIZE: usize = 24;
/// Largest layout reply; the driver's in buffer must be at least this big.
pub const LAYOUT_REPLY_MAX: usize =
    LAYOUT_REPLY_HEADER_SIZE + MAX_LAYOUT_RANGES * LAYOUT_RANGE_SIZE;
/// Most bits one chunk may carry: 2^23 bits = 1 MiB of bitmap = 32 GiB of RAM.
pub const MAX_CHUNK_BITS: u32 = 1 << 23;
/// Most payload bytes of one chunk.
pub const MAX_CHUNK_BYTES: usize = (MAX_CHUNK_BITS / 8) as usize;

/// `kind` value: never valid (catches zeroed buffers).
pub const KIND_INVALID: u16 = 0;
/// `kind` value: driver asks for the layout of round `cmd_id`.
pub const KIND_LAYOUT_QUERY: u16 = 1;
/// `kind` value: a bitmap chunk follows the header.
pub const KIND_CHUNK: u16 = 2;
/// `kind` value: the driver finished round `cmd_id`.
pub const KIND_ROUND_END: u16 = 3;

/// Why a message was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the fixed part of the message needs.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// Output buffer too small for `encode`.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// Magic is not [`MSG_MAGIC`] / [`REPLY_MAGIC`].
    BadMagic(u32),
    /// `kind` is 0.
    InvalidKind,
    /// `kind` is not one this version knows.
    UnknownKind(u16),
    /// A reserved field is not zero.
    ReservedNonZero,
    /// A field that must be zero for this kind is not
    /// (`first_bit`/`nr_bits` of LAYOUT_QUERY, `first_bit` of ROUND_END).
    UnexpectedField,
    /// `cmd_id` is STOP (0) or DONE (1), which never name a round.
    ReservedCmdId(u32),
    /// Chunk `first_bit` is not a multiple of 64.
    MisalignedFirstBit(u64),
    /// Chunk with `nr_bits == 0`.
    EmptyChunk,
    /// Chunk `nr_bits` above [`MAX_CHUNK_BITS`].
    ChunkTooLarge(u32),
    /// Chunk reaches beyond the layout's `total_bits`.
    BeyondLayout {
        /// One past the chunk's last bit.
        end_bit: u64,
        /// The layout's bitmap size.
        total_bits: u64,
    },
    /// Layout reply `page_shift` is not 12.
    UnsupportedPageShift(u16),
    /// Layout reply `total_bits` does not match its ranges.
    TotalBitsMismatch {
        /// Value in the header.
        declared: u64,
        /// Value computed from the ranges.
        computed: u64,
    },
    /// Chunk payload bytes beyond [`ChunkHeader::payload_len`].
    PayloadOverrun {
        /// One past the last payload byte offered.
        end: usize,
        /// The chunk's payload length.
        payload_len: usize,
    },
    /// The layout table itself is invalid.
    Layout(LayoutError),
}

impl From<LayoutError> for WireError {
    fn from(e: LayoutError) -> Self {
        Self::Layout(e)
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, got } => {
                write!(f, "message truncated: {got} bytes, need {needed}")
            }
            Self::BufferTooSmall { needed, got } => {
                write!(f, "output buffer too small: {got} bytes, need {needed}")
            }
            Self::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            Self::InvalidKind => f.write_str("message kind 0 (invalid)"),
            Self::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            Self::ReservedNonZero => f.write_str("reserved field is not zero"),
            Self::UnexpectedField => f.write_str("field must be zero for this message kind"),
            Self::ReservedCmdId(id) => write!(f, "command id {id} is STOP/DONE, not a round"),
            Self::MisalignedFirstBit(b) => {
                write!(f, "chunk first_bit {b} is not a multiple of 64")
            }
            Self::EmptyChunk => f.write_str("chunk has zero bits"),
            Self::ChunkTooLarge(n) => {
                write!(
                    f,
                    "chunk of {n} bits exceeds the maximum of {MAX_CHUNK_BITS}"
                )
            }
            Self::BeyondLayout {
                end_bit,
                total_bits,
            } => write!(
                f,
                "chunk ends at bit {end_bit}, beyond the layout's {total_bits} bits"
            ),
            Self::UnsupportedPageShift(s) => write!(f, "page shift {s} unsupported (need 12)"),
            Self::TotalBitsMismatch { declared, computed } => write!(
                f,
                "layout reply declares {declared} bits but its ranges give {computed}"
            ),
            Self::PayloadOverrun { end, payload_len } => write!(
                f,
                "chunk payload reaches byte {end}, beyond its {payload_len} bytes"
            ),
            Self::Layout(e) => write!(f, "invalid layout: {e}"),
        }
    }
}

#[inline]
fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

#[inline]
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

#[inline]
fn rd64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

#[inline]
fn need(buf_len: usize, needed: usize) -> Result<(), WireError> {
    if buf_len < needed {
        Err(WireError::Truncated {
            needed,
            got: buf_len,
        })
    } else {
        Ok(())
    }
}

#[inline]
fn room(buf_len: usize, needed: usize) -> Result<(), WireError> {
    if buf_len < needed {
        Err(WireError::BufferTooSmall {
            needed,
            got: buf_len,
        })
    } else {
        Ok(())
    }
}

#[inline]
fn check_cmd_id(cmd_id: u32) -> Result<(), WireError> {
    if cmd_id <= 1 {
        Err(WireError::ReservedCmdId(cmd_id))
    } else {
        Ok(())
    }
}

/// The message header exactly as on the wire, unvalidated (only its length
/// is checked). Use [`Message::parse`] for validated input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MsgHeader {
    /// Must be [`MSG_MAGIC`].
    pub magic: u32,
    /// Message kind (`KIND_*`).
    pub kind: u16,
    /// Must be 0.
    pub reserved: u16,
    /// Round being answered.
    pub cmd_id: u32,
    /// Kind-specific count.
    pub nr_bits: u32,
    /// Kind-specific bit offset.
    pub first_bit: u64,
}

impl MsgHeader {
    /// A header with the magic set and the reserved field 0.
    pub const fn new(kind: u16, cmd_id: u32, nr_bits: u32, first_bit: u64) -> Self {
        Self {
            magic: MSG_MAGIC,
            kind,
            reserved: 0,
            cmd_id,
            nr_bits,
            first_bit,
        }
    }

    /// Reads the 24 header bytes at the front of `bytes`.
    pub fn read(bytes: &[u8]) -> Result<Self, WireError> {
        need(bytes.len(), MSG_HEADER_SIZE)?;
        Ok(Self {
            magic: rd32(bytes, 0),
            kind: rd16(bytes, 4),
            reserved: rd16(bytes, 6),
            cmd_id: rd32(bytes, 8),
            nr_bits: rd32(bytes, 12),
            first_bit: rd64(bytes, 16),
        })
    }

    /// Writes the 24 header bytes to the front of `out`.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        room(out.len(), MSG_HEADER_SIZE)?;
        out[0..4].copy_from_slice(&self.magic.to_le_bytes());
        out[4..6].copy_from_slice(&self.kind.to_le_bytes());
        out[6..8].copy_from_slice(&self.reserved.to_le_bytes());
        out[8..12].copy_from_slice(&self.cmd_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.nr_bits.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_bit.to_le_bytes());
        Ok(MSG_HEADER_SIZE)
    }
}

/// Header of a bitmap chunk; its payload ([`ChunkHeader::payload_len`]
/// bytes, little-endian u64 words) follows in the same chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Round being answered.
    pub cmd_id: u32,
    /// First bit covered (multiple of 64).
    pub first_bit: Bit,
    /// Bits covered, `1..=MAX_CHUNK_BITS`.
    pub nr_bits: u32,
}

impl ChunkHeader {
    /// Payload bytes that follow the header: whole 64-bit words.
    #[inline]
    pub fn payload_len(&self) -> usize {
        (self.nr_bits as usize).div_ceil(64) * 8
    }

    /// One past the last bit covered.
    #[inline]
    pub fn end_bit(&self) -> Bit {
        Bit(self.first_bit.raw().saturating_add(u64::from(self.nr_bits)))
    }

    /// Checks the chunk fits in a bitmap of `total_bits` bits.
    pub fn check_bounds(&self, total_bits: u64) -> Result<(), WireError> {
        let end_bit = self.end_bit().raw();
        if end_bit > total_bits {
            Err(WireError::BeyondLayout {
                end_bit,
                total_bits,
            })
        } else {
            Ok(())
        }
    }

    /// Validates the header (see [`Message::parse`]) and checks the chunk
    /// fits in a bitmap of `total_bits` bits, once: the [`BoundChunk`] it
    /// returns merges payload pieces with no further header checks.
    pub fn bind(&self, total_bits: u64) -> Result<BoundChunk, WireError> {
        self.validate()?;
        self.check_bounds(total_bits)?;
        Ok(BoundChunk { header: *self })
    }

    /// ORs one piece of this chunk's payload into the bitmap `words` (bit 0
    /// of `words` = bit 0 of the layout). `offset` is the piece's byte offset
    /// within the payload, so a payload split over several descriptors is
    /// merged piece by piece without copying. Bits at or beyond `nr_bits` are
    /// ignored (masked), as the device requirements demand.
    ///
    /// Fails without touching `words` if the header is invalid (see
    /// [`Message::parse`]), the piece runs past the payload, or the chunk does
    /// not fit in `words`. A receiver merging many pieces checks the header
    /// once with [`Self::bind`] instead.
    pub fn or_payload(
        &self,
        words: &mut [u64],
        offset: usize,
        piece: &[u8],
    ) -> Result<(), WireError> {
        self.validate()?;
        self.check_piece(offset, piece)?;
        self.check_bounds((words.len() as u64).saturating_mul(64))?;
        self.merge_piece(words, offset, piece);
        Ok(())
    }

    /// Checks a piece at byte `offset` lies within the payload.
    fn check_piece(&self, offset: usize, piece: &[u8]) -> Result<(), WireError> {
        let payload_len = self.payload_len();
        let end = offset.saturating_add(piece.len());
        if end > payload_len {
            Err(WireError::PayloadOverrun { end, payload_len })
        } else {
            Ok(())
        }
    }

    /// ORs a piece that [`Self::check_piece`] accepted into `words` (bytes
    /// beyond `words` are ignored).
    fn merge_piece(&self, words: &mut [u64], offset: usize, piece: &[u8]) {
        let end = offset + piece.len();
        let full = (self.nr_bits / 8) as usize; // payload bytes fully inside nr_bits
        let base = self.first_bit.raw() / 8;
        if offset < full {
            let n = piece.len().min(full - offset);
            or_le_bytes(words, base + offset as u64, &piece[..n]);
        }
        let part_bits = self.nr_bits % 8;
        if part_bits != 0 && offset <= full && full < end {
            let b = piece[full - offset] & ((1u8 << part_bits) - 1);
            or_le_bytes(words, base + full as u64, &[b]);
        }
    }

    fn validate(&self) -> Result<(), WireError> {
        check_cmd_id(self.cmd_id)?;
        if self.first_bit.bit_in_word() != 0 {
            return Err(WireError::MisalignedFirstBit(self.first_bit.raw()));
        }
        if self.nr_bits == 0 {
            return Err(WireError::EmptyChunk);
        }
        if self.nr_bits > MAX_CHUNK_BITS {
            return Err(WireError::ChunkTooLarge(self.nr_bits));
        }
        Ok(())
    }
}

/// A [`ChunkHeader`] that [`ChunkHeader::bind`] validated and checked
/// against a bitmap of known size: its payload pieces merge without looking
/// at the header again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundChunk {
    header: ChunkHeader,
}

impl BoundChunk {
    /// The header.
    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }

    /// ORs one payload piece at byte `offset` of the payload into `words`,
    /// the bitmap the chunk was bound to (bytes beyond `words` are ignored).
    /// Fails without touching `words` if the piece runs past the payload.
    pub fn or_piece(
        &self,
        words: &mut [u64],
        offset: usize,
        piece: &[u8],
    ) -> Result<(), WireError> {
        self.header.check_piece(offset, piece)?;
        self.header.merge_piece(words, offset, piece);
        Ok(())
    }
}

/// Splits a bitmap of `total_bits` bits into chunk spans
/// `(first_bit, nr_bits)` of at most `max_bits` bits each (clamped to
/// 64..=[`MAX_CHUNK_BITS`] and rounded down to a multiple of 64), in order.
///
/// ```
/// use freehint_protocol::bitmap_hint::{chunk_spans, MAX_CHUNK_BITS};
/// use freehint_protocol::layout::Bit;
/// assert!(chunk_spans(200, 128).eq([(Bit(0), 128), (Bit(128), 72)]));
/// assert_eq!(chunk_spans(1 << 32, u32::MAX).count(), (1 << 32) / MAX_CHUNK_BITS as usize);
/// ```
pub fn chunk_spans(total_bits: u64, max_bits: u32) -> impl Iterator<Item = (Bit, u32)> {
    let step = u64::from(max_bits.clamp(64, MAX_CHUNK_BITS) & !63);
    let mut first = 0u64;
    core::iter::from_fn(move || {
        if first >= total_bits {
            return None;
        }
        let nr = (total_bits - first).min(step);
        let span = (Bit(first), nr as u32);
        first += nr;
        Some(span)
    })
}

/// A validated driver → device message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Asks for the layout of round `cmd_id`; the same chain carries an in
    /// buffer of at least [`LAYOUT_REPLY_MAX`] bytes for the reply.
    LayoutQuery {
        /// Round being answered.
        cmd_id: u32,
    },
    /// A bitmap chunk.
    Chunk(ChunkHeader),
    /// End of round `cmd_id` (the bitmap protocol's STOP).
    RoundEnd {
        /// Round being answered.
        cmd_id: u32,
        /// Free pages the driver counted (saturated at `u32::MAX`).
        free_pages: u32,
    },
}

impl Message {
    /// The round the message belongs to.
    pub fn cmd_id(&self) -> u32 {
        match *self {
            Self::LayoutQuery { cmd_id } | Self::RoundEnd { cmd_id, .. } => cmd_id,
            Self::Chunk(c) => c.cmd_id,
        }
    }

    /// Parses and validates the header at the front of `bytes` (bytes after
    /// the first [`MSG_HEADER_SIZE`] are ignored: a chunk's payload may
    /// follow in the same buffer).
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let h = MsgHeader::read(bytes)?;
        Self::from_header(&h)
    }

    /// Validates a raw header.
    pub fn from_header(h: &MsgHeader) -> Result<Self, WireError> {
        if h.magic != MSG_MAGIC {
            return Err(WireError::BadMagic(h.magic));
        }
        match h.kind {
            KIND_INVALID => return Err(WireError::InvalidKind),
            KIND_LAYOUT_QUERY | KIND_CHUNK | KIND_ROUND_END => {}
            k => return Err(WireError::UnknownKind(k)),
        }
        if h.reserved != 0 {
            return Err(WireError::ReservedNonZero);
        }
        check_cmd_id(h.cmd_id)?;
        match h.kind {
            KIND_LAYOUT_QUERY => {
                if h.nr_bits != 0 || h.first_bit != 0 {
                    return Err(WireError::UnexpectedField);
                }
                Ok(Self::LayoutQuery { cmd_id: h.cmd_id })
            }
            KIND_CHUNK => {
                let c = ChunkHeader {
                    cmd_id: h.cmd_id,
                    first_bit: Bit(h.first_bit),
                    nr_bits: h.nr_bits,
                };
                c.validate()?;
                Ok(Self::Chunk(c))
            }
            _ => {
                if h.first_bit != 0 {
                    return Err(WireError::UnexpectedField);
                }
                Ok(Self::RoundEnd {
                    cmd_id: h.cmd_id,
                    free_pages: h.nr_bits,
                })
            }
        }
    }

    /// The raw header for this message (not validated).
    pub fn header(&self) -> MsgHeader {
        let (kind, cmd_id, nr_bits, first_bit) = match *self {
            Self::LayoutQuery { cmd_id } => (KIND_LAYOUT_QUERY, cmd_id, 0, 0),
            Self::Chunk(c) => (KIND_CHUNK, c.cmd_id, c.nr_bits, c.first_bit.raw()),
            Self::RoundEnd { cmd_id, free_pages } => (KIND_ROUND_END, cmd_id, free_pages, 0),
        };
        MsgHeader::new(kind, cmd_id, nr_bits, first_bit)
    }

    /// Validates the message and writes its header to the front of `out`;
    /// returns [`MSG_HEADER_SIZE`]. A chunk's payload is written by the caller
    /// after it.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let h = self.header();
        Self::from_header(&h)?;
        h.write(out)
    }
}

/// The device's answer to [`Message::LayoutQuery`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutReply {
    /// Round the layout belongs to.
    pub cmd_id: u32,
    /// Geometry of the bitmap for that round.
    pub layout: Layout,
}

impl LayoutReply {
    /// Wire size of this reply.
    pub fn encoded_len(&self) -> usize {
        LAYOUT_REPLY_HEADER_SIZE + self.layout.ranges().len() * LAYOUT_RANGE_SIZE
    }

    /// Writes the reply to `out`; returns the bytes written. Fails on an
    /// empty layout, a reserved `cmd_id`, or a short buffer.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        check_cmd_id(self.cmd_id)?;
        let ranges = self.layout.ranges();
        if ranges.is_empty() {
            return Err(WireError::Layout(LayoutError::Empty));
        }
        let len = self.encoded_len();
        room(out.len(), len)?;
        out[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.cmd_id.to_le_bytes());
        out[8..10].copy_from_slice(&(PAGE_SHIFT as u16).to_le_bytes());
        out[10..12].copy_from_slice(&(ranges.len() as u16).to_le_bytes());
        out[12..16].copy_from_slice(&0u32.to_le_bytes());
        out[16..24].copy_from_slice(&self.layout.total_bits().to_le_bytes());
        for (i, r) in ranges.iter().enumerate() {
            let o = LAYOUT_REPLY_HEADER_SIZE + i * LAYOUT_RANGE_SIZE;
            out[o..o + 8].copy_from_slice(&r.first_pfn.raw().to_le_bytes());
            out[o + 8..o + 16].copy_from_slice(&r.nr_pages.to_le_bytes());
            out[o + 16..o + 24].copy_from_slice(&r.first_bit.raw().to_le_bytes());
        }
        Ok(len)
    }

    /// Parses and validates a reply (`bytes` = what the device wrote; extra
    /// trailing bytes are ignored). Every range is checked by
    /// [`Layout::from_ranges`].
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        need(bytes.len(), LAYOUT_REPLY_HEADER_SIZE)?;
        let magic = rd32(bytes, 0);
        if magic != REPLY_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let cmd_id = rd32(bytes, 4);
        check_cmd_id(cmd_id)?;
        let page_shift = rd16(bytes, 8);
        if u32::from(page_shift) != PAGE_SHIFT {
            return Err(WireError::UnsupportedPageShift(page_shift));
        }
        let nr = usize::from(rd16(bytes, 10));
        if rd32(bytes, 12) != 0 {
            return Err(WireError::ReservedNonZero);
        }
        let declared = rd64(bytes, 16);
        if nr == 0 {
            return Err(WireError::Layout(LayoutError::Empty));
        }
        if nr > MAX_LAYOUT_RANGES {
            return Err(WireError::Layout(LayoutError::TooManyRanges));
        }
        need(
            bytes.len(),
            LAYOUT_REPLY_HEADER_SIZE + nr * LAYOUT_RANGE_SIZE,
        )?;
        let mut layout = Layout::empty();
        for i in 0..nr {
            let o = LAYOUT_REPLY_HEADER_SIZE + i * LAYOUT_RANGE_SIZE;
            layout.push_range(LayoutRange {
                first_pfn: Pfn(rd64(bytes, o)),
                nr_pages: rd64(bytes, o + 8),
                first_bit: Bit(rd64(bytes, o + 16)),
            })?;
        }
        if layout.total_bits() != declared {
            return Err(WireError::TotalBitsMismatch {
                declared,
                computed: layout.total_bits(),
            });
        }
        Ok(Self { cmd_id, layout })
    }
}
