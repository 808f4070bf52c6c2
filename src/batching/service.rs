use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tower::Service;

use super::worker::{BatchRunner, Queued, Worker};
use super::{BatchPolicy, InferRequest};
use crate::engine::InferResponse;
use crate::error::ServeError;
use crate::telemetry::metrics as m;

/// The batching service: `call` enqueues and the future resolves with this request's
/// own results. Never waits for room: a full queue is refused at once.
///
/// Dropping the future cancels the request: the worker drops it before it reaches
/// the model.
#[derive(Clone)]
pub struct BatchService {
    tx: mpsc::UnboundedSender<Queued>,
    depth: Arc<AtomicUsize>,
    max_queue: usize,
}

impl BatchService {
    /// Spawns the worker on the current tokio runtime.
    pub fn new<S: BatchRunner>(inner: S, policy: BatchPolicy) -> Self {
        // Unbounded channel, bounded by `depth`: admission is decided in `call`
        // without waiting, which a bounded channel's permit could not do.
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let max_queue = policy.max_queue;
        // Export the series at 0 before anything happens, so rates and alerts on them
        // work from the first scrape.
        metrics::gauge!(m::QUEUE_DEPTH).increment(0.0);
        for reason in ["deadline", "cancelled", "overloaded"] {
            metrics::counter!(m::REQUESTS_DROPPED, "reason" => reason).increment(0);
        }
        tokio::spawn(Worker::new(inner, policy, rx, depth.clone()).run());
        Self {
            tx,
            depth,
            max_queue,
        }
    }

    /// Requests admitted and not yet sent to the model (or dropped).
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }
}

pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<InferResponse, ServeError>> + Send>>;

impl Service<InferRequest> for BatchService {
    type Response = InferResponse;
    type Error = ServeError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ServeError>> {
        // Load shedding: readiness never waits; `call` refuses when the queue is full.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: InferRequest) -> ResponseFuture {
        let max = self.max_queue;
        let admitted = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < max).then_some(d + 1)
            })
            .is_ok();
        if !admitted {
            metrics::counter!(m::REQUESTS_DROPPED, "reason" => "overloaded").increment(1);
            return Box::pin(std::future::ready(Err(ServeError::Overloaded(format!(
                "the request queue is full ({max} requests waiting, the limit); retry with backoff"
            )))));
        }
        metrics::gauge!(m::QUEUE_DEPTH).increment(1.0);
        let deadline = request.deadline.map(tokio::time::Instant::from_std);
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Queued::new(request, reply)).is_err() {
            self.depth.fetch_sub(1, Ordering::AcqRel);
            metrics::gauge!(m::QUEUE_DEPTH).decrement(1.0);
            return Box::pin(std::future::ready(Err(ServeError::Unavailable(
                "the batching worker has stopped".into(),
            ))));
        }
        let answer = async move {
            answer.await.unwrap_or_else(|_| {
                Err(ServeError::Internal(
                    "the batch failed before this request was answered".into(),
                ))
            })
        };
        Box::pin(async move {
            match deadline {
                None => answer.await,
                // Answer at the deadline even while the model is busy with another
                // batch; the worker counts and drops the request when it next looks.
                Some(d) => tokio::time::timeout_at(d, answer)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ServeError::DeadlineExceeded(
                            "the deadline passed while the request waited for the model".into(),
                        ))
                    }),
            }
        })
    }
}
