//! A circuit breaker for the overflow target: closed → open after `threshold` failures within
//! `window` → after `open_for`, half-open: one probe at a time → closed on its success, open
//! again on its failure. An admission that is dropped without an outcome (the request was
//! cancelled) counts as a failure for a probe, so the breaker can never stay half-open.

use crate::locks::MutexExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The `/metrics` gauge value.
    pub fn as_gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

enum Inner {
    Closed { failures: VecDeque<Instant> },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

pub struct Breaker {
    inner: Mutex<Inner>,
    threshold: usize,
    window: Duration,
    open_for: Duration,
    /// Times the breaker opened.
    pub opened: AtomicU64,
    announcer: std::sync::OnceLock<crate::events::Announcer>,
}

impl Breaker {
    pub fn new(threshold: u32, window: Duration, open_for: Duration) -> Breaker {
        Breaker {
            inner: Mutex::new(Inner::Closed { failures: VecDeque::new() }),
            threshold: threshold.max(1) as usize,
            window,
            open_for,
            opened: AtomicU64::new(0),
            announcer: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// The state now (an open breaker whose time is up reads as half-open).
    pub fn state(&self) -> BreakerState {
        match &*self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() >= *until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to send one request upstream: `None` while open (or while a half-open probe is out).
    pub fn admit(&self) -> Option<Admission<'_>> {
        let mut g = self.lock();
        let now = Instant::now();
        let probe = match &mut *g {
            Inner::Closed { .. } => false,
            Inner::Open { until } => {
                if now < *until {
                    return None;
                }
                *g = Inner::HalfOpen { probing: true };
                tracing::info!("overflow breaker half-open: probing the target");
                true
            }
            Inner::HalfOpen { probing } => {
                if *probing {
                    return None;
                }
                *probing = true;
                true
            }
        };
        Some(Admission { breaker: self, probe, settled: false })
    }

    /// Sets where transitions are announced as events.
    pub fn set_announcer(&self, announcer: crate::events::Announcer) {
        let _ = self.announcer.set(announcer);
    }

    fn announce(&self, kind: &str, detail: String) {
        if let Some(a) = self.announcer.get() {
            a.announce(crate::events::Notice {
                kind: kind.to_owned(),
                subject: Some("overflow".into()),
                data: serde_json::json!({ "breaker": "overflow", "detail": detail, "open_for_ms": self.open_for.as_millis() as u64 }),
            });
        }
    }

    fn settle(&self, probe: bool, ok: Option<bool>) {
        let mut g = self.lock();
        let now = Instant::now();
        match (&mut *g, ok) {
            (Inner::Closed { failures }, Some(false)) => {
                failures.push_back(now);
                while failures.front().is_some_and(|t| now.duration_since(*t) > self.window) {
                    failures.pop_front();
                }
                if failures.len() >= self.threshold {
                    tracing::warn!(failures = failures.len(), open_for = ?self.open_for, "overflow breaker open");
                    self.announce("breaker.opened", format!("{} failures within {:?}", failures.len(), self.window));
                    *g = Inner::Open { until: now + self.open_for };
                    self.opened.fetch_add(1, Ordering::Relaxed);
                }
            }
            (Inner::HalfOpen { .. }, Some(true)) if probe => {
                tracing::info!("overflow breaker closed: the probe succeeded");
                self.announce("breaker.closed", "the probe succeeded".into());
                *g = Inner::Closed { failures: VecDeque::new() };
            }
            (Inner::HalfOpen { .. }, Some(false)) if probe => {
                tracing::warn!(open_for = ?self.open_for, "overflow breaker open again: the probe failed");
                self.announce("breaker.opened", "the probe failed".into());
                *g = Inner::Open { until: now + self.open_for };
                self.opened.fetch_add(1, Ordering::Relaxed);
            }
            (Inner::HalfOpen { probing }, None) if probe => *probing = false,
            _ => {}
        }
    }
}

/// Leave to send one request; report how it went (dropping it unreported is a failure for a
/// probe and nothing otherwise).
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Admission<'_> {
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, Some(true));
    }

    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, Some(false));
    }

    /// Neither: the request never reached the target, or the target refused it for its content.
    pub fn neutral(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, None);
    }

    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.settle(true, Some(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_the_window_then_probes_one_at_a_time() {
        let b = Breaker::new(3, Duration::from_secs(60), Duration::ZERO);
        for _ in 0..2 {
            b.admit().expect("closed").failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit().expect("closed").success();
        b.admit().expect("closed").failure();
        // open_for = 0: immediately due for a probe.
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.admit().expect("a probe");
        assert!(probe.is_probe());
        assert!(b.admit().is_none(), "one probe at a time");
        probe.failure();
        let probe = b.admit().expect("a new probe after open_for");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.opened.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_open_breaker_refuses_until_its_time_is_up_and_a_dropped_probe_fails() {
        let b = Breaker::new(1, Duration::from_secs(60), Duration::from_secs(3600));
        b.admit().expect("closed").failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_none());
        let b = Breaker::new(1, Duration::from_secs(60), Duration::ZERO);
        b.admit().expect("closed").failure();
        drop(b.admit().expect("probe"));
        // The dropped probe counted as a failure: open again, and due again at once.
        assert_eq!(b.opened.load(Ordering::Relaxed), 2);
        assert!(b.admit().is_some());
    }
}
