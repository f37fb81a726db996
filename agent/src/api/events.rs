//! Events of the request path and the model lifecycle. The sink is where the audit log plugs
//! in; until then events go to the structured log.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::RequestContext;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Ok,
    Failed(&'static str),
}

impl RequestOutcome {
    pub fn label(self) -> &'static str {
        match self {
            RequestOutcome::Ok => "ok",
            RequestOutcome::Failed(kind) => kind,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleKind {
    /// Manifest signature and digests checked; the download may start.
    Verified,
    /// Loaded, golden vectors reproduced, serving.
    Activated,
    /// Refused at load (unreadable, unsupported operator, golden mismatch, panic).
    Refused,
    /// Taken out of service.
    Unloaded,
    /// A new version started serving a share of traffic as a canary.
    CanaryStarted,
    /// A canary held for its window and became the default version.
    Promoted,
    /// A version was taken back (canary regression or by hand); it will not be reinstalled.
    RolledBack,
    /// An A/B experiment's rules made its candidate the default version.
    ExperimentPromoted,
    /// An A/B experiment's guard stopped it: every request goes to the default version again.
    ExperimentStopped,
}

impl LifecycleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleKind::Verified => "verified",
            LifecycleKind::Activated => "activated",
            LifecycleKind::Refused => "refused",
            LifecycleKind::Unloaded => "unloaded",
            LifecycleKind::CanaryStarted => "canary_started",
            LifecycleKind::Promoted => "promoted",
            LifecycleKind::RolledBack => "rolled_back",
            LifecycleKind::ExperimentPromoted => "experiment_promoted",
            LifecycleKind::ExperimentStopped => "experiment_stopped",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    Request {
        ctx: RequestContext,
        model: String,
        version: Option<String>,
        outcome: RequestOutcome,
        latency: Duration,
        /// The pseudonymization key epoch of `input_digest` and `parameters`.
        key_epoch: Option<u64>,
        /// Keyed digest of the inputs (never the inputs themselves).
        input_digest: String,
        /// Request parameters, pseudonymized.
        parameters: serde_json::Map<String, serde_json::Value>,
    },
    Lifecycle {
        model: String,
        version: String,
        kind: LifecycleKind,
        detail: String,
    },
    /// An administrative action (load, unload, rollback, poll, import).
    Admin {
        principal: String,
        action: String,
        target: String,
        outcome: String,
    },
    /// Requests refused for their credentials: one (`count` 1), or a source's repeated
    /// failures over a window, summarized.
    AuthFailure {
        principal: String,
        transport: String,
        reason: String,
        path: String,
        count: u64,
    },
    /// An outbound destination used for the first time or at a new address (`allowed`), or
    /// refused for residency (`address` lists what the name resolved to).
    Outbound {
        purpose: String,
        host: String,
        address: String,
        allowed: bool,
    },
    /// The configuration was checked against the compliance baseline and the finding changed:
    /// `drifts` lists each broken rule (empty: it holds again). `trigger`: start, reload,
    /// baseline or interval.
    Compliance {
        baseline: String,
        trigger: String,
        drifts: Vec<String>,
    },
}

pub type SinkFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Receives every event. `record` resolves once the event is as durable as the sink promises;
/// the request path waits for it before answering.
pub trait EventSink: Send + Sync {
    fn record(&self, event: Event) -> SinkFuture;

    /// As `record`, from the one request being answered: a sink may make the event durable on
    /// the calling thread, blocking it for about one disk flush, instead of handing it to a
    /// thread of its own and back (two wake-ups, which on an idle box cost more than the flush).
    fn record_alone(&self, event: Event) -> SinkFuture {
        self.record(event)
    }

    /// Whether this sink keeps what a request's event says of its inputs and parameters (their
    /// keyed digest, pseudonymized copy and key epoch). When it does not, they are not made.
    fn keeps_request_details(&self) -> bool {
        true
    }
}

/// Writes events to the log; requests at debug level, lifecycle at info/warn.
pub struct LogSink;

impl EventSink for LogSink {
    fn record(&self, event: Event) -> SinkFuture {
        match &event {
            Event::Request { ctx, model, version, outcome, latency, .. } => tracing::debug!(
                request_id = %ctx.id,
                principal = %ctx.principal,
                transport = ctx.transport.as_str(),
                model = %model,
                version = version.as_deref().unwrap_or("-"),
                route = ctx.route.as_str(),
                outcome = outcome.label(),
                latency_us = latency.as_micros() as u64,
                "request"
            ),
            Event::Lifecycle { model, version, kind, detail } => match kind {
                LifecycleKind::Refused | LifecycleKind::RolledBack | LifecycleKind::ExperimentStopped => {
                    tracing::warn!(model = %model, version = %version, event = kind.as_str(), %detail, "model refused")
                }
                _ => {
                    tracing::info!(model = %model, version = %version, event = kind.as_str(), %detail, "model lifecycle")
                }
            },
            Event::Admin { principal, action, target, outcome } => {
                tracing::info!(%principal, %action, %target, %outcome, "admin action")
            }
            Event::AuthFailure { principal, transport, reason, path, count } => {
                tracing::warn!(%principal, %transport, %reason, %path, count, "authentication failed")
            }
            Event::Outbound { purpose, host, address, allowed } => {
                tracing::info!(%purpose, %host, %address, allowed, "outbound destination")
            }
            Event::Compliance { baseline, trigger, drifts } if drifts.is_empty() => {
                tracing::info!(%baseline, %trigger, "the configuration holds to the compliance baseline")
            }
            Event::Compliance { baseline, trigger, drifts } => {
                tracing::warn!(%baseline, %trigger, drifts = %drifts.join("; "), "the configuration drifts from the compliance baseline")
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    /// The log line names a request, never its inputs.
    fn keeps_request_details(&self) -> bool {
        false
    }
}

/// Records to a primary sink (awaited) and announces the events the event stream carries
/// (lifecycle and administrative ones) to webhooks and MQTT; announcing never blocks.
pub struct Tee {
    pub primary: std::sync::Arc<dyn EventSink>,
    pub announcer: crate::events::Announcer,
}

/// The notice for an event the stream carries (lifecycle and administrative ones).
pub fn notice_for(event: &Event) -> Option<crate::events::Notice> {
    use crate::events::Notice;
    match event {
        Event::Lifecycle { model, version, kind, detail } => Some(Notice {
            kind: format!("model.{}", kind.as_str()),
            subject: Some(model.clone()),
            data: serde_json::json!({ "model": model, "version": version, "detail": detail }),
        }),
        Event::Admin { principal, action, target, outcome } => Some(Notice {
            kind: format!("admin.{}", action.replace(|c: char| !c.is_ascii_alphanumeric(), "_")),
            subject: Some(target.clone()),
            data: serde_json::json!({
                "principal": principal, "action": action, "target": target, "outcome": outcome
            }),
        }),
        Event::Outbound { purpose, host, address, allowed: false } => Some(Notice {
            kind: "residency.refused".into(),
            subject: Some(host.clone()),
            data: serde_json::json!({ "purpose": purpose, "host": host, "addresses": address }),
        }),
        Event::Compliance { baseline, trigger, drifts } => Some(Notice {
            kind: if drifts.is_empty() { "compliance.holds" } else { "compliance.drift" }.into(),
            subject: Some(baseline.clone()),
            data: serde_json::json!({ "baseline": baseline, "trigger": trigger, "drifts": drifts }),
        }),
        Event::Request { .. } | Event::AuthFailure { .. } | Event::Outbound { .. } => None,
    }
}

impl Tee {
    fn announce(&self, event: &Event) {
        if let Some(n) = notice_for(event) {
            self.announcer.announce(n);
        }
    }
}

impl EventSink for Tee {
    fn record(&self, event: Event) -> SinkFuture {
        self.announce(&event);
        self.primary.record(event)
    }

    fn record_alone(&self, event: Event) -> SinkFuture {
        self.announce(&event);
        self.primary.record_alone(event)
    }

    /// Announcements carry no request events: the primary alone decides.
    fn keeps_request_details(&self) -> bool {
        self.primary.keeps_request_details()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps whole records (as the audit log does).
    struct Keeping;

    impl EventSink for Keeping {
        fn record(&self, _event: Event) -> SinkFuture {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    #[test]
    fn request_details_are_made_only_for_a_sink_that_keeps_them() {
        use std::sync::Arc;
        assert!(!LogSink.keeps_request_details(), "the log line names no inputs");
        assert!(Keeping.keeps_request_details(), "a sink keeps them unless it says otherwise");
        let tee = |primary: Arc<dyn EventSink>| Tee { primary, announcer: crate::events::Announcer::default() };
        assert!(!tee(Arc::new(LogSink)).keeps_request_details(), "announcements carry no request events");
        assert!(tee(Arc::new(Keeping)).keeps_request_details(), "the primary decides");
    }
}
