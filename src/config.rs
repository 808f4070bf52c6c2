//! Command line and environment configuration. Every flag is also an environment
//! variable; the doc comment is the help text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "fusion-serve",
    version,
    about = "gRPC service for an image + audio fusion model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over gRPC.
    Serve(Box<ServeConfig>),
    /// Write a seeded, randomly initialised model directory.
    InitModel(InitModelArgs),
}

#[derive(Debug, Clone, Args)]
pub struct InitModelArgs {
    /// Directory to create (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed for the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A config.json to use instead of the built-in default config.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address for gRPC.
    #[arg(long, env = "FUSION_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// Address for the Prometheus metrics endpoint (`/metrics`).
    #[arg(long, env = "FUSION_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// A model directory (config.json + model.safetensors) or a model store. Without
    /// it the built-in default model (random, untrained weights) is served.
    #[arg(long, env = "FUSION_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,

    /// Device for forward passes: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "FUSION_DEVICE", default_value = "auto")]
    pub device: String,

    /// Number format for inference: f32, or f16/bf16 (half precision, GPU only).
    /// Training always runs in f32.
    #[arg(long, env = "FUSION_DTYPE", default_value = "f32")]
    pub dtype: String,

    /// Largest accepted gRPC message, in bytes.
    #[arg(long, env = "FUSION_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = at_least_one)]
    pub max_message_bytes: usize,

    /// Most samples in one Fuse or Predict request.
    #[arg(long, env = "FUSION_MAX_SAMPLES_PER_REQUEST", default_value_t = 64, value_parser = at_least_one)]
    pub max_samples_per_request: usize,

    /// Largest image accepted, in pixels (width x height), checked before decoding.
    #[arg(long, env = "FUSION_MAX_IMAGE_PIXELS", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_pixels: u64,

    /// Fuse/Predict requests decoded and preprocessed at once (0: one per CPU core).
    /// Bounds the memory of decoded images: the others wait, still compressed.
    #[arg(long, env = "FUSION_MAX_CONCURRENT_PREPROCESS", default_value_t = 0)]
    pub max_concurrent_preprocess: usize,

    /// Longest audio clip accepted, in seconds.
    #[arg(long, env = "FUSION_MAX_AUDIO_SECONDS", default_value_t = 30.0, value_parser = positive_seconds_f32)]
    pub max_audio_seconds: f32,

    /// How often to check the model store for a newly activated version (trained by
    /// another replica sharing the store), in seconds. 0 disables watching.
    #[arg(long, env = "FUSION_STORE_WATCH_INTERVAL_SECS", default_value_t = 10.0, value_parser = seconds)]
    pub store_watch_interval_secs: f64,

    #[command(flatten)]
    pub batch: BatchConfig,

    /// Most bytes of preprocessed examples one Train run holds in memory (images and
    /// log-mel features as f32); past it the run fails with RESOURCE_EXHAUSTED.
    #[arg(long, env = "FUSION_TRAIN_MAX_EXAMPLE_BYTES", default_value_t = 2 << 30, value_parser = at_least_one)]
    pub train_max_example_bytes: usize,

    /// Longest a Train client may go without sending its next example, in seconds;
    /// past it the run ends with DEADLINE_EXCEEDED and frees the training lock.
    #[arg(long, env = "FUSION_TRAIN_IDLE_TIMEOUT_SECS", default_value_t = 60.0, value_parser = positive_seconds)]
    pub train_idle_timeout_secs: f64,

    /// After SIGTERM, keep serving this long while reporting NOT_SERVING, so load
    /// balancers stop sending traffic before the listener closes.
    #[arg(long, env = "FUSION_DRAIN_DELAY_SECS", default_value_t = 0.0, value_parser = seconds)]
    pub drain_delay_secs: f64,

    /// Log format.
    #[arg(long, env = "FUSION_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct BatchConfig {
    /// Most samples in one forward pass (1 turns batching off).
    #[arg(long, env = "FUSION_MAX_BATCH_SIZE", default_value_t = 32, value_parser = at_least_one)]
    pub max_batch_size: usize,

    /// Longest a request waits for others to join its batch while the model is idle,
    /// in microseconds. 0: a batch starts as soon as the model is free.
    #[arg(long, env = "FUSION_MAX_BATCH_DELAY_US", default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=1_000_000))]
    pub max_batch_delay_us: u64,

    /// Cost budget of one batch: image pixels plus audio frames of the padded batch.
    #[arg(long, env = "FUSION_MAX_BATCH_COST", default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_cost: u64,

    /// Most requests waiting for the model; past it requests fail with RESOURCE_EXHAUSTED.
    #[arg(long, env = "FUSION_MAX_QUEUE", default_value_t = 256, value_parser = at_least_one)]
    pub max_queue: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Limits of zero would make the service refuse everything (or, silently clamped, mean
// something other than what the operator wrote): refuse them at startup instead.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Longest duration any flag takes: a day. Longer ones are typos (and some would
/// not fit a `Duration`).
const MAX_SECONDS: f64 = 86_400.0;

/// A duration in seconds: 0 to a day.
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=MAX_SECONDS).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "must be a number of seconds from 0 to {MAX_SECONDS}"
        ))
    }
}

/// A duration in seconds: above 0, at most a day.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match seconds(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err(format!(
            "must be a number of seconds above 0, at most {MAX_SECONDS}"
        )),
    }
}

fn positive_seconds_f32(s: &str) -> Result<f32, String> {
    positive_seconds(s).map(|v| v as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["fusion-serve", "serve"].iter().chain(args))
    }

    #[test]
    fn defaults_parse() {
        let Command::Serve(c) = parse(&[]).unwrap().command else {
            panic!("serve")
        };
        assert_eq!(c.batch.max_batch_size, 32);
        assert_eq!(c.drain_delay_secs, 0.0);
    }

    #[test]
    fn nonsense_limits_are_refused_with_the_flag_named() {
        for (flag, value) in [
            ("--max-batch-size", "0"),
            ("--max-queue", "0"),
            ("--max-batch-cost", "0"),
            ("--max-samples-per-request", "0"),
            ("--max-audio-seconds", "0"),
            ("--max-audio-seconds", "NaN"),
            ("--drain-delay-secs", "-1"),
            ("--store-watch-interval-secs", "inf"),
            ("--drain-delay-secs", "1e30"),
            ("--drain-delay-secs", "NaN"),
            ("--max-audio-seconds", "1e30"),
            ("--max-batch-delay-us", "99999999999"),
        ] {
            // `--flag=value`: a bare `-1` would be read as an unknown flag.
            let err = parse(&[&format!("{flag}={value}")])
                .expect_err("must be refused")
                .to_string();
            assert!(err.contains(flag), "{flag}={value}: {err}");
            assert!(err.contains("invalid value"), "{flag}={value}: {err}");
        }
    }
}
