//! CPU slots: how many inference runs may execute at once across every model of the process
//! (`[engine] threads`, the core count by default). Each run holds a slot, so per-model worker
//! threads (`instances`) can be generous without oversubscribing the cores: tract runs each plan
//! on the calling thread, one core per run.

use std::sync::{Condvar, Mutex, OnceLock};

struct Counts {
    in_use: usize,
    total: usize,
    /// Threads blocked in [`acquire`]: a slot given back wakes one only when there is one (a
    /// condition variable's notify is a system call even with nobody waiting).
    waiting: usize,
}

pub struct Slots {
    counts: Mutex<Counts>,
    freed: Condvar,
}

/// A held slot, given back on drop.
pub struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let waiting = match self.0.counts.lock() {
            Ok(mut c) => {
                c.in_use = c.in_use.saturating_sub(1);
                c.waiting > 0
            }
            Err(_) => true,
        };
        if waiting {
            self.0.freed.notify_one();
        }
    }
}

/// The core count as the OS reports it (cgroup quotas included), at least 1.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Slots {
    fn new(total: usize) -> Self {
        Slots { counts: Mutex::new(Counts { in_use: 0, total: total.max(1), waiting: 0 }), freed: Condvar::new() }
    }

    fn acquire(&self) -> Option<Slot<'_>> {
        let mut c = self.counts.lock().ok()?;
        while c.in_use >= c.total {
            c.waiting += 1;
            c = self.freed.wait(c).ok()?;
            c.waiting -= 1;
        }
        c.in_use += 1;
        Some(Slot(self))
    }

    fn try_acquire(&self) -> Option<Slot<'_>> {
        let mut c = self.counts.lock().ok()?;
        if c.in_use >= c.total {
            return None;
        }
        c.in_use += 1;
        Some(Slot(self))
    }
}

fn global() -> &'static Slots {
    static SLOTS: OnceLock<Slots> = OnceLock::new();
    SLOTS.get_or_init(|| Slots::new(cores()))
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

/// Threads blocked waiting for a slot now.
pub fn waiting() -> usize {
    global().counts.lock().map_or(0, |c| c.waiting)
}

/// Waits for a free slot. A poisoned lock (a panic elsewhere while counting) lets the run go
/// ahead rather than stall serving.
pub fn acquire() -> Option<Slot<'static>> {
    global().acquire()
}

/// Takes a free slot without waiting; `None` when every slot is in use.
pub fn try_acquire() -> Option<Slot<'static>> {
    global().try_acquire()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot given back goes to a thread blocked waiting for one; with a slot free, nobody
    /// waits.
    #[test]
    fn a_returned_slot_wakes_the_thread_waiting_for_it() {
        let slots = Slots::new(1);
        let held = slots.acquire().expect("free slot");
        assert!(slots.try_acquire().is_none(), "one slot, in use");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| slots.acquire().map(drop).is_some());
            // Bounded: the waiter registers within moments of starting.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while slots.counts.lock().map_or(0, |c| c.waiting) == 0 && std::time::Instant::now() < until {
                std::thread::yield_now();
            }
            assert_eq!(slots.counts.lock().map(|c| c.waiting).ok(), Some(1), "the waiter is blocked");
            drop(held);
            assert!(waiter.join().expect("waiter"), "woken with the slot");
        });
        let c = slots.counts.lock().expect("lock");
        assert_eq!((c.in_use, c.waiting), (0, 0));
    }
}
