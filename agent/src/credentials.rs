//! Secrets from systemd credentials: a file setting written `"credential:NAME"` names the file
//! `NAME` in `$CREDENTIALS_DIRECTORY`, the directory systemd fills from `LoadCredential=` and
//! `LoadCredentialEncrypted=` (decrypted with the TPM2 or the host key by `systemd-creds`).
//!
//! The substitution happens while the configuration is read, so every reader of a key, token
//! or certificate file gets a plain path and needs nothing else. A credential is never created
//! by the agent: a key it would make on first use must be provisioned when it is a credential.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// The prefix that marks a setting's value as a credential name.
pub const PREFIX: &str = "credential:";
/// The environment variable systemd sets to the service's credentials directory.
pub const DIRECTORY_VAR: &str = "CREDENTIALS_DIRECTORY";

/// Where systemd keeps the packaged service's credentials while it runs (root may read them).
pub const UNIT_DIRECTORY: &str = "/run/credentials/outpost.service";

/// The credentials directory: the one systemd gave this process, else the running service's
/// (so that `outpost audit find` or `outpost status`, run by root from a shell, read the
/// same configuration as the service).
pub fn directory() -> Option<PathBuf> {
    match std::env::var_os(DIRECTORY_VAR).filter(|d| !d.is_empty()) {
        Some(d) => Some(PathBuf::from(d)),
        None => Some(PathBuf::from(UNIT_DIRECTORY)).filter(|d| d.is_dir()),
    }
}

/// Resolves a setting's value: `credential:NAME` to `$CREDENTIALS_DIRECTORY/NAME`, anything
/// else to itself.
pub fn resolve(value: &str, directory: Option<&Path>) -> Result<PathBuf, String> {
    let Some(name) = value.strip_prefix(PREFIX) else {
        return Ok(PathBuf::from(value));
    };
    let valid = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if !valid {
        return Err(format!("credential name '{name}' must be 1-255 of [A-Za-z0-9._@-], not '.' or '..'"));
    }
    match directory {
        Some(dir) => Ok(dir.join(name)),
        None => Err(format!(
            "'{value}' needs ${DIRECTORY_VAR}, which systemd sets for a service with \
             LoadCredential= or LoadCredentialEncrypted=; it is not set, and {UNIT_DIRECTORY} does not exist"
        )),
    }
}

/// Whether `path` lies in this process's credentials directory.
pub fn is_credential(path: &Path) -> bool {
    directory().is_some_and(|d| path.starts_with(d))
}

/// Serde: a file setting that may be a credential.
pub fn file<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let s = String::deserialize(d)?;
    resolve(&s, directory().as_deref()).map_err(serde::de::Error::custom)
}

/// Serde: an optional file setting that may be a credential (use with `#[serde(default)]`).
pub fn optional_file<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    file(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_inside_the_directory_only() {
        let dir = Path::new("/run/credentials/outpost.service");
        assert_eq!(resolve("credential:hmac.key", Some(dir)).unwrap(), dir.join("hmac.key"));
        assert_eq!(resolve("/etc/outpost/tls.key", Some(dir)).unwrap(), PathBuf::from("/etc/outpost/tls.key"));
        for bad in ["credential:", "credential:..", "credential:.", "credential:a/b", "credential:../etc/shadow"] {
            let e = resolve(bad, Some(dir)).unwrap_err();
            assert!(e.contains("credential name"), "{bad}: {e}");
        }
        let e = resolve("credential:hmac.key", None).unwrap_err();
        assert!(e.contains("CREDENTIALS_DIRECTORY") && e.contains("LoadCredentialEncrypted="), "{e}");
    }
}
