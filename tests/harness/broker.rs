//! A real Mosquitto broker per test, on a free loopback port, with a generated configuration
//! (plain, TLS with a generated CA, password file and ACL, persistence), and TLS material made
//! with the openssl command line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The mosquitto binary: `OUTPOST_MOSQUITTO`, else PATH, else /usr/sbin (Debian).
pub fn mosquitto_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("OUTPOST_MOSQUITTO") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/usr/local/sbin"]) {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("mosquitto not found: scripts/setup-test.sh installs it (apt-get install mosquitto)")
}

/// Files of a test PKI: a CA, a server certificate for 127.0.0.1/localhost, a client certificate,
/// and a client certificate from a different CA.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn generate() -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let run = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl").args(args).current_dir(d).output().context("openssl")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )?;
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (ca, cn) in [("ca", "Outpost Test CA"), ("other-ca", "Some Other CA")] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ])?;
        }
        let issue = |name: &str, cn: &str, ca: &str, ext: &str| -> Result<()> {
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ])?;
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.pem"),
            ])?;
            // PKCS#8 keys, which every TLS stack reads.
            run(&["pkcs8", "-topk8", "-nocrypt", "-in", &format!("{name}.key"), "-out", &format!("{name}.pk8.key")])
        };
        issue("server", "localhost", "ca", "server.ext")?;
        issue("client", "pos-terminal-1", "ca", "client.ext")?;
        issue("rogue", "pos-terminal-1", "other-ca", "client.ext")?;
        Ok(Pki { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[derive(Default)]
pub struct BrokerOptions<'a> {
    pub tls: Option<&'a Pki>,
    /// user → password; when set, anonymous clients are refused.
    pub users: Vec<(&'a str, &'a str)>,
    /// ACL file contents.
    pub acl: Option<&'a str>,
    pub persistence: bool,
}

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Broker {
    pub fn start(opts: BrokerOptions<'_>) -> Result<Broker> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut conf = format!(
            "per_listener_settings false\nuser root\nlistener {port} 127.0.0.1\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\nmax_queued_messages 100000\n"
        );
        if opts.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.path().display()
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        if let Some(pki) = opts.tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\ntls_version tlsv1.2\n",
                pki.path("ca.pem").display(),
                pki.path("server.pem").display(),
                pki.path("server.key").display()
            ));
        }
        if opts.users.is_empty() {
            conf.push_str("allow_anonymous true\n");
        } else {
            let pw = dir.path().join("passwords");
            std::fs::write(&pw, "")?;
            for (u, p) in &opts.users {
                let out = Command::new("mosquitto_passwd").arg("-b").arg(&pw).arg(u).arg(p).output()?;
                if !out.status.success() {
                    bail!("mosquitto_passwd: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
            conf.push_str(&format!("allow_anonymous false\npassword_file {}\n", pw.display()));
        }
        if let Some(acl) = opts.acl {
            let p = dir.path().join("acl");
            std::fs::write(&p, acl)?;
            conf.push_str(&format!("acl_file {}\n", p.display()));
        }
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf)?;
        let mut b = Broker { child: None, port, dir, conf: conf_path, log: Default::default() };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = Command::new(mosquitto_bin()?)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let rx = crate::stderr_lines(&mut child, Some(self.log.clone()))?;
        self.child = Some(child);
        // Ready when it says it runs (it opened its listener before that line).
        loop {
            match rx.recv_timeout(Duration::from_secs(15)) {
                Ok(line) if line.contains(" running") => return Ok(()),
                Ok(line) if line.contains("Error") => bail!("mosquitto: {line}"),
                Ok(_) => {}
                Err(_) => {
                    bail!("mosquitto did not start: {:?}", self.log.lock().map(|l| l.clone()).unwrap_or_default())
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM: it saves its persistent state) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            c.wait()?;
        }
        Ok(())
    }

    /// Stops and starts it again on the same port and state.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
