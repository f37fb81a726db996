//! A two-box site in network namespaces: boxes `a` and `b` and a `client` on a bridge that
//! lives in a fourth namespace (the switch), addresses from 198.18.0.0/24 only and no route
//! out. Each box runs an agent and keepalived (from the shipped recipe); the site address is
//! 198.18.0.100. Everything is made by [`Site::start`] and removed on drop. Needs root.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::{config_text, ChildAgent};

/// The site's virtual address.
pub const VIP: &str = "198.18.0.100";

/// Whether this process may make network namespaces (root).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| program.to_owned())?;
    ensure!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn keepalived_bin() -> Result<PathBuf> {
    for p in ["/usr/sbin/keepalived", "/sbin/keepalived", "/usr/bin/keepalived"] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("keepalived not found: scripts/setup-test.sh installs it (apt-get install keepalived)")
}

/// One box: its namespace, address, agent and keepalived.
pub struct SiteBox {
    pub ns: String,
    pub addr: String,
    pub config: PathBuf,
    pub state: tempfile::TempDir,
    pub agent: Option<ChildAgent>,
    keepalived: Option<Child>,
    keepalived_conf: PathBuf,
}

/// The site; see the module doc.
pub struct Site {
    pub sw: String,
    pub client: String,
    pub boxes: Vec<SiteBox>,
    bin: PathBuf,
    pub token: String,
    dir: tempfile::TempDir,
}

/// How the pair is set up.
pub struct SiteOptions {
    /// VRRP advertisement interval, seconds.
    pub advert_int: u32,
    /// `nopreempt`: the address stays where it is when the preferred box is healthy again.
    pub nopreempt: bool,
}

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions { advert_int: 1, nopreempt: false }
    }
}

impl Site {
    /// Makes the namespaces and starts both agents (serving `models`) and both keepalived
    /// instances; returns once box `a` holds the site address.
    pub fn start(bin: &Path, models: &Path, opts: &SiteOptions) -> Result<Site> {
        let prefix = format!("op{}x{}", std::process::id(), rand_suffix());
        let sw = format!("{prefix}-sw");
        let (token, entry) =
            outpost::auth::create_token("site", &[outpost::auth::Role::Admin], None).map_err(anyhow::Error::msg)?;
        let mut site = Site {
            sw: sw.clone(),
            client: format!("{prefix}-cl"),
            boxes: Vec::new(),
            bin: bin.to_owned(),
            token,
            dir: tempfile::tempdir()?,
        };
        run("ip", &["netns", "add", &sw])?;
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        site.plug(&site.client.clone(), "pc", "198.18.0.10")?;
        let recipe = std::fs::read_to_string(crate::root().join("packaging/keepalived/keepalived.conf"))?;
        for (name, last, priority) in [("a", 1, 150), ("b", 2, 100)] {
            let ns = format!("{prefix}-{name}");
            let addr = format!("198.18.0.{last}");
            site.plug(&ns, &format!("p{name}"), &addr)?;
            let state = tempfile::tempdir()?;
            let token_file = state.path().join("cli.token");
            std::fs::write(&token_file, format!("{}\n", site.token))?;
            let extra = format!(
                "[auth]\ntokens = [{entry}]\n\n[cli]\nurl = \"http://127.0.0.1:8080\"\ntoken_file = {:?}\n",
                token_file.display().to_string()
            );
            let text = config_text(state.path(), &[models.to_owned()], &extra)
                .replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:8080\"\nallow_plaintext = true");
            let config = state.path().join("outpost.toml");
            std::fs::write(&config, text)?;
            let mut conf = recipe
                .replace("/usr/bin/outpost", &bin.display().to_string())
                .replace("/etc/outpost/outpost.toml", &config.display().to_string())
                .replace("router_id outpost-a", &format!("router_id outpost-{name}"))
                .replace("priority 150", &format!("priority {priority}"))
                .replace("advert_int 1", &format!("advert_int {}", opts.advert_int))
                .replace("192.0.2.10/24", &format!("{VIP}/24"));
            if opts.nopreempt {
                conf = conf.replace("# nopreempt", "nopreempt");
            }
            let keepalived_conf = site.dir.path().join(format!("keepalived-{name}.conf"));
            std::fs::write(&keepalived_conf, conf)?;
            site.boxes.push(SiteBox { ns, addr, config, state, agent: None, keepalived: None, keepalived_conf });
        }
        for i in 0..2 {
            site.start_agent(i)?;
        }
        for i in 0..2 {
            site.start_keepalived(i)?;
        }
        site.wait_holder(0, Duration::from_secs(60))?;
        Ok(site)
    }

    /// A namespace `ns` with `eth0` at `addr`, cabled to the switch by `port`.
    fn plug(&self, ns: &str, port: &str, addr: &str) -> Result<()> {
        run("ip", &["netns", "add", ns])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        run("ip", &["-n", &self.sw, "link", "set", port, "master", "br0", "up"])?;
        run("ip", &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let b = &self.boxes[i];
        let bin = self.bin.display().to_string();
        let config = b.config.display().to_string();
        let mut agent =
            ChildAgent::spawn(Path::new("ip"), &["netns", "exec", &b.ns, &bin, "run", "--config", &config])?;
        agent.wait_for("initial model load finished", Duration::from_secs(120))?;
        self.boxes[i].agent = Some(agent);
        Ok(())
    }

    fn start_keepalived(&mut self, i: usize) -> Result<()> {
        let keepalived = keepalived_bin()?.display().to_string();
        let b = &self.boxes[i];
        let pid = |what: &str| self.dir.path().join(format!("{}-{what}.pid", b.ns)).display().to_string();
        let log = std::fs::File::create(self.dir.path().join(format!("keepalived-{i}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &b.ns, &keepalived, "--dont-fork", "--log-console", "--vrrp", "--use-file"])
            .arg(&b.keepalived_conf)
            .args(["--pid", &pid("main"), "--vrrp_pid", &pid("vrrp"), "--checkers_pid", &pid("checkers")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.boxes[i].keepalived = Some(child);
        Ok(())
    }

    /// keepalived's log for box `i`.
    pub fn keepalived_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("keepalived-{i}.log"))).unwrap_or_default()
    }

    /// Whether box `i` holds the site address.
    pub fn holds(&self, i: usize) -> bool {
        run("ip", &["-n", &self.boxes[i].ns, "-4", "addr", "show", "dev", "eth0"]).is_ok_and(|o| o.contains(VIP))
    }

    /// Waits until box `i` (and only it) holds the site address.
    pub fn wait_holder(&self, i: usize, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        while !self.holds(i) || self.holds(1 - i) {
            if Instant::now() > end {
                bail!(
                    "box {} does not hold {VIP} after {timeout:?}\nkeepalived a:\n{}\nkeepalived b:\n{}",
                    self.boxes[i].ns,
                    self.keepalived_log(0),
                    self.keepalived_log(1)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// kill -9 of box `i`'s agent.
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut a) = self.boxes[i].agent.take() {
            a.signal("KILL")?;
            let _ = a.wait_status(Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Cuts (or restores) box `i`'s cable at the switch.
    pub fn cable(&self, i: usize, up: bool) -> Result<()> {
        let port = format!("p{}", ["a", "b"][i]);
        run("ip", &["-n", &self.sw, "link", "set", &port, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Runs `outpost ARGS --config <box i>` inside box `i`'s namespace.
    pub fn outpost_in(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let b = &self.boxes[i];
        Ok(Command::new("ip")
            .args(["netns", "exec", &b.ns])
            .arg(&self.bin)
            .args(args)
            .arg("--config")
            .arg(&b.config)
            .output()?)
    }

    /// Starts a bounded load from the client namespace: one MLP request every `gap` to the
    /// site address, each with a short timeout, until `stop` exists, `max` requests, or
    /// `limit` elapsed. [`Load::finish`] returns each request's start time (ms) and outcome.
    pub fn load(&self, body: &serde_json::Value, gap: Duration, max: usize, limit: Duration) -> Result<Load> {
        self.client_load(body, gap, max, limit, Ending::Stopped)
    }

    /// Like [`Site::load`], ending by itself once `n` requests in a row were answered after
    /// one failed (requests resumed after a failover), or at its bounds.
    pub fn load_until_recovered(
        &self,
        body: &serde_json::Value,
        gap: Duration,
        n: usize,
        limit: Duration,
    ) -> Result<Load> {
        self.client_load(body, gap, 100_000, limit, Ending::Recovered(n))
    }

    fn client_load(
        &self,
        body: &serde_json::Value,
        gap: Duration,
        max: usize,
        limit: Duration,
        ending: Ending,
    ) -> Result<Load> {
        let stop = self.dir.path().join(format!("stop-{}", rand_suffix()));
        let script = format!(
            r#"
import json, sys, time, urllib.request, os
body = json.dumps(json.loads(sys.stdin.read())).encode()
out = []
failed = False
end = time.time() + {limit}
while len(out) < {max} and time.time() < end and not os.path.exists({stop:?}):
    t = time.time()
    req = urllib.request.Request("http://{VIP}:8080/v2/models/mlp/infer", data=body,
        headers={{"content-type": "application/json", "authorization": "Bearer {token}"}})
    try:
        with urllib.request.urlopen(req, timeout=0.5) as r:
            ok = r.status == 200
    except Exception:
        ok = False
    out.append((int(t * 1000), ok))
    if ok and os.environ.get("UNTIL_ANSWERED"):
        break
    recover = int(os.environ.get("RECOVER") or 0)
    if recover and not ok:
        failed = True
    if recover and failed and len(out) >= recover and all(r[1] for r in out[-recover:]):
        break
    left = {gap} - (time.time() - t)
    if left > 0:
        time.sleep(left)
print(json.dumps(out))
"#,
            limit = limit.as_secs_f64(),
            stop = stop.display().to_string(),
            gap = gap.as_secs_f64(),
            token = self.token,
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.client, "python3", "-c", &script])
            .env("UNTIL_ANSWERED", if ending == Ending::FirstAnswer { "1" } else { "" })
            .env("RECOVER", if let Ending::Recovered(n) = ending { n.to_string() } else { String::new() })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(body.to_string().as_bytes())?;
        }
        Ok(Load { child, stop, ending })
    }
}

impl Site {
    /// Sends requests from the client namespace to the site address until one is answered
    /// (bounded by `timeout`); returns whether one was.
    pub fn probe(&self, body: &serde_json::Value, timeout: Duration) -> Result<bool> {
        let load = self.client_load(body, Duration::from_millis(20), 100_000, timeout, Ending::FirstAnswer)?;
        Ok(load.finish()?.iter().any(|(_, ok)| *ok))
    }
}

/// A running client load.
pub struct Load {
    child: Child,
    stop: PathBuf,
    ending: Ending,
}

/// How a client load ends (besides its bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// When [`Load::finish`] asks.
    Stopped,
    /// At its first answer.
    FirstAnswer,
    /// After this many answers in a row following a failure.
    Recovered(usize),
}

impl Load {
    /// Stops the load and returns (start ms, answered) per request.
    pub fn finish(self) -> Result<Vec<(i64, bool)>> {
        if self.ending == Ending::Stopped {
            std::fs::write(&self.stop, b"")?;
        }
        let out = self.child.wait_with_output()?;
        ensure!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// What a failover cost the client: (ms from `from` to the first answer after the last
/// failure, failed requests). Zero and zero when nothing failed.
pub fn outage(results: &[(i64, bool)], from: i64) -> (i64, usize) {
    let after: Vec<&(i64, bool)> = results.iter().filter(|(t, _)| *t >= from).collect();
    let failed = after.iter().filter(|(_, ok)| !ok).count();
    let last_fail = after.iter().rposition(|(_, ok)| !ok);
    let resumed = match last_fail {
        None => return (0, 0),
        Some(i) => after.get(i + 1).map(|(t, _)| *t),
    };
    (resumed.map_or(i64::MAX, |t| t - from), failed)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn rand_suffix() -> String {
    let mut b = [0u8; 3];
    let _ = getrandom_fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Random bytes from the kernel (no extra dependency).
fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

impl Drop for Site {
    fn drop(&mut self) {
        for b in &mut self.boxes {
            if let Some(k) = b.keepalived.take() {
                stop_keepalived(k);
            }
            // The agent (a ChildAgent) is killed by its own drop.
            b.agent.take();
        }
        let names: Vec<String> =
            self.boxes.iter().map(|b| b.ns.clone()).chain([self.client.clone(), self.sw.clone()]).collect();
        for ns in names {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// Stops keepalived with SIGTERM (it stops its VRRP child and gives the address up), then
/// SIGKILL if it has not ended within 10 s.
fn stop_keepalived(mut k: Child) {
    let _ = Command::new("kill").args(["-TERM", &k.id().to_string()]).status();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(Some(_)) = k.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = k.kill();
    let _ = k.wait();
}
