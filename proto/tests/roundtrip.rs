//! Property tests of the parsers of untrusted bytes (the same parsers `fuzz/` runs under
//! libFuzzer): what the encoders write parses back to the same value; signed envelopes verify
//! and any change to them does not; topics and times round-trip.

use std::collections::BTreeMap;

use outpost_proto::mqtt::Topics;
use outpost_proto::protocol::json::{parse_request, tensors_to_value};
use outpost_proto::protocol::tensor::{Tensor, TensorData};
use outpost_proto::registry::dsse::Envelope;
use outpost_proto::registry::{format_time, parse_time, KeyPair, MANIFEST_TYPE};
use proptest::prelude::*;

fn data(len: usize) -> impl Strategy<Value = TensorData> {
    prop_oneof![
        prop::collection::vec(any::<bool>(), len).prop_map(TensorData::Bool),
        prop::collection::vec(any::<u8>(), len).prop_map(TensorData::U8),
        prop::collection::vec(any::<i32>(), len).prop_map(TensorData::I32),
        prop::collection::vec(any::<i64>(), len).prop_map(TensorData::I64),
        prop::collection::vec(any::<u64>(), len).prop_map(TensorData::U64),
        prop::collection::vec(-1e300f64..1e300, len).prop_map(TensorData::F64),
        prop::collection::vec(-1e30f32..1e30, len).prop_map(TensorData::F32),
        prop::collection::vec("[ -~]{0,12}".prop_map(String::into_bytes), len).prop_map(TensorData::Bytes),
    ]
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (prop::collection::vec(0usize..4, 0..4), "[a-z][a-z0-9_]{0,8}").prop_flat_map(|(shape, name)| {
        let n = shape.iter().product();
        data(n).prop_map(move |d| Tensor { name: name.clone(), shape: shape.clone(), data: d })
    })
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}"
}

proptest! {
    #[test]
    fn requests_round_trip_through_the_v2_json_parser(
        inputs in prop::collection::vec(tensor(), 1..4),
        id in proptest::option::of("[ -~]{0,16}"),
    ) {
        let mut body = serde_json::json!({ "inputs": tensors_to_value(&inputs) });
        if let Some(id) = &id {
            body["id"] = serde_json::json!(id);
        }
        let req = parse_request(&serde_json::to_vec(&body).unwrap()).unwrap();
        prop_assert_eq!(req.id, id);
        prop_assert_eq!(req.inputs, inputs);
    }

    #[test]
    fn envelopes_verify_and_any_byte_changed_does_not(payload in prop::collection::vec(any::<u8>(), 0..256), flip in any::<prop::sample::Index>()) {
        let key = KeyPair::generate().unwrap();
        let mut trusted = BTreeMap::new();
        trusted.insert(key.keyid.clone(), key.public().verifying_key().unwrap());
        let bytes = Envelope::sign(MANIFEST_TYPE, &payload, &[&key]).to_bytes();
        let env = Envelope::parse(&bytes).unwrap();
        prop_assert_eq!(env.verify(MANIFEST_TYPE, &trusted, 1, "manifest").unwrap(), payload.clone());
        prop_assert!(env.verify(MANIFEST_TYPE, &trusted, 2, "manifest").is_err(), "one key counts once");
        let mut changed = payload.clone();
        if changed.is_empty() {
            changed.push(0);
        } else {
            let i = flip.index(changed.len());
            changed[i] ^= 0x01;
        }
        let mut forged = env.clone();
        forged.payload = Envelope::sign(MANIFEST_TYPE, &changed, &[]).payload;
        prop_assert!(forged.verify(MANIFEST_TYPE, &trusted, 1, "manifest").is_err());
    }

    #[test]
    fn request_topics_round_trip(model in name(), version in proptest::option::of(name())) {
        prop_assume!(!model.starts_with('.'));
        let t = Topics { prefix: "outpost".into(), site: "s1".into(), node: "n1".into() };
        let topic = match &version {
            Some(v) => format!("outpost/s1/infer/{model}/versions/{v}"),
            None => format!("outpost/s1/infer/{model}"),
        };
        let parsed = t.parse_request_topic(&topic);
        if version.as_deref().is_some_and(|v| v.starts_with('.')) {
            prop_assert!(parsed.is_err());
        } else {
            prop_assert_eq!(parsed.unwrap(), (model, version));
        }
    }

    #[test]
    fn times_round_trip(t in 0i64..253_402_300_799) {
        prop_assert_eq!(parse_time(&format_time(t)).unwrap(), t);
    }
}
