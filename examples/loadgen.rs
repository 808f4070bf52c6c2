//! Load generator: real av-digits pairs (MNIST digit as PNG + FSDD WAV) sent at a fixed
//! concurrency, for a bounded number of requests.
//!
//! ```text
//! cargo run --release --example loadgen -- --server http://127.0.0.1:50051 \
//!     --data ../shared/data/av-digits --concurrency 32 --requests 2000
//! ```
//!
//! Prints throughput, latency percentiles and errors by status code, then one JSON
//! line with the same numbers (for scripts such as `scripts/bench-batching.sh`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fusion_serve::grpc::code_name;
use fusion_serve::proto;
use fusion_serve::proto::fusion_service_client::FusionServiceClient;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Drive a fusion-serve server with real av-digits requests")]
struct Args {
    /// The server's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The av-digits directory (pairs.csv, fsdd/, mnist/).
    #[arg(long, default_value = "../shared/data/av-digits")]
    data: PathBuf,
    /// Requests in flight at any time (one connection each, like separate clients).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests to send in all (not counting warm-up).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Pairs per request.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Requests sent, and not measured, before the run.
    #[arg(long, default_value_t = 16)]
    warmup: usize,
    /// Rows of pairs.csv to use: train, test or all.
    #[arg(long, default_value = "test")]
    split: String,
    /// Client deadline per request in milliseconds (0: none).
    #[arg(long, default_value_t = 0)]
    timeout_ms: u64,
    /// How long to wait for the server to become ready, in seconds.
    #[arg(long, default_value_t = 120)]
    wait_ready_secs: u64,
    /// A label copied into the JSON line (e.g. "batching-on").
    #[arg(long, default_value = "")]
    label: String,
    /// Also write every request's latency (ms) and status code, one per line, here
    /// (lets scripts merge several runs into one set of percentiles).
    #[arg(long)]
    raw_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 || args.samples == 0 {
        bail!("--concurrency and --samples must be at least 1");
    }
    let samples = load_samples(&args.data, &args.split)?;
    // Each request is built once; the run measures the server, not the client.
    let bodies: Arc<Vec<proto::PredictRequest>> = Arc::new(
        (0..samples.len())
            .map(|i| proto::PredictRequest {
                samples: (0..args.samples)
                    .map(|j| samples[(i + j) % samples.len()].clone())
                    .collect(),
                top_k: 1,
            })
            .collect(),
    );
    let mut clients = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        // Lazy: the server may still be starting; `wait_ready` retries until it listens.
        let channel = Channel::from_shared(args.server.clone())?.connect_lazy();
        clients.push(
            FusionServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        );
    }
    wait_ready(&mut clients[0], Duration::from_secs(args.wait_ready_secs)).await?;

    let timeout = (args.timeout_ms > 0).then(|| Duration::from_millis(args.timeout_ms));
    run(&clients, &bodies, args.warmup.min(args.requests), timeout).await;
    let started = Instant::now();
    let results = run(&clients, &bodies, args.requests, timeout).await;
    let elapsed = started.elapsed();
    report(&args, &results, elapsed);
    if let Some(path) = &args.raw_out {
        let lines: String = results
            .iter()
            .map(|(d, c)| format!("{:.4} {}\n", d.as_secs_f64() * 1e3, code_name(*c)))
            .collect();
        std::fs::write(path, lines).with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}

/// Polls GetModelInfo until the model is loaded.
async fn wait_ready(
    client: &mut FusionServiceClient<Channel>,
    limit: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        match client.get_model_info(proto::GetModelInfoRequest {}).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => bail!("server not ready: {s}"),
        }
    }
}

/// Sends `total` requests, `clients.len()` at a time; latency and code of each.
async fn run(
    clients: &[FusionServiceClient<Channel>],
    bodies: &Arc<Vec<proto::PredictRequest>>,
    total: usize,
    timeout: Option<Duration>,
) -> Vec<(Duration, tonic::Code)> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = clients
        .iter()
        .cloned()
        .map(|mut client| {
            let (next, bodies) = (next.clone(), bodies.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return out;
                    }
                    let mut request = tonic::Request::new(bodies[i % bodies.len()].clone());
                    if let Some(t) = timeout {
                        request.set_timeout(t);
                    }
                    let sent = Instant::now();
                    let code = match client.predict(request).await {
                        Ok(_) => tonic::Code::Ok,
                        Err(s) => s.code(),
                    };
                    out.push((sent.elapsed(), code));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for w in workers {
        all.extend(w.await.expect("a load worker panicked"));
    }
    all
}

fn report(args: &Args, results: &[(Duration, tonic::Code)], elapsed: Duration) {
    let mut codes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (_, c) in results {
        *codes.entry(code_name(*c)).or_default() += 1;
    }
    let ok = codes.get("OK").copied().unwrap_or(0);
    // Latency over successful requests: refusals are fast and would flatter it.
    let mut lat: Vec<f64> = results
        .iter()
        .filter(|(_, c)| *c == tonic::Code::Ok)
        .map(|(d, _)| d.as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1]
    };
    let secs = elapsed.as_secs_f64();
    let rps = ok as f64 / secs;
    let errors: BTreeMap<_, _> = codes.iter().filter(|(k, _)| **k != "OK").collect();
    println!(
        "{} requests ({} samples each) at concurrency {} in {:.2} s",
        results.len(),
        args.samples,
        args.concurrency,
        secs
    );
    println!(
        "throughput: {rps:.1} OK requests/s, {:.1} samples/s",
        rps * args.samples as f64
    );
    println!(
        "latency (OK requests, ms): p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(100.0)
    );
    if errors.is_empty() {
        println!("errors: none");
    } else {
        println!("errors: {errors:?}");
    }
    let json = serde_json::json!({
        "label": args.label,
        "concurrency": args.concurrency,
        "requests": results.len(),
        "samples_per_request": args.samples,
        "ok": ok,
        "errors": errors,
        "seconds": secs,
        "throughput_rps": rps,
        "mean_ms": lat.iter().sum::<f64>() / lat.len().max(1) as f64,
        "p50_ms": pct(50.0),
        "p90_ms": pct(90.0),
        "p99_ms": pct(99.0),
        "max_ms": pct(100.0),
    });
    println!("{json}");
}

/// Every pair of `split` as a proto sample: the MNIST digit encoded as PNG, the WAV
/// file's bytes as they are.
fn load_samples(dir: &Path, split: &str) -> anyhow::Result<Vec<proto::Sample>> {
    let csv = dir.join("pairs.csv");
    let text = std::fs::read_to_string(&csv).with_context(|| format!("{}", csv.display()))?;
    let mnist = read_mnist(&dir.join("mnist/t10k-images-idx3-ubyte.gz"))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 4 {
            bail!("{}: malformed row {line:?}", csv.display());
        }
        if split != "all" && f[0] != split {
            continue;
        }
        let index: usize = f[3].parse().context("mnist_index")?;
        let pixels = mnist
            .get(index)
            .with_context(|| format!("no MNIST image {index}"))?;
        let img = image::GrayImage::from_raw(28, 28, pixels.clone()).context("MNIST image")?;
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png)?;
        let wav = std::fs::read(dir.join(f[2])).with_context(|| f[2].to_string())?;
        out.push(proto::Sample {
            image: Some(proto::Image {
                data: Some(proto::image::Data::Encoded(png.into_inner())),
            }),
            audio: Some(proto::Audio {
                data: Some(proto::audio::Data::Wav(wav)),
            }),
        });
    }
    if out.is_empty() {
        bail!("no pairs of split {split:?} in {}", csv.display());
    }
    Ok(out)
}

/// MNIST idx3 images (gzip), 28x28 bytes each.
fn read_mnist(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let gz = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut raw)?;
    if raw.len() < 16 {
        bail!("{}: not an idx3 file", path.display());
    }
    let be = |i: usize| u32::from_be_bytes(raw[i..i + 4].try_into().unwrap()) as usize;
    let (n, rows, cols) = (be(4), be(8), be(12));
    Ok(raw[16..]
        .chunks(rows * cols)
        .take(n)
        .map(|c| c.to_vec())
        .collect())
}
