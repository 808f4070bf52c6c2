//! proto <-> domain conversion. Missing or empty fields become [`InputError`]s that
//! name the field.

use crate::engine::SampleOutput;
use crate::error::InputError;
use crate::model::config::Task;
use crate::preprocess::{AudioInput, ImageInput, RawSample};
use crate::proto;

/// Converts one proto sample; `index` is its position in the request.
pub fn sample(index: usize, s: proto::Sample) -> Result<RawSample, InputError> {
    let field = |f: &str| format!("samples[{index}].{f}");
    let image = match s.image.and_then(|i| i.data) {
        None => {
            return Err(InputError::new(
                field("image"),
                "missing: set image.encoded (PNG/JPEG bytes) or image.tensor",
            ))
        }
        Some(proto::image::Data::Encoded(b)) => ImageInput::Encoded(b),
        Some(proto::image::Data::Tensor(t)) => ImageInput::Tensor {
            shape: t.shape.into_iter().map(|d| d as usize).collect(),
            values: t.values,
        },
    };
    let audio = match s.audio.and_then(|a| a.data) {
        None => {
            return Err(InputError::new(
                field("audio"),
                "missing: set audio.wav, audio.pcm or audio.features",
            ))
        }
        Some(proto::audio::Data::Wav(b)) => AudioInput::Wav(b),
        Some(proto::audio::Data::Pcm(p)) => AudioInput::Pcm {
            sample_rate: p.sample_rate,
            samples: p.samples,
        },
        Some(proto::audio::Data::Features(t)) => AudioInput::Features {
            shape: t.shape.into_iter().map(|d| d as usize).collect(),
            values: t.values,
        },
    };
    Ok(RawSample { image, audio })
}

pub fn fused(out: SampleOutput, include_modalities: bool) -> proto::FusedFeatures {
    let (image, audio) = if include_modalities {
        (out.image, out.audio)
    } else {
        (Vec::new(), Vec::new())
    };
    proto::FusedFeatures {
        fused: out.fused,
        image,
        audio,
    }
}

/// Scores, probabilities as the task reads them, and the best `top_k` labels.
pub fn prediction(
    logits: Vec<f32>,
    task: Task,
    labels: &[String],
    top_k: usize,
) -> proto::Prediction {
    let probabilities = match task {
        Task::Multiclass => softmax(&logits),
        Task::Multilabel | Task::Binary => logits.iter().map(|&x| sigmoid(x)).collect(),
    };
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    let top = order
        .into_iter()
        .take(top_k)
        .map(|i| proto::LabelScore {
            index: i as u32,
            label: labels.get(i).cloned().unwrap_or_default(),
            probability: probabilities[i],
        })
        .collect();
    proto::Prediction {
        scores: logits,
        probabilities,
        top,
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn task(t: Task) -> proto::Task {
    match t {
        Task::Multiclass => proto::Task::Multiclass,
        Task::Multilabel => proto::Task::Multilabel,
        Task::Binary => proto::Task::Binary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiclass_probabilities_sum_to_one_and_top_is_sorted() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let p = prediction(vec![1.0, 3.0, 2.0], Task::Multiclass, &labels, 2);
        let sum: f32 = p.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert_eq!(p.top.len(), 2);
        assert_eq!(p.top[0].label, "b");
        assert_eq!(p.top[1].label, "c");
    }

    #[test]
    fn multilabel_uses_sigmoid() {
        let labels = vec!["x".to_string(), "y".to_string()];
        let p = prediction(vec![0.0, 100.0], Task::Multilabel, &labels, 5);
        assert!((p.probabilities[0] - 0.5).abs() < 1e-6);
        assert!((p.probabilities[1] - 1.0).abs() < 1e-6);
        assert_eq!(p.top.len(), 2);
    }

    #[test]
    fn missing_modality_names_the_field() {
        let e = sample(
            3,
            proto::Sample {
                image: None,
                audio: None,
            },
        )
        .unwrap_err();
        assert_eq!(e.field, "samples[3].image");
    }
}
