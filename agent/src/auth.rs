//! Who may call what: bearer tokens (stored as SHA-256 digests) and client certificates mapped
//! to roles, the role matrix of the LAN API, and a per-principal rate limit.
//!
//! Tokens are 32 random bytes: a plain SHA-256 digest is as good as a slow password hash for
//! secrets with that much entropy, and lets every request be checked in microseconds. Every
//! configured digest is compared in constant time, without stopping at the first match.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

use crate::locks::MutexExt;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A role of the DESIGN §9 matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Infer,
    Observe,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "infer" => Ok(Role::Infer),
            "observe" => Ok(Role::Observe),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role '{other}' (infer, observe, admin)")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Infer => "infer",
            Role::Observe => "observe",
            Role::Admin => "admin",
        }
    }
}

/// One bearer token: its name (the principal), the SHA-256 of its secret, its roles, and
/// optionally the models it may run.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEntry {
    pub name: String,
    pub sha256: [u8; 32],
    pub roles: Vec<Role>,
    /// `None`: every model.
    pub models: Option<Vec<String>>,
}

/// One client certificate identity (mTLS): matched against the certificate's subject common
/// name or one of its DNS/URI subject alternative names.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientEntry {
    pub subject: String,
    pub roles: Vec<Role>,
    pub models: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub tokens: Vec<TokenEntry>,
    pub clients: Vec<ClientEntry>,
    /// Requests per second per principal (token bucket; `None`: unlimited).
    pub rate_limit: Option<f64>,
    /// Bucket size: requests a principal may send at once before the rate applies.
    pub rate_burst: u32,
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// `token:<name>`, `cert:<subject>` or `anonymous` (no `[auth]`).
    pub name: String,
    pub roles: Vec<Role>,
    pub models: Option<Vec<String>>,
}

impl Principal {
    /// Everything allowed: the loopback dev profile without `[auth]`.
    pub fn anonymous() -> Principal {
        Principal { name: "anonymous".into(), roles: vec![Role::Infer, Role::Observe, Role::Admin], models: None }
    }

    fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    fn may_run(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// What an endpoint needs (the rows of the DESIGN §9 matrix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// Health: anyone, even without credentials.
    Public,
    /// Server and model metadata and readiness: infer, observe or admin.
    Read,
    /// Inference on one model: infer (if the token covers the model) or admin.
    Infer(String),
    /// Metrics, status, repository index: observe or admin.
    Observe,
    /// Load, unload, rollback, registry poll, audit export: admin.
    Admin,
}

/// The permission an HTTP request needs, from its method and path. Unknown paths need
/// `Read`, so that probing for endpoints without credentials learns nothing.
pub fn required(method: &str, path: &str) -> Permission {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match (method, segs.as_slice()) {
        ("GET" | "HEAD", ["v2", "health", "live" | "ready"]) => Permission::Public,
        // The status page holds no data; it reads /admin/status with the caller's credentials.
        ("GET" | "HEAD", []) => Permission::Public,
        ("POST", ["v2", "models", m, "infer"]) | ("POST", ["v2", "models", m, "versions", _, "infer"]) => {
            Permission::Infer((*m).to_owned())
        }
        ("GET" | "HEAD", ["metrics"]) | ("GET" | "HEAD", ["admin", "status"]) => Permission::Observe,
        ("GET" | "HEAD", ["admin", "experiments", _]) => Permission::Observe,
        ("GET" | "HEAD", ["v2", "models", "stats"])
        | ("GET" | "HEAD", ["v2", "models", _, "stats"])
        | ("GET" | "HEAD", ["v2", "models", _, "versions", _, "stats"]) => Permission::Observe,
        ("POST", ["v2", "repository", "index"]) => Permission::Observe,
        (_, ["v2", "repository", "models", _, "load" | "unload"]) => Permission::Admin,
        (_, ["admin", ..]) => Permission::Admin,
        // Batch jobs: submitting, cancelling and reading answers are an operator's.
        ("GET" | "HEAD", ["v2", "jobs"]) | ("GET" | "HEAD", ["v2", "jobs", _]) => Permission::Observe,
        (_, ["v2", "jobs", ..]) => Permission::Admin,
        _ => Permission::Read,
    }
}

/// Whether `principal` holds `permission`.
pub fn allows(principal: &Principal, permission: &Permission) -> bool {
    match permission {
        Permission::Public => true,
        Permission::Read => principal.has(Role::Infer) || principal.has(Role::Observe) || principal.has(Role::Admin),
        Permission::Infer(model) => {
            principal.has(Role::Admin) || (principal.has(Role::Infer) && principal.may_run(model))
        }
        Permission::Observe => principal.has(Role::Observe) || principal.has(Role::Admin),
        Permission::Admin => principal.has(Role::Admin),
    }
}

/// Why a request was refused before reaching its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// 401: no credentials, or credentials that match nothing.
    Unauthenticated(String),
    /// 403: a known principal without the role or model.
    Forbidden { principal: String, message: String },
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Unauthenticated(m) | Denial::Forbidden { message: m, .. } => f.write_str(m),
        }
    }
}

/// The SHA-256 of a token secret, as stored in the config.
pub fn token_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.trim().as_bytes()).into()
}

/// Authenticates a request from its `Authorization` header value and the subject names of its
/// verified client certificate (empty without mTLS). A bearer token, when sent, decides; else
/// the certificate.
pub fn authenticate(
    config: &AuthConfig,
    authorization: Option<&[u8]>,
    cert_names: &[String],
) -> Result<Principal, Denial> {
    if let Some(value) = authorization {
        let value = std::str::from_utf8(value)
            .map_err(|_| Denial::Unauthenticated("the Authorization header is not valid text".into()))?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let secret = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start())
            .ok_or_else(|| Denial::Unauthenticated("the Authorization header must be 'Bearer <token>'".into()))?;
        let digest = token_digest(secret);
        let mut found: Option<&TokenEntry> = None;
        for t in &config.tokens {
            // No early exit: the time taken does not depend on which token matched.
            if bool::from(t.sha256.ct_eq(&digest)) {
                found = Some(t);
            }
        }
        return match found {
            Some(t) => {
                Ok(Principal { name: format!("token:{}", t.name), roles: t.roles.clone(), models: t.models.clone() })
            }
            None => Err(Denial::Unauthenticated("unknown or revoked token".into())),
        };
    }
    if !cert_names.is_empty() {
        let entry = config.clients.iter().find(|c| cert_names.iter().any(|n| n == &c.subject));
        return match entry {
            Some(c) => {
                Ok(Principal { name: format!("cert:{}", c.subject), roles: c.roles.clone(), models: c.models.clone() })
            }
            // A certificate from the trusted CA but not listed: known to TLS, no roles here.
            None => Ok(Principal { name: format!("cert:{}", cert_names[0]), roles: Vec::new(), models: None }),
        };
    }
    Err(Denial::Unauthenticated("credentials required: send 'Authorization: Bearer <token>'".into()))
}

/// Checks `principal` against what the request needs: 403 with a reason when refused.
pub fn authorize(principal: &Principal, permission: &Permission) -> Result<(), Denial> {
    if allows(principal, permission) {
        return Ok(());
    }
    let what = match permission {
        Permission::Public | Permission::Read => "read metadata".to_owned(),
        Permission::Infer(m) => format!("run model '{m}'"),
        Permission::Observe => "observe (metrics, status)".to_owned(),
        Permission::Admin => "administer".to_owned(),
    };
    Err(Denial::Forbidden { principal: principal.name.clone(), message: format!("{} may not {what}", principal.name) })
}

/// A new token: the secret (shown once) and its config entry.
pub fn create_token(name: &str, roles: &[Role], models: Option<&[String]>) -> Result<(String, String), String> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
    let secret = format!("opt_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let digest = token_digest(&secret);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let roles: Vec<String> = roles.iter().map(|r| format!("\"{}\"", r.as_str())).collect();
    let models = match models {
        Some(ms) => {
            format!(", models = [{}]", ms.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", "))
        }
        None => String::new(),
    };
    let entry = format!("{{ name = \"{name}\", sha256 = \"{hex}\", roles = [{}]{models} }}", roles.join(", "));
    Ok((secret, entry))
}

/// Per-principal token buckets. Principals come from the config (or are refused before
/// reaching here), so the map is bounded by its size plus certificate subjects seen; it is
/// cleared when it grows past [`RateLimiter::MAX_PRINCIPALS`].
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    const MAX_PRINCIPALS: usize = 10_000;

    /// Takes one request from `principal`'s bucket: `Err(wait)` when empty.
    pub fn check(&self, principal: &str, rate: f64, burst: u32) -> Result<(), std::time::Duration> {
        let now = Instant::now();
        let burst = f64::from(burst.max(1));
        let mut map = self.buckets.locked();
        if map.len() >= Self::MAX_PRINCIPALS && !map.contains_key(principal) {
            map.clear();
        }
        let (tokens, last) = map.entry(principal.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((1.0 - *tokens) / rate.max(1e-9)))
        }
    }
}

/// Failed authentications per source address (IPv6 by /64). A source that keeps failing is
/// refused before its credentials are even read (429), so a flood of bad requests can neither
/// guess tokens quickly nor fill the audit log: each source's first failure in a window is
/// recorded in full (at most [`FailureGuard::FULL_PER_WINDOW`] a window over all sources),
/// and all the rest as one summary record per window.
pub struct FailureGuard {
    state: Mutex<Failures>,
    /// Failures a source may make per second, after its burst.
    pub rate: f64,
    pub burst: f64,
    /// How long one summary covers.
    pub window: std::time::Duration,
}

#[derive(Default)]
struct Failures {
    sources: HashMap<std::net::IpAddr, SourceFailures>,
    window_start: Option<Instant>,
    /// Failures recorded in full this window.
    full: u64,
    /// Failures and refusals this window not recorded in full.
    unreported: u64,
    /// Sources that failed this window.
    failing: u64,
}

struct SourceFailures {
    tokens: f64,
    last: Instant,
    /// This window's failures and refusals of the source.
    in_window: u64,
}

/// One window's failures that were not recorded in full.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureSummary {
    pub count: u64,
    pub sources: u64,
    /// The sources with the most, with their counts (at most 10).
    pub top: Vec<(std::net::IpAddr, u64)>,
    pub seconds: u64,
}

impl Default for FailureGuard {
    fn default() -> Self {
        FailureGuard {
            state: Mutex::new(Failures::default()),
            rate: 10.0,
            burst: 100.0,
            window: std::time::Duration::from_secs(60),
        }
    }
}

/// The key a source is counted under: its address, or its /64 for IPv6 (one host holds many).
fn source_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl FailureGuard {
    /// Sources tracked at most; past it the quietest are forgotten, and new ones only counted.
    const MAX_SOURCES: usize = 10_000;
    /// Failures recorded in full per window, over all sources.
    pub const FULL_PER_WINDOW: u64 = 100;

    fn refill(&self, f: &mut SourceFailures, now: Instant) {
        f.tokens = (f.tokens + now.duration_since(f.last).as_secs_f64() * self.rate).min(self.burst);
        f.last = now;
    }

    /// Before authenticating: `Err(wait)` while `source` has spent its failure budget (the
    /// refusal is counted for the summary).
    pub fn admit(&self, source: std::net::IpAddr) -> Result<(), std::time::Duration> {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(f) = st.sources.get_mut(&source_key(source)) else { return Ok(()) };
        self.refill(f, Instant::now());
        if f.tokens >= 1.0 {
            return Ok(());
        }
        f.in_window += 1;
        let wait = std::time::Duration::from_secs_f64((1.0 - f.tokens) / self.rate.max(1e-9));
        st.unreported += 1;
        Err(wait)
    }

    /// After a failed authentication from `source`: true when it is to be recorded in full
    /// (the source's first of the window, within the window's budget), false when counted.
    pub fn failed(&self, source: std::net::IpAddr) -> bool {
        let now = Instant::now();
        let key = source_key(source);
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.window_start.get_or_insert(now);
        if st.sources.len() >= Self::MAX_SOURCES && !st.sources.contains_key(&key) {
            let full = self.burst;
            st.sources.retain(|_, f| f.tokens < full || f.in_window > 0);
            if st.sources.len() >= Self::MAX_SOURCES {
                st.unreported += 1;
                return false;
            }
        }
        let burst = self.burst;
        let f = st.sources.entry(key).or_insert_with(|| SourceFailures { tokens: burst, last: now, in_window: 0 });
        self.refill(f, now);
        f.tokens = (f.tokens - 1.0).max(0.0);
        f.in_window += 1;
        let first = f.in_window == 1;
        if first {
            st.failing += 1;
        }
        if first && st.full < Self::FULL_PER_WINDOW {
            st.full += 1;
            return true;
        }
        st.unreported += 1;
        false
    }

    /// The summary of the window that has ended (or of the current one, at `shutdown`), when
    /// it holds failures not recorded in full; a new window starts.
    pub fn due(&self, shutdown: bool) -> Option<FailureSummary> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = st.window_start?;
        if now.duration_since(started) < self.window && !shutdown {
            return None;
        }
        let mut top: Vec<(std::net::IpAddr, u64)> =
            st.sources.iter().filter(|(_, f)| f.in_window > 0).map(|(ip, f)| (*ip, f.in_window)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(10);
        let summary = FailureSummary {
            count: st.unreported,
            sources: st.failing,
            top,
            seconds: now.duration_since(started).as_secs(),
        };
        let full = self.burst;
        st.sources.retain(|_, f| f.tokens < full);
        st.sources.values_mut().for_each(|f| f.in_window = 0);
        *st = Failures { sources: std::mem::take(&mut st.sources), ..Failures::default() };
        (summary.count > 0).then_some(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_source_is_refused_before_authentication_and_summarized() {
        let guard = FailureGuard { rate: 1e-6, burst: 3.0, window: std::time::Duration::ZERO, ..Default::default() };
        let bad: std::net::IpAddr = [127, 0, 0, 2].into();
        let good: std::net::IpAddr = [127, 0, 0, 1].into();
        assert!(guard.admit(bad).is_ok());
        assert!(guard.failed(bad), "the first failure is recorded in full");
        assert!(!guard.failed(bad));
        assert!(guard.admit(bad).is_ok());
        assert!(!guard.failed(bad));
        assert!(guard.admit(bad).is_err(), "the budget is spent");
        assert!(guard.admit(bad).is_err());
        assert!(guard.admit(good).is_ok(), "other sources are not affected");
        let s = guard.due(false).expect("a summary");
        assert_eq!((s.count, s.sources, s.top.clone()), (4, 1, vec![(bad, 5)]));
        assert_eq!(guard.due(false), None, "counted once");
        assert!(guard.admit(bad).is_err(), "still blocked in the next window");
    }

    #[test]
    fn many_sources_get_a_bounded_number_of_full_records_and_one_summary() {
        let guard = FailureGuard { window: std::time::Duration::ZERO, ..Default::default() };
        let mut full = 0;
        for i in 0..5_000u32 {
            let ip =
                std::net::IpAddr::V6((0x2001_0db8_0000_0000_0000_0000_0000_0000u128 | (u128::from(i) << 64)).into());
            full += u64::from(guard.failed(ip));
        }
        assert_eq!(full, FailureGuard::FULL_PER_WINDOW);
        let s = guard.due(true).expect("a summary");
        assert_eq!((s.count, s.sources), (5_000 - FailureGuard::FULL_PER_WINDOW, 5_000));
        assert!(s.top.len() <= 10);
        // One host's many IPv6 addresses count as one source.
        let a: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert!(guard.failed(a));
        assert!(!guard.failed(b), "the same /64");
    }

    fn cfg() -> AuthConfig {
        AuthConfig {
            tokens: vec![
                TokenEntry {
                    name: "pos".into(),
                    sha256: token_digest("s-pos"),
                    roles: vec![Role::Infer],
                    models: Some(vec!["mlp".into()]),
                },
                TokenEntry {
                    name: "ops".into(),
                    sha256: token_digest("s-ops"),
                    roles: vec![Role::Admin],
                    models: None,
                },
            ],
            clients: vec![ClientEntry { subject: "cam-1".into(), roles: vec![Role::Observe], models: None }],
            rate_limit: None,
            rate_burst: 1,
        }
    }

    #[test]
    fn tokens_and_certificates_authenticate() {
        let c = cfg();
        assert_eq!(authenticate(&c, Some(b"Bearer s-pos"), &[]).map(|p| p.name), Ok("token:pos".into()));
        assert!(matches!(authenticate(&c, Some(b"Bearer nope"), &[]), Err(Denial::Unauthenticated(_))));
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            let header = format!("{scheme} s-pos");
            assert_eq!(authenticate(&c, Some(header.as_bytes()), &[]).map(|p| p.name), Ok("token:pos".into()));
        }
        assert!(matches!(authenticate(&c, Some(b"Basic s-pos"), &[]), Err(Denial::Unauthenticated(_))));
        assert!(matches!(authenticate(&c, Some(b"Basic abc"), &[]), Err(Denial::Unauthenticated(_))));
        assert!(matches!(authenticate(&c, None, &[]), Err(Denial::Unauthenticated(_))));
        assert_eq!(authenticate(&c, None, &["cam-1".into()]).map(|p| p.name), Ok("cert:cam-1".into()));
        let stranger = authenticate(&c, None, &["other".into()]).expect("a verified certificate is a principal");
        assert!(stranger.roles.is_empty());
    }

    #[test]
    fn the_matrix_limits_models_and_roles() {
        let c = cfg();
        let pos = authenticate(&c, Some(b"Bearer s-pos"), &[]).expect("pos");
        assert!(allows(&pos, &required("POST", "/v2/models/mlp/infer")));
        assert!(!allows(&pos, &required("POST", "/v2/models/cnn/versions/1/infer")));
        assert!(!allows(&pos, &required("GET", "/metrics")));
        assert!(allows(&pos, &required("GET", "/v2/models/cnn")));
        let ops = authenticate(&c, Some(b"Bearer s-ops"), &[]).expect("ops");
        assert!(allows(&ops, &required("POST", "/admin/models/mlp/rollback")));
        assert_eq!(required("GET", "/v2/health/ready"), Permission::Public);
    }

    #[test]
    fn created_tokens_match_their_entry() {
        let (secret, entry) = create_token("pos", &[Role::Infer], Some(&["mlp".to_owned()])).expect("token");
        let hex: String = token_digest(&secret).iter().map(|b| format!("{b:02x}")).collect();
        assert!(entry.contains(&hex), "{entry}");
        assert!(entry.contains("models = [\"mlp\"]"), "{entry}");
    }

    #[test]
    fn the_rate_limit_refills() {
        let r = RateLimiter::default();
        assert!(r.check("a", 1.0, 2).is_ok());
        assert!(r.check("a", 1.0, 2).is_ok());
        let wait = r.check("a", 1.0, 2).expect_err("bucket empty");
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_secs(1));
        assert!(r.check("b", 1.0, 2).is_ok(), "buckets are per principal");
    }
}
