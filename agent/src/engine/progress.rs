//! Runs in progress, process-wide: how long the oldest has been running. The watchdog withholds
//! its ping while one has run longer than the watchdog's timeout (a stuck run).
//!
//! A run takes one of a fixed set of slots holding its start time (two atomic operations on
//! the run path, no lock, no allocation). Runs at once are bounded by the CPU slots, far below
//! the number of slots; a run that finds none free is not tracked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const SLOTS: usize = 256;
/// Start times in nanoseconds since [`epoch`], plus one (0: the slot is free).
static STARTS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64 + 1
}

/// A run in progress; dropping it (however the run ends) frees its slot.
pub struct Running(Option<usize>);

impl Running {
    pub fn start() -> Running {
        let now = now_ns();
        // Start the search at a spot that differs between threads, so concurrent runs rarely
        // contend for one slot.
        let first = (now as usize / 64) % SLOTS;
        for i in 0..SLOTS {
            let slot = (first + i) % SLOTS;
            if STARTS[slot].compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return Running(Some(slot));
            }
        }
        Running(None)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            STARTS[slot].store(0, Ordering::Release);
        }
    }
}

/// How long the oldest run in progress has been running (`None`: none runs).
pub fn oldest() -> Option<Duration> {
    let first = STARTS.iter().map(|s| s.load(Ordering::Acquire)).filter(|&t| t != 0).min()?;
    Some(Duration::from_nanos(now_ns().saturating_sub(first)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_counts_until_it_ends() {
        let r = Running::start();
        assert!(r.0.is_some());
        assert!(oldest().is_some());
        let slot = r.0.unwrap_or_default();
        let ours = STARTS[slot].load(Ordering::Acquire);
        assert_ne!(ours, 0);
        drop(r);
        // Freed (another test's run may have taken the slot since, with its own start time).
        assert_ne!(STARTS[slot].load(Ordering::Acquire), ours, "the slot is freed");
    }
}
