//! The process's log: text or JSON lines on stderr, at `log.level`, which a reload changes
//! without a restart (`RUST_LOG`, when set, overrides the file and stays).

use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the running filter; set once by [`init`].
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// The filter for a `log.level`: tract's probing details stay out unless asked for.
fn filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(format!("{level},tract_linalg=warn,tract_core=warn,tract_onnx=warn,tract_hir=warn"))
        .map_err(|e| format!("log.level '{level}': {e}"))
}

/// Installs the process's subscriber (once; later calls do nothing).
pub fn init(config: &Config) {
    // An empty RUST_LOG counts as unset.
    let from_env = std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty());
    let initial = from_env
        .then(|| EnvFilter::try_from_default_env().ok())
        .flatten()
        .or_else(|| filter(&config.log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi);
    let set: SetFilter = match config.log.format {
        LogFormat::Json => {
            let b = builder.json().with_env_filter(initial).with_filter_reloading();
            let handle = b.reload_handle();
            let _ = b.try_init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Text => {
            let b = builder.with_env_filter(initial).with_filter_reloading();
            let handle = b.reload_handle();
            let _ = b.try_init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    if !from_env {
        let _ = SET_FILTER.set(set);
    }
    // Panics inside the engine are caught and answered as errors; their message goes to the
    // structured log rather than raw stderr.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        tracing::error!(%thread, panic = %info, "panic caught");
    }));
}

/// Applies a new `log.level` to the running log. `Ok(false)`: nothing to change (the log is
/// not this module's, or `RUST_LOG` governs it).
pub fn set_level(level: &str) -> Result<bool, String> {
    let Some(set) = SET_FILTER.get() else { return Ok(false) };
    set(filter(level)?)?;
    Ok(true)
}
