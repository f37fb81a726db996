//! Runs in progress, process-wide: how long the oldest has been running. The watchdog withholds
//! its ping while one has run longer than the watchdog's timeout (a stuck run).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::locks::MutexExt;

static NEXT: AtomicU64 = AtomicU64::new(0);
static RUNNING: Mutex<BTreeMap<u64, Instant>> = Mutex::new(BTreeMap::new());

/// A run in progress; dropping it (however the run ends) takes it off the list.
pub struct Running(u64);

impl Running {
    pub fn start() -> Running {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        RUNNING.locked().insert(id, Instant::now());
        Running(id)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.locked().remove(&self.0);
    }
}

/// How long the oldest run in progress has been running (`None`: none runs).
pub fn oldest() -> Option<Duration> {
    RUNNING.locked().values().min().map(Instant::elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_counts_until_it_ends() {
        let r = Running::start();
        assert!(oldest().is_some());
        drop(r);
        // Other tests' runs may be in progress: this one's is gone, nothing more to say.
    }
}
