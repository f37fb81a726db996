//! The Open Inference Protocol over gRPC (package `inference`, service
//! `GRPCInferenceService`), with the Triton extensions `tritonclient.grpc` calls: the messages
//! as protobuf structs (prost derive; field numbers and types as in the V2 `grpc_service.proto`
//! and Triton's `model_config.proto`, checked against `tritonclient`'s own descriptors by the
//! integration tests), and the conversions to and from the protocol's data model.
//!
//! Only the fields Outpost reads or writes are declared: protobuf skips unknown fields on
//! decoding, and a client sees the defaults of the ones never sent.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::json::{empty, shape_from_i64};
use super::{DataType, InferRequest, InferResponse, ProtocolError, RequestedOutput, Tensor, TensorData};

/// The gRPC service's full name.
pub const SERVICE: &str = "inference.GRPCInferenceService";

/// Elements one request may hold across its tensors (as the JSON parser's cap).
pub const MAX_ELEMENTS: usize = 64 << 20;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerLiveRequest {}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerLiveResponse {
    #[prost(bool, tag = "1")]
    pub live: bool,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReadyRequest {}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReadyResponse {
    #[prost(bool, tag = "1")]
    pub ready: bool,
}

/// `ModelReadyRequest`, `ModelMetadataRequest`, `ModelConfigRequest` and
/// `ModelStatisticsRequest` share this shape.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelRef {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelReadyResponse {
    #[prost(bool, tag = "1")]
    pub ready: bool,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerMetadataRequest {}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerMetadataResponse {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(string, repeated, tag = "3")]
    pub extensions: Vec<String>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelMetadataResponse {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub versions: Vec<String>,
    #[prost(string, tag = "3")]
    pub platform: String,
    #[prost(message, repeated, tag = "4")]
    pub inputs: Vec<TensorMetadata>,
    #[prost(message, repeated, tag = "5")]
    pub outputs: Vec<TensorMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferParameter {
    #[prost(oneof = "ParameterChoice", tags = "1, 2, 3, 4, 5")]
    pub parameter_choice: Option<ParameterChoice>,
}
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterChoice {
    #[prost(bool, tag = "1")]
    Bool(bool),
    #[prost(int64, tag = "2")]
    Int64(i64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(double, tag = "4")]
    Double(f64),
    #[prost(uint64, tag = "5")]
    Uint64(u64),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferTensorContents {
    #[prost(bool, repeated, tag = "1")]
    pub bool_contents: Vec<bool>,
    #[prost(int32, repeated, tag = "2")]
    pub int_contents: Vec<i32>,
    #[prost(int64, repeated, tag = "3")]
    pub int64_contents: Vec<i64>,
    #[prost(uint32, repeated, tag = "4")]
    pub uint_contents: Vec<u32>,
    #[prost(uint64, repeated, tag = "5")]
    pub uint64_contents: Vec<u64>,
    #[prost(float, repeated, tag = "6")]
    pub fp32_contents: Vec<f32>,
    #[prost(double, repeated, tag = "7")]
    pub fp64_contents: Vec<f64>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub bytes_contents: Vec<Vec<u8>>,
}

type Parameters = BTreeMap<String, InferParameter>;

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferInputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(btree_map = "string, message", tag = "4")]
    pub parameters: Parameters,
    #[prost(message, optional, tag = "5")]
    pub contents: Option<InferTensorContents>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferRequestedOutputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(btree_map = "string, message", tag = "2")]
    pub parameters: Parameters,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferRequest {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(btree_map = "string, message", tag = "4")]
    pub parameters: Parameters,
    #[prost(message, repeated, tag = "5")]
    pub inputs: Vec<InferInputTensor>,
    #[prost(message, repeated, tag = "6")]
    pub outputs: Vec<InferRequestedOutputTensor>,
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub raw_input_contents: Vec<Vec<u8>>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferOutputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(btree_map = "string, message", tag = "4")]
    pub parameters: Parameters,
    #[prost(message, optional, tag = "5")]
    pub contents: Option<InferTensorContents>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferResponse {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(btree_map = "string, message", tag = "4")]
    pub parameters: Parameters,
    #[prost(message, repeated, tag = "5")]
    pub outputs: Vec<InferOutputTensor>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub raw_output_contents: Vec<Vec<u8>>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelStreamInferResponse {
    #[prost(string, tag = "1")]
    pub error_message: String,
    #[prost(message, optional, tag = "2")]
    pub infer_response: Option<ModelInferResponse>,
}

// Triton's model configuration (the fields Outpost fills).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ConfigDataType {
    TypeInvalid = 0,
    TypeBool = 1,
    TypeUint8 = 2,
    TypeUint16 = 3,
    TypeUint32 = 4,
    TypeUint64 = 5,
    TypeInt8 = 6,
    TypeInt16 = 7,
    TypeInt32 = 8,
    TypeInt64 = 9,
    TypeFp16 = 10,
    TypeFp32 = 11,
    TypeFp64 = 12,
    TypeString = 13,
}

impl ConfigDataType {
    /// The name Triton's JSON configuration uses (`TYPE_FP32`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigDataType::TypeInvalid => "TYPE_INVALID",
            ConfigDataType::TypeBool => "TYPE_BOOL",
            ConfigDataType::TypeUint8 => "TYPE_UINT8",
            ConfigDataType::TypeUint16 => "TYPE_UINT16",
            ConfigDataType::TypeUint32 => "TYPE_UINT32",
            ConfigDataType::TypeUint64 => "TYPE_UINT64",
            ConfigDataType::TypeInt8 => "TYPE_INT8",
            ConfigDataType::TypeInt16 => "TYPE_INT16",
            ConfigDataType::TypeInt32 => "TYPE_INT32",
            ConfigDataType::TypeInt64 => "TYPE_INT64",
            ConfigDataType::TypeFp16 => "TYPE_FP16",
            ConfigDataType::TypeFp32 => "TYPE_FP32",
            ConfigDataType::TypeFp64 => "TYPE_FP64",
            ConfigDataType::TypeString => "TYPE_STRING",
        }
    }
}

impl From<DataType> for ConfigDataType {
    fn from(d: DataType) -> ConfigDataType {
        match d {
            DataType::Bool => ConfigDataType::TypeBool,
            DataType::U8 => ConfigDataType::TypeUint8,
            DataType::U16 => ConfigDataType::TypeUint16,
            DataType::U32 => ConfigDataType::TypeUint32,
            DataType::U64 => ConfigDataType::TypeUint64,
            DataType::I8 => ConfigDataType::TypeInt8,
            DataType::I16 => ConfigDataType::TypeInt16,
            DataType::I32 => ConfigDataType::TypeInt32,
            DataType::I64 => ConfigDataType::TypeInt64,
            DataType::F16 => ConfigDataType::TypeFp16,
            DataType::F32 => ConfigDataType::TypeFp32,
            DataType::F64 => ConfigDataType::TypeFp64,
            DataType::Bytes => ConfigDataType::TypeString,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelTensorConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "ConfigDataType", tag = "2")]
    pub data_type: i32,
    /// Field 4 here (`ModelInput`); `ModelOutput` has its dims at 3.
    #[prost(int64, repeated, tag = "4")]
    pub dims: Vec<i64>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelOutputConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "ConfigDataType", tag = "2")]
    pub data_type: i32,
    #[prost(int64, repeated, tag = "3")]
    pub dims: Vec<i64>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelDynamicBatching {
    #[prost(int32, repeated, tag = "1")]
    pub preferred_batch_size: Vec<i32>,
    #[prost(uint64, tag = "2")]
    pub max_queue_delay_microseconds: u64,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub platform: String,
    #[prost(int32, tag = "4")]
    pub max_batch_size: i32,
    #[prost(message, repeated, tag = "5")]
    pub input: Vec<ModelTensorConfig>,
    #[prost(message, repeated, tag = "6")]
    pub output: Vec<ModelOutputConfig>,
    #[prost(message, optional, tag = "11")]
    pub dynamic_batching: Option<ModelDynamicBatching>,
    #[prost(string, tag = "17")]
    pub backend: String,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelConfigResponse {
    #[prost(message, optional, tag = "1")]
    pub config: Option<ModelConfig>,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct StatisticDuration {
    #[prost(uint64, tag = "1")]
    pub count: u64,
    #[prost(uint64, tag = "2")]
    pub ns: u64,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferStatistics {
    #[prost(message, optional, tag = "1")]
    pub success: Option<StatisticDuration>,
    #[prost(message, optional, tag = "2")]
    pub fail: Option<StatisticDuration>,
    #[prost(message, optional, tag = "3")]
    pub queue: Option<StatisticDuration>,
    #[prost(message, optional, tag = "4")]
    pub compute_input: Option<StatisticDuration>,
    #[prost(message, optional, tag = "5")]
    pub compute_infer: Option<StatisticDuration>,
    #[prost(message, optional, tag = "6")]
    pub compute_output: Option<StatisticDuration>,
    #[prost(message, optional, tag = "7")]
    pub cache_hit: Option<StatisticDuration>,
    #[prost(message, optional, tag = "8")]
    pub cache_miss: Option<StatisticDuration>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelStatistics {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
    /// Milliseconds since the epoch.
    #[prost(uint64, tag = "3")]
    pub last_inference: u64,
    #[prost(uint64, tag = "4")]
    pub inference_count: u64,
    #[prost(uint64, tag = "5")]
    pub execution_count: u64,
    #[prost(message, optional, tag = "6")]
    pub inference_stats: Option<InferStatistics>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelStatisticsResponse {
    #[prost(message, repeated, tag = "1")]
    pub model_stats: Vec<ModelStatistics>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RepositoryIndexRequest {
    #[prost(string, tag = "1")]
    pub repository_name: String,
    #[prost(bool, tag = "2")]
    pub ready: bool,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelIndex {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(string, tag = "3")]
    pub state: String,
    #[prost(string, tag = "4")]
    pub reason: String,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepositoryIndexResponse {
    #[prost(message, repeated, tag = "1")]
    pub models: Vec<ModelIndex>,
}
/// `RepositoryModelLoadRequest` and `RepositoryModelUnloadRequest`. The parameters' values
/// (`ModelRepositoryParameter` messages) are kept as their encoded bytes: Outpost takes none,
/// and a request carrying any is refused rather than half-applied.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepositoryModelRequest {
    #[prost(string, tag = "1")]
    pub repository_name: String,
    #[prost(string, tag = "2")]
    pub model_name: String,
    #[prost(btree_map = "string, bytes", tag = "3")]
    pub parameters: BTreeMap<String, Vec<u8>>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

// ------------------------------------------------------------------------------------------
// Conversions
// ------------------------------------------------------------------------------------------

fn parameter_value(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        None => Value::Null,
        Some(ParameterChoice::Bool(b)) => Value::Bool(*b),
        Some(ParameterChoice::Int64(i)) => Value::from(*i),
        Some(ParameterChoice::String(s)) => Value::String(s.clone()),
        Some(ParameterChoice::Double(d)) => serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number),
        Some(ParameterChoice::Uint64(u)) => Value::from(*u),
    }
}

fn parameters_to_json(p: &Parameters) -> Map<String, Value> {
    p.iter().map(|(k, v)| (k.clone(), parameter_value(v))).collect()
}

/// JSON parameters as protobuf ones; values with no protobuf form (arrays, objects, null) go
/// as their JSON text.
pub fn parameters_from_json(m: &Map<String, Value>) -> Parameters {
    m.iter()
        .map(|(k, v)| {
            let choice = match v {
                Value::Bool(b) => ParameterChoice::Bool(*b),
                Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => ParameterChoice::Int64(i),
                    (None, Some(u)) => ParameterChoice::Uint64(u),
                    _ => ParameterChoice::Double(n.as_f64().unwrap_or(0.0)),
                },
                Value::String(s) => ParameterChoice::String(s.clone()),
                other => ParameterChoice::String(other.to_string()),
            };
            (k.clone(), InferParameter { parameter_choice: Some(choice) })
        })
        .collect()
}

/// The typed contents of one input, checked against its datatype.
fn from_contents(name: &str, dt: DataType, c: InferTensorContents) -> Result<TensorData, ProtocolError> {
    let bad = |what: &str| ProtocolError::new(format!("input '{name}': {what} for datatype {dt}"));
    // Exactly the field the datatype reads may be set.
    let set = [
        !c.bool_contents.is_empty(),
        !c.int_contents.is_empty(),
        !c.int64_contents.is_empty(),
        !c.uint_contents.is_empty(),
        !c.uint64_contents.is_empty(),
        !c.fp32_contents.is_empty(),
        !c.fp64_contents.is_empty(),
        !c.bytes_contents.is_empty(),
    ];
    let wanted = match dt {
        DataType::Bool => 0,
        DataType::I8 | DataType::I16 | DataType::I32 => 1,
        DataType::I64 => 2,
        DataType::U8 | DataType::U16 | DataType::U32 => 3,
        DataType::U64 => 4,
        DataType::F32 => 5,
        DataType::F64 => 6,
        DataType::Bytes => 7,
        DataType::F16 => return Err(bad("FP16 travels only in raw_input_contents")),
    };
    if set.iter().enumerate().any(|(i, s)| *s && i != wanted) {
        return Err(bad("contents in a field other than the datatype's"));
    }
    fn narrow<T: TryFrom<S>, S: Copy>(v: Vec<S>) -> Option<Vec<T>> {
        v.into_iter().map(|x| T::try_from(x).ok()).collect()
    }
    let range = || bad("a value is out of range");
    Ok(match dt {
        DataType::Bool => TensorData::Bool(c.bool_contents),
        DataType::I8 => TensorData::I8(narrow(c.int_contents).ok_or_else(range)?),
        DataType::I16 => TensorData::I16(narrow(c.int_contents).ok_or_else(range)?),
        DataType::I32 => TensorData::I32(c.int_contents),
        DataType::I64 => TensorData::I64(c.int64_contents),
        DataType::U8 => TensorData::U8(narrow(c.uint_contents).ok_or_else(range)?),
        DataType::U16 => TensorData::U16(narrow(c.uint_contents).ok_or_else(range)?),
        DataType::U32 => TensorData::U32(c.uint_contents),
        DataType::U64 => TensorData::U64(c.uint64_contents),
        DataType::F32 => TensorData::F32(c.fp32_contents),
        DataType::F64 => TensorData::F64(c.fp64_contents),
        DataType::Bytes => TensorData::Bytes(c.bytes_contents),
        DataType::F16 => empty(dt),
    })
}

/// A decoded `ModelInferRequest` as the protocol's request, with whether its tensors came
/// raw (`raw_input_contents`, as `tritonclient` sends them) or typed (`contents`). Every
/// tensor must hold exactly its shape's elements; all inputs are raw or none is.
pub fn request_from_grpc(mut r: ModelInferRequest) -> Result<(InferRequest, bool), ProtocolError> {
    take_request_from_grpc(&mut r)
}

/// As [`request_from_grpc`], taking out of `r` only what the request keeps (names, typed
/// contents, the id): the rest of `r` (raw bytes, once read, datatypes, shapes, parameters)
/// stays, for its owner to free when it suits (the gRPC listener frees it after the answer
/// is written).
pub fn take_request_from_grpc(r: &mut ModelInferRequest) -> Result<(InferRequest, bool), ProtocolError> {
    let raw = !r.raw_input_contents.is_empty();
    if raw && r.raw_input_contents.len() != r.inputs.len() {
        return Err(ProtocolError::new(format!(
            "{} raw_input_contents for {} inputs: give every input's data raw, or none",
            r.raw_input_contents.len(),
            r.inputs.len()
        )));
    }
    let mut raws = r.raw_input_contents.iter();
    let mut total = 0usize;
    let mut inputs = Vec::with_capacity(r.inputs.len());
    let mut input_parameters = Vec::with_capacity(r.inputs.len());
    for input in &mut r.inputs {
        let name = std::mem::take(&mut input.name);
        let dt = DataType::parse(&input.datatype)
            .ok_or_else(|| ProtocolError::new(format!("input '{name}': unknown datatype '{}'", input.datatype)))?;
        let shape = shape_from_i64(&name, &input.shape)?;
        let expected =
            Tensor::shape_elements(&shape).filter(|&n| n <= MAX_ELEMENTS.saturating_sub(total)).ok_or_else(|| {
                ProtocolError::new(format!("input '{name}': shape {:?} holds too many elements", input.shape))
            })?;
        total += expected;
        let data = match (raws.next(), input.contents.take()) {
            (Some(bytes), None) => TensorData::from_le_bytes(dt, bytes, expected)
                .map_err(|e| ProtocolError::new(format!("input '{name}': {e}")))?,
            (Some(_), Some(_)) => {
                return Err(ProtocolError::new(format!("input '{name}': both contents and raw_input_contents")))
            }
            (None, Some(c)) => from_contents(&name, dt, c)?,
            (None, None) if expected == 0 => empty(dt),
            (None, None) => return Err(ProtocolError::new(format!("input '{name}': no contents"))),
        };
        if data.len() != expected {
            return Err(ProtocolError::new(format!(
                "input '{name}': shape {shape:?} needs {expected} elements but the data holds {}",
                data.len()
            )));
        }
        input_parameters.push(parameters_to_json(&input.parameters));
        inputs.push(Tensor { name, shape, data });
    }
    let outputs = r
        .outputs
        .iter_mut()
        .map(|o| RequestedOutput { parameters: parameters_to_json(&o.parameters), name: std::mem::take(&mut o.name) })
        .collect();
    let request = InferRequest {
        id: (!r.id.is_empty()).then(|| std::mem::take(&mut r.id)),
        parameters: parameters_to_json(&r.parameters),
        inputs,
        input_parameters,
        outputs,
    };
    Ok((request, raw))
}

fn typed_contents(d: TensorData) -> Option<InferTensorContents> {
    let mut c = InferTensorContents::default();
    match d {
        TensorData::Bool(v) => c.bool_contents = v,
        TensorData::I8(v) => c.int_contents = v.into_iter().map(i32::from).collect(),
        TensorData::I16(v) => c.int_contents = v.into_iter().map(i32::from).collect(),
        TensorData::I32(v) => c.int_contents = v,
        TensorData::I64(v) => c.int64_contents = v,
        TensorData::U8(v) => c.uint_contents = v.into_iter().map(u32::from).collect(),
        TensorData::U16(v) => c.uint_contents = v.into_iter().map(u32::from).collect(),
        TensorData::U32(v) => c.uint_contents = v,
        TensorData::U64(v) => c.uint64_contents = v,
        TensorData::F32(v) => c.fp32_contents = v,
        TensorData::F64(v) => c.fp64_contents = v,
        TensorData::Bytes(v) => c.bytes_contents = v,
        TensorData::F16(_) => return None,
    }
    Some(c)
}

/// The protocol's response as a `ModelInferResponse`: tensors in `raw_output_contents` when
/// `raw` (or when an output has no typed form, FP16), else in typed `contents`. Takes the
/// response by value: names and typed tensors move over rather than being copied.
pub fn response_to_grpc(r: InferResponse, raw: bool) -> ModelInferResponse {
    let raw = raw || r.outputs.iter().any(|t| matches!(t.data, TensorData::F16(_)));
    let parameters = parameters_from_json(&r.parameters);
    let mut raw_output_contents = Vec::with_capacity(if raw { r.outputs.len() } else { 0 });
    let mut outputs = Vec::with_capacity(r.outputs.len());
    for t in r.outputs {
        let datatype = t.datatype().as_str().to_owned();
        let shape = t.shape.iter().map(|&d| i64::try_from(d).unwrap_or(i64::MAX)).collect();
        let contents = if raw {
            raw_output_contents.push(t.data.to_le_bytes());
            None
        } else {
            typed_contents(t.data)
        };
        outputs.push(InferOutputTensor { name: t.name, datatype, shape, parameters: Parameters::new(), contents });
    }
    ModelInferResponse {
        model_name: r.model_name,
        model_version: r.model_version,
        id: r.id.unwrap_or_default(),
        parameters,
        outputs,
        raw_output_contents,
    }
}

/// A `ModelInferResponse` back as the protocol's response (clients, tests, the fuzz target).
pub fn response_from_grpc(r: ModelInferResponse) -> Result<InferResponse, ProtocolError> {
    let raw = !r.raw_output_contents.is_empty();
    if raw && r.raw_output_contents.len() != r.outputs.len() {
        return Err(ProtocolError::new("raw_output_contents and outputs differ in number"));
    }
    // The request decoder checks the tensors; reuse it on the outputs.
    let as_request = ModelInferRequest {
        inputs: r
            .outputs
            .into_iter()
            .map(|o| InferInputTensor {
                name: o.name,
                datatype: o.datatype,
                shape: o.shape,
                parameters: o.parameters,
                contents: o.contents,
            })
            .collect(),
        raw_input_contents: r.raw_output_contents,
        ..ModelInferRequest::default()
    };
    let (decoded, _) = request_from_grpc(as_request)?;
    Ok(InferResponse {
        model_name: r.model_name,
        model_version: r.model_version,
        id: (!r.id.is_empty()).then_some(r.id),
        parameters: parameters_to_json(&r.parameters),
        outputs: decoded.inputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn request(raw: bool) -> ModelInferRequest {
        let data = [1.5f32, -2.0, 3.25, 4.0];
        let mut r = ModelInferRequest {
            model_name: "mlp".into(),
            id: "r1".into(),
            inputs: vec![InferInputTensor {
                name: "X".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            ..Default::default()
        };
        if raw {
            r.raw_input_contents = vec![data.iter().flat_map(|x| x.to_le_bytes()).collect()];
        } else {
            r.inputs[0].contents = Some(InferTensorContents { fp32_contents: data.to_vec(), ..Default::default() });
        }
        r
    }

    #[test]
    fn raw_and_typed_requests_decode_alike_and_responses_round_trip() {
        let bytes = request(true).encode_to_vec();
        let (a, raw) = request_from_grpc(ModelInferRequest::decode(bytes.as_slice()).unwrap()).unwrap();
        assert!(raw);
        let (b, raw) = request_from_grpc(request(false)).unwrap();
        assert!(!raw);
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.id.as_deref(), Some("r1"));
        for raw in [true, false] {
            let resp = InferResponse {
                model_name: "mlp".into(),
                model_version: "1".into(),
                id: a.id.clone(),
                parameters: Map::new(),
                outputs: a.inputs.clone(),
            };
            let g = response_to_grpc(resp.clone(), raw);
            assert_eq!(g.raw_output_contents.is_empty(), !raw);
            let back = response_from_grpc(ModelInferResponse::decode(g.encode_to_vec().as_slice()).unwrap()).unwrap();
            assert_eq!(back.outputs, resp.outputs);
        }
    }

    #[test]
    fn taking_a_request_leaves_the_rest_of_the_message_to_its_owner() {
        let mut r = request(true);
        let (taken, raw) = take_request_from_grpc(&mut r).unwrap();
        let (whole, _) = request_from_grpc(request(true)).unwrap();
        assert!(raw);
        assert_eq!((taken.inputs, taken.id), (whole.inputs, whole.id));
        // What the request keeps was taken; the raw bytes, datatype and shape stay behind, to be
        // freed with the message.
        assert!(r.inputs[0].name.is_empty() && r.id.is_empty());
        assert_eq!(r.raw_input_contents[0].len(), 16);
        assert_eq!((r.inputs[0].datatype.as_str(), r.inputs[0].shape.as_slice()), ("FP32", &[1i64, 4][..]));
        assert_eq!(r.model_name, "mlp");
    }

    #[test]
    fn an_fp16_output_sends_every_output_raw_and_typed_ones_keep_their_values() {
        let tensor = |name: &str, data| Tensor { name: name.into(), shape: vec![2], data };
        let resp = |outputs| InferResponse {
            model_name: "m".into(),
            model_version: "2".into(),
            id: Some("x".into()),
            parameters: Map::new(),
            outputs,
        };
        let typed = response_to_grpc(resp(vec![tensor("a", TensorData::I8(vec![-1, 7]))]), false);
        assert!(typed.raw_output_contents.is_empty());
        assert_eq!(typed.outputs[0].contents.as_ref().map(|c| c.int_contents.clone()), Some(vec![-1, 7]));
        assert_eq!((typed.model_version.as_str(), typed.id.as_str()), ("2", "x"));
        let mixed =
            resp(vec![tensor("a", TensorData::F32(vec![1.0, 2.0])), tensor("h", TensorData::F16(vec![0.5, 1.0]))]);
        let g = response_to_grpc(mixed.clone(), false);
        assert_eq!(g.raw_output_contents.len(), 2);
        assert!(g.outputs.iter().all(|o| o.contents.is_none()));
        let back = response_from_grpc(ModelInferResponse::decode(g.encode_to_vec().as_slice()).unwrap()).unwrap();
        assert_eq!(back.outputs, mixed.outputs);
    }

    #[test]
    fn malformed_tensors_are_refused_with_the_reason() {
        let mut r = request(true);
        r.raw_input_contents[0].pop();
        assert!(request_from_grpc(r).unwrap_err().to_string().contains("15 bytes of binary data"));
        let mut r = request(false);
        r.inputs[0].shape = vec![1, 5];
        assert!(request_from_grpc(r).unwrap_err().to_string().contains("needs 5 elements"));
        let mut r = request(false);
        r.inputs[0].contents.as_mut().unwrap().int_contents = vec![1];
        assert!(request_from_grpc(r).unwrap_err().to_string().contains("other than the datatype"));
        let mut r = request(true);
        r.inputs[0].shape = vec![1 << 40, 1 << 40];
        assert!(request_from_grpc(r).unwrap_err().to_string().contains("too many elements"));
        let mut r = request(true);
        r.inputs.push(r.inputs[0].clone());
        assert!(request_from_grpc(r).unwrap_err().to_string().contains("1 raw_input_contents for 2 inputs"));
    }
}
