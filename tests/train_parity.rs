//! One training step against PyTorch: the loss, the gradients of representative
//! parameters (the 7x7 stem conv and its batch norm, a layer1 conv, a downsample conv
//! and batch norm, a layer4 conv, LSTM input/recurrent weights and bias of both
//! layers, the head), the batch-norm running statistics after the step, and the
//! parameters after one AdamW step.
//!
//! Reference: `tests/reference/train_reference.py` (the module of
//! `tests/reference/fusion_reference.py`: torchvision's ResNet-18 layout including the
//! 3x3 stride-2 pad-1 max-pool stem, batch norm in training mode, `nn.LSTM`, the MLP
//! head; `F.cross_entropy`, `torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999),
//! eps=1e-8, weight_decay=0.01)`), computed in float64. The fixture was produced with
//!
//! ```text
//! python3 tests/reference/train_reference.py --out tests/fixtures/train_step --seed 0
//! ```
//!
//! Error measure, per tensor: `max |rust - torch| / max(max |torch|, 1e-6)`, at most
//! 1e-4.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use fusion_serve::training::dataset::Batch;
use fusion_serve::training::settings::{LossKind, Parts};
use fusion_serve::training::trainer::{forward_train, loss_fn};
use fusion_serve::weights::{self, TensorSource};

const TOLERANCE: f64 = 1e-4;

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

#[test]
fn one_training_step_matches_pytorch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train_step");
    let loaded = weights::load_dir(&dir).unwrap();
    let cfg = loaded.config.clone();
    let varmap = loaded.to_varmap().unwrap();
    let model = weights::model_from_varmap(&cfg, &varmap, &Device::Cpu).unwrap();
    let step: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("step.safetensors"), &Device::Cpu).unwrap();
    let lengths: Vec<usize> = step["lengths"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let labels = step["labels"].to_dtype(DType::U32).unwrap();
    let batch = Batch {
        images: step["images"].clone(),
        audio: step["audio"].clone(),
        lengths,
        targets: labels,
        classes: Vec::new(),
    };
    let logits = forward_train(&model, &batch, Parts::ALL).unwrap();
    let loss = loss_fn(LossKind::CrossEntropy, &logits, &batch.targets).unwrap();
    let mut errors: Vec<(String, f64)> = vec![(
        "loss".into(),
        max_rel_err(&loss.reshape(()).unwrap(), &step["loss"]),
    )];
    let grads = loss.backward().unwrap();
    let mut names: Vec<&String> = step.keys().collect();
    names.sort();
    for key in &names {
        if let Some(name) = key.strip_prefix("grad.") {
            let var = varmap.tensor(name).unwrap();
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            errors.push((key.to_string(), max_rel_err(g, &step[key.as_str()])));
        }
        if let Some(name) = key.strip_prefix("bn_after.") {
            let t = varmap.tensor(name).unwrap();
            errors.push((key.to_string(), max_rel_err(&t, &step[key.as_str()])));
        }
    }
    let mut opt = AdamW::new(
        weights::trainable_vars(&cfg, &varmap).unwrap(),
        ParamsAdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();
    for key in &names {
        if let Some(name) = key.strip_prefix("adamw.") {
            let t = varmap.tensor(name).unwrap();
            errors.push((key.to_string(), max_rel_err(&t, &step[key.as_str()])));
        }
    }
    let mut worst = 0f64;
    for (name, e) in &errors {
        eprintln!("{name:<55} {e:.3e}");
        worst = worst.max(*e);
    }
    assert!(errors.iter().any(|(n, _)| n.starts_with("bn_after.")));
    assert!(errors.iter().any(|(n, _)| n.starts_with("grad.")));
    let bad: Vec<_> = errors.iter().filter(|(_, e)| *e > TOLERANCE).collect();
    assert!(bad.is_empty(), "over {TOLERANCE}: {bad:?}");
    eprintln!("worst relative error {worst:.3e}");
}
