//! Batch jobs: a file of requests run on the box, one row after another, with the CPU live
//! requests leave free. `POST /v2/jobs` (and `outpost batch submit`) stores the file; one
//! runner takes jobs in the order they came.
//!
//! Layout: `<state_dir>/jobs/<id>/` holds `job.json` (what and its state), `input` (as
//! uploaded), `output.ndjson` (one line per row, in row order) and `progress.json` (rows done
//! and the output's length at that point). Both files are synced before the progress that
//! names them is replaced, so after a kill -9 the output is cut back to the last progress and
//! the rows after it run again: every row is answered once, in order, in the output.
//!
//! Rows: NDJSON, each a V2 JSON inference request; or CSV, each line the numbers of the
//! model's one input (shape `[1, n]`). A row that fails gets its error in the output and the
//! job goes on. A row waits while live requests are in flight.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use crate::api::{InferenceService, RequestContext, Transport};
use crate::locks::RwLockExt;

/// Longest row (bytes); a longer one is that row's error.
pub const MAX_ROW_BYTES: usize = 16 << 20;
/// Rows between two syncs of the output and its progress.
const SYNC_EVERY: u64 = 100;
/// Jobs kept (finished ones beyond this are removed, oldest first).
const KEEP_JOBS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Ndjson,
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Done,
    Cancelled,
}

/// `job.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub model: String,
    #[serde(default)]
    pub version: Option<String>,
    pub format: Format,
    pub principal: String,
    pub input_sha256: String,
    pub input_bytes: u64,
    pub rows: u64,
    pub submitted_at: i64,
    pub state: State,
    #[serde(default)]
    pub finished_at: Option<i64>,
}

/// `progress.json`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Progress {
    rows_done: u64,
    failed: u64,
    input_offset: u64,
    output_len: u64,
}

/// The running job's figures for status.
#[derive(Debug, Clone, Default)]
struct Live {
    id: String,
    done: u64,
    failed: u64,
    started: Option<Instant>,
    done_at_start: u64,
}

pub struct Jobs {
    dir: PathBuf,
    wake: tokio::sync::Notify,
    live: RwLock<Live>,
    /// Set by a cancel of the running job.
    cancel_running: AtomicBool,
}

fn io(what: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", what.display())
}

impl Jobs {
    pub fn open(state_dir: &Path) -> Result<Jobs, String> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        // Uploads cut off by a crash or a kill: never submitted, nothing refers to them.
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(".upload-")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Jobs {
            dir,
            wake: tokio::sync::Notify::new(),
            live: RwLock::new(Live::default()),
            cancel_running: AtomicBool::new(false),
        })
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// A job by id (ids are ours: 16 hex digits).
    pub fn get(&self, id: &str) -> Option<Job> {
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes = std::fs::read(self.job_dir(id).join("job.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| self.get(e.file_name().to_str()?))
            .collect();
        jobs.sort_by(|a, b| (a.submitted_at, &a.id).cmp(&(b.submitted_at, &b.id)));
        jobs
    }

    fn save(&self, job: &Job) -> Result<(), String> {
        let path = self.job_dir(&job.id).join("job.json");
        let bytes = serde_json::to_vec_pretty(job).map_err(|e| e.to_string())?;
        crate::store::write_atomic(&path, &bytes).map_err(|e| io(&path, e))
    }

    fn progress(&self, id: &str) -> Progress {
        std::fs::read(self.job_dir(id).join("progress.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Stores an uploaded input (already written to `upload`, its digest, size and rows
    /// counted) as a new queued job.
    pub fn submit(
        &self,
        upload: Upload,
        model: &str,
        version: Option<String>,
        format: Format,
        principal: &str,
    ) -> Result<Job, String> {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let dir = self.job_dir(&id);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        std::fs::rename(&upload.path, dir.join("input")).map_err(|e| io(&dir, e))?;
        let job = Job {
            id,
            model: model.to_owned(),
            version,
            format,
            principal: principal.to_owned(),
            input_sha256: upload.sha256,
            input_bytes: upload.bytes,
            rows: upload.rows,
            submitted_at: crate::privacy::epochs::now_ms(),
            state: State::Queued,
            finished_at: None,
        };
        self.save(&job)?;
        self.prune();
        self.wake.notify_one();
        Ok(job)
    }

    /// Cancels a queued or running job; `Ok(false)` when it had already ended.
    pub fn cancel(&self, id: &str) -> Result<bool, String> {
        let Some(mut job) = self.get(id) else { return Err(format!("no job {id}")) };
        match job.state {
            State::Done | State::Cancelled => Ok(false),
            State::Running => {
                self.cancel_running.store(true, Ordering::SeqCst);
                Ok(true)
            }
            State::Queued => {
                job.state = State::Cancelled;
                job.finished_at = Some(crate::privacy::epochs::now_ms());
                self.save(&job)?;
                Ok(true)
            }
        }
    }

    /// The job's status: its fields, rows done and failed, rate and time left while it runs.
    pub fn status(&self, job: &Job) -> Value {
        let p = self.progress(&job.id);
        let live = self.live.read_locked().clone();
        let (done, failed) = if live.id == job.id { (live.done, live.failed) } else { (p.rows_done, p.failed) };
        let rate = live
            .started
            .filter(|_| live.id == job.id && job.state == State::Running)
            .map(|t| (done.saturating_sub(live.done_at_start)) as f64 / t.elapsed().as_secs_f64().max(1e-3));
        let eta = rate.filter(|r| *r > 0.0).map(|r| (job.rows.saturating_sub(done)) as f64 / r);
        json!({
            "id": job.id,
            "model": job.model,
            "version": job.version,
            "format": job.format,
            "state": job.state,
            "rows": job.rows,
            "done": done,
            "failed": failed,
            "rows_per_second": rate.map(|r| (r * 10.0).round() / 10.0),
            "eta_seconds": eta.map(|e| e.round()),
            "input_sha256": job.input_sha256,
            "submitted_at": outpost_proto::registry::format_time(job.submitted_at / 1000),
        })
    }

    /// The status of the jobs not yet ended (running first), for `/admin/status`.
    pub fn active(&self) -> Vec<Value> {
        let mut jobs: Vec<Job> =
            self.list().into_iter().filter(|j| matches!(j.state, State::Queued | State::Running)).collect();
        jobs.sort_by_key(|j| j.state != State::Running);
        jobs.iter().map(|j| self.status(j)).collect()
    }

    /// The output file of a job.
    pub fn output_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("output.ndjson")
    }

    /// How much of the output is kept: all of it once the job ended, else up to the last
    /// progress (rows past it may run again).
    pub fn output_len(&self, id: &str) -> u64 {
        let on_disk = std::fs::metadata(self.output_path(id)).map_or(0, |m| m.len());
        match self.get(id) {
            Some(j) if matches!(j.state, State::Done | State::Cancelled) => on_disk,
            _ => on_disk.min(self.progress(id).output_len),
        }
    }

    fn prune(&self) {
        let jobs = self.list();
        let finished: Vec<&Job> = jobs.iter().filter(|j| matches!(j.state, State::Done | State::Cancelled)).collect();
        for j in finished.iter().take(finished.len().saturating_sub(KEEP_JOBS)) {
            let _ = std::fs::remove_dir_all(self.job_dir(&j.id));
        }
    }

    /// Runs jobs until cancelled: the oldest unfinished one first (a job interrupted by a
    /// restart goes on where its progress says).
    pub async fn run(self: Arc<Self>, service: InferenceService, cancel: tokio_util::sync::CancellationToken) {
        loop {
            let next = self.list().into_iter().find(|j| matches!(j.state, State::Queued | State::Running));
            match next {
                Some(job) => {
                    let id = job.id.clone();
                    if let Err(e) = self.run_one(job, &service, &cancel).await {
                        tracing::error!(job = %id, error = %e, "batch job stopped; it goes on at the next start");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(30)) => {}
                        }
                    }
                    if cancel.is_cancelled() {
                        return;
                    }
                }
                None => tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.wake.notified() => {}
                },
            }
        }
    }

    async fn run_one(
        &self,
        mut job: Job,
        service: &InferenceService,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), String> {
        let dir = self.job_dir(&job.id);
        let mut p = self.progress(&job.id);
        if job.state == State::Queued {
            job.state = State::Running;
            self.save(&job)?;
            tracing::info!(job = %job.id, model = %job.model, rows = job.rows, "batch job started");
        } else {
            tracing::info!(job = %job.id, done = p.rows_done, "batch job resumed");
        }
        self.cancel_running.store(false, Ordering::SeqCst);
        *self.live.write_locked() = Live {
            id: job.id.clone(),
            done: p.rows_done,
            failed: p.failed,
            started: Some(Instant::now()),
            done_at_start: p.rows_done,
        };
        let input_path = dir.join("input");
        let mut input = std::fs::File::open(&input_path).map_err(|e| io(&input_path, e))?;
        input.seek(SeekFrom::Start(p.input_offset)).map_err(|e| io(&input_path, e))?;
        let mut input = BufReader::new(input);
        let out_path = dir.join("output.ndjson");
        let mut output = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&out_path)
            .map_err(|e| io(&out_path, e))?;
        // Rows past the last progress are dropped and run again.
        output.set_len(p.output_len).map_err(|e| io(&out_path, e))?;
        output.seek(SeekFrom::Start(p.output_len)).map_err(|e| io(&out_path, e))?;
        let mut output = std::io::BufWriter::new(output);
        let timeout = service.config.as_ref().map_or(Duration::from_secs(30), |c| c.read_locked().http.request_timeout);
        let mut line = Vec::new();
        let mut cancelled = false;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if self.cancel_running.swap(false, Ordering::SeqCst) {
                cancelled = true;
                break;
            }
            line.clear();
            let n = read_row(&mut input, &mut line).map_err(|e| io(&input_path, e))?;
            if n == 0 {
                break;
            }
            p.input_offset += n as u64;
            let text = trim_row(&line);
            if text.is_empty() {
                continue;
            }
            // Live requests first: a row starts only when none is in flight.
            while service.live_in_flight() > 0 && !cancel.is_cancelled() {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            let row = p.rows_done;
            let answer = self.answer(service, &job, text, n, timeout).await;
            let record = match answer {
                Ok(v) => json!({ "row": row, "answer": v }),
                Err(e) => {
                    p.failed += 1;
                    json!({ "row": row, "error": e })
                }
            };
            let mut bytes = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
            bytes.push(b'\n');
            output.write_all(&bytes).map_err(|e| io(&out_path, e))?;
            p.output_len += bytes.len() as u64;
            p.rows_done += 1;
            {
                let mut live = self.live.write_locked();
                live.done = p.rows_done;
                live.failed = p.failed;
            }
            if p.rows_done.is_multiple_of(SYNC_EVERY) {
                self.checkpoint(&job.id, &mut output, &p)?;
            }
            // Live requests' tasks run before the next row.
            tokio::task::yield_now().await;
        }
        self.checkpoint(&job.id, &mut output, &p)?;
        if cancel.is_cancelled() {
            return Ok(());
        }
        job.state = if cancelled { State::Cancelled } else { State::Done };
        job.finished_at = Some(crate::privacy::epochs::now_ms());
        self.save(&job)?;
        tracing::info!(job = %job.id, rows = p.rows_done, failed = p.failed, state = ?job.state, "batch job ended");
        let event = crate::api::Event::Admin {
            principal: job.principal.clone(),
            action: "batch_job".into(),
            target: format!("{} on {}", job.id, job.model),
            outcome: format!(
                "{}: {} rows, {} failed, input sha256 {}",
                if cancelled { "cancelled" } else { "done" },
                p.rows_done,
                p.failed,
                job.input_sha256
            ),
        };
        if let Err(e) = service.events.record(event).await {
            tracing::warn!(job = %job.id, error = %e, "could not record the batch job");
        }
        *self.live.write_locked() = Live::default();
        Ok(())
    }

    /// Syncs the output, then the progress that names its length.
    fn checkpoint(&self, id: &str, output: &mut std::io::BufWriter<std::fs::File>, p: &Progress) -> Result<(), String> {
        let out_path = self.output_path(id);
        output.flush().map_err(|e| io(&out_path, e))?;
        output.get_ref().sync_data().map_err(|e| io(&out_path, e))?;
        crate::failpoint::hit("jobs.checkpoint");
        let path = self.job_dir(id).join("progress.json");
        let bytes = serde_json::to_vec(p).map_err(|e| e.to_string())?;
        crate::store::write_atomic(&path, &bytes).map_err(|e| io(&path, e))
    }

    async fn answer(
        &self,
        service: &InferenceService,
        job: &Job,
        text: &[u8],
        raw_len: usize,
        timeout: Duration,
    ) -> Result<Value, String> {
        if raw_len > MAX_ROW_BYTES {
            return Err(format!("the row is {raw_len} bytes, over {MAX_ROW_BYTES}"));
        }
        let request = match job.format {
            Format::Ndjson => crate::protocol::json::parse_request(text).map_err(|e| e.to_string())?,
            Format::Csv => csv_request(service, &job.model, text)?,
        };
        let mut ctx = RequestContext::new(Transport::Batch, timeout);
        ctx.principal.clone_from(&job.principal);
        let resp = service.infer(&ctx, &job.model, job.version.as_deref(), request).await.map_err(|e| e.to_string())?;
        let (body, _) = crate::protocol::json::encode_response(&resp, |_| false);
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }
}

/// Reads one row (to `\n`), at most `MAX_ROW_BYTES + 1` bytes kept; returns the bytes the row
/// took in the file (0 at the end).
fn read_row(r: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if line.len() <= MAX_ROW_BYTES {
            line.extend_from_slice(&chunk[..n.min(MAX_ROW_BYTES + 1 - line.len().min(MAX_ROW_BYTES + 1))]);
        }
        r.consume(n);
        total += n;
        if end {
            return Ok(total);
        }
    }
}

fn trim_row(line: &[u8]) -> &[u8] {
    let end = line.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &line[..end]
}

/// A CSV row as the model's one input, shape `[1, n]`, FP32.
fn csv_request(service: &InferenceService, model: &str, text: &[u8]) -> Result<crate::protocol::InferRequest, String> {
    // What the model, package or pipeline takes: its inputs as callers see them.
    let inputs = match service.pipelines.get(model) {
        Some(p) => p.io(&service.repository).0,
        None => service.repository.serving(model, None).map_err(|e| e.to_string())?.io().0,
    };
    let [(name, datatype, _)] = inputs.as_slice() else {
        return Err(format!("CSV rows need a model with one input; '{model}' has {}", inputs.len()));
    };
    // A raw input (a package's, a pipeline's) takes the line itself: a row of named fields, a text.
    if *datatype == crate::protocol::DataType::Bytes {
        return service.raw_request(model, None, text.to_vec()).map_err(|e| e.to_string());
    }
    let text = std::str::from_utf8(text).map_err(|_| "the row is not UTF-8".to_owned())?;
    let values: Vec<f32> = text
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .map_err(|_| format!("'{}' is not a number", v.trim().chars().take(32).collect::<String>()))
        })
        .collect::<Result<_, _>>()?;
    let body = json!({ "inputs": [{ "name": name, "shape": [1, values.len()], "datatype": "FP32", "data": values }] });
    crate::protocol::json::parse_request(body.to_string().as_bytes()).map_err(|e| e.to_string())
}

/// An uploaded input, in a temporary file of the jobs directory.
pub struct Upload {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub rows: u64,
}

/// Receives an upload chunk by chunk: written to disk, hashed and its rows counted, at most
/// `max` bytes.
pub struct Uploading {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    hash: sha2::Sha256,
    bytes: u64,
    rows: u64,
    last: u8,
    max: u64,
}

impl Uploading {
    pub fn start(jobs: &Jobs, max: u64) -> Result<Uploading, String> {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
        let path = jobs.dir.join(format!(".upload-{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>()));
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        Ok(Uploading {
            file: std::io::BufWriter::new(file),
            path,
            hash: sha2::Sha256::new(),
            bytes: 0,
            rows: 0,
            last: b'\n',
            max,
        })
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.bytes += chunk.len() as u64;
        if self.bytes > self.max {
            return Err(format!("the input is over {} bytes (jobs.max_input_bytes)", self.max));
        }
        self.hash.update(chunk);
        self.rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        if let Some(&b) = chunk.last() {
            self.last = b;
        }
        self.file.write_all(chunk).map_err(|e| io(&self.path, e))
    }

    pub fn finish(mut self) -> Result<Upload, String> {
        self.file.flush().map_err(|e| io(&self.path, e))?;
        self.file.get_ref().sync_all().map_err(|e| io(&self.path, e))?;
        let rows = self.rows + u64::from(self.last != b'\n');
        let sha256 = outpost_proto::registry::hex::encode(&self.hash.clone().finalize()[..]);
        let path = std::mem::take(&mut self.path);
        Ok(Upload { path, sha256, bytes: self.bytes, rows })
    }
}

impl Drop for Uploading {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_cut_off_by_a_crash_is_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
        std::fs::write(dir.path().join("jobs/.upload-0011223344556677"), b"half a file").unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
        assert!(!dir.path().join("jobs/.upload-0011223344556677").exists());
        assert!(jobs.list().is_empty());
        // An upload over the limit is refused and leaves nothing behind.
        let mut up = Uploading::start(&jobs, 4).unwrap();
        assert!(up.push(b"12345").is_err());
        drop(up);
        assert_eq!(std::fs::read_dir(dir.path().join("jobs")).unwrap().count(), 0);
    }

    #[test]
    fn rows_are_read_whole_and_bounded() {
        let data = b"a,b\n\nlast";
        let mut r = BufReader::with_capacity(2, &data[..]);
        let mut line = Vec::new();
        assert_eq!(read_row(&mut r, &mut line).unwrap(), 4);
        assert_eq!(trim_row(&line), b"a,b");
        line.clear();
        assert_eq!(read_row(&mut r, &mut line).unwrap(), 1);
        assert!(trim_row(&line).is_empty());
        line.clear();
        assert_eq!(read_row(&mut r, &mut line).unwrap(), 4);
        assert_eq!(trim_row(&line), b"last");
        line.clear();
        assert_eq!(read_row(&mut r, &mut line).unwrap(), 0);
        let big = vec![b'x'; MAX_ROW_BYTES + 100];
        let mut r = BufReader::new(&big[..]);
        assert_eq!(read_row(&mut r, &mut line).unwrap(), big.len());
        assert_eq!(line.len(), MAX_ROW_BYTES + 1);
    }
}
