//! MQTT-triggered inference through a real Mosquitto started per test: v5 request/response,
//! the v3.1.1 fallback, error replies, TLS with a password and an ACL, a broker restart, an
//! agent killed mid-stream, and two agents sharing one subscription.

use std::time::Duration;

use outpost_tests::broker::{Broker, BrokerOptions, Pki};
use outpost_tests::mqtt::{mqtt_toml, Login, Requester, V3Client};
use outpost_tests::*;
use serde_json::{json, Value};

use crate::outpost_bin;

const INFER: &str = "outpost/test-site/infer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_request_response_for_every_demo_model() -> anyhow::Result<()> {
    let broker = Broker::start(BrokerOptions::default())?;
    let agent = TestAgent::start(&[root().join("models")], &mqtt_toml(&broker.url(), "")).await?;
    let req = Requester::connect(broker.port, "pos-1", None, None).await?;
    for name in DEMO_MODELS {
        let golden = golden_for(&root().join("models").join(name))?;
        for case in 0..golden.golden.cases.len() {
            let corr = format!("{name}-{case}");
            let reply = req.request(&format!("{INFER}/{name}"), &corr, &golden.request(case)).await?;
            assert_eq!(reply["model_name"], name, "{reply}");
            assert_eq!(reply["id"], format!("golden-{case}"));
            golden.check(case, &reply)?;
        }
    }
    // By version too.
    let golden = golden_for(&root().join("models/mlp"))?;
    let reply = req.request(&format!("{INFER}/mlp/versions/1"), "v1", &golden.request(0)).await?;
    assert_eq!(reply["model_version"], "1");
    // Requests and their audit records carry the transport.
    let metrics = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    assert!(
        metrics.contains("outpost_inference_requests_total{model=\"mlp\",version=\"1\",outcome=\"ok\"}"),
        "{metrics}"
    );
    let recs = agent.agent.audit().expect("audit").range(1, u64::MAX, usize::MAX)?;
    assert!(recs
        .iter()
        .any(|(_, v)| serde_json::from_slice::<Value>(v).is_ok_and(|r| r["body"]["transport"] == "mqtt")));
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_clients_get_their_answer_on_the_result_topic() -> anyhow::Result<()> {
    let broker = Broker::start(BrokerOptions::default())?;
    let agent = TestAgent::start(&[root().join("models")], &mqtt_toml(&broker.url(), "")).await?;
    let mut v3 = V3Client::connect(broker.port, "plc-gw", "outpost/test-site/result/#").await?;
    let golden = golden_for(&root().join("models/cnn"))?;
    let mut body = golden.request(1);
    body["id"] = json!("plc-42");
    v3.client.publish(format!("{INFER}/cnn"), rumqttc::QoS::AtLeastOnce, false, serde_json::to_vec(&body)?).await?;
    let (topic, reply) = tokio::time::timeout(Duration::from_secs(30), v3.rx.recv()).await?.expect("reply");
    assert_eq!(topic, "outpost/test-site/result/cnn");
    assert_eq!(reply["id"], "plc-42");
    golden.check(1, &reply)?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_answered() -> anyhow::Result<()> {
    let broker = Broker::start(BrokerOptions::default())?;
    let agent =
        TestAgent::start(&[root().join("models")], &mqtt_toml(&broker.url(), "max_payload_bytes = 4096")).await?;
    let req = Requester::connect(broker.port, "pos-2", None, None).await?;
    let row = vec![0.5f32; 30];
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        ("bad json", format!("{INFER}/mlp"), b"{\"id\":\"x\",".to_vec(), "malformed request JSON"),
        (
            "unknown model",
            format!("{INFER}/nope"),
            serde_json::to_vec(
                &json!({"id": "u1", "inputs": [{"name": "X", "shape": [1, 30], "datatype": "FP32", "data": row}]}),
            )?,
            "unknown model 'nope'",
        ),
        (
            "wrong shape",
            format!("{INFER}/mlp"),
            serde_json::to_vec(
                &json!({"id": "s1", "inputs": [{"name": "X", "shape": [1, 29], "datatype": "FP32", "data": vec![0.5f32; 29]}]}),
            )?,
            "dimension 1 must be 30",
        ),
        (
            "wrong dtype",
            format!("{INFER}/mlp"),
            serde_json::to_vec(
                &json!({"id": "d1", "inputs": [{"name": "X", "shape": [1, 30], "datatype": "INT64", "data": vec![1; 30]}]}),
            )?,
            "must be FP32",
        ),
        ("too large", format!("{INFER}/mlp"), vec![b' '; 5000], "larger than 4096 bytes"),
        ("bad topic", format!("{INFER}/mlp/extra/parts"), b"{}".to_vec(), "expected outpost/test-site/infer/"),
    ];
    for (what, topic, payload, needle) in &cases {
        req.send_raw(topic, what, payload.clone()).await?;
        req.wait_all(&[(*what).to_owned()], Duration::from_secs(30)).await?;
        let reply = req.reply(what).expect("reply");
        let err = reply["error"].as_str().unwrap_or_default();
        assert!(err.contains(needle), "{what}: {reply}");
    }
    assert_eq!(req.reply("unknown model").expect("reply")["id"], "u1", "the id comes back with the error");
    assert_eq!(req.reply("wrong shape").expect("reply")["id"], "s1");
    // Still serving.
    let golden = golden_for(&root().join("models/mlp"))?;
    golden.check(0, &req.request(&format!("{INFER}/mlp"), "after", &golden.request(0)).await?)?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_password_login_and_an_acl_denial_reported() -> anyhow::Result<()> {
    let pki = Pki::generate()?;
    let acl = "user agent\ntopic readwrite outpost/#\ntopic readwrite replies/#\n\nuser pos\ntopic readwrite outpost/test-site/infer/#\ntopic readwrite replies/#\n\nuser locked\ntopic read nothing/#\n";
    let broker = Broker::start(BrokerOptions {
        tls: Some(&pki),
        users: vec![("agent", "agent-secret"), ("pos", "pos-secret"), ("locked", "locked-secret")],
        acl: Some(acl),
        persistence: false,
    })?;
    let dir = tempfile::tempdir()?;
    let pw = dir.path().join("mqtt.password");
    std::fs::write(&pw, "agent-secret\n")?;
    let extra = format!(
        "username = \"agent\"\npassword_file = {:?}\nca = {:?}\n",
        pw.display().to_string(),
        pki.path("ca.pem").display().to_string()
    );
    let agent = TestAgent::start(&[root().join("models")], &mqtt_toml(&broker.tls_url(), &extra)).await?;
    let req = Requester::connect(broker.port, "pos-3", Some(&pki), Some(Login { user: "pos", password: "pos-secret" }))
        .await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    golden.check(2, &req.request(&format!("{INFER}/mlp"), "tls-1", &golden.request(2)).await?)?;
    agent.stop().await?;

    // An agent whose account may not subscribe to the request topics says so clearly: in its
    // log, and as an alarm in its status.
    std::fs::write(&pw, "locked-secret\n")?;
    let extra = extra.replace("username = \"agent\"", "username = \"locked\"\nclient_id = \"locked-node\"");
    let state = tempfile::tempdir()?;
    let path = state.path().join("outpost.toml");
    std::fs::write(&path, config_text(state.path(), &[root().join("models")], &mqtt_toml(&broker.tls_url(), &extra)))?;
    let mut child = ChildAgent::spawn(&outpost_bin(), &["run", "--config", path.to_str().unwrap_or_default()])?;
    let addr = child.wait_listening()?;
    let line = child.wait_for("mqtt not authorized", Duration::from_secs(60))?;
    assert!(line.contains("ACL"), "{line}");
    let status: Value = http_client().get(format!("http://{addr}/admin/status")).send().await?.json().await?;
    let alarm = status["alarms"]["mqtt_not_authorized"].as_str().unwrap_or_default();
    assert!(alarm.contains("refused") && alarm.contains("ACL"), "alarm: {alarm:?}");
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(30))?, 0);
    Ok(())
}

fn agent_config(
    dir: &std::path::Path,
    models: &std::path::Path,
    broker: &Broker,
    extra: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, config_text(dir, &[models.to_path_buf()], &mqtt_toml(&broker.url(), extra)))?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_request() -> anyhow::Result<()> {
    let mut broker = Broker::start(BrokerOptions { persistence: true, ..Default::default() })?;
    let models = mlp_only()?;
    let agent = TestAgent::start(&[models.path().to_path_buf()], &mqtt_toml(&broker.url(), "")).await?;
    let req = Requester::connect(broker.port, "pos-restart", None, None).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut pending = Vec::new();
    for i in 0..200 {
        let corr = format!("r{i}");
        let (topic, body) = (format!("{INFER}/mlp"), golden.request(i % 3));
        // Publishing into a broker that is restarting may fail: the requester retries below.
        let _ = req.send(&topic, &corr, &body).await;
        pending.push((corr, topic, body));
        if i == 100 {
            broker.restart()?;
        }
    }
    let rounds = req.resend_until_answered(&pending, 20, Duration::from_secs(3)).await?;
    eprintln!("all 200 answered; {rounds} resend rounds after the broker restart");
    let corrs: Vec<String> = pending.iter().map(|(c, _, _)| c.clone()).collect();
    for (i, c) in corrs.iter().enumerate() {
        let reply = req.reply(c).expect("reply");
        golden.check(i % 3, &reply).map_err(|e| anyhow::anyhow!("{c}: {e}: {reply}"))?;
    }
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_stream_gets_its_unacked_requests_redelivered() -> anyhow::Result<()> {
    let broker = Broker::start(BrokerOptions::default())?;
    let models = mlp_only()?;
    let dir = tempfile::tempdir()?;
    let config = agent_config(dir.path(), models.path(), &broker, "shared_group = \"\"")?;
    let args = ["run", "--config", config.to_str().unwrap_or_default()];
    let req = Requester::connect(broker.port, "pos-kill", None, None).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
    child.seen_or_wait_for("mqtt connected", Duration::from_secs(60))?;
    let mut pending = Vec::new();
    for i in 0..300 {
        let (corr, topic, body) = (format!("k{i}"), format!("{INFER}/mlp"), golden.request(i % 3));
        req.send(&topic, &corr, &body).await?;
        pending.push((corr, topic, body));
    }
    // Kill it while it works through the stream.
    while req.count() < 20 {
        let n = req.replies.notify.notified();
        if req.count() >= 20 {
            break;
        }
        tokio::time::timeout(Duration::from_secs(30), n).await?;
    }
    child.signal("KILL")?;
    let _ = child.wait_status(Duration::from_secs(30))?;
    let before = req.count();
    assert!(before < 300, "killed mid-stream ({before} answered)");
    // Its persistent session kept the rest (and the unacknowledged ones) for its return.
    let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
    child.wait_for("session_present=true", Duration::from_secs(60))?;
    let corrs: Vec<String> = pending.iter().map(|(c, _, _)| c.clone()).collect();
    let first = req.wait_all(&corrs, Duration::from_secs(30)).await;
    let missing_ids: Vec<&String> = corrs.iter().filter(|c| req.reply(c).is_none()).collect();
    let missing = missing_ids.len();
    if missing > 0 {
        eprintln!("unanswered without retry: {missing_ids:?}; log:\n{}", child.log.join("\n"));
    }
    // At-least-once: a requester retries what stays unanswered; say how many needed it.
    let rounds = req.resend_until_answered(&pending, 10, Duration::from_secs(3)).await?;
    eprintln!("{before} answered before the kill; after the restart {} without a retry, {missing} after {rounds} retry rounds", 300 - missing);
    if first.is_err() {
        eprintln!("note: {missing} request(s) needed a requester retry after the kill");
    }
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(30))?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_the_load_and_one_takes_over_when_the_other_dies() -> anyhow::Result<()> {
    let broker = Broker::start(BrokerOptions::default())?;
    let models = mlp_only()?;
    let golden = golden_for(&root().join("models/mlp"))?;
    // A short session expiry: a dead member's share goes to the living one after 2 s.
    let extra = "session_expiry = \"2s\"";
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut agents = Vec::new();
    for (dir, name) in [(&da, "node-a"), (&db, "node-b")] {
        let path = dir.path().join("outpost.toml");
        let text = config_text(dir.path(), &[models.path().to_path_buf()], &mqtt_toml(&broker.url(), extra))
            .replace("session_expiry = \"5m\"\n", "")
            .replace("name = \"test-node\"", &format!("name = \"{name}\""));
        std::fs::write(&path, text)?;
        let mut child = ChildAgent::spawn(&outpost_bin(), &["run", "--config", path.to_str().unwrap_or_default()])?;
        let addr = child.wait_listening()?;
        child.seen_or_wait_for("mqtt connected", Duration::from_secs(60))?;
        agents.push((child, addr));
    }
    let req = Requester::connect(broker.port, "pos-shared", None, None).await?;
    let mut corrs = Vec::new();
    for i in 0..100 {
        let corr = format!("s{i}");
        req.send(&format!("{INFER}/mlp"), &corr, &golden.request(i % 3)).await?;
        corrs.push(corr);
    }
    req.wait_all(&corrs, Duration::from_secs(60)).await?;
    let http = http_client();
    let mut served = Vec::new();
    let mut outcomes = Vec::new();
    for (_, addr) in &agents {
        let m = http.get(format!("http://{addr}/metrics")).send().await?.text().await?;
        // Every outcome line, so a failure says what the other answers were.
        outcomes.extend(
            m.lines()
                .filter(|l| l.starts_with("outpost_inference_requests_total{model=\"mlp\"") && !l.ends_with(" 0"))
                .map(|l| format!("{addr}: {l}")),
        );
        let n: u64 = m
            .lines()
            .find(|l| l.starts_with("outpost_inference_requests_total{model=\"mlp\",version=\"1\",outcome=\"ok\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        served.push(n);
    }
    eprintln!("shared subscription split: {served:?}");
    assert!(served.iter().all(|&n| n > 0) && served.iter().sum::<u64>() == 100, "{served:?} {outcomes:#?}");

    // Kill node-a; requesters retry what goes unanswered; node-b answers everything once
    // node-a's session has expired.
    let (mut dead, _) = agents.remove(0);
    dead.signal("KILL")?;
    let _ = dead.wait_status(Duration::from_secs(30))?;
    let mut pending: Vec<(String, usize)> = (0..100).map(|i| (format!("t{i}"), i % 3)).collect();
    for (corr, case) in &pending {
        req.send(&format!("{INFER}/mlp"), corr, &golden.request(*case)).await?;
    }
    let mut attempts = 0;
    while !pending.is_empty() {
        attempts += 1;
        assert!(attempts <= 10, "{} requests unanswered after 10 attempts", pending.len());
        let corrs: Vec<String> = pending.iter().map(|(c, _)| c.clone()).collect();
        if req.wait_all(&corrs, Duration::from_secs(3)).await.is_ok() {
            break;
        }
        pending.retain(|(c, _)| req.reply(c).is_none());
        for (corr, case) in &pending {
            req.send(&format!("{INFER}/mlp"), corr, &golden.request(*case)).await?;
        }
    }
    eprintln!("takeover needed {attempts} attempt rounds");
    let (mut live, _) = agents.remove(0);
    live.signal("TERM")?;
    assert_eq!(live.wait_exit(Duration::from_secs(30))?, 0);
    Ok(())
}

/// A reload that moves `[mqtt]` to another broker reconnects there without a restart, and
/// says so; settings the client cannot use are refused and the running connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_mqtt_to_another_broker_live() -> anyhow::Result<()> {
    let first = Broker::start(BrokerOptions::default())?;
    let second = Broker::start(BrokerOptions::default())?;
    let models = mlp_only()?;
    let agent = TestAgent::start(&[models.path().to_owned()], &mqtt_toml(&first.url(), "")).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    // The agent subscribes a moment after it is started (and after a reload moves it): a
    // request published before that has no subscriber, so the requester sends again until
    // answered, as a client of a restarting agent does.
    let ask = |req: Requester, corr: &'static str| {
        let body = golden.request(0);
        async move {
            let pending = [(corr.to_owned(), format!("{INFER}/mlp"), body)];
            req.send(&pending[0].1, corr, &pending[0].2).await?;
            req.resend_until_answered(&pending, 30, std::time::Duration::from_secs(1)).await?;
            req.reply(corr).ok_or_else(|| anyhow::anyhow!("no reply to {corr}"))
        }
    };
    golden.check(0, &ask(Requester::connect(first.port, "pos-a", None, None).await?, "a").await?)?;

    let text = std::fs::read_to_string(agent.config_path())?;
    let moved = text.replace(&first.url(), &second.url());
    std::fs::write(agent.config_path(), &moved)?;
    let report = agent.agent.reload(outpost::config::Config::load(&agent.config_path())?).await;
    assert!(report.ok() && report.applied == ["[mqtt]"], "{report:?}");
    golden.check(0, &ask(Requester::connect(second.port, "pos-b", None, None).await?, "b").await?)?;
    let (_, status) = agent.get("/admin/status").await?;
    assert_eq!(status["mqtt"]["broker"], format!("127.0.0.1:{}", second.port), "{status}");

    // A password file that does not exist: refused, the connection to the second broker
    // stays, and the stored configuration keeps the running [mqtt].
    let bad = moved.replace("inflight = 32", "inflight = 32\nusername = \"till\"\npassword_file = \"/nonexistent/pw\"");
    std::fs::write(agent.config_path(), &bad)?;
    match outpost::config::Config::load(&agent.config_path()) {
        Ok(cfg) => {
            let report = agent.agent.reload(cfg).await;
            assert!(!report.ok() && report.failed.iter().any(|f| f.starts_with("[mqtt]")), "{report:?}");
            assert!(
                agent.agent.config().mqtt.as_ref().is_some_and(|m| m.username.is_none()),
                "refused value not stored"
            );
        }
        Err(e) => assert!(e.to_string().contains("password_file"), "{e}"),
    }
    // Still subscribed there: answered at the first try.
    let req = Requester::connect(second.port, "pos-c", None, None).await?;
    golden.check(0, &req.request(&format!("{INFER}/mlp"), "c", &golden.request(0)).await?)?;
    agent.stop().await
}
