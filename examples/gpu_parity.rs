//! GPU/CPU parity and Predict-path throughput for the built-in model.
//!
//! ```text
//! cargo run --release --features cuda --example gpu_parity -- \
//!     [--data ../shared/data/av-digits] [--tol 1e-4] [--batches 1,8,32,64] [--seconds 2]
//! ```
//!
//! Builds the built-in model (`loader::builtin`: the default config with the seeded
//! random weights) on the CPU and on `cuda:0`, preprocesses the same samples once
//! (real av-digits pairs from the test split when `--data` exists, else
//! deterministic synthetic ones), runs them through `engine::forward` (collate,
//! forward pass, copy back: what a Predict batch does) on both devices, prints the
//! largest absolute and relative differences over every output (image, audio, fused,
//! logits) and fails when `|gpu - cpu| > tol * max(1, |cpu|)` anywhere. Then it
//! prints samples/s at each batch size on each device, and the accuracy change of
//! `--dtype f16` and `bf16` against f32 (largest logit difference, and how often the
//! predicted class agrees with f32's; accuracy against the labels means nothing for
//! the untrained built-in model, so agreement is what is measured).
//!
//! Without the `cuda` feature it says so, prints the CPU throughput, and exits 2.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use fusion_serve::engine::{self, ServedModel};
use fusion_serve::loader;
use fusion_serve::preprocess::{AudioInput, ImageInput, InputLimits, PreparedSample, RawSample};

struct Args {
    data: PathBuf,
    tol: f32,
    batches: Vec<usize>,
    seconds: f64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        data: Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/av-digits"),
        tol: 1e-4,
        batches: vec![1, 8, 32, 64],
        seconds: 2.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--data" => args.data = value()?.into(),
            "--tol" => args.tol = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--batches" => {
                args.batches = value()?
                    .split(',')
                    .map(|b| b.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => {
                println!(
                    "gpu_parity [--data DIR] [--tol 1e-4] [--batches 1,8,32,64] [--seconds 2]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    anyhow::ensure!(
        args.batches.iter().all(|&b| b > 0),
        "batch sizes must be positive"
    );
    Ok(args)
}

/// `n` real test pairs (MNIST digit as PNG + spoken digit WAV), or `None` without data.
fn av_digits(dir: &Path, n: usize) -> anyhow::Result<Option<Vec<RawSample>>> {
    let (csv, gz) = (
        dir.join("pairs.csv"),
        dir.join("mnist/t10k-images-idx3-ubyte.gz"),
    );
    if !csv.exists() || !gz.exists() {
        return Ok(None);
    }
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&std::fs::read(&gz)?[..]).read_to_end(&mut raw)?;
    let be = |i: usize| u32::from_be_bytes(raw[i..i + 4].try_into().unwrap()) as usize;
    let (count, rows, cols) = (be(4), be(8), be(12));
    let mut out = Vec::new();
    for line in std::fs::read_to_string(&csv)?.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 4 || f[0] != "test" {
            continue;
        }
        let index: usize = f[3].parse()?;
        anyhow::ensure!(index < count, "mnist index {index} out of range");
        let start = 16 + index * rows * cols;
        let pixels = raw[start..start + rows * cols].to_vec();
        let img = image::GrayImage::from_raw(cols as u32, rows as u32, pixels)
            .ok_or_else(|| anyhow::anyhow!("bad MNIST image {index}"))?;
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png)?;
        out.push(RawSample {
            image: ImageInput::Encoded(png.into_inner()),
            audio: AudioInput::Wav(std::fs::read(dir.join(f[2]))?),
        });
        if out.len() == n {
            break;
        }
    }
    Ok(Some(out))
}

/// Deterministic synthetic samples: noise images, tone-plus-noise clips of 0.4-1 s
/// (different lengths, so padding and masking are exercised).
fn synthetic(model: &ServedModel, n: usize) -> Vec<RawSample> {
    let img = &model.config.image;
    let rate = model.config.audio.sample_rate;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|i| {
            let values = (0..img.channels * img.height * img.width)
                .map(|_| next())
                .collect();
            let len = (rate as usize) * (4 + i % 7) / 10;
            let freq = 200.0 + 50.0 * i as f32;
            let samples = (0..len)
                .map(|t| {
                    0.5 * (std::f32::consts::TAU * freq * t as f32 / rate as f32).sin()
                        + 0.05 * (next() - 0.5)
                })
                .collect();
            RawSample {
                image: ImageInput::Tensor {
                    shape: vec![img.channels, img.height, img.width],
                    values,
                },
                audio: AudioInput::Pcm {
                    sample_rate: rate,
                    samples,
                },
            }
        })
        .collect()
}

/// Samples/s of `engine::forward` at batch size `b` (`b` samples, cycling).
fn throughput(
    model: &ServedModel,
    prepared: &[PreparedSample],
    b: usize,
    budget: Duration,
) -> anyhow::Result<f64> {
    let batch: Vec<&PreparedSample> = prepared.iter().cycle().take(b).collect();
    engine::forward(model, &batch)?; // warm-up (kernel loading, allocations)
    let started = Instant::now();
    let mut runs = 0u32;
    while runs < 3 || started.elapsed() < budget {
        engine::forward(model, &batch)?;
        runs += 1;
        if runs >= 1000 {
            break;
        }
    }
    Ok((runs as usize * b) as f64 / started.elapsed().as_secs_f64())
}

fn print_throughput(
    name: &str,
    model: &ServedModel,
    prepared: &[PreparedSample],
    args: &Args,
) -> anyhow::Result<()> {
    for &b in &args.batches {
        let rate = throughput(model, prepared, b, Duration::from_secs_f64(args.seconds))?;
        println!("throughput {name:<5} batch {b:>3}: {rate:>10.1} samples/s");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let limits = InputLimits {
        max_image_pixels: 4096 * 4096,
        max_audio_seconds: 30.0,
    };
    let cpu = loader::builtin(&Device::Cpu, DType::F32, &limits)?;
    let n = args.batches.iter().copied().max().unwrap_or(1);
    let (raw, what) = match av_digits(&args.data, n)? {
        Some(s) if !s.is_empty() => (
            s,
            format!("av-digits test pairs from {}", args.data.display()),
        ),
        _ => (
            synthetic(&cpu, n),
            "synthetic samples (no av-digits data)".to_string(),
        ),
    };
    let prepared = raw
        .iter()
        .enumerate()
        .map(|(i, s)| cpu.preprocessor.prepare(i, s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("preprocessing: {e}"))?;
    println!("{} samples: {what}", prepared.len());
    run(&cpu, &prepared, &args)
}

#[cfg(not(feature = "cuda"))]
fn run(cpu: &ServedModel, prepared: &[PreparedSample], args: &Args) -> anyhow::Result<()> {
    println!("no CUDA in this build (rebuild with --features cuda): CPU throughput only");
    print_throughput("cpu", cpu, prepared, args)?;
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn run(cpu: &ServedModel, prepared: &[PreparedSample], args: &Args) -> anyhow::Result<()> {
    let device = Device::new_cuda(0).map_err(|e| anyhow::anyhow!("cuda:0: {e}"))?;
    let limits = cpu.preprocessor.limits().clone();
    let gpu = loader::builtin(&device, DType::F32, &limits)?;
    let refs: Vec<&PreparedSample> = prepared.iter().collect();
    let want = engine::forward(cpu, &refs)?;
    let got = engine::forward(&gpu, &refs)?;
    let (mut max_abs, mut max_rel, mut worst) = (0f32, 0f32, 0f32);
    let mut where_worst = String::new();
    for (i, (c, g)) in want.iter().zip(&got).enumerate() {
        for (field, a, b) in [
            ("image", &c.image, &g.image),
            ("audio", &c.audio, &g.audio),
            ("fused", &c.fused, &g.fused),
            ("logits", &c.logits, &g.logits),
        ] {
            anyhow::ensure!(a.len() == b.len(), "sample {i} {field}: length differs");
            for (j, (x, y)) in a.iter().zip(b).enumerate() {
                let d = (x - y).abs();
                if !d.is_finite() {
                    anyhow::bail!("sample {i} {field}[{j}]: cpu {x}, gpu {y}");
                }
                max_abs = max_abs.max(d);
                if x.abs() > 1e-3 {
                    max_rel = max_rel.max(d / x.abs());
                }
                let scaled = d / x.abs().max(1.0);
                if scaled > worst {
                    worst = scaled;
                    where_worst = format!("sample {i} {field}[{j}]: cpu {x}, gpu {y}");
                }
            }
        }
    }
    println!(
        "parity f32 over {} samples: max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e} \
         (|cpu| > 1e-3), worst scaled {worst:.3e} at {where_worst}",
        want.len()
    );
    print_throughput("cpu", cpu, prepared, args)?;
    print_throughput("cuda", &gpu, prepared, args)?;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    for dtype in [DType::F16, DType::BF16] {
        let half = loader::builtin(&device, dtype, &limits)?;
        let out = engine::forward(&half, &refs)?;
        let mut max_logit = 0f32;
        let mut agree = 0;
        for (c, h) in want.iter().zip(&out) {
            for (x, y) in c.logits.iter().zip(&h.logits) {
                max_logit = max_logit.max((x - y).abs());
            }
            agree += usize::from(argmax(&c.logits) == argmax(&h.logits));
        }
        println!(
            "{}: max abs logit diff vs f32 {max_logit:.3e}, same predicted class {agree}/{}",
            dtype.as_str(),
            want.len()
        );
        print_throughput(dtype.as_str(), &half, prepared, args)?;
    }
    if worst > args.tol {
        eprintln!(
            "FAIL: GPU and CPU differ by {worst:.3e} > {} (|gpu - cpu| / max(1, |cpu|))",
            args.tol
        );
        std::process::exit(1);
    }
    println!("OK: GPU matches CPU within {}", args.tol);
    Ok(())
}
