//! The scenario registry.
//!
//! A scenario is a host-side function that boots one or more guests through
//! [`Ctx::boot`] and returns its summary object (printed as the scenario's
//! last JSON line, `{"scenario": NAME, "ok": ..., ...}`). To add one: write a
//! module here with a `pub fn run(ctx: &mut Ctx) -> Result<Map, HarnessError>`,
//! add it to [`SCENARIOS`], and put the guest half in
//! `tests/vm/guest/scenarios/<guest-script>.sh` (it prints `@@RESULT {json}`
//! lines; the init prints `@@DONE rc=N` when it returns).

use serde_json::{Map, Value};

use crate::runner::{Ctx, HarnessError};

pub mod bench_bitmap;
pub mod bench_vfio;
pub mod bitmap;
pub mod demo;
pub mod distro_hint;
pub mod distro_migrate;
pub mod migrate_probe;
pub mod own_hint;
pub mod own_migrate;
pub mod qemu_balloon;
pub mod qemu_hint;
pub mod qemu_lockdep;
pub mod qemu_migrate;
pub mod qemu_pingpong;
pub mod smoke;
pub mod vfio_cases;
pub mod vfio_freehint;
pub mod vfio_hostile;
pub mod vfio_stock;
pub mod vhost_user;

/// A scenario's entry point: returns the summary fields (`ok` included).
pub type RunFn = fn(&mut Ctx) -> Result<Map<String, Value>, HarnessError>;

/// One registered scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Name on the command line (`tests/vm/run NAME`).
    pub name: &'static str,
    /// One-line description for `--list`.
    pub description: &'static str,
    /// Whether `tests/all` (CI) runs it (`--list-ci`).
    pub ci: bool,
    /// The entry point.
    pub run: RunFn,
}

/// Every scenario, in the order CI runs them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smoke",
        description: "boot normal and debug kernels, load/unload virtio_balloon.ko and freehint.ko",
        ci: true,
        run: smoke::run,
    },
    Scenario {
        name: "bitmap",
        description: "freehint bitmap builder: {1,6} GiB x {pc,q35} + lockdep churn",
        ci: true,
        run: bitmap::run,
    },
    Scenario {
        name: "qemu-hint",
        description: "one free page hint round against QEMU's virtio-balloon, hints consumed",
        ci: true,
        run: qemu_hint::run,
    },
    Scenario {
        name: "qemu-balloon",
        description: "freehint.ko vs QEMU's virtio-balloon: bind, inflate/deflate, stats, OOM deflate, unload while busy, page poison",
        ci: true,
        run: qemu_balloon::run,
    },
    Scenario {
        name: "qemu-migrate",
        description: "live migration matrix {idle,dirty-keep,dirty-free} x driver x init_on_alloc, 4 GiB",
        ci: true,
        run: qemu_migrate::run,
    },
    Scenario {
        name: "qemu-pingpong",
        description: "10 migrations back and forth under the integrity workload",
        ci: true,
        run: qemu_pingpong::run,
    },
    Scenario {
        name: "qemu-lockdep",
        description: "freehint.ko on the lockdep kernel: 4 migrations under the integrity workload, rmmod during a hint round, no splat",
        ci: true,
        run: qemu_lockdep::run,
    },
    Scenario {
        name: "own-migrate",
        description: "freehint-migrate vs QEMU's migrator: 4 GiB {idle,dirty-keep,dirty-free}, no hints, init_on_alloc=1, destination verified at resume",
        ci: true,
        run: own_migrate::run,
    },
    Scenario {
        name: "own-pingpong",
        description: "10 migrations back and forth with freehint-migrate under churn, and a negative control (final pass dropped) that must be caught",
        ci: true,
        run: own_migrate::run_pingpong,
    },
    Scenario {
        name: "own-hint",
        description: "the whole chain: our balloon device (vhost-user) + freehint-migrate, 4 GiB {idle,dirty-free} x driver {none,stock,freehint}, QEMU's migrator + QEMU's device + freehint.ko as reference; device unplugged on the source, plugged on the destination, integrity and destination balloon checked",
        ci: true,
        run: own_hint::run,
    },
    Scenario {
        name: "own-hint-pingpong",
        description: "10 migrations with freehint.ko hinting through our device, the balloon unplugged and plugged each time; a refused migration plugs it back into the source",
        ci: true,
        run: own_hint::run_pingpong,
    },
    Scenario {
        name: "vfio-stock",
        description: "stock virtio_balloon vs freehint-vfio-user: inflate/memfd, stats, hint set vs kpageflags",
        ci: true,
        run: vfio_stock::run,
    },
    Scenario {
        name: "vfio-freehint",
        description: "freehint.ko vs freehint-vfio-user: bitmap {1,6} GiB x {pc,q35} + standard; host set = guest bitmap",
        ci: true,
        run: vfio_freehint::run,
    },
    Scenario {
        name: "vfio-hostile",
        description: "hostile guest driver vs freehint-vfio-user: server survives, bounded, serves again",
        ci: true,
        run: vfio_hostile::run,
    },
    Scenario {
        name: "vfio-cases",
        description: "stock virtio_balloon vs freehint-vfio-user beyond vfio-stock: INTx, q35 6 GiB, free page reporting, a second client after kill -9, QMP system_reset; freehint.ko with the stats queue off",
        ci: false,
        run: vfio_cases::run,
    },
    Scenario {
        name: "vhost-user",
        description: "stock virtio_balloon and freehint.ko vs freehint-vhost-user (QEMU's generic vhost-user front end): bind, inflate/deflate, a hint round, integrity",
        ci: true,
        run: vhost_user::run,
    },
    Scenario {
        name: "distro-hint",
        description: "Debian's own kernel (tests/vm/build-distro): stock virtio_balloon.ko, then freehint.ko binds, a hint round, inflate/deflate, unload",
        ci: true,
        run: distro_hint::run,
    },
    Scenario {
        name: "distro-migrate",
        description: "Debian's own kernel: live migration matrix {idle,dirty-keep,dirty-free} x driver, 4 GiB, init_on_alloc as shipped",
        ci: true,
        run: distro_migrate::run,
    },
    Scenario {
        name: "bench-migrate",
        description: "migration matrix at 4+8 GiB, 3 runs per cell -> target/bench/migrate.json",
        ci: false,
        run: qemu_migrate::bench,
    },
    Scenario {
        name: "bench-distro-migrate",
        description: "distro-migrate, 3 runs per cell -> target/bench/distro-migrate.json",
        ci: false,
        run: distro_migrate::bench,
    },
    Scenario {
        name: "bench-pingpong",
        description: "20 migrations back and forth under the integrity workload",
        ci: false,
        run: qemu_pingpong::bench,
    },
    Scenario {
        name: "bench-own-migrate",
        description: "freehint-migrate vs QEMU's: 4 GiB matrix, 16+32 GiB idle/dirty-free, guest slowdown, 3 runs per cell -> target/bench/own-migrate.json",
        ci: false,
        run: own_migrate::bench,
    },
    Scenario {
        name: "bench-own-pingpong",
        description: "20 migrations back and forth with freehint-migrate, and the negative control",
        ci: false,
        run: own_migrate::bench_pingpong,
    },
    Scenario {
        name: "bench-own-hint",
        description: "own-hint at 4, 16 and 32 GiB, 3 runs per cell, targets evaluated -> target/bench/own-hint.json",
        ci: false,
        run: own_hint::bench,
    },
    Scenario {
        name: "bench-own-hint-pingpong",
        description: "20 migrations with freehint.ko hinting through our device, the balloon unplugged and plugged each time",
        ci: false,
        run: own_hint::bench_pingpong,
    },
    Scenario {
        name: "demo",
        description: "main job: 4 GiB dirtied-then-freed guest migrated without/with hints, side-by-side table",
        ci: false,
        run: demo::run,
    },
    Scenario {
        name: "bench-bitmap",
        description: "bitmap walk time / lock hold at idle 1, 4, 8 GiB -> target/bench/bitmap.json",
        ci: false,
        run: bench_bitmap::run,
    },
    Scenario {
        name: "bench-vfio",
        description: "hint round latency on freehint-vfio-user (bitmap, standard, stock) and QEMU's device, 1/4/8 GiB -> target/bench/vfio.json",
        ci: false,
        run: bench_vfio::run,
    },
    Scenario {
        name: "probe-floor",
        description: "4 GiB dirtied-then-freed guest migrated to exec:cat, at full speed and held at 1 byte/s for 2 s while the hint round runs, per driver",
        ci: false,
        run: migrate_probe::run_floor,
    },
    Scenario {
        name: "probe-downtime",
        description: "4 GiB guest under a rewrite loop migrated to exec:cat at downtime-limit 300 and 30 ms, per driver",
        ci: false,
        run: migrate_probe::run_downtime,
    },
];

/// Runs per cell of a benchmark: `FREEHINT_BENCH_REPS`, else `default`;
/// at least one.
pub fn bench_reps(default: usize) -> usize {
    std::env::var("FREEHINT_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// A benchmark file: what ran, its summary and one row per cell.
#[derive(Debug, serde::Serialize)]
pub struct BenchDoc<'a, S, R> {
    /// The benchmark's name.
    pub benchmark: &'static str,
    /// The command that writes the file.
    pub command: &'static str,
    /// Runs per cell.
    pub reps: usize,
    /// Guest sizes measured, where the benchmark lists them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sizes_mib: Option<Vec<u64>>,
    /// Drivers measured, where the benchmark lists them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drivers_measured: Option<Vec<&'static str>>,
    /// The scenario's summary.
    pub summary: &'a S,
    /// One row per cell.
    pub cells: Vec<R>,
}

/// Writes a benchmark's `doc` to `target/bench/FILE` and says where on
/// stderr under `[tag]`.
pub fn write_bench(
    ctx: &Ctx,
    file: &str,
    tag: &str,
    doc: &impl serde::Serialize,
) -> Result<(), HarnessError> {
    // Through a `Value`: its keys come out sorted, as the committed files
    // have them.
    let doc = serde_json::to_value(doc)
        .map_err(|e| HarnessError::Other(format!("cannot serialize {file}: {e}")))?;
    let dir = ctx.repo.join("target/bench");
    let path = dir.join(file);
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, format!("{doc:#}\n")))
        .map_err(crate::errors::io_error("cannot write", &path))?;
    eprintln!("[{tag}] wrote {}", path.display());
    Ok(())
}

/// Looks a scenario up by name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Largest value of `field` over `reports`' results (None if absent everywhere).
pub fn max_of(reports: &[crate::runner::BootReport], field: &str) -> Option<f64> {
    reports
        .iter()
        .flat_map(|r| r.numbers(field))
        .fold(None, |m, v| Some(m.map_or(v, |m: f64| m.max(v))))
}

/// Sum over boots of each boot's largest `field` (a boot may repeat a figure
/// in its summary line, so the per-boot maximum avoids double counting).
/// None if absent everywhere.
pub fn sum_of(reports: &[crate::runner::BootReport], field: &str) -> Option<f64> {
    reports
        .iter()
        .filter_map(|r| r.numbers(field).into_iter().reduce(f64::max))
        .fold(None, |s, v| Some(s.unwrap_or(0.0) + v))
}

/// Walk time in ms of one boot: `walk_ms`, else `walk_us` / 1000 (largest seen).
pub fn walk_ms(report: &crate::runner::BootReport) -> Option<f64> {
    let ms = report.numbers("walk_ms").into_iter().reduce(f64::max);
    ms.or_else(|| {
        report
            .numbers("walk_us")
            .into_iter()
            .reduce(f64::max)
            .map(|us| us / 1000.0)
    })
}

/// Converts an f64 that holds an integer to a JSON integer, else a float.
pub fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from((v * 1000.0).round() / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_findable() {
        for s in SCENARIOS {
            assert_eq!(SCENARIOS.iter().filter(|o| o.name == s.name).count(), 1);
            assert!(find(s.name).is_some());
        }
        assert!(find("bitmap").is_some_and(|s| s.ci));
        assert!(find("bench-bitmap").is_some_and(|s| !s.ci));
        assert!(find("nope").is_none());
    }

    #[test]
    fn num_keeps_integers() {
        assert_eq!(num(3.0), Value::from(3));
        assert_eq!(num(1.23456), Value::from(1.235));
    }
}
