//! `fhwork`: the integrity workload of the freehint migration tests.
//!
//! Runs inside the test guest (static binary, std only). Modes:
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

mod pattern;
mod region;
mod workload;

use std::io::{BufRead, Write};
use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};

use region::Region;
use workload::{Tally, WorkingSet};

const MIB_PAGES: usize = (1 << 20) / pattern::PAGE_SIZE;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Opts {
    mode: String,
    mib: usize,
    chunk_mib: usize,
    keep_mib: usize,
    pre_free_mib: usize,
    pace_us: u64,
    seed: u64,
}

fn usage() -> String {
    "usage: fhwork dirty-free --mib N | dirty-keep --mib N | run --mib N [--chunk-mib C] \
     [--keep-mib K] [--pre-free-mib F] [--pace-us U] [--seed S]"
        .to_string()
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut it = args.iter();
    let mode = it.next().ok_or_else(usage)?.clone();
    if !matches!(mode.as_str(), "dirty-free" | "dirty-keep" | "run") {
        return Err(format!("unknown mode '{mode}'\n{}", usage()));
    }
    let mut o = Opts {
        mode,
        mib: 0,
        chunk_mib: 1,
        keep_mib: 0,
        pre_free_mib: 0,
        pace_us: 0,
        seed: 0x5eed,
    };
    while let Some(flag) = it.next() {
        let val = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))?;
        let num: u64 = val
            .parse()
            .map_err(|_| format!("{flag}: '{val}' is not a number"))?;
        let n = usize::try_from(num).map_err(|_| format!("{flag}: {num} too large"))?;
        match flag.as_str() {
            "--mib" => o.mib = n,
            "--chunk-mib" => o.chunk_mib = n,
            "--keep-mib" => o.keep_mib = n,
            "--pre-free-mib" => o.pre_free_mib = n,
            "--pace-us" => o.pace_us = num,
            "--seed" => o.seed = num,
            _ => return Err(format!("unknown option {flag}\n{}", usage())),
        }
    }
    if o.chunk_mib == 0 {
        return Err("--chunk-mib must be at least 1".into());
    }
    if o.mode != "run" && o.mib == 0 {
        return Err(format!("{} needs --mib N (N > 0)", o.mode));
    }
    Ok(o)
}

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
    let bad: Vec<String> = t
        .first_bad
        .iter()
        .map(|b| {
            let pfn = region::pfn_of(b.addr).map_or("null".to_string(), |p| format!("\"0x{p:x}\""));
            format!(
                "{{\"addr\":\"0x{:x}\",\"pfn\":{pfn},\"expected\":\"0x{:016x}\",\"found\":\"0x{:016x}\",\"bad_words\":{}}}",
                b.addr, b.mismatch.expected, b.mismatch.found, b.bad_words
            )
        })
        .collect();
    format!(
        "@@RESULT {{\"name\":\"integrity\",\"ok\":{},\"pages_checked\":{},\"corrupt_pages\":{},\"round\":{},\"ops\":{},\"live_pages\":{},\"first_corrupt\":[{}]}}",
        t.corrupt_pages == 0,
        t.pages_checked,
        t.corrupt_pages,
        round,
        ops,
        live_pages,
        bad.join(",")
    )
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
    emit(&format!(
        "@@RESULT {{\"name\":\"dirty-free\",\"ok\":true,\"mib\":{mib},\"used_mib_before\":{before},\"used_mib_peak\":{peak},\"used_mib\":{}}}",
        used_mib()
    ));
    Ok(())
}

fn run(o: &Opts) -> std::io::Result<bool> {
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
    emit(&format!(
        "@@FHWORK ready {{\"live_pages\":{},\"slots\":{slots},\"keep_mib\":{},\"pre_free_mib\":{},\"used_mib\":{},\"mem_total_mib\":{},\"mem_free_mib\":{},\"setup_ms\":{}}}",
        ws.live_pages(),
        o.keep_mib,
        o.pre_free_mib,
        used_mib(),
        meminfo_kib("MemTotal") / 1024,
        meminfo_kib("MemFree") / 1024,
        t0.elapsed().as_millis()
    ));
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fhwork: {e}");
            std::process::exit(1);
        }
    };
    let res = match o.mode.as_str() {
        "dirty-free" => dirty_free(o.mib).map(|()| true),
        "dirty-keep" => {
            o.keep_mib = o.mib;
            o.mib = 0;
            run(&o)
        }
        _ => run(&o),
    };
    match res {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("fhwork: {e}");
            emit(&format!(
                "@@RESULT {{\"name\":\"integrity\",\"ok\":false,\"error\":\"{}\"}}",
                e.to_string().replace(['"', '\\'], "'")
            ));
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_run_options() {
        let o = parse(&args(
            "run --mib 64 --chunk-mib 2 --keep-mib 8 --pre-free-mib 300 --pace-us 5",
        ))
        .expect("valid");
        assert_eq!(
            (o.mib, o.chunk_mib, o.keep_mib, o.pre_free_mib, o.pace_us),
            (64, 2, 8, 300, 5)
        );
    }

    #[test]
    fn rejects_bad_usage() {
        assert!(parse(&args("")).is_err());
        assert!(parse(&args("fly")).is_err());
        assert!(parse(&args("dirty-free")).is_err());
        assert!(parse(&args("run --mib")).is_err());
        assert!(parse(&args("run --mib x")).is_err());
        assert!(parse(&args("run --chunk-mib 0")).is_err());
        assert!(parse(&args("run --bogus 1")).is_err());
    }

    #[test]
    fn result_line_is_json_shaped() {
        let t = Tally {
            pages_checked: 10,
            corrupt_pages: 0,
            first_bad: Vec::new(),
        };
        let l = result_line(&t, 1, 5, 10);
        assert!(l.starts_with(
            "@@RESULT {\"name\":\"integrity\",\"ok\":true,\"pages_checked\":10,\"corrupt_pages\":0"
        ));
        assert!(l.ends_with("\"first_corrupt\":[]}"));
    }
}
