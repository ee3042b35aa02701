//! `fhtool vfio-round`: the guest half of the `vfio-*` VM scenarios
//! (host half: tests/vm/harness/src/vfio.rs).
//!
//! `fhtool vfio-round --mode stock|freehint --hold MIB --tty /dev/ttyS1`:
//! 1. holds MIB of anonymous memory (filled, mlocked) and notes its pfns
//!    from /proc/self/pagemap: pages the guest uses, which must never appear
//!    in the host's free set;
//! 2. opens the host channel (a second serial port), prints `@@VFIO ready`
//!    and waits for the host's line `go LAYOUT` (LAYOUT: the device's RAM
//!    layout as `first_pfn:nr_pages:first_bit,...`), sent once the host has
//!    run its hint round and dumped the free set it received;
//! 3. with `--mode freehint`: sets that layout in freehint's debugfs, builds
//!    a bitmap right away and prints it (`@@RUNS gbitmap`, layout-bit
//!    space): the bitmap the guest builds at this moment;
//! 4. reads /proc/kpageflags over every System RAM range of /proc/iomem and
//!    prints the pages of free buddy blocks (`@@RUNS truth`, pfn space);
//! 5. re-reads the held pages' pfns and prints those that did not move
//!    (`@@RUNS held`, pfn space).
//!
//! Runs are printed as `@@RUNS TAG START+LEN ...` (at most [`RUNS_PER_LINE`]
//! per line) and closed by `@@RUNS-END TAG PAGES` (the total, so the host can
//! tell a damaged line). Ends with one `@@RESULT` line named
//! [`RESULT_NAME`].

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use freehint_protocol::bitmap::test_bit;

use crate::cli::{RoundArgs, RoundMode};
use crate::debugfs::Freehint;
use crate::mem::{self, RamRange, Region};
use crate::result::Report;
use crate::Error;

/// The `name` of the result line.
pub const RESULT_NAME: &str = "guest-dump";
/// Runs on one `@@RUNS` line.
pub const RUNS_PER_LINE: usize = 32;
/// `KPF_BUDDY`: the page belongs to a free buddy block.
const KPF_BUDDY: u64 = 1 << 10;
/// Pages of /proc/kpageflags read at once.
const KPF_CHUNK: u64 = 65536;

/// `fhtool vfio-round`: see the module documentation.
pub fn round(args: &RoundArgs) -> Result<bool, Error> {
    let r = round_inner(args);
    // Kernel messages back on the console, also after an error.
    set_printk("8");
    r
}

fn round_inner(args: &RoundArgs) -> Result<bool, Error> {
    let mode = args.mode.name();
    // 1. Hold memory.
    let held = Region::filled(args.hold as usize * 1024 * 1024, 0x5a, true)?;
    let pages = held.pages();
    let before = held.pfns()?;

    // 2. Host channel, then wait for the host's round.
    let chan = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.tty)
        .map_err(|e| Error::io(&args.tty.display().to_string(), e))?;
    // The kernel's own messages would interleave with the dump lines.
    set_printk("4");
    println!(
        "@@VFIO ready mode={mode} hold_pages={pages} mlocked={}",
        held.locked
    );
    let _ = std::io::stdout().flush();
    let layout = wait_for_go(chan, &args.tty)?;

    // The stock driver gives its hinted blocks back on DONE (sent before
    // 'go'); let its work item run before the ground truth is taken.
    if args.mode == RoundMode::Stock {
        std::thread::sleep(Duration::from_millis(500));
    }

    // 3. The bitmap the guest builds now, over the device's layout.
    if args.mode == RoundMode::Freehint {
        dump_guest_bitmap(&layout)?;
    }

    // 4. Ground truth.
    let truth = buddy_pfns(&system_ram()?)?;
    let truth_pages = print_runs("truth", truth.into_iter());

    // 5. Held pages that stayed put.
    let after = held.pfns()?;
    let mut stayed = unmoved(&before, &after);
    let moved = pages - stayed.len();
    stayed.sort_unstable();
    let held_pages = print_runs("held", stayed.into_iter());
    set_printk("8");
    let mut r = Report::new(RESULT_NAME);
    r.text("mode", mode)
        .num("truth_free_pages", truth_pages)
        .num("held_pages", held_pages)
        .num("held_moved", moved as u64)
        .flag("mlocked", held.locked);
    Ok(r.emit(true))
}

/// Reads lines from the host channel until `go LAYOUT`; returns LAYOUT.
fn wait_for_go(chan: File, tty: &Path) -> Result<String, Error> {
    let what = tty.display().to_string();
    let mut reader = BufReader::new(chan);
    let mut line = String::new();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .map_err(|e| Error::io(&what, e))?
            == 0
        {
            return Err(Error::msg(format!("{what}: closed before 'go'")));
        }
        if let Some(rest) = line.trim().strip_prefix("go") {
            return Ok(rest.trim().to_owned());
        }
    }
}

/// The host's layout `first_pfn:nr_pages:first_bit,...` as the text of
/// freehint's debugfs `layout` file (one `first_pfn nr_pages first_bit` line
/// per range).
fn layout_text(layout: &str) -> String {
    layout
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| format!("{}\n", r.replace(':', " ")))
        .collect()
}

/// Sets the host's layout, builds a bitmap and prints its set bits.
fn dump_guest_bitmap(layout: &str) -> Result<(), Error> {
    let fh = Freehint::open()?;
    fh.write_layout_text(&layout_text(layout))
        .map_err(|e| Error::io("layout", e))?;
    fh.build()?;
    let mut words = Vec::new();
    fh.read_bitmap(&mut words)?;
    let bits = (0..words.len() as u64 * 64).filter(|&b| test_bit(&words, b));
    print_runs("gbitmap", bits);
    Ok(())
}

/// pfns that were present and the same in both snapshots.
fn unmoved(before: &[Option<u64>], after: &[Option<u64>]) -> Vec<u64> {
    before
        .iter()
        .zip(after)
        .filter_map(|(b, a)| match (b, a) {
            (Some(b), Some(a)) if a == b => Some(*b),
            _ => None,
        })
        .collect()
}

/// System RAM ranges of /proc/iomem.
fn system_ram() -> Result<Vec<RamRange>, Error> {
    let text = fs::read_to_string("/proc/iomem").map_err(|e| Error::io("iomem", e))?;
    let ram = mem::parse_iomem(&text);
    if ram.is_empty() {
        return Err(Error::msg("no System RAM in /proc/iomem (not root?)"));
    }
    Ok(ram)
}

/// pfns whose kpageflags have `KPF_BUDDY`, in order.
fn buddy_pfns(ram: &[RamRange]) -> Result<Vec<u64>, Error> {
    let f = File::open("/proc/kpageflags").map_err(|e| Error::io("kpageflags", e))?;
    let mut out = Vec::new();
    let mut flags = vec![0u64; KPF_CHUNK as usize];
    for r in ram {
        let end = r.first_pfn + r.nr_pages;
        let mut pfn = r.first_pfn;
        while pfn < end {
            let n = (end - pfn).min(KPF_CHUNK);
            let chunk = &mut flags[..n as usize];
            mem::read_kpageflags(&f, pfn, chunk)?;
            out.extend(
                (pfn..)
                    .zip(chunk.iter())
                    .filter(|(_, &fl)| fl & KPF_BUDDY != 0)
                    .map(|(p, _)| p),
            );
            pfn += n;
        }
    }
    Ok(out)
}

fn set_printk(level: &str) {
    let _ = fs::write("/proc/sys/kernel/printk", level);
}

/// Runs of consecutive values, in order.
fn runs(items: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for v in items {
        match out.last_mut() {
            Some((s, n)) if *s + *n == v => *n += 1,
            _ => out.push((v, 1)),
        }
    }
    out
}

/// The `@@RUNS` lines and the closing `@@RUNS-END` line for sorted values.
fn runs_lines(tag: &str, items: impl Iterator<Item = u64>) -> (Vec<String>, u64) {
    let runs = runs(items);
    let total = runs.iter().map(|&(_, n)| n).sum();
    let mut lines: Vec<String> = runs
        .chunks(RUNS_PER_LINE)
        .map(|c| {
            let body: String = c.iter().map(|(s, n)| format!(" {s}+{n}")).collect();
            format!("@@RUNS {tag}{body}")
        })
        .collect();
    lines.push(format!("@@RUNS-END {tag} {total}"));
    (lines, total)
}

/// Prints `@@RUNS` lines for sorted values (pfns or bits); returns the count.
fn print_runs(tag: &str, items: impl Iterator<Item = u64>) -> u64 {
    let (lines, total) = runs_lines(tag, items);
    let mut out = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_lines_group_and_count() {
        let (lines, total) = runs_lines("t", [1, 2, 3, 7, 9, 10].into_iter());
        assert_eq!(total, 6);
        assert_eq!(lines, ["@@RUNS t 1+3 7+1 9+2", "@@RUNS-END t 6"]);
        let (lines, total) = runs_lines("e", std::iter::empty());
        assert_eq!((lines, total), (vec!["@@RUNS-END e 0".to_owned()], 0));
    }

    #[test]
    fn runs_lines_wrap_after_32_runs() {
        let (lines, total) = runs_lines("w", (0..33).map(|i| i * 2));
        assert_eq!(total, 33);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].matches('+').count(), RUNS_PER_LINE);
        assert_eq!(lines[1], "@@RUNS w 64+1");
    }

    #[test]
    fn host_layout_becomes_debugfs_text() {
        assert_eq!(
            layout_text("1:159:0,256:523776:159,"),
            "1 159 0\n256 523776 159\n"
        );
        assert_eq!(layout_text(""), "");
    }

    #[test]
    fn only_unmoved_present_pages_are_held() {
        let before = [Some(5), Some(6), None, Some(8)];
        let after = [Some(5), Some(9), Some(7), Some(8)];
        assert_eq!(unmoved(&before, &after), [5, 8]);
    }
}
