//! Parsing of the guest's serial console output.
//!
//! The guest side speaks a tiny line protocol on the console (see
//! `tests/vm/guest/init`):
//! - `@@RESULT {json}`: one test result, a JSON object with at least
//!   `"name"` (string) and `"ok"` (bool); every other field is passed through;
//! - `@@DONE rc=N`: the scenario script finished with exit status `N`.
//!
//! Kernel splats (`BUG:`, `WARNING:`, lockdep reports, panics, oopses) anywhere
//! in the output turn into failed results: a scenario cannot pass on a kernel
//! that complained.

use serde_json::{Map, Value};

/// Console markers that mean the kernel complained. Each is matched anywhere
/// in a line (console lines carry a `[    1.234567] ` timestamp prefix).
pub const SPLAT_MARKERS: &[&str] = &[
    "BUG:",
    "WARNING:",
    "Kernel panic",
    "possible circular locking",
    "inconsistent lock state",
    "sleeping function called from invalid context",
    "Oops",
    "possible recursive locking",
    "suspicious RCU usage",
    "kmemleak:",
    "list_add corruption",
    "list_del corruption",
    "general protection fault",
    "Call Trace:",
    // Reports that do not start with `WARNING:` or `BUG:`, or that follow a
    // report whose first line could be missed: `BUG()`/`VM_BUG_ON`, a Rust
    // panic in the kernel, UBSAN, DEBUG_LIST's double add, lockdep switching
    // itself off after a report (after which it reports nothing more).
    "kernel BUG at",
    "panicked at",
    "UBSAN:",
    "list_add double add",
    "DEBUG_LOCKS_WARN_ON",
    "turning off the locking correctness validator",
    "INFO: lockdep is turned off",
    "Unable to handle kernel",
];

/// Console lines that look like splats but are not (exact substrings).
const SPLAT_IGNORE: &[&str] = &[
    // kmemleak's start-up banners (built in and disabled, or running; the
    // debug flavour runs it with scanning on demand only).
    "kmemleak: Kernel memory leak detector disabled",
    "kmemleak: Kernel memory leak detector initialized",
    "kmemleak: Automatic memory scanning thread ended",
];

/// Rejoins a guest `@@RESULT` line that a kernel message split on the serial
/// console. The kernel writes to the console directly, so a message printed
/// while a guest program writes its line lands inside it: the console shows
/// `@@RESULT {"a":1,"b":2[    1.8] kernel text` and then `3}` on the next
/// line. When a `@@RESULT` line's JSON does not parse and a printk
/// timestamp (`[ seconds.micros]`) follows the marker, the kernel text from
/// the last timestamp on is passed on as a line of its own and the rest is
/// completed with the next console line.
#[derive(Debug, Default)]
pub struct LineJoiner {
    pending: Option<String>,
}

impl LineJoiner {
    /// Feeds one raw console line; calls `emit` with each line it completes.
    pub fn push(&mut self, raw: &str, mut emit: impl FnMut(&str)) {
        let raw = raw.trim_end_matches(['\r', '\n']);
        let line = match self.pending.take() {
            Some(mut head) => {
                head.push_str(raw);
                head
            }
            None => raw.to_string(),
        };
        if let Some(cut) = split_point(&line) {
            emit(&line[cut..]);
            self.pending = Some(line[..cut].to_string());
        } else {
            emit(&line);
        }
    }

    /// Passes on a line still waiting for its end (the console closed).
    pub fn finish(&mut self, mut emit: impl FnMut(&str)) {
        if let Some(line) = self.pending.take() {
            emit(&line);
        }
    }
}

/// Where a kernel message starts inside a split `@@RESULT` line, if it is one.
fn split_point(line: &str) -> Option<usize> {
    let marker = line.find("@@RESULT ")?;
    let json = &line[marker + "@@RESULT ".len()..];
    if serde_json::from_str::<Value>(json.trim()).is_ok() {
        return None;
    }
    let cut = (marker..line.len())
        .rev()
        .find(|&i| line.as_bytes()[i] == b'[' && is_printk_stamp(&line[i..]))?;
    (cut > marker + "@@RESULT ".len()).then_some(cut)
}

/// Whether `s` starts with a printk timestamp: `[`, spaces, digits, `.`,
/// digits, `]`.
fn is_printk_stamp(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('[') else {
        return false;
    };
    let rest = rest.trim_start_matches(' ');
    let Some((secs, tail)) = rest.split_once('.') else {
        return false;
    };
    let micros: String = tail.chars().take_while(char::is_ascii_digit).collect();
    !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && !micros.is_empty()
        && tail[micros.len()..].starts_with(']')
}

/// What the guest reported during one boot.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GuestOutput {
    /// `@@RESULT` objects, in order of appearance.
    pub results: Vec<Map<String, Value>>,
    /// Lines of `@@RESULT` that did not parse as a JSON object with a name.
    pub malformed: Vec<String>,
    /// Exit status from `@@DONE rc=N`, if the guest got that far.
    pub done_rc: Option<i32>,
    /// Console lines that matched a splat marker (first 20 kept).
    pub splats: Vec<String>,
    /// Number of splat lines seen in total.
    pub splat_count: usize,
}

impl GuestOutput {
    /// What fails a boot on the guest's side: no `@@DONE` or a non-zero rc,
    /// kernel splats, no `@@RESULT` line at all.
    pub fn boot_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.done_rc {
            None => problems.push("no @@DONE (guest did not finish)".into()),
            Some(0) => {}
            Some(rc) => problems.push(format!("guest scenario exited rc={rc}")),
        }
        if self.splat_count > 0 {
            problems.push(format!("{} kernel splat line(s)", self.splat_count));
        }
        if self.results.is_empty() {
            problems.push("no @@RESULT lines".into());
        }
        problems
    }

    /// Parses a whole serial log.
    pub fn parse(text: &str) -> Self {
        let mut out = GuestOutput::default();
        let mut joiner = LineJoiner::default();
        for raw in text.lines() {
            joiner.push(raw, |l| out.feed_line(l));
        }
        joiner.finish(|l| out.feed_line(l));
        out
    }

    /// Feeds one console line.
    pub fn feed_line(&mut self, raw: &str) {
        // Serial output may carry CRs and the odd escape sequence.
        let line = raw.trim_end_matches(['\r', '\n']).trim_start_matches('\r');
        if let Some(pos) = line.find("@@RESULT ") {
            let json = &line[pos + "@@RESULT ".len()..];
            match serde_json::from_str::<Value>(json.trim()) {
                Ok(Value::Object(obj)) if obj.get("name").and_then(Value::as_str).is_some() => {
                    self.results.push(obj)
                }
                _ => self.malformed.push(line.to_string()),
            }
            return;
        }
        if let Some(pos) = line.find("@@DONE rc=") {
            let rest = &line[pos + "@@DONE rc=".len()..];
            let digits: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '-')
                .collect();
            self.done_rc = Some(digits.parse().unwrap_or(-1));
            return;
        }
        if is_splat(line) {
            self.splat_count += 1;
            if self.splats.len() < 20 {
                self.splats.push(line.to_string());
            }
        }
    }
}

/// Whether a console line (not a result or done line) is a kernel splat:
/// one of [`SPLAT_MARKERS`], and none of its known harmless look-alikes.
/// `@@RESULT` and `@@DONE` lines never count (they may quote an error text).
/// The one splat test of the harness: plain boots, migrations and the
/// lockdep scenario's log scans all use it.
pub fn is_splat(line: &str) -> bool {
    if line.contains(RESULT_MARKER) || line.contains("@@DONE rc=") {
        return false;
    }
    SPLAT_MARKERS.iter().any(|m| line.contains(m)) && !SPLAT_IGNORE.iter().any(|m| line.contains(m))
}

/// Marker of a guest result line.
pub const RESULT_MARKER: &str = "@@RESULT ";

/// The JSON object that follows `marker` on a console line.
pub fn json_after(line: &str, marker: &str) -> Option<Map<String, Value>> {
    let (_, j) = line.split_once(marker)?;
    match serde_json::from_str::<Value>(j.trim()).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// The splat lines of a whole serial log (see [`is_splat`]).
pub fn splat_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| is_splat(l))
        .map(str::to_string)
        .collect()
}

/// Whether a result object says it passed (`"ok": true`).
pub fn result_ok(obj: &Map<String, Value>) -> bool {
    obj.get("ok").and_then(Value::as_bool) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[    0.000000] Linux version 6.12.117
[    1.100000] freehint: loaded\r
@@RESULT {\"name\":\"false_free\",\"ok\":true,\"false_free\":0}
@@RESULT {\"name\":\"bit_count\",\"ok\":false,\"bits\":10,\"ram_pages\":11}
@@RESULT not json
@@RESULT {\"ok\":true}
@@DONE rc=3
";

    #[test]
    fn parses_results_done_and_malformed() {
        let out = GuestOutput::parse(LOG);
        assert_eq!(out.results.len(), 2);
        assert_eq!(out.results[0]["name"], "false_free");
        assert!(result_ok(&out.results[0]));
        assert!(!result_ok(&out.results[1]));
        assert_eq!(out.results[1]["ram_pages"], 11);
        assert_eq!(out.malformed.len(), 2);
        assert_eq!(out.done_rc, Some(3));
        assert_eq!(out.splat_count, 0);
    }

    #[test]
    fn detects_splats() {
        let log = "\
[    2.0] ======================================================
[    2.0] WARNING: possible circular locking dependency detected
[    3.0] BUG: sleeping function called from invalid context at mm/x.c:1
[    3.1] kmemleak: Kernel memory leak detector disabled
[    3.2] kmemleak: Kernel memory leak detector initialized (mem pool available: 15936)
[    3.3] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)
[    4.0] Kernel panic - not syncing: Attempted to kill init!
";
        let out = GuestOutput::parse(log);
        assert_eq!(out.splat_count, 4);
        assert!(out.splats[2].contains("suspected memory leaks"));
        assert!(out.splats[0].contains("circular locking"));
        assert_eq!(out.done_rc, None);
    }

    #[test]
    fn result_without_ok_is_not_ok() {
        let out = GuestOutput::parse("@@RESULT {\"name\":\"x\"}\n");
        assert_eq!(out.results.len(), 1);
        assert!(!result_ok(&out.results[0]));
    }

    #[test]
    fn a_result_split_by_a_kernel_message_is_rejoined() {
        let log = "\
@@RESULT {\"name\":\"meminfo\",\"ok\":true,\"mem_free_kb\":93217[    1.829894] clocksource: tsc: mask: 0xffffffffffffffff
2,\"pcp_kb\":5}
@@RESULT {\"name\":\"x\",\"ok\":true,\"log\":\"[    1.2] freehint: bound\"}
[    2.0] WARNING: something[    2.1] x
";
        let out = GuestOutput::parse(log);
        assert!(out.malformed.is_empty(), "{:?}", out.malformed);
        assert_eq!(out.results.len(), 2);
        assert_eq!(out.results[0]["mem_free_kb"], 932172);
        assert_eq!(out.results[0]["pcp_kb"], 5);
        assert_eq!(out.results[1]["log"], "[    1.2] freehint: bound");
        assert_eq!(out.splat_count, 1);
    }

    #[test]
    fn a_broken_result_without_a_kernel_message_stays_malformed() {
        let out = GuestOutput::parse("@@RESULT {\"name\":\"x\",\"ok\":tr\nnext line\n");
        assert_eq!(out.malformed.len(), 1);
        assert!(out.results.is_empty());
    }

    #[test]
    fn garbage_rc_is_failure() {
        let out = GuestOutput::parse("@@DONE rc=\n");
        assert_eq!(out.done_rc, Some(-1));
    }

    /// A real lockdep report, captured from the debug flavour's console on
    /// 2026-11-23: `tests/vm/run qemu-lockdep` with a throwaway module
    /// (never committed) that takes two mutexes in ABBA order, loaded on the
    /// last destination just before the unload. Between two lines of the
    /// guest's own output, one of them cut by the report.
    const REAL_LOCKDEP_SPLAT: &str = "\
@@RESULT {\"name\":\"integrity\",\"ok\":true,\"pages_checked\":16896,\"corrupt_pages\":0}
[    8.689319] ======================================================
[    8.689508] WARNING: possible circular locking dependency detected
[    8.689881] 6.12.117 #1 Tainted: G           O      
[    8.690173] ------------------------------------------------------
[    8.690320] insmod/59 is trying to acquire lock:
[    8.691174] ffffffffa0020068 (splat_a){+.+.}-{3:3}, at: init_module+0x54/0x1000 [splat]
[    8.693956] ffffffffa00200f8 (splat_b){+.+.}-{3:3}, at: init_module+0x46/0x1000 [splat]
[    8.694566] which lock already depends on the new lock.
[    8.695470] -> #1 (splat_b){+.+.}-{3:3}:
[    8.695687]        lock_acquire+0x13c/0x240
@@RMMOD waiting[    8.698661]        init_module+0x20/0x1000 [splat]
[    8.701175] -> #0 (splat_a){+.+.}-{3:3}:
[    8.701631]        check_noncircular+0x139/0x160
[    8.708866]  Possible unsafe locking scenario:
[    8.709014]        CPU0                    CPU1
[    8.709319]   lock(splat_b);
[    8.709771]                                lock(splat_a);
[    8.710269]  *** DEADLOCK ***
[    8.710441] 1 lock held by insmod/59:
[    8.714107] CPU: 1 UID: 0 PID: 59 Comm: insmod Tainted: G           O       6.12.117 #1 
[    8.714532] Call Trace:
[    8.714602]  <TASK>
[    8.714713]  ? print_circular_bug+0x2d9/0x2f0
[    8.715014]  </TASK>
go
[    8.733667] freehint: freehint: unloaded after 1 builds
";

    #[test]
    fn a_real_lockdep_report_is_a_splat() {
        let lines = splat_lines(REAL_LOCKDEP_SPLAT);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("WARNING: possible circular locking dependency detected"));
        assert!(lines[1].contains("Call Trace:"));
        // The guest's own lines around it are not.
        assert!(!is_splat(
            "[    8.733667] freehint: freehint: unloaded after 1 builds"
        ));
    }

    #[test]
    fn extra_markers_and_exceptions() {
        for l in [
            "[    3.1] kernel BUG at mm/page_alloc.c:1234!",
            "[    3.1] rust_kernel: panicked at guest-driver/hint.rs:10:5:",
            "[    3.1] UBSAN: shift-out-of-bounds in mm/x.c:1:2",
            "[    3.1] list_add double add: new=0, prev=0, next=0.",
            "[    3.1] DEBUG_LOCKS_WARN_ON(1)",
            "[    3.1] turning off the locking correctness validator.",
            "[    3.1] BUG: sleeping function called from invalid context at x.c:1",
            "[    3.1] list_del corruption, ffff->next is LIST_POISON1 (dead)",
            "[    3.1] Oops: general protection fault, probably for non-canonical address",
        ] {
            assert!(is_splat(l), "{l}");
        }
        for l in [
            "[    0.1] Lock dependency validator: Copyright (c) 2006 Red Hat, Inc., Ingo Molnar",
            "[    0.1] kmemleak: Kernel memory leak detector disabled",
            r#"@@RESULT {"name":"rmmod","ok":false,"error":"WARNING: x"}"#,
            "[   10.0] freehint: hint round 0x8000000b: 1 blocks, end=removing",
        ] {
            assert!(!is_splat(l), "{l}");
        }
    }
}
