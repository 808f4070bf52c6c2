//! Turns client input (encoded images, WAV files, raw PCM, tensors) into the model's
//! input: a normalised CHW image and a T x n_mels log-mel matrix. Runs off the async
//! threads; every failure is an [`InputError`] naming the field.
//!
//! [`Preprocessor`] holds everything that depends only on the config (mel
//! filterbank, window, FFT plan), is `Send + Sync`, and is meant to be shared (e.g.
//! in an `Arc`) by every request thread.
//!
//! Field paths follow the protobuf messages: `samples[i].image.encoded`,
//! `samples[i].image.tensor.shape`, `samples[i].image.tensor.values`,
//! `samples[i].audio.wav`, `samples[i].audio.pcm.sample_rate`,
//! `samples[i].audio.pcm.samples`, `samples[i].audio.features.shape`,
//! `samples[i].audio.features.values`.

pub mod image;
pub mod mel;
pub mod resample;
pub mod wav;

use crate::error::InputError;
use crate::model::config::ModelConfig;

use self::image::ImagePipeline;
use self::mel::MelFrontEnd;

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

/// The highest input sample rate accepted (WAV or PCM). Absurd header values are
/// refused up front: a rate with a large co-prime part is resampled by direct
/// windowed-sinc interpolation, whose cost per output sample grows with the input
/// rate: a 5 s clip at 383999 Hz takes about 1 s of CPU in a release build (at
/// 44101 Hz, 0.1 s; common rates take the FFT path, a few milliseconds).
pub const MAX_INPUT_SAMPLE_RATE: u32 = 384_000;

/// Turns [`RawSample`]s into [`PreparedSample`]s for one model config.
#[derive(Clone, Debug)]
pub struct Preprocessor {
    image: ImagePipeline,
    mel: MelFrontEnd,
    sample_rate: u32,
    n_mels: usize,
    limits: InputLimits,
    /// The most frames a clip of `max_audio_seconds` gives (the limit for features).
    max_frames: usize,
}

impl Preprocessor {
    /// Precomputes the image settings and the log-mel front end. Fails if the config
    /// is invalid (see [`ModelConfig::validate`]) or a limit is not positive.
    pub fn new(config: &ModelConfig, limits: InputLimits) -> Result<Self, String> {
        config.validate()?;
        if limits.max_image_pixels == 0 {
            return Err("max_image_pixels must be positive".into());
        }
        if !(limits.max_audio_seconds.is_finite() && limits.max_audio_seconds > 0.0) {
            return Err(format!(
                "max_audio_seconds must be a positive number, got {}",
                limits.max_audio_seconds
            ));
        }
        let mel = MelFrontEnd::new(&config.audio);
        let max_samples =
            (limits.max_audio_seconds as f64 * config.audio.sample_rate as f64).floor() as usize;
        Ok(Self {
            image: ImagePipeline::new(&config.image, limits.max_image_pixels),
            max_frames: mel.frames_for(max_samples),
            mel,
            sample_rate: config.audio.sample_rate,
            n_mels: config.audio.n_mels,
            limits,
        })
    }

    pub fn limits(&self) -> &InputLimits {
        &self.limits
    }

    /// Both halves of one sample; `index` is its position in the request and the
    /// first part of every error's field path.
    pub fn prepare(&self, index: usize, sample: &RawSample) -> Result<PreparedSample, InputError> {
        let image = self.prepare_image(index, &sample.image)?;
        let (audio, frames) = self.prepare_audio(index, &sample.audio)?;
        Ok(PreparedSample {
            image,
            audio,
            frames,
        })
    }

    /// The normalised C x H x W image.
    pub fn prepare_image(&self, index: usize, image: &ImageInput) -> Result<Vec<f32>, InputError> {
        match image {
            ImageInput::Encoded(bytes) => self
                .image
                .encoded(&format!("samples[{index}].image.encoded"), bytes),
            ImageInput::Tensor { shape, values } => {
                self.image
                    .tensor(&format!("samples[{index}].image.tensor"), shape, values)
            }
        }
    }

    /// The log-mel matrix (frames x n_mels, row-major) and its frame count.
    ///
    /// WAV and PCM are limited to `max_audio_seconds` (a WAV by its header, before
    /// decoding), down-mixed, resampled to the model's rate and passed through
    /// [`log_mel`](Self::log_mel). Precomputed features are used as they are, but may
    /// not have more frames than `max_audio_seconds` of audio would give.
    pub fn prepare_audio(
        &self,
        index: usize,
        audio: &AudioInput,
    ) -> Result<(Vec<f32>, usize), InputError> {
        match audio {
            AudioInput::Wav(bytes) => {
                let field = format!("samples[{index}].audio.wav");
                let mono = self.decode_wav(&field, bytes)?;
                Ok(self.log_mel(&mono))
            }
            AudioInput::Pcm {
                sample_rate,
                samples,
            } => {
                let mono = self.resample_pcm(index, *sample_rate, samples)?;
                Ok(self.log_mel(&mono))
            }
            AudioInput::Features { shape, values } => {
                self.check_features(index, shape, values)?;
                Ok((values.clone(), shape[0]))
            }
        }
    }

    /// The mono waveform at the model's sample rate for WAV or PCM input (what
    /// [`log_mel`](Self::log_mel) is applied to); `None` for precomputed features.
    pub fn waveform(
        &self,
        index: usize,
        audio: &AudioInput,
    ) -> Result<Option<Vec<f32>>, InputError> {
        match audio {
            AudioInput::Wav(bytes) => self
                .decode_wav(&format!("samples[{index}].audio.wav"), bytes)
                .map(Some),
            AudioInput::Pcm {
                sample_rate,
                samples,
            } => self.resample_pcm(index, *sample_rate, samples).map(Some),
            AudioInput::Features { .. } => Ok(None),
        }
    }

    /// Log-mel features of a mono clip already at the model's sample rate:
    /// `(values, frames)`, values row-major frames x n_mels. See
    /// [`MelFrontEnd::compute`] for the exact definition (torchaudio parity) and
    /// how clips shorter than `n_fft / 2 + 1` samples are handled.
    pub fn log_mel(&self, mono: &[f32]) -> (Vec<f32>, usize) {
        self.mel.compute(mono)
    }

    fn check_rate_and_duration(
        &self,
        field: &str,
        sample_rate: u32,
        frames: u64,
    ) -> Result<(), InputError> {
        if sample_rate > MAX_INPUT_SAMPLE_RATE {
            return Err(InputError::new(
                field,
                format!(
                    "sample rate {sample_rate} Hz is above the supported maximum of \
                     {MAX_INPUT_SAMPLE_RATE} Hz"
                ),
            ));
        }
        if frames == 0 {
            return Err(InputError::new(
                field,
                "empty audio: 0 samples; expected at least one",
            ));
        }
        let seconds = frames as f64 / sample_rate as f64;
        if seconds > self.limits.max_audio_seconds as f64 {
            return Err(InputError::new(
                field,
                format!(
                    "audio is {seconds:.3} s long ({frames} samples at {sample_rate} Hz), over \
                     the limit of {} s",
                    self.limits.max_audio_seconds
                ),
            ));
        }
        Ok(())
    }

    fn to_model_rate(&self, field: &str, mono: &[f32], from: u32) -> Result<Vec<f32>, InputError> {
        resample::resample(mono, from, self.sample_rate).map_err(|e| InputError::new(field, e))
    }

    fn decode_wav(&self, field: &str, bytes: &[u8]) -> Result<Vec<f32>, InputError> {
        if bytes.is_empty() {
            return Err(InputError::new(
                field,
                "empty audio: no WAV bytes; expected a RIFF/WAVE file",
            ));
        }
        let err = |message: String| InputError::new(field, message);
        let wav = wav::parse(bytes).map_err(err)?;
        // The header's duration, checked before any sample is decoded.
        self.check_rate_and_duration(field, wav.info.sample_rate, wav.info.frames)?;
        let mono = wav.decode_mono().map_err(err)?;
        self.to_model_rate(field, &mono, wav.info.sample_rate)
    }

    fn resample_pcm(
        &self,
        index: usize,
        sample_rate: u32,
        samples: &[f32],
    ) -> Result<Vec<f32>, InputError> {
        let samples_field = format!("samples[{index}].audio.pcm.samples");
        if sample_rate == 0 {
            return Err(InputError::new(
                format!("samples[{index}].audio.pcm.sample_rate"),
                "sample rate is 0 Hz; expected a positive rate such as 8000",
            ));
        }
        if sample_rate > MAX_INPUT_SAMPLE_RATE {
            return Err(InputError::new(
                format!("samples[{index}].audio.pcm.sample_rate"),
                format!(
                    "sample rate {sample_rate} Hz is above the supported maximum of \
                     {MAX_INPUT_SAMPLE_RATE} Hz"
                ),
            ));
        }
        self.check_rate_and_duration(&samples_field, sample_rate, samples.len() as u64)?;
        if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
            return Err(InputError::new(
                samples_field,
                format!(
                    "sample at index {i} is {}; expected finite samples in [-1, 1]",
                    samples[i]
                ),
            ));
        }
        // Integer PCM sent unscaled (16-bit values as floats) would be heard as
        // clipping noise and predicted with confidence: say so instead.
        if let Some(i) = samples.iter().position(|v| v.abs() > 1.0) {
            return Err(InputError::new(
                samples_field,
                format!(
                    "sample at index {i} is {}, outside [-1, 1]; scale integer PCM to \
                     floats first (for 16-bit, divide by 32768)",
                    samples[i]
                ),
            ));
        }
        self.to_model_rate(&samples_field, samples, sample_rate)
    }

    fn check_features(
        &self,
        index: usize,
        shape: &[usize],
        values: &[f32],
    ) -> Result<(), InputError> {
        let shape_field = format!("samples[{index}].audio.features.shape");
        let values_field = format!("samples[{index}].audio.features.values");
        let n_mels = self.n_mels;
        let expected = format!("expected [T, {n_mels}] (frames x n_mels) with T >= 1");
        if shape.len() != 2 {
            return Err(InputError::new(
                shape_field,
                format!("shape {shape:?} has {} dimensions; {expected}", shape.len()),
            ));
        }
        let (frames, mels) = (shape[0], shape[1]);
        if mels != n_mels {
            return Err(InputError::new(
                shape_field,
                format!(
                    "shape {shape:?} has {mels} mel bands, the model uses {n_mels}; {expected}"
                ),
            ));
        }
        if frames == 0 {
            return Err(InputError::new(
                shape_field,
                format!("empty audio: shape {shape:?} has 0 frames; {expected}"),
            ));
        }
        if frames > self.max_frames {
            return Err(InputError::new(
                shape_field,
                format!(
                    "{frames} frames is over the limit of {} frames ({} s of audio at {} Hz)",
                    self.max_frames, self.limits.max_audio_seconds, self.sample_rate
                ),
            ));
        }
        let count = frames * n_mels;
        if values.len() != count {
            return Err(InputError::new(
                values_field,
                format!(
                    "{} values for shape {shape:?}; expected {frames} x {n_mels} = {count}",
                    values.len()
                ),
            ));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(InputError::new(
                values_field,
                format!(
                    "value at index {i} (frame {}, mel band {}) is {}; expected finite log-mel values",
                    i / n_mels,
                    i % n_mels,
                    values[i]
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessor_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Preprocessor>();
    }

    #[test]
    fn max_samples_follows_the_limit() {
        let p = Preprocessor::new(
            &ModelConfig::default(),
            InputLimits {
                max_image_pixels: 100,
                max_audio_seconds: 2.5,
            },
        )
        .unwrap();
        assert_eq!(p.max_frames, 1 + 20_000 / 128);
    }
}
