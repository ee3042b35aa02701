//! `freehint-vfio-user`: serves the freehint virtio-balloon to a vfio-user
//! client (QEMU ≥ 10.1 `-device vfio-user-pci`) as a modern virtio-pci
//! device. See docs/vfio-user.md.
//!
//! **No migration:** QEMU migrates no state for a vfio-user device; on a
//! migration destination the device is dead.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use freehint_device::balloon::Layout;
use freehint_device::{Balloon, BalloonConfig};
use freehint_vfio_user::{control, serve, VfioUserDevice, MIGRATION_WARNING};
use log::{error, info, warn};

/// Machine type whose RAM split below/above 4 GiB we derive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Machine {
    /// QEMU `pc` (i440fx): ≥ 3.5 GiB RAM puts 3 GiB below 4 GiB.
    Pc,
    /// QEMU `q35`: ≥ 2.75 GiB RAM puts 2 GiB below 4 GiB.
    Q35,
}

/// Serve the freehint virtio-balloon over vfio-user.
///
/// WARNING: QEMU migrates no state for a vfio-user device; after a live
/// migration the device is dead on the destination. Do not migrate a VM with
/// this device attached.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// UNIX socket to listen on (QEMU: `"socket":{"path":PATH,"type":"unix"}`).
    #[arg(long)]
    socket: PathBuf,
    /// Replace an existing file at the socket path (a stale socket).
    #[arg(long)]
    force: bool,
    /// Keep serving after the client disconnects (reset, wait for the next
    /// one) instead of exiting.
    #[arg(long)]
    persist: bool,
    /// Line-based control socket (target, stats, hint rounds; see
    /// docs/vfio-user.md).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Directory the control command `hint-dump NAME` writes into (without
    /// it, `hint-dump` is refused).
    #[arg(long, requires = "control")]
    dump_dir: Option<PathBuf>,
    /// Guest RAM size (bytes, or with K/M/G suffix), to derive the RAM
    /// layout for hints together with --machine.
    #[arg(long, value_parser = parse_size)]
    ram_size: Option<u64>,
    /// Machine type for --ram-size.
    #[arg(long, value_enum, default_value = "pc")]
    machine: Machine,
    /// Explicit guest RAM layout: comma-separated START+LEN byte ranges
    /// (K/M/G suffixes), e.g. `0+3G,4G+1G`. Overrides --ram-size.
    #[arg(long)]
    ram_layout: Option<String>,
    /// Do not offer VIRTIO_BALLOON_F_STATS_VQ.
    #[arg(long)]
    no_stats: bool,
    /// Do not offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    #[arg(long)]
    no_deflate_on_oom: bool,
    /// Do not offer VIRTIO_BALLOON_F_FREE_PAGE_HINT (nor the bitmap).
    #[arg(long)]
    no_free_page_hint: bool,
    /// Do not offer the freehint bitmap extension.
    #[arg(long)]
    no_bitmap: bool,
    /// Do not offer VIRTIO_BALLOON_F_PAGE_POISON.
    #[arg(long)]
    no_page_poison: bool,
    /// Do not offer VIRTIO_BALLOON_F_REPORTING.
    #[arg(long)]
    no_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_MUST_TELL_HOST.
    #[arg(long)]
    must_tell_host: bool,
    /// Seconds between automatic stats requests (0: only on demand).
    #[arg(long, default_value_t = 0)]
    stats_interval: u32,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = if let Some(hex) = num.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).map_err(|e| format!("bad size {s:?}: {e}"))?
    } else {
        num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// RAM byte ranges of a QEMU x86 machine with `size` bytes of RAM.
fn derive_ranges(size: u64, machine: Machine) -> Vec<(u64, u64)> {
    const GIB4: u64 = 4 << 30;
    let (threshold, lowmem) = match machine {
        Machine::Pc => (0xe000_0000, 0xc000_0000),
        Machine::Q35 => (0xb000_0000, 0x8000_0000),
    };
    if size >= threshold {
        vec![(0, lowmem), (GIB4, size - lowmem)]
    } else {
        vec![(0, size)]
    }
}

fn parse_layout(s: &str) -> Result<Vec<(u64, u64)>, String> {
    s.split(',')
        .map(|r| {
            let (a, l) = r
                .split_once('+')
                .ok_or_else(|| format!("range {r:?} is not START+LEN"))?;
            Ok((parse_size(a)?, parse_size(l)?))
        })
        .collect()
}

/// The `--dump-dir` as an absolute path, checked to be a directory.
fn dump_dir(dir: &std::path::Path) -> Result<PathBuf, String> {
    let abs = dir
        .canonicalize()
        .map_err(|e| format!("--dump-dir {}: {e}", dir.display()))?;
    if !abs.is_dir() {
        return Err(format!("--dump-dir {}: not a directory", dir.display()));
    }
    Ok(abs)
}

fn run(args: Args) -> Result<(), String> {
    let ranges = match (&args.ram_layout, args.ram_size) {
        (Some(l), _) => Some(parse_layout(l)?),
        (None, Some(size)) => Some(derive_ranges(size, args.machine)),
        (None, None) => None,
    };
    let layout = match &ranges {
        Some(r) => Layout::from_ram_byte_ranges(r)
            .map_err(|e| format!("invalid RAM layout {r:x?}: {e}"))?,
        None => Layout::empty(),
    };
    let ranges_for_check = ranges.clone();
    let hints = layout.total_bits() > 0;
    if !hints {
        warn!("no --ram-size/--ram-layout: free page hinting and reporting are not offered");
    }
    let mut config = BalloonConfig::all_features(layout);
    config.stats = !args.no_stats;
    config.stats_polling_interval_s = args.stats_interval;
    config.deflate_on_oom = !args.no_deflate_on_oom;
    config.free_page_hint = hints && !args.no_free_page_hint;
    config.bitmap = config.free_page_hint && !args.no_bitmap;
    config.page_poison = !args.no_page_poison;
    config.reporting = hints && !args.no_reporting;
    config.must_tell_host = args.must_tell_host;
    let features = config.features();
    let balloon = Balloon::new(config).map_err(|e| format!("invalid device configuration: {e}"))?;
    let handle = balloon.handle();
    let hint_handle = balloon.hint_handle();

    warn!("{MIGRATION_WARNING}");
    info!(
        "freehint virtio-balloon over vfio-user: features {features:#x}, RAM layout {:x?}",
        ranges.unwrap_or_default()
    );

    let mut device = VfioUserDevice::new(Box::new(balloon));
    if let Some(r) = ranges_for_check {
        device.set_expected_ram(r);
    }
    if let Some(path) = &args.control {
        let dump_dir = args.dump_dir.as_deref().map(dump_dir).transpose()?;
        let c = control::Control {
            balloon: handle,
            hints: hint_handle,
            status: device.status_handle(),
            dump_dir,
        };
        control::spawn(path, c, args.force)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    }
    serve(&args.socket, &mut device, args.persist, args.force).map_err(|e| e.to_string())?;
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    freehint_vfio_user::signals::remove_on_signal(
        [Some(args.socket.clone()), args.control.clone()]
            .into_iter()
            .flatten()
            .collect(),
    );
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn derived_layouts_match_qemu() {
        assert_eq!(derive_ranges(1 << 30, Machine::Pc), vec![(0, 1 << 30)]);
        assert_eq!(
            derive_ranges(6 << 30, Machine::Pc),
            vec![(0, 3 << 30), (4 << 30, 3 << 30)]
        );
        assert_eq!(
            derive_ranges(6 << 30, Machine::Q35),
            vec![(0, 2 << 30), (4 << 30, 4 << 30)]
        );
        assert_eq!(
            parse_layout("0+3G,4G+1G"),
            Ok(vec![(0, 3 << 30), (4 << 30, 1 << 30)])
        );
        assert!(parse_layout("0-3G").is_err());
    }
}
