//! The Open Inference Protocol (KServe V2) data model and its JSON encoding.
//!
//! Nothing here depends on the engine: the parsers build small for fuzzing and are shared by
//! every adapter (HTTP now, MQTT later).

pub mod grpc;
pub mod json;
pub mod tensor;

use serde_json::{Map, Value};

pub use tensor::{DataType, Tensor, TensorData};

/// A parsed inference request.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Map<String, Value>,
    pub inputs: Vec<Tensor>,
    /// Per-input `parameters`, index-aligned with `inputs`.
    pub input_parameters: Vec<Map<String, Value>>,
    /// Requested outputs; empty means all.
    pub outputs: Vec<RequestedOutput>,
}

#[derive(Debug, Clone)]
pub struct RequestedOutput {
    pub name: String,
    pub parameters: Map<String, Value>,
}

/// An inference response.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub parameters: Map<String, Value>,
    pub outputs: Vec<Tensor>,
}

/// A request that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(String);

impl ProtocolError {
    pub fn new(msg: impl Into<String>) -> Self {
        ProtocolError(msg.into())
    }
}
