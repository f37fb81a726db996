//! The `outpost-collector` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_PATH};
use crate::{db, fleet, http, store};

#[derive(Parser)]
#[command(
    name = "outpost-collector",
    version,
    about = "Receives Outpost nodes' audit chains, heartbeats and telemetry into PostgreSQL, witnesses each chain, and shows the fleet"
)]
struct Cli {
    /// Configuration file (default /etc/outpost-collector/collector.toml; the embedded defaults when it
    /// is absent). Also OUTPOST_COLLECTOR_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// PostgreSQL connection string, overriding the configuration's `database`. Also
    /// OUTPOST_COLLECTOR_DATABASE.
    #[arg(long, global = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the API (applies database migrations first).
    Serve {
        /// Address to listen on, overriding the configuration's `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Enrolls a node and prints its token and the lines for its configuration.
    Enroll {
        node: String,
        /// The node's public key file (`<state_dir>/node.pub`); otherwise pinned from its
        /// first heartbeat.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Issue a new token for a node already enrolled (the old one stops working).
        #[arg(long)]
        rotate: bool,
        /// The collector's URL as nodes reach it, for the printed configuration.
        #[arg(long, default_value = "https://collector.example:9400")]
        url: String,
    },
    /// Adds (or re-issues) a reader token: read access to the fleet view and metrics.
    Reader { name: String },
    /// The fleet at a glance.
    Fleet {
        /// JSON, as `GET /v1/fleet` answers.
        #[arg(long)]
        json: bool,
    },
    /// Re-checks a node's stored audit chain (every hash and link); exit 1 on a break.
    Verify { node: String },
    /// Applies database migrations and exits.
    Migrate,
    /// Drops the day partitions of audit records older than `retention_days` now.
    Prune,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let config_path = cli.config.clone().or_else(|| env("OUTPOST_COLLECTOR_CONFIG").map(PathBuf::from));
    let database =
        cli.database.clone().or_else(|| env("OUTPOST_COLLECTOR_DATABASE").and_then(|v| v.into_string().ok()));
    let (path, must_exist) = match &config_path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let mut config = match Config::load(&path, must_exist) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost-collector: {e}");
            return ExitCode::from(78);
        }
    };
    if let Some(d) = database {
        config.database = d;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost-collector: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("outpost-collector: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

async fn open(config: &Config) -> Result<store::Store, Failure> {
    let pool = db::Pool::open(&config.database, config.connections)
        .await
        .map_err(|e| (69, format!("{e} (database = \"{}\")", config.database)))?;
    Ok(store::Store { pool, keep_days: config.retention_days })
}

async fn run(command: Command, mut config: Config) -> Result<ExitCode, Failure> {
    match command {
        Command::Migrate => {
            open(&config).await?;
            println!("database schema is current");
        }
        Command::Prune => {
            let s = open(&config).await?;
            let today = store::now_ms().div_euclid(store::DAY_MS);
            let n = s.pool.drop_old_partitions(today, config.retention_days).await.map_err(|e| (69, e.to_string()))?;
            println!("{n} day partitions older than {} days dropped", config.retention_days);
        }
        Command::Serve { listen } => {
            if let Some(l) = listen {
                config.listen = l;
            }
            serve(config).await?;
        }
        Command::Enroll { node, key, rotate, url } => {
            let key = match key {
                Some(p) => {
                    let k = outpost_proto::registry::keys::load_public(&p).map_err(|e| (66, e.to_string()))?;
                    k.verifying_key().map_err(|e| (65, format!("{}: {e}", p.display())))?;
                    Some(serde_json::to_string(&k).map_err(|e| (70, e.to_string()))?)
                }
                None => None,
            };
            let s = open(&config).await?;
            let token = s.enroll(&node, key.as_deref(), rotate).await.map_err(|e| (65, e.to_string()))?;
            println!("# Node {node} enrolled. On the node, as root:");
            // Readable by the agent's group only: the agent runs as `outpost`.
            println!(
                "install -m 640 -o root -g outpost /dev/null /etc/outpost/upstream.token && \
                 echo '{token}' > /etc/outpost/upstream.token"
            );
            println!("# and in /etc/outpost/outpost.toml:");
            println!("[upstream]");
            println!("url = \"{url}\"");
            println!("token_file = \"/etc/outpost/upstream.token\"");
        }
        Command::Reader { name } => {
            let s = open(&config).await?;
            let token = s.add_reader(&name).await.map_err(|e| (65, e.to_string()))?;
            println!("{token}");
        }
        Command::Fleet { json } => {
            let s = open(&config).await?;
            let rows = fleet::rows(&s, config.silent_after_s).await.map_err(|e| (69, e.to_string()))?;
            if json {
                let text = serde_json::to_string_pretty(&serde_json::json!({ "nodes": rows }))
                    .map_err(|e| (70, e.to_string()))?;
                println!("{text}");
            } else {
                print!("{}", fleet::table(&rows));
            }
        }
        Command::Verify { node } => {
            let s = open(&config).await?;
            match s.verify(&node).await.map_err(|e| (69, e.to_string()))? {
                Ok(n) => println!("{node}: {n} stored records, chain intact"),
                Err(why) => {
                    println!("{node}: chain broken: {why}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config) -> Result<(), Failure> {
    let store = open(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| (69, format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| (69, e.to_string()))?;
    let app = Arc::new(http::App {
        store,
        metrics: http::Metrics::default(),
        max_batch_bytes: config.max_batch_bytes,
        silent_after_s: config.silent_after_s,
    });
    let retention = {
        let app = app.clone();
        let keep = config.retention_days;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let today = store::now_ms().div_euclid(store::DAY_MS);
                match app.store.pool.drop_old_partitions(today, keep).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(dropped = n, keep_days = keep, "old audit partitions dropped"),
                    Err(e) => tracing::warn!(error = %e, "retention pass failed"),
                }
            }
        })
    };
    // The address on stdout, one line, so that a supervisor (or a test) can read the port.
    println!("listening on {addr}");
    tracing::info!(%addr, "collector listening");
    let router = http::router(app, config.max_body_bytes);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    };
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(|e| (70, e.to_string()))?;
    retention.abort();
    Ok(())
}
