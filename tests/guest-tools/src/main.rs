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
//! ```

#![warn(missing_docs)]

mod checks;
mod debugfs;
mod mem;
mod result;

use std::fmt;
use std::process::ExitCode;

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

/// Command line: `SUBCOMMAND [--key value]...`.
#[derive(Debug)]
pub struct Args {
    cmd: String,
    opts: Vec<(String, String)>,
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Result<Self, Error> {
        let cmd = it
            .next()
            .ok_or_else(|| Error::msg("missing subcommand (see fhtool --help)"))?;
        let mut opts = Vec::new();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| Error::msg(format!("unexpected argument {k:?}")))?
                .to_owned();
            let v = it
                .next()
                .ok_or_else(|| Error::msg(format!("--{key} needs a value")))?;
            opts.push((key, v));
        }
        Ok(Self { cmd, opts })
    }

    /// A string option.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A numeric option with a default.
    pub fn num(&self, key: &str, default: u64) -> Result<u64, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::msg(format!("--{key}: {v:?} is not a number"))),
        }
    }
}

fn usage() -> &'static str {
    "usage: fhtool false-free [--mib N] | kpageflags | bits [--machine pc|q35] | host-layout\n\
     \x20      | churn --seconds S [--max-mib M] | builds --count N [--min-restarts R] | bench [--builds N] | stats"
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    if matches!(
        argv.peek().map(String::as_str),
        None | Some("-h" | "--help")
    ) {
        println!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fhtool: {e}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    let res = match args.cmd.as_str() {
        "false-free" => checks::false_free(&args),
        "kpageflags" => checks::kpageflags(&args),
        "bits" => checks::bits(&args),
        "host-layout" => checks::host_layout(&args),
        "churn" => checks::churn(&args),
        "builds" => checks::builds(&args),
        "bench" => checks::bench(&args),
        "stats" => checks::stats(&args),
        other => Err(Error::msg(format!(
            "unknown subcommand {other:?}\n{}",
            usage()
        ))),
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fhtool {}: {e}", args.cmd);
            let mut r = result::Report::new(&args.cmd);
            r.text("error", &e.to_string());
            r.emit(false);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_options() {
        let a = Args::parse(["bench", "--builds", "7"].map(String::from).into_iter()).unwrap();
        assert_eq!(a.cmd, "bench");
        assert_eq!(a.num("builds", 1).unwrap(), 7);
        assert_eq!(a.num("other", 3).unwrap(), 3);
        assert!(Args::parse(["x", "--k"].map(String::from).into_iter()).is_err());
        assert!(Args::parse(["x", "k"].map(String::from).into_iter()).is_err());
    }
}
