//! Stacks prepared samples into the model's batch tensors, padding audio to the
//! longest clip; the lengths let the model mask the padding out.

use candle_core::{Device, Tensor};

use crate::error::ServeError;
use crate::model::ModelConfig;
use crate::preprocess::PreparedSample;

pub struct Collated {
    /// B x C x H x W.
    pub images: Tensor,
    /// B x T_max x n_mels, zero-padded.
    pub audio: Tensor,
    /// Valid frames per sample.
    pub lengths: Vec<usize>,
}

pub fn collate(
    samples: &[&PreparedSample],
    config: &ModelConfig,
    device: &Device,
) -> Result<Collated, ServeError> {
    let b = samples.len();
    let (c, h, w) = (
        config.image.channels,
        config.image.height,
        config.image.width,
    );
    let n_mels = config.audio.n_mels;
    let mut images = Vec::with_capacity(b * c * h * w);
    for s in samples {
        if s.image.len() != c * h * w {
            return Err(ServeError::Internal(format!(
                "prepared image has {} values, the model needs {}",
                s.image.len(),
                c * h * w
            )));
        }
        images.extend_from_slice(&s.image);
    }
    let t_max = samples.iter().map(|s| s.frames).max().unwrap_or(0).max(1);
    let mut audio = vec![0f32; b * t_max * n_mels];
    for (i, s) in samples.iter().enumerate() {
        if s.audio.len() != s.frames * n_mels {
            return Err(ServeError::Internal(format!(
                "prepared audio has {} values for {} frames of {} mels",
                s.audio.len(),
                s.frames,
                n_mels
            )));
        }
        let start = i * t_max * n_mels;
        audio[start..start + s.audio.len()].copy_from_slice(&s.audio);
    }
    Ok(Collated {
        images: Tensor::from_vec(images, (b, c, h, w), device)?,
        audio: Tensor::from_vec(audio, (b, t_max, n_mels), device)?,
        lengths: samples.iter().map(|s| s.frames).collect(),
    })
}
