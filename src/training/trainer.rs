//! The training loop. It runs on a thread of its own, on its own variables (a `VarMap`
//! the served model never sees), inside its own rayon pool so that candle's intra-op
//! parallelism for training never queues behind, or in front of, serving's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, ModuleT, Optimizer, ParamsAdamW, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::model::{FusionModel, ModelConfig};
use crate::telemetry::metrics as m;
use crate::weights::{self, TensorKind};

use super::dataset::{self, Batch, Example};
use super::settings::{LossKind, Parts, TrainSettings};
use super::TrainError;

/// Validation metrics of one epoch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Validation {
    pub epoch: usize,
    pub loss: f32,
    /// Multiclass: fraction correct. Multilabel: fraction of outputs right at 0.5.
    pub accuracy: f32,
    /// Multiclass: accuracy per class (0 for a class without examples; see counts).
    pub per_class_accuracy: Vec<f32>,
    pub per_class_count: Vec<u32>,
}

/// What the loop reports while it runs.
#[derive(Clone, Debug)]
pub enum Event {
    Progress {
        epoch: usize,
        step: usize,
        total_steps: usize,
        running_loss: f32,
        examples_per_second: f32,
        eta_seconds: f32,
    },
    Validation(Validation),
}

/// Everything one run needs.
pub struct TrainJob {
    pub settings: TrainSettings,
    pub config: ModelConfig,
    /// The starting weights; the run trains these variables in place.
    pub varmap: VarMap,
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    /// Set to stop the run at the next step.
    pub cancel: Arc<AtomicBool>,
    /// Where the forward and backward passes run: the serving device. The variables
    /// in `varmap` must already live there.
    pub device: Device,
    /// Threads of the run's own rayon pool.
    pub threads: usize,
}

/// A finished run: the weights to keep and how it went.
pub struct TrainOutcome {
    /// The kept weights (the best validation loss, else the last), every tensor.
    pub tensors: HashMap<String, Tensor>,
    pub epochs_completed: usize,
    pub final_train_loss: f32,
    pub validation: Option<Validation>,
    pub train_seconds: f32,
    pub stopped_early: bool,
}

/// Optimiser steps per epoch for `n` examples.
pub fn steps_per_epoch(n: usize, s: &TrainSettings) -> usize {
    let micro = if n < 2 {
        0
    } else {
        n / s.batch_size + usize::from(n % s.batch_size >= 2)
    };
    micro.div_ceil(s.gradient_accumulation_steps).max(1)
}

/// Runs the job in its own rayon pool on the calling thread; `emit` gets every event
/// and returns false when nobody listens any more (which cancels the run).
pub fn run(
    job: TrainJob,
    emit: &mut (dyn FnMut(Event) -> bool + Send),
) -> Result<TrainOutcome, TrainError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(job.threads.max(1))
        .thread_name(|i| format!("fusion-train-{i}"))
        .build()
        .map_err(|e| TrainError::Internal(format!("cannot start the training threads: {e}")))?;
    pool.install(|| train(job, emit))
}

fn train(
    job: TrainJob,
    emit: &mut (dyn FnMut(Event) -> bool + Send),
) -> Result<TrainOutcome, TrainError> {
    let started = Instant::now();
    let s = &job.settings;
    let cfg = &job.config;
    let device = job.device.clone();
    if job.train.len() < 2 {
        return Err(TrainError::InvalidArgument(format!(
            "examples: {} training examples after the validation split; at least 2 are needed",
            job.train.len()
        )));
    }
    let mut model = weights::model_from_varmap(cfg, &job.varmap, &device)
        .map_err(|e| TrainError::Internal(format!("building the model to train: {e}")))?;
    model.set_head_dropout(s.head_dropout)?;
    let vars = selected_vars(cfg, &job.varmap, s.parts)?;
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: s.learning_rate,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: 1e-8,
            weight_decay: s.weight_decay,
        },
    )?;
    let one_hot = s.loss == LossKind::Bce;
    let mut rng = StdRng::seed_from_u64(s.seed);
    let per_epoch = steps_per_epoch(job.train.len(), s);
    let total_steps = per_epoch * s.epochs;
    let mut step = 0usize;
    let mut best: Option<(f32, HashMap<String, Tensor>, Validation)> = None;
    let mut since_best = 0usize;
    let mut epochs_completed = 0usize;
    let mut final_train_loss = f32::NAN;
    let mut stopped_early = false;
    let mut seen = 0usize;
    let cancelled = |c: &AtomicBool| c.load(Ordering::Relaxed);

    for epoch in 1..=s.epochs {
        metrics::gauge!(m::TRAIN_EPOCH).set(epoch as f64);
        let micro = dataset::batches(job.train.len(), s.batch_size, &mut rng);
        let (mut loss_sum, mut loss_n) = (0f64, 0usize);
        for group in micro.chunks(s.gradient_accumulation_steps) {
            let group_examples: usize = group.iter().map(|b| b.len()).sum();
            let mut grads = GradStore::default();
            for ids in group {
                if cancelled(&job.cancel) {
                    return Err(TrainError::Cancelled("the client cancelled the run".into()));
                }
                let examples: Vec<&Example> = ids.iter().map(|&i| &job.train[i]).collect();
                let aug = (!s.augmentation.is_off()).then_some((&s.augmentation, &mut rng));
                let batch = dataset::collate(&examples, cfg, one_hot, aug, &device)?;
                let logits = forward_train(&model, &batch, s.parts)?;
                let loss = loss_fn(s.loss, &logits, &batch.targets)?;
                let value = loss.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(TrainError::Diverged(format!(
                        "the training loss became {value} at epoch {epoch}, step {} (learning_rate {:e}); nothing was stored or served. Lower learning_rate or check the inputs for extreme values",
                        step + 1,
                        s.learning_rate as f32
                    )));
                }
                let weight = ids.len() as f64 / group_examples as f64;
                let g = (loss * weight)?.backward()?;
                for v in &vars {
                    if let Some(gv) = g.get(v.as_tensor()) {
                        let sum = match grads.remove(v.as_tensor()) {
                            Some(prev) => (prev + gv)?,
                            None => gv.clone(),
                        };
                        grads.insert(v.as_tensor(), sum);
                    }
                }
                loss_sum += value as f64 * ids.len() as f64;
                loss_n += ids.len();
                seen += ids.len();
            }
            opt.set_learning_rate(s.lr_schedule.rate(s.learning_rate, step, total_steps));
            opt.step(&grads)?;
            step += 1;
            let running = (loss_sum / loss_n.max(1) as f64) as f32;
            metrics::gauge!(m::TRAIN_LOSS).set(running as f64);
            let elapsed = started.elapsed().as_secs_f32().max(1e-6);
            let per_step = elapsed / step as f32;
            let listening = emit(Event::Progress {
                epoch,
                step,
                total_steps,
                running_loss: running,
                examples_per_second: seen as f32 / elapsed,
                eta_seconds: per_step * total_steps.saturating_sub(step) as f32,
            });
            if !listening {
                job.cancel.store(true, Ordering::Relaxed);
            }
        }
        final_train_loss = (loss_sum / loss_n.max(1) as f64) as f32;
        epochs_completed = epoch;
        if job.validation.is_empty() {
            continue;
        }
        let v = evaluate(&model, cfg, s.loss, &job.validation, epoch, &device)?;
        if !v.loss.is_finite() {
            return Err(TrainError::Diverged(format!(
                "the validation loss became {} after epoch {epoch} (learning_rate {:e}); nothing was stored or served",
                v.loss, s.learning_rate as f32
            )));
        }
        if !emit(Event::Validation(v.clone())) {
            job.cancel.store(true, Ordering::Relaxed);
        }
        if best.as_ref().is_none_or(|(l, _, _)| v.loss < *l) {
            best = Some((v.loss, snapshot(&job.varmap)?, v));
            since_best = 0;
        } else {
            since_best += 1;
            if s.early_stopping_patience > 0 && since_best >= s.early_stopping_patience {
                stopped_early = true;
                break;
            }
        }
    }
    if cancelled(&job.cancel) {
        return Err(TrainError::Cancelled("the client cancelled the run".into()));
    }
    let (tensors, validation) = match best {
        Some((_, t, v)) => (t, Some(v)),
        None => (snapshot(&job.varmap)?, None),
    };
    check_finite(&tensors)?;
    Ok(TrainOutcome {
        tensors,
        epochs_completed,
        final_train_loss,
        validation,
        train_seconds: started.elapsed().as_secs_f32(),
        stopped_early,
    })
}

/// The trainable variables of the parts that train.
fn selected_vars(cfg: &ModelConfig, varmap: &VarMap, parts: Parts) -> Result<Vec<Var>, TrainError> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let vars: Vec<Var> = weights::tensor_specs(cfg)
        .into_iter()
        .filter(|s| s.kind == TensorKind::Parameter && parts.trains(&s.name))
        .filter_map(|s| data.get(&s.name).cloned())
        .collect();
    if vars.is_empty() {
        return Err(TrainError::InvalidArgument(
            "config.parts: no trainable tensors selected".into(),
        ));
    }
    Ok(vars)
}

/// The training-mode forward pass: only the parts that train run in training mode
/// (batch statistics, dropout); a frozen encoder runs in eval mode and its output is
/// detached so no gradient is computed through it.
pub fn forward_train(model: &FusionModel, b: &Batch, parts: Parts) -> candle_core::Result<Tensor> {
    let image = model
        .image_encoder()
        .forward_t(&b.images, parts.image_encoder)?;
    let image = if parts.image_encoder {
        image
    } else {
        image.detach()
    };
    let frames = model
        .audio_encoder()
        .forward_t(&b.audio, parts.audio_encoder)?;
    let audio = model.pooling().forward(&frames, &b.lengths)?;
    let audio = if parts.audio_encoder {
        audio
    } else {
        audio.detach()
    };
    let fused = Tensor::cat(&[&image, &audio], 1)?;
    model.head().forward_t(&fused, parts.head)
}

/// Mean loss of a batch: softmax cross-entropy against `(B,)` u32 classes, or a
/// numerically stable BCE-with-logits against `(B, K)` 0/1 targets:
/// `max(x, 0) - x t + ln(1 + e^-|x|)`.
pub fn loss_fn(kind: LossKind, logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    match kind {
        LossKind::CrossEntropy => candle_nn::loss::cross_entropy(logits, targets),
        LossKind::Bce => {
            let soft = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
            (logits.relu()? - (logits * targets)?)?
                .add(&soft)?
                .mean_all()
        }
    }
}

/// Loss and accuracy of `examples` in eval mode.
pub fn evaluate(
    model: &FusionModel,
    cfg: &ModelConfig,
    kind: LossKind,
    examples: &[Example],
    epoch: usize,
    device: &Device,
) -> Result<Validation, TrainError> {
    let k = cfg.labels.len();
    let one_hot = kind == LossKind::Bce;
    let (mut loss_sum, mut correct, mut outputs_right) = (0f64, 0usize, 0usize);
    let mut per_class = vec![(0u32, 0u32); k];
    for chunk in examples.chunks(64) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = dataset::collate(&refs, cfg, one_hot, None, device)?;
        let logits = model
            .forward_t(&batch.images, &batch.audio, &batch.lengths, false)?
            .logits;
        let loss = loss_fn(kind, &logits, &batch.targets)?.to_scalar::<f32>()?;
        loss_sum += loss as f64 * chunk.len() as f64;
        match kind {
            LossKind::CrossEntropy => {
                let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                for (p, c) in pred.iter().zip(&batch.classes) {
                    if let Some(c) = *c {
                        per_class[c].1 += 1;
                        if *p as usize == c {
                            per_class[c].0 += 1;
                            correct += 1;
                        }
                    }
                }
            }
            LossKind::Bce => {
                let pred = logits.ge(0f32)?.to_dtype(DType::F32)?;
                let right = pred.eq(&batch.targets)?.to_dtype(DType::F32)?;
                outputs_right += right.sum_all()?.to_scalar::<f32>()? as usize;
            }
        }
    }
    let n = examples.len().max(1);
    let accuracy = match kind {
        LossKind::CrossEntropy => correct as f32 / n as f32,
        LossKind::Bce => outputs_right as f32 / (n * k).max(1) as f32,
    };
    let (per_class_accuracy, per_class_count) = if kind == LossKind::CrossEntropy {
        per_class
            .iter()
            .map(|&(ok, all)| {
                (
                    if all == 0 {
                        0.0
                    } else {
                        ok as f32 / all as f32
                    },
                    all,
                )
            })
            .unzip()
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(Validation {
        epoch,
        loss: (loss_sum / n as f64) as f32,
        accuracy,
        per_class_accuracy,
        per_class_count,
    })
}

/// A copy of every tensor of `varmap` (the variables keep training).
fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>, TrainError> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = HashMap::with_capacity(data.len());
    for (name, var) in data.iter() {
        // Kept in host memory: a copy, since the optimiser updates the variable in place.
        let t = var.as_tensor();
        let kept = if t.device().is_cpu() {
            t.copy()?
        } else {
            t.to_device(&Device::Cpu)?
        };
        out.insert(name.clone(), kept);
    }
    Ok(out)
}

fn check_finite(tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        let s = t
            .abs()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if !s.is_finite() {
            return Err(TrainError::Diverged(format!(
                "the trained tensor `{name}` holds NaN or infinite values; nothing was stored or served. Lower learning_rate"
            )));
        }
    }
    Ok(())
}
