//! `vhost-user`: the balloon device model served by `freehint-vhost-user`
//! to QEMU's generic vhost-user front end
//! (`vhost-user-test-device-pci,virtio-id=5`), with the stock
//! `virtio_balloon` driver and with `freehint.ko`.
//!
//! Per driver: the `qemu-migrate` guest (its RAM a shared `/dev/shm` file,
//! no QEMU balloon) boots; the driver must bind and reach DRIVER_OK; a
//! target of 4096 pages set over the control socket must be reached
//! (`actual`), which needs config-change notifications over the back end's
//! request channel; a hint round must end with free pages (freehint.ko
//! with the bitmap protocol); deflating to 0 must come back to `actual` 0;
//! then the guest verifies every live page and powers off with no splat.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::migrate::{verify_integrity, wait_ready, Cell, Driver, Then, Workload};
use crate::qemu::Machine;
use crate::runner::{fields, Ctx, HarnessError};
use crate::vfio::{package_binary, RamLayout, Server};
use crate::vm::{splat_problems, Vm, VmOptions};

/// Guest memory, MiB.
const MEM_MIB: u64 = 1024;
/// Inflate target, 4 KiB pages.
const TARGET: u64 = 4096;
/// `VIRTIO_BALLOON_F_FREE_PAGE_BITMAP` (freehint's extension).
const BITMAP_FEATURE: u64 = 1 << 23;

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let bin = package_binary(&ctx.repo, "freehint-vhost-user")?;
    let mut cells = Vec::new();
    let mut ok = true;
    for driver in [Driver::Stock, Driver::Freehint] {
        let r = one(ctx, &bin, driver);
        ok &= r.ok;
        ctx.record(&r);
        cells.push(r);
    }
    Ok(fields(&Summary { ok, cells }))
}

/// The scenario's summary: every driver's line again.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    cells: Vec<DriverRecord>,
}

/// The line of one driver; a figure is there once the run got that far.
#[derive(Debug, Default, Serialize)]
struct DriverRecord {
    name: String,
    /// The driver the guest reported bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    bound: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtio_status: Option<Value>,
    /// Hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    acked_features: Option<String>,
    /// Whether the bitmap protocol was negotiated.
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmap: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inflate_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deflate_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint_free_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    round_ms: Option<Value>,
    /// The guest's verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    integrity: Option<Map<String, Value>>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<Vec<String>>,
}

fn one(ctx: &mut Ctx, bin: &Path, driver: Driver) -> DriverRecord {
    let mut r = DriverRecord {
        name: format!("vhost-user/{}", driver.name()),
        ..DriverRecord::default()
    };
    let mut problems = Vec::new();
    if let Err(e) = drive(ctx, bin, driver, &mut r, &mut problems) {
        problems.push(e.to_string());
    }
    r.ok = problems.is_empty();
    eprintln!(
        "[vmtest]   vhost-user/{}: {}",
        driver.name(),
        if problems.is_empty() {
            "ok".to_string()
        } else {
            format!("FAILED ({})", problems.join("; "))
        }
    );
    r.problems = (!problems.is_empty()).then_some(problems);
    r
}

fn drive(
    ctx: &mut Ctx,
    bin: &Path,
    driver: Driver,
    r: &mut DriverRecord,
    problems: &mut Vec<String>,
) -> Result<(), HarnessError> {
    let mut cell = Cell::new(MEM_MIB, driver, Workload::Idle);
    cell.pre_mib = 16;
    cell.churn_mib = 8;
    let mut spec = cell.boot_spec();
    // Our device is the only balloon.
    spec.extra_qemu_args.clear();
    let timeout = ctx.scaled(Duration::from_secs(300));
    let label = format!("vhost-{}", driver.name());
    let layout = RamLayout::for_machine(MEM_MIB, Machine::Pc);
    let server = Server::start(bin, &ctx.log_dir, &label, &layout, &[])?;
    let ram = PathBuf::from(format!("/dev/shm/fh-own-{}-{label}", std::process::id()));
    let opts = VmOptions {
        incoming: None,
        extra_args: vec![
            "-object".into(),
            format!(
                "memory-backend-file,id=fhram,size={MEM_MIB}M,mem-path={},share=on",
                ram.display()
            ),
            "-machine".into(),
            "memory-backend=fhram".into(),
            "-chardev".into(),
            format!("socket,id=fhb,path={}", server.socket.display()),
            "-device".into(),
            "vhost-user-test-device-pci,id=balloon0,chardev=fhb,virtio-id=5,num_vqs=5,config_size=16"
                .into(),
        ],
        env: Vec::new(),
        owned_files: vec![ram],
    };
    let mut vm = Vm::start_with(&ctx.manifest, &spec, &ctx.log_dir, &label, &opts)?;
    wait_ready(&mut vm, timeout)?;
    let bound = vm
        .output()
        .results
        .iter()
        .find(|m| m.get("name") == Some(&json!("driver")))
        .and_then(|m| m.get("bound").cloned());
    r.bound = Some(bound.clone().unwrap_or(Value::Null));
    let want = match driver {
        Driver::Freehint => "freehint",
        _ => "virtio_balloon",
    };
    if bound != Some(json!(want)) {
        problems.push(format!("driver {want} did not bind (bound: {bound:?})"));
    }
    let status = server.ctl("status")?;
    let acked = status
        .get("acked_features")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    r.virtio_status = Some(status.get("virtio_status").cloned().unwrap_or(Value::Null));
    r.acked_features = Some(format!("{acked:#x}"));
    if status.get("virtio_status") != Some(&json!(15)) {
        problems.push(format!("device not active: {status:?}"));
    }
    let bitmap = acked & BITMAP_FEATURE != 0;
    r.bitmap = Some(bitmap);
    if bitmap != (driver == Driver::Freehint) {
        problems.push(format!("bitmap protocol negotiated: {bitmap}"));
    }
    for target in [TARGET, 0] {
        let t0 = Instant::now();
        server.ctl(&format!("target {target}"))?;
        match wait_actual(&server, target, timeout) {
            Ok(()) => {
                let ms = Some(t0.elapsed().as_millis() as u64);
                if target == TARGET {
                    r.inflate_ms = ms;
                } else {
                    r.deflate_ms = ms;
                }
            }
            Err(e) => problems.push(e),
        }
        if target == TARGET {
            let round = server.ctl("hint-round 120000")?;
            let free = round.get("free_pages").and_then(Value::as_u64).unwrap_or(0);
            r.hint_free_pages = Some(free);
            r.round_ms = Some(round.get("ms").cloned().unwrap_or(Value::Null));
            if free == 0 {
                problems.push("the hint round reported no free page".into());
            }
        }
    }
    let verdict = verify_integrity(&mut vm, Then::Stop, timeout)?;
    if verdict.get("ok") != Some(&json!(true)) {
        problems.push(format!("integrity: {verdict:?}"));
    }
    r.integrity = Some(verdict);
    if !vm.wait_exit(timeout) {
        problems.push("the guest did not power off".into());
    }
    splat_problems(&vm, problems);
    Ok(())
}

/// Waits until the balloon's `actual` is `target`.
fn wait_actual(server: &Server, target: u64, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let st = server.ctl("status").map_err(|e| e.to_string())?;
        let actual = st.get("actual").and_then(Value::as_u64);
        if actual == Some(target) {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(format!("actual {actual:?} never reached target {target}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
