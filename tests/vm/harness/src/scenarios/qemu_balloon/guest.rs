//! The harness's side of one guest: the VM, the console commands the guest
//! script answers, the balloon's `actual` and the guest's memory figures.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::MIB;
use crate::runner::object;
use crate::vm::{Vm, VmError};

/// The balloon's `actual` once it settled ([`Guest::wait_actual`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settled {
    /// `actual`, bytes.
    pub(crate) actual: u64,
    /// How long it took, ms.
    pub(crate) ms: u64,
}

/// One VM and its scaled timeout unit.
pub(crate) struct Guest {
    pub(crate) vm: Vm,
    pub(crate) unit: Duration,
}

impl Guest {
    /// Types `line` and returns the guest's `@@RESULT` named `name`.
    pub(crate) fn cmd(
        &mut self,
        line: &str,
        name: &str,
        secs: u64,
    ) -> Result<Map<String, Value>, VmError> {
        let from = self.vm.line_count();
        self.vm.send_line(line)?;
        self.answer(from, line, name, secs)
    }

    /// The first `@@RESULT` named `name` from console line `from` on.
    pub(crate) fn answer(
        &mut self,
        from: usize,
        line: &str,
        name: &str,
        secs: u64,
    ) -> Result<Map<String, Value>, VmError> {
        let what = format!("the guest's answer to `{line}`");
        let crate::vm::ResultLine { line: l, obj, .. } =
            self.vm
                .wait_result(from, name, &what, self.unit * secs as u32)?;
        Ok(obj.unwrap_or_else(|| object(json!({ "malformed": l }))))
    }

    /// `query-balloon` `actual` in bytes.
    pub(crate) fn actual(&mut self) -> Result<u64, VmError> {
        let q = self.vm.qmp().execute("query-balloon", None)?;
        Ok(q["actual"].as_u64().unwrap_or(0))
    }

    pub(crate) fn balloon(&mut self, mib: u64) -> Result<(), VmError> {
        self.vm
            .qmp()
            .execute("balloon", Some(json!({"value": mib * MIB})))?;
        Ok(())
    }

    /// Polls `actual` until `pred` holds (returns it and the wait in ms) or
    /// `secs` (scaled) pass (returns the last value as an error text).
    pub(crate) fn wait_actual(
        &mut self,
        what: &str,
        secs: u64,
        pred: impl Fn(u64) -> bool,
    ) -> Result<Settled, String> {
        let start = Instant::now();
        let limit = self.unit * secs as u32;
        loop {
            let a = self.actual().map_err(|e| e.to_string())?;
            if pred(a) {
                return Ok(Settled {
                    actual: a,
                    ms: start.elapsed().as_millis() as u64,
                });
            }
            if start.elapsed() >= limit {
                return Err(format!(
                    "{what}: actual still {} MiB after {}s",
                    a / MIB,
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn meminfo(&mut self, tag: &str) -> Result<MemInfo, VmError> {
        let r = self.cmd(&format!("meminfo {tag}"), "meminfo", 60)?;
        let kb = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(MemInfo {
            total_kb: kb("mem_total_kb"),
            free_kb: kb("mem_free_kb"),
            available_kb: kb("mem_available_kb"),
            pcp_kb: kb("pcp_kb"),
        })
    }
}

/// The guest's `/proc/meminfo` figures (KiB).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MemInfo {
    pub(crate) total_kb: u64,
    pub(crate) free_kb: u64,
    pub(crate) available_kb: u64,
    /// Pages on the per-CPU lists: free, but not in `MemFree`.
    pub(crate) pcp_kb: u64,
}

/// [`MemInfo`] in MiB, as result lines carry it.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct MemInfoMib {
    pub(crate) mem_total_mib: u64,
    pub(crate) mem_free_mib: u64,
    pub(crate) mem_available_mib: u64,
    pub(crate) pcp_mib: u64,
}

impl MemInfo {
    pub(crate) fn mib(self) -> MemInfoMib {
        MemInfoMib {
            mem_total_mib: self.total_kb / 1024,
            mem_free_mib: self.free_kb / 1024,
            mem_available_mib: self.available_kb / 1024,
            pcp_mib: self.pcp_kb / 1024,
        }
    }

    /// Free bytes: `MemFree` plus the per-CPU lists (pages a deflate frees
    /// land there first, up to tens of MiB in a 1 GiB guest).
    pub(crate) fn free_bytes(self) -> u64 {
        (self.free_kb + self.pcp_kb) * 1024
    }
}

pub(crate) fn abs_diff_mib(a_bytes: u64, b_bytes: u64) -> u64 {
    a_bytes.abs_diff(b_bytes) / MIB
}
