//! `BatchNorm2d` with PyTorch semantics: running statistics in eval mode; batch
//! statistics and a running-statistics update (momentum 0.1, unbiased variance) in
//! training mode.

use candle_core::{bail, Result, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder};

pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// Tensors `weight`, `bias`, `running_mean`, `running_var` under its prefix, like
/// `torch.nn.BatchNorm2d` (whose `num_batches_tracked` we neither need nor read).
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    /// Variables so that training mode can update them in place. When the builder is
    /// backed by a `VarMap` these share its storage; otherwise they are private copies.
    running_mean: Var,
    running_var: Var,
    num_features: usize,
    eps: f64,
    momentum: f64,
    /// True when the running statistics are private copies (the builder's tensors
    /// were not variables), so only this module's training passes can change them.
    owns_running_stats: bool,
}

impl BatchNorm2d {
    pub fn new(num_features: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(num_features, "weight")?;
        let bias = vb.get(num_features, "bias")?;
        let running_mean = vb.get(num_features, "running_mean")?;
        let running_var = vb.get(num_features, "running_var")?;
        let owns_running_stats = !running_mean.is_variable() && !running_var.is_variable();
        let running_mean = Var::from_tensor(&running_mean)?;
        let running_var = Var::from_tensor(&running_var)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            num_features,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
            owns_running_stats,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// Whether nothing outside this module can change its tensors: the affine
    /// parameters are not variables and the running statistics are private, so
    /// values derived from them stay valid until a training-mode pass.
    pub fn is_frozen(&self) -> bool {
        self.owns_running_stats && !self.weight.is_variable() && !self.bias.is_variable()
    }

    /// Eval mode as one affine map per channel: `y = x * scale + shift` with
    /// `scale = weight / sqrt(running_var + eps)`, `shift = bias - running_mean * scale`,
    /// both `(C)`.
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let inv_std = (self.running_var.as_tensor().detach() + self.eps)?
            .sqrt()?
            .recip()?;
        let scale = (&self.weight * inv_std)?;
        let shift = (&self.bias - (self.running_mean.as_tensor().detach() * &scale)?)?;
        Ok((scale, shift))
    }

    fn check_input(&self, x: &Tensor) -> Result<usize> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.num_features {
            bail!(
                "batch_norm2d: input has {c} channels, expected {}",
                self.num_features
            )
        }
        Ok(n * h * w)
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.num_features;
        let (scale, shift) = self.eval_scale_shift()?;
        x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, c, 1, 1))?)
    }

    fn forward_train(&self, x: &Tensor, count: usize) -> Result<Tensor> {
        if count < 2 {
            bail!("batch_norm2d: training needs more than one value per channel, got input shape {:?}", x.dims())
        }
        let c = self.num_features;
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
        let y = centered.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        let y = y
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?;
        let m = self.momentum;
        let unbiased = count as f64 / (count - 1) as f64;
        let new_mean = ((self.running_mean.as_tensor().detach() * (1.0 - m))?
            + (mean.detach().flatten_all()? * m)?)?;
        let new_var = ((self.running_var.as_tensor().detach() * (1.0 - m))?
            + (var.detach().flatten_all()? * (m * unbiased))?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        Ok(y)
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let count = self.check_input(x)?;
        if train {
            self.forward_train(x, count)
        } else {
            self.forward_eval(x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn bn(c: usize) -> BatchNorm2d {
        let cpu = Device::Cpu;
        let mut ts = HashMap::new();
        ts.insert(
            "weight".to_string(),
            Tensor::new(&[1.5f32, 0.5][..c], &cpu).unwrap(),
        );
        ts.insert(
            "bias".to_string(),
            Tensor::new(&[0.1f32, -0.2][..c], &cpu).unwrap(),
        );
        ts.insert(
            "running_mean".to_string(),
            Tensor::new(&[0.3f32, -1.0][..c], &cpu).unwrap(),
        );
        ts.insert(
            "running_var".to_string(),
            Tensor::new(&[2.0f32, 0.5][..c], &cpu).unwrap(),
        );
        BatchNorm2d::new(c, VarBuilder::from_tensors(ts, DType::F32, &cpu)).unwrap()
    }

    #[test]
    fn eval_uses_running_statistics() {
        let bn = bn(2);
        let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 2))
            .unwrap();
        let y = bn
            .forward_t(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let f = |x: f32, m: f32, v: f32, w: f32, b: f32| (x - m) / (v + 1e-5).sqrt() * w + b;
        let expected = [
            f(1., 0.3, 2.0, 1.5, 0.1),
            f(2., 0.3, 2.0, 1.5, 0.1),
            f(3., -1.0, 0.5, 0.5, -0.2),
            f(4., -1.0, 0.5, 0.5, -0.2),
        ];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn train_uses_batch_statistics_and_updates_running_ones() {
        let bn = bn(1);
        // Channel values 1, 2, 3, 4 over (N=2, H=1, W=2): mean 2.5, biased var 1.25, unbiased 5/3.
        let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 1, 2))
            .unwrap();
        let y = bn
            .forward_t(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, xv) in y.iter().zip([1f32, 2., 3., 4.]) {
            let e = (xv - 2.5) / (1.25f32 + 1e-5).sqrt() * 1.5 + 0.1;
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
        let rm = bn.running_mean().to_vec1::<f32>().unwrap()[0];
        let rv = bn.running_var().to_vec1::<f32>().unwrap()[0];
        assert!((rm - (0.9 * 0.3 + 0.1 * 2.5)).abs() < 1e-6, "{rm}");
        assert!((rv - (0.9 * 2.0 + 0.1 * 5.0 / 3.0)).abs() < 1e-6, "{rv}");
    }
}
