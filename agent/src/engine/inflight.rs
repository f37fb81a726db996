//! Requests in flight over the whole agent, and whether they have been arriving one at a time:
//! the "alone" signal that lets a short run stay on the caller's thread ([`super::worker::place`])
//! and a lone audit record commit there.

use std::sync::Arc;

/// Requests being answered now, and a moving average of that count as requests arrive.
#[derive(Default)]
pub struct InFlightCount {
    now: std::sync::atomic::AtomicUsize,
    /// In sixteenths of a request; weight 1/8 for the newest arrival.
    average_16: std::sync::atomic::AtomicUsize,
}

/// Counts a request as being answered until dropped.
pub struct InFlight(Arc<InFlightCount>);

impl InFlightCount {
    /// Requests being answered now.
    pub fn now(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl InFlight {
    /// Enters a request; tells whether requests have been arriving one at a time: this one is
    /// the only one being answered, and so were the ones before it, on average. (A lull
    /// between two waves of concurrent requests does not count.)
    pub fn enter(count: &Arc<InFlightCount>) -> (InFlight, bool) {
        use std::sync::atomic::Ordering::{Relaxed, SeqCst};
        let now = count.now.fetch_add(1, SeqCst) + 1;
        let old = count.average_16.load(Relaxed);
        let average = old - old / 8 + now.min(1 << 20) * 2;
        count.average_16.store(average, Relaxed);
        (InFlight(count.clone()), now == 1 && average <= 24)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_as_alone_only_when_they_have_been_arriving_one_at_a_time() {
        let count = Arc::new(InFlightCount::default());
        for _ in 0..20 {
            let (_one, alone) = InFlight::enter(&count);
            assert!(alone, "one request at a time");
        }
        // A wave of eight at once: its first finds nothing in flight (nothing says a wave is
        // coming), the others are not alone.
        let wave: Vec<_> = (0..8).map(|_| InFlight::enter(&count)).collect();
        assert!(wave[0].1 && wave[1..].iter().all(|(_, alone)| !alone));
        assert_eq!(count.now.load(std::sync::atomic::Ordering::SeqCst), 8);
        drop(wave);
        assert_eq!(count.now.load(std::sync::atomic::Ordering::SeqCst), 0, "every guard gave its place back");
        // The lull after the wave: the next arrival finds nothing in flight, but requests have
        // been arriving together; only after a run of single arrivals is one alone again.
        let (_first, alone) = InFlight::enter(&count);
        assert!(!alone, "right after a wave");
        drop(_first);
        let settled = (0..50).position(|_| InFlight::enter(&count).1).expect("alone again after single arrivals");
        assert!(settled > 0, "not at once");
    }
}
