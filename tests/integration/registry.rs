//! The signed registry over real HTTP on loopback: publish → install → serve, and one named
//! test per attack. Every attack must leave the current version serving, with the reason in
//! `outpost model list`.

use outpost::registry::dsse::Envelope;
use outpost::registry::publish::resign_index;
use outpost::registry::{
    format_time, now, sha256_hex, DigestRef, IndexEntry, KeyPair, RegistryError, Root, MANIFEST_TYPE, ROOT_TYPE,
};
use outpost_tests::registry::{StaticServer, TestRegistry};
use std::time::Duration;

use outpost_tests::*;
use serde_json::json;

use crate::{model_list, outpost_bin};

/// Infers the golden case 0 of `golden_model` on `model`; returns the version that answered.
async fn infer_golden(agent: &TestAgent, model: &str, golden_model: &str) -> anyhow::Result<String> {
    let golden = golden_for(&root().join("models").join(golden_model))?;
    let (status, body) = agent.post(&format!("/v2/models/{model}/infer"), &golden.request(0)).await?;
    anyhow::ensure!(status == 200, "{model}: {status} {body}");
    golden.check(0, &body)?;
    Ok(body["model_version"].as_str().unwrap_or_default().to_owned())
}

/// A registry over HTTP with `mlp@1.0.0` installed and serving.
async fn serving_v1() -> anyhow::Result<(TestRegistry, StaticServer, TestAgent)> {
    serving_v1_with("").await
}

/// Like [`serving_v1`], with extra `[registry]` settings.
async fn serving_v1_with(extra: &str) -> anyhow::Result<(TestRegistry, StaticServer, TestAgent)> {
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), extra)).await?;
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.0");
    Ok((reg, server, agent))
}

/// Signs `stmt` as a manifest, stores it, and lists it in a new signed index as a version of
/// its model on the stable channel (after `edit`): a crafted publication.
fn add_signed_version(
    reg: &TestRegistry,
    stmt: &outpost::registry::Statement,
    edit: impl FnOnce(&mut outpost::registry::Index),
) -> anyhow::Result<()> {
    let manifest = Envelope::sign(MANIFEST_TYPE, &serde_json::to_vec(stmt)?, &reg.signers()).to_bytes();
    let sha = sha256_hex(&manifest);
    std::fs::write(reg.path().join("manifests").join(format!("{sha}.json")), &manifest)?;
    let mut index = reg.index()?;
    edit(&mut index);
    index.models.entry(stmt.predicate.name.clone()).or_default().push(IndexEntry {
        version: stmt.predicate.version.clone(),
        channel: "stable".into(),
        manifest: DigestRef { sha256: sha, size: manifest.len() as u64 },
    });
    index.version += 1;
    reg.write_index(&index, &reg.signers())?;
    Ok(())
}

/// After an attack: the poll failed as expected, 1.0.0 still answers, and the reason is listed.
async fn assert_refused(
    agent: &TestAgent,
    result: Result<outpost::registry::sync::PollReport, RegistryError>,
    needle: &str,
) -> anyhow::Result<()> {
    let msg = match result {
        Err(e) => e.to_string(),
        Ok(report) => report.failed.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; "),
    };
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
    assert_eq!(infer_golden(agent, "mlp", "mlp").await?, "1.0.0", "the current version keeps serving");
    let list = model_list(&agent.config_path())?;
    assert!(list.contains(needle), "model list shows the reason {needle:?}:\n{list}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_http_installs_and_serves_then_updates() -> anyhow::Result<()> {
    let (reg, server, agent) = serving_v1().await?;
    // An unchanged index is answered 304 (ETag) and installs nothing.
    let report = agent.agent.poll_registry().await?;
    assert!(report.installed.is_empty(), "{report:?}");
    // A new version (different weights: the int8 QDQ MLP) is installed and serves.
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let report = agent.agent.poll_registry().await?;
    assert_eq!(report.installed, vec![("mlp".to_owned(), "1.1.0".to_owned())]);
    assert_eq!(infer_golden(&agent, "mlp", "mlp-int8-qdq").await?, "1.1.0");
    let (s, meta) = agent.get("/v2/models/mlp").await?;
    assert_eq!((s, meta["versions"].clone()), (200, json!(["1.1.0"])));
    let list = model_list(&agent.config_path())?;
    assert!(list.contains("mlp") && list.contains("1.1.0") && list.contains("serving"), "{list}");
    assert!(list.contains("1.0.0") && list.contains("previous"), "{list}");
    let log = server.requests();
    assert!(log.iter().any(|l| l.starts_with("GET /blobs/sha256/")), "{log:?}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_bad_signature() -> anyhow::Result<()> {
    let (reg, _server, agent) = serving_v1().await?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let path = reg.path().join("index.json");
    let mut env = Envelope::parse(&std::fs::read(&path)?)?;
    let sig = &mut env.signatures[0].sig;
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    sig.replace_range(0..1, flipped);
    std::fs::write(&path, env.to_bytes())?;
    assert_refused(&agent, agent.agent.poll_registry().await, "0 of 1 required signatures").await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_unknown_key() -> anyhow::Result<()> {
    let (reg, _server, agent) = serving_v1().await?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let stranger = KeyPair::generate()?;
    reg.write_index(&reg.index()?, &[&stranger])?;
    assert_refused(&agent, agent.agent.poll_registry().await, "1 from unknown keys").await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_threshold_not_met_with_the_same_key_twice() -> anyhow::Result<()> {
    let reg = TestRegistry::with_keys(1, 1, 2, 2)?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), "")).await?;
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.0");
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let k0 = &reg.index_keys[0];
    reg.write_index(&reg.index()?, &[k0, k0])?;
    assert_refused(&agent, agent.agent.poll_registry().await, "1 of 2 required signatures").await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_expired_index_freezes_installs_but_not_serving() -> anyhow::Result<()> {
    let (reg, _server, agent) = serving_v1().await?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    resign_index(reg.path(), &reg.signers(), -60, None)?;
    assert_refused(&agent, agent.agent.poll_registry().await, "expired").await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_index_version_rollback() -> anyhow::Result<()> {
    let (reg, _server, agent) = serving_v1().await?;
    let old = std::fs::read(reg.path().join("index.json"))?;
    reg.publish("mlp", "mlp", "1.0.1")?;
    agent.agent.poll_registry().await?;
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.1");
    std::fs::write(reg.path().join("index.json"), old)?;
    let r = agent.agent.poll_registry().await;
    let msg = r.expect_err("rollback refused").to_string();
    assert!(msg.contains("older than the trusted version"), "{msg}");
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.1", "still serving");
    assert!(model_list(&agent.config_path())?.contains("older than the trusted version"));
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_manifest_digest_mismatch() -> anyhow::Result<()> {
    let (reg, _server, agent) = serving_v1().await?;
    reg.publish("cnn", "cnn", "1.0.0")?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    // Serve the CNN's (validly signed) manifest where the index names the new MLP's.
    let cnn_manifest = std::fs::read(reg.manifest_path("cnn")?)?;
    std::fs::write(reg.manifest_path("mlp")?, cnn_manifest)?;
    assert_refused(&agent, agent.agent.poll_registry().await, "the signed index says").await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_blob_digest_mismatch() -> anyhow::Result<()> {
    let (reg, _server, agent) = serving_v1().await?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let blob = reg.blob_path("mlp")?;
    let mut bytes = std::fs::read(&blob)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, bytes)?;
    assert_refused(&agent, agent.agent.poll_registry().await, "blob has sha256").await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_oversized_blob() -> anyhow::Result<()> {
    // A blob over the configured cap is refused before any byte of it is fetched.
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), "max_blob_bytes = 100")).await?;
    assert!(server.requests().iter().all(|l| !l.contains("/blobs/")), "{:?}", server.requests());
    let list = model_list(&agent.config_path())?;
    assert!(list.contains("exceeds registry.max_blob_bytes = 100"), "{list}");
    assert_eq!(agent.get("/v2/models/mlp/ready").await?.0, 503);
    agent.stop().await?;

    // A server sending more than the manifest declares is cut off.
    let (reg, _server, agent) = serving_v1().await?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let blob = reg.blob_path("mlp")?;
    let mut bytes = std::fs::read(&blob)?;
    bytes.extend(std::iter::repeat_n(0u8, 1 << 20));
    std::fs::write(&blob, bytes)?;
    assert_refused(&agent, agent.agent.poll_registry().await, "is larger than the").await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_path_traversal_in_model_name_and_blob_path() -> anyhow::Result<()> {
    let (reg, server, agent) = serving_v1().await?;
    // A model name that would climb out of any directory it were joined to.
    let mut index = reg.index()?;
    let entry = index.models["mlp"][0].clone();
    index.models.insert("../../evil".into(), vec![entry]);
    index.version += 1;
    reg.write_index(&index, &reg.signers())?;
    let report = agent.agent.poll_registry().await?;
    assert!(report.failed.iter().any(|(_, e)| e.contains("invalid model")), "{report:?}");
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.0");

    // A signed manifest whose blob "digest" is a path.
    let mut stmt = reg.statement("mlp")?;
    stmt.predicate.version = "1.2.0".into();
    stmt.predicate.blob.sha256 = "../../../../etc/passwd".into();
    add_signed_version(&reg, &stmt, |index| {
        index.models.remove("../../evil");
    })?;
    assert_refused(&agent, agent.agent.poll_registry().await, "is not a sha256 hex digest").await?;
    assert!(server.requests().iter().all(|l| !l.contains("..")), "{:?}", server.requests());
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_truncated_download_is_refused_then_resumed() -> anyhow::Result<()> {
    let (reg, server, agent) = serving_v1().await?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let blob = reg.blob_path("mlp")?;
    let size = std::fs::metadata(&blob)?.len() as usize;
    let name = blob.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    server.faults.truncate.lock().map_err(|_| anyhow::anyhow!("lock"))?.insert(name.clone(), size / 2);
    let r = agent.agent.poll_registry().await?;
    // A cut download is put off, not refused: no verdict against the version.
    assert!(r.failed.is_empty() && !r.deferred.is_empty(), "{r:?}");
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.0");
    assert!(model_list(&agent.config_path())?.contains("pending"));
    server.faults.truncate.lock().map_err(|_| anyhow::anyhow!("lock"))?.clear();
    let r = agent.agent.poll_registry().await?;
    assert_eq!(r.installed, vec![("mlp".to_owned(), "1.1.0".to_owned())], "{r:?}");
    assert_eq!(infer_golden(&agent, "mlp", "mlp-int8-qdq").await?, "1.1.0");
    let log = server.requests();
    assert!(log.iter().any(|l| l.contains(&name) && l.contains("bytes=")), "resumed with Range: {log:?}");
    agent.stop().await
}

/// A link that goes quiet mid-download: cut after `stall_timeout` with no byte (not after a
/// total time), shown as interrupted with its progress, not refused (no lifecycle verdict), and
/// resumed from where it stopped. A slow but steady link that takes longer in all than the
/// stall timeout completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_is_cut_shown_and_resumed_and_a_slow_one_completes() -> anyhow::Result<()> {
    let (reg, server, agent) = serving_v1_with("stall_timeout = \"1s\"\n").await?;
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let blob = reg.blob_path("mlp")?;
    let size = std::fs::metadata(&blob)?.len() as usize;
    let name = blob.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    server.faults.stall.lock().map_err(|_| anyhow::anyhow!("lock"))?.insert(name.clone(), size / 3);
    let r = agent.agent.poll_registry().await?;
    assert!(r.failed.is_empty(), "{r:?}");
    let (_, why) = r.deferred.first().ok_or_else(|| anyhow::anyhow!("not deferred: {r:?}"))?;
    assert!(why.contains(&format!("cut at {} of {size} bytes", size / 3)) && why.contains("no data for 1s"), "{why}");
    let (_, status) = agent.get("/admin/status").await?;
    let d = &status["registry"]["download"];
    assert_eq!(d["state"], "interrupted", "{status}");
    assert_eq!(d["received_bytes"].as_u64(), Some((size / 3) as u64), "{d}");
    assert_eq!(d["total_bytes"].as_u64(), Some(size as u64), "{d}");
    assert!(d["rate_bytes_per_s"].is_number(), "{d}");
    let table = std::process::Command::new(crate::outpost_bin())
        .args(["status", "--config"])
        .arg(agent.config_path())
        .args(["--url", &agent.base])
        .output()?;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains(&format!("download mlp 1.1.0: interrupted {}%", (size / 3) * 100 / size)), "{table}");
    assert!(
        table.contains(&format!("registry: {} polled ", server.url())) && table.contains("0 refused, 1 deferred"),
        "{table}"
    );
    let export = agent.http.get(format!("{}/admin/audit/export?since=1h", agent.base)).send().await?.text().await?;
    assert!(
        export.contains("\"event\":\"verified\"") || export.contains("lifecycle"),
        "the export holds lifecycle records: {export}"
    );
    assert!(!export.contains("\"event\":\"refused\""), "no refusal recorded: {export}");
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.0");

    // A slow, steady link: eight pieces 250 ms apart (2 s in all, twice the stall timeout).
    server.faults.stall.lock().map_err(|_| anyhow::anyhow!("lock"))?.clear();
    *server.faults.throttle_every.lock().map_err(|_| anyhow::anyhow!("lock"))? = Duration::from_millis(250);
    server.faults.throttle.lock().map_err(|_| anyhow::anyhow!("lock"))?.insert(name.clone(), 8);
    let r = agent.agent.poll_registry().await?;
    assert_eq!(r.installed, vec![("mlp".to_owned(), "1.1.0".to_owned())], "{r:?}");
    assert!(
        server.requests().iter().any(|l| l.contains(&name) && l.contains(&format!("bytes={}-", size / 3))),
        "resumed from the cut: {:?}",
        server.requests()
    );
    assert_eq!(infer_golden(&agent, "mlp", "mlp-int8-qdq").await?, "1.1.0");
    let (_, status) = agent.get("/admin/status").await?;
    assert_eq!(status["registry"]["download"]["state"], "done", "{status}");
    assert_eq!(status["registry"]["result"], "ok", "{status}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_tampered_blob_on_local_disk_at_start() -> anyhow::Result<()> {
    let (_reg, server, agent) = serving_v1().await?;
    let url = server.url();
    let root_json = _reg.root_json();
    let state = agent.stop_keep_state().await?;
    let models = state.path().join("store").join("models");
    let file = std::fs::read_dir(&models)?.flatten().next().expect("an installed model").path();
    let mut bytes = std::fs::read(&file)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&file, bytes)?;

    // Restart with the registry unreachable: the tampered model is refused, not served.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let agent =
        TestAgent::start_with_state(state, &[], &registry_toml(&format!("http://{dead}/"), &root_json, "")).await?;
    let (s, body) = agent.get("/v2/models/mlp/ready").await?;
    assert_ne!(s, 200, "{body}");
    let list = model_list(&agent.config_path())?;
    // Stored models are encrypted: a changed byte fails authentication before any hashing.
    assert!(list.contains("failed authentication"), "{list}");
    let state = agent.stop_keep_state().await?;

    // With the registry back, it is fetched and verified again.
    let agent = TestAgent::start_with_state(state, &[], &registry_toml(&url, &root_json, "")).await?;
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.0");
    agent.stop().await
}

fn signed_root(
    reg: &TestRegistry,
    version: u64,
    root_keys: &[&KeyPair],
    index_keys: &[&KeyPair],
    signers: &[&KeyPair],
) -> anyhow::Result<Vec<u8>> {
    let mut keys = std::collections::BTreeMap::new();
    for k in root_keys.iter().chain(index_keys) {
        keys.insert(k.keyid.clone(), k.public());
    }
    let root = Root {
        kind: "root".into(),
        version,
        expires: format_time(now() + 86400),
        keys,
        roles: outpost::registry::Roles {
            root: outpost::registry::Role { keyids: root_keys.iter().map(|k| k.keyid.clone()).collect(), threshold: 1 },
            index: outpost::registry::Role {
                keyids: index_keys.iter().map(|k| k.keyid.clone()).collect(),
                threshold: 1,
            },
        },
        demo_only: false,
    };
    let _ = reg;
    Ok(Envelope::sign(ROOT_TYPE, &serde_json::to_vec(&root)?, signers).to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_needs_the_old_keys_threshold() -> anyhow::Result<()> {
    let (reg, _server, agent) = serving_v1().await?;
    let new_root = KeyPair::generate()?;
    let new_index = KeyPair::generate()?;
    let old_root = &reg.root_keys[0];

    // Signed by the new key only: refused, the old root stays trusted.
    let bytes = signed_root(&reg, 2, &[&new_root], &[&new_index], &[&new_root])?;
    std::fs::write(reg.path().join("roots/2.json"), bytes)?;
    assert_refused(&agent, agent.agent.poll_registry().await, "root v2 (by v1 keys)").await?;

    // Signed by the old and the new key: accepted; the new index key now signs the index.
    let bytes = signed_root(&reg, 2, &[&new_root], &[&new_index], &[old_root, &new_root])?;
    std::fs::write(reg.path().join("roots/2.json"), &bytes)?;
    std::fs::write(reg.path().join("root.json"), &bytes)?;
    reg.publish("mlp", "mlp", "1.0.1")?; // signed with the old index key, no longer trusted
    let r = agent.agent.poll_registry().await;
    assert!(r.as_ref().is_err_and(|e| e.to_string().contains("unknown keys")), "{r:?}");
    reg.write_index(&reg.index()?, &[&new_index])?;
    // The manifest of 1.0.1 is signed by the old index key too: re-sign it with the new one.
    let stmt = reg.statement("mlp")?;
    let manifest = Envelope::sign(MANIFEST_TYPE, &serde_json::to_vec(&stmt)?, &[&new_index]).to_bytes();
    let sha = sha256_hex(&manifest);
    std::fs::write(reg.path().join("manifests").join(format!("{sha}.json")), &manifest)?;
    let mut index = reg.index()?;
    for e in index.models.get_mut("mlp").expect("mlp") {
        if e.version == "1.0.1" {
            e.manifest = DigestRef { sha256: sha.clone(), size: manifest.len() as u64 };
        }
    }
    index.version += 1;
    reg.write_index(&index, &[&new_index])?;
    let report = agent.agent.poll_registry().await?;
    assert_eq!(report.installed, vec![("mlp".to_owned(), "1.0.1".to_owned())], "{report:?}");
    let trusted = std::fs::read(agent.state.path().join("registry/root.json"))?;
    let trusted: Root = serde_json::from_slice(&Envelope::parse(&trusted)?.payload_bytes()?)?;
    assert_eq!(trusted.version, 2);
    agent.stop().await
}

#[test]
fn publishing_the_broken_qdq_fixture_is_refused() -> anyhow::Result<()> {
    let reg = TestRegistry::new()?;
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("index");
    reg.index_keys[0].save(&key, None)?;
    let before = std::fs::read(reg.path().join("index.json"))?;
    let fixture = root().join("tests/fixtures/models/qdq-softmax-u8");
    let out = std::process::Command::new(outpost_bin())
        .args(["model", "publish"])
        .arg(fixture.join("model.onnx"))
        .args(["--name", "broken", "--version", "1.0.0", "--key"])
        .arg(key.with_extension("key"))
        .arg("--registry")
        .arg(reg.path())
        .arg("--golden")
        .arg(fixture.join("golden.json"))
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("golden vectors not reproduced"), "{err}");
    assert_eq!(std::fs::read(reg.path().join("index.json"))?, before, "index untouched");

    // The same command publishes a good model.
    let good = root().join("models/cnn");
    let out = std::process::Command::new(outpost_bin())
        .args(["model", "publish"])
        .arg(good.join("model.onnx"))
        .args(["--name", "cnn", "--version", "1.0.0", "--key"])
        .arg(key.with_extension("key"))
        .arg("--registry")
        .arg(reg.path())
        .arg("--golden")
        .arg(good.join("golden.json"))
        .output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(reg.index()?.models.contains_key("cnn"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_unreachable_serves_what_it_has_and_catches_up() -> anyhow::Result<()> {
    let (reg, mut server, agent) = serving_v1().await?;
    let addr = server.addr;
    let state = agent.stop_keep_state().await?;
    server.stop();
    drop(server);
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let agent =
        TestAgent::start_with_state(state, &[], &registry_toml(&format!("http://{addr}/"), &reg.root_json(), ""))
            .await?;
    assert_eq!(infer_golden(&agent, "mlp", "mlp").await?, "1.0.0", "serves from its store with no registry");
    let r = agent.agent.poll_registry().await;
    assert!(r.as_ref().is_err_and(RegistryError::is_transient), "{r:?}");
    assert!(model_list(&agent.config_path())?.contains("registry: fetch failed"));
    // The registry comes back on the same address.
    let _server = StaticServer::start_on(reg.path(), addr).await?;
    let report = agent.agent.poll_registry().await?;
    assert_eq!(report.installed, vec![("mlp".to_owned(), "1.1.0".to_owned())]);
    assert_eq!(infer_golden(&agent, "mlp", "mlp-int8-qdq").await?, "1.1.0");
    agent.stop().await
}

/// A process's memory figure from /proc (kB): `VmRSS` now, `VmHWM` its peak.
fn proc_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_blob_declaring_4_gib_streams_in_bounded_memory_while_serving_goes_on() -> anyhow::Result<()> {
    use std::io::Write as _;
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, config_text(dir.path(), &[], &registry_toml(&server.url(), &reg.root_json(), "")))?;
    let mut child = ChildAgent::spawn(&outpost_bin(), &["run", "--config", path.to_str().unwrap_or_default()])?;
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", std::time::Duration::from_secs(120))?;
    let pid = child.child.id();
    // A careless publisher's mlp@2.0.0: a signed manifest whose blob decompresses to 4 GiB.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..4096 {
        enc.write_all(&zeros)?;
    }
    let blob = enc.finish()?;
    let blob_sha = sha256_hex(&blob);
    std::fs::write(reg.path().join("blobs/sha256").join(&blob_sha), &blob)?;
    let mut stmt = reg.statement("mlp")?;
    stmt.predicate.version = "2.0.0".into();
    stmt.predicate.blob.sha256 = blob_sha;
    stmt.predicate.blob.size = blob.len() as u64;
    stmt.predicate.blob.uncompressed_size = 4 << 30;
    add_signed_version(&reg, &stmt, |_| {})?;

    let idle_kb = proc_kb(pid, "VmRSS")?;
    let http = http_client();
    let poll = tokio::spawn(http.post(format!("http://{addr}/admin/registry/poll")).send());
    // Serving goes on while the blob streams through (bounded: at most 100,000 requests).
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut served = 0u32;
    while !poll.is_finished() {
        anyhow::ensure!(served < 100_000, "the poll did not finish");
        let r = http.post(format!("http://{addr}/v2/models/mlp/infer")).json(&golden.request(0)).send().await?;
        assert_eq!(r.status().as_u16(), 200);
        served += 1;
    }
    let answer: serde_json::Value = poll.await??.json().await?;
    assert!(answer.to_string().contains("decompressed model has sha256"), "{answer}");
    let peak_kb = proc_kb(pid, "VmHWM")?;
    eprintln!(
        "4 GiB-declared blob: RSS idle {} MB, peak {} MB; {served} requests served meanwhile",
        idle_kb / 1024,
        peak_kb / 1024
    );
    assert!(peak_kb < idle_kb + 100 * 1024, "peak RSS {peak_kb} kB against {idle_kb} kB idle");
    assert!(served > 0);
    // Nothing of it reached the store.
    let stored: u64 = std::fs::read_dir(dir.path().join("store/models"))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(stored < 10 << 20, "{stored} bytes in the store");
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(std::time::Duration::from_secs(30))?, 0);
    Ok(())
}

/// `outpost model publish` of `model` with `golden` into `reg`, as the README shows it.
fn publish_cli(
    reg: &TestRegistry,
    key: &std::path::Path,
    model: &std::path::Path,
    golden: &std::path::Path,
) -> anyhow::Result<(i32, String)> {
    let out = std::process::Command::new(outpost_bin())
        .args(["model", "publish"])
        .arg(model)
        .args(["--name", "candidate", "--version", "1.0.0", "--key"])
        .arg(key)
        .arg("--registry")
        .arg(reg.path())
        .arg("--golden")
        .arg(golden)
        .output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[test]
fn the_readme_publish_workflow_refuses_a_model_tract_computes_wrongly_and_a_meaningless_tolerance() -> anyhow::Result<()>
{
    let reg = TestRegistry::new()?;
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("index");
    reg.index_keys[0].save(&key, None)?;
    let key = key.with_extension("key");
    let before = std::fs::read(reg.path().join("index.json"))?;

    // A golden file whose tolerance also accepts the outputs permuted: refused before loading.
    let mut loose: serde_json::Value = serde_json::from_slice(&std::fs::read(root().join("models/cnn/golden.json"))?)?;
    loose["tolerance"]["atol"] = json!(1.0);
    let loose_path = keys.path().join("loose.json");
    std::fs::write(&loose_path, serde_json::to_vec(&loose)?)?;
    let (code, err) = publish_cli(&reg, &key, &root().join("models/cnn/model.onnx"), &loose_path)?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("output 'probabilities'") && err.contains("cannot tell"), "{err}");

    // ONNX Runtime's default static QDQ of MiniLM, which tract runs to wrong embeddings: the
    // README's commands (make-golden.py with its defaults, then publish) refuse it.
    let fixture = root().join(".cache/fixtures/minilm-int8-qdq-default");
    if !fixture.join("model.onnx").is_file() {
        assert!(!full_suite(), "OUTPOST_TEST_FULL=1 but the MiniLM fixture is not built");
        eprintln!("skipped the MiniLM part: scripts/gen-models.sh --minilm");
        return Ok(());
    }
    let Some(python) = std::env::var_os("OUTPOST_TEST_PYTHON") else {
        assert!(!full_suite(), "OUTPOST_TEST_FULL=1 needs OUTPOST_TEST_PYTHON (scripts/test.sh sets it)");
        eprintln!("skipped the MiniLM part: OUTPOST_TEST_PYTHON not set (scripts/test.sh sets it)");
        return Ok(());
    };
    let fixture_golden: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture.join("golden.json"))?)?;
    let cases: Vec<&serde_json::Value> =
        fixture_golden["cases"].as_array().into_iter().flatten().map(|c| &c["inputs"]).collect();
    let cases_path = keys.path().join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(&cases)?)?;
    let golden = keys.path().join("golden.json");
    let out = std::process::Command::new(python)
        .arg(root().join("scripts/make-golden.py"))
        .arg(fixture.join("model.onnx"))
        .arg("--inputs")
        .arg(&cases_path)
        .arg("--out")
        .arg(&golden)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("embedding: embedding"));
    let (code, err) = publish_cli(&reg, &key, &fixture.join("model.onnx"), &golden)?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cosine similarity"), "{err}");
    assert_eq!(std::fs::read(reg.path().join("index.json"))?, before, "index untouched");
    Ok(())
}

/// A reload that points `[registry]` at another server applies live: the next poll goes
/// there, and the status names it. Adding or removing `[registry]` needs a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_registry_live() -> anyhow::Result<()> {
    let (reg, first, agent) = serving_v1().await?;
    let second = StaticServer::start(reg.path()).await?;
    let text = std::fs::read_to_string(agent.config_path())?;
    std::fs::write(agent.config_path(), text.replace(&first.url(), &second.url()))?;
    let report = agent.agent.reload(outpost::config::Config::load(&agent.config_path())?).await;
    assert!(report.ok() && report.applied == ["[registry]"], "{report:?}");
    let before = first.requests().len();
    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let r = agent.agent.poll_registry().await?;
    assert_eq!(r.installed, vec![("mlp".to_owned(), "1.1.0".to_owned())], "{r:?}");
    assert_eq!(first.requests().len(), before, "nothing more asked of the old server");
    assert!(second.requests().iter().any(|l| l.contains("index")), "{:?}", second.requests());
    let (_, status) = agent.get("/admin/status").await?;
    assert_eq!(status["registry"]["url"], second.url(), "{status}");

    // Removing [registry] needs a restart: refused, the registry kept.
    let text = std::fs::read_to_string(agent.config_path())?;
    let without = text.split("[registry]").next().unwrap_or_default().to_owned();
    std::fs::write(agent.config_path(), without)?;
    let report = agent.agent.reload(outpost::config::Config::load(&agent.config_path())?).await;
    assert_eq!(report.needs_restart, ["[registry] (added or removed)"], "{report:?}");
    assert!(agent.agent.config().registry.is_some());
    agent.stop().await
}
