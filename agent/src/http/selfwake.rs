//! A connection future polled so that the wakes it gives itself during its own poll are
//! answered with another poll right away, instead of through the runtime.
//!
//! A connection that answers a request inline wakes its own task while doing it: hyper's
//! HTTP/1.1 connection through the request body's channel (the dispatcher and the body's reader
//! signal each other inside the one task), and an `h2` connection ([`super::h2conn`]) whenever
//! a stream queues frames, releases window or is dropped finished. The runtime takes a wake of a running task as a yield: it queues the
//! task again and, with more than one worker, rouses an idle worker (a futex call and an
//! eventfd write) to share work that is not there. [`SelfWakes`] notes such a wake instead and
//! polls again at once, a bounded number of times; a future that keeps waking itself past that
//! bound is left to the runtime as it asked. Wakes from elsewhere (the socket's readiness,
//! another thread) reach the task as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// Polls of the inner future one outer poll may make: the first and one repeat, which is
/// what a request answered inline needs (its wakes come before the repeat, which finds the
/// connection waiting on its socket). A future that yields on purpose (hyper's HTTP/1.1
/// dispatcher does, after 16 pipelined requests) is let go after its second yield.
const MAX_PASSES: usize = 2;

/// Not inside a poll of the inner future: a wake goes to the task.
const IDLE: u8 = 0;
/// Inside a poll: a wake is noted.
const POLLING: u8 = 1;
/// Inside a poll, and a wake was noted: the inner future is polled again.
const WOKEN: u8 = 2;

/// See the module's documentation.
pub(super) struct SelfWakes<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
    waker: Waker,
}

impl<F: Future> SelfWakes<F> {
    pub(super) fn new(inner: F) -> Self {
        let gate = Arc::new(Gate { state: AtomicU8::new(IDLE), task: AtomicWaker::new() });
        let waker = Waker::from(gate.clone());
        Self { inner: Box::pin(inner), gate, waker }
    }
}

impl<F: Future> Future for SelfWakes<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.gate.task.register(cx.waker());
        for _ in 0..MAX_PASSES {
            this.gate.state.store(POLLING, Ordering::SeqCst);
            let polled = this.inner.as_mut().poll(&mut Context::from_waker(&this.waker));
            // A wake after this swap finds IDLE and goes to the task; one before it is seen here.
            let woken = this.gate.state.swap(IDLE, Ordering::SeqCst) == WOKEN;
            if polled.is_ready() || !woken {
                return polled;
            }
        }
        // Still waking itself: a yield, left to the runtime.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Where the inner future's wakes go.
struct Gate {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self.state.compare_exchange(POLLING, WOKEN, Ordering::SeqCst, Ordering::SeqCst) {
            // Noted: the poll under way is repeated.
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Wakes itself on each of its first `wakes` polls and is then done; counts its polls.
    struct WakesItself {
        wakes: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Future for WakesItself {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.wakes == 0 {
                return Poll::Ready(());
            }
            self.wakes -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn task() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    #[test]
    fn a_wake_given_during_its_own_poll_is_answered_by_polling_again_not_by_the_task() {
        let (count, waker) = task();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut f = SelfWakes::new(WakesItself { wakes: MAX_PASSES - 1, polls: polls.clone() });
        let polled = Pin::new(&mut f).poll(&mut Context::from_waker(&waker));
        assert!(polled.is_ready(), "the repeats within one poll finish it");
        assert_eq!(polls.load(Ordering::SeqCst), MAX_PASSES);
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "no wake reached the task");
    }

    #[test]
    fn a_future_that_keeps_waking_itself_is_left_to_the_runtime_after_a_bound() {
        let (count, waker) = task();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut f = SelfWakes::new(WakesItself { wakes: usize::MAX, polls: polls.clone() });
        let polled = Pin::new(&mut f).poll(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), MAX_PASSES, "bounded repeats");
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "then one wake to the task, a yield");
    }

    #[test]
    fn a_wake_from_outside_its_poll_reaches_the_task() {
        /// Keeps the waker it was polled with; never finishes.
        struct Keeps(Arc<std::sync::Mutex<Option<Waker>>>);
        impl Future for Keeps {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                *self.0.lock().expect("not poisoned") = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        let (count, waker) = task();
        let kept = Arc::new(std::sync::Mutex::new(None));
        let mut f = SelfWakes::new(Keeps(kept.clone()));
        assert!(Pin::new(&mut f).poll(&mut Context::from_waker(&waker)).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        let inner = kept.lock().expect("not poisoned").take().expect("the inner future kept a waker");
        std::thread::spawn(move || inner.wake()).join().expect("the waking thread ran");
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the socket's or another thread's wake passes");
    }
}
