//! The fusion model: `F_v` from the image encoder and `F_a'` from the audio encoder
//! followed by temporal pooling are concatenated and fed to the MLP head.
//!
//! Tensor names are those of the PyTorch reference module
//! (`tests/reference/fusion_reference.py`): `image_encoder.*`, `audio_encoder.*`,
//! `head.*`.

use candle_core::{bail, Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

use super::audio_encoder::AudioEncoder;
use super::config::ModelConfig;
use super::head::Head;
use super::image_encoder::ImageEncoder;
use super::pooling::TemporalPooling;

/// Everything one forward pass produces, batch-first.
#[derive(Clone, Debug)]
pub struct FusionOutput {
    /// `F_v`, `(B, Dv)`.
    pub image: Tensor,
    /// `F_a'` (pooled), `(B, Da)`.
    pub audio: Tensor,
    /// `[F_v, F_a']`, `(B, Dv + Da)`.
    pub fused: Tensor,
    /// Head output before any sigmoid/softmax, `(B, K)`.
    pub logits: Tensor,
}

#[derive(Clone, Debug)]
pub struct FusionModel {
    cfg: ModelConfig,
    image_encoder: ImageEncoder,
    audio_encoder: AudioEncoder,
    pooling: TemporalPooling,
    head: Head,
}

impl FusionModel {
    /// Builds the model from `vb` (tensors under `image_encoder`, `audio_encoder`, `head`).
    /// The config must already be valid ([`ModelConfig::validate`]).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("invalid model config: {e}")
        }
        Ok(Self {
            cfg: cfg.clone(),
            image_encoder: ImageEncoder::new(&cfg.image, vb.pp("image_encoder"))?,
            audio_encoder: AudioEncoder::new(
                cfg.audio.n_mels,
                &cfg.audio_encoder,
                vb.pp("audio_encoder"),
            )?,
            pooling: TemporalPooling::new(&cfg.pooling)?,
            head: Head::new(cfg.fused_dim(), &cfg.head, cfg.num_outputs(), vb.pp("head"))?,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Dropout after each hidden ReLU of the head, applied only when `train` is true.
    pub fn set_head_dropout(&mut self, p: f32) -> Result<()> {
        self.head.set_dropout(p)
    }

    pub fn image_encoder(&self) -> &ImageEncoder {
        &self.image_encoder
    }

    pub fn audio_encoder(&self) -> &AudioEncoder {
        &self.audio_encoder
    }

    pub fn pooling(&self) -> &TemporalPooling {
        &self.pooling
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// One batch: `images` `(B, C, H, W)` already normalised, `audio` `(B, T, n_mels)`
    /// right-padded to the longest sample, `lengths[b]` the valid frames of sample `b`
    /// (padding never influences any output). `train` selects batch-norm batch
    /// statistics (and updates the running ones) and head dropout.
    pub fn forward_t(
        &self,
        images: &Tensor,
        audio: &Tensor,
        lengths: &[usize],
        train: bool,
    ) -> Result<FusionOutput> {
        let (b, c, h, w) = images.dims4()?;
        let img = &self.cfg.image;
        if (c, h, w) != (img.channels, img.height, img.width) {
            bail!(
                "images must be (B, {}, {}, {}), got {:?}",
                img.channels,
                img.height,
                img.width,
                images.dims()
            )
        }
        let (ba, _, n_mels) = audio.dims3()?;
        if ba != b || lengths.len() != b {
            bail!(
                "batch size mismatch: {b} images, {ba} audio sequences, {} lengths",
                lengths.len()
            )
        }
        if n_mels != self.cfg.audio.n_mels {
            bail!(
                "audio must have {} mel bands, got {n_mels}",
                self.cfg.audio.n_mels
            )
        }
        let image = self.image_encoder.forward_t(images, train)?;
        let frames = self.audio_encoder.forward_t(audio, train)?;
        let audio = self.pooling.forward(&frames, lengths)?;
        let fused = Tensor::cat(&[&image, &audio], 1)?;
        let logits = self.head.forward_t(&fused, train)?;
        Ok(FusionOutput {
            image,
            audio,
            fused,
            logits,
        })
    }
}
