//! The device's command-line options, shared by every server binary
//! (`#[command(flatten)]` them into the binary's own arguments).

use std::path::PathBuf;

use clap::Args;
use freehint_device::balloon::Layout;
use freehint_device::BalloonConfig;
use freehint_protocol::layout::qemu_x86_ram_ranges;

/// Machine type whose RAM split below/above 4 GiB is derived (`pc`,
/// `q35`).
pub use freehint_protocol::layout::QemuX86Machine as Machine;

/// A server binary's command line: where it listens and the device it
/// serves (`#[command(flatten)]` it into the binary's `Parser`, whose doc
/// comment is the help text).
#[derive(Args, Clone, Debug)]
pub struct CommandLine {
    /// Sockets and lifetime.
    #[command(flatten)]
    pub server: ServerOptions,
    /// The device: RAM layout and features.
    #[command(flatten)]
    pub device: DeviceOptions,
}

/// Where a server listens, and how it lives.
#[derive(Args, Clone, Debug)]
pub struct ServerOptions {
    /// UNIX socket to listen on for the VMM.
    #[arg(long)]
    pub socket: PathBuf,
    /// Replace an existing file at the socket path (a stale socket).
    #[arg(long)]
    pub force: bool,
    /// Keep serving after the VMM disconnects (wait for the next one)
    /// instead of exiting.
    #[arg(long)]
    pub persist: bool,
    /// Line-based control socket (target, stats, hint rounds, the hint
    /// port; see the `control` module).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Directory the control command `hint-dump NAME` writes into (without
    /// it, `hint-dump` is refused).
    #[arg(long, requires = "control")]
    pub dump_dir: Option<PathBuf>,
}

impl ServerOptions {
    /// The `--dump-dir` as an absolute path, checked to be a directory.
    pub fn checked_dump_dir(&self) -> Result<Option<PathBuf>, String> {
        let Some(dir) = &self.dump_dir else {
            return Ok(None);
        };
        let abs = dir
            .canonicalize()
            .map_err(|e| format!("--dump-dir {}: {e}", dir.display()))?;
        if !abs.is_dir() {
            return Err(format!("--dump-dir {}: not a directory", dir.display()));
        }
        Ok(Some(abs))
    }

    /// The socket files the server creates (to remove on exit).
    pub fn socket_files(&self) -> Vec<PathBuf> {
        std::iter::once(self.socket.clone())
            .chain(self.control.clone())
            .collect()
    }
}

/// What the device offers and the guest RAM it hints about.
#[derive(Args, Clone, Debug)]
pub struct DeviceOptions {
    /// Guest RAM size (bytes, or with K/M/G suffix), to derive the RAM
    /// layout for hints together with --machine.
    #[arg(long, value_parser = parse_size)]
    pub ram_size: Option<u64>,
    /// Machine type for --ram-size.
    #[arg(long, default_value = "pc")]
    pub machine: Machine,
    /// Explicit guest RAM layout: comma-separated START+LEN byte ranges
    /// (K/M/G suffixes), e.g. `0+3G,4G+1G`. Overrides --ram-size.
    #[arg(long)]
    pub ram_layout: Option<String>,
    /// Do not offer VIRTIO_BALLOON_F_STATS_VQ.
    #[arg(long)]
    pub no_stats: bool,
    /// Do not offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    #[arg(long)]
    pub no_deflate_on_oom: bool,
    /// Do not offer VIRTIO_BALLOON_F_FREE_PAGE_HINT (nor the bitmap).
    #[arg(long)]
    pub no_free_page_hint: bool,
    /// Do not offer the freehint bitmap extension.
    #[arg(long)]
    pub no_bitmap: bool,
    /// Do not offer VIRTIO_BALLOON_F_PAGE_POISON.
    #[arg(long)]
    pub no_page_poison: bool,
    /// Do not offer VIRTIO_BALLOON_F_REPORTING.
    #[arg(long)]
    pub no_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_MUST_TELL_HOST.
    #[arg(long)]
    pub must_tell_host: bool,
    /// Seconds between automatic stats requests (0: only on demand).
    #[arg(long, default_value_t = 0)]
    pub stats_interval: u32,
    /// Balloon target at start, in 4 KiB pages (a migration destination
    /// starts with the source's target).
    #[arg(long, default_value_t = 0)]
    pub target_pages: u32,
}

/// The device configuration the options describe, and the RAM byte ranges
/// (empty when neither --ram-size nor --ram-layout was given: then hinting
/// and reporting are not offered).
pub struct Configured {
    /// What the device offers.
    pub config: BalloonConfig,
    /// Guest RAM as `(start, len)` byte ranges.
    pub ranges: Vec<(u64, u64)>,
}

impl DeviceOptions {
    /// Builds the device configuration.
    pub fn configure(&self) -> Result<Configured, String> {
        let ranges = match (&self.ram_layout, self.ram_size) {
            (Some(l), _) => parse_layout(l)?,
            (None, Some(size)) => derive_ranges(size, self.machine),
            (None, None) => Vec::new(),
        };
        let layout = if ranges.is_empty() {
            Layout::empty()
        } else {
            Layout::from_ram_byte_ranges(&ranges)
                .map_err(|e| format!("invalid RAM layout {ranges:x?}: {e}"))?
        };
        let hints = layout.total_bits() > 0;
        if !hints {
            log::warn!(
                "no --ram-size/--ram-layout: free page hinting and reporting are not offered"
            );
        }
        let mut config = BalloonConfig::all_features(layout);
        config.stats = !self.no_stats;
        config.stats_polling_interval_s = self.stats_interval;
        config.deflate_on_oom = !self.no_deflate_on_oom;
        config.free_page_hint = hints && !self.no_free_page_hint;
        config.bitmap = config.free_page_hint && !self.no_bitmap;
        config.page_poison = !self.no_page_poison;
        config.reporting = hints && !self.no_reporting;
        config.must_tell_host = self.must_tell_host;
        Ok(Configured { config, ranges })
    }
}

/// Parses a size: bytes, `0x` hex, or with a K/M/G/T suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
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

/// RAM byte ranges of a QEMU x86 machine with `size` bytes of RAM
/// ([`qemu_x86_ram_ranges`]).
pub fn derive_ranges(size: u64, machine: Machine) -> Vec<(u64, u64)> {
    qemu_x86_ram_ranges(size, machine).collect()
}

/// Parses `START+LEN[,START+LEN...]` byte ranges.
pub fn parse_layout(s: &str) -> Result<Vec<(u64, u64)>, String> {
    s.split(',')
        .map(|r| {
            let (a, l) = r
                .split_once('+')
                .ok_or_else(|| format!("range {r:?} is not START+LEN"))?;
            Ok((parse_size(a)?, parse_size(l)?))
        })
        .collect()
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
