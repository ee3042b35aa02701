//! `bench-vfio` (benchmark, not in CI): hint round latency, request to the
//! completed free set on the host, at 1, 4 and 8 GiB (pc, idle guest that
//! dirtied and freed 256 MiB), for
//! - our device (`freehint-vfio-user`) with `freehint.ko`, bitmap protocol;
//! - our device with `freehint.ko`, standard protocol (`--no-bitmap`);
//! - our device with the stock `virtio_balloon` driver (standard);
//! - QEMU's own `virtio-balloon-pci,free-page-hint=on` with the stock driver.
//!
//! Our device: the control command `hint-round` (1 ms polls: time from
//! the request to the round's end, STOP or ROUND_END, on the host), 9
//! rounds per boot (DONE between rounds), median. QEMU's device asks for
//! hints only while it migrates, so its round is driven by a migration to
//! `exec:cat > /dev/null`: the figure is the time from the `migrate`
//! command to the last movement of the free page virtqueue's used index
//! (`x-query-virtio-queue-status`, polled back to back; resolution about
//! one QMP round trip), one migration per size. Writes every cell to
//! `target/bench/vfio.json`; summary `round_ms_8g` per protocol and the
//! ratio to the ~3 ms of Liang Li's 2016 RFC for an 8 GB bitmap (the JSON
//! calls that RFC the seed).

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::errors::io_error;
use crate::migrate::{median, qemu_version, BALLOON_QOM, FREE_PAGE_VQ, MAX_BANDWIDTH};
use crate::qemu::{BootSpec, Machine};
use crate::runner::{emit, fields, Ctx, HarnessError};
use crate::vfio::{overlay_initramfs, server_binary, RamLayout, Server, VfioBoot};
use crate::vm::Vm;

/// Rounds per boot on our device.
const ROUNDS: usize = 9;
/// Liang Li's 2016 RFC's time to pass an 8 GB guest's bitmap to the host, ms.
const SEED_MS_8G: f64 = 3.0;

fn other(msg: impl Into<String>) -> HarnessError {
    HarnessError::Other(msg.into())
}

/// One cell of the benchmark: a device, a driver and a guest size.
#[derive(Debug, Serialize)]
struct BenchCell {
    name: String,
    device: &'static str,
    driver: String,
    /// `bitmap` or `standard`.
    protocol: &'static str,
    mem_mib: u64,
    /// The round's time (ours: the median), ms.
    round_ms: Option<f64>,
    /// What only one kind of device measures.
    #[serde(flatten)]
    figures: DeviceFigures,
    ok: bool,
}

/// The figures of one kind of device.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum DeviceFigures {
    /// Our device: every round.
    Ours {
        /// The fastest round, ms.
        min_ms: f64,
        /// Every round, ms.
        rounds_ms: Vec<f64>,
        /// Free pages of the last round.
        free_pages: Option<u64>,
    },
    /// QEMU's device: the one migration.
    Qemu {
        /// How far the free page vq's used index moved.
        vq_used_delta: u64,
        migration_ms: f64,
        migration_status: String,
        /// Time per poll of the vq, ms.
        poll_ms: f64,
    },
}

/// The `round_ms_8g` figures: each setup's round at 8 GiB.
#[derive(Debug, Clone, Copy, Serialize)]
struct Round8g {
    bitmap: Option<f64>,
    standard: Option<f64>,
    standard_stock_driver: Option<f64>,
    qemu_device_stock_driver: Option<f64>,
}

/// The benchmark file.
#[derive(Serialize)]
struct BenchDoc<'a> {
    bench: &'static str,
    qemu: String,
    rounds_per_boot: usize,
    loadavg_at_end: String,
    cells: &'a [BenchCell],
    round_ms_8g: Round8g,
    seed_ms_8g: f64,
}

/// The benchmark's summary.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    round_ms_8g: Round8g,
    ratio_to_seed_8g_bitmap: Option<f64>,
    /// Where the benchmark file went.
    json: String,
}

/// One boot on our device: `ROUNDS` hint rounds; returns the cell.
fn ours(
    ctx: &mut Ctx,
    bin: &std::path::Path,
    initramfs: &std::path::Path,
    name: &str,
    driver: &str,
    server_args: &[&str],
    mem_mib: u64,
) -> Result<BenchCell, HarnessError> {
    let layout = RamLayout::for_machine(mem_mib, Machine::Pc);
    let dir = ctx.log_dir.join(name);
    std::fs::create_dir_all(&dir).map_err(io_error("cannot create log dir", &dir))?;
    let label = format!("pc-{mem_mib}m");
    let server = Server::start(bin, &dir, &label, &layout, server_args)?;
    let mut spec = BootSpec::new("vfio-bench");
    spec.mem_mib = mem_mib;
    spec.smp = 1;
    spec.guest_args = vec![format!("driver={driver}"), "chan=ttyS1".into()];
    spec.timeout = Duration::from_secs(400);
    let boot = VfioBoot::new(spec, initramfs, name);
    let mut ms = Vec::new();
    let mut free = Vec::new();
    let mut acked = 0;
    let out = boot.run(ctx, &server, &layout, &mut |_pid| {
        acked = server
            .ctl("status")?
            .get("acked_features")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        for _ in 0..ROUNDS {
            let r = server.ctl("hint-round 120000")?;
            ms.push(r.get("ms").and_then(Value::as_f64).unwrap_or(f64::NAN));
            free.push(r.get("free_pages").and_then(Value::as_u64).unwrap_or(0));
            server.ctl("hint-finish")?;
            // Let the guest take the DONE (the stock driver frees its pages).
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    })?;
    let ok = out.ok && ms.len() == ROUNDS && free.iter().all(|&f| f > 0);
    Ok(BenchCell {
        name: format!("{name}/{mem_mib}m"),
        device: "freehint-vfio-user",
        driver: driver.to_string(),
        protocol: if acked & (1 << 23) != 0 {
            "bitmap"
        } else {
            "standard"
        },
        mem_mib,
        round_ms: median(&ms),
        figures: DeviceFigures::Ours {
            min_ms: ms.iter().copied().fold(f64::INFINITY, f64::min),
            free_pages: free.last().copied(),
            rounds_ms: ms,
        },
        ok,
    })
}

/// QEMU's own device with the stock driver: one migration to
/// `exec:cat > /dev/null`, hint round timed through the free page vq.
fn qemu_device(
    ctx: &mut Ctx,
    initramfs: &std::path::Path,
    mem_mib: u64,
) -> Result<BenchCell, HarnessError> {
    let mut spec = BootSpec::new("vfio-bench");
    spec.mem_mib = mem_mib;
    spec.smp = 1;
    spec.qmp = true;
    spec.guest_args = vec!["driver=virtio_balloon".into(), "chan=none".into()];
    spec.extra_qemu_args = vec![
        "-object".into(),
        "iothread,id=fhio".into(),
        "-device".into(),
        "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=fhio".into(),
        "-initrd".into(),
        initramfs.display().to_string(),
    ];
    let dir = ctx.log_dir.join("qemu-stock");
    std::fs::create_dir_all(&dir).map_err(io_error("cannot create log dir", &dir))?;
    let mut vm = Vm::start(&ctx.manifest, &spec, &dir, "src", None)?;
    vm.wait_line(0, "@@VFIO ready", Duration::from_secs(300), |l| {
        l.contains("@@VFIO ready")
    })?;
    let vq = |vm: &mut Vm| -> Result<u64, HarnessError> {
        let q = vm.qmp().execute(
            "x-query-virtio-queue-status",
            Some(json!({"path": BALLOON_QOM, "queue": FREE_PAGE_VQ})),
        )?;
        q.get("used-idx")
            .and_then(Value::as_u64)
            .ok_or_else(|| other(format!("no used-idx in {q}")))
    };
    let used0 = vq(&mut vm)?;
    vm.qmp().execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": MAX_BANDWIDTH})),
    )?;
    let t0 = Instant::now();
    vm.qmp()
        .execute("migrate", Some(json!({"uri": "exec:cat > /dev/null"})))?;
    let (mut last, mut last_change_ms, mut polls) = (used0, None, 0u64);
    let status = loop {
        let u = vq(&mut vm)?;
        polls += 1;
        if u != last {
            last = u;
            last_change_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        if polls % 8 == 0 {
            let q = vm.qmp().execute("query-migrate", None)?;
            let st = q["status"].as_str().unwrap_or("?").to_string();
            if matches!(st.as_str(), "completed" | "failed" | "cancelled") {
                break st;
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = vm.qmp().execute("migrate_cancel", None);
            break "timeout".into();
        }
    };
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let poll_ms = total_ms / polls.max(1) as f64;
    vm.kill();
    let ok = status == "completed" && last_change_ms.is_some();
    Ok(BenchCell {
        name: format!("qemu-stock/{mem_mib}m"),
        device: "qemu virtio-balloon-pci",
        driver: "virtio_balloon".into(),
        protocol: "standard",
        mem_mib,
        round_ms: last_change_ms,
        figures: DeviceFigures::Qemu {
            vq_used_delta: last.wrapping_sub(used0) & 0xffff,
            migration_ms: total_ms.round(),
            migration_status: status,
            poll_ms: (poll_ms * 100.0).round() / 100.0,
        },
        ok,
    })
}

/// Runs the benchmark.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let bin = server_binary(&ctx.repo)?;
    let initramfs = overlay_initramfs(ctx)?;
    let mut cells = Vec::new();
    for mem in [1024u64, 4096, 8192] {
        for (name, driver, args) in [
            ("ours-freehint-bitmap", "freehint", &["--no-reporting"][..]),
            (
                "ours-freehint-standard",
                "freehint",
                &["--no-reporting", "--no-bitmap"][..],
            ),
            ("ours-stock", "virtio_balloon", &["--no-reporting"][..]),
        ] {
            let c = ours(ctx, &bin, &initramfs, name, driver, args, mem)?;
            emit(&c);
            cells.push(c);
        }
        let c = qemu_device(ctx, &initramfs, mem)?;
        emit(&c);
        cells.push(c);
    }
    let at8 = |prefix: &str| {
        cells
            .iter()
            .find(|c| c.mem_mib == 8192 && c.name.starts_with(prefix))
            .and_then(|c| c.round_ms)
            .filter(|v| v.is_finite())
    };
    let round_8g = Round8g {
        bitmap: at8("ours-freehint-bitmap"),
        standard: at8("ours-freehint-standard"),
        standard_stock_driver: at8("ours-stock"),
        qemu_device_stock_driver: at8("qemu-stock"),
    };
    let ok = cells.iter().all(|c| c.ok);
    let host = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let doc = BenchDoc {
        bench: "vfio",
        qemu: qemu_version(&ctx.manifest),
        rounds_per_boot: ROUNDS,
        loadavg_at_end: host
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        cells: &cells,
        round_ms_8g: round_8g,
        seed_ms_8g: SEED_MS_8G,
    };
    let out = ctx.repo.join("target/bench/vfio.json");
    if let Some(d) = out.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    // Through a `Value`: its keys come out sorted, as the file has them.
    let doc = serde_json::to_value(&doc).unwrap_or_default();
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap_or_default())
        .map_err(io_error("cannot write", &out))?;
    Ok(fields(&Summary {
        ok,
        round_ms_8g: round_8g,
        ratio_to_seed_8g_bitmap: round_8g
            .bitmap
            .map(|v| (v / SEED_MS_8G * 100.0).round() / 100.0),
        json: out.display().to_string(),
    }))
}
