//! The Train handler: reads the settings and the examples from the request stream,
//! preprocesses examples off the async threads, runs the training on a thread of its
//! own and streams its events back. Model and training code live in
//! [`crate::training`]; this file only converts messages and maps errors.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::service::TrainStream;
use crate::app::{App, Backend};
use crate::engine::ServedModel;
use crate::error::InputError;
use crate::proto;
use crate::proto::train_request::Item;
use crate::store::TrainLock;
use crate::telemetry::metrics as m;
use crate::training::{self, dataset, Example, RunEvent, RunPermit, TrainError, TrainSettings};

/// Examples being preprocessed at once (each on a blocking thread).
const PREPROCESS_IN_FLIGHT: usize = 8;
/// Events buffered for a slow client; progress events beyond it are dropped.
const EVENT_BUFFER: usize = 128;

type EventTx = mpsc::Sender<Result<proto::TrainEvent, Status>>;

pub async fn train(
    app: Arc<App>,
    request: Request<Streaming<proto::TrainRequest>>,
) -> Result<Response<TrainStream>, Status> {
    match start(app, request).await {
        Ok(stream) => Ok(Response::new(stream)),
        Err(e) => {
            record_outcome(e.outcome());
            tracing::info!(error = %e, "training run refused");
            Err(e.into())
        }
    }
}

fn record_outcome(outcome: &'static str) {
    metrics::counter!(m::TRAIN_RUNS, "outcome" => outcome).increment(1);
}

/// Checks the first message, takes the run slot and the store lock, then hands the
/// rest to a task and returns the event stream.
async fn start(
    app: Arc<App>,
    request: Request<Streaming<proto::TrainRequest>>,
) -> Result<TrainStream, TrainError> {
    let backend = app.backend()?.clone();
    let mut stream = request.into_inner();
    let config = match stream.message().await {
        Err(status) => {
            return Err(TrainError::from_stream(
                &status,
                "reading the first message failed",
            ))
        }
        Ok(None) => {
            return Err(TrainError::InvalidArgument(
                "config: the request stream ended before its first message; send a TrainRequest with `config` first".into(),
            ))
        }
        Ok(Some(proto::TrainRequest {
            item: Some(Item::Config(c)),
        })) => c,
        Ok(Some(_)) => {
            return Err(TrainError::InvalidArgument(
                "config: the first message must carry `config` (the run's settings); examples follow it".into(),
            ))
        }
    };
    // Checked before waiting for the slot, so bad settings fail at once.
    TrainSettings::from_proto(&config, &backend.slot.current().config)?;
    let permit = backend.training.acquire(config.queue).await?;
    let base = backend.slot.current();
    let settings = TrainSettings::from_proto(&config, &base.config)?;
    let lock = {
        let backend = backend.clone();
        tokio::task::spawn_blocking(move || training::lock_store(&backend))
            .await
            .map_err(|e| TrainError::Internal(format!("locking the store: {e}")))??
    };
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let run = Run {
        backend,
        base,
        settings,
        permit,
        lock,
        tx,
        draining: app.draining(),
    };
    tokio::spawn(run.drive(stream));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

struct Run {
    backend: Backend,
    base: Arc<ServedModel>,
    settings: TrainSettings,
    // Fields drop in this order: the store lock goes before the run slot, so a run
    // queued for the slot never finds the store still locked by this one.
    lock: TrainLock,
    permit: RunPermit,
    tx: EventTx,
    /// Shutdown stops the run at its next micro-batch: nothing is stored.
    draining: tokio::sync::watch::Receiver<bool>,
}

impl Run {
    async fn drive(self, stream: Streaming<proto::TrainRequest>) {
        let examples = match read_examples(
            &self.backend,
            &self.base,
            stream,
            &self.tx,
            self.draining.clone(),
        )
        .await
        {
            Ok(e) => e,
            Err(e) => {
                record_outcome(e.outcome());
                tracing::info!(error = %e, "training run ended while reading examples");
                // Free the store and the slot before the client hears the run ended.
                let Run {
                    lock, permit, tx, ..
                } = self;
                drop(lock);
                drop(permit);
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let shutting_down = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        {
            // A client that goes away, or a server shutdown, cancels the run at its
            // next micro-batch.
            let (tx, cancel, stop) = (self.tx.clone(), cancel.clone(), shutting_down.clone());
            let mut draining = self.draining.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tx.closed() => cancel.store(true, Ordering::Relaxed),
                    _ = draining.wait_for(|d| *d) => {
                        stop.store(true, Ordering::Relaxed);
                        cancel.store(true, Ordering::Relaxed);
                    }
                    _ = done_rx => {}
                }
            });
        }
        let Run {
            backend,
            base,
            settings,
            permit,
            lock,
            tx,
            draining: _,
        } = self;
        let threads = backend.training.threads;
        let report = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("fusion-train".into())
            .spawn(move || {
                let mut emit = |e: RunEvent| send_event(&tx, e);
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    training::run_blocking(
                        &backend, &lock, base, settings, examples, threads, cancel, &mut emit,
                    )
                }))
                .unwrap_or_else(|p| {
                    Err(TrainError::Internal(format!(
                        "the training thread panicked: {}",
                        crate::error::panic_message(p.as_ref())
                    )))
                });
                // Free the slot and the store before the last event, so a client that
                // starts its next run as soon as it reads it is not refused.
                drop(done_tx);
                drop(lock);
                drop(permit);
                match result {
                    Ok(f) => {
                        record_outcome("succeeded");
                        let event = proto::train_event::Event::Finished(proto::TrainFinished {
                            model_version: f.version,
                            path: f.path,
                            activated: f.activated,
                            epochs_completed: f.epochs_completed as u32,
                            final_train_loss: f.final_train_loss,
                            validation: f.validation.map(validation),
                            train_seconds: f.train_seconds,
                        });
                        let _ = tx.blocking_send(Ok(proto::TrainEvent { event: Some(event) }));
                    }
                    Err(e) => {
                        let e = match e {
                            TrainError::Cancelled(_) if shutting_down.load(Ordering::Relaxed) => {
                                self::shutting_down()
                            }
                            e => e,
                        };
                        record_outcome(e.outcome());
                        if e.code() == tonic::Code::Internal {
                            tracing::error!(error = %e, "training run failed");
                        } else {
                            tracing::info!(error = %e, "training run ended");
                        }
                        let _ = tx.blocking_send(Err(e.into()));
                    }
                }
            });
        match spawned {
            Ok(_) => drop(report),
            Err(e) => {
                record_outcome("failed");
                tracing::error!(error = %e, "cannot start the training thread");
                let _ = report
                    .send(Err(Status::internal(format!(
                        "cannot start the training thread: {e}; nothing was trained"
                    ))))
                    .await;
            }
        }
    }
}

fn shutting_down() -> TrainError {
    TrainError::Serve(crate::error::ServeError::Unavailable(
        "the server is shutting down: the run was stopped and nothing was stored; retry on another replica".into(),
    ))
}

/// Sends one event; false once the client has gone. Progress events are dropped
/// rather than waited for when the client reads slowly.
fn send_event(tx: &EventTx, e: RunEvent) -> bool {
    use proto::train_event::Event as E;
    let (event, droppable) = match e {
        RunEvent::Started {
            run_id,
            train_examples,
            validation_examples,
            base_version,
            total_steps,
        } => (
            E::Started(proto::TrainStarted {
                run_id,
                train_examples: train_examples as u32,
                validation_examples: validation_examples as u32,
                base_version,
                total_steps: total_steps as u32,
            }),
            false,
        ),
        RunEvent::Loop(training::Event::Progress {
            epoch,
            step,
            total_steps,
            running_loss,
            examples_per_second,
            eta_seconds,
        }) => (
            E::Progress(proto::TrainProgress {
                epoch: epoch as u32,
                step: step as u32,
                total_steps: total_steps as u32,
                running_loss,
                examples_per_second,
                eta_seconds,
            }),
            true,
        ),
        RunEvent::Loop(training::Event::Validation(v)) => (E::Validation(validation(v)), false),
    };
    let msg = Ok(proto::TrainEvent { event: Some(event) });
    if droppable {
        !matches!(tx.try_send(msg), Err(mpsc::error::TrySendError::Closed(_)))
    } else {
        tx.blocking_send(msg).is_ok()
    }
}

pub fn validation(v: training::Validation) -> proto::ValidationResult {
    proto::ValidationResult {
        epoch: v.epoch as u32,
        loss: v.loss,
        accuracy: v.accuracy,
        per_class_accuracy: v.per_class_accuracy,
        per_class_count: v.per_class_count,
    }
}

type Pending = JoinHandle<Result<Example, InputError>>;

/// Reads every example: labels checked at once, samples converted and preprocessed on
/// blocking threads, a few at a time, counted against the memory limit.
async fn read_examples(
    backend: &Backend,
    base: &Arc<ServedModel>,
    mut stream: Streaming<proto::TrainRequest>,
    tx: &EventTx,
    mut draining: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Example>, TrainError> {
    let limit = backend.training.max_example_bytes;
    let mut held = 0usize;
    let mut examples = Vec::new();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut index = 0usize;
    loop {
        if tx.is_closed() {
            return Err(TrainError::Cancelled(
                "the client cancelled the run while sending examples".into(),
            ));
        }
        // A shutdown must not wait for a client that streams slowly (or never ends),
        // nor may a stalled client hold the slot and the store's lock.
        let idle = backend.training.idle_timeout;
        let next = tokio::select! {
            m = stream.message() => m,
            _ = draining.wait_for(|d| *d) => return Err(shutting_down()),
            _ = tokio::time::sleep(idle) => return Err(TrainError::IdleTimeout(format!(
                "examples[{index}]: nothing arrived for {idle:.0?} (--train-idle-timeout-secs); the run was stopped and nothing was trained"
            ))),
        };
        let message = match next {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(status) => {
                return Err(TrainError::from_stream(
                    &status,
                    &format!("examples[{index}]: the request stream failed"),
                ))
            }
        };
        let example = match message.item {
            Some(Item::Example(e)) => e,
            Some(Item::Config(_)) => {
                return Err(TrainError::Input(InputError::new(
                    format!("examples[{index}]"),
                    "`config` may only be sent in the first message",
                )))
            }
            None => {
                return Err(TrainError::Input(InputError::new(
                    format!("examples[{index}]"),
                    "empty message: set `example`",
                )))
            }
        };
        let target = dataset::target(index, &example, &base.config)?;
        let Some(sample) = example.sample else {
            return Err(TrainError::Input(InputError::new(
                format!("examples[{index}].sample"),
                "missing: set the sample (an image and an audio clip, as for Predict)",
            )));
        };
        let preprocessor = base.preprocessor.clone();
        let is_validation = example.validation;
        let i = index;
        pending.push_back(tokio::task::spawn_blocking(move || {
            let raw = convert::sample(i, sample).map_err(|e| dataset::example_field(i, e))?;
            let prepared = preprocessor
                .prepare(i, &raw)
                .map_err(|e| dataset::example_field(i, e))?;
            Ok(Example {
                sample: prepared,
                target,
                validation: is_validation,
            })
        }));
        index += 1;
        while pending.len() >= PREPROCESS_IN_FLIGHT {
            take_one(&mut pending, &mut examples, &mut held, limit).await?;
        }
    }
    while !pending.is_empty() {
        take_one(&mut pending, &mut examples, &mut held, limit).await?;
    }
    if examples.is_empty() {
        return Err(TrainError::InvalidArgument(
            "examples: the stream held no examples after `config`; send at least two".into(),
        ));
    }
    Ok(examples)
}

async fn take_one(
    pending: &mut VecDeque<Pending>,
    examples: &mut Vec<Example>,
    held: &mut usize,
    limit: usize,
) -> Result<(), TrainError> {
    let Some(handle) = pending.pop_front() else {
        return Ok(());
    };
    let example = handle
        .await
        .map_err(|e| TrainError::Internal(format!("preprocessing task failed: {e}")))??;
    *held += example.bytes();
    if *held > limit {
        return Err(TrainError::ResourceExhausted(format!(
            "examples[{}]: the preprocessed examples of this run need more than the limit of {limit} bytes (--train-max-example-bytes / FUSION_TRAIN_MAX_EXAMPLE_BYTES); send fewer or shorter examples, or raise the limit",
            examples.len()
        )));
    }
    examples.push(example);
    Ok(())
}
