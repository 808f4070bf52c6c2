//! Shared test helpers: the av-digits data, an in-process server, the real binary.
#![allow(dead_code)]

pub mod process;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::Parser;
use fusion_serve::config::{Cli, Command, ServeConfig};
use fusion_serve::proto;
use fusion_serve::proto::fusion_service_client::FusionServiceClient;
use tonic::transport::Channel;

/// `../shared/data/av-digits` from the crate root.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/av-digits")
}

/// One row of pairs.csv.
#[derive(Clone, Debug)]
pub struct Pair {
    pub split: String,
    pub label: u32,
    pub wav: PathBuf,
    pub mnist_index: usize,
}

pub fn pairs() -> Vec<Pair> {
    let dir = data_dir();
    let text = std::fs::read_to_string(dir.join("pairs.csv")).expect("reading pairs.csv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Pair {
                split: f[0].to_string(),
                label: f[1].parse().unwrap(),
                wav: dir.join(f[2]),
                mnist_index: f[3].parse().unwrap(),
            }
        })
        .collect()
}

/// The 10,000 MNIST test images, 28x28 bytes each.
pub fn mnist() -> &'static Vec<Vec<u8>> {
    static IMAGES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let gz = std::fs::read(data_dir().join("mnist/t10k-images-idx3-ubyte.gz")).unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        let n = u32::from_be_bytes(raw[4..8].try_into().unwrap()) as usize;
        let (rows, cols) = (
            u32::from_be_bytes(raw[8..12].try_into().unwrap()) as usize,
            u32::from_be_bytes(raw[12..16].try_into().unwrap()) as usize,
        );
        raw[16..]
            .chunks(rows * cols)
            .take(n)
            .map(|c| c.to_vec())
            .collect()
    })
}

/// An MNIST digit as PNG bytes.
pub fn mnist_png(index: usize) -> Vec<u8> {
    let pixels = mnist()[index].clone();
    let img = image::GrayImage::from_raw(28, 28, pixels).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A real pair as a proto sample (PNG + WAV bytes).
pub fn sample(pair: &Pair) -> proto::Sample {
    proto::Sample {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Encoded(mnist_png(pair.mnist_index))),
        }),
        audio: Some(proto::Audio {
            data: Some(proto::audio::Data::Wav(std::fs::read(&pair.wav).unwrap())),
        }),
    }
}

/// Serve flags for a test server on an ephemeral port.
pub fn serve_config(extra: &[&str]) -> ServeConfig {
    let mut args = vec!["fusion-serve", "serve", "--grpc-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    match Cli::parse_from(args).command {
        Command::Serve(c) => *c,
        _ => unreachable!(),
    }
}

/// A server running in this process; dropped, it shuts down.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(fusion_serve::server::serve(config, listener, async {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            stop: Some(stop),
            handle: Some(handle),
        };
        server.wait_serving().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> FusionServiceClient<Channel> {
        FusionServiceClient::connect(self.url())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Polls grpc.health.v1 until SERVING (at most 120 s).
    pub async fn wait_serving(&self) {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(channel) = Channel::from_shared(self.url()).unwrap().connect().await {
                let mut c = HealthClient::new(channel);
                if let Ok(r) = c
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    if r.into_inner().status == 1 {
                        return;
                    }
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server never became SERVING"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Asks the server to stop and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.handle.take().unwrap().await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Writes a model directory `parent/name` (the default config, weights drawn from
/// `seed`), so that several servers serve identical weights.
pub fn write_model_dir(parent: &Path, name: &str, seed: u64) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = fusion_serve::model::ModelConfig::default();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    fusion_serve::weights::init_random(&config, seed)
        .unwrap()
        .save(dir.join("model.safetensors"))
        .unwrap();
    dir
}

/// Largest elementwise difference of two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
