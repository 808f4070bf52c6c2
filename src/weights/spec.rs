//! The model's tensors for a config: names (exactly the PyTorch reference module's
//! `state_dict()` keys, minus `num_batches_tracked`), shapes, initialisation schemes,
//! in `state_dict()` order. Loading, saving and random initialisation all follow this
//! one list.

use crate::model::config::ModelConfig;
use crate::model::image_encoder::BLOCKS_PER_LAYER;

/// How [`super::init_random`] fills a tensor (PyTorch's default schemes).
#[derive(Clone, Debug, PartialEq)]
pub enum InitScheme {
    /// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, as torchvision's ResNet
    /// does for convolutions: `N(0, 2 / (out_channels * kh * kw))`.
    KaimingNormalFanOut,
    /// `U(-bound, bound)`: LSTM tensors (`1/sqrt(hidden)`), `nn.Linear` weight and bias
    /// (`1/sqrt(fan_in)`).
    Uniform {
        bound: f64,
    },
    Const(f64),
}

/// Parameters are trained; buffers (batch-norm running statistics) are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    Parameter,
    Buffer,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: InitScheme,
    pub kind: TensorKind,
}

/// Suffix of the batch-norm step counter PyTorch keeps in its `state_dict()`.
pub const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: Vec<usize>, init: InitScheme, kind: TensorKind) {
        self.0.push(TensorSpec {
            name,
            shape,
            init,
            kind,
        });
    }

    fn conv(&mut self, prefix: &str, out_c: usize, in_c: usize, k: usize) {
        self.push(
            format!("{prefix}.weight"),
            vec![out_c, in_c, k, k],
            InitScheme::KaimingNormalFanOut,
            TensorKind::Parameter,
        );
    }

    fn bn(&mut self, prefix: &str, c: usize) {
        use InitScheme::Const;
        use TensorKind::{Buffer, Parameter};
        self.push(format!("{prefix}.weight"), vec![c], Const(1.0), Parameter);
        self.push(format!("{prefix}.bias"), vec![c], Const(0.0), Parameter);
        self.push(
            format!("{prefix}.running_mean"),
            vec![c],
            Const(0.0),
            Buffer,
        );
        self.push(format!("{prefix}.running_var"), vec![c], Const(1.0), Buffer);
    }

    fn linear(&mut self, prefix: &str, out_d: usize, in_d: usize) {
        let bound = 1.0 / (in_d as f64).sqrt();
        let init = InitScheme::Uniform { bound };
        self.push(
            format!("{prefix}.weight"),
            vec![out_d, in_d],
            init.clone(),
            TensorKind::Parameter,
        );
        self.push(
            format!("{prefix}.bias"),
            vec![out_d],
            init,
            TensorKind::Parameter,
        );
    }
}

/// Every tensor of the model for `cfg`, in the reference module's `state_dict()` order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut s = Specs(Vec::new());
    // Image encoder: torchvision ResNet-18 without fc.
    let widths = cfg.image.widths;
    let p = "image_encoder";
    s.conv(&format!("{p}.conv1"), widths[0], cfg.image.channels, 7);
    s.bn(&format!("{p}.bn1"), widths[0]);
    let mut in_c = widths[0];
    for (li, &w) in widths.iter().enumerate() {
        for bi in 0..BLOCKS_PER_LAYER {
            let stride = if li > 0 && bi == 0 { 2 } else { 1 };
            let b = format!("{p}.layer{}.{bi}", li + 1);
            s.conv(&format!("{b}.conv1"), w, in_c, 3);
            s.bn(&format!("{b}.bn1"), w);
            s.conv(&format!("{b}.conv2"), w, w, 3);
            s.bn(&format!("{b}.bn2"), w);
            if stride != 1 || in_c != w {
                s.conv(&format!("{b}.downsample.0"), w, in_c, 1);
                s.bn(&format!("{b}.downsample.1"), w);
            }
            in_c = w;
        }
    }
    // Audio encoder: nn.LSTM.
    let h = cfg.audio_encoder.hidden_size;
    let init = InitScheme::Uniform {
        bound: 1.0 / (h as f64).sqrt(),
    };
    for l in 0..cfg.audio_encoder.num_layers {
        let in_d = if l == 0 { cfg.audio.n_mels } else { h };
        let a = "audio_encoder";
        s.push(
            format!("{a}.weight_ih_l{l}"),
            vec![4 * h, in_d],
            init.clone(),
            TensorKind::Parameter,
        );
        s.push(
            format!("{a}.weight_hh_l{l}"),
            vec![4 * h, h],
            init.clone(),
            TensorKind::Parameter,
        );
        s.push(
            format!("{a}.bias_ih_l{l}"),
            vec![4 * h],
            init.clone(),
            TensorKind::Parameter,
        );
        s.push(
            format!("{a}.bias_hh_l{l}"),
            vec![4 * h],
            init.clone(),
            TensorKind::Parameter,
        );
    }
    // Head: nn.Sequential(Linear, ReLU, ..., Linear).
    let mut dims = vec![cfg.fused_dim()];
    dims.extend(&cfg.head.hidden);
    dims.push(cfg.num_outputs());
    for (i, d) in dims.windows(2).enumerate() {
        s.linear(&format!("head.{}", 2 * i), d[1], d[0]);
    }
    s.0
}

/// The batch-norm prefixes (those with running statistics), in order.
pub fn batch_norm_prefixes(specs: &[TensorSpec]) -> Vec<&str> {
    specs
        .iter()
        .filter_map(|s| s.name.strip_suffix(".running_mean"))
        .collect()
}
