//! The V2 JSON inference request parser (HTTP bodies, MQTT payloads).
//! The checks are in `outpost_proto::fuzzing`, shared with the regression tests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_proto::fuzzing::v2_json(data));
