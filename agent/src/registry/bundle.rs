//! Air-gap bundles: the registry's own files (root chain, index, manifests, blobs) in a plain
//! ustar archive. Reading accepts only regular files whose names match the registry layout,
//! with every size capped; the contents are then verified exactly as a registry's are.

use std::io::{Read, Write};
use std::path::Path;

use super::{check_hex_digest, RegistryError};

const BLOCK: usize = 512;

/// Whether `name` is a file the registry layout has (and nothing that could escape a directory).
pub fn layout_name_ok(name: &str) -> bool {
    if name == "root.json" || name == "index.json" {
        return true;
    }
    if let Some(n) = name.strip_prefix("roots/").and_then(|r| r.strip_suffix(".json")) {
        return !n.is_empty() && n.len() <= 19 && n.bytes().all(|b| b.is_ascii_digit());
    }
    if let Some(h) = name.strip_prefix("manifests/").and_then(|r| r.strip_suffix(".json")) {
        return check_hex_digest(h).is_ok();
    }
    if let Some(h) = name.strip_prefix("blobs/sha256/") {
        return check_hex_digest(h).is_ok();
    }
    false
}

fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Unpacks a bundle into `dest` (an empty directory). `cap` bounds the total bytes written.
pub fn unpack(archive: &Path, dest: &Path, cap: u64) -> Result<Vec<String>, RegistryError> {
    let io = |e: std::io::Error| RegistryError::file(archive, e);
    let mut f = std::io::BufReader::new(std::fs::File::open(archive).map_err(io)?);
    let mut names = Vec::new();
    let mut total = 0u64;
    let mut header = [0u8; BLOCK];
    loop {
        match f.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(RegistryError::Invalid("bundle ends without the end-of-archive marker".into()))
            }
            Err(e) => return Err(io(e)),
        }
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let sum: u64 =
            header.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        if octal(&header[148..156]) != Some(sum) {
            return Err(RegistryError::Invalid("bundle has a corrupt tar header (checksum)".into()));
        }
        let raw_name = &header[..100];
        let end = raw_name.iter().position(|&b| b == 0).unwrap_or(100);
        let mut name = String::from_utf8(raw_name[..end].to_vec())
            .map_err(|_| RegistryError::Invalid("bundle entry name is not UTF-8".into()))?;
        let prefix_end = header[345..500].iter().position(|&b| b == 0).unwrap_or(155);
        if prefix_end > 0 {
            let prefix = String::from_utf8(header[345..345 + prefix_end].to_vec())
                .map_err(|_| RegistryError::Invalid("bundle entry prefix is not UTF-8".into()))?;
            name = format!("{prefix}/{name}");
        }
        let size =
            octal(&header[124..136]).ok_or_else(|| RegistryError::Invalid("bundle entry size is not octal".into()))?;
        let kind = header[156];
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if kind == b'5' {
            // Directories carry no data; the layout's directories are created as needed.
            continue;
        }
        if kind != b'0' && kind != 0 {
            return Err(RegistryError::Invalid(format!(
                "bundle entry '{}' is not a regular file",
                name.escape_debug()
            )));
        }
        let name = name.trim_start_matches("./").to_owned();
        if !layout_name_ok(&name) {
            return Err(RegistryError::Invalid(format!(
                "bundle entry '{}' is not part of a registry",
                name.escape_debug()
            )));
        }
        total += size;
        if total > cap {
            return Err(RegistryError::TooLarge(format!("bundle holds more than {cap} bytes")));
        }
        let path = dest.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut out = std::fs::File::create(&path).map_err(io)?;
        let copied = std::io::copy(&mut (&mut f).take(size), &mut out).map_err(io)?;
        if copied != size {
            return Err(RegistryError::Invalid(format!("bundle entry '{name}' is truncated")));
        }
        std::io::copy(&mut (&mut f).take(padded - size), &mut std::io::sink()).map_err(io)?;
        names.push(name);
    }
    Ok(names)
}

fn header_for(name: &str, size: u64) -> Result<[u8; BLOCK], RegistryError> {
    if name.len() > 100 {
        return Err(RegistryError::Invalid(format!("name '{name}' is too long for a bundle")));
    }
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    Ok(h)
}

/// Writes a bundle of `files` (registry-relative names) read from `registry`.
pub fn pack(registry: &Path, files: &[String], out: &Path) -> Result<(), RegistryError> {
    let io = |e: std::io::Error| RegistryError::file(out, e);
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
    for name in files {
        if !layout_name_ok(name) {
            return Err(RegistryError::Invalid(format!("'{name}' is not part of a registry")));
        }
        let bytes = std::fs::read(registry.join(name)).map_err(|e| RegistryError::Io(format!("{name}: {e}")))?;
        w.write_all(&header_for(name, bytes.len() as u64)?).map_err(io)?;
        w.write_all(&bytes).map_err(io)?;
        let pad = (BLOCK - bytes.len() % BLOCK) % BLOCK;
        w.write_all(&vec![0u8; pad]).map_err(io)?;
    }
    w.write_all(&[0u8; BLOCK * 2]).map_err(io)?;
    w.flush().map_err(io)?;
    w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names() {
        let h = "a".repeat(64);
        for ok in
            ["root.json", "index.json", "roots/12.json", &format!("manifests/{h}.json"), &format!("blobs/sha256/{h}")]
        {
            assert!(layout_name_ok(ok), "{ok}");
        }
        for bad in
            ["../root.json", "/etc/passwd", "roots/../x.json", "blobs/sha256/../../x", "manifests/x.json", "other"]
        {
            assert!(!layout_name_ok(bad), "{bad}");
        }
    }

    #[test]
    fn pack_then_unpack() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("index.json"), b"{}").unwrap();
        std::fs::create_dir_all(src.path().join("roots")).unwrap();
        std::fs::write(src.path().join("roots/1.json"), vec![7u8; 1000]).unwrap();
        let out = src.path().join("b.tar");
        pack(src.path(), &["index.json".into(), "roots/1.json".into()], &out).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let names = unpack(&out, dest.path(), 1 << 20).unwrap();
        assert_eq!(names, vec!["index.json", "roots/1.json"]);
        assert_eq!(std::fs::read(dest.path().join("roots/1.json")).unwrap(), vec![7u8; 1000]);
        assert!(unpack(&out, dest.path(), 100).is_err(), "cap applies");
    }

    proptest::proptest! {
        #[test]
        fn unpack_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("x.tar");
            std::fs::write(&f, &bytes).unwrap();
            let _ = unpack(&f, &dir.path().join("out"), 1 << 20);
        }
    }
}
