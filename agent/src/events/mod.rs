//! One event stream: what happens to models (lifecycle steps, canary verdicts, rollbacks),
//! administrative actions, alarms raised and cleared, and the overflow breaker's transitions,
//! as CloudEvents 1.0 in the structured JSON format (the `cloudevents-sdk` crate). Each event
//! has a unique id, the node as its source and a `sequence` (the CloudEvents sequence
//! extension: a zero-padded decimal, so that string order is event order), persisted across
//! restarts.
//!
//! Producers hand a [`Notice`] to the [`Announcer`] (never blocking: a full queue drops the
//! notice and counts it). The hub numbers it, writes it to the queue of every webhook that
//! subscribes to its type and flushes that to disk (so a delivery survives kill -9), and then
//! publishes it for MQTT (`<prefix>/<site>/events/<type>`). Delivery is in
//! [`webhooks`].

pub mod webhooks;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cloudevents::{EventBuilder as _, EventBuilderV10};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// The prefix of every event type.
pub const TYPE_PREFIX: &str = "io.outpost.";

/// Notices waiting for the hub at most (events are rare: lifecycle steps, alarms).
const QUEUE: usize = 4096;

/// Something that happened, before it is numbered and sent.
#[derive(Debug, Clone)]
pub struct Notice {
    /// The type after [`TYPE_PREFIX`]: `model.activated`, `alarm.raised`, `breaker.open`.
    pub kind: String,
    /// What it is about (a model's name, an alarm's), the CloudEvents `subject`.
    pub subject: Option<String>,
    pub data: serde_json::Value,
}

/// Where producers send notices. Cloning is cheap; a disabled announcer drops everything.
#[derive(Clone, Default)]
pub struct Announcer {
    tx: Option<mpsc::Sender<Notice>>,
    dropped: Arc<AtomicU64>,
}

impl Announcer {
    /// Hands a notice to the hub without waiting; a full queue drops it (counted, logged).
    pub fn announce(&self, notice: Notice) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(notice) {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(dropped = n, error = %e, "event dropped: the event queue is full");
        }
    }

    /// Notices dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One numbered event, as sent.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    /// The full CloudEvents type (`io.outpost.model.activated`).
    pub ty: String,
    pub sequence: u64,
    /// The structured-mode JSON.
    pub json: String,
}

/// Whether an event type matches a subscription pattern (`*`, an exact type, or a prefix
/// ending in `*`).
pub fn matches(pattern: &str, ty: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => ty.starts_with(prefix),
        None => pattern == ty,
    }
}

/// The sequence counter and an id prefix, kept in the events database.
struct Numbering {
    meta: sled::Tree,
    /// Random, made once per state directory: ids stay unique if the directory is recreated.
    epoch: String,
    next: u64,
}

impl Numbering {
    fn open(db: &sled::Db) -> Result<Numbering, String> {
        let meta = db.open_tree("meta").map_err(|e| format!("events database: {e}"))?;
        let epoch = match meta.get("epoch").map_err(|e| format!("events database: {e}"))? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let mut b = [0u8; 6];
                getrandom::fill(&mut b).map_err(|e| format!("random: {e}"))?;
                let e: String = b.iter().map(|x| format!("{x:02x}")).collect();
                meta.insert("epoch", e.as_bytes()).map_err(|e| format!("events database: {e}"))?;
                e
            }
        };
        let last = meta
            .get("sequence")
            .map_err(|e| format!("events database: {e}"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Numbering { meta, epoch, next: last + 1 })
    }
}

/// The hub's settings and outlets.
pub struct Hub {
    db: sled::Db,
    numbering: Numbering,
    source: String,
    queues: Vec<Arc<webhooks::Queue>>,
    mqtt: broadcast::Sender<Arc<Published>>,
}

impl Hub {
    /// Opens (or creates) the events database under `state_dir` and one queue per webhook.
    pub fn open(
        state_dir: &std::path::Path,
        site: &str,
        node: &str,
        hooks: &[crate::config::WebhookConfig],
    ) -> Result<Hub, String> {
        let db = sled::Config::new()
            .path(state_dir.join("events"))
            .cache_capacity(8 << 20)
            .open()
            .map_err(|e| format!("events database {}: {e}", state_dir.join("events").display()))?;
        let numbering = Numbering::open(&db)?;
        let queues =
            hooks.iter().map(|h| webhooks::Queue::open(&db, h.clone()).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        let (mqtt, _) = broadcast::channel(256);
        Ok(Hub { db, numbering, source: format!("/outpost/{site}/{node}"), queues, mqtt })
    }

    pub fn queues(&self) -> &[Arc<webhooks::Queue>] {
        &self.queues
    }

    /// Events as they are numbered, for the MQTT adapter (a slow reader misses some; the
    /// webhook queues never do).
    pub fn subscribe(&self) -> broadcast::Sender<Arc<Published>> {
        self.mqtt.clone()
    }

    /// Numbers a notice, builds its CloudEvent and queues it for its subscribers (durably).
    async fn publish(&mut self, n: Notice) -> Result<Arc<Published>, String> {
        let sequence = self.numbering.next;
        let id = format!("{}-{sequence}", self.numbering.epoch);
        let ty = format!("{TYPE_PREFIX}{}", n.kind);
        let mut b = EventBuilderV10::new()
            .id(id.clone())
            .source(self.source.clone())
            .ty(ty.clone())
            .time(chrono::Utc::now())
            .extension("sequence", format!("{sequence:020}"))
            .data("application/json", n.data);
        if let Some(s) = n.subject {
            b = b.subject(s);
        }
        let event = b.build().map_err(|e| format!("building event {ty}: {e}"))?;
        let json = serde_json::to_string(&event).map_err(|e| format!("encoding event {ty}: {e}"))?;
        let published = Arc::new(Published { id, ty, sequence, json });
        for q in &self.queues {
            if q.wants(&published.ty) {
                q.push(&published)?;
            }
        }
        self.numbering
            .meta
            .insert("sequence", &sequence.to_be_bytes()[..])
            .map_err(|e| format!("events database: {e}"))?;
        self.db.flush_async().await.map_err(|e| format!("events database: {e}"))?;
        self.numbering.next = sequence + 1;
        for q in &self.queues {
            q.wake();
        }
        let _ = self.mqtt.send(published.clone());
        Ok(published)
    }

    /// Starts the hub: returns the announcer producers use. Runs until `cancel`.
    pub fn spawn(mut self, tracker: &tokio_util::task::TaskTracker, cancel: CancellationToken) -> Announcer {
        let (tx, mut rx) = mpsc::channel::<Notice>(QUEUE);
        tracker.spawn(async move {
            loop {
                let notice = tokio::select! {
                    n = rx.recv() => match n { Some(n) => n, None => break },
                    () = cancel.cancelled() => break,
                };
                let kind = notice.kind.clone();
                if let Err(e) = self.publish(notice).await {
                    tracing::error!(event = %kind, error = %e, "event not recorded");
                }
            }
            let _ = self.db.flush_async().await;
        });
        Announcer { tx: Some(tx), dropped: Arc::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_types_and_prefixes() {
        assert!(matches("*", "io.outpost.model.activated"));
        assert!(matches("io.outpost.model.*", "io.outpost.model.activated"));
        assert!(matches("io.outpost.model.activated", "io.outpost.model.activated"));
        assert!(!matches("io.outpost.model.activated", "io.outpost.model.activated2"));
        assert!(!matches("io.outpost.alarm.*", "io.outpost.model.activated"));
    }

    #[tokio::test]
    async fn sequences_continue_across_reopen_and_ids_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let mut hub = Hub::open(dir.path(), "site", "node", &[]).unwrap();
            for _ in 0..3 {
                let p = hub
                    .publish(Notice { kind: "model.activated".into(), subject: None, data: serde_json::json!({}) })
                    .await
                    .unwrap();
                let v: serde_json::Value = serde_json::from_str(&p.json).unwrap();
                assert_eq!(v["specversion"], "1.0");
                assert_eq!(v["type"], "io.outpost.model.activated");
                assert_eq!(v["source"], "/outpost/site/node");
                assert_eq!(v["sequence"], format!("{:020}", p.sequence));
                ids.push((p.sequence, p.id.clone()));
            }
        }
        let seqs: Vec<u64> = ids.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        let mut unique: Vec<&String> = ids.iter().map(|(_, i)| i).collect();
        unique.dedup();
        assert_eq!(unique.len(), 6);
    }
}
