//! Running guests against `freehint-vfio-user` (the project's device served
//! over vfio-user).
//!
//! - [`server_binary`] builds the server (`cargo build --release -p
//!   freehint-vfio-user`) and finds it in cargo's target dir;
//! - [`Server`] runs it as a separate process with its vfio-user socket and
//!   control socket ([`Server::ctl`] sends one control command) and its
//!   directory as the dump directory (`hint-dump NAME` writes
//!   [`Server::dump_path`]);
//! - [`RamLayout`] is the guest RAM layout of a QEMU x86 machine, the bit
//!   space of the device's free set (passed to the server as `--ram-layout`);
//! - [`overlay_initramfs`] adds the `vfio-*.sh` scripts to the image's
//!   initramfs (a second cpio appended to it); their guest programs are
//!   `fhtool vfio-round` and `fhtool hostile`, already in the image;
//! - [`VfioBoot::run`] boots a guest with `-device vfio-user-pci`, guest RAM
//!   as `memory-backend-memfd,share=on` and a second serial port as the
//!   host → guest channel; when the guest prints `@@VFIO ready` it hands the
//!   running VM to the scenario's host step, then sends `go LAYOUT` and
//!   collects the guest's results and `@@RUNS` dumps;
//! - [`Runs`] and [`compare`] turn those dumps into the figures the
//!   scenarios check (`false_free`, `bitmap_mismatch_bits`, ...).
//!
//! QEMU migrates no state for a vfio-user device: nothing here migrates.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use freehint_protocol::layout::qemu_x86_ram_ranges;

use crate::errors::io_error;
use crate::guest::{result_ok, GuestOutput};
use crate::qemu::{BootSpec, Machine};
use crate::runner::{boot_result, Ctx, HarnessError};
use crate::vm::Vm;

fn other(msg: impl Into<String>) -> HarnessError {
    HarnessError::Other(msg.into())
}

/// Cargo's target dir as `tests/vm/run` uses it.
fn target_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
}

/// Builds `freehint-vfio-user` (release) and returns the binary's path.
pub fn server_binary(repo: &Path) -> Result<PathBuf, HarnessError> {
    package_binary(repo, "freehint-vfio-user")
}

/// Builds the workspace package `name` (release) and returns its binary of
/// the same name.
pub fn package_binary(repo: &Path, name: &str) -> Result<PathBuf, HarnessError> {
    let st = Command::new("cargo")
        .args(["build", "--release", "-q", "-p", name])
        .current_dir(repo)
        .status()
        .map_err(|e| other(format!("cannot run cargo: {e}")))?;
    if !st.success() {
        return Err(other(format!("cargo build -p {name} failed")));
    }
    let bin = target_dir(repo).join("release").join(name);
    if !bin.is_file() {
        return Err(other(format!("{} missing after the build", bin.display())));
    }
    Ok(bin)
}

/// Guest RAM of a QEMU x86 machine: pfn ranges, bits dense in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    /// `(first_pfn, nr_pages)` per range, ascending.
    pub ranges: Vec<(u64, u64)>,
}

impl RamLayout {
    /// QEMU's split of `mem_mib` at the PCI hole
    /// ([`qemu_x86_ram_ranges`], the function the device servers use).
    pub fn for_machine(mem_mib: u64, machine: Machine) -> Self {
        let ranges = qemu_x86_ram_ranges(mem_mib << 20, machine)
            .map(|(start, len)| (start >> 12, len >> 12))
            .collect();
        RamLayout { ranges }
    }

    /// Total bits (RAM pages).
    pub fn total_bits(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// The layout bit of `pfn`, if it is RAM.
    pub fn pfn_to_bit(&self, pfn: u64) -> Option<u64> {
        let mut first_bit = 0;
        for &(first, n) in &self.ranges {
            if pfn >= first && pfn < first + n {
                return Some(first_bit + pfn - first);
            }
            first_bit += n;
        }
        None
    }

    /// The server's `--ram-layout` argument (`START+LEN` in MiB).
    pub fn server_arg(&self) -> String {
        self.ranges
            .iter()
            .map(|&(f, n)| format!("{}M+{}M", f / 256, n / 256))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The guest's `go` argument: `first_pfn:nr_pages:first_bit,...`.
    pub fn guest_arg(&self) -> String {
        let mut bit = 0;
        let mut parts = Vec::new();
        for &(f, n) in &self.ranges {
            parts.push(format!("{f}:{n}:{bit}"));
            bit += n;
        }
        parts.join(",")
    }
}

/// A running `freehint-vfio-user`. Terminated (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    /// The vfio-user socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// The server's log (stderr).
    pub log: PathBuf,
    /// Where the control command `hint-dump NAME` writes (`--dump-dir`).
    pub dump_dir: PathBuf,
}

impl Server {
    /// Starts `bin` with sockets and log under `dir` (named after `label`),
    /// `dir` as its dump directory, the RAM layout `layout` and `extra`
    /// arguments (feature switches).
    pub fn start(
        bin: &Path,
        dir: &Path,
        label: &str,
        layout: &RamLayout,
        extra: &[&str],
    ) -> Result<Server, HarnessError> {
        let socket = crate::sockets::socket_path(&format!("{label}.sock"))?;
        let control = crate::sockets::socket_path(&format!("{label}.ctl"))?;
        let log = dir.join(format!("{label}.server.log"));
        let log_file =
            std::fs::File::create(&log).map_err(io_error("cannot create server log", &log))?;
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .arg("--force")
            .arg("--dump-dir")
            .arg(dir)
            .arg("--ram-layout")
            .arg(layout.server_arg())
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("FREEHINT_SERVER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| other(format!("cannot start {}: {e}", bin.display())))?;
        let mut s = Server {
            child: Some(child),
            socket,
            control,
            log,
            dump_dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        while !(s.socket.exists() && s.control.exists()) {
            if !s.running() || t0.elapsed() > Duration::from_secs(10) {
                return Err(other(format!(
                    "server did not create its sockets (log {})",
                    s.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    /// The file `hint-dump NAME` writes.
    pub fn dump_path(&self, name: &str) -> PathBuf {
        self.dump_dir.join(name)
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            // Reaped: forget the pid so that nothing signals it later.
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Sends one control command; returns the reply object (an error if the
    /// reply is not JSON or says `"ok":false`).
    pub fn ctl(&self, cmd: &str) -> Result<Map<String, Value>, HarnessError> {
        let mut s = UnixStream::connect(&self.control)
            .map_err(|e| other(format!("control socket {}: {e}", self.control.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(180)))
            .map_err(|e| other(format!("control socket: {e}")))?;
        writeln!(s, "{cmd}").map_err(|e| other(format!("control write: {e}")))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| other(format!("control read ({cmd}): {e}")))?;
        match serde_json::from_str::<Value>(line.trim()) {
            Ok(Value::Object(m)) if m.get("ok") == Some(&Value::Bool(true)) => Ok(m),
            Ok(v) => Err(other(format!("control '{cmd}': {v}"))),
            Err(e) => Err(other(format!("control '{cmd}': bad reply {line:?}: {e}"))),
        }
    }

    /// A number field of `/proc/PID/status` (kB), e.g. `VmRSS`, `RssAnon`.
    pub fn status_kb(&self, field: &str) -> Option<u64> {
        let pid = self.pid()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Waits up to `timeout` for the server to exit by itself (it does when
    /// its client leaves); returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        for p in [&self.socket, &self.control] {
            crate::sockets::release(p);
        }
    }
}

impl Server {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: `kill` has no memory preconditions; the pid is our child's.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3) {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<(), HarnessError> {
    let out = cmd
        .output()
        .map_err(|e| other(format!("{what}: cannot run: {e}")))?;
    if !out.status.success() {
        return Err(other(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The image's initramfs of the normal flavour with the vfio guest scripts
/// appended (Linux unpacks concatenated cpio archives in order, so later
/// files win). Returns the combined file under `ctx.log_dir`.
pub fn overlay_initramfs(ctx: &Ctx) -> Result<PathBuf, HarnessError> {
    let base = ctx.manifest.flavour("normal")?.initramfs;
    let dir = ctx.log_dir.join("overlay");
    let root = dir.join("root");
    // Built afresh: the overlay holds what this run puts there, nothing older.
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(io_error("cannot clear overlay dir", &root))?;
    }
    let scenarios = root.join("scenarios");
    std::fs::create_dir_all(&scenarios)
        .map_err(io_error("cannot create overlay dir", &scenarios))?;
    let guest_scripts = ctx.repo.join("tests/vm/guest/scenarios");
    let entries =
        std::fs::read_dir(&guest_scripts).map_err(io_error("cannot list", &guest_scripts))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("vfio-") && name.ends_with(".sh") {
            let to = scenarios.join(&name);
            std::fs::copy(e.path(), &to).map_err(io_error("cannot copy", to))?;
        }
    }
    let overlay = dir.join("overlay.cpio.gz");
    run_cmd(
        Command::new("sh")
            .arg("-c")
            .arg("find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 > \"$1\"")
            .arg("sh")
            .arg(&overlay)
            .current_dir(&root),
        "cpio (overlay)",
    )?;
    let combined = dir.join("initramfs-vfio.cpio.gz");
    let mut bytes = std::fs::read(&base).map_err(io_error("cannot read initramfs", &base))?;
    let ov = std::fs::read(&overlay).map_err(io_error("cannot read", &overlay))?;
    // The kernel needs each archive to start 4-byte aligned.
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    bytes.extend_from_slice(&ov);
    std::fs::write(&combined, bytes).map_err(io_error("cannot write", &combined))?;
    Ok(combined)
}

/// Guest RAM the host holds for QEMU `pid`: allocated blocks of its memfd, kB.
pub fn memfd_kb(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for e in dir.flatten() {
        let target = std::fs::read_link(e.path()).ok()?;
        if target.to_string_lossy().starts_with("/memfd:mem") {
            return std::fs::metadata(e.path())
                .ok()
                .map(|m| m.blocks() * 512 / 1024);
        }
    }
    None
}

/// A guest booted against a vfio-user server.
#[derive(Debug, Clone)]
pub struct VfioBoot {
    /// The boot (machine, memory, guest script and args); the vfio-user
    /// device, memfd RAM and the host channel are added by [`Self::run`].
    pub spec: BootSpec,
    /// Combined initramfs from [`overlay_initramfs`].
    pub initramfs: PathBuf,
    /// Distinguishes boots of the same spec in file names (e.g. the protocol).
    pub tag: String,
}

/// What a [`VfioBoot`] produced.
#[derive(Debug)]
pub struct VfioOutcome {
    /// Whether the boot was clean (exit, `@@DONE rc=0`, no splat, results ok).
    pub ok: bool,
    /// The guest's `@@RESULT` objects.
    pub results: Vec<Map<String, Value>>,
    /// The guest's `@@RUNS` dumps.
    pub runs: Runs,
    /// The serial console log.
    pub serial_log: PathBuf,
    /// Wall-clock seconds of the boot.
    pub elapsed_s: f64,
}

/// The QEMU arguments that give the guest `mem_mib` MiB of shared memfd RAM
/// (the server maps it) and attach `server` as a vfio-user PCI device.
pub fn attach_args(mem_mib: u64, server: &Server) -> Vec<String> {
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        "-machine".into(),
        "memory-backend=mem".into(),
        "-device".into(),
        format!(
            "{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":\"{}\",\"type\":\"unix\"}}}}",
            server.socket.display()
        ),
    ]
}

impl VfioBoot {
    /// A boot of `spec` with `initramfs`, its files named with `tag`.
    pub fn new(spec: BootSpec, initramfs: &Path, tag: &str) -> Self {
        VfioBoot {
            spec,
            initramfs: initramfs.to_path_buf(),
            tag: tag.to_string(),
        }
    }

    /// Boots, waits for `@@VFIO ready`, runs `host(vm_pid)` (its error fails
    /// the boot), sends `go LAYOUT` on the host channel, waits for the guest
    /// to power off, records the guest results and a `boot` result.
    pub fn run(
        &self,
        ctx: &mut Ctx,
        server: &Server,
        layout: &RamLayout,
        host: &mut dyn FnMut(u32) -> Result<(), HarnessError>,
    ) -> Result<VfioOutcome, HarnessError> {
        let mut spec = self.spec.clone();
        spec.timeout = ctx.scaled(spec.timeout);
        let label = format!("{}-{}", spec.label(), self.tag);
        let chan = crate::sockets::socket_path(&format!("{label}.tty"))?;
        let attach = attach_args(spec.mem_mib, server);
        spec.extra_qemu_args.extend(attach);
        spec.extra_qemu_args.extend([
            "-serial".into(),
            format!("unix:{},server=on,wait=off", chan.display()),
            // A second -initrd replaces the image's (the last one wins).
            "-initrd".into(),
            self.initramfs.display().to_string(),
        ]);
        eprintln!(
            "[vmtest] vfio boot {label}: {} ({} MiB, {})",
            spec.guest_scenario,
            spec.mem_mib,
            spec.machine.name()
        );
        // Vm::boot names the serial log after the spec's label: one
        // directory per tag keeps boots of the same spec apart.
        let dir = ctx.log_dir.join(&self.tag);
        std::fs::create_dir_all(&dir).map_err(io_error("cannot create log dir", &dir))?;
        let mut vm = Vm::boot(&ctx.manifest, &spec, &dir)?;
        let serial_log = vm.serial_log.clone();
        let t0 = Instant::now();
        let mut problems = Vec::new();
        let ready = loop {
            let text = std::fs::read_to_string(&serial_log).unwrap_or_default();
            if text.contains("@@VFIO ready") {
                break true;
            }
            if text.contains("@@DONE") || !vm.running() || t0.elapsed() > spec.timeout {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if ready {
            let pid = vm.pid().unwrap_or(0);
            if let Err(e) = host(pid) {
                problems.push(format!("host step: {e}"));
            }
            match UnixStream::connect(&chan) {
                Ok(mut s) => {
                    if let Err(e) = writeln!(s, "go {}", layout.guest_arg()) {
                        problems.push(format!("host channel write: {e}"));
                    }
                    // Keep the connection until the guest is done.
                    let exit = vm.wait()?;
                    drop(s);
                    if exit.timed_out {
                        problems.push(format!("timeout after {}s", exit.elapsed.as_secs()));
                    }
                }
                Err(e) => problems.push(format!("host channel {}: {e}", chan.display())),
            }
        } else {
            problems.push("guest never printed '@@VFIO ready'".into());
        }
        let exit = vm.wait()?;
        if exit.timed_out && !problems.iter().any(|p| p.starts_with("timeout")) {
            problems.push(format!("timeout after {}s", exit.elapsed.as_secs()));
        }
        drop(vm);
        crate::sockets::release(&chan);
        let text = String::from_utf8_lossy(
            &std::fs::read(&serial_log).map_err(io_error("cannot read serial log", &serial_log))?,
        )
        .into_owned();
        let out = GuestOutput::parse(&text);
        let mut all_ok = true;
        let mut results = Vec::new();
        for mut r in out.results.iter().cloned() {
            r.entry("machine").or_insert(json!(spec.machine.name()));
            r.entry("mem_mib").or_insert(json!(spec.mem_mib));
            all_ok &= result_ok(&r);
            results.push(r.clone());
            ctx.record(r);
        }
        problems.extend(out.boot_problems());
        let runs = Runs::parse(&text);
        if let Some(bad) = runs.damaged.first() {
            problems.push(format!("damaged @@RUNS dump: {bad}"));
        }
        let boot_ok = problems.is_empty();
        let mut b = boot_result(&spec, &out, exit.elapsed, &problems, &serial_log);
        if !boot_ok {
            b.server_log = Some(server.log.display().to_string());
        }
        ctx.record(b);
        eprintln!(
            "[vmtest]   {label}: {} in {:.1}s{}",
            if boot_ok && all_ok { "ok" } else { "FAILED" },
            exit.elapsed.as_secs_f64(),
            if boot_ok {
                String::new()
            } else {
                format!(" ({})", problems.join("; "))
            }
        );
        Ok(VfioOutcome {
            ok: boot_ok && all_ok,
            results,
            runs,
            serial_log,
            elapsed_s: exit.elapsed.as_secs_f64(),
        })
    }
}

/// The guest's `@@RUNS TAG START+LEN ...` dumps, by tag (checked against
/// their `@@RUNS-END TAG PAGES` totals).
#[derive(Debug, Default, Clone)]
pub struct Runs {
    /// Runs by tag.
    pub by_tag: BTreeMap<String, Vec<(u64, u64)>>,
    /// Tags whose total did not match (a console line got damaged), or
    /// which never ended.
    pub damaged: Vec<String>,
}

impl Runs {
    /// Parses a serial log.
    pub fn parse(text: &str) -> Runs {
        let mut r = Runs::default();
        let mut ended = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(pos) = line.find("@@RUNS-END ") {
                let mut w = line[pos + 11..].split_whitespace();
                let (Some(tag), Some(total)) = (w.next(), w.next()) else {
                    continue;
                };
                let got: u64 = r.by_tag.get(tag).map_or(0, |v| v.iter().map(|x| x.1).sum());
                if total.parse::<u64>().ok() != Some(got) {
                    r.damaged
                        .push(format!("{tag}: {got} pages, guest says {total}"));
                }
                ended.push(tag.to_string());
            } else if let Some(pos) = line.find("@@RUNS ") {
                let mut w = line[pos + 7..].split_whitespace();
                let Some(tag) = w.next() else { continue };
                let v = r.by_tag.entry(tag.to_string()).or_default();
                for run in w {
                    let parsed = run
                        .split_once('+')
                        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                    match parsed {
                        Some(x) => v.push(x),
                        None => r.damaged.push(format!("{tag}: bad run {run:?}")),
                    }
                }
            }
        }
        for tag in r.by_tag.keys() {
            if !ended.contains(tag) {
                r.damaged.push(format!("{tag}: no @@RUNS-END"));
            }
        }
        r
    }

    /// The runs of `tag` as a bitmap of `total_bits` bits; `map` turns a run
    /// start into a bit (pfn runs: through the layout, page by page).
    pub fn bitmap(&self, tag: &str, layout: Option<&RamLayout>, total_bits: u64) -> Vec<u64> {
        let mut words = vec![0u64; total_bits.div_ceil(64) as usize];
        for &(start, n) in self.by_tag.get(tag).map_or(&[][..], Vec::as_slice) {
            for v in start..start.saturating_add(n) {
                let bit = match layout {
                    Some(l) => l.pfn_to_bit(v),
                    None => Some(v),
                };
                if let Some(b) = bit.filter(|&b| b < total_bits) {
                    words[(b / 64) as usize] |= 1 << (b % 64);
                }
            }
        }
        words
    }
}

/// Reads a `hint-dump` file (little-endian `u64` words).
pub fn read_dump(path: &Path) -> Result<Vec<u64>, HarnessError> {
    let bytes = std::fs::read(path).map_err(io_error("cannot read hint dump", path))?;
    Ok(bytes
        .chunks(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect())
}

/// Bits set in both.
pub fn and_count(a: &[u64], b: &[u64]) -> u64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| u64::from((x & y).count_ones()))
        .sum()
}

/// Bits set in `a` but not in `b`.
pub fn andnot_count(a: &[u64], b: &[u64]) -> u64 {
    a.iter()
        .zip(b.iter().chain(std::iter::repeat(&0)))
        .map(|(x, y)| u64::from((x & !y).count_ones()))
        .sum()
}

/// Bits set.
pub fn ones(a: &[u64]) -> u64 {
    a.iter().map(|x| u64::from(x.count_ones())).sum()
}

/// The host's free set checked against the guest's dumps: `false_free`
/// (held pages in the host's set), `not_buddy` (host-free pages that are not
/// in a free buddy block per /proc/kpageflags after the round), coverage of
/// the ground truth, and with a guest bitmap (`gbitmap`) the mismatch.
pub fn compare(host: &[u64], runs: &Runs, layout: &RamLayout) -> Comparison {
    let total = layout.total_bits();
    let truth = runs.bitmap("truth", Some(layout), total);
    let held = runs.bitmap("held", Some(layout), total);
    let covered = and_count(host, &truth);
    Comparison {
        host_free_pages: ones(host),
        truth_free_pages: ones(&truth),
        held_pages: ones(&held),
        false_free: and_count(host, &held),
        not_buddy: andnot_count(host, &truth),
        truth_covered: (covered as f64 / ones(&truth).max(1) as f64 * 1000.0).round() / 1000.0,
        guest_bitmap: runs.by_tag.contains_key("gbitmap").then(|| {
            let g = runs.bitmap("gbitmap", None, total);
            let extra = andnot_count(host, &g);
            let missing = andnot_count(&g, host);
            BitmapComparison {
                guest_bitmap_pages: ones(&g),
                bitmap_mismatch_bits: extra + missing,
                host_not_in_guest: extra,
                guest_not_in_host: missing,
            }
        }),
    }
}

/// The host's free set against the guest's dumps ([`compare`]).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Pages in the host's free set.
    pub host_free_pages: u64,
    /// Pages free in the guest's ground truth.
    pub truth_free_pages: u64,
    /// Pages the guest held.
    pub held_pages: u64,
    /// Held pages in the host's free set.
    pub false_free: u64,
    /// Host-free pages not in a free buddy block.
    pub not_buddy: u64,
    /// Share of the ground truth the host's set covers, to a thousandth.
    pub truth_covered: f64,
    /// Against the guest's own bitmap, when it dumped one.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub guest_bitmap: Option<BitmapComparison>,
}

/// The host's free set against the guest's bitmap.
#[derive(Debug, Clone, Serialize)]
pub struct BitmapComparison {
    /// Pages in the guest's bitmap.
    pub guest_bitmap_pages: u64,
    /// Bits that differ.
    pub bitmap_mismatch_bits: u64,
    /// Host-free pages not in the guest's bitmap.
    pub host_not_in_guest: u64,
    /// Pages of the guest's bitmap not in the host's set.
    pub guest_not_in_host: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_qemu_and_server_syntax() {
        let pc6 = RamLayout::for_machine(6144, Machine::Pc);
        assert_eq!(pc6.ranges, vec![(0, 786432), (1048576, 786432)]);
        assert_eq!(pc6.server_arg(), "0M+3072M,4096M+3072M");
        assert_eq!(pc6.guest_arg(), "0:786432:0,1048576:786432:786432");
        assert_eq!(pc6.pfn_to_bit(1048576), Some(786432));
        assert_eq!(pc6.pfn_to_bit(900000), None);
        let q = RamLayout::for_machine(6144, Machine::Q35);
        assert_eq!(q.ranges, vec![(0, 524288), (1048576, 1048576)]);
        assert_eq!(
            RamLayout::for_machine(1024, Machine::Q35).total_bits(),
            262144
        );
    }

    #[test]
    fn runs_parse_check_totals_and_compare() {
        let log = "x\n@@RUNS truth 0+4 10+2\r\n[ 1.0] noise\n@@RUNS-END truth 6\n\
                   @@RUNS held 4+2\n@@RUNS-END held 2\n@@RUNS gbitmap 0+4\n@@RUNS-END gbitmap 4\n\
                   @@RUNS bad 1+1\n@@RUNS-END bad 3\n";
        let r = Runs::parse(log);
        assert_eq!(r.by_tag["truth"], vec![(0, 4), (10, 2)]);
        assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
        let layout = RamLayout {
            ranges: vec![(0, 64)],
        };
        // Host: pages 0..4 and 5 (a held page).
        let host = vec![0b10_1111u64];
        let m = crate::runner::fields(&compare(&host, &r, &layout));
        assert_eq!(m["false_free"], 1);
        assert_eq!(m["not_buddy"], 1);
        assert_eq!(m["bitmap_mismatch_bits"], 1);
        assert_eq!(m["host_free_pages"], 5);
    }
}
