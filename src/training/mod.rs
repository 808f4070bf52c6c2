//! Training while serving: a run's settings, its examples held preprocessed in
//! memory, the loop on its own thread and variables, then the new version written to
//! the store, loaded fresh, warmed up and swapped in.
//!
//! - [`settings`]: `TrainConfig` -> validated [`TrainSettings`].
//! - [`dataset`]: labels, validation split, batches, augmentation.
//! - [`trainer`]: the loop (AdamW, accumulation, early stopping, divergence checks).
//! - [`publish`]: the version written atomically, loaded, warmed up, swapped in.
//!
//! [`TrainManager`] lets one run happen at a time in this process; the store's
//! `train.lock` does the same across processes sharing a store.

pub mod dataset;
pub mod publish;
pub mod settings;
pub mod trainer;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use tonic::{Code, Status};

use crate::app::Backend;
use crate::engine::ServedModel;
use crate::error::{InputError, ServeError};
use crate::loader;
use crate::store::TrainLock;
use crate::weights;

pub use dataset::{Example, Target};
pub use settings::TrainSettings;
pub use trainer::{Event, Validation};

/// Why a run did not finish; [`From<TrainError> for Status`] is its one mapping.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Input(#[from] InputError),
    /// Another run holds this process's run slot or the store's training lock.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// NaN or infinite loss or weights.
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("{0}")]
    Cancelled(String),
    /// The client stopped sending examples for longer than the idle timeout.
    #[error("{0}")]
    IdleTimeout(String),
    /// A message the client sent could not be read: malformed or over the size limit.
    #[error("{message}")]
    BadMessage { code: Code, message: String },
    #[error("{}", .0.message())]
    Serve(#[from] ServeError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl TrainError {
    pub fn code(&self) -> Code {
        match self {
            TrainError::InvalidArgument(_) | TrainError::Input(_) => Code::InvalidArgument,
            TrainError::Busy(_) => Code::FailedPrecondition,
            TrainError::ResourceExhausted(_) => Code::ResourceExhausted,
            TrainError::Diverged(_) => Code::Aborted,
            TrainError::Cancelled(_) => Code::Cancelled,
            TrainError::IdleTimeout(_) => Code::DeadlineExceeded,
            TrainError::BadMessage { code, .. } => *code,
            TrainError::Serve(e) => e.code(),
            TrainError::Internal(_) => Code::Internal,
        }
    }

    /// The request stream failed at `what`: a message the client got wrong keeps its
    /// status (INVALID_ARGUMENT for bytes that are not protobuf, OUT_OF_RANGE or
    /// RESOURCE_EXHAUSTED for one over the size limit); anything else is the
    /// connection going away, which cancels the run.
    pub fn from_stream(status: &Status, what: &str) -> Self {
        let message = format!("{what}: {}", status.message());
        match status.code() {
            code @ (Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted) => {
                TrainError::BadMessage { code, message }
            }
            _ => TrainError::Cancelled(message),
        }
    }

    /// The `outcome` label of `fusion_train_runs_total` for a run that ended so.
    pub fn outcome(&self) -> &'static str {
        match self.code() {
            // A client that stalls has abandoned the run as much as one that leaves.
            Code::Cancelled | Code::DeadlineExceeded => "cancelled",
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::OutOfRange => "rejected",
            _ => "failed",
        }
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Internal(format!("model error: {e}"))
    }
}

impl From<weights::WeightsError> for TrainError {
    fn from(e: weights::WeightsError) -> Self {
        TrainError::Internal(format!("weights: {e}"))
    }
}

impl From<TrainError> for Status {
    fn from(e: TrainError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// One run at a time in this process; the limit on held examples.
#[derive(Debug)]
pub struct TrainManager {
    slot: Arc<tokio::sync::Mutex<()>>,
    /// Most bytes of preprocessed examples one run may hold.
    pub max_example_bytes: usize,
    /// Threads of each run's own rayon pool.
    pub threads: usize,
    /// Longest wait for the client's next message while it streams examples: a
    /// stalled client must not hold the run slot and the store's lock for ever.
    pub idle_timeout: std::time::Duration,
}

/// Held for the whole run; dropping it lets the next run start.
pub struct RunPermit {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl TrainManager {
    pub fn new(max_example_bytes: usize, idle_timeout: std::time::Duration) -> Self {
        Self {
            slot: Arc::new(tokio::sync::Mutex::new(())),
            max_example_bytes,
            idle_timeout,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The run slot: at once, or after the running run if `queue`.
    pub async fn acquire(&self, queue: bool) -> Result<RunPermit, TrainError> {
        let guard = if queue {
            self.slot.clone().lock_owned().await
        } else {
            self.slot.clone().try_lock_owned().map_err(|_| {
                TrainError::Busy(
                    "another training run is in progress on this server; wait for it to finish or set config.queue to wait for it".into(),
                )
            })?
        };
        Ok(RunPermit { _guard: guard })
    }
}

/// The store's training lock, or FAILED_PRECONDITION naming the store.
pub fn lock_store(backend: &Backend) -> Result<TrainLock, TrainError> {
    let store = &backend.store;
    match store.try_lock_training() {
        Ok(Some(lock)) => {
            store.remove_leftovers(&lock);
            Ok(lock)
        }
        Ok(None) => Err(TrainError::Busy(format!(
            "the model store {} is locked for training by another process ({}); only one process may train into a store at a time",
            store.root().display(),
            store.root().join(crate::store::LOCK_FILE).display()
        ))),
        Err(e) => Err(TrainError::Internal(format!(
            "cannot take the training lock of the model store {}: {e:#}",
            store.root().display()
        ))),
    }
}

/// What a successful run reports last.
#[derive(Clone, Debug)]
pub struct Finished {
    pub version: String,
    pub path: String,
    pub activated: bool,
    pub epochs_completed: usize,
    pub final_train_loss: f32,
    pub validation: Option<Validation>,
    pub train_seconds: f32,
}

/// What the run reports, in order: `Started`, then the loop's events.
#[derive(Clone, Debug)]
pub enum RunEvent {
    Started {
        run_id: String,
        train_examples: usize,
        validation_examples: usize,
        base_version: String,
        total_steps: usize,
    },
    Loop(Event),
}

/// A whole run on the calling (dedicated, blocking) thread: the split, the starting
/// weights copied from the served version, the loop, then [`publish::publish`].
/// Nothing is stored or served unless every step succeeds.
#[allow(clippy::too_many_arguments)]
pub fn run_blocking(
    backend: &Backend,
    lock: &TrainLock,
    base: Arc<ServedModel>,
    settings: TrainSettings,
    examples: Vec<Example>,
    threads: usize,
    cancel: Arc<AtomicBool>,
    emit: &mut (dyn FnMut(RunEvent) -> bool + Send),
) -> Result<Finished, TrainError> {
    let (train, validation) = dataset::split(examples, settings.validation_fraction, settings.seed);
    let config = (*base.config).clone();
    let varmap = on_device(starting_weights(&base)?, &backend.device)?;
    let run_id = format!("run-{}-{}", publish::unix_seconds(), std::process::id());
    let total_steps = trainer::steps_per_epoch(train.len(), &settings) * settings.epochs;
    let (n_train, n_val) = (train.len(), validation.len());
    emit(RunEvent::Started {
        run_id: run_id.clone(),
        train_examples: n_train,
        validation_examples: n_val,
        base_version: base.version.clone(),
        total_steps,
    });
    tracing::info!(%run_id, train = n_train, validation = n_val, base = %base.version, "training started");
    let job = trainer::TrainJob {
        settings: settings.clone(),
        config: config.clone(),
        varmap,
        train,
        validation,
        cancel,
        threads,
        device: backend.device.clone(),
    };
    let outcome = trainer::run(job, &mut |e| emit(RunEvent::Loop(e)))?;
    publish::publish(
        backend,
        lock,
        &base,
        &config,
        &settings,
        outcome,
        (n_train, n_val),
    )
}

/// `varmap` with every variable moved to `device` (training runs where serving does).
fn on_device(varmap: candle_nn::VarMap, device: &Device) -> Result<candle_nn::VarMap, TrainError> {
    if device.is_cpu() {
        return Ok(varmap);
    }
    let moved = candle_nn::VarMap::new();
    {
        let from = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut to = moved.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, var) in from.iter() {
            to.insert(
                name.clone(),
                candle_core::Var::from_tensor(&var.as_tensor().to_device(device)?)?,
            );
        }
    }
    Ok(moved)
}

/// A fresh `VarMap` with the served version's weights, read again from disk (or the
/// built-in model's seeded weights): never the served variables themselves.
fn starting_weights(base: &ServedModel) -> Result<candle_nn::VarMap, TrainError> {
    if base.version == loader::BUILTIN_VERSION {
        return Ok(weights::init_random(&base.config, loader::BUILTIN_SEED)?);
    }
    let loaded = weights::load_dir(&base.meta.source)?;
    if loaded.config != *base.config {
        return Err(TrainError::Internal(format!(
            "the served version {}'s directory {} now holds a different model config",
            base.version, base.meta.source
        )));
    }
    Ok(loaded.to_varmap()?)
}
