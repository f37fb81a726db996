//! The `outpost-collector` CLI, built inside the tests package so child-process tests can find
//! it through `CARGO_BIN_EXE_outpost-collector-under-test`.
fn main() -> std::process::ExitCode {
    outpost_collector::cli::main()
}
