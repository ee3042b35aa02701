//! What a migration stream shows of the balloon: the page-poison
//! subsection and the free page hinting rounds.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::checks::{err, Check, Checked};
use super::guest::Guest;
use crate::migrate::{free_page_vq, migrate_to};
use crate::runner::fields;

/// Name of the migration stream subsection QEMU writes for the balloon
/// only when PAGE_POISON is negotiated; it carries `poison_val` as QEMU
/// holds it (`hw/virtio/virtio-balloon.c`, `vmstate_virtio_balloon_page_poison`).
pub const POISON_SUBSECTION: &[u8] = b"virtio-balloon-device/page-poison";
/// `QEMU_VM_SUBSECTION` (`migration/savevm.c`).
pub(crate) const QEMU_VM_SUBSECTION: u8 = 0x05;

/// Finds the page-poison subsection in a migration stream: `0x05`, name
/// length, name, be32 version id, then the be32 `poison_val`. Returns
/// `poison_val` of the last occurrence, `None` when absent.
pub fn poison_val_in_stream(stream: &[u8]) -> Option<u32> {
    let n = POISON_SUBSECTION.len();
    let mut found = None;
    let mut i = 2;
    while i + n + 8 <= stream.len() {
        if &stream[i..i + n] == POISON_SUBSECTION
            && stream[i - 1] as usize == n
            && stream[i - 2] == QEMU_VM_SUBSECTION
        {
            let v = &stream[i + n + 4..i + n + 8];
            found = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            i += n;
        } else {
            i += 1;
        }
    }
    found
}

/// The driver's hint rounds so far ([`hint_rounds`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct HintRounds {
    /// How many rounds.
    pub(crate) count: u64,
    /// The `end=` word of each.
    pub(crate) ends: Vec<String>,
    /// The driver's round log.
    pub(crate) log: String,
}

/// The driver's hint rounds so far.
pub(crate) fn hint_rounds(g: &mut Guest) -> Result<HintRounds, String> {
    let h = g.cmd("hintlog", "hintlog", 60).map_err(err)?;
    let ends = h
        .get("ends")
        .and_then(Value::as_str)
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let log = h
        .get("log")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok(HintRounds {
        count: h.get("rounds").and_then(Value::as_u64).unwrap_or(0),
        ends,
        log,
    })
}

/// Migrates to a file (`exec:cat > FILE`): QEMU asks for hints (a new
/// round after every dirty bitmap sync; STOP when it no longer wants them)
/// and writes the device state; reads `poison_val` out of the stream, the
/// free page virtqueue's movement and the driver's round lines; resumes the
/// guest. ok: hints were consumed (`used-idx` moved) and at least one round
/// of this migration ended `complete` (or `done`: QEMU finished first); a
/// round may also end `stop` (QEMU stopped asking before it was sent).
pub(crate) fn check_stream(g: &mut Guest, file: &std::path::Path) -> Check {
    let _ = std::fs::remove_file(file);
    let r0 = hint_rounds(g)?.count;
    let vq0 = free_page_vq(&mut g.vm).map_err(err)?;
    let uri = format!("exec:cat > '{}'", file.display());
    let stats = migrate_to(&mut g.vm, &uri, g.unit * 300).map_err(err)?;
    let vq1 = free_page_vq(&mut g.vm).map_err(err)?;
    g.vm.qmp().execute("cont", None).map_err(err)?;
    let stream = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()));
    let _ = std::fs::remove_file(file);
    let stream = stream?;
    let poison_val = poison_val_in_stream(&stream);
    let stream_bytes = stream.len();
    drop(stream);
    let used = |v: &Value| v.get("used_idx").and_then(Value::as_u64);
    let delta = match (used(&vq0), used(&vq1)) {
        (Some(a), Some(b)) => Some(b.wrapping_sub(a) & 0xffff),
        _ => None,
    };
    // The last round logs once the guest runs again: poll (bounded).
    let start = Instant::now();
    let (ends, log) = loop {
        let HintRounds { ends, log, .. } = hint_rounds(g)?;
        let new: Vec<String> = ends.into_iter().skip(r0 as usize).collect();
        let done = new.iter().any(|e| e == "complete" || e == "done");
        if done || start.elapsed() >= g.unit * 30 {
            break (new, log);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let completed = ends.iter().any(|e| e == "complete" || e == "done");
    let ok = delta.is_some_and(|d| d > 0) && completed;
    let m = StreamRecord {
        poison_subsection: poison_val.is_some(),
        qemu_poison_val: poison_val,
        stream_bytes,
        free_page_vq_used_delta: delta,
        round_ends: ends,
        last_round_log: log,
        migration_mb: stats.transferred / 1_000_000,
        migration_ms: stats.total_ms,
    };
    Ok(Checked {
        ok,
        fields: fields(&m),
    })
}

/// The fields of a migration-stream check's line.
#[derive(Serialize)]
struct StreamRecord {
    poison_subsection: bool,
    qemu_poison_val: Option<u32>,
    stream_bytes: usize,
    free_page_vq_used_delta: Option<u64>,
    round_ends: Vec<String>,
    last_round_log: String,
    migration_mb: u64,
    migration_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_val_is_read_from_the_subsection() {
        let mut st = vec![0u8, 0x05, 0x05];
        let mut sub = vec![QEMU_VM_SUBSECTION, POISON_SUBSECTION.len() as u8];
        sub.extend_from_slice(POISON_SUBSECTION);
        sub.extend_from_slice(&1u32.to_be_bytes());
        sub.extend_from_slice(&0xaaaa_aaaau32.to_be_bytes());
        st.extend_from_slice(&sub);
        st.extend_from_slice(&[0x04, 0, 0, 0]);
        assert_eq!(poison_val_in_stream(&st), Some(0xaaaa_aaaa));
        // The name alone (e.g. in the JSON description at the end) is not it.
        let name_only = [&[0u8, 7][..], POISON_SUBSECTION, &[0; 8]].concat();
        assert_eq!(poison_val_in_stream(&name_only), None);
        // Cut short: no read past the end.
        assert_eq!(poison_val_in_stream(&sub[..sub.len() - 1]), None);
        assert_eq!(poison_val_in_stream(&[]), None);
    }
}
