//! Registry metadata: DSSE envelopes, root, index, manifests, compliance baselines, times,
//! versions.
//! The checks are in `outpost_proto::fuzzing`, shared with the regression tests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_proto::fuzzing::dsse_manifest(data));
