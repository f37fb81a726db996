//! The `outpost` CLI, built inside the tests package so child-process tests can find it
//! through `CARGO_BIN_EXE_outpost-under-test`.
fn main() {
    std::process::exit(outpost::cli::main());
}
