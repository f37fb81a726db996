//! Data-subject requests: which audit records hold a person's pseudonymized value
//! (`outpost audit find --subject VALUE [--param NAME]`). The value is pseudonymized with each
//! key epoch still held, and each inference record is compared under its own epoch's key.
//! Records of a destroyed epoch cannot be linked to anyone: they are counted, never matched.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::epochs;

/// What a search found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Records that hold the subject's pseudonym.
    pub matched: u64,
    /// Inference records searched.
    pub searched: u64,
    /// Inference records of destroyed (or unknown) key epochs: no longer linkable.
    pub unlinkable: u64,
    /// The epochs whose keys were destroyed.
    pub destroyed: Vec<u64>,
}

/// Writes every audit record (as stored) whose pseudonymized parameters hold `subject`: the
/// parameter `param` only, or any of them.
pub fn find(
    state_dir: &Path,
    master: &[u8],
    subject: &str,
    param: Option<&str>,
    out: &mut dyn std::io::Write,
) -> Result<Found, String> {
    let keys = epochs::load_all(state_dir, master)?;
    let bytes = subject.as_bytes();
    let by_epoch: BTreeMap<u64, String> = keys.keys.iter().map(|k| (k.id, super::pseudonym(&k.key, bytes))).collect();
    // Records from before key epochs were keyed by the HMAC key itself.
    let legacy = super::pseudonym(master, bytes);
    let param = param.map(|p| p.trim_start_matches("parameters."));
    let mut found = Found { destroyed: keys.destroyed.iter().map(|d| d.id).collect(), ..Found::default() };
    crate::audit::each_record(&state_dir.join("audit"), |rec, line| {
        if rec.body["kind"] != "inference" {
            return Ok(());
        }
        found.searched += 1;
        let wanted = match &rec.body["key_epoch"] {
            Value::Null => Some(&legacy),
            v => v.as_u64().and_then(|id| by_epoch.get(&id)),
        };
        let Some(wanted) = wanted else {
            found.unlinkable += 1;
            return Ok(());
        };
        let Some(params) = rec.body["parameters"].as_object() else {
            return Ok(());
        };
        let hit = match param {
            Some(p) => params.get(p).and_then(Value::as_str) == Some(wanted.as_str()),
            None => params.values().any(|v| v.as_str() == Some(wanted.as_str())),
        };
        if hit {
            found.matched += 1;
            out.write_all(line).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    Ok(found)
}
