//! Band-limited resampling of a mono clip with rubato's synchronous FFT resampler.
//!
//! `FftFixedInOut` resamples by an exact rational ratio (`to / gcd : from / gcd`)
//! with a linear-phase windowed-sinc anti-aliasing filter whose delay is half a block.
//! The block length is always an even number of ratio units, so that delay is a whole
//! number of samples at both rates and can be cut off exactly: output sample `k` sits
//! at input time `k * from / to`, with no fractional shift. The clip is followed by
//! zeros until the delayed tail has come out, so no sample is lost or duplicated, and
//! the result has exactly `round(len * to / from)` samples.
//!
//! That block is `2 * from / gcd(from, to)` input samples or more, so a rate with a
//! large co-prime part (44101 Hz to 8 kHz: 88202-sample blocks and FFTs of twice
//! that) would make the FFT path slow and memory-hungry. Above [`MAX_FFT_UNIT`] the
//! resampler falls back to a direct windowed-sinc interpolator (Blackman-Harris
//! window, 48 zero crossings each side, table-interpolated) evaluated at the exact
//! output times `k * from / to`; its memory is O(clip) whatever the ratio.

use rubato::{FftFixedInOut, Resampler};

/// The larger of the two blocks (input or output samples) is about this long, unless
/// one ratio unit is already longer.
const TARGET_BLOCK: usize = 1024;

/// The largest ratio unit (`rate / gcd`) resampled with the FFT resampler; every
/// common rate qualifies (44.1 kHz to 8 kHz is 441:80, 48 kHz to 16 kHz is 3:1).
pub const MAX_FFT_UNIT: usize = 16_384;

/// Zero crossings of the fallback's windowed sinc on each side.
const ZERO_CROSSINGS: usize = 48;
/// Table points per zero crossing (linearly interpolated in between).
const TABLE_DENSITY: usize = 512;
/// The fallback's -6 dB cutoff as a fraction of the lower Nyquist frequency.
const FALLBACK_CUTOFF: f64 = 0.92;

/// Number of output samples for `len` input samples: `round(len * to / from)`, halves
/// rounded up.
pub fn output_len(len: usize, from: u32, to: u32) -> usize {
    let (len, from, to) = (len as u128, from as u128, to as u128);
    ((len * to + from / 2) / from) as usize
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Resamples `input` (mono, `from` Hz) to `to` Hz. The same rate returns the input
/// unchanged. Fails only for a zero rate or if rubato refuses the ratio.
pub fn resample(input: &[f32], from: u32, to: u32) -> Result<Vec<f32>, String> {
    if from == 0 || to == 0 {
        return Err(format!("cannot resample from {from} Hz to {to} Hz"));
    }
    if from == to {
        return Ok(input.to_vec());
    }
    let expected = output_len(input.len(), from, to);
    if input.is_empty() || expected == 0 {
        return Ok(vec![0.0; expected]);
    }

    let (from_u, to_u) = (from as usize, to as usize);
    let g = gcd(from_u, to_u);
    let (unit_in, unit_out) = (from_u / g, to_u / g);
    if unit_in.max(unit_out) > MAX_FFT_UNIT {
        return Ok(windowed_sinc(input, from, to));
    }
    // An even number of ratio units per block keeps the half-block delay whole.
    let units = 2 * (TARGET_BLOCK / (2 * unit_in.max(unit_out))).max(1);
    let block_in = units * unit_in;
    let mut resampler = FftFixedInOut::<f64>::new(from_u, to_u, block_in, 1)
        .map_err(|e| format!("cannot resample from {from} Hz to {to} Hz: {e}"))?;
    let chunk_in = resampler.input_frames_next();
    let chunk_out = resampler.output_frames_next();
    let delay = resampler.output_delay();
    if chunk_in != block_in || chunk_out != units * unit_out || 2 * delay != chunk_out {
        return Err(format!(
            "resampler from {from} Hz to {to} Hz chose blocks {chunk_in}/{chunk_out}, \
             expected {block_in}/{}",
            units * unit_out
        ));
    }

    let needed = delay + expected;
    let mut collected: Vec<f64> = Vec::with_capacity(needed + chunk_out);
    let mut block = vec![0.0f64; chunk_in];
    let mut out = vec![vec![0.0f64; chunk_out]];
    let mut pos = 0;
    while collected.len() < needed {
        // The clip, then zeros to flush the filter's delayed tail.
        let take = (input.len() - pos).min(chunk_in);
        for (dst, &x) in block.iter_mut().zip(&input[pos..pos + take]) {
            *dst = x as f64;
        }
        block[take..].fill(0.0);
        pos += take;
        let (_, written) = resampler
            .process_into_buffer(&[&block], &mut out, None)
            .map_err(|e| format!("resampling from {from} Hz to {to} Hz failed: {e}"))?;
        collected.extend_from_slice(&out[0][..written]);
    }
    Ok(collected[delay..needed].iter().map(|&x| x as f32).collect())
}

/// Blackman-Harris-windowed sinc, `g(u)` for `u` in zero crossings, tabulated on
/// `[0, ZERO_CROSSINGS]` (it is even) with one extra zero point for interpolation.
fn sinc_table() -> Vec<f64> {
    use std::f64::consts::PI;
    let n = ZERO_CROSSINGS * TABLE_DENSITY;
    let mut table: Vec<f64> = (0..=n)
        .map(|i| {
            let u = i as f64 / TABLE_DENSITY as f64;
            let sinc = if i == 0 {
                1.0
            } else {
                (PI * u).sin() / (PI * u)
            };
            let x = PI * u / ZERO_CROSSINGS as f64; // 0..pi over the half window
            let w =
                0.35875 + 0.48829 * x.cos() + 0.14128 * (2.0 * x).cos() + 0.01168 * (3.0 * x).cos();
            sinc * w
        })
        .collect();
    table.push(0.0);
    table
}

/// Direct band-limited interpolation at the exact output times `k * from / to`;
/// the clip is taken as zero outside its ends. Each output's weights are normalised
/// to sum to one, so a constant stays exactly constant away from the edges.
fn windowed_sinc(input: &[f32], from: u32, to: u32) -> Vec<f32> {
    let table = sinc_table();
    let expected = output_len(input.len(), from, to);
    let step = from as f64 / to as f64; // input samples per output sample
                                        // Cutoff in cycles per input sample, relative to the input Nyquist (1 = no cut).
    let fc = FALLBACK_CUTOFF * (to as f64 / from as f64).min(1.0);
    let half_width = ZERO_CROSSINGS as f64 / fc; // in input samples
    let density = TABLE_DENSITY as f64;
    let last = input.len() as isize - 1;
    (0..expected)
        .map(|k| {
            let t = k as f64 * step;
            let lo = ((t - half_width).ceil() as isize).max(0);
            let hi = ((t + half_width).floor() as isize).min(last);
            let (mut acc, mut norm) = (0.0f64, 0.0f64);
            for j in lo..=hi {
                let pos = (t - j as f64).abs() * fc * density;
                let i = pos as usize;
                if i >= table.len() - 1 {
                    continue;
                }
                let frac = pos - i as f64;
                let w = table[i] + (table[i + 1] - table[i]) * frac;
                acc += w * input[j as usize] as f64;
                norm += w;
            }
            // A full window of weights sums to ~1/fc; use that at the clip's edges
            // too, so the zero padding outside fades them like the FFT path does.
            let full = 1.0 / fc;
            let scale = if t - half_width >= 0.0 && t + half_width <= last as f64 {
                norm
            } else {
                full
            };
            (acc / scale) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_to_nearest() {
        assert_eq!(output_len(44100, 44100, 8000), 8000);
        assert_eq!(output_len(3, 16000, 8000), 2); // 1.5 rounds up
        assert_eq!(output_len(1, 44100, 8000), 0);
        assert_eq!(output_len(7, 8000, 16000), 14);
    }

    #[test]
    fn output_has_the_rounded_length() {
        for (n, from) in [
            (1usize, 16000u32),
            (17, 44100),
            (1000, 22050),
            (12345, 48000),
        ] {
            let x = vec![0.25f32; n];
            let y = resample(&x, from, 8000).unwrap();
            assert_eq!(y.len(), output_len(n, from, 8000), "n={n} from={from}");
        }
        let x = vec![0.1f32; 333];
        assert_eq!(resample(&x, 8000, 8000).unwrap(), x);
        assert_eq!(resample(&x, 8000, 11025).unwrap().len(), 459);
    }

    fn sine(rate: u32, freq: f64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (0.7 * (std::f64::consts::TAU * freq * i as f64 / rate as f64).sin()) as f32)
            .collect()
    }

    fn max_sine_error(y: &[f32], rate: u32, freq: f64, edge: usize) -> f64 {
        let expected = sine(rate, freq, y.len());
        y[edge..y.len() - edge]
            .iter()
            .zip(&expected[edge..])
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn fallback_keeps_sines_at_odd_rates() {
        // 44101 and 8000 are co-prime: too big a unit for the FFT path.
        for (from, to) in [(44_101u32, 8000u32), (7_999, 8000), (8000, 16_001)] {
            for freq in [440.0, 1000.0, 2500.0] {
                let x = sine(from, freq, from as usize / 2);
                let y = resample(&x, from, to).unwrap();
                assert_eq!(y.len(), output_len(x.len(), from, to));
                let err = max_sine_error(&y, to, freq, 400);
                println!("{from} -> {to}, {freq} Hz: max error {err:.2e}");
                assert!(err < 1e-2, "{from} -> {to}, {freq} Hz: {err}");
            }
        }
    }

    #[test]
    fn fallback_agrees_with_the_fft_path() {
        let x = sine(44_100, 1000.0, 22_050);
        let fft = resample(&x, 44_100, 8000).unwrap();
        let direct = windowed_sinc(&x, 44_100, 8000);
        assert_eq!(fft.len(), direct.len());
        let worst = fft[300..3700]
            .iter()
            .zip(&direct[300..3700])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        println!("FFT vs direct, 44.1 kHz -> 8 kHz: {worst:.2e}");
        assert!(worst < 1e-3, "{worst}");
    }

    #[test]
    fn dc_level_is_kept_away_from_the_edges() {
        let x = vec![0.5f32; 44100];
        let y = resample(&x, 44100, 8000).unwrap();
        for v in &y[400..7600] {
            assert!((v - 0.5).abs() < 1e-3, "{v}");
        }
    }
}
