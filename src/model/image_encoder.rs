//! ResNet-18 image encoder in torchvision's layout and names, without `fc`.
//!
//! `conv1` (7x7, stride 2, pad 3) -> `bn1` -> ReLU -> max-pool 3x3 stride 2 pad 1 ->
//! `layer1..layer4` (two `BasicBlock`s each, widths from the config) -> global average
//! pool, giving `F_v` of width `widths[3]`.

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{conv2d_no_bias, Conv2d, Conv2dConfig, ModuleT, VarBuilder};

use super::batch_norm::BatchNorm2d;
use super::config::ImageConfig;
use super::ops;

/// Blocks per stage of ResNet-18.
pub const BLOCKS_PER_LAYER: usize = 2;

fn conv(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    conv2d_no_bias(in_c, out_c, kernel, cfg, vb)
}

/// torchvision's `BasicBlock`: two 3x3 convolutions with a residual connection, and a
/// `downsample` (1x1 conv + BN, as `downsample.0` / `downsample.1`) when the shape changes.
#[derive(Clone, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    pub fn new(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || in_c != out_c {
            let vb = vb.pp("downsample");
            Some((
                conv(in_c, out_c, 1, stride, 0, vb.pp("0"))?,
                BatchNorm2d::new(out_c, vb.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: conv(in_c, out_c, 3, stride, 1, vb.pp("conv1"))?,
            bn1: BatchNorm2d::new(out_c, vb.pp("bn1"))?,
            conv2: conv(out_c, out_c, 3, 1, 1, vb.pp("conv2"))?,
            bn2: BatchNorm2d::new(out_c, vb.pp("bn2"))?,
            downsample,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let out = self.bn2.forward_t(&self.conv2.forward(&out)?, train)?;
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        (out + identity)?.relu()
    }
}

#[derive(Clone, Debug)]
pub struct ImageEncoder {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<BasicBlock>>,
    in_channels: usize,
    out_dim: usize,
}

impl ImageEncoder {
    pub fn new(cfg: &ImageConfig, vb: VarBuilder) -> Result<Self> {
        let stem = cfg.widths[0];
        let mut in_c = stem;
        let mut layers = Vec::with_capacity(4);
        for (li, &width) in cfg.widths.iter().enumerate() {
            let vb_l = vb.pp(format!("layer{}", li + 1));
            let mut blocks = Vec::with_capacity(BLOCKS_PER_LAYER);
            for bi in 0..BLOCKS_PER_LAYER {
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(in_c, width, stride, vb_l.pp(bi))?);
                in_c = width;
            }
            layers.push(blocks);
        }
        Ok(Self {
            conv1: conv(cfg.channels, stem, 7, 2, 3, vb.pp("conv1"))?,
            bn1: BatchNorm2d::new(stem, vb.pp("bn1"))?,
            layers,
            in_channels: cfg.channels,
            out_dim: cfg.widths[3],
        })
    }

    /// Width of `F_v`.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
}

impl ModuleT for ImageEncoder {
    /// `(B, C, H, W)` normalised images -> `(B, widths[3])`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.in_channels {
            bail!(
                "image encoder: input has {c} channels, expected {}",
                self.in_channels
            )
        }
        let x = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let mut x = ops::max_pool2d_padded(&x, 3, 2, 1)?;
        for block in self.layers.iter().flatten() {
            x = block.forward_t(&x, train)?;
        }
        x.mean((2, 3))
    }
}
