//! Guest half of the `vfio-*` VM scenarios (tests/vm/harness/src/vfio.rs).
//!
//! `vfio-guest round --mode stock|freehint --hold MIB --tty /dev/ttyS1`:
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
//! Runs are printed as `@@RUNS TAG START+LEN ...` (at most 32 per line) and
//! closed by `@@RUNS-END TAG PAGES` (the total, so the host can tell a
//! damaged line). Ends with one `@@RESULT` line.
//!
//! std only, built for the guest with
//! `rustc -O -C target-feature=+crt-static --edition 2021 vfio-guest.rs`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;

const PAGE: usize = 4096;
const KPF_BUDDY: u64 = 1 << 10;
const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_PRIVATE: i32 = 2;
const MAP_ANONYMOUS: i32 = 0x20;

extern "C" {
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
    fn mlock(addr: *const u8, len: usize) -> i32;
}

type Res<T> = Result<T, String>;

fn arg(args: &[String], key: &str) -> Option<String> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Prints `@@RUNS` lines for sorted values (pfns or bits); returns the count.
fn print_runs(tag: &str, mut items: impl Iterator<Item = u64>) -> u64 {
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut line = String::new();
    let mut in_line = 0;
    let mut total = 0u64;
    let mut cur: Option<(u64, u64)> = None;
    let mut flush_run = |r: (u64, u64), line: &mut String, in_line: &mut usize| {
        line.push_str(&format!(" {}+{}", r.0, r.1));
        *in_line += 1;
        if *in_line == 32 {
            let _ = writeln!(out, "@@RUNS {tag}{line}");
            line.clear();
            *in_line = 0;
        }
    };
    for v in items.by_ref() {
        total += 1;
        cur = match cur {
            Some((s, n)) if s + n == v => Some((s, n + 1)),
            Some(r) => {
                flush_run(r, &mut line, &mut in_line);
                Some((v, 1))
            }
            None => Some((v, 1)),
        };
    }
    if let Some(r) = cur {
        flush_run(r, &mut line, &mut in_line);
    }
    let mut out = std::io::stdout().lock();
    if !line.is_empty() {
        let _ = writeln!(out, "@@RUNS {tag}{line}");
    }
    let _ = writeln!(out, "@@RUNS-END {tag} {total}");
    let _ = out.flush();
    total
}

/// pfns of `pages` pages at `addr` (None: not present).
fn pagemap(addr: usize, pages: usize) -> Res<Vec<Option<u64>>> {
    let f = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, (addr / PAGE * 8) as u64)
        .map_err(|e| format!("pagemap read: {e}"))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let e = u64::from_le_bytes(b);
            (e >> 63 == 1).then_some(e & ((1 << 55) - 1))
        })
        .collect())
}

/// System RAM ranges of /proc/iomem as pfn ranges [first, end).
fn system_ram() -> Res<Vec<(u64, u64)>> {
    let text = fs::read_to_string("/proc/iomem").map_err(|e| format!("iomem: {e}"))?;
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with(' ') || !l.ends_with(": System RAM") {
            continue;
        }
        let range = l.split(" : ").next().unwrap_or("");
        let mut it = range.split('-');
        let (Some(a), Some(b)) = (it.next(), it.next()) else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let first = a.div_ceil(PAGE as u64);
        let end = (b + 1) / PAGE as u64;
        if end > first {
            out.push((first, end));
        }
    }
    if out.is_empty() {
        return Err("no System RAM in /proc/iomem (not root?)".into());
    }
    Ok(out)
}

/// pfns whose kpageflags have KPF_BUDDY, in order.
fn buddy_pfns(ram: &[(u64, u64)]) -> Res<Vec<u64>> {
    let f = File::open("/proc/kpageflags").map_err(|e| format!("kpageflags: {e}"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536 * 8];
    for &(first, end) in ram {
        let mut pfn = first;
        while pfn < end {
            let n = ((end - pfn) as usize).min(65536);
            f.read_exact_at(&mut buf[..n * 8], pfn * 8)
                .map_err(|e| format!("kpageflags read at pfn {pfn:#x}: {e}"))?;
            for (i, c) in buf[..n * 8].chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                if u64::from_le_bytes(b) & KPF_BUDDY != 0 {
                    out.push(pfn + i as u64);
                }
            }
            pfn += n as u64;
        }
    }
    Ok(out)
}

fn set_printk(level: &str) {
    let _ = fs::write("/proc/sys/kernel/printk", level);
}

fn round(args: &[String]) -> Res<bool> {
    let mode = arg(args, "--mode").unwrap_or_else(|| "stock".into());
    let hold_mib: usize = arg(args, "--hold")
        .map(|v| v.parse().map_err(|e| format!("--hold: {e}")))
        .transpose()?
        .unwrap_or(64);
    let tty = arg(args, "--tty").unwrap_or_else(|| "/dev/ttyS1".into());
    let pages = hold_mib * 1024 * 1024 / PAGE;

    // 1. Hold memory.
    // SAFETY: an anonymous private mapping with no address hint; the result
    // is checked before use and never unmapped (held until exit).
    let p = unsafe {
        mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p.is_null() || p as isize == -1 {
        return Err("mmap failed".into());
    }
    for i in 0..pages {
        // SAFETY: `i * PAGE + 8 <= pages * PAGE`, inside the mapping above.
        unsafe { std::ptr::write_volatile(p.add(i * PAGE) as *mut u64, 0x5a5a_0000 + i as u64) };
    }
    // SAFETY: the range is the mapping made above.
    let locked = unsafe { mlock(p, pages * PAGE) } == 0;
    let before = pagemap(p as usize, pages)?;

    // 2. Host channel, then wait for the host's round.
    let chan = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tty)
        .map_err(|e| format!("{tty}: {e}"))?;
    // The kernel's own messages would interleave with the dump lines.
    set_printk("4");
    println!("@@VFIO ready mode={mode} hold_pages={pages} mlocked={locked}");
    let _ = std::io::stdout().flush();
    let mut reader = BufReader::new(chan);
    let mut line = String::new();
    let layout = loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| format!("{tty}: {e}"))? == 0 {
            return Err(format!("{tty}: closed before 'go'"));
        }
        if let Some(rest) = line.trim().strip_prefix("go") {
            break rest.trim().to_string();
        }
    };

    // The stock driver gives its hinted blocks back on DONE (sent before
    // 'go'); let its work item run before the ground truth is taken.
    if mode == "stock" {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    // 3. The bitmap the guest builds now, over the device's layout.
    if mode == "freehint" {
        let mut text = String::new();
        for r in layout.split(',').filter(|r| !r.is_empty()) {
            text.push_str(&r.replace(':', " "));
            text.push('\n');
        }
        let d = "/sys/kernel/debug/freehint";
        fs::write(format!("{d}/layout"), text).map_err(|e| format!("layout: {e}"))?;
        fs::write(format!("{d}/build"), "1").map_err(|e| format!("build: {e}"))?;
        let raw = fs::read(format!("{d}/bitmap")).map_err(|e| format!("bitmap: {e}"))?;
        let bits = raw.iter().enumerate().flat_map(|(i, &b)| {
            (0..8u64).filter(move |k| b >> k & 1 == 1).map(move |k| i as u64 * 8 + k)
        });
        print_runs("gbitmap", bits);
    }

    // 4. Ground truth.
    let ram = system_ram()?;
    let truth = buddy_pfns(&ram)?;
    let truth_pages = print_runs("truth", truth.into_iter());

    // 5. Held pages that stayed put.
    let after = pagemap(p as usize, pages)?;
    let mut held: Vec<u64> = before
        .iter()
        .zip(&after)
        .filter_map(|(b, a)| match (b, a) {
            (Some(b), Some(a)) if a == b => Some(*b),
            _ => None,
        })
        .collect();
    let moved = pages - held.len();
    held.sort_unstable();
    let held_n = print_runs("held", held.into_iter());
    set_printk("8");
    println!(
        "@@RESULT {{\"name\":\"guest-dump\",\"ok\":true,\"mode\":\"{mode}\",\"truth_free_pages\":{truth_pages},\"held_pages\":{held_n},\"held_moved\":{moved},\"mlocked\":{locked}}}"
    );
    Ok(true)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("round") => round(&args[1..]),
        _ => Err("usage: vfio-guest round --mode stock|freehint --hold MIB --tty DEV".into()),
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            set_printk("8");
            println!(
                "@@RESULT {{\"name\":\"guest-dump\",\"ok\":false,\"error\":\"{}\"}}",
                e.replace('"', "'")
            );
            std::process::exit(1);
        }
    }
}
