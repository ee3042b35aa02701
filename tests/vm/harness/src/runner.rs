//! The scenario context: boots guests, turns their output into results,
//! prints one JSON object per result on stdout and keeps the tally.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::errors::{io_error, PathIoError};
use crate::guest::{result_ok, GuestOutput};
use crate::manifest::{Manifest, ManifestError};
use crate::qemu::BootSpec;
use crate::vm::{BootExit, Vm};

/// Errors that abort a scenario (as opposed to failed results, which are
/// reported and counted).
#[derive(Debug, Error)]
pub enum HarnessError {
    /// The manifest is missing or broken.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// QMP failed.
    #[error("{}", freehint_migrate::qemu::receive::error_chain(.0))]
    Qmp(#[from] freehint_migrate::qmp::QmpError),
    /// A file or socket failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// Anything else, with a message.
    #[error("{0}")]
    Other(String),
}

/// What one boot produced, after its results were printed.
#[derive(Debug, Clone)]
pub struct BootReport {
    /// The boot that ran.
    pub spec: BootSpec,
    /// Guest results, each already carrying the boot fields.
    pub results: Vec<Map<String, Value>>,
    /// Whether the boot as a whole was clean (exit, rc 0, no splat, no timeout).
    pub ok: bool,
    /// Serial log path.
    pub serial_log: PathBuf,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
}

impl BootReport {
    /// All numeric values of `field` over this boot's results.
    pub fn numbers(&self, field: &str) -> Vec<f64> {
        self.results
            .iter()
            .filter_map(|r| r.get(field).and_then(Value::as_f64))
            .collect()
    }
}

/// Context handed to every scenario.
#[derive(Debug)]
pub struct Ctx {
    /// Repository root.
    pub repo: PathBuf,
    /// The image manifest.
    pub manifest: Manifest,
    /// Where serial logs and sockets go (`target/vm/logs/<scenario>/`).
    pub log_dir: PathBuf,
    /// Multiplier for every boot timeout (slow machines).
    pub timeout_scale: f64,
    /// Flavour override from the command line, if any.
    pub flavour_override: Option<String>,
    passed: usize,
    failed: usize,
    failed_logs: Vec<PathBuf>,
    boots: usize,
    /// Held for the whole run: two runs of one scenario would share log and
    /// socket paths, so the second waits for the first.
    _lock: std::fs::File,
}

/// Takes an exclusive `flock` on `file`, saying so on stderr if it must wait.
fn lock_exclusive(file: &std::fs::File, scenario: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    eprintln!("[vmtest] another run of scenario {scenario} holds its log dir; waiting");
    loop {
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The fields of a `json!({...})` object literal (any other value: none),
/// so a result is written as one literal rather than a chain of inserts.
pub fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The `versions` object every emitted result carries (set once from the
/// manifest by [`set_versions`]).
static VERSIONS: OnceLock<Value> = OnceLock::new();

/// Makes every later [`emit`] of an object add `"versions": versions` (the
/// QEMU package, linux-source, rustc and bindgen the run used).
pub fn set_versions(versions: &BTreeMap<String, String>) {
    let _ = VERSIONS.set(json!(versions));
}

/// Emits one JSON line on stdout (`record` serialized, keys sorted); an
/// object gets the run's `versions`.
pub fn emit<T: Serialize + ?Sized>(record: &T) {
    emit_value(serde_json::to_value(record).unwrap_or(Value::Null));
}

/// [`emit`] of a value already serialized.
fn emit_value(obj: Value) {
    let line = stamped(obj, VERSIONS.get());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `obj` with `"versions": versions` added when it is an object without one.
fn stamped(mut obj: Value, versions: Option<&Value>) -> Value {
    if let (Value::Object(m), Some(v)) = (&mut obj, versions) {
        m.entry("versions").or_insert_with(|| v.clone());
    }
    obj
}

/// The fields of a result record: `record` serialized to a JSON object
/// (a record that is not an object: none). Keys come out sorted, as every
/// emitted line has them.
pub fn fields<T: Serialize + ?Sized>(record: &T) -> Map<String, Value> {
    match serde_json::to_value(record) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// The `boot` result line of one boot.
#[derive(Debug, Clone, Serialize)]
pub struct BootRecord<'a> {
    /// Always `"boot"`.
    pub name: &'static str,
    /// Whether the boot was clean (no problems).
    pub ok: bool,
    /// The guest script.
    pub scenario: &'a str,
    /// Kernel flavour.
    pub flavour: &'a str,
    /// Machine type.
    pub machine: &'static str,
    /// Guest RAM.
    pub mem_mib: u64,
    /// The guest's `@@DONE` rc.
    pub rc: Option<i32>,
    /// Wall time, to a tenth of a second.
    pub elapsed_s: f64,
    /// What went wrong, on a failed boot only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub failure: Option<BootFailure<'a>>,
    /// The device server's log (VFIO boots), on a failed boot only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_log: Option<String>,
}

/// The fields a failed boot's `boot` line adds.
#[derive(Debug, Clone, Serialize)]
pub struct BootFailure<'a> {
    /// Why the boot failed.
    pub problems: &'a [String],
    /// Kernel complaints on the serial console.
    pub splats: &'a [String],
    /// `@@RESULT` lines that did not parse.
    pub malformed: &'a [String],
    /// Serial log path.
    pub log: String,
}

/// The `boot` result line of one boot: ok (no `problems`), scenario,
/// flavour, machine and memory, the guest's rc and the wall time; when it
/// failed also the problems, the splat and malformed lines and the serial
/// log.
pub fn boot_result<'a>(
    spec: &'a BootSpec,
    out: &'a GuestOutput,
    elapsed: std::time::Duration,
    problems: &'a [String],
    serial_log: &Path,
) -> BootRecord<'a> {
    let ok = problems.is_empty();
    BootRecord {
        name: "boot",
        ok,
        scenario: &spec.guest_scenario,
        flavour: &spec.flavour,
        machine: spec.machine.name(),
        mem_mib: spec.mem_mib,
        rc: out.done_rc,
        elapsed_s: (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        failure: (!ok).then(|| BootFailure {
            problems,
            splats: &out.splats,
            malformed: &out.malformed,
            log: serial_log.display().to_string(),
        }),
        server_log: None,
    }
}

impl Ctx {
    /// A context for `scenario`, logs under `repo/target/vm/logs/<scenario>`.
    pub fn new(repo: &Path, manifest: Manifest, scenario: &str) -> Result<Ctx, HarnessError> {
        let log_dir = repo.join("target/vm/logs").join(scenario);
        std::fs::create_dir_all(&log_dir).map_err(io_error("cannot create log dir", &log_dir))?;
        let lock_path = log_dir.join(".lock");
        let lock = std::fs::File::create(&lock_path)
            .map_err(io_error("cannot create lock file", &lock_path))?;
        lock_exclusive(&lock, scenario).map_err(io_error("cannot lock", lock_path))?;
        Ok(Ctx {
            repo: repo.to_path_buf(),
            manifest,
            log_dir,
            timeout_scale: 1.0,
            flavour_override: None,
            passed: 0,
            failed: 0,
            failed_logs: Vec::new(),
            boots: 0,
            _lock: lock,
        })
    }

    /// Number of passed results so far.
    pub fn passed(&self) -> usize {
        self.passed
    }

    /// Number of failed results so far.
    pub fn failed(&self) -> usize {
        self.failed
    }

    /// Number of boots so far.
    pub fn boots(&self) -> usize {
        self.boots
    }

    /// Serial logs of boots that had a failure.
    pub fn failed_logs(&self) -> &[PathBuf] {
        &self.failed_logs
    }

    /// Prints and counts one result record (its fields must include
    /// `"name"` and `"ok"`).
    pub fn record(&mut self, result: impl Serialize) {
        let result = fields(&result);
        if result_ok(&result) {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        emit_value(Value::Object(result));
    }

    /// Applies the command line's flavour override to `spec`.
    pub fn apply_overrides(&self, spec: &mut BootSpec) {
        if let Some(f) = &self.flavour_override {
            spec.flavour = f.clone();
        }
    }

    /// `t` scaled by `--timeout-scale` (at least a tenth of it).
    pub fn scaled(&self, t: Duration) -> Duration {
        t.mul_f64(self.timeout_scale.max(0.1))
    }

    /// Boots `spec`, waits for it, prints its results (with the boot fields
    /// `flavour`, `machine`, `mem_mib` added) and a `boot` result that fails on
    /// timeout, splat, missing `@@DONE`, non-zero rc, malformed or no results.
    pub fn boot(&mut self, mut spec: BootSpec) -> Result<BootReport, HarnessError> {
        self.apply_overrides(&mut spec);
        spec.timeout = self.scaled(spec.timeout);
        self.boots += 1;
        let label = spec.label();
        eprintln!(
            "[vmtest] boot {}: {} ({} MiB, {}, {} flavour, timeout {}s)",
            self.boots,
            spec.guest_scenario,
            spec.mem_mib,
            spec.machine.name(),
            spec.flavour,
            spec.timeout.as_secs()
        );
        let mut vm = Vm::boot(&self.manifest, &spec, &self.log_dir)?;
        let exit = vm.wait()?;
        let serial_log = vm.serial_log.clone();
        drop(vm);
        let text =
            std::fs::read(&serial_log).map_err(io_error("cannot read serial log", &serial_log))?;
        let out = GuestOutput::parse(&String::from_utf8_lossy(&text));
        self.finish_boot(spec, out, exit, serial_log, &label)
    }

    fn boot_fields(spec: &BootSpec) -> [(&'static str, Value); 3] {
        [
            ("flavour", json!(spec.flavour)),
            ("machine", json!(spec.machine.name())),
            ("mem_mib", json!(spec.mem_mib)),
        ]
    }

    fn finish_boot(
        &mut self,
        spec: BootSpec,
        out: GuestOutput,
        exit: BootExit,
        serial_log: PathBuf,
        label: &str,
    ) -> Result<BootReport, HarnessError> {
        let mut results = Vec::new();
        let mut all_ok = true;
        for mut r in out.results.iter().cloned() {
            for (k, v) in Self::boot_fields(&spec) {
                r.entry(k).or_insert(v);
            }
            all_ok &= result_ok(&r);
            results.push(r.clone());
            self.record(r);
        }
        let mut problems = Vec::new();
        if exit.timed_out {
            problems.push(format!("timeout after {}s", exit.elapsed.as_secs()));
        }
        problems.extend(out.boot_problems());
        if !out.malformed.is_empty() {
            problems.push(format!(
                "{} malformed @@RESULT line(s)",
                out.malformed.len()
            ));
        }
        let boot_ok = problems.is_empty();
        let b = boot_result(&spec, &out, exit.elapsed, &problems, &serial_log);
        self.record(b);
        let ok = boot_ok && all_ok;
        if !ok {
            self.failed_logs.push(serial_log.clone());
        }
        eprintln!(
            "[vmtest]   {label}: {} in {:.1}s{}",
            if ok { "ok" } else { "FAILED" },
            exit.elapsed.as_secs_f64(),
            if ok {
                String::new()
            } else {
                format!(
                    " ({}; serial log {})",
                    problems.join("; "),
                    serial_log.display()
                )
            }
        );
        Ok(BootReport {
            spec,
            results,
            ok,
            serial_log,
            elapsed_s: exit.elapsed.as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_carry_the_versions_once() {
        let v = json!({"qemu": "1:11.1.3+ds-2~bpo13+1", "rustc": "1.96.0"});
        let r = stamped(json!({"name": "boot", "ok": true}), Some(&v));
        assert_eq!(r["versions"], v);
        assert_eq!(r["name"], "boot");
        let own = json!({"name": "x", "versions": "kept"});
        assert_eq!(stamped(own, Some(&v))["versions"], "kept");
        assert_eq!(stamped(json!([1]), Some(&v)), json!([1]));
        assert!(stamped(json!({"a": 1}), None).get("versions").is_none());
    }

    #[test]
    fn a_boot_line_carries_its_failure_only_when_it_failed() {
        let spec = BootSpec::new("smoke");
        let out = GuestOutput::parse("@@DONE rc=0\n");
        let d = Duration::from_millis(3140);
        let ok = fields(&boot_result(&spec, &out, d, &[], Path::new("s.log")));
        let keys: Vec<&str> = ok.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "elapsed_s",
                "flavour",
                "machine",
                "mem_mib",
                "name",
                "ok",
                "rc",
                "scenario"
            ]
        );
        assert_eq!(
            (ok["elapsed_s"].clone(), ok["rc"].clone()),
            (json!(3.1), json!(0))
        );
        let problems = vec!["timeout after 3s".to_string()];
        let bad = fields(&boot_result(&spec, &out, d, &problems, Path::new("s.log")));
        assert_eq!(bad["ok"], false);
        assert_eq!(bad["problems"], json!(problems));
        assert_eq!(
            (bad["splats"].clone(), bad["log"].clone()),
            (json!([]), json!("s.log"))
        );
        assert!(bad.contains_key("malformed") && !bad.contains_key("server_log"));
    }
}
