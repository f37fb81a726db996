//! The engine: tract models, their golden checks and the threads that run them. No I/O here:
//! callers hand in model bytes and tensors.

pub mod batch;
pub mod cache;
pub mod cpu;
pub mod golden;
pub mod inflight;
pub mod model;
pub mod package;
pub mod prepare;
pub mod progress;
pub mod rewrite;
pub mod worker;

pub use batch::BatchPolicy;
pub use golden::{Golden, GoldenReport, Tolerance};
pub use inflight::{InFlight, InFlightCount};
pub use model::{Dim, LoadError, LoadedModel, RunError, Signature, TensorSpec};
pub use prepare::{prepare, PrepareOptions, Prepared};
pub use worker::{
    place, CallError, Handoff, JobError, LoadSnapshot, NotInline, Place, ServeOptions, Served, SubmitError, Ticket,
    INLINE_MAX_US,
};
