//! The engine's hooks on the source: unplugging the balloon whose hints
//! were used, and stopping the guest by starting QEMU's migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{ms, since, wait_status_or_cancel};
use crate::control_port::ControlPort;
use crate::dirty::HookError;
use crate::engine::VmControl;
use crate::qemu::hotplug::{Unplugged, Unplugging};
use crate::qmp::Qmp;
use crate::stats::PassStats;

/// The engine's view of the source: unplug the balloon when its hints are
/// used, stop the guest, start QEMU's migration.
pub(super) struct Stop<'a> {
    pub(super) qmp: &'a mut Qmp,
    pub(super) uri: &'a str,
    pub(super) cancel: &'a AtomicBool,
    /// QEMU's `STOP` event time (µs since the epoch, QEMU's clock).
    pub(super) stop_us: Option<i64>,
    /// When the guest stopped, on this program's clock.
    pub(super) stopped_at: Option<Instant>,
    /// `migrate` was issued: a failure must cancel QEMU's migration.
    pub(super) migrating: bool,
    /// How long QEMU may take to set up and stop the guest.
    pub(super) timeout: Duration,
    pub(super) balloon: Option<BalloonUnplug<'a>>,
}

/// The balloon device to unplug, and when.
pub(super) struct BalloonUnplug<'a> {
    pub(super) id: &'a str,
    /// The last pass that uses hints: the unplug starts after the pass
    /// that follows it, once the sync in between closed the device's last
    /// hint epoch (`None`: just before the stop).
    pub(super) after_pass: Option<u64>,
    /// The back end's control socket, to read the target.
    pub(super) control: Option<&'a std::path::Path>,
    pub(super) timeout: Duration,
    pub(super) target: Option<u32>,
    pub(super) state: UnplugState,
}

/// Where the balloon is.
#[derive(Debug, Default)]
pub(super) enum UnplugState {
    /// In the guest.
    #[default]
    Plugged,
    /// The guest was asked to let go (pre-copy goes on meanwhile).
    Unplugging(Unplugging),
    /// Gone from the guest.
    Unplugged(Unplugged),
    /// Asking failed.
    Failed,
}

impl Stop<'_> {
    /// Reads the balloon's target and asks the guest to let it go.
    pub(super) fn start_unplug(&mut self) -> Result<(), HookError> {
        let Some(b) = self.balloon.as_mut() else {
            return Ok(());
        };
        if !matches!(b.state, UnplugState::Plugged) {
            return Ok(());
        }
        b.state = UnplugState::Failed;
        if let Some(path) = b.control {
            b.target = Some(balloon_target(path, b.timeout)?);
        }
        b.state = UnplugState::Unplugging(Unplugged::start(self.qmp, b.id)?);
        Ok(())
    }

    /// Notes whether the guest let the balloon go, without waiting.
    pub(super) fn poll_unplug(&mut self) -> Result<(), HookError> {
        let Some(b) = self.balloon.as_mut() else {
            return Ok(());
        };
        if let UnplugState::Unplugging(pending) = &mut b.state {
            if pending.poll(self.qmp)? {
                let UnplugState::Unplugging(pending) = std::mem::take(&mut b.state) else {
                    unreachable!("matched above");
                };
                b.state = UnplugState::Unplugged(pending.finish());
            }
        }
        Ok(())
    }

    /// Unplugs the balloon and waits until the guest let it go.
    pub(super) fn finish_unplug(&mut self) -> Result<(), HookError> {
        self.start_unplug()?;
        let Some(b) = self.balloon.as_mut() else {
            return Ok(());
        };
        if let UnplugState::Unplugging(pending) = &mut b.state {
            pending.wait(self.qmp, b.timeout, self.cancel)?;
            let UnplugState::Unplugging(pending) = std::mem::take(&mut b.state) else {
                unreachable!("matched above");
            };
            b.state = UnplugState::Unplugged(pending.finish());
        }
        Ok(())
    }
}

/// The balloon target the back end at `path` holds, in 4 KiB pages.
pub(super) fn balloon_target(path: &std::path::Path, timeout: Duration) -> Result<u32, HookError> {
    let mut port = ControlPort::connect(path, timeout)?;
    let status = port.request("status")?;
    let target = status["target"]
        .as_u64()
        .and_then(|t| u32::try_from(t).ok())
        .ok_or_else(|| format!("{}: status without a target: {status}", path.display()))?;
    Ok(target)
}

impl VmControl for &mut Stop<'_> {
    fn after_pass(&mut self, pass: &PassStats) -> Result<(), HookError> {
        let due = self
            .balloon
            .as_ref()
            .and_then(|b| b.after_pass)
            .is_some_and(|last| u64::from(pass.pass) > last);
        if due {
            self.start_unplug()?;
            self.poll_unplug()?;
        }
        Ok(())
    }

    fn balloon_target(&mut self) -> Option<u32> {
        self.balloon.as_ref().and_then(|b| b.target)
    }

    fn pause(&mut self) -> Result<(), HookError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        self.finish_unplug()?;
        let asked = Instant::now();
        self.migrating = true;
        self.qmp
            .execute("migrate", Some(json!({ "uri": self.uri })))?;
        wait_status_or_cancel(self.qmp, &["pre-switchover"], self.timeout, self.cancel)?;
        let stop = self.qmp.wait_event_named("STOP", self.timeout)?;
        self.stop_us = stop.timestamp_us;
        self.stopped_at = Some(self.stop_us.map_or_else(Instant::now, instant_of));
        log::info!(
            "QEMU's migration to {} stopped the source {:.1} ms after `migrate` \
             ({:.1} ms ago)",
            self.uri,
            ms(self
                .stopped_at
                .unwrap_or(asked)
                .saturating_duration_since(asked)),
            since(self.stopped_at)
        );
        Ok(())
    }
}

/// The instant on this program's clock of `micros` since the Unix epoch
/// (a QMP event's time stamp; QEMU runs on this host).
pub(super) fn instant_of(micros: i64) -> Instant {
    let now = Instant::now();
    let wall_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let ago = Duration::from_micros(wall_us.saturating_sub(micros).max(0) as u64);
    now.checked_sub(ago).unwrap_or(now)
}
