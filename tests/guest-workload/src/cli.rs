//! The command line of `fhwork` (see the crate documentation for the modes).

use clap::{Args, Parser, Subcommand};

/// `fhwork MODE [OPTIONS]`.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "fhwork",
    about = "Integrity workload of the freehint migration tests",
    args_override_self = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub mode: Mode,
}

/// The modes.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Mode {
    /// Map MIB MiB, write a non-zero pattern, unmap.
    DirtyFree {
        /// MiB to dirty and free (at least 1).
        #[arg(long, value_name = "N", value_parser = at_least_one)]
        mib: usize,
    },
    /// Map MIB MiB of stamped pages and keep them; verify on every trigger.
    DirtyKeep {
        /// MiB to keep (at least 1).
        #[arg(long, value_name = "N", value_parser = at_least_one)]
        mib: usize,
    },
    /// Keep a churning working set and verify it on every trigger.
    Run(RunArgs),
}

/// Options of `fhwork run`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RunArgs {
    /// Working set, MiB (in chunks of `--chunk-mib`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub mib: usize,
    /// Chunk size, MiB (at least 1).
    #[arg(long, value_name = "C", default_value_t = 1, value_parser = at_least_one)]
    pub chunk_mib: usize,
    /// MiB written once and kept.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub keep_mib: usize,
    /// MiB dirtied and freed before the working set is set up.
    #[arg(long, value_name = "F", default_value_t = 0)]
    pub pre_free_mib: usize,
    /// Pause after every churn step, microseconds.
    #[arg(long, value_name = "U", default_value_t = 0)]
    pub pace_us: u64,
    /// Seed of the churn's choices (which slot, free or rewrite).
    #[arg(long, value_name = "S", default_value_t = 0x5eed)]
    pub seed: u64,
}

impl RunArgs {
    /// `fhwork dirty-keep --mib N`: a run that keeps N MiB and churns nothing.
    pub fn keep_only(mib: usize) -> Self {
        RunArgs {
            mib: 0,
            chunk_mib: 1,
            keep_mib: mib,
            pre_free_mib: 0,
            pace_us: 0,
            seed: 0x5eed,
        }
    }
}

/// A count of MiB that must be positive.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("fhwork").chain(line.split_whitespace()))
    }

    fn run(line: &str) -> RunArgs {
        match parse(line).expect(line).mode {
            Mode::Run(r) => r,
            m => panic!("{line}: not run: {m:?}"),
        }
    }

    /// tests/vm/guest/scenarios/qemu-migrate.sh, workload=idle|dirty-keep|dirty-free.
    #[test]
    fn migration_script_invocations() {
        let r = run("run --mib 32 --pace-us 200");
        assert_eq!((r.mib, r.pace_us, r.chunk_mib), (32, 200, 1));
        assert_eq!((r.keep_mib, r.pre_free_mib, r.seed), (0, 0, 0x5eed));
        assert_eq!(
            run("run --mib 32 --pace-us 50 --keep-mib 300").keep_mib,
            300
        );
        assert_eq!(
            run("run --mib 32 --pace-us 0 --pre-free-mib 300").pre_free_mib,
            300
        );
    }

    /// tests/vm/guest/scenarios/qemu-balloon.sh (`oom`) and docs/migration.md.
    #[test]
    fn dirty_modes() {
        assert_eq!(
            parse("dirty-keep --mib 512").unwrap().mode,
            Mode::DirtyKeep { mib: 512 }
        );
        assert_eq!(
            parse("dirty-free --mib 300").unwrap().mode,
            Mode::DirtyFree { mib: 300 }
        );
    }

    #[test]
    fn all_run_options() {
        let r =
            run("run --mib 64 --chunk-mib 2 --keep-mib 8 --pre-free-mib 300 --pace-us 5 --seed 9");
        assert_eq!(
            (
                r.mib,
                r.chunk_mib,
                r.keep_mib,
                r.pre_free_mib,
                r.pace_us,
                r.seed
            ),
            (64, 2, 8, 300, 5, 9)
        );
        assert_eq!(run("run").mib, 0);
        assert_eq!(run("run --mib 1 --mib 2").mib, 2, "the last one wins");
    }

    #[test]
    fn rejects_bad_usage() {
        for bad in [
            "",
            "fly",
            "dirty-free",
            "dirty-keep --mib 0",
            "run --mib",
            "run --mib x",
            "run --mib -1",
            "run --chunk-mib 0",
            "run --bogus 1",
            "run 5",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
