//! The MLP head: `Linear -> ReLU` per hidden width, then `Linear` to the outputs, with
//! `nn.Sequential` indices as tensor names (`0`, `2`, `4`, ...: the ReLUs take the odd
//! indices). Dropout, when set, follows each ReLU in training mode only; it is not a
//! `Sequential` entry, so the names do not depend on it.

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{linear, Linear, ModuleT, VarBuilder};

use super::config::HeadConfig;

#[derive(Clone, Debug)]
pub struct Head {
    hidden: Vec<Linear>,
    out: Linear,
    dropout: f32,
}

impl Head {
    pub fn new(
        in_dim: usize,
        cfg: &HeadConfig,
        num_outputs: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut dims = vec![in_dim];
        dims.extend(&cfg.hidden);
        dims.push(num_outputs);
        let mut layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| linear(d[0], d[1], vb.pp(2 * i)))
            .collect::<Result<Vec<_>>>()?;
        let Some(out) = layers.pop() else {
            bail!("head: no layers")
        };
        Ok(Self {
            hidden: layers,
            out,
            dropout: 0.0,
        })
    }

    /// Dropout probability after each hidden ReLU, used only when `train` is true.
    pub fn set_dropout(&mut self, p: f32) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            bail!("head dropout must be in [0, 1), got {p}")
        }
        self.dropout = p;
        Ok(())
    }

    pub fn dropout(&self) -> f32 {
        self.dropout
    }
}

impl ModuleT for Head {
    /// `(B, in_dim)` -> `(B, num_outputs)` logits.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.hidden {
            x = layer.forward(&x)?.relu()?;
            if train && self.dropout > 0.0 {
                x = candle_nn::ops::dropout(&x, self.dropout)?;
            }
        }
        self.out.forward(&x)
    }
}
