//! Webhook delivery: each `[[webhooks]]` subscription has its own queue in the events
//! database (ordered by sequence), drained by one task in order: an event is retried, with
//! exponential backoff and jitter, until the receiver answers 2xx or `max_attempts` is spent,
//! and only then does the next one go. At least once: an event leaves the queue after its
//! 2xx, so a kill -9 between the answer and the removal repeats it, with the same id.
//!
//! Each POST carries the event in CloudEvents structured mode and is signed as Standard
//! Webhooks asks (the `standardwebhooks` crate): `webhook-id` (the event's id, the same on
//! every attempt), `webhook-timestamp` and `webhook-signature` (`v1,` and the base64
//! HMAC-SHA256 of `id.timestamp.body` under the subscription's secret). Receivers check the
//! signature and refuse stale timestamps, which stops replays. Redirects are not followed.
//!
//! Bounded on disk: at most `max_queued` events wait; when full, the oldest goes to the
//! dead-letter list, as does an event that used up its attempts. The dead-letter list keeps
//! the last [`DEAD_KEPT`] and is shown in `/admin/status` (`webhooks`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Published;
use crate::config::WebhookConfig;
use crate::locks::MutexExt as _;

/// Dead-lettered events kept per subscription (the oldest go first).
pub const DEAD_KEPT: usize = 1000;

/// Bytes of a receiver's answer kept for the error message.
const ANSWER_EXCERPT: usize = 200;

/// An event waiting in a queue (or dead-lettered), as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    id: String,
    #[serde(rename = "type")]
    ty: String,
    attempts: u32,
    body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// When it was dead-lettered (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<u64>,
}

/// One subscription's queue, dead-letter list and counters.
pub struct Queue {
    pub config: WebhookConfig,
    queue: sled::Tree,
    dead: sled::Tree,
    wake: Notify,
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    dead_lettered: AtomicU64,
    last: Mutex<LastOutcome>,
}

#[derive(Default, Clone, Serialize)]
struct LastOutcome {
    success_at: Option<u64>,
    error: Option<String>,
    error_at: Option<u64>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn db_err(e: impl std::fmt::Display) -> String {
    format!("events database: {e}")
}

impl Queue {
    pub(super) fn open(db: &sled::Db, config: WebhookConfig) -> Result<Queue, String> {
        let queue = db.open_tree(format!("queue/{}", config.name)).map_err(db_err)?;
        let dead = db.open_tree(format!("dead/{}", config.name)).map_err(db_err)?;
        Ok(Queue {
            config,
            queue,
            dead,
            wake: Notify::new(),
            delivered: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            last: Mutex::default(),
        })
    }

    pub(super) fn wants(&self, ty: &str) -> bool {
        self.config.events.iter().any(|p| super::matches(p, ty))
    }

    /// Queues an event (the caller flushes); a full queue sends its oldest to dead-letter.
    pub(super) fn push(&self, p: &Published) -> Result<(), String> {
        while self.queue.len() >= self.config.max_queued {
            let Some((k, v)) = self.queue.pop_min().map_err(db_err)? else { break };
            if let Ok(mut s) = serde_json::from_slice::<Stored>(&v) {
                s.error = Some(format!("queue full ({} events waiting)", self.config.max_queued));
                self.bury(&k, s)?;
            }
        }
        let stored =
            Stored { id: p.id.clone(), ty: p.ty.clone(), attempts: 0, body: p.json.clone(), error: None, at: None };
        let value = serde_json::to_vec(&stored).map_err(db_err)?;
        self.queue.insert(p.sequence.to_be_bytes(), value).map_err(db_err)?;
        Ok(())
    }

    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Moves an event to the dead-letter list (kept to [`DEAD_KEPT`]).
    fn bury(&self, key: &[u8], mut s: Stored) -> Result<(), String> {
        s.at = Some(now_secs());
        tracing::warn!(
            webhook = %self.config.name, id = %s.id, event = %s.ty, attempts = s.attempts,
            error = s.error.as_deref().unwrap_or("-"), "webhook event dead-lettered"
        );
        self.dead.insert(key, serde_json::to_vec(&s).map_err(db_err)?).map_err(db_err)?;
        while self.dead.len() > DEAD_KEPT {
            if self.dead.pop_min().map_err(db_err)?.is_none() {
                break;
            }
        }
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The subscription's state for `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let last = self.last.locked().clone();
        let dead: Vec<serde_json::Value> = self
            .dead
            .iter()
            .rev()
            .take(20)
            .filter_map(|r| r.ok())
            .filter_map(|(_, v)| serde_json::from_slice::<Stored>(&v).ok())
            .map(|s| serde_json::json!({ "id": s.id, "type": s.ty, "attempts": s.attempts, "error": s.error, "at": s.at }))
            .collect();
        serde_json::json!({
            "name": self.config.name,
            "url": self.config.url,
            "queued": self.queue.len(),
            "delivered": self.delivered.load(Ordering::Relaxed),
            "failed_attempts": self.failed_attempts.load(Ordering::Relaxed),
            "dead_lettered": self.dead_lettered.load(Ordering::Relaxed),
            "dead_letter_count": self.dead.len(),
            "dead_letter": dead,
            "last_success_at": last.success_at,
            "last_error": last.error,
            "last_error_at": last.error_at,
        })
    }
}

/// The delay before attempt `attempts + 1`: `retry_initial` doubled per attempt, capped at
/// `retry_max`, then scaled by a random factor in [0.5, 1) so that receivers coming back are
/// not hit by every box at once.
pub fn backoff(config: &WebhookConfig, attempts: u32, jitter: f64) -> Duration {
    let base = config.retry_initial.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    base.min(config.retry_max).mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// The HTTP client of one subscription: its CA, its timeout, no redirects.
pub fn client(config: &WebhookConfig, guard: Option<Arc<crate::residency::Guard>>) -> Result<reqwest::Client, String> {
    crate::tls::install_crypto_provider();
    let mut b = crate::tls::outbound(reqwest::Client::builder(), &format!("webhook {}", config.name), guard)
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &config.ca {
        b = crate::tls::add_roots(b, ca, "webhooks.ca").map_err(|e| format!("webhook {}: {e}", config.name))?;
    }
    b.build().map_err(|e| format!("webhook {}: {e}", config.name))
}

/// Reads a subscription's secret (`whsec_` and base64, as Standard Webhooks issues them).
pub fn signer(config: &WebhookConfig) -> Result<standardwebhooks::Webhook, String> {
    let text = std::fs::read_to_string(&config.secret_file)
        .map_err(|e| format!("webhook {}: secret_file {}: {e}", config.name, config.secret_file.display()))?;
    standardwebhooks::Webhook::new(text.trim()).map_err(|e| {
        format!(
            "webhook {}: secret_file {}: not a Standard Webhooks secret (whsec_ and base64): {e}",
            config.name,
            config.secret_file.display()
        )
    })
}

/// One attempt: POST the event, signed. `Ok` on 2xx; the error says what the receiver did.
async fn attempt(
    client: &reqwest::Client,
    signer: &standardwebhooks::Webhook,
    url: &str,
    seen: Option<(&crate::residency::Guard, &str)>,
    s: &Stored,
) -> Result<(), String> {
    let timestamp = i64::try_from(now_secs()).unwrap_or(i64::MAX);
    let signature = signer.sign(&s.id, timestamp, s.body.as_bytes()).map_err(|e| format!("signing: {e}"))?;
    let r = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/cloudevents+json; charset=utf-8")
        .header("webhook-id", &s.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(s.body.clone())
        .send()
        .await
        .map_err(|e| {
            let what = if e.is_timeout() { "timed out" } else { "failed" };
            format!("POST {what}: {}", crate::tls::describe(&e))
        })?;
    if let Some((guard, purpose)) = seen {
        guard.answered(purpose, url, &r);
    }
    let status = r.status();
    if status.is_success() {
        return Ok(());
    }
    if let Some(refused) = crate::tls::redirect_refused(url, &r) {
        return Err(refused);
    }
    // Only the start of the answer is read: a receiver cannot make the agent hold a large one.
    let mut r = r;
    let mut head = Vec::new();
    while head.len() < ANSWER_EXCERPT {
        match r.chunk().await {
            Ok(Some(c)) => head.extend_from_slice(&c[..c.len().min(ANSWER_EXCERPT - head.len())]),
            _ => break,
        }
    }
    Err(format!("the receiver answered {status}: {}", String::from_utf8_lossy(&head)))
}

/// Drains one subscription's queue in order until `cancel`.
pub async fn deliver(
    q: Arc<Queue>,
    client: reqwest::Client,
    signer: standardwebhooks::Webhook,
    guard: Option<Arc<crate::residency::Guard>>,
    cancel: CancellationToken,
) {
    let purpose = format!("webhook {}", q.config.name);
    loop {
        let head = match q.queue.first() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(webhook = %q.config.name, error = %e, "webhook queue unreadable");
                None
            }
        };
        let Some((key, value)) = head else {
            tokio::select! {
                () = q.wake.notified() => continue,
                () = cancel.cancelled() => return,
            }
        };
        let mut stored: Stored = match serde_json::from_slice(&value) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(webhook = %q.config.name, error = %e, "unreadable queued event removed");
                let _ = q.queue.remove(&key);
                continue;
            }
        };
        let outcome = tokio::select! {
            r = attempt(&client, &signer, &q.config.url, guard.as_deref().map(|g| (g, purpose.as_str())), &stored) => r,
            () = cancel.cancelled() => return,
        };
        match outcome {
            Ok(()) => {
                let _ = q.queue.remove(&key);
                q.delivered.fetch_add(1, Ordering::Relaxed);
                q.last.locked().success_at = Some(now_secs());
                tracing::debug!(webhook = %q.config.name, id = %stored.id, event = %stored.ty, "webhook delivered");
            }
            Err(e) => {
                stored.attempts += 1;
                q.failed_attempts.fetch_add(1, Ordering::Relaxed);
                {
                    let mut last = q.last.locked();
                    last.error = Some(e.clone());
                    last.error_at = Some(now_secs());
                }
                tracing::info!(
                    webhook = %q.config.name, id = %stored.id, attempts = stored.attempts, error = %e,
                    "webhook delivery failed"
                );
                // The hub may have moved this event to the dead-letter list meanwhile (a full
                // queue): it is updated or removed here only if it is still queued as read.
                if stored.attempts >= q.config.max_attempts {
                    stored.error = Some(e);
                    let taken = q.queue.compare_and_swap(&key, Some(&value), None::<&[u8]>);
                    if matches!(taken, Ok(Ok(()))) {
                        if let Err(e) = q.bury(&key, stored) {
                            tracing::error!(webhook = %q.config.name, error = %e, "dead-letter list unwritable");
                        }
                    }
                    continue;
                }
                if let Ok(v) = serde_json::to_vec(&stored) {
                    let _ = q.queue.compare_and_swap(&key, Some(&value), Some(v));
                }
                let wait = backoff(&q.config, stored.attempts, jitter());
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WebhookConfig {
        WebhookConfig {
            name: "t".into(),
            url: "http://127.0.0.1:1/".into(),
            events: vec!["*".into()],
            secret_file: "/nonexistent".into(),
            ca: None,
            timeout: Duration::from_secs(1),
            max_attempts: 5,
            max_queued: 3,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let c = config();
        assert_eq!(backoff(&c, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&c, 2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(&c, 4, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(&c, 30, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(&c, 2, 0.0), Duration::from_secs(1));
    }

    #[test]
    fn a_full_queue_dead_letters_its_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let q = Queue::open(&db, config()).unwrap();
        for i in 1..=5u64 {
            let p = Published { id: format!("e-{i}"), ty: "io.outpost.x".into(), sequence: i, json: "{}".into() };
            q.push(&p).unwrap();
        }
        assert_eq!(q.queue.len(), 3);
        let status = q.status();
        assert_eq!(status["dead_letter_count"], 2);
        assert_eq!(status["dead_letter"][0]["id"], "e-2");
        assert!(status["dead_letter"][0]["error"].as_str().unwrap().contains("queue full"));
    }
}
