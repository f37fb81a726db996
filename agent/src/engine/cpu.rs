//! CPU slots: how many inference runs may execute at once across every model of the process
//! (`[engine] threads`, the core count by default). Each run holds a slot, so per-model worker
//! threads (`instances`) can be generous without oversubscribing the cores: tract runs each plan
//! on the calling thread, one core per run.

use std::sync::{Condvar, Mutex, OnceLock};

struct Counts {
    in_use: usize,
    total: usize,
}

pub struct Slots {
    counts: Mutex<Counts>,
    freed: Condvar,
}

/// A held slot, given back on drop.
pub struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.counts.lock() {
            c.in_use = c.in_use.saturating_sub(1);
        }
        self.0.freed.notify_one();
    }
}

/// The core count as the OS reports it (cgroup quotas included), at least 1.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn global() -> &'static Slots {
    static SLOTS: OnceLock<Slots> = OnceLock::new();
    SLOTS.get_or_init(|| Slots { counts: Mutex::new(Counts { in_use: 0, total: cores() }), freed: Condvar::new() })
}

/// Sets how many runs may execute at once (at start and on reload); runs in progress keep
/// their slots, new ones wait until fewer than `n` run.
pub fn set_threads(n: usize) {
    let slots = global();
    if let Ok(mut c) = slots.counts.lock() {
        c.total = n.max(1);
    }
    slots.freed.notify_all();
}

/// The configured number of slots.
pub fn threads() -> usize {
    global().counts.lock().map_or(1, |c| c.total)
}

/// Waits for a free slot. A poisoned lock (a panic elsewhere while counting) lets the run go
/// ahead rather than stall serving.
pub fn acquire() -> Option<Slot<'static>> {
    let slots = global();
    let mut c = slots.counts.lock().ok()?;
    while c.in_use >= c.total {
        c = slots.freed.wait(c).ok()?;
    }
    c.in_use += 1;
    Some(Slot(slots))
}

/// Takes a free slot without waiting; `None` when every slot is in use.
pub fn try_acquire() -> Option<Slot<'static>> {
    let slots = global();
    let mut c = slots.counts.lock().ok()?;
    if c.in_use >= c.total {
        return None;
    }
    c.in_use += 1;
    Some(Slot(slots))
}
