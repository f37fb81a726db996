//! Crash safety of installs: the agent as a child process is stopped dead (abort at a chosen
//! point, which a `kill -9` there would do) mid-download, after verification, mid-decompress
//! and after activation but before its state is persisted, round after round. After every
//! crash the store holds only complete, verified versions; after the last restart the new
//! version serves.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use outpost::registry::sha256_hex;
use outpost::store::Store;
use outpost_tests::registry::{StaticServer, TestRegistry};
use outpost_tests::*;

use crate::outpost_bin;

/// Every installed version's files exist and hash to their names.
fn assert_store_consistent(state_dir: &Path) -> anyhow::Result<Vec<String>> {
    let key = outpost::store::crypt::StoreKey::load_or_create(&state_dir.join("store.key"), false)
        .map_err(anyhow::Error::msg)?;
    let store = Store::open(state_dir)?.with_key(Some(key));
    let state = store.load_state()?;
    let mut versions = Vec::new();
    for (name, m) in &state.installed {
        for v in std::iter::once(&m.current).chain(m.previous.as_ref()) {
            // Decrypted in memory and re-hashed by the store.
            let model = store.read_model(&v.model_sha256)?;
            assert_eq!(sha256_hex(&model), v.model_sha256, "{name}@{} model file", v.version);
            let manifest = std::fs::read(store.manifest_path(&v.manifest_sha256))?;
            assert_eq!(sha256_hex(&manifest), v.manifest_sha256, "{name}@{} manifest", v.version);
        }
        versions.push(format!("{name}@{}", m.current.version));
    }
    Ok(versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_install_step_never_leaves_a_half_installed_model() -> anyhow::Result<()> {
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let state = tempfile::tempdir()?;
    let config = state.path().join("outpost.toml");
    std::fs::write(&config, config_text(state.path(), &[], &registry_toml(&server.url(), &reg.root_json(), "")))?;
    let args = ["run", "--config", config.to_str().unwrap_or_default()];

    // First start installs 1.0.0; then it is killed outright.
    let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
    child.wait_for("initial model load finished", Duration::from_secs(60))?;
    child.signal("KILL")?;
    assert_eq!(child.wait_status(Duration::from_secs(30))?.signal(), Some(9));
    assert_eq!(assert_store_consistent(state.path())?, vec!["mlp@1.0.0"]);

    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let points = ["download-mid", "after-verify", "store-decompress", "mid-activation", "before-persist"];
    let rounds = if full_suite() { 5 } else { 2 };
    for round in 0..rounds {
        for point in points {
            let mut child = ChildAgent::spawn_env(&outpost_bin(), &args, &[("OUTPOST_FAILPOINTS", point)])?;
            let status = child.wait_status(Duration::from_secs(60))?;
            assert_eq!(status.signal(), Some(6), "round {round}, {point}: expected an abort, got {status:?}");
            assert!(child.log.iter().any(|l| l.contains(&format!("failpoint {point}"))), "{point} was reached");
            let versions = assert_store_consistent(state.path())?;
            assert_eq!(versions, vec!["mlp@1.0.0"], "round {round}, {point}: only the complete version is installed");
        }
    }

    // A clean restart: 1.0.0 serves from the store at once, then the poll installs 1.1.0.
    let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", Duration::from_secs(60))?;
    let http = http_client();
    let golden = golden_for(&root().join("models/mlp-int8-qdq"))?;
    let r = http.post(format!("http://{addr}/v2/models/mlp/infer")).json(&golden.request(0)).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["model_version"], "1.1.0");
    golden.check(0, &body)?;
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(30))?, 0);
    assert_eq!(assert_store_consistent(state.path())?, vec!["mlp@1.1.0"]);
    Ok(())
}
