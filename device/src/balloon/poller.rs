// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! [`StatsPoller`]: the thread that asks the guest for statistics every
//! `stats_polling_interval_s`. At most one runs per device: starting a new
//! one, or [`StatsPoller::stop`] (device reset), wakes the old one and joins
//! it, so reset/activate cycles never pile up threads.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;

/// The stop flag a poller thread sleeps on.
#[derive(Debug, Default)]
struct StopFlag {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopFlag {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps for `every` unless stopped first; returns whether it was stopped.
    fn sleep(&self, every: Duration) -> bool {
        let deadline = Instant::now() + every;
        let mut stopped = self.lock();
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .wake
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn stop(&self) {
        *self.lock() = true;
        self.wake.notify_all();
    }
}

#[derive(Debug)]
struct Running {
    flag: Arc<StopFlag>,
    thread: JoinHandle<()>,
}

/// The (at most one) statistics polling thread of a device.
#[derive(Debug, Default)]
pub(super) struct StatsPoller {
    running: Mutex<Option<Running>>,
}

impl StatsPoller {
    /// Stops a running poller, then starts one that calls `tick` every
    /// `every` until `tick` returns false or the poller is stopped.
    pub(super) fn start(&self, every: Duration, mut tick: impl FnMut() -> bool + Send + 'static) {
        self.stop();
        let flag = Arc::new(StopFlag::default());
        let thread_flag = Arc::clone(&flag);
        let spawned = std::thread::Builder::new()
            .name("balloon-stats".into())
            .spawn(move || while !thread_flag.sleep(every) && tick() {});
        match spawned {
            Ok(thread) => *self.lock() = Some(Running { flag, thread }),
            Err(e) => warn!("cannot start the stats polling thread: {e}"),
        }
    }

    /// Wakes the poller and waits for its thread to end. Call it without
    /// holding the device state lock (a tick takes it).
    pub(super) fn stop(&self) {
        let running = self.lock().take();
        if let Some(r) = running {
            r.flag.stop();
            if r.thread.join().is_err() {
                warn!("the stats polling thread panicked");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn stop_is_prompt_and_restarts_leave_one_thread() {
        let p = StatsPoller::default();
        let ticks = Arc::new(AtomicU32::new(0));
        for _ in 0..50 {
            let t = Arc::clone(&ticks);
            p.start(Duration::from_secs(3600), move || {
                t.fetch_add(1, Ordering::Relaxed);
                true
            });
        }
        let t0 = Instant::now();
        p.stop();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "stop must not wait out the interval"
        );
        assert_eq!(ticks.load(Ordering::Relaxed), 0);
        assert!(p.lock().is_none());
    }

    #[test]
    fn ticks_until_told_to_end() {
        let p = StatsPoller::default();
        let ticks = Arc::new(AtomicU32::new(0));
        let t = Arc::clone(&ticks);
        p.start(Duration::from_millis(1), move || {
            t.fetch_add(1, Ordering::Relaxed) < 2
        });
        let t0 = Instant::now();
        while ticks.load(Ordering::Relaxed) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(1));
        }
        p.stop();
        assert_eq!(ticks.load(Ordering::Relaxed), 3);
    }
}
