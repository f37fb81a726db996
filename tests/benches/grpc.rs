//! gRPC against HTTP on one agent, and against KServe's Python server over gRPC, same model,
//! same load generator, same run. Closed loop: `c` clients each send the model's first golden
//! request and wait for the answer, for `--seconds` per point (bounded in count too). The
//! agent (an `outpost` process) is pinned to CPU 0 and this load generator to CPU 1 by
//! `scripts/bench-grpc.sh`, which reports the generator's own CPU use per point so it can be
//! seen not to be the bottleneck. gRPC: tonic's client on one HTTP/2 connection, as
//! `tritonclient.grpc` uses one; HTTP: V2 JSON through reqwest on keep-alive HTTP/1.1. And each
//! protocol through its lightest client, both built to one plan (`raw`; HTTP/1.1 with a
//! connection per client, gRPC with one connection shared by all, as each protocol's clients
//! use them): the pair that compares the servers' own work, since the client libraries differ by
//! more than the servers do at one client. `--library-clients` adds the `h2` crate's client and
//! bare hyper HTTP/1.1 (the libraries' lightest).
//!
//! The engine's own time comes from the statistics extension (`compute_infer` over
//! `execution_count`): a transport's overhead at one client is its mean latency minus it. The
//! agent's own CPU time per request (from /proc) is the server's cost whatever the client.
//!
//!     cargo bench -p outpost-tests --bench grpc -- [--seconds 5] [--models mlp,cnn]
//!         [--concurrency 1,8,64] [--rounds 3] [--kserve-python PY] [--only LABEL]
//!         [--library-clients] [--callgrind] [--trace]
//!
//! Every point runs `--rounds` times, the targets in a rotating order (KServe beside the
//! agent, in the same rotation), and the median round is reported with the range: this VM's
//! throughput drifts by tens of percent from minute to minute, more than the gaps measured. At
//! one client the raw pair's overheads are also compared round by round (the median of the
//! differences, and the rounds gRPC won), and then interleaved: blocks of 64 calls, one
//! transport then the other, each block charged its own engine time and agent CPU (see
//! `interleaved_overhead`), which resolves a gap of a microsecond where rounds cannot.
//! `--trace` also records the agent's syscalls meanwhile (`perf`, see `trace`): its own time
//! from a request's read to its answer's write, without the round trip's wake-ups.
//! `--callgrind` runs the agent under callgrind and reports, for each client, the agent's
//! instructions per request inside and outside the model run: a count the machine's drift does
//! not move. The engine's short-run bound is raised to match callgrind's slowness, so the counted
//! path is the one timed (an idle model's run inline).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outpost_proto::protocol::grpc as pb;
use outpost_tests::*;
use prost::Message as _;

#[path = "grpc/raw.rs"]
mod raw;
#[path = "grpc/trace.rs"]
mod trace;

/// Most requests one point sends (a bound beside the time).
const MAX_REQUESTS: usize = 2_000_000;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// This process's user and system CPU seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let f = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (f(11) + f(12)) / 100.0
}

#[derive(Clone)]
enum Target {
    Grpc {
        channel: tonic::transport::Channel,
        request: pb::ModelInferRequest,
    },
    /// The same calls through the `h2` crate's client directly: no request queue and no task
    /// per call on the generator's side, the lightest client there is for these figures. Like
    /// the bare HTTP/1.1 client it checks the status and reads the whole answer without
    /// decoding it (tonic's client, the row above, decodes).
    H2Crate {
        send: h2::client::SendRequest<bytes::Bytes>,
        framed: bytes::Bytes,
        uri: tonic::codegen::http::Uri,
    },
    /// The HTTP calls on bare hyper HTTP/1.1 connections (one per client, kept in a pool):
    /// the HTTP counterpart of the `h2` client, so both transports are measured with their
    /// lightest client.
    H1 {
        pool: Arc<std::sync::Mutex<Vec<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>>>,
        port: u16,
        uri: tonic::codegen::http::Uri,
        host: tonic::codegen::http::HeaderValue,
        body: bytes::Bytes,
    },
    Http {
        client: reqwest::Client,
        url: String,
        body: bytes::Bytes,
    },
    /// Each protocol's lightest client, both built to one plan (see `raw`): the HTTP call
    /// over HTTP/1.1, one connection per client, kept in a pool; gRPC on one shared HTTP/2
    /// connection, a stream per call, as gRPC clients (tonic's, tritonclient's) use HTTP/2.
    RawHttp {
        pool: Arc<std::sync::Mutex<Vec<raw::Http1>>>,
        port: u16,
        path: String,
        body: bytes::Bytes,
    },
    /// The raw gRPC client's plan: its connection is made for each point (see
    /// [`Target::for_clients`]), as [`raw::Mux`] drives it differently for one client.
    RawGrpc {
        port: u16,
        framed: bytes::Bytes,
    },
    RawGrpcConn(raw::Mux),
}

/// The rows of the two raw clients, whose overheads at one client are compared round by round.
const RAW_GRPC: &str = "Outpost gRPC (raw HTTP/2 client)";
const RAW_HTTP: &str = "Outpost HTTP (raw HTTP/1.1 client)";

/// Path of the V2 `ModelInfer` call.
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The raw gRPC client's calls to a server's `ModelInfer`, on one shared connection.
fn raw_grpc(port: u16, framed: &bytes::Bytes) -> Target {
    Target::RawGrpc { port, framed: framed.clone() }
}

/// A pooled connection still fit for a call, if any (one the server closed while idle is
/// dropped, as the library clients' pools do).
fn pooled<T>(pool: &std::sync::Mutex<Vec<T>>, reusable: impl Fn(&mut T) -> bool) -> Result<Option<T>> {
    let mut pool = pool.lock().map_err(|_| anyhow::anyhow!("pool poisoned"))?;
    Ok(std::iter::from_fn(|| pool.pop()).find_map(|mut c| reusable(&mut c).then_some(c)))
}

/// A connection whose call succeeded goes back to the pool (a failed one is dropped).
fn unpool<T>(pool: &std::sync::Mutex<Vec<T>>, conn: T) -> Result<()> {
    pool.lock().map_err(|_| anyhow::anyhow!("pool poisoned"))?.push(conn);
    Ok(())
}

impl Target {
    /// The target as `clients` clients use it: the raw gRPC client's connection made for them.
    async fn for_clients(&self, clients: usize) -> Result<Target> {
        match self {
            Target::RawGrpc { port, framed } => {
                Ok(Target::RawGrpcConn(raw::Mux::connect(*port, MODEL_INFER, framed.clone(), clients).await?))
            }
            other => Ok(other.clone()),
        }
    }

    async fn call(&self) -> Result<()> {
        match self {
            Target::Grpc { channel, request } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(MODEL_INFER);
                let codec = tonic_prost::ProstCodec::<pb::ModelInferRequest, pb::ModelInferResponse>::default();
                let resp = grpc.unary(tonic::Request::new(request.clone()), path, codec).await?;
                ensure!(!resp.get_ref().outputs.is_empty(), "no outputs");
            }
            Target::H2Crate { send, framed, uri } => {
                let req = tonic::codegen::http::Request::post(uri.clone())
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())?;
                let mut send = send.clone().ready().await?;
                let (answer, mut stream) = send.send_request(req, false)?;
                stream.send_data(framed.clone(), true)?;
                let mut body = answer.await?.into_body();
                // Chunks kept as they come (one, usually), as the HTTP/1.1 client's `collect`.
                let mut chunks = Vec::with_capacity(1);
                while let Some(chunk) = body.data().await {
                    let chunk = chunk?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    chunks.push(chunk);
                }
                let message = match chunks.len() {
                    1 => chunks.swap_remove(0),
                    _ => chunks.concat().into(),
                };
                let trailers = body.trailers().await?;
                let status = trailers.as_ref().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes().to_vec());
                ensure!(status.as_deref() == Some(b"0".as_slice()), "grpc-status {status:?}");
                let declared = message.get(1..5).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
                ensure!(declared.is_some_and(|n| n > 0 && message.len() == 5 + n), "not one whole message");
            }
            Target::H1 { pool, port, uri, host, body } => {
                use http_body_util::BodyExt as _;
                // A pooled connection the agent closed meanwhile (idle between rounds) is dropped.
                let mut send = match pooled(pool, |s| !s.is_closed())? {
                    Some(send) => send,
                    None => {
                        let stream = tokio::net::TcpStream::connect(("127.0.0.1", *port)).await?;
                        stream.set_nodelay(true)?;
                        let (send, conn) =
                            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
                        tokio::spawn(conn);
                        send
                    }
                };
                send.ready().await?;
                let req = tonic::codegen::http::Request::post(uri.clone())
                    .header("host", host.clone())
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(body.clone()))?;
                let resp = send.send_request(req).await?;
                ensure!(resp.status().is_success(), "HTTP {}", resp.status());
                resp.into_body().collect().await?;
                unpool(pool, send)?;
            }
            Target::Http { client, url, body } => {
                let r = client.post(url).body(body.clone()).send().await?;
                ensure!(r.status().is_success(), "HTTP {}", r.status());
                r.bytes().await?;
            }
            Target::RawGrpc { .. } => anyhow::bail!("the raw gRPC client is connected for a point first"),
            Target::RawGrpcConn(mux) => mux.call().await?,
            Target::RawHttp { pool, port, path, body } => {
                let mut conn = match pooled(pool, raw::Http1::reusable)? {
                    Some(c) => c,
                    None => raw::Http1::connect(*port, path, body).await?,
                };
                conn.call().await?;
                unpool(pool, conn)?;
            }
        }
        Ok(())
    }
}

struct Point {
    rps: f64,
    p50: f64,
    p99: f64,
    mean_ms: f64,
    errors: usize,
    client_cpu: f64,
    /// The engine's mean run over the point (Outpost only, from its statistics).
    engine_ms: Option<f64>,
    /// The point's length in seconds.
    wall: f64,
    /// The agent's CPU time per request, µs (Outpost only, from /proc).
    agent_us: Option<f64>,
}

/// A child process killed when dropped (KServe, whatever way the bench ends).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run_point(target: &Target, clients: usize, seconds: f64) -> Result<Point> {
    let target = &target.for_clients(clients).await?;
    // Warm up: connections open, plans cached.
    for _ in 0..20 {
        let _ = target.call().await;
    }
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(MAX_REQUESTS));
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (target, budget) = (target.clone(), budget.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                while Instant::now() < end
                    && budget
                        .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |b| {
                            b.checked_sub(1)
                        })
                        .is_ok()
                {
                    let t = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(10), target.call()).await {
                        Ok(Ok(())) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        Ok(Err(e)) => {
                            if errors == 0 {
                                eprintln!("a call failed: {e:#}");
                            }
                            errors += 1;
                        }
                        Err(_) => {
                            if errors == 0 {
                                eprintln!("a call got no answer in 10 s");
                            }
                            errors += 1;
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lat.extend(l);
            errors += e;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let client_cpu = (cpu_seconds() - cpu0) / wall;
    lat.sort_by(|a, b| a.total_cmp(b));
    let q =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Ok(Point {
        rps: lat.len() as f64 / wall,
        p50: q(0.5),
        p99: q(0.99),
        mean_ms: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
        errors,
        client_cpu,
        engine_ms: None,
        wall,
        agent_us: None,
    })
}

/// The raw gRPC row's overhead against the raw HTTP row's at one client, round by round: the
/// two run in the same round, seconds apart, so the machine's drift between rounds (larger than
/// the gap) falls on both. One line: the median difference, its range, and the rounds gRPC won.
fn paired_overhead(model: &str, targets: &[(&str, Target)], results: &[Vec<Point>]) -> Option<String> {
    let rounds = |label: &str| {
        let i = targets.iter().position(|(l, _)| *l == label)?;
        results[i].iter().map(|p| p.engine_ms.map(|e| (p.mean_ms - e) * 1e3)).collect::<Option<Vec<f64>>>()
    };
    let (grpc, http) = (rounds(RAW_GRPC)?, rounds(RAW_HTTP)?);
    let mut diff: Vec<f64> = grpc.iter().zip(&http).map(|(g, h)| g - h).collect();
    diff.sort_by(f64::total_cmp);
    let (first, last) = (diff.first()?, diff.last()?);
    let won = diff.iter().filter(|d| **d < 0.0).count();
    Some(format!(
        "{model}, 1 client: raw gRPC overhead minus raw HTTP overhead, paired by round: median {:+.1} µs (range {first:+.1} to {last:+.1}); gRPC lower in {won} of {} rounds",
        diff[diff.len() / 2],
        diff.len()
    ))
}

/// Calls in one block of [`interleaved_overhead`].
const BLOCK_CALLS: usize = 64;
/// Most block pairs [`interleaved_overhead`] runs (a bound beside the time).
const MAX_BLOCK_PAIRS: usize = 20_000;

/// The raw pair's overheads at one client, interleaved: blocks of [`BLOCK_CALLS`] calls, one
/// transport then the other (which goes first alternates), for `seconds`. Each block's overhead
/// is its mean latency minus the engine's mean run over that block (its statistics read before
/// and after it, outside the timing), so each transport is charged its own engine time. A
/// block pair lasts some milliseconds, far shorter than this VM's drift, which hits both
/// transports of a pair alike: the comparison the round-by-round pairing cannot resolve.
async fn interleaved_overhead(
    agent: u32,
    model: &str,
    targets: &[(&str, Target)],
    http: &reqwest::Client,
    base: &str,
    seconds: f64,
    traced: Option<(&Path, [u16; 2])>,
) -> Result<Vec<String>> {
    let find = |label: &str| targets.iter().find(|(l, _)| *l == label).map(|(_, t)| t);
    let (Some(grpc), Some(plain)) = (find(RAW_GRPC), find(RAW_HTTP)) else { return Ok(Vec::new()) };
    let pair = [grpc.for_clients(1).await?, plain.for_clients(1).await?];
    for t in &pair {
        for _ in 0..200 {
            t.call().await?;
        }
    }
    let recording = traced.map(|(dir, _)| trace::Trace::start(agent, dir)).transpose()?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    // Per transport: every block's overhead (µs per call); their sums of latency and engine time.
    let mut blocks: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut engines: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut agent_cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut client_cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut pairs = 0;
    // The statistics are cumulative: one block's reading after is the next one's before.
    let mut before = engine_time(http, base, model).await?;
    while Instant::now() < end && pairs < MAX_BLOCK_PAIRS {
        for k in 0..2 {
            let i = (k + pairs) % 2;
            let (a0, c0) = (schedstat_ns(Some(agent)), schedstat_ns(None));
            let started = Instant::now();
            for _ in 0..BLOCK_CALLS {
                pair[i].call().await?;
            }
            let latency = started.elapsed().as_secs_f64() * 1e6 / BLOCK_CALLS as f64;
            // A thread that ended meanwhile takes its time out of the sum: never below zero.
            agent_cpu[i].push(schedstat_ns(Some(agent)).saturating_sub(a0) as f64 / 1e3 / BLOCK_CALLS as f64);
            client_cpu[i].push(schedstat_ns(None).saturating_sub(c0) as f64 / 1e3 / BLOCK_CALLS as f64);
            let after = engine_time(http, base, model).await?;
            let runs = after.0.saturating_sub(before.0).max(1);
            let engine = after.1.saturating_sub(before.1) as f64 / runs as f64 / 1e3;
            blocks[i].push(latency - engine);
            engines[i].push(engine);
            before = after;
        }
        pairs += 1;
    }
    let residency = match (recording, traced) {
        (Some(recording), Some((_, ports))) => Some(recording.finish(agent, ports)?),
        _ => None,
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    // A quantile of sorted values.
    let at = |v: &[f64], f: f64| v.get(((v.len() as f64 - 1.0) * f).round() as usize).copied().unwrap_or(0.0);
    let diff = sorted(blocks[0].iter().zip(&blocks[1]).map(|(g, h)| g - h).collect());
    let won = diff.iter().filter(|d| **d < 0.0).count();
    let mut lines = vec![format!(
        "{model}, 1 client, interleaved ({pairs} block pairs of {BLOCK_CALLS} calls): overhead raw gRPC {:.1} µs, raw HTTP {:.1} µs (engine {:.1} µs, {:.1} µs; agent CPU {:.1} µs, {:.1} µs; generator CPU {:.1} µs, {:.1} µs); gRPC minus HTTP per pair: median {:+.1} µs (middle half {:+.1} to {:+.1}), gRPC lower in {won} of {pairs} pairs",
        mean(&blocks[0]),
        mean(&blocks[1]),
        mean(&engines[0]),
        mean(&engines[1]),
        mean(&agent_cpu[0]),
        mean(&agent_cpu[1]),
        mean(&client_cpu[0]),
        mean(&client_cpu[1]),
        at(&diff, 0.5),
        at(&diff, 0.25),
        at(&diff, 0.75),
    )];
    if let Some(r) = residency {
        let (g, h, d) = (sorted(r.all(0)), sorted(r.all(1)), sorted(r.paired_differences(BLOCK_CALLS / 2)));
        let (mg, mh) = (at(&g, 0.5), at(&h, 0.5));
        lines.push(format!(
            "{model}, 1 client, agent residency per request (its read of the request to its write of the answer, syscall tracepoints; {} and {} requests): median raw gRPC {mg:.1} µs, raw HTTP {mh:.1} µs (less mean engine time: {:.1} µs, {:.1} µs); gRPC minus HTTP per run pair (means): median {:+.1} µs (middle half {:+.1} to {:+.1}), gRPC lower in {} of {} pairs",
            g.len(),
            h.len(),
            mg - mean(&engines[0]),
            mh - mean(&engines[1]),
            at(&d, 0.5),
            at(&d, 0.25),
            at(&d, 0.75),
            d.iter().filter(|x| **x < 0.0).count(),
            d.len(),
        ));
    }
    Ok(lines)
}

/// (execution count, compute_infer ns) of a model on the agent, from the statistics extension.
async fn engine_time(http: &reqwest::Client, base: &str, model: &str) -> Result<(u64, u64)> {
    let r = http.get(format!("{base}/v2/models/{model}/stats")).send().await?;
    let status = r.status();
    let text = r.text().await?;
    ensure!(status.is_success(), "{model} statistics: HTTP {status}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{model} statistics: {text:?}"))?;
    let mut out = (0, 0);
    for s in v["model_stats"].as_array().into_iter().flatten() {
        out.0 += s["inference_stats"]["compute_infer"]["count"].as_u64().unwrap_or(0);
        out.1 += s["inference_stats"]["compute_infer"]["ns"].as_u64().unwrap_or(0);
    }
    Ok(out)
}

/// The agent, pinned to CPU 0; under callgrind (its profiles written to `callgrind`'s
/// directory, counting from the first `callgrind_control --zero`) when that is given.
fn spawn_agent(config: &Path, callgrind: Option<&Path>) -> Result<(ChildAgent, String)> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_outpost-under-test"));
    let taskset = Command::new("taskset").arg("-V").output().is_ok();
    let cfg = config.to_str().context("path")?;
    let bin = bin.to_str().context("path")?;
    let out_file = callgrind.map(|dir| format!("--callgrind-out-file={}/callgrind.%p", dir.display()));
    let mut args: Vec<&str> = Vec::new();
    if taskset {
        args.extend(["-c", "0"]);
    } else {
        eprintln!("taskset not found: the agent is not pinned");
    }
    if let Some(out_file) = &out_file {
        args.extend(["valgrind", "--tool=callgrind", out_file.as_str()]);
    }
    args.extend([bin, "run", "--config", cfg]);
    let (program, args) = if taskset { ("taskset", &args[..]) } else { (args[0], &args[1..]) };
    // Under callgrind a run is some fifty times slower: the engine's short-run bound is raised
    // to match, so it runs inline what it runs inline at full speed (an idle model's request).
    let mut env = vec![("RUST_LOG", "warn,outpost=info")];
    if callgrind.is_some() {
        env.push(("OUTPOST_SHORT_RUN_US", "100000"));
    }
    let mut child = ChildAgent::spawn_env(Path::new(program), args, &env)?;
    let addr = child.wait_listening()?;
    // Under callgrind the models' load and optimisation run some fifty times slower.
    let load = if callgrind.is_some() { 900 } else { 120 };
    child.wait_for("initial model load finished", Duration::from_secs(load))?;
    Ok((child, addr))
}

/// Calls each client makes under callgrind, once warm: enough that the agent's per-call work
/// dwarfs what a timer or a housekeeping task adds (each point takes some seconds).
const COUNTED_CALLS: usize = 2000;

/// The agent's instructions per request (callgrind, user space), each client in turn at one
/// client: unlike time, a count that does not drift with the machine's load, so the transports'
/// own costs show apart from the noise. Under callgrind every run is long, so the engine queues
/// each request rather than running it inline; that path is the same for every transport.
async fn count_instructions(pid: u32, dir: &Path, targets: &[(&str, Target)]) -> Result<Vec<(String, f64, f64)>> {
    let mut counted = Vec::new();
    for (label, target) in targets {
        let target = target.for_clients(1).await?;
        for _ in 0..100 {
            target.call().await?;
        }
        callgrind_control(pid, "--zero")?;
        let end = Instant::now() + Duration::from_secs(600);
        let mut calls = 0;
        while calls < COUNTED_CALLS && Instant::now() < end {
            target.call().await?;
            calls += 1;
        }
        let before = dumps(dir)?;
        callgrind_control(pid, "--dump")?;
        let dump = dumps(dir)?.into_iter().find(|d| !before.contains(d)).context("callgrind wrote no profile")?;
        let text = std::fs::read_to_string(&dump)?;
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
            .and_then(|v| v.trim().parse().ok())
            .context("a callgrind profile without totals")?;
        let model = model_run_instructions(&dump)?;
        counted.push(((*label).to_owned(), total / calls as f64, (total - model) / calls as f64));
    }
    Ok(counted)
}

/// The instructions spent inside the engine's model runs (`LoadedModel::run_on`, inclusive),
/// from `callgrind_annotate`.
fn model_run_instructions(dump: &Path) -> Result<f64> {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--tree=none", "--auto=no", "--threshold=100"])
        .arg(dump)
        .stderr(Stdio::null())
        .output()?;
    ensure!(out.status.success(), "callgrind_annotate failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("engine::model::LoadedModel::run_on"))
        .filter_map(|l| l.split_whitespace().next()?.replace(',', "").parse::<f64>().ok())
        .reduce(f64::max)
        .context("no model run in the callgrind profile")
}

fn callgrind_control(pid: u32, what: &str) -> Result<()> {
    let status = Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(status.success(), "callgrind_control {what} failed: {status}");
    Ok(())
}

/// The callgrind profiles written so far.
fn dumps(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?.filter_map(|e| Some(e.ok()?.path())).collect())
}

/// KServe's Python server with the model's ONNX file, gRPC on `port`, pinned to CPU 0.
fn spawn_kserve(python: &str, model: &str, port: u16) -> Result<Child> {
    let dir = root().join("models").join(model);
    let http_port = free_port()?;
    let child = Command::new("taskset")
        .args(["-c", "0", python])
        .arg(root().join("scripts/kserve-onnx.py"))
        .args(["--model-dir"])
        .arg(&dir)
        .args(["--name", model, "--http-port", &http_port.to_string(), "--grpc-port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(child)
}

/// The `ModelInfer` method's URI on a gRPC port on loopback.
fn grpc_uri(port: u16) -> Result<tonic::codegen::http::Uri> {
    Ok(format!("http://127.0.0.1:{port}{MODEL_INFER}").parse()?)
}

/// A bare HTTP/2 connection (no gRPC client library) to a gRPC port on loopback.
async fn h2_crate(port: u16) -> Result<h2::client::SendRequest<bytes::Bytes>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = h2::client::handshake(stream).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// A process's CPU time in ns over all its threads (this process's for `None`), from the
/// scheduler's per-thread accounting: finer than /proc's clock ticks.
fn schedstat_ns(pid: Option<u32>) -> u64 {
    let dir = pid.map_or_else(|| "/proc/self/task".to_owned(), |p| format!("/proc/{p}/task"));
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A process's user and system CPU seconds.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let f = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (f(11) + f(12)) / 100.0
}

fn grpc_request(model: &str) -> Result<pb::ModelInferRequest> {
    let golden = golden_for(&root().join("models").join(model))?;
    let body = serde_json::to_vec(&golden.request(0))?;
    let req = outpost_proto::protocol::json::parse_request(&body)?;
    let mut g = pb::ModelInferRequest { model_name: model.to_owned(), ..Default::default() };
    for t in &req.inputs {
        g.inputs.push(pb::InferInputTensor {
            name: t.name.clone(),
            datatype: t.datatype().as_str().to_owned(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        });
        g.raw_input_contents.push(t.data.to_le_bytes());
    }
    Ok(g)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = arg(&args, "--seconds").and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let models = arg(&args, "--models").unwrap_or_else(|| "mlp,cnn".into());
    let conc: Vec<usize> = arg(&args, "--concurrency")
        .unwrap_or_else(|| "1,8,64".into())
        .split(',')
        .filter_map(|c| c.parse().ok())
        .collect();
    let kserve = arg(&args, "--kserve-python");
    // Only the servers whose label holds this (e.g. "bare", "HTTP"): for profiling one at a time.
    let only = arg(&args, "--only");
    // The `h2` crate's and bare hyper's clients too (the libraries' lightest), beside the raw pair.
    let library_clients = args.iter().any(|a| a == "--library-clients");
    // Rounds per point; the median round is reported, with the range over rounds.
    let rounds: usize = arg(&args, "--rounds").and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    // The agent under callgrind: instructions per request for each client, instead of timings.
    let callgrind = args.iter().any(|a| a == "--callgrind");
    // The agent's syscalls traced during the interleaved comparison (`trace`): its own time
    // from a request's read to its answer's write.
    let traced = args.iter().any(|a| a == "--trace");
    outpost::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let state = tempfile::tempdir()?;
        let grpc_port = free_port()?;
        let mut extra = format!("[audit]\nenabled = false\n\n[grpc]\nlisten = \"127.0.0.1:{grpc_port}\"\n\n");
        for m in models.split(',') {
            extra.push_str(&format!("[models.{m}]\nmax_batch = 8\nmax_queue_delay = \"0s\"\nmax_queue = 1024\n\n"));
        }
        let config = state.path().join("outpost.toml");
        std::fs::write(&config, config_text(state.path(), &[root().join("models")], &extra))?;
        let profiles = state.path().join("callgrind");
        std::fs::create_dir_all(&profiles)?;
        let (mut agent, addr) = spawn_agent(&config, callgrind.then_some(profiles.as_path()))?;
        let base = format!("http://{addr}");
        let http = reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true).build()?;
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))?.tcp_nodelay(true).connect().await?;
        // Opened only when asked for: an idle connection is still one the agent holds.
        let h2c = if library_clients { Some(h2_crate(grpc_port).await?) } else { None };
        let agent_pid = agent.child.id();
        let http_port: u16 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).context("the agent's HTTP port")?;
        if callgrind {
            println!("| model | client | agent instructions per request | in the model run | outside it |");
            println!("|---|---|---|---|---|");
        } else {
            println!("| model | clients | server | req/s | req/s range | p50 ms | p99 ms | mean ms | engine ms | overhead ms | agent CPU µs/req | errors | generator CPU |");
            println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        }
        let mut counted = Vec::new();
        let mut paired = Vec::new();
        for model in models.split(',') {
            let request = grpc_request(model)?;
            let body = serde_json::to_vec(&golden_for(&root().join("models").join(model))?.request(0))?;
            let mut framed = vec![0u8];
            framed.extend_from_slice(&(request.encoded_len() as u32).to_be_bytes());
            framed.extend_from_slice(&request.encode_to_vec());
            let framed = bytes::Bytes::from(framed);
            let mut targets = vec![
                ("Outpost gRPC (tonic client)", Target::Grpc { channel: channel.clone(), request: request.clone() }),
                (RAW_GRPC, raw_grpc(grpc_port, &framed)),
                (RAW_HTTP, Target::RawHttp { pool: Default::default(), port: http_port, path: format!("/v2/models/{model}/infer"), body: body.clone().into() }),
                ("Outpost HTTP", Target::Http { client: http.clone(), url: format!("{base}/v2/models/{model}/infer"), body: body.clone().into() }),
            ];
            if let Some(h2c) = &h2c {
                targets.push(("Outpost gRPC (h2 client)", Target::H2Crate { send: h2c.clone(), framed: framed.clone(), uri: grpc_uri(grpc_port)? }));
                targets.push(("Outpost HTTP (bare HTTP/1.1)", Target::H1 { pool: Default::default(), port: http_port, uri: format!("/v2/models/{model}/infer").parse()?, host: format!("127.0.0.1:{http_port}").parse()?, body: body.clone().into() }));
            }
            if callgrind {
                targets.retain(|(l, _)| only.as_deref().is_none_or(|o| l.contains(o)));
                let rows = count_instructions(agent_pid, &profiles, &targets).await?;
                for (label, all, outside) in &rows {
                    println!("| {model} | {label} | {all:.0} | {:.0} | {outside:.0} |", all - outside);
                }
                let of = |l: &str| rows.iter().find(|(label, _, _)| label == l).map(|r| r.2);
                if let (Some(g), Some(h)) = (of(RAW_GRPC), of(RAW_HTTP)) {
                    counted.push(format!(
                        "{model}: raw gRPC minus raw HTTP, agent instructions per request outside the model run: {:+.0} ({:+.1} %)",
                        g - h,
                        (g - h) / h * 100.0
                    ));
                }
                continue;
            }
            // KServe runs beside the agent (both pinned to CPU 0, the idle one asleep), so its
            // rounds interleave with Outpost's and the machine's drift hits both alike.
            let mut kserve_child = None;
            if let Some(python) = &kserve {
                let port = free_port()?;
                kserve_child = Some(KillOnDrop(spawn_kserve(python, model, port)?));
                let kchannel = {
                    let end = Instant::now() + Duration::from_secs(120);
                    loop {
                        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?.tcp_nodelay(true).connect().await;
                        if let Ok(ch) = ch {
                            let t = Target::Grpc { channel: ch.clone(), request: request.clone() };
                            if t.call().await.is_ok() {
                                break ch;
                            }
                        }
                        ensure!(Instant::now() < end, "KServe did not answer over gRPC within 120 s");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                };
                // The same load generator as Outpost's raw gRPC row.
                drop(kchannel);
                targets.push(("KServe gRPC (raw HTTP/2 client)", raw_grpc(port, &framed)));
            }
            targets.retain(|(l, _)| only.as_deref().is_none_or(|o| l.contains(o)));
            for &c in &conc {
                let mut results: Vec<Vec<Point>> = targets.iter().map(|_| Vec::new()).collect();
                for round in 0..rounds {
                    // Each round starts with a different target.
                    for k in 0..targets.len() {
                        let i = (k + round) % targets.len();
                        let (label, target) = &targets[i];
                        let outpost = label.starts_with("Outpost");
                        let before = if outpost { Some(engine_time(&http, &base, model).await?) } else { None };
                        let cpu0 = process_cpu_seconds(agent_pid);
                        let mut p = run_point(target, c, seconds).await?;
                        if outpost {
                            let requests = (p.rps * p.wall).max(1.0);
                            p.agent_us = Some((process_cpu_seconds(agent_pid) - cpu0) / requests * 1e6);
                        }
                        if let Some(before) = before {
                            let after = engine_time(&http, &base, model).await?;
                            let runs = after.0.saturating_sub(before.0).max(1);
                            p.engine_ms = Some(after.1.saturating_sub(before.1) as f64 / runs as f64 / 1e6);
                        }
                        results[i].push(p);
                    }
                }
                if c == 1 {
                    paired.extend(paired_overhead(model, &targets, &results));
                    paired.extend(interleaved_overhead(agent_pid, model, &targets, &http, &base, seconds * rounds as f64, traced.then_some((state.path(), [grpc_port, http_port]))).await?);
                }
                for ((label, _), mut points) in targets.iter().zip(results) {
                    points.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                    let (low, high) = (points[0].rps, points[points.len() - 1].rps);
                    let p = &points[points.len() / 2];
                    let (engine, overhead) = match p.engine_ms {
                        Some(e) => (format!("{e:.3}"), format!("{:.3}", p.mean_ms - e)),
                        None => ("-".into(), "-".into()),
                    };
                    let agent_us = p.agent_us.map_or_else(|| "-".into(), |u| format!("{u:.0}"));
                    println!(
                        "| {model} | {c} | {label} | {:.0} | {low:.0}–{high:.0} | {:.2} | {:.2} | {:.3} | {engine} | {overhead} | {agent_us} | {} | {:.0} % |",
                        p.rps, p.p50, p.p99, p.mean_ms, p.errors, p.client_cpu * 100.0
                    );
                }
            }
            drop(kserve_child);
        }
        for line in paired.iter().chain(&counted) {
            println!("{line}");
        }
        agent.signal("TERM")?;
        agent.wait_exit(Duration::from_secs(30))?;
        Ok(())
    })
}
