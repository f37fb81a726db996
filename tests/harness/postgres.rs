//! A real PostgreSQL cluster per test: `initdb` into a temporary directory, `postgres` on a free
//! loopback port (and a socket in the same directory), a database `outpost` owned by the user
//! `outpost`. As root, the server runs as the `postgres` user (PostgreSQL refuses root).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// The directory of PostgreSQL's server programs: `OUTPOST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian), else PATH.
pub fn pg_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("OUTPOST_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").is_file())
        .collect();
    versions.sort();
    if let Some((_, p)) = versions.pop() {
        return Ok(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        if Path::new(dir).join("initdb").is_file() {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("PostgreSQL's initdb not found: scripts/setup-test.sh installs it (apt-get install postgresql)")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A command of PostgreSQL's, run as `postgres` when the tests run as root (`setpriv` replaces
/// itself with the program, so killing the child kills the server).
fn pg_command(bin: &Path, program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

pub struct Postgres {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts a fresh cluster and creates the database `outpost`.
    pub fn start() -> Result<Postgres> {
        let bin = pg_bin()?;
        let dir = tempfile::Builder::new().prefix("outpost-pg").tempdir()?;
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()).status()?.success();
            if !ok {
                bail!("chown postgres {}", dir.path().display());
            }
        }
        let data = dir.path().join("data");
        let out = pg_command(&bin, "initdb")
            .args(["-U", "outpost", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .context("initdb")?;
        if !out.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        // A free port: bound and released; a lost race fails the start below, named.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = pg_command(&bin, "postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
            .arg("-k")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("postgres")?;
        crate::wait_ready(&mut child, "ready to accept connections", "postgres")?;
        let out = Command::new(bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "outpost", "outpost"])
            .output()
            .context("createdb")?;
        if !out.status.success() {
            bail!("createdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Postgres { port, child, _dir: dir })
    }

    /// The connection string of the `outpost` database.
    pub fn dsn(&self) -> String {
        format!("host=127.0.0.1 port={} user=outpost dbname=outpost", self.port)
    }

    /// Runs one SQL statement with psql; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(pg_bin()?.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "outpost", "-d", "outpost"])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .context("psql")?;
        if !out.status.success() {
            bail!("psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
