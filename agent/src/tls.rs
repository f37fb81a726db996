//! TLS material: one rustls crypto provider for the whole process (ring), certificates, keys
//! and tokens read from files, and the rules of outbound clients.

/// Installs ring as the process-wide rustls provider; later calls do nothing.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS setting cannot be used; `setting` names the configuration key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting}: cannot read {}: {source}", path.display())]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting}: {}: bad PEM {what}: {source}", path.display())]
    Pem {
        setting: &'static str,
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{setting}: {}: no certificate in the PEM file", path.display())]
    NoCertificate { setting: &'static str, path: PathBuf },
    #[error("{setting}: {source}")]
    Rustls {
        setting: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("{setting}: {}: {source}", path.display())]
    ClientCa {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{setting}: {}: {source}", path.display())]
    Bundle {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("{setting}: {source}")]
    Client {
        setting: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// Settings that only make sense together, or one that another needs.
    #[error("{0}")]
    Settings(&'static str),
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { setting, path: path.to_owned(), source })
}

/// Every certificate of the PEM file at `path` (`setting` names it in errors).
pub fn certificates(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(setting, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { setting, path: path.to_owned(), what: "certificate", source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { setting, path: path.to_owned() });
    }
    Ok(certs)
}

/// The private key of the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(setting, path)?).map_err(|source| TlsError::Pem {
        setting,
        path: path.to_owned(),
        what: "private key",
        source,
    })
}

/// The LAN listener's rustls configuration: certificate chain and key, and, with a client CA,
/// mandatory client certificates (mTLS). ALPN offers HTTP/2 and HTTP/1.1.
pub fn server_config(files: &crate::config::TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    install_crypto_provider();
    let chain = certificates("http.tls_cert", &files.cert)?;
    let key = private_key("http.tls_key", &files.key)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { setting: "TLS versions", source })?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let setting = "http.tls_client_ca";
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(setting, ca)? {
                roots.add(c).map_err(|source| TlsError::Rustls { setting, source })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|source| TlsError::ClientCa { setting, path: ca.clone(), source })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls { setting: "http.tls_cert and http.tls_key (not a usable pair)", source })?;
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
    ca: &Path,
    setting: &'static str,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let pem = read(setting, ca)?;
    let bundle = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| TlsError::Bundle {
        setting,
        path: ca.to_owned(),
        source,
    })?;
    for c in bundle {
        builder = builder.add_root_certificate(c);
    }
    Ok(builder)
}

/// Adds a client certificate and its key (PEM files) to a reqwest client, for a server that
/// asks for one (mTLS); `settings` name the certificate and key settings in errors.
pub fn add_identity(
    builder: reqwest::ClientBuilder,
    cert: &Path,
    key: &Path,
    settings: (&'static str, &'static str),
) -> Result<reqwest::ClientBuilder, TlsError> {
    let mut pem = read(settings.0, cert)?;
    pem.extend(read(settings.1, key)?);
    let identity =
        reqwest::Identity::from_pem(&pem).map_err(|source| TlsError::Client { setting: settings.0, source })?;
    Ok(builder.identity(identity))
}

/// A client for an outbound path (`purpose`: registry, upstream, overflow, a webhook): it
/// follows no redirect, so a redirect from an allowed host cannot send data or trust to a host
/// off the residency allow-list (a redirect answer is an error naming its target,
/// [`redirect_refused`]); it takes no proxy from the environment, so the address it connects
/// to is the destination's; and every name it connects to is resolved through the residency
/// guard ([`crate::residency`]), which drops addresses outside the allow-list.
pub fn outbound(
    builder: reqwest::ClientBuilder,
    purpose: &str,
    guard: Option<std::sync::Arc<crate::residency::Guard>>,
) -> reqwest::ClientBuilder {
    builder
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(crate::residency::Resolver::new(purpose, guard))
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

/// A bearer token from a file (surrounding whitespace dropped); `setting` names the key.
pub fn read_token(path: &Path, setting: &'static str) -> Result<String, TlsError> {
    let bytes = read(setting, path)?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}

/// An outbound request's error with its causes ("error sending request: connection refused"
/// rather than the first line alone).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        let text = c.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = c.source();
    }
    parts.join(": ")
}
