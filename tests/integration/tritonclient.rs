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
    }
    agent.stop().await
}
