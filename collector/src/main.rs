//! `outpost-collector`: the fleet side of Outpost. See `outpost-collector --help`.

fn main() -> std::process::ExitCode {
    outpost_collector::cli::main()
}
