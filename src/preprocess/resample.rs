//! Band-limited resampling of a mono clip with rubato's synchronous FFT resampler.
//!
//! `FftFixedInOut` resamples by an exact rational ratio (`to / gcd : from / gcd`)
//! with a linear-phase windowed-sinc anti-aliasing filter whose delay is half a block.
//! The block length is always an even number of ratio units, so that delay is a whole
//! number of samples at both rates and can be cut off exactly: output sample `k` sits
//! at input time `k * from / to`, with no fractional shift. The clip is followed by
//! zeros until the delayed tail has come out, so no sample is lost or duplicated, and
//! the result has exactly `round(len * to / from)` samples.

use rubato::{FftFixedInOut, Resampler};

/// The larger of the two blocks (input or output samples) is about this long, unless
/// one ratio unit is already longer.
const TARGET_BLOCK: usize = 1024;

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

    #[test]
    fn dc_level_is_kept_away_from_the_edges() {
        let x = vec![0.5f32; 44100];
        let y = resample(&x, 44100, 8000).unwrap();
        for v in &y[400..7600] {
            assert!((v - 0.5).abs() < 1e-3, "{v}");
        }
    }
}
