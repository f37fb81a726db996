//! MQTT requesters for tests, on the same client stack as the agent (rumqttc): a v5 requester
//! with a response topic and correlation data, and a v3.1.1 requester.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::Notify;

/// Replies received, by correlation data.
#[derive(Default)]
pub struct Replies {
    pub by_corr: Mutex<HashMap<Vec<u8>, Value>>,
    pub notify: Notify,
}

pub struct Requester {
    /// Replaced by a fresh client after a lost connection (rumqttc keeps client-side state
    /// across reconnects that can stall it; the broker session is what carries over).
    client: Arc<Mutex<AsyncClient>>,
    pub replies: Arc<Replies>,
    pub reply_topic: String,
    task: tokio::task::JoinHandle<()>,
}

pub struct Login<'a> {
    pub user: &'a str,
    pub password: &'a str,
}

impl Requester {
    /// Connects with a persistent session, subscribes to its own reply topic.
    pub async fn connect(
        port: u16,
        id: &str,
        tls: Option<&crate::broker::Pki>,
        login: Option<Login<'_>>,
    ) -> Result<Requester> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
        o.set_max_packet_size(Some(64 << 20));
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        if let Some(l) = login {
            o.set_credentials(l.user, l.password);
        }
        if let Some(pki) = tls {
            outpost::tls::install_crypto_provider();
            let mut roots = rustls::RootCertStore::empty();
            for c in outpost::tls::certificates("test ca", &pki.path("ca.pem"))? {
                roots.add(c)?;
            }
            let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg))));
        }
        let (client, mut ev) = AsyncClient::new(o.clone(), 1024);
        let client = Arc::new(Mutex::new(client));
        let replies = Arc::new(Replies::default());
        let reply_topic = format!("replies/{id}");
        let (r, topic) = (replies.clone(), reply_topic.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let shared = client.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let c = shared.lock().ok().map(|c| c.clone());
                        if let Some(c) = c {
                            let _ = c.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let corr = p
                            .properties
                            .as_ref()
                            .and_then(|pp| pp.correlation_data.clone())
                            .map(|b| b.to_vec())
                            .unwrap_or_default();
                        if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                            if let Ok(mut m) = r.by_corr.lock() {
                                m.insert(corr, v);
                            }
                            r.notify.notify_waiters();
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // The broker went away: a fresh client shortly (bounded by the test's timeouts).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let (c, e) = AsyncClient::new(o.clone(), 1024);
                        if let Ok(mut slot) = shared.lock() {
                            *slot = c;
                        }
                        ev = e;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .map_err(|_| anyhow!("requester did not subscribe"))??;
        Ok(Requester { client, replies, reply_topic, task })
    }

    /// Publishes a request (QoS 1) with a response topic and correlation data.
    pub async fn send(&self, topic: &str, corr: &str, body: &Value) -> Result<()> {
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(Bytes::from(corr.as_bytes().to_vec())),
            ..Default::default()
        };
        let c = self.client.lock().ok().map(|c| c.clone()).ok_or_else(|| anyhow!("lock"))?;
        c.publish_with_properties(topic, QoS::AtLeastOnce, false, serde_json::to_vec(body)?, props).await?;
        Ok(())
    }

    pub async fn send_raw(&self, topic: &str, corr: &str, payload: Vec<u8>) -> Result<()> {
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(Bytes::from(corr.as_bytes().to_vec())),
            ..Default::default()
        };
        let c = self.client.lock().ok().map(|c| c.clone()).ok_or_else(|| anyhow!("lock"))?;
        c.publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props).await?;
        Ok(())
    }

    /// Sends again every request of `pending` (corr, topic, body) that has no reply yet, until
    /// all are answered or `rounds` rounds of `wait` each have passed: what a requester does
    /// when a connection was lost under it.
    pub async fn resend_until_answered(
        &self,
        pending: &[(String, String, Value)],
        rounds: usize,
        wait: Duration,
    ) -> Result<usize> {
        let corrs: Vec<String> = pending.iter().map(|(c, _, _)| c.clone()).collect();
        for round in 0..rounds {
            if self.wait_all(&corrs, wait).await.is_ok() {
                return Ok(round);
            }
            for (corr, topic, body) in pending {
                if self.reply(corr).is_none() {
                    self.send(topic, corr, body).await?;
                }
            }
        }
        self.wait_all(&corrs, wait).await.map(|()| rounds)
    }

    pub fn reply(&self, corr: &str) -> Option<Value> {
        self.replies.by_corr.lock().ok().and_then(|m| m.get(corr.as_bytes()).cloned())
    }

    pub fn count(&self) -> usize {
        self.replies.by_corr.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Waits (bounded) until the replies for all `corrs` arrived.
    pub async fn wait_all(&self, corrs: &[String], timeout: Duration) -> Result<()> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.replies.notify.notified();
            if corrs.iter().all(|c| self.reply(c).is_some()) {
                return Ok(());
            }
            if tokio::time::timeout_at(end, notified).await.is_err() {
                let missing = corrs.iter().filter(|c| self.reply(c).is_none()).count();
                anyhow::bail!("{missing} of {} replies missing after {timeout:?}", corrs.len());
            }
        }
    }

    /// One request and its reply.
    /// Sends raw bytes with a v5 Content Type (an image, a text) and waits for the reply.
    pub async fn request_typed(&self, topic: &str, corr: &str, payload: Vec<u8>, content_type: &str) -> Result<Value> {
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(Bytes::from(corr.as_bytes().to_vec())),
            content_type: Some(content_type.to_owned()),
            ..Default::default()
        };
        let c = self.client.lock().ok().map(|c| c.clone()).ok_or_else(|| anyhow!("lock"))?;
        c.publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props).await?;
        self.wait_all(&[corr.to_owned()], Duration::from_secs(30)).await?;
        self.reply(corr).ok_or_else(|| anyhow!("no reply"))
    }

    pub async fn request(&self, topic: &str, corr: &str, body: &Value) -> Result<Value> {
        self.send(topic, corr, body).await?;
        self.wait_all(&[corr.to_owned()], Duration::from_secs(30)).await?;
        self.reply(corr).ok_or_else(|| anyhow!("no reply"))
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A v3.1.1 client: no response topic, no correlation data.
pub struct V3Client {
    pub client: rumqttc::AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
    task: tokio::task::JoinHandle<()>,
}

impl V3Client {
    pub async fn connect(port: u16, id: &str, subscribe: &str) -> Result<V3Client> {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        let (client, mut ev) = rumqttc::AsyncClient::new(o, 64);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sub = subscribe.to_owned();
        let c = client.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            while let Ok(e) = ev.poll().await {
                match e {
                    rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                        let _ = c.subscribe(sub.clone(), rumqttc::QoS::AtLeastOnce).await;
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        if let Some(t) = ready.take() {
                            let _ = t.send(());
                        }
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        if let Ok(v) = serde_json::from_slice(&p.payload) {
                            let _ = tx.send((p.topic.clone(), v));
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .map_err(|_| anyhow!("v3 client did not subscribe"))??;
        Ok(V3Client { client, rx, task })
    }
}

impl Drop for V3Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `[mqtt]` TOML for a test broker.
pub fn mqtt_toml(url: &str, extra: &str) -> String {
    format!("[mqtt]\nurl = {url:?}\ninflight = 32\nsession_expiry = \"5m\"\n{extra}\n")
}
