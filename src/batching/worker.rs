//! The one owner of the queue: collects requests, builds batches, hands them to the
//! inner service one at a time, and prunes requests nobody waits for any more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::{BatchPolicy, InferRequest};
use crate::engine::{BatchStats, InferResponse, Job};
use crate::error::ServeError;
use crate::model::ModelConfig;
use crate::preprocess::PreparedSample;
use crate::telemetry::metrics as m;

/// A service that runs one batch of jobs and answers each job itself (the engine).
pub trait BatchRunner:
    Service<Vec<Job>, Response = BatchStats, Error = ServeError, Future = Self::Fut> + Send + 'static
{
    type Fut: std::future::Future<Output = Result<BatchStats, ServeError>> + Send;
}

impl<T> BatchRunner for T
where
    T: Service<Vec<Job>, Response = BatchStats, Error = ServeError> + Send + 'static,
    T::Future: Send,
{
    type Fut = T::Future;
}

pub(crate) struct Queued {
    samples: Vec<PreparedSample>,
    config: Arc<ModelConfig>,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<InferResponse, ServeError>>,
    enqueued: Instant,
    /// Longest clip of the request, in frames.
    frames: usize,
}

impl Queued {
    pub(crate) fn new(
        request: InferRequest,
        reply: oneshot::Sender<Result<InferResponse, ServeError>>,
    ) -> Self {
        let frames = request.samples.iter().map(|s| s.frames).max().unwrap_or(0);
        Self {
            samples: request.samples,
            config: request.config,
            deadline: request.deadline.map(Instant::from_std),
            reply,
            enqueued: Instant::now(),
            frames,
        }
    }
}

pub(crate) struct Worker<S> {
    inner: S,
    policy: BatchPolicy,
    rx: mpsc::UnboundedReceiver<Queued>,
    depth: Arc<AtomicUsize>,
    /// Admitted requests, oldest first.
    pending: Vec<Queued>,
}

impl<S: BatchRunner> Worker<S> {
    pub(crate) fn new(
        inner: S,
        policy: BatchPolicy,
        rx: mpsc::UnboundedReceiver<Queued>,
        depth: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            inner,
            policy,
            rx,
            depth,
            pending: Vec::new(),
        }
    }

    /// Runs until every [`super::BatchService`] handle is gone and the queue is empty.
    pub(crate) async fn run(mut self) {
        loop {
            if self.pending.is_empty() {
                match self.rx.recv().await {
                    Some(q) => self.pending.push(q),
                    None => return,
                }
            }
            // Everything that arrived while the model was busy joins the choice.
            while let Ok(q) = self.rx.try_recv() {
                self.pending.push(q);
            }
            self.wait_for_company().await;
            self.prune();
            if self.pending.is_empty() {
                continue;
            }
            let jobs = self.take_batch();
            let inner = match self.inner.ready().await {
                Ok(inner) => inner,
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(ServeError::Unavailable(e.to_string())));
                    }
                    continue;
                }
            };
            // One batch at a time: while it runs, new requests wait in the channel and
            // form the next, larger batch.
            match inner.call(jobs).await {
                Ok(stats) => {
                    metrics::histogram!(m::INFERENCE_DURATION)
                        .record(stats.inference.as_secs_f64());
                }
                // The jobs went with the call; their dropped reply channels answer them.
                Err(e) => tracing::error!(error = %e, "batch failed"),
            }
        }
    }

    /// With a delay configured, a small batch waits (only while the model is idle,
    /// which it is whenever we are here) for more requests, up to the oldest's limit.
    /// Requests that already waited that long (behind a busy model) go at once.
    async fn wait_for_company(&mut self) {
        if self.policy.max_delay.is_zero() {
            return;
        }
        let until = self.pending[0].enqueued + self.policy.max_delay;
        while self.pending_samples() < self.policy.max_batch_size {
            tokio::select! {
                q = self.rx.recv() => match q {
                    Some(q) => self.pending.push(q),
                    None => return,
                },
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }

    fn pending_samples(&self) -> usize {
        self.pending.iter().map(|q| q.samples.len()).sum()
    }

    /// Answers requests whose deadline passed and forgets those whose client left.
    fn prune(&mut self) {
        let now = Instant::now();
        let before = self.pending.len();
        self.pending.retain_mut(|q| {
            if q.deadline.is_some_and(|d| d <= now) {
                metrics::counter!(m::REQUESTS_DROPPED, "reason" => "deadline").increment(1);
                // The caller's future answers DEADLINE_EXCEEDED itself at the deadline;
                // this reply only matters if it polls late. It may be gone: fine.
                let (closed, _) = oneshot::channel();
                let reply = std::mem::replace(&mut q.reply, closed);
                let _ = reply.send(Err(ServeError::DeadlineExceeded(
                    "the deadline passed while the request waited in the queue".into(),
                )));
                false
            } else if q.reply.is_closed() {
                metrics::counter!(m::REQUESTS_DROPPED, "reason" => "cancelled").increment(1);
                false
            } else {
                true
            }
        });
        self.leave(before - self.pending.len());
    }

    /// The oldest request, then those with the closest audio length, under budget.
    /// Requests are never split; they keep their queue order inside the batch.
    fn take_batch(&mut self) -> Vec<Job> {
        let anchor = &self.pending[0];
        let mut order: Vec<usize> = (1..self.pending.len()).collect();
        order.sort_by_key(|&i| (self.pending[i].frames.abs_diff(anchor.frames), i));
        let mut chosen = vec![0];
        let mut samples = anchor.samples.len();
        let mut max_frames = anchor.frames;
        for i in order {
            if samples >= self.policy.max_batch_size {
                break;
            }
            let q = &self.pending[i];
            let n = samples + q.samples.len();
            let frames = max_frames.max(q.frames);
            if n <= self.policy.max_batch_size
                && self.policy.cost(n, frames) <= self.policy.max_cost
            {
                chosen.push(i);
                samples = n;
                max_frames = frames;
            }
        }
        chosen.sort_unstable();
        let now = Instant::now();
        let mut jobs = Vec::with_capacity(chosen.len());
        let mut real_frames = 0;
        for i in chosen.into_iter().rev() {
            let q = self.pending.remove(i);
            metrics::histogram!(m::QUEUE_DURATION).record((now - q.enqueued).as_secs_f64());
            real_frames += q.samples.iter().map(|s| s.frames).sum::<usize>();
            jobs.push(Job {
                samples: q.samples,
                config: q.config,
                reply: q.reply,
            });
        }
        jobs.reverse();
        self.leave(jobs.len());
        metrics::histogram!(m::BATCH_SIZE).record(samples as f64);
        // The batcher decides the padding, so it measures it: frames the model runs
        // over for nothing, as a share of all frames in the padded batch.
        let padded_frames = samples * max_frames;
        if padded_frames > 0 {
            let ratio = (padded_frames - real_frames) as f64 / padded_frames as f64;
            metrics::histogram!(m::BATCH_PADDING_RATIO).record(ratio);
        }
        jobs
    }

    fn leave(&self, n: usize) {
        if n > 0 {
            self.depth.fetch_sub(n, Ordering::AcqRel);
            metrics::gauge!(m::QUEUE_DEPTH).decrement(n as f64);
        }
    }
}
