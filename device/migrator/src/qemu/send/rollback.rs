//! What `send` changes on the source and how it puts the source back when
//! a migration fails.

use std::time::Duration;

use serde_json::{json, Value};

use super::{wait_status, SendError, SourceState};
use crate::qmp::Qmp;

/// The source's migration settings this program changes, as they were:
/// a guest that runs on after a failed migration must not keep
/// `x-ignore-shared` (QEMU's own migration would then skip its RAM) nor
/// `pause-before-switchover`.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) capabilities: Vec<Value>,
    pub(super) max_bandwidth: Option<u64>,
}

/// The capabilities `send` sets.
pub(super) const CAPABILITIES: [&str; 2] = ["x-ignore-shared", "pause-before-switchover"];

impl Settings {
    pub(super) fn save(qmp: &mut Qmp) -> Result<Self, SendError> {
        let all = qmp.execute("query-migrate-capabilities", None)?;
        let capabilities = all
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| CAPABILITIES.iter().any(|n| c["capability"] == *n))
            .map(|c| json!({"capability": c["capability"], "state": c["state"]}))
            .collect();
        let params = qmp.execute("query-migrate-parameters", None)?;
        Ok(Self {
            capabilities,
            max_bandwidth: params["max-bandwidth"].as_u64(),
        })
    }

    /// Puts them back (best effort: a failure is logged).
    pub(super) fn restore(&self, qmp: &mut Qmp) {
        let caps = Some(json!({ "capabilities": self.capabilities }));
        if let Err(e) = qmp.execute("migrate-set-capabilities", caps) {
            log::warn!("cannot restore the source's migration capabilities: {e}");
        }
        if let Some(bw) = self.max_bandwidth {
            let params = Some(json!({ "max-bandwidth": bw }));
            if let Err(e) = qmp.execute("migrate-set-parameters", params) {
                log::warn!("cannot restore the source's max-bandwidth: {e}");
            }
        }
    }
}

/// How far a migration got, for the roll-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// The guest was never stopped.
    Live,
    /// QEMU's migration was started; it may have stopped the guest.
    Stopped,
    /// QEMU moved the device state; the receiver may have resumed it.
    Handed,
}

/// Brings the source back to running after a failure in `phase`.
pub(super) fn roll_back(qmp: &mut Qmp, phase: Phase) -> SourceState {
    if phase == Phase::Handed {
        log::error!(
            "the device state moved and the receiver did not say whether the destination runs: \
             the source stays paused; check the destination, then `cont` the source or quit it"
        );
        return SourceState::Paused;
    }
    if phase == Phase::Stopped {
        if let Err(e) = qmp.execute("migrate_cancel", None) {
            log::warn!("migrate_cancel: {e}");
        }
        let ended = wait_status(
            qmp,
            &["cancelled", "failed", "none", "completed"],
            Duration::from_secs(30),
        );
        if let Err(e) = ended {
            log::warn!("QEMU's migration did not end after migrate_cancel: {e}");
        }
    }
    match crate::qemu::status(qmp) {
        Ok(s) if s == "running" => SourceState::Running,
        Ok(s) => match qmp.execute("cont", None) {
            Ok(_) => {
                log::info!("the source was {s}; resumed");
                SourceState::Running
            }
            Err(e) => {
                log::error!("cannot resume the source ({s}): {e}");
                SourceState::Paused
            }
        },
        Err(e) => {
            log::error!("cannot read the source's state: {e}");
            SourceState::Paused
        }
    }
}
