//! GetModelInfo's answer.

use crate::app::RequestLimits;
use crate::engine::ServedModel;
use crate::proto;

pub fn model_info(model: &ServedModel, limits: &RequestLimits) -> proto::ModelInfo {
    let c = &model.config;
    proto::ModelInfo {
        model_version: model.version.clone(),
        architecture: format!(
            "ResNet-18 image encoder (widths {:?}) + {}-layer LSTM audio encoder (hidden {}) + \
             temporal max-pool (kernel {}, stride {}) and global {} pool + MLP head {:?} -> {}",
            c.image.widths,
            c.audio_encoder.num_layers,
            c.audio_encoder.hidden_size,
            c.pooling.kernel,
            c.pooling.stride,
            match c.pooling.global {
                crate::model::config::GlobalPool::Max => "max",
                crate::model::config::GlobalPool::Mean => "mean",
            },
            c.head.hidden,
            c.num_outputs()
        ),
        task: super::convert::task(c.task) as i32,
        labels: c.labels.clone(),
        image: Some(proto::ImageSpec {
            channels: c.image.channels as u32,
            height: c.image.height as u32,
            width: c.image.width as u32,
        }),
        audio: Some(proto::AudioSpec {
            sample_rate: c.audio.sample_rate,
            n_mels: c.audio.n_mels as u32,
            hop_length: c.audio.hop_length as u32,
            n_fft: c.audio.n_fft as u32,
        }),
        image_feature_dim: c.image_feature_dim() as u32,
        audio_feature_dim: c.audio_feature_dim() as u32,
        fused_dim: c.fused_dim() as u32,
        num_outputs: c.num_outputs() as u32,
        untrained: model.meta.untrained,
        source: model.meta.source.clone(),
        limits: Some(proto::Limits {
            max_samples_per_request: limits.max_samples_per_request as u32,
            max_image_pixels: limits.input.max_image_pixels,
            max_audio_seconds: limits.input.max_audio_seconds,
            max_message_bytes: limits.max_message_bytes as u64,
        }),
        training: model.meta.training.as_ref().map(training_summary),
        config_json: serde_json::to_string_pretty(&**c).unwrap_or_default(),
    }
}

/// GetModelInfo's `training` from a version's `metadata.json` (as JSON).
fn training_summary(md: &serde_json::Value) -> proto::TrainingSummary {
    let u32_of = |k: &str| md.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    let str_of = |k: &str| {
        md.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let validation = md
        .get("metrics")
        .and_then(|m| m.get("validation"))
        .filter(|v| !v.is_null())
        .map(|v| {
            let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN) as f32;
            let list = |k: &str| -> Vec<serde_json::Value> {
                v.get(k)
                    .and_then(|x| x.as_array())
                    .cloned()
                    .unwrap_or_default()
            };
            proto::ValidationResult {
                epoch: v.get("epoch").and_then(|x| x.as_u64()).unwrap_or(0) as u32,
                loss: f("loss"),
                accuracy: f("accuracy"),
                per_class_accuracy: list("per_class_accuracy")
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                    .collect(),
                per_class_count: list("per_class_count")
                    .iter()
                    .map(|x| x.as_u64().unwrap_or(0) as u32)
                    .collect(),
            }
        });
    proto::TrainingSummary {
        finished_at: str_of("created_at"),
        parent_version: str_of("parent_version"),
        config_json: md
            .get("train_config")
            .map(|c| c.to_string())
            .unwrap_or_default(),
        validation,
        train_examples: u32_of("train_examples"),
        validation_examples: u32_of("validation_examples"),
        epochs_completed: u32_of("epochs_completed"),
    }
}
