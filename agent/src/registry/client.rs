//! Fetching registry files from `https://`, `http://` (only where configured) or `file://`,
//! every read capped before and while it happens; blob downloads resume with `Range`, report
//! their progress, and are cut only when no byte arrives for the stall timeout.

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::RegistryError;

/// Options for reaching a registry.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub allow_http: bool,
    /// Extra CA certificates (PEM) trusted for `https://` registries.
    pub ca: Option<PathBuf>,
    /// The whole of one metadata request (root, index, manifest).
    pub timeout: Duration,
    /// A blob download is cut when no byte arrives for this long (however long it takes in
    /// all); the next attempt resumes it.
    pub stall_timeout: Duration,
    /// Checks each connection against the residency allow-list and records it.
    pub residency: Option<std::sync::Arc<crate::residency::Guard>>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            allow_http: false,
            ca: None,
            timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            residency: None,
        }
    }
}

impl From<&crate::config::RegistryConfig> for FetchOptions {
    fn from(c: &crate::config::RegistryConfig) -> FetchOptions {
        FetchOptions {
            allow_http: c.allow_http,
            ca: c.ca.clone(),
            timeout: c.timeout,
            stall_timeout: c.stall_timeout,
            residency: None,
        }
    }
}

enum Base {
    File(PathBuf),
    Http {
        base: String,
        client: reqwest::Client,
        timeout: Duration,
        guard: Option<std::sync::Arc<crate::residency::Guard>>,
    },
}

/// Where a blob download stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub received: u64,
    pub total: u64,
    /// Bytes a second over this attempt.
    pub rate: f64,
    /// At that rate.
    pub eta: Option<Duration>,
}

impl Progress {
    fn at(received: u64, total: u64, resumed_from: u64, elapsed: Duration) -> Progress {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 { received.saturating_sub(resumed_from) as f64 / secs } else { 0.0 };
        let eta = (rate > 0.0).then(|| Duration::from_secs_f64(total.saturating_sub(received) as f64 / rate));
        Progress { received, total, rate, eta }
    }
}

pub struct Fetcher {
    base: Base,
    display: String,
    stall: Duration,
}

/// The answer to a conditional GET.
#[derive(Debug)]
pub enum Fetched {
    NotModified,
    Body { bytes: Vec<u8>, etag: Option<String> },
}

/// Sends one registry request: an error carries its causes (a residency refusal among
/// them), the destination is recorded, and a redirect is refused.
async fn send(
    req: reqwest::RequestBuilder,
    url: &str,
    guard: Option<&crate::residency::Guard>,
) -> Result<reqwest::Response, RegistryError> {
    let resp = req.send().await.map_err(|e| RegistryError::Fetch(format!("{url}: {}", crate::tls::describe(&e))))?;
    if let Some(g) = guard {
        g.answered("registry", url, &resp);
    }
    if let Some(e) = crate::tls::redirect_refused(url, &resp) {
        return Err(RegistryError::Fetch(e));
    }
    Ok(resp)
}

impl Fetcher {
    pub fn new(url: &str, opts: &FetchOptions) -> Result<Fetcher, RegistryError> {
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(Fetcher {
                base: Base::File(PathBuf::from(path)),
                display: url.to_owned(),
                stall: opts.stall_timeout,
            });
        }
        let is_https = url.starts_with("https://");
        if !is_https && !url.starts_with("http://") {
            return Err(RegistryError::Invalid(format!("registry url '{url}' must be https://, http:// or file://")));
        }
        if !is_https && !opts.allow_http {
            return Err(RegistryError::Invalid(format!(
                "registry url '{url}' is plain http: set registry.allow_http = true"
            )));
        }
        crate::tls::install_crypto_provider();
        // No total timeout on the client: blobs take what the link takes. Each read must
        // progress within the stall timeout; metadata requests also carry `timeout` each.
        let mut builder = crate::tls::outbound(reqwest::Client::builder(), "registry", opts.residency.clone())
            .read_timeout(opts.stall_timeout)
            .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &opts.ca {
            builder =
                crate::tls::add_roots(builder, ca, "registry.ca").map_err(|e| RegistryError::Io(e.to_string()))?;
        }
        let client = builder.build().map_err(|e| RegistryError::Invalid(format!("http client: {e}")))?;
        let base = if url.ends_with('/') { url.to_owned() } else { format!("{url}/") };
        Ok(Fetcher {
            base: Base::Http { base, client, timeout: opts.timeout, guard: opts.residency.clone() },
            display: url.to_owned(),
            stall: opts.stall_timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.display
    }

    fn stall_timeout(&self) -> Duration {
        self.stall
    }

    /// Fetches `rel` (at most `cap` bytes); with an ETag, a 304 answers `NotModified`.
    pub async fn get(&self, rel: &str, cap: u64, etag: Option<&str>) -> Result<Fetched, RegistryError> {
        match &self.base {
            Base::File(dir) => {
                let path = dir.join(rel);
                let bytes = read_file_capped(&path, cap).await?;
                Ok(Fetched::Body { bytes, etag: None })
            }
            Base::Http { base, client, timeout, guard } => {
                let url = format!("{base}{rel}");
                let mut req = client.get(&url).timeout(*timeout);
                if let Some(e) = etag {
                    req = req.header(reqwest::header::IF_NONE_MATCH, e);
                }
                let mut resp = send(req, &url, guard.as_deref()).await?;
                match resp.status().as_u16() {
                    304 => return Ok(Fetched::NotModified),
                    404 => return Err(RegistryError::NotFound(url)),
                    200 => {}
                    s => return Err(RegistryError::Fetch(format!("{url}: HTTP {s}"))),
                }
                if resp.content_length().is_some_and(|l| l > cap) {
                    return Err(RegistryError::TooLarge(format!("{url} is larger than {cap} bytes")));
                }
                let etag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let mut bytes = Vec::new();
                while let Some(chunk) = resp
                    .chunk()
                    .await
                    .map_err(|e| RegistryError::Fetch(format!("{url}: {}", crate::tls::describe(&e))))?
                {
                    if bytes.len() as u64 + chunk.len() as u64 > cap {
                        return Err(RegistryError::TooLarge(format!("{url} is larger than {cap} bytes")));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(Fetched::Body { bytes, etag })
            }
        }
    }

    /// Fetches `rel` unconditionally.
    pub async fn get_body(&self, rel: &str, cap: u64) -> Result<Vec<u8>, RegistryError> {
        match self.get(rel, cap, None).await? {
            Fetched::Body { bytes, .. } => Ok(bytes),
            Fetched::NotModified => Err(RegistryError::Fetch(format!("{rel}: unexpected 304"))),
        }
    }

    /// Downloads `rel` into `dest`, appending to what an earlier attempt left there. Never
    /// writes more than `size` bytes; fewer is an error that a later call resumes.
    /// `progress` hears where it stands about once a second and at the end.
    pub async fn download(
        &self,
        rel: &str,
        dest: &Path,
        size: u64,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<(), RegistryError> {
        let io = |e: std::io::Error| RegistryError::file(dest, e);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(false)
            .write(true)
            .truncate(false)
            .open(dest)
            .map_err(io)?;
        let mut have = file.metadata().map_err(io)?.len();
        if have > size {
            file.set_len(0).map_err(io)?;
            have = 0;
        }
        if have == size {
            return Ok(());
        }
        file.seek(std::io::SeekFrom::Start(have)).map_err(io)?;
        let started = std::time::Instant::now();
        let resumed_from = have;
        if have > 0 {
            tracing::info!(blob = rel, received = have, total = size, "resuming a cut download");
        }
        let log_step = (size / 10).max(8 << 20);
        let mut next_log = have + log_step;
        let mut next_report = started;
        let mut halfway_hit = false;
        match &self.base {
            Base::File(dir) => {
                let path = dir.join(rel);
                let meta = tokio::fs::metadata(&path).await.map_err(|e| not_found_or_io(&path, e))?;
                if meta.len() > size {
                    return Err(RegistryError::TooLarge(format!(
                        "{} is larger than the {size} bytes the manifest says",
                        path.display()
                    )));
                }
                let mut src = std::fs::File::open(&path).map_err(|e| not_found_or_io(&path, e))?;
                src.seek(std::io::SeekFrom::Start(have)).map_err(io)?;
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = std::io::Read::read(&mut src, &mut buf).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n]).map_err(io)?;
                    have += n as u64;
                    if !halfway_hit && have * 2 >= size {
                        halfway_hit = true;
                        file.flush().map_err(io)?;
                        crate::failpoint::hit("download-mid");
                    }
                }
            }
            Base::Http { base, client, guard, .. } => {
                let url = format!("{base}{rel}");
                let mut req = client.get(&url);
                if have > 0 {
                    req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
                }
                let mut resp = send(req, &url, guard.as_deref()).await?;
                match resp.status().as_u16() {
                    206 => {}
                    200 => {
                        if have > 0 {
                            // The server ignored the range: start over.
                            file.set_len(0).map_err(io)?;
                            file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
                            have = 0;
                        }
                    }
                    404 => return Err(RegistryError::NotFound(url)),
                    416 => {
                        file.set_len(0).map_err(io)?;
                        return Err(RegistryError::Fetch(format!("{url}: range not satisfiable; restarting")));
                    }
                    s => return Err(RegistryError::Fetch(format!("{url}: HTTP {s}"))),
                }
                if resp.content_length().is_some_and(|l| have + l > size) {
                    return Err(RegistryError::TooLarge(format!(
                        "{url} is larger than the {size} bytes the manifest says"
                    )));
                }
                loop {
                    let chunk = match resp.chunk().await {
                        Ok(Some(c)) => c,
                        Ok(None) => break,
                        Err(e) => {
                            let _ = file.sync_all();
                            let why = if e.is_timeout() {
                                format!("no data for {:?}", self.stall_timeout())
                            } else {
                                crate::tls::describe(&e)
                            };
                            return Err(RegistryError::Fetch(format!(
                                "{url}: download cut at {have} of {size} bytes ({why}); it resumes at the next attempt"
                            )));
                        }
                    };
                    if have + chunk.len() as u64 > size {
                        file.set_len(0).map_err(io)?;
                        return Err(RegistryError::TooLarge(format!(
                            "{url} sends more than the {size} bytes the manifest says"
                        )));
                    }
                    file.write_all(&chunk).map_err(io)?;
                    have += chunk.len() as u64;
                    let now = std::time::Instant::now();
                    if now >= next_report {
                        let p = Progress::at(have, size, resumed_from, now - started);
                        if have >= next_log {
                            tracing::info!(
                                blob = rel,
                                received = have,
                                total = size,
                                rate_bytes_per_s = p.rate as u64,
                                eta_s = p.eta.map(|d| d.as_secs()),
                                "downloading"
                            );
                            next_log = have + log_step;
                        }
                        progress(&p);
                        next_report = now + Duration::from_secs(1);
                    }
                    if !halfway_hit && have * 2 >= size {
                        halfway_hit = true;
                        file.flush().map_err(io)?;
                        crate::failpoint::hit("download-mid");
                    }
                }
            }
        }
        file.sync_all().map_err(io)?;
        progress(&Progress::at(have, size, resumed_from, started.elapsed()));
        if have < size {
            return Err(RegistryError::Fetch(format!(
                "{rel}: download cut at {have} of {size} bytes; it resumes at the next attempt"
            )));
        }
        Ok(())
    }
}

fn not_found_or_io(path: &Path, e: std::io::Error) -> RegistryError {
    if e.kind() == std::io::ErrorKind::NotFound {
        RegistryError::NotFound(path.display().to_string())
    } else {
        RegistryError::file(path, e)
    }
}

async fn read_file_capped(path: &Path, cap: u64) -> Result<Vec<u8>, RegistryError> {
    let meta = tokio::fs::metadata(path).await.map_err(|e| not_found_or_io(path, e))?;
    if meta.len() > cap {
        return Err(RegistryError::TooLarge(format!("{} is larger than {cap} bytes", path.display())));
    }
    let bytes = tokio::fs::read(path).await.map_err(|e| not_found_or_io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(RegistryError::TooLarge(format!("{} is larger than {cap} bytes", path.display())));
    }
    Ok(bytes)
}
