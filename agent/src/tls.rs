//! One rustls crypto provider for the whole process (ring).

/// Installs ring as the process-wide rustls provider; later calls do nothing.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Every certificate in a PEM file.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM file".into());
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("bad PEM private key: {e}"))
}

/// The LAN listener's rustls configuration: certificate chain and key, and, with a client CA,
/// mandatory client certificates (mTLS). ALPN offers HTTP/2 and HTTP/1.1.
pub fn server_config(files: &crate::config::TlsFiles) -> Result<rustls::ServerConfig, String> {
    install_crypto_provider();
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let chain = certificates(&read(&files.cert)?).map_err(|e| format!("{}: {e}", files.cert.display()))?;
    let key = private_key(&read(&files.key)?).map_err(|e| format!("{}: {e}", files.key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(&read(ca)?).map_err(|e| format!("{}: {e}", ca.display()))? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{} and {} do not make a usable pair: {e}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The names a client certificate identifies its holder by: the subject's common names, then
/// its DNS and URI subject alternative names. Empty when the certificate cannot be parsed (the
/// TLS layer has already verified it).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    const CN: &str = "2.5.4.3";
    const SAN: &str = "2.5.29.17";
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid.to_string() == CN {
                if let Ok(s) = std::str::from_utf8(atv.value.value()) {
                    names.push(s.to_owned());
                }
            }
        }
    }
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        if ext.extn_id.to_string() != SAN {
            continue;
        }
        if let Ok(san) = SubjectAltName::from_der(ext.extn_value.as_bytes()) {
            for name in san.0 {
                match name {
                    GeneralName::DnsName(s) => names.push(s.to_string()),
                    GeneralName::UniformResourceIdentifier(s) => names.push(s.to_string()),
                    _ => {}
                }
            }
        }
    }
    names
}

/// Adds every certificate of a PEM bundle file to a reqwest client's trusted roots; `key` names
/// the setting in error messages.
pub fn add_roots(
    mut builder: reqwest::ClientBuilder,
    ca: &std::path::Path,
    key: &str,
) -> Result<reqwest::ClientBuilder, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{key} {}: {e}", ca.display()))?;
    for c in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{key} {}: {e}", ca.display()))? {
        builder = builder.add_root_certificate(c);
    }
    Ok(builder)
}

/// A client for an outbound path (registry, upstream, overflow): it follows no redirect, so a
/// redirect from an allowed host cannot send data or trust to a host off the residency
/// allow-list. A redirect answer is an error naming its target ([`redirect_refused`]).
pub fn outbound(builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    builder.redirect(reqwest::redirect::Policy::none())
}

/// The error for a redirect answer, naming where it pointed; `None` for any other status.
pub fn redirect_refused(url: &str, resp: &reqwest::Response) -> Option<String> {
    if !resp.status().is_redirection() || resp.status() == reqwest::StatusCode::NOT_MODIFIED {
        return None;
    }
    let target = resp.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("(no Location)");
    Some(format!(
        "{url}: redirect refused (HTTP {} to {}): outbound requests follow no redirects",
        resp.status().as_u16(),
        target.chars().take(300).collect::<String>()
    ))
}

/// A bearer token from a file (surrounding whitespace dropped); `key` names the setting.
pub fn read_token(path: &std::path::Path, key: &str) -> Result<String, String> {
    Ok(std::fs::read_to_string(path).map_err(|e| format!("{key} {}: {e}", path.display()))?.trim().to_owned())
}
