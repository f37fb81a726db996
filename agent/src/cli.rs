//! The command line: `outpost run | check-config | check-models`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::FatalError;

#[derive(Debug, Parser)]
#[command(name = "outpost", version, about = "Edge inference agent: ONNX models over the Open Inference Protocol")]
struct Cli {
    /// Use the dev profile (127.0.0.1:8080, the repository's demo models) whatever is
    /// installed. Without it and without --config: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml when it exists, else the dev profile.
    #[arg(long, global = true)]
    dev: bool,
    #[command(subcommand)]
    command: Command,
}

/// The configuration file an installed box uses.
pub const SYSTEM_CONFIG: &str = "/etc/outpost/outpost.toml";

/// `--dev` was given: every command uses the dev profile unless `--config` names a file.
static DEV: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Which configuration a command uses: `--config`; else none under `--dev`; else
/// `$OUTPOST_CONFIG` (`env`); else `system` when it exists; else none (the dev profile).
pub fn config_path(
    explicit: Option<&PathBuf>,
    dev: bool,
    env: Option<std::ffi::OsString>,
    system: &std::path::Path,
) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.clone());
    }
    if dev {
        return None;
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return Some(PathBuf::from(e));
    }
    system.is_file().then(|| system.to_owned())
}

fn resolved(explicit: Option<&PathBuf>) -> Option<PathBuf> {
    config_path(
        explicit,
        DEV.load(std::sync::atomic::Ordering::Relaxed),
        std::env::var_os("OUTPOST_CONFIG"),
        std::path::Path::new(SYSTEM_CONFIG),
    )
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent. Without --config: the dev profile (127.0.0.1:8080, the repository's demo models).
    Run {
        /// Configuration file (TOML), e.g. /etc/outpost/outpost.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit: 0 valid, 78 invalid. With --baseline, also
    /// check it against a signed compliance baseline and list every drift: 0 holds, 1 drifts.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A signed baseline (the registry's baseline.json), verified against the trusted root.
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
    /// Load every configured model and reproduce its golden vectors, then exit: 0 all pass, 1 otherwise.
    CheckModels {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Generate an ed25519 key pair: OUT.key (private, mode 0600) and OUT.pub.
    Keygen {
        /// Path without extension, e.g. keys/index-1.
        #[arg(long)]
        out: PathBuf,
        /// A note stored in the private key file.
        #[arg(long)]
        note: Option<String>,
    },
    /// Check or export the audit log (reads only; the agent may be running).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Send one V2 JSON inference request to the running agent and print the answer.
    Infer {
        model: String,
        /// The request body (V2 JSON): a file, or - for standard input.
        #[arg(long, default_value = "-")]
        data: PathBuf,
        #[arg(long)]
        version: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
    /// Make the running agent reload its configuration file and report what it did: exit 0
    /// when everything changed was applied, 78 when the file is invalid (nothing changes),
    /// 1 when a setting needs a restart or failed to apply (its running value stays), 69 when
    /// no agent runs. systemd's `ExecReload=` runs it, so `systemctl reload` fails likewise.
    Reload {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The agent's process id (default: the one in <state_dir>/lock).
        #[arg(long)]
        pid: Option<u32>,
        /// How long to wait for the agent's report.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Show the running agent's status at a glance (GET /admin/status); --json for all of it.
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
        /// The whole status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Whether the local agent may hold the site's address (keepalived's track_script): exit 0
    /// ready, 1 not ready (still loading, no model serving, the audit log failing closed), 69
    /// not answering. Quick: one request with a short timeout.
    CheckHealth {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value = "2s")]
        timeout: String,
    },
    /// keepalived's notify hook: report the VRRP role (TYPE NAME STATE [PRIORITY], as keepalived
    /// passes them) to the running agent, which shows it and records it; kept for the agent's
    /// next start when it does not answer.
    HaNotify {
        /// INSTANCE or GROUP.
        kind: String,
        /// The VRRP instance's name.
        name: String,
        /// MASTER, BACKUP, FAULT or STOP.
        state: String,
        priority: Option<u32>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
    /// Batch jobs: a file of requests run on the box with the CPU live requests leave free.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Publish and manage models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Create API tokens for the [auth] section.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Create and maintain a registry directory.
    #[command(subcommand)]
    Registry(RegistryCommand),
}

#[derive(Debug, Subcommand)]
enum BatchCommand {
    /// Submit a file of rows (NDJSON V2 requests, or CSV numbers for a one-input model) to
    /// the running agent; prints the job id (with --wait: a progress bar, then the summary).
    Submit {
        /// The input file.
        file: PathBuf,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: Option<String>,
        /// ndjson or csv (default: from the file's extension, else ndjson).
        #[arg(long)]
        format: Option<String>,
        /// Show progress until the job ends.
        #[arg(long)]
        wait: bool,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
    /// One job's progress, or every job's.
    Status {
        id: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
    /// Cancel a queued or running job (rows answered so far stay in its output).
    Cancel {
        id: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
    /// Print a job's output (NDJSON, one line per row in row order: `answer` or `error`).
    Output {
        id: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token: prints the secret once (give it to the client) and the line to add to
    /// `[auth] tokens` (only its SHA-256 is stored).
    Create {
        /// The principal's name, as it appears in the audit log.
        name: String,
        /// Comma-separated roles: infer, observe, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Comma-separated models the token may run (default: every model).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Sign and publish a model into a registry directory. Refused unless tract loads it and
    /// reproduces the golden vectors (outputs computed by ONNX Runtime: scripts/make-golden.py).
    Publish {
        /// The ONNX file.
        model: PathBuf,
        #[arg(long)]
        name: String,
        /// Semantic version, e.g. 1.2.0.
        #[arg(long)]
        version: String,
        /// Index signing key(s) (.key files); as many as the index threshold needs.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        registry: PathBuf,
        /// Golden vectors: sample inputs and ONNX Runtime's outputs.
        #[arg(long)]
        golden: PathBuf,
        #[arg(long, default_value = "stable")]
        channel: String,
        /// Quantization label recorded in the manifest (e.g. fp32, int8-qdq, int8-dynamic).
        #[arg(long, default_value = "fp32")]
        quantization: String,
        /// Whether requests for this model may leave the site (overflow to a data centre).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        may_leave_site: bool,
        /// How long the new index stays valid.
        #[arg(long, default_value = "30d")]
        expires: String,
        /// A package declaration (processing steps, `package.json`): the files its steps read
        /// are taken from its directory and signed with the model.
        #[arg(long)]
        package: Option<PathBuf>,
    },
    /// Show installed, pending and rejected versions (reads the state directory).
    List {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Take back a model's newest version on the running agent (its canary, else its default
    /// version; the previous one serves again). The version is recorded as rejected.
    Rollback {
        model: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The agent's HTTP address; default: http.listen of the configuration.
        #[arg(long)]
        url: Option<String>,
    },
    /// Queue an air-gap bundle (made by `outpost registry bundle`) for the agent to verify and
    /// install, exactly as from its registry; asks a running agent to do it now.
    Import {
        bundle: PathBuf,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain from the last prune anchor to the head, and the signed
    /// checkpoints against it; names the first record that was modified, deleted, reordered or
    /// cut from the tail. Exit 0 intact, 1 broken.
    Verify {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The node's key (.key or .pub) to check checkpoint signatures with; default
        /// node.key_file of the configuration.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Print records as NDJSON.
    Export {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// An RFC 3339 time (2026-11-28T00:00:00Z) or how long ago (24h).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value = "ndjson")]
        format: String,
    },
    /// A data-subject request: print (NDJSON) the records whose pseudonymized parameters hold
    /// VALUE, each compared under its own key epoch. Reads only; exit 0 found, 1 none.
    Find {
        /// The subject's value as clients send it (e.g. a customer id).
        #[arg(long)]
        subject: String,
        /// Only this parameter (default: any pseudonymized parameter).
        #[arg(long)]
        param: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Erasure: the running agent destroys the pseudonymization keys of the epochs that ended
    /// before DATE (crypto-shredding) and records it; those records stay, chained, but can no
    /// longer be linked to anyone.
    Forget {
        /// `now`, an RFC 3339 time or how long ago (e.g. 30d).
        #[arg(long)]
        before: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
    /// End the running agent's pseudonymization key epoch now and start the next.
    RotateKey {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Create a registry: root v1 and an empty index.
    Init {
        #[arg(long)]
        registry: PathBuf,
        /// Root signing keys (.key files).
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        root_threshold: usize,
        /// Index signing keys (.key files).
        #[arg(long = "index-key", required = true)]
        index_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        index_threshold: usize,
        #[arg(long, default_value = "365d")]
        expires: String,
        /// Mark the root as demo-only: only the dev profile will trust it.
        #[arg(long)]
        demo_only: bool,
    },
    /// Pack a registry's files into an air-gap bundle (tar) for `outpost model import`.
    Bundle {
        #[arg(long)]
        registry: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Only these models (default: all).
        #[arg(long = "model")]
        models: Vec<String>,
    },
    /// Sign and publish the compliance baseline every site checks its configuration against
    /// (baseline.json, the next version), from a TOML file: `name = "…"` and a `[rules]` table.
    Baseline {
        #[arg(long)]
        registry: PathBuf,
        /// Index signing key(s) (.key files); as many as the index threshold needs.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The rules file (TOML).
        #[arg(long)]
        rules: PathBuf,
        #[arg(long, default_value = "90d")]
        expires: String,
    },
    /// Sign and publish the registry's pipelines (pipelines.json, the next version) from a
    /// JSON file holding a list of pipeline documents; each is checked first.
    Pipelines {
        #[arg(long)]
        registry: PathBuf,
        /// Index signing key(s) (.key files); as many as the index threshold needs.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The pipeline documents (a JSON list).
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "30d")]
        expires: String,
    },
    /// Write the next root version, signed by the current root keys and the new ones.
    RotateRoot {
        #[arg(long)]
        registry: PathBuf,
        /// Current root keys (.key files) that sign the rotation.
        #[arg(long = "old-key", required = true)]
        old_keys: Vec<PathBuf>,
        /// The new root keys (.key files); they sign too.
        #[arg(long = "new-key", required = true)]
        new_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        root_threshold: usize,
        /// Index public keys (.pub) of the new root; default: keep the current index keys.
        #[arg(long = "index-pub")]
        index_pubs: Vec<PathBuf>,
        #[arg(long)]
        index_threshold: Option<usize>,
        #[arg(long, default_value = "365d")]
        expires: String,
    },
}

/// `check-config --baseline FILE`: verifies the baseline against the trusted root (the
/// one the agent keeps, else `registry.trusted_root`), refuses one older than the baseline
/// the agent trusts, and lists every drift: exit 0 holds, 1 drifts.
fn check_baseline(c: &Config, file: &std::path::Path) -> Result<i32, FatalError> {
    use crate::registry::trust::{persisted_baseline, verify_baseline, verify_root_self};
    let bytes = std::fs::read(file).map_err(|e| FatalError::Usage(format!("{}: {e}", file.display())))?;
    let kept = c.node.state_dir.join("registry").join("root.json");
    let root = match std::fs::read(&kept).ok().and_then(|b| verify_root_self(&b).ok()) {
        Some(r) => r,
        None => {
            let pinned = &c
                .registry
                .as_ref()
                .ok_or_else(|| {
                    FatalError::Usage("--baseline: no trusted root to verify it with: configure [registry]".into())
                })?
                .trusted_root;
            let b = std::fs::read(pinned).map_err(|e| FatalError::Usage(format!("{}: {e}", pinned.display())))?;
            verify_root_self(&b).map_err(|e| FatalError::Usage(format!("{}: {e}", pinned.display())))?
        }
    };
    let baseline =
        verify_baseline(&root, &bytes).map_err(|e| FatalError::Usage(format!("{}: refused: {e}", file.display())))?;
    if let Ok(Some(trusted)) = persisted_baseline(&c.node.state_dir) {
        if baseline.version < trusted.version {
            return Err(FatalError::Usage(format!(
                "{}: refused: baseline version {} is older than the trusted version {}",
                file.display(),
                baseline.version,
                trusted.version
            )));
        }
    }
    let drifts = crate::compliance::check(c, &baseline.rules, &crate::compliance::served_models(&c.node.state_dir));
    let expired = crate::registry::parse_time(&baseline.expires).is_ok_and(|t| t <= crate::registry::now());
    if expired {
        eprintln!("note: baseline '{}' v{} expired at {}", baseline.name, baseline.version, baseline.expires);
    }
    if drifts.is_empty() {
        println!("baseline '{}' v{}: holds", baseline.name, baseline.version);
        return Ok(0);
    }
    println!("baseline '{}' v{}: {} drifts", baseline.name, baseline.version, drifts.len());
    for d in &drifts {
        println!("  {d}");
    }
    Ok(1)
}

/// The configuration a running agent reloads: the file it started from, or the dev profile.
fn reload_config(path: Option<&PathBuf>) -> Result<Config, FatalError> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::dev_profile()),
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, FatalError> {
    match resolved(path) {
        Some(p) => Ok(Config::load(&p)?),
        None => Ok(Config::dev_profile()),
    }
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
    DEV.store(cli.dev, std::sync::atomic::Ordering::Relaxed);
    match cli.command {
        Command::CheckConfig { config, baseline } => {
            let c = load_config(config.as_ref())?;
            crate::check_environment(&c)?;
            match &c.path {
                Some(p) => println!("{}: ok", p.display()),
                None => println!("dev profile: ok"),
            }
            match baseline {
                Some(file) => check_baseline(&c, &file),
                None => Ok(0),
            }
        }
        Command::CheckHealth { config, url, timeout } => {
            let mut target = agent_target(config.as_ref(), url)?;
            target.timeout =
                crate::config::parse_duration(&timeout).map_err(|e| FatalError::Usage(format!("--timeout: {e}")))?;
            match http_call(&target, "GET", "/v2/health/ready") {
                Ok((200, _)) => Ok(0),
                Ok((code, body)) => {
                    eprintln!("outpost: not ready ({code}): {}", body["error"].as_str().unwrap_or("no reason given"));
                    Ok(1)
                }
                Err(e) => {
                    eprintln!("outpost: {e}");
                    Ok(69)
                }
            }
        }
        Command::HaNotify { kind, name, state, priority, config, url } => {
            if kind != "INSTANCE" && kind != "GROUP" {
                return Err(FatalError::Usage(format!("{kind}: keepalived passes INSTANCE or GROUP")));
            }
            let role = crate::ha::Role::new(&name, &state, priority).map_err(FatalError::Usage)?;
            let target = agent_target(config.as_ref(), url)?;
            let body = serde_json::json!({ "instance": role.instance, "state": role.state, "priority": role.priority });
            match http_post(&target, "/admin/ha/role", body.to_string().into_bytes()) {
                Ok((200, _)) => Ok(0),
                answer => {
                    // Kept for the agent to record when it (re)starts.
                    let c = load_config(config.as_ref())?;
                    crate::ha::save(&c.node.state_dir, &role).map_err(FatalError::Runtime)?;
                    match answer {
                        Ok((code, body)) => eprintln!(
                            "outpost: the agent did not record the role ({code}): {}; kept for its next start",
                            body["error"].as_str().unwrap_or("unknown error")
                        ),
                        Err(e) => eprintln!("outpost: {e}; the role is kept for the agent's next start"),
                    }
                    Ok(1)
                }
            }
        }
        Command::Batch(cmd) => batch_command(cmd),
        Command::CheckModels { config } => {
            let c = load_config(config.as_ref())?;
            crate::logging::init(&c);
            let mut failed = 0;
            let sources = crate::lifecycle::scan_local(&c.local_models);
            for src in &sources {
                match crate::lifecycle::prepare_local(src, &c.model(&src.name)) {
                    Ok((p, _)) => println!("{}: ok ({})", src.name, p.detail),
                    Err(e) => {
                        failed += 1;
                        println!("{}: REFUSED: {e}", src.name);
                    }
                }
            }
            println!("{} models, {} refused", sources.len(), failed);
            Ok(if failed == 0 && !sources.is_empty() { 0 } else { 1 })
        }
        Command::Keygen { out, note } => {
            let k = crate::registry::KeyPair::generate().map_err(|e| FatalError::Runtime(e.to_string()))?;
            if out.with_extension("key").exists() {
                return Err(FatalError::Usage(format!(
                    "{} exists; not overwriting",
                    out.with_extension("key").display()
                )));
            }
            k.save(&out, note.as_deref()).map_err(|e| FatalError::Runtime(e.to_string()))?;
            println!(
                "keyid {}\nwrote {} (private, 0600) and {}",
                k.keyid,
                out.with_extension("key").display(),
                out.with_extension("pub").display()
            );
            Ok(0)
        }
        Command::Model(cmd) => model_command(cmd),
        Command::Audit(cmd) => audit_command(cmd),
        Command::Infer { model, data, version, config, url } => {
            let body = if data.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .map_err(|e| FatalError::Usage(e.to_string()))?;
                b
            } else {
                std::fs::read(&data).map_err(|e| FatalError::Usage(format!("{}: {e}", data.display())))?
            };
            let target = agent_target(config.as_ref(), url)?;
            let path = match version {
                Some(v) => format!("/v2/models/{model}/versions/{v}/infer"),
                None => format!("/v2/models/{model}/infer"),
            };
            let (code, answer) = http_post(&target, &path, body)?;
            println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
            Ok(if code == 200 { 0 } else { 1 })
        }
        Command::Status { config, url, json } => {
            let target = agent_target(config.as_ref(), url)?;
            let (code, body) = http_call(&target, "GET", "/admin/status")?;
            if json || code != 200 {
                println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
            } else {
                print!("{}", status_table(&body));
            }
            Ok(if code == 200 { 0 } else { 1 })
        }
        Command::Registry(cmd) => registry_command(cmd),
        Command::Reload { config, pid, timeout } => {
            let timeout =
                crate::config::parse_duration(&timeout).map_err(|e| FatalError::Usage(format!("--timeout: {e}")))?;
            reload_command(config.as_ref(), pid, timeout)
        }
        Command::Token(TokenCommand::Create { name, roles, models }) => {
            if !crate::config::valid_name(&name) {
                return Err(FatalError::Usage(format!("token name '{name}' must be 1-128 of [A-Za-z0-9._-]")));
            }
            let roles = roles
                .iter()
                .map(|r| crate::auth::Role::parse(r.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(FatalError::Usage)?;
            if let Some(bad) = models.iter().flatten().find(|m| !crate::config::valid_name(m)) {
                return Err(FatalError::Usage(format!("'{bad}' is not a model name")));
            }
            let (secret, entry) =
                crate::auth::create_token(&name, &roles, models.as_deref()).map_err(FatalError::Runtime)?;
            println!("token (shown once; give it to the client as 'Authorization: Bearer <token>'):\n{secret}\n");
            println!("add to [auth] tokens in the configuration, then reload (SIGHUP):\n{entry}");
            Ok(0)
        }
        Command::Run { config } => {
            // The file found once, so a reload reads the same one.
            let config = resolved(config.as_ref());
            let c = load_config(config.as_ref())?;
            crate::logging::init(&c);
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
                agent.reload_started();
                let new = reload_config(path.as_ref()).and_then(|c| crate::check_environment(&c).map(|()| c));
                crate::failpoint::pause("reload-after-read");
                match new {
                    Ok(new) => agent.reload(new).await,
                    Err(e) => agent.refuse_reload(e.to_string()),
                };
            }
        }
    }
    agent.shutdown().await
}

/// The pid of the agent running on `state_dir`: the one noted in its lock file, and only while
/// the lock is held (a stale file's pid may since belong to another process, which a SIGHUP
/// would end).
fn running_agent_pid(dir: &std::path::Path) -> Result<u32, FatalError> {
    let path = dir.join("lock");
    let none = |why: &str| FatalError::Unreachable(format!("no running agent on {}: {why}", dir.display()));
    let file = std::fs::File::open(&path).map_err(|e| none(&format!("{}: {e}", path.display())))?;
    match file.try_lock_shared() {
        Ok(()) => return Err(none("its lock is free")),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(none(&format!("{}: {e}", path.display()))),
    }
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| none(&format!("no pid in {}", path.display())))
}

/// `outpost reload`: checks the file as the agent will read it, signals the agent, and waits
/// for its report in `<state_dir>/reload.json`.
fn reload_command(config: Option<&PathBuf>, pid: Option<u32>, timeout: std::time::Duration) -> Result<i32, FatalError> {
    use crate::reload::ReloadReport;
    let c = load_config(config)?;
    crate::check_environment(&c)?;
    let dir = &c.node.state_dir;
    let pid = match pid {
        Some(p) => p,
        None => running_agent_pid(dir)?,
    };
    // A reload already begun may have read the file before it was edited: wait for a report
    // past it (the signal below makes the agent reload again once it is done).
    let reported = ReloadReport::read(dir).filter(|r| r.pid == pid).map_or(0, |r| r.generation);
    let before = crate::reload::read_started(dir, pid).unwrap_or(0).max(reported);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .map_err(|e| FatalError::Runtime(format!("cannot run kill: {e}")))?;
    if !status.success() {
        return Err(FatalError::Unreachable(format!("no running agent with pid {pid}")));
    }
    crate::failpoint::pause("reload-signalled");
    let deadline = std::time::Instant::now() + timeout;
    let report = loop {
        if let Some(r) = ReloadReport::read(dir).filter(|r| r.pid == pid && r.generation > before) {
            break r;
        }
        if std::time::Instant::now() >= deadline {
            return Err(FatalError::Runtime(format!(
                "the agent (pid {pid}) sent no reload report within {timeout:?} ({})",
                ReloadReport::path(dir).display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    println!("{}", report.summary());
    Ok(match () {
        _ if report.ok() => 0,
        _ if report.error.is_some() => 78,
        _ => 1,
    })
}

fn secs(s: &str, what: &str) -> Result<i64, FatalError> {
    crate::config::parse_duration(s).map(|d| d.as_secs() as i64).map_err(|e| FatalError::Usage(format!("{what}: {e}")))
}

fn load_keys(paths: &[PathBuf]) -> Result<Vec<crate::registry::KeyPair>, FatalError> {
    paths.iter().map(|p| crate::registry::KeyPair::load(p).map_err(|e| FatalError::Usage(e.to_string()))).collect()
}

fn model_command(cmd: ModelCommand) -> Result<i32, FatalError> {
    match cmd {
        ModelCommand::Publish {
            model,
            name,
            version,
            keys,
            registry,
            golden,
            channel,
            quantization,
            may_leave_site,
            expires,
            package,
        } => {
            let keys = load_keys(&keys)?;
            let signers: Vec<&crate::registry::KeyPair> = keys.iter().collect();
            let publication = crate::registry::publish::Publication {
                model: &model,
                name: &name,
                version: &version,
                channel: &channel,
                golden: &golden,
                quantization: &quantization,
                may_leave_site,
                index_expires_in_secs: secs(&expires, "--expires")?,
                package: package.as_deref(),
            };
            match crate::registry::publish::publish(&registry, &publication, &signers) {
                Ok(sha) => {
                    println!("published {name}@{version} on {channel}: manifest {sha}");
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("outpost: publish refused: {e}");
                    Ok(1)
                }
            }
        }
        ModelCommand::Rollback { model, config, url } => {
            let target = agent_target(config.as_ref(), url)?;
            let (code, body) = http_call(&target, "POST", &format!("/admin/models/{model}/rollback"))?;
            if code == 200 {
                println!("{}", body["result"].as_str().unwrap_or_default());
                Ok(0)
            } else {
                eprintln!("outpost: rollback refused: {}", body["error"].as_str().unwrap_or("unknown error"));
                Ok(1)
            }
        }
        ModelCommand::Import { bundle, config, url } => {
            let c = load_config(config.as_ref())?;
            // Check the archive's shape now, so a bad bundle is refused at the prompt too.
            let check = tempfile_dir(&c.node.state_dir)?;
            let names = crate::registry::bundle::unpack(&bundle, &check, u64::MAX)
                .map_err(|e| FatalError::Usage(format!("{}: {e}", bundle.display())));
            let _ = std::fs::remove_dir_all(&check);
            let names = names?;
            let spool = c.node.state_dir.join("import");
            std::fs::create_dir_all(&spool).map_err(|e| FatalError::Runtime(format!("{}: {e}", spool.display())))?;
            let name = format!("{}-{}.tar", crate::registry::now(), std::process::id());
            let tmp = spool.join(format!(".{name}.part"));
            std::fs::copy(&bundle, &tmp).map_err(|e| FatalError::Runtime(format!("{}: {e}", bundle.display())))?;
            std::fs::rename(&tmp, spool.join(&name)).map_err(|e| FatalError::Runtime(e.to_string()))?;
            println!("queued {} ({} files) in {}", bundle.display(), names.len(), spool.display());
            let target = agent_target(config.as_ref(), url)?;
            match http_call(&target, "POST", "/admin/registry/poll") {
                Ok((200, body)) => println!("agent imported it: {body}"),
                Ok((_, body)) => println!("agent answered: {body}"),
                Err(_) => {
                    println!("agent not reachable at {}: it imports the bundle at its next start or poll", target.base)
                }
            }
            Ok(0)
        }
        ModelCommand::List { config } => {
            let c = load_config(config.as_ref())?;
            let store = crate::store::Store::open_read_only(&c.node.state_dir);
            let state = store.load_state().map_err(|e| FatalError::Runtime(e.to_string()))?;
            println!("{:<24} {:<12} {:<10} DETAIL", "MODEL", "VERSION", "STATE");
            for (name, m) in &state.installed {
                println!(
                    "{:<24} {:<12} {:<10} manifest {}",
                    name,
                    m.current.version,
                    "serving",
                    &m.current.manifest_sha256[..12]
                );
                if let Some(p) = &m.previous {
                    println!("{:<24} {:<12} {:<10} kept for rollback", name, p.version, "previous");
                }
            }
            for (name, r) in &state.pending_errors {
                println!("{:<24} {:<12} {:<10} {}", name, r.version, "pending", r.reason);
            }
            // Local models (unsigned, from `local_models.dirs`): what the agent loads at start.
            for src in crate::lifecycle::scan_local(&c.local_models) {
                if state.installed.contains_key(&src.name) {
                    continue;
                }
                let enabled = c.model(&src.name).enabled;
                let golden = if src.golden.is_some() { "golden vectors" } else { "no golden vectors" };
                let state_word = if enabled { "local" } else { "disabled" };
                println!("{:<24} {:<12} {:<10} {} ({golden})", src.name, src.version, state_word, src.onnx.display());
            }
            for (sha, r) in &state.rejected {
                println!(
                    "{:<24} {:<12} {:<10} {} (manifest {})",
                    r.name,
                    r.version,
                    "rejected",
                    r.reason,
                    &sha[..12.min(sha.len())]
                );
            }
            if let Some(e) = &state.registry_error {
                println!("registry: {e}");
            }
            Ok(0)
        }
    }
}

fn registry_command(cmd: RegistryCommand) -> Result<i32, FatalError> {
    use crate::registry::publish::{init, rotate_root, RootSpec};
    let fail = |e: crate::registry::RegistryError| FatalError::Runtime(e.to_string());
    match cmd {
        RegistryCommand::Init {
            registry,
            root_keys,
            root_threshold,
            index_keys,
            index_threshold,
            expires,
            demo_only,
        } => {
            let roots = load_keys(&root_keys)?;
            let indexes = load_keys(&index_keys)?;
            let spec = RootSpec {
                root_keys: roots.iter().map(|k| k.public()).collect(),
                root_threshold,
                index_keys: indexes.iter().map(|k| k.public()).collect(),
                index_threshold,
                expires_in_secs: secs(&expires, "--expires")?,
                demo_only,
            };
            init(
                &registry,
                &spec,
                &roots.iter().collect::<Vec<_>>(),
                &indexes.iter().collect::<Vec<_>>(),
                spec.expires_in_secs,
            )
            .map_err(fail)?;
            println!("registry created in {}", registry.display());
            Ok(0)
        }
        RegistryCommand::Bundle { registry, out, models } => {
            let files = bundle_files(&registry, &models).map_err(fail)?;
            crate::registry::bundle::pack(&registry, &files, &out).map_err(fail)?;
            println!("wrote {} ({} files)", out.display(), files.len());
            Ok(0)
        }
        RegistryCommand::Pipelines { registry, keys, file, expires } => {
            let bytes = std::fs::read(&file).map_err(|e| FatalError::Usage(format!("{}: {e}", file.display())))?;
            let docs: Vec<crate::api::pipeline::PipelineDoc> =
                serde_json::from_slice(&bytes).map_err(|e| FatalError::Usage(format!("{}: {e}", file.display())))?;
            let signers = load_keys(&keys)?;
            let refs: Vec<&crate::registry::KeyPair> = signers.iter().collect();
            let n = docs.len();
            let version =
                crate::registry::publish::publish_pipelines(&registry, docs, &refs, secs(&expires, "--expires")?)
                    .map_err(fail)?;
            println!("published {n} pipelines as pipelines.json v{version} in {}", registry.display());
            Ok(0)
        }
        RegistryCommand::Baseline { registry, keys, rules, expires } => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct RulesFile {
                name: String,
                rules: crate::registry::BaselineRules,
            }
            let text =
                std::fs::read_to_string(&rules).map_err(|e| FatalError::Usage(format!("{}: {e}", rules.display())))?;
            let parsed: RulesFile =
                toml::from_str(&text).map_err(|e| FatalError::Usage(format!("{}: {e}", rules.display())))?;
            let signers = load_keys(&keys)?;
            let refs: Vec<&crate::registry::KeyPair> = signers.iter().collect();
            let version = crate::registry::publish::publish_baseline(
                &registry,
                &parsed.name,
                parsed.rules,
                &refs,
                secs(&expires, "--expires")?,
            )
            .map_err(fail)?;
            println!("published baseline '{}' v{version} in {}", parsed.name, registry.display());
            Ok(0)
        }
        RegistryCommand::RotateRoot {
            registry,
            old_keys,
            new_keys,
            root_threshold,
            index_pubs,
            index_threshold,
            expires,
        } => {
            let old = load_keys(&old_keys)?;
            let new = load_keys(&new_keys)?;
            let current = std::fs::read(registry.join("root.json"))
                .map_err(|e| FatalError::Usage(format!("{}: {e}", registry.join("root.json").display())))?;
            let current = crate::registry::trust::verify_root_self(&current).map_err(fail)?;
            let (index_keys, default_threshold) = if index_pubs.is_empty() {
                let keys = current.roles.index.keyids.iter().filter_map(|id| current.keys.get(id).cloned()).collect();
                (keys, current.roles.index.threshold)
            } else {
                let keys = index_pubs
                    .iter()
                    .map(|p| crate::registry::keys::load_public(p).map_err(|e| FatalError::Usage(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                (keys, 1)
            };
            let spec = RootSpec {
                root_keys: new.iter().map(|k| k.public()).collect(),
                root_threshold,
                index_keys,
                index_threshold: index_threshold.unwrap_or(default_threshold),
                expires_in_secs: secs(&expires, "--expires")?,
                demo_only: current.demo_only,
            };
            let signers: Vec<&crate::registry::KeyPair> = old.iter().chain(new.iter()).collect();
            let v = rotate_root(&registry, &spec, &signers).map_err(fail)?;
            println!("root version {v} written to {}", registry.display());
            Ok(0)
        }
    }
}

/// The files of a registry a bundle needs: the root chain, the index, and the manifests and
/// blobs of the chosen models (all when none are named).
fn bundle_files(registry: &std::path::Path, models: &[String]) -> Result<Vec<String>, crate::registry::RegistryError> {
    use crate::registry::dsse::Envelope;
    use crate::registry::RegistryError;
    let mut files = vec!["root.json".to_owned()];
    if let Ok(entries) = std::fs::read_dir(registry.join("roots")) {
        let mut roots: Vec<u64> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()))
            .collect();
        roots.sort();
        files.extend(roots.into_iter().map(|n| format!("roots/{n}.json")));
    }
    files.push("index.json".into());
    let index_bytes = std::fs::read(registry.join("index.json")).map_err(|e| RegistryError::Io(e.to_string()))?;
    let index: crate::registry::Index = serde_json::from_slice(&Envelope::parse(&index_bytes)?.payload_bytes()?)
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    for (name, entries) in &index.models {
        if !models.is_empty() && !models.contains(name) {
            continue;
        }
        for e in entries {
            let rel = format!("manifests/{}.json", e.manifest.sha256);
            let bytes = std::fs::read(registry.join(&rel)).map_err(|err| RegistryError::Io(format!("{rel}: {err}")))?;
            let stmt: crate::registry::Statement = serde_json::from_slice(&Envelope::parse(&bytes)?.payload_bytes()?)
                .map_err(|err| RegistryError::Invalid(err.to_string()))?;
            files.push(rel);
            files.push(format!("blobs/sha256/{}", stmt.predicate.blob.sha256));
        }
    }
    Ok(files)
}

fn tempfile_dir(state_dir: &std::path::Path) -> Result<PathBuf, FatalError> {
    let d = state_dir.join("import").join(format!(".check-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| FatalError::Runtime(format!("{}: {e}", d.display())))?;
    Ok(d)
}

/// How a command reaches the running agent: `--url` or `cli.url`, else `[http]`'s address
/// (loopback for an unspecified one), https when TLS is on; trust, token and client
/// certificate from `[cli]` (`OUTPOST_CA_FILE` and `OUTPOST_TOKEN` override).
struct AgentTarget {
    base: String,
    ca: Option<(PathBuf, &'static str)>,
    token: Option<String>,
    identity: Option<(PathBuf, PathBuf)>,
    /// How long a call may take.
    timeout: std::time::Duration,
}

fn agent_target(config: Option<&PathBuf>, url: Option<String>) -> Result<AgentTarget, FatalError> {
    let c = load_config(config)?;
    let base = match url.or_else(|| c.cli.url.clone()) {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let scheme = if c.http.tls.is_some() { "https" } else { "http" };
            let mut addr = c.http.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            format!("{scheme}://{addr}")
        }
    };
    let ca = match std::env::var_os("OUTPOST_CA_FILE") {
        Some(p) => Some((PathBuf::from(p), "OUTPOST_CA_FILE")),
        None => c
            .cli
            .ca
            .clone()
            .map(|p| (p, "cli.ca"))
            .or_else(|| c.http.tls.as_ref().map(|t| (t.cert.clone(), "http.tls_cert"))),
    };
    let token = match std::env::var("OUTPOST_TOKEN") {
        Ok(t) => Some(t.trim().to_owned()),
        Err(_) => match &c.cli.token_file {
            Some(p) => Some(crate::tls::read_token(p, "cli.token_file").map_err(|e| FatalError::Usage(e.to_string()))?),
            None => None,
        },
    };
    let identity = c.cli.client_cert.clone().zip(c.cli.client_key.clone());
    Ok(AgentTarget { base, ca, token, identity, timeout: std::time::Duration::from_secs(120) })
}

/// Seconds as an operator reads them: 42s, 17m, 3h5m, 2d4h.
fn short_duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// `/admin/status` at a glance: the node line, a row per model, then upstream, MQTT, overflow,
/// webhooks, the HA role and verdicts, compliance, the last reload and alarms.
pub fn status_table(s: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let str_of = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_else(|| "-".into());
    let uptime = short_duration(s["uptime_seconds"].as_u64().unwrap_or(0));
    let mut out = String::new();
    let ready = if s["ready"].as_bool() == Some(true) {
        "ready".to_owned()
    } else {
        format!("NOT READY ({})", str_of(&s["not_ready_reason"]))
    };
    let _ = writeln!(
        out,
        "{} ({}) outpost {}, up {uptime}, {ready}\n",
        str_of(&s["node"]),
        str_of(&s["site"]),
        str_of(&s["version"])
    );
    let mut rows = vec![["MODEL", "VERSION", "STATE", "PLAN", "REQ/S", "P99", "QUEUE", "CANARY"].map(String::from)];
    for m in s["models"].as_array().into_iter().flatten() {
        rows.push([
            str_of(&m["name"]),
            str_of(&m["version"]),
            str_of(&m["state"]),
            str_of(&m["plan"]),
            format!("{:.1}", m["rate_per_s"].as_f64().unwrap_or(0.0)),
            m["p99_ms"].as_f64().map_or("-".into(), |p| format!("≤{p} ms")),
            m["queue_depth"].as_u64().unwrap_or(0).to_string(),
            str_of(&m["canary"]),
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let now = outpost_proto::registry::now();
    let ago = |v: &serde_json::Value| match v.as_f64() {
        Some(t) => format!("{} ago", short_duration((now - t as i64).max(0) as u64)),
        None => "never".to_owned(),
    };
    let _ = writeln!(out);
    if let Some(r) = s["registry"].as_object() {
        let polled = r.get("last_poll_at").map_or("not polled yet".to_owned(), |t| format!("polled {}", ago(t)));
        let result = r.get("result").map(str_of).unwrap_or_else(|| "-".into());
        let index = r.get("index_version").and_then(|v| v.as_u64()).map_or(String::new(), |v| format!(", index v{v}"));
        let _ = writeln!(
            out,
            "registry: {} {polled}: {result}{index}; last success {}",
            r.get("url").map(str_of).unwrap_or_default(),
            r.get("last_success_at").map_or("never".to_owned(), ago)
        );
        if let Some(e) = r.get("error").and_then(|v| v.as_str()) {
            let _ = writeln!(out, "  {e}");
        }
        if let Some(d) = r.get("download").filter(|d| d["state"] != "done" && d.is_object()) {
            let (got, total) = (d["received_bytes"].as_u64().unwrap_or(0), d["total_bytes"].as_u64().unwrap_or(0));
            let pct = (got * 100).checked_div(total).unwrap_or(0);
            let eta = d["eta_seconds"].as_u64().map_or("-".to_owned(), short_duration);
            let _ = writeln!(
                out,
                "  download {} {}: {} {pct}% ({} of {} bytes), {}/s, ETA {eta}",
                str_of(&d["model"]),
                str_of(&d["version"]),
                str_of(&d["state"]),
                got,
                total,
                d["rate_bytes_per_s"].as_f64().unwrap_or(0.0) as u64
            );
        }
    }
    if let Some(u) = s["upstream"].as_object() {
        let backlog = u.get("audit_backlog_records").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "upstream: {} audit records waiting; last success {}",
            backlog as u64,
            u.get("last_success_at").map_or("never".to_owned(), ago)
        );
    }
    if let Some(m) = s["mqtt"].as_object() {
        let state = match m.get("connected").and_then(|v| v.as_bool()) {
            Some(true) => "connected",
            Some(false) => "DISCONNECTED",
            None => "not connected yet",
        };
        let _ = writeln!(out, "mqtt: {} {state}", m.get("broker").map(str_of).unwrap_or_default());
    }
    if let Some(o) = s["overflow"].as_object() {
        let _ = writeln!(
            out,
            "overflow: {} (breaker {})",
            o.get("url").map(str_of).unwrap_or_default(),
            o.get("breaker").map(str_of).unwrap_or_default()
        );
    }
    for h in s["webhooks"].as_array().into_iter().flatten() {
        let n = |k: &str| h[k].as_u64().unwrap_or(0);
        let mut line = format!(
            "webhook {}: {} queued, {} delivered, {} dead-lettered; last success {}",
            str_of(&h["name"]),
            n("queued"),
            n("delivered"),
            n("dead_letter_count"),
            h.get("last_success_at").filter(|v| !v.is_null()).map_or("never".to_owned(), ago)
        );
        if let Some(e) = h["last_error"].as_str() {
            line.push_str(&format!("; last error: {}", e.chars().take(120).collect::<String>()));
        }
        let _ = writeln!(out, "{line}");
    }
    for j in s["jobs"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "job {}", job_line(j));
    }
    for p in s["pipelines"].as_array().into_iter().flatten() {
        let models: Vec<String> = p["models"].as_array().into_iter().flatten().map(str_of).collect();
        let steps = p["steps"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "pipeline {} v{}: {steps} steps over {}",
            str_of(&p["name"]),
            str_of(&p["version"]),
            models.join(", ")
        );
    }
    if let Some(h) = s["ha"].as_object() {
        let _ = writeln!(
            out,
            "ha: {} of {} since {}",
            h.get("role").map(str_of).unwrap_or_default(),
            h.get("instance").map(str_of).unwrap_or_default(),
            h.get("since").map(str_of).unwrap_or_default()
        );
    }
    if let Some(v) = s["verdicts"].as_object() {
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let last = match (v.get("last_from").and_then(|x| x.as_str()), v.get("last_at").and_then(|x| x.as_str())) {
            (Some(from), Some(at)) => format!("last from {from} at {at}"),
            _ => "none from the peer yet".to_owned(),
        };
        let _ = writeln!(
            out,
            "verdicts: {} shared, {} received ({last}), {} ignored",
            n("published"),
            n("received"),
            n("ignored")
        );
    }
    if let Some(c) = s["compliance"].as_object() {
        let drifts: Vec<String> = c
            .get("drifts")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .map(|d| format!("{}: {}", str_of(&d["rule"]), str_of(&d["detail"])))
            .collect();
        let finding = if drifts.is_empty() { "holds".to_owned() } else { format!("drifts: {}", drifts.join("; ")) };
        let _ = writeln!(
            out,
            "compliance: baseline {} ({}): {finding}",
            c.get("baseline").map(str_of).unwrap_or_default(),
            c.get("mode").map(str_of).unwrap_or_default()
        );
    }
    if let Some(r) = s["reload"].as_object() {
        let report: Option<crate::reload::ReloadReport> = serde_json::from_value(s["reload"].clone()).ok();
        if let Some(report) = report {
            let _ = writeln!(out, "reload: {}: {}", r.get("at").map_or("-".to_owned(), ago), report.summary());
        }
    }
    let alarms = s["alarms"]
        .as_object()
        .map(|a| a.iter().map(|(k, v)| format!("{k}: {}", str_of(v))).collect::<Vec<_>>())
        .unwrap_or_default();
    let _ = writeln!(out, "alarms: {}", if alarms.is_empty() { "none".to_owned() } else { alarms.join("; ") });
    out
}

/// What a failed request's error chain says, in an operator's words: connection refused, name
/// not resolved, TLS refused, timed out; else the innermost cause.
pub fn network_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return "connection refused (is the agent running, on this address?)".into()
                }
                std::io::ErrorKind::TimedOut => return "timed out".into(),
                _ => {}
            }
        }
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return format!("TLS refused: {tls} (cli.ca or OUTPOST_CA_FILE names the CA of the agent's certificate)");
        }
        chain.push(c.to_string());
        cur = c.source();
    }
    let text = chain.join(": ");
    if text.contains("dns error") || text.contains("failed to lookup address") {
        return format!("name not resolved ({})", chain.last().cloned().unwrap_or_default());
    }
    if text.contains("timed out") {
        return "timed out".into();
    }
    chain.last().cloned().unwrap_or(text)
}

/// One request to the running agent; returns the status and the JSON body.
fn http_call(target: &AgentTarget, method: &str, path: &str) -> Result<(u16, serde_json::Value), FatalError> {
    http_request(target, method, path, None)
}

/// POSTs a body to the running agent; returns the status and the JSON answer.
fn http_post(target: &AgentTarget, path: &str, body: Vec<u8>) -> Result<(u16, serde_json::Value), FatalError> {
    http_request(target, "POST", path, Some(body))
}

/// The body of a request to the agent.
enum Payload {
    Bytes(Vec<u8>),
    /// A file, streamed (a batch job's input).
    File(PathBuf),
}

fn http_request(
    target: &AgentTarget,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, serde_json::Value), FatalError> {
    let (status, bytes) = http_send(target, method, path, body.map(Payload::Bytes))?;
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
}

/// One request to the agent; the status and the answer's bytes.
fn http_send(
    target: &AgentTarget,
    method: &str,
    path: &str,
    body: Option<Payload>,
) -> Result<(u16, Vec<u8>), FatalError> {
    crate::tls::install_crypto_provider();
    let url = format!("{}{path}", target.base);
    let rt = runtime()?;
    rt.block_on(async {
        let mut builder = reqwest::Client::builder().timeout(target.timeout);
        if let Some((ca, setting)) = &target.ca {
            builder = crate::tls::add_roots(builder, ca, setting).map_err(|e| FatalError::Usage(e.to_string()))?;
        }
        if let Some((cert, key)) = &target.identity {
            builder = crate::tls::add_identity(builder, cert, key, ("cli.client_cert", "cli.client_key"))
                .map_err(|e| FatalError::Usage(e.to_string()))?;
        }
        let client = builder.build().map_err(|e| FatalError::Runtime(e.to_string()))?;
        let mut req = if method == "POST" { client.post(&url) } else { client.get(&url) };
        let body = match body {
            None => None,
            Some(Payload::Bytes(b)) => Some(reqwest::Body::from(b)),
            Some(Payload::File(p)) => Some(reqwest::Body::from(
                tokio::fs::File::open(&p).await.map_err(|e| FatalError::Usage(format!("{}: {e}", p.display())))?,
            )),
        };
        if let Some(token) = &target.token {
            req = req.bearer_auth(token);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.map_err(|e| FatalError::Unreachable(format!("{url}: {}", network_cause(&e))))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        Ok((status, body))
    })
}

/// One line of a job's progress: a bar, rows done, failed, rate and time left.
fn job_line(j: &serde_json::Value) -> String {
    let (rows, done) = (j["rows"].as_u64().unwrap_or(0), j["done"].as_u64().unwrap_or(0));
    let filled = (done.min(rows) * 30).checked_div(rows).map_or(30, |f| f as usize);
    let mut line = format!(
        "{} [{}{}] {done}/{rows} rows, {} failed, {}",
        j["id"].as_str().unwrap_or("-"),
        "#".repeat(filled),
        ".".repeat(30 - filled),
        j["failed"].as_u64().unwrap_or(0),
        j["state"].as_str().unwrap_or("-"),
    );
    if let Some(r) = j["rows_per_second"].as_f64() {
        line.push_str(&format!(", {r:.0} rows/s"));
    }
    if let Some(e) = j["eta_seconds"].as_f64() {
        line.push_str(&format!(", {} left", short_duration(e as u64)));
    }
    line
}

fn batch_command(cmd: BatchCommand) -> Result<i32, FatalError> {
    let refused = |code: u16, body: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        eprintln!("outpost: refused ({code}): {}", v["error"].as_str().unwrap_or("unknown error"));
        Ok(1)
    };
    match cmd {
        BatchCommand::Submit { file, model, version, format, wait, config, url } => {
            let format = format.unwrap_or_else(|| {
                if file.extension().is_some_and(|x| x == "csv") { "csv" } else { "ndjson" }.to_owned()
            });
            if !file.is_file() {
                return Err(FatalError::Usage(format!("{}: not a file", file.display())));
            }
            let mut target = agent_target(config.as_ref(), url)?;
            // The model first: a refusal before the upload, not in the middle of it.
            let ready = match &version {
                Some(v) => format!("/v2/models/{}/versions/{}/ready", query_escape(&model), query_escape(v)),
                None => format!("/v2/models/{}/ready", query_escape(&model)),
            };
            let (code, body) = http_send(&target, "GET", &ready, None)?;
            if code != 200 {
                return refused(code, &body);
            }
            target.timeout = std::time::Duration::from_secs(3600);
            let mut path = format!("/v2/jobs?model={}&format={}", query_escape(&model), query_escape(&format));
            if let Some(v) = &version {
                path.push_str(&format!("&version={}", query_escape(v)));
            }
            let (code, body) = http_send(&target, "POST", &path, Some(Payload::File(file)))?;
            if code != 201 {
                return refused(code, &body);
            }
            let job: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            println!("{id}");
            if !wait {
                return Ok(0);
            }
            target.timeout = std::time::Duration::from_secs(30);
            loop {
                let (code, status) = http_call(&target, "GET", &format!("/v2/jobs/{id}"))?;
                if code != 200 {
                    eprintln!();
                    return refused(code, status.to_string().as_bytes());
                }
                eprint!("\r{}\x1b[K", job_line(&status));
                if matches!(status["state"].as_str(), Some("done" | "cancelled")) {
                    eprintln!();
                    return Ok(if status["state"] == "done" { 0 } else { 1 });
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        BatchCommand::Status { id, config, url } => {
            let target = agent_target(config.as_ref(), url)?;
            let path = id.as_ref().map_or_else(|| "/v2/jobs".to_owned(), |i| format!("/v2/jobs/{}", query_escape(i)));
            let (code, body) = http_call(&target, "GET", &path)?;
            if code != 200 {
                return refused(code, body.to_string().as_bytes());
            }
            let jobs = if id.is_some() { vec![body] } else { body["jobs"].as_array().cloned().unwrap_or_default() };
            for j in &jobs {
                println!("{}", job_line(j));
            }
            Ok(0)
        }
        BatchCommand::Cancel { id, config, url } => {
            let target = agent_target(config.as_ref(), url)?;
            let (code, body) = http_call(&target, "POST", &format!("/v2/jobs/{}/cancel", query_escape(&id)))?;
            if code != 200 {
                return refused(code, body.to_string().as_bytes());
            }
            println!("{}", if body["cancelled"] == true { "cancelled" } else { "it had already ended" });
            Ok(0)
        }
        BatchCommand::Output { id, config, url } => {
            let mut target = agent_target(config.as_ref(), url)?;
            target.timeout = std::time::Duration::from_secs(600);
            let (code, body) = http_send(&target, "GET", &format!("/v2/jobs/{}/output", query_escape(&id)), None)?;
            if code != 200 {
                return refused(code, &body);
            }
            std::io::Write::write_all(&mut std::io::stdout().lock(), &body)
                .map_err(|e| FatalError::Runtime(e.to_string()))?;
            Ok(0)
        }
    }
}

fn audit_command(cmd: AuditCommand) -> Result<i32, FatalError> {
    match cmd {
        AuditCommand::Verify { config, key } => {
            let c = load_config(config.as_ref())?;
            let key_path = key.unwrap_or_else(|| c.node.key_file.clone());
            let public = match crate::audit::checkpoint::public_key(&key_path) {
                Ok(k) => Some(k),
                Err(e) => {
                    eprintln!("outpost: checkpoint signatures not checked: no node key ({e})");
                    None
                }
            };
            match crate::audit::verify(&c.node.state_dir.join("audit"), public.as_ref()) {
                Ok(r) => {
                    match (r.first, r.last) {
                        (Some(f), Some(l)) => {
                            println!(
                                "audit log intact: records {f}..{l} ({} records) chain from anchor {}",
                                r.records, r.anchor
                            )
                        }
                        _ => println!("audit log intact: no records after anchor {}", r.anchor),
                    }
                    match r.last_checkpoint {
                        Some(cp) => println!(
                            "{} checkpoints{} agree; the last covers record {cp}",
                            r.checkpoints,
                            if r.signatures_checked { ", signed by the node key," } else { "" }
                        ),
                        None => println!("no checkpoint covers these records yet"),
                    }
                    Ok(0)
                }
                Err(e) => {
                    println!("audit log BROKEN: {e}");
                    Ok(1)
                }
            }
        }
        AuditCommand::Export { config, since, format } => {
            if format != "ndjson" {
                return Err(FatalError::Usage(format!("--format {format}: only ndjson is supported")));
            }
            let c = load_config(config.as_ref())?;
            let since_ms = match since {
                None => 0,
                Some(s) => crate::config::parse_time_arg(&s).map_err(|e| FatalError::Usage(format!("--since: {e}")))?,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let n = crate::audit::export(&c.node.state_dir.join("audit"), since_ms, &mut out)
                .map_err(FatalError::Runtime)?;
            eprintln!("{n} records");
            Ok(0)
        }
        AuditCommand::Find { subject, param, config } => {
            let c = load_config(config.as_ref())?;
            let master = crate::privacy::Privacy::read_existing_key(&c.privacy.hmac_key_file)
                .map_err(|e| FatalError::Runtime(e.to_string()))?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let found = crate::privacy::subject::find(&c.node.state_dir, &master, &subject, param.as_deref(), &mut out)
                .map_err(FatalError::Runtime)?;
            eprintln!("{} of {} inference records hold the subject", found.matched, found.searched);
            if found.unlinkable > 0 {
                eprintln!(
                    "{} records are of key epochs {:?}, whose keys were destroyed: they cannot be linked to anyone",
                    found.unlinkable, found.destroyed
                );
            }
            Ok(if found.matched > 0 { 0 } else { 1 })
        }
        AuditCommand::Forget { before, config, url } => {
            crate::config::parse_time_arg(&before).map_err(|e| FatalError::Usage(format!("--before: {e}")))?;
            let target = agent_target(config.as_ref(), url)?;
            let path = format!("/admin/privacy/forget?before={}", query_escape(&before));
            privacy_call(&target, &path, "forget", |body| match body["destroyed"].as_array() {
                Some(list) if !list.is_empty() => list
                    .iter()
                    .map(|d| format!("destroyed the key of epoch {} ({} to {})", d["epoch"], d["start"], d["end"]))
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => "no key epoch ended before that: nothing destroyed".to_owned(),
            })
        }
        AuditCommand::RotateKey { config, url } => {
            let target = agent_target(config.as_ref(), url)?;
            privacy_call(&target, "/admin/privacy/rotate", "rotate-key", |body| {
                format!("key epoch {} ended; epoch {} started", body["ended"], body["started"])
            })
        }
    }
}

/// POSTs a privacy act to the running agent and prints its report: exit 0 done, 1 refused,
/// 69 no agent.
fn privacy_call(
    target: &AgentTarget,
    path: &str,
    what: &str,
    report: impl Fn(&serde_json::Value) -> String,
) -> Result<i32, FatalError> {
    match http_call(target, "POST", path) {
        Ok((200, body)) => {
            println!("{}", report(&body));
            Ok(0)
        }
        Ok((code, body)) => {
            eprintln!("outpost: {what} refused ({code}): {}", body["error"].as_str().unwrap_or("unknown error"));
            Ok(1)
        }
        Err(e) => {
            eprintln!("outpost: no agent answered at {} ({e}); {what} needs the running agent", target.base);
            Ok(69)
        }
    }
}

/// Percent-encodes a query value.
fn query_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::config_path;

    #[test]
    fn the_status_table_shows_each_webhook() {
        let s = serde_json::json!({ "webhooks": [{
            "name": "ops", "queued": 3, "delivered": 12, "dead_letter_count": 1,
            "last_success_at": null, "last_error": "the receiver answered 503"
        }]});
        let table = super::status_table(&s);
        assert!(
            table.contains("webhook ops: 3 queued, 12 delivered, 1 dead-lettered; last success never; last error: the receiver answered 503"),
            "{table}"
        );
    }

    #[test]
    fn the_status_table_shows_the_role_the_verdicts_and_compliance() {
        let s = serde_json::json!({
            "ha": { "role": "MASTER", "instance": "outpost_site", "priority": 150, "since": "2026-12-04T18:00:00Z" },
            "verdicts": { "published": 2, "received": 1, "ignored": 3, "last_from": "box-b", "last_at": "2026-12-04T18:01:00Z" },
            "compliance": { "baseline": "branch v3", "mode": "enforce", "holds": false,
                "drifts": [{ "rule": "auth", "detail": "[auth] is not configured" }] },
        });
        let table = super::status_table(&s);
        assert!(table.contains("ha: MASTER of outpost_site since 2026-12-04T18:00:00Z"), "{table}");
        assert!(
            table.contains("verdicts: 2 shared, 1 received (last from box-b at 2026-12-04T18:01:00Z), 3 ignored"),
            "{table}"
        );
        assert!(
            table.contains("compliance: baseline branch v3 (enforce): drifts: auth: [auth] is not configured"),
            "{table}"
        );
    }

    #[test]
    fn commands_find_the_installed_configuration_unless_told_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let system = dir.path().join("outpost.toml");
        let explicit = std::path::PathBuf::from("/srv/other.toml");
        let env = || Some(std::ffi::OsString::from("/srv/env.toml"));
        // Nothing installed: the dev profile.
        assert_eq!(config_path(None, false, None, &system), None);
        std::fs::write(&system, "").expect("write");
        // Installed: found without --config.
        assert_eq!(config_path(None, false, None, &system), Some(system.clone()));
        // $OUTPOST_CONFIG before the installed file; an empty one counts as unset.
        assert_eq!(config_path(None, false, env(), &system), Some("/srv/env.toml".into()));
        assert_eq!(config_path(None, false, Some("".into()), &system), Some(system.clone()));
        // --dev forces the dev profile; --config wins over everything.
        assert_eq!(config_path(None, true, env(), &system), None);
        assert_eq!(config_path(Some(&explicit), true, env(), &system), Some(explicit));
    }

    #[test]
    fn network_errors_name_their_cause() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(super::network_cause(&refused).starts_with("connection refused"));
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(super::network_cause(&tls).starts_with("TLS refused"), "{}", super::network_cause(&tls));
    }
}
