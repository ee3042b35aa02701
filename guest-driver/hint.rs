// SPDX-License-Identifier: GPL-2.0

//! Free page hint rounds without allocating: the standard protocol (virtio
//! 1.2 §5.5.6.8, [`run_round`]) and the freehint bitmap protocol
//! (docs/protocol.md, [`run_bitmap_round`]).
//!
//! Linux's `virtio_balloon` answers a hint request by *allocating* order-10
//! blocks and reporting them; with `init_on_alloc=1` that zeroes, and so
//! dirties, all free memory right after the host started dirty logging. This
//! driver instead walks the buddy free lists (through `zone.rs`, the same
//! safe zone API as the bitmap builder) and describes the free blocks it
//! finds, touching no page.
//!
//! One standard round, for command id `id`:
//! 1. wait until the device holds none of our buffers, then send `id` as a
//!    4-byte outbuf;
//! 2. build the free-page bitmap with the bitmap builder (`builder.rs`,
//!    `walk.rs`: every buddy free list and every per-CPU list, in bounded
//!    lock holds), over the kernel's own RAM layout;
//! 3. send each run of free pages as one inbuf (addr = pfn << 12, len =
//!    pages << 12, at most [`MAX_RUN_PAGES`] per descriptor), in address
//!    order, kicking and waiting for used buffers whenever the ring is full
//!    (one slot stays free for STOP); runs are maximal (an idle 4 GiB guest
//!    has ~1000 order-10 blocks, mostly adjacent), and each descriptor costs
//!    the device a map;
//! 4. send STOP (a 4-byte outbuf holding 0) and wait for the device to
//!    return everything.
//!
//! The round ends early when the device changes the command id (a new id,
//! STOP or DONE in config space), when the driver is being removed, or when
//! the device stops returning buffers.
//!
//! # Why pages sent after the walk are still correct hints
//!
//! A page is marked while it is on a free list under that list's lock; by
//! the time the device sees it, it may have been allocated again. A hint is
//! a statement about the past: the host requests hints only after it started
//! dirty logging, so a page reused after it was reported is written, hence
//! dirty, hence sent again (design.md, "Correctness invariant"). QEMU also
//! drops hints once the round's status left START, and the device side of
//! this project drops hints carrying a stale id.
//!
//! The walk's bounded lock holds are described in `walk.rs`; sleeping on the
//! virtqueue always happens after the walk, with no lock held.

use kernel::prelude::*;

use crate::bitmap_hint::{LAYOUT_REPLY_MAX, MSG_HEADER_SIZE};
use crate::builder::Builder;
use crate::layout::Pfn;
use crate::virtio::{Chain, DmaBuf, Queue, VqHandle};
use crate::zone;

/// One wait for used buffers (ms); the stop conditions are checked between.
/// Short, because a used-buffer interrupt can be missed (seen with QEMU's
/// free page vq, which the device polls from an iothread): the wait then
/// ends by timeout and the buffers are found by polling.
const WAIT_MS: u32 = 4;
/// Waits without any buffer coming back before the round gives up (~5 s).
const MAX_IDLE_WAITS: u32 = 1250;
/// Largest range sent as one descriptor (pages): 1 GiB, well below the
/// 4 GiB descriptor length limit.
const MAX_RUN_PAGES: u64 = 1 << 18;

/// Payload bytes per bitmap chunk: 64 KiB = 2^19 bits = 2 GiB of RAM.
const CHUNK_BYTES: usize = 64 * 1024;

/// The memory the free page queue lends to the device.
pub(crate) struct HintBufs {
    /// The command id of a round (le32), rewritten for each round.
    cmd: DmaBuf,
    /// STOP: le32 0, never written.
    stop: DmaBuf,
    /// Bitmap protocol buffers (only with FREE_PAGE_BITMAP).
    bm: Option<BitmapBufs>,
}

/// Buffers of the bitmap hint protocol.
struct BitmapBufs {
    /// A message header.
    msg: DmaBuf,
    /// The layout reply (device-writable).
    reply: DmaBuf,
    /// Chunk payload, [`CHUNK_BYTES`].
    chunk: DmaBuf,
}

/// The free page virtqueue with its buffers. Every buffer is rewritten only
/// while the device holds none of them (`Queue::bufs_mut`).
pub(crate) struct HintQueue {
    q: Queue<HintBufs>,
    /// Used length of the last layout reply.
    reply_len: usize,
}

impl HintQueue {
    /// Wraps the free page queue (its ring must hold at least 2 buffers),
    /// with the bitmap protocol's buffers if `bitmap`.
    pub(crate) fn new(vq: VqHandle, bitmap: bool) -> Result<Self> {
        let bm = if bitmap {
            Some(BitmapBufs {
                msg: DmaBuf::new(MSG_HEADER_SIZE)?,
                reply: DmaBuf::new(LAYOUT_REPLY_MAX)?,
                chunk: DmaBuf::new(CHUNK_BYTES)?,
            })
        } else {
            None
        };
        let bufs = HintBufs {
            cmd: DmaBuf::new(4)?,
            stop: DmaBuf::new(4)?,
            bm,
        };
        let q = Queue::new(vq, bufs);
        if q.ring_size() < 2 {
            return Err(ENOSPC);
        }
        Ok(Self { q, reply_len: 0 })
    }

    /// Ring size.
    pub(crate) fn ring_size(&self) -> u32 {
        self.q.ring_size()
    }

    /// Buffers the device holds.
    fn in_flight(&self) -> u32 {
        self.q.in_flight()
    }

    /// Free descriptors.
    fn free_slots(&self) -> u32 {
        self.q.free_slots()
    }

    /// Takes back every used buffer; returns how many.
    fn reclaim(&mut self) -> u32 {
        self.q.reclaim()
    }

    /// Waits at most `ms` for the device to return at least one buffer,
    /// then takes back every used one. Returns how many came back.
    fn wait_used(&mut self, ms: u32) -> u32 {
        self.q.wait_used(ms)
    }

    /// Notifies the device.
    fn kick(&mut self) {
        self.q.kick();
    }

    /// Sends `id` (le32 outbuf): the start of a hint round. Only while the
    /// device holds no buffer (`EBUSY` otherwise).
    fn send_cmd_id(&mut self, id: u32) -> Result {
        self.q
            .bufs_mut()?
            .cmd
            .bytes_mut()
            .copy_from_slice(&id.to_le_bytes());
        self.q.add(|b| Chain::read(&b.cmd, 4))?;
        self.q.kick();
        Ok(())
    }

    /// Sends STOP (le32 0 outbuf): the end of a hint round.
    fn send_stop(&mut self) -> Result {
        self.q.add(|b| Chain::read(&b.stop, 4))?;
        self.q.kick();
        Ok(())
    }

    /// Adds the free range `[pfn, pfn + pages)` as one device-writable
    /// buffer (addr = pfn << 12, len = pages << 12, at most `u32::MAX`
    /// bytes). Not kicked.
    fn add_range(&mut self, pfn: Pfn, pages: u64) -> Result {
        self.q.add(|_| Chain::free_range(pfn, pages))
    }

    /// Waits at most `ms` for the one buffer chain the device holds (bitmap
    /// messages are sent one at a time) and records its used length.
    /// Returns whether the queue is idle now.
    fn wait_idle_once(&mut self, ms: u32) -> bool {
        if let Some(len) = self.q.wait_one(ms) {
            self.reply_len = len as usize;
        }
        self.q.in_flight() == 0
    }

    /// The bitmap buffers, for writing: only while the device holds none.
    fn bm_idle(&mut self) -> Result<&mut BitmapBufs> {
        self.q.bufs_mut()?.bm.as_mut().ok_or(EINVAL)
    }

    /// Sends a LAYOUT_QUERY header with a writable reply buffer in one chain.
    fn send_layout_query(&mut self, hdr: &[u8]) -> Result {
        let bm = self.bm_idle()?;
        let n = hdr.len().min(bm.msg.bytes().len());
        bm.msg.bytes_mut()[..n].copy_from_slice(&hdr[..n]);
        bm.reply.bytes_mut().fill(0);
        self.reply_len = 0;
        self.q.add(|b| match &b.bm {
            Some(bm) => Chain::read(&bm.msg, n).then_write(&bm.reply),
            None => Chain::empty(),
        })?;
        self.q.kick();
        Ok(())
    }

    /// The layout reply of the last query, once the device returned it
    /// (empty while it still holds the buffers).
    fn layout_reply(&self) -> &[u8] {
        match self.q.bufs().and_then(|b| b.bm.as_ref()) {
            Some(bm) => &bm.reply.bytes()[..self.reply_len.min(LAYOUT_REPLY_MAX)],
            None => &[],
        }
    }

    /// Sends a message header alone (ROUND_END) or followed by `payload`
    /// (CHUNK, at most [`CHUNK_BYTES`]) in one device-readable chain.
    fn send_message(&mut self, hdr: &[u8], payload: &[u8]) -> Result {
        if payload.len() > CHUNK_BYTES {
            return Err(EINVAL);
        }
        let bm = self.bm_idle()?;
        let n = hdr.len().min(bm.msg.bytes().len());
        bm.msg.bytes_mut()[..n].copy_from_slice(&hdr[..n]);
        bm.chunk.bytes_mut()[..payload.len()].copy_from_slice(payload);
        let len = payload.len();
        self.q.add(|b| match &b.bm {
            Some(bm) if len == 0 => Chain::read(&bm.msg, n),
            Some(bm) => Chain::read(&bm.msg, n).then_read(&bm.chunk, len),
            None => Chain::empty(),
        })?;
        self.q.kick();
        Ok(())
    }
}

/// Why a round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Every free list was walked.
    Complete,
    /// The device asked for a new round (another command id).
    NewId(u32),
    /// The device wrote STOP.
    Stop,
    /// The device wrote DONE.
    Done,
    /// The driver is being removed.
    Removing,
    /// The device stopped returning buffers.
    Timeout,
    /// The device still held buffers of an earlier round.
    Busy,
    /// The virtqueue refused a buffer (errno).
    Error(i32),
}

impl End {
    /// Short name for logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::NewId(_) => "new-id",
            End::Stop => "stop",
            End::Done => "done",
            End::Removing => "removing",
            End::Timeout => "timeout",
            End::Busy => "busy",
            End::Error(_) => "error",
        }
    }
}

/// Figures of one round.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoundStats {
    /// The command id of the round.
    pub(crate) cmd_id: u32,
    /// Free blocks found on the free lists (buddy and per-CPU).
    pub(crate) blocks: u64,
    /// Descriptors sent (one per run of free pages).
    pub(crate) descs: u64,
    /// Pages sent.
    pub(crate) pages: u64,
    /// `zone->lock` and `pcp->lock` acquisitions.
    pub(crate) lock_holds: u64,
    /// Longest single `zone->lock` hold (ns).
    pub(crate) max_hold_ns: u64,
    /// Times the ring was full and the driver waited for used buffers.
    pub(crate) ring_full_waits: u64,
    /// Buffers the device returned during the round (including id and STOP).
    pub(crate) returned: u64,
    /// Bitmap build (the free-list walk) time (ns).
    pub(crate) build_ns: u64,
    /// Time from the start of the round to STOP sent (ns).
    pub(crate) walk_ns: u64,
    /// Round time, id sent to everything returned (ns).
    pub(crate) round_ns: u64,
    /// Why it ended.
    pub(crate) end: End,
}

/// What the round asks its owner while it runs.
pub(crate) trait Control {
    /// `Some(reason)` if the round must end now (new command id, STOP,
    /// DONE, removal).
    fn should_stop(&self) -> Option<End>;
}

struct Round<'a, C: Control> {
    q: &'a mut HintQueue,
    ctl: &'a C,
    st: RoundStats,
}

impl<C: Control> Round<'_, C> {
    /// Adds one range, waiting for room in the ring (one slot is kept for
    /// STOP).
    fn send_range(&mut self, pfn: Pfn, pages: u64) -> core::result::Result<(), End> {
        let mut idle_waits = 0;
        while self.q.free_slots() <= 1 {
            self.q.kick();
            if let Some(e) = self.ctl.should_stop() {
                return Err(e);
            }
            self.st.ring_full_waits += 1;
            let n = self.q.wait_used(WAIT_MS);
            self.st.returned += u64::from(n);
            if n == 0 {
                idle_waits += 1;
                if idle_waits >= MAX_IDLE_WAITS {
                    return Err(End::Timeout);
                }
            }
        }
        self.q
            .add_range(pfn, pages)
            .map_err(|e| End::Error(e.to_errno()))?;
        self.st.descs += 1;
        self.st.pages += pages;
        Ok(())
    }

    /// Sends every run of free pages of the builder's last build, in
    /// address order, split at [`MAX_RUN_PAGES`].
    fn send_runs(&mut self, builder: &Builder) -> core::result::Result<(), End> {
        let mut res = Ok(());
        builder.for_each_free_run(|mut pfn, mut pages| {
            while pages > 0 && res.is_ok() {
                let n = pages.min(MAX_RUN_PAGES);
                res = self.send_range(pfn, n);
                pfn = pfn.unchecked_add(n);
                pages -= n;
                // Every 64 descriptors: let the device start, and look for
                // a STOP or a new command id.
                if res.is_ok() && self.st.descs % 64 == 0 {
                    self.q.kick();
                    if let Some(e) = self.ctl.should_stop() {
                        res = Err(e);
                    }
                }
            }
            res.is_ok()
        });
        self.q.kick();
        res
    }

    /// Waits until the device returned every buffer (bounded; removal
    /// cuts it short).
    fn drain(&mut self) -> core::result::Result<(), End> {
        let mut idle_waits = 0;
        while self.q.in_flight() > 0 {
            let n = self.q.wait_used(WAIT_MS);
            self.st.returned += u64::from(n);
            if n == 0 {
                if self.ctl.should_stop() == Some(End::Removing) {
                    return Err(End::Removing);
                }
                idle_waits += 1;
                if idle_waits >= MAX_IDLE_WAITS {
                    return Err(End::Timeout);
                }
            }
        }
        Ok(())
    }
}

/// Builds the free-page bitmap; returns how long that took (ns).
fn timed_build(builder: &mut Builder) -> u64 {
    let t0 = zone::now_ns();
    builder.build();
    zone::now_ns().saturating_sub(t0)
}

/// Runs one hint round for `cmd_id`, walking the free lists with `builder`
/// (which must hold the kernel's own RAM layout).
pub(crate) fn run_round(
    q: &mut HintQueue,
    builder: &mut Builder,
    cmd_id: u32,
    ctl: &impl Control,
) -> RoundStats {
    let t0 = zone::now_ns();
    let mut r = Round {
        q,
        ctl,
        st: RoundStats {
            cmd_id,
            blocks: 0,
            descs: 0,
            pages: 0,
            lock_holds: 0,
            max_hold_ns: 0,
            ring_full_waits: 0,
            returned: 0,
            build_ns: 0,
            walk_ns: 0,
            round_ns: 0,
            end: End::Complete,
        },
    };
    // An earlier round that timed out may have left buffers with the device:
    // the id buffer is rewritten only once they are back.
    if let Err(e) = r.drain() {
        r.st.end = if e == End::Timeout { End::Busy } else { e };
        return r.st;
    }
    if let Err(e) = r.q.send_cmd_id(cmd_id) {
        r.st.end = if e == EBUSY {
            End::Busy
        } else {
            End::Error(e.to_errno())
        };
        return r.st;
    }
    r.st.build_ns = timed_build(builder);
    let w = builder.last_stats();
    r.st.blocks = w.blocks;
    r.st.lock_holds = w.lock_acquisitions + w.pcp_holds;
    r.st.max_hold_ns = w.max_lock_hold_ns;
    let end = match r.ctl.should_stop() {
        Some(e) => e,
        None => r.send_runs(builder).err().unwrap_or(End::Complete),
    };
    // Always end with STOP (QEMU ignores a STOP that does not match a
    // started round); a slot for it was kept free.
    r.q.reclaim();
    if let Err(e) = r.q.send_stop() {
        pr_warn!("hint round {:#x}: STOP not sent ({:?})\n", cmd_id, e);
    }
    r.st.walk_ns = zone::now_ns().saturating_sub(t0);
    let drained = r.drain();
    r.st.end = match (end, drained) {
        (End::Complete, Err(e)) => e,
        (end, _) => end,
    };
    r.st.round_ns = zone::now_ns().saturating_sub(t0);
    r.st
}

/// Figures of one bitmap round (`VIRTIO_BALLOON_F_FREE_PAGE_BITMAP`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BitmapStats {
    /// The command id of the round.
    pub(crate) cmd_id: u32,
    /// Ranges in the device's layout (0 if none was received).
    pub(crate) ranges: usize,
    /// Bits in the device's layout.
    pub(crate) total_bits: u64,
    /// Free pages marked in the bitmap.
    pub(crate) free_pages: u64,
    /// Chunks sent (all-zero chunks are skipped).
    pub(crate) chunks: u64,
    /// Bitmap build time (ns).
    pub(crate) build_ns: u64,
    /// Round time, query to ROUND_END returned (ns).
    pub(crate) round_ns: u64,
    /// Why it ended.
    pub(crate) end: End,
}

/// Waits until the device returned the one chain it holds (bounded; stop
/// conditions other than removal are left to the caller).
fn wait_idle(q: &mut HintQueue, ctl: &impl Control) -> core::result::Result<(), End> {
    let mut idle_waits = 0;
    while !q.wait_idle_once(WAIT_MS) {
        if ctl.should_stop() == Some(End::Removing) {
            return Err(End::Removing);
        }
        idle_waits += 1;
        if idle_waits >= MAX_IDLE_WAITS {
            return Err(End::Timeout);
        }
    }
    Ok(())
}

/// Runs one bitmap round for `cmd_id` (docs/protocol.md §5.5.x.5): query
/// the layout, build the bitmap over it with the bitmap builder (the same
/// bounded-hold walk as the debugfs diagnostics), send the non-zero chunks,
/// end with ROUND_END. Nothing is allocated for the pages reported.
///
/// `own_bits` is the size of the kernel's own RAM layout: a device layout
/// larger than twice that plus 1 GiB is refused (the bitmap is allocated
/// from it, and a hostile device could otherwise ask for 512 MiB).
pub(crate) fn run_bitmap_round(
    q: &mut HintQueue,
    builder: &mut Builder,
    own_bits: u64,
    cmd_id: u32,
    ctl: &impl Control,
) -> BitmapStats {
    use crate::bitmap_hint::{chunk_spans, ChunkHeader, LayoutReply, Message};
    let t0 = zone::now_ns();
    let mut st = BitmapStats {
        cmd_id,
        ranges: 0,
        total_bits: 0,
        free_pages: 0,
        chunks: 0,
        build_ns: 0,
        round_ns: 0,
        end: End::Complete,
    };
    let mut hdr = [0u8; MSG_HEADER_SIZE];
    let encode = |m: Message, hdr: &mut [u8; MSG_HEADER_SIZE]| {
        m.encode(hdr).map_err(|_| End::Error(EINVAL.to_errno()))
    };
    let body = (|| -> core::result::Result<(), End> {
        wait_idle(q, ctl).map_err(|e| if e == End::Timeout { End::Busy } else { e })?;
        encode(Message::LayoutQuery { cmd_id }, &mut hdr)?;
        q.send_layout_query(&hdr)
            .map_err(|e| End::Error(e.to_errno()))?;
        wait_idle(q, ctl)?;
        let reply = match LayoutReply::parse(q.layout_reply()) {
            Ok(r) if r.cmd_id == cmd_id => r,
            Ok(r) => {
                pr_warn!(
                    "bitmap round {:#x}: layout reply for {:#x}; round abandoned\n",
                    cmd_id,
                    r.cmd_id
                );
                return Err(End::Error(EINVAL.to_errno()));
            }
            Err(e) => {
                // Used length 0: the id is no longer current (or the reply
                // is malformed): abandon the round.
                if !q.layout_reply().is_empty() {
                    pr_warn!(
                        "bitmap round {:#x}: bad layout reply ({:?}); round abandoned\n",
                        cmd_id,
                        e
                    );
                }
                return Err(ctl.should_stop().unwrap_or(End::Error(EINVAL.to_errno())));
            }
        };
        st.ranges = reply.layout.ranges().len();
        st.total_bits = reply.layout.total_bits();
        let limit = own_bits.saturating_mul(2).saturating_add(1 << 18);
        if st.total_bits > limit {
            pr_warn!(
                "bitmap round {:#x}: device layout of {} bits, this guest has {} pages; round abandoned\n",
                cmd_id,
                st.total_bits,
                own_bits
            );
            return Err(End::Error(EINVAL.to_errno()));
        }
        builder
            .set_layout(Some(reply.layout))
            .map_err(|e| End::Error(e.to_errno()))?;
        if let Some(e) = ctl.should_stop() {
            return Err(e);
        }
        st.build_ns = timed_build(builder);
        st.free_pages = builder.summary().free_pages;
        let bytes = builder.bitmap_bytes();
        for (first_bit, nr_bits) in chunk_spans(st.total_bits, (CHUNK_BYTES * 8) as u32) {
            if let Some(e) = ctl.should_stop() {
                return Err(e);
            }
            let start = (first_bit.raw() / 8) as usize;
            let len = (nr_bits as usize).div_ceil(64) * 8;
            let Some(payload) = bytes.get(start..start + len) else {
                return Err(End::Error(EINVAL.to_errno()));
            };
            if payload.iter().all(|b| *b == 0) {
                continue;
            }
            encode(
                Message::Chunk(ChunkHeader {
                    cmd_id,
                    first_bit,
                    nr_bits,
                }),
                &mut hdr,
            )?;
            q.send_message(&hdr, payload)
                .map_err(|e| End::Error(e.to_errno()))?;
            st.chunks += 1;
            wait_idle(q, ctl)?;
        }
        Ok(())
    })();
    if let Err(e) = body {
        st.end = e;
    }
    // ROUND_END ends the round in every case where the queue is free (the
    // bitmap protocol's STOP; a device ignores it for a stale id).
    if st.end != End::Removing && st.end != End::Busy && st.end != End::Timeout {
        let free = u32::try_from(st.free_pages).unwrap_or(u32::MAX);
        if let Ok(n) = (Message::RoundEnd {
            cmd_id,
            free_pages: free,
        })
        .encode(&mut hdr)
        {
            if q.send_message(&hdr[..n], &[]).is_ok() {
                if let Err(e) = wait_idle(q, ctl) {
                    if st.end == End::Complete {
                        st.end = e;
                    }
                }
            }
        }
    }
    st.round_ns = zone::now_ns().saturating_sub(t0);
    st
}
