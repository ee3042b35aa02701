// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The inflate and deflate queues: arrays of le32 pfns (4 KiB pages).
//!
//! Each descriptor is judged on its own (a bad one is skipped, the rest of
//! the chain is still used), so each is read whole with one `read_slice`
//! rather than through the chain's `Reader`.

use freehint_protocol::layout::{PAGE_SHIFT, PAGE_SIZE};
use log::warn;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::super::chain::Desc;
use super::super::metrics::BalloonMetrics;
use super::super::state::{DeviceState, Shared};
use super::super::MAX_PFNS_PER_DESCRIPTOR;
use super::Chain;

/// inflateq: the guest gives these pages to the host; they are discarded
/// (runs of consecutive pfns in one call each). Returns the used length (0).
pub(in super::super) fn inflate(shared: &Shared, st: &mut DeviceState, chain: &Chain<'_>) -> u32 {
    let pages = take_pfns(shared, st, chain, true);
    BalloonMetrics::add(&shared.metrics.inflate_pages, pages);
    0
}

/// deflateq: the guest takes these pages back (nothing to do on the host
/// but count). Returns the used length (0).
pub(in super::super) fn deflate(shared: &Shared, st: &mut DeviceState, chain: &Chain<'_>) -> u32 {
    let pages = take_pfns(shared, st, chain, false);
    BalloonMetrics::add(&shared.metrics.deflate_pages, pages);
    0
}

/// Reads every good pfn descriptor of `chain`, discarding its pages if
/// `discard`. Returns the valid pfns seen.
fn take_pfns(shared: &Shared, st: &mut DeviceState, chain: &Chain<'_>, discard: bool) -> u64 {
    let queue = if discard { "inflateq" } else { "deflateq" };
    let mut buf = std::mem::take(&mut st.scratch.pfns);
    let mut pages = 0;
    for d in chain.descs {
        if !pfn_descriptor_ok(d) {
            BalloonMetrics::inc(&shared.metrics.bad_pfn_descriptor);
            warn!(
                "{queue}: bad pfn descriptor (len {}, write-only {}); skipped",
                d.len, d.write
            );
            continue;
        }
        buf.resize(d.len as usize, 0);
        if chain
            .mem
            .read_slice(&mut buf, GuestAddress(d.addr))
            .is_err()
        {
            BalloonMetrics::inc(&shared.metrics.descriptor_out_of_memory);
            continue;
        }
        pages += discard_pfns(shared, st, chain, &buf, discard);
    }
    st.scratch.pfns = buf;
    pages
}

/// A pfn descriptor is read-only, whole le32s, and not too long.
fn pfn_descriptor_ok(d: &Desc) -> bool {
    !d.write && d.len % 4 == 0 && d.len as usize / 4 <= MAX_PFNS_PER_DESCRIPTOR
}

/// Goes through the le32 pfns in `bytes`, skipping (and counting) those
/// outside guest memory, and discards runs of consecutive ones if
/// `discard`. Returns the valid pfns.
fn discard_pfns(
    shared: &Shared,
    st: &DeviceState,
    chain: &Chain<'_>,
    bytes: &[u8],
    discard: bool,
) -> u64 {
    let mut run: Option<(u64, u64)> = None;
    let mut pages = 0;
    for p in bytes.chunks_exact(4) {
        let pfn = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
        if !chain
            .mem
            .check_range(GuestAddress(pfn << PAGE_SHIFT), PAGE_SIZE as usize)
        {
            BalloonMetrics::inc(&shared.metrics.pfn_out_of_range);
            continue;
        }
        pages += 1;
        if !discard {
            continue;
        }
        run = match run {
            Some((start, n)) if start + n == pfn => Some((start, n + 1)),
            Some((start, n)) => {
                discard_pages(shared, st, chain, start, n);
                Some((pfn, 1))
            }
            None => Some((pfn, 1)),
        };
    }
    if let Some((start, n)) = run {
        discard_pages(shared, st, chain, start, n);
    }
    pages
}

/// Gives `pages` pages from `pfn` back to the host (inflate, free page
/// reporting) and marks them in the device's dirty log: they read as zero
/// from now on (or partly, if the discard fails half-way), so the migrator
/// must send them again.
pub(in super::super) fn discard_pages(
    shared: &Shared,
    st: &DeviceState,
    chain: &Chain<'_>,
    pfn: u64,
    pages: u64,
) {
    let len = pages << PAGE_SHIFT;
    shared.marker().mark(pfn << PAGE_SHIFT, len);
    match st
        .discard
        .discard(chain.mem, GuestAddress(pfn << PAGE_SHIFT), len)
    {
        Ok(()) => BalloonMetrics::add(&shared.metrics.discard_bytes, len),
        Err(e) => {
            BalloonMetrics::inc(&shared.metrics.discard_fail);
            warn!("discard failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{buffer, fixture, PAGES};
    use super::*;

    fn pfns(list: &[u32]) -> Vec<u8> {
        list.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    #[test]
    fn inflate_discards_runs_and_skips_pfns_outside_ram() {
        let (shared, mem, discard) = fixture(0);
        let outside = PAGES as u32 + 5;
        let d = buffer(
            &mem,
            0x1000,
            &pfns(&[10, 11, 12, 20, outside, 21, 40]),
            false,
        );
        let descs = [d];
        let chain = Chain {
            head: 0,
            descs: &descs,
            mem: &mem,
        };
        assert_eq!(inflate(&shared, &mut shared.lock(), &chain), 0);
        assert_eq!(discard.pfn_runs(), [(10, 3), (20, 2), (40, 1)]);
        let m = shared.metrics.snapshot();
        assert_eq!((m.inflate_pages, m.pfn_out_of_range), (6, 1));
        assert_eq!(m.discard_bytes, 6 * PAGE_SIZE);
        // Discarded pages read as zero from now on: the migrator must
        // resend them.
        let dirty = shared.dirty.take();
        assert_eq!(dirty[0] >> 10 & 0b111, 0b111);
        assert_eq!(dirty[0] >> 40 & 1, 1);
    }

    #[test]
    fn deflate_counts_and_discards_nothing() {
        let (shared, mem, discard) = fixture(0);
        let descs = [buffer(&mem, 0x1000, &pfns(&[1, 2, 3]), false)];
        let chain = Chain {
            head: 0,
            descs: &descs,
            mem: &mem,
        };
        deflate(&shared, &mut shared.lock(), &chain);
        assert!(discard.pfn_runs().is_empty());
        assert_eq!(shared.metrics.snapshot().deflate_pages, 3);
    }

    #[test]
    fn bad_descriptors_are_skipped_and_the_rest_is_used() {
        let (shared, mem, discard) = fixture(0);
        let too_long = vec![0u8; (MAX_PFNS_PER_DESCRIPTOR + 1) * 4];
        let descs = [
            buffer(&mem, 0x1000, &pfns(&[1]), true), // write-only
            buffer(&mem, 0x2000, &[1, 0, 0], false), // not whole le32s
            buffer(&mem, 0x4000, &too_long, false),
            buffer(&mem, 0x3000, &pfns(&[7]), false),
        ];
        let chain = Chain {
            head: 0,
            descs: &descs,
            mem: &mem,
        };
        inflate(&shared, &mut shared.lock(), &chain);
        assert_eq!(discard.pfn_runs(), [(7, 1)]);
        let m = shared.metrics.snapshot();
        assert_eq!((m.bad_pfn_descriptor, m.inflate_pages), (3, 1));
    }
}
