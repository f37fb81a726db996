//! NVIDIA's tritonclient (PyPI, HTTP) talks to the agent unchanged: health, metadata, infer
//! with JSON and with binary tensors, outputs compared with the golden vectors by
//! `scripts/tritonclient-check.py`.

use outpost_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_http_works_unchanged() -> anyhow::Result<()> {
    let Some(python) = std::env::var_os("OUTPOST_TEST_PYTHON") else {
        assert!(!full_suite(), "OUTPOST_TEST_FULL=1 needs OUTPOST_TEST_PYTHON (scripts/test.sh sets it)");
        eprintln!("skipped: OUTPOST_TEST_PYTHON not set (scripts/test.sh sets it)");
        return Ok(());
    };
    let agent = TestAgent::demo().await?;
    let url = agent.agent.addr().to_string();
    // JSON tensors, then Triton's binary tensor extension for inputs and outputs.
    for mode in [None, Some("--binary")] {
        let out = tokio::process::Command::new(&python)
            .arg(root().join("scripts/tritonclient-check.py"))
            .args(["--url", &url, "--models-dir"])
            .arg(root().join("models"))
            .args(mode)
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tritonclient check {mode:?} failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains("all models match"), "{stdout}");
        assert!(stdout.contains("binary_tensor_data"), "the extension is advertised: {stdout}");
        // Packages too: images and named fields sent as BYTES tensors, unchanged.
        assert!(
            stdout.contains("digits-png: 3 cases match") && stdout.contains("cancer-fields: 3 cases match"),
            "{stdout}"
        );
    }
    agent.stop().await
}

/// Runs `scripts/tritonclient-grpc-check.py` with `args`; returns whether it passed and what
/// it printed.
async fn grpc_check(python: &std::ffi::OsStr, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = tokio::process::Command::new(python)
        .arg(root().join("scripts/tritonclient-grpc-check.py"))
        .args(args)
        .output()
        .await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn python() -> Option<std::ffi::OsString> {
    let p = std::env::var_os("OUTPOST_TEST_PYTHON");
    if p.is_none() {
        assert!(!full_suite(), "OUTPOST_TEST_FULL=1 needs OUTPOST_TEST_PYTHON (scripts/test.sh sets it)");
        eprintln!("skipped: OUTPOST_TEST_PYTHON not set (scripts/test.sh sets it)");
    }
    p
}

/// tritonclient.grpc, sync, asyncio and streaming, on every demo model (and MiniLM when
/// built): golden outputs, equal to tritonclient.http's; 1,000 requests on one stream each
/// answered once; INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE and DEADLINE_EXCEEDED provoked,
/// the agent healthy after a deadline cut a run short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_works_unchanged() -> anyhow::Result<()> {
    let Some(python) = python() else { return Ok(()) };
    // A model the engine refuses stays known and unavailable.
    let refused = tempfile::tempdir()?;
    copy_dir(&root().join("tests/fixtures/models/unsupported-op"), &refused.path().join("unsupported-op"))?;
    // A model whose run takes long enough for a client deadline to expire during it.
    copy_dir(&root().join("tests/fixtures/models/mlp-slow"), &refused.path().join("mlp-slow"))?;
    let mut dirs = vec![root().join("models"), refused.path().to_owned()];
    if minilm_available() {
        dirs.push(minilm_dir());
    }
    let agent = TestAgent::start(&dirs, "[grpc]\nlisten = \"127.0.0.1:0\"\n").await?;
    let url = agent.agent.grpc_addr().map(|a| a.to_string()).unwrap_or_default();
    let http_url = agent.agent.addr().to_string();
    let models = root().join("models");
    let models = models.to_str().unwrap_or_default();
    let (ok, out) =
        grpc_check(&python, &["serve", "--url", &url, "--http-url", &http_url, "--models-dir", models]).await?;
    assert!(ok && out.contains("all models match") && out.contains("stream:"), "{out}");
    if minilm_available() {
        let dir = minilm_dir();
        let (ok, out) = grpc_check(
            &python,
            &["serve", "--url", &url, "--http-url", &http_url, "--models-dir", dir.to_str().unwrap_or_default()],
        )
        .await?;
        assert!(ok, "{out}");
    }
    let (ok, out) = grpc_check(
        &python,
        &["stream", "--url", &url, "--models-dir", models, "--count", "1000", "--model", "mlp", "--model", "cnn"],
    )
    .await?;
    assert!(ok && out.contains("1000 answers, each exactly once"), "{out}");

    for (case, code, model) in [
        ("bad-shape", "INVALID_ARGUMENT", "mlp"),
        ("unknown-model", "NOT_FOUND", "mlp"),
        ("infer", "UNAVAILABLE", "unsupported-op"),
    ] {
        let (ok, out) = grpc_check(
            &python,
            &["expect", "--url", &url, "--models-dir", models, "--case", case, "--model", model, "--expect", code],
        )
        .await?;
        assert!(ok, "{case}: expected {code}: {out}");
    }
    // A deadline shorter than the run: DEADLINE_EXCEEDED, and the agent serves on.
    let fixtures = root().join("tests/fixtures/models");
    let (ok, out) = grpc_check(
        &python,
        &[
            "expect",
            "--url",
            &url,
            "--models-dir",
            fixtures.to_str().unwrap_or_default(),
            "--case",
            "slow",
            "--model",
            "mlp-slow",
            "--timeout",
            "0.001",
            "--expect",
            "DEADLINE_EXCEEDED",
        ],
    )
    .await?;
    assert!(ok, "{out}");
    let (ok, out) =
        grpc_check(&python, &["expect", "--url", &url, "--models-dir", models, "--case", "infer", "--expect", "OK"])
            .await?;
    assert!(ok, "healthy after the deadline: {out}");
    let (s, _) = agent.get("/v2/health/ready").await?;
    assert_eq!(s, 200);
    // The gRPC requests are in the metrics and the audit log, as gRPC.
    let metrics = agent.agent.service().render_metrics();
    assert!(
        metrics.contains("outpost_inference_requests_total{model=\"mlp\",version=\"1\",outcome=\"ok\"}"),
        "{metrics}"
    );
    let recs = agent.agent.audit().map(|a| a.range(1, u64::MAX, usize::MAX)).transpose()?.unwrap_or_default();
    assert!(
        recs.iter().any(|(_, r)| String::from_utf8_lossy(r).contains("\"transport\":\"grpc\"")),
        "no audit record with transport grpc"
    );
    agent.stop().await
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// The same zero-trust rules as HTTP: tokens in the `authorization` metadata with the role
/// matrix per call (UNAUTHENTICATED, PERMISSION_DENIED), per-principal rate limits
/// (RESOURCE_EXHAUSTED), admin-only repository calls; then TLS with client certificates
/// (mTLS) from the `[http]` settings, the health service over it, and no handshake without a
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_under_tokens_rate_limits_and_mtls() -> anyhow::Result<()> {
    use outpost::auth::Role;
    let Some(python) = python() else { return Ok(()) };
    let models = root().join("models");
    let m = models.to_str().unwrap_or_default();
    let token = |name: &str, roles: &[Role], only: Option<&[String]>| outpost::auth::create_token(name, roles, only);
    let (ops, ops_entry) = token("ops", &[Role::Admin], None).map_err(anyhow::Error::msg)?;
    let (pos, pos_entry) = token("pos", &[Role::Infer], Some(&["mlp".to_owned()])).map_err(anyhow::Error::msg)?;
    let (flood, flood_entry) = token("flood", &[Role::Infer], None).map_err(anyhow::Error::msg)?;
    let auth = format!(
        "[auth]\ntokens = [{ops_entry}, {pos_entry}, {flood_entry}]\nrate_limit = 1.0\nrate_burst = 3\n\n[grpc]\nlisten = \"127.0.0.1:0\"\n"
    );
    let agent = TestAgent::start(std::slice::from_ref(&models), &auth).await?;
    let url = agent.agent.grpc_addr().map(|a| a.to_string()).unwrap_or_default();
    let check = |args: Vec<String>| {
        let python = python.clone();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            grpc_check(&python, &refs).await
        }
    };
    let expect = |case: &str, model: &str, token: Option<&str>, code: &str, repeat: u32| {
        let mut a =
            vec!["expect", "--url", &url, "--models-dir", m, "--case", case, "--model", model, "--expect", code]
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>();
        a.extend(["--repeat".to_owned(), repeat.to_string()]);
        if let Some(t) = token {
            a.extend(["--token".to_owned(), t.to_owned()]);
        }
        a
    };
    for (what, args) in [
        ("no token", expect("infer", "mlp", None, "UNAUTHENTICATED", 1)),
        ("a wrong token", expect("infer", "mlp", Some("not-a-token"), "UNAUTHENTICATED", 1)),
        ("pos on its model", expect("infer", "mlp", Some(&pos), "OK", 1)),
        ("pos on another model", expect("infer", "cnn", Some(&pos), "PERMISSION_DENIED", 1)),
        ("pos unloading", expect("unload", "cnn", Some(&pos), "PERMISSION_DENIED", 1)),
        ("flood over its rate", expect("infer", "mlp", Some(&flood), "RESOURCE_EXHAUSTED", 10)),
        ("ops unloading", expect("unload", "cnn", Some(&ops), "OK", 1)),
        ("infer on the unloaded model", expect("infer", "cnn", Some(&ops), "NOT_FOUND", 1)),
        ("ops loading", expect("load", "cnn", Some(&ops), "OK", 1)),
    ] {
        let (ok, out) = check(args).await?;
        assert!(ok, "{what}: {out}");
    }
    // A refusal is recorded with the call's path and transport.
    let recs = agent.agent.audit().map(|a| a.range(1, u64::MAX, usize::MAX)).transpose()?.unwrap_or_default();
    assert!(
        recs.iter().any(|(_, r)| {
            let r = String::from_utf8_lossy(r);
            r.contains("\"transport\":\"grpc\"")
                && r.contains("/inference.GRPCInferenceService/ModelInfer")
                && r.contains("token:pos")
        }),
        "no audit record of the refused gRPC call"
    );
    // Refusals are counted like HTTP's.
    let metrics = agent.agent.service().render_metrics();
    assert!(metrics.contains("outpost_http_access_denied_total{reason=\"rate_limited\"}"), "{metrics}");
    assert!(!metrics.contains("outpost_http_access_denied_total{reason=\"rate_limited\"} 0\n"), "{metrics}");
    agent.stop().await?;

    // mTLS from [http]'s settings: a listed client certificate is the principal.
    let pki = outpost_tests::broker::Pki::generate()?;
    let p = |n: &str| pki.path(n).display().to_string();
    let text = format!(
        "[http]\ntls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n",
        p("server.pem"),
        p("server.pk8.key"),
        p("ca.pem")
    );
    let state = tempfile::tempdir()?;
    let cfg = config_text(state.path(), std::slice::from_ref(&models), "")
        .replace("[http]\nlisten = \"127.0.0.1:0\"\n", &format!("{text}listen = \"127.0.0.1:0\"\n"))
        + "[auth]\nclients = [{ subject = \"pos-terminal-1\", roles = [\"infer\", \"observe\"] }]\n\n[grpc]\nlisten = \"127.0.0.1:0\"\n";
    let agent = TestAgent::start_text(state, &cfg, "https", http_client()).await?;
    let url = format!("localhost:{}", agent.agent.grpc_addr().map(|a| a.port()).unwrap_or_default());
    let tls =
        ["--ca".to_owned(), p("ca.pem"), "--cert".to_owned(), p("client.pem"), "--key".to_owned(), p("client.pk8.key")];
    let mut args: Vec<String> =
        ["serve", "--url", &url, "--models-dir", m, "--model", "mlp"].map(str::to_owned).to_vec();
    args.extend(tls.iter().cloned());
    let (ok, out) = check(args).await?;
    assert!(ok && out.contains("all models match"), "mTLS: {out}");
    let mut args: Vec<String> = ["health", "--url", &url].map(str::to_owned).to_vec();
    args.extend(tls.iter().cloned());
    let (ok, out) = check(args).await?;
    assert!(ok, "health over mTLS: {out}");
    let args: Vec<String> = [
        "expect",
        "--url",
        &url,
        "--models-dir",
        m,
        "--case",
        "infer",
        "--ca",
        &p("ca.pem"),
        "--expect",
        "UNAVAILABLE",
    ]
    .map(str::to_owned)
    .to_vec();
    let (ok, out) = check(args).await?;
    assert!(ok, "no client certificate, no handshake: {out}");
    agent.stop().await
}
