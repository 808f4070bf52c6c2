//! Multi-layer unidirectional batch-first LSTM with `torch.nn.LSTM`'s tensor names
//! (`weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`) and gate order
//! (i, f, g, o).
//!
//! Each layer computes its input projection for all time steps with one matmul, then
//! runs the recurrence with [`ops::lstm_layer`] (time-major, contiguous).

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::LstmConfig;
use super::ops;

#[derive(Clone, Debug)]
struct LstmLayer {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

#[derive(Clone, Debug)]
pub struct AudioEncoder {
    layers: Vec<LstmLayer>,
    input_size: usize,
    hidden: usize,
}

impl AudioEncoder {
    pub fn new(input_size: usize, cfg: &LstmConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let in_dim = if l == 0 { input_size } else { h };
                Ok(LstmLayer {
                    w_ih: vb.get((4 * h, in_dim), &format!("weight_ih_l{l}"))?,
                    w_hh: vb.get((4 * h, h), &format!("weight_hh_l{l}"))?,
                    b_ih: vb.get(4 * h, &format!("bias_ih_l{l}"))?,
                    b_hh: vb.get(4 * h, &format!("bias_hh_l{l}"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            input_size,
            hidden: h,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Runs every layer on a time-major `(T, B, input)` tensor, giving `(T, B, H)`.
    pub fn forward_time_major(&self, x: &Tensor) -> Result<Tensor> {
        let (t_len, b, in_dim) = x.dims3()?;
        if in_dim != self.input_size {
            bail!(
                "audio encoder: input has {in_dim} features, expected {}",
                self.input_size
            )
        }
        if t_len == 0 {
            bail!("audio encoder: empty sequence")
        }
        let h = self.hidden;
        let mut x = x.contiguous()?;
        for layer in &self.layers {
            let in_dim = x.dim(2)?;
            let bias = (&layer.b_ih + &layer.b_hh)?;
            let xproj = x
                .reshape((t_len * b, in_dim))?
                .matmul(&layer.w_ih.t()?)?
                .broadcast_add(&bias)?
                .reshape((t_len, b, 4 * h))?;
            x = ops::lstm_layer(&xproj, &layer.w_hh)?;
        }
        Ok(x)
    }
}

impl Module for AudioEncoder {
    /// `(B, T, n_mels)` -> `(B, T, hidden)`, zero initial state. (There is no dropout,
    /// so candle's blanket `ModuleT` impl gives the same computation in training.)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.transpose(0, 1)?.contiguous()?;
        self.forward_time_major(&x)?.transpose(0, 1)?.contiguous()
    }
}
