use tower::Layer;

use super::{BatchPolicy, BatchService};

/// Wraps a one-batch-at-a-time service into a batching service of single requests.
#[derive(Clone, Debug)]
pub struct BatchLayer {
    policy: BatchPolicy,
}

impl BatchLayer {
    pub fn new(policy: BatchPolicy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for BatchLayer
where
    S: super::worker::BatchRunner,
{
    type Service = BatchService;

    fn layer(&self, inner: S) -> BatchService {
        BatchService::new(inner, self.policy.clone())
    }
}
