//! `fhtool`: test programs that run inside the freehint test guest.
//!
//! Built statically (`-C target-feature=+crt-static`) into the initramfs and
//! driven by the scenario scripts in `tests/vm/guest/scenarios/`. Every
//! subcommand prints one or more `@@RESULT {json}` lines (with `name` and
//! `ok`) and exits 0 only if all its checks passed.
//!
//! ```text
//! fhtool false-free [--mib N]        own pfns never in a bitmap built while held
//! fhtool kpageflags                  bitmap vs KPF_BUDDY ground truth (quiet guest)
//! fhtool bits [--machine pc|q35]     bitmap bits == RAM pages, PCI hole folded out
//! fhtool host-layout                 a layout given from outside is used and validated
//! fhtool churn --seconds S [--max-mib M] [--stop-file F]   mmap/touch/munmap churn
//! fhtool builds --count N [--min-restarts R]
//!                                    N builds, all must succeed (and the walk
//!                                    restarted a list from its head R times,
//!                                    going on up to 4 N builds for it)
//! fhtool bench [--builds N]          walk time, lock hold, memset baseline (medians)
//! fhtool stats                       one build, its statistics as a result
//! fhtool vfio-round [--mode stock|freehint] [--hold MIB] [--tty DEV]
//!                                    guest half of the vfio-* scenarios: holds
//!                                    MIB, waits for the host's round, dumps the
//!                                    guest's bitmap, kpageflags and held pfns
//! fhtool hostile [--iterations N]    drives the vfio-user balloon's BAR0 with
//!                                    garbage, then resets and rebinds virtio-pci
//! ```

#![warn(missing_docs)]

mod checks;
mod cli;
mod debugfs;
mod hostile;
mod mem;
mod result;
mod vfio_round;

use std::fmt;
use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Cmd};

/// What went wrong, for the operator (which step, and why).
#[derive(Debug)]
pub struct Error(String);

impl Error {
    /// An error with a message.
    pub fn msg(m: impl Into<String>) -> Self {
        Self(m.into())
    }

    /// An I/O error while doing `what`.
    pub fn io(what: &str, e: std::io::Error) -> Self {
        Self(format!("{what}: {e}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Runs the subcommand: `Ok(true)` when all its checks passed.
fn dispatch(cmd: &Cmd) -> Result<bool, Error> {
    match cmd {
        Cmd::FalseFree { mib } => checks::false_free(*mib),
        Cmd::Kpageflags => checks::kpageflags(),
        Cmd::Bits { machine } => checks::bits(*machine),
        Cmd::HostLayout => checks::host_layout(),
        Cmd::Churn(a) => checks::churn(a),
        Cmd::Builds {
            count,
            min_restarts,
        } => checks::builds(*count, *min_restarts),
        Cmd::Bench { builds } => checks::bench(*builds),
        Cmd::Stats => checks::stats(),
        Cmd::VfioRound(a) => vfio_round::round(a),
        Cmd::Hostile { iterations } => hostile::run(*iterations),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match dispatch(&cli.cmd) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let name = cli.cmd.result_name();
            eprintln!("fhtool {name}: {e}");
            let mut r = result::Report::new(name);
            r.text("error", &e.to_string());
            r.emit(false);
            ExitCode::FAILURE
        }
    }
}
