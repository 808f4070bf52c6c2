//! Dynamic batching as a tower middleware.
//!
//! [`BatchLayer`] wraps a service that runs one batch at a time (the engine) and turns
//! it into a service of single requests. Requests wait in a bounded queue owned by one
//! worker task; when the inner service is free the worker builds the next batch: the
//! oldest request first, then the waiting requests whose audio length is closest to
//! it, under the sample and cost budgets. Requests whose deadline passed or whose
//! client went away are answered or dropped before they cost model time.
//!
//! Time is read from tokio's clock (so tests can pause it); outside paused tests it is
//! the same as `std::time::Instant`.

mod layer;
mod service;
mod worker;

pub use layer::BatchLayer;
pub use service::{BatchService, ResponseFuture};
pub use worker::BatchRunner;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::ModelConfig;
use crate::preprocess::PreparedSample;

/// One request for the model: its samples (never split across batches), the config
/// they were preprocessed for, and the time by which the client wants an answer.
pub struct InferRequest {
    pub samples: Vec<PreparedSample>,
    pub config: Arc<ModelConfig>,
    pub deadline: Option<Instant>,
}

/// The batching knobs.
#[derive(Clone, Debug)]
pub struct BatchPolicy {
    /// Most samples in one batch; a request larger than this runs alone.
    pub max_batch_size: usize,
    /// How long a small batch may wait for company while the model is idle.
    pub max_delay: Duration,
    /// Budget of one batch: sum over samples of image pixels + padded audio frames.
    /// A single request over budget still runs, alone.
    pub max_cost: u64,
    /// Most requests waiting; past it new requests are refused.
    pub max_queue: usize,
    /// Image pixels per sample (the same for every sample of a model).
    pub image_pixels: u64,
}

impl BatchPolicy {
    /// Cost of a batch of `samples` samples whose longest clip has `max_frames` frames.
    pub fn cost(&self, samples: usize, max_frames: usize) -> u64 {
        samples as u64 * (self.image_pixels + max_frames as u64)
    }
}
