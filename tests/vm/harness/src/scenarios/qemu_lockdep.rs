//! `qemu-lockdep` (CI): `freehint.ko` on the debug kernel flavour
//! (PROVE_LOCKING, DEBUG_ATOMIC_SLEEP, DEBUG_SPINLOCK, DEBUG_LIST, DEBUG_VM;
//! `tests/vm/kernel/debug.fragment`) under the migration workload: a 2 GiB
//! guest with `init_on_alloc=1`, dirtied then freed memory and the integrity
//! working set churning, migrated [`MIGRATIONS`] times (two round trips),
//! every destination verifying every live page.
//!
//! At the end, on the last destination, come [`UNLOAD_CYCLES`] unload
//! cycles: the harness starts one more migration (to a local sink that only
//! reads, capped at [`SINK_BANDWIDTH`] so that it cannot converge) so that
//! QEMU asks for a hint round; the guest (`qemu-migrate.sh rmmod_at_end=N`)
//! polls `/proc/interrupts` for that request (the balloon's config
//! interrupt) and unloads the driver with `rmmod freehint` at once, so the
//! unload lands on the round while `fhtool churn` allocates and frees
//! memory; the harness cancels the migration, the guest loads the driver
//! again for the next cycle. Whether the module's exit begins while the
//! round still walks (the driver logs the round after `unloaded after`, or
//! ends it `removing`) or just after it finished is timing: counted
//! (`rounds_during_unload`), not asserted.
//!
//! Passes only if lockdep really ran (the boot banner of the lock dependency
//! validator on the source console, `/proc/lockdep` in the guest, and
//! `debug_locks` still 1 in `/proc/lockdep_stats` at boot and after the
//! unload: lockdep switches itself off after its first report), no console
//! line of any VM is a kernel complaint ([`crate::guest::is_splat`]), every integrity
//! verdict is clean, the unload succeeded and kmemleak (in the debug flavour,
//! scanning on demand) suspects no object allocated between the guest's
//! baseline, taken before the driver first loads, and the end of the unload
//! cycles (`kmemleak_leaks`: 0).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::errors::io_error;
use crate::guest::splat_lines;
use crate::guest::{result_ok, GuestOutput};
use crate::migrate::{
    cell_json, qemu_version, run_cell_with, start_migration, wait_migration, Cell, Driver, Workload,
};
use crate::runner::{fields, Ctx, HarnessError};
use crate::vm::{Vm, VmError};

/// Migrations under the workload (2 round trips).
pub const MIGRATIONS: usize = 4;
/// Guest memory (MiB): the debug kernel is slow under TCG.
pub const MEM_MIB: u64 = 2048;
/// Bandwidth cap (bytes/s) of the migration held open during the unload:
/// the guest's 150-250 MiB of non-free memory take minutes at this
/// rate, so the migration cannot complete (and pause the guest) before the
/// harness cancels it.
pub const SINK_BANDWIDTH: u64 = 1_000_000;
/// First line of lockdep's boot banner (`lockdep_init`).
pub const LOCKDEP_BANNER: &str = "Lock dependency validator: Copyright";
/// The guest script's line when it waits to unload the driver.
pub const RMMOD_MARKER: &str = "@@RMMOD waiting";
/// Unload cycles at the end (load, hint request, `rmmod`): whether an
/// unload meets a round that is still walking is timing, so try a few.
pub const UNLOAD_CYCLES: usize = 3;

/// What one unload cycle of the final step saw.
#[derive(Debug, Default, Serialize)]
struct CycleReport {
    /// `query-migrate` status when the guest reported the unload.
    #[serde(rename = "migration_status")]
    status_at_rmmod: Option<String>,
    /// Bytes the sink received before the cancel.
    sink_bytes: u64,
}

/// The `lockdep_active` line.
#[derive(Serialize)]
struct LockdepActive {
    name: &'static str,
    ok: bool,
    /// The lockdep banner on the console.
    banner: bool,
    /// The guest's `lockdep` result.
    boot: Option<Map<String, Value>>,
    debug_locks_end: Option<u64>,
}

/// The `no_splat` line.
#[derive(Serialize)]
struct NoSplat<'a> {
    name: &'static str,
    ok: bool,
    /// How many splat lines.
    splats: usize,
    /// How many serial logs were read.
    logs: usize,
    /// The first ten splat lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    first: Option<&'a [String]>,
}

/// The `rmmod_during_round` line.
#[derive(Serialize)]
struct RmmodDuringRound<'a> {
    name: &'static str,
    ok: bool,
    /// The guest's `rmmod` result.
    guest: Option<Map<String, Value>>,
    /// The guest's `rmmod_cycle` results.
    cycles: &'a [&'a Map<String, Value>],
    /// What the host saw of each cycle.
    host: &'a [CycleReport],
    /// How each of the driver's rounds ended.
    round_ends: Vec<Vec<String>>,
    rounds_during_unload: usize,
}

/// The `kmemleak` line.
#[derive(Serialize)]
struct Kmemleak {
    name: &'static str,
    ok: bool,
    /// The guest's `kmemleak` result.
    guest: Option<Map<String, Value>>,
}

/// The scenario's summary.
#[derive(Serialize)]
struct LockdepSummary<'a> {
    migrations: usize,
    integrity_failures: usize,
    splats: usize,
    lockdep_active: bool,
    rmmod_ok: bool,
    kmemleak_leaks: Option<u64>,
    unload_cycles: usize,
    rounds_during_unload: usize,
    mem_mib: u64,
    elapsed_s: f64,
    qemu: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a [String]>,
    ok: bool,
}

/// A TCP server on 127.0.0.1 that accepts one connection and discards what
/// it reads: the destination of the migration held open during the unload.
struct Sink {
    port: u16,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start() -> Result<Sink, VmError> {
        let l = TcpListener::bind("127.0.0.1:0")
            .map_err(io_error("cannot bind a sink on", "127.0.0.1"))?;
        let port = l
            .local_addr()
            .map_err(io_error("cannot read the port of", "127.0.0.1"))?
            .port();
        l.set_nonblocking(true).map_err(io_error(
            "cannot make the sink non-blocking on",
            "127.0.0.1",
        ))?;
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let (st, by) = (Arc::clone(&stop), Arc::clone(&bytes));
        let thread = std::thread::spawn(move || {
            let mut conn: Option<TcpStream> = None;
            let mut buf = vec![0u8; 1 << 16];
            while !st.load(Ordering::Acquire) {
                match conn.as_mut() {
                    None => match l.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                            conn = Some(s);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    },
                    Some(s) => match s.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            by.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(_) => return,
                    },
                }
            }
        });
        Ok(Sink {
            port,
            stop,
            bytes,
            thread: Some(thread),
        })
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn migrate_status(vm: &mut Vm) -> Result<String, VmError> {
    let q = vm.qmp().execute("query-migrate", None)?;
    Ok(q["status"].as_str().unwrap_or("none").to_string())
}

/// Waits for the held-open migration to reach `want`; it must neither fail
/// nor complete (the sink is too slow for that).
fn wait_status(vm: &mut Vm, want: &str, what: &str, timeout: Duration) -> Result<(), VmError> {
    wait_migration(vm, &[want], &["failed", "completed"], what, timeout).map(|_| ())
}

/// One unload cycle on the last destination (see the module
/// documentation): the guest script has printed [`RMMOD_MARKER`] at line
/// index `marker`, waits for `go`, then (after its `rmmod_cycle` result) for
/// one more line. Returns the index of the result line.
fn unload_cycle(
    vm: &mut Vm,
    unit: Duration,
    marker: usize,
    rep: &mut CycleReport,
) -> Result<usize, VmError> {
    let sink = Sink::start()?;
    // The guest now polls /proc/interrupts and unloads the driver as soon as
    // the hint request (a config interrupt) arrives.
    vm.send_line("go")?;
    let uri = format!("tcp:127.0.0.1:{}", sink.port);
    start_migration(vm, &uri, SINK_BANDWIDTH)?;
    wait_status(vm, "active", "the held-open migration", unit * 60)?;
    let crate::vm::ResultLine { index: result, .. } = vm.wait_result(
        marker + 1,
        "rmmod_cycle",
        "the guest's rmmod result",
        unit * 300,
    )?;
    rep.status_at_rmmod = Some(migrate_status(vm)?);
    vm.qmp().execute("migrate_cancel", None)?;
    wait_status(vm, "cancelled", "the migration cancel", unit * 60)?;
    rep.sink_bytes = sink.bytes();
    drop(sink);
    vm.send_line("next")?;
    Ok(result)
}

/// The final step: [`UNLOAD_CYCLES`] unload cycles, then waits for the
/// guest's overall `rmmod` result.
fn unload_during_rounds(
    vm: &mut Vm,
    unit: Duration,
    reps: &mut Vec<CycleReport>,
) -> Result<(), VmError> {
    let mut from = 0;
    for _ in 0..UNLOAD_CYCLES {
        let marker = vm
            .wait_line(from, "the guest to wait for the unload", unit * 120, |l| {
                l.contains(RMMOD_MARKER)
            })?
            .index;
        let mut rep = CycleReport::default();
        let r = unload_cycle(vm, unit, marker, &mut rep);
        reps.push(rep);
        from = r? + 1;
    }
    vm.wait_result(from, "rmmod", "the guest's rmmod summary", unit * 120)?;
    Ok(())
}

/// The hint rounds the driver logged in one unload cycle.
#[derive(Debug, Default, Clone, PartialEq)]
struct CycleRounds {
    /// `end=` of each `hint round 0x...` line of the cycle.
    ends: Vec<String>,
    /// A round was still running when the module's exit began: it ended
    /// `removing`, or its line comes after the driver's `unloaded after`
    /// line (the device removal then waited for it).
    during_unload: bool,
}

/// Splits the last destination's console at each [`RMMOD_MARKER`] and reads
/// the driver's hint round lines of each cycle.
fn cycle_rounds(text: &str) -> Vec<CycleRounds> {
    text.split(RMMOD_MARKER)
        .skip(1)
        .map(|seg| {
            let mut c = CycleRounds::default();
            let mut unloading = false;
            for l in seg.lines() {
                if l.contains("freehint: unloaded after") {
                    unloading = true;
                } else if l.contains("freehint") && l.contains("round 0x") {
                    if let Some((_, e)) = l.rsplit_once("end=") {
                        let e = e.trim().to_string();
                        c.during_unload |= unloading || e == "removing";
                        c.ends.push(e);
                    }
                }
            }
            c
        })
        .collect()
}

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let mut cell = Cell::new(MEM_MIB, Driver::Freehint, Workload::DirtyFree);
    cell.flavour = "debug".into();
    cell.migrations = MIGRATIONS;
    cell.churn_mib = 64;
    cell.pace_us = 50;
    cell.extra_guest_args = vec!["lockdep=1".into(), format!("rmmod_at_end={UNLOAD_CYCLES}")];
    eprintln!(
        "[lockdep] debug kernel, {} MiB, {} migrations, then rmmod during a hint round",
        MEM_MIB, MIGRATIONS
    );
    let started = Instant::now();
    let mut cycles: Vec<CycleReport> = Vec::new();
    let out = {
        let cycles = &mut cycles;
        run_cell_with(
            &ctx.manifest,
            &ctx.log_dir,
            &cell,
            ctx.timeout_scale,
            &mut |l| eprintln!("[lockdep]   {l}"),
            &mut |vm, unit| {
                let r = unload_during_rounds(vm, unit, cycles);
                if r.is_err() {
                    // Let the guest finish (each cycle waits for two lines).
                    let _ = vm.qmp().execute("migrate_cancel", None);
                    for _ in 0..UNLOAD_CYCLES * 2 {
                        let _ = vm.send_line("go");
                    }
                }
                r
            },
        )?
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    for i in 0..out.migrations.len().max(1) {
        let mut line = cell_json(&cell, &out, i);
        line.name = format!("lockdep/{}", i + 1);
        ctx.record(line);
    }

    // Everything the VMs printed, from the serial logs on disk.
    let logs: Vec<(String, String)> = out
        .logs
        .iter()
        .map(|p| (p.clone(), std::fs::read_to_string(p).unwrap_or_default()))
        .collect();
    let results: Vec<Map<String, Value>> = logs
        .iter()
        .flat_map(|(_, t)| GuestOutput::parse(t).results)
        .collect();
    let find = |name: &str| {
        results
            .iter()
            .find(|r| r.get("name").and_then(Value::as_str) == Some(name))
            .cloned()
    };
    let splats: Vec<String> = logs
        .iter()
        .flat_map(|(p, t)| splat_lines(t).into_iter().map(move |l| format!("{p}: {l}")))
        .collect();

    let banner = logs
        .first()
        .is_some_and(|(_, t)| t.contains(LOCKDEP_BANNER));
    let boot = find("lockdep");
    let rmmod = find("rmmod");
    let debug_locks_end = rmmod
        .as_ref()
        .and_then(|r| r.get("debug_locks"))
        .and_then(Value::as_u64);
    let lockdep_active =
        banner && boot.as_ref().is_some_and(result_ok) && debug_locks_end == Some(1);
    let guest_cycles: Vec<&Map<String, Value>> = results
        .iter()
        .filter(|r| r.get("name").and_then(Value::as_str) == Some("rmmod_cycle"))
        .collect();
    let rmmod_ok = rmmod.as_ref().is_some_and(result_ok)
        && guest_cycles.len() == UNLOAD_CYCLES
        && guest_cycles.iter().all(|r| result_ok(r));
    // kmemleak (debug flavour): objects leaked between the guest's baseline
    // (before the driver loaded) and the end of the unload cycles.
    let kmemleak = find("kmemleak");
    let leaks = kmemleak
        .as_ref()
        .and_then(|r| r.get("leaks"))
        .and_then(Value::as_u64);
    let kmemleak_ok = kmemleak.as_ref().is_some_and(result_ok) && leaks == Some(0);
    let rounds = logs
        .last()
        .map(|(_, t)| cycle_rounds(t))
        .unwrap_or_default();
    let during_unload = rounds.iter().filter(|c| c.during_unload).count();

    ctx.record(LockdepActive {
        name: "lockdep_active",
        ok: lockdep_active,
        banner,
        boot,
        debug_locks_end,
    });
    ctx.record(NoSplat {
        name: "no_splat",
        ok: splats.is_empty(),
        splats: splats.len(),
        logs: logs.len(),
        first: (!splats.is_empty()).then(|| &splats[..splats.len().min(10)]),
    });
    ctx.record(RmmodDuringRound {
        name: "rmmod_during_round",
        ok: rmmod_ok,
        guest: rmmod,
        cycles: &guest_cycles,
        host: &cycles,
        round_ends: rounds.iter().map(|c| c.ends.clone()).collect(),
        rounds_during_unload: during_unload,
    });
    ctx.record(Kmemleak {
        name: "kmemleak",
        ok: kmemleak_ok,
        guest: kmemleak,
    });

    let migrations_ok = out.migrations.len() == MIGRATIONS;
    Ok(fields(&LockdepSummary {
        migrations: out.migrations.len(),
        integrity_failures: out.integrity_failures(),
        splats: splats.len(),
        lockdep_active,
        rmmod_ok,
        kmemleak_leaks: leaks,
        unload_cycles: guest_cycles.len(),
        rounds_during_unload: during_unload,
        mem_mib: MEM_MIB,
        elapsed_s: (elapsed_s * 10.0).round() / 10.0,
        qemu: qemu_version(&ctx.manifest),
        problems: (!out.problems.is_empty()).then_some(&out.problems[..]),
        ok: out.ok()
            && migrations_ok
            && out.integrity.len() == MIGRATIONS
            && splats.is_empty()
            && lockdep_active
            && rmmod_ok
            && kmemleak_ok,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_read_per_cycle() {
        let round = |id: u32, end: &str| {
            format!("[ 9.0] freehint: hint round {id:#x}: 1 blocks in 1 ranges, 1 pages (0 MiB), walk 9 us, 1 lock holds (max 1 us), 0 ring-full waits, 0 returned, STOP after 1 ms, 2 ms, end={end}\n")
        };
        let unloaded = "[ 9.1] freehint: freehint: unloaded after 1 builds\n";
        let log = [
            round(0x8000_0003, "complete"), // before the first cycle: ignored
            format!("{RMMOD_MARKER} 1\ngo\n"),
            round(0x8000_0004, "complete"),
            unloaded.to_string(),
            format!("{RMMOD_MARKER} 2\ngo\n"),
            unloaded.to_string(),
            round(0x8000_0005, "complete"),
            format!("{RMMOD_MARKER} 3\ngo\n"),
            round(0x8000_0006, "removing"),
            unloaded.to_string(),
        ]
        .concat();
        let c = cycle_rounds(&log);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].ends, vec!["complete"]);
        assert!(!c[0].during_unload);
        assert!(c[1].during_unload);
        assert_eq!(c[2].ends, vec!["removing"]);
        assert!(c[2].during_unload);
        assert!(cycle_rounds("no marker").is_empty());
    }

    #[test]
    fn sink_counts_and_stops() {
        use std::io::Write;
        let sink = Sink::start().unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", sink.port)).unwrap();
        c.write_all(&[7u8; 10_000]).unwrap();
        drop(c);
        let t = Instant::now();
        while sink.bytes() < 10_000 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sink.bytes(), 10_000);
        drop(sink); // joins: the thread saw EOF or the stop flag
    }
}
