//! The destination side: reads a stream and stores the pages in a
//! [`PageSink`] (the destination's RAM file, a vm-memory guest memory, or a
//! byte buffer).

use std::io::{self, Read};

use serde::Serialize;
use vm_memory::{Bytes, GuestMemory, GuestMemoryError, Permissions};

use crate::layout::{PagePlace, RamLayout, RunError};
use crate::wire::{Decoder, Record, WireError};
use crate::PAGE_SIZE;

/// Where received pages go. Runs never cross a RAM range, so a run is
/// contiguous both in guest-physical space and in the RAM file.
pub trait PageSink {
    /// Stores `data` (whole pages) from `at` on.
    fn write_pages(&mut self, at: PagePlace, data: &[u8]) -> io::Result<()>;
    /// Makes `count` pages from `at` on read as zero.
    fn zero_pages(&mut self, at: PagePlace, count: u64) -> io::Result<()>;
}

/// What a receive did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReceiveReport {
    /// Pages received with their contents.
    pub pages_written: u64,
    /// Pages received as zero runs.
    pub zero_pages: u64,
    /// Pass markers seen.
    pub passes: u32,
    /// Bytes read from the stream.
    pub bytes: u64,
    /// The balloon target the source carried (4 KiB pages), if it did.
    pub balloon_target_pages: Option<u32>,
}

/// Why a receive failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream is invalid or broken.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A run the layout cannot place (a sink built for another layout).
    #[error("the sink cannot place a run")]
    Run(#[from] RunError),
    /// Storing pages failed.
    #[error("storing {count} pages at page {page} (guest address {gpa:#x}, file offset {file_offset:#x}) failed")]
    Sink {
        /// First page of the run.
        page: u64,
        /// Pages in the run.
        count: u64,
        /// Its guest-physical address.
        gpa: u64,
        /// Its RAM file offset.
        file_offset: u64,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A guest memory that does not hold a RAM range of the layout.
    #[error("guest memory has no writable RAM for range {index} of the layout ({pages} pages at {gpa:#x})")]
    NotInGuestMemory {
        /// Range index.
        index: usize,
        /// Its guest-physical address.
        gpa: u64,
        /// Its length in pages.
        pages: u64,
    },
    /// The RAM file could not be set up.
    #[error("RAM file {path}: {what}")]
    RamFile {
        /// The file.
        path: std::path::PathBuf,
        /// What was being done.
        what: &'static str,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// An existing RAM file too small for the layout.
    #[error("RAM file {path} is {size} bytes, the layout needs {needed}")]
    RamFileTooSmall {
        /// The file.
        path: std::path::PathBuf,
        /// Its size.
        size: u64,
        /// What the layout needs.
        needed: u64,
    },
}

/// Reads one migration stream from an untrusted sender.
///
/// Two steps, so the caller can set up the sink for the announced layout:
/// [`Receiver::new`] reads the header, [`Receiver::receive`] the records.
#[derive(Debug)]
pub struct Receiver<R: Read> {
    decoder: Decoder<R>,
}

impl<R: Read> Receiver<R> {
    /// Reads the header (default RAM cap).
    pub fn new(input: R) -> Result<Self, ReceiveError> {
        Ok(Self {
            decoder: Decoder::new(input)?,
        })
    }

    /// Reads the header, refusing more than `max_ram_bytes` of RAM.
    pub fn with_max_ram_bytes(input: R, max_ram_bytes: u64) -> Result<Self, ReceiveError> {
        Ok(Self {
            decoder: Decoder::with_max_ram_bytes(input, max_ram_bytes)?,
        })
    }

    /// The layout the sender announced.
    pub fn layout(&self) -> &RamLayout {
        self.decoder.layout()
    }

    /// Reads every record into `sink`, up to and including the end record.
    pub fn receive<S: PageSink + ?Sized>(
        mut self,
        sink: &mut S,
    ) -> Result<ReceiveReport, ReceiveError> {
        let mut report = ReceiveReport::default();
        let layout = self.decoder.layout().clone();
        while let Some(record) = self.decoder.next_record()? {
            match record {
                Record::Pass { .. } => report.passes += 1,
                Record::Pages { start, data } => {
                    let count = (data.len() / PAGE_SIZE) as u64;
                    let at = layout.check_run(start, count)?;
                    sink.write_pages(at, data)
                        .map_err(|e| sink_error(at, count, e))?;
                    report.pages_written += count;
                }
                Record::Zero { start, count } => {
                    let at = layout.check_run(start, count)?;
                    sink.zero_pages(at, count)
                        .map_err(|e| sink_error(at, count, e))?;
                    report.zero_pages += count;
                }
                Record::Balloon { target_pages } => {
                    report.balloon_target_pages = Some(target_pages)
                }
                Record::End { .. } => {}
            }
        }
        report.bytes = self.decoder.bytes_read();
        log::debug!("received {report:?}");
        Ok(report)
    }
}

fn sink_error(at: PagePlace, count: u64, source: io::Error) -> ReceiveError {
    let (page, gpa, file_offset) = (at.page, at.gpa.0, at.file_offset);
    ReceiveError::Sink {
        page,
        count,
        gpa,
        file_offset,
        source,
    }
}

/// Stores pages in a vm-memory guest memory, by guest-physical address.
/// Zero runs are written as zeros.
#[derive(Debug)]
pub struct GuestMemorySink<'m, M: ?Sized> {
    mem: &'m M,
}

impl<'m, M: GuestMemory + ?Sized> GuestMemorySink<'m, M> {
    /// A sink for `mem`, which must hold every range of `layout`.
    pub fn new(mem: &'m M, layout: &RamLayout) -> Result<Self, ReceiveError> {
        for (index, range) in layout.ranges().iter().enumerate() {
            let fits = usize::try_from(range.pages * PAGE_SIZE as u64)
                .is_ok_and(|len| mem.check_range(range.gpa, len, Permissions::Write));
            if !fits {
                return Err(ReceiveError::NotInGuestMemory {
                    index,
                    gpa: range.gpa.0,
                    pages: range.pages,
                });
            }
        }
        Ok(Self { mem })
    }
}

impl<M: GuestMemory + ?Sized> PageSink for GuestMemorySink<'_, M> {
    fn write_pages(&mut self, at: PagePlace, data: &[u8]) -> io::Result<()> {
        self.mem.write_slice(data, at.gpa).map_err(memory_error)
    }

    fn zero_pages(&mut self, at: PagePlace, count: u64) -> io::Result<()> {
        let zero = [0u8; PAGE_SIZE];
        for page in 0..count {
            let gpa = at
                .gpa
                .0
                .checked_add(page * PAGE_SIZE as u64)
                .ok_or_else(|| io::Error::other("address overflow"))?;
            self.mem
                .write_slice(&zero, vm_memory::GuestAddress(gpa))
                .map_err(memory_error)?;
        }
        Ok(())
    }
}

fn memory_error(err: GuestMemoryError) -> io::Error {
    io::Error::other(err)
}

/// A byte buffer laid out like the RAM file (page at its file offset).
impl PageSink for [u8] {
    fn write_pages(&mut self, at: PagePlace, data: &[u8]) -> io::Result<()> {
        buffer_range(self, at.file_offset, data.len() as u64)?.copy_from_slice(data);
        Ok(())
    }

    fn zero_pages(&mut self, at: PagePlace, count: u64) -> io::Result<()> {
        let len = count
            .checked_mul(PAGE_SIZE as u64)
            .ok_or_else(|| io::Error::other("run too long"))?;
        buffer_range(self, at.file_offset, len)?.fill(0);
        Ok(())
    }
}

fn buffer_range(buf: &mut [u8], offset: u64, len: u64) -> io::Result<&mut [u8]> {
    let range = usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(usize::try_from(len).ok()?)?));
    range.and_then(|range| buf.get_mut(range)).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "run beyond the end of the buffer",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Encoder, PassKind};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn layout() -> RamLayout {
        RamLayout::split_for_tests(4, 0x10000, 2)
    }

    /// Bulk: pages 0 and 5 with data, 1..3 zero; final: page 0 again.
    fn stream() -> Vec<u8> {
        let mut encoder = Encoder::new(Vec::new(), &layout()).unwrap();
        encoder.pass(0, PassKind::Bulk).unwrap();
        encoder.pages(0, &[1u8; PAGE_SIZE]).unwrap();
        encoder.zero(1, 3).unwrap();
        encoder.pages(5, &[5u8; PAGE_SIZE]).unwrap();
        encoder.pass(1, PassKind::Final).unwrap();
        encoder.pages(0, &[9u8; PAGE_SIZE]).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn receives_into_a_buffer() {
        let bytes = stream();
        let receiver = Receiver::new(&bytes[..]).unwrap();
        let mut ram = vec![0xeeu8; receiver.layout().file_size() as usize];
        let report = receiver.receive(&mut ram[..]).unwrap();
        assert_eq!(
            report,
            ReceiveReport {
                pages_written: 3,
                zero_pages: 3,
                passes: 2,
                bytes: bytes.len() as u64,
                balloon_target_pages: None,
            }
        );
        let page = |i: usize| &ram[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        assert!(page(0).iter().all(|&b| b == 9));
        assert!((1..4).all(|i| page(i).iter().all(|&b| b == 0)));
        assert!(page(4).iter().all(|&b| b == 0xee), "never sent, left alone");
        assert!(page(5).iter().all(|&b| b == 5));
    }

    #[test]
    fn receives_into_guest_memory_by_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10000), 0x2000),
        ])
        .unwrap();
        let bytes = stream();
        let receiver = Receiver::new(&bytes[..]).unwrap();
        let mut sink = GuestMemorySink::new(&mem, receiver.layout()).unwrap();
        receiver.receive(&mut sink).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 9);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11000)).unwrap(), 5);
    }

    #[test]
    fn refuses_guest_memory_without_the_layout() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let err = GuestMemorySink::new(&mem, &layout()).unwrap_err();
        assert!(
            matches!(
                err,
                ReceiveError::NotInGuestMemory {
                    index: 1,
                    gpa: 0x10000,
                    pages: 2
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_short_buffer_is_an_error_not_a_panic() {
        let bytes = stream();
        let mut ram = vec![0u8; 4096];
        let err = Receiver::new(&bytes[..])
            .unwrap()
            .receive(&mut ram[..])
            .unwrap_err();
        assert!(
            matches!(
                err,
                ReceiveError::Sink {
                    page: 1,
                    count: 3,
                    ..
                }
            ),
            "{err}"
        );
    }
}
