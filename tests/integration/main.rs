//! Integration tests: the real agent over real loopback HTTP, real ONNX models, golden
//! outputs from ONNX Runtime. One test binary; the harness is the `outpost_tests` library.

mod architecture;
mod audit;
mod bad_requests;
mod batch;
mod batching;
mod cli;
mod compliance;
mod crash;
mod endpoints;
mod fleet;
mod grpc;
mod ha;
mod lifecycle;
mod models;
mod mqtt;
mod overflow;
mod packages;
mod packaging;
mod pipelines;
mod registry;
mod residency;
mod security;
mod tritonclient;
mod webhooks;

/// The `outpost` CLI built for these tests (a thin wrapper around `outpost::cli::main`).
pub fn outpost_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_outpost-under-test"))
}

/// The `outpost-collector` CLI built for these tests.
pub fn collector_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_outpost-collector-under-test"))
}

/// `outpost model list` for a configuration, as a user runs it.
pub fn model_list(config: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(outpost_bin()).args(["model", "list", "--config"]).arg(config).output()?;
    anyhow::ensure!(out.status.success(), "model list failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
