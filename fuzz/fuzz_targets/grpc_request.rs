//! A V2 gRPC `ModelInferRequest` message body (protobuf), as the gRPC adapter decodes it.
//! The checks are in `outpost_proto::fuzzing`, shared with the regression tests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_proto::fuzzing::grpc_request(data));
