//! Logging and the Prometheus exporter.

pub mod metrics;

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::config::LogFormat;

/// Installs the global tracing subscriber (RUST_LOG filters; default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: escape codes garble files and log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Latency buckets from 0.5 ms to 30 s: single forward passes on CPU take a few ms,
/// queued batches under load up to seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Starts the `/metrics` HTTP endpoint on `addr` and describes every metric.
/// Must be called inside a tokio runtime.
pub fn init_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    use self::metrics as m;
    let mut builder = PrometheusBuilder::new().with_http_listener(addr);
    for name in [
        m::REQUEST_DURATION,
        m::QUEUE_DURATION,
        m::PREPROCESS_DURATION,
        m::INFERENCE_DURATION,
    ] {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), LATENCY_BUCKETS)?;
    }
    builder = builder
        .set_buckets_for_metric(Matcher::Full(m::BATCH_SIZE.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(m::BATCH_PADDING_RATIO.into()), RATIO_BUCKETS)?;
    builder
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    describe();
    Ok(())
}

fn describe() {
    use self::metrics as m;
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(m::REQUESTS, "gRPC requests by rpc and status code");
    describe_histogram!(
        m::REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer a request"
    );
    describe_counter!(m::SAMPLES, "Samples received by rpc");
    describe_histogram!(
        m::QUEUE_DURATION,
        Unit::Seconds,
        "Time a request waited in the batch queue"
    );
    describe_histogram!(
        m::PREPROCESS_DURATION,
        Unit::Seconds,
        "Time to decode and preprocess a request"
    );
    describe_histogram!(
        m::INFERENCE_DURATION,
        Unit::Seconds,
        "Time of one forward pass (a batch)"
    );
    describe_histogram!(m::BATCH_SIZE, "Samples per forward pass");
    describe_histogram!(
        m::BATCH_PADDING_RATIO,
        "Fraction of audio frames in a batch that are padding"
    );
    describe_gauge!(m::QUEUE_DEPTH, "Requests waiting for the model");
    describe_gauge!(m::INFLIGHT_REQUESTS, "Fuse/Predict requests being handled");
    describe_counter!(
        m::REQUESTS_DROPPED,
        "Requests dropped before compute, by reason"
    );
    describe_gauge!(
        m::MODEL_VERSION,
        "Numeric version of the served model (0: built-in or plain directory)"
    );
    describe_counter!(
        m::MODEL_LOAD_FAILURES,
        "Model versions that failed to load and were refused"
    );
    describe_gauge!(m::READY, "1 while the service reports SERVING");
    describe_counter!(m::TRAIN_RUNS, "Training runs by outcome");
    describe_gauge!(m::TRAIN_LOSS, "Running training loss of the current run");
    describe_gauge!(m::TRAIN_EPOCH, "Epoch of the current training run");
}
