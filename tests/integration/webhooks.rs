//! The event stream, end to end: webhooks to a real HTTP receiver in this process (signed,
//! ordered, retried after 500s and timeouts, at least once across kill -9, dead-lettered after
//! their attempts) and the same events on a real Mosquitto.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use axum::http::{HeaderMap, StatusCode};
use outpost_tests::broker::{Broker, BrokerOptions};
use outpost_tests::mqtt::mqtt_toml;
use outpost_tests::*;
use serde_json::Value;

/// A Standard Webhooks secret (`whsec_` and base64).
pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver does with the next request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Answer {
    Status(u16),
    /// Answers only after this long (past the agent's timeout).
    Late(Duration),
    /// Never answers (the connection stays open until the agent goes away).
    Hold,
    /// A 307 to this URL.
    Redirect(&'static str),
    /// This status with a body of this many bytes.
    Huge(u16, usize),
}

#[derive(Default)]
pub(crate) struct Received {
    /// Every request, in arrival order: headers, body, and the status answered (None: none).
    pub(crate) requests: Vec<(HeaderMap, bytes::Bytes, Option<u16>)>,
    script: VecDeque<Answer>,
    /// Answer for requests past the script.
    then: Option<Answer>,
}

#[derive(Clone)]
pub(crate) struct Receiver {
    pub(crate) state: Arc<Mutex<Received>>,
    changed: Arc<tokio::sync::Notify>,
    pub(crate) url: String,
}

impl Receiver {
    pub(crate) async fn start(
        script: Vec<Answer>,
        then: Answer,
    ) -> Result<(Receiver, tokio::sync::oneshot::Sender<()>)> {
        let state = Arc::new(Mutex::new(Received { script: script.into(), then: Some(then), ..Default::default() }));
        let changed = Arc::new(tokio::sync::Notify::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let (s, c) = (state.clone(), changed.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: bytes::Bytes| {
                let (s, c) = (s.clone(), c.clone());
                async move {
                    let (i, answer) = {
                        let mut g = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let answer = g.script.pop_front().or(g.then).unwrap_or(Answer::Status(200));
                        g.requests.push((headers, body, None));
                        (g.requests.len() - 1, answer)
                    };
                    c.notify_waiters();
                    let mut location = None;
                    let mut body = Vec::new();
                    let status = match answer {
                        Answer::Status(code) => code,
                        Answer::Redirect(to) => {
                            location = Some(to);
                            307
                        }
                        Answer::Huge(code, n) => {
                            body = vec![b'x'; n];
                            code
                        }
                        Answer::Late(d) => {
                            tokio::time::sleep(d).await;
                            200
                        }
                        Answer::Hold => {
                            std::future::pending::<()>().await;
                            200
                        }
                    };
                    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).requests[i].2 = Some(status);
                    c.notify_waiters();
                    let mut r = axum::response::Response::new(axum::body::Body::from(body));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                    if let Some(to) = location {
                        r.headers_mut().insert("location", axum::http::HeaderValue::from_static(to));
                    }
                    r
                }
            }),
        );
        let stop = serve_until_stopped(listener, app);
        Ok((Receiver { state, changed, url }, stop))
    }

    /// Waits (bounded) until `cond` holds over what was received.
    pub(crate) async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Received) -> bool,
    ) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if cond(&self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)) {
                return Ok(());
            }
            let left =
                end.checked_duration_since(Instant::now()).ok_or_else(|| anyhow!("timed out waiting: {what}"))?;
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// (sequence, id, type, status answered) of every request.
    fn deliveries(&self) -> Vec<(u64, String, String, Option<u16>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .requests
            .iter()
            .map(|(h, b, st)| {
                let v: Value = serde_json::from_slice(b).unwrap_or(Value::Null);
                let seq = v["sequence"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
                let id = h.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                (seq, id, v["type"].as_str().unwrap_or_default().to_owned(), *st)
            })
            .collect()
    }
}

fn hook_toml(dir: &std::path::Path, url: &str, timeout: &str, extra: &str) -> Result<String> {
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, format!("{SECRET}\n"))?;
    Ok(format!(
        "[[webhooks]]\nname = \"ops\"\nurl = {url:?}\nallow_http = true\nsecret_file = {:?}\ntimeout = {timeout:?}\n\
         retry_initial = \"20ms\"\nretry_max = \"100ms\"\n{extra}\n",
        secret.display().to_string()
    ))
}

/// Runs the README's ten-line Python verifier on a delivery, as is and with its body changed.
pub(crate) fn readme_verifier(headers: &HeaderMap, body: &[u8]) -> Result<(bool, bool)> {
    let readme = std::fs::read_to_string(root().join("README.md"))?;
    let after = readme.split("by hand, in Python:").nth(1).ok_or_else(|| anyhow!("README: no verifier"))?;
    let code = after
        .split("```python\n")
        .nth(1)
        .and_then(|c| c.split("```").next())
        .ok_or_else(|| anyhow!("README: no python block"))?;
    let dir = tempfile::tempdir()?;
    let h: BTreeMap<String, String> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|k| (k.to_string(), headers.get(*k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()))
        .collect();
    std::fs::write(dir.path().join("headers.json"), serde_json::to_vec(&h)?)?;
    std::fs::write(dir.path().join("body"), body)?;
    let script = format!(
        "{code}\nimport json, sys\nh = json.load(open(sys.argv[1]))\nb = open(sys.argv[2], 'rb').read()\n\
         print(verify({SECRET:?}, h, b), verify({SECRET:?}, h, b + b' '))\n"
    );
    let python = std::env::var("OUTPOST_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dir.path().join("headers.json"))
        .arg(dir.path().join("body"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    Ok((text.starts_with("True"), text.ends_with("True")))
}

/// Every delivered (2xx) event, in order, has the next sequence: none lost, none out of order.
fn assert_gapless(deliveries: &[(u64, String, String, Option<u16>)]) -> Result<()> {
    let delivered: Vec<u64> =
        deliveries.iter().filter(|d| d.3.is_some_and(|s| (200..300).contains(&s))).map(|d| d.0).collect();
    let mut first: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, s) in delivered.iter().enumerate() {
        first.entry(*s).or_insert(i);
    }
    let seqs: Vec<u64> = first.keys().copied().collect();
    ensure!(!seqs.is_empty(), "nothing delivered");
    ensure!(seqs == (1..=seqs.len() as u64).collect::<Vec<_>>(), "sequences delivered: {seqs:?}");
    // First deliveries come in sequence order (a repeat may follow a restart).
    let order: Vec<usize> = first.values().copied().collect();
    ensure!(order.windows(2).all(|w| w[0] < w[1]), "out of order: {delivered:?}");
    Ok(())
}

#[tokio::test]
async fn webhooks_are_signed_ordered_retried_and_shown_when_dead() -> Result<()> {
    let models = mlp_only()?;
    // The first delivery gets a 500, its retry times out, the third attempt succeeds.
    let (rx, _stop) =
        Receiver::start(vec![Answer::Status(500), Answer::Late(Duration::from_secs(3))], Answer::Status(200)).await?;
    let state = tempfile::tempdir()?;
    let extra = hook_toml(state.path(), &rx.url, "1s", "events = [\"io.outpost.model.*\", \"io.outpost.admin.*\"]")?;
    let agent = TestAgent::start_with_state(state, &[models.path().to_owned()], &extra).await?;
    // More events: an unload and a load by hand.
    for action in ["unload", "load"] {
        let (s, v) = agent.post(&format!("/v2/repository/models/mlp/{action}"), &serde_json::json!({})).await?;
        ensure!(s == 200, "{action}: {s} {v}");
    }
    rx.wait_until("the load's events delivered", Duration::from_secs(30), |r| {
        r.requests
            .iter()
            .any(|(_, b, st)| *st == Some(200) && String::from_utf8_lossy(b).contains("io.outpost.admin.load"))
    })
    .await?;
    let deliveries = rx.deliveries();
    assert_gapless(&deliveries)?;
    // The first event: 500, a timeout, then 200, always with the same id.
    let first_id = &deliveries[0].1;
    let attempts: Vec<_> = deliveries.iter().filter(|d| &d.1 == first_id).collect();
    ensure!(attempts.len() >= 3, "attempts of the first event: {attempts:?}");
    ensure!(attempts[0].3 == Some(500), "{attempts:?}");
    let types: Vec<&str> = deliveries.iter().map(|d| d.2.as_str()).collect();
    for t in ["io.outpost.model.activated", "io.outpost.model.unloaded", "io.outpost.admin.unload"] {
        ensure!(types.contains(&t), "no {t} in {types:?}");
    }

    // Each request verifies as Standard Webhooks; the same request with one byte changed does not.
    let signer = standardwebhooks::Webhook::new(SECRET)?;
    let requests = rx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).requests.clone();
    for (headers, body, _) in &requests {
        ensure!(
            headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("application/cloudevents+json")),
            "content type: {headers:?}"
        );
        signer.verify(body, headers).map_err(|e| anyhow!("signature refused: {e:?}"))?;
        let mut tampered = body.to_vec();
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        ensure!(signer.verify(&tampered, headers).is_err(), "a tampered body verified");
        let event: Value = serde_json::from_slice(body)?;
        ensure!(event["specversion"] == "1.0" && event["source"] == "/outpost/test-site/test-node", "{event}");
        ensure!(event["id"].as_str() == headers.get("webhook-id").and_then(|v| v.to_str().ok()), "{event}");
    }
    // A replayed request with an old timestamp is refused by the receiver's check.
    let (headers, body, _) = &requests[0];
    let mut stale = headers.clone();
    stale.insert("webhook-timestamp", "1000000000".parse()?);
    ensure!(signer.verify(body, &stale).is_err(), "a stale timestamp verified");
    // The README's Python verifier agrees: the request verifies, a changed body does not.
    let (ok, tampered) = readme_verifier(headers, body)?;
    ensure!(ok && !tampered, "README verifier: genuine {ok}, tampered {tampered}");

    // Nothing waits; delivered and failed counts are in the status.
    let (_, status) = agent.get("/admin/status").await?;
    let hook = &status["webhooks"][0];
    ensure!(hook["name"] == "ops" && hook["queued"] == 0, "{hook}");
    ensure!(hook["failed_attempts"].as_u64() >= Some(2), "{hook}");
    // And in the metrics.
    let metrics = http_client().get(agent.url("/metrics")).send().await?.text().await?;
    let delivered = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_webhook_delivered_total{webhook=\"ops\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    ensure!(delivered.is_some_and(|n| n >= 4), "delivered in /metrics: {delivered:?}");
    agent.stop().await?;

    // A receiver that always fails: after max_attempts the event is dead-lettered, in status.
    let (bad, _stop2) = Receiver::start(vec![], Answer::Status(503)).await?;
    let state = tempfile::tempdir()?;
    let extra = hook_toml(state.path(), &bad.url, "1s", "max_attempts = 2")?;
    let agent = TestAgent::start_with_state(state, &[models.path().to_owned()], &extra).await?;
    let end = Instant::now() + Duration::from_secs(30);
    let hook = loop {
        let seen = bad.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).requests.len();
        let (_, status) = agent.get("/admin/status").await?;
        let hook = status["webhooks"][0].clone();
        if hook["dead_letter_count"].as_u64() >= Some(1) {
            break hook;
        }
        ensure!(Instant::now() < end, "nothing dead-lettered: {hook}");
        // Look again after the next attempt (or a moment, once attempts are over).
        let _ = bad.wait_until("another attempt", Duration::from_millis(500), |r| r.requests.len() > seen).await;
    };
    let dead = &hook["dead_letter"][0];
    ensure!(dead["attempts"] == 2, "{hook}");
    ensure!(dead["error"].as_str().is_some_and(|e| e.contains("503")), "{hook}");
    ensure!(dead["id"].as_str().is_some_and(|id| !id.is_empty()), "{hook}");
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_kill_9_mid_delivery_loses_no_event_and_repeats_the_same_id() -> Result<()> {
    let models = mlp_only()?;
    // The first delivery is held open; the agent is killed while it waits.
    let (rx, _stop) = Receiver::start(vec![Answer::Hold], Answer::Status(200)).await?;
    let state = tempfile::tempdir()?;
    let extra = hook_toml(state.path(), &rx.url, "60s", "")?;
    let config = state.path().join("outpost.toml");
    std::fs::write(&config, config_text(state.path(), &[models.path().to_owned()], &extra))?;
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_outpost-under-test"));
    let args = ["run", "--config", config.to_str().unwrap_or_default()];
    let mut child = ChildAgent::spawn(&bin, &args)?;
    rx.wait_until("the first delivery", Duration::from_secs(60), |r| !r.requests.is_empty()).await?;
    child.signal("KILL")?;
    let _ = child.wait_status(Duration::from_secs(30))?;
    let held = rx.deliveries()[0].clone();
    ensure!(held.3.is_none(), "the held delivery was answered: {held:?}");

    // Restarted, the agent sends the held event again (same id), then the rest, in order.
    let mut child = ChildAgent::spawn(&bin, &args)?;
    child.wait_for("initial model load finished", Duration::from_secs(60))?;
    rx.wait_until("the held event again", Duration::from_secs(30), |r| r.requests.len() >= 2).await?;
    let second = rx.deliveries()[1].clone();
    ensure!(second.1 == held.1 && second.0 == held.0, "after the restart came {second:?}, before {held:?}");
    // The restart's own activation follows it.
    rx.wait_until("the restart's events", Duration::from_secs(30), |r| {
        r.requests.iter().filter(|(_, _, st)| *st == Some(200)).count() >= 2
    })
    .await?;
    assert_gapless(&rx.deliveries())?;
    child.signal("TERM")?;
    ensure!(child.wait_exit(Duration::from_secs(30))? == 0, "unclean stop");
    Ok(())
}

#[tokio::test]
async fn events_are_published_on_mqtt_by_type() -> Result<()> {
    let broker = Broker::start(BrokerOptions::default())?;
    let models = mlp_only()?;
    let agent = TestAgent::start(&[models.path().to_owned()], &mqtt_toml(&broker.url(), "")).await?;
    let opts = rumqttc::MqttOptions::new("events-reader", "127.0.0.1", broker.port);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
    client.subscribe("outpost/test-site/events/#", rumqttc::QoS::AtLeastOnce).await?;
    // Subscribed first (SubAck), then the unload happens.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        ensure!(Instant::now() < end, "no SubAck");
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) =
            tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await??
        {
            break;
        }
    }
    let (s, v) = agent.post("/v2/repository/models/mlp/unload", &serde_json::json!({})).await?;
    ensure!(s == 200, "{s} {v}");
    let (topic, event) = loop {
        ensure!(Instant::now() < end, "no unloaded event on MQTT");
        if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
            tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await??
        {
            let event: Value = serde_json::from_slice(&p.payload)?;
            if event["type"] == "io.outpost.model.unloaded" {
                break (p.topic.clone(), event);
            }
        }
    };
    ensure!(topic == "outpost/test-site/events/io.outpost.model.unloaded", "{topic}");
    ensure!(event["specversion"] == "1.0" && event["subject"] == "mlp", "{event}");
    ensure!(event["data"]["model"] == "mlp", "{event}");
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn redirects_huge_answers_and_floods_stay_bounded() -> Result<()> {
    let models = mlp_only()?;
    // Where a redirect would send the events: it must never be reached.
    let (elsewhere, _s1) = Receiver::start(vec![], Answer::Status(200)).await?;
    let to: &'static str = Box::leak(elsewhere.url.clone().into_boxed_str());
    // The receiver redirects, then answers every attempt 500 with 1 MiB of body.
    let (rx, _s2) = Receiver::start(vec![Answer::Redirect(to)], Answer::Huge(500, 1 << 20)).await?;
    let state = tempfile::tempdir()?;
    let extra = hook_toml(state.path(), &rx.url, "5s", "max_attempts = 1000\nmax_queued = 3")?;
    let agent = TestAgent::start_with_state(state, &[models.path().to_owned()], &extra).await?;
    rx.wait_until("the redirect and the huge answer", Duration::from_secs(30), |r| {
        r.requests.iter().filter(|q| q.2.is_some()).count() >= 3
    })
    .await?;
    ensure!(
        elsewhere.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).requests.is_empty(),
        "a redirect was followed"
    );
    // A flood of events into a queue of 3: the oldest go to the dead-letter list.
    for _ in 0..10 {
        for action in ["unload", "load"] {
            let (s, v) = agent.post(&format!("/v2/repository/models/mlp/{action}"), &serde_json::json!({})).await?;
            ensure!(s == 200, "{action}: {s} {v}");
        }
    }
    let (_, status) = agent.get("/admin/status").await?;
    let hook = &status["webhooks"][0];
    ensure!(hook["queued"].as_u64().is_some_and(|q| q <= 3), "{hook}");
    ensure!(hook["dead_letter_count"].as_u64().is_some_and(|d| d >= 30), "{hook}");
    let full = hook["dead_letter"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["error"].as_str().is_some_and(|e| e.contains("queue full")));
    ensure!(full, "{hook}");
    // Each 1 MiB answer was cut to its start in the error; the agent serves on.
    let last = hook["last_error"].as_str().unwrap_or_default();
    ensure!(last.contains("500") && last.len() < 600, "last error: {} bytes", last.len());
    let (s, _) = agent.get("/v2/health/ready").await?;
    ensure!(s == 200, "not ready after the flood");
    agent.stop().await?;
    Ok(())
}
