//! Our own hot operations, each behind one small function so that a fused or
//! device-specific kernel can replace it later without touching the model code.
//!
//! - [`max_pool2d_padded`]: 2-D max pooling with implicit `-inf` padding, forward and
//!   backward (candle's `max_pool2d` has neither padding nor a backward pass when
//!   kernel != stride).
//! - [`conv2d`] (through [`im2col`]): convolution as one patch gather and one gemm.
//! - [`lstm_layer`]: the recurrence of one LSTM layer over a whole sequence, one graph
//!   node per layer, with a hand-written backward pass through time.
//!
//! The CPU kernels support `f32` and `f64` (the latter for gradient checks).

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};

/// The float types our CPU kernels are written for.
trait Real: WithDType {
    const NEG_INFINITY: Self;
    fn is_nan(self) -> bool;
    fn tanh(self) -> Self;
    const ZERO: Self;
    const ONE: Self;
    /// `xs[i] = exp(xs[i])`, vectorised for `f32`.
    fn exp_inplace(xs: &mut [Self]);
}

macro_rules! impl_real {
    ($t:ty, $exp:expr) => {
        impl Real for $t {
            fn exp_inplace(xs: &mut [Self]) {
                xs.iter_mut().for_each(|x| *x = $exp(*x));
            }
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
        }
    };
}
impl_real!(f32, exp_f32);
impl_real!(f64, f64::exp);

/// `exp(x)` for `f32` without branches or calls, so that loops over it vectorise:
/// Cephes' `expf` (range reduction by `ln 2` in two parts, degree-5 polynomial,
/// scaling by `2^n` through the exponent bits). Within 2 ulp of `f32::exp` for
/// `x` in `[-87, 88]`; inputs outside are clamped (`sigmoid` and `tanh` saturate
/// long before).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    y * f32::from_bits(((k + 127) << 23) as u32)
}

/// The contiguous part of a CPU storage described by `layout`.
fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected a contiguous input"),
    }
}

/// Runs `$body` with `$t` bound to the Rust float type of `$storage`.
macro_rules! dispatch_float {
    ($op:expr, $storage:expr, $t:ident => $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => bail!("{}: only f32 and f64 are supported", $op),
        }
    };
}

// ---------------------------------------------------------------------------------
// Max pooling
// ---------------------------------------------------------------------------------

/// 2-D max pooling over `(B, C, H, W)` with a square `kernel`, `stride` and implicit
/// `-inf` `padding`, like `torch.nn.functional.max_pool2d(x, kernel, stride, padding)`
/// (dilation 1, `ceil_mode=False`). Ties go to the first maximum in row-major window
/// order and a NaN wins, as in PyTorch's CPU kernel; the backward pass routes each
/// output gradient to that element.
///
/// On the CPU in `f32`/`f64` this is a custom kernel; elsewhere it falls back to
/// [`max_pool2d_padded_composed`].
pub fn max_pool2d_padded(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    PoolGeometry::new(x.dims(), kernel, stride, padding)?;
    if !fast_cpu_path(x) {
        return max_pool2d_padded_composed(x, kernel, stride, padding);
    }
    x.contiguous()?.apply_op1(MaxPool2d {
        kernel,
        stride,
        padding,
    })
}

/// [`max_pool2d_padded`] from ordinary candle operations, for any device and dtype:
/// `-inf` padding, then the elementwise maximum of the `k * k` strided views (taken
/// with `index_select`). Same forward values; in the backward pass exact ties share
/// the gradient instead of it going to the first maximum.
pub fn max_pool2d_padded_composed(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = PoolGeometry::new(x.dims(), kernel, stride, padding)?;
    let (b, c, h, w) = x.dims4()?;
    let dev = x.device();
    let neg = |shape: (usize, usize, usize, usize)| {
        Tensor::full(f32::NEG_INFINITY, shape, dev)?.to_dtype(x.dtype())
    };
    let x = if padding > 0 {
        let p = padding;
        let x = Tensor::cat(&[&neg((b, c, p, w))?, x, &neg((b, c, p, w))?], 2)?;
        Tensor::cat(
            &[&neg((b, c, h + 2 * p, p))?, &x, &neg((b, c, h + 2 * p, p))?],
            3,
        )?
    } else {
        x.clone()
    };
    let index = |len: usize, offset: usize| {
        let idx: Vec<u32> = (0..len).map(|o| (o * stride + offset) as u32).collect();
        Tensor::from_vec(idx, len, dev)
    };
    let mut out: Option<Tensor> = None;
    for ky in 0..kernel {
        let rows = x.index_select(&index(g.out_h, ky)?, 2)?;
        for kx in 0..kernel {
            let v = rows.index_select(&index(g.out_w, kx)?, 3)?;
            out = Some(match out {
                None => v,
                Some(m) => m.maximum(&v)?,
            });
        }
    }
    match out {
        Some(out) => Ok(out),
        None => bail!("max_pool2d_padded: empty kernel"),
    }
}

/// Whether our CPU kernels handle `x` (CPU storage, `f32` or `f64`).
fn fast_cpu_path(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

#[derive(Clone, Copy, Debug)]
struct PoolGeometry {
    planes: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl PoolGeometry {
    fn new(dims: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let &[b, c, h, w] = dims else {
            bail!("max_pool2d_padded: expected a (B, C, H, W) input, got shape {dims:?}")
        };
        if kernel == 0 || stride == 0 {
            bail!("max_pool2d_padded: kernel and stride must be positive")
        }
        if padding > kernel / 2 {
            bail!("max_pool2d_padded: padding {padding} must be at most half the kernel {kernel}")
        }
        if h + 2 * padding < kernel || w + 2 * padding < kernel {
            bail!("max_pool2d_padded: input {h}x{w} with padding {padding} is smaller than the kernel {kernel}")
        }
        Ok(Self {
            planes: b * c,
            h,
            w,
            out_h: (h + 2 * padding - kernel) / stride + 1,
            out_w: (w + 2 * padding - kernel) / stride + 1,
            kernel,
            stride,
            padding,
        })
    }

    /// The clipped input range `[start, end)` of output position `o` along an axis of `len`.
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end = (start + self.kernel as isize).min(len as isize) as usize;
        (start.max(0) as usize, end)
    }

    /// Index into `plane` and value of the maximum of output window `(oy, ox)`.
    fn argmax<T: Real>(&self, plane: &[T], oy: usize, ox: usize) -> (usize, T) {
        let (y0, y1) = self.window(oy, self.h);
        let (x0, x1) = self.window(ox, self.w);
        let mut best_idx = y0 * self.w + x0;
        let mut best = T::NEG_INFINITY;
        for y in y0..y1 {
            let row = &plane[y * self.w..(y + 1) * self.w];
            for (x, &v) in row.iter().enumerate().take(x1).skip(x0) {
                if v > best || v.is_nan() {
                    best = v;
                    best_idx = y * self.w + x;
                }
            }
        }
        (best_idx, best)
    }

    fn forward<T: Real>(&self, input: &[T]) -> Vec<T> {
        let (in_plane, out_plane) = (self.h * self.w, self.out_h * self.out_w);
        let mut out = Vec::with_capacity(self.planes * out_plane);
        for p in 0..self.planes {
            let plane = &input[p * in_plane..(p + 1) * in_plane];
            for oy in 0..self.out_h {
                for ox in 0..self.out_w {
                    out.push(self.argmax(plane, oy, ox).1);
                }
            }
        }
        out
    }

    fn backward<T: Real>(&self, input: &[T], grad_out: &[T]) -> Vec<T> {
        let (in_plane, out_plane) = (self.h * self.w, self.out_h * self.out_w);
        let mut grad_in = vec![T::ZERO; input.len()];
        for p in 0..self.planes {
            let plane = &input[p * in_plane..(p + 1) * in_plane];
            let g_in = &mut grad_in[p * in_plane..(p + 1) * in_plane];
            let g_out = &grad_out[p * out_plane..(p + 1) * out_plane];
            for oy in 0..self.out_h {
                for ox in 0..self.out_w {
                    let (idx, _) = self.argmax(plane, oy, ox);
                    g_in[idx] += g_out[oy * self.out_w + ox];
                }
            }
        }
        grad_in
    }
}

struct MaxPool2d {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max_pool2d_padded"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = PoolGeometry::new(l.dims(), self.kernel, self.stride, self.padding)?;
        let (b, c) = (l.dims()[0], l.dims()[1]);
        let shape = Shape::from((b, c, g.out_h, g.out_w));
        dispatch_float!(self.name(), s, T => {
            let out = g.forward::<T>(contiguous_slice(s, l, self.name())?);
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = MaxPool2dBackward {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        let grad = arg
            .detach()
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.detach().contiguous()?, &op)?;
        Ok(Some(grad))
    }
}

/// `(input, grad_output) -> grad_input` of [`MaxPool2d`]; the argmax is recomputed.
struct MaxPool2dBackward {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max_pool2d_padded_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = PoolGeometry::new(l1.dims(), self.kernel, self.stride, self.padding)?;
        let expected = [l1.dims()[0], l1.dims()[1], g.out_h, g.out_w];
        if l2.dims() != expected {
            bail!(
                "{}: gradient shape {:?}, expected {expected:?}",
                self.name(),
                l2.dims()
            )
        }
        dispatch_float!(self.name(), s1, T => {
            let grad = g.backward::<T>(
                contiguous_slice(s1, l1, self.name())?,
                contiguous_slice(s2, l2, self.name())?,
            );
            Ok((T::to_cpu_storage_owned(grad), l1.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------

/// 2-D convolution, like `F.conv2d(x, w, bias, stride=stride, padding=padding)`
/// (dilation 1, groups 1): `x` `(B, C, H, W)`, `w` `(O, C, k, k)`, `bias` `(O)` ->
/// `(B, O, Ho, Wo)`.
///
/// On the CPU (`f32`/`f64`) lowered to one [`im2col`] and one gemm, several times
/// faster than candle's tiled convolution for the small feature maps of our ResNet;
/// elsewhere candle's `conv2d`. Differentiable (the im2col backward is col2im; the
/// gemm is candle's).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let (o, wc, kh, kw) = w.dims4()?;
    if wc != c || kh != kw {
        bail!(
            "conv2d: weight {:?} does not fit input {:?} (square kernels only)",
            w.dims(),
            x.dims()
        )
    }
    if !fast_cpu_path(x) {
        // Elsewhere candle's own convolution (cuDNN on CUDA) is the better choice.
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        return match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?),
            None => Ok(y),
        };
    }
    let g = ColGeometry::new(x.dims(), kh, stride, padding)?;
    let cols = im2col(x, kh, stride, padding)?;
    // (B * Ho * Wo, O): channels last, so the bias is a contiguous row broadcast.
    let y = cols.matmul(&w.reshape((o, c * kh * kw))?.t()?)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    y.reshape((b, g.out_h, g.out_w, o))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// The patches of `x` `(B, C, H, W)` for a `k x k` kernel: `(B * Ho * Wo, C * k * k)`,
/// one row per output position, columns in `(c, ky, kx)` order, zeros for padding.
pub fn im2col(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    ColGeometry::new(x.dims(), kernel, stride, padding)?;
    x.contiguous()?.apply_op1(Im2Col {
        kernel,
        stride,
        padding,
    })
}

#[derive(Clone, Copy, Debug)]
struct ColGeometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl ColGeometry {
    fn new(dims: &[usize], k: usize, stride: usize, padding: usize) -> Result<Self> {
        let &[b, c, h, w] = dims else {
            bail!("im2col: expected a (B, C, H, W) input, got shape {dims:?}")
        };
        if k == 0 || stride == 0 {
            bail!("im2col: kernel and stride must be positive")
        }
        if h + 2 * padding < k || w + 2 * padding < k {
            bail!("im2col: input {h}x{w} with padding {padding} is smaller than the kernel {k}")
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            out_h: (h + 2 * padding - k) / stride + 1,
            out_w: (w + 2 * padding - k) / stride + 1,
            k,
            stride,
            padding,
        })
    }

    fn row_len(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Calls `f(row, col_index, input_index)` for every in-bounds patch element; the
    /// padding positions are the ones it skips.
    #[inline(always)]
    fn for_each(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (k, s, p) = (self.k, self.stride, self.padding as isize);
        for b in 0..self.b {
            for oy in 0..self.out_h {
                for ox in 0..self.out_w {
                    let row = (b * self.out_h + oy) * self.out_w + ox;
                    for c in 0..self.c {
                        let plane = (b * self.c + c) * self.h * self.w;
                        for ky in 0..k {
                            let iy = (oy * s + ky) as isize - p;
                            if iy < 0 || iy >= self.h as isize {
                                continue;
                            }
                            let line = plane + iy as usize * self.w;
                            for kx in 0..k {
                                let ix = (ox * s + kx) as isize - p;
                                if ix < 0 || ix >= self.w as isize {
                                    continue;
                                }
                                f(row, (c * k + ky) * k + kx, line + ix as usize);
                            }
                        }
                    }
                }
            }
        }
    }

    fn im2col<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let n = self.row_len();
        let mut cols = vec![T::zero(); self.b * self.out_h * self.out_w * n];
        self.for_each(|row, col, idx| cols[row * n + col] = x[idx]);
        cols
    }

    fn col2im<T: WithDType>(&self, cols: &[T]) -> Vec<T> {
        let n = self.row_len();
        let mut x = vec![T::zero(); self.b * self.c * self.h * self.w];
        self.for_each(|row, col, idx| x[idx] += cols[row * n + col]);
        x
    }
}

struct Im2Col {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = ColGeometry::new(l.dims(), self.kernel, self.stride, self.padding)?;
        let shape = Shape::from((g.b * g.out_h * g.out_w, g.row_len()));
        dispatch_float!(self.name(), s, T => {
            let cols = g.im2col::<T>(contiguous_slice(s, l, self.name())?);
            Ok((T::to_cpu_storage_owned(cols), shape))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = Col2Im {
            geometry: ColGeometry::new(arg.dims(), self.kernel, self.stride, self.padding)?,
        };
        Ok(Some(grad_res.detach().contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The adjoint of [`Im2Col`]: sums each patch column back onto its input element.
struct Col2Im {
    geometry: ColGeometry,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let expected = [g.b * g.out_h * g.out_w, g.row_len()];
        if l.dims() != expected {
            bail!("col2im: got shape {:?}, expected {expected:?}", l.dims())
        }
        let shape = Shape::from((g.b, g.c, g.h, g.w));
        dispatch_float!(self.name(), s, T => {
            let x = g.col2im::<T>(contiguous_slice(s, l, self.name())?);
            Ok((T::to_cpu_storage_owned(x), shape))
        })
    }
}

// ---------------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------------

/// The recurrence of one unidirectional LSTM layer, PyTorch gate order (i, f, g, o),
/// zero initial state.
///
/// `xproj` is the input projection for every step, time-major, biases included:
/// `(T, B, 4H) = x W_ih^T + b_ih + b_hh`; `w_hh` is `(4H, H)`. Returns the hidden
/// states `(T, B, H)`, contiguous. Differentiable with respect to both arguments.
///
/// On the CPU this is a single graph node with a fused cell and a hand-written
/// backward pass through time; elsewhere it falls back to [`lstm_layer_composed`].
pub fn lstm_layer(xproj: &Tensor, w_hh: &Tensor) -> Result<Tensor> {
    let (_, _, h) = check_lstm_shapes(xproj, w_hh)?;
    if !fast_cpu_path(xproj) {
        return lstm_layer_composed(xproj, w_hh);
    }
    let packed = xproj
        .contiguous()?
        .apply_op2(&w_hh.contiguous()?, LstmLayer)?;
    packed.narrow(2, 0, h)?.contiguous()
}

/// [`lstm_layer`] written with ordinary candle operations (a few per step), for any
/// device and dtype; also the reference the fused CPU kernel is tested against.
pub fn lstm_layer_composed(xproj: &Tensor, w_hh: &Tensor) -> Result<Tensor> {
    let (t_len, b, h) = check_lstm_shapes(xproj, w_hh)?;
    let w_hh_t = w_hh.t()?;
    let mut h_t = Tensor::zeros((b, h), xproj.dtype(), xproj.device())?;
    let mut c_t = h_t.clone();
    let mut outputs = Vec::with_capacity(t_len);
    for t in 0..t_len {
        let gates = xproj.get(t)?;
        let gates = if t == 0 {
            gates
        } else {
            (gates + h_t.matmul(&w_hh_t)?)?
        };
        let chunks = gates.chunk(4, 1)?;
        let i = candle_nn::ops::sigmoid(&chunks[0])?;
        let f = candle_nn::ops::sigmoid(&chunks[1])?;
        let g = chunks[2].tanh()?;
        let o = candle_nn::ops::sigmoid(&chunks[3])?;
        c_t = ((f * &c_t)? + (i * g)?)?;
        h_t = (o * c_t.tanh()?)?;
        outputs.push(h_t.clone());
    }
    Tensor::stack(&outputs, 0)
}

fn check_lstm_shapes(xproj: &Tensor, w_hh: &Tensor) -> Result<(usize, usize, usize)> {
    let (t_len, b, g4) = xproj.dims3()?;
    let (rows, h) = w_hh.dims2()?;
    if g4 != 4 * h || rows != 4 * h {
        bail!(
            "lstm_layer: expected xproj (T, B, 4H) and w_hh (4H, H), got {:?} and {:?}",
            xproj.dims(),
            w_hh.dims()
        )
    }
    if t_len == 0 {
        bail!("lstm_layer: empty sequence")
    }
    if xproj.dtype() != w_hh.dtype() {
        bail!(
            "lstm_layer: dtype mismatch {:?} vs {:?}",
            xproj.dtype(),
            w_hh.dtype()
        )
    }
    Ok((t_len, b, h))
}

/// `(xproj (T, B, 4H), w_hh (4H, H)) -> (T, B, 6H)`: per step and sample the packed
/// `[h | c | i f g o]` (the activated gates are kept for the backward pass).
struct LstmLayer;

const PACK: usize = 6;

/// Batches up to this size use [`matvec_add`] for `h W_hh^T`; larger ones use gemm.
const SMALL_BATCH: usize = 4;

/// `out += w v` for a row-major `w` of `out.len()` rows and `v.len()` columns.
fn matvec_add<T: Real>(w: &[T], v: &[T], out: &mut [T]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(v.len())) {
        *o += dot(row, v);
    }
}

/// A dot product with eight independent accumulators, so that it vectorises.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::ZERO, |s, (&x, &y)| s + x * y);
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

fn lstm_forward<T: Real>(x: &[T], w: &[T], t_len: usize, b: usize, h: usize) -> Result<Vec<T>> {
    let cpu = Device::Cpu;
    let g4 = 4 * h;
    let w_t = if b > SMALL_BATCH {
        Some(Tensor::from_slice(w, (g4, h), &cpu)?.t()?)
    } else {
        None
    };
    let mut out = vec![T::ZERO; t_len * b * PACK * h];
    let mut h_prev = vec![T::ZERO; b * h];
    let mut c_prev = vec![T::ZERO; b * h];
    let mut gates = vec![T::ZERO; b * g4];
    let mut tanh_c = vec![T::ZERO; b * h];
    let two = T::ONE + T::ONE;
    for t in 0..t_len {
        // Pre-activations: x_t W_ih^T + b (given) + h_{t-1} W_hh^T.
        let x_t = &x[t * b * g4..(t + 1) * b * g4];
        gates.copy_from_slice(x_t);
        if t > 0 {
            match &w_t {
                Some(w_t) => {
                    let hp = Tensor::from_slice(&h_prev, (b, h), &cpu)?;
                    let rec = hp.matmul(w_t)?.flatten_all()?.to_vec1::<T>()?;
                    for (g, r) in gates.iter_mut().zip(&rec) {
                        *g += *r;
                    }
                }
                None => {
                    for (g, hp) in gates.chunks_exact_mut(g4).zip(h_prev.chunks_exact(h)) {
                        matvec_add(w, hp, g);
                    }
                }
            }
        }
        // sigmoid(a) = 1 / (1 + exp(-a)) for i, f, o; tanh(a) = 2 sigmoid(2a) - 1 for g:
        // one vectorised exp over the whole buffer.
        for row in gates.chunks_exact_mut(g4) {
            let (ifg, o) = row.split_at_mut(3 * h);
            let (i_f, g) = ifg.split_at_mut(2 * h);
            i_f.iter_mut()
                .chain(o.iter_mut())
                .for_each(|v| *v = T::ZERO - *v);
            g.iter_mut().for_each(|v| *v = T::ZERO - two * *v);
        }
        T::exp_inplace(&mut gates);
        gates.iter_mut().for_each(|v| *v = T::ONE / (T::ONE + *v));
        for row in gates.chunks_exact_mut(g4) {
            row[2 * h..3 * h]
                .iter_mut()
                .for_each(|v| *v = two * *v - T::ONE);
        }
        // c = f c_{t-1} + i g; h = o tanh(c).
        for ((row, c), tc) in gates
            .chunks_exact(g4)
            .zip(c_prev.chunks_exact_mut(h))
            .zip(tanh_c.chunks_exact_mut(h))
        {
            let (i, rest) = row.split_at(h);
            let (f, rest) = rest.split_at(h);
            let g = &rest[..h];
            for j in 0..h {
                c[j] = f[j] * c[j] + i[j] * g[j];
                tc[j] = T::ZERO - two * c[j];
            }
        }
        T::exp_inplace(&mut tanh_c);
        for (s, ((row, hp), tc)) in gates
            .chunks_exact(g4)
            .zip(h_prev.chunks_exact_mut(h))
            .zip(tanh_c.chunks_exact_mut(h))
            .enumerate()
        {
            let o = &row[3 * h..];
            for j in 0..h {
                tc[j] = two / (T::ONE + tc[j]) - T::ONE;
                hp[j] = o[j] * tc[j];
            }
            let packed = &mut out[(t * b + s) * PACK * h..][..PACK * h];
            packed[..h].copy_from_slice(hp);
            packed[h..2 * h].copy_from_slice(&c_prev[s * h..(s + 1) * h]);
            packed[2 * h..].copy_from_slice(row);
        }
    }
    Ok(out)
}

/// Backward pass through time. `grad` is the gradient of the packed output (normally
/// non-zero only in its `h` part). Returns `(d xproj (T, B, 4H), d w_hh (4H, H))`.
fn lstm_backward<T: Real>(
    w_hh: &Tensor,
    packed: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (t_len, b, ph) = packed.dims3()?;
    let h = ph / PACK;
    let cpu = packed.device().clone();
    let p: Vec<T> = packed.flatten_all()?.to_vec1()?;
    let gr: Vec<T> = grad.flatten_all()?.to_vec1()?;
    let w = w_hh.detach().contiguous()?;
    let mut d_pre = vec![T::ZERO; t_len * b * 4 * h];
    let mut dh_next = vec![T::ZERO; b * h];
    let mut dc_next = vec![T::ZERO; b * h];
    let one = T::ONE;
    for t in (0..t_len).rev() {
        for s in 0..b {
            let row = &p[(t * b + s) * ph..][..ph];
            let grow = &gr[(t * b + s) * ph..][..ph];
            let c_prev_row = if t == 0 {
                None
            } else {
                Some(&p[((t - 1) * b + s) * ph + h..][..h])
            };
            let d_row = &mut d_pre[(t * b + s) * 4 * h..][..4 * h];
            for j in 0..h {
                let c = row[h + j];
                let (i, f, g, o) = (
                    row[2 * h + j],
                    row[3 * h + j],
                    row[4 * h + j],
                    row[5 * h + j],
                );
                let tc = c.tanh();
                let dh = grow[j] + dh_next[s * h + j];
                let dc = grow[h + j] + dc_next[s * h + j] + dh * o * (one - tc * tc);
                let c_prev = c_prev_row.map_or(T::ZERO, |r| r[j]);
                let di = dc * g + grow[2 * h + j];
                let df = dc * c_prev + grow[3 * h + j];
                let dg = dc * i + grow[4 * h + j];
                let d_o = dh * tc + grow[5 * h + j];
                d_row[j] = di * i * (one - i);
                d_row[h + j] = df * f * (one - f);
                d_row[2 * h + j] = dg * (one - g * g);
                d_row[3 * h + j] = d_o * o * (one - o);
                dc_next[s * h + j] = dc * f;
            }
        }
        if t > 0 {
            let d_t =
                Tensor::from_slice(&d_pre[t * b * 4 * h..(t + 1) * b * 4 * h], (b, 4 * h), &cpu)?;
            dh_next = d_t.matmul(&w)?.flatten_all()?.to_vec1()?;
        }
    }
    // h_{t-1} for every step (zeros for t = 0), as (T * B, H).
    let mut h_prev = vec![T::ZERO; t_len * b * h];
    for t in 1..t_len {
        for s in 0..b {
            let src = &p[((t - 1) * b + s) * ph..][..h];
            h_prev[(t * b + s) * h..][..h].copy_from_slice(src);
        }
    }
    let d_pre = Tensor::from_vec(d_pre, (t_len * b, 4 * h), &cpu)?;
    let h_prev = Tensor::from_vec(h_prev, (t_len * b, h), &cpu)?;
    let d_w = d_pre.t()?.matmul(&h_prev)?;
    Ok((d_pre.reshape((t_len, b, 4 * h))?, d_w))
}

impl CustomOp2 for LstmLayer {
    fn name(&self) -> &'static str {
        "lstm_layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let &[t_len, b, g4] = l1.dims() else {
            bail!("lstm_layer: xproj must be (T, B, 4H), got {:?}", l1.dims())
        };
        let h = g4 / 4;
        if l2.dims() != [4 * h, h] {
            bail!(
                "lstm_layer: w_hh must be ({}, {h}), got {:?}",
                4 * h,
                l2.dims()
            )
        }
        dispatch_float!(self.name(), s1, T => {
            let out = lstm_forward::<T>(
                contiguous_slice(s1, l1, self.name())?,
                contiguous_slice(s2, l2, self.name())?,
                t_len,
                b,
                h,
            )?;
            Ok((T::to_cpu_storage_owned(out), Shape::from((t_len, b, PACK * h))))
        })
    }

    fn bwd(
        &self,
        _xproj: &Tensor,
        w_hh: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_x, d_w) = match res.dtype() {
            DType::F32 => lstm_backward::<f32>(w_hh, &res.detach(), &grad_res.detach())?,
            DType::F64 => lstm_backward::<f64>(w_hh, &res.detach(), &grad_res.detach())?,
            dt => bail!("lstm_layer: unsupported dtype {dt:?}"),
        };
        Ok((Some(d_x), Some(d_w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn seq(n: usize, scale: f64) -> Vec<f64> {
        // A deterministic, tie-free sequence in [-scale, scale].
        (0..n)
            .map(|i| ((i as f64 * 0.7548776662).fract() * 2.0 - 1.0) * scale)
            .collect()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn max_pool_forward_matches_manual_padding() {
        // A 1x1x4x4 input with padding 1: the output windows are clipped at the border.
        let x = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = max_pool2d_padded(&x, 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![5., 7., 13., 15.]
        );
    }

    #[test]
    fn max_pool_ties_route_gradient_to_the_first_maximum() {
        // All-equal input: PyTorch routes each window's gradient to its first element.
        let x = Var::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let y = max_pool2d_padded(x.as_tensor(), 3, 2, 1).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Windows start at (-1,-1), (-1,1), (1,-1), (1,1): first valid elements (0,0), (0,1), (1,0), (1,1).
        let mut expected = vec![0f32; 16];
        for idx in [0, 1, 4, 5] {
            expected[idx] = 1.0;
        }
        assert_eq!(g, expected);
    }

    #[test]
    fn max_pool_backward_matches_finite_differences() {
        let dims = (2, 3, 7, 6);
        let n = 2 * 3 * 7 * 6;
        let data = seq(n, 1.0);
        let x = Var::from_vec(data.clone(), dims, &Device::Cpu).unwrap();
        // A random-looking linear functional of the output makes every gradient distinct.
        let y = max_pool2d_padded(x.as_tensor(), 3, 2, 1).unwrap();
        let wts = Tensor::from_vec(seq(y.elem_count(), 1.0), y.dims(), &Device::Cpu).unwrap();
        let loss = |t: &Tensor| {
            (max_pool2d_padded(t, 3, 2, 1).unwrap() * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        for i in 0..n {
            let mut plus = data.clone();
            plus[i] += eps;
            let mut minus = data.clone();
            minus[i] -= eps;
            let fp = loss(&Tensor::from_vec(plus, dims, &Device::Cpu).unwrap());
            let fm = loss(&Tensor::from_vec(minus, dims, &Device::Cpu).unwrap());
            let fd = (fp - fm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-6,
                "element {i}: finite difference {fd}, backward {}",
                g[i]
            );
        }
    }

    #[test]
    fn max_pool_composed_fallback_matches_the_kernel() {
        for (dims, k, st, p) in [
            ((2, 3, 7, 6), 3, 2, 1),
            ((1, 2, 5, 5), 2, 2, 0),
            ((1, 1, 4, 9), 3, 1, 1),
        ] {
            let n = dims.0 * dims.1 * dims.2 * dims.3;
            let x = Var::from_vec(seq(n, 1.0), dims, &Device::Cpu).unwrap();
            let a = max_pool2d_padded(x.as_tensor(), k, st, p).unwrap();
            let b = max_pool2d_padded_composed(x.as_tensor(), k, st, p).unwrap();
            assert_eq!(max_abs_diff(&a, &b), 0.0);
            let probe = Tensor::from_vec(seq(a.elem_count(), 1.0), a.dims(), &Device::Cpu).unwrap();
            let ga = (&a * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (&b * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (ga, gb) = (
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap(),
            );
            assert!(max_abs_diff(ga, gb) < 1e-12);
        }
        // Other dtypes take the composed path.
        let x = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = max_pool2d_padded(&x.to_dtype(DType::BF16).unwrap(), 3, 2, 1).unwrap();
        let y = y
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, vec![5., 7., 13., 15.]);
    }

    #[test]
    fn max_pool_rejects_bad_geometry() {
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d_padded(&x, 3, 2, 2).is_err());
        assert!(max_pool2d_padded(&x, 0, 2, 0).is_err());
        assert!(max_pool2d_padded(&x.flatten_all().unwrap(), 3, 2, 1).is_err());
    }

    fn lstm_inputs(t_len: usize, b: usize, h: usize) -> (Var, Var) {
        let cpu = Device::Cpu;
        let x = Var::from_vec(seq(t_len * b * 4 * h, 1.5), (t_len, b, 4 * h), &cpu).unwrap();
        let w: Vec<f64> = seq(4 * h * h + 7, 0.6).into_iter().skip(7).collect();
        let w = Var::from_vec(w, (4 * h, h), &cpu).unwrap();
        (x, w)
    }

    #[test]
    fn lstm_fused_matches_composed_forward_and_backward() {
        let (x, w) = lstm_inputs(6, 3, 5);
        let weights = Tensor::from_vec(seq(6 * 3 * 5, 1.0), (6, 3, 5), &Device::Cpu).unwrap();
        let fused = lstm_layer(x.as_tensor(), w.as_tensor()).unwrap();
        let composed = lstm_layer_composed(x.as_tensor(), w.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-12);
        let gf = (&fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_abs_diff(a, b) < 1e-12,
                "gradient mismatch {}",
                max_abs_diff(a, b)
            );
        }
    }

    #[test]
    fn lstm_backward_matches_finite_differences() {
        let (x, w) = lstm_inputs(4, 2, 3);
        let weights = Tensor::from_vec(seq(4 * 2 * 3, 1.0), (4, 2, 3), &Device::Cpu).unwrap();
        let loss = |x: &Tensor, w: &Tensor| {
            (lstm_layer(x, w).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (lstm_layer(x.as_tensor(), w.as_tensor()).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let eps = 1e-6;
        for (var, is_x) in [(&x, true), (&w, false)] {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..base.len() {
                let bump = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap();
                    if is_x {
                        loss(&t, w.as_tensor())
                    } else {
                        loss(x.as_tensor(), &t)
                    }
                };
                let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 1e-7,
                    "element {i}: finite difference {fd}, backward {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn conv2d_matches_candle_forward_and_backward() {
        let cpu = Device::Cpu;
        for (b, c, h, w, o, k, stride, pad) in [
            (2, 3, 9, 7, 4, 3, 1, 1),
            (2, 3, 9, 7, 4, 3, 2, 1),
            (1, 2, 11, 11, 3, 7, 2, 3),
            (3, 4, 5, 5, 2, 1, 2, 0),
            (2, 2, 1, 1, 3, 3, 1, 1),
        ] {
            let x = Var::from_vec(seq(b * c * h * w, 1.0), (b, c, h, w), &cpu).unwrap();
            let wts: Vec<f64> = seq(o * c * k * k + 3, 0.5).into_iter().skip(3).collect();
            let wv = Var::from_vec(wts, (o, c, k, k), &cpu).unwrap();
            let ours = conv2d(x.as_tensor(), wv.as_tensor(), None, stride, pad).unwrap();
            // The fallback used off the CPU fast path, with a bias.
            let bias = Tensor::from_vec(seq(o, 1.0), o, &cpu).unwrap();
            let with_bias =
                conv2d(x.as_tensor(), wv.as_tensor(), Some(&bias), stride, pad).unwrap();
            let x16 = x.as_tensor().to_dtype(DType::F32).unwrap();
            let w16 = wv.as_tensor().to_dtype(DType::F32).unwrap();
            let b16 = bias.to_dtype(DType::F32).unwrap();
            let f32_path = conv2d(&x16, &w16, Some(&b16), stride, pad).unwrap();
            let fallback = conv2d(
                &x16.to_dtype(DType::F16).unwrap(),
                &w16.to_dtype(DType::F16).unwrap(),
                Some(&b16.to_dtype(DType::F16).unwrap()),
                stride,
                pad,
            )
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
            let scale = f32_path
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = (&fallback - &f32_path)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 2e-2 * scale.max(1.0));
            let with_bias_ref = ours
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert!(max_abs_diff(&with_bias, &with_bias_ref) < 1e-12);
            let theirs = x
                .as_tensor()
                .conv2d(wv.as_tensor(), pad, stride, 1, 1)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_abs_diff(&ours, &theirs) < 1e-12);
            let probe = Tensor::from_vec(seq(ours.elem_count(), 1.0), ours.dims(), &cpu).unwrap();
            let g1 = (&ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&theirs * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wv] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_abs_diff(a, b) < 1e-12,
                    "gradient mismatch {}",
                    max_abs_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst: f64 = 0.0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_3;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e4) >= 0.0 && exp_f32(1e4).is_finite());
    }

    #[test]
    fn lstm_small_and_large_batches_agree() {
        // Batches up to SMALL_BATCH use our mat-vec kernel, larger ones gemm.
        let (x, w) = lstm_inputs(7, SMALL_BATCH + 3, 16);
        let x = x.as_tensor().to_dtype(DType::F32).unwrap();
        let w = w.as_tensor().to_dtype(DType::F32).unwrap();
        let all = lstm_layer(&x, &w).unwrap();
        for s in 0..SMALL_BATCH + 3 {
            let one = lstm_layer(&x.narrow(1, s, 1).unwrap(), &w).unwrap();
            assert!(max_abs_diff(&one, &all.narrow(1, s, 1).unwrap()) < 1e-6);
        }
    }

    #[test]
    fn lstm_f32_matches_f64() {
        let (x, w) = lstm_inputs(9, 4, 8);
        let y64 = lstm_layer(x.as_tensor(), w.as_tensor()).unwrap();
        let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
        let w32 = w.as_tensor().to_dtype(DType::F32).unwrap();
        let y32 = lstm_layer(&x32, &w32)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(max_abs_diff(&y64, &y32) < 1e-5);
    }
}
