//! Turns client input (encoded images, WAV files, raw PCM, tensors) into the model's
//! input: a normalised CHW image and a T x n_mels log-mel matrix. Runs off the async
//! threads; every failure is an [`InputError`] naming the field.

use crate::error::InputError;

/// One sample as the client sent it, transport-neutral.
#[derive(Clone, Debug)]
pub struct RawSample {
    pub image: ImageInput,
    pub audio: AudioInput,
}

#[derive(Clone, Debug)]
pub enum ImageInput {
    /// PNG or JPEG bytes.
    Encoded(Vec<u8>),
    /// CHW floats in [0, 1].
    Tensor { shape: Vec<usize>, values: Vec<f32> },
}

#[derive(Clone, Debug)]
pub enum AudioInput {
    /// A RIFF/WAVE file.
    Wav(Vec<u8>),
    /// Mono samples at `sample_rate`.
    Pcm { sample_rate: u32, samples: Vec<f32> },
    /// Precomputed log-mel features, T x n_mels.
    Features { shape: Vec<usize>, values: Vec<f32> },
}

/// The model-ready form of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedSample {
    /// C x H x W, normalised with the config's mean/std.
    pub image: Vec<f32>,
    /// frames x n_mels, row-major.
    pub audio: Vec<f32>,
    pub frames: usize,
}

/// Request limits applied during preprocessing.
#[derive(Clone, Debug)]
pub struct InputLimits {
    pub max_image_pixels: u64,
    pub max_audio_seconds: f32,
}

#[allow(unused)]
fn _uses(_: InputError) {}
