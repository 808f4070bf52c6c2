//! Weight initialisation, save/load round trips and loader errors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use fusion_serve::model::ModelConfig;
use fusion_serve::weights::{self, TensorKind, TensorSource, WeightsError};

/// A small config on the same code path as the real one.
fn small_config() -> ModelConfig {
    let mut cfg = ModelConfig::default();
    cfg.image.widths = [4, 8, 8, 16];
    cfg.audio.n_mels = 6;
    cfg.audio_encoder.hidden_size = 5;
    cfg.head.hidden = vec![7];
    cfg.labels = vec!["a".into(), "b".into(), "c".into()];
    cfg
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn snapshot(cfg: &ModelConfig, src: &impl TensorSource) -> HashMap<String, Vec<u32>> {
    weights::tensor_specs(cfg)
        .into_iter()
        .map(|s| {
            let t = src.tensor(&s.name).unwrap();
            (s.name, bits(&t))
        })
        .collect()
}

fn inputs(cfg: &ModelConfig, b: usize, t: usize) -> (Tensor, Tensor) {
    let cpu = Device::Cpu;
    let i = &cfg.image;
    let images = Tensor::randn(0f32, 1.0, (b, i.channels, i.height, i.width), &cpu).unwrap();
    let audio = Tensor::randn(0f32, 1.0, (b, t, cfg.audio.n_mels), &cpu).unwrap();
    (images, audio)
}

#[test]
fn init_random_is_deterministic() {
    let cfg = small_config();
    let a = weights::init_random(&cfg, 42).unwrap();
    let b = weights::init_random(&cfg, 42).unwrap();
    let c = weights::init_random(&cfg, 43).unwrap();
    assert_eq!(snapshot(&cfg, &a), snapshot(&cfg, &b));
    let (sa, sc) = (snapshot(&cfg, &a), snapshot(&cfg, &c));
    let conv = "image_encoder.conv1.weight";
    assert_ne!(
        sa[conv], sc[conv],
        "a different seed gives different weights"
    );
    assert_eq!(
        a.all_vars().len(),
        weights::tensor_specs(&cfg).len(),
        "one variable per tensor"
    );
}

#[test]
fn init_random_follows_pytorch_schemes() {
    // Default config: the real ResNet-18 widths, so the statistics are meaningful.
    let cfg = ModelConfig::default();
    let vm = weights::init_random(&cfg, 7).unwrap();
    let get = |n: &str| {
        vm.tensor(n)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let std = |v: &[f32]| {
        let m = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / v.len() as f32).sqrt()
    };
    // Kaiming normal, fan_out = 128 * 3 * 3.
    let w = get("image_encoder.layer2.0.conv2.weight");
    let expected = (2.0f32 / (128.0 * 9.0)).sqrt();
    assert!(
        (std(&w) / expected - 1.0).abs() < 0.02,
        "conv std {} vs {expected}",
        std(&w)
    );
    assert!(get("image_encoder.layer3.1.bn2.weight")
        .iter()
        .all(|&x| x == 1.0));
    assert!(get("image_encoder.layer3.1.bn2.bias")
        .iter()
        .all(|&x| x == 0.0));
    assert!(get("image_encoder.bn1.running_mean")
        .iter()
        .all(|&x| x == 0.0));
    assert!(get("image_encoder.bn1.running_var")
        .iter()
        .all(|&x| x == 1.0));
    // LSTM: U(+-1/sqrt(hidden)).
    let bound = 1.0 / (cfg.audio_encoder.hidden_size as f32).sqrt();
    let l = get("audio_encoder.weight_hh_l1");
    assert!(l.iter().all(|x| x.abs() <= bound));
    assert!(l.iter().cloned().fold(0f32, f32::max) > 0.95 * bound);
    // Linear: U(+-1/sqrt(fan_in)) for weight and bias.
    let bound = 1.0 / (cfg.fused_dim() as f32).sqrt();
    for name in ["head.0.weight", "head.0.bias"] {
        let v = get(name);
        assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
        assert!(
            v.iter().cloned().fold(0f32, f32::max) > 0.9 * bound,
            "{name}"
        );
    }
}

#[test]
fn building_from_a_varmap_uses_exactly_the_spec() {
    let cfg = small_config();
    let vm = weights::init_random(&cfg, 1).unwrap();
    let before = vm.all_vars().len();
    let model = weights::model_from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
    // The model asked for no tensor that the spec does not list.
    assert_eq!(vm.all_vars().len(), before);
    let (images, audio) = inputs(&cfg, 2, 9);
    let out = model.forward_t(&images, &audio, &[9, 4], false).unwrap();
    assert_eq!(out.logits.dims(), &[2, 3]);
    assert_eq!(out.fused.dims(), &[2, cfg.fused_dim()]);
}

#[test]
fn every_parameter_gets_a_gradient_and_training_updates_running_stats() {
    let cfg = small_config();
    let vm = weights::init_random(&cfg, 3).unwrap();
    let model = weights::model_from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
    let (images, audio) = inputs(&cfg, 3, 8);
    let out = model.forward_t(&images, &audio, &[8, 5, 2], true).unwrap();
    let grads = out
        .logits
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let params = weights::trainable_vars(&cfg, &vm).unwrap();
    let n_params = weights::tensor_specs(&cfg)
        .iter()
        .filter(|s| s.kind == TensorKind::Parameter)
        .count();
    assert_eq!(params.len(), n_params);
    for (var, spec) in params.iter().zip(
        weights::tensor_specs(&cfg)
            .into_iter()
            .filter(|s| s.kind == TensorKind::Parameter),
    ) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", spec.name));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{}: gradient norm {norm}",
            spec.name
        );
    }
    // Training mode moved the running statistics held in the VarMap.
    let rm = vm.tensor("image_encoder.bn1.running_mean").unwrap();
    assert!(
        rm.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    let rv = vm.tensor("image_encoder.layer4.1.bn2.running_var").unwrap();
    let ones = rv.ones_like().unwrap();
    assert!(
        (rv - ones)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn save_then_load_round_trips_exactly() {
    let cfg = small_config();
    let vm = weights::init_random(&cfg, 11).unwrap();
    // Non-trivial running statistics, as after training.
    let model = weights::model_from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
    let (images, audio) = inputs(&cfg, 2, 6);
    model.forward_t(&images, &audio, &[6, 3], true).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    weights::save_dir(&dir, &cfg, &vm).unwrap();
    let loaded = weights::load_dir(&dir).unwrap();
    assert_eq!(loaded.config, cfg);
    assert_eq!(snapshot(&cfg, &loaded), snapshot(&cfg, &vm));
    // Only the model directory is left in the parent: no temporary siblings.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("model")]);

    // The file carries PyTorch's num_batches_tracked counters as i64 scalars.
    let raw =
        candle_core::safetensors::load(dir.join(weights::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let nbt = &raw["image_encoder.layer2.0.downsample.1.num_batches_tracked"];
    assert_eq!((nbt.dtype(), nbt.dims()), (DType::I64, &[][..]));
    assert_eq!(
        raw.len(),
        weights::tensor_specs(&cfg).len() + 20 /* batch norms */
    );

    // The loaded model computes exactly what the saved one did.
    let a = model.forward_t(&images, &audio, &[6, 3], false).unwrap();
    let b = loaded
        .build_model(&Device::Cpu)
        .unwrap()
        .forward_t(&images, &audio, &[6, 3], false)
        .unwrap();
    assert_eq!(bits(&a.logits), bits(&b.logits));

    // Saving over an existing directory replaces it.
    let vm2 = weights::init_random(&cfg, 12).unwrap();
    weights::save_dir(&dir, &cfg, &vm2).unwrap();
    assert_eq!(
        snapshot(&cfg, &weights::load_dir(&dir).unwrap()),
        snapshot(&cfg, &vm2)
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// Writes a model directory with `edit` applied to the tensors first.
fn write_edited(dir: &Path, cfg: &ModelConfig, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors: HashMap<String, Tensor> = weights::random_tensors(cfg, 5)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut tensors);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(weights::CONFIG_FILE),
        serde_json::to_vec(cfg).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(&tensors, dir.join(weights::WEIGHTS_FILE)).unwrap();
}

#[test]
fn loader_errors_are_precise() {
    let cfg = small_config();
    let tmp = tempfile::tempdir().unwrap();

    let dir = tmp.path().join("missing");
    write_edited(&dir, &cfg, |t| {
        t.remove("audio_encoder.bias_hh_l1");
    });
    let err = weights::load_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, WeightsError::MissingTensor { name, others: 0 } if name == "audio_encoder.bias_hh_l1"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "missing tensor `audio_encoder.bias_hh_l1`");

    let dir = tmp.path().join("shape");
    write_edited(&dir, &cfg, |t| {
        t.insert(
            "image_encoder.layer2.0.conv1.weight".into(),
            Tensor::zeros((8, 4, 3, 5), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = weights::load_dir(&dir).unwrap_err();
    match &err {
        WeightsError::ShapeMismatch {
            name,
            expected,
            got,
        } => {
            assert_eq!(name, "image_encoder.layer2.0.conv1.weight");
            assert_eq!(expected, &[8, 4, 3, 3]);
            assert_eq!(got, &[8, 4, 3, 5]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "tensor `image_encoder.layer2.0.conv1.weight` has shape [8, 4, 3, 5], expected [8, 4, 3, 3]"
    );

    let dir = tmp.path().join("extra");
    write_edited(&dir, &cfg, |t| {
        t.insert(
            "image_encoder.fc.weight".into(),
            Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "image_encoder.bn1.num_batches_tracked".into(),
            Tensor::new(3i64, &Device::Cpu).unwrap(),
        );
    });
    let err = weights::load_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, WeightsError::UnexpectedTensor { name, .. } if name == "image_encoder.fc.weight"),
        "{err:?}"
    );

    let dir = tmp.path().join("dtype");
    write_edited(&dir, &cfg, |t| {
        t.insert(
            "head.0.bias".into(),
            Tensor::zeros(7, DType::I64, &Device::Cpu).unwrap(),
        );
    });
    let err = weights::load_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, WeightsError::DType { name, .. } if name == "head.0.bias"),
        "{err:?}"
    );

    // Bad configs name the field.
    let dir = tmp.path().join("config");
    write_edited(&dir, &cfg, |_| {});
    std::fs::write(
        dir.join(weights::CONFIG_FILE),
        r#"{"audio_encoder": {"hidden_size": 0}}"#,
    )
    .unwrap();
    let msg = weights::load_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("audio_encoder.hidden_size"), "{msg}");
    std::fs::write(
        dir.join(weights::CONFIG_FILE),
        r#"{"head": {"hiden": [3]}}"#,
    )
    .unwrap();
    let msg = weights::load_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("hiden"), "{msg}");

    // A missing directory names the file.
    let msg = weights::load_dir(tmp.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn half_precision_weights_are_accepted() {
    let cfg = small_config();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("f16");
    write_edited(&dir, &cfg, |t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::F16).unwrap();
        }
    });
    let loaded = weights::load_dir(&dir).unwrap();
    assert!(loaded.tensors.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn a_varmap_copy_is_independent_of_the_loaded_weights() {
    let cfg = small_config();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    weights::save_dir(&dir, &cfg, &weights::init_random(&cfg, 2).unwrap()).unwrap();
    let loaded = weights::load_dir(&dir).unwrap();
    let vm: VarMap = loaded.to_varmap().unwrap();
    let served = loaded.build_model(&Device::Cpu).unwrap();
    let trained = weights::model_from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
    let (images, audio) = inputs(&cfg, 2, 5);
    let before = served.forward_t(&images, &audio, &[5, 5], false).unwrap();
    // Training-mode passes update the VarMap's running statistics only.
    trained.forward_t(&images, &audio, &[5, 5], true).unwrap();
    let after = served.forward_t(&images, &audio, &[5, 5], false).unwrap();
    assert_eq!(bits(&before.logits), bits(&after.logits));
    assert_ne!(
        bits(&loaded.tensors["image_encoder.bn1.running_mean"]),
        bits(&vm.tensor("image_encoder.bn1.running_mean").unwrap())
    );
}
