//! The binary tensor extension: JSON header length, header, binary tensor data.
//! The checks are in `outpost_proto::fuzzing`, shared with the regression tests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_proto::fuzzing::binary_tensor(data));
