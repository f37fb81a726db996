//! Every input a fuzzer crashed on (`tests/fuzz-regressions/<target>-<what>`), replayed
//! through that target's checks: each must now pass.

#[test]
fn every_fuzz_crash_stays_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz-regressions directory") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let data = std::fs::read(&path).expect("read");
        match name.split('-').next() {
            Some("v2_json") => outpost_proto::fuzzing::v2_json(&data),
            Some("binary_tensor") => outpost_proto::fuzzing::binary_tensor(&data),
            Some("v2_response") => outpost_proto::fuzzing::v2_response(&data),
            Some("mqtt_request") => outpost_proto::fuzzing::mqtt_request(&data),
            Some("dsse_manifest") => outpost_proto::fuzzing::dsse_manifest(&data),
            Some("grpc_request") => outpost_proto::fuzzing::grpc_request(&data),
            _ => panic!("{name}: name must start with a fuzz target"),
        }
        n += 1;
    }
    assert!(n > 0, "no regression inputs found in {}", dir.display());
}
