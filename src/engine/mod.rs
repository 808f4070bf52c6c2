//! The model thread: collates a batch, runs one forward pass, and scatters the
//! results back, one reply per request. Forward passes never run on async threads.
//!
//! The served model is read once per batch from the [`ModelSlot`], so every request
//! in a batch (and every sample in a request) sees the same model version, and a
//! swap never interrupts a batch already running.

mod collate;
mod slot;

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::model::ModelConfig;
use crate::preprocess::PreparedSample;

pub use collate::{collate, Collated};
pub use slot::{ModelMeta, ModelSlot, ServedModel};

/// The model's output for one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutput {
    pub image: Vec<f32>,
    pub audio: Vec<f32>,
    pub fused: Vec<f32>,
    pub logits: Vec<f32>,
}

/// The answer to one request: its samples' outputs in order, and who produced them.
#[derive(Clone, Debug)]
pub struct InferResponse {
    pub version: String,
    pub outputs: Vec<SampleOutput>,
    /// Samples in the forward pass this request rode in.
    pub batch_samples: usize,
    /// Time spent in the forward pass.
    pub inference: Duration,
}

/// One request's part of a batch: its samples and where to send the answer.
pub struct Job {
    pub samples: Vec<PreparedSample>,
    /// The config the samples were preprocessed for (image size, normalisation, mel
    /// settings, labels): a job only runs on a model with the same one.
    pub config: Arc<ModelConfig>,
    pub reply: oneshot::Sender<Result<InferResponse, ServeError>>,
}

/// Statistics of one executed batch, for metrics and the batcher.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    pub samples: usize,
    pub inference: Duration,
}

struct Work {
    jobs: Vec<Job>,
    done: oneshot::Sender<BatchStats>,
}

/// Handle to the model thread. Cloning it shares the thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Work>,
}

impl Engine {
    /// Starts the model thread. It runs until every handle is dropped.
    pub fn spawn(slot: ModelSlot) -> Self {
        let (tx, rx) = mpsc::channel::<Work>();
        std::thread::Builder::new()
            .name("fusion-model".into())
            .spawn(move || {
                while let Ok(work) = rx.recv() {
                    let stats = run_batch(&slot, work.jobs);
                    let _ = work.done.send(stats);
                }
            })
            .expect("spawning the model thread");
        Self { tx }
    }

    /// Runs the jobs as one forward pass; resolves when every reply has been sent.
    pub async fn run(&self, jobs: Vec<Job>) -> Result<BatchStats, ServeError> {
        let (done, finished) = oneshot::channel();
        self.tx
            .send(Work { jobs, done })
            .map_err(|_| ServeError::Unavailable("the model thread has stopped".into()))?;
        finished
            .await
            .map_err(|_| ServeError::Internal("the model thread died during a batch".into()))
    }
}

/// Runs one batch on the model that is current now and answers every job.
fn run_batch(slot: &ModelSlot, jobs: Vec<Job>) -> BatchStats {
    let model = slot.current();
    // A swap to a model with other inputs or labels between a request's preprocessing
    // and its batch: its samples would be wrong for this model, so it is refused
    // (the client retries and is prepared afresh); the rest of the batch runs.
    let (jobs, stale): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| Arc::ptr_eq(&j.config, &model.config) || *j.config == *model.config);
    for job in stale {
        let _ = job.reply.send(Err(ServeError::Aborted(format!(
            "the served model changed to {} (other input settings or labels) while this \
             request waited in the queue; send it again",
            model.version
        ))));
    }
    let sizes: Vec<usize> = jobs.iter().map(|j| j.samples.len()).collect();
    let samples: Vec<&PreparedSample> = jobs.iter().flat_map(|j| j.samples.iter()).collect();
    let started = Instant::now();
    // A panic inside candle must not take the thread (and the service) down.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(&model, &samples)))
            .unwrap_or_else(|p| {
                Err(ServeError::Internal(format!(
                    "forward pass panicked: {}",
                    crate::error::panic_message(p.as_ref())
                )))
            });
    let inference = started.elapsed();
    let stats = BatchStats {
        samples: samples.len(),
        inference,
    };
    match result {
        Ok(outputs) => {
            let mut outputs = outputs.into_iter();
            for (job, n) in jobs.into_iter().zip(sizes) {
                let response = InferResponse {
                    version: model.version.clone(),
                    outputs: outputs.by_ref().take(n).collect(),
                    batch_samples: stats.samples,
                    inference,
                };
                let _ = job.reply.send(Ok(response));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, samples = stats.samples, "forward pass failed");
            for job in jobs {
                let _ = job.reply.send(Err(ServeError::Internal(format!(
                    "forward pass failed: {e}"
                ))));
            }
        }
    }
    stats
}

/// One forward pass over `samples`; outputs in the same order.
pub fn forward(
    model: &ServedModel,
    samples: &[&PreparedSample],
) -> Result<Vec<SampleOutput>, ServeError> {
    if samples.is_empty() {
        return Ok(Vec::new());
    }
    let batch = collate(samples, &model.config, &model.device)?;
    let (images, audio) = (
        batch.images.to_dtype(model.dtype)?,
        batch.audio.to_dtype(model.dtype)?,
    );
    let out = model
        .model
        .forward_t(&images, &audio, &batch.lengths, false)?;
    let rows = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>();
    let image = rows(&out.image)?;
    let audio = rows(&out.audio)?;
    let fused = rows(&out.fused)?;
    let logits = rows(&out.logits)?;
    Ok(image
        .into_iter()
        .zip(audio)
        .zip(fused)
        .zip(logits)
        .map(|(((image, audio), fused), logits)| SampleOutput {
            image,
            audio,
            fused,
            logits,
        })
        .collect())
}

/// The engine as a tower service of whole batches: what the batching layer wraps.
impl tower::Service<Vec<Job>> for Engine {
    type Response = BatchStats;
    type Error = ServeError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<BatchStats, ServeError>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ServeError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, jobs: Vec<Job>) -> Self::Future {
        let engine = self.clone();
        Box::pin(async move { engine.run(jobs).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::InputLimits;
    use candle_core::{DType, Device};

    fn job(
        model: &ServedModel,
        config: Arc<ModelConfig>,
    ) -> (Job, oneshot::Receiver<Result<InferResponse, ServeError>>) {
        let (reply, answer) = oneshot::channel();
        let samples = vec![crate::watcher::warmup_sample(model)];
        (
            Job {
                samples,
                config,
                reply,
            },
            answer,
        )
    }

    #[tokio::test]
    async fn a_request_prepared_for_another_config_is_aborted_alone() {
        let limits = InputLimits {
            max_image_pixels: 1 << 20,
            max_audio_seconds: 10.0,
        };
        let model = crate::loader::builtin(&Device::Cpu, DType::F32, &limits).unwrap();
        // Same config in another allocation (a reloaded version): runs.
        let same = Arc::new((*model.config).clone());
        // Prepared for a model with other labels (swapped in since): refused.
        let mut other = (*model.config).clone();
        other.labels[0] = "zero".into();
        let (a, a_answer) = job(&model, model.config.clone());
        let (b, b_answer) = job(&model, Arc::new(other));
        let (c, c_answer) = job(&model, same);
        let engine = Engine::spawn(ModelSlot::new(model));
        let stats = engine.run(vec![a, b, c]).await.unwrap();
        assert_eq!(stats.samples, 2, "the refused job is not computed");
        let a = a_answer.await.unwrap().unwrap();
        let c = c_answer.await.unwrap().unwrap();
        assert_eq!(a.outputs, c.outputs);
        let e = b_answer.await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(e.to_string().contains("send it again"), "{e}");
    }
}
