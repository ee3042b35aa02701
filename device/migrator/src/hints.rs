//! Free page hints: pages the guest reported free, which a pass need not
//! copy.
//!
//! A hint is a statement about the past, safe only because the dirty log
//! was already on when the guest walked its free lists: a page reported
//! free and then reused is written, so it is dirty, so it is sent later.
//! The engine therefore
//! - starts the dirty log before the first [`HintSource::on_sync`];
//! - right before every dirty-log sync calls [`HintSource::before_sync`]
//!   (a source that must open its epoch before the sync, as the balloon
//!   device's does, does it there; the default does nothing);
//! - after every dirty-log sync, forgets every hint it holds and calls
//!   [`HintSource::on_sync`] with a new epoch; the source must from then on
//!   report only hints gathered after that call (a free-list walk that
//!   began earlier, or a reply carrying an older command id, is dropped);
//! - uses no hints in the final pass, made with the guest stopped.
//!
//! Hinted pages go on the wire as zero runs: the destination then holds
//! zeros there whether its RAM file is fresh or reused (a guest with
//! `init_on_free` expects free pages to read as zero), and a later pass
//! that finds the page dirty overrides the zero.

use crate::bits::PageBits;
use crate::dirty::HookError;

/// Where hints come from (the balloon device, in a VMM).
pub trait HintSource {
    /// A dirty-log sync is about to begin (not called before epoch 0, which
    /// follows the start of the dirty log, not a sync). No hint gathered
    /// before this call may be reported after it. Does nothing by default.
    fn before_sync(&mut self) {}
    /// A dirty-log sync completed and epoch `epoch` began (epochs increase
    /// from 0, which begins right after the dirty log starts). Drop every
    /// hint gathered before this call.
    fn on_sync(&mut self, epoch: u64);
    /// Sets in `free` the bit of every page reported free in the current
    /// epoch. Never clears bits. Called often (before every chunk a pass
    /// sends), so it should be cheap when nothing is new.
    fn mark_free(&mut self, free: &mut PageBits) -> Result<(), HookError>;
}

impl<H: HintSource + ?Sized> HintSource for &mut H {
    fn before_sync(&mut self) {
        (**self).before_sync()
    }

    fn on_sync(&mut self, epoch: u64) {
        (**self).on_sync(epoch)
    }

    fn mark_free(&mut self, free: &mut PageBits) -> Result<(), HookError> {
        (**self).mark_free(free)
    }
}

/// No hints: every page is copied.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHints;

impl HintSource for NoHints {
    fn on_sync(&mut self, _epoch: u64) {}

    fn mark_free(&mut self, _free: &mut PageBits) -> Result<(), HookError> {
        Ok(())
    }
}
