// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Fuzz input model for `freehint-device` (in the style of vm-virtio's
//! `fuzz/common`): a fuzz input is a [`BalloonInput`], deserialised with
//! [`decode`] (bincode, size-limited), describing
//!
//! - what the device offers and what the driver acknowledges,
//! - how the driver lays out its split virtqueues (sizes, addresses),
//! - a sequence of [`Op`]s: raw descriptors written anywhere in a queue's
//!   descriptor table (so loops, chains out of guest memory, wrong
//!   directions and oversize chains all occur), avail ring entries and
//!   index bumps, guest memory writes (pfn arrays, command ids, bitmap
//!   messages), notifications, config space accesses and the host API
//!   (target size, stats, hint rounds, new epoch, stop, finish, apply).
//!
//! [`run`] plays them against the real [`Balloon`] with the real
//! [`MmapDiscard`](freehint_device::balloon::MmapDiscard) backend over
//! anonymous guest memory, and checks the hint API invariants (epoch rule:
//! tokens and sets work in their epoch only, every epoch move empties the
//! set; bits beyond the layout never cleared) with `assert!`s: a failed
//! assertion is a finding just like a panic inside the device.
//!
//! [`seeds`] builds a seed corpus of well-formed sessions (standard round,
//! bitmap round, inflate/deflate, stats, reporting); `cargo test` writes it
//! to `device/fuzz/corpus/balloon_queues/`.
#![warn(missing_docs)]

pub mod restore;
pub mod seeds;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bincode::Options;
use freehint_device::balloon::{
    Balloon, BalloonConfig, EpochToken, HintError, HintHandle, HintSet, Layout, MetricsSnapshot,
    QueueLayout,
};
use freehint_device::{GuestMemoryHandle, Interrupt, VirtioDevice};
use freehint_protocol::balloon::CONFIG_FREE_PAGE_HINT_CMD_ID;
use freehint_protocol::bitmap_hint::{MsgHeader, MSG_MAGIC};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// Low RAM region: `[0, LOW_SIZE)`.
pub const LOW_SIZE: u64 = 0x10_0000;
/// High RAM region start (above a "PCI hole", like an x86 PC at 4 GiB).
pub const HIGH_BASE: u64 = 0x1_0000_0000;
/// High RAM region size.
pub const HIGH_SIZE: u64 = 0x4_0000;
/// Each queue's rings live in a slot of this size from `RING_BASE`.
pub const RING_SLOT: u64 = 0x4000;
/// Where queue 0's rings start.
pub const RING_BASE: u64 = 0x1000;
/// First byte of guest RAM not used by the default ring placement.
pub const DATA_BASE: u64 = 0x20000;
/// Largest queue size the device offers in the fuzzer.
pub const QUEUE_MAX: u16 = 256;
/// Most operations run per input (bounds the time per input).
pub const MAX_OPS: usize = 512;
/// Largest serialised input accepted by [`decode`].
pub const MAX_INPUT: u64 = 256 * 1024;

/// Offered-feature switches (each maps to a [`BalloonConfig`] field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Stats queue.
    pub stats: bool,
    /// DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Standard free page hints.
    pub free_page_hint: bool,
    /// Bitmap hint extension.
    pub bitmap: bool,
    /// PAGE_POISON.
    pub page_poison: bool,
    /// Free page reporting.
    pub reporting: bool,
    /// MUST_TELL_HOST.
    pub must_tell_host: bool,
    /// Initial `poison_val`.
    pub poison_val: u32,
}

/// Which RAM layout the device is configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayoutChoice {
    /// Exactly the two guest memory regions (the PCI hole folded out).
    Exact,
    /// Only the first 128 pages of low RAM.
    Small,
    /// More RAM than is mapped (the high range claims 4x its size).
    Larger,
}

/// How the driver sets up one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSetup {
    /// Queue size as the driver writes it (may be invalid).
    pub size: u16,
    /// Queue enabled.
    pub ready: bool,
    /// Raw ring addresses (desc, avail, used) instead of the default slot.
    pub raw_addrs: Option<(u64, u64, u64)>,
}

/// A descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuzzDesc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags (NEXT is fixed up by [`Op::AddChain`] unless `raw`).
    pub flags: u16,
    /// Next index (used only by raw chains).
    pub next: u16,
}

/// A command id as the driver sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmdId {
    /// The id currently in config space (what a well-behaved driver sends).
    Current,
    /// The current id plus a delta (stale or future ids).
    Offset(i32),
    /// Any value.
    Raw(u32),
}

/// One step of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Writes `descs` into queue `queue`'s descriptor table from slot
    /// `start` (wrapping at the queue size) and makes the first available.
    /// Unless `raw`, NEXT flags and `next` fields are set to link them in
    /// order.
    AddChain {
        /// Queue index.
        queue: u8,
        /// First table slot.
        start: u16,
        /// Keep flags/next exactly as given.
        raw: bool,
        /// The descriptors.
        descs: Vec<FuzzDesc>,
    },
    /// Puts `head` into the avail ring and bumps the avail index.
    PushAvail {
        /// Queue index.
        queue: u8,
        /// Head descriptor index (any value).
        head: u16,
    },
    /// Adds `delta` to the avail index without writing ring entries.
    BumpAvailIdx {
        /// Queue index.
        queue: u8,
        /// Added (wrapping).
        delta: u16,
    },
    /// Writes bytes to guest memory (errors ignored).
    WriteMem {
        /// Guest-physical address.
        addr: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Writes little-endian u32 pfns (an inflate/deflate payload).
    WritePfns {
        /// Guest-physical address.
        addr: u64,
        /// Page frame numbers.
        pfns: Vec<u32>,
    },
    /// Writes a 4-byte command id (standard protocol outbuf).
    WriteCmdId {
        /// Guest-physical address.
        addr: u64,
        /// The id.
        id: CmdId,
    },
    /// Writes a bitmap-protocol message header followed by `payload`.
    WriteMsg {
        /// Guest-physical address.
        addr: u64,
        /// Message kind (any value).
        kind: u16,
        /// Reserved field (must be 0 on the wire).
        reserved: u16,
        /// Command id.
        cmd_id: CmdId,
        /// `nr_bits` field.
        nr_bits: u32,
        /// `first_bit` field.
        first_bit: u64,
        /// Bytes after the header (a chunk's payload).
        payload: Vec<u8>,
    },
    /// The driver kicks a queue.
    Notify {
        /// Queue index (any value).
        queue: u16,
    },
    /// Config space read.
    ReadConfig {
        /// Offset.
        offset: u8,
        /// Length (bounded to 32).
        len: u8,
    },
    /// Config space write.
    WriteConfig {
        /// Offset.
        offset: u8,
        /// Data.
        data: Vec<u8>,
    },
    /// Host: set the balloon target.
    SetTarget(u32),
    /// Host: ask for statistics.
    RequestStats,
    /// Host: start a hint round with the current epoch's token (opening an
    /// epoch first if the harness holds none), or with a stale token.
    StartRound {
        /// Pass a token whose epoch is over.
        stale_epoch: bool,
    },
    /// Host: dirty bitmap sync is about to happen.
    NewEpoch,
    /// Host: stop the round.
    StopRound,
    /// Host: done with the hinted pages.
    Finish,
    /// Host: apply the live free set to a full to-send bitmap.
    Apply,
    /// Host: take a snapshot to apply later.
    Snapshot,
    /// Host: apply the snapshot taken last.
    ApplySnapshot,
    /// Transport: device reset.
    Reset,
    /// Transport: re-negotiate and activate again (after a reset).
    Reactivate,
    /// Writes `descs` as an indirect table at `table` (guest-physical) and
    /// makes a head descriptor at slot `slot` pointing to it available.
    /// Unless `raw`, the table's NEXT flags and `next` fields link the
    /// entries in order.
    AddIndirect {
        /// Queue index.
        queue: u8,
        /// Table slot of the head descriptor.
        slot: u16,
        /// Guest-physical address of the indirect table.
        table: u64,
        /// Head descriptor length (normally 16 × entries).
        head_len: Option<u32>,
        /// Keep flags/next exactly as given.
        raw: bool,
        /// The table entries.
        descs: Vec<FuzzDesc>,
    },
}

/// A whole fuzz input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInput {
    /// What the device offers.
    pub offer: Offer,
    /// RAM layout of the device.
    pub layout: LayoutChoice,
    /// Features the driver acknowledges (masked by what is offered).
    pub ack: u64,
    /// Queue set-up, index by index (missing queues get a default).
    pub queues: Vec<QueueSetup>,
    /// The session.
    pub ops: Vec<Op>,
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_INPUT)
        .allow_trailing_bytes()
}

/// Decodes fuzz bytes (`None` if they are not a valid input).
pub fn decode(data: &[u8]) -> Option<BalloonInput> {
    options().deserialize(data).ok()
}

/// Encodes an input (for the seed corpus).
pub fn encode(input: &BalloonInput) -> Vec<u8> {
    options()
        .serialize(input)
        .expect("serialising an in-memory input cannot fail")
}

/// Counts interrupts (the transport side of the harness).
#[derive(Debug, Default)]
pub struct CountingIrq {
    /// Queue interrupts.
    pub queue: AtomicU64,
    /// Config interrupts.
    pub config: AtomicU64,
}

impl Interrupt for CountingIrq {
    fn signal_queue(&self, _index: u16) {
        self.queue.fetch_add(1, Ordering::Relaxed);
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::Relaxed);
    }
}

/// The layout for `choice`.
pub fn layout_for(choice: LayoutChoice) -> Layout {
    let low = LOW_SIZE >> 12;
    let high = HIGH_SIZE >> 12;
    let ranges: &[(u64, u64)] = match choice {
        LayoutChoice::Exact => &[(0, low), (HIGH_BASE >> 12, high)],
        LayoutChoice::Small => &[(0, 128)],
        LayoutChoice::Larger => &[(0, low), (HIGH_BASE >> 12, 4 * high)],
    };
    // The ranges above are sorted, non-empty and small: always valid.
    Layout::from_ram_pfn_ranges(ranges).unwrap_or(Layout::empty())
}

/// Guest memory of the harness: two anonymous regions with a hole between.
pub fn guest_memory() -> Option<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_SIZE as usize),
        (GuestAddress(HIGH_BASE), HIGH_SIZE as usize),
    ])
    .ok()
}

/// Driver-side view of one queue.
#[derive(Clone, Copy, Debug)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    avail_idx: u16,
}

/// What a session did (for tests and seed checks).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Whether activation succeeded.
    pub activated: bool,
    /// Device counters at the end.
    pub metrics: MetricsSnapshot,
    /// Bits cleared by every apply.
    pub cleared: u64,
    /// Config interrupts seen.
    pub config_irqs: u64,
    /// Queue interrupts seen.
    pub queue_irqs: u64,
}

struct Harness {
    mem: GuestMemoryHandle,
    balloon: Balloon,
    irq: Arc<CountingIrq>,
    input_ack: u64,
    setups: Vec<QueueSetup>,
    driver: Vec<DriverQueue>,
    /// Whether a round was started in the current epoch (else the free set
    /// must be empty).
    round_in_epoch: bool,
    /// The latest token the host took, and whether its epoch still lasts
    /// (the harness's own model of every epoch move).
    token: Option<EpochToken>,
    token_current: bool,
    /// The token before it (stale once `token` was taken).
    old_token: Option<EpochToken>,
    snapshot: Option<HintSet>,
    total_bits: u64,
    outcome: Outcome,
}

/// Runs one input against a fresh device. Panics (through `assert!`) only
/// when the device breaks an invariant of the hint API.
pub fn run(input: &BalloonInput) -> Outcome {
    let Some(mut h) = Harness::new(input) else {
        return Outcome::default();
    };
    h.outcome.activated = h.activate();
    h.play(&input.ops);
    h.finish()
}

impl Harness {
    /// A fresh device configured as `input` offers, over fresh guest memory.
    fn new(input: &BalloonInput) -> Option<Harness> {
        let mem = guest_memory()?;
        let layout = layout_for(input.layout);
        let o = input.offer;
        let config = BalloonConfig {
            stats: o.stats,
            stats_polling_interval_s: 0,
            deflate_on_oom: o.deflate_on_oom,
            free_page_hint: o.free_page_hint,
            bitmap: o.bitmap,
            page_poison: o.page_poison,
            poison_val: o.poison_val,
            reporting: o.reporting,
            must_tell_host: o.must_tell_host,
            queue_size: QUEUE_MAX,
            layout,
        };
        let balloon = Balloon::new(config).ok()?;
        Some(Harness {
            mem: GuestMemoryAtomic::new(mem),
            balloon,
            irq: Arc::new(CountingIrq::default()),
            input_ack: input.ack,
            setups: input.queues.clone(),
            driver: Vec::new(),
            round_in_epoch: false,
            token: None,
            token_current: false,
            old_token: None,
            snapshot: None,
            total_bits: layout.total_bits(),
            outcome: Outcome::default(),
        })
    }

    /// Plays at most [`MAX_OPS`] operations.
    fn play(&mut self, ops: &[Op]) {
        for op in ops.iter().take(MAX_OPS) {
            self.op(op);
        }
    }

    /// Checks the hint invariants once more and returns what the session did.
    fn finish(mut self) -> Outcome {
        self.check_hint_invariants();
        let handle = self.balloon.handle();
        self.outcome.metrics = handle.metrics().snapshot();
        self.outcome.config_irqs = self.irq.config.load(Ordering::Relaxed);
        self.outcome.queue_irqs = self.irq.queue.load(Ordering::Relaxed);
        self.outcome
    }
}

impl Harness {
    fn activate(&mut self) -> bool {
        let features = self.input_ack & self.balloon.device_features();
        self.balloon.ack_features(features);
        let n = QueueLayout::for_features(features).num_queues();
        let mut queues = Vec::with_capacity(n);
        self.driver.clear();
        for i in 0..n {
            let setup = self.setups.get(i).copied().unwrap_or(QueueSetup {
                size: QUEUE_MAX,
                ready: true,
                raw_addrs: None,
            });
            let Ok(mut q) = Queue::new(QUEUE_MAX) else {
                return false;
            };
            let base = RING_BASE + RING_SLOT * i as u64;
            let (desc, avail, used) =
                setup
                    .raw_addrs
                    .unwrap_or((base, base + 0x1000, base + 0x2000));
            // Invalid values are rejected and leave the queue unchanged,
            // as on a real transport.
            let _ = q.try_set_size(setup.size);
            let _ = q.try_set_desc_table_address(GuestAddress(desc));
            let _ = q.try_set_avail_ring_address(GuestAddress(avail));
            let _ = q.try_set_used_ring_address(GuestAddress(used));
            q.set_ready(setup.ready);
            self.driver.push(DriverQueue {
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                avail_idx: 0,
            });
            // A fresh driver zeroes its avail ring header.
            let _ = self
                .mem
                .memory()
                .write_obj(0u32, GuestAddress(q.avail_ring()));
            queues.push(q);
        }
        let irq: Arc<dyn Interrupt> = self.irq.clone();
        self.balloon.activate(self.mem.clone(), irq, queues).is_ok()
    }

    fn current_cmd_id(&self) -> u32 {
        let mut b = [0u8; 4];
        self.balloon
            .read_config(CONFIG_FREE_PAGE_HINT_CMD_ID as u64, &mut b);
        u32::from_le_bytes(b)
    }

    fn cmd_id(&self, id: CmdId) -> u32 {
        match id {
            CmdId::Current => self.current_cmd_id(),
            CmdId::Offset(d) => self.current_cmd_id().wrapping_add_signed(d),
            CmdId::Raw(v) => v,
        }
    }

    fn write(&self, addr: u64, data: &[u8]) {
        let _ = self.mem.memory().write_slice(data, GuestAddress(addr));
    }

    fn push_avail(&mut self, queue: u8, head: u16) {
        let Some(dq) = self.driver.get_mut(usize::from(queue)) else {
            return;
        };
        let size = dq.size.max(1);
        let slot = dq.avail + 4 + 2 * u64::from(dq.avail_idx % size);
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let idx = dq.avail_idx;
        let avail = dq.avail;
        let m = self.mem.memory();
        let _ = m.write_obj(head.to_le(), GuestAddress(slot));
        let _ = m.write_obj(idx.to_le(), GuestAddress(avail + 2));
    }

    fn op(&mut self, op: &Op) {
        let hints = self.balloon.hint_handle();
        match op {
            Op::AddChain {
                queue,
                start,
                raw,
                descs,
            } => {
                let Some(dq) = self.driver.get(usize::from(*queue)).copied() else {
                    return;
                };
                let size = dq.size.max(1);
                let n = descs.len().min(usize::from(size));
                if n == 0 {
                    return;
                }
                let m = self.mem.memory();
                for (k, d) in descs.iter().take(n).enumerate() {
                    let slot = (u32::from(*start) + k as u32) % u32::from(size);
                    let (flags, next) = if *raw {
                        (d.flags, d.next)
                    } else if k + 1 < n {
                        let next = (slot + 1) % u32::from(size);
                        (d.flags | 1, next as u16)
                    } else {
                        (d.flags & !1, 0)
                    };
                    let mut b = [0u8; 16];
                    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
                    b[8..12].copy_from_slice(&d.len.to_le_bytes());
                    b[12..14].copy_from_slice(&flags.to_le_bytes());
                    b[14..16].copy_from_slice(&next.to_le_bytes());
                    let _ = m.write_slice(&b, GuestAddress(dq.desc + 16 * u64::from(slot)));
                }
                drop(m);
                let head = (u32::from(*start) % u32::from(size)) as u16;
                self.push_avail(*queue, head);
            }
            Op::AddIndirect {
                queue,
                slot,
                table,
                head_len,
                raw,
                descs,
            } => {
                let Some(dq) = self.driver.get(usize::from(*queue)).copied() else {
                    return;
                };
                // Bounded by the input size limit; entries beyond 4096 are
                // not written (the device must still cope with the length).
                let n = descs.len().min(4096);
                let mut table_bytes = Vec::with_capacity(16 * n);
                for (k, d) in descs.iter().take(n).enumerate() {
                    let (flags, next) = if *raw {
                        (d.flags, d.next)
                    } else if k + 1 < n {
                        (d.flags | 1, (k + 1) as u16)
                    } else {
                        (d.flags & !1, 0)
                    };
                    table_bytes.extend_from_slice(&d.addr.to_le_bytes());
                    table_bytes.extend_from_slice(&d.len.to_le_bytes());
                    table_bytes.extend_from_slice(&flags.to_le_bytes());
                    table_bytes.extend_from_slice(&next.to_le_bytes());
                }
                self.write(*table, &table_bytes);
                let size = dq.size.max(1);
                let head = *slot % size;
                let len = head_len.unwrap_or(16 * n as u32);
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&table.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&4u16.to_le_bytes()); // VRING_DESC_F_INDIRECT
                self.write(dq.desc + 16 * u64::from(head), &b);
                self.push_avail(*queue, head);
            }
            Op::PushAvail { queue, head } => self.push_avail(*queue, *head),
            Op::BumpAvailIdx { queue, delta } => {
                if let Some(dq) = self.driver.get_mut(usize::from(*queue)) {
                    dq.avail_idx = dq.avail_idx.wrapping_add(*delta);
                    let (idx, avail) = (dq.avail_idx, dq.avail);
                    let _ = self
                        .mem
                        .memory()
                        .write_obj(idx.to_le(), GuestAddress(avail + 2));
                }
            }
            Op::WriteMem { addr, data } => self.write(*addr, data),
            Op::WritePfns { addr, pfns } => {
                let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
                self.write(*addr, &bytes);
            }
            Op::WriteCmdId { addr, id } => {
                let id = self.cmd_id(*id);
                self.write(*addr, &id.to_le_bytes());
            }
            Op::WriteMsg {
                addr,
                kind,
                reserved,
                cmd_id,
                nr_bits,
                first_bit,
                payload,
            } => {
                let h = MsgHeader {
                    magic: MSG_MAGIC,
                    kind: *kind,
                    reserved: *reserved,
                    cmd_id: self.cmd_id(*cmd_id),
                    nr_bits: *nr_bits,
                    first_bit: *first_bit,
                };
                let mut b = vec![0u8; 24];
                if h.write(&mut b).is_ok() {
                    b.extend_from_slice(payload);
                    self.write(*addr, &b);
                }
            }
            Op::Notify { queue } => {
                // Errors mean the device needs a reset (used ring gone);
                // the harness carries on like a transport would.
                let _ = self.balloon.queue_notify(*queue);
            }
            Op::ReadConfig { offset, len } => {
                let mut b = vec![0u8; usize::from(*len).min(32)];
                self.balloon.read_config(u64::from(*offset), &mut b);
            }
            Op::WriteConfig { offset, data } => {
                let n = data.len().min(32);
                self.balloon.write_config(u64::from(*offset), &data[..n]);
            }
            Op::SetTarget(p) => self.balloon.handle().set_target_pages(*p),
            Op::RequestStats => {
                let _ = self.balloon.handle().request_stats();
            }
            Op::StartRound { stale_epoch } => self.start_round(&hints, *stale_epoch),
            Op::NewEpoch => self.open_epoch(&hints),
            Op::StopRound => {
                hints.stop();
                self.epoch_ended();
            }
            Op::Finish => {
                // DONE: the guest may reuse the pages; nothing may be
                // cleared until a new round collects hints again.
                hints.finish();
                self.epoch_ended();
            }
            Op::Apply => self.apply_live(),
            Op::Snapshot => self.snapshot = Some(hints.snapshot()),
            Op::ApplySnapshot => self.apply_snapshot(),
            Op::Reset => {
                self.balloon.reset();
                self.driver.clear();
                self.epoch_ended();
            }
            Op::Reactivate => {
                self.balloon.reset();
                self.activate();
                self.epoch_ended();
            }
        }
    }

    /// Opens an epoch, as a migrator does right before a dirty log sync.
    fn open_epoch(&mut self, hints: &HintHandle) {
        self.old_token = self.token.replace(hints.new_epoch());
        self.token_current = true;
        self.round_in_epoch = false;
        self.check_hint_invariants();
    }

    /// The host stopped or finished, or the device was reset: the epoch
    /// moved, the free set must be empty and the held token stale.
    fn epoch_ended(&mut self) {
        self.token_current = false;
        self.round_in_epoch = false;
        self.check_hint_invariants();
    }

    /// A token whose epoch is over, if the harness holds one.
    fn stale_token(&self) -> Option<&EpochToken> {
        if self.token_current {
            self.old_token.as_ref()
        } else {
            self.token.as_ref()
        }
    }

    fn start_round(&mut self, hints: &HintHandle, stale: bool) {
        if stale {
            if let Some(t) = self.stale_token() {
                let r = hints.start_round(t);
                assert!(
                    matches!(r, Err(HintError::StaleEpoch { .. })),
                    "start_round with a stale token: {r:?}"
                );
            }
            return;
        }
        if !self.token_current {
            self.open_epoch(hints);
        }
        let Some(t) = self.token.as_ref() else {
            return;
        };
        match hints.start_round(t) {
            Ok(id) => {
                assert!(id >= 0x8000_0000, "cmd id {id:#x} below the valid range");
                self.round_in_epoch = true;
            }
            Err(HintError::StaleEpoch { .. }) => panic!("the current token was refused"),
            Err(_) => {}
        }
    }

    fn apply_snapshot(&mut self) {
        let (Some(s), Some(t)) = (self.snapshot.take(), self.token.as_ref()) else {
            return;
        };
        let mut to_send = self.full_to_send();
        let fresh = self.token_current && s.epoch() == t.epoch();
        match s.apply_to(t, &mut to_send) {
            Ok(c) => {
                assert!(fresh, "a stale snapshot or token was accepted");
                self.check_applied(&to_send, c);
            }
            Err(HintError::StaleEpoch { .. }) => assert!(!fresh, "a fresh snapshot was refused"),
            Err(e) => panic!("snapshot apply failed: {e}"),
        }
    }

    fn full_to_send(&self) -> Vec<u64> {
        let words = freehint_protocol::bitmap::words_for_bits(self.total_bits);
        vec![!0u64; words]
    }

    /// Bits cleared must be counted exactly and lie inside the layout.
    fn check_applied(&mut self, to_send: &[u64], cleared: u64) {
        let zeros: u64 = to_send.iter().map(|w| u64::from(w.count_zeros())).sum();
        assert_eq!(zeros, cleared, "apply_to miscounted cleared bits");
        assert!(
            cleared <= self.total_bits,
            "cleared more bits than RAM pages"
        );
        let tail = self.total_bits % 64;
        if tail != 0 {
            if let Some(last) = to_send.last() {
                assert_eq!(last >> tail, !0u64 >> tail, "bit beyond the layout cleared");
            }
        }
        self.outcome.cleared += cleared;
    }

    fn apply_live(&mut self) {
        let hints = self.balloon.hint_handle();
        let Some(t) = self.token.as_ref() else {
            return;
        };
        assert_eq!(
            t.epoch() == hints.status().epoch,
            self.token_current,
            "the epoch moved without the host or a reset moving it, or did not move"
        );
        let mut to_send = self.full_to_send();
        let cleared = match hints.apply_to(t, &mut to_send) {
            Ok(c) => c,
            Err(HintError::StaleEpoch { .. }) => {
                assert!(!self.token_current, "the current token was refused");
                return;
            }
            Err(e) => panic!("apply_to a full-size bitmap failed: {e}"),
        };
        // Too short a bitmap must be refused, not indexed out of bounds.
        if let Some(n) = to_send.len().checked_sub(1) {
            let mut short = to_send[..n].to_vec();
            assert!(matches!(
                hints.apply_to(t, &mut short),
                Err(HintError::BitmapTooShort { .. })
            ));
        }
        assert!(self.token_current, "a stale token was accepted");
        if !self.round_in_epoch {
            assert_eq!(
                cleared, 0,
                "hints cleared pages with no round in this epoch"
            );
        }
        self.check_applied(&to_send, cleared);
    }

    fn check_hint_invariants(&mut self) {
        let hints = self.balloon.hint_handle();
        let st = hints.status();
        assert!(st.free_pages <= self.total_bits, "free set larger than RAM");
        if !self.round_in_epoch {
            assert_eq!(st.free_pages, 0, "free set survived a new epoch");
            assert_eq!(
                hints.snapshot().free_pages(),
                0,
                "snapshot from an old epoch"
            );
        }
        self.apply_live();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters of the device's rejection paths, summed.
    fn rejections(m: &MetricsSnapshot) -> u64 {
        [
            m.pfn_out_of_range,
            m.bad_pfn_descriptor,
            m.chain_too_long,
            m.indirect_not_negotiated,
            m.bad_indirect,
            m.bad_head_index,
            m.descriptor_out_of_memory,
            m.wrong_direction,
            m.stats_bad_length,
            m.hint_stale,
            m.hint_epoch_dropped,
            m.hint_bad_cmd_buffer,
            m.bitmap_bad_message,
            m.bitmap_beyond_layout,
            m.bitmap_short_payload,
            m.bitmap_bad_reply_buffer,
            m.unknown_queue,
        ]
        .iter()
        .sum()
    }

    /// Bytes that are no input are rejected. Every seed with one byte
    /// corrupted (every 5th position) either fails to decode or runs to the
    /// end with the hint invariants asserted by `run`; both happen, and the
    /// device's rejection counters see more than in the seed itself for
    /// some of the runs (the garbage reached the device and was counted).
    #[test]
    fn garbage_is_rejected_or_runs() {
        for data in [&b""[..], &[0xff; 64][..], &[0u8; 7][..]] {
            assert_eq!(decode(data), None, "{data:?} decoded");
        }
        let (mut rejected, mut ran, mut counted) = (0, 0, 0);
        for (name, seed) in seeds::all() {
            let baseline = rejections(&run(&seed).metrics);
            let bytes = encode(&seed);
            for i in (0..bytes.len()).step_by(5) {
                let mut garbage = bytes.clone();
                garbage[i] ^= 0xa5;
                let Some(input) = decode(&garbage) else {
                    rejected += 1;
                    continue;
                };
                ran += 1;
                if rejections(&run(&input).metrics) > baseline {
                    counted += 1;
                }
            }
            assert!(ran > 0, "{name}: no corrupted input decoded");
        }
        assert!(rejected > 0, "every corrupted input decoded");
        assert!(
            counted > 0,
            "no corrupted input was counted as rejected by the device"
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        for (_, input) in seeds::all() {
            assert_eq!(decode(&encode(&input)), Some(input));
        }
    }
}
