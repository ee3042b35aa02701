//! Helpers shared by the migration tests: a guest memory shaped like an x86
//! PC (RAM below a hole, then above it), page contents that say which
//! write made them, and page-by-page comparison.

#![allow(dead_code)]

use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::thread;

use freehint_migrate::{
    GuestMemorySink, PageSink, RamLayout, ReceiveError, ReceiveReport, Receiver, PAGE_SIZE,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MIB: usize = 1 << 20;

/// 3 MiB at 0, a 1 MiB hole, 2 MiB at 4 MiB: 1280 pages.
pub fn pc_ranges() -> [(GuestAddress, usize); 2] {
    [
        (GuestAddress(0), 3 * MIB),
        (GuestAddress(4 * MIB as u64), 2 * MIB),
    ]
}

pub fn pc_memory<B: Bitmap + vm_memory::bitmap::NewBitmap>() -> GuestMemoryMmap<B> {
    GuestMemoryMmap::from_ranges(&pc_ranges()).unwrap()
}

/// The contents of `page` after write number `generation`: a stamp in
/// the first 16 bytes, a pattern after it.
pub fn contents(page: u64, generation: u64) -> Vec<u8> {
    let mut bytes = vec![(page as u8) ^ (generation as u8) ^ 0x5a; PAGE_SIZE];
    bytes[..8].copy_from_slice(&page.to_le_bytes());
    bytes[8..16].copy_from_slice(&generation.to_le_bytes());
    bytes
}

/// Writes `bytes` into `page` of `mem`.
pub fn write_page<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    layout: &RamLayout,
    page: u64,
    bytes: &[u8],
) {
    let at = layout.place(page).unwrap();
    mem.write_slice(bytes, at.gpa).unwrap();
}

pub fn read_page<B: Bitmap>(mem: &GuestMemoryMmap<B>, layout: &RamLayout, page: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; PAGE_SIZE];
    mem.read_slice(&mut bytes, layout.place(page).unwrap().gpa)
        .unwrap();
    bytes
}

/// Pages whose contents differ between `a` and `b`, among `pages`.
pub fn differing<A: Bitmap, B: Bitmap>(
    a: &GuestMemoryMmap<A>,
    b: &GuestMemoryMmap<B>,
    layout: &RamLayout,
    pages: impl IntoIterator<Item = u64>,
) -> Vec<u64> {
    pages
        .into_iter()
        .filter(|&page| read_page(a, layout, page) != read_page(b, layout, page))
        .collect()
}

/// A connected sender stream and a receiver running on its own thread of
/// `scope`, storing into the sink `make_sink` builds for the layout.
pub fn spawn_receiver<'s, S, F>(
    scope: &'s thread::Scope<'s, '_>,
    make_sink: F,
) -> (
    BufWriter<UnixStream>,
    thread::ScopedJoinHandle<'s, Result<ReceiveReport, ReceiveError>>,
)
where
    S: PageSink,
    F: FnOnce(&RamLayout) -> Result<S, ReceiveError> + Send + 's,
{
    let (tx, rx) = UnixStream::pair().unwrap();
    let handle = scope.spawn(move || {
        let receiver = Receiver::new(BufReader::new(rx))?;
        let mut sink = make_sink(receiver.layout())?;
        receiver.receive(&mut sink)
    });
    (BufWriter::new(tx), handle)
}

/// A sink that writes into `mem` by guest address.
pub fn into_memory<'m, B: Bitmap>(
    mem: &'m GuestMemoryMmap<B>,
) -> impl FnOnce(&RamLayout) -> Result<GuestMemorySink<'m, GuestMemoryMmap<B>>, ReceiveError> + Send + 'm
where
    GuestMemoryMmap<B>: Sync,
{
    move |layout| GuestMemorySink::new(mem, layout)
}
