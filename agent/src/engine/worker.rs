//! Inference threads: each served model has a bounded queue and its own worker threads, so
//! long CPU-bound work never runs on the async runtime and one slow model cannot starve
//! another's queue. The exceptions are short runs (averaging at most [`INLINE_MAX_US`] by
//! default, [`ServeOptions::short_run`]), whose hand-off
//! to a worker would cost more than the run: [`Served::run_inline`] runs the one request of an
//! idle model on the caller's thread, and under load [`Served::submit`] lets the first request
//! to arrive lead: it yields once, so the requests ready on its thread are read and join it,
//! then runs the batches they form on its own thread and answers them (no thread hand-off in
//! either direction).
//! Dropping the last handle to a [`Served`] closes its queue; the workers finish what is queued
//! and exit, releasing the model.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::batch::{self, BatchPolicy};
use super::model::{LoadedModel, RunError};
use crate::locks::MutexExt;
use crate::protocol::Tensor;

/// By default, runs at most this long on average (per request) may run on the requester's
/// thread ([`ServeOptions::short_run`]).
pub const INLINE_MAX_US: u64 = 100;

/// A batch led on the runtime's thread may block it at most about this many short runs
/// (average run time per request times `max_batch`: 1 ms by default); models above it keep
/// their batches on the workers.
const LEAD_MAX_BATCH_RUNS: u64 = 10;

/// A leader runs batches for at most about this long (it finishes the batch it started), then
/// hands what is still queued to the workers: its own answer waits until it lets go.
const LEAD_SLICE: Duration = Duration::from_micros(500);

/// The average run time from which a one-row run with nothing else waiting splits over the
/// free cores (`intra_op_threads`), in ns: well above the per-product cost of sharing work.
const SPLIT_ONE_ROW_MIN_NS: u64 = 2_000_000;

/// The outcome a worker sends back.
pub type JobResult = Result<Vec<Tensor>, JobError>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("request deadline passed while queued")]
    Expired,
    #[error("queued longer than the model's queue_timeout ({} ms)", .0.as_millis())]
    QueueTimeout(Duration),
}

/// Why [`Served::run_inline`] handed a request back: it goes to a worker instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotInline {
    /// The queue is closing or the deadline has passed (the worker path answers that).
    Closing,
    /// No run of this version has been timed yet.
    NoRunTime,
    /// Runs are not short: they average more than [`Served::short_run`].
    LongRuns,
    /// Batching would wait for company or pad the run.
    Batching,
    /// The plan for this shape is not built; building it stays on the workers.
    NoPlan,
    /// Something is queued or running for this version.
    Busy,
    /// No queue place or no CPU slot free (slots are shared by every model of the process).
    NoCpu,
}

/// A request [`Served::run_inline`] did not run: its inputs, untouched, and why.
#[derive(Debug)]
pub struct Handoff {
    pub why: NotInline,
    pub inputs: Vec<Tensor>,
}

struct Job {
    inputs: Vec<Tensor>,
    /// Rows on the batch axis (1 for models without one).
    rows: usize,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<(JobResult, Duration)>,
    /// Its place in the queue, given back when the job is answered.
    ticket: Ticket,
}

/// A request's admission: its place in the version's queue and its count in the depth, one
/// and the same, given back together when it is dropped. Every job (queued, led or run inline)
/// holds one, so the queue policy, the router's estimate and the split rule see the same load.
pub struct Ticket {
    _permit: tokio::sync::OwnedSemaphorePermit,
    depth: Arc<AtomicUsize>,
}

impl Ticket {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, depth: &Arc<AtomicUsize>) -> Ticket {
        depth.fetch_add(1, Ordering::SeqCst);
        Ticket { _permit: permit, depth: depth.clone() }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.depth.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// On the caller's thread, now: the one request being answered, a short run, its plan
    /// built, nothing queued, no batching wait or padding.
    Inline,
    /// Led on the runtime's thread by the first request to arrive (short runs under load).
    Lead,
    /// Handed to the worker threads.
    Queue,
}

/// What the placement rule weighs, read from a version at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// The only request being answered ([`crate::engine::InFlight`]).
    pub alone: bool,
    /// The version is closing, or the request's deadline has passed.
    pub closing: bool,
    /// The average run time per request, ns (0: none timed yet).
    pub run_ns: u64,
    /// The short-run limit, ns.
    pub short_run_ns: u64,
    /// Requests queued or running for this version.
    pub depth: usize,
    /// The plan for this request's shape is built.
    pub plan_built: bool,
    /// Batching would wait for company (`max_queue_delay` > 0).
    pub batching_waits: bool,
    /// Batching would pad this request up to a run size.
    pub pads: bool,
    /// Rows a batch may hold (1 without batching).
    pub max_batch: u64,
}

/// The placement rule: inline when it costs less than a hand-off (alone, short, ready, idle);
/// led when runs are short per request and per batch and no batching delay is set; else queued.
pub fn place(s: &LoadSnapshot) -> Place {
    let short = s.run_ns > 0 && s.run_ns <= s.short_run_ns;
    if s.alone && short && s.depth == 0 && s.plan_built && !s.closing && !s.batching_waits && !s.pads {
        return Place::Inline;
    }
    let short_batches = s.run_ns.saturating_mul(s.max_batch) <= s.short_run_ns.saturating_mul(LEAD_MAX_BATCH_RUNS);
    if short && short_batches && !s.batching_waits {
        return Place::Lead;
    }
    Place::Queue
}

/// Why a call was not answered.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Refused(#[from] SubmitError),
    #[error("the request's deadline passed")]
    DeadlineExceeded,
    #[error("inference worker stopped")]
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("queue full ({0} waiting)")]
    QueueFull(usize),
    #[error("model is shutting down")]
    Closed,
}

/// How one served version queues and runs its requests (from `[models.<name>]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServeOptions {
    /// Worker threads; runs across all models are still capped by [`super::cpu`] slots.
    pub instances: usize,
    /// Cores (CPU slots) one run may take when they are free and nothing else waits.
    pub threads_per_run: usize,
    /// Requests waiting or running before new ones are refused.
    pub max_queue: usize,
    /// A request that waited longer than this is answered "overloaded" instead of run.
    pub queue_timeout: Option<Duration>,
    /// Response cache in bytes; 0 turns it off.
    pub cache_bytes: usize,
    /// Dynamic batching; applies only to models with a dynamic batch dimension.
    pub batch: Option<BatchPolicy>,
    /// Runs averaging at most this long (per request) are short: an idle model's run goes
    /// inline and, under load, batches are led on the runtime's thread. [`INLINE_MAX_US`] by
    /// default; a test on a slow or crowded machine raises it, so these paths do not depend
    /// on how fast the machine runs the model.
    pub short_run: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            instances: 1,
            threads_per_run: 1,
            max_queue: 64,
            queue_timeout: None,
            cache_bytes: 0,
            batch: None,
            short_run: Duration::from_micros(crate::failpoint::short_run_us().unwrap_or(INLINE_MAX_US)),
        }
    }
}

/// Runs and rows since start, for the mean batch size.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub runs: AtomicU64,
    pub rows: AtomicU64,
    /// Runs split over more than one core (`threads_per_run`).
    pub split_runs: AtomicU64,
    /// Runs led on a runtime thread by a request under load ([`Served::submit`]).
    pub led_runs: AtomicU64,
    /// How long a request waited for a CPU slot (held by other runs, of any model) before its
    /// run started, per request, ns (moving average; in whole µs it would stick up to 7 µs
    /// above waits of nothing). Not run time: it counts in the estimate of a request's
    /// latency, not in a version's latency verdict.
    pub slot_wait_ns: AtomicU64,
    /// Queued requests whose requester left (a reset stream, a closed connection, its own
    /// timeout) before their run: not run, so a client that asks and cancels at once cannot
    /// make the model work for answers nobody waits for.
    pub abandoned: AtomicU64,
}

impl BatchStats {
    /// [`BatchStats::slot_wait_ns`] in µs, rounded to the nearest.
    pub fn slot_wait_us(&self) -> u64 {
        self.slot_wait_ns.load(Ordering::Relaxed).saturating_add(500) / 1000
    }
}

/// A model with its queue and worker threads: the unit the serving table swaps.
pub struct Served {
    pub name: String,
    pub version: String,
    pub model: Arc<LoadedModel>,
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
    permits: Arc<tokio::sync::Semaphore>,
    workers: Vec<JoinHandle<()>>,
    /// The moving average of one request's run time, in nanoseconds (microseconds would
    /// stick: a 1/8-weighted integer average moves only by whole units).
    avg_run_ns: Arc<AtomicU64>,
    /// Whether the model's inputs may be sent off the site (overflow): its signed manifest says
    /// so; local models and configuration can only keep it `false`.
    pub may_leave_site: bool,
    /// The processing steps shipped with the model, when it is a package: requests carry raw
    /// inputs, answers the steps' outputs.
    pub package: Option<Arc<super::package::Package>>,
    /// This version's response cache (`cache_bytes`), when enabled.
    pub cache: Option<super::cache::ResponseCache>,
    /// The batching in effect (`None` when off or the model has no batch dimension).
    pub batching: Option<BatchPolicy>,
    pub stats: Arc<BatchStats>,
    /// Cores one run may take ([`ServeOptions::threads_per_run`]).
    pub threads_per_run: usize,
    /// Requests waiting for a leader on a runtime thread ([`Served::submit`]).
    led: Mutex<Led>,
    /// How the leader runs a batch: the workers' own code, on the leader's thread.
    exec: Worker,
    /// [`ServeOptions::short_run`], in ns (at least 1), as the run-time average is kept.
    short_run_ns: u64,
}

/// Requests queued for the leader. Invariant: `jobs` is empty unless `leading` (a leader
/// drains them before it lets go, under this lock).
#[derive(Default)]
struct Led {
    jobs: VecDeque<Job>,
    leading: bool,
}

impl Served {
    /// The inputs and outputs callers see: the model's, or its package's.
    pub fn io(&self) -> (Vec<super::package::Spec>, Vec<super::package::Spec>) {
        let sig = &self.model.signature;
        match &self.package {
            Some(p) => p.describe(sig),
            None => {
                let spec = |t: &super::TensorSpec| (t.name.clone(), t.datatype, t.v2_shape());
                (sig.inputs.iter().map(spec).collect(), sig.outputs.iter().map(spec).collect())
            }
        }
    }

    /// The outputs a caller may ask for: the model's, or its package's after the steps.
    pub fn output_names(&self) -> Vec<String> {
        let model: Vec<String> = self.model.signature.outputs.iter().map(|s| s.name.clone()).collect();
        match &self.package {
            Some(p) => p.output_names(&model),
            None => model,
        }
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").field("name", &self.name).field("version", &self.version).finish_non_exhaustive()
    }
}

impl Served {
    pub fn start(name: &str, version: &str, model: Arc<LoadedModel>, opts: &ServeOptions) -> Served {
        let max_queue = opts.max_queue.max(1);
        let batching = opts.batch.clone().filter(|p| {
            if let Some(why) = model.rows_depend.as_deref().filter(|_| p.max_batch > 1) {
                tracing::warn!(
                    model = name,
                    reason = why,
                    "batching configured but off: a row's answer depends on its batch"
                );
                return false;
            }
            let usable = p.max_batch > 1 && model.batch_axis();
            if p.max_batch > 1 && !usable {
                tracing::warn!(
                    model = name,
                    "batching configured but the model has no dynamic batch dimension on every input and output: off"
                );
            }
            usable
        });
        let (tx, rx) = sync_channel::<Job>(max_queue);
        let queue = Arc::new(Mutex::new(Queue { rx, held: VecDeque::new() }));
        let depth = Arc::new(AtomicUsize::new(0));
        let avg_run_ns = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(BatchStats::default());
        let mut workers = Vec::new();
        let exec = Worker {
            queue,
            model: model.clone(),
            depth: depth.clone(),
            avg_ns: avg_run_ns.clone(),
            stats: stats.clone(),
            batching: batching.clone(),
            queue_timeout: opts.queue_timeout,
            threads_per_run: opts.threads_per_run.max(1),
        };
        for i in 0..opts.instances.max(1) {
            let w = exec.clone();
            let spawned = std::thread::Builder::new().name(format!("infer-{name}-{i}")).spawn(move || w.run());
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => tracing::error!(model = name, error = %e, "cannot start inference thread"),
            }
        }
        Served {
            name: name.to_owned(),
            version: version.to_owned(),
            model,
            tx,
            depth,
            capacity: max_queue,
            permits: Arc::new(tokio::sync::Semaphore::new(max_queue)),
            workers,
            avg_run_ns,
            may_leave_site: false,
            package: None,
            cache: (opts.cache_bytes > 0).then(|| super::cache::ResponseCache::new(opts.cache_bytes)),
            batching,
            stats,
            threads_per_run: opts.threads_per_run.max(1),
            led: Mutex::new(Led::default()),
            exec,
            short_run_ns: u64::try_from(opts.short_run.as_nanos()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// How long a request arriving now would take locally: the jobs ahead of it and its own,
    /// at the average run time and wait for a core, spread over the worker threads.
    pub fn estimated_latency(&self) -> Duration {
        let avg = self.run_ns().saturating_add(self.stats.slot_wait_ns.load(Ordering::Relaxed));
        let jobs = self.queue_depth() as u64 + 1;
        let instances = self.workers.len().max(1) as u64;
        Duration::from_nanos(avg.saturating_mul(jobs.div_ceil(instances)))
    }

    /// The moving average of one request's run time, timed from its CPU slot on (zero until
    /// a run of this version is timed): what the inline and leader rules weigh, and, with the
    /// wait for a slot, the latency estimate.
    pub fn run_time(&self) -> Duration {
        Duration::from_nanos(self.run_ns())
    }

    /// [`Served::run_time`] in ns, as the inline, leader and latency rules weigh it.
    fn run_ns(&self) -> u64 {
        self.avg_run_ns.load(Ordering::Relaxed)
    }

    /// [`Served::run_time`] in whole microseconds, rounded up (a timed run is never 0 µs).
    pub fn run_us(&self) -> u64 {
        self.run_ns().div_ceil(1000)
    }

    /// The average run time at or below which runs are short ([`ServeOptions::short_run`]).
    pub fn short_run(&self) -> Duration {
        Duration::from_nanos(self.short_run_ns)
    }

    /// Whether a job submitted without waiting would be refused.
    pub fn queue_full(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Queues a job; the answer arrives on the returned channel with the time spent running.
    /// With `wait`, a full queue is waited on until the deadline; without, it is refused at once.
    pub async fn submit(
        &self,
        inputs: Vec<Tensor>,
        deadline: Instant,
        wait: bool,
    ) -> Result<oneshot::Receiver<(JobResult, Duration)>, SubmitError> {
        if self.workers.is_empty() {
            return Err(SubmitError::Closed);
        }
        let permit = if wait {
            match tokio::time::timeout_at(deadline.into(), self.permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Err(SubmitError::Closed),
                Err(_) => return Err(SubmitError::QueueFull(self.capacity)),
            }
        } else {
            self.permits.clone().try_acquire_owned().map_err(|_| SubmitError::QueueFull(self.capacity))?
        };
        let (reply, rx) = oneshot::channel();
        let ticket = Ticket::new(permit, &self.depth);
        let rows = batch::rows(&inputs);
        let job = Job { inputs, rows, queued: Instant::now(), deadline, reply, ticket };
        if self.leads() {
            self.lead(job).await;
            return Ok(rx);
        }
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => Err(match e {
                TrySendError::Full(_) => SubmitError::QueueFull(self.capacity),
                TrySendError::Disconnected(_) => SubmitError::Closed,
            }),
        }
    }

    /// Runs a request where [`place`] says, and waits for its answer until `deadline`: inline
    /// on this thread, led on it, or queued for the workers (waiting for a queue place when
    /// `wait`, refused at once when full otherwise). `alone`: the only request being answered.
    pub async fn call(
        &self,
        inputs: Vec<Tensor>,
        deadline: Instant,
        wait: bool,
        alone: bool,
    ) -> Result<(JobResult, Duration), CallError> {
        // Only the one request in flight can be placed inline: under load the snapshot (its
        // plan lookup locks the plan cache) is not taken, and `submit` leads or queues by the
        // same rule.
        let inputs = match alone.then(|| place(&self.snapshot(&inputs, deadline, true))) {
            Some(Place::Inline) => match self.run_placed_inline(inputs) {
                Ok(done) => return Ok(done),
                Err(handoff) => handoff.inputs,
            },
            _ => inputs,
        };
        let rx = self.submit(inputs, deadline, wait).await?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(_)) => Err(CallError::Stopped),
            Err(_) => Err(CallError::DeadlineExceeded),
        }
    }

    /// The load [`place`] weighs for `inputs` now.
    pub fn snapshot(&self, inputs: &[Tensor], deadline: Instant, alone: bool) -> LoadSnapshot {
        let rows = batch::rows(inputs);
        LoadSnapshot {
            alone,
            closing: self.workers.is_empty() || Instant::now() >= deadline,
            run_ns: self.run_ns(),
            short_run_ns: self.short_run_ns,
            depth: self.queue_depth(),
            plan_built: self.model.has_plan(inputs),
            batching_waits: self.batching.as_ref().is_some_and(|p| !p.max_delay.is_zero()),
            pads: self.batching.as_ref().is_some_and(|p| p.run_rows(rows) != rows),
            max_batch: self.batching.as_ref().map_or(1, |p| p.max_batch) as u64,
        }
    }

    /// Whether requests run on the runtime's threads, led by the first to arrive: runs short
    /// enough (per request and per batch) that a hand-off to a worker would cost more, and no
    /// batching delay to wait out (a leader never waits).
    fn leads(&self) -> bool {
        let lead_rule = LoadSnapshot {
            alone: false,
            closing: false,
            run_ns: self.run_ns(),
            short_run_ns: self.short_run_ns,
            depth: 0,
            plan_built: false,
            batching_waits: self.batching.as_ref().is_some_and(|p| !p.max_delay.is_zero()),
            pads: false,
            max_batch: self.batching.as_ref().map_or(1, |p| p.max_batch) as u64,
        };
        place(&lead_rule) == Place::Lead
    }

    /// Queues `job` for a leader; when none is running, this request leads: it yields once,
    /// so that the other requests ready on this thread are read and queue behind it, then runs
    /// the batches they form (as a worker would) until none is left or [`LEAD_SLICE`] has
    /// passed. A batch it cannot run here (no CPU slot free, or its plan is not built: a build
    /// takes milliseconds) goes to the workers' queue, as does everything still queued when it
    /// stops at the end of its slice or is dropped mid-way.
    async fn lead(&self, job: Job) {
        {
            let mut led = self.led.locked();
            led.jobs.push_back(job);
            if std::mem::replace(&mut led.leading, true) {
                return;
            }
        }
        let mut leader = Leader { served: self, done: false };
        tokio::task::yield_now().await;
        let started = Instant::now();
        loop {
            let jobs = {
                let mut led = self.led.locked();
                let jobs = take_batch(&mut led.jobs, self.batching.as_ref());
                if jobs.is_empty() {
                    led.leading = false;
                    leader.done = true;
                    break;
                }
                jobs
            };
            let rows: usize = jobs.iter().map(|j| j.rows).sum();
            let run_rows = self.batching.as_ref().map_or(rows, |p| p.run_rows(rows));
            let slot =
                if self.model.has_plan_for(&jobs[0].inputs, run_rows) { super::cpu::try_acquire() } else { None };
            match slot {
                Some(slot) => {
                    self.stats.led_runs.fetch_add(1, Ordering::Relaxed);
                    self.exec.execute(jobs, Some(slot));
                }
                None => jobs.into_iter().for_each(|j| self.hand_to_workers(j)),
            }
            if started.elapsed() >= LEAD_SLICE {
                // The leader's own answer waits until it lets go: under sustained load what is
                // still queued goes to the workers (`Leader`'s drop), and the next request to
                // arrive leads again.
                break;
            }
        }
    }

    /// A job queued for a leader goes to the workers instead. It holds a queue place, so the
    /// channel (as large as the places) has room; only a closed queue refuses it, and dropping
    /// the job then answers its requester that the workers stopped.
    fn hand_to_workers(&self, job: Job) {
        // A refused job is dropped: its ticket goes back, its requester hears the workers stopped.
        let _ = self.tx.try_send(job);
    }

    /// Runs a request on the caller's thread when handing it to a worker would cost more than
    /// the run itself: nothing is queued or running for this version, batching would not wait
    /// for company or pad, the plan for this shape is built, a CPU slot is free, and this
    /// version's runs are short ([`Served::short_run`]). Otherwise the inputs come back with
    /// the reason, to be submitted.
    ///
    /// The run counts in the queue depth and holds a queue place and a CPU slot, as a
    /// worker's would, so the queue policy and the core budget see it.
    pub fn run_inline(&self, inputs: Vec<Tensor>, deadline: Instant) -> Result<(JobResult, Duration), Handoff> {
        let hand_off = |why, inputs| Err(Handoff { why, inputs });
        let avg = self.run_ns();
        if self.workers.is_empty() || Instant::now() >= deadline {
            return hand_off(NotInline::Closing, inputs);
        }
        let rows = batch::rows(&inputs);
        if self.batching.as_ref().is_some_and(|p| !p.max_delay.is_zero() || p.run_rows(rows) != rows) {
            return hand_off(NotInline::Batching, inputs);
        }
        if !self.model.has_plan(&inputs) {
            return hand_off(NotInline::NoPlan, inputs);
        }
        if avg == 0 {
            return hand_off(NotInline::NoRunTime, inputs);
        }
        if avg > self.short_run_ns {
            return hand_off(NotInline::LongRuns, inputs);
        }
        self.run_placed_inline(inputs)
    }

    /// Claims a queue place and a CPU slot and runs on this thread: the part of
    /// [`Served::run_inline`] left once [`place`] has said inline (the rule's inputs are not
    /// read twice).
    fn run_placed_inline(&self, inputs: Vec<Tensor>) -> Result<(JobResult, Duration), Handoff> {
        let hand_off = |why, inputs| Err(Handoff { why, inputs });
        let rows = batch::rows(&inputs);
        if self.queue_depth() != 0 {
            return hand_off(NotInline::Busy, inputs);
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return hand_off(NotInline::Busy, inputs);
        };
        let ticket = Ticket::new(permit, &self.depth);
        if self.queue_depth() != 1 {
            // Another request took a place at the same instant: it goes first.
            drop(ticket);
            return hand_off(NotInline::Busy, inputs);
        }
        let Some(slot) = super::cpu::try_acquire() else {
            return hand_off(NotInline::NoCpu, inputs);
        };
        let started = Instant::now();
        let result = self.model.run(inputs).map_err(JobError::from);
        let ran = started.elapsed();
        drop(slot);
        // A free slot at once: no wait.
        note_wait(&self.stats, Duration::ZERO, 1);
        note_run(&self.stats, &self.avg_run_ns, ran, 1, rows, result.is_ok());
        drop(ticket);
        Ok((result, ran))
    }

    /// Jobs waiting or running.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }
}

/// The request leading on a runtime thread. Dropped while leading (at the end of its slice, its
/// requester gone at the yield, or a run panicked), it hands what is queued to the workers and
/// lets go.
struct Leader<'a> {
    served: &'a Served,
    done: bool,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let jobs = {
            let mut led = self.served.led.locked();
            led.leading = false;
            std::mem::take(&mut led.jobs)
        };
        for job in jobs {
            self.served.hand_to_workers(job);
        }
    }
}

struct Queue {
    rx: Receiver<Job>,
    /// Jobs taken from the channel that did not fit the batch being formed; served first.
    held: VecDeque<Job>,
}

#[derive(Clone)]
struct Worker {
    queue: Arc<Mutex<Queue>>,
    model: Arc<LoadedModel>,
    depth: Arc<AtomicUsize>,
    avg_ns: Arc<AtomicU64>,
    stats: Arc<BatchStats>,
    batching: Option<BatchPolicy>,
    queue_timeout: Option<Duration>,
    threads_per_run: usize,
}

impl Worker {
    fn run(self) {
        loop {
            let jobs = {
                let Ok(mut q) = self.queue.lock() else { return };
                match next_batch(&mut q, self.batching.as_ref()) {
                    Some(jobs) => jobs,
                    None => return,
                }
            };
            self.execute(jobs, None);
        }
    }

    /// Runs one batch (one job when batching is off) and answers every job in it, on a CPU
    /// slot the caller holds (`slot`) or waits for.
    fn execute(&self, jobs: Vec<Job>, slot: Option<super::cpu::Slot<'static>>) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.reply.is_closed() {
                self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let refusal = if now > job.deadline {
                Some(JobError::Expired)
            } else {
                self.queue_timeout.filter(|t| now.duration_since(job.queued) > *t).map(JobError::QueueTimeout)
            };
            match refusal {
                Some(e) => self.answer(job, Err(e), Duration::ZERO),
                None => live.push(job),
            }
        }
        if live.is_empty() {
            return;
        }
        let rows: usize = live.iter().map(|j| j.rows).sum();
        // Timed from the slot on: waiting for a core is queueing, not this version's run time
        // (which feeds the inline and leader rules and the canary's latency verdict).
        let asked = Instant::now();
        let slot = slot.or_else(super::cpu::acquire);
        let started = Instant::now();
        note_wait(&self.stats, started.duration_since(asked), live.len());
        let built = self.model.plans_built();
        let results = {
            let _slot = slot;
            // A run with nothing else waiting for this model may split over the cores that are
            // free: from two rows up, or one row of a model whose runs are long (a short run's
            // split costs more than it saves; BENCHMARKS.md, engine). The average then follows
            // the split runs; a model near the bound may alternate.
            let alone = self.depth.load(Ordering::SeqCst) <= live.len();
            let long = self.avg_ns.load(Ordering::Relaxed) >= SPLIT_ONE_ROW_MIN_NS;
            let extra: Vec<_> = if self.threads_per_run > 1 && (rows >= 2 || long) && alone {
                (1..self.threads_per_run).map_while(|_| super::cpu::try_acquire()).collect()
            } else {
                Vec::new()
            };
            if !extra.is_empty() {
                self.stats.split_runs.fetch_add(1, Ordering::Relaxed);
            }
            self.run_jobs(&mut live, 1 + extra.len())
        };
        let ran = started.elapsed();
        // A run that waited for a plan to be built says nothing about run times.
        let timed = results.iter().any(Result::is_ok) && self.model.plans_built() == built;
        note_run(&self.stats, &self.avg_ns, ran, live.len(), rows, timed);
        for (job, result) in live.into_iter().zip(results) {
            self.answer(job, result, ran);
        }
    }

    /// One result per job. A batch whose joint run fails is retried job by job, so one
    /// request's failure never becomes its neighbours'.
    ///
    /// With `batch_sizes`, the run is padded up to the next of them (also a lone request), so
    /// the model only ever builds plans for those sizes.
    fn run_jobs(&self, jobs: &mut [Job], threads: usize) -> Vec<JobResult> {
        let mut rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
        let total: usize = rows.iter().sum();
        let padded = self.batching.as_ref().map_or(total, |p| p.run_rows(total));
        if let [job] = &mut *jobs {
            if padded == total {
                return vec![self.model.run_on(std::mem::take(&mut job.inputs), threads).map_err(JobError::from)];
            }
        }
        let inputs: Vec<Vec<Tensor>> = jobs.iter().map(|j| j.inputs.clone()).collect();
        if padded > total {
            rows.push(padded - total);
        }
        let joint = batch::concat(inputs)
            .and_then(|joined| batch::pad(joined, padded - total))
            .and_then(|joined| self.model.run_on(joined, threads).map_err(|e| e.to_string()))
            .and_then(|out| batch::split(out, &rows))
            .map(|mut per_job| {
                // The padding's outputs.
                per_job.truncate(jobs.len());
                per_job
            });
        match joint {
            Ok(outputs) => outputs.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::debug!(model_error = %e, jobs = jobs.len(), "batched run failed; running its requests one by one");
                jobs.iter_mut()
                    .map(|j| self.model.run_on(std::mem::take(&mut j.inputs), threads).map_err(JobError::from))
                    .collect()
            }
        }
    }

    fn answer(&self, job: Job, result: JobResult, ran: Duration) {
        // The place goes back before the answer, so that a requester sending its next request
        // at once finds the version idle.
        let Job { reply, ticket, .. } = job;
        drop(ticket);
        // The requester may have gone (deadline, disconnect): nothing to do then.
        let _ = reply.send((result, ran));
    }
}

/// `d` shared by `jobs` jobs, ns per job (bounded, so a moving average cannot overflow).
fn per_job_ns(d: Duration, jobs: usize) -> u64 {
    (d.as_nanos() / jobs.max(1) as u128).min(u128::from(u64::MAX / 8)) as u64
}

/// A moving average after one more sample (weight 1/8 for the newest).
fn folded(old: u64, sample: u64) -> u64 {
    old - old / 8 + sample / 8
}

/// Folds a run's wait for its CPU slot, per job, into the moving average.
fn note_wait(stats: &BatchStats, waited: Duration, jobs: usize) {
    let old = stats.slot_wait_ns.load(Ordering::Relaxed);
    stats.slot_wait_ns.store(folded(old, per_job_ns(waited, jobs)), Ordering::Relaxed);
}

/// A timed run counts in the run-time average as at most this many times the average: one
/// run slowed by the host (preempted, its caches cold) does not lift a short model's average
/// over the short-run limit and send its next runs to the workers (where, on a cold thread,
/// they run slower still and keep it there). A real slowdown still shows within a few runs:
/// the average grows by at least 3/8 per run until it is a quarter of the new run time.
const OUTLIER_FACTOR: u64 = 4;

/// Counts a run and, when it is `timed` (it succeeded on plans already built), folds its time
/// per job into the moving average in ns (the first timed run sets it; [`OUTLIER_FACTOR`]).
fn note_run(stats: &BatchStats, avg_ns: &AtomicU64, ran: Duration, jobs: usize, rows: usize, timed: bool) {
    stats.runs.fetch_add(1, Ordering::Relaxed);
    stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
    if timed {
        let ns = per_job_ns(ran, jobs).max(1);
        let old = avg_ns.load(Ordering::Relaxed);
        let avg = if old == 0 { ns } else { folded(old, ns.min(old.saturating_mul(OUTLIER_FACTOR))) };
        avg_ns.store(avg, Ordering::Relaxed);
    }
}

/// The next batch from a leader's queue, without waiting: the first job and, with batching,
/// the compatible jobs behind it that fit in `max_batch` rows; the rest keep their order.
fn take_batch(jobs: &mut VecDeque<Job>, policy: Option<&BatchPolicy>) -> Vec<Job> {
    let Some(first) = jobs.pop_front() else { return Vec::new() };
    let Some(p) = policy else { return vec![first] };
    let mut batch = vec![first];
    join_fitting(&mut batch, jobs, p.max_batch);
    batch
}

/// Moves the jobs of `queue` that are compatible with `batch` and fit in `max_batch` rows into
/// it, in order; the others stay, in order. Returns the batch's rows.
fn join_fitting(batch: &mut Vec<Job>, queue: &mut VecDeque<Job>, max_batch: usize) -> usize {
    let mut rows: usize = batch.iter().map(|j| j.rows).sum();
    let mut i = 0;
    while i < queue.len() && rows < max_batch {
        let fits = queue[i].rows + rows <= max_batch && batch::compatible(&batch[0].inputs, &queue[i].inputs);
        match fits.then(|| queue.remove(i)).flatten() {
            Some(j) => {
                rows += j.rows;
                batch.push(j);
            }
            None => i += 1,
        }
    }
    rows
}

/// Takes the next job and, with batching, the compatible jobs that join it: until `max_batch`
/// rows, a preferred size with nothing more queued, or `max_delay` after the first job.
fn next_batch(q: &mut Queue, policy: Option<&BatchPolicy>) -> Option<Vec<Job>> {
    let first = match q.held.pop_front() {
        Some(j) => j,
        None => q.rx.recv().ok()?,
    };
    let Some(p) = policy else { return Some(vec![first]) };
    let mut jobs = vec![first];
    let until = Instant::now() + p.max_delay;
    // Held jobs first, in order, as long as they fit.
    let mut rows = join_fitting(&mut jobs, &mut q.held, p.max_batch);
    while rows < p.max_batch {
        let next = match q.rx.try_recv() {
            Ok(j) => j,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                let now = Instant::now();
                if p.preferred.contains(&rows) || now >= until {
                    break;
                }
                match q.rx.recv_timeout(until - now) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        if !batch::compatible(&jobs[0].inputs, &next.inputs) {
            q.held.push_back(next);
        } else if rows + next.rows > p.max_batch {
            // The next in line does not fit: this batch is as full as it gets.
            q.held.push_front(next);
            break;
        } else {
            rows += next.rows;
            jobs.push(next);
        }
    }
    Some(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;

    #[test]
    fn the_run_time_average_follows_runs_of_a_few_microseconds() {
        let (stats, avg) = (BatchStats::default(), AtomicU64::new(0));
        note_run(&stats, &avg, Duration::from_micros(100), 1, 1, true);
        assert_eq!(avg.load(Ordering::Relaxed), 100_000, "the first timed run sets it");
        // Eight-row runs of 16 µs: 2 µs per request. An average kept in whole µs stuck at 7.
        for _ in 0..200 {
            note_run(&stats, &avg, Duration::from_micros(16), 8, 8, true);
        }
        let ns = avg.load(Ordering::Relaxed);
        assert!((2_000..2_100).contains(&ns), "{ns} ns");
        // Untimed runs (a plan built on the way) count but do not move it.
        note_run(&stats, &avg, Duration::from_millis(50), 1, 1, false);
        assert_eq!(avg.load(Ordering::Relaxed), ns);
        assert_eq!(stats.runs.load(Ordering::Relaxed), 202);
    }

    #[test]
    fn the_slot_wait_average_comes_back_to_zero_after_a_long_wait() {
        let stats = BatchStats::default();
        note_wait(&stats, Duration::from_millis(50), 1);
        assert_eq!(stats.slot_wait_us(), 6_250, "1/8 of the first wait");
        // Waits of nothing: in whole µs the average stuck at 7.
        for _ in 0..200 {
            note_wait(&stats, Duration::ZERO, 1);
        }
        assert_eq!(stats.slot_wait_us(), 0, "{} ns", stats.slot_wait_ns.load(Ordering::Relaxed));
        // (In ns it can still stick, by at most 7 ns.)
        note_wait(&stats, Duration::from_micros(80), 8);
        let ns = stats.slot_wait_ns.load(Ordering::Relaxed);
        assert!((1_250..1_258).contains(&ns), "10 µs per job, weighted 1/8: {ns} ns");
    }

    #[test]
    fn one_slow_run_leaves_a_short_average_short_and_a_real_slowdown_shows_in_a_few_runs() {
        let (stats, avg) = (BatchStats::default(), AtomicU64::new(0));
        let limit = INLINE_MAX_US * 1000;
        for _ in 0..50 {
            note_run(&stats, &avg, Duration::from_micros(50), 1, 1, true);
        }
        // One run 100x slower (a preempted run on a busy host), then a second: still short.
        note_run(&stats, &avg, Duration::from_millis(5), 1, 1, true);
        let ns = avg.load(Ordering::Relaxed);
        assert!((60_000..=70_000).contains(&ns), "{ns} ns after one slow run");
        note_run(&stats, &avg, Duration::from_millis(5), 1, 1, true);
        assert!(avg.load(Ordering::Relaxed) <= limit, "{} ns after two slow runs", avg.load(Ordering::Relaxed));
        // Runs that stay 100x slower: the average passes 1 ms within 10 more runs and reaches
        // the new run time as an uncapped average would.
        for _ in 0..10 {
            note_run(&stats, &avg, Duration::from_millis(5), 1, 1, true);
        }
        assert!(avg.load(Ordering::Relaxed) >= 1_000_000, "{} ns", avg.load(Ordering::Relaxed));
        for _ in 0..100 {
            note_run(&stats, &avg, Duration::from_millis(5), 1, 1, true);
        }
        assert!(avg.load(Ordering::Relaxed) >= 4_900_000, "{} ns", avg.load(Ordering::Relaxed));
        // Faster runs are never capped: back to 50 µs within a few dozen runs.
        for _ in 0..60 {
            note_run(&stats, &avg, Duration::from_micros(50), 1, 1, true);
        }
        assert!(avg.load(Ordering::Relaxed) <= 60_000, "{} ns", avg.load(Ordering::Relaxed));
    }

    fn job(rows: usize, width: usize, permits: &Arc<tokio::sync::Semaphore>) -> Job {
        let inputs =
            vec![Tensor { name: "x".into(), shape: vec![rows, width], data: TensorData::F32(vec![0.0; rows * width]) }];
        let (reply, _rx) = oneshot::channel();
        let permit = permits.clone().try_acquire_owned().expect("permit");
        Job {
            inputs,
            rows,
            queued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(60),
            reply,
            ticket: Ticket::new(permit, &Arc::new(AtomicUsize::new(0))),
        }
    }

    #[test]
    fn placement_as_a_table() {
        let idle = LoadSnapshot {
            alone: true,
            closing: false,
            run_ns: 20_000,
            short_run_ns: 100_000,
            depth: 0,
            plan_built: true,
            batching_waits: false,
            pads: false,
            max_batch: 1,
        };
        let cases: [(&str, LoadSnapshot, Place); 12] = [
            ("alone, short, idle, ready", idle, Place::Inline),
            ("others in flight", LoadSnapshot { alone: false, ..idle }, Place::Lead),
            ("something queued", LoadSnapshot { depth: 1, ..idle }, Place::Lead),
            ("plan not built", LoadSnapshot { plan_built: false, ..idle }, Place::Lead),
            ("closing or past its deadline", LoadSnapshot { closing: true, ..idle }, Place::Lead),
            ("would pad", LoadSnapshot { pads: true, ..idle }, Place::Lead),
            ("batching waits for company", LoadSnapshot { batching_waits: true, ..idle }, Place::Queue),
            ("no run timed yet", LoadSnapshot { run_ns: 0, ..idle }, Place::Queue),
            ("long runs", LoadSnapshot { run_ns: 200_000, ..idle }, Place::Queue),
            ("at the short-run limit", LoadSnapshot { run_ns: 100_000, ..idle }, Place::Inline),
            (
                "short, but a full batch too long to lead",
                LoadSnapshot { alone: false, max_batch: 64, ..idle },
                Place::Queue,
            ),
            ("short, batches within the lead limit", LoadSnapshot { alone: false, max_batch: 8, ..idle }, Place::Lead),
        ];
        for (what, snapshot, want) in cases {
            assert_eq!(place(&snapshot), want, "{what}");
        }
    }

    #[test]
    fn a_ticket_is_the_queue_place_and_the_depth_count_at_once() {
        let permits = Arc::new(tokio::sync::Semaphore::new(2));
        let depth = Arc::new(AtomicUsize::new(0));
        let a = Ticket::new(permits.clone().try_acquire_owned().unwrap(), &depth);
        let b = Ticket::new(permits.clone().try_acquire_owned().unwrap(), &depth);
        assert_eq!((depth.load(Ordering::SeqCst), permits.available_permits()), (2, 0));
        drop(a);
        assert_eq!((depth.load(Ordering::SeqCst), permits.available_permits()), (1, 1));
        drop(b);
        assert_eq!((depth.load(Ordering::SeqCst), permits.available_permits()), (0, 2));
    }

    fn queue(jobs: Vec<Job>) -> Queue {
        let (tx, rx) = sync_channel(16);
        for j in jobs {
            tx.send(j).expect("queued");
        }
        // The sender stays alive (leaked for the test) so the queue is not closed.
        std::mem::forget(tx);
        Queue { rx, held: VecDeque::new() }
    }

    fn shapes(jobs: &[Job]) -> Vec<(usize, usize)> {
        jobs.iter().map(|j| (j.inputs[0].shape[0], j.inputs[0].shape[1])).collect()
    }

    #[test]
    fn batches_group_compatible_requests_and_keep_the_rest_in_order() {
        let permits = Arc::new(tokio::sync::Semaphore::new(16));
        let policy = BatchPolicy { max_batch: 8, max_delay: Duration::ZERO, preferred: vec![], sizes: vec![] };
        let jobs = vec![
            job(1, 4, &permits),
            job(2, 4, &permits),
            job(1, 5, &permits),
            job(1, 4, &permits),
            job(2, 5, &permits),
        ];
        let mut q = queue(jobs);
        let first = next_batch(&mut q, Some(&policy)).expect("batch");
        assert_eq!(shapes(&first), vec![(1, 4), (2, 4), (1, 4)], "equal non-batch dimensions only");
        let second = next_batch(&mut q, Some(&policy)).expect("batch");
        assert_eq!(shapes(&second), vec![(1, 5), (2, 5)], "held requests come next, in order");
    }

    #[test]
    fn a_batch_stops_at_max_rows_and_the_next_request_leads_the_next_batch() {
        let permits = Arc::new(tokio::sync::Semaphore::new(16));
        let policy = BatchPolicy { max_batch: 3, max_delay: Duration::ZERO, preferred: vec![], sizes: vec![] };
        let mut q = queue(vec![job(1, 4, &permits), job(2, 4, &permits), job(1, 4, &permits), job(3, 4, &permits)]);
        assert_eq!(shapes(&next_batch(&mut q, Some(&policy)).expect("batch")), vec![(1, 4), (2, 4)]);
        assert_eq!(shapes(&next_batch(&mut q, Some(&policy)).expect("batch")), vec![(1, 4)], "1 + 3 rows exceed 3");
        assert_eq!(shapes(&next_batch(&mut q, Some(&policy)).expect("batch")), vec![(3, 4)]);
    }

    #[test]
    fn a_preferred_size_dispatches_without_waiting_out_the_delay() {
        let permits = Arc::new(tokio::sync::Semaphore::new(16));
        // A minute's delay: reaching the preferred size with nothing more queued must not wait.
        let policy =
            BatchPolicy { max_batch: 8, max_delay: Duration::from_secs(60), preferred: vec![2], sizes: vec![] };
        let mut q = queue(vec![job(1, 4, &permits), job(1, 4, &permits)]);
        let started = Instant::now();
        assert_eq!(shapes(&next_batch(&mut q, Some(&policy)).expect("batch")), vec![(1, 4), (1, 4)]);
        assert!(started.elapsed() < Duration::from_secs(30), "dispatched at the preferred size");
    }

    #[test]
    fn a_leaders_batch_takes_the_compatible_requests_that_fit_and_leaves_the_rest_in_order() {
        let permits = Arc::new(tokio::sync::Semaphore::new(16));
        let policy = BatchPolicy { max_batch: 4, max_delay: Duration::ZERO, preferred: vec![], sizes: vec![] };
        let mut jobs: VecDeque<Job> = vec![
            job(1, 4, &permits),
            job(1, 5, &permits),
            job(3, 4, &permits),
            job(2, 4, &permits),
            job(1, 4, &permits),
        ]
        .into();
        let first = take_batch(&mut jobs, Some(&policy));
        assert_eq!(shapes(&first), vec![(1, 4), (3, 4)], "compatible, within max_batch rows");
        assert_eq!(shapes(jobs.make_contiguous()), vec![(1, 5), (2, 4), (1, 4)], "the rest in order");
        assert_eq!(shapes(&take_batch(&mut jobs, Some(&policy))), vec![(1, 5)]);
        assert_eq!(shapes(&take_batch(&mut jobs, Some(&policy))), vec![(2, 4), (1, 4)]);
        assert!(take_batch(&mut jobs, Some(&policy)).is_empty());
        let mut jobs: VecDeque<Job> = vec![job(1, 4, &permits), job(1, 4, &permits)].into();
        assert_eq!(take_batch(&mut jobs, None).len(), 1, "without a policy every request runs alone");
    }

    #[test]
    fn without_a_policy_every_request_runs_alone() {
        let permits = Arc::new(tokio::sync::Semaphore::new(16));
        let mut q = queue(vec![job(1, 4, &permits), job(1, 4, &permits)]);
        assert_eq!(next_batch(&mut q, None).expect("job").len(), 1);
    }
}
