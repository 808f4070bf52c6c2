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
#[derive(Clone)]
pub struct BatchService {
    tx: mpsc::UnboundedSender<Queued>,
    depth: Arc<AtomicUsize>,
    max_queue: usize,
}

impl BatchService {
    pub fn new<S: BatchRunner>(inner: S, policy: BatchPolicy) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let max_queue = policy.max_queue;
        tokio::spawn(Worker::new(inner, policy, rx, depth.clone()).run());
        Self {
            tx,
            depth,
            max_queue,
        }
    }

    /// Requests waiting now.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
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
        let (reply, answer) = oneshot::channel();
        let admitted = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < self.max_queue).then_some(d + 1)
            })
            .is_ok();
        if !admitted {
            metrics::counter!(m::REQUESTS_DROPPED, "reason" => "overloaded").increment(1);
            let max = self.max_queue;
            return Box::pin(async move {
                Err(ServeError::Overloaded(format!(
                    "the request queue is full ({max} requests waiting); retry with backoff"
                )))
            });
        }
        metrics::gauge!(m::QUEUE_DEPTH).increment(1.0);
        let queued = Queued::new(request, reply);
        if self.tx.send(queued).is_err() {
            self.depth.fetch_sub(1, Ordering::AcqRel);
            metrics::gauge!(m::QUEUE_DEPTH).decrement(1.0);
            return Box::pin(async {
                Err(ServeError::Unavailable(
                    "the batching worker has stopped".into(),
                ))
            });
        }
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                Err(ServeError::Internal(
                    "the request was dropped without an answer".into(),
                ))
            })
        })
    }
}
