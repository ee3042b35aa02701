//! `libfreehint_uffd_preload.so`: loaded into QEMU with `LD_PRELOAD`, it
//! lets `freehint-migrate send` track the guest's writes to RAM.
//!
//! A userfaultfd works only on the address space of the process that
//! creates it, so the migrator, another process, cannot register QEMU's RAM
//! itself. When a process whose program name starts with `qemu-system` loads
//! this library and `FREEHINT_UFFD_SOCKET` names a path, a thread listens on
//! that UNIX socket. One request per connection (see
//! `freehint_migrate::uffd::request`):
//!
//! - `register START LEN`: checks that `[START, START+LEN)` is one shared
//!   file mapping of this process, registers it with a userfaultfd
//!   (`UFFD_FEATURE_WP_ASYNC`) in write-protect mode and write-protects it
//!   (`freehint_migrate::uffd::AsyncWriteTracking`), replacing an earlier
//!   registration. Writes go on as before (the kernel resolves them without
//!   user space); `PAGEMAP_SCAN` on `/proc/PID/pagemap` then reports them.
//! - `unregister`: closes the userfaultfd, which ends the tracking.
//!
//! Nothing else in QEMU changes. Other processes (the shell of a wrapper
//! script that execs QEMU) load the library and do nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use freehint_migrate::uffd::request::{Request, MAX_LINE};
use freehint_migrate::uffd::AsyncWriteTracking;

/// The environment variable naming the socket.
pub const SOCKET_ENV: &str = "FREEHINT_UFFD_SOCKET";

/// Runs when the library is loaded (glibc calls `.init_array` entries of
/// every shared object); starts the listener thread in QEMU.
#[used]
#[link_section = ".init_array"]
static START: extern "C" fn() = start;

extern "C" fn start() {
    let Some(path) = std::env::var_os(SOCKET_ENV).map(PathBuf::from) else {
        return;
    };
    if !is_qemu(&program_name()) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("freehint-uffd".into())
        .spawn(move || serve(path));
    if let Err(e) = spawned {
        eprintln!("freehint-uffd-preload: cannot start its thread: {e}");
    }
}

/// `argv[0]` of this process, from `/proc/self/cmdline` (a wrapper that
/// runs QEMU through its dynamic loader sets it with `exec -a`).
fn program_name() -> String {
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(first).into_owned()
}

/// Whether `argv0` names a QEMU system emulator.
pub fn is_qemu(argv0: &str) -> bool {
    argv0
        .rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("qemu-system"))
}

fn serve(path: PathBuf) {
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "freehint-uffd-preload: cannot listen on {}: {e}",
                path.display()
            );
            return;
        }
    };
    let mut state = Tracker::default();
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = state.answer(stream) {
                    eprintln!("freehint-uffd-preload: {e}");
                }
            }
            Err(e) => eprintln!("freehint-uffd-preload: accept: {e}"),
        }
    }
}

/// The registration in force.
#[derive(Debug, Default)]
pub struct Tracker {
    tracking: Option<AsyncWriteTracking>,
}

impl Tracker {
    /// Reads one request from `stream` and answers it.
    fn answer(&mut self, stream: UnixStream) -> std::io::Result<()> {
        let mut line = String::new();
        BufReader::new(&stream)
            .take(MAX_LINE as u64)
            .read_line(&mut line)?;
        let reply = self.handle(line.trim_end(), &maps());
        (&stream).write_all(format!("{reply}\n").as_bytes())
    }

    /// The reply to one request line, given this process's `/proc/self/maps`.
    pub fn handle(&mut self, line: &str, maps: &str) -> String {
        match Request::parse(line) {
            Err(e) => format!("error {e}"),
            Ok(Request::Unregister) => {
                self.tracking = None;
                "ok unregistered".into()
            }
            Ok(Request::Register { start, len }) => {
                if !is_shared_file_mapping(maps, start, len) {
                    return format!("error {start:#x}+{len:#x} is not one shared file mapping");
                }
                self.tracking = None;
                match AsyncWriteTracking::register(start, len) {
                    Ok(t) => {
                        self.tracking = Some(t);
                        format!("ok registered {start:#x}+{len:#x}")
                    }
                    Err(e) => format!("error {}", chain(&e)),
                }
            }
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text.replace('\n', " ")
}

fn maps() -> String {
    std::fs::read_to_string("/proc/self/maps").unwrap_or_default()
}

/// Whether `[start, start+len)` is covered by shared (`s`) mappings of one
/// file, back to back, in a `/proc/PID/maps` text.
pub fn is_shared_file_mapping(maps: &str, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let mut cursor = start;
    let mut file: Option<String> = None;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(span), Some(perms), Some(_), Some(_), Some(_)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path: Vec<&str> = f.collect();
        let Some((a, b)) = span.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        }) else {
            continue;
        };
        if b <= cursor || a > cursor || cursor >= end {
            continue;
        }
        let path = path.join(" ");
        let same = file.get_or_insert_with(|| path.clone()) == &path;
        if !perms.ends_with('s') || !path.starts_with('/') || !same {
            return false;
        }
        cursor = b;
    }
    cursor >= end
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f0000000000-7f0040000000 rw-s 00000000 00:1a 12 /dev/shm/ram
7f0040000000-7f0080000000 rw-s 40000000 00:1a 12 /dev/shm/ram
7f0080000000-7f0080001000 ---p 00000000 00:00 0 
7f0090000000-7f0090001000 rw-p 00000000 00:00 0 [heap]
";

    #[test]
    fn only_shared_file_mappings_are_registered() {
        assert!(is_shared_file_mapping(MAPS, 0x7f00_0000_0000, 0x8000_0000));
        assert!(is_shared_file_mapping(MAPS, 0x7f00_1000_0000, 0x1000));
        assert!(!is_shared_file_mapping(MAPS, 0x7f00_0000_0000, 0x8000_1000));
        assert!(!is_shared_file_mapping(MAPS, 0x7f00_9000_0000, 0x1000));
        assert!(!is_shared_file_mapping(MAPS, 0x7e00_0000_0000, 0x1000));
        assert!(!is_shared_file_mapping(MAPS, u64::MAX - 0xfff, 0x1000));
        let mut t = Tracker::default();
        assert!(t
            .handle("register 0x7f0090000000 0x1000", MAPS)
            .starts_with("error"));
        assert!(t.handle("bogus", MAPS).starts_with("error unknown request"));
        assert_eq!(t.handle("unregister", MAPS), "ok unregistered");
    }

    #[test]
    fn only_qemu_starts_the_listener() {
        assert!(is_qemu("qemu-system-x86_64"));
        assert!(is_qemu("/usr/bin/qemu-system-aarch64"));
        assert!(!is_qemu("/bin/bash"));
        assert!(!is_qemu("qemu-img"));
    }
}
