//! ResNet-18 image encoder in torchvision's layout and names, without `fc`.
//!
//! `conv1` (7x7, stride 2, pad 3) -> `bn1` -> ReLU -> max-pool 3x3 stride 2 pad 1 ->
//! `layer1..layer4` (two `BasicBlock`s each, widths from the config) -> global average
//! pool, giving `F_v` of width `widths[3]`.

use std::sync::{Arc, Mutex};

use candle_core::{bail, Result, Tensor};
use candle_nn::{Init, ModuleT, VarBuilder};

use super::batch_norm::BatchNorm2d;
use super::config::ImageConfig;
use super::ops;

/// Blocks per stage of ResNet-18.
pub const BLOCKS_PER_LAYER: usize = 2;

/// The eval-mode `(weight * scale, shift)` of a [`ConvBn`], once computed.
type FoldCache = Arc<Mutex<Option<(Tensor, Tensor)>>>;

/// A bias-free convolution followed by batch norm, as torchvision pairs them:
/// `{conv}.weight` `(out, in, k, k)` and `{bn}.{weight,bias,running_mean,running_var}`.
///
/// In eval mode the batch norm is folded into the convolution (weight `w * scale`,
/// bias `shift`). When nothing outside can change the tensors (they are not
/// variables) the folded pair is computed once and reused until a training-mode pass
/// updates the running statistics.
#[derive(Clone, Debug)]
pub struct ConvBn {
    weight: Tensor,
    bn: BatchNorm2d,
    stride: usize,
    padding: usize,
    folded: Option<FoldCache>,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb_conv: VarBuilder,
        vb_bn: VarBuilder,
    ) -> Result<Self> {
        let fan_out = (out_c * kernel * kernel) as f64;
        let init = Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out).sqrt(),
        };
        let weight = vb_conv.get_with_hints((out_c, in_c, kernel, kernel), "weight", init)?;
        let bn = BatchNorm2d::new(out_c, vb_bn)?;
        let folded = (!weight.is_variable() && bn.is_frozen()).then(Default::default);
        Ok(Self {
            weight,
            bn,
            stride,
            padding,
            folded,
        })
    }

    pub fn batch_norm(&self) -> &BatchNorm2d {
        &self.bn
    }

    fn fold(&self) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.bn.eval_scale_shift()?;
        let c = self.bn.num_features();
        let w = self.weight.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        Ok((w, shift))
    }

    fn folded(&self) -> Result<(Tensor, Tensor)> {
        let Some(cache) = &self.folded else {
            return self.fold();
        };
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pair) = cache.as_ref() {
            return Ok(pair.clone());
        }
        let pair = self.fold()?;
        *cache = Some(pair.clone());
        Ok(pair)
    }
}

impl ModuleT for ConvBn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let y = ops::conv2d(x, &self.weight, None, self.stride, self.padding)?;
            let y = self.bn.forward_t(&y, true)?;
            if let Some(cache) = &self.folded {
                *cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            return Ok(y);
        }
        let (w, b) = self.folded()?;
        ops::conv2d(x, &w, Some(&b), self.stride, self.padding)
    }
}

/// torchvision's `BasicBlock`: two 3x3 convolutions with a residual connection, and a
/// `downsample` (1x1 conv + BN, as `downsample.0` / `downsample.1`) when the shape changes.
#[derive(Clone, Debug)]
pub struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    downsample: Option<ConvBn>,
}

impl BasicBlock {
    pub fn new(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || in_c != out_c {
            let vb = vb.pp("downsample");
            Some(ConvBn::new(
                in_c,
                out_c,
                1,
                stride,
                0,
                vb.pp("0"),
                vb.pp("1"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1: ConvBn::new(in_c, out_c, 3, stride, 1, vb.pp("conv1"), vb.pp("bn1"))?,
            conv2: ConvBn::new(out_c, out_c, 3, 1, 1, vb.pp("conv2"), vb.pp("bn2"))?,
            downsample,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.conv1.forward_t(x, train)?.relu()?;
        let out = self.conv2.forward_t(&out, train)?;
        let identity = match &self.downsample {
            Some(down) => down.forward_t(x, train)?,
            None => x.clone(),
        };
        (out + identity)?.relu()
    }
}

#[derive(Clone, Debug)]
pub struct ImageEncoder {
    stem: ConvBn,
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
            stem: ConvBn::new(cfg.channels, stem, 7, 2, 3, vb.pp("conv1"), vb.pp("bn1"))?,
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
        let x = self.stem.forward_t(x, train)?.relu()?;
        let mut x = ops::max_pool2d_padded(&x, 3, 2, 1)?;
        for block in self.layers.iter().flatten() {
            x = block.forward_t(&x, train)?;
        }
        x.mean((2, 3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn tensors() -> HashMap<String, Tensor> {
        let cpu = Device::Cpu;
        let mut t = HashMap::new();
        let w = Tensor::randn(0f32, 0.5, (4, 3, 3, 3), &cpu).unwrap();
        t.insert("conv.weight".to_string(), w);
        for (name, v) in [
            ("weight", [1.5f32, 0.5, 1.0, 2.0]),
            ("bias", [0.1, -0.2, 0.3, 0.0]),
            ("running_mean", [0.3, -1.0, 0.0, 0.5]),
            ("running_var", [2.0, 0.5, 1.0, 0.1]),
        ] {
            t.insert(format!("bn.{name}"), Tensor::new(&v, &cpu).unwrap());
        }
        t
    }

    fn unfolded(cb: &ConvBn, x: &Tensor) -> Tensor {
        let y = ops::conv2d(x, &cb.weight, None, cb.stride, cb.padding).unwrap();
        cb.bn.forward_t(&y, false).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn folded_eval_matches_conv_then_batch_norm_and_follows_training_updates() {
        let vb = VarBuilder::from_tensors(tensors(), DType::F32, &Device::Cpu);
        let cb = ConvBn::new(3, 4, 3, 2, 1, vb.pp("conv"), vb.pp("bn")).unwrap();
        assert!(
            cb.folded.is_some(),
            "plain tensors are frozen, so the fold is cached"
        );
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 9), &Device::Cpu).unwrap();
        let before = cb.forward_t(&x, false).unwrap();
        assert!(max_diff(&before, &unfolded(&cb, &x)) < 1e-5);
        // A training pass moves the running statistics; eval must see the new ones.
        cb.forward_t(&(&x * 3.0).unwrap(), true).unwrap();
        let after = cb.forward_t(&x, false).unwrap();
        assert!(max_diff(&after, &unfolded(&cb, &x)) < 1e-5);
        assert!(max_diff(&after, &before) > 1e-3);
    }
}
