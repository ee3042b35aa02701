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
        for raw in text.lines() {
            out.feed_line(raw);
        }
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
        if SPLAT_MARKERS.iter().any(|m| line.contains(m))
            && !SPLAT_IGNORE.iter().any(|m| line.contains(m))
        {
            self.splat_count += 1;
            if self.splats.len() < 20 {
                self.splats.push(line.to_string());
            }
        }
    }
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
    fn garbage_rc_is_failure() {
        let out = GuestOutput::parse("@@DONE rc=\n");
        assert_eq!(out.done_rc, Some(-1));
    }
}
