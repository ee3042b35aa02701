// SPDX-License-Identifier: GPL-2.0

//! A nanosecond clock for the walk statistics, read with `rdtsc`.
//!
//! `ktime_get_ns()` is only as fine as the kernel's clocksource. Under QEMU
//! TCG without ACPI the kernel cannot calibrate the TSC (no PIT, HPET or PM
//! timer reference), marks it unstable and falls back to jiffies: 4 ms steps
//! at HZ=250, useless for lock holds of microseconds. The TSC itself still
//! runs at a constant rate (TCG derives it from the host's), so we read it
//! directly and convert with the kernel's `tsc_khz` when the kernel knows it,
//! or with a rate calibrated once at module load against jiffies (a 200 ms
//! sleep between two jiffy edges: error well under 1 %).

use core::num::NonZeroU64;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::ffi::{c_uint, c_ulong};

extern "C" {
    fn freehint_rdtsc() -> u64;
    fn freehint_tsc_khz() -> c_uint;
    fn freehint_jiffies() -> c_ulong;
    fn freehint_hz() -> c_uint;
    #[cfg(not(freehint_kernel_7_3))]
    fn freehint_sleep_ms(ms: c_uint);
}

/// Sleeps `ms` milliseconds; process context only. 7.3 has
/// `kernel::time::delay::fsleep` (`msleep` for sleeps this long); 6.12 has
/// no sleep in its `kernel` crate, so a C shim calls `msleep`.
pub(crate) fn sleep_ms(ms: u32) {
    #[cfg(freehint_kernel_7_3)]
    kernel::time::delay::fsleep(kernel::time::Delta::from_millis(i64::from(ms)));
    #[cfg(not(freehint_kernel_7_3))]
    // SAFETY: `msleep` may sleep; callers are in process context.
    unsafe {
        freehint_sleep_ms(ms)
    };
}

/// TSC rate in kHz (0 until [`init`] ran).
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// ns per tick as a 32.32 fixed-point number: `(10^6 << 32) / tsc_khz`
/// (no 128-bit division in the kernel; the multiply is native).
static NS_MULT: AtomicU64 = AtomicU64::new(0);

fn set_khz(khz: u64) {
    // A `NonZeroU64` divisor: no division-by-zero panic path in the code
    // (objtool of 7.3 does not know `panic_const_div_by_zero` as noreturn).
    let khz = NonZeroU64::new(khz).unwrap_or(NonZeroU64::MIN);
    TSC_KHZ.store(khz.get(), Ordering::Relaxed);
    NS_MULT.store((1_000_000u64 << 32) / khz, Ordering::Relaxed);
}
/// Whether the rate was calibrated here (true) or came from the kernel.
static CALIBRATED: AtomicU64 = AtomicU64::new(0);

fn rdtsc() -> u64 {
    // SAFETY: `rdtsc_ordered` has no preconditions.
    unsafe { freehint_rdtsc() }
}

fn jiffies() -> u64 {
    // SAFETY: reads the `jiffies` counter (READ_ONCE).
    // CAST: `unsigned long` is 64 bits on x86-64.
    unsafe { freehint_jiffies() as u64 }
}

/// Spins until the next jiffy starts; returns (jiffies, tsc) right after it.
fn next_jiffy_edge() -> (u64, u64) {
    let j0 = jiffies();
    loop {
        let j = jiffies();
        if j != j0 {
            return (j, rdtsc());
        }
        core::hint::spin_loop();
    }
}

/// Sets up the clock: the kernel's TSC rate if it has one, else a rate
/// calibrated against jiffies (sleeps about 200 ms). Process context only.
pub(crate) fn init() {
    // SAFETY: reads the exported `tsc_khz` variable.
    let khz = u64::from(unsafe { freehint_tsc_khz() });
    if khz != 0 {
        set_khz(khz);
        return;
    }
    // SAFETY: returns the compile-time HZ.
    let hz = u64::from(unsafe { freehint_hz() });
    let (ja, ta) = next_jiffy_edge();
    // Process context (module init).
    sleep_ms(200);
    let (jb, tb) = next_jiffy_edge();
    let ticks = tb.wrapping_sub(ta);
    let jifs = NonZeroU64::new(jb.wrapping_sub(ja)).unwrap_or(NonZeroU64::MIN);
    // ticks per second = ticks * hz / jifs; in kHz divide by 1000. 200 ms
    // of even a 10 GHz TSC times HZ=1000 is far below 2^64.
    set_khz(ticks.saturating_mul(hz) / jifs / 1000);
    CALIBRATED.store(1, Ordering::Relaxed);
}

/// TSC rate in kHz and whether it was calibrated by this module.
pub(crate) fn tsc_khz() -> (u64, bool) {
    (
        TSC_KHZ.load(Ordering::Relaxed),
        CALIBRATED.load(Ordering::Relaxed) != 0,
    )
}

/// Monotonic time in nanoseconds (TSC based; see the module docs).
pub(crate) fn now_ns() -> u64 {
    let mult = NS_MULT.load(Ordering::Relaxed);
    // ns = ticks * mult >> 32, the product in 128 bits so it cannot overflow.
    let ns = (u128::from(rdtsc()) * u128::from(mult)) >> 32;
    u64::try_from(ns).unwrap_or(u64::MAX)
}
