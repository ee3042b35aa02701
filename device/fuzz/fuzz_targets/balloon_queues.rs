// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! Queue processing of the balloon device: a guest memory image and a
//! session of driver/host operations (see `freehint-fuzz-common`).
#![no_main]

use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    match freehint_fuzz_common::decode(data) {
        Some(input) => {
            freehint_fuzz_common::run(&input);
            Corpus::Keep
        }
        None => Corpus::Reject,
    }
});
