//! `fhwork`: the integrity workload of the freehint migration tests.
//!
//! Runs inside the test guest (static binary). Modes:
//!
//! - `fhwork dirty-free --mib N`: map N MiB, write a non-zero pattern, unmap
//!   (the "dirtied then freed" guest: the pages go back to the buddy allocator
//!   still holding data, so a migration without hints must copy them);
//! - `fhwork dirty-keep --mib N`: map N MiB of stamped pages and keep them;
//!   verify them on every trigger (see below);
//! - `fhwork run --mib N [--chunk-mib C] [--keep-mib K] [--pre-free-mib F]
//!   [--pace-us U] [--seed S]`: first dirties and frees F MiB, maps K MiB
//!   kept pages, then keeps a working set of N MiB in C MiB chunks whose
//!   pages are stamped (chunk id, page index, generation, checksum); it
//!   continuously verifies a chunk and then frees or rewrites it, and maps
//!   fresh chunks into free slots.
//!
//! Triggers: every line on stdin makes it verify every live page and print
//! `@@RESULT {"name":"integrity","ok":..,"pages_checked":N,"corrupt_pages":M,..}`
//! (counts since the previous report, including the verifications done by the
//! churn). The line `stop` (or end of input) reports and exits. The first few
//! damaged pages are listed with virtual address, physical frame, expected and
//! found word. When set-up is done it prints `@@FHWORK ready {...}`.
//!
//! Exit status: 0 when no page was ever damaged, 2 otherwise, 1 on bad usage.

#![warn(missing_docs)]

mod cli;
mod pattern;
mod region;
mod workload;

use std::io::{BufRead, Write};
use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

use cli::{Cli, Mode, RunArgs};
use region::Region;
use workload::{Tally, WorkingSet};

const MIB_PAGES: usize = (1 << 20) / pattern::PAGE_SIZE;

/// A /proc/meminfo field in KiB (0 when unreadable).
fn meminfo_kib(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `MemTotal - MemFree` in MiB (0 when unreadable).
fn used_mib() -> u64 {
    meminfo_kib("MemTotal").saturating_sub(meminfo_kib("MemFree")) / 1024
}

fn result_line(t: &Tally, round: u64, ops: u64, live_pages: usize) -> String {
    let bad: Vec<Value> = t
        .first_bad
        .iter()
        .map(|b| {
            json!({
                "addr": format!("0x{:x}", b.addr),
                "pfn": region::pfn_of(b.addr).map(|p| format!("0x{p:x}")),
                "expected": format!("0x{:016x}", b.mismatch.expected),
                "found": format!("0x{:016x}", b.mismatch.found),
                "bad_words": b.bad_words,
            })
        })
        .collect();
    let result = json!({
        "name": "integrity",
        "ok": t.corrupt_pages == 0,
        "pages_checked": t.pages_checked,
        "corrupt_pages": t.corrupt_pages,
        "round": round,
        "ops": ops,
        "live_pages": live_pages,
        "first_corrupt": bad,
    });
    format!("@@RESULT {result}")
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // The console is the only channel; a failed write cannot be reported.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn dirty_free(mib: usize) -> std::io::Result<()> {
    let before = used_mib();
    let mut r = Region::new(mib * MIB_PAGES)?;
    r.scribble(0xf4ee);
    let peak = used_mib();
    drop(r);
    let result = json!({
        "name": "dirty-free", "ok": true, "mib": mib,
        "used_mib_before": before, "used_mib_peak": peak, "used_mib": used_mib(),
    });
    emit(&format!("@@RESULT {result}"));
    Ok(())
}

fn run(o: &RunArgs) -> std::io::Result<bool> {
    let t0 = Instant::now();
    if o.pre_free_mib > 0 {
        dirty_free(o.pre_free_mib)?;
    }
    let slots = o.mib / o.chunk_mib;
    let mut ws = WorkingSet::new(
        slots,
        o.chunk_mib * MIB_PAGES,
        o.keep_mib * MIB_PAGES,
        o.seed,
    )?;
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let ready = json!({
        "live_pages": ws.live_pages(),
        "slots": slots,
        "keep_mib": o.keep_mib,
        "pre_free_mib": o.pre_free_mib,
        "used_mib": used_mib(),
        "mem_total_mib": meminfo_kib("MemTotal") / 1024,
        "mem_free_mib": meminfo_kib("MemFree") / 1024,
        "setup_ms": t0.elapsed().as_millis() as u64,
    });
    emit(&format!("@@FHWORK ready {ready}"));
    let mut round = 0u64;
    let mut ever_bad = false;
    loop {
        let cmd = match rx.try_recv() {
            Ok(c) => Some(c),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(None),
        };
        if let Some(cmd) = cmd {
            round += 1;
            ws.verify_all();
            let t = ws.take_tally();
            ever_bad |= t.corrupt_pages > 0;
            emit(&result_line(&t, round, ws.ops, ws.live_pages()));
            let stop = match &cmd {
                None => true,
                Some(l) => l.trim() == "stop",
            };
            if stop {
                return Ok(!ever_bad);
            }
            continue;
        }
        if slots == 0 {
            // Nothing to churn (dirty-keep): just wait for the next trigger.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        ws.step()?;
        if o.pace_us > 0 {
            std::thread::sleep(Duration::from_micros(o.pace_us));
        }
    }
}

/// The parsed command line; on bad usage prints the error and exits 1 (help
/// and version exit 0).
fn parse_args() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            std::process::exit(1);
        }
        Err(e) => e.exit(),
    }
}

fn main() {
    let res = match parse_args().mode {
        Mode::DirtyFree { mib } => dirty_free(mib).map(|()| true),
        Mode::DirtyKeep { mib } => run(&RunArgs::keep_only(mib)),
        Mode::Run(o) => run(&o),
    };
    match res {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("fhwork: {e}");
            let result = json!({"name": "integrity", "ok": false, "error": e.to_string()});
            emit(&format!("@@RESULT {result}"));
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_is_one_json_object() {
        let t = Tally {
            pages_checked: 10,
            corrupt_pages: 0,
            first_bad: Vec::new(),
        };
        let l = result_line(&t, 1, 5, 10);
        let json = l.strip_prefix("@@RESULT ").expect("a result line");
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            v,
            json!({"name": "integrity", "ok": true, "pages_checked": 10, "corrupt_pages": 0,
                   "round": 1, "ops": 5, "live_pages": 10, "first_corrupt": []})
        );
    }
}
