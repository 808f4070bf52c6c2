//! The model's `config.json`: architecture, preprocessing, task and labels.
//!
//! The defaults are the built-in model for the av-digits data (28x28 MNIST digits
//! resized to 32x32, 8 kHz spoken digits).

use serde::{Deserialize, Serialize};

/// Everything needed to build the model and preprocess its inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub image: ImageConfig,
    pub audio: AudioConfig,
    pub audio_encoder: LstmConfig,
    pub pooling: PoolingConfig,
    pub head: HeadConfig,
    pub task: Task,
    /// Output names, index order; their count is the number of head outputs.
    pub labels: Vec<String>,
}

/// Image input and the ResNet-18 encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// 1 (greyscale) or 3 (RGB).
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Per-channel normalisation applied to pixels scaled to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Output channels of layer1..layer4; torchvision's ResNet-18 is [64, 128, 256, 512].
    /// Narrower widths keep the same code path (used by the committed parity fixture).
    pub widths: [usize; 4],
}

/// The log-mel front end (matches `torchaudio.transforms.MelSpectrogram` with
/// `center=True, pad_mode="reflect", power=2.0, norm=None, mel_scale="htk"`,
/// a periodic Hann window, followed by `log(x + log_eps)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudioConfig {
    pub sample_rate: u32,
    pub n_fft: usize,
    pub win_length: usize,
    pub hop_length: usize,
    pub n_mels: usize,
    pub f_min: f32,
    /// None means sample_rate / 2.
    pub f_max: Option<f32>,
    pub log_eps: f32,
}

/// The `nn.LSTM` audio encoder (batch-first, unidirectional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LstmConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
}

/// Temporal pooling: a max-pool over time, then a global reduction over what is left.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolingConfig {
    pub kernel: usize,
    pub stride: usize,
    pub global: GlobalPool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlobalPool {
    Max,
    Mean,
}

/// The MLP head: Linear -> ReLU for each hidden width, then Linear to the outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    pub hidden: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Multiclass,
    Multilabel,
    Binary,
}

impl std::fmt::Display for Task {
    /// As `config.json` spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::Multiclass => "multiclass",
            Task::Multilabel => "multilabel",
            Task::Binary => "binary",
        })
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            image: ImageConfig::default(),
            audio: AudioConfig::default(),
            audio_encoder: LstmConfig::default(),
            pooling: PoolingConfig::default(),
            head: HeadConfig::default(),
            task: Task::Multiclass,
            labels: (0..10).map(|d| d.to_string()).collect(),
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        // MNIST statistics; 32x32 gives ResNet-18's stride-32 stem a 1x1 final map.
        Self {
            channels: 1,
            height: 32,
            width: 32,
            mean: vec![0.1307],
            std: vec![0.3081],
            widths: [64, 128, 256, 512],
        }
    }
}

impl Default for AudioConfig {
    fn default() -> Self {
        // 8 kHz speech: 32 ms windows, 16 ms hop, 40 mel bands.
        Self {
            sample_rate: 8000,
            n_fft: 256,
            win_length: 256,
            hop_length: 128,
            n_mels: 40,
            f_min: 20.0,
            f_max: None,
            log_eps: 1e-6,
        }
    }
}

impl Default for LstmConfig {
    fn default() -> Self {
        Self {
            hidden_size: 128,
            num_layers: 2,
        }
    }
}

impl Default for PoolingConfig {
    fn default() -> Self {
        Self {
            kernel: 3,
            stride: 2,
            global: GlobalPool::Max,
        }
    }
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            hidden: vec![256, 128],
        }
    }
}

impl AudioConfig {
    pub fn f_max(&self) -> f32 {
        self.f_max.unwrap_or(self.sample_rate as f32 / 2.0)
    }
}

impl ModelConfig {
    pub fn image_feature_dim(&self) -> usize {
        self.image.widths[3]
    }
    pub fn audio_feature_dim(&self) -> usize {
        self.audio_encoder.hidden_size
    }
    pub fn fused_dim(&self) -> usize {
        self.image_feature_dim() + self.audio_feature_dim()
    }
    pub fn num_outputs(&self) -> usize {
        self.labels.len()
    }

    /// Checks the config is internally consistent; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let i = &self.image;
        if i.channels != 1 && i.channels != 3 {
            return Err(format!("image.channels must be 1 or 3, got {}", i.channels));
        }
        if i.height < 8 || i.width < 8 {
            return Err(format!(
                "image.height and image.width must be at least 8, got {}x{}",
                i.height, i.width
            ));
        }
        if i.mean.len() != i.channels || i.std.len() != i.channels {
            return Err(format!(
                "image.mean and image.std need {} values (one per channel)",
                i.channels
            ));
        }
        if i.std.iter().any(|s| *s <= 0.0) {
            return Err("image.std values must be positive".into());
        }
        if i.widths.contains(&0) {
            return Err("image.widths must all be positive".into());
        }
        let a = &self.audio;
        if a.sample_rate == 0 || a.n_fft < 2 || a.hop_length == 0 || a.n_mels == 0 {
            return Err(
                "audio.sample_rate, audio.n_fft (>= 2), audio.hop_length and audio.n_mels must be positive"
                    .into(),
            );
        }
        if a.win_length == 0 || a.win_length > a.n_fft {
            return Err(format!(
                "audio.win_length must be in 1..={} (n_fft), got {}",
                a.n_fft, a.win_length
            ));
        }
        if !(a.f_min >= 0.0 && a.f_min < a.f_max() && a.f_max() <= a.sample_rate as f32 / 2.0) {
            return Err(format!(
                "audio.f_min/f_max must satisfy 0 <= f_min < f_max <= sample_rate/2, got {} / {}",
                a.f_min,
                a.f_max()
            ));
        }
        if a.log_eps.is_nan() || a.log_eps <= 0.0 {
            return Err("audio.log_eps must be positive".into());
        }
        if self.audio_encoder.hidden_size == 0 || self.audio_encoder.num_layers == 0 {
            return Err("audio_encoder.hidden_size and num_layers must be positive".into());
        }
        if self.pooling.kernel == 0 || self.pooling.stride == 0 {
            return Err("pooling.kernel and pooling.stride must be positive".into());
        }
        if self.head.hidden.contains(&0) {
            return Err("head.hidden widths must be positive".into());
        }
        if self.labels.is_empty() {
            return Err("labels must name at least one output".into());
        }
        if self.task == Task::Binary && self.labels.len() != 1 {
            return Err(format!(
                "a binary task has exactly one label, got {}",
                self.labels.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.labels.iter().find(|l| !seen.insert(l.as_str())) {
            return Err(format!("labels must be unique; {dup:?} repeats"));
        }
        Ok(())
    }
}
