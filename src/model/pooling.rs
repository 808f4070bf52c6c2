//! Temporal pooling over each sample's valid frames.
//!
//! For a sample of `length` frames: a max-pool over time with kernel `k` and stride
//! `s` (windows start at 0, s, 2s, ... and count only if `start + k <= length`; a
//! sample shorter than `k` has exactly one window covering all its frames), then the
//! global max or mean over those windows. Padding frames (right padding up to the
//! batch's `T`) never influence the output: the whole batch is one masked, fully
//! differentiable tensor computation.

use candle_core::{bail, Result, Tensor};

use super::config::{GlobalPool, PoolingConfig};

/// Fill for masked positions; finite so that no `inf * 0` can appear anywhere.
const MASK_FILL: f64 = -3.0e38;

#[derive(Clone, Debug)]
pub struct TemporalPooling {
    kernel: usize,
    stride: usize,
    global: GlobalPool,
}

impl TemporalPooling {
    pub fn new(cfg: &PoolingConfig) -> Result<Self> {
        if cfg.kernel == 0 || cfg.stride == 0 {
            bail!("pooling: kernel and stride must be positive")
        }
        Ok(Self {
            kernel: cfg.kernel,
            stride: cfg.stride,
            global: cfg.global,
        })
    }

    /// Number of max-pool windows for a sample of `length` frames.
    pub fn num_windows(&self, length: usize) -> usize {
        if length >= self.kernel {
            (length - self.kernel) / self.stride + 1
        } else {
            1
        }
    }

    /// `(B, T, H)` encoder outputs and each sample's valid length -> `(B, H)`.
    pub fn forward(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t_max, _) = x.dims3()?;
        if lengths.len() != b {
            bail!("pooling: {} lengths for a batch of {b}", lengths.len())
        }
        if let Some((i, &l)) = lengths
            .iter()
            .enumerate()
            .find(|(_, &l)| l == 0 || l > t_max)
        {
            bail!("pooling: lengths[{i}] = {l} must be in 1..={t_max}")
        }
        match self.global {
            GlobalPool::Max => self.global_max(x, lengths),
            GlobalPool::Mean => self.global_mean(x, lengths),
        }
    }

    /// Whether frame `f` of a sample of `length` frames lies in one of its windows.
    fn covered(&self, f: usize, length: usize) -> bool {
        if length < self.kernel {
            return f < length;
        }
        let last_start = (self.num_windows(length) - 1) * self.stride;
        f < last_start + self.kernel && f % self.stride < self.kernel
    }

    /// The max over windows of the max inside each window is the max over the frames
    /// the windows cover; taking it directly also keeps overlapping windows from
    /// routing the same gradient twice.
    fn global_max(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t_max, _) = x.dims3()?;
        let mask: Vec<u8> = lengths
            .iter()
            .flat_map(|&l| (0..t_max).map(move |f| u8::from(self.covered(f, l))))
            .collect();
        let dev = x.device();
        let mask = Tensor::from_vec(mask, (b, t_max, 1), dev)?.broadcast_as(x.shape())?;
        let fill = Tensor::full(MASK_FILL, (), dev)?
            .to_dtype(x.dtype())?
            .broadcast_as(x.shape())?;
        mask.where_cond(x, &fill)?.max(1)
    }

    fn global_mean(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t_max, h) = x.dims3()?;
        let (k, s) = (self.kernel, self.stride);
        let n_win = lengths
            .iter()
            .map(|&l| self.num_windows(l))
            .max()
            .unwrap_or(1);
        // Frame index of every (window, offset); positions past the end are clamped
        // (they are always masked).
        let index: Vec<u32> = (0..n_win)
            .flat_map(|j| (0..k).map(move |o| (j * s + o).min(t_max - 1) as u32))
            .collect();
        // Valid iff the window exists for this sample and the frame is inside it.
        let mut frame_mask = Vec::with_capacity(b * n_win * k);
        let mut window_mask = Vec::with_capacity(b * n_win);
        for &l in lengths {
            let nw = self.num_windows(l);
            for j in 0..n_win {
                window_mask.push(u8::from(j < nw));
                for o in 0..k {
                    frame_mask.push(u8::from(j < nw && j * s + o < l));
                }
            }
        }
        let dev = x.device();
        let index = Tensor::from_vec(index, n_win * k, dev)?;
        let shape = (b, n_win, k, h);
        let frames = x.index_select(&index, 1)?.reshape(shape)?;
        let frame_mask =
            Tensor::from_vec(frame_mask, (b, n_win, k, 1), dev)?.broadcast_as(shape)?;
        let fill = Tensor::full(MASK_FILL, (), dev)?
            .to_dtype(x.dtype())?
            .broadcast_as(shape)?;
        // (B, W, H): the max of each window; windows that do not exist hold MASK_FILL
        // and are zeroed before the sum.
        let windows = frame_mask.where_cond(&frames, &fill)?.max(2)?;
        let window_mask =
            Tensor::from_vec(window_mask, (b, n_win, 1), dev)?.broadcast_as(windows.shape())?;
        let sum = window_mask
            .where_cond(&windows, &windows.zeros_like()?)?
            .sum(1)?;
        let counts: Vec<f32> = lengths
            .iter()
            .map(|&l| self.num_windows(l) as f32)
            .collect();
        let counts = Tensor::from_vec(counts, (b, 1), dev)?.to_dtype(x.dtype())?;
        sum.broadcast_div(&counts)
    }
}

/// Reference semantics for one unpadded sample `(length, H)` -> `(H)`, written with
/// plain loops; used by the tests.
#[cfg(test)]
pub(crate) fn pool_one_reference(
    rows: &[Vec<f32>],
    kernel: usize,
    stride: usize,
    global: GlobalPool,
) -> Vec<f32> {
    let l = rows.len();
    let h = rows[0].len();
    let windows: Vec<(usize, usize)> = if l < kernel {
        vec![(0, l)]
    } else {
        (0..=(l - kernel) / stride)
            .map(|j| (j * stride, j * stride + kernel))
            .collect()
    };
    let maxes: Vec<Vec<f32>> = windows
        .iter()
        .map(|&(a, e)| {
            (0..h)
                .map(|c| rows[a..e].iter().map(|r| r[c]).fold(f32::MIN, f32::max))
                .collect()
        })
        .collect();
    (0..h)
        .map(|c| match global {
            GlobalPool::Max => maxes.iter().map(|m| m[c]).fold(f32::MIN, f32::max),
            GlobalPool::Mean => maxes.iter().map(|m| m[c]).sum::<f32>() / maxes.len() as f32,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn data(b: usize, t: usize, h: usize) -> Vec<f32> {
        (0..b * t * h)
            .map(|i| ((i as f32 * 0.618034).fract() - 0.5) * 4.0)
            .collect()
    }

    #[test]
    fn matches_per_sample_reference_and_ignores_padding() {
        let (b, t, h) = (5, 11, 3);
        let lengths = [11, 7, 3, 2, 1];
        for (kernel, stride) in [(3, 2), (2, 2), (1, 1), (4, 3), (3, 1)] {
            for global in [GlobalPool::Max, GlobalPool::Mean] {
                let pool = TemporalPooling::new(&PoolingConfig {
                    kernel,
                    stride,
                    global,
                })
                .unwrap();
                let mut d = data(b, t, h);
                // Huge values in the padding must not leak into any output.
                for (bi, &l) in lengths.iter().enumerate() {
                    for ti in l..t {
                        for c in 0..h {
                            d[(bi * t + ti) * h + c] = 1e6;
                        }
                    }
                }
                let x = Tensor::from_vec(d.clone(), (b, t, h), &Device::Cpu).unwrap();
                let y = pool
                    .forward(&x, &lengths)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                for (bi, &l) in lengths.iter().enumerate() {
                    let rows: Vec<Vec<f32>> = (0..l)
                        .map(|ti| d[(bi * t + ti) * h..(bi * t + ti + 1) * h].to_vec())
                        .collect();
                    let expected = pool_one_reference(&rows, kernel, stride, global);
                    for (a, e) in y[bi].iter().zip(&expected) {
                        assert!(
                            (a - e).abs() < 1e-6,
                            "k{kernel} s{stride} {global:?} sample {bi}: {a} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gradient_never_reaches_padding() {
        let (b, t, h) = (3, 8, 2);
        let lengths = [8, 4, 2];
        for global in [GlobalPool::Max, GlobalPool::Mean] {
            let pool = TemporalPooling::new(&PoolingConfig {
                kernel: 3,
                stride: 2,
                global,
            })
            .unwrap();
            let x = Var::from_vec(data(b, t, h), (b, t, h), &Device::Cpu).unwrap();
            let grads = pool
                .forward(x.as_tensor(), &lengths)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = grads.get(x.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
            for (bi, &l) in lengths.iter().enumerate() {
                for (ti, row) in g[bi].iter().enumerate() {
                    let total: f32 = row.iter().map(|v| v.abs()).sum();
                    if ti >= l {
                        assert_eq!(total, 0.0, "padding frame {ti} of sample {bi} got gradient");
                    }
                }
                let valid: f32 = g[bi][..l].iter().flatten().sum();
                assert!(
                    (valid - h as f32).abs() < 1e-5,
                    "sample {bi}: gradient mass {valid}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        let pool = TemporalPooling::new(&PoolingConfig::default()).unwrap();
        let x = Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(pool.forward(&x, &[4]).is_err());
        assert!(pool.forward(&x, &[4, 0]).is_err());
        assert!(pool.forward(&x, &[5, 1]).is_err());
    }
}
