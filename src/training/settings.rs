//! A run's settings: the proto `TrainConfig` checked and completed with defaults.
//! Every refusal names the field (`config.learning_rate: ...`).

use serde::Serialize;

use crate::model::config::{ModelConfig, Task};
use crate::proto;

use super::TrainError;

/// Which loss the run minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Softmax cross-entropy over the outputs (multiclass).
    CrossEntropy,
    /// Sigmoid binary cross-entropy per output (multilabel, binary).
    Bce,
}

/// Which parts of the model train; the others stay frozen (and run in eval mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Parts {
    pub image_encoder: bool,
    pub audio_encoder: bool,
    pub head: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        image_encoder: true,
        audio_encoder: true,
        head: true,
    };

    /// Whether the tensor `name` belongs to a part that trains.
    pub fn trains(&self, name: &str) -> bool {
        (self.image_encoder && name.starts_with("image_encoder."))
            || (self.audio_encoder && name.starts_with("audio_encoder."))
            || (self.head && name.starts_with("head."))
    }
}

/// How the learning rate changes over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Cosine decay to 1% of the learning rate at the last planned step.
    Cosine,
}

impl Schedule {
    /// The learning rate of optimiser step `step` (0-based) of `total`.
    pub fn rate(&self, base: f64, step: usize, total: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Cosine => {
                let t = if total <= 1 {
                    0.0
                } else {
                    step.min(total - 1) as f64 / (total - 1) as f64
                };
                let floor = 0.01 * base;
                floor + (base - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Random changes to training examples (never to validation examples).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Augment {
    pub image_max_shift_pixels: usize,
    pub audio_gain: f32,
    pub audio_max_shift_seconds: f32,
    pub audio_noise_std: f32,
    pub modality_dropout: f32,
}

impl Augment {
    pub fn is_off(&self) -> bool {
        *self == Augment::default()
    }
}

/// Validated settings of one run, with every default filled in. Serialised into the
/// version's `metadata.json` as the run's settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainSettings {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub lr_schedule: Schedule,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub loss: LossKind,
    pub parts: Parts,
    pub validation_fraction: f32,
    pub seed: u64,
    pub early_stopping_patience: usize,
    pub gradient_accumulation_steps: usize,
    pub head_dropout: f32,
    pub augmentation: Augment,
    pub activate: bool,
    pub queue: bool,
}

/// Most epochs one run may ask for.
pub const MAX_EPOCHS: u32 = 10_000;
/// Largest micro-batch.
pub const MAX_BATCH_SIZE: u32 = 4096;
/// Most micro-batches per optimiser step.
pub const MAX_ACCUMULATION: u32 = 1024;

fn invalid(field: &str, message: impl std::fmt::Display) -> TrainError {
    TrainError::InvalidArgument(format!("config.{field}: {message}"))
}

fn finite_in(field: &str, v: f32, lo: f32, hi: f32, hi_open: bool) -> Result<f32, TrainError> {
    let ok = v.is_finite() && v >= lo && if hi_open { v < hi } else { v <= hi };
    if ok {
        Ok(v)
    } else {
        let close = if hi_open { ")" } else { "]" };
        Err(invalid(
            field,
            format!("must be in [{lo}, {hi}{close}, got {v}"),
        ))
    }
}

impl TrainSettings {
    /// Checks `c` against the served model's config and fills in the defaults.
    pub fn from_proto(c: &proto::TrainConfig, model: &ModelConfig) -> Result<Self, TrainError> {
        let epochs = if c.epochs == 0 { 5 } else { c.epochs };
        if epochs > MAX_EPOCHS {
            return Err(invalid(
                "epochs",
                format!("at most {MAX_EPOCHS}, got {epochs}"),
            ));
        }
        let batch_size = if c.batch_size == 0 { 32 } else { c.batch_size };
        if batch_size > MAX_BATCH_SIZE {
            return Err(invalid(
                "batch_size",
                format!("at most {MAX_BATCH_SIZE}, got {batch_size}"),
            ));
        }
        if batch_size < 2 {
            return Err(invalid(
                "batch_size",
                "at least 2: batch norm trains on batch statistics",
            ));
        }
        let lr = if c.learning_rate == 0.0 {
            1e-3
        } else {
            c.learning_rate
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(invalid(
                "learning_rate",
                format!("must be a positive number, got {lr}"),
            ));
        }
        let lr_schedule = match proto::LrSchedule::try_from(c.lr_schedule) {
            Ok(proto::LrSchedule::Unspecified | proto::LrSchedule::Constant) => Schedule::Constant,
            Ok(proto::LrSchedule::Cosine) => Schedule::Cosine,
            Err(_) => {
                return Err(invalid(
                    "lr_schedule",
                    format!("unknown value {}", c.lr_schedule),
                ))
            }
        };
        let beta = |field: &str, v: f32, default: f32| -> Result<f32, TrainError> {
            let v = if v == 0.0 { default } else { v };
            finite_in(field, v, 0.0, 1.0, true)
        };
        let beta1 = beta("beta1", c.beta1, 0.9)?;
        let beta2 = beta("beta2", c.beta2, 0.999)?;
        let weight_decay = finite_in(
            "weight_decay",
            c.weight_decay.unwrap_or(0.01),
            0.0,
            1.0,
            false,
        )?;
        let loss = match proto::Loss::try_from(c.loss) {
            Ok(proto::Loss::Unspecified) => match model.task {
                Task::Multiclass => LossKind::CrossEntropy,
                Task::Multilabel | Task::Binary => LossKind::Bce,
            },
            // The loss must fit how the served model's outputs are read (softmax for
            // multiclass, sigmoid otherwise), or the trained version would serve
            // probabilities it was never fitted for.
            Ok(proto::Loss::CrossEntropy) => {
                if model.task != Task::Multiclass {
                    return Err(invalid(
                        "loss",
                        format!(
                            "cross_entropy needs a multiclass model; this model is {} (outputs read with sigmoid): use LOSS_BCE or leave loss unset",
                            model.task
                        ),
                    ));
                }
                LossKind::CrossEntropy
            }
            Ok(proto::Loss::Bce) => {
                if model.task == Task::Multiclass {
                    return Err(invalid(
                        "loss",
                        "bce needs a multilabel or binary model; this model is multiclass (outputs read with softmax): use LOSS_CROSS_ENTROPY or leave loss unset",
                    ));
                }
                LossKind::Bce
            }
            Err(_) => return Err(invalid("loss", format!("unknown value {}", c.loss))),
        };
        let parts = if c.parts.is_empty() {
            Parts::ALL
        } else {
            let mut p = Parts {
                image_encoder: false,
                audio_encoder: false,
                head: false,
            };
            for (i, &v) in c.parts.iter().enumerate() {
                match proto::TrainPart::try_from(v) {
                    Ok(proto::TrainPart::ImageEncoder) => p.image_encoder = true,
                    Ok(proto::TrainPart::AudioEncoder) => p.audio_encoder = true,
                    Ok(proto::TrainPart::Head) => p.head = true,
                    _ => {
                        return Err(invalid(
                            &format!("parts[{i}]"),
                            format!("unknown or unspecified part {v}: use TRAIN_PART_IMAGE_ENCODER, TRAIN_PART_AUDIO_ENCODER or TRAIN_PART_HEAD"),
                        ))
                    }
                }
            }
            p
        };
        let validation_fraction = finite_in(
            "validation_fraction",
            c.validation_fraction,
            0.0,
            0.5,
            false,
        )?;
        let accumulation = c.gradient_accumulation_steps.max(1);
        if accumulation > MAX_ACCUMULATION {
            return Err(invalid(
                "gradient_accumulation_steps",
                format!("at most {MAX_ACCUMULATION}, got {accumulation}"),
            ));
        }
        let head_dropout = finite_in("head_dropout", c.head_dropout, 0.0, 1.0, true)?;
        let augmentation = match &c.augmentation {
            None => Augment::default(),
            Some(a) => {
                if a.image_max_shift_pixels as usize >= model.image.height.min(model.image.width) {
                    return Err(invalid(
                        "augmentation.image_max_shift_pixels",
                        format!(
                            "must be smaller than the model's image size {}x{}, got {}",
                            model.image.height, model.image.width, a.image_max_shift_pixels
                        ),
                    ));
                }
                Augment {
                    image_max_shift_pixels: a.image_max_shift_pixels as usize,
                    audio_gain: finite_in("augmentation.audio_gain", a.audio_gain, 0.0, 1.0, true)?,
                    audio_max_shift_seconds: finite_in(
                        "augmentation.audio_max_shift_seconds",
                        a.audio_max_shift_seconds,
                        0.0,
                        10.0,
                        false,
                    )?,
                    audio_noise_std: finite_in(
                        "augmentation.audio_noise_std",
                        a.audio_noise_std,
                        0.0,
                        1.0,
                        false,
                    )?,
                    modality_dropout: finite_in(
                        "augmentation.modality_dropout",
                        a.modality_dropout,
                        0.0,
                        1.0,
                        true,
                    )?,
                }
            }
        };
        Ok(Self {
            epochs: epochs as usize,
            batch_size: batch_size as usize,
            learning_rate: lr as f64,
            lr_schedule,
            beta1: beta1 as f64,
            beta2: beta2 as f64,
            weight_decay: weight_decay as f64,
            loss,
            parts,
            validation_fraction,
            seed: c.seed,
            early_stopping_patience: c.early_stopping_patience as usize,
            gradient_accumulation_steps: accumulation as usize,
            head_dropout,
            augmentation,
            activate: c.activate.unwrap_or(true),
            queue: c.queue,
        })
    }

    /// The settings as JSON (for metadata and GetModelInfo).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_proto_comments() {
        let s = TrainSettings::from_proto(&proto::TrainConfig::default(), &ModelConfig::default())
            .unwrap();
        assert_eq!(s.epochs, 5);
        assert_eq!(s.batch_size, 32);
        assert!((s.learning_rate - 1e-3).abs() < 1e-9);
        assert!((s.weight_decay - 0.01).abs() < 1e-6);
        assert_eq!(s.loss, LossKind::CrossEntropy);
        assert_eq!(s.parts, Parts::ALL);
        assert_eq!(s.gradient_accumulation_steps, 1);
        assert!(s.activate);
        assert!(s.augmentation.is_off());
    }

    #[test]
    fn bad_values_name_the_field() {
        let m = ModelConfig::default();
        let cases: Vec<(proto::TrainConfig, &str)> = vec![
            (
                proto::TrainConfig {
                    learning_rate: -1.0,
                    ..Default::default()
                },
                "config.learning_rate",
            ),
            (
                proto::TrainConfig {
                    beta2: 1.5,
                    ..Default::default()
                },
                "config.beta2",
            ),
            (
                proto::TrainConfig {
                    validation_fraction: 0.9,
                    ..Default::default()
                },
                "config.validation_fraction",
            ),
            (
                proto::TrainConfig {
                    head_dropout: 1.0,
                    ..Default::default()
                },
                "config.head_dropout",
            ),
            (
                proto::TrainConfig {
                    parts: vec![0],
                    ..Default::default()
                },
                "config.parts[0]",
            ),
            (
                proto::TrainConfig {
                    batch_size: 1,
                    ..Default::default()
                },
                "config.batch_size",
            ),
            (
                proto::TrainConfig {
                    weight_decay: Some(f32::NAN),
                    ..Default::default()
                },
                "config.weight_decay",
            ),
            (
                proto::TrainConfig {
                    loss: proto::Loss::Bce as i32,
                    ..Default::default()
                },
                "config.loss: bce needs a multilabel or binary model",
            ),
            (
                proto::TrainConfig {
                    augmentation: Some(proto::Augmentation {
                        modality_dropout: 1.0,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "config.augmentation.modality_dropout",
            ),
        ];
        for (c, field) in cases {
            let e = TrainSettings::from_proto(&c, &m).unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn cosine_decays_to_one_percent() {
        let c = Schedule::Cosine;
        assert!((c.rate(1.0, 0, 11) - 1.0).abs() < 1e-12);
        assert!((c.rate(1.0, 5, 11) - 0.505).abs() < 1e-12);
        assert!((c.rate(1.0, 10, 11) - 0.01).abs() < 1e-12);
        assert_eq!(Schedule::Constant.rate(0.5, 7, 11), 0.5);
    }

    #[test]
    fn parts_select_tensors_by_prefix() {
        let p = Parts {
            image_encoder: false,
            audio_encoder: false,
            head: true,
        };
        assert!(p.trains("head.0.weight"));
        assert!(!p.trains("image_encoder.conv1.weight"));
    }
}
