//! Administrative operations on models (the V2 repository extension's load/unload, rollback,
//! an immediate registry poll), behind one trait so adapters need not know where models come
//! from.

use std::future::Future;
use std::pin::Pin;

pub type ControlFuture<T> = Pin<Box<dyn Future<Output = Result<T, ControlError>> + Send>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("unknown model '{0}'")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Unavailable(String),
}

pub trait ModelControl: Send + Sync {
    /// Serves a model again after `unload` (or loads it for the first time).
    fn load(&self, model: String) -> ControlFuture<String>;
    /// Stops serving a model until `load`; in-flight requests finish.
    fn unload(&self, model: String) -> ControlFuture<String>;
    /// Takes back a model's newest version and records it as rejected.
    fn rollback(&self, model: String) -> ControlFuture<String>;
    /// Polls the registry now; returns a summary.
    fn poll(&self) -> ControlFuture<serde_json::Value>;
}
