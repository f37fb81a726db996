//! The event sink that writes the audit log: one record per inference, per lifecycle event, per
//! admin action and per auth failure. A request's answer waits for its record to be durable.

use serde_json::json;

use super::events::{Event, EventSink, LogSink, SinkFuture};
use crate::audit::{Audit, AuditError};

pub struct AuditSink {
    pub audit: Audit,
    log: LogSink,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
}

impl AuditSink {
    pub fn new(audit: Audit, metrics: std::sync::Arc<crate::telemetry::Metrics>) -> Self {
        AuditSink { audit, log: LogSink, metrics }
    }
}

/// The audit record body of an event.
pub fn body(event: &Event) -> serde_json::Value {
    match event {
        Event::Request { ctx, model, version, outcome, latency, key_epoch, input_digest, parameters } => json!({
            "kind": "inference",
            "request_id": ctx.id,
            "principal": ctx.principal,
            "transport": ctx.transport.as_str(),
            "model": model,
            "version": version,
            "route": ctx.route.as_str(),
            "status": outcome.label(),
            "latency_us": latency.as_micros() as u64,
            "key_epoch": key_epoch,
            "input_digest": input_digest,
            "parameters": parameters,
        }),
        Event::Lifecycle { model, version, kind, detail } => json!({
            "kind": "lifecycle",
            "model": model,
            "version": version,
            "event": kind.as_str(),
            "detail": detail,
        }),
        Event::Admin { principal, action, target, outcome } => json!({
            "kind": "admin",
            "principal": principal,
            "action": action,
            "target": target,
            "outcome": outcome,
        }),
        Event::AuthFailure { principal, transport, reason, path, count } => json!({
            "kind": "auth_failure",
            "principal": principal,
            "transport": transport,
            "reason": reason,
            "path": path,
            "count": count,
        }),
        Event::Compliance { baseline, trigger, drifts } => json!({
            "kind": "compliance",
            "baseline": baseline,
            "trigger": trigger,
            "holds": drifts.is_empty(),
            "drifts": drifts,
        }),
        Event::Outbound { purpose, host, address, allowed } => json!({
            "kind": "outbound",
            "purpose": purpose,
            "host": host,
            "address": address,
            "allowed": allowed,
        }),
    }
}

/// What the request path is told of an append; a full quota raises the alarm.
fn outcome(metrics: &crate::telemetry::Metrics, result: Result<u64, AuditError>) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            if matches!(e, AuditError::QuotaFull(_)) {
                metrics.set_alarm("audit_quota_full", Some(e.to_string()));
            }
            Err(e.to_string())
        }
    }
}

impl AuditSink {
    /// Logs the event and waits for its record's append (on the commit thread).
    fn after(
        &self,
        append: impl std::future::Future<Output = Result<u64, AuditError>> + Send + 'static,
        event: Event,
    ) -> SinkFuture {
        let logged = self.log.record(event);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let _ = logged.await;
            outcome(&metrics, append.await)
        })
    }
}

impl EventSink for AuditSink {
    fn record(&self, event: Event) -> SinkFuture {
        self.after(self.audit.append(body(&event)), event)
    }

    fn record_alone(&self, event: Event) -> SinkFuture {
        let record = body(&event);
        match self.audit.append_here(&record) {
            Some(result) => {
                let outcome = outcome(&self.metrics, result);
                // The log line after the durable write, as `record` awaits both.
                let logged = self.log.record(event);
                Box::pin(async move {
                    let _ = logged.await;
                    outcome
                })
            }
            // The body built above goes to the commit thread as it is.
            None => self.after(self.audit.append(record), event),
        }
    }
}
