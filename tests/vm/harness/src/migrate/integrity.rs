//! The integrity protocol with the guest workload (`fhwork`): it prints
//! [`READY_MARKER`] once its working set is in place, and answers `verify`
//! (or `stop`: verify, then exit) typed on the console with an `integrity`
//! result.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::guest::json_after;
use crate::vm::{ConsoleLine, ResultLine, Vm, VmError};

/// Marker `fhwork` prints when its working set is in place.
pub const READY_MARKER: &str = "@@FHWORK ready";

/// Waits for the workload on `vm` to be ready; returns the ready line's JSON.
pub fn wait_ready(vm: &mut Vm, timeout: Duration) -> Result<Map<String, Value>, VmError> {
    let ConsoleLine { line, .. } =
        vm.wait_line(0, "the guest workload to start", timeout, |l| {
            l.contains(READY_MARKER)
        })?;
    Ok(json_after(&line, READY_MARKER).unwrap_or_default())
}

/// What the workload does after a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Keeps running (`verify`).
    Continue,
    /// Exits, and the guest powers off (`stop`).
    Stop,
}

/// Asks the guest on `vm` to verify every live page (then go on or stop)
/// and returns its `integrity` result.
pub fn verify_integrity(
    vm: &mut Vm,
    then: Then,
    timeout: Duration,
) -> Result<Map<String, Value>, VmError> {
    let from = vm.line_count();
    vm.send_line(match then {
        Then::Continue => "verify",
        Then::Stop => "stop",
    })?;
    let ResultLine { line, obj, .. } =
        vm.wait_result(from, "integrity", "the guest's integrity verdict", timeout)?;
    Ok(obj.unwrap_or_else(|| failed_verdict(format!("malformed verdict: {line}"))))
}

/// A failed integrity verdict the harness stands in for the guest's (no
/// verdict came, or it did not parse): `{"name": "integrity", "ok": false,
/// "error": ...}`.
pub fn failed_verdict(error: impl Into<String>) -> Map<String, Value> {
    /// The stand-in verdict.
    #[derive(serde::Serialize)]
    struct FailedVerdict {
        name: &'static str,
        ok: bool,
        error: String,
    }
    crate::runner::fields(&FailedVerdict {
        name: "integrity",
        ok: false,
        error: error.into(),
    })
}
