//! The agent's own time per request, from the kernel's syscall tracepoints (`perf record`):
//! from the read that brought a request in to the write that sends its answer. Unlike the
//! client's latency, this leaves out loopback TCP and the two wake-ups of a round trip (on this
//! VM most of a round trip at one client, and most of its noise), so it shows the server's own
//! work before the answer leaves, transport against transport. Each connection's requests are
//! told apart by the agent's socket (its listener's port); runs of one connection's requests
//! are the interleaved blocks, paired in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{ensure, Context as _, Result};

/// A `perf record` of the agent's reads and writes, running.
pub(crate) struct Trace {
    perf: Child,
    file: PathBuf,
}

impl Trace {
    /// Starts recording the agent's syscalls into `dir`.
    pub(crate) fn start(agent: u32, dir: &Path) -> Result<Self> {
        let file = dir.join("syscalls.perf");
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-q", "-k", "CLOCK_MONOTONIC"]);
        for event in ["sys_enter_recvfrom", "sys_exit_recvfrom", "sys_enter_writev", "sys_enter_write"] {
            cmd.args(["-e", &format!("syscalls:{event}")]);
        }
        let perf = cmd
            .args(["-p", &agent.to_string(), "-o"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("perf record (is perf installed, and are tracepoints readable?)")?;
        Ok(Self { perf, file })
    }

    /// Stops recording; the agent's residency per request on the busiest connection of each
    /// listener (`ports`, in order), as runs of consecutive requests on one connection.
    pub(crate) fn finish(mut self, agent: u32, ports: [u16; 2]) -> Result<Residency> {
        let sockets = [sockets_on(agent, ports[0])?, sockets_on(agent, ports[1])?];
        let stopped = Command::new("kill").args(["-INT", &self.perf.id().to_string()]).status()?;
        ensure!(stopped.success(), "could not stop perf record");
        self.perf.wait()?;
        let out = Command::new("perf")
            .args(["script", "-F", "tid,time,event,trace", "--ns", "-i"])
            .arg(&self.file)
            .stderr(Stdio::null())
            .output()?;
        ensure!(out.status.success(), "perf script failed: {}", out.status);
        let requests = requests(&String::from_utf8_lossy(&out.stdout));
        // The busiest socket of each listener is its client's (the statistics calls between
        // blocks use a connection of their own).
        let busiest = |fds: &[u32]| {
            fds.iter().copied().max_by_key(|fd| requests.iter().filter(|r| r.fd == *fd).count()).unwrap_or(u32::MAX)
        };
        let picked = [busiest(&sockets[0]), busiest(&sockets[1])];
        let mut runs: Vec<(usize, Vec<f64>)> = Vec::new();
        for r in requests {
            let Some(i) = picked.iter().position(|fd| *fd == r.fd) else { continue };
            match runs.last_mut() {
                Some((j, run)) if *j == i => run.push(r.micros),
                _ => runs.push((i, vec![r.micros])),
            }
        }
        Ok(Residency { runs })
    }
}

/// A bench that fails between start and finish leaves no perf running.
impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.perf.kill();
        let _ = self.perf.wait();
    }
}

/// Requests of each connection in the order they came, by runs.
pub(crate) struct Residency {
    runs: Vec<(usize, Vec<f64>)>,
}

impl Residency {
    /// Every request's residency (µs) on connection `i`.
    pub(crate) fn all(&self, i: usize) -> Vec<f64> {
        self.runs.iter().filter(|(j, _)| *j == i).flat_map(|(_, r)| r.iter().copied()).collect()
    }

    /// Mean residency of each run of connection 0 minus that of the run of connection 1 next
    /// to it, each run paired once (runs shorter than `min_run`, cut by the trace's start or
    /// end, left out). The bench alternates which transport goes first, so a run is one block
    /// or two.
    pub(crate) fn paired_differences(&self, min_run: usize) -> Vec<f64> {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let whole: Vec<&(usize, Vec<f64>)> = self.runs.iter().filter(|(_, r)| r.len() >= min_run).collect();
        let mut out = Vec::new();
        let mut k = 0;
        while k + 1 < whole.len() {
            let (x, y) = (whole[k], whole[k + 1]);
            if x.0 == y.0 {
                k += 1;
                continue;
            }
            let (g, h) = if x.0 == 0 { (x, y) } else { (y, x) };
            out.push(mean(&g.1) - mean(&h.1));
            k += 2;
        }
        out
    }
}

/// One request as the agent saw it: its connection's socket, and µs from the read that brought
/// it to the write of its answer.
struct Request {
    fd: u32,
    micros: f64,
}

/// Requests from `perf script` lines (`tid time: event: fields`): per thread, a read of data
/// on a socket opens a request there, the next write on that socket closes it.
fn requests(script: &str) -> Vec<Request> {
    let mut reading: HashMap<u32, u32> = HashMap::new();
    let mut open: HashMap<u32, f64> = HashMap::new();
    let mut out = Vec::new();
    for line in script.lines() {
        let mut words = line.split_whitespace();
        let (Some(tid), Some(time), Some(event)) = (words.next(), words.next(), words.next()) else { continue };
        let (Ok(tid), Ok(time)) = (tid.parse::<u32>(), time.trim_end_matches(':').parse::<f64>()) else { continue };
        let rest: Vec<&str> = words.collect();
        let fd = || {
            let i = rest.iter().position(|w| *w == "fd:")?;
            u32::from_str_radix(rest.get(i + 1)?.trim_end_matches(',').trim_start_matches("0x"), 16).ok()
        };
        match event.trim_end_matches(':').rsplit(':').next() {
            Some("sys_enter_recvfrom") => {
                if let Some(fd) = fd() {
                    reading.insert(tid, fd);
                }
            }
            Some("sys_exit_recvfrom") => {
                let got = rest.first().and_then(|v| i64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
                if let (Some(fd), Some(1..)) = (reading.remove(&tid), got) {
                    open.entry(fd).or_insert(time);
                }
            }
            Some("sys_enter_writev" | "sys_enter_write") => {
                if let Some(fd) = fd() {
                    if let Some(start) = open.remove(&fd) {
                        out.push(Request { fd, micros: (time - start) * 1e6 });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The agent's sockets (fds) of connections accepted on `port`.
fn sockets_on(agent: u32, port: u16) -> Result<Vec<u32>> {
    let mut inodes = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{agent}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            // 01: ESTABLISHED (a listener is 0A).
            if local_port == Some(port) && f.get(3) == Some(&"01") {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{agent}/fd"))?.flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
            fds.extend(entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()));
        }
    }
    Ok(fds)
}
