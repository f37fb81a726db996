//! The engine: tract models, their golden checks and the threads that run them. No I/O here:
//! callers hand in model bytes and tensors.

pub mod batch;
pub mod cache;
pub mod cpu;
pub mod golden;
pub mod model;
pub mod rewrite;
pub mod worker;

pub use batch::BatchPolicy;
pub use golden::{Golden, GoldenReport, Tolerance};
pub use model::{Dim, LoadError, LoadedModel, RunError, Signature, TensorSpec};
pub use worker::{Handoff, JobError, NotInline, ServeOptions, Served, SubmitError, INLINE_MAX_US};
