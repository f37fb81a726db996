//! Inference threads: each served model has a bounded queue and its own worker threads, so
//! CPU-bound work never runs on the async runtime and one slow model cannot starve another's
//! queue. Dropping the last handle to a [`Served`] closes its queue; the workers finish what is
//! queued and exit, releasing the model.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::model::{LoadedModel, RunError};
use crate::protocol::Tensor;

/// The outcome a worker sends back.
pub type JobResult = Result<Vec<Tensor>, JobError>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("request deadline passed while queued")]
    Expired,
}

struct Job {
    inputs: Vec<Tensor>,
    deadline: Instant,
    reply: oneshot::Sender<(JobResult, Duration)>,
    /// A place in the queue, given back when the job is done.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("queue full ({0} waiting)")]
    QueueFull(usize),
    #[error("model is shutting down")]
    Closed,
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
    /// Moving average of one job's run time, in microseconds (0 until the first job).
    avg_run_us: Arc<AtomicU64>,
    /// Whether the model's inputs may be sent off the site (overflow): its signed manifest says
    /// so; local models and configuration can only keep it `false`.
    pub may_leave_site: bool,
    /// This version's response cache (`cache_bytes`), when enabled.
    pub cache: Option<super::cache::ResponseCache>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").field("name", &self.name).field("version", &self.version).finish_non_exhaustive()
    }
}

impl Served {
    pub fn start(
        name: &str,
        version: &str,
        model: Arc<LoadedModel>,
        instances: usize,
        max_queue: usize,
        cache_bytes: usize,
    ) -> Served {
        let (tx, rx) = sync_channel::<Job>(max_queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let depth = Arc::new(AtomicUsize::new(0));
        let avg_run_us = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for i in 0..instances.max(1) {
            let rx = rx.clone();
            let model = model.clone();
            let depth = depth.clone();
            let avg = avg_run_us.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("infer-{name}-{i}"))
                .spawn(move || worker_loop(&rx, &model, &depth, &avg));
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
            capacity: max_queue.max(1),
            permits: Arc::new(tokio::sync::Semaphore::new(max_queue.max(1))),
            workers,
            avg_run_us,
            may_leave_site: false,
            cache: (cache_bytes > 0).then(|| super::cache::ResponseCache::new(cache_bytes)),
        }
    }

    /// How long a request arriving now would take locally: the jobs ahead of it and its own,
    /// at the average run time, spread over the worker threads.
    pub fn estimated_latency(&self) -> Duration {
        let avg = self.avg_run_us.load(Ordering::Relaxed);
        let jobs = self.queue_depth() as u64 + 1;
        let instances = self.workers.len().max(1) as u64;
        Duration::from_micros(avg.saturating_mul(jobs.div_ceil(instances)))
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
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Job { inputs, deadline, reply, _permit: permit }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(self.capacity),
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Jobs waiting or running.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }
}

fn worker_loop(rx: &Mutex<Receiver<Job>>, model: &LoadedModel, depth: &AtomicUsize, avg_us: &AtomicU64) {
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let started = Instant::now();
        let result =
            if started > job.deadline { Err(JobError::Expired) } else { model.run(job.inputs).map_err(JobError::from) };
        let ran = started.elapsed();
        depth.fetch_sub(1, Ordering::SeqCst);
        if result.is_ok() {
            // Exponential moving average, weight 1/8 for the newest run.
            let us = ran.as_micros().min(u128::from(u64::MAX / 8)) as u64;
            let old = avg_us.load(Ordering::Relaxed);
            avg_us.store(if old == 0 { us } else { old - old / 8 + us / 8 }, Ordering::Relaxed);
        }
        // The requester may have gone (deadline, disconnect): nothing to do then.
        let _ = job.reply.send((result, ran));
    }
}
