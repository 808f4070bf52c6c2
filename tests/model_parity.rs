//! Parity of the Rust `FusionModel` with the PyTorch reference module.
//!
//! Reference: `tests/reference/fusion_reference.py` (torchvision ResNet-18 layout,
//! `nn.LSTM(batch_first=True)`, per-sample `F.max_pool1d` pooling on unpadded frames,
//! `nn.Sequential` head). The committed fixture was produced with
//!
//! ```text
//! python3 tests/reference/fusion_reference.py fixture \
//!     --config tests/fixtures/parity_narrow/config.json \
//!     --out tests/fixtures/parity_narrow --seed 0 --lengths 23,10,3,2
//! ```
//!
//! It holds a narrow model (widths [8, 16, 32, 64], 1x32x32 images, 16 mel bands, a
//! 2-layer LSTM of 24, head [32, 16], 5 outputs) with random weights and batch-norm
//! running statistics that are not 0/1, a batch of 4 samples whose log-mel inputs
//! have 23, 10, 3 and 2 frames (right-padded with large garbage), and the outputs
//! the reference computes per sample, without padding, in float64, for both global
//! poolings (`max.*` with the config as is, `mean.*` with `pooling.global = "mean"`),
//! plus one training-mode pass (`train.*`: batch-norm batch statistics) and the
//! running statistics it leaves (`train_state.*`).
//!
//! Error measure, per output tensor: `max |rust - torch| / max(max |torch|, 1e-6)`.
//!
//! Any other fixture made by the same command (for example a full-width ResNet-18 with
//! 3x224x224 images) is checked with
//! `FUSION_PARITY_DIR=/path/to/fixture cargo test --release --test model_parity -- --ignored --nocapture`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fusion_serve::model::config::GlobalPool;
use fusion_serve::model::{FusionModel, FusionOutput};
use fusion_serve::weights;

const PARITY_TOLERANCE: f64 = 1e-4;
const BATCH_CONSISTENCY_TOLERANCE: f64 = 1e-5;

fn max_rel_err(got: &Tensor, expected: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap();
    let expected = expected.to_dtype(DType::F64).unwrap();
    assert_eq!(got.dims(), expected.dims(), "shape mismatch");
    let diff = (&got - &expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = expected.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1e-6)
}

fn outputs(o: &FusionOutput) -> [(&'static str, &Tensor); 4] {
    [
        ("image", &o.image),
        ("audio", &o.audio),
        ("fused", &o.fused),
        ("logits", &o.logits),
    ]
}

/// Runs one fixture directory; returns the largest parity error over all outputs.
fn check_fixture(dir: &Path) -> f64 {
    let cpu = Device::Cpu;
    let loaded =
        weights::load_dir(dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &cpu).unwrap();
    let images = &io["images"];
    let audio = &io["audio"];
    let lengths: Vec<usize> = io["lengths"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|l| l as usize)
        .collect();
    println!(
        "fixture {}: images {:?}, audio {:?}, lengths {lengths:?}",
        dir.display(),
        images.dims(),
        audio.dims()
    );

    let mut worst: f64 = 0.0;
    for (mode, global) in [("max", GlobalPool::Max), ("mean", GlobalPool::Mean)] {
        let mut cfg = loaded.config.clone();
        cfg.pooling.global = global;
        let model = FusionModel::new(&cfg, loaded.var_builder(&cpu)).unwrap();
        let batch = model.forward_t(images, audio, &lengths, false).unwrap();
        for (name, got) in outputs(&batch) {
            let err = max_rel_err(got, &io[&format!("{mode}.{name}")]);
            println!("  pooling {mode:<4} {name:<6} max relative error {err:.3e}");
            assert!(
                err < PARITY_TOLERANCE,
                "{mode}.{name}: relative error {err:.3e}"
            );
            worst = worst.max(err);
        }
        // Each sample alone, unpadded, equals its row of the padded batch.
        let mut worst_single: f64 = 0.0;
        for (b, &len) in lengths.iter().enumerate() {
            let img = images.narrow(0, b, 1).unwrap();
            let aud = audio.narrow(0, b, 1).unwrap().narrow(1, 0, len).unwrap();
            let single = model.forward_t(&img, &aud, &[len], false).unwrap();
            for ((name, one), (_, all)) in outputs(&single).into_iter().zip(outputs(&batch)) {
                let err = max_rel_err(one, &all.narrow(0, b, 1).unwrap());
                assert!(
                    err < BATCH_CONSISTENCY_TOLERANCE,
                    "{mode}: sample {b} alone differs from the batch in {name}: {err:.3e}"
                );
                worst_single = worst_single.max(err);
            }
        }
        println!("  pooling {mode:<4} sample alone vs in batch: max relative difference {worst_single:.3e}");
    }
    worst
}

#[test]
fn narrow_fixture_matches_pytorch() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_narrow");
    let worst = check_fixture(&dir);
    println!("worst parity error {worst:.3e}");
}

#[test]
fn narrow_fixture_train_mode_matches_pytorch() {
    // Batch norm uses batch statistics and updates the running ones, as in PyTorch.
    let cpu = Device::Cpu;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_narrow");
    let loaded = weights::load_dir(&dir).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &cpu).unwrap();
    let lengths: Vec<usize> = io["lengths"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let varmap = loaded.to_varmap().unwrap();
    let model = weights::model_from_varmap(&loaded.config, &varmap, &cpu).unwrap();
    let out = model
        .forward_t(&io["images"], &io["audio"], &lengths, true)
        .unwrap();
    for (name, got) in outputs(&out) {
        let err = max_rel_err(got, &io[&format!("train.{name}")]);
        println!("  train mode {name:<6} max relative error {err:.3e}");
        assert!(
            err < PARITY_TOLERANCE,
            "train.{name}: relative error {err:.3e}"
        );
    }
    let mut n = 0;
    for (key, expected) in &io {
        if let Some(name) = key.strip_prefix("train_state.") {
            let name = format!(
                "image_encoder.{}",
                name.trim_start_matches("image_encoder.")
            );
            let got = weights::TensorSource::tensor(&varmap, &name).unwrap();
            let err = max_rel_err(&got, expected);
            assert!(
                err < PARITY_TOLERANCE,
                "{name} after a training pass: {err:.3e}"
            );
            n += 1;
        }
    }
    assert_eq!(
        n,
        2 * 20,
        "every batch norm's running statistics are checked"
    );
}

#[test]
fn padding_content_never_matters() {
    // The fixture's padding is random garbage; zero padding must give the same outputs.
    let cpu = Device::Cpu;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_narrow");
    let loaded = weights::load_dir(&dir).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &cpu).unwrap();
    let lengths: Vec<usize> = io["lengths"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let audio = &io["audio"];
    let t_max = audio.dim(1).unwrap();
    let mask: Vec<f32> = lengths
        .iter()
        .flat_map(|&l| (0..t_max).map(move |t| if t < l { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (lengths.len(), t_max, 1), &cpu).unwrap();
    let zero_padded = audio.broadcast_mul(&mask).unwrap();
    let model = loaded.build_model(&cpu).unwrap();
    let a = model
        .forward_t(&io["images"], audio, &lengths, false)
        .unwrap();
    let b = model
        .forward_t(&io["images"], &zero_padded, &lengths, false)
        .unwrap();
    for ((name, x), (_, y)) in outputs(&a).into_iter().zip(outputs(&b)) {
        let err = max_rel_err(x, y);
        assert!(
            err < BATCH_CONSISTENCY_TOLERANCE,
            "{name} depends on padding: {err:.3e}"
        );
    }
}

/// Set `FUSION_PARITY_DIR` to a fixture written by the reference script's `fixture`
/// command (any config, e.g. full-width ResNet-18 at 3x224x224).
#[test]
#[ignore = "needs FUSION_PARITY_DIR pointing at a fixture made by tests/reference/fusion_reference.py"]
fn external_fixture_matches_pytorch() {
    let dir = std::env::var("FUSION_PARITY_DIR").expect("set FUSION_PARITY_DIR");
    let worst = check_fixture(Path::new(&dir));
    println!("worst parity error {worst:.3e}");
}
