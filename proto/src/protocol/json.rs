//! The V2 JSON request and response bodies.
//!
//! `data` may be flat or nested (Triton accepts both); it is flattened while parsing, straight
//! into one vector, and converted to the declared datatype with range checks.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::tensor::{DataType, Tensor, TensorData};
use super::{InferRequest, InferResponse, ProtocolError, RequestedOutput};

/// Upper bound on JSON elements in one request, whatever the body limit.
pub const MAX_JSON_ELEMENTS: usize = 1 << 24;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RawInput>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Flat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Copy)]
enum Num {
    I(i64),
    U(u64),
    F(f64),
}

/// Flattened `data`: every leaf of the nested arrays, in order.
enum Flat {
    Empty,
    Bool(Vec<bool>),
    Num(Vec<Num>),
    Str(Vec<String>),
}

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut flat = Flat::Empty;
        d.deserialize_any(FlatVisitor { out: &mut flat })?;
        Ok(flat)
    }
}

struct FlatVisitor<'a> {
    out: &'a mut Flat,
}

impl FlatVisitor<'_> {
    fn push_num<E: de::Error>(&mut self, n: Num) -> Result<(), E> {
        match self.out {
            Flat::Empty => *self.out = Flat::Num(vec![n]),
            Flat::Num(v) => {
                if v.len() >= MAX_JSON_ELEMENTS {
                    return Err(E::custom("too many elements in tensor data"));
                }
                v.push(n)
            }
            _ => return Err(E::custom("tensor data mixes numbers with other values")),
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for FlatVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, boolean, string or (nested) array of them")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.out {
            Flat::Empty => *self.out = Flat::Bool(vec![v]),
            Flat::Bool(b) if b.len() < MAX_JSON_ELEMENTS => b.push(v),
            Flat::Bool(_) => return Err(E::custom("too many elements in tensor data")),
            _ => return Err(E::custom("tensor data mixes booleans with other values")),
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<(), E> {
        self.push_num(Num::I(v))
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<(), E> {
        self.push_num(Num::U(v))
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        self.push_num(Num::F(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.out {
            Flat::Empty => *self.out = Flat::Str(vec![v.to_owned()]),
            Flat::Str(s) if s.len() < MAX_JSON_ELEMENTS => s.push(v.to_owned()),
            Flat::Str(_) => return Err(E::custom("too many elements in tensor data")),
            _ => return Err(E::custom("tensor data mixes strings with other values")),
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(FlatSeed { out: &mut *self.out })?.is_some() {}
        Ok(())
    }
}

struct FlatSeed<'a> {
    out: &'a mut Flat,
}

impl<'de> de::DeserializeSeed<'de> for FlatSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(FlatVisitor { out: self.out })
    }
}

const OUT_OF_RANGE: &str = "a value is out of range";

/// Narrows to f32, refusing values beyond `max` in magnitude (they would become infinities).
fn narrow(v: Vec<f64>, max: f64) -> Option<Vec<f32>> {
    v.into_iter().map(|x| (x.abs() <= max).then_some(x as f32)).collect()
}

fn convert(name: &str, dt: DataType, flat: Flat) -> Result<TensorData, ProtocolError> {
    let bad = |what: &str| ProtocolError::new(format!("input '{name}': {what} for datatype {dt}"));
    macro_rules! ints {
        ($flat:ident, $variant:ident, $t:ty) => {{
            let Flat::Num(v) = $flat else {
                return Err(bad("data must be integers"));
            };
            let mut out = Vec::with_capacity(v.len());
            for n in v {
                let x = match n {
                    Num::I(i) => <$t>::try_from(i).ok(),
                    Num::U(u) => <$t>::try_from(u).ok(),
                    Num::F(_) => None,
                };
                out.push(x.ok_or_else(|| bad("a value is not an integer in range"))?);
            }
            TensorData::$variant(out)
        }};
    }
    let floats = |flat: Flat| -> Result<Vec<f64>, ProtocolError> {
        let Flat::Num(v) = flat else {
            return Err(bad("data must be numbers"));
        };
        Ok(v.into_iter()
            .map(|n| match n {
                Num::I(i) => i as f64,
                Num::U(u) => u as f64,
                Num::F(f) => f,
            })
            .collect())
    };
    Ok(match (dt, flat) {
        (_, Flat::Empty) => empty(dt),
        (DataType::Bool, Flat::Bool(v)) => TensorData::Bool(v),
        (DataType::Bool, _) => return Err(bad("data must be booleans")),
        (DataType::U8, flat) => ints!(flat, U8, u8),
        (DataType::U16, flat) => ints!(flat, U16, u16),
        (DataType::U32, flat) => ints!(flat, U32, u32),
        (DataType::U64, flat) => ints!(flat, U64, u64),
        (DataType::I8, flat) => ints!(flat, I8, i8),
        (DataType::I16, flat) => ints!(flat, I16, i16),
        (DataType::I32, flat) => ints!(flat, I32, i32),
        (DataType::I64, flat) => ints!(flat, I64, i64),
        (DataType::F16, flat) => TensorData::F16(narrow(floats(flat)?, 65504.0).ok_or_else(|| bad(OUT_OF_RANGE))?),
        (DataType::F32, flat) => {
            TensorData::F32(narrow(floats(flat)?, f64::from(f32::MAX)).ok_or_else(|| bad(OUT_OF_RANGE))?)
        }
        (DataType::F64, flat) => TensorData::F64(floats(flat)?),
        (DataType::Bytes, Flat::Str(v)) => TensorData::Bytes(v.into_iter().map(String::into_bytes).collect()),
        (DataType::Bytes, _) => return Err(bad("data must be strings")),
    })
}

/// An empty vector of the given datatype.
pub fn empty(dt: DataType) -> TensorData {
    match dt {
        DataType::Bool => TensorData::Bool(vec![]),
        DataType::U8 => TensorData::U8(vec![]),
        DataType::U16 => TensorData::U16(vec![]),
        DataType::U32 => TensorData::U32(vec![]),
        DataType::U64 => TensorData::U64(vec![]),
        DataType::I8 => TensorData::I8(vec![]),
        DataType::I16 => TensorData::I16(vec![]),
        DataType::I32 => TensorData::I32(vec![]),
        DataType::I64 => TensorData::I64(vec![]),
        DataType::F16 => TensorData::F16(vec![]),
        DataType::F32 => TensorData::F32(vec![]),
        DataType::F64 => TensorData::F64(vec![]),
        DataType::Bytes => TensorData::Bytes(vec![]),
    }
}

/// Parses one V2 tensor description (shape and datatype) with its data, from JSON or, when its
/// parameters carry `binary_data_size`, from the next bytes of the binary section; checks that
/// the element count matches the shape.
fn tensor_from_raw(raw: RawInput, binary: &mut Option<&[u8]>) -> Result<(Tensor, Map<String, Value>), ProtocolError> {
    let name = raw.name;
    let dt = DataType::parse(&raw.datatype)
        .ok_or_else(|| ProtocolError::new(format!("input '{name}': unknown datatype '{}'", raw.datatype)))?;
    let shape = shape_from_i64(&name, &raw.shape)?;
    let expected = Tensor::shape_elements(&shape)
        .filter(|&n| n <= MAX_JSON_ELEMENTS)
        .ok_or_else(|| ProtocolError::new(format!("input '{name}': shape {:?} holds too many elements", raw.shape)))?;
    let parameters = raw.parameters.unwrap_or_default();
    let data = match (raw.data, parameters.get("binary_data_size")) {
        (Some(_), Some(_)) => {
            return Err(ProtocolError::new(format!("input '{name}': both `data` and `binary_data_size`")));
        }
        (Some(flat), None) => convert(&name, dt, flat)?,
        (None, Some(size)) => {
            let Some(rest) = binary.as_mut() else {
                return Err(ProtocolError::new(format!(
                    "input '{name}': binary_data_size needs the binary tensor extension (Inference-Header-Content-Length)"
                )));
            };
            let size = size
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| ProtocolError::new(format!("input '{name}': binary_data_size must be a byte count")))?;
            if size > rest.len() {
                return Err(ProtocolError::new(format!(
                    "input '{name}': binary_data_size {size} runs past the {} bytes left in the body",
                    rest.len()
                )));
            }
            let (mine, tail) = rest.split_at(size);
            *rest = tail;
            TensorData::from_le_bytes(dt, mine, expected)
                .map_err(|e| ProtocolError::new(format!("input '{name}': {e}")))?
        }
        (None, None) => return Err(ProtocolError::new(format!("input '{name}': missing field `data`"))),
    };
    if data.len() != expected {
        return Err(ProtocolError::new(format!(
            "input '{name}': shape {:?} needs {expected} elements but data has {}",
            shape,
            data.len()
        )));
    }
    Ok((Tensor { name, shape, data }, parameters))
}

pub fn shape_from_i64(name: &str, shape: &[i64]) -> Result<Vec<usize>, ProtocolError> {
    if shape.len() > 16 {
        return Err(ProtocolError::new(format!("input '{name}': rank {} is over 16", shape.len())));
    }
    shape
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| ProtocolError::new(format!("input '{name}': negative dimension {d} in shape")))
        })
        .collect()
}

/// Parses a V2 JSON inference request (no binary section).
pub fn parse_request(body: &[u8]) -> Result<InferRequest, ProtocolError> {
    let raw: RawRequest =
        serde_json::from_slice(body).map_err(|e| ProtocolError::new(format!("malformed request JSON: {e}")))?;
    request_from_raw(raw, None)
}

/// Parses a request in Triton's binary tensor extension: the first `header_len` bytes are the
/// JSON header, the rest the binary data of the inputs that declare `binary_data_size`, in
/// input order. Every byte must belong to an input.
pub fn parse_binary_request(body: &[u8], header_len: usize) -> Result<InferRequest, ProtocolError> {
    if header_len > body.len() {
        return Err(ProtocolError::new(format!(
            "Inference-Header-Content-Length {header_len} is larger than the body ({} bytes)",
            body.len()
        )));
    }
    let (header, binary) = body.split_at(header_len);
    let raw: RawRequest =
        serde_json::from_slice(header).map_err(|e| ProtocolError::new(format!("malformed request JSON: {e}")))?;
    request_from_raw(raw, Some(binary))
}

fn request_from_raw(raw: RawRequest, binary: Option<&[u8]>) -> Result<InferRequest, ProtocolError> {
    let mut binary = binary;
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    let mut input_parameters = Vec::with_capacity(raw.inputs.len());
    for input in raw.inputs {
        let (t, p) = tensor_from_raw(input, &mut binary)?;
        inputs.push(t);
        input_parameters.push(p);
    }
    if let Some(rest) = binary.filter(|r| !r.is_empty()) {
        return Err(ProtocolError::new(format!("{} bytes of binary data belong to no input", rest.len())));
    }
    let outputs = raw
        .outputs
        .map(|outs| {
            outs.into_iter()
                .map(|o| RequestedOutput { name: o.name, parameters: o.parameters.unwrap_or_default() })
                .collect()
        })
        .unwrap_or_default();
    Ok(InferRequest { id: raw.id, parameters: raw.parameters.unwrap_or_default(), inputs, input_parameters, outputs })
}

#[derive(Deserialize)]
struct RawResponse {
    model_name: String,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    outputs: Vec<RawInput>,
}

/// Parses another V2 server's inference response (the overflow client): JSON, or with a binary
/// section after `header_len` bytes (Triton's binary tensor extension).
pub fn parse_response(body: &[u8], header_len: Option<usize>) -> Result<InferResponse, ProtocolError> {
    let (header, binary) = match header_len {
        Some(n) if n <= body.len() => {
            let (h, b) = body.split_at(n);
            (h, Some(b))
        }
        Some(n) => {
            return Err(ProtocolError::new(format!("Inference-Header-Content-Length {n} is past the body")));
        }
        None => (body, None),
    };
    let raw: RawResponse =
        serde_json::from_slice(header).map_err(|e| ProtocolError::new(format!("malformed response JSON: {e}")))?;
    let mut binary = binary;
    let mut outputs = Vec::with_capacity(raw.outputs.len());
    for o in raw.outputs {
        outputs.push(tensor_from_raw(o, &mut binary)?.0);
    }
    if let Some(rest) = binary.filter(|r| !r.is_empty()) {
        return Err(ProtocolError::new(format!("{} bytes of binary data belong to no output", rest.len())));
    }
    Ok(InferResponse {
        model_name: raw.model_name,
        model_version: raw.model_version.unwrap_or_default(),
        id: raw.id,
        parameters: raw.parameters.unwrap_or_default(),
        outputs,
    })
}

/// Encodes a request for another V2 server (the overflow client): JSON, or with every input as
/// binary data and binary outputs asked for. Returns the body and the JSON header's length when
/// binary.
pub fn encode_request(req: &InferRequest, binary: bool) -> (Vec<u8>, Option<usize>) {
    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut raw = Vec::new();
    for (i, t) in req.inputs.iter().enumerate() {
        let mut params = req.input_parameters.get(i).cloned().unwrap_or_default();
        let mut m = Map::new();
        m.insert("name".into(), Value::String(t.name.clone()));
        m.insert("shape".into(), Value::from(t.shape.clone()));
        m.insert("datatype".into(), Value::String(t.datatype().as_str().into()));
        if binary {
            let bytes = t.data.to_le_bytes();
            params.insert("binary_data_size".into(), Value::from(bytes.len()));
            raw.extend_from_slice(&bytes);
        } else {
            m.insert("data".into(), tensors_to_value(std::slice::from_ref(t))[0]["data"].clone());
        }
        if !params.is_empty() {
            m.insert("parameters".into(), Value::Object(params));
        }
        inputs.push(Value::Object(m));
    }
    let mut body = Map::new();
    if let Some(id) = &req.id {
        body.insert("id".into(), Value::String(id.clone()));
    }
    let mut parameters = req.parameters.clone();
    if binary {
        parameters.insert("binary_data_output".into(), Value::Bool(true));
    }
    if !parameters.is_empty() {
        body.insert("parameters".into(), Value::Object(parameters));
    }
    body.insert("inputs".into(), Value::Array(inputs));
    if !req.outputs.is_empty() {
        let outs: Vec<Value> = req
            .outputs
            .iter()
            .map(|o| {
                let mut m = Map::new();
                m.insert("name".into(), Value::String(o.name.clone()));
                if !o.parameters.is_empty() {
                    m.insert("parameters".into(), Value::Object(o.parameters.clone()));
                }
                Value::Object(m)
            })
            .collect();
        body.insert("outputs".into(), Value::Array(outs));
    }
    let mut out = serde_json::to_vec(&Value::Object(body)).unwrap_or_default();
    if !binary {
        return (out, None);
    }
    let header_len = out.len();
    out.extend_from_slice(&raw);
    (out, Some(header_len))
}

/// Parses a JSON value (e.g. one golden case) shaped as a V2 request.
pub fn request_from_value(v: Value) -> Result<InferRequest, ProtocolError> {
    let raw: RawRequest =
        serde_json::from_value(v).map_err(|e| ProtocolError::new(format!("malformed request: {e}")))?;
    request_from_raw(raw, None)
}

/// Parses a list of V2 tensors (`[{name, datatype, shape, data}]`).
pub fn tensors_from_value(v: Value) -> Result<Vec<Tensor>, ProtocolError> {
    let raws: Vec<RawInput> =
        serde_json::from_value(v).map_err(|e| ProtocolError::new(format!("malformed tensors: {e}")))?;
    raws.into_iter().map(|r| tensor_from_raw(r, &mut None).map(|(t, _)| t)).collect()
}

struct DataSer<'a>(&'a TensorData);

impl Serialize for DataSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            TensorData::Bool(v) => v.serialize(s),
            TensorData::U8(v) => v.serialize(s),
            TensorData::U16(v) => v.serialize(s),
            TensorData::U32(v) => v.serialize(s),
            TensorData::U64(v) => v.serialize(s),
            TensorData::I8(v) => v.serialize(s),
            TensorData::I16(v) => v.serialize(s),
            TensorData::I32(v) => v.serialize(s),
            TensorData::I64(v) => v.serialize(s),
            TensorData::F16(v) | TensorData::F32(v) => v.serialize(s),
            TensorData::F64(v) => v.serialize(s),
            TensorData::Bytes(v) => {
                let mut seq = s.serialize_seq(Some(v.len()))?;
                for b in v {
                    seq.serialize_element(&String::from_utf8_lossy(b))?;
                }
                seq.end()
            }
        }
    }
}

/// One output tensor in a response; `data` is absent when the tensor travels as binary.
pub struct OutputSer<'a> {
    pub tensor: &'a Tensor,
    pub binary_size: Option<usize>,
}

impl Serialize for OutputSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.tensor;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("name", &t.name)?;
        m.serialize_entry("datatype", t.datatype().as_str())?;
        m.serialize_entry("shape", &t.shape)?;
        match self.binary_size {
            Some(n) => m.serialize_entry("parameters", &serde_json::json!({ "binary_data_size": n }))?,
            None => m.serialize_entry("data", &DataSer(&t.data))?,
        }
        m.end()
    }
}

/// Serializes a response; `binary` names the outputs sent as binary (with their byte sizes).
pub fn response_json(resp: &InferResponse, binary: &[Option<usize>]) -> Vec<u8> {
    struct Resp<'a>(&'a InferResponse, &'a [Option<usize>]);
    impl Serialize for Resp<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let r = self.0;
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("model_name", &r.model_name)?;
            m.serialize_entry("model_version", &r.model_version)?;
            if let Some(id) = &r.id {
                m.serialize_entry("id", id)?;
            }
            if !r.parameters.is_empty() {
                m.serialize_entry("parameters", &r.parameters)?;
            }
            let outs: Vec<OutputSer<'_>> = r
                .outputs
                .iter()
                .enumerate()
                .map(|(i, t)| OutputSer { tensor: t, binary_size: self.1.get(i).copied().flatten() })
                .collect();
            m.serialize_entry("outputs", &outs)?;
            m.end()
        }
    }
    // Serializing owned, well-formed values into a Vec cannot fail.
    serde_json::to_vec(&Resp(resp, binary)).unwrap_or_else(|_| b"{\"error\":\"response encoding failed\"}".to_vec())
}

/// Which outputs a request wants as binary data: the request parameter `binary_data_output`
/// (all outputs) or an output's own `binary_data` parameter (Triton's extension).
pub fn binary_outputs_wanted(req: &InferRequest) -> impl Fn(&str) -> bool + use<> {
    let all = req.parameters.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false);
    let named: Vec<(String, bool)> = req
        .outputs
        .iter()
        .filter_map(|o| o.parameters.get("binary_data").and_then(Value::as_bool).map(|b| (o.name.clone(), b)))
        .collect();
    move |name: &str| named.iter().find(|(n, _)| n == name).map_or(all, |(_, b)| *b)
}

/// Encodes a response, with the outputs `binary` selects as Triton binary tensor data after
/// the JSON header. Returns the body and, when any output is binary, the header's length (for
/// `Inference-Header-Content-Length`).
pub fn encode_response(resp: &InferResponse, binary: impl Fn(&str) -> bool) -> (Vec<u8>, Option<usize>) {
    let raw: Vec<Option<Vec<u8>>> =
        resp.outputs.iter().map(|t| binary(&t.name).then(|| t.data.to_le_bytes())).collect();
    if raw.iter().all(Option::is_none) {
        return (response_json(resp, &[]), None);
    }
    let sizes: Vec<Option<usize>> = raw.iter().map(|r| r.as_ref().map(Vec::len)).collect();
    let mut body = response_json(resp, &sizes);
    let header_len = body.len();
    for r in raw.into_iter().flatten() {
        body.extend_from_slice(&r);
    }
    (body, Some(header_len))
}

/// Serializes tensors as a V2 tensor list (golden files, test helpers).
pub fn tensors_to_value(tensors: &[Tensor]) -> Value {
    let outs: Vec<OutputSer<'_>> = tensors.iter().map(|t| OutputSer { tensor: t, binary_size: None }).collect();
    serde_json::to_value(outs).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_data_parse_the_same() {
        let flat = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3.5,4]}]}"#;
        let nested = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3.5,4]]}]}"#;
        let a = parse_request(flat).unwrap();
        let b = parse_request(nested).unwrap();
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.inputs[0].data, TensorData::F32(vec![1.0, 2.0, 3.5, 4.0]));
    }

    #[test]
    fn integer_range_is_checked() {
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[300]}]}"#;
        let err = parse_request(body).unwrap_err();
        assert!(err.to_string().contains("not an integer in range"), "{err}");
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}]}"#;
        assert!(parse_request(body).is_err());
    }

    #[test]
    fn floats_beyond_the_datatype_are_refused_not_made_infinite() {
        // Found by fuzzing (fuzz/v2_json): 1e100 as FP32 became +inf, which JSON cannot carry back.
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1e100]}]}"#;
        assert!(parse_request(body).unwrap_err().to_string().contains("out of range"));
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP16","data":[70000]}]}"#;
        assert!(parse_request(body).is_err());
        let body = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[3.4e38,-3.4e38]}]}"#;
        assert!(parse_request(body).is_ok());
    }

    #[test]
    fn binary_requests_and_responses_round_trip() {
        let x = Tensor { name: "x".into(), shape: vec![2, 2], data: TensorData::F32(vec![1.0, -2.5, 3.0, 4.25]) };
        let s = Tensor { name: "s".into(), shape: vec![2], data: TensorData::Bytes(vec![b"ab".to_vec(), Vec::new()]) };
        let header = serde_json::json!({
            "inputs": [
                { "name": "x", "shape": [2, 2], "datatype": "FP32", "parameters": { "binary_data_size": 16 } },
                { "name": "s", "shape": [2], "datatype": "BYTES", "parameters": { "binary_data_size": 10 } },
            ],
            "parameters": { "binary_data_output": true },
        });
        let mut body = serde_json::to_vec(&header).unwrap();
        let header_len = body.len();
        body.extend(x.data.to_le_bytes());
        body.extend(s.data.to_le_bytes());
        let req = parse_binary_request(&body, header_len).unwrap();
        assert_eq!(req.inputs, vec![x.clone(), s.clone()]);

        // The same JSON body without the extension header is refused, not half-parsed.
        assert!(parse_request(&body[..header_len]).unwrap_err().to_string().contains("binary tensor extension"));
        // Leftover or missing bytes are errors.
        let mut long = body.clone();
        long.push(0);
        assert!(parse_binary_request(&long, header_len).unwrap_err().to_string().contains("belong to no input"));
        assert!(parse_binary_request(&body[..body.len() - 1], header_len).is_err());
        assert!(parse_binary_request(&body, body.len() + 1).is_err());

        let resp = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            parameters: Map::new(),
            outputs: vec![x.clone(), s],
        };
        let wanted = binary_outputs_wanted(&req);
        let (out, len) = encode_response(&resp, wanted);
        let len = len.expect("binary outputs");
        let head: Value = serde_json::from_slice(&out[..len]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 16);
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(&out[len..len + 16], &x.data.to_le_bytes()[..]);
        let (json_only, none) = encode_response(&resp, |_| false);
        assert!(none.is_none());
        assert!(serde_json::from_slice::<Value>(&json_only).is_ok());
    }

    #[test]
    fn requests_for_another_server_and_its_responses_round_trip() {
        let req = parse_request(
            br#"{"id":"a","parameters":{"k":"hmac:1"},"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1.5,2]}],"outputs":[{"name":"y"}]}"#,
        )
        .unwrap();
        for binary in [false, true] {
            let (body, header) = encode_request(&req, binary);
            let back = match header {
                Some(n) => parse_binary_request(&body, n).unwrap(),
                None => parse_request(&body).unwrap(),
            };
            assert_eq!(back.inputs, req.inputs);
            assert_eq!(back.id, req.id);
            assert_eq!(back.parameters.get("k"), req.parameters.get("k"));
            let resp = InferResponse {
                model_name: "m".into(),
                model_version: "7".into(),
                id: back.id.clone(),
                parameters: Map::new(),
                outputs: back.inputs.clone(),
            };
            let (out, len) = encode_response(&resp, |_| binary);
            let parsed = parse_response(&out, len).unwrap();
            assert_eq!((parsed.model_version.as_str(), parsed.outputs), ("7", req.inputs.clone()));
        }
    }

    #[test]
    fn element_count_must_match_shape() {
        let body = br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#;
        let err = parse_request(body).unwrap_err().to_string();
        assert!(err.contains("needs 3 elements but data has 2"), "{err}");
    }

    #[test]
    fn unknown_fields_and_datatypes_are_errors() {
        assert!(parse_request(br#"{"inputs":[],"bogus":1}"#).is_err());
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP8","data":[1]}]}"#;
        assert!(parse_request(body).unwrap_err().to_string().contains("unknown datatype"));
        assert!(parse_request(br#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[]}]}"#).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut body = String::from(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":"#);
        body.push_str(&"[".repeat(100_000));
        assert!(parse_request(body.as_bytes()).is_err());
    }

    #[test]
    fn response_round_trips_through_the_request_parser() {
        let t = Tensor { name: "y".into(), shape: vec![1, 2], data: TensorData::I64(vec![i64::MAX, -3]) };
        let v = tensors_to_value(std::slice::from_ref(&t));
        let back = tensors_from_value(v).unwrap();
        assert_eq!(back, vec![t]);
    }

    proptest::proptest! {
        #[test]
        fn fp32_round_trip(values in proptest::collection::vec(-1e30f32..1e30f32, 0..64)) {
            let t = Tensor { name: "x".into(), shape: vec![values.len()], data: TensorData::F32(values) };
            let back = tensors_from_value(tensors_to_value(std::slice::from_ref(&t))).unwrap();
            proptest::prop_assert_eq!(back, vec![t]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_request(&body);
        }
    }
}
