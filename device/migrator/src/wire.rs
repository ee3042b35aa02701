//! The migration stream: a header with the RAM layout, then records.
//!
//! Any byte stream carries it (TCP between hosts, a UNIX socket or a pipe
//! in tests). All integers are little-endian; a page is 4096 bytes.
//!
//! | part | fields (bytes) |
//! |---|---|
//! | header | magic `FHMIGRAT` (8), version `1` (u32), page size `4096` (u32), range count *n* (u32, 1..=1024) |
//! | *n* × range | guest-physical address (u64), pages (u64), RAM file offset (u64) |
//! | pass marker | tag `1` (u8), pass number (u32), kind (u8: 1 bulk, 2 dirty, 3 final) |
//! | page run | tag `2` (u8), first page index (u64), count (u64), then count × 4096 bytes |
//! | zero run | tag `3` (u8), first page index (u64), count (u64) |
//! | end | tag `4` (u8), data pages sent (u64), zero pages sent (u64) |
//! | balloon | tag `5` (u8), balloon target in 4 KiB pages (u32) |
//!
//! Page indices number the pages of the ranges in order (see
//! [`RamLayout`]); a run lies within one range. Tag `0` is never valid.
//!
//! Order: one bulk pass marker first, then dirty pass markers with
//! increasing numbers, then one final pass marker, then end. Page and zero
//! runs follow a pass marker; a later run of a page overrides an earlier
//! one. At most one balloon record, after the final pass marker: the
//! balloon size the host asked of the guest on the source, which the
//! destination's balloon device takes over (the device itself does not
//! migrate with the RAM; see `docs/migration.md`). The end record repeats the totals so a receiver knows nothing was
//! lost; a stream without one is incomplete.
//!
//! The [`Decoder`] treats the sender as untrusted: every field is checked
//! against the announced layout before use, page data is read in chunks of
//! [`DECODE_CHUNK_PAGES`] pages into one fixed buffer, and no allocation
//! depends on a length from the stream beyond [`MAX_RANGES`] ranges.
//!
//! Versioning: a change to any of the above bumps [`VERSION`]; a decoder
//! refuses versions it does not speak.
//!
//! [`MAX_RANGES`]: crate::layout::MAX_RANGES

use std::io::{self, Read, Write};

use serde::Serialize;
use vm_memory::{Address, GuestAddress};

use crate::layout::{self, LayoutError, PagePlace, RamLayout, RamRange, RunError};
use crate::PAGE_SIZE;

/// First eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"FHMIGRAT";
/// The stream version this build writes and reads.
pub const VERSION: u32 = 2;
/// Largest piece of a page run the decoder hands out at once.
pub const DECODE_CHUNK_PAGES: usize = 32;

const TAG_PASS: u8 = 1;
const TAG_PAGES: u8 = 2;
const TAG_ZERO: u8 = 3;
const TAG_END: u8 = 4;
const TAG_BALLOON: u8 = 5;

/// What a pass sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PassKind {
    /// The first pass: every page.
    Bulk = 1,
    /// A pass over the pages written while the previous one ran.
    Dirty = 2,
    /// The pass made with the guest stopped.
    Final = 3,
}

impl PassKind {
    fn from_wire(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Bulk),
            2 => Some(Self::Dirty),
            3 => Some(Self::Final),
            _ => None,
        }
    }
}

/// One record of the stream. The decoder hands out a page run in pieces of
/// at most [`DECODE_CHUNK_PAGES`] pages, each as its own `Pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A pass begins.
    Pass {
        /// Pass number, increasing through the stream.
        number: u32,
        /// Its kind.
        kind: PassKind,
    },
    /// Page contents, `data.len() / 4096` pages from page index `start`.
    Pages {
        /// First page index.
        start: u64,
        /// Whole pages.
        data: &'a [u8],
    },
    /// `count` pages from page index `start` are zero.
    Zero {
        /// First page index.
        start: u64,
        /// Pages.
        count: u64,
    },
    /// The balloon target the destination's balloon device takes over.
    Balloon {
        /// Target size of the balloon, 4 KiB pages.
        target_pages: u32,
    },
    /// The stream is complete.
    End {
        /// Data pages sent (in page runs).
        pages: u64,
        /// Pages sent as zero runs.
        zero_pages: u64,
    },
}

/// What is wrong with one record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// A tag that names no record.
    #[error("unknown record tag {0}")]
    UnknownTag(u8),
    /// A pass kind that names no kind.
    #[error("unknown pass kind {0}")]
    UnknownPassKind(u8),
    /// Page data outside any pass.
    #[error("page or zero run before the first pass marker")]
    DataBeforePass,
    /// The first pass is not the bulk pass.
    #[error("the first pass is {0:?}, not Bulk")]
    FirstPassNotBulk(PassKind),
    /// A second bulk pass.
    #[error("a second bulk pass")]
    SecondBulk,
    /// A pass marker after the final pass.
    #[error("a pass marker after the final pass")]
    PassAfterFinal,
    /// Pass numbers must increase.
    #[error("pass {number} after pass {last}")]
    PassNotIncreasing {
        /// This pass.
        number: u32,
        /// The previous pass.
        last: u32,
    },
    /// A run that does not fit the layout.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Page data that is not a whole number of pages.
    #[error("page data of {0} bytes is not a non-zero multiple of 4096")]
    DataLength(usize),
    /// The end came before the final pass.
    #[error("end of stream before the final pass")]
    EndWithoutFinal,
    /// The end record's totals differ from what the stream carried.
    #[error("end record announces {announced} {what}, the stream carried {seen}")]
    CountMismatch {
        /// Which total.
        what: &'static str,
        /// In the end record.
        announced: u64,
        /// Counted.
        seen: u64,
    },
    /// A page total that does not fit in 64 bits.
    #[error("page totals overflow")]
    CounterOverflow,
    /// A record after the end record.
    #[error("record after the end record")]
    AfterEnd,
    /// A balloon record before the final pass marker.
    #[error("balloon record before the final pass")]
    BalloonBeforeFinal,
    /// A second balloon record.
    #[error("a second balloon record")]
    SecondBalloon,
}

/// An error reading or writing a stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The byte stream failed.
    #[error("I/O error at byte {offset}")]
    Io {
        /// Stream offset.
        offset: u64,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The stream ended early.
    #[error("stream ends inside {what} at byte {offset}")]
    Truncated {
        /// Offset of the field that is cut.
        offset: u64,
        /// That field.
        what: &'static str,
    },
    /// Not a migration stream.
    #[error("not a freehint migration stream (magic {found:02x?})")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A version this build does not speak.
    #[error("stream version {found}, this build speaks version {VERSION}")]
    Version {
        /// Announced version.
        found: u32,
    },
    /// A page size other than 4096.
    #[error("page size {found}, only 4096 is supported")]
    PageSize {
        /// Announced page size.
        found: u32,
    },
    /// The layout in the header is invalid.
    #[error("invalid RAM layout in the header")]
    Layout(#[from] LayoutError),
    /// A record is invalid.
    #[error("record {record} at byte {offset}: {reason}")]
    Record {
        /// Record number, from 0.
        record: u64,
        /// Stream offset of the record.
        offset: u64,
        /// What is wrong.
        reason: RecordError,
    },
    /// The decoder already failed; its position in the stream is lost.
    #[error("the decoder already returned an error")]
    Failed,
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, WireError>;

/// The ordering and totals rules, shared by encoder and decoder.
#[derive(Debug, Default)]
struct Sequence {
    last_pass: Option<(u32, PassKind)>,
    ended: bool,
    balloon: bool,
    pages: u64,
    zero_pages: u64,
}

impl Sequence {
    fn pass(&mut self, number: u32, kind: PassKind) -> std::result::Result<(), RecordError> {
        self.not_ended()?;
        match (self.last_pass, kind) {
            (None, PassKind::Bulk) => {}
            (None, kind) => return Err(RecordError::FirstPassNotBulk(kind)),
            (Some((_, PassKind::Final)), _) => return Err(RecordError::PassAfterFinal),
            (Some(_), PassKind::Bulk) => return Err(RecordError::SecondBulk),
            (Some((last, _)), _) if number <= last => {
                return Err(RecordError::PassNotIncreasing { number, last })
            }
            (Some(_), _) => {}
        }
        self.last_pass = Some((number, kind));
        Ok(())
    }

    fn run(
        &mut self,
        layout: &RamLayout,
        start: u64,
        count: u64,
        zero: bool,
    ) -> std::result::Result<PagePlace, RecordError> {
        self.not_ended()?;
        if self.last_pass.is_none() {
            return Err(RecordError::DataBeforePass);
        }
        let place = layout.check_run(start, count)?;
        let total = if zero {
            &mut self.zero_pages
        } else {
            &mut self.pages
        };
        *total = total
            .checked_add(count)
            .ok_or(RecordError::CounterOverflow)?;
        Ok(place)
    }

    fn balloon(&mut self) -> std::result::Result<(), RecordError> {
        self.not_ended()?;
        if !matches!(self.last_pass, Some((_, PassKind::Final))) {
            return Err(RecordError::BalloonBeforeFinal);
        }
        if std::mem::replace(&mut self.balloon, true) {
            return Err(RecordError::SecondBalloon);
        }
        Ok(())
    }

    fn end(&mut self, pages: u64, zero_pages: u64) -> std::result::Result<(), RecordError> {
        self.not_ended()?;
        if !matches!(self.last_pass, Some((_, PassKind::Final))) {
            return Err(RecordError::EndWithoutFinal);
        }
        check_total("data pages", pages, self.pages)?;
        check_total("zero pages", zero_pages, self.zero_pages)?;
        self.ended = true;
        Ok(())
    }

    fn not_ended(&self) -> std::result::Result<(), RecordError> {
        if self.ended {
            return Err(RecordError::AfterEnd);
        }
        Ok(())
    }
}

fn check_total(
    what: &'static str,
    announced: u64,
    seen: u64,
) -> std::result::Result<(), RecordError> {
    if announced != seen {
        return Err(RecordError::CountMismatch {
            what,
            announced,
            seen,
        });
    }
    Ok(())
}

/// Writes a stream. Records are checked with the decoder's rules, so an
/// encoder never produces a stream its decoder refuses.
#[derive(Debug)]
pub struct Encoder<W: Write> {
    out: W,
    layout: RamLayout,
    seq: Sequence,
    bytes: u64,
    records: u64,
}

impl<W: Write> Encoder<W> {
    /// Writes the header for `layout` to `out`.
    pub fn new(out: W, layout: &RamLayout) -> Result<Self> {
        let mut encoder = Self {
            out,
            layout: layout.clone(),
            seq: Sequence::default(),
            bytes: 0,
            records: 0,
        };
        let mut header = Vec::with_capacity(20 + 24 * layout.ranges().len());
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        header.extend_from_slice(&(layout.ranges().len() as u32).to_le_bytes());
        for range in layout.ranges() {
            for field in [range.gpa.raw_value(), range.pages, range.file_offset] {
                header.extend_from_slice(&field.to_le_bytes());
            }
        }
        encoder.put(&header)?;
        Ok(encoder)
    }

    /// The layout announced in the header.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Writes one record (an `End` must carry the true totals).
    pub fn write(&mut self, record: Record<'_>) -> Result<()> {
        match record {
            Record::Pass { number, kind } => self.pass(number, kind),
            Record::Pages { start, data } => self.pages(start, data),
            Record::Zero { start, count } => self.zero(start, count),
            Record::Balloon { target_pages } => self.balloon(target_pages),
            Record::End { pages, zero_pages } => self.end_with(pages, zero_pages),
        }
    }

    /// Starts pass `number` of kind `kind`.
    pub fn pass(&mut self, number: u32, kind: PassKind) -> Result<()> {
        let checked = self.seq.pass(number, kind);
        self.record(checked)?;
        let mut buf = [0u8; 6];
        buf[0] = TAG_PASS;
        buf[1..5].copy_from_slice(&number.to_le_bytes());
        buf[5] = kind as u8;
        self.put(&buf)
    }

    /// Sends `data` (whole pages) as the contents of the pages from `start`.
    pub fn pages(&mut self, start: u64, data: &[u8]) -> Result<()> {
        let count = data.len() / PAGE_SIZE;
        let checked = if data.is_empty() || data.len() % PAGE_SIZE != 0 {
            Err(RecordError::DataLength(data.len()))
        } else {
            self.seq
                .run(&self.layout, start, count as u64, false)
                .map(drop)
        };
        self.record(checked)?;
        self.put(&run_header(TAG_PAGES, start, count as u64))?;
        self.put(data)
    }

    /// Sends `count` pages from `start` as zero.
    pub fn zero(&mut self, start: u64, count: u64) -> Result<()> {
        let checked = self.seq.run(&self.layout, start, count, true).map(drop);
        self.record(checked)?;
        self.put(&run_header(TAG_ZERO, start, count))
    }

    /// Carries the balloon target (after the final pass marker, once).
    pub fn balloon(&mut self, target_pages: u32) -> Result<()> {
        let checked = self.seq.balloon();
        self.record(checked)?;
        let mut buf = [0u8; 5];
        buf[0] = TAG_BALLOON;
        buf[1..].copy_from_slice(&target_pages.to_le_bytes());
        self.put(&buf)
    }

    /// Ends the stream with the totals counted so far and flushes it; the
    /// encoder accepts no record after this.
    pub fn end(&mut self) -> Result<()> {
        self.end_with(self.seq.pages, self.seq.zero_pages)?;
        let offset = self.bytes;
        self.out
            .flush()
            .map_err(|source| WireError::Io { offset, source })
    }

    /// [`end`](Self::end), then returns the writer.
    pub fn finish(mut self) -> Result<W> {
        self.end()?;
        Ok(self.out)
    }

    fn end_with(&mut self, pages: u64, zero_pages: u64) -> Result<()> {
        let checked = self.seq.end(pages, zero_pages);
        self.record(checked)?;
        self.put(&run_header(TAG_END, pages, zero_pages))
    }

    /// Turns a rule check into an error naming this record, and counts it.
    fn record(&mut self, checked: std::result::Result<(), RecordError>) -> Result<()> {
        let record = self.records;
        self.records += 1;
        checked.map_err(|reason| WireError::Record {
            record,
            offset: self.bytes,
            reason,
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let offset = self.bytes;
        self.out
            .write_all(bytes)
            .map_err(|source| WireError::Io { offset, source })?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

fn run_header(tag: u8, a: u64, b: u64) -> [u8; 17] {
    let mut buf = [0u8; 17];
    buf[0] = tag;
    buf[1..9].copy_from_slice(&a.to_le_bytes());
    buf[9..17].copy_from_slice(&b.to_le_bytes());
    buf
}

/// Where the decoder is in the stream.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Next comes a record tag.
    Records,
    /// Inside a page run: `left` pages from page `next` remain.
    Data { next: u64, left: u64 },
    /// The end record was read.
    Ended,
    /// An error was returned.
    Failed,
}

/// A record without borrowed data: page data sits in the decoder's buffer.
enum Decoded {
    Pass { number: u32, kind: PassKind },
    Pages { start: u64, len: usize },
    Zero { start: u64, count: u64 },
    Balloon { target_pages: u32 },
    End { pages: u64, zero_pages: u64 },
}

/// Counts the bytes it reads and turns end of input into
/// [`WireError::Truncated`].
#[derive(Debug)]
struct ByteReader<R> {
    input: R,
    offset: u64,
}

impl<R: Read> ByteReader<R> {
    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        read_exact(&mut self.input, buf, self.offset, what)?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn read_u8(&mut self, what: &'static str) -> Result<u8> {
        let mut buf = [0u8; 1];
        self.read_exact(&mut buf, what)?;
        Ok(buf[0])
    }

    fn read_u32(&mut self, what: &'static str) -> Result<u32> {
        let mut buf = [0u8; 4];
        self.read_exact(&mut buf, what)?;
        Ok(u32::from_le_bytes(buf))
    }

    fn read_u64(&mut self, what: &'static str) -> Result<u64> {
        let mut buf = [0u8; 8];
        self.read_exact(&mut buf, what)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Reads and checks the header.
    fn read_header(&mut self, max_ram_bytes: u64) -> Result<RamLayout> {
        let mut magic = [0u8; 8];
        self.read_exact(&mut magic, "the magic")?;
        if magic != MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let version = self.read_u32("the version")?;
        if version != VERSION {
            return Err(WireError::Version { found: version });
        }
        let page_size = self.read_u32("the page size")?;
        if page_size != PAGE_SIZE as u32 {
            return Err(WireError::PageSize { found: page_size });
        }
        let count = self.read_u32("the range count")?;
        layout::check_range_count(count.into())?;
        // At most MAX_RANGES, checked just above.
        let mut ranges = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let gpa = GuestAddress(self.read_u64("a range address")?);
            let pages = self.read_u64("a range length")?;
            let file_offset = self.read_u64("a range file offset")?;
            ranges.push(RamRange {
                gpa,
                pages,
                file_offset,
            });
        }
        Ok(RamLayout::with_max_bytes(ranges, max_ram_bytes)?)
    }
}

/// Reads a stream from an untrusted sender (see the module documentation).
#[derive(Debug)]
pub struct Decoder<R: Read> {
    reader: ByteReader<R>,
    layout: RamLayout,
    seq: Sequence,
    /// Number of the current record, and where it started.
    record: u64,
    record_offset: u64,
    state: State,
    /// Page data of the current piece: `DECODE_CHUNK_PAGES` pages.
    buf: Box<[u8]>,
}

impl<R: Read> Decoder<R> {
    /// Reads and checks the header, accepting up to
    /// [`DEFAULT_MAX_RAM_BYTES`](crate::layout::DEFAULT_MAX_RAM_BYTES) of RAM.
    pub fn new(input: R) -> Result<Self> {
        Self::with_max_ram_bytes(input, layout::DEFAULT_MAX_RAM_BYTES)
    }

    /// Reads and checks the header, refusing a layout of more than
    /// `max_ram_bytes` of RAM.
    pub fn with_max_ram_bytes(input: R, max_ram_bytes: u64) -> Result<Self> {
        let mut reader = ByteReader { input, offset: 0 };
        let layout = reader.read_header(max_ram_bytes)?;
        Ok(Self {
            reader,
            layout,
            seq: Sequence::default(),
            record: 0,
            record_offset: 0,
            state: State::Records,
            buf: vec![0u8; DECODE_CHUNK_PAGES * PAGE_SIZE].into_boxed_slice(),
        })
    }

    /// The layout announced in the header.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.reader.offset
    }

    /// The next record, or `None` after the end record. After an error the
    /// decoder only returns [`WireError::Failed`].
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>> {
        let decoded = match self.state {
            State::Failed => return Err(WireError::Failed),
            State::Ended => return Ok(None),
            State::Data { next, left } => self.read_data(next, left),
            State::Records => self.read_record(),
        };
        match decoded {
            Ok(decoded) => Ok(Some(self.lend(decoded))),
            Err(err) => {
                self.state = State::Failed;
                Err(err)
            }
        }
    }

    fn lend(&self, decoded: Decoded) -> Record<'_> {
        match decoded {
            Decoded::Pass { number, kind } => Record::Pass { number, kind },
            Decoded::Pages { start, len } => Record::Pages {
                start,
                data: &self.buf[..len],
            },
            Decoded::Zero { start, count } => Record::Zero { start, count },
            Decoded::Balloon { target_pages } => Record::Balloon { target_pages },
            Decoded::End { pages, zero_pages } => Record::End { pages, zero_pages },
        }
    }

    fn read_record(&mut self) -> Result<Decoded> {
        self.record_offset = self.reader.offset;
        let tag = self
            .reader
            .read_u8("a record tag (the stream has no end record)")?;
        let decoded = match tag {
            TAG_PASS => self.read_pass(),
            TAG_PAGES => self.read_pages(),
            TAG_ZERO => self.read_zero(),
            TAG_END => self.read_end(),
            TAG_BALLOON => self.read_balloon(),
            tag => Err(self.invalid(RecordError::UnknownTag(tag))),
        };
        self.record += 1;
        decoded
    }

    fn read_pass(&mut self) -> Result<Decoded> {
        let number = self.reader.read_u32("a pass number")?;
        let raw_kind = self.reader.read_u8("a pass kind")?;
        let kind = PassKind::from_wire(raw_kind)
            .ok_or_else(|| self.invalid(RecordError::UnknownPassKind(raw_kind)))?;
        let checked = self.seq.pass(number, kind);
        checked.map_err(|reason| self.invalid(reason))?;
        Ok(Decoded::Pass { number, kind })
    }

    fn read_pages(&mut self) -> Result<Decoded> {
        let start = self.reader.read_u64("a page run start")?;
        let count = self.reader.read_u64("a page run count")?;
        let checked = self.seq.run(&self.layout, start, count, false);
        checked.map_err(|reason| self.invalid(reason))?;
        self.read_data(start, count)
    }

    fn read_zero(&mut self) -> Result<Decoded> {
        let start = self.reader.read_u64("a zero run start")?;
        let count = self.reader.read_u64("a zero run count")?;
        let checked = self.seq.run(&self.layout, start, count, true);
        checked.map_err(|reason| self.invalid(reason))?;
        Ok(Decoded::Zero { start, count })
    }

    fn read_balloon(&mut self) -> Result<Decoded> {
        let target_pages = self.reader.read_u32("a balloon target")?;
        let checked = self.seq.balloon();
        checked.map_err(|reason| self.invalid(reason))?;
        Ok(Decoded::Balloon { target_pages })
    }

    fn read_end(&mut self) -> Result<Decoded> {
        let pages = self.reader.read_u64("the end record")?;
        let zero_pages = self.reader.read_u64("the end record")?;
        let checked = self.seq.end(pages, zero_pages);
        checked.map_err(|reason| self.invalid(reason))?;
        self.state = State::Ended;
        Ok(Decoded::End { pages, zero_pages })
    }

    /// Reads the next piece of a page run whose `left` (at least one) pages
    /// from `next` were already checked against the layout.
    fn read_data(&mut self, next: u64, left: u64) -> Result<Decoded> {
        let pages = left.min(DECODE_CHUNK_PAGES as u64);
        let len = pages as usize * PAGE_SIZE;
        self.reader.read_exact(&mut self.buf[..len], "page data")?;
        self.state = match left - pages {
            0 => State::Records,
            left => State::Data {
                next: next + pages,
                left,
            },
        };
        Ok(Decoded::Pages { start: next, len })
    }

    fn invalid(&self, reason: RecordError) -> WireError {
        WireError::Record {
            record: self.record,
            offset: self.record_offset,
            reason,
        }
    }
}

fn read_exact(
    input: &mut impl Read,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<()> {
    input.read_exact(buf).map_err(|source| match source.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Truncated { offset, what },
        _ => WireError::Io { offset, source },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RamLayout {
        RamLayout::split_for_tests(16, 1 << 20, 8)
    }

    fn encoded(records: &[Record<'_>]) -> Vec<u8> {
        let mut encoder = Encoder::new(Vec::new(), &layout()).unwrap();
        for record in records {
            encoder.write(*record).unwrap();
        }
        encoder.finish().unwrap()
    }

    /// Decodes the whole stream; returns the first error.
    fn decode(bytes: &[u8]) -> Result<Vec<String>> {
        let mut decoder = Decoder::new(bytes)?;
        let mut seen = Vec::new();
        while let Some(record) = decoder.next_record()? {
            seen.push(format!("{record:?}"));
        }
        Ok(seen)
    }

    fn record_error(bytes: &[u8]) -> (u64, u64, RecordError) {
        match decode(bytes) {
            Err(WireError::Record {
                record,
                offset,
                reason,
            }) => (record, offset, reason),
            other => panic!("expected a record error, got {other:?}"),
        }
    }

    const HEADER_LEN: u64 = 20 + 2 * 24;

    /// A stream that is valid up to `tail`, which replaces its end record.
    fn with_tail(tail: &[u8]) -> Vec<u8> {
        let mut encoder = Encoder::new(Vec::new(), &layout()).unwrap();
        encoder.pass(0, PassKind::Bulk).unwrap();
        let mut bytes = encoder.out;
        assert_eq!(bytes.len() as u64, HEADER_LEN + 6);
        bytes.extend_from_slice(tail);
        bytes
    }

    #[test]
    fn decodes_a_small_stream() {
        let page = [7u8; PAGE_SIZE];
        let bytes = encoded(&[
            Record::Pass {
                number: 0,
                kind: PassKind::Bulk,
            },
            Record::Pages {
                start: 3,
                data: &page,
            },
            Record::Zero {
                start: 16,
                count: 8,
            },
            Record::Pass {
                number: 5,
                kind: PassKind::Final,
            },
        ]);
        let mut decoder = Decoder::new(&bytes[..]).unwrap();
        assert_eq!(decoder.layout(), &layout());
        assert_eq!(
            decoder.next_record().unwrap(),
            Some(Record::Pass {
                number: 0,
                kind: PassKind::Bulk
            })
        );
        assert_eq!(
            decoder.next_record().unwrap(),
            Some(Record::Pages {
                start: 3,
                data: &page
            })
        );
        assert_eq!(
            decoder.next_record().unwrap(),
            Some(Record::Zero {
                start: 16,
                count: 8
            })
        );
        assert_eq!(
            decoder.next_record().unwrap(),
            Some(Record::Pass {
                number: 5,
                kind: PassKind::Final
            })
        );
        assert_eq!(
            decoder.next_record().unwrap(),
            Some(Record::End {
                pages: 1,
                zero_pages: 8
            })
        );
        assert_eq!(decoder.next_record().unwrap(), None);
        assert_eq!(decoder.bytes_read(), bytes.len() as u64);
    }

    #[test]
    fn long_runs_come_in_bounded_chunks() {
        let data = vec![1u8; 16 * PAGE_SIZE];
        let bytes = encoded(&[
            Record::Pass {
                number: 0,
                kind: PassKind::Bulk,
            },
            Record::Pages {
                start: 0,
                data: &data,
            },
            Record::Pass {
                number: 1,
                kind: PassKind::Final,
            },
        ]);
        let mut decoder = Decoder::new(&bytes[..]).unwrap();
        decoder.next_record().unwrap();
        let mut starts = Vec::new();
        while let Some(Record::Pages { start, data }) = decoder.next_record().unwrap() {
            assert!(data.len() <= DECODE_CHUNK_PAGES * PAGE_SIZE);
            starts.push((start, data.len() / PAGE_SIZE));
        }
        let expected: Vec<_> = (0..16)
            .step_by(DECODE_CHUNK_PAGES)
            .map(|s| (s as u64, DECODE_CHUNK_PAGES.min(16 - s)))
            .collect();
        assert_eq!(starts, expected);
    }

    #[test]
    fn header_errors_say_what_is_wrong() {
        let good = encoded(&[
            Record::Pass {
                number: 0,
                kind: PassKind::Bulk,
            },
            Record::Pass {
                number: 1,
                kind: PassKind::Final,
            },
        ]);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(WireError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[8] = 9;
        assert!(matches!(decode(&bad), Err(WireError::Version { found: 9 })));
        let mut bad = good.clone();
        bad[13] = 0x20;
        assert!(matches!(
            decode(&bad),
            Err(WireError::PageSize { found: 0x2000 })
        ));
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(WireError::Layout(LayoutError::TooManyRanges { .. }))
        ));
        assert!(matches!(
            Decoder::with_max_ram_bytes(&good[..], 4096),
            Err(WireError::Layout(LayoutError::TooLarge { .. }))
        ));
        assert!(matches!(
            decode(&good[..30]),
            Err(WireError::Truncated {
                offset: 28,
                what: "a range length"
            })
        ));
    }

    #[test]
    fn record_errors_name_record_and_offset() {
        let after_pass = HEADER_LEN + 6;
        assert_eq!(
            record_error(&with_tail(&[9])),
            (1, after_pass, RecordError::UnknownTag(9))
        );
        assert_eq!(
            record_error(&with_tail(&run_header(TAG_ZERO, 14, 4))),
            (
                1,
                after_pass,
                RecordError::Run(RunError::CrossesRange {
                    start: 14,
                    count: 4,
                    range_end: 16
                })
            )
        );
        assert_eq!(
            record_error(&with_tail(&run_header(TAG_PAGES, u64::MAX, 1))),
            (
                1,
                after_pass,
                RecordError::Run(RunError::OutOfBounds {
                    start: u64::MAX,
                    count: 1,
                    total: 24
                })
            )
        );
        assert_eq!(
            record_error(&with_tail(&run_header(TAG_END, 0, 0))),
            (1, after_pass, RecordError::EndWithoutFinal)
        );
        assert_eq!(
            record_error(&with_tail(&[TAG_PASS, 0, 0, 0, 0, 2])),
            (
                1,
                after_pass,
                RecordError::PassNotIncreasing { number: 0, last: 0 }
            )
        );
        assert_eq!(
            record_error(&with_tail(&[TAG_PASS, 1, 0, 0, 0, 9])),
            (1, after_pass, RecordError::UnknownPassKind(9))
        );
        let mut tail = vec![TAG_PASS, 1, 0, 0, 0, 3];
        tail.extend_from_slice(&run_header(TAG_END, 1, 0));
        assert_eq!(
            record_error(&with_tail(&tail)),
            (
                2,
                after_pass + 6,
                RecordError::CountMismatch {
                    what: "data pages",
                    announced: 1,
                    seen: 0
                }
            )
        );
    }

    #[test]
    fn the_balloon_target_rides_after_the_final_pass_once() {
        let mut encoder = Encoder::new(Vec::new(), &layout()).unwrap();
        encoder.pass(0, PassKind::Bulk).unwrap();
        assert!(encoder.balloon(7).is_err(), "before the final pass");
        let mut encoder = Encoder::new(Vec::new(), &layout()).unwrap();
        encoder.pass(0, PassKind::Bulk).unwrap();
        encoder.pass(1, PassKind::Final).unwrap();
        encoder.balloon(4096).unwrap();
        assert!(encoder.balloon(1).is_err(), "a second one");
        let bytes = encoder.finish().unwrap();
        let seen = decode(&bytes).unwrap();
        assert_eq!(seen[2], "Balloon { target_pages: 4096 }", "{seen:?}");

        let after_pass = HEADER_LEN + 6;
        assert_eq!(
            record_error(&with_tail(&[TAG_BALLOON, 1, 0, 0, 0])),
            (1, after_pass, RecordError::BalloonBeforeFinal)
        );
        let tail = [TAG_PASS, 1, 0, 0, 0, 3, TAG_BALLOON, 1, 0, 0, 0];
        let mut twice = tail.to_vec();
        twice.extend_from_slice(&[TAG_BALLOON, 2, 0, 0, 0]);
        assert_eq!(
            record_error(&with_tail(&twice)),
            (3, after_pass + 11, RecordError::SecondBalloon)
        );
        let mut cut = tail.to_vec();
        cut.truncate(tail.len() - 2);
        assert!(matches!(
            decode(&with_tail(&cut)),
            Err(WireError::Truncated {
                what: "a balloon target",
                ..
            })
        ));
    }

    #[test]
    fn a_huge_announced_run_reads_only_what_is_there() {
        let bytes = with_tail(&run_header(TAG_PAGES, 0, 16));
        assert!(matches!(
            decode(&bytes),
            Err(WireError::Truncated {
                what: "page data",
                ..
            })
        ));
    }

    #[test]
    fn decoder_stays_failed() {
        let bytes = with_tail(&[0]);
        let mut decoder = Decoder::new(&bytes[..]).unwrap();
        decoder.next_record().unwrap();
        assert!(matches!(
            decoder.next_record(),
            Err(WireError::Record {
                reason: RecordError::UnknownTag(0),
                ..
            })
        ));
        assert!(matches!(decoder.next_record(), Err(WireError::Failed)));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let mut encoder = Encoder::new(Vec::new(), &layout()).unwrap();
        assert!(matches!(
            encoder.zero(0, 1),
            Err(WireError::Record {
                reason: RecordError::DataBeforePass,
                ..
            })
        ));
        encoder.pass(0, PassKind::Bulk).unwrap();
        assert!(matches!(
            encoder.pages(0, &[0u8; 100]),
            Err(WireError::Record {
                reason: RecordError::DataLength(100),
                ..
            })
        ));
        assert!(matches!(
            encoder.pass(1, PassKind::Bulk),
            Err(WireError::Record {
                reason: RecordError::SecondBulk,
                ..
            })
        ));
        assert!(matches!(
            encoder.finish(),
            Err(WireError::Record {
                reason: RecordError::EndWithoutFinal,
                ..
            })
        ));
    }
}
