//! Shared by the protocol's test files (each uses what it needs).
#![allow(dead_code)]

use freehint_protocol::layout::{Bit, Layout, Pfn};

/// The layout's mapping in raw numbers, for the tests' naive models.
pub trait Raw {
    fn p2b(&self, pfn: u64) -> Option<u64>;
    fn b2p(&self, bit: u64) -> Option<u64>;
    fn bit_runs(&self, pfn: u64, nr: u64, f: impl FnMut(u64, u64));
    fn pfn_runs(&self, bit: u64, nr: u64, f: impl FnMut(u64, u64));
}

impl Raw for Layout {
    fn p2b(&self, pfn: u64) -> Option<u64> {
        self.pfn_to_bit(Pfn(pfn)).map(Bit::raw)
    }
    fn b2p(&self, bit: u64) -> Option<u64> {
        self.bit_to_pfn(Bit(bit)).map(Pfn::raw)
    }
    fn bit_runs(&self, pfn: u64, nr: u64, mut f: impl FnMut(u64, u64)) {
        self.for_each_bit_run(Pfn(pfn), nr, |b, n| f(b.raw(), n));
    }
    fn pfn_runs(&self, bit: u64, nr: u64, mut f: impl FnMut(u64, u64)) {
        self.for_each_pfn_run(Bit(bit), nr, |p, n| f(p.raw(), n));
    }
}
