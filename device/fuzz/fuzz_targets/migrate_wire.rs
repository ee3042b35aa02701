// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The migration stream receiver (freehint-migrate) against arbitrary
//! bytes: it must return an error or a report, never panic, and hand its
//! sink only runs that lie inside the announced layout.
#![no_main]

use std::io;

use freehint_migrate::{PagePlace, PageSink, Receiver, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

/// Checks every run it is given and keeps nothing.
struct Check {
    total_pages: u64,
}

impl Check {
    fn run(&self, at: PagePlace, count: u64) {
        assert!(count > 0, "empty run at page {}", at.page);
        let end = at.page.checked_add(count).expect("run end overflows");
        assert!(
            end <= self.total_pages,
            "run {}+{count} beyond {} pages",
            at.page,
            self.total_pages
        );
    }
}

impl PageSink for Check {
    fn write_pages(&mut self, at: PagePlace, data: &[u8]) -> io::Result<()> {
        assert_eq!(data.len() % PAGE_SIZE, 0, "partial page");
        self.run(at, (data.len() / PAGE_SIZE) as u64);
        Ok(())
    }

    fn zero_pages(&mut self, at: PagePlace, count: u64) -> io::Result<()> {
        self.run(at, count);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(receiver) = Receiver::with_max_ram_bytes(data, 1 << 30) else {
        return;
    };
    let mut sink = Check {
        total_pages: receiver.layout().total_pages(),
    };
    let _ = receiver.receive(&mut sink);
});
