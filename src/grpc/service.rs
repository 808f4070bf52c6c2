//! `fusion.v1.FusionService`: converts messages, checks request-level limits, and
//! maps errors. No model code here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tower::{Service, ServiceExt};

use super::{convert, deadline};
use crate::app::App;
use crate::batching::InferRequest;
use crate::engine::{InferResponse, ServedModel};
use crate::error::ServeError;
use crate::preprocess::PreparedSample;
use crate::proto;
use crate::proto::fusion_service_server::FusionService;
use crate::telemetry::metrics as m;

pub struct FusionApi {
    app: Arc<App>,
}

impl FusionApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    /// Preprocess (off the async threads), queue for a batch, wait for the answer.
    async fn infer(
        &self,
        samples: Vec<proto::Sample>,
        deadline: Option<Instant>,
    ) -> Result<(Arc<ServedModel>, InferResponse), ServeError> {
        let backend = self.app.backend()?;
        let max = self.app.limits.max_samples_per_request;
        if samples.is_empty() {
            return Err(ServeError::InvalidRequest(
                "samples: the request has no samples; send at least one".into(),
            ));
        }
        if samples.len() > max {
            return Err(ServeError::InvalidRequest(format!(
                "samples: {} samples in one request, at most {max} are allowed",
                samples.len()
            )));
        }
        let model = backend.slot.current();
        let prepared =
            with_deadline(deadline, async {
                // Decoded images can be large: only so many requests decode at once.
                let _permit =
                    self.app.preprocess.acquire().await.map_err(|_| {
                        ServeError::Unavailable("the server is shutting down".into())
                    })?;
                preprocess(model.clone(), samples).await
            })
            .await??;
        let mut batcher = backend.batcher.clone();
        let request = InferRequest {
            samples: prepared,
            config: model.config.clone(),
            deadline,
        };
        let answer = with_deadline(deadline, async move {
            batcher.ready().await?.call(request).await
        })
        .await??;
        Ok((model, answer))
    }
}

async fn preprocess(
    model: Arc<ServedModel>,
    samples: Vec<proto::Sample>,
) -> Result<Vec<PreparedSample>, ServeError> {
    let started = Instant::now();
    let prepared = tokio::task::spawn_blocking(move || {
        samples
            .into_iter()
            .enumerate()
            .map(|(i, s)| model.preprocessor.prepare(i, &convert::sample(i, s)?))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ServeError::Internal(format!("preprocessing task failed: {e}")))?;
    metrics::histogram!(m::PREPROCESS_DURATION).record(started.elapsed().as_secs_f64());
    Ok(prepared?)
}

async fn with_deadline<T>(
    deadline: Option<Instant>,
    fut: impl Future<Output = T>,
) -> Result<T, ServeError> {
    match deadline {
        None => Ok(fut.await),
        Some(d) => tokio::time::timeout_at(d.into(), fut).await.map_err(|_| {
            ServeError::DeadlineExceeded(
                "the request's deadline passed before it was answered".into(),
            )
        }),
    }
}

/// Records the request's metrics around a handler.
async fn observe<T>(
    rpc: &'static str,
    samples: usize,
    fut: impl Future<Output = Result<T, ServeError>>,
) -> Result<Response<T>, Status> {
    let mut inflight = InFlight::start(rpc);
    metrics::counter!(m::SAMPLES, "rpc" => rpc).increment(samples as u64);
    let result = fut.await;
    inflight.code = Some(match &result {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    });
    drop(inflight);
    match result {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            if e.code() == tonic::Code::Internal {
                tracing::error!(rpc, error = %e, "request failed");
            } else {
                tracing::debug!(rpc, error = %e, "request refused");
            }
            Err(e.into())
        }
    }
}

/// One request in flight. Its metrics are recorded on drop because tonic drops the
/// handler's future when the client goes away: such a request still leaves the
/// in-flight gauge and is counted, as CANCELLED.
struct InFlight {
    rpc: &'static str,
    started: Instant,
    code: Option<tonic::Code>,
}

impl InFlight {
    fn start(rpc: &'static str) -> Self {
        metrics::gauge!(m::INFLIGHT_REQUESTS).increment(1.0);
        Self {
            rpc,
            started: Instant::now(),
            code: None,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let code = code_name(self.code.unwrap_or(tonic::Code::Cancelled));
        metrics::gauge!(m::INFLIGHT_REQUESTS).decrement(1.0);
        metrics::counter!(m::REQUESTS, "rpc" => self.rpc, "code" => code).increment(1);
        metrics::histogram!(m::REQUEST_DURATION, "rpc" => self.rpc)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// The canonical upper-case status name, as grpcurl and other clients print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

pub type TrainStream = Pin<Box<dyn Stream<Item = Result<proto::TrainEvent, Status>> + Send>>;

/// A Train event stream that records the run as a request when it ends.
struct ObservedRun {
    events: TrainStream,
    inflight: Option<InFlight>,
}

impl Stream for ObservedRun {
    type Item = Result<proto::TrainEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let next = self.events.as_mut().poll_next(cx);
        let ended = match &next {
            Poll::Ready(Some(Err(status))) => Some(status.code()),
            Poll::Ready(None) => Some(tonic::Code::Ok),
            _ => None,
        };
        // Recorded once: taking the guard out drops it.
        if let Some(code) = ended {
            if let Some(mut inflight) = self.inflight.take() {
                inflight.code = Some(code);
            }
        }
        next
    }
}

#[tonic::async_trait]
impl FusionService for FusionApi {
    async fn fuse(
        &self,
        request: Request<proto::FuseRequest>,
    ) -> Result<Response<proto::FuseResponse>, Status> {
        let deadline = deadline::deadline(request.metadata(), Instant::now());
        let r = request.into_inner();
        observe("Fuse", r.samples.len(), async {
            let include = r.include_modalities;
            let (_, answer) = self.infer(r.samples, deadline).await?;
            Ok(proto::FuseResponse {
                results: answer
                    .outputs
                    .into_iter()
                    .map(|o| convert::fused(o, include))
                    .collect(),
                model_version: answer.version,
            })
        })
        .await
    }

    async fn predict(
        &self,
        request: Request<proto::PredictRequest>,
    ) -> Result<Response<proto::PredictResponse>, Status> {
        let deadline = deadline::deadline(request.metadata(), Instant::now());
        let r = request.into_inner();
        observe("Predict", r.samples.len(), async {
            let top_k = if r.top_k == 0 { 5 } else { r.top_k as usize };
            let (model, answer) = self.infer(r.samples, deadline).await?;
            let (task, labels) = (model.config.task, &model.config.labels);
            Ok(proto::PredictResponse {
                predictions: answer
                    .outputs
                    .into_iter()
                    .map(|o| convert::prediction(o.logits, task, labels, top_k))
                    .collect(),
                model_version: answer.version,
            })
        })
        .await
    }

    async fn get_model_info(
        &self,
        _request: Request<proto::GetModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        observe("GetModelInfo", 0, async {
            let model = self.app.backend()?.slot.current();
            Ok(super::info::model_info(&model, &self.app.limits))
        })
        .await
    }

    type TrainStream = TrainStream;

    async fn train(
        &self,
        request: Request<Streaming<proto::TrainRequest>>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        // A run is one request: counted, with its whole duration, when its event
        // stream ends (with the status that ended it), or CANCELLED if the client
        // leaves first.
        let mut inflight = InFlight::start("Train");
        match super::train::train(self.app.clone(), request).await {
            Ok(events) => {
                let events: TrainStream = Box::pin(ObservedRun {
                    events: events.into_inner(),
                    inflight: Some(inflight),
                });
                Ok(Response::new(events))
            }
            Err(status) => {
                inflight.code = Some(status.code());
                Err(status)
            }
        }
    }
}
