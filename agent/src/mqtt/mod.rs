//! The MQTT adapter: MQTT v5 request/response through the site's broker, over the same
//! inference API as HTTP.
//!
//! Requests arrive on `<prefix>/<site>/infer/<model>[/versions/<v>]` (through the shared
//! subscription `$share/<group>/…` when a group is set) with a V2 JSON body. The answer — or an
//! `{"error", "id"}` — goes to the request's v5 Response Topic with its Correlation Data, or,
//! for v3.1.1 requesters, to `<prefix>/<site>/result/<model>`. QoS 1 with manual
//! acknowledgement: a request is acknowledged only after its reply is published, so a crash in
//! between makes the broker redeliver it. The session is persistent (clean start off), so
//! requests sent while the agent restarts are served when it returns. In-flight work is bounded
//! by the v5 Receive Maximum. A retained `<prefix>/<site>/<node>/status` (with a Last Will)
//! says online/offline; events (CloudEvents JSON, `crate::events`) go to
//! `<prefix>/<site>/events/<type>`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{InferError, InferenceService, RequestContext, Transport};
use crate::protocol::json::{parse_request, response_json};

pub use crate::config::MqttConfig;
use crate::tls::TlsError;
pub use outpost_proto::mqtt::Topics;

fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, TlsError> {
    crate::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let ca = cfg.ca.as_ref().ok_or(TlsError::Settings("mqtts:// needs mqtt.ca (the broker's CA certificate)"))?;
    for cert in crate::tls::certificates("mqtt.ca", ca)? {
        roots.add(cert).map_err(|source| TlsError::Rustls { setting: "mqtt.ca", source })?;
    }
    // The connection goes to the address the residency guard allowed, so rustls is given that
    // address; the certificate is still checked against the configured host name.
    let webpki = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|source| TlsError::ClientCa { setting: "mqtt.ca", path: ca.clone(), source })?;
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|_| TlsError::Settings("mqtt.host is not a valid TLS server name"))?;
    let builder = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner: webpki, name }));
    match (&cfg.client_cert, &cfg.client_key) {
        (Some(c), Some(k)) => {
            let certs = crate::tls::certificates("mqtt.client_cert", c)?;
            let key = crate::tls::private_key("mqtt.client_key", k)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| TlsError::Rustls { setting: "mqtt.client_cert and mqtt.client_key", source })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(TlsError::Settings("mqtt.client_cert and mqtt.client_key go together")),
    }
}

/// Checks the broker's certificate against the configured host name, whatever address the
/// connection was made to.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _connected_to: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the client options from the configuration (checks them; [`options_at`] connects).
pub fn options(cfg: &MqttConfig, topics: &Topics) -> Result<MqttOptions, TlsError> {
    options_at(cfg, topics, &cfg.host)
}

/// The client options for a connection to `address` (the broker's address, as the residency
/// guard allowed it).
pub fn options_at(cfg: &MqttConfig, topics: &Topics, address: &str) -> Result<MqttOptions, TlsError> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), address.to_owned(), cfg.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(cfg.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32));
    o.set_receive_maximum(Some(cfg.inflight.max(1)));
    o.set_manual_acks(true);
    // Nagle's algorithm adds ~40 ms per round trip with Mosquitto (measured): off.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    // Room for our own size check: oversized requests get an error reply, not a dropped link.
    let cap = (cfg.max_payload_bytes + 64 * 1024).min(256 << 20);
    o.set_max_packet_size(Some(cap as u32));
    o.set_last_will(LastWill::new(
        topics.status(),
        json!({ "state": "offline", "node": topics.node }).to_string(),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            Some(p) => crate::tls::read_token(p, "mqtt.password_file")?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if cfg.tls {
        let tls = tls_config(cfg)?;
        o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(tls))));
    }
    Ok(o)
}

fn qos(n: u8) -> QoS {
    if n == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// The outbound path's name in residency records and refusals.
const BROKER: &str = "mqtt broker";

/// Options for a connection to the broker at an address the residency guard allows; waits
/// (backing off) while there is none, `None` when cancelled meanwhile.
async fn allowed_options(
    cfg: &MqttConfig,
    topics: &Topics,
    guard: Option<&crate::residency::Guard>,
    backoff: &mut Duration,
    cancel: &CancellationToken,
) -> Option<(MqttOptions, std::net::SocketAddr)> {
    loop {
        let outcome = match crate::residency::resolve(guard, BROKER, &cfg.host, cfg.port).await {
            Ok(addrs) => match addrs.first() {
                Some(a) => options_at(cfg, topics, &a.ip().to_string()).map(|o| (o, *a)).map_err(|e| e.to_string()),
                None => Err(format!("{}: no address", cfg.host)),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(x) => return Some(x),
            Err(e) => tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "mqtt: not connecting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {}
            _ = cancel.cancelled() => return None,
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(30));
    }
}

/// Runs the adapter until cancelled. `events` receives lifecycle events to publish.
pub async fn run(
    cfg: MqttConfig,
    topics: Topics,
    service: InferenceService,
    mut events: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::events::Published>>,
    started: tokio::sync::watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    if let Err(e) = options(&cfg, &topics) {
        tracing::error!(error = %e, "mqtt disabled: bad configuration");
        return;
    }
    let inflight = TaskTracker::new();
    let mut backoff = Duration::from_millis(250);
    let sub = topics.requests(&cfg.shared_group);
    // A fresh client per connection: the broker's persistent session carries what matters
    // (requests not yet acknowledged are delivered again), and no client-side state from a
    // dead connection can wedge the new one. Each connection goes to an address the residency
    // guard allows, resolved anew.
    let guard = service.privacy.as_ref().and_then(|p| p.guard.clone());
    let Some((opts, mut broker)) = allowed_options(&cfg, &topics, guard.as_deref(), &mut backoff, &cancel).await else {
        return;
    };
    let (mut client, mut eventloop) = AsyncClient::new(opts, usize::from(cfg.inflight).max(16) * 2);
    // Verdicts shared with the site's other box: retained, one topic per rejected version.
    let verdicts = service.site_verdicts.clone();
    let verdict_topics = format!("{}/{}/verdicts/", topics.prefix, topics.site);
    let mut outgoing = verdicts.as_ref().map(|v| v.subscribe());
    let stopping = loop {
        tokio::select! {
            polled = eventloop.poll() => match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(250);
                    service.metrics.set_gauge("mqtt_connected", 1.0);
                    tracing::info!(broker = %format!("{}:{}", cfg.host, cfg.port), address = %broker, session_present = ack.session_present, "mqtt connected");
                    if let Some(g) = &guard {
                        g.connected(BROKER, &cfg.host, broker);
                    }
                    if let Err(e) = client.subscribe(sub.clone(), qos(cfg.qos)).await {
                        tracing::warn!(error = %e, "mqtt subscribe failed");
                    }
                    if let Some(v) = &verdicts {
                        if let Err(e) = client.subscribe(format!("{verdict_topics}#"), QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, "mqtt subscribe to the site's verdicts failed");
                        }
                        for (model, sha, bytes) in v.own() {
                            let _ = client.try_publish(format!("{verdict_topics}{model}/{sha}"), QoS::AtLeastOnce, true, bytes);
                        }
                        // Comes back after the retained verdicts the subscription brings.
                        let _ = client.try_publish(format!("{verdict_topics}_sync/{}", topics.node), QoS::AtLeastOnce, false, v.marker().to_owned());
                    }
                    let online = json!({ "state": "online", "node": topics.node, "version": env!("CARGO_PKG_VERSION") });
                    let _ = client.publish(topics.status(), QoS::AtLeastOnce, true, online.to_string()).await;
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack.return_codes.iter().any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)));
                    if refused {
                        let detail = format!("the broker refused the subscription to {sub} ({:?}): check its ACL", ack.return_codes);
                        tracing::error!(topic = %sub, codes = ?ack.return_codes, "mqtt not authorized: subscription refused by the broker (ACL)");
                        service.metrics.set_alarm("mqtt_not_authorized", Some(detail));
                    }
                }
                Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                    use rumqttc::v5::mqttbytes::v5::PubAckReason;
                    if !matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers) {
                        let detail = format!(
                            "the broker refused a publish ({:?}): check that its ACL lets this client write {} and the reply topics",
                            ack.reason,
                            topics.status()
                        );
                        tracing::error!(reason = ?ack.reason, "mqtt not authorized: publish refused by the broker (ACL)");
                        service.metrics.set_alarm("mqtt_not_authorized", Some(detail));
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) if verdicts.is_some() && p.topic.starts_with(verdict_topics.as_bytes()) => {
                    if let Some(v) = &verdicts {
                        let sync_topic = format!("{verdict_topics}_sync/");
                        if p.topic.starts_with(sync_topic.as_bytes()) {
                            v.sync_message(&p.payload);
                        } else {
                            match v.receive(&p.payload) {
                                Ok(()) => service.metrics.set_gauge(
                                    "ha_verdict_last_sync_timestamp_seconds",
                                    outpost_proto::registry::now() as f64,
                                ),
                                Err(e) => {
                                    service.metrics.set_gauge("ha_verdicts_ignored", v.status().ignored as f64);
                                    tracing::warn!(topic = %String::from_utf8_lossy(&p.topic), error = %e, "site verdict ignored");
                                }
                            }
                        }
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let (client, service, topics, cfg) = (client.clone(), service.clone(), topics.clone(), cfg.clone());
                    let mut started = started.clone();
                    inflight.spawn(async move {
                        // Requests that arrive during the initial model load (a restart with a
                        // persistent session, a new member of a shared subscription) wait for
                        // it, rather than being answered "not ready"; in-flight stays bounded
                        // by Receive Maximum and unacknowledged requests stay with the broker.
                        let _ = started.wait_for(|s| *s).await;
                        handle(&client, &service, &topics, &cfg, p).await
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    service.metrics.set_gauge("mqtt_connected", 0.0);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "mqtt connection lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => break false,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    let Some((opts, at)) = allowed_options(&cfg, &topics, guard.as_deref(), &mut backoff, &cancel).await else { break false };
                    broker = at;
                    (client, eventloop) = AsyncClient::new(opts, usize::from(cfg.inflight).max(16) * 2);
                }
            },
            Some(signed) = next_verdict(&mut outgoing) => {
                let (model, sha, bytes) = signed;
                let _ = client.try_publish(format!("{verdict_topics}{model}/{sha}"), QoS::AtLeastOnce, true, bytes);
            }
            ev = events.recv() => {
                match ev {
                    Ok(p) => {
                        let _ = client.try_publish(topics.event(&p.ty), QoS::AtLeastOnce, false, p.json.clone());
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "mqtt: events published faster than the broker takes them; some skipped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                }
            }
            _ = cancel.cancelled() => break true,
        }
    };
    if !stopping {
        return;
    }
    // Graceful: finish in-flight requests (their replies and acks still go out), say offline,
    // disconnect — all while the event loop keeps running, and all bounded in time.
    inflight.close();
    let drain = async {
        inflight.wait().await;
        let offline = json!({ "state": "offline", "node": topics.node });
        let _ = client.publish(topics.status(), QoS::AtLeastOnce, true, offline.to_string()).await;
        let _ = client.disconnect().await;
    };
    let pump = async { while eventloop.poll().await.is_ok() {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(drain, pump);
    })
    .await;
}

/// This box's next verdict to publish; never resolves without verdict sharing. A verdict
/// missed for lag is still published at the next connection (from the kept ones).
async fn next_verdict(
    rx: &mut Option<tokio::sync::broadcast::Receiver<crate::verdicts::Signed>>,
) -> Option<crate::verdicts::Signed> {
    let Some(rx) = rx else { return std::future::pending().await };
    loop {
        match rx.recv().await {
            Ok(v) => return Some(v),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

async fn handle(client: &AsyncClient, service: &InferenceService, topics: &Topics, cfg: &MqttConfig, p: Publish) {
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    let props = p.properties.clone().unwrap_or_default();
    let mut ctx = RequestContext::new(Transport::Mqtt, cfg.request_timeout);
    let parsed = topics.parse_request_topic(&topic);
    let model = parsed.as_ref().map(|(m, _)| m.clone()).unwrap_or_else(|_| "_unknown".into());
    let payload = match parsed {
        Err(e) => json!({ "error": e }).to_string().into_bytes(),
        Ok((model, version)) => {
            // A v5 Content Type other than JSON: the payload is the raw input of a package.
            let raw = service.is_raw(&model, version.as_deref(), props.content_type.as_deref());
            answer(service, &mut ctx, &model, version.as_deref(), &p.payload, cfg.max_payload_bytes, raw).await
        }
    };
    let reply_topic = match &props.response_topic {
        Some(t) if !t.is_empty() => t.clone(),
        _ => topics.result(&model),
    };
    let reply_props = PublishProperties {
        correlation_data: props.correlation_data.clone(),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    match client.publish_with_properties(reply_topic, QoS::AtLeastOnce, false, payload, reply_props).await {
        Ok(()) => {
            // Acknowledged only once the reply is on its way: a crash before this point makes
            // the broker deliver the request again.
            if let Err(e) = client.ack(&p).await {
                tracing::warn!(error = %e, "mqtt ack failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "mqtt reply not published; the request will be redelivered"),
    }
}

/// Runs one request; returns the reply payload: the answer, or `{"error", "id"}`.
async fn answer(
    service: &InferenceService,
    ctx: &mut RequestContext,
    model: &str,
    version: Option<&str>,
    payload: &Bytes,
    max: usize,
    raw: bool,
) -> Vec<u8> {
    let error = |msg: String, id: Option<String>| json!({ "error": msg, "id": id }).to_string().into_bytes();
    if payload.len() > max {
        return error(format!("request of {} bytes is larger than {max} bytes", payload.len()), None);
    }
    let parsed = if raw {
        service.raw_request(model, version, payload.to_vec()).map_err(|e| e.to_string())
    } else {
        parse_request(payload).map_err(|e| e.to_string())
    };
    let request = match parsed {
        Ok(r) => r,
        Err(e) => {
            // The id, if the JSON got that far, still goes back.
            let id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
            return error(e, id);
        }
    };
    let id = request.id.clone();
    if let Some(i) = &id {
        ctx.id = i.clone();
    }
    match service.infer(ctx, model, version, request).await {
        Ok(resp) => response_json(&resp, &[]),
        Err(e) => {
            let msg = match &e {
                InferError::Overloaded { .. } => format!("overloaded: {e}"),
                _ => e.to_string(),
            };
            error(msg, id)
        }
    }
}
