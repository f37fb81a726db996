//! An MQTT request: topic (first line) and V2 JSON payload.
//! The checks are in `outpost_proto::fuzzing`, shared with the regression tests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_proto::fuzzing::mqtt_request(data));
