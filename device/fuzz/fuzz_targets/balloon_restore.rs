// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Restoring an untrusted saved device state, then serving the guest with
//! it (see `freehint_fuzz_common::restore`).
#![no_main]

use freehint_fuzz_common::restore::{decode, run_restore};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    match decode(data) {
        Some(input) => {
            run_restore(&input);
            Corpus::Keep
        }
        None => Corpus::Reject,
    }
});
