//! Free page hints and device writes from the balloon device model, through
//! a [`HintPort`]: the device's `HintHandle` in the same process (a Rust VMM
//! that embeds both, feature `device`), or the control socket of a device
//! server in another process ([`ControlPort`](crate::control_port::ControlPort)).
//!
//! - [`DeviceHints`] is a [`HintSource`] over a port: it opens a device
//!   epoch ([`HintPort::new_epoch`]) in [`HintSource::before_sync`], right
//!   before each dirty-log sync, starts a hint round after the sync
//!   ([`HintSource::on_sync`]) when its [`RoundPolicy`] says so, and reports
//!   the free set of the current epoch, which the device serves only while
//!   that epoch is current ([`HintPort::free_set`]).
//! - [`DeviceDirtyLog`] is a [`DirtyLog`] of the device's own writes to
//!   guest RAM ([`HintPort::take_device_dirty`]); merge it with the guest's
//!   log with [`AnyOf`](crate::AnyOf).
//!
//! # Epochs and syncs
//!
//! The engine forgets its hints at every sync, and a device token goes
//! stale when the next epoch opens, so no hint is ever used across a sync.
//! The device wants its epoch opened *before* the sync: then a round still
//! running at the sync is stopped first, and a hint the guest gathered
//! before the sync cannot land in the new epoch's set. [`DeviceHints`] does
//! so in `before_sync`. If a caller never calls `before_sync` (an engine
//! that only calls `on_sync`), `on_sync` opens the epoch itself, just after
//! the sync: still safe, because `new_epoch` discards everything gathered
//! before it and drops late replies of the old round, and this source
//! reports nothing between the sync and `on_sync`, so every hint it reports
//! comes from a round started after the sync. Epoch 0 follows the start of
//! the dirty log, not a sync: `on_sync(0)` opens it.
//!
//! # Page order
//!
//! The device numbers pages in the order of its [`Layout`] (pfn ranges,
//! holes such as the x86 PCI hole folded out); the migrator in the order of
//! its [`RamLayout`] (ranges in guest-physical order, back to back). Both
//! adapters convert through a [`PageMap`], built once, which refuses
//! layouts that do not cover exactly the same guest pages.
//!
//! # Ending
//!
//! When the migration ends, succeeded or failed, the guest must get back
//! the pages it set aside for the rounds: call [`DeviceHints::finish`], or
//! drop the source (its `Drop` finishes). [`Engine::run`](crate::Engine::run)
//! drops a source passed by value when it returns; pass `&mut hints` to
//! keep it (and then finish it yourself).

use std::time::{Duration, Instant};

use bitvec::prelude::{BitVec, Lsb0};
use freehint_protocol::layout::{Layout, Pfn};

use crate::bits::PageBits;
use crate::dirty::{DirtyLog, HookError};
use crate::hints::HintSource;
use crate::layout::RamLayout;

/// Why a [`HintPort`] refused or failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The device will not hint now (the driver did not negotiate hinting,
    /// the guest poisons free pages, the device is not active, ...).
    #[error("the device refused: {0}")]
    Refused(String),
    /// The epoch is over: the set is no longer usable.
    #[error("stale epoch: {0}")]
    Stale(String),
    /// The port itself failed (the device server went away, a bad reply).
    #[error("hint port failed: {0}")]
    Failed(String),
}

/// What [`DeviceHints`] and [`DeviceDirtyLog`] need from a balloon device.
pub trait HintPort {
    /// Proof of an open epoch.
    type Epoch: std::fmt::Debug;
    /// Opens a new epoch; every earlier one goes stale.
    fn new_epoch(&mut self) -> Result<Self::Epoch, PortError>;
    /// Starts a hint round in `epoch`; returns its command id.
    fn start_round(&mut self, epoch: &Self::Epoch) -> Result<u32, PortError>;
    /// Free pages collected so far and the round's command id: the set has
    /// not changed while this stays the same.
    fn progress(&mut self) -> Result<(u64, u32), PortError>;
    /// Sets in `free` (device bit order, sized [`PageMap::device_bits`])
    /// the pages reported free in `epoch`, which must still be current.
    fn free_set(
        &mut self,
        epoch: &Self::Epoch,
        free: &mut BitVec<u64, Lsb0>,
    ) -> Result<(), PortError>;
    /// Ends hinting (the guest gets its set-aside pages back).
    fn finish(&mut self);
    /// The guest pages the device wrote or discarded since the last call,
    /// in device bit order (words, bit *i* = layout bit *i*).
    fn take_device_dirty(&mut self) -> Result<Vec<u64>, PortError>;
}

/// Guest pages the device's layout and the migrator's layout disagree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutMismatch {
    /// Guest RAM the migrator sends but the device cannot hint.
    #[error("guest RAM pfns {first_pfn:#x}..{end_pfn:#x} are not in the balloon device's layout")]
    NotInDevice {
        /// First pfn of the first such run.
        first_pfn: Pfn,
        /// One past its last pfn.
        end_pfn: Pfn,
    },
    /// Pages the device can hint that the migrator does not send.
    #[error("the balloon device's layout has pfns {first_pfn:#x}..{end_pfn:#x}, which are not guest RAM of the migration")]
    NotInRam {
        /// First pfn of the first such run.
        first_pfn: Pfn,
        /// One past its last pfn.
        end_pfn: Pfn,
    },
}

/// Pages that are consecutive both in the migrator's page order and in the
/// device's bit order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapRun {
    /// Migrator page index of the first page.
    page: usize,
    /// Device bit of the first page.
    bit: usize,
    /// Pages in the run.
    len: usize,
}

/// Device layout bits to migrator page indices, as [`MapRun`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMap {
    runs: Vec<MapRun>,
    device_bits: usize,
}

impl PageMap {
    /// The map between `device` and `ram`, which must cover the same guest
    /// pages.
    pub fn new(device: &Layout, ram: &RamLayout) -> Result<Self, LayoutMismatch> {
        let dev: Vec<(Pfn, Pfn)> = device
            .ranges()
            .iter()
            .map(|r| (r.first_pfn, r.end_pfn()))
            .collect();
        let mig: Vec<(Pfn, Pfn)> = ram
            .ranges()
            .iter()
            .map(|r| {
                let pfn = Pfn::from_addr(r.gpa.0);
                (pfn, pfn.unchecked_add(r.pages))
            })
            .collect();
        if let Some((first_pfn, end_pfn)) = first_gap(&mig, &dev) {
            return Err(LayoutMismatch::NotInDevice { first_pfn, end_pfn });
        }
        if let Some((first_pfn, end_pfn)) = first_gap(&dev, &mig) {
            return Err(LayoutMismatch::NotInRam { first_pfn, end_pfn });
        }
        let mut runs = Vec::new();
        for (index, &(m_lo, m_hi)) in mig.iter().enumerate() {
            let first_page = ram.pages_of(index).map_or(0, |p| p.start);
            for r in device.ranges() {
                let (lo, hi) = (m_lo.max(r.first_pfn), m_hi.min(r.end_pfn()));
                if lo < hi {
                    let bit = r
                        .first_bit
                        .unchecked_add(lo.unchecked_offset_from(r.first_pfn));
                    runs.push(MapRun {
                        page: (first_page + lo.unchecked_offset_from(m_lo)) as usize,
                        bit: bit.index(),
                        len: hi.unchecked_offset_from(lo) as usize,
                    });
                }
            }
        }
        Ok(Self {
            runs,
            device_bits: device.total_bits() as usize,
        })
    }

    /// Bits in the device's bitmaps.
    pub fn device_bits(&self) -> usize {
        self.device_bits
    }

    /// ORs device bitmap `bits` into migrator bitmap `pages` (never clears).
    pub fn or_into(&self, bits: &PageBits, pages: &mut PageBits) {
        for &MapRun { page, bit, len } in &self.runs {
            if let (Some(src), Some(dst)) =
                (bits.get(bit..bit + len), pages.get_mut(page..page + len))
            {
                *dst |= src;
            }
        }
    }
}

/// The first piece of `spans` that `covers` does not cover (both sorted,
/// non-overlapping, as `[lo, hi)`).
fn first_gap(spans: &[(Pfn, Pfn)], covers: &[(Pfn, Pfn)]) -> Option<(Pfn, Pfn)> {
    for &(lo, hi) in spans {
        let mut at = lo;
        for &(c_lo, c_hi) in covers {
            if c_hi <= at || c_lo >= hi {
                continue;
            }
            if c_lo > at {
                return Some((at, c_lo));
            }
            at = c_hi;
            if at >= hi {
                break;
            }
        }
        if at < hi {
            return Some((at, hi));
        }
    }
    None
}

/// When [`DeviceHints`] asks the guest for a hint round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RoundPolicy {
    /// Only for the bulk pass (epoch 0), where nearly every page is to be
    /// sent: the guest walks its free lists once.
    #[default]
    BulkOnly,
    /// In epochs `0..n`: the bulk pass and the first `n - 1` dirty passes.
    FirstEpochs(u64),
    /// In every epoch. The sync before the final pass opens one too; the
    /// paused guest does not answer it and [`DeviceHints::finish`] ends it.
    EveryEpoch,
}

impl RoundPolicy {
    /// The number of the last pass that uses a round's hints (pass `k`
    /// uses epoch `k`), or `None` when every pass does.
    pub fn last_hinted_pass(self) -> Option<u64> {
        match self {
            Self::BulkOnly => Some(0),
            Self::FirstEpochs(n) => Some(n.saturating_sub(1)),
            Self::EveryEpoch => None,
        }
    }

    fn wants(self, epoch: u64) -> bool {
        match self {
            Self::BulkOnly => epoch == 0,
            Self::FirstEpochs(n) => epoch < n,
            Self::EveryEpoch => true,
        }
    }
}

/// A [`HintSource`] fed by the balloon device model (see the module docs).
#[derive(Debug)]
pub struct DeviceHints<P: HintPort> {
    port: P,
    map: PageMap,
    policy: RoundPolicy,
    /// Opened by `before_sync`, taken by `on_sync`.
    pending: Option<P::Epoch>,
    /// The current epoch.
    epoch: Option<P::Epoch>,
    /// Progress at the last look: nothing new while it stays the same (the
    /// set only grows within an epoch).
    seen: Option<(u64, u32)>,
    /// Look at the port at most this often (zero: at every call).
    poll_every: Duration,
    /// When [`HintSource::mark_free`] last looked at the port.
    last_poll: Option<Instant>,
    /// The free set in device bit order.
    scratch: BitVec<u64, Lsb0>,
    rounds_started: u64,
    last_refusal: Option<PortError>,
    finished: bool,
}

impl<P: HintPort> DeviceHints<P> {
    /// A source over `port`, whose device has layout `device`, for a
    /// migration of `ram` (normally [`Engine::layout`](crate::Engine::layout)).
    pub fn new(
        port: P,
        device: &Layout,
        ram: &RamLayout,
        policy: RoundPolicy,
    ) -> Result<Self, LayoutMismatch> {
        let map = PageMap::new(device, ram)?;
        let scratch = BitVec::repeat(false, map.device_bits());
        Ok(Self {
            port,
            map,
            policy,
            pending: None,
            epoch: None,
            seen: None,
            poll_every: Duration::ZERO,
            last_poll: None,
            scratch,
            rounds_started: 0,
            last_refusal: None,
            finished: false,
        })
    }

    /// Looks at the port at most once per `every` while a pass runs (the
    /// engine asks before every chunk). For a port in another process: each
    /// look is a round trip over its socket (measured: one look per chunk
    /// made a 4 GiB bulk pass take 3.1 s instead of 0.x s). Fewer looks
    /// only mean hints applied a little later; never a wrong one.
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    /// Hint rounds started so far.
    pub fn rounds_started(&self) -> u64 {
        self.rounds_started
    }

    /// Why the device last refused to start a round (the driver did not
    /// negotiate hinting, the guest poisons free pages, ...), if it did.
    pub fn last_refusal(&self) -> Option<&PortError> {
        self.last_refusal.as_ref()
    }

    /// Ends hinting: the guest gets its set-aside pages back, and every
    /// epoch and set of this migration goes stale. Idempotent; `Drop` calls
    /// it.
    pub fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.pending = None;
            self.epoch = None;
            self.port.finish();
        }
    }

    fn open_epoch(&mut self) -> Option<P::Epoch> {
        match self.port.new_epoch() {
            Ok(e) => Some(e),
            Err(e) => {
                log::warn!("cannot open a device epoch: {e}");
                None
            }
        }
    }
}

impl<P: HintPort> Drop for DeviceHints<P> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<P: HintPort> HintSource for DeviceHints<P> {
    fn before_sync(&mut self) {
        if !self.finished {
            self.epoch = None;
            self.pending = self.open_epoch();
        }
    }

    fn on_sync(&mut self, epoch: u64) {
        self.seen = None;
        self.last_poll = None;
        if self.finished {
            return;
        }
        let opened = match self.pending.take() {
            Some(e) => Some(e),
            None => self.open_epoch(),
        };
        let Some(opened) = opened else {
            return;
        };
        if self.policy.wants(epoch) {
            match self.port.start_round(&opened) {
                Ok(id) => {
                    self.rounds_started += 1;
                    log::debug!("hint round {id:#x} in epoch {epoch} (device epoch {opened:?})");
                }
                Err(e) => {
                    log::info!("no hint round in epoch {epoch}: {e}");
                    self.last_refusal = Some(e);
                }
            }
        }
        self.epoch = Some(opened);
    }

    fn mark_free(&mut self, free: &mut PageBits) -> Result<(), HookError> {
        let Some(epoch) = &self.epoch else {
            return Ok(());
        };
        if self
            .last_poll
            .is_some_and(|t| t.elapsed() < self.poll_every)
        {
            return Ok(());
        }
        self.last_poll = Some(Instant::now());
        let progress = self.port.progress().map_err(hook)?;
        if progress.0 == 0 || self.seen == Some(progress) {
            return Ok(());
        }
        self.seen = Some(progress);
        self.scratch.fill(false);
        match self.port.free_set(epoch, &mut self.scratch) {
            Ok(()) => {}
            Err(e @ PortError::Stale(_)) => {
                // The device moved the epoch (reset, restore, stop): no
                // hints until the next sync.
                log::info!("hints dropped: {e}");
                self.epoch = None;
                return Ok(());
            }
            Err(e) => return Err(hook(e)),
        }
        self.map.or_into(&self.scratch, free);
        Ok(())
    }
}

fn hook(e: PortError) -> HookError {
    Box::new(e)
}

/// The device's own writes to guest RAM (used rings, replies, discarded
/// pages) as a [`DirtyLog`], in the migrator's page order.
#[derive(Debug)]
pub struct DeviceDirtyLog<P: HintPort> {
    port: P,
    map: PageMap,
}

impl<P: HintPort> DeviceDirtyLog<P> {
    /// A log over `port`, whose device has layout `device`, for a
    /// migration of `ram`.
    pub fn new(port: P, device: &Layout, ram: &RamLayout) -> Result<Self, LayoutMismatch> {
        Ok(Self {
            port,
            map: PageMap::new(device, ram)?,
        })
    }
}

impl<P: HintPort> DirtyLog for DeviceDirtyLog<P> {
    fn start(&mut self) -> Result<(), HookError> {
        self.port.take_device_dirty().map_err(hook)?;
        Ok(())
    }

    fn sync(&mut self, dirty: &mut PageBits) -> Result<(), HookError> {
        let words = self.port.take_device_dirty().map_err(hook)?;
        self.map.or_into(PageBits::from_slice(&words), dirty);
        Ok(())
    }
}

/// The device's hint API in the same process.
#[cfg(feature = "device")]
impl HintPort for freehint_device::HintHandle {
    type Epoch = freehint_device::EpochToken;

    fn new_epoch(&mut self) -> Result<Self::Epoch, PortError> {
        Ok(freehint_device::HintHandle::new_epoch(self))
    }

    fn start_round(&mut self, epoch: &Self::Epoch) -> Result<u32, PortError> {
        freehint_device::HintHandle::start_round(self, epoch)
            .map_err(|e| PortError::Refused(e.to_string()))
    }

    fn progress(&mut self) -> Result<(u64, u32), PortError> {
        let s = self.status();
        Ok((s.free_pages, s.cmd_id))
    }

    fn free_set(
        &mut self,
        epoch: &Self::Epoch,
        free: &mut BitVec<u64, Lsb0>,
    ) -> Result<(), PortError> {
        use freehint_device::balloon::HintError;
        free.fill(true);
        match self.snapshot().apply_to_bits(epoch, free) {
            Ok(_) => {
                *free = !std::mem::take(free);
                Ok(())
            }
            Err(e @ HintError::StaleEpoch { .. }) => Err(PortError::Stale(e.to_string())),
            Err(e) => Err(PortError::Failed(e.to_string())),
        }
    }

    fn finish(&mut self) {
        freehint_device::HintHandle::finish(self)
    }

    fn take_device_dirty(&mut self) -> Result<Vec<u64>, PortError> {
        Ok(freehint_device::HintHandle::take_device_dirty(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RamRange;
    use crate::{PageBitmap, PAGE_SIZE};
    use vm_memory::GuestAddress;

    fn ram(ranges: &[(u64, u64)]) -> RamLayout {
        let mut offset = 0;
        let ranges = ranges
            .iter()
            .map(|&(pfn, pages)| {
                let r = RamRange {
                    gpa: GuestAddress(pfn * PAGE_SIZE as u64),
                    pages,
                    file_offset: offset,
                };
                offset += pages * PAGE_SIZE as u64;
                r
            })
            .collect();
        RamLayout::new(ranges).unwrap()
    }

    #[test]
    fn same_pages_across_a_hole_map_one_to_one() {
        let dev = Layout::from_ram_pfn_ranges(&[(0, 16), (0x100, 16)]).unwrap();
        let map = PageMap::new(&dev, &ram(&[(0, 16), (0x100, 16)])).unwrap();
        let run = |page, bit, len| MapRun { page, bit, len };
        assert_eq!(map.runs, vec![run(0, 0, 16), run(16, 16, 16)]);
        let mut bits = PageBitmap::repeat(false, 32);
        bits.set(3, true);
        bits.set(17, true);
        let mut pages = PageBitmap::repeat(false, 32);
        map.or_into(&bits, &mut pages);
        assert_eq!(pages.iter_ones().collect::<Vec<_>>(), vec![3, 17]);
    }

    #[test]
    fn split_ranges_are_converted() {
        // The device sees one range where the VMM has two regions.
        let dev = Layout::from_ram_pfn_ranges(&[(0, 32)]).unwrap();
        let map = PageMap::new(&dev, &ram(&[(0, 8), (8, 24)])).unwrap();
        let mut bits = PageBitmap::repeat(false, 32);
        bits.set(7, true);
        bits.set(8, true);
        bits.set(31, true);
        let mut pages = PageBitmap::repeat(false, 32);
        map.or_into(&bits, &mut pages);
        assert_eq!(pages.iter_ones().collect::<Vec<_>>(), vec![7, 8, 31]);
    }

    #[test]
    fn mismatches_are_refused() {
        let dev = Layout::from_ram_pfn_ranges(&[(0, 16)]).unwrap();
        assert_eq!(
            PageMap::new(&dev, &ram(&[(0, 16), (0x100, 4)])),
            Err(LayoutMismatch::NotInDevice {
                first_pfn: Pfn(0x100),
                end_pfn: Pfn(0x104)
            })
        );
        assert_eq!(
            PageMap::new(&dev, &ram(&[(0, 8)])),
            Err(LayoutMismatch::NotInRam {
                first_pfn: Pfn(8),
                end_pfn: Pfn(16)
            })
        );
        let dev = Layout::from_ram_pfn_ranges(&[(0, 4), (8, 8)]).unwrap();
        assert_eq!(
            PageMap::new(&dev, &ram(&[(0, 16)])),
            Err(LayoutMismatch::NotInDevice {
                first_pfn: Pfn(4),
                end_pfn: Pfn(8)
            })
        );
    }
}
