//! Wiring: load the model, start the model thread and the batcher, serve gRPC with
//! health and reflection, drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::Layer;

use crate::app::{App, Backend, RequestLimits};
use crate::batching::{BatchLayer, BatchPolicy};
use crate::config::ServeConfig;
use crate::engine::{Engine, Job, ModelSlot, ServedModel};
use crate::grpc::FusionApi;
use crate::loader;
use crate::preprocess::InputLimits;
use crate::proto;
use crate::proto::fusion_service_server::FusionServiceServer;
use crate::store::ModelStore;
use crate::telemetry::metrics as m;
use crate::training::TrainManager;

const SERVICE_NAME: &str = "fusion.v1.FusionService";

/// Runs the service on `listener` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = RequestLimits {
        max_samples_per_request: config.max_samples_per_request,
        max_concurrent_preprocess: match config.max_concurrent_preprocess {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        },
        max_message_bytes: config.max_message_bytes,
        input: InputLimits {
            max_image_pixels: config.max_image_pixels,
            max_audio_seconds: config.max_audio_seconds,
        },
    };
    let app = App::new(limits);
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    metrics::gauge!(m::READY).set(0.0);

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Clients may compress requests (encoded images and WAVs shrink little, raw PCM
    // and tensors a lot); replies are small and go uncompressed.
    let api = FusionServiceServer::new(FusionApi::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);

    // A model that fails to load stops the server: better a crash loop the operator
    // sees than a pod that never becomes ready.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    {
        let (app, reporter, config) = (app.clone(), reporter.clone(), config.clone());
        tokio::spawn(async move {
            match start_backend(&config).await {
                Ok(backend) => {
                    app.set_ready(backend);
                    set_health(&reporter, ServingStatus::Serving).await;
                    metrics::gauge!(m::READY).set(1.0);
                    tracing::info!("ready: SERVING");
                }
                Err(e) => {
                    let _ = failed_tx.send(e);
                }
            }
        });
    }

    let drain = Duration::from_secs_f64(config.drain_delay_secs.max(0.0));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<anyhow::Error>>();
    {
        let (reporter, app) = (reporter.clone(), app.clone());
        tokio::spawn(async move {
            let failure = tokio::select! {
                _ = shutdown => None,
                Ok(e) = failed_rx => Some(e),
            };
            set_health(&reporter, ServingStatus::NotServing).await;
            metrics::gauge!(m::READY).set(0.0);
            app.start_draining();
            if failure.is_none() && !drain.is_zero() {
                tracing::info!(
                    ?drain,
                    "shutting down: NOT_SERVING, still answering during the drain delay"
                );
                tokio::time::sleep(drain).await;
            }
            tracing::info!("stopped accepting; finishing requests in flight");
            let _ = stop_tx.send(failure);
        });
    }
    let (failure_tx, failure_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        let failure = stop_rx.await.ok().flatten();
        let _ = failure_tx.send(failure);
    };

    tracing::info!(addr = %listener.local_addr()?, "gRPC listening");
    Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming(listener), stop)
        .await?;
    match failure_rx.await.ok().flatten() {
        Some(e) => Err(e),
        None => {
            tracing::info!("shut down cleanly");
            Ok(())
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Loads the model, runs a warm-up batch through the model thread, starts the batcher.
async fn start_backend(config: &ServeConfig) -> anyhow::Result<Backend> {
    let config = config.clone();
    let device = crate::device::select(&config.device)?;
    let dtype = crate::device::select_dtype(&config.dtype, &device)?;
    let input_limits = InputLimits {
        max_image_pixels: config.max_image_pixels,
        max_audio_seconds: config.max_audio_seconds,
    };
    let store = Arc::new(match &config.model_dir {
        Some(dir) => ModelStore::open(dir)?,
        None => ModelStore::temporary()?,
    });
    let served: ServedModel = {
        let (store, device, limits) = (store.clone(), device.clone(), input_limits.clone());
        tokio::task::spawn_blocking(move || loader::load_initial(&store, &device, dtype, &limits))
            .await??
    };
    tracing::info!(
        version = %served.version,
        source = %served.meta.source,
        device = %crate::device::describe(&served.device),
        "model loaded"
    );
    if served.meta.untrained {
        tracing::warn!("serving the built-in default model with RANDOM, UNTRAINED weights: predictions are meaningless until it is trained (Train RPC) or --model-dir is given");
    }
    let pixels = (served.config.image.height * served.config.image.width) as u64;
    let warmup = crate::watcher::warmup_sample(&served);
    let warmup_config = served.config.clone();
    let slot = ModelSlot::new(served);
    let engine = Engine::spawn(slot.clone());
    let (reply, answer) = tokio::sync::oneshot::channel();
    engine
        .run(vec![Job {
            samples: vec![warmup],
            config: warmup_config,
            reply,
        }])
        .await?;
    answer.await??;
    let b = &config.batch;
    let batcher = BatchLayer::new(BatchPolicy {
        max_batch_size: b.max_batch_size.max(1),
        max_delay: Duration::from_micros(b.max_batch_delay_us),
        max_cost: b.max_batch_cost,
        max_queue: b.max_queue.max(1),
        image_pixels: pixels,
    })
    .layer(engine);
    if config.store_watch_interval_secs > 0.0 {
        let watcher = crate::watcher::StoreWatcher {
            store: store.clone(),
            slot: slot.clone(),
            device: device.clone(),
            dtype,
            limits: input_limits.clone(),
        };
        tokio::spawn(watcher.run(Duration::from_secs_f64(config.store_watch_interval_secs)));
    }
    Ok(Backend {
        slot,
        batcher,
        store,
        device,
        dtype,
        input_limits,
        training: Arc::new(TrainManager::new(
            config.train_max_example_bytes,
            Duration::from_secs_f64(config.train_idle_timeout_secs),
        )),
    })
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// Accepted connections with `TCP_NODELAY`: a small gRPC reply must not wait for the
/// client's delayed ACK (Nagle: about 40 ms on Linux). tonic sets it only for the
/// listeners it binds itself, not for one passed in.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
