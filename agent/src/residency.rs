//! Data residency on every outbound path, checked at connect time.
//!
//! `privacy.residency_allow` lists host names (`registry.branch.example`, `*.corp.example`)
//! and address ranges (`10.20.0.0/16`, `127.0.0.1`, `fd00::/8`). An outbound connection
//! (registry, upstream and remote-write, overflow, webhooks, the MQTT broker) goes only to
//! an address the list allows:
//!
//! - a host named by address must lie in a listed range (checked when the configuration is
//!   read: such a destination is refused before anything starts);
//! - a host named by name must be listed (when names are listed at all), and each address it
//!   resolves to is checked against the ranges (when ranges are listed) at the moment of
//!   connecting: the addresses that fail are dropped, and with none left the connection is
//!   refused, naming the path. A name that starts resolving elsewhere is caught the next time
//!   it is used, not only at start.
//!
//! Every destination is recorded in the audit log (host, address, purpose) the first time it
//! is used and whenever its address changes; refusals are recorded the same way, raise the
//! `residency_refused` alarm and count in `outpost_residency_refused_total`.
//!
//! Each agent has one [`Guard`] (in its [`crate::privacy::Privacy`]); every outbound client
//! of that agent holds it and asks it at every connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

/// One outbound destination as recorded: used (`allowed`, at `address`) or refused
/// (`address` lists what the name resolved to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub purpose: String,
    pub host: String,
    pub address: String,
    pub allowed: bool,
}

/// Where a guard's findings go (the agent wires it to its metrics and audit log): every
/// refusal, and every destination used for the first time or at a new address; `new` says
/// the finding differs from the last one recorded for its path and host.
pub type Recorder = Arc<dyn Fn(&Outbound, bool) + Send + Sync>;

/// The allow-list: names and address ranges. Empty: no list configured, anything goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    names: Vec<String>,
    ranges: Vec<Range>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    base: IpAddr,
    prefix: u8,
}

impl Range {
    fn parse(s: &str) -> Option<Range> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let base: IpAddr = addr.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Range { base: canonical(base), prefix })
    }

    fn contains(&self, addr: IpAddr) -> bool {
        match (self.base, canonical(addr)) {
            (IpAddr::V4(b), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(b) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(b), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(b) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address carried in IPv6 (`::ffff:10.0.0.1`) is the IPv4 address: a range of
/// either form matches it.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// A host as written in a URL or setting (`[::1]` for an IPv6 address) as an address, if it
/// is one.
pub fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

impl AllowList {
    /// Parses the entries of `privacy.residency_allow`; an entry with a `/` or that reads as
    /// an address is a range, anything else a host name (`*.` for any name under a domain).
    pub fn parse(entries: &[String]) -> Result<AllowList, String> {
        let mut list = AllowList::default();
        for e in entries {
            let e = e.trim().to_ascii_lowercase();
            if e.contains('/') || literal(&e).is_some() {
                let range = Range::parse(&e).ok_or_else(|| {
                    format!("privacy.residency_allow: '{e}' is not an address range (10.0.0.0/8, fd00::/8, 127.0.0.1)")
                })?;
                list.ranges.push(range);
            } else {
                let name = e.strip_prefix("*.").unwrap_or(&e);
                let ok = !name.is_empty()
                    && name.len() <= 253
                    && name.split('.').all(|l| {
                        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    });
                if !ok {
                    return Err(format!(
                        "privacy.residency_allow: '{e}' is neither a host name (registry.example, *.example) nor an \
                         address range"
                    ));
                }
                list.names.push(e);
            }
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.ranges.is_empty()
    }

    fn name_listed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(domain) => host.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
            None => *n == host,
        })
    }

    /// The entries of this list that `outer` does not cover (a range inside one of its
    /// ranges, a name it lists, a `*.domain` under one of its `*.` domains).
    pub fn outside(&self, outer: &AllowList) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.ranges {
            if !outer.ranges.iter().any(|o| o.prefix <= r.prefix && o.contains(r.base)) {
                out.push(format!("{}/{}", r.base, r.prefix));
            }
        }
        for n in &self.names {
            let covered = match n.strip_prefix("*.") {
                Some(d) => outer
                    .names
                    .iter()
                    .filter_map(|o| o.strip_prefix("*."))
                    .any(|e| d == e || d.strip_suffix(e).is_some_and(|rest| rest.ends_with('.'))),
                None => outer.name_listed(n),
            };
            if !covered {
                out.push(n.clone());
            }
        }
        out
    }

    fn address_listed(&self, addr: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(addr))
    }

    /// Whether a configured destination host may be used at all (before any address is
    /// known): an address must lie in a range; a name must be listed when names are.
    pub fn host_allowed(&self, host: &str) -> bool {
        if self.is_empty() {
            return true;
        }
        match literal(host) {
            Some(addr) => self.address_listed(addr),
            None => self.names.is_empty() || self.name_listed(host),
        }
    }

    /// Whether connecting to `addr` for `host` is allowed.
    pub fn allows(&self, host: &str, addr: IpAddr) -> bool {
        if self.is_empty() {
            return true;
        }
        self.host_allowed(host) && (self.ranges.is_empty() || self.address_listed(addr))
    }
}

/// Why a destination was refused; its text names the path.
#[derive(Debug, Clone, thiserror::Error)]
#[error("residency: the {purpose} destination {host} ({addresses}) is outside privacy.residency_allow: not connected")]
pub struct Refused {
    pub purpose: String,
    pub host: String,
    pub addresses: String,
}

/// The outbound guard of one agent: the allow-list, names pinned to addresses
/// (`[privacy.hosts]`), and what has been recorded. Every outbound client holds it.
pub struct Guard {
    allow: AllowList,
    hosts: HashMap<String, Vec<IpAddr>>,
    /// Where findings go; set once the audit log exists. Findings made before wait here.
    recorder: OnceLock<Recorder>,
    early: Mutex<Vec<(Outbound, bool)>>,
    /// (purpose, host) → the last recorded outcome (`Some(address)` connected, `None` refused).
    seen: Mutex<HashMap<(String, String), Option<IpAddr>>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("allow", &self.allow).field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

impl Guard {
    pub fn new(allow: AllowList, hosts: HashMap<String, Vec<IpAddr>>) -> Guard {
        Guard {
            allow,
            hosts,
            recorder: OnceLock::new(),
            early: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Sends findings to `recorder` from now on, with those made before.
    pub fn set_recorder(&self, recorder: Recorder) {
        if self.recorder.set(recorder.clone()).is_err() {
            return;
        }
        let early = self.early.lock().map(|mut e| std::mem::take(&mut *e)).unwrap_or_default();
        for (finding, new) in early {
            recorder(&finding, new);
        }
    }

    /// The addresses of `host` this path may connect to, in resolution order; refused (and
    /// recorded) when there are none.
    pub async fn resolve(&self, purpose: &str, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let all: Vec<SocketAddr> = if let Some(addr) = literal(&host) {
            vec![SocketAddr::new(addr, port)]
        } else if let Some(pinned) = self.hosts.get(&host) {
            pinned.iter().map(|a| SocketAddr::new(*a, port)).collect()
        } else {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("{purpose}: {host}: name lookup failed: {e}"))?
                .collect()
        };
        let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| self.allow.allows(&host, a.ip())).collect();
        if allowed.is_empty() {
            let addresses = if all.is_empty() {
                "no address".to_owned()
            } else {
                all.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
            };
            let refused = Refused { purpose: purpose.to_owned(), host: host.clone(), addresses };
            self.refused(&refused);
            return Err(refused.to_string());
        }
        Ok(allowed)
    }

    fn refused(&self, r: &Refused) {
        tracing::error!(purpose = %r.purpose, host = %r.host, addresses = %r.addresses, "outbound connection refused: outside privacy.residency_allow");
        self.record(&r.purpose, &r.host, None, &r.addresses);
    }

    /// Records that `purpose` is connected to `host` at `addr` (audit, first time and on
    /// change).
    pub fn connected(&self, purpose: &str, host: &str, addr: SocketAddr) {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.record(purpose, &host, Some(addr.ip()), &addr.ip().to_string());
    }

    /// [`Guard::connected`] for an answer from `url`.
    pub fn answered(&self, purpose: &str, url: &str, resp: &reqwest::Response) {
        if let (Some(host), Some(addr)) = (url_host(url), resp.remote_addr()) {
            self.connected(purpose, &host, addr);
        }
    }

    fn record(&self, purpose: &str, host: &str, addr: Option<IpAddr>, addresses: &str) {
        let key = (purpose.to_owned(), host.to_owned());
        let new = {
            let Ok(mut seen) = self.seen.lock() else { return };
            let new = seen.get(&key) != Some(&addr);
            if new {
                if seen.len() >= 4096 {
                    seen.clear();
                }
                seen.insert(key, addr);
            }
            new
        };
        // A connection already recorded at this address is not news; a refusal always is
        // (it counts), though only a changed one is recorded again.
        if !new && addr.is_some() {
            return;
        }
        if new && addr.is_some() {
            tracing::info!(purpose, host, address = addresses, "outbound destination");
        }
        let finding = Outbound {
            purpose: purpose.to_owned(),
            host: host.to_owned(),
            address: addresses.to_owned(),
            allowed: addr.is_some(),
        };
        match self.recorder.get() {
            Some(recorder) => recorder(&finding, new),
            None => {
                if let Ok(mut early) = self.early.lock() {
                    if early.len() < 256 {
                        early.push((finding, new));
                    }
                }
            }
        }
    }
}

/// The host of an http(s) URL, as the HTTP client will read it: an address in any of the
/// forms URLs allow (`127.1`, `0x7f.0.0.1`, `2130706433`) comes back as the address it is
/// (`127.0.0.1`), so the residency check sees the address the client will connect to.
pub fn url_host(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// The addresses `purpose` may connect to for `host:port`: through `guard` when there is one,
/// else the system's resolver.
pub async fn resolve(guard: Option<&Guard>, purpose: &str, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    match guard {
        Some(g) => g.resolve(purpose, host, port).await,
        None => match literal(host) {
            Some(a) => Ok(vec![SocketAddr::new(a, port)]),
            None => Ok(tokio::net::lookup_host((host, port)).await.map_err(|e| e.to_string())?.collect()),
        },
    }
}

/// The resolver of an outbound reqwest client: every name it connects to passes the guard.
/// (A host written as an address never reaches a resolver: the configuration check refuses
/// one outside the list.)
pub struct Resolver {
    purpose: String,
    guard: Option<Arc<Guard>>,
}

impl Resolver {
    pub fn new(purpose: impl Into<String>, guard: Option<Arc<Guard>>) -> Arc<Resolver> {
        Arc::new(Resolver { purpose: purpose.into(), guard })
    }
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let purpose = self.purpose.clone();
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve(guard.as_deref(), &purpose, &host, 0).await.map_err(
                |e| -> Box<dyn std::error::Error + Send + Sync> {
                    Box::new(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))
                },
            )?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn ranges_and_names() {
        let l = list(&["127.0.0.1", "10.20.0.0/16", "fd00::/8", "registry.example", "*.corp.example"]);
        assert!(l.host_allowed("registry.example"));
        assert!(l.host_allowed("Hooks.Corp.Example."));
        assert!(!l.host_allowed("corp.example"));
        assert!(!l.host_allowed("evilcorp.example"));
        assert!(!l.host_allowed("other.example"));
        assert!(l.host_allowed("127.0.0.1"));
        assert!(!l.host_allowed("127.0.0.2"));
        assert!(l.host_allowed("[fd12::1]"));
        assert!(l.allows("registry.example", "10.20.3.4".parse().unwrap()));
        assert!(!l.allows("registry.example", "10.21.0.1".parse().unwrap()));
        // An IPv4 address carried in IPv6 is checked as the IPv4 address.
        assert!(l.allows("registry.example", "::ffff:10.20.0.9".parse().unwrap()));
        assert!(!l.allows("registry.example", "::ffff:10.30.0.9".parse().unwrap()));
        // Names only: any address of a listed name; addresses only: any name, its address checked.
        let names = list(&["registry.example"]);
        assert!(names.allows("registry.example", "192.0.2.1".parse().unwrap()));
        assert!(!names.host_allowed("192.0.2.1"));
        let ranges = list(&["127.0.0.1/32"]);
        assert!(ranges.allows("anything.example", "127.0.0.1".parse().unwrap()));
        assert!(!ranges.allows("anything.example", "127.0.0.2".parse().unwrap()));
        assert!(AllowList::default().allows("x", "192.0.2.1".parse().unwrap()));
        assert!(list(&["0.0.0.0/0"]).allows("x", "192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "a..b", "*.", "ex ample", "x/y"] {
            assert!(AllowList::parse(&[bad.to_owned()]).is_err(), "{bad} was taken");
        }
    }

    #[tokio::test]
    async fn a_name_resolving_outside_the_list_is_refused_and_the_rest_kept() {
        let hosts = HashMap::from([
            ("both.test".to_owned(), vec!["127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()]),
            ("outside.test".to_owned(), vec!["127.0.0.2".parse().unwrap()]),
        ]);
        let g = Guard::new(list(&["127.0.0.1/32"]), hosts);
        let got = g.resolve("registry", "both.test", 80).await.unwrap();
        assert_eq!(got, vec!["127.0.0.1:80".parse::<SocketAddr>().unwrap()]);
        let e = g.resolve("webhook hooks", "outside.test", 80).await.unwrap_err();
        assert!(e.contains("webhook hooks") && e.contains("127.0.0.2") && e.contains("residency"), "{e}");
    }
}
