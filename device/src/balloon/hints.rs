// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Free page hints: the round state machine, the host-side free page set
//! and the epoch rule, plus [`HintHandle`], the API a migrator calls.
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
//! after being hinted is dirty and will be sent after the next sync. The
//! types carry the rule:
//!
//! 1. Turn dirty logging on **before** asking for an epoch.
//! 2. Each dirty bitmap sync opens a new *epoch*: call
//!    [`HintHandle::new_epoch`] **right before** syncing. It is the only way
//!    to get an [`EpochToken`]. It stops the round in progress and throws
//!    away everything collected so far; hints that still arrive for that
//!    round are dropped and counted.
//! 3. Start rounds ([`HintHandle::start_round`]) only **after** the sync
//!    that opened the epoch, and apply hints ([`HintHandle::apply_to`],
//!    [`HintSet::apply_to`]) only to the to-send bitmap of that epoch,
//!    before the next sync. Both take the token and refuse it once the
//!    epoch has moved on.
//!
//! The epoch also moves, discarding the set and making every token stale,
//! when the host stops hinting ([`HintHandle::stop`], a cancelled
//! migration) or finishes ([`HintHandle::finish`]), and when the device is
//! activated, reset or restored. So nothing collected for one migration
//! attempt can clear a page in the next: while dirty logging is off between
//! attempts, the guest may rewrite a page it had hinted, and nothing would
//! mark it dirty.
//!
//! Why the order matters: a page hinted at time *t* and reused at *t'* is
//! marked dirty at *t'*. If a sync happened between *t'* and the moment the
//! hint is applied, that dirty bit is already in the to-send bitmap and the
//! hint would wrongly clear it. Hints collected in an epoch can never be
//! older than the sync that opened it, because the round that produced them
//! started after that sync.
//!
//! # The device's own writes
//!
//! The device writes guest memory itself (used rings, bitmap-protocol
//! replies) and discards pages (inflate, free page reporting). Those
//! changes do not go through the guest's page tables, so a dirty log kept
//! by the VMM or the kernel for the guest may not see them.
//! [`HintHandle::take_device_dirty`] returns them in the same bit order as
//! the free set; OR them into the to-send bitmap at every sync.
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
//! // Dirty logging is on. The first epoch opens with the bulk phase.
//! let mut token = hints.new_epoch();
//! let mut to_send = vec![!0u64; 1024 / 64]; // bulk phase: everything
//! for _iteration in 0..3 {
//!     if let Ok(cmd_id) = hints.start_round(&token) {
//!         // ... send pages; the guest reports free pages meanwhile ...
//!         let cleared = hints.apply_to(&token, &mut to_send).unwrap_or(0);
//!         # let _ = (cmd_id, cleared);
//!     }
//!     // Next iteration: a new epoch right before the sync.
//!     token = hints.new_epoch();
//!     sync_dirty_log(&mut to_send);
//!     for (t, d) in to_send.iter_mut().zip(hints.take_device_dirty()) {
//!         *t |= d;
//!     }
//! }
//! // At the end of migration (or when giving up): let the guest reuse the
//! // pages it had to set aside. The token is stale from here on.
//! hints.finish();
//! assert!(hints.apply_to(&token, &mut to_send).is_err());
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bitvec::prelude::*;
use freehint_protocol::balloon::{
    next_cmd_id, FREE_PAGE_HINT_CMD_ID_DONE, FREE_PAGE_HINT_CMD_ID_STOP,
};
use freehint_protocol::bitmap_hint::ChunkHeader;
use freehint_protocol::layout::{Layout, PAGE_SHIFT, PAGE_SIZE};
use log::{debug, info, warn};

use super::dirty::DeviceDirtyLog;
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
    /// The round ended: the driver sent STOP/ROUND_END (the collected set
    /// stays usable in this epoch), or the host ended it with
    /// [`HintHandle::new_epoch`] or [`HintHandle::stop`] (the set was
    /// discarded).
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
    /// The token (or the set) belongs to an epoch that is over: a sync,
    /// [`HintHandle::stop`], [`HintHandle::finish`] or a device reset came
    /// after it. Take a new token with [`HintHandle::new_epoch`] right
    /// before the next sync.
    #[error("epoch {given} is over (current epoch is {current}): take a new token with new_epoch() before the next dirty log sync")]
    StaleEpoch {
        /// Epoch of the token, or the one the set was collected in.
        given: u64,
        /// Current epoch.
        current: u64,
    },
    /// The token was handed out by another device.
    #[error("the epoch token belongs to another balloon device")]
    ForeignToken,
    /// The to-send bitmap does not cover the layout.
    #[error("to-send bitmap has {got} words, the layout needs {needed}")]
    BitmapTooShort {
        /// Words needed.
        needed: usize,
        /// Words given.
        got: usize,
    },
}

/// Proof that the holder opened the current sync epoch with
/// [`HintHandle::new_epoch`]: the only thing that starts a hint round or
/// lets hints clear pages. It cannot be built, cloned or copied outside this
/// crate, and it goes stale when the epoch moves on (next `new_epoch`,
/// `stop`, `finish`, device activation, reset or restore).
#[derive(Debug, PartialEq, Eq)]
pub struct EpochToken {
    device: u64,
    epoch: u64,
}

impl EpochToken {
    /// The epoch number (for logs and status output).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl fmt::Display for EpochToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.epoch)
    }
}

/// A snapshot of the hint machinery for the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintStatus {
    /// Round state.
    pub state: HintState,
    /// Command id of the latest round (0 before the first).
    pub cmd_id: u32,
    /// Current sync epoch (a number to show; tokens come from
    /// [`HintHandle::new_epoch`] only).
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
    /// The epoch moved since the round started (which ended the round).
    Epoch,
}

/// The state machine and the free set. Always used under the mutex in
/// [`HintShared`].
///
/// Invariant: a round accepts hints only in [`HintState::Started`], and
/// every epoch move ([`Self::move_epoch`]) leaves that state and clears the
/// set. So the set only ever holds hints of the current epoch, and the
/// guest-facing methods need no epoch check of their own.
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
    /// Current sync epoch.
    epoch: u64,
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
            epoch: 0,
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

    fn round_in_progress(&self) -> bool {
        matches!(self.state, HintState::Requested | HintState::Started)
    }

    /// Ends the epoch: the state becomes `end` (STOP only ends a round in
    /// progress, DONE only follows a round), the free set is discarded and
    /// every token of the old epoch goes stale. Returns whether a round was
    /// in progress.
    fn move_epoch(&mut self, end: HintState) -> bool {
        let was_running = self.round_in_progress();
        self.state = match end {
            HintState::Stopped if !was_running => self.state,
            HintState::Done if self.state == HintState::Idle => HintState::Idle,
            _ => end,
        };
        self.epoch = self.epoch.wrapping_add(1);
        self.layout_replied = false;
        self.clear_bits();
        was_running
    }

    /// Why a message naming `cmd_id` is not merged: the latest round's id
    /// after an epoch move ended that round is an epoch drop; anything else
    /// (including any message before the first round) is stale.
    fn drop_reason(&self, cmd_id: u32) -> HintDrop {
        let had_round = self.round_id != 0;
        if had_round && cmd_id == self.round_id && self.round_epoch != self.epoch {
            HintDrop::Epoch
        } else {
            HintDrop::Stale
        }
    }

    /// Whether hints for `cmd_id` may be merged now.
    fn accepting(&self, cmd_id: u32) -> Result<(), HintDrop> {
        if self.state == HintState::Started && cmd_id == self.round_id {
            Ok(())
        } else {
            Err(self.drop_reason(cmd_id))
        }
    }

    /// Checks `token` opened the current epoch of device `device`.
    fn check_token(&self, device: u64, token: &EpochToken) -> Result<(), HintError> {
        if token.device != device {
            return Err(HintError::ForeignToken);
        }
        if token.epoch != self.epoch {
            return Err(HintError::StaleEpoch {
                given: token.epoch,
                current: self.epoch,
            });
        }
        Ok(())
    }

    /// Why a round cannot start now, if it cannot.
    fn refusal(&self) -> Option<HintError> {
        if !self.active {
            return Some(HintError::NotActive);
        }
        if self.poison_unknown {
            warn!("free page hinting refused: PAGE_POISON not offered");
            return Some(HintError::PoisonUnknown);
        }
        if let Some(p) = self.poison {
            warn!("free page hinting refused: guest poisons free pages with {p:#x}");
            return Some(HintError::GuestPoisons(p));
        }
        None
    }

    /// Starts a round in the current epoch with an empty set; returns its id.
    fn begin_round(&mut self) -> u32 {
        let words = freehint_protocol::bitmap::words_for_bits(self.total_bits());
        if self.bits.as_raw_slice().len() != words {
            self.bits = BitVec::repeat(false, words * 64);
            self.bits_clean = true;
        } else {
            self.clear_bits();
        }
        self.round_id = next_cmd_id(self.round_id);
        self.round_epoch = self.epoch;
        self.layout_replied = false;
        self.state = HintState::Requested;
        self.round_id
    }

    /// Standard protocol: the driver's 4-byte command id outbuf.
    ///
    /// STOP ends only a round the driver started: in `Requested` it is the
    /// end of the previous round arriving late (Linux and the freehint
    /// driver send STOP after every round), and QEMU ignores it there too.
    pub(crate) fn on_cmd_id(&mut self, id: u32) -> Result<(), HintDrop> {
        if id == FREE_PAGE_HINT_CMD_ID_STOP {
            self.accepting(self.round_id)?;
            debug!(
                "free page hint round {:#x}: driver sent STOP",
                self.round_id
            );
            self.state = HintState::Stopped;
            return Ok(());
        }
        if id != self.round_id {
            return Err(HintDrop::Stale);
        }
        match self.state {
            HintState::Requested => {
                debug!("free page hint round {id:#x}: started by driver");
                self.state = HintState::Started;
                Ok(())
            }
            HintState::Started => Ok(()), // repeated id: harmless
            _ => Err(self.drop_reason(id)),
        }
    }

    /// Standard protocol: a free block (an inbuf; its address and length are
    /// the free range). Returns the pages merged and the bytes ignored
    /// (partial pages, outside the layout).
    pub(crate) fn on_free_block(
        &mut self,
        addr: u64,
        len: u64,
    ) -> Result<(u64, u64, u64), HintDrop> {
        self.accepting(self.round_id)?;
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
    pub(crate) fn on_layout_query(&mut self, cmd_id: u32) -> Result<Layout, HintDrop> {
        match self.state {
            HintState::Requested | HintState::Started if cmd_id == self.round_id => {
                self.state = HintState::Started;
                self.layout_replied = true;
                Ok(self.layout)
            }
            _ => Err(self.drop_reason(cmd_id)),
        }
    }

    /// Bitmap protocol: checks a chunk may be merged now.
    pub(crate) fn chunk_accepted(&self, h: &ChunkHeader) -> Result<(), HintDrop> {
        self.accepting(h.cmd_id)?;
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
    pub(crate) fn on_round_end(&mut self, cmd_id: u32) -> Result<(), HintDrop> {
        self.accepting(cmd_id)?;
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

    /// The free set as words, sized to the layout.
    fn words(&self) -> Vec<u64> {
        let mut words = self.bits.as_raw_slice().to_vec();
        words.resize(
            freehint_protocol::bitmap::words_for_bits(self.total_bits()),
            0,
        );
        words
    }
}

/// Source of device ids, so a token of one device is refused by another.
static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// State shared between the device (transport thread) and the migrator.
pub(crate) struct HintShared {
    /// Identity of this device in its tokens.
    device: u64,
    pub(crate) core: Mutex<HintCore>,
    /// The transport's interrupt while activated.
    pub(crate) interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    pub(crate) metrics: Arc<BalloonMetrics>,
    /// Guest pages the device wrote or discarded.
    pub(crate) dirty: Arc<DeviceDirtyLog>,
}

impl fmt::Debug for HintShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HintShared")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl HintShared {
    pub(crate) fn new(
        layout: Layout,
        metrics: Arc<BalloonMetrics>,
        dirty: Arc<DeviceDirtyLog>,
    ) -> Self {
        Self {
            device: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            core: Mutex::new(HintCore::new(layout)),
            interrupt: Mutex::new(None),
            metrics,
            dirty,
        }
    }

    /// Locks the core; a poisoned lock (a panic elsewhere) still yields the
    /// data, which stays consistent because every update is a single step.
    pub(crate) fn lock(&self) -> MutexGuard<'_, HintCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Device side: activation/reset/restore. `poison` is the negotiated
    /// `poison_val` (`None` if PAGE_POISON was not negotiated);
    /// `poison_offered` whether the device offered PAGE_POISON at all. A new
    /// driver instance knows nothing of earlier rounds: the epoch moves and
    /// the state goes back to idle.
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
        core.move_epoch(HintState::Idle);
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
    /// aside (hints never cross a migration: the destination's migrator
    /// opens its own epochs).
    pub(crate) fn restore_round(&self, round_id: u32, had_round: bool) {
        let mut core = self.lock();
        core.round_id = round_id;
        core.move_epoch(HintState::Idle);
        core.round_epoch = core.epoch;
        if had_round {
            core.state = HintState::Done;
        }
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

    /// Moves the epoch (ending a round in progress in `end`) and tells the
    /// guest if a round was running or `end` is DONE.
    fn end_epoch(&self, end: HintState) -> u64 {
        let (epoch, signal) = {
            let mut core = self.lock();
            let before = core.state;
            let was_running = core.move_epoch(end);
            let done_now = core.state == HintState::Done && before != HintState::Done;
            (core.epoch, was_running || done_now)
        };
        if signal {
            self.signal_config();
        }
        epoch
    }
}

/// The host-side (migrator) API of free page hinting. Cheap to clone; all
/// methods may be called from any thread.
#[derive(Clone, Debug)]
pub struct HintHandle {
    pub(crate) shared: Arc<HintShared>,
}

impl HintHandle {
    /// Opens a new sync epoch and returns its token: call it **right
    /// before** each dirty bitmap sync (including the first, when dirty
    /// logging has just been turned on). Stops the round in progress (the
    /// guest sees STOP), discards the free set collected so far and makes
    /// every older token and [`HintSet`] stale. Hints still arriving for the
    /// old round are dropped and counted.
    pub fn new_epoch(&self) -> EpochToken {
        let epoch = self.shared.end_epoch(HintState::Stopped);
        debug!("free page hint epoch {epoch} opened");
        EpochToken {
            device: self.shared.device,
            epoch,
        }
    }

    /// Starts a hint round in the epoch of `token` and returns its command
    /// id (from 0x80000000, wrapping, never STOP/DONE): the device publishes
    /// the id in config space and raises a config interrupt.
    ///
    /// The caller **must have dirty logging on** and must call this only
    /// after the dirty bitmap sync that followed [`Self::new_epoch`] (see the
    /// module docs). A round in progress is replaced (its hints are
    /// discarded).
    pub fn start_round(&self, token: &EpochToken) -> Result<u32, HintError> {
        let id = {
            let mut core = self.shared.lock();
            core.check_token(self.shared.device, token)?;
            if let Some(e) = core.refusal() {
                BalloonMetrics::inc(&self.shared.metrics.hint_rounds_refused);
                return Err(e);
            }
            core.begin_round()
        };
        BalloonMetrics::inc(&self.shared.metrics.hint_rounds);
        info!("free page hint round {id:#x} requested (epoch {token})");
        self.shared.signal_config();
        Ok(id)
    }

    /// The host stops hinting, e.g. because the migration was cancelled:
    /// ends the round in progress (the guest sees STOP), discards the free
    /// set and moves the epoch, so no token or set of this attempt can clear
    /// a page later. Hints already applied to a to-send bitmap stay valid
    /// only as long as dirty logging stays on for that bitmap.
    pub fn stop(&self) {
        let epoch = self.shared.end_epoch(HintState::Stopped);
        info!("free page hinting stopped by the host (epoch {epoch} opened)");
    }

    /// The host no longer needs the hinted pages: the device writes DONE to
    /// `free_page_hint_cmd_id` and raises a config interrupt, so the driver
    /// gives back the pages it set aside. Discards the free set and moves
    /// the epoch, like [`Self::stop`].
    pub fn finish(&self) {
        self.shared.end_epoch(HintState::Done);
        info!("free page hinting done");
    }

    /// Current state.
    pub fn status(&self) -> HintStatus {
        let core = self.shared.lock();
        HintStatus {
            state: core.state,
            cmd_id: core.round_id,
            epoch: core.epoch,
            round_epoch: core.round_epoch,
            free_pages: core.free_pages(),
        }
    }

    /// A copy of the free set collected so far in the current epoch, to be
    /// applied with [`HintSet::apply_to`] while that epoch lasts.
    pub fn snapshot(&self) -> HintSet {
        let core = self.shared.lock();
        HintSet {
            epoch: core.epoch,
            cmd_id: core.round_id,
            total_bits: core.total_bits(),
            complete: core.state == HintState::Stopped,
            words: core.words(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Applies the live free set to `to_send` (`to_send &= !free`, a word at
    /// a time; bit `i` = layout bit `i`) and returns the number of bits it
    /// cleared, if `token` opened the current epoch (else
    /// [`HintError::StaleEpoch`]).
    pub fn apply_to(&self, token: &EpochToken, to_send: &mut [u64]) -> Result<u64, HintError> {
        let core = self.shared.lock();
        core.check_token(self.shared.device, token)?;
        let needed = freehint_protocol::bitmap::words_for_bits(core.total_bits());
        if to_send.len() < needed {
            return Err(HintError::BitmapTooShort {
                needed,
                got: to_send.len(),
            });
        }
        if core.bits_clean {
            return Ok(0);
        }
        Ok(and_not(to_send, core.bits.as_raw_slice()))
    }

    /// Takes the guest pages the device itself changed since the last call
    /// (used ring entries and indexes, bitmap-protocol replies, discarded
    /// pages) and forgets them. The result is a bitmap in the free set's
    /// order: bit `i` = layout bit `i` (`words_for_bits(total_bits)` words).
    /// Pages outside the layout cannot be expressed and are counted in
    /// `device_dirty_outside_layout` instead. OR it into the to-send bitmap
    /// at every dirty log sync.
    pub fn take_device_dirty(&self) -> Vec<u64> {
        self.shared.dirty.take()
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
/// current one, proven by that epoch's [`EpochToken`].
#[derive(Clone, Debug)]
pub struct HintSet {
    epoch: u64,
    cmd_id: u32,
    total_bits: u64,
    complete: bool,
    words: Vec<u64>,
    shared: Arc<HintShared>,
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
    /// operations) and returns the number of bits cleared — only if the set
    /// was taken in the epoch `token` opened and that epoch is still the
    /// current one, else [`HintError::StaleEpoch`].
    ///
    /// Must not race with [`HintHandle::new_epoch`] (the migrator calls both
    /// from its own loop).
    pub fn apply_to(&self, token: &EpochToken, to_send: &mut [u64]) -> Result<u64, HintError> {
        self.shared.lock().check_token(self.shared.device, token)?;
        if token.epoch != self.epoch {
            return Err(HintError::StaleEpoch {
                given: self.epoch,
                current: token.epoch,
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
    pub fn apply_to_bits(
        &self,
        token: &EpochToken,
        to_send: &mut BitVec<u64, Lsb0>,
    ) -> Result<u64, HintError> {
        self.apply_to(token, to_send.as_raw_mut_slice())
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

    fn shared(pages: u64) -> Arc<HintShared> {
        let layout = Layout::from_ram_pfn_ranges(&[(0, pages)]).unwrap();
        let dirty = Arc::new(DeviceDirtyLog::new(layout));
        Arc::new(HintShared::new(layout, Arc::default(), dirty))
    }

    fn handle(pages: u64) -> (HintHandle, Arc<CountIrq>) {
        let shared = shared(pages);
        let irq = Arc::new(CountIrq::default());
        shared.set_active(true, Some(irq.clone()), None, true);
        (HintHandle { shared }, irq)
    }

    /// Starts a round in a fresh epoch and lets the driver acknowledge it.
    fn started(h: &HintHandle) -> (EpochToken, u32) {
        let t = h.new_epoch();
        let id = h.start_round(&t).unwrap();
        h.shared.lock().on_cmd_id(id).unwrap();
        (t, id)
    }

    #[test]
    fn cmd_ids_start_at_min_and_states_follow_qemu() {
        let (h, irq) = handle(256);
        assert_eq!(h.status().state, HintState::Idle);
        let t = h.new_epoch();
        let id = h.start_round(&t).unwrap();
        assert_eq!(id, 0x8000_0000);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(h.shared.lock().config_cmd_id(), id);
        assert_eq!(h.status().state, HintState::Requested);
        h.shared.lock().on_cmd_id(id).unwrap();
        assert_eq!(h.status().state, HintState::Started);
        h.shared.lock().on_free_block(0, 8 * PAGE_SIZE).unwrap();
        h.shared.lock().on_cmd_id(0).unwrap();
        assert_eq!(h.status().state, HintState::Stopped);
        assert_eq!(h.status().free_pages, 8);
        assert_eq!(h.shared.lock().config_cmd_id(), FREE_PAGE_HINT_CMD_ID_STOP);
        assert_eq!(h.start_round(&t).unwrap(), 0x8000_0001);
        h.finish();
        assert_eq!(h.shared.lock().config_cmd_id(), FREE_PAGE_HINT_CMD_ID_DONE);
        assert_eq!(irq.0.load(Ordering::SeqCst), 3);
        // A second finish changes nothing the guest sees.
        h.finish();
        assert_eq!(irq.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn cmd_id_wraps_to_min() {
        let (h, _) = handle(64);
        h.shared.lock().round_id = u32::MAX;
        assert_eq!(h.start_round(&h.new_epoch()).unwrap(), 0x8000_0000);
    }

    #[test]
    fn stale_id_and_epoch_drops() {
        let (h, _) = handle(256);
        let t0 = h.new_epoch();
        let id = h.start_round(&t0).unwrap();
        assert_eq!(h.shared.lock().on_cmd_id(id + 7), Err(HintDrop::Stale));
        h.shared.lock().on_cmd_id(id).unwrap();
        let t1 = h.new_epoch();
        assert_eq!(t1.epoch(), t0.epoch() + 1);
        assert_eq!(h.status().state, HintState::Stopped);
        assert_eq!(
            h.shared.lock().on_free_block(0, PAGE_SIZE),
            Err(HintDrop::Epoch)
        );
        assert_eq!(
            h.start_round(&t0),
            Err(HintError::StaleEpoch {
                given: t0.epoch(),
                current: t1.epoch()
            })
        );
    }

    /// The driver's STOP for the previous round, arriving after the host
    /// requested a new one, does not end the new round (QEMU ignores STOP
    /// unless the round has started).
    #[test]
    fn stop_before_the_new_round_started_is_ignored() {
        let (h, _) = handle(64);
        let (t, _) = started(&h);
        let id = h.start_round(&t).unwrap();
        assert_eq!(
            h.shared.lock().on_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP),
            Err(HintDrop::Stale)
        );
        assert_eq!(h.status().state, HintState::Requested);
        h.shared.lock().on_cmd_id(id).unwrap();
        assert_eq!(
            h.shared.lock().on_free_block(0, 4 * PAGE_SIZE),
            Ok((4, 0, 0))
        );
    }

    #[test]
    fn partial_pages_and_outside_layout_are_ignored() {
        let (h, _) = handle(16);
        started(&h);
        // [0x800, 0x3800): pages 1 and 2 whole, two half pages.
        let (m, partial, outside) = h.shared.lock().on_free_block(0x800, 0x3000).unwrap();
        assert_eq!((m, partial, outside), (2, 0x1000, 0));
        // Pages 14..20: 2 inside, 4 outside RAM.
        let (m, _, outside) = h
            .shared
            .lock()
            .on_free_block(14 * PAGE_SIZE, 6 * PAGE_SIZE)
            .unwrap();
        assert_eq!((m, outside), (2, 4 * PAGE_SIZE));
        let s = h.snapshot();
        assert!(s.contains(1) && s.contains(2) && !s.contains(0) && !s.contains(3));
        assert!(s.contains(14) && s.contains(15));
        assert_eq!(s.free_pages(), 4);
        // Huge/overflowing block: clamped, no panic.
        h.shared
            .lock()
            .on_free_block(u64::MAX - 10, u64::MAX)
            .unwrap();
    }

    #[test]
    fn hint_set_applies_only_in_its_epoch() {
        let (h, _) = handle(128);
        let (t0, _) = started(&h);
        h.shared.lock().on_free_block(0, 64 * PAGE_SIZE).unwrap();
        let set = h.snapshot();
        let mut to_send = vec![!0u64; 2];
        assert_eq!(set.apply_to(&t0, &mut to_send), Ok(64));
        assert_eq!(to_send, vec![0, !0]);
        assert_eq!(h.apply_to(&t0, &mut [!0u64; 2]), Ok(64));
        assert_eq!(
            h.apply_to(&t0, &mut [0u64; 1]),
            Err(HintError::BitmapTooShort { needed: 2, got: 1 })
        );
        let t1 = h.new_epoch();
        let mut to_send = vec![!0u64; 2];
        let stale = Err(HintError::StaleEpoch {
            given: t0.epoch(),
            current: t1.epoch(),
        });
        assert_eq!(set.apply_to(&t0, &mut to_send), stale);
        assert_eq!(h.apply_to(&t0, &mut to_send), stale);
        // The new token does not revive the old set either.
        assert_eq!(
            set.apply_to(&t1, &mut to_send),
            Err(HintError::StaleEpoch {
                given: t0.epoch(),
                current: t1.epoch()
            })
        );
        assert_eq!(to_send, vec![!0u64; 2]);
        // The live set was discarded too.
        assert_eq!(h.apply_to(&t1, &mut to_send), Ok(0));
        assert_eq!(h.snapshot().free_pages(), 0);
    }

    #[test]
    fn tokens_of_another_device_are_refused() {
        let (a, _) = handle(64);
        let (b, _) = handle(64);
        let ta = a.new_epoch();
        b.new_epoch();
        assert_eq!(b.start_round(&ta), Err(HintError::ForeignToken));
        assert_eq!(b.apply_to(&ta, &mut [!0u64]), Err(HintError::ForeignToken));
        assert_eq!(
            b.snapshot().apply_to(&ta, &mut [!0u64]),
            Err(HintError::ForeignToken)
        );
    }

    #[test]
    fn poisoning_guest_is_refused() {
        let (h, _) = handle(64);
        let t = h.new_epoch();
        h.shared.set_poison(Some(0xaa));
        assert_eq!(h.start_round(&t), Err(HintError::GuestPoisons(0xaa)));
        h.shared.set_poison(Some(0));
        assert!(h.start_round(&t).is_ok());
        assert_eq!(h.shared.metrics.snapshot().hint_rounds_refused, 1);
        // PAGE_POISON not offered: unknown, refused.
        h.shared.set_active(true, None, None, false);
        assert_eq!(h.start_round(&h.new_epoch()), Err(HintError::PoisonUnknown));
    }

    #[test]
    fn inactive_device_refuses_rounds() {
        let h = HintHandle { shared: shared(64) };
        assert_eq!(h.start_round(&h.new_epoch()), Err(HintError::NotActive));
    }
}
