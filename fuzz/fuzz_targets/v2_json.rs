//! The V2 JSON inference request parser (HTTP bodies and MQTT payloads): never panics, and
//! whatever it accepts is consistent (each tensor holds exactly shape-product elements) and
//! survives a round trip through the response encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_proto::protocol::json::{parse_request, response_json, tensors_from_value};
use outpost_proto::protocol::InferResponse;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = parse_request(data) else { return };
    for t in &req.inputs {
        let n: usize = t.shape.iter().product();
        assert_eq!(t.data.len(), n, "tensor {} holds {} elements for shape {:?}", t.name, t.data.len(), t.shape);
    }
    let resp = InferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        id: req.id.clone(),
        parameters: req.parameters.clone(),
        outputs: req.inputs.clone(),
    };
    let bytes = response_json(&resp, &[]);
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("the encoder writes JSON");
    let back = tensors_from_value(v["outputs"].clone()).expect("encoded tensors parse back");
    assert_eq!(back.len(), req.inputs.len());
    for (a, b) in back.iter().zip(&req.inputs) {
        assert_eq!(a.shape, b.shape);
        assert_eq!(a.data.len(), b.data.len());
    }
});
