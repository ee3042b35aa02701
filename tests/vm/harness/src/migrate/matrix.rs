//! The migration matrix: one [`Cell`] (driver × workload × memory × number
//! of migrations) booted, migrated and verified by [`run_cell`].

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::integrity::{verify_integrity, wait_ready, Then};
use super::{free_page_vq, migrate, MigrationStats};
use crate::manifest::Manifest;
use crate::qemu::BootSpec;
use crate::vm::{check_migratable, free_port, splat_problems, Vm, VmError};

/// The guest driver that answers QEMU's free page hint requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// No balloon driver loaded: no hints.
    None,
    /// Linux's `virtio_balloon.ko` (allocates the pages it reports).
    Stock,
    /// Our `freehint.ko` (walks the free lists).
    Freehint,
}

impl Driver {
    /// Short name (guest argument, JSON, labels).
    pub fn name(self) -> &'static str {
        match self {
            Driver::None => "none",
            Driver::Stock => "stock",
            Driver::Freehint => "freehint",
        }
    }

    /// Whether this driver column is measured. All are, unless
    /// `FREEHINT_MIGRATE_DRIVERS` (comma-separated names) leaves some out;
    /// a left-out column is reported as "pending", never as a pass.
    pub fn enabled(self) -> bool {
        match std::env::var("FREEHINT_MIGRATE_DRIVERS") {
            Ok(v) if !v.trim().is_empty() => v.split(',').any(|d| d.trim() == self.name()),
            _ => true,
        }
    }
}

/// What the guest did to its memory before the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Nothing beyond the small integrity working set.
    Idle,
    /// `pre_mib` dirtied and kept (verified after every migration).
    DirtyKeep,
    /// `pre_mib` dirtied, then freed.
    DirtyFree,
}

impl Workload {
    /// Short name (guest argument, JSON, labels).
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::DirtyKeep => "dirty-keep",
            Workload::DirtyFree => "dirty-free",
        }
    }
}

/// One guest migrated one or more times.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Hinting driver.
    pub driver: Driver,
    /// Memory history before the migration.
    pub workload: Workload,
    /// `init_on_alloc=` on the guest command line.
    pub init_on_alloc: bool,
    /// MiB dirtied (kept or freed) before migrating.
    pub pre_mib: u64,
    /// MiB of the churning integrity working set during migration.
    pub churn_mib: u64,
    /// Pause between churn steps in the guest (µs; 0 = flat out).
    pub pace_us: u64,
    /// Number of migrations (1 = one way; 2N = N round trips).
    pub migrations: usize,
    /// Kernel flavour.
    pub flavour: String,
    /// More `key=value` arguments of the guest script (`qemu-migrate.sh`),
    /// after the ones above (e.g. `lockdep=1`, `rmmod_at_end=1`).
    pub extra_guest_args: Vec<String>,
}

impl Cell {
    /// A one-migration cell with the workload of the project's reference
    /// runs of the stock driver (300 MiB dirtied), a slow 32 MiB integrity
    /// working set and `init_on_alloc=1` (set the field for 0).
    pub fn new(mem_mib: u64, driver: Driver, workload: Workload) -> Cell {
        Cell {
            mem_mib,
            driver,
            workload,
            init_on_alloc: true,
            pre_mib: 300,
            churn_mib: 32,
            // ~4 chunk operations a second: the working set keeps changing
            // during the migration without adding more than a few MB/s of
            // dirty pages to the byte counts being compared.
            pace_us: 250_000,
            migrations: 1,
            flavour: "normal".into(),
            extra_guest_args: Vec::new(),
        }
    }

    /// `driver/workload/ioaN/MEMg`.
    pub fn label(&self) -> String {
        format!(
            "{}/{}/ioa{}/{}g",
            self.driver.name(),
            self.workload.name(),
            u8::from(self.init_on_alloc),
            self.mem_mib / 1024
        )
    }

    /// The boot of this cell (guest script `qemu-migrate`).
    pub fn boot_spec(&self) -> BootSpec {
        let mut spec = BootSpec::new("qemu-migrate");
        spec.flavour = self.flavour.clone();
        spec.mem_mib = self.mem_mib;
        spec.guest_args = vec![
            format!("driver={}", self.driver.name()),
            format!("workload={}", self.workload.name()),
            format!("pre_mib={}", self.pre_mib),
            format!("churn_mib={}", self.churn_mib),
            format!("pace_us={}", self.pace_us),
        ];
        spec.guest_args
            .extend(self.extra_guest_args.iter().cloned());
        spec.extra_cmdline = vec![format!("init_on_alloc={}", u8::from(self.init_on_alloc))];
        // Same device in every cell (the driver decides whether it hints).
        spec.extra_qemu_args = vec![
            "-object".into(),
            "iothread,id=fhio".into(),
            "-device".into(),
            "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=fhio".into(),
        ];
        spec.timeout = Duration::from_secs(600);
        spec
    }
}

/// What happened to one cell.
#[derive(Debug, Clone, Default)]
pub struct CellOutcome {
    /// One entry per completed migration.
    pub migrations: Vec<MigrationStats>,
    /// The destination's integrity verdict after each migration.
    pub integrity: Vec<Map<String, Value>>,
    /// The workload's ready line (used memory etc.).
    pub ready: Map<String, Value>,
    /// Problems seen (failed migration, splat, bad verdict, no clean exit).
    pub problems: Vec<String>,
    /// Serial logs of the VMs involved.
    pub logs: Vec<String>,
    /// The source's free page hint virtqueue after each migration
    /// (`x-query-virtio-queue-status`), `null` when it could not be read.
    pub hint_vq: Vec<Value>,
}

impl CellOutcome {
    /// Pages reported damaged over all verdicts.
    pub fn corrupt_pages(&self) -> u64 {
        self.integrity
            .iter()
            .map(|r| r.get("corrupt_pages").and_then(Value::as_u64).unwrap_or(0))
            .sum()
    }

    /// Verdicts that failed.
    pub fn integrity_failures(&self) -> usize {
        self.integrity
            .iter()
            .filter(|r| !crate::guest::result_ok(r))
            .count()
    }

    /// Whether everything went right.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.integrity_failures() == 0
    }

    /// The outcome of a cell that [`run_cell`] could not run (QEMU did not
    /// start, a socket failed, ...): no figures, one problem. Scenarios
    /// record it as a failed result and go on with their next cell.
    pub fn harness_error(e: &VmError) -> CellOutcome {
        CellOutcome {
            problems: vec![format!("harness error: {e}")],
            ..CellOutcome::default()
        }
    }
}

/// Failed `@@RESULT`s the guest printed (e.g. the driver did not load).
fn guest_failures(vm: &Vm, out: &mut Vec<String>) {
    for r in vm.output().results {
        if !crate::guest::result_ok(&r) {
            out.push(format!(
                "{}: guest result failed: {}",
                vm.role,
                Value::Object(r)
            ));
        }
    }
}

/// Boots `cell`'s guest, waits for its workload, migrates it
/// `cell.migrations` times (each time to a fresh destination QEMU with the
/// same command line), asks each destination to verify every live page, and
/// finally stops the workload and waits for a clean power-off. `progress`
/// receives one line per step (for stderr).
pub fn run_cell(
    manifest: &Manifest,
    log_dir: &Path,
    cell: &Cell,
    timeout_scale: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<CellOutcome, VmError> {
    run_cell_with(
        manifest,
        log_dir,
        cell,
        timeout_scale,
        progress,
        &mut |_, _| Ok(()),
    )
}

/// [`run_cell`] with one extra step on the last destination: `at_end`
/// runs after that destination's final integrity verdict (the workload has
/// stopped; the guest script goes on) and before the harness waits for the
/// guest to power off. It gets the VM and the scaled timeout unit (the
/// duration of one "second"); an error it returns becomes a problem of the
/// cell. Used by `qemu-lockdep` to unload the driver during a hint round.
pub fn run_cell_with(
    manifest: &Manifest,
    log_dir: &Path,
    cell: &Cell,
    timeout_scale: f64,
    progress: &mut dyn FnMut(&str),
    at_end: &mut dyn FnMut(&mut Vm, Duration) -> Result<(), VmError>,
) -> Result<CellOutcome, VmError> {
    let spec = cell.boot_spec();
    check_migratable(&spec)?;
    let scale = |s: u64| Duration::from_secs(s).mul_f64(timeout_scale.max(0.1));
    let tag = cell.label().replace('/', "-");
    let mut out = CellOutcome::default();
    let mut src = Vm::start(manifest, &spec, log_dir, &format!("{tag}-0"), None)?;
    out.logs.push(src.serial_log.display().to_string());
    out.ready = match wait_ready(&mut src, scale(300)) {
        Ok(r) => r,
        Err(e) => {
            guest_failures(&src, &mut out.problems);
            splat_problems(&src, &mut out.problems);
            out.problems.push(e.to_string());
            return Ok(out);
        }
    };
    progress(&format!(
        "{}: guest ready (used {} MiB)",
        cell.label(),
        out.ready
            .get("used_mib")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    ));
    for i in 0..cell.migrations {
        let port = free_port()?;
        let mut dst = match Vm::start(
            manifest,
            &spec,
            log_dir,
            &format!("{tag}-{}", i + 1),
            Some(port),
        ) {
            Ok(d) => d,
            Err(e) => {
                out.problems
                    .push(format!("destination {} did not start: {e}", i + 1));
                return Ok(out);
            }
        };
        out.logs.push(dst.serial_log.display().to_string());
        let vq_before = free_page_vq(&mut src).ok();
        let stats = match migrate(&mut src, port, scale(600)) {
            Ok(s) => s,
            Err(e) => {
                splat_problems(&src, &mut out.problems);
                out.problems.push(format!("migration {}: {e}", i + 1));
                return Ok(out);
            }
        };
        splat_problems(&src, &mut out.problems);
        let mut vq = free_page_vq(&mut src).unwrap_or(Value::Null);
        // The queue's indices migrate with the device: count this round only.
        let used = |v: &Value| v.get("used_idx").and_then(Value::as_u64);
        if let (Some(a), Some(b)) = (vq_before.as_ref().and_then(used), used(&vq)) {
            vq["used_delta"] = json!(b.wrapping_sub(a) & 0xffff);
        }
        out.hint_vq.push(vq);
        src.kill();
        progress(&format!(
            "{}: migration {}/{}: {:.1} MB, {} ms total, {} ms downtime",
            cell.label(),
            i + 1,
            cell.migrations,
            stats.transferred as f64 / 1e6,
            stats.total_ms,
            stats.downtime_ms
        ));
        out.migrations.push(stats);
        let last = i + 1 == cell.migrations;
        match verify_integrity(
            &mut dst,
            if last { Then::Stop } else { Then::Continue },
            scale(300),
        ) {
            Ok(v) => {
                out.integrity.push(v);
                if last {
                    if let Err(e) = at_end(&mut dst, scale(1)) {
                        out.problems
                            .push(format!("{}: final step failed: {e}", dst.role));
                    }
                }
            }
            Err(e) => {
                splat_problems(&dst, &mut out.problems);
                out.problems
                    .push(format!("destination {} did not verify: {e}", i + 1));
                return Ok(out);
            }
        }
        src = dst;
    }
    let status = src
        .qmp()
        .execute("query-status", None)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string));
    if !src.wait_exit(scale(180)) {
        out.problems.push(format!(
            "{}: guest did not power off within {}s after the workload stopped \
             (QEMU status before: {}; {})",
            src.role,
            scale(180).as_secs(),
            status.as_deref().unwrap_or("?"),
            src.serial_log.display()
        ));
    }
    let o = src.output();
    match o.done_rc {
        Some(0) => {}
        Some(rc) => out.problems.push(format!(
            "{}: guest script exited rc={rc} ({})",
            src.role,
            src.serial_log.display()
        )),
        None => out.problems.push(format!(
            "{}: no @@DONE from the guest ({})",
            src.role,
            src.serial_log.display()
        )),
    }
    splat_problems(&src, &mut out.problems);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_boot_spec_is_identical_hardware_for_every_driver() {
        let a = Cell::new(4096, Driver::None, Workload::DirtyFree).boot_spec();
        let b = Cell::new(4096, Driver::Stock, Workload::DirtyFree).boot_spec();
        assert_eq!(a.extra_qemu_args, b.extra_qemu_args);
        assert!(a
            .extra_qemu_args
            .iter()
            .any(|x| x.contains("free-page-hint=on,iothread=fhio")));
        assert!(a
            .cmdline()
            .contains("fh.args=driver=none,workload=dirty-free,pre_mib=300"));
        assert!(a.cmdline().ends_with("init_on_alloc=1"));
        assert!(check_migratable(&a).is_ok());
        assert_eq!(
            Cell {
                init_on_alloc: false,
                ..Cell::new(8192, Driver::Stock, Workload::Idle)
            }
            .label(),
            "stock/idle/ioa0/8g"
        );
    }

    #[test]
    fn outcome_counts_failed_verdicts() {
        let mut o = CellOutcome::default();
        let mut good = Map::new();
        good.insert("ok".into(), json!(true));
        good.insert("corrupt_pages".into(), json!(0));
        let mut bad = Map::new();
        bad.insert("ok".into(), json!(false));
        bad.insert("corrupt_pages".into(), json!(5));
        o.integrity = vec![good, bad];
        assert_eq!(o.integrity_failures(), 1);
        assert_eq!(o.corrupt_pages(), 5);
        assert!(!o.ok());
    }
}
