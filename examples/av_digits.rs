//! Trains the served model on the av-digits pairs (an MNIST digit + a spoken digit,
//! label = the digit) through the Train RPC, then measures it with Predict.
//!
//! ```text
//! cargo run --release -- serve --model-dir /tmp/avstore &
//! cargo run --release --example av_digits -- --server http://127.0.0.1:50051 \
//!     --data ../shared/data/av-digits
//! ```
//!
//! Prints a progress bar from the progress events, each epoch's validation, the test
//! accuracy with a confusion matrix, the accuracy with each modality blanked (image
//! only: the audio replaced by one second of silence; audio only: the image replaced
//! by a blank one), and ends with one JSON line:
//! `{"test_accuracy": ..., "image_only": ..., "audio_only": ..., "train_seconds": ...}`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use fusion_serve::proto;
use fusion_serve::proto::fusion_service_client::FusionServiceClient;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Parser)]
#[command(about = "Train fusion-serve on av-digits and evaluate it")]
struct Args {
    /// The service's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The av-digits directory (pairs.csv, fsdd/, mnist/).
    #[arg(long, default_value = "../shared/data/av-digits")]
    data: PathBuf,
    /// Passes over the training pairs.
    #[arg(long, default_value_t = 4)]
    epochs: u32,
    #[arg(long, default_value_t = 32)]
    batch_size: u32,
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f32,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Constant learning rate instead of cosine decay.
    #[arg(long)]
    constant_lr: bool,
    /// Fraction of the training pairs held out for validation (and early stopping).
    #[arg(long, default_value_t = 0.1)]
    validation_fraction: f32,
    /// Epochs without a better validation loss before stopping (0: off).
    #[arg(long, default_value_t = 2)]
    patience: u32,
    #[arg(long, default_value_t = 0.1)]
    head_dropout: f32,
    /// Image shift augmentation in pixels (0: off).
    #[arg(long, default_value_t = 2)]
    shift: u32,
    /// Audio gain augmentation: a random gain in [1 - x, 1 + x] (0: off).
    #[arg(long, default_value_t = 0.3)]
    audio_gain: f32,
    /// Audio time-shift augmentation, in seconds (0: off).
    #[arg(long, default_value_t = 0.1)]
    audio_shift: f32,
    /// Probability of blanking the image or the audio of a training pair (0: off), so
    /// that the model also answers from one modality alone. Off by default: on
    /// av-digits it costs about 1.5 points of fused test accuracy (see the README).
    #[arg(long, default_value_t = 0.0)]
    modality_dropout: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use at most this many training pairs (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Only evaluate the served model; do not train.
    #[arg(long)]
    skip_train: bool,
}

struct Pair {
    split: String,
    label: u32,
    wav: PathBuf,
    mnist_index: usize,
}

fn pairs(dir: &Path) -> anyhow::Result<Vec<Pair>> {
    let text = std::fs::read_to_string(dir.join("pairs.csv"))?;
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            anyhow::ensure!(f.len() >= 4, "pairs.csv: bad line {l:?}");
            Ok(Pair {
                split: f[0].to_string(),
                label: f[1].parse()?,
                wav: dir.join(f[2]),
                mnist_index: f[3].parse()?,
            })
        })
        .collect()
}

/// The MNIST t10k images, 28x28 bytes each.
fn mnist(dir: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let gz = std::fs::read(dir.join("mnist/t10k-images-idx3-ubyte.gz"))?;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut raw)?;
    let be = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]) as usize;
    let (n, rows, cols) = (be(4), be(8), be(12));
    Ok(raw[16..]
        .chunks(rows * cols)
        .take(n)
        .map(|c| c.to_vec())
        .collect())
}

fn png(pixels: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let img = image::GrayImage::from_raw(28, 28, pixels)
        .ok_or_else(|| anyhow::anyhow!("bad MNIST image"))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[derive(Clone, Copy, PartialEq)]
enum Blank {
    None,
    Image,
    Audio,
}

fn sample(p: &Pair, images: &[Vec<u8>], blank: Blank) -> anyhow::Result<proto::Sample> {
    let image = if blank == Blank::Image {
        png(vec![0; 28 * 28])?
    } else {
        png(images[p.mnist_index].clone())?
    };
    let audio = if blank == Blank::Audio {
        proto::audio::Data::Pcm(proto::Pcm {
            sample_rate: 8000,
            samples: vec![0.0; 8000],
        })
    } else {
        proto::audio::Data::Wav(std::fs::read(&p.wav)?)
    };
    Ok(proto::Sample {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Encoded(image)),
        }),
        audio: Some(proto::Audio { data: Some(audio) }),
    })
}

/// A line above the progress bar (on stderr when the bar is hidden, e.g. not a tty).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let all = pairs(&args.data)?;
    let images = mnist(&args.data)?;
    let mut train: Vec<&Pair> = all.iter().filter(|p| p.split == "train").collect();
    if args.limit > 0 {
        train.truncate(args.limit);
    }
    let test: Vec<&Pair> = all.iter().filter(|p| p.split == "test").collect();
    let mut client = FusionServiceClient::connect(args.server.clone())
        .await?
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    let mut train_seconds = 0.0f64;
    if !args.skip_train {
        let t0 = Instant::now();
        let config = proto::TrainConfig {
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args.learning_rate,
            lr_schedule: if args.constant_lr {
                proto::LrSchedule::Constant
            } else {
                proto::LrSchedule::Cosine
            } as i32,
            weight_decay: Some(args.weight_decay),
            validation_fraction: args.validation_fraction,
            seed: args.seed,
            early_stopping_patience: args.patience,
            head_dropout: args.head_dropout,
            augmentation: Some(proto::Augmentation {
                image_max_shift_pixels: args.shift,
                audio_gain: args.audio_gain,
                audio_max_shift_seconds: args.audio_shift,
                audio_noise_std: 0.0,
                modality_dropout: args.modality_dropout,
            }),
            activate: Some(true),
            ..Default::default()
        };
        let mut requests = vec![proto::TrainRequest {
            item: Some(proto::train_request::Item::Config(config)),
        }];
        for p in &train {
            requests.push(proto::TrainRequest {
                item: Some(proto::train_request::Item::Example(proto::TrainExample {
                    sample: Some(sample(p, &images, Blank::None)?),
                    label_index: Some(p.label),
                    ..Default::default()
                })),
            });
        }
        eprintln!(
            "streaming {} training pairs to {}",
            train.len(),
            args.server
        );
        let mut events = client
            .train(tokio_stream::iter(requests))
            .await?
            .into_inner();
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps  epoch {msg}  [{elapsed_precise} < {eta_precise}]",
            )?
            .progress_chars("=> "),
        );
        while let Some(event) = events.message().await? {
            use proto::train_event::Event as E;
            match event.event {
                Some(E::Started(s)) => {
                    bar.set_length(s.total_steps as u64);
                    say(
                        &bar,
                        format!(
                            "run {}: {} training and {} validation pairs, from version {}",
                            s.run_id, s.train_examples, s.validation_examples, s.base_version
                        ),
                    );
                }
                Some(E::Progress(p)) => {
                    bar.set_length(p.total_steps as u64);
                    bar.set_position(p.step as u64);
                    bar.set_message(format!(
                        "{}  loss {:.4}  {:.0} ex/s",
                        p.epoch, p.running_loss, p.examples_per_second
                    ));
                }
                Some(E::Validation(v)) => say(
                    &bar,
                    format!(
                        "epoch {}: validation loss {:.4}, accuracy {:.4} ({:.0} s)",
                        v.epoch,
                        v.loss,
                        v.accuracy,
                        t0.elapsed().as_secs_f64()
                    ),
                ),
                Some(E::Finished(f)) => {
                    bar.finish_and_clear();
                    eprintln!(
                        "trained {} in {:.1} s ({} epochs, final train loss {:.4}); stored at {}, activated: {}",
                        f.model_version,
                        f.train_seconds,
                        f.epochs_completed,
                        f.final_train_loss,
                        f.path,
                        f.activated
                    );
                }
                None => {}
            }
        }
        train_seconds = t0.elapsed().as_secs_f64();
    }

    let accuracy = |blank: Blank| {
        let mut client = client.clone();
        let test = &test;
        let images = &images;
        async move {
            let mut confusion = [[0u32; 10]; 10];
            let mut version = String::new();
            for chunk in test.chunks(50) {
                let samples = chunk
                    .iter()
                    .map(|p| sample(p, images, blank))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let r = client
                    .predict(proto::PredictRequest { samples, top_k: 1 })
                    .await?
                    .into_inner();
                version = r.model_version;
                for (p, pred) in chunk.iter().zip(r.predictions) {
                    let guess = pred.top.first().map_or(0, |t| t.index) as usize;
                    confusion[p.label as usize][guess.min(9)] += 1;
                }
            }
            let right: u32 = (0..10).map(|i| confusion[i][i]).sum();
            Ok::<_, anyhow::Error>((right as f64 / test.len() as f64, confusion, version))
        }
    };
    let (fused, confusion, version) = accuracy(Blank::None).await?;
    println!(
        "model version {version}: test accuracy {fused:.4} on {} pairs",
        test.len()
    );
    println!("confusion matrix (rows: true digit, columns: predicted)");
    println!(
        "     {}",
        (0..10).map(|d| format!("{d:>4}")).collect::<String>()
    );
    for (d, row) in confusion.iter().enumerate() {
        println!(
            "  {d}: {}",
            row.iter().map(|n| format!("{n:>4}")).collect::<String>()
        );
    }
    let (image_only, _, _) = accuracy(Blank::Audio).await?;
    let (audio_only, _, _) = accuracy(Blank::Image).await?;
    println!(
        "image only (audio silenced): {image_only:.4}; audio only (blank image): {audio_only:.4}"
    );
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({
            "test_accuracy": fused,
            "image_only": image_only,
            "audio_only": audio_only,
            "train_seconds": (train_seconds * 10.0).round() / 10.0,
        })
    );
    Ok(())
}
