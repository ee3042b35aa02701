//! The command line of `fhtool` (see the crate documentation).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `fhtool SUBCOMMAND [--key value]...`.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "fhtool",
    about = "Test programs that run inside the freehint test guest",
    args_override_self = true
)]
pub struct Cli {
    /// The check to run.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands; each prints `@@RESULT` lines and exits 0 only if all
/// its checks passed.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Cmd {
    /// No page held by this program is marked free in a bitmap built meanwhile.
    FalseFree {
        /// MiB to hold (default: a quarter of RAM, at least 64).
        #[arg(long, value_name = "N")]
        mib: Option<u64>,
    },
    /// The bitmap agrees with /proc/kpageflags on a quiet guest.
    Kpageflags,
    /// One bitmap bit per RAM page, the PCI hole folded out.
    Bits {
        /// The QEMU machine, to check where low RAM ends.
        #[arg(long)]
        machine: Option<Machine>,
    },
    /// A layout given from outside is validated, used and dropped again.
    HostLayout,
    /// mmap/touch/munmap churn.
    Churn(ChurnArgs),
    /// N builds, all must succeed.
    Builds {
        /// Builds to run.
        #[arg(long, value_name = "N", default_value_t = 1000)]
        count: u64,
        /// Go on (up to 4 N builds) until the walk restarted a list R times.
        #[arg(long, value_name = "R", default_value_t = 0)]
        min_restarts: u64,
    },
    /// Walk time, lock hold and memset baseline (medians).
    Bench {
        /// Builds per series (at least 1).
        #[arg(long, value_name = "N", default_value_t = 21)]
        builds: u64,
    },
    /// One build, its statistics as a result.
    Stats,
    /// Guest half of the vfio-* scenarios.
    VfioRound(RoundArgs),
    /// Drives the vfio-user balloon's BAR0 with garbage, then rebinds virtio-pci.
    Hostile {
        /// Rounds of garbage.
        #[arg(long, value_name = "N", default_value_t = 2000)]
        iterations: u64,
    },
}

impl Cmd {
    /// The `name` of the `@@RESULT` line printed when the subcommand fails
    /// with an error.
    pub fn result_name(&self) -> &'static str {
        match self {
            Cmd::FalseFree { .. } => "false-free",
            Cmd::Kpageflags => "kpageflags",
            Cmd::Bits { .. } => "bits",
            Cmd::HostLayout => "host-layout",
            Cmd::Churn(_) => "churn",
            Cmd::Builds { .. } => "builds",
            Cmd::Bench { .. } => "bench",
            Cmd::Stats => "stats",
            Cmd::VfioRound(_) => crate::vfio_round::RESULT_NAME,
            Cmd::Hostile { .. } => crate::hostile::RESULT_NAME,
        }
    }
}

/// A QEMU x86 machine type (`pc`, `q35`) and where it ends low RAM.
pub use freehint_protocol::layout::QemuX86Machine as Machine;

/// Options of `fhtool churn`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ChurnArgs {
    /// How long to churn.
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub seconds: u64,
    /// Most memory held at once, MiB.
    #[arg(long, value_name = "M", default_value_t = 64)]
    pub max_mib: u64,
    /// Stop early once this file exists.
    #[arg(long, value_name = "F")]
    pub stop_file: Option<PathBuf>,
}

/// What `fhtool vfio-round` dumps after the host's round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoundMode {
    /// The stock driver: ground truth and held pages only.
    Stock,
    /// freehint.ko: also the bitmap it builds over the device's layout.
    Freehint,
}

impl RoundMode {
    /// The mode as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            RoundMode::Stock => "stock",
            RoundMode::Freehint => "freehint",
        }
    }
}

/// Options of `fhtool vfio-round`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RoundArgs {
    /// Which driver the guest runs.
    #[arg(long, value_enum, default_value_t = RoundMode::Stock)]
    pub mode: RoundMode,
    /// MiB held (filled, mlocked) during the host's round.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub hold: u64,
    /// The host channel (a serial port).
    #[arg(long, value_name = "DEV", default_value = "/dev/ttyS1")]
    pub tty: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("fhtool").chain(line.split_whitespace())).map(|c| c.cmd)
    }

    fn ok(line: &str) -> Cmd {
        parse(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// tests/vm/guest/scenarios/bitmap.sh.
    #[test]
    fn bitmap_script_invocations() {
        assert_eq!(ok("kpageflags"), Cmd::Kpageflags);
        assert_eq!(ok("bits"), Cmd::Bits { machine: None });
        assert_eq!(
            ok("bits --machine q35"),
            Cmd::Bits {
                machine: Some(Machine::Q35)
            }
        );
        assert_eq!(
            ok("bits --machine pc"),
            Cmd::Bits {
                machine: Some(Machine::Pc)
            }
        );
        assert_eq!(ok("false-free"), Cmd::FalseFree { mib: None });
        assert_eq!(ok("false-free --mib 32"), Cmd::FalseFree { mib: Some(32) });
        assert_eq!(ok("host-layout"), Cmd::HostLayout);
        assert_eq!(ok("stats"), Cmd::Stats);
    }

    /// tests/vm/guest/scenarios/bitmap-lockdep.sh and qemu-migrate.sh.
    #[test]
    fn churn_and_builds_invocations() {
        assert_eq!(
            ok("churn --seconds 3600 --max-mib 32 --stop-file /tmp/churn.stop"),
            Cmd::Churn(ChurnArgs {
                seconds: 3600,
                max_mib: 32,
                stop_file: Some("/tmp/churn.stop".into()),
            })
        );
        assert_eq!(
            ok("churn"),
            Cmd::Churn(ChurnArgs {
                seconds: 10,
                max_mib: 64,
                stop_file: None,
            })
        );
        assert_eq!(
            ok("builds --count 1000"),
            Cmd::Builds {
                count: 1000,
                min_restarts: 0
            }
        );
        assert_eq!(
            ok("builds --count 3000 --min-restarts 1"),
            Cmd::Builds {
                count: 3000,
                min_restarts: 1
            }
        );
    }

    /// tests/vm/guest/scenarios/bench-bitmap.sh.
    #[test]
    fn bench_invocation() {
        assert_eq!(ok("bench --builds 7"), Cmd::Bench { builds: 7 });
        assert_eq!(ok("bench"), Cmd::Bench { builds: 21 });
    }

    /// tests/vm/guest/scenarios/vfio-stock.sh (and vfio-freehint, vfio-hostile).
    #[test]
    fn vfio_invocations() {
        assert_eq!(
            ok("vfio-round --mode freehint --hold 32 --tty /dev/ttyS1"),
            Cmd::VfioRound(RoundArgs {
                mode: RoundMode::Freehint,
                hold: 32,
                tty: "/dev/ttyS1".into(),
            })
        );
        assert_eq!(
            ok("vfio-round --mode stock --hold 16 --tty /dev/ttyS2"),
            Cmd::VfioRound(RoundArgs {
                mode: RoundMode::Stock,
                hold: 16,
                tty: "/dev/ttyS2".into(),
            })
        );
        assert_eq!(
            ok("vfio-round"),
            Cmd::VfioRound(RoundArgs {
                mode: RoundMode::Stock,
                hold: 64,
                tty: "/dev/ttyS1".into(),
            })
        );
        assert_eq!(
            ok("hostile --iterations 4000"),
            Cmd::Hostile { iterations: 4000 }
        );
        assert_eq!(ok("hostile"), Cmd::Hostile { iterations: 2000 });
    }

    #[test]
    fn the_last_of_a_repeated_option_wins() {
        assert_eq!(ok("bench --builds 3 --builds 5"), Cmd::Bench { builds: 5 });
    }

    #[test]
    fn rejects_bad_usage() {
        for bad in [
            "",
            "fly",
            "bench --builds",
            "bench --builds x",
            "bench 5",
            "kpageflags --mib 3",
            "bits --machine virt",
            "vfio-round --mode other",
            "builds --count -1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn error_results_keep_their_names() {
        assert_eq!(ok("bench").result_name(), "bench");
        assert_eq!(ok("false-free").result_name(), "false-free");
        assert_eq!(ok("vfio-round").result_name(), "guest-dump");
        assert_eq!(ok("hostile").result_name(), "hostile-driver");
    }
}
