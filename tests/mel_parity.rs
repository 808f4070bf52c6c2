//! Parity of the log-mel front end with torchaudio, and checks of the resampler and
//! the stereo down-mix.
//!
//! The expected log-mels in `tests/fixtures/mel_parity.safetensors` were produced by
//! `tests/reference/mel_reference.py` (its docstring has the exact PyTorch call):
//!
//! ```python
//! mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, win_length, hop_length,
//!     f_min, f_max, n_mels, window_fn=torch.hann_window, power=2.0, center=True,
//!     pad_mode="reflect", norm=None, mel_scale="htk")
//! expected = torch.log(mel(x) + log_eps).T   # float32, frames x n_mels
//! ```
//!
//! Error measure: for log-mel values `a` (Rust) and `b` (reference),
//! `rel_err = max_i |a_i - b_i| / max(|b_i|, 1)`: the relative error of the
//! log-mel, with the denominator floored at 1 so values near log(1) = 0 do not divide
//! by ~0 (there it is the absolute error, which equals the relative error of the mel
//! energy `x + log_eps`). It must be below 1e-3 against torch's float32 output;
//! measured worst case 7.8e-5 (chirp, default config).
//!
//! We compute in f64 with an exact filterbank; torch's float32 output carries its own
//! rounding (float32 vs float64 torch differ by up to 8.3e-4 in near-empty bands of
//! pure tones, and its filterbank weights are computed in float32 even for float64
//! input). So, as a second check, the plain absolute log-mel error against the same
//! torch pipeline run in float64 must also be below 1e-3 (measured worst 6.3e-4,
//! typical 1e-5 on speech and noise).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fusion_serve::model::config::{AudioConfig, ModelConfig};
use fusion_serve::preprocess::mel::MelFrontEnd;
use fusion_serve::preprocess::resample::{output_len, resample};
use fusion_serve::preprocess::{AudioInput, InputLimits, Preprocessor};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/av-digits")
}

/// A minimal safetensors reader for the float32 fixture: tensors and metadata.
struct Fixture {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: HashMap<String, String>,
}

fn load_fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mel_parity.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut tensors = HashMap::new();
    let mut metadata = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            for (k, v) in info.as_object().unwrap() {
                metadata.insert(k.clone(), v.as_str().unwrap().to_string());
            }
            continue;
        }
        assert_eq!(info["dtype"], "F32", "{name}");
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let off = info["data_offsets"].as_array().unwrap();
        let (a, b) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        let values = data[a..b]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        tensors.insert(name.clone(), (shape, values));
    }
    Fixture { tensors, metadata }
}

fn audio_config(v: &serde_json::Value) -> AudioConfig {
    AudioConfig {
        sample_rate: v["sample_rate"].as_u64().unwrap() as u32,
        n_fft: v["n_fft"].as_u64().unwrap() as usize,
        win_length: v["win_length"].as_u64().unwrap() as usize,
        hop_length: v["hop_length"].as_u64().unwrap() as usize,
        n_mels: v["n_mels"].as_u64().unwrap() as usize,
        f_min: v["f_min"].as_f64().unwrap() as f32,
        f_max: v["f_max"].as_f64().map(|f| f as f32),
        log_eps: v["log_eps"].as_f64().unwrap() as f32,
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / (y as f64).abs().max(1.0))
        .fold(0.0, f64::max)
}

fn abs_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

/// The FSDD recordings the fixture refers to, decoded by our own WAV reader.
fn fsdd_waveform(rel: &str) -> Vec<f32> {
    let path = data_dir().join(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the av-digits data must be at ../shared/data/av-digits)",
            path.display()
        )
    });
    // 8 kHz in, 8 kHz model rate: decoded and scaled, not resampled.
    let p = Preprocessor::new(
        &ModelConfig::default(),
        InputLimits {
            max_image_pixels: 1 << 20,
            max_audio_seconds: 30.0,
        },
    )
    .unwrap();
    p.waveform(0, &AudioInput::Wav(bytes)).unwrap().unwrap()
}

#[test]
fn log_mel_matches_torchaudio() {
    let fx = load_fixture();
    let configs: serde_json::Value = serde_json::from_str(&fx.metadata["configs"]).unwrap();
    let fsdd: serde_json::Value = serde_json::from_str(&fx.metadata["fsdd"]).unwrap();
    let mut waves: Vec<(String, Vec<f32>)> = fx
        .tensors
        .iter()
        .filter_map(|(k, (_, v))| k.strip_prefix("wave/").map(|n| (n.to_string(), v.clone())))
        .collect();
    for (name, rel) in fsdd.as_object().unwrap() {
        waves.push((name.clone(), fsdd_waveform(rel.as_str().unwrap())));
    }
    waves.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(waves.len() >= 6, "fixture has too few waveforms");

    let mut worst_rel: f64 = 0.0;
    let mut worst_abs64: f64 = 0.0;
    let mut checked = 0;
    for (cname, cfg) in configs.as_object().unwrap() {
        let cfg = audio_config(cfg);
        let mel = MelFrontEnd::new(&cfg);
        for (wname, wave) in &waves {
            let (shape, expected) = &fx.tensors[&format!("mel/{cname}/{wname}")];
            let (_, expected64) = &fx.tensors[&format!("mel64/{cname}/{wname}")];
            let (got, frames) = mel.compute(wave);
            assert_eq!(
                [frames, cfg.n_mels],
                [shape[0], shape[1]],
                "{cname}/{wname}: frames x n_mels"
            );
            assert_eq!(frames, mel.frames_for(wave.len()));
            let r = rel_err(&got, expected);
            let a64 = abs_err(&got, expected64);
            let a32 = abs_err(&got, expected);
            let torch_gap = abs_err(expected, expected64);
            println!(
                "{cname:14} {wname:22} frames {frames:3}  rel_err vs torch f32 {r:.2e}  \
                 abs err vs torch f32 {a32:.2e}, vs torch f64 {a64:.2e}, torch f32 vs f64 {torch_gap:.2e}"
            );
            assert!(r < 1e-3, "{cname}/{wname}: rel_err {r:e} vs torchaudio");
            assert!(
                a64 < 1e-3,
                "{cname}/{wname}: abs err {a64:e} vs float64 torchaudio"
            );
            worst_rel = worst_rel.max(r);
            worst_abs64 = worst_abs64.max(a64);
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * waves.len());
    println!("worst rel_err vs torch f32: {worst_rel:.3e}; worst abs err vs torch f64: {worst_abs64:.3e}");
}

#[test]
fn default_preprocessor_uses_the_same_front_end() {
    let fx = load_fixture();
    let (_, wave) = &fx.tensors["wave/tones"];
    let (_, expected) = &fx.tensors["mel/default/tones"];
    let p = Preprocessor::new(
        &ModelConfig::default(),
        InputLimits {
            max_image_pixels: 1 << 20,
            max_audio_seconds: 30.0,
        },
    )
    .unwrap();
    let (got, frames) = p.log_mel(wave);
    assert_eq!(frames, 1 + wave.len() / 128);
    assert!(rel_err(&got, expected) < 1e-3);
    // PCM at the model rate goes through untouched.
    let (via_pcm, f2) = p
        .prepare_audio(
            0,
            &AudioInput::Pcm {
                sample_rate: 8000,
                samples: wave.clone(),
            },
        )
        .unwrap();
    assert_eq!((via_pcm, f2), (got, frames));
}

fn sine(rate: u32, freq: f64, amp: f64, seconds: f64) -> Vec<f32> {
    let n = (rate as f64 * seconds).round() as usize;
    (0..n)
        .map(|i| (amp * (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin()) as f32)
        .collect()
}

/// max |y - analytic| over the middle of the clip (edges see the zero padding).
fn sine_error(y: &[f32], rate: u32, freq: f64, amp: f64, edge: usize) -> f64 {
    y.iter()
        .enumerate()
        .skip(edge)
        .take(y.len() - 2 * edge)
        .map(|(i, &v)| {
            let t = i as f64 / rate as f64;
            (v as f64 - amp * (2.0 * std::f64::consts::PI * freq * t).sin()).abs()
        })
        .fold(0.0, f64::max)
}

#[test]
fn resampled_sines_keep_frequency_and_amplitude() {
    for from in [44_100u32, 16_000, 22_050, 48_000, 11_025] {
        for (freq, amp) in [(440.0, 0.8), (1000.0, 0.5), (3000.0, 0.3)] {
            let x = sine(from, freq, amp, 0.5);
            let y = resample(&x, from, 8000).unwrap();
            assert_eq!(y.len(), output_len(x.len(), from, 8000));
            assert_eq!(y.len(), 4000);
            let err = sine_error(&y, 8000, freq, amp, 200);
            println!("{from} Hz -> 8000 Hz, {freq} Hz sine: max error {err:.2e}");
            assert!(err < 1e-2, "{from} Hz, {freq} Hz: max error {err}");
        }
    }
    // Upsampling too.
    let x = sine(8000, 440.0, 0.7, 0.5);
    let y = resample(&x, 8000, 16_000).unwrap();
    assert_eq!(y.len(), 8000);
    assert!(sine_error(&y, 16_000, 440.0, 0.7, 400) < 1e-2);
}

#[test]
fn resampling_removes_what_the_new_rate_cannot_hold() {
    // A 6 kHz tone at 44.1 kHz is above 8 kHz's Nyquist: it must not alias to 2 kHz.
    let x = sine(44_100, 6000.0, 0.8, 0.5);
    let y = resample(&x, 44_100, 8000).unwrap();
    let rms = (y[200..3800]
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        / 3600.0)
        .sqrt();
    assert!(rms < 1e-3, "alias rms {rms}");
}

fn wav_bytes(spec: hound::WavSpec, frames: &[Vec<f32>]) -> Vec<u8> {
    let mut cursor = std::io::Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
    for frame in frames {
        for &s in frame {
            match (spec.sample_format, spec.bits_per_sample) {
                (hound::SampleFormat::Float, _) => w.write_sample(s).unwrap(),
                (_, 8) => w.write_sample((s * 127.0).round() as i8).unwrap(),
                (_, 16) => w.write_sample((s * 32767.0).round() as i16).unwrap(),
                (_, 24) => w.write_sample((s * 8_388_607.0).round() as i32).unwrap(),
                (_, 32) => w
                    .write_sample((s as f64 * 2_147_483_647.0).round() as i32)
                    .unwrap(),
                _ => unreachable!(),
            }
        }
    }
    w.finalize().unwrap();
    cursor.into_inner()
}

#[test]
fn stereo_is_averaged_then_resampled() {
    let p = Preprocessor::new(
        &ModelConfig::default(),
        InputLimits {
            max_image_pixels: 1 << 20,
            max_audio_seconds: 30.0,
        },
    )
    .unwrap();
    let left = sine(16_000, 440.0, 0.6, 0.5);
    let right = sine(16_000, 1000.0, 0.4, 0.5);
    for (format, bits) in [
        (hound::SampleFormat::Int, 16),
        (hound::SampleFormat::Int, 24),
        (hound::SampleFormat::Int, 32),
        (hound::SampleFormat::Float, 32),
    ] {
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: bits,
            sample_format: format,
        };
        let frames: Vec<Vec<f32>> = left.iter().zip(&right).map(|(l, r)| vec![*l, *r]).collect();
        let bytes = wav_bytes(spec, &frames);
        let mono = p.waveform(0, &AudioInput::Wav(bytes)).unwrap().unwrap();
        assert_eq!(mono.len(), 4000);
        // The average of the two channels, resampled to 8 kHz.
        let worst = mono
            .iter()
            .enumerate()
            .skip(200)
            .take(3600)
            .map(|(i, &v)| {
                let t = i as f64 / 8000.0;
                let w = std::f64::consts::TAU;
                let expected = 0.5 * (0.6 * (w * 440.0 * t).sin() + 0.4 * (w * 1000.0 * t).sin());
                (v as f64 - expected).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 1e-2, "{bits}-bit {format:?}: max error {worst}");
    }

    // Opposite channels cancel; 8-bit unsigned and 4 channels work too.
    let spec = hound::WavSpec {
        channels: 4,
        sample_rate: 8000,
        bits_per_sample: 8,
        sample_format: hound::SampleFormat::Int,
    };
    let frames: Vec<Vec<f32>> = left.iter().map(|&s| vec![s, -s, 0.5, -0.5]).collect();
    let mono = p
        .waveform(0, &AudioInput::Wav(wav_bytes(spec, &frames)))
        .unwrap()
        .unwrap();
    assert_eq!(mono.len(), left.len());
    assert!(
        mono.iter().all(|v| v.abs() < 1e-6),
        "channels should cancel"
    );
}
