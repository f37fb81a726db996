//! Compliance: data-subject requests (find a subject's records, erase by destroying key
//! epochs) and secrets read from a systemd credentials directory.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Result};
use outpost::auth::Role;
use outpost_tests::broker::Pki;
use outpost_tests::*;
use serde_json::{json, Value};

use crate::outpost_bin;
use crate::webhooks::{readme_verifier, Answer, Receiver, SECRET};

fn outpost(args: &[&str], env: &[(&str, &Path)]) -> Result<Output> {
    let mut cmd = Command::new(outpost_bin());
    cmd.args(args).env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The request ids of NDJSON audit records.
fn ids(ndjson: &str) -> Result<Vec<String>> {
    ndjson
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok(v["body"]["request_id"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_returns_a_subjects_records_and_forget_unlinks_ended_key_epochs() -> Result<()> {
    let agent = TestAgent::start(
        &[root().join("models")],
        "[privacy]\npseudonymize = [\"parameters.customer_id\", \"parameters.card\"]\n",
    )
    .await?;
    let config = agent.config_path();
    let cfg = config.to_str().unwrap_or_default();
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut sent: Vec<(String, &str, u64)> = Vec::new();
    let mut send = |n: usize, who: &'static str, field: &'static str, epoch: u64| {
        let base = sent.len();
        let reqs: Vec<(String, Value)> = (0..n)
            .map(|i| {
                let id = format!("req-{}", base + i);
                let mut body = golden.request(i % 3);
                body["id"] = json!(id);
                body["parameters"] = json!({ field: who, "store": "north" });
                (id, body)
            })
            .collect();
        for (id, _) in &reqs {
            sent.push((id.clone(), who, epoch));
        }
        reqs
    };
    // Epoch 1: alice three times (once under another parameter), bob twice.
    for (_, body) in send(2, "alice", "customer_id", 1).into_iter().chain(send(1, "alice", "card", 1)) {
        assert_eq!(agent.post("/v2/models/mlp/infer", &body).await?.0, 200);
    }
    for (_, body) in send(2, "bob", "customer_id", 1) {
        assert_eq!(agent.post("/v2/models/mlp/infer", &body).await?.0, 200);
    }
    let out = outpost(&["audit", "rotate-key", "--config", cfg, "--url", &agent.base], &[])?;
    ensure!(out.status.code() == Some(0), "rotate-key: {:?}", text(&out));
    ensure!(text(&out).0.contains("key epoch 1 ended; epoch 2 started"), "{:?}", text(&out));
    // Epoch 2: alice twice, bob once.
    for (_, body) in send(2, "alice", "customer_id", 2).into_iter().chain(send(1, "bob", "customer_id", 2)) {
        assert_eq!(agent.post("/v2/models/mlp/infer", &body).await?.0, 200);
    }
    let want = |who: &str, min_epoch: u64, only_customer: bool| -> Vec<String> {
        sent.iter()
            .enumerate()
            .filter(|(i, (_, w, e))| *w == who && *e >= min_epoch && !(only_customer && *i == 2))
            .map(|(_, (id, _, _))| id.clone())
            .collect()
    };

    // Each record names its key epoch; the clear value is nowhere in the log.
    let export = outpost(&["audit", "export", "--config", cfg], &[])?;
    let log = text(&export).0;
    ensure!(!log.contains("alice") && !log.contains("\"bob\""), "a clear value in the audit log");
    let epochs: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["body"]["kind"] == "inference")
        .filter_map(|v| v["body"]["key_epoch"].as_u64())
        .collect();
    ensure!(epochs == [1, 1, 1, 1, 1, 2, 2, 2], "key epochs: {epochs:?}");

    // find: exactly the subject's records, over both epochs and any parameter.
    let out = outpost(&["audit", "find", "--subject", "alice", "--config", cfg], &[])?;
    ensure!(out.status.code() == Some(0), "find: {:?}", text(&out));
    ensure!(ids(&text(&out).0)? == want("alice", 1, false), "find alice: {:?}", text(&out));
    let out = outpost(&["audit", "find", "--subject", "alice", "--param", "customer_id", "--config", cfg], &[])?;
    ensure!(ids(&text(&out).0)? == want("alice", 1, true), "find alice --param: {:?}", text(&out));
    let out = outpost(&["audit", "find", "--subject", "bob", "--config", cfg], &[])?;
    ensure!(ids(&text(&out).0)? == want("bob", 1, false), "find bob: {:?}", text(&out));
    let out = outpost(&["audit", "find", "--subject", "carol", "--config", cfg], &[])?;
    ensure!(out.status.code() == Some(1) && text(&out).0.is_empty(), "find carol: {:?}", text(&out));

    // forget: epoch 1 has ended, so its key goes; epoch 2 is current and stays.
    let epochs_file = agent.state.path().join("privacy/epochs.json");
    let before: Value = serde_json::from_slice(&std::fs::read(&epochs_file)?)?;
    let wrapped_1 = before["epochs"][0]["key"].as_str().unwrap_or_default().to_owned();
    ensure!(before["epochs"][0]["id"] == 1 && wrapped_1.len() == 64, "{before}");
    let out = outpost(&["audit", "forget", "--before", "now", "--config", cfg, "--url", &agent.base], &[])?;
    ensure!(out.status.code() == Some(0), "forget: {:?}", text(&out));
    ensure!(text(&out).0.contains("destroyed the key of epoch 1"), "{:?}", text(&out));
    ensure!(!std::fs::read_to_string(&epochs_file)?.contains(&wrapped_1), "epoch 1's key is still on disk");

    // Only epoch 2's records can be linked now; epoch 1's are counted as unlinkable.
    let out = outpost(&["audit", "find", "--subject", "alice", "--config", cfg], &[])?;
    ensure!(ids(&text(&out).0)? == want("alice", 2, false), "find after forget: {:?}", text(&out));
    ensure!(text(&out).1.contains("5 records are of key epochs [1]"), "{:?}", text(&out));
    // The act is itself a record, and the chain still verifies.
    let log = text(&outpost(&["audit", "export", "--config", cfg], &[])?).0;
    ensure!(
        log.lines().any(|l| l.contains("\"action\":\"forget\"") && l.contains("destroyed the keys of epochs [1]")),
        "no forget record"
    );
    let out = outpost(&["audit", "verify", "--config", cfg], &[])?;
    ensure!(out.status.code() == Some(0), "verify after forget: {:?}", text(&out));
    // Nothing ended since: a second forget destroys nothing; the agent serves on.
    let out = outpost(&["audit", "forget", "--before", "now", "--config", cfg, "--url", &agent.base], &[])?;
    ensure!(text(&out).0.contains("nothing destroyed"), "{:?}", text(&out));
    assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(0)).await?.0, 200);
    // A date that is not one is refused at the prompt and by the agent.
    let out = outpost(&["audit", "forget", "--before", "last tuesday", "--config", cfg, "--url", &agent.base], &[])?;
    ensure!(out.status.code() == Some(64), "{:?}", text(&out));
    let r = agent.http.post(agent.url("/admin/privacy/forget?before=yesterday")).send().await?;
    ensure!(r.status() == 400, "{}", r.status());
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_a_credentials_directory_and_never_reach_logs_or_the_audit_log() -> Result<()> {
    let pki = Pki::generate()?;
    let models = mlp_only()?;
    let (rx, _stop) = Receiver::start(vec![], Answer::Status(200)).await?;
    let state = tempfile::tempdir()?;
    let creds = tempfile::tempdir()?;
    let c = creds.path();
    let hmac_key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
    std::fs::write(c.join("hmac.key"), &hmac_key)?;
    std::fs::write(c.join("store.key"), [0x5au8; 32])?;
    std::fs::copy(pki.path("server.pk8.key"), c.join("tls.key"))?;
    std::fs::write(c.join("webhook.secret"), format!("{SECRET}\n"))?;
    let (token, entry) = outpost::auth::create_token("ops", &[Role::Admin], None).map_err(anyhow::Error::msg)?;
    std::fs::write(c.join("cli.token"), format!("{token}\n"))?;
    let out = outpost(&["keygen", "--out", c.join("node").to_str().unwrap_or_default()], &[])?;
    ensure!(out.status.success(), "keygen: {:?}", text(&out));

    let dirs = format!("{:?}", models.path().display().to_string());
    let toml = format!(
        "[node]\nsite = \"test-site\"\nname = \"test-node\"\nstate_dir = {state:?}\nkey_file = \"credential:node.key\"\n\n\
         [http]\nlisten = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = \"credential:tls.key\"\n\n\
         [local_models]\ndirs = [{dirs}]\n\n[store]\nkey_file = \"credential:store.key\"\n\n\
         [auth]\ntokens = [{entry}]\n\n[cli]\ntoken_file = \"credential:cli.token\"\nca = {ca:?}\n\n\
         [privacy]\nhmac_key_file = \"credential:hmac.key\"\npseudonymize = [\"parameters.customer_id\"]\n\n\
         [[webhooks]]\nname = \"ops\"\nurl = {url:?}\nallow_http = true\nsecret_file = \"credential:webhook.secret\"\n",
        state = state.path().display().to_string(),
        cert = pki.path("server.pem").display().to_string(),
        ca = pki.path("ca.pem").display().to_string(),
        url = rx.url,
    );
    let config = state.path().join("outpost.toml");
    std::fs::write(&config, &toml)?;
    let cfg = config.to_str().unwrap_or_default();

    // Without a credentials directory the configuration names what is missing.
    let out = outpost(&["check-config", "--config", cfg], &[])?;
    ensure!(out.status.code() == Some(78), "{:?}", text(&out));
    ensure!(text(&out).1.contains("CREDENTIALS_DIRECTORY") && text(&out).1.contains("credential:"), "{:?}", text(&out));
    let env = [("CREDENTIALS_DIRECTORY", c)];
    let out = outpost(&["check-config", "--config", cfg], &env)?;
    ensure!(out.status.code() == Some(0), "{:?}", text(&out));

    let bin = outpost_bin();
    let c_str = c.to_str().unwrap_or_default();
    let mut child = ChildAgent::spawn_env(
        &bin,
        &["run", "--config", cfg],
        &[("CREDENTIALS_DIRECTORY", c_str), ("RUST_LOG", "debug")],
    )?;
    let addr = child.wait_listening()?;
    child.seen_or_wait_for("initial model load finished", Duration::from_secs(60))?;
    let base = format!("https://{addr}");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem"))?)?;
    outpost::tls::install_crypto_provider();
    let http = reqwest::Client::builder().add_root_certificate(ca).timeout(Duration::from_secs(30)).build()?;
    let mut body = golden_for(&root().join("models/mlp"))?.request(0);
    body["id"] = json!("subject-request");
    body["parameters"] = json!({ "customer_id": "alice-4711" });
    let r = http.post(format!("{base}/v2/models/mlp/infer")).bearer_auth(&token).json(&body).send().await?;
    ensure!(r.status() == 200, "infer over TLS with the token: {}", r.status());

    // The command line reads the same credentials: its token, and the HMAC key for find.
    let out = outpost(&["status", "--config", cfg, "--url", &base], &env)?;
    ensure!(out.status.code() == Some(0), "status with the credential token: {:?}", text(&out));
    let out = outpost(&["audit", "find", "--subject", "alice-4711", "--config", cfg], &env)?;
    ensure!(ids(&text(&out).0)? == ["subject-request"], "find with the credential key: {:?}", text(&out));
    // The webhook was signed with the credential's secret.
    rx.wait_until("a delivery", Duration::from_secs(30), |r| r.requests.iter().any(|q| q.2 == Some(200))).await?;
    let (headers, payload) = {
        let st = rx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (st.requests[0].0.clone(), st.requests[0].1.clone())
    };
    ensure!(readme_verifier(&headers, &payload)? == (true, false), "webhook not signed with the credential secret");

    child.signal("TERM")?;
    ensure!(child.wait_exit(Duration::from_secs(30))? == 0, "unclean stop");
    // Nothing was created beside the credentials, and none of them shows in the log lines or
    // the audit log.
    for made in ["hmac.key", "store.key", "node.key"] {
        ensure!(!state.path().join(made).exists(), "{made} was created in the state directory");
    }
    let audit_text = text(&outpost(&["audit", "export", "--config", cfg], &env)?).0;
    let out = outpost(&["audit", "verify", "--config", cfg], &env)?;
    ensure!(out.status.code() == Some(0), "verify with the credential node key: {:?}", text(&out));
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let tls_line = std::fs::read_to_string(c.join("tls.key"))?.lines().nth(1).unwrap_or_default().to_owned();
    let node_key: Value = serde_json::from_slice(&std::fs::read(c.join("node.key"))?)?;
    let node_secret = node_key["private"].as_str().unwrap_or_default().to_owned();
    let secrets = [
        ("the token", token.clone()),
        ("the HMAC key", hex(&hmac_key)),
        ("the store key", hex(&[0x5au8; 32])),
        ("the webhook secret", SECRET.trim_start_matches("whsec_").to_owned()),
        ("the TLS key", tls_line),
        ("the node key", node_secret),
    ];
    let logs = child.log.join("\n");
    ensure!(logs.contains("DEBUG") || logs.contains("debug"), "the agent did not log at debug level");
    for (what, secret) in &secrets {
        ensure!(secret.len() >= 16, "{what}: no secret to look for");
        ensure!(!logs.contains(secret.as_str()), "{what} is in the agent's log");
        ensure!(!audit_text.contains(secret.as_str()), "{what} is in the audit log");
    }
    ensure!(!logs.contains("alice-4711") && !audit_text.contains("alice-4711"), "a clear subject value");

    // A credential that is missing is refused, not created.
    std::fs::remove_file(c.join("hmac.key"))?;
    let mut child = ChildAgent::spawn_env(&bin, &["run", "--config", cfg], &[("CREDENTIALS_DIRECTORY", c_str)])?;
    let code = child.wait_exit(Duration::from_secs(60))?;
    ensure!(code == 70, "exit {code}: {}", child.log.join("\n"));
    ensure!(child.log.iter().any(|l| l.contains("no such credential")), "{}", child.log.join("\n"));
    ensure!(!c.join("hmac.key").exists(), "the agent created a credential");
    Ok(())
}

/// Every rule of a baseline, each one broken by the test's first configuration.
const RULES: &str = "name = \"branch-2026\"\n\n[rules]\nauth = true\ntls = \"mtls\"\naudit = true\n\
audit_max_retention_days = 30\nresidency_within = [\"127.0.0.0/8\"]\npseudonymize = [\"customer_id\"]\n\
stay_on_site = [\"mlp\"]\nmin_agent_version = \"0.1.0\"\nquantization = [\"int8-qdq\"]\nstore_encrypted = true\n";

/// `outpost registry baseline` into `registry`, signed with `key`, from `rules`.
fn publish_baseline(registry: &Path, key: &Path, rules: &Path) -> Result<Output> {
    let arg = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    outpost(&["registry", "baseline", "--registry", &arg(registry), "--key", &arg(key), "--rules", &arg(rules)], &[])
}

/// The configuration's drifts as `outpost check-config --baseline` lists them: (exit, rules).
fn check_against(config: &Path, baseline: &Path) -> Result<(Option<i32>, Vec<String>, String)> {
    let out = outpost(
        &[
            "check-config",
            "--config",
            config.to_str().unwrap_or_default(),
            "--baseline",
            baseline.to_str().unwrap_or_default(),
        ],
        &[],
    )?;
    let (stdout, stderr) = text(&out);
    let rules = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split(':').next())
        .map(str::to_owned)
        .collect();
    Ok((out.status.code(), rules, format!("{stdout}{stderr}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_baseline_is_published_verified_checked_and_enforced() -> Result<()> {
    let reg = outpost_tests::registry::TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let keys = tempfile::tempdir()?;
    reg.index_keys[0].save(&keys.path().join("index"), None)?;
    let rules = keys.path().join("rules.toml");
    std::fs::write(&rules, RULES)?;
    let index_key = keys.path().join("index.key");
    let out = publish_baseline(reg.path(), &index_key, &rules)?;
    ensure!(
        out.status.code() == Some(0) && text(&out).0.contains("published baseline 'branch-2026' v1"),
        "{:?}",
        text(&out)
    );
    let v1 = reg.path().join("baseline.json");
    let v1_copy = keys.path().join("baseline-v1.json");
    std::fs::copy(&v1, &v1_copy)?;

    // A publisher's mistake is refused before any site sees it: a key outside the index role,
    // a rule that does not exist.
    let stranger = outpost::registry::KeyPair::generate()?;
    stranger.save(&keys.path().join("stranger"), None)?;
    let out = publish_baseline(reg.path(), &keys.path().join("stranger.key"), &rules)?;
    ensure!(out.status.code() != Some(0), "a stranger's key published a baseline: {:?}", text(&out));
    let typo = keys.path().join("typo.toml");
    std::fs::write(&typo, "name = \"x\"\n[rules]\nauth_required = true\n")?;
    let out = publish_baseline(reg.path(), &index_key, &typo)?;
    ensure!(out.status.code() == Some(64) && text(&out).1.contains("auth_required"), "{:?}", text(&out));

    // Offline: a configuration drifting on every rule lists each drift (exit 1).
    let models = mlp_only()?;
    let state = tempfile::tempdir()?;
    let hook = tempfile::tempdir()?;
    let (rx, _stop) = Receiver::start(vec![], Answer::Status(200)).await?;
    std::fs::write(hook.path().join("secret"), format!("{SECRET}\n"))?;
    let drifting = format!(
        "{}\n[audit]\nretention = \"90d\"\n\n[store]\nencrypt = false\n\n[overflow]\nurl = \"http://127.0.0.1:9/\"\nallow_http = true\n\n\
         [[webhooks]]\nname = \"ops\"\nurl = {:?}\nallow_http = true\nsecret_file = {:?}\nevents = [\"io.outpost.compliance.*\"]\n",
        registry_toml(&reg.file_url(), &reg.root_json(), ""),
        rx.url,
        hook.path().join("secret").display().to_string(),
    );
    let config = state.path().join("outpost.toml");
    std::fs::write(&config, config_text(state.path(), &[models.path().to_owned()], &drifting))?;
    let (code, found, all) = check_against(&config, &v1)?;
    ensure!(code == Some(1), "{all}");
    let every = [
        "auth",
        "tls",
        "audit_max_retention_days",
        "residency_within",
        "pseudonymize",
        "stay_on_site",
        "store_encrypted",
    ];
    ensure!(found == every, "drifts listed: {found:?}\n{all}");
    // The audit rule on its own: the log switched off.
    let no_audit = state.path().join("no-audit.toml");
    std::fs::write(
        &no_audit,
        config_text(
            state.path(),
            &[models.path().to_owned()],
            &format!("{}\n[audit]\nenabled = false\n", registry_toml(&reg.file_url(), &reg.root_json(), "")),
        ),
    )?;
    let (_, found, all) = check_against(&no_audit, &v1)?;
    ensure!(found.contains(&"audit".to_owned()), "{all}");
    // A configuration that holds: exit 0.
    let pki = Pki::generate()?;
    let (_, entry) = outpost::auth::create_token("ops", &[Role::Admin], None).map_err(anyhow::Error::msg)?;
    let holding = state.path().join("holding.toml");
    let holding_state = tempfile::tempdir()?;
    std::fs::write(
        &holding,
        format!(
            "[node]\nsite = \"test-site\"\nname = \"test-node\"\nstate_dir = {:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\n\
             tls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n\n[auth]\ntokens = [{entry}]\n\n[audit]\nretention = \"30d\"\n\n\
             [privacy]\nresidency_allow = [\"127.0.0.1\"]\npseudonymize = [\"parameters.customer_id\"]\n\n{}",
            holding_state.path().display().to_string(),
            pki.path("server.pem").display().to_string(),
            pki.path("server.pk8.key").display().to_string(),
            pki.path("ca.pem").display().to_string(),
            registry_toml(&reg.file_url(), &reg.root_json(), ""),
        ),
    )?;
    let (code, found, all) = check_against(&holding, &v1)?;
    ensure!(code == Some(0) && found.is_empty() && all.contains("holds"), "{all}");

    // Report mode: the agent serves, and reports each drift (plus the fp32 model it installs)
    // as an alarm, a metric, an event and an audit record.
    let agent = TestAgent::start_text(state, &std::fs::read_to_string(&config)?, "http", http_client()).await?;
    rx.wait_until("the drift event", Duration::from_secs(60), |r| !r.requests.is_empty()).await?;
    let (headers, payload) = {
        let st = rx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (st.requests[0].0.clone(), st.requests[0].1.clone())
    };
    let event: Value = serde_json::from_slice(&payload)?;
    ensure!(event["type"] == "io.outpost.compliance.drift", "{event}");
    ensure!(readme_verifier(&headers, &payload)?.0, "the drift event is not signed");
    let drifts = event["data"]["drifts"].as_array().cloned().unwrap_or_default();
    ensure!(
        drifts
            .iter()
            .any(|d| d.as_str().is_some_and(|d| d.starts_with("quantization: model 'mlp@1.0.0' is quantized fp32"))),
        "{event}"
    );
    ensure!(drifts.len() == every.len() + 1, "{event}");
    let (code, status) = agent.get("/admin/status").await?;
    ensure!(
        code == 200 && status["alarms"]["compliance_drift"].as_str().is_some_and(|a| a.starts_with("branch-2026 v1")),
        "{status}"
    );
    ensure!(status["compliance"]["holds"] == false && status["compliance"]["mode"] == "report", "{status}");
    let metrics = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    ensure!(metrics.contains("outpost_alarm{name=\"compliance_drift\"} 1"), "no alarm metric");
    let gauge: Vec<&str> = metrics.lines().filter(|l| l.starts_with("outpost_compliance_drifts")).collect();
    ensure!(gauge.iter().any(|l| l.ends_with(" 8") || l.ends_with(" 8.0")), "drift gauge: {gauge:?}");
    assert_eq!(agent.post("/v2/models/mlp/infer", &golden_for(&root().join("models/mlp"))?.request(0)).await?.0, 200);
    let log =
        text(&outpost(&["audit", "export", "--config", agent.config_path().to_str().unwrap_or_default()], &[])?).0;
    ensure!(
        log.lines().any(|l| l.contains("\"kind\":\"compliance\"") && l.contains("\"holds\":false")),
        "no audit record"
    );
    // The status page shows the finding (headless Chromium).
    if let Some(browser) = crate::fleet::chromium() {
        let out = crate::fleet::chromium_run(&browser, &agent.url("/"), &["--virtual-time-budget=5000", "--dump-dom"])?;
        let html = String::from_utf8_lossy(&out.stdout);
        ensure!(html.contains("compliance: baseline branch-2026 v1 (report): drifts: auth: "), "{html}");
    }

    // Enforce mode: a reload that would drift is refused, and so is a start.
    let enforcing = format!("{drifting}\n[compliance]\nmode = \"enforce\"\n");
    let path = agent.config_path();
    std::fs::write(&path, config_text(agent.state.path(), &[models.path().to_owned()], &enforcing))?;
    let report = agent.agent.reload(outpost::config::Config::load(&path)?).await;
    let refusal = report.error.clone().unwrap_or_default();
    ensure!(
        refusal.contains("compliance.mode = \"enforce\"") && refusal.contains("drifts from baseline 'branch-2026' v1"),
        "{report:?}"
    );
    ensure!(
        agent.agent.config().compliance.mode == outpost::config::ComplianceMode::Report,
        "the refused reload applied"
    );

    // A forged baseline (a stranger's signature) and a rolled-back one are refused by the
    // agent and offline; the trusted one stays in force.
    let forged_dir = tempfile::tempdir()?;
    std::fs::copy(reg.root_json(), forged_dir.path().join("root.json"))?;
    outpost::registry::publish::publish_baseline(
        reg.path(),
        "branch-2026",
        outpost::registry::BaselineRules::default(),
        &[&reg.index_keys[0]],
        86400,
    )?;
    let v2 = std::fs::read(&v1)?;
    let forged = {
        let env = outpost::registry::dsse::Envelope::parse(&v2)?;
        outpost::registry::dsse::Envelope::sign(outpost::registry::BASELINE_TYPE, &env.payload_bytes()?, &[&stranger])
            .to_bytes()
    };
    std::fs::write(&v1, &forged)?;
    let forged_file = keys.path().join("forged.json");
    std::fs::write(&forged_file, &forged)?;
    let poll = agent.http.post(agent.url("/admin/registry/poll")).send().await?.json::<Value>().await?;
    ensure!(poll.to_string().contains("baseline.json"), "forged baseline not refused: {poll}");
    let (_, status) = agent.get("/admin/status").await?;
    ensure!(
        status["compliance"]["baseline"] == "branch-2026 v1" && status["alarms"]["baseline_refused"].is_string(),
        "{status}"
    );
    let (code, _, all) = check_against(&agent.config_path(), &forged_file)?;
    ensure!(code == Some(64) && all.contains("refused"), "{all}");
    // The real v2 (no rules): accepted, and the configuration holds again.
    std::fs::write(&v1, &v2)?;
    let notified = rx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).requests.len();
    let poll = agent.http.post(agent.url("/admin/registry/poll")).send().await?.json::<Value>().await?;
    ensure!(!poll.to_string().contains("baseline.json"), "{poll}");
    rx.wait_until("the holds event", Duration::from_secs(60), |r| r.requests.len() > notified).await?;
    let (_, status) = agent.get("/admin/status").await?;
    ensure!(status["compliance"]["baseline"] == "branch-2026 v2" && status["compliance"]["holds"] == true, "{status}");
    ensure!(status["alarms"].get("compliance_drift").is_none(), "{status}");
    // A reload is checked, and so is the configuration every compliance.interval.
    std::fs::write(
        &path,
        config_text(
            agent.state.path(),
            &[models.path().to_owned()],
            &format!("{drifting}\n[compliance]\ninterval = \"1s\"\n"),
        ),
    )?;
    let report = agent.agent.reload(outpost::config::Config::load(&path)?).await;
    ensure!(report.error.is_none(), "{report:?}");
    for trigger in ["reload", "interval"] {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, status) = agent.get("/admin/status").await?;
            if status["compliance"]["trigger"] == trigger {
                break;
            }
            ensure!(std::time::Instant::now() < end, "no check by {trigger}: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    std::fs::write(&path, config_text(agent.state.path(), &[models.path().to_owned()], &enforcing))?;
    // Rolled back: v1 served again is refused; v2 stays.
    std::fs::copy(&v1_copy, &v1)?;
    let poll = agent.http.post(agent.url("/admin/registry/poll")).send().await?.json::<Value>().await?;
    ensure!(poll.to_string().contains("not newer than the trusted version 2"), "{poll}");
    let (code, _, all) = check_against(&agent.config_path(), &v1_copy)?;
    ensure!(code == Some(64) && all.contains("older than the trusted version 2"), "{all}");
    // v2 re-signed with other rules (the same version, validly signed): refused too.
    let resigned = {
        let mut payload: Value =
            serde_json::from_slice(&outpost::registry::dsse::Envelope::parse(&v2)?.payload_bytes()?)?;
        payload["rules"]["auth"] = json!(true);
        outpost::registry::dsse::Envelope::sign(
            outpost::registry::BASELINE_TYPE,
            &serde_json::to_vec(&payload)?,
            &[&reg.index_keys[0]],
        )
        .to_bytes()
    };
    std::fs::write(&v1, &resigned)?;
    let poll = agent.http.post(agent.url("/admin/registry/poll")).send().await?.json::<Value>().await?;
    ensure!(poll.to_string().contains("not newer than the trusted version 2"), "{poll}");

    // Restarted in enforce mode under a baseline it breaks: refused at start.
    std::fs::write(&v1, &v2)?;
    let strict = keys.path().join("strict.toml");
    std::fs::write(&strict, RULES.replace("branch-2026", "branch-2027"))?;
    let out = publish_baseline(reg.path(), &index_key, &strict)?;
    ensure!(text(&out).0.contains("v3"), "{:?}", text(&out));
    let poll = agent.http.post(agent.url("/admin/registry/poll")).send().await?;
    ensure!(poll.status() == 200, "{}", poll.status());
    let state = agent.stop_keep_state().await?;
    let config = outpost::config::Config::load(&state.path().join("outpost.toml"))?;
    ensure!(config.compliance.mode == outpost::config::ComplianceMode::Enforce, "the file is the enforcing one");
    match outpost::start(config).await {
        Ok(a) => {
            let _ = a.shutdown().await;
            anyhow::bail!("an enforcing agent started drifting from its baseline")
        }
        Err(e) => ensure!(e.to_string().contains("drifts from baseline 'branch-2027' v3"), "{e}"),
    }
    Ok(())
}

/// COMPLIANCE.md names a test in every row, and each one exists: `module::name` in
/// `tests/integration/module.rs`, `unit path.rs::name` in `agent/src/path.rs`.
#[test]
fn every_row_of_the_compliance_map_names_tests_that_exist() -> Result<()> {
    let map = std::fs::read_to_string(root().join("COMPLIANCE.md"))?;
    let rows: Vec<&str> = map.lines().filter(|l| l.starts_with("| **")).collect();
    ensure!(rows.len() >= 9, "COMPLIANCE.md has {} requirement rows", rows.len());
    for row in rows {
        let shown = row.rsplit('|').nth(1).unwrap_or_default();
        let names: Vec<&str> = shown.split('`').skip(1).step_by(2).collect();
        ensure!(!names.is_empty(), "a row names no test: {row}");
        for name in names {
            let (file, func) = name.rsplit_once("::").unwrap_or(("", name));
            let path = if file.ends_with(".rs") {
                root().join("agent/src").join(file)
            } else {
                root().join("tests/integration").join(format!("{file}.rs"))
            };
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            ensure!(
                text.contains(&format!("fn {func}(")),
                "COMPLIANCE.md names {name}, which {} does not hold",
                path.display()
            );
        }
    }
    Ok(())
}
