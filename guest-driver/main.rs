// SPDX-License-Identifier: GPL-2.0

//! freehint: free page hinting for live migration (guest side).
//!
//! A virtio-balloon driver (it replaces Linux's `virtio_balloon`) that
//! answers free page hint requests without allocating. Its core builds a
//! free-page bitmap on demand: it walks the buddy free lists of every
//! populated zone under `zone->lock` (interrupts off for a bounded number of
//! entries at a time) and the per-CPU page lists, and sets one bit per free
//! page, with holes of the physical address space (the x86 PCI hole) folded
//! out by a layout table shared with the host (`freehint-protocol`). The
//! driver sends the result as standard hints (runs of free pages) or, with
//! the freehint extension negotiated, as the bitmap itself. A second builder,
//! owned by the module, sits behind `/sys/kernel/debug/freehint/` for
//! diagnostics and tests (see `debugfs.rs` and docs/guest-driver.md).
//!
//! Structure: `zone.rs` is the only module with raw access to zones, free
//! lists and pages; `walk.rs` is the walk; `builder.rs` owns layout, bitmap
//! and statistics; `clock.rs` times the walk; `debugfs.rs` is the diagnostic
//! interface; `virtio.rs` and `virtio/` are a small virtio abstraction
//! (with `virtio_shim.c`); `mm.rs` holds balloon pages and memory figures;
//! `balloon.rs` is the driver logic and `hint.rs` its hint rounds. `layout`,
//! `bitmap`, `balloon` (as `abi`) and `bitmap_hint` are included unchanged
//! from the protocol crate.

use kernel::prelude::*;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "protocol/bitmap.rs"]
mod bitmap;
#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "protocol/layout.rs"]
mod layout;

mod builder;
mod clock;
mod debugfs;
mod walk;
mod zone;

// The virtio-balloon driver: `balloon.rs` (logic), `hint.rs` (hint rounds),
// `virtio.rs` (the virtio core), `mm.rs` (balloon pages); `abi` is the protocol crate's virtio-balloon
// ABI, `bitmap_hint` its bitmap hint messages.
#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "protocol/balloon.rs"]
mod abi;
mod balloon;
#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "protocol/bitmap_hint.rs"]
mod bitmap_hint;
mod hint;
mod mm;
mod virtio;

// 6.12's `module!` takes `author`, 7.3's only `authors` (the
// `freehint_kernel_7_3` cfg comes from Kbuild, keyed on the kernel version).
#[cfg(not(freehint_kernel_7_3))]
module! {
    type: FreeHint,
    name: "freehint",
    author: "freehint developers",
    description: "Free page hinting: free-page bitmap builder (virtio-balloon extension)",
    license: "GPL",
}

#[cfg(freehint_kernel_7_3)]
module! {
    type: FreeHint,
    name: "freehint",
    authors: ["freehint developers"],
    description: "Free page hinting: free-page bitmap builder (virtio-balloon extension)",
    license: "GPL",
}

/// Module state. Fields drop in declaration order: the virtio driver first
/// (unregistering removes every bound device), then the debugfs directory
/// and the builder its files use (the directory goes first; see
/// `debugfs.rs`).
struct FreeHint {
    /// The virtio-balloon driver; unregistered first (removes bound devices).
    _virtio: Option<virtio::Registration<balloon::Balloon>>,
    diag: debugfs::Diag,
}

impl kernel::Module for FreeHint {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        clock::init();
        let diag = debugfs::Diag::new(builder::Builder::new()?)?;
        {
            let mut b = diag.builder().lock();
            b.build();
            let s = b.summary();
            pr_info!(
                "freehint: loaded: {} RAM pages in the layout, {} free, walk {} us; see /sys/kernel/debug/freehint\n",
                s.total_bits,
                s.free_pages,
                s.walk_ns / 1000
            );
        }
        // Harmless without a balloon device; a failure only disables it.
        let virtio = virtio::Registration::new()
            .inspect_err(|e| pr_warn!("virtio driver not registered ({:?})\n", e))
            .ok();
        Ok(FreeHint {
            _virtio: virtio,
            diag,
        })
    }
}

impl Drop for FreeHint {
    fn drop(&mut self) {
        pr_info!(
            "freehint: unloaded after {} builds\n",
            self.diag.builder().lock().builds()
        );
    }
}
