//! An MQTT request as the agent receives it: a topic (first line of the input) and a payload
//! (the rest). Topic parsing never yields an unsafe name; the payload parser never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_proto::mqtt::Topics;
use outpost_proto::protocol::json::parse_request;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (topic, payload) = data.split_at(split);
    let topics = Topics { prefix: "outpost".into(), site: "site".into(), node: "node".into() };
    if let Ok(topic) = std::str::from_utf8(topic) {
        if let Ok((model, version)) = topics.parse_request_topic(topic) {
            assert!(outpost_proto::valid_name(&model));
            assert!(version.as_deref().is_none_or(outpost_proto::valid_name));
        }
    }
    let _ = parse_request(payload.get(1..).unwrap_or_default());
});
