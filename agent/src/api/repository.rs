//! The serving table: per model name, the active [`Served`] handle and its status. Swapping the
//! handle is atomic; requests that already hold the old one finish on it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::InferError;
use crate::engine::Served;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Unavailable,
}

impl ModelState {
    /// The V2 repository-index state names (Triton's).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unavailable => "UNAVAILABLE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelStatus {
    pub state: ModelState,
    /// The version serving, or the one that was tried.
    pub version: Option<String>,
    /// Why the model is unavailable (or why the last attempt failed while an older one serves).
    pub reason: Option<String>,
}

struct Entry {
    serving: Option<Arc<Served>>,
    status: ModelStatus,
}

#[derive(Default)]
pub struct Repository {
    models: RwLock<BTreeMap<String, Entry>>,
}

impl Repository {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle requests for `name` (and optionally `version`) go to.
    pub fn serving(&self, name: &str, version: Option<&str>) -> Result<Arc<Served>, InferError> {
        let models = self.read();
        let entry = models.get(name).ok_or_else(|| InferError::ModelNotFound(name.to_owned()))?;
        let served = entry.serving.as_ref();
        if let Some(v) = version {
            if served.map(|s| s.version.as_str()) != Some(v) {
                return Err(InferError::VersionNotFound { model: name.to_owned(), version: v.to_owned() });
            }
        }
        served.cloned().ok_or_else(|| InferError::NotReady(name.to_owned()))
    }

    /// Marks a model as loading; a version already serving keeps serving.
    pub fn set_loading(&self, name: &str, version: &str) {
        let mut models = self.write();
        let entry = models.entry(name.to_owned()).or_insert_with(|| Entry {
            serving: None,
            status: ModelStatus { state: ModelState::Loading, version: None, reason: None },
        });
        if entry.serving.is_none() {
            entry.status = ModelStatus { state: ModelState::Loading, version: Some(version.to_owned()), reason: None };
        }
    }

    /// Makes `served` the active handle; returns the one it replaces.
    pub fn activate(&self, served: Served) -> Option<Arc<Served>> {
        let mut models = self.write();
        let name = served.name.clone();
        let status = ModelStatus { state: ModelState::Ready, version: Some(served.version.clone()), reason: None };
        let entry = models.entry(name).or_insert_with(|| Entry { serving: None, status: status.clone() });
        entry.status = status;
        entry.serving.replace(Arc::new(served))
    }

    /// Records a failed load. A version already serving keeps serving; the reason is kept.
    pub fn set_failed(&self, name: &str, version: &str, reason: &str) {
        let mut models = self.write();
        let entry = models.entry(name.to_owned()).or_insert_with(|| Entry {
            serving: None,
            status: ModelStatus { state: ModelState::Unavailable, version: None, reason: None },
        });
        match &entry.serving {
            Some(s) => {
                entry.status.reason = Some(format!("version {version} refused: {reason}; {} still serving", s.version))
            }
            None => {
                entry.status = ModelStatus {
                    state: ModelState::Unavailable,
                    version: Some(version.to_owned()),
                    reason: Some(reason.to_owned()),
                }
            }
        }
    }

    /// Takes a model out of service; requests in flight finish on their handle.
    pub fn remove(&self, name: &str) -> Option<Arc<Served>> {
        self.write().remove(name).and_then(|e| e.serving)
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn status(&self, name: &str) -> Option<ModelStatus> {
        self.read().get(name).map(|e| e.status.clone())
    }

    /// Every model with its status and active handle, sorted by name.
    pub fn list(&self) -> Vec<(String, ModelStatus, Option<Arc<Served>>)> {
        self.read().iter().map(|(k, e)| (k.clone(), e.status.clone(), e.serving.clone())).collect()
    }

    pub fn ready_count(&self) -> usize {
        self.read().values().filter(|e| e.serving.is_some()).count()
    }
}
