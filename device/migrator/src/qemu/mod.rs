//! Migrating a QEMU guest with this crate: QEMU keeps running the guest and
//! moves CPU and device state with `x-ignore-shared`; [`send`] copies its
//! RAM with the [`Engine`](crate::Engine), [`receive`] stores it into the
//! destination QEMU's RAM file.
//!
//! What QEMU must look like (both sides): guest RAM in a named shared file,
//! `-object memory-backend-file,id=ram,size=S,mem-path=/dev/shm/NAME,share=on
//! -machine memory-backend=ram` (a memfd is not skipped by
//! `x-ignore-shared`), and a QMP socket for this program. The source also
//! runs with the preload library (`LD_PRELOAD=libfreehint_uffd_preload.so`
//! and `FREEHINT_UFFD_SOCKET=PATH`, see [`tracking`]); the destination
//! with `-incoming defer`.
//!
//! This module finds what the program needs from QMP and `/proc`: QEMU's
//! pid (the QMP socket's peer), the RAM backend's file and size, the RAM
//! layout (QEMU's flat memory view) and where QEMU maps the file.

pub mod control;
pub mod hotplug;
pub mod receive;
pub mod send;
pub mod tracking;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::json;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{LayoutError, RamLayout, RamRange};
use crate::qmp::{Qmp, QmpError};
use crate::PAGE_SIZE;

/// What is wrong with the QEMU at the other end of QMP.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU is not in the state the step needs.
    #[error("QEMU is {found}, expected {expected}")]
    State {
        /// What it is.
        found: String,
        /// What it should be.
        expected: &'static str,
    },
    /// Guest RAM is not a shared, named file.
    #[error("guest RAM ({backend}) is not a shared memory-backend-file: start QEMU with -object memory-backend-file,id=ram,size=SIZE,mem-path=/dev/shm/NAME,share=on -machine memory-backend=ram")]
    NotAFile {
        /// The backend's QOM path.
        backend: String,
    },
    /// The flat memory view does not describe the whole RAM file.
    #[error("cannot derive the RAM layout from QEMU's memory map: {0}")]
    Layout(String),
    /// The layout is invalid.
    #[error("invalid RAM layout")]
    BadLayout(#[from] LayoutError),
    /// QEMU's pid is unknown (QMP over something other than a UNIX socket).
    #[error("cannot tell QEMU's pid from its QMP socket")]
    NoPid,
    /// QEMU does not map its RAM file as expected.
    #[error("QEMU (pid {pid}) does not map {path} in one piece: {what}")]
    Mapping {
        /// QEMU's pid.
        pid: u32,
        /// The RAM file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A file under `/proc`, or the RAM file, could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Mapping the RAM file failed.
    #[error("cannot map the RAM file {path}: {what}")]
    Map {
        /// The file.
        path: PathBuf,
        /// What failed.
        what: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> QemuError + '_ {
    move |source| QemuError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// QEMU's guest RAM, as found over QMP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuRam {
    /// QEMU's pid.
    pub pid: u32,
    /// The memory backend's QOM path (`/objects/ram`).
    pub backend: String,
    /// Its file.
    pub mem_path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Guest-physical ranges and their offsets in the file.
    pub layout: RamLayout,
}

/// QEMU's run state (`query-status`).
pub fn status(qmp: &mut Qmp) -> Result<String, QemuError> {
    let status = qmp.execute("query-status", None)?;
    Ok(status["status"].as_str().unwrap_or("unknown").to_string())
}

/// Fails unless QEMU's run state is `expected`.
pub fn expect_status(qmp: &mut Qmp, expected: &'static str) -> Result<(), QemuError> {
    let found = status(qmp)?;
    if found != expected {
        return Err(QemuError::State { found, expected });
    }
    Ok(())
}

/// Finds the guest RAM of the QEMU behind `qmp`.
pub fn discover(qmp: &mut Qmp) -> Result<QemuRam, QemuError> {
    let pid = qmp.peer_pid().ok_or(QemuError::NoPid)?;
    let backend = qom_get(qmp, "/machine", "memory-backend")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    let not_a_file = || QemuError::NotAFile {
        backend: backend.clone(),
    };
    if backend.is_empty() {
        return Err(not_a_file());
    }
    let mem_path = qom_get(qmp, &backend, "mem-path").map_err(|_| not_a_file())?;
    let share = qom_get(qmp, &backend, "share")?;
    let size = qom_get(qmp, &backend, "size")?.as_u64().unwrap_or(0);
    let (Some(mem_path), Some(true)) = (mem_path.as_str(), share.as_bool()) else {
        return Err(not_a_file());
    };
    let name = backend.rsplit('/').next().unwrap_or_default();
    let mtree = qmp.hmp("info mtree -f")?;
    let layout = layout_from_mtree(&mtree, name, size)?;
    Ok(QemuRam {
        pid,
        backend,
        mem_path: PathBuf::from(mem_path),
        size,
        layout,
    })
}

fn qom_get(qmp: &mut Qmp, path: &str, property: &str) -> Result<serde_json::Value, QemuError> {
    Ok(qmp.execute(
        "qom-get",
        Some(json!({ "path": path, "property": property })),
    )?)
}

/// One piece of a RAM block in the flat view: guest range and file offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    gpa: u64,
    end: u64,
    offset: u64,
}

/// The RAM layout from `info mtree -f`: the pieces of the region `name` in
/// the flat view of the `memory` address space, grouped into ranges (a
/// piece continues a range when guest address minus file offset is the
/// same, so ROM and I/O windows in between are part of the range); the
/// ranges must cover the file `[0, size)` back to back.
pub fn layout_from_mtree(text: &str, name: &str, size: u64) -> Result<RamLayout, QemuError> {
    let mut pieces: Vec<Piece> = memory_flat_view(text)
        .filter_map(|line| parse_piece(line, name))
        .collect();
    if pieces.is_empty() {
        return Err(QemuError::Layout(format!(
            "no RAM region named {name} in the flat view"
        )));
    }
    pieces.sort_by_key(|p| p.offset);
    let mut ranges: Vec<Piece> = Vec::new();
    for p in pieces {
        match ranges.last_mut() {
            Some(r) if r.gpa.wrapping_sub(r.offset) == p.gpa.wrapping_sub(p.offset) => {
                r.end = r.end.max(p.end);
            }
            _ => ranges.push(p),
        }
    }
    let mut next = 0;
    let mut out = Vec::new();
    for r in &ranges {
        let len = r.end - r.gpa;
        if r.offset != next {
            return Err(QemuError::Layout(format!(
                "file bytes {next:#x}..{:#x} are not mapped anywhere",
                r.offset
            )));
        }
        next = r.offset + len;
        out.push(RamRange {
            gpa: GuestAddress(r.gpa),
            pages: len / PAGE_SIZE as u64,
            file_offset: r.offset,
        });
    }
    if next != size {
        return Err(QemuError::Layout(format!(
            "the flat view maps {next:#x} of {size:#x} bytes"
        )));
    }
    out.sort_by_key(|r| r.gpa);
    Ok(RamLayout::new(out)?)
}

/// The lines of the first flat view that serves the `memory` address space.
fn memory_flat_view(text: &str) -> impl Iterator<Item = &str> {
    let mut views = text.split("FlatView #").skip(1);
    let view = views
        .find(|v| {
            v.lines()
                .any(|l| l.trim_start().starts_with("AS \"memory\""))
        })
        .unwrap_or("");
    view.lines()
}

/// `  0000000000100000-00000000bfffffff (prio 0, ram): NAME @0000000000100000`
fn parse_piece(line: &str, name: &str) -> Option<Piece> {
    let (span, rest) = line.trim().split_once(' ')?;
    let (start, last) = span.split_once('-')?;
    let (attrs, region) = rest.split_once("): ")?;
    if !attrs.ends_with(", ram") {
        return None;
    }
    let mut words = region.split_whitespace();
    if words.next()? != name {
        return None;
    }
    let offset = match words.next() {
        Some(at) => u64::from_str_radix(at.strip_prefix('@')?, 16).ok()?,
        None => 0,
    };
    let gpa = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(last, 16).ok()?.checked_add(1)?;
    (gpa % PAGE_SIZE as u64 == 0 && end % PAGE_SIZE as u64 == 0 && end > gpa).then_some(Piece {
        gpa,
        end,
        offset,
    })
}

/// Where process `pid` maps the RAM file `path` (`size` bytes) in one
/// piece: the address of file offset 0.
pub fn host_address(pid: u32, path: &Path, size: u64) -> Result<u64, QemuError> {
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = std::fs::read_to_string(&maps_path).map_err(io_error(&maps_path))?;
    let wanted = path.to_string_lossy();
    let mapping = |what: String| QemuError::Mapping {
        pid,
        path: path.to_path_buf(),
        what,
    };
    let mut base = None;
    let mut covered = 0u64;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(span), Some(_), Some(off), Some(_), Some(_)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let file: Vec<&str> = f.collect();
        if file.join(" ").trim_end_matches(" (deleted)") != wanted {
            continue;
        }
        let parse = |s: &str| u64::from_str_radix(s, 16).ok();
        let (Some((a, b)), Some(off)) = (
            span.split_once('-')
                .and_then(|(a, b)| Some((parse(a)?, parse(b)?))),
            parse(off),
        ) else {
            continue;
        };
        let this = a.wrapping_sub(off);
        if *base.get_or_insert(this) != this {
            return Err(mapping("mapped more than once".into()));
        }
        covered += b - a;
    }
    let base = base.ok_or_else(|| mapping("not mapped".into()))?;
    if covered < size {
        return Err(mapping(format!("{covered:#x} of {size:#x} bytes mapped")));
    }
    Ok(base)
}

/// The value of `name` in process `pid`'s environment.
pub fn environment_of(pid: u32, name: &str) -> Result<Option<String>, QemuError> {
    let path = PathBuf::from(format!("/proc/{pid}/environ"));
    let env = std::fs::read(&path).map_err(io_error(&path))?;
    let prefix = format!("{name}=");
    Ok(env
        .split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&prefix).map(str::to_string)))
}

/// Maps the RAM file read-only and shared, one region per range of
/// `layout`, for the engine to read.
pub fn map_ram(path: &Path, layout: &RamLayout) -> Result<GuestMemoryMmap, QemuError> {
    let file = File::open(path).map_err(io_error(path))?;
    let map_error = |what: String| QemuError::Map {
        path: path.to_path_buf(),
        what,
    };
    let mut regions = Vec::new();
    for range in layout.ranges() {
        let len = usize::try_from(range.pages * PAGE_SIZE as u64)
            .map_err(|_| map_error("range too large".into()))?;
        let fd = file.try_clone().map_err(io_error(path))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, range.file_offset))
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_error(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, range.gpa)
            .ok_or_else(|| map_error("range ends beyond 2^64".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `info mtree -f` of QEMU 11.1 (pc, 4 GiB, backend `fhram`), cut.
    const MTREE: &str = "FlatView #0
 AS \"memory\", root: system
 AS \"cpu-memory-0\", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): fhram
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-00000000bfffffff (prio 0, ram): fhram @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): fhram @00000000c0000000

FlatView #1
 AS \"I/O\", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
";

    #[test]
    fn the_pc_layout_comes_from_the_flat_view() {
        let layout = layout_from_mtree(MTREE, "fhram", 4 << 30).unwrap();
        let r = layout.ranges();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa.0, r[0].pages, r[0].file_offset), (0, 0xc0000, 0));
        assert_eq!(
            (r[1].gpa.0, r[1].pages, r[1].file_offset),
            (1 << 32, 0x40000, 0xc000_0000)
        );
    }

    #[test]
    fn a_layout_that_does_not_cover_the_file_is_refused() {
        assert!(matches!(
            layout_from_mtree(MTREE, "fhram", 8 << 30),
            Err(QemuError::Layout(_))
        ));
        assert!(matches!(
            layout_from_mtree(MTREE, "other", 4 << 30),
            Err(QemuError::Layout(_))
        ));
        let cut = MTREE.replace(
            "  0000000000100000-00000000bfffffff (prio 0, ram): fhram @0000000000100000\n",
            "",
        );
        assert!(layout_from_mtree(&cut, "fhram", 4 << 30).is_err());
    }

    #[test]
    fn this_process_maps_a_file_in_one_piece() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        File::create(&path).unwrap().set_len(8 * 4096).unwrap();
        let layout = RamLayout::new(vec![RamRange {
            gpa: GuestAddress(0),
            pages: 8,
            file_offset: 0,
        }])
        .unwrap();
        let mem = map_ram(&path, &layout).unwrap();
        let base = host_address(std::process::id(), &path, 8 * 4096).unwrap();
        let here = vm_memory::GuestMemoryBackend::get_host_address(&mem, GuestAddress(0)).unwrap();
        assert_eq!(base, here as u64);
        assert!(host_address(std::process::id(), &path, 16 * 4096).is_err());
    }
}
