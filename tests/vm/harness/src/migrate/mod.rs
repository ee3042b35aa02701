//! Live migration between two QEMU processes on 127.0.0.1, with the guest's
//! integrity workload (`fhwork`, crate `tests/guest-workload`) checked on the
//! destination after every migration.
//!
//! The VMs are [`crate::vm::Vm`]s started with a console socket and a QMP
//! session. [`migrate`] raises max-bandwidth to 10 GB/s (as in the
//! project's reference runs of the stock driver), starts the migration,
//! polls `query-migrate` until it completes or fails and returns the figures
//! (`ram.transferred`, `normal`, `duplicate`, `total-time`, `downtime`,
//! `setup-time`). By concern:
//!
//! - this module: the QMP side of one migration and the balloon device's
//!   QOM figures;
//! - [`integrity`]: the workload protocol with the guest (ready, verify,
//!   stop);
//! - [`matrix`]: one cell of the migration matrix (driver × workload ×
//!   memory) booted, migrated and verified ([`run_cell`]);
//! - [`report`]: a cell's JSON result and summary statistics.
//!
//! Kernel splats are [`crate::guest::is_splat`]; the VM itself is
//! [`crate::vm`].

pub mod integrity;
pub mod matrix;
pub mod report;

use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::manifest::Manifest;
use crate::vm::{Vm, VmError};

pub use integrity::{failed_verdict, verify_integrity, wait_ready, Then, READY_MARKER};
pub use matrix::{run_cell, run_cell_with, Cell, CellOutcome, Driver, Workload};
pub use report::{cell_json, median, CellRecord, VerdictFields};

/// Bandwidth cap set before every migration (bytes/s): 10 GB/s, i.e. never
/// the bottleneck on 127.0.0.1.
pub const MAX_BANDWIDTH: u64 = 10_000_000_000;

/// The figures of one migration, from the source's final `query-migrate`.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationStats {
    /// Final status (`completed` on success).
    pub status: String,
    /// `ram.transferred`: bytes sent for RAM.
    pub transferred: u64,
    /// `ram.normal`: pages sent whole.
    pub normal: u64,
    /// `ram.duplicate`: zero pages sent as markers.
    pub duplicate: u64,
    /// `ram.dirty-sync-count`.
    pub dirty_sync_count: u64,
    /// `total-time` in ms.
    pub total_ms: u64,
    /// `downtime` in ms.
    pub downtime_ms: u64,
    /// `setup-time` in ms.
    pub setup_ms: u64,
    /// Host wall clock from `migrate` to completion, ms.
    pub wall_ms: u64,
}

impl MigrationStats {
    /// Reads the figures out of a `query-migrate` reply.
    pub fn from_query(q: &Value, wall_ms: u64) -> MigrationStats {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        MigrationStats {
            status: q["status"].as_str().unwrap_or("?").to_string(),
            transferred: u(&q["ram"]["transferred"]),
            normal: u(&q["ram"]["normal"]),
            duplicate: u(&q["ram"]["duplicate"]),
            dirty_sync_count: u(&q["ram"]["dirty-sync-count"]),
            total_ms: u(&q["total-time"]),
            downtime_ms: u(&q["downtime"]),
            setup_ms: u(&q["setup-time"]),
            wall_ms,
        }
    }

    /// The figures as a result line carries them.
    pub fn record(&self) -> StatsRecord {
        StatsRecord {
            bytes: self.transferred,
            mb_sent: (self.transferred as f64 / 1e5).round() / 10.0,
            normal_pages: self.normal,
            zero_pages: self.duplicate,
            dirty_syncs: self.dirty_sync_count,
            total_ms: self.total_ms,
            downtime_ms: self.downtime_ms,
            setup_ms: self.setup_ms,
            wall_ms: self.wall_ms,
        }
    }

    /// The figures as JSON fields ([`MigrationStats::record`]).
    pub fn to_json(&self) -> Map<String, Value> {
        crate::runner::fields(&self.record())
    }
}

/// The figures of one migration in a result line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsRecord {
    /// Bytes sent for RAM.
    pub bytes: u64,
    /// The same in MB, to a tenth.
    pub mb_sent: f64,
    /// Pages sent whole.
    pub normal_pages: u64,
    /// Zero pages sent as markers.
    pub zero_pages: u64,
    /// Dirty bitmap syncs.
    pub dirty_syncs: u64,
    /// Total time, ms.
    pub total_ms: u64,
    /// Downtime, ms.
    pub downtime_ms: u64,
    /// Setup time, ms.
    pub setup_ms: u64,
    /// Host wall clock, ms.
    pub wall_ms: u64,
}

/// Migrates `src` to the destination listening on `port` and waits for the
/// end. `timeout` bounds the whole migration.
pub fn migrate(src: &mut Vm, port: u16, timeout: Duration) -> Result<MigrationStats, VmError> {
    migrate_to(src, &format!("tcp:127.0.0.1:{port}"), timeout)
}

/// [`migrate`] to any migration URI (e.g. `exec:cat > /dev/null`, a sink
/// that makes QEMU run one hint round without a destination); the source is
/// left paused (`postmigrate`) on success.
pub fn migrate_to(src: &mut Vm, uri: &str, timeout: Duration) -> Result<MigrationStats, VmError> {
    let start = Instant::now();
    start_migration(src, uri, MAX_BANDWIDTH)?;
    let end = wait_migration(
        src,
        &["completed"],
        &["failed", "cancelled"],
        "migration",
        timeout,
    );
    if matches!(end, Err(VmError::Timeout { .. })) {
        let _ = src.qmp().execute("migrate_cancel", None);
    }
    let q = end?;
    Ok(MigrationStats::from_query(
        &q,
        start.elapsed().as_millis() as u64,
    ))
}

/// Sets the bandwidth cap (bytes/s) and starts migrating `src` to `uri`.
pub fn start_migration(src: &mut Vm, uri: &str, max_bandwidth: u64) -> Result<(), VmError> {
    src.qmp().execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": max_bandwidth })),
    )?;
    src.qmp().execute("migrate", Some(json!({ "uri": uri })))?;
    Ok(())
}

/// Polls `query-migrate` on `src` until its status is one of `want`
/// (returns that query), one of `fail_on` ([`VmError::Failed`]), or
/// `timeout` has passed ([`VmError::Timeout`]).
pub fn wait_migration(
    src: &mut Vm,
    want: &[&str],
    fail_on: &[&str],
    what: &str,
    timeout: Duration,
) -> Result<Value, VmError> {
    let start = Instant::now();
    loop {
        let q = src.qmp().execute("query-migrate", None)?;
        let status = q["status"].as_str().unwrap_or("?").to_string();
        if want.contains(&status.as_str()) {
            return Ok(q);
        }
        if fail_on.contains(&status.as_str()) {
            return Err(VmError::Failed {
                status,
                error: q["error-desc"].as_str().unwrap_or("").to_string(),
            });
        }
        if start.elapsed() >= timeout {
            return Err(VmError::Timeout {
                what: format!("{what} (last status {status})"),
                secs: timeout.as_secs(),
                log: src.qemu_log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// QOM path of the balloon's virtio device (`-device virtio-balloon-pci,id=balloon0`).
pub const BALLOON_QOM: &str = "/machine/peripheral/balloon0/virtio-backend";
/// QEMU's index of the free page hint virtqueue (inflate, deflate, stats,
/// free page: QEMU always creates the stats queue).
pub const FREE_PAGE_VQ: u16 = 3;

/// The free page hint virtqueue's indices on `vm` (`used-idx` moving during
/// a migration means the device consumed hints; [`run_cell`] adds
/// `used_delta`, the movement during that migration). Uses `x-query-virtio-queue-status`, never
/// `x-query-virtio-status` (which aborts QEMU 11.1.3 on the balloon).
pub fn free_page_vq(vm: &mut Vm) -> Result<Value, VmError> {
    let q = vm.qmp().execute(
        "x-query-virtio-queue-status",
        Some(json!({"path": BALLOON_QOM, "queue": FREE_PAGE_VQ})),
    )?;
    let field = |k: &str| q.get(k).cloned();
    Ok(serde_json::to_value(VqState {
        name: field("name"),
        used_idx: field("used-idx"),
        last_avail_idx: field("last-avail-idx"),
        shadow_avail_idx: field("shadow-avail-idx"),
    })
    .unwrap_or_default())
}

/// The indices of a virtqueue as result lines carry them
/// ([`free_page_vq`]; `null` for what QEMU did not say).
#[derive(Debug, Clone, Serialize)]
pub struct VqState {
    /// The queue's name.
    pub name: Option<Value>,
    /// `used-idx`.
    pub used_idx: Option<Value>,
    /// `last-avail-idx`.
    pub last_avail_idx: Option<Value>,
    /// `shadow-avail-idx`.
    pub shadow_avail_idx: Option<Value>,
}

/// The QEMU version string (`tests/vm/qemu --version`, first line).
pub fn qemu_version(manifest: &Manifest) -> String {
    Command::new(&manifest.qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_come_from_query_migrate() {
        let q = json!({"status":"completed","total-time":1724,"downtime":31,"setup-time":4,
            "ram":{"transferred":236300000u64,"normal":50000,"duplicate":1000000,"dirty-sync-count":3}});
        let s = MigrationStats::from_query(&q, 1800);
        assert_eq!(s.status, "completed");
        assert_eq!(
            (s.transferred, s.normal, s.duplicate),
            (236_300_000, 50_000, 1_000_000)
        );
        assert_eq!(
            (s.total_ms, s.downtime_ms, s.setup_ms, s.wall_ms),
            (1724, 31, 4, 1800)
        );
        let j = s.to_json();
        assert_eq!(j["bytes"], 236_300_000u64);
        assert_eq!(j["mb_sent"], 236.3);
        // Missing fields read as zero, never a panic.
        let s = MigrationStats::from_query(&json!({"status": 3}), 0);
        assert_eq!((s.status.as_str(), s.transferred), ("?", 0));
    }
}
