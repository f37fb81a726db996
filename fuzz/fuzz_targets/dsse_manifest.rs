//! Registry metadata from an untrusted mirror: DSSE envelope parsing and threshold
//! verification, the payload types (root, index, in-toto manifest), times and versions.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use ed25519_dalek::VerifyingKey;
use libfuzzer_sys::fuzz_target;
use outpost_proto::registry::dsse::Envelope;
use outpost_proto::registry::{parse_time, Index, KeyPair, Root, SemVer, Statement, MANIFEST_TYPE};

fn trusted() -> &'static BTreeMap<String, VerifyingKey> {
    static K: OnceLock<BTreeMap<String, VerifyingKey>> = OnceLock::new();
    K.get_or_init(|| {
        let k = KeyPair::generate().expect("key");
        let mut m = BTreeMap::new();
        m.insert(k.keyid.clone(), k.public().verifying_key().expect("ed25519"));
        m
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::parse(data) {
        let keys = trusted();
        // No fuzzer-made envelope can carry a valid signature from a fresh key.
        assert!(env.verify(MANIFEST_TYPE, keys, 1, "manifest").is_err());
        if let Ok(payload) = env.payload_bytes() {
            let _ = serde_json::from_slice::<Statement>(&payload).map(|s| s.model_sha256().map(str::len));
        }
    }
    let _ = serde_json::from_slice::<Root>(data);
    let _ = serde_json::from_slice::<Index>(data);
    if let Ok(s) = serde_json::from_slice::<Statement>(data) {
        let _ = s.model_sha256();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_time(text);
        if let Some(v) = SemVer::parse(text) {
            assert_eq!(v.cmp(&v), std::cmp::Ordering::Equal);
        }
    }
});
