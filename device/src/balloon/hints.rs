// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Free page hints: the round state machine, the host-side free page set and
//! the epoch rule, plus [`HintHandle`], the API a migrator calls.
//!
//! # The free page set
//!
//! One bitmap type for both protocols: bit `i` stands for the `i`-th 4 KiB
//! page of guest RAM in the order of the device's [`Layout`] (the RAM offset
//! divided by 4 KiB, with holes such as the x86 PCI hole folded out). The
//! standard protocol's free blocks (guest-physical `addr`/`len`) are
//! converted to bits through the layout (partial pages ignored, bytes outside
//! RAM ignored); the bitmap protocol's chunks are OR-ed in directly.
//!
//! # The correctness rule (design.md)
//!
//! A hint is a statement about the past: "this page was free at some moment
//! after the round started". It is safe to skip sending such a page only
//! because dirty logging was already on at that moment, so a page reused
//! after being hinted is dirty and will be sent after the next sync. Hence:
//!
//! 1. Turn dirty logging on **before** [`HintHandle::start_round`].
//! 2. Each dirty bitmap sync opens a new *epoch*. Call
//!    [`HintHandle::new_epoch`] **right before** syncing: it stops the round
//!    in progress and throws away everything collected so far; hints that
//!    still arrive for that round are dropped and counted.
//! 3. Start rounds only **after** the sync that opened the epoch, and apply
//!    hints only to the to-send bitmap of that epoch, before the next sync:
//!    [`HintSet::apply_to`] refuses a set whose epoch is not the current one.
//!
//! Why the order matters: a page hinted at time *t* and reused at *t'* is
//! marked dirty at *t'*. If a sync happened between *t'* and the moment the
//! hint is applied, that dirty bit is already in the to-send bitmap and the
//! hint would wrongly clear it. Hints collected in an epoch can never be
//! older than the sync that opened it, because the round that produced them
//! started after that sync.
//!
//! # Example: a migrator's pre-copy loop
//!
//! ```
//! use freehint_device::balloon::{Balloon, BalloonConfig, Layout};
//! # fn sync_dirty_log(_to_send: &mut [u64]) {}
//! let layout = Layout::from_ram_pfn_ranges(&[(0, 1024)]).unwrap();
//! let balloon = Balloon::new(BalloonConfig::all_features(layout)).unwrap();
//! let hints = balloon.hint_handle();
//! // (The transport activates the device; the guest negotiates hints.)
//!
//! let mut to_send = vec![!0u64; 1024 / 64]; // bulk phase: everything
//! // dirty logging is on; epoch 0 began with it.
//! let epoch = hints.epoch();
//! if let Ok(cmd_id) = hints.start_round(epoch) {
//!     // ... send pages; the guest reports free pages meanwhile ...
//!     let cleared = hints.apply_to(&mut to_send).unwrap_or(0);
//!     # let _ = (cmd_id, cleared);
//! }
//! // Next iteration: invalidate, then sync, then maybe a new round.
//! let epoch = hints.new_epoch();
//! sync_dirty_log(&mut to_send);
//! # let _ = epoch;
//! // At the end of migration (or when giving up): let the guest reuse the
//! // pages it had to set aside.
//! hints.finish();
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bitvec::prelude::*;
use freehint_protocol::balloon::{
    next_cmd_id, FREE_PAGE_HINT_CMD_ID_DONE, FREE_PAGE_HINT_CMD_ID_STOP,
};
use freehint_protocol::bitmap_hint::ChunkHeader;
use freehint_protocol::layout::{Layout, PAGE_SHIFT, PAGE_SIZE};
use log::{debug, info, warn};

use super::metrics::BalloonMetrics;
use crate::virtio_device::Interrupt;

/// State of the hint round, as in QEMU's `FREE_PAGE_HINT_S_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintState {
    /// No round since activation.
    Idle,
    /// The device published a new command id and raised a config interrupt;
    /// the driver has not answered yet.
    Requested,
    /// The driver acknowledged the id (id outbuf or LAYOUT_QUERY); hints are
    /// being collected.
    Started,
    /// The round ended: the driver sent STOP/ROUND_END, or the host stopped
    /// it (new epoch, [`HintHandle::stop`]). The collected set stays
    /// readable until the epoch moves.
    Stopped,
    /// The host no longer needs the pages: `free_page_hint_cmd_id` reads DONE.
    Done,
}

/// Why the host API refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HintError {
    /// The driver has not negotiated `VIRTIO_BALLOON_F_FREE_PAGE_HINT`, or the
    /// device is not activated.
    #[error("free page hinting is not active (feature not negotiated or device not activated)")]
    NotActive,
    /// The guest poisons free pages (`poison_val` ≠ 0): pages that are not
    /// migrated would arrive zeroed instead of poisoned, so hinting is refused.
    #[error("guest poisons free pages with {0:#x}: hinting refused")]
    GuestPoisons(u32),
    /// The device does not offer `VIRTIO_BALLOON_F_PAGE_POISON`, so it cannot
    /// tell whether the guest poisons free pages (a Linux guest negotiates
    /// the feature exactly when it poisons or initialises free pages).
    #[error("PAGE_POISON is not offered, so the device cannot tell whether the guest poisons free pages: hinting refused (offer page_poison)")]
    PoisonUnknown,
    /// The caller's epoch is not the current one.
    #[error("epoch {given} is stale (current epoch is {current})")]
    StaleEpoch {
        /// Epoch the caller passed or the set was collected in.
        given: u64,
        /// Current epoch.
        current: u64,
    },
    /// The to-send bitmap does not cover the layout.
    #[error("to-send bitmap has {got} words, the layout needs {needed}")]
    BitmapTooShort {
        /// Words needed.
        needed: usize,
        /// Words given.
        got: usize,
    },
}

/// A snapshot of the hint machinery for the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintStatus {
    /// Round state.
    pub state: HintState,
    /// Command id of the latest round (0 before the first).
    pub cmd_id: u32,
    /// Current sync epoch.
    pub epoch: u64,
    /// Epoch the latest round was started in.
    pub round_epoch: u64,
    /// Pages currently in the free set.
    pub free_pages: u64,
}

/// Why a guest message was not merged (the caller counts it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HintDrop {
    /// Stale command id or no round accepting hints.
    Stale,
    /// The epoch moved since the round started.
    Epoch,
}

/// The state machine and the free set. Always used under the mutex in
/// [`HintShared`].
#[derive(Debug)]
pub(crate) struct HintCore {
    layout: Layout,
    /// Hinting negotiated and device activated.
    active: bool,
    /// Non-zero poison value negotiated by the driver (hinting refused).
    poison: Option<u32>,
    /// PAGE_POISON not offered: whether the guest poisons is unknown
    /// (hinting refused).
    poison_unknown: bool,
    state: HintState,
    /// Latest round id (0 = none yet).
    round_id: u32,
    /// Epoch the latest round was started in.
    round_epoch: u64,
    /// Free set of the current epoch (allocated on the first round).
    bits: BitVec<u64, Lsb0>,
    /// Whether `bits` is known to be all zero (skips clearing).
    bits_clean: bool,
    /// The layout was replied for the current round (bitmap chunks are
    /// accepted only after that, docs/protocol.md device requirements).
    layout_replied: bool,
}

impl HintCore {
    fn new(layout: Layout) -> Self {
        Self {
            layout,
            active: false,
            poison: None,
            poison_unknown: false,
            state: HintState::Idle,
            round_id: 0,
            round_epoch: 0,
            bits: BitVec::new(),
            bits_clean: true,
            layout_replied: false,
        }
    }

    /// Value of `free_page_hint_cmd_id` in config space.
    pub(crate) fn config_cmd_id(&self) -> u32 {
        match self.state {
            HintState::Idle | HintState::Stopped => FREE_PAGE_HINT_CMD_ID_STOP,
            HintState::Requested | HintState::Started => self.round_id,
            HintState::Done => FREE_PAGE_HINT_CMD_ID_DONE,
        }
    }

    fn clear_bits(&mut self) {
        if !self.bits_clean {
            self.bits.as_raw_mut_slice().fill(0);
            self.bits_clean = true;
        }
    }

    fn drop_reason(&self, epoch: u64) -> HintDrop {
        if self.round_epoch != epoch {
            HintDrop::Epoch
        } else {
            HintDrop::Stale
        }
    }

    /// Whether hints for `cmd_id` may be merged now.
    fn accepting(&self, cmd_id: u32, epoch: u64) -> Result<(), HintDrop> {
        if self.state == HintState::Started && cmd_id == self.round_id {
            if self.round_epoch == epoch {
                Ok(())
            } else {
                Err(HintDrop::Epoch)
            }
        } else if cmd_id == self.round_id && self.round_epoch != epoch {
            Err(HintDrop::Epoch)
        } else {
            Err(HintDrop::Stale)
        }
    }

    /// Standard protocol: the driver's 4-byte command id outbuf.
    pub(crate) fn on_cmd_id(&mut self, id: u32, epoch: u64) -> Result<(), HintDrop> {
        if id == FREE_PAGE_HINT_CMD_ID_STOP {
            return match self.state {
                HintState::Started | HintState::Requested => {
                    debug!(
                        "free page hint round {:#x}: driver sent STOP",
                        self.round_id
                    );
                    self.state = HintState::Stopped;
                    Ok(())
                }
                _ => Err(self.drop_reason(epoch)),
            };
        }
        if id == self.round_id && self.state == HintState::Requested {
            if self.round_epoch != epoch {
                return Err(HintDrop::Epoch);
            }
            debug!("free page hint round {id:#x}: started by driver");
            self.state = HintState::Started;
            return Ok(());
        }
        if id == self.round_id && self.state == HintState::Started {
            return Ok(()); // repeated id: harmless
        }
        Err(self.drop_reason(epoch).max_stale(id != self.round_id))
    }

    /// Standard protocol: a free block (an inbuf; its address and length are
    /// the free range). Returns the pages merged and the bytes ignored
    /// (partial pages, outside the layout).
    pub(crate) fn on_free_block(
        &mut self,
        addr: u64,
        len: u64,
        epoch: u64,
    ) -> Result<(u64, u64, u64), HintDrop> {
        if self.state != HintState::Started {
            return Err(self.drop_reason(epoch));
        }
        self.accepting(self.round_id, epoch)?;
        let end = addr.saturating_add(len);
        let first_pfn = addr.div_ceil(PAGE_SIZE);
        let end_pfn = end >> PAGE_SHIFT;
        if end_pfn <= first_pfn {
            return Ok((0, len, 0));
        }
        let whole = (end_pfn - first_pfn) << PAGE_SHIFT;
        let partial = len - whole;
        let mut merged = 0;
        let words = self.bits.as_raw_mut_slice();
        self.layout
            .for_each_bit_run(first_pfn, end_pfn - first_pfn, |bit, nr| {
                freehint_protocol::bitmap::set_bit_run(words, bit, nr);
                merged += nr;
            });
        if merged > 0 {
            self.bits_clean = false;
        }
        let outside = (end_pfn - first_pfn - merged) << PAGE_SHIFT;
        Ok((merged, partial, outside))
    }

    /// Bitmap protocol: LAYOUT_QUERY. Returns the layout to reply with.
    pub(crate) fn on_layout_query(&mut self, cmd_id: u32, epoch: u64) -> Result<Layout, HintDrop> {
        match self.state {
            HintState::Requested | HintState::Started if cmd_id == self.round_id => {
                if self.round_epoch != epoch {
                    return Err(HintDrop::Epoch);
                }
                self.state = HintState::Started;
                self.layout_replied = true;
                Ok(self.layout)
            }
            _ => Err(self.drop_reason(epoch).max_stale(cmd_id != self.round_id)),
        }
    }

    /// Bitmap protocol: checks a chunk may be merged now.
    pub(crate) fn chunk_accepted(&self, h: &ChunkHeader, epoch: u64) -> Result<(), HintDrop> {
        self.accepting(h.cmd_id, epoch)?;
        if self.layout_replied {
            Ok(())
        } else {
            Err(HintDrop::Stale)
        }
    }

    /// Bitmap protocol: merges one payload piece (already validated against
    /// the layout by the caller through `check_bounds`).
    pub(crate) fn merge_chunk_piece(
        &mut self,
        h: &ChunkHeader,
        offset: usize,
        piece: &[u8],
    ) -> Result<(), freehint_protocol::WireError> {
        h.or_payload(self.bits.as_raw_mut_slice(), offset, piece)?;
        self.bits_clean = false;
        Ok(())
    }

    /// Bitmap protocol: ROUND_END.
    pub(crate) fn on_round_end(&mut self, cmd_id: u32, epoch: u64) -> Result<(), HintDrop> {
        self.accepting(cmd_id, epoch)?;
        debug!("free page hint round {cmd_id:#x}: ROUND_END");
        self.state = HintState::Stopped;
        Ok(())
    }

    /// The layout's bitmap size.
    pub(crate) fn total_bits(&self) -> u64 {
        self.layout.total_bits()
    }

    /// Pages in the free set.
    fn free_pages(&self) -> u64 {
        if self.bits_clean {
            0
        } else {
            self.bits.count_ones() as u64
        }
    }
}

trait MaxStale {
    fn max_stale(self, stale_id: bool) -> HintDrop;
}

impl MaxStale for HintDrop {
    /// A message naming another round's id is stale even if the epoch moved.
    fn max_stale(self, stale_id: bool) -> HintDrop {
        if stale_id {
            HintDrop::Stale
        } else {
            self
        }
    }
}

/// State shared between the device (transport thread) and the migrator.
pub(crate) struct HintShared {
    pub(crate) core: Mutex<HintCore>,
    /// Current sync epoch (written under `core`'s lock, read lock-free by
    /// [`HintSet::apply_to`]).
    pub(crate) epoch: Arc<AtomicU64>,
    /// The transport's interrupt while activated.
    pub(crate) interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    pub(crate) metrics: Arc<BalloonMetrics>,
}

impl std::fmt::Debug for HintShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HintShared")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl HintShared {
    pub(crate) fn new(layout: Layout, metrics: Arc<BalloonMetrics>) -> Self {
        Self {
            core: Mutex::new(HintCore::new(layout)),
            epoch: Arc::new(AtomicU64::new(0)),
            interrupt: Mutex::new(None),
            metrics,
        }
    }

    /// Locks the core; a poisoned lock (a panic elsewhere) still yields the
    /// data, which stays consistent because every update is a single step.
    pub(crate) fn lock(&self) -> MutexGuard<'_, HintCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn signal_config(&self) {
        let irq = self
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(irq) = irq {
            irq.signal_config();
        }
    }

    /// Device side: activation/reset/config changes. `poison` is the
    /// negotiated `poison_val` (`None` if PAGE_POISON was not negotiated);
    /// `poison_offered` whether the device offered PAGE_POISON at all.
    pub(crate) fn set_active(
        &self,
        active: bool,
        interrupt: Option<Arc<dyn Interrupt>>,
        poison: Option<u32>,
        poison_offered: bool,
    ) {
        let mut core = self.lock();
        core.active = active;
        core.poison = poison.filter(|&p| p != 0);
        core.poison_unknown = !poison_offered;
        if !active {
            core.state = HintState::Idle;
            core.clear_bits();
        }
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = interrupt;
    }

    /// Persistence: the latest round id and whether a round was ever
    /// requested since activation (the guest may hold pages for it).
    pub(crate) fn saved_round(&self) -> (u32, bool) {
        let core = self.lock();
        (core.round_id, core.state != HintState::Idle)
    }

    /// Persistence: continue command ids after `round_id`; if a round had
    /// been requested, end in DONE so the guest gives back the pages it set
    /// aside (hints never cross a migration: the destination starts a new
    /// epoch with an empty set).
    pub(crate) fn restore_round(&self, round_id: u32, had_round: bool) {
        let mut core = self.lock();
        core.round_id = round_id;
        core.round_epoch = 0;
        core.state = if had_round {
            HintState::Done
        } else {
            HintState::Idle
        };
        core.clear_bits();
    }

    /// Device side: the driver wrote `poison_val`.
    pub(crate) fn set_poison(&self, poison: Option<u32>) {
        self.lock().poison = poison.filter(|&p| p != 0);
    }

    /// Counts a dropped guest message.
    pub(crate) fn count_drop(&self, d: HintDrop) {
        match d {
            HintDrop::Stale => BalloonMetrics::inc(&self.metrics.hint_stale),
            HintDrop::Epoch => BalloonMetrics::inc(&self.metrics.hint_epoch_dropped),
        }
    }
}

/// The host-side (migrator) API of free page hinting. Cheap to clone; all
/// methods may be called from any thread.
#[derive(Clone, Debug)]
pub struct HintHandle {
    pub(crate) shared: Arc<HintShared>,
}

impl HintHandle {
    /// The current sync epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch()
    }

    /// Starts a hint round in `epoch` and returns its command id (from
    /// 0x80000000, wrapping, never STOP/DONE): the device publishes the id in
    /// config space and raises a config interrupt.
    ///
    /// The caller **must have dirty logging on** and must call this only
    /// after the dirty bitmap sync that opened `epoch` (see the module
    /// docs). A round in progress is replaced (its hints are discarded).
    pub fn start_round(&self, epoch: u64) -> Result<u32, HintError> {
        let id = {
            let mut core = self.shared.lock();
            let current = self.shared.epoch();
            if epoch != current {
                return Err(HintError::StaleEpoch {
                    given: epoch,
                    current,
                });
            }
            if !core.active {
                BalloonMetrics::inc(&self.shared.metrics.hint_rounds_refused);
                return Err(HintError::NotActive);
            }
            if core.poison_unknown {
                BalloonMetrics::inc(&self.shared.metrics.hint_rounds_refused);
                warn!("free page hinting refused: PAGE_POISON not offered");
                return Err(HintError::PoisonUnknown);
            }
            if let Some(p) = core.poison {
                BalloonMetrics::inc(&self.shared.metrics.hint_rounds_refused);
                warn!("free page hinting refused: guest poisons free pages with {p:#x}");
                return Err(HintError::GuestPoisons(p));
            }
            let words = freehint_protocol::bitmap::words_for_bits(core.total_bits());
            if core.bits.as_raw_slice().len() != words {
                core.bits = BitVec::repeat(false, words * 64);
                core.bits_clean = true;
            } else {
                core.clear_bits();
            }
            core.round_id = next_cmd_id(core.round_id);
            core.round_epoch = epoch;
            core.layout_replied = false;
            core.state = HintState::Requested;
            BalloonMetrics::inc(&self.shared.metrics.hint_rounds);
            info!(
                "free page hint round {:#x} requested (epoch {epoch})",
                core.round_id
            );
            core.round_id
        };
        self.shared.signal_config();
        Ok(id)
    }

    /// Opens a new sync epoch: call it **right before** each dirty bitmap
    /// sync. Stops the round in progress (the guest sees STOP), discards the
    /// free set collected so far and makes every older [`HintSet`] stale.
    /// Hints still arriving for the old round are dropped and counted.
    /// Returns the new epoch.
    pub fn new_epoch(&self) -> u64 {
        let (epoch, signal) = {
            let mut core = self.shared.lock();
            let epoch = self.shared.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            let signal = matches!(core.state, HintState::Requested | HintState::Started);
            if signal {
                core.state = HintState::Stopped;
            }
            core.clear_bits();
            (epoch, signal)
        };
        if signal {
            self.shared.signal_config();
        }
        epoch
    }

    /// Stops the round in progress without changing the epoch (the set
    /// collected so far stays usable in this epoch).
    pub fn stop(&self) {
        let signal = {
            let mut core = self.shared.lock();
            let s = matches!(core.state, HintState::Requested | HintState::Started);
            if s {
                core.state = HintState::Stopped;
            }
            s
        };
        if signal {
            self.shared.signal_config();
        }
    }

    /// The host no longer needs the hinted pages: the device writes DONE to
    /// `free_page_hint_cmd_id` and raises a config interrupt, so the driver
    /// gives back the pages it set aside. Discards the free set.
    pub fn finish(&self) {
        {
            let mut core = self.shared.lock();
            if core.state == HintState::Idle || core.state == HintState::Done {
                return;
            }
            core.state = HintState::Done;
            core.clear_bits();
        }
        info!("free page hinting done");
        self.shared.signal_config();
    }

    /// Current state.
    pub fn status(&self) -> HintStatus {
        let core = self.shared.lock();
        HintStatus {
            state: core.state,
            cmd_id: core.round_id,
            epoch: self.shared.epoch(),
            round_epoch: core.round_epoch,
            free_pages: core.free_pages(),
        }
    }

    /// A copy of the free set collected so far in this epoch.
    pub fn snapshot(&self) -> HintSet {
        let core = self.shared.lock();
        let epoch = self.shared.epoch();
        let valid = core.round_epoch == epoch && core.state != HintState::Idle;
        let mut words = if valid {
            core.bits.as_raw_slice().to_vec()
        } else {
            Vec::new()
        };
        words.resize(
            freehint_protocol::bitmap::words_for_bits(core.total_bits()),
            0,
        );
        HintSet {
            epoch,
            cmd_id: core.round_id,
            total_bits: core.total_bits(),
            complete: core.state == HintState::Stopped,
            words,
            current_epoch: Arc::clone(&self.shared.epoch),
        }
    }

    /// Applies the live free set to `to_send` (`to_send &= !free`, a word at
    /// a time; bit `i` = layout bit `i`) and returns the number of bits it
    /// cleared. Hints only ever come from the current epoch (older ones were
    /// discarded by [`Self::new_epoch`]), so this is always within the rule.
    pub fn apply_to(&self, to_send: &mut [u64]) -> Result<u64, HintError> {
        let core = self.shared.lock();
        let needed = freehint_protocol::bitmap::words_for_bits(core.total_bits());
        if to_send.len() < needed {
            return Err(HintError::BitmapTooShort {
                needed,
                got: to_send.len(),
            });
        }
        if core.bits_clean || core.round_epoch != self.shared.epoch() {
            return Ok(0);
        }
        Ok(and_not(to_send, core.bits.as_raw_slice()))
    }
}

/// `to_send &= !free` word by word; returns the bits cleared.
fn and_not(to_send: &mut [u64], free: &[u64]) -> u64 {
    let mut cleared = 0u64;
    for (t, f) in to_send.iter_mut().zip(free) {
        let hit = *t & *f;
        cleared += u64::from(hit.count_ones());
        *t &= !*f;
    }
    cleared
}

/// A free page set taken out of the device with [`HintHandle::snapshot`].
/// It may clear bits of a to-send bitmap only while its epoch is the
/// current one.
#[derive(Clone, Debug)]
pub struct HintSet {
    epoch: u64,
    cmd_id: u32,
    total_bits: u64,
    complete: bool,
    words: Vec<u64>,
    current_epoch: Arc<AtomicU64>,
}

impl HintSet {
    /// Epoch the set was collected in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Command id of the round.
    pub fn cmd_id(&self) -> u32 {
        self.cmd_id
    }

    /// Whether the round had ended when the snapshot was taken.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Bits in the set (= pages of RAM covered by the layout).
    pub fn total_bits(&self) -> u64 {
        self.total_bits
    }

    /// Free pages in the set.
    pub fn free_pages(&self) -> u64 {
        freehint_protocol::bitmap::count_ones(&self.words)
    }

    /// The set as little-endian-bit words (bit `i` = word `i / 64`, bit
    /// `i % 64`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether layout bit `bit` is in the set.
    pub fn contains(&self, bit: u64) -> bool {
        freehint_protocol::bitmap::test_bit(&self.words, bit)
    }

    /// Clears every free page from `to_send` (`to_send &= !free`, word
    /// operations) and returns the number of bits cleared — only if the
    /// set's epoch is still the current one, else [`HintError::StaleEpoch`].
    ///
    /// Must not race with [`HintHandle::new_epoch`] (the migrator calls both
    /// from its own loop).
    pub fn apply_to(&self, to_send: &mut [u64]) -> Result<u64, HintError> {
        let current = self.current_epoch.load(Ordering::Acquire);
        if current != self.epoch {
            return Err(HintError::StaleEpoch {
                given: self.epoch,
                current,
            });
        }
        if to_send.len() < self.words.len() {
            return Err(HintError::BitmapTooShort {
                needed: self.words.len(),
                got: to_send.len(),
            });
        }
        Ok(and_not(to_send, &self.words))
    }

    /// [`Self::apply_to`] for a `bitvec` to-send bitmap.
    pub fn apply_to_bits(&self, to_send: &mut BitVec<u64, Lsb0>) -> Result<u64, HintError> {
        self.apply_to(to_send.as_raw_mut_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio_device::Interrupt;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct CountIrq(AtomicUsize);
    impl Interrupt for CountIrq {
        fn signal_queue(&self, _index: u16) {}
        fn signal_config(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn handle(pages: u64) -> (HintHandle, Arc<CountIrq>) {
        let layout = Layout::from_ram_pfn_ranges(&[(0, pages)]).unwrap();
        let shared = Arc::new(HintShared::new(layout, Arc::default()));
        let irq = Arc::new(CountIrq::default());
        shared.set_active(true, Some(irq.clone()), None, true);
        (HintHandle { shared }, irq)
    }

    #[test]
    fn cmd_ids_start_at_min_and_states_follow_qemu() {
        let (h, irq) = handle(256);
        assert_eq!(h.status().state, HintState::Idle);
        let id = h.start_round(0).unwrap();
        assert_eq!(id, 0x8000_0000);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(h.shared.lock().config_cmd_id(), id);
        assert_eq!(h.status().state, HintState::Requested);
        h.shared.lock().on_cmd_id(id, 0).unwrap();
        assert_eq!(h.status().state, HintState::Started);
        h.shared.lock().on_free_block(0, 8 * PAGE_SIZE, 0).unwrap();
        h.shared.lock().on_cmd_id(0, 0).unwrap();
        assert_eq!(h.status().state, HintState::Stopped);
        assert_eq!(h.status().free_pages, 8);
        assert_eq!(h.shared.lock().config_cmd_id(), FREE_PAGE_HINT_CMD_ID_STOP);
        assert_eq!(h.start_round(0).unwrap(), 0x8000_0001);
        h.finish();
        assert_eq!(h.shared.lock().config_cmd_id(), FREE_PAGE_HINT_CMD_ID_DONE);
        assert_eq!(irq.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn cmd_id_wraps_to_min() {
        let (h, _) = handle(64);
        h.shared.lock().round_id = u32::MAX;
        assert_eq!(h.start_round(0).unwrap(), 0x8000_0000);
    }

    #[test]
    fn stale_id_and_epoch_drops() {
        let (h, _) = handle(256);
        let id = h.start_round(0).unwrap();
        assert_eq!(h.shared.lock().on_cmd_id(id + 7, 0), Err(HintDrop::Stale));
        h.shared.lock().on_cmd_id(id, 0).unwrap();
        let e = h.new_epoch();
        assert_eq!(e, 1);
        assert_eq!(h.status().state, HintState::Stopped);
        assert_eq!(
            h.shared.lock().on_free_block(0, PAGE_SIZE, 1),
            Err(HintDrop::Epoch)
        );
        assert_eq!(
            h.start_round(0),
            Err(HintError::StaleEpoch {
                given: 0,
                current: 1
            })
        );
    }

    #[test]
    fn partial_pages_and_outside_layout_are_ignored() {
        let (h, _) = handle(16);
        let id = h.start_round(0).unwrap();
        h.shared.lock().on_cmd_id(id, 0).unwrap();
        // [0x800, 0x3800): pages 1 and 2 whole, two half pages.
        let (m, partial, outside) = h.shared.lock().on_free_block(0x800, 0x3000, 0).unwrap();
        assert_eq!((m, partial, outside), (2, 0x1000, 0));
        // Pages 14..20: 2 inside, 4 outside RAM.
        let (m, _, outside) = h
            .shared
            .lock()
            .on_free_block(14 * PAGE_SIZE, 6 * PAGE_SIZE, 0)
            .unwrap();
        assert_eq!((m, outside), (2, 4 * PAGE_SIZE));
        let s = h.snapshot();
        assert!(s.contains(1) && s.contains(2) && !s.contains(0) && !s.contains(3));
        assert!(s.contains(14) && s.contains(15));
        assert_eq!(s.free_pages(), 4);
        // Huge/overflowing block: clamped, no panic.
        h.shared
            .lock()
            .on_free_block(u64::MAX - 10, u64::MAX, 0)
            .unwrap();
    }

    #[test]
    fn hint_set_applies_only_in_its_epoch() {
        let (h, _) = handle(128);
        let id = h.start_round(0).unwrap();
        h.shared.lock().on_cmd_id(id, 0).unwrap();
        h.shared.lock().on_free_block(0, 64 * PAGE_SIZE, 0).unwrap();
        let set = h.snapshot();
        let mut to_send = vec![!0u64; 2];
        assert_eq!(set.apply_to(&mut to_send), Ok(64));
        assert_eq!(to_send, vec![0, !0]);
        assert_eq!(h.apply_to(&mut [!0u64; 2]), Ok(64));
        assert_eq!(
            h.apply_to(&mut [0u64; 1]),
            Err(HintError::BitmapTooShort { needed: 2, got: 1 })
        );
        h.new_epoch();
        let mut to_send = vec![!0u64; 2];
        assert_eq!(
            set.apply_to(&mut to_send),
            Err(HintError::StaleEpoch {
                given: 0,
                current: 1
            })
        );
        assert_eq!(to_send, vec![!0u64; 2]);
        // The live set was discarded too.
        assert_eq!(h.apply_to(&mut to_send), Ok(0));
        assert_eq!(h.snapshot().free_pages(), 0);
    }

    #[test]
    fn poisoning_guest_is_refused() {
        let (h, _) = handle(64);
        h.shared.set_poison(Some(0xaa));
        assert_eq!(h.start_round(0), Err(HintError::GuestPoisons(0xaa)));
        h.shared.set_poison(Some(0));
        assert!(h.start_round(0).is_ok());
        assert_eq!(h.shared.metrics.snapshot().hint_rounds_refused, 1);
        // PAGE_POISON not offered: unknown, refused.
        h.shared.set_active(true, None, None, false);
        assert_eq!(h.start_round(0), Err(HintError::PoisonUnknown));
    }

    #[test]
    fn inactive_device_refuses_rounds() {
        let layout = Layout::from_ram_pfn_ranges(&[(0, 64)]).unwrap();
        let h = HintHandle {
            shared: Arc::new(HintShared::new(layout, Arc::default())),
        };
        assert_eq!(h.start_round(0), Err(HintError::NotActive));
    }
}
