//! When to stop pre-copy: the convergence policy.
//!
//! After every live pass the engine syncs the dirty log and asks
//! [`Policy::decide`] whether to run another pass or stop the VM for the
//! final one. It stops when
//! - what is left fits the downtime target at the rate the last pass
//!   measured, per page it read (pages hinted free or file holes cost
//!   next to nothing, and the final pass reads every page it sends)
//!   ([`StopReason::FitsDowntime`]), or
//! - passes stopped shrinking: `stall_passes` passes in a row each left
//!   more than `1 - min_shrink` of the pages the pass had to send
//!   ([`StopReason::Stalled`]), or
//! - `max_passes` live passes ran ([`StopReason::MaxPasses`]).

use std::time::Duration;

use serde::Serialize;

use crate::stats::PassStats;

/// The convergence policy (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    /// How long the final pass may take.
    pub downtime: Duration,
    /// A pass makes progress when it leaves at most `1 - min_shrink` of
    /// the pages it had to send (0.0 to 1.0).
    pub min_shrink: f64,
    /// Passes in a row without progress before stopping (0: never stop
    /// for that reason).
    pub stall_passes: u32,
    /// Live passes (bulk and dirty) at most; at least 1.
    pub max_passes: u32,
}

impl Default for Policy {
    /// 300 ms downtime, 10 % shrink, 3 stalled passes, 30 passes.
    fn default() -> Self {
        Self {
            downtime: Duration::from_millis(300),
            min_shrink: 0.1,
            stall_passes: 3,
            max_passes: 30,
        }
    }
}

/// Why pre-copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// What is left fits the downtime target.
    FitsDowntime,
    /// Passes stopped shrinking.
    Stalled,
    /// The pass limit was reached.
    MaxPasses,
}

/// What to do after a live pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run another dirty pass.
    Continue,
    /// Stop the VM and run the final pass.
    Stop(StopReason),
}

impl Policy {
    /// Decides after the live passes `done` (at least one), with `pending`
    /// pages dirty now.
    pub fn decide(&self, done: &[PassStats], pending: u64) -> Decision {
        if self
            .estimate(done, pending)
            .is_some_and(|time| time <= self.downtime)
        {
            return Decision::Stop(StopReason::FitsDowntime);
        }
        if self.stall_passes > 0 && self.stalled(done, pending) >= self.stall_passes {
            return Decision::Stop(StopReason::Stalled);
        }
        if done.len() >= self.max_passes.max(1) as usize {
            return Decision::Stop(StopReason::MaxPasses);
        }
        Decision::Continue
    }

    /// Time to send `pending` pages at the rate of the latest pass that
    /// read any (its whole time over the pages it read); `None` before any
    /// rate is known.
    pub fn estimate(&self, done: &[PassStats], pending: u64) -> Option<Duration> {
        if pending == 0 {
            return Some(Duration::ZERO);
        }
        let last = done.iter().rev().find(|pass| pass.pages_read() > 0)?;
        let micros =
            u128::from(pending) * u128::from(last.elapsed_us) / u128::from(last.pages_read());
        Some(Duration::from_micros(
            u64::try_from(micros).unwrap_or(u64::MAX),
        ))
    }

    /// Passes in a row, ending with the latest, that did not make progress.
    fn stalled(&self, done: &[PassStats], pending: u64) -> u32 {
        let keep = 1.0 - self.min_shrink.clamp(0.0, 1.0);
        // Walk back from the latest pass; `left` is what that pass left.
        let (mut left, mut stalls) = (pending, 0);
        for pass in done.iter().rev() {
            if left as f64 <= pass.pending_pages as f64 * keep {
                break;
            }
            stalls += 1;
            left = pass.pending_pages;
        }
        stalls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PassKind;

    /// A pass that had `pending` pages and handled them all in `ms`.
    fn pass(pending: u64, ms: u64) -> PassStats {
        PassStats {
            pages_sent: pending,
            elapsed_us: ms * 1000,
            ..PassStats::new(0, PassKind::Dirty, pending)
        }
    }

    fn policy() -> Policy {
        Policy {
            downtime: Duration::from_millis(100),
            min_shrink: 0.25,
            stall_passes: 2,
            max_passes: 10,
        }
    }

    #[test]
    fn stops_when_the_rest_fits_the_downtime_at_the_measured_rate() {
        // 1000 pages in 1000 ms: 1 ms per page.
        let done = [pass(1000, 1000)];
        assert_eq!(
            policy().estimate(&done, 100),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            policy().decide(&done, 100),
            Decision::Stop(StopReason::FitsDowntime)
        );
        assert_eq!(policy().decide(&done, 101), Decision::Continue);
        assert_eq!(
            policy().decide(&done, 0),
            Decision::Stop(StopReason::FitsDowntime)
        );
    }

    #[test]
    fn the_latest_rate_counts() {
        // Bulk was fast (zero pages); the dirty pass measured 10 ms per page.
        let done = [pass(100_000, 100), pass(500, 5000)];
        assert_eq!(
            policy().estimate(&done, 20),
            Some(Duration::from_millis(200))
        );
        assert_eq!(policy().decide(&done, 20), Decision::Continue);
    }

    #[test]
    fn holes_and_hints_do_not_make_the_rate_look_fast() {
        // A sparse bulk pass: 1000 pages read in 1000 ms, 99 000 holes.
        let bulk = PassStats {
            pages_sent: 1000,
            hole_pages: 99_000,
            hinted_pages: 5,
            elapsed_us: 1_000_000,
            ..PassStats::new(0, PassKind::Bulk, 100_005)
        };
        assert_eq!(
            policy().estimate(std::slice::from_ref(&bulk), 50),
            Some(Duration::from_millis(50))
        );
        assert_eq!(policy().decide(&[bulk], 101), Decision::Continue);
    }

    #[test]
    fn an_empty_pass_falls_back_to_an_earlier_rate() {
        let done = [
            pass(1000, 1000),
            PassStats {
                elapsed_us: 5,
                ..PassStats::new(1, PassKind::Dirty, 0)
            },
        ];
        assert_eq!(
            policy().estimate(&done, 50),
            Some(Duration::from_millis(50))
        );
        assert_eq!(policy().estimate(&done[1..], 50), None);
    }

    #[test]
    fn stops_when_passes_stop_shrinking() {
        let slow = |pending| pass(pending, pending * 10); // 10 ms per page: never fits
                                                          // 1000 → 500 is progress (≤ 750); 500 → 400 is not (> 375); 400 → 350 is not (> 300).
        let done = [slow(1000), slow(500), slow(400)];
        assert_eq!(
            policy().decide(&done[..2], 400),
            Decision::Continue,
            "one stall is tolerated"
        );
        assert_eq!(
            policy().decide(&done, 350),
            Decision::Stop(StopReason::Stalled)
        );
        assert_eq!(
            policy().decide(&done, 300),
            Decision::Continue,
            "exactly 75 % is progress"
        );
        let never = Policy {
            stall_passes: 0,
            ..policy()
        };
        assert_eq!(never.decide(&done, 399), Decision::Continue);
    }

    #[test]
    fn stops_at_the_pass_limit() {
        let slow = |pending| pass(pending, pending * 10);
        let done: Vec<_> = (0..10).map(|i| slow(100_000 >> i)).collect();
        assert_eq!(
            policy().decide(&done[..9], 100_000 >> 9),
            Decision::Continue
        );
        assert_eq!(
            policy().decide(&done, 100_000 >> 10),
            Decision::Stop(StopReason::MaxPasses)
        );
        let one = Policy {
            max_passes: 0,
            ..policy()
        };
        assert_eq!(
            one.decide(&done[..1], 100_000),
            Decision::Stop(StopReason::MaxPasses),
            "0 means 1"
        );
    }

    #[test]
    fn the_downtime_wins_over_the_other_reasons() {
        let done: Vec<_> = (0..10).map(|_| pass(100, 10)).collect();
        assert_eq!(
            policy().decide(&done, 100),
            Decision::Stop(StopReason::FitsDowntime)
        );
    }
}
