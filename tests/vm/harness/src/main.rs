//! `tests/vm/run`: runs one VM test scenario and prints its results.
//!
//! stdout: one JSON object per result, then the scenario summary
//! `{"scenario": NAME, "ok": ..., ...}`, then `N passed, M failed`.
//! Exit status 0 only if every result passed.
#![warn(missing_docs)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

use freehint_vmtest::manifest::Manifest;
use freehint_vmtest::runner::{emit, fields, set_versions, Ctx};
use freehint_vmtest::scenarios::{self, SCENARIOS};

/// Runs a freehint VM test scenario under QEMU (TCG).
#[derive(Debug, Parser)]
#[command(name = "tests/vm/run")]
struct Cli {
    /// Scenario to run (see --list).
    scenario: Option<String>,
    /// List every scenario with its description.
    #[arg(long)]
    list: bool,
    /// Print the names of the scenarios CI runs, one per line.
    #[arg(long)]
    list_ci: bool,
    /// Boot every guest of the scenario with this kernel flavour (normal,
    /// debug; distro: Debian's kernel, from tests/vm/build-distro).
    #[arg(long)]
    flavour: Option<String>,
    /// Multiply every boot timeout by this factor.
    #[arg(long, default_value_t = 1.0)]
    timeout_scale: f64,
    /// Image manifest (default: <repo>/target/vm/manifest.json).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Repository root (default: $FREEHINT_REPO or the source checkout).
    #[arg(long)]
    repo: Option<PathBuf>,
}

/// The `harness` result line of a scenario that aborted (with `name`) and
/// its summary (without).
#[derive(Serialize)]
struct Aborted<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'static str>,
    ok: bool,
    error: &'a str,
}

fn repo_root(cli: &Cli) -> PathBuf {
    cli.repo
        .clone()
        .or_else(|| std::env::var_os("FREEHINT_REPO").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../..")))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    if cli.list {
        for s in SCENARIOS {
            println!(
                "{:<14} {}{}",
                s.name,
                s.description,
                if s.ci { "" } else { " [not in CI]" }
            );
        }
        return ExitCode::SUCCESS;
    }
    if cli.list_ci {
        for s in SCENARIOS.iter().filter(|s| s.ci) {
            println!("{}", s.name);
        }
        return ExitCode::SUCCESS;
    }
    let Some(name) = cli.scenario.as_deref() else {
        eprintln!("tests/vm/run: give a scenario name (see tests/vm/run --list)");
        return ExitCode::from(2);
    };
    let Some(scenario) = scenarios::find(name) else {
        eprintln!("tests/vm/run: unknown scenario '{name}' (see tests/vm/run --list)");
        return ExitCode::from(2);
    };
    if let Some(f) = cli.flavour.as_deref() {
        if !["normal", "debug", "distro"].contains(&f) {
            eprintln!("tests/vm/run: unknown flavour '{f}' (normal, debug or distro)");
            return ExitCode::from(2);
        }
    }
    let repo = repo_root(&cli);
    let manifest_path = cli
        .manifest
        .clone()
        .unwrap_or_else(|| repo.join("target/vm/manifest.json"));
    // The distro flavour (tests/vm/build-distro) lives in its own manifest.
    let distro_manifest = repo.join("target/vm/distro/manifest.json");
    let manifest = match Manifest::load(&manifest_path).and_then(|mut m| {
        m.merge_extra(&distro_manifest)?;
        Ok(m)
    }) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("tests/vm/run: {e}");
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    set_versions(&manifest.versions);
    let mut ctx = match Ctx::new(&repo, manifest, name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tests/vm/run: {e}");
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    ctx.timeout_scale = cli.timeout_scale;
    ctx.flavour_override = cli.flavour.clone();

    let mut summary = match (scenario.run)(&mut ctx) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tests/vm/run: scenario {name} aborted: {e}");
            let error = e.to_string();
            ctx.record(Aborted {
                name: Some("harness"),
                ok: false,
                error: &error,
            });
            fields(&Aborted {
                name: None,
                ok: false,
                error: &error,
            })
        }
    };
    let ok = ctx.failed() == 0 && summary.get("ok").and_then(Value::as_bool) == Some(true);
    summary.insert("ok".into(), json!(ok));
    let mut line = serde_json::Map::new();
    line.insert("scenario".into(), json!(name));
    line.extend(summary);
    emit(&Value::Object(line));
    for log in ctx.failed_logs() {
        eprintln!(
            "tests/vm/run: serial log of a failed boot: {}",
            log.display()
        );
    }
    freehint_vmtest::sockets::remove_dir();
    let failed = ctx.failed() + usize::from(!ok && ctx.failed() == 0);
    println!("{} passed, {} failed", ctx.passed(), failed);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
