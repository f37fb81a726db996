//! The publisher's side: create a registry directory, publish a model into it, rotate its
//! root. The output is plain files for any static host (nginx, S3/MinIO, a CDN) or a bundle.

use std::collections::BTreeMap;
use std::path::Path;

use super::dsse::Envelope;
use super::keys::{KeyPair, PublicKey};
use super::trust::verify_root_self;
use super::{
    format_time, now, sha256_hex, Baseline, BaselineRules, BlobRef, DigestRef, Index, IndexEntry, ModelPredicate,
    RegistryError, Residency, Role, Roles, Root, SemVer, Statement, Subject, TensorDecl, BASELINE_TYPE, INDEX_TYPE,
    MANIFEST_TYPE, PREDICATE_TYPE, ROOT_TYPE, STATEMENT_TYPE,
};
use crate::config::{valid_name, ModelConfig};
use crate::store::write_atomic;

fn write(dir: &Path, rel: &str, bytes: &[u8]) -> Result<(), RegistryError> {
    write_atomic(&dir.join(rel), bytes).map_err(|e| RegistryError::file(dir.join(rel), e))
}

fn role_of(keys: &[PublicKey], threshold: usize) -> Result<(Role, BTreeMap<String, PublicKey>), RegistryError> {
    let mut map = BTreeMap::new();
    for k in keys {
        map.insert(k.keyid()?, k.clone());
    }
    if threshold == 0 || threshold > map.len() {
        return Err(RegistryError::Invalid(format!("threshold {threshold} with {} distinct keys", map.len())));
    }
    Ok((Role { keyids: map.keys().cloned().collect(), threshold }, map))
}

/// Settings of a new root.
pub struct RootSpec {
    pub root_keys: Vec<PublicKey>,
    pub root_threshold: usize,
    pub index_keys: Vec<PublicKey>,
    pub index_threshold: usize,
    pub expires_in_secs: i64,
    pub demo_only: bool,
}

fn build_root(version: u64, spec: &RootSpec) -> Result<Root, RegistryError> {
    let (root_role, mut keys) = role_of(&spec.root_keys, spec.root_threshold)?;
    let (index_role, index_keys) = role_of(&spec.index_keys, spec.index_threshold)?;
    keys.extend(index_keys);
    Ok(Root {
        kind: "root".into(),
        version,
        expires: format_time(now() + spec.expires_in_secs),
        keys,
        roles: Roles { root: root_role, index: index_role },
        demo_only: spec.demo_only,
    })
}

fn sign_json<T: serde::Serialize>(payload_type: &str, value: &T, keys: &[&KeyPair]) -> Result<Vec<u8>, RegistryError> {
    let payload = serde_json::to_vec(value).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    Ok(Envelope::sign(payload_type, &payload, keys).to_bytes())
}

/// Creates a registry: root v1 (`root.json`, `roots/1.json`) signed by the root keys, and an
/// empty index v1 signed by the index keys.
pub fn init(
    dir: &Path,
    spec: &RootSpec,
    root_signers: &[&KeyPair],
    index_signers: &[&KeyPair],
    index_expires_in_secs: i64,
) -> Result<(), RegistryError> {
    if dir.join("root.json").exists() {
        return Err(RegistryError::Invalid(format!("{} already holds a registry", dir.display())));
    }
    let root = build_root(1, spec)?;
    let bytes = sign_json(ROOT_TYPE, &root, root_signers)?;
    verify_root_self(&bytes)?;
    write(dir, "roots/1.json", &bytes)?;
    write(dir, "root.json", &bytes)?;
    let index = Index {
        kind: "index".into(),
        version: 1,
        expires: format_time(now() + index_expires_in_secs),
        models: BTreeMap::new(),
    };
    write(dir, "index.json", &sign_json(INDEX_TYPE, &index, index_signers)?)?;
    Ok(())
}

/// Writes root version N+1, signed by the old root keys and the new ones.
pub fn rotate_root(dir: &Path, spec: &RootSpec, signers: &[&KeyPair]) -> Result<u64, RegistryError> {
    let current = std::fs::read(dir.join("root.json")).map_err(|e| RegistryError::Io(format!("root.json: {e}")))?;
    let old = verify_root_self(&current)?;
    let root = build_root(old.version + 1, spec)?;
    let bytes = sign_json(ROOT_TYPE, &root, signers)?;
    // The same checks a client makes: threshold of the old root's keys and of the new root's.
    let env = Envelope::parse(&bytes)?;
    let old_keys: BTreeMap<_, _> = old
        .roles
        .root
        .keyids
        .iter()
        .filter_map(|id| old.keys.get(id).and_then(|k| k.verifying_key().ok()).map(|k| (id.clone(), k)))
        .collect();
    env.verify(ROOT_TYPE, &old_keys, old.roles.root.threshold, "new root by the old root keys")?;
    verify_root_self(&bytes)?;
    write(dir, &format!("roots/{}.json", root.version), &bytes)?;
    write(dir, "root.json", &bytes)?;
    Ok(root.version)
}

/// What to publish.
pub struct Publication<'a> {
    pub model: &'a Path,
    pub name: &'a str,
    pub version: &'a str,
    pub channel: &'a str,
    pub golden: &'a Path,
    pub quantization: &'a str,
    pub may_leave_site: bool,
    pub index_expires_in_secs: i64,
    /// `package.json`: processing steps; the files they read are beside it.
    pub package: Option<&'a Path>,
}

/// Publishes a model: refuses it unless tract loads it and reproduces the golden vectors;
/// writes the zstd blob, the signed manifest and a new signed index with a higher version.
/// Returns the manifest digest.
pub fn publish(dir: &Path, p: &Publication<'_>, signers: &[&KeyPair]) -> Result<String, RegistryError> {
    if !valid_name(p.name) {
        return Err(RegistryError::Invalid(format!("model name '{}' must be 1-128 of [A-Za-z0-9._-]", p.name)));
    }
    if SemVer::parse(p.version).is_none() {
        return Err(RegistryError::Invalid(format!("version '{}' is not semver (MAJOR.MINOR.PATCH)", p.version)));
    }
    if !valid_name(p.channel) {
        return Err(RegistryError::Invalid(format!("channel '{}' must be 1-128 of [A-Za-z0-9._-]", p.channel)));
    }
    let onnx = std::fs::read(p.model).map_err(|e| RegistryError::file(p.model, e))?;
    let golden_bytes = std::fs::read(p.golden).map_err(|e| RegistryError::file(p.golden, e))?;
    let golden: serde_json::Value =
        serde_json::from_slice(&golden_bytes).map_err(|e| RegistryError::Invalid(format!("golden file: {e}")))?;
    crate::engine::golden::Golden::parse(&golden_bytes)
        .and_then(|g| g.tolerances_discriminate())
        .map_err(|e| RegistryError::Refused(format!("{} refused: {e}", p.golden.display())))?;
    let prepared =
        crate::engine::prepare(&onnx, Some(&golden_bytes), &ModelConfig::default().prepare_options(onnx.len()))
            .map_err(|e| RegistryError::Refused(format!("{} refused: {e}", p.model.display())))?;
    let sig = &prepared.model.signature;
    let decl = |t: &crate::engine::TensorSpec| TensorDecl {
        name: t.name.clone(),
        datatype: t.datatype.as_str().into(),
        shape: t.v2_shape(),
    };
    let processing = match p.package {
        Some(path) => Some(publish_package(dir, path, &prepared.model)?),
        None => None,
    };
    let blob = zstd::bulk::compress(&onnx, 19).map_err(|e| RegistryError::Io(format!("zstd: {e}")))?;
    let blob_sha = sha256_hex(&blob);
    let model_sha = sha256_hex(&onnx);
    write(dir, &format!("blobs/sha256/{blob_sha}"), &blob)?;
    let stmt = Statement {
        kind: STATEMENT_TYPE.into(),
        subject: vec![Subject { name: "model.onnx".into(), digest: BTreeMap::from([("sha256".into(), model_sha)]) }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: ModelPredicate {
            name: p.name.into(),
            version: p.version.into(),
            format: "onnx".into(),
            opset: None,
            quantization: p.quantization.into(),
            inputs: sig.inputs.iter().map(decl).collect(),
            outputs: sig.outputs.iter().map(decl).collect(),
            blob: BlobRef {
                sha256: blob_sha,
                size: blob.len() as u64,
                uncompressed_size: onnx.len() as u64,
                encoding: "zstd".into(),
            },
            golden,
            min_agent_version: None,
            residency: Residency { may_leave_site: p.may_leave_site },
            processing,
        },
    };
    let manifest = sign_json(MANIFEST_TYPE, &stmt, signers)?;
    let manifest_sha = sha256_hex(&manifest);
    write(dir, &format!("manifests/{manifest_sha}.json"), &manifest)?;

    let index_bytes =
        std::fs::read(dir.join("index.json")).map_err(|e| RegistryError::Io(format!("index.json: {e}")))?;
    let mut index: Index = serde_json::from_slice(&Envelope::parse(&index_bytes)?.payload_bytes()?)
        .map_err(|e| RegistryError::Invalid(format!("index payload: {e}")))?;
    let entries = index.models.entry(p.name.to_owned()).or_default();
    if let Some(e) = entries.iter().find(|e| e.version == p.version && e.channel == p.channel) {
        if e.manifest.sha256 != manifest_sha {
            return Err(RegistryError::Invalid(format!(
                "{}@{} is already published on channel {}; publish a new version",
                p.name, p.version, p.channel
            )));
        }
    } else {
        entries.push(IndexEntry {
            version: p.version.into(),
            channel: p.channel.into(),
            manifest: DigestRef { sha256: manifest_sha.clone(), size: manifest.len() as u64 },
        });
    }
    index.version += 1;
    index.expires = format_time(now() + p.index_expires_in_secs);
    write(dir, "index.json", &sign_json(INDEX_TYPE, &index, signers)?)?;
    Ok(manifest_sha)
}

/// Reads a package declaration, proves it on the model (its golden vectors, raw input to final
/// output), writes the files its steps read as blobs and returns the declaration with their
/// digests, ready to be signed in the manifest.
fn publish_package(
    dir: &Path,
    path: &Path,
    model: &crate::engine::LoadedModel,
) -> Result<super::Processing, RegistryError> {
    use crate::engine::package;
    let bytes = std::fs::read(path).map_err(|e| RegistryError::file(path, e))?;
    let mut decl: super::Processing =
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut files = BTreeMap::new();
    decl.files.clear();
    let needed: Vec<String> = package::needed_files(&decl).into_iter().map(str::to_owned).collect();
    for name in &needed {
        let name = name.as_str();
        if !valid_name(name) {
            return Err(RegistryError::Invalid(format!(
                "package file name '{}' is not a plain file name",
                name.escape_debug()
            )));
        }
        let file = base.join(name);
        let bytes = std::fs::read(&file).map_err(|e| RegistryError::file(&file, e))?;
        let sha256 = sha256_hex(&bytes);
        decl.files.insert(name.to_owned(), package::FileRef { sha256, size: bytes.len() as u64 });
        files.insert(name.to_owned(), bytes);
    }
    package::check_files(&decl).map_err(RegistryError::Invalid)?;
    package::prepare(&decl, &files, model)
        .map_err(|e| RegistryError::Refused(format!("{} refused: {e}", path.display())))?;
    for (name, bytes) in &files {
        write(dir, &format!("blobs/sha256/{}", decl.files[name].sha256), bytes)?;
    }
    Ok(decl)
}

/// Re-signs the index with a new version (e.g. to withdraw a version: `remove` names it).
pub fn resign_index(
    dir: &Path,
    signers: &[&KeyPair],
    expires_in_secs: i64,
    remove: Option<(&str, &str)>,
) -> Result<u64, RegistryError> {
    let index_bytes =
        std::fs::read(dir.join("index.json")).map_err(|e| RegistryError::Io(format!("index.json: {e}")))?;
    let mut index: Index = serde_json::from_slice(&Envelope::parse(&index_bytes)?.payload_bytes()?)
        .map_err(|e| RegistryError::Invalid(format!("index payload: {e}")))?;
    if let Some((name, version)) = remove {
        if let Some(entries) = index.models.get_mut(name) {
            entries.retain(|e| e.version != version);
        }
    }
    index.version += 1;
    index.expires = format_time(now() + expires_in_secs);
    write(dir, "index.json", &sign_json(INDEX_TYPE, &index, signers)?)?;
    Ok(index.version)
}

/// The registry's root, and the version a new signed document beside the index (the
/// baseline, the pipelines) takes: one more than the one there, which must verify.
fn next_version<T: super::trust::SignedDoc>(dir: &Path) -> Result<(Root, u64), RegistryError> {
    let root_bytes = std::fs::read(dir.join("root.json")).map_err(|e| RegistryError::file(dir.join("root.json"), e))?;
    let root = verify_root_self(&root_bytes)?;
    let version = match std::fs::read(dir.join(T::FILE)) {
        Ok(bytes) => T::verify(&root, &bytes)?.version() + 1,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
        Err(e) => return Err(RegistryError::file(dir.join(T::FILE), e)),
    };
    Ok((root, version))
}

/// Signs and writes the registry's compliance baseline (`baseline.json`) with the next
/// version; the keys must be the root's index keys (checked, so a wrong key fails here, not at
/// every site). Returns the version written.
pub fn publish_baseline(
    dir: &Path,
    name: &str,
    rules: BaselineRules,
    signers: &[&KeyPair],
    expires_in_secs: i64,
) -> Result<u64, RegistryError> {
    if !valid_name(name) {
        return Err(RegistryError::Invalid(format!("baseline name '{name}' must be 1-128 of [A-Za-z0-9._-]")));
    }
    let (root, version) = next_version::<Baseline>(dir)?;
    let baseline = Baseline {
        kind: "baseline".into(),
        version,
        expires: format_time(now() + expires_in_secs),
        name: name.into(),
        rules,
    };
    let bytes = sign_json(BASELINE_TYPE, &baseline, signers)?;
    // What every site will check: the signatures meet the index threshold and the rules parse.
    super::trust::verify_baseline(&root, &bytes)?;
    write(dir, "baseline.json", &bytes)?;
    Ok(version)
}

/// Signs and writes the registry's pipelines (`pipelines.json`) with the next version, after
/// checking each document as the agents will; the keys must be the root's index keys.
/// Returns the version written.
pub fn publish_pipelines(
    dir: &Path,
    docs: Vec<crate::api::pipeline::PipelineDoc>,
    signers: &[&KeyPair],
    expires_in_secs: i64,
) -> Result<u64, RegistryError> {
    use outpost_proto::registry::pipeline::{Pipelines, PIPELINES_TYPE};
    let mut names = std::collections::BTreeSet::new();
    for d in &docs {
        crate::api::pipeline::Pipeline::build(d, "0").map_err(RegistryError::Invalid)?;
        if !names.insert(d.name.as_str()) {
            return Err(RegistryError::Invalid(format!("two pipelines named '{}'", d.name)));
        }
    }
    let (root, version) = next_version::<Pipelines>(dir)?;
    let doc =
        Pipelines { kind: "pipelines".into(), version, expires: format_time(now() + expires_in_secs), pipelines: docs };
    let bytes = sign_json(PIPELINES_TYPE, &doc, signers)?;
    super::trust::verify_pipelines(&root, &bytes)?;
    write(dir, "pipelines.json", &bytes)?;
    Ok(version)
}
