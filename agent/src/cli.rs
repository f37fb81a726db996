//! The command line: `outpost run | check-config | check-models`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::FatalError;

#[derive(Debug, Parser)]
#[command(name = "outpost", version, about = "Edge inference agent: ONNX models over the Open Inference Protocol")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent. Without --config: the dev profile (127.0.0.1:8080, the repository's demo models).
    Run {
        /// Configuration file (TOML), e.g. /etc/outpost/outpost.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit: 0 valid, 78 invalid.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Load every configured model and reproduce its golden vectors, then exit: 0 all pass, 1 otherwise.
    CheckModels {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, FatalError> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::dev_profile()),
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // tract logs probing details at info; keep them out unless asked for.
        EnvFilter::new(format!("{},tract_linalg=warn,tract_core=warn,tract_onnx=warn,tract_hir=warn", config.log.level))
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Parses arguments, runs the command, returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 64,
            };
        }
    };
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost: {e}");
            e.exit_code()
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, FatalError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outpost-io")
        .build()
        .map_err(|e| FatalError::Runtime(format!("cannot start runtime: {e}")))
}

fn execute(cli: Cli) -> Result<i32, FatalError> {
    match cli.command {
        Command::CheckConfig { config } => {
            let c = load_config(config.as_ref())?;
            match &c.path {
                Some(p) => println!("{}: ok", p.display()),
                None => println!("dev profile: ok"),
            }
            Ok(0)
        }
        Command::CheckModels { config } => {
            let c = load_config(config.as_ref())?;
            init_logging(&c);
            let mut failed = 0;
            let sources = crate::lifecycle::scan_local(&c.local_models);
            for src in &sources {
                let onnx = std::fs::read(&src.onnx)
                    .map_err(|e| FatalError::Runtime(format!("{}: {e}", src.onnx.display())))?;
                let golden = match &src.golden {
                    Some(p) => {
                        Some(std::fs::read(p).map_err(|e| FatalError::Runtime(format!("{}: {e}", p.display())))?)
                    }
                    None => None,
                };
                match crate::lifecycle::prepare(&onnx, golden.as_deref(), &c.model(&src.name)) {
                    Ok(p) => println!("{}: ok ({})", src.name, p.detail),
                    Err(e) => {
                        failed += 1;
                        println!("{}: REFUSED: {e}", src.name);
                    }
                }
            }
            println!("{} models, {} refused", sources.len(), failed);
            Ok(if failed == 0 && !sources.is_empty() { 0 } else { 1 })
        }
        Command::Run { config } => {
            let c = load_config(config.as_ref())?;
            init_logging(&c);
            let rt = runtime()?;
            rt.block_on(serve(c, config))?;
            Ok(0)
        }
    }
}

/// Serves until SIGTERM or SIGINT; SIGHUP reloads the configuration (a bad one is logged and
/// the running configuration kept).
async fn serve(config: Config, path: Option<PathBuf>) -> Result<(), FatalError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| signal(k).map_err(|e| FatalError::Runtime(format!("cannot install signal handler: {e}")));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;
    let agent = crate::start(config).await?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                match load_config(path.as_ref()) {
                    Ok(new) => agent.reload(new).await,
                    Err(e) => tracing::error!(error = %e, "reload refused; keeping the running configuration"),
                }
            }
        }
    }
    agent.shutdown().await
}
