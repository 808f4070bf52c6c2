//! Shared state of a running service: limits, and the backend once it is ready.

use std::sync::{Arc, OnceLock};

use crate::batching::BatchService;
use crate::engine::ModelSlot;
use crate::error::ServeError;
use crate::preprocess::InputLimits;
use crate::store::ModelStore;
use crate::training::TrainManager;
use candle_core::{DType, Device};

/// Per-request limits checked by the handlers.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    pub max_samples_per_request: usize,
    /// Requests being decoded and preprocessed at once.
    pub max_concurrent_preprocess: usize,
    pub max_message_bytes: usize,
    pub input: InputLimits,
}

/// What serves requests once the model is loaded and warm.
#[derive(Clone)]
pub struct Backend {
    pub slot: ModelSlot,
    pub batcher: BatchService,
    /// Where trained versions go and where the served one comes from.
    pub store: Arc<ModelStore>,
    pub device: Device,
    /// The served model's number format (`--dtype`).
    pub dtype: DType,
    pub input_limits: InputLimits,
    /// One Train run at a time, and its limits.
    pub training: Arc<TrainManager>,
}

pub struct App {
    pub limits: RequestLimits,
    /// Permits to decode and preprocess a request (`limits.max_concurrent_preprocess`).
    pub preprocess: Arc<tokio::sync::Semaphore>,
    backend: OnceLock<Backend>,
    /// Flips to true once on SIGTERM/SIGINT; training runs watch it.
    draining: tokio::sync::watch::Sender<bool>,
}

impl App {
    pub fn new(limits: RequestLimits) -> Arc<Self> {
        Arc::new(Self {
            preprocess: Arc::new(tokio::sync::Semaphore::new(
                limits.max_concurrent_preprocess.max(1),
            )),
            limits,
            backend: OnceLock::new(),
            draining: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Makes the service ready. Called once, after the warm-up batch.
    pub fn set_ready(&self, backend: Backend) {
        let _ = self.backend.set(backend);
    }

    pub fn backend(&self) -> Result<&Backend, ServeError> {
        self.backend.get().ok_or_else(|| {
            ServeError::Unavailable("the model is still loading; retry shortly".into())
        })
    }

    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves once shutdown has begun.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }
}
