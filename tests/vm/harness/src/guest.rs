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
pub fn is_splat(line: &str) -> bool {
    SPLAT_MARKERS.iter().any(|m| line.contains(m)) && !SPLAT_IGNORE.iter().any(|m| line.contains(m))
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
}
