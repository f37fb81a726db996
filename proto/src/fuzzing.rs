//! The checks the fuzz targets run (`fuzz/`), shared with the regression tests that replay
//! every crash the fuzzers found (`proto/tests/fuzz_regressions.rs`). Each takes arbitrary
//! bytes and panics only when an invariant breaks.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::mqtt::Topics;
use crate::protocol::json::{
    encode_response, parse_binary_request, parse_request, parse_response, response_json, tensors_from_value,
};
use crate::protocol::InferResponse;
use crate::protocol::TensorData;
use crate::registry::dsse::Envelope;
use crate::registry::{parse_time, Index, KeyPair, Root, SemVer, Statement, MANIFEST_TYPE};

/// A response carrying a request's inputs back as outputs.
fn echo(req: &crate::protocol::InferRequest) -> InferResponse {
    InferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        id: req.id.clone(),
        parameters: req.parameters.clone(),
        outputs: req.inputs.clone(),
    }
}

/// The V2 JSON request parser: whatever it accepts holds shape-product elements per tensor and
/// survives a round trip through the response encoder.
pub fn v2_json(data: &[u8]) {
    let Ok(req) = parse_request(data) else { return };
    for t in &req.inputs {
        let n: usize = t.shape.iter().product();
        assert_eq!(t.data.len(), n, "tensor {} holds {} elements for shape {:?}", t.name, t.data.len(), t.shape);
    }
    let resp = echo(&req);
    let bytes = response_json(&resp, &[]);
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("the encoder writes JSON");
    let back = tensors_from_value(v["outputs"].clone()).expect("encoded tensors parse back");
    assert_eq!(back, req.inputs, "tensors change in a round trip");
}

/// A request in the binary tensor extension: the first two bytes (little-endian) are the JSON
/// header's length, the rest the body. Accepted tensors hold shape-product elements and
/// re-encode to the same bytes; the binary response encoder's header parses.
pub fn binary_tensor(data: &[u8]) {
    let Some((len, body)) = data.split_first_chunk::<2>() else { return };
    let Ok(req) = parse_binary_request(body, usize::from(u16::from_le_bytes(*len))) else { return };
    for t in &req.inputs {
        let n: usize = t.shape.iter().product();
        assert_eq!(t.data.len(), n, "tensor {} holds {} elements for shape {:?}", t.name, t.data.len(), t.shape);
        let bytes = t.data.to_le_bytes();
        let back = TensorData::from_le_bytes(t.datatype(), &bytes, n).expect("re-encoded bytes decode");
        assert_eq!(back.to_le_bytes(), bytes, "binary round trip changed {}", t.name);
    }
    let resp = echo(&req);
    let (body, header) = encode_response(&resp, |_| true);
    if let Some(h) = header {
        serde_json::from_slice::<serde_json::Value>(&body[..h]).expect("the binary response header is JSON");
    }
}

/// An answer from the overflow target (another V2 server, untrusted): the first two bytes
/// (little-endian) are the binary header length, or 0xffff for a JSON-only answer. Accepted
/// outputs hold shape-product elements and encode back to a parseable answer.
pub fn v2_response(data: &[u8]) {
    let Some((len, body)) = data.split_first_chunk::<2>() else { return };
    let len = u16::from_le_bytes(*len);
    let header = (len != u16::MAX).then_some(usize::from(len));
    let Ok(resp) = parse_response(body, header) else { return };
    for t in &resp.outputs {
        let n: usize = t.shape.iter().product();
        assert_eq!(t.data.len(), n, "output {} holds {} elements for shape {:?}", t.name, t.data.len(), t.shape);
    }
    let (bytes, h) = encode_response(&resp, |_| header.is_some());
    let back = parse_response(&bytes, h).expect("an encoded answer parses");
    // Compared as bytes: binary data may carry NaN, which is not equal to itself.
    let raw = |ts: &[crate::protocol::Tensor]| -> Vec<(String, Vec<usize>, Vec<u8>)> {
        ts.iter().map(|t| (t.name.clone(), t.shape.clone(), t.data.to_le_bytes())).collect()
    };
    if header.is_some() {
        assert_eq!(raw(&back.outputs), raw(&resp.outputs), "outputs change in a binary round trip");
    } else {
        assert_eq!(back.outputs.len(), resp.outputs.len());
    }
}

/// An MQTT request: topic (up to the first newline) and payload. Accepted topics name only safe
/// names; the payload parser never panics.
pub fn mqtt_request(data: &[u8]) {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (topic, payload) = data.split_at(split);
    let topics = Topics { prefix: "outpost".into(), site: "site".into(), node: "node".into() };
    if let Ok(topic) = std::str::from_utf8(topic) {
        if let Ok((model, version)) = topics.parse_request_topic(topic) {
            assert!(crate::valid_name(&model), "unsafe model name {model:?}");
            assert!(version.as_deref().is_none_or(crate::valid_name), "unsafe version {version:?}");
        }
    }
    v2_json(payload.get(1..).unwrap_or_default());
}

fn trusted() -> &'static BTreeMap<String, ed25519_dalek::VerifyingKey> {
    static K: OnceLock<BTreeMap<String, ed25519_dalek::VerifyingKey>> = OnceLock::new();
    K.get_or_init(|| {
        let mut m = BTreeMap::new();
        if let Ok(k) = KeyPair::generate() {
            if let Ok(vk) = k.public().verifying_key() {
                m.insert(k.keyid.clone(), vk);
            }
        }
        m
    })
}

/// Registry metadata from an untrusted mirror: envelopes never verify without a trusted
/// signature; payload types, times and versions parse without panicking.
pub fn dsse_manifest(data: &[u8]) {
    if let Ok(env) = Envelope::parse(data) {
        assert!(env.verify(MANIFEST_TYPE, trusted(), 1, "manifest").is_err(), "an unsigned envelope verified");
        let baseline = env.verify(crate::registry::BASELINE_TYPE, trusted(), 1, "baseline");
        assert!(baseline.is_err(), "an unsigned baseline verified");
        if let Ok(payload) = env.payload_bytes() {
            if let Ok(s) = serde_json::from_slice::<Statement>(&payload) {
                let _ = s.model_sha256();
            }
        }
    }
    let _ = serde_json::from_slice::<Root>(data);
    let _ = serde_json::from_slice::<Index>(data);
    if let Ok(b) = serde_json::from_slice::<crate::registry::Baseline>(data) {
        let _ = parse_time(&b.expires);
    }
    if let Ok(s) = serde_json::from_slice::<Statement>(data) {
        let _ = s.model_sha256();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_time(text);
        if let Some(v) = SemVer::parse(text) {
            assert_eq!(v.cmp(&v), std::cmp::Ordering::Equal);
        }
    }
}

/// A `ModelInferRequest` as a gRPC message body: whatever decodes and converts holds
/// shape-product elements per tensor, and survives a round trip through the response encoder
/// (raw and typed) and back.
pub fn grpc_request(data: &[u8]) {
    use crate::protocol::grpc::{request_from_grpc, response_from_grpc, response_to_grpc, ModelInferRequest};
    use prost::Message as _;
    let Ok(msg) = ModelInferRequest::decode(data) else { return };
    let Ok((req, _)) = request_from_grpc(msg) else { return };
    for t in &req.inputs {
        let n: usize = t.shape.iter().product();
        assert_eq!(t.data.len(), n, "tensor {} holds {} elements for shape {:?}", t.name, t.data.len(), t.shape);
    }
    let resp = echo(&req);
    for raw in [true, false] {
        let encoded = response_to_grpc(resp.clone(), raw).encode_to_vec();
        let decoded =
            crate::protocol::grpc::ModelInferResponse::decode(encoded.as_slice()).expect("the encoder writes protobuf");
        let back = response_from_grpc(decoded).expect("encoded tensors decode back");
        // NaN payloads compare unequal: compare the little-endian bytes.
        let bytes = |ts: &[crate::protocol::Tensor]| {
            ts.iter().map(|t| (t.name.clone(), t.shape.clone(), t.data.to_le_bytes())).collect::<Vec<_>>()
        };
        assert_eq!(bytes(&back.outputs), bytes(&req.inputs), "tensors change in a round trip (raw: {raw})");
    }
}
