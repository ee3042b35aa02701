//! Our migrator against QEMU's: `own-migrate` (CI), `own-pingpong` (CI)
//! and `bench-own-migrate` (benchmark).
//!
//! "Ours" is `freehint-migrate send|receive` (crate `device/migrator`):
//! both QEMUs keep guest RAM in a `/dev/shm` file
//! (`memory-backend-file,share=on`), the source runs with the preload
//! library (`libfreehint_uffd_preload.so`, `FREEHINT_UFFD_SOCKET`), the
//! destination with `-incoming defer`; each QEMU has a second QMP socket
//! for the program. "QEMU's" is QEMU's own pre-copy between two ordinary
//! QEMUs (anonymous RAM, `-incoming tcp:…`), as in `qemu-migrate`.
//!
//! Every cell is the `qemu-migrate` guest (the project's kernel, `fhwork`,
//! no balloon driver: no hints, `init_on_alloc=1`). The destination
//! verifies every live page the moment it resumes: the receiver holds the
//! destination paused (`--hold-before-resume`), the harness types `verify`
//! on its console, then lets it resume. Downtime for ours is QEMU's `STOP`
//! on the source to `RESUME` on the destination; for QEMU's it is QEMU's
//! own `downtime` (stop to completion on the source). Bytes for ours are
//! our stream plus QEMU's device-state stream.
//!
//! By concern: `tools` (building the program, the QEMUs with shared RAM),
//! `program` (driving `freehint-migrate` for one hop), `cell` (one
//! cell end to end and its result line), `table` (the benchmark matrix),
//! `pingpong` (`own-pingpong` and the abort checks).

mod cell;
mod pingpong;
mod program;
mod table;
mod tools;

use serde_json::{Map, Value};

use crate::runner::{Ctx, HarnessError};

pub use cell::{hop_json, run_cell, HopRecord, Migrator, Run, RunOpts};
pub(crate) use pingpong::abort_check;
pub use pingpong::{bench_pingpong, run_pingpong};
pub use program::Hop;
pub(crate) use table::env_list;
pub use table::{
    bench, each_matrix_cell, matrix, CellRow, Figures, HopSeries, Row, Summary, Table, WORKLOADS,
};
pub(crate) use tools::OwnVm;
pub use tools::{build_tools, sweep_stale_ram_files, Tools};

/// The CI matrix: 4 GiB, {idle, dirty-keep, dirty-free} × {ours, QEMU's}.
pub fn run(ctx: &mut Ctx) -> Result<Map<String, Value>, HarnessError> {
    let t = matrix(ctx, &[4096], &WORKLOADS, 1)?;
    Ok(crate::runner::fields(&t.summary(ctx, 4096)))
}
