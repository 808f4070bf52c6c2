//! The log-mel front end, numerically matching
//! `torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, win_length, hop_length,
//! f_min, f_max, n_mels, window_fn=torch.hann_window, power=2.0, center=True,
//! pad_mode="reflect", norm=None, mel_scale="htk")` followed by `torch.log(x + log_eps)`
//! and a transpose to frames x n_mels.
//!
//! Everything that does not depend on the waveform (window, filterbank, FFT plan) is
//! computed once in [`MelFrontEnd::new`]; [`MelFrontEnd::compute`] takes `&self` and
//! only allocates its own scratch buffers, so one front end serves many threads.
//! The arithmetic is done in f64 and rounded to f32 at the end.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

use crate::model::config::AudioConfig;

/// A precomputed STFT + mel filterbank + log.
#[derive(Clone)]
pub struct MelFrontEnd {
    n_fft: usize,
    hop_length: usize,
    n_mels: usize,
    log_eps: f64,
    /// The periodic Hann window of `win_length`, zero-padded (centered) to `n_fft`.
    window: Vec<f64>,
    /// One triangular filter per mel band: first FFT bin and the non-zero weights.
    filters: Vec<(usize, Vec<f64>)>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for MelFrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelFrontEnd")
            .field("n_fft", &self.n_fft)
            .field("hop_length", &self.hop_length)
            .field("n_mels", &self.n_mels)
            .field("log_eps", &self.log_eps)
            .finish_non_exhaustive()
    }
}

fn hz_to_mel_htk(f: f64) -> f64 {
    2595.0 * (1.0 + f / 700.0).log10()
}

fn mel_to_hz_htk(m: f64) -> f64 {
    700.0 * (10f64.powf(m / 2595.0) - 1.0)
}

/// `torch.linspace(start, end, steps)`, in f64.
fn linspace(start: f64, end: f64, steps: usize) -> Vec<f64> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f64;
            (0..steps).map(|i| start + step * i as f64).collect()
        }
    }
}

impl MelFrontEnd {
    /// Builds the front end. The config must be valid (see `ModelConfig::validate`):
    /// `n_fft >= 2`, `1 <= win_length <= n_fft`, `hop_length >= 1`, `n_mels >= 1`.
    ///
    /// `f_max: None` means `sample_rate // 2` (integer division), as in torchaudio.
    pub fn new(cfg: &AudioConfig) -> Self {
        assert!(cfg.n_fft >= 2, "n_fft must be at least 2");
        assert!(
            cfg.win_length >= 1 && cfg.win_length <= cfg.n_fft,
            "win_length must be in 1..=n_fft"
        );
        assert!(cfg.hop_length >= 1, "hop_length must be positive");
        let n_fft = cfg.n_fft;

        // torch.hann_window(win_length, periodic=True), then torch.stft pads it with
        // zeros on both sides (left = (n_fft - win_length) / 2) to n_fft.
        let mut window = vec![0.0; n_fft];
        let left = (n_fft - cfg.win_length) / 2;
        let wl = cfg.win_length as f64;
        for n in 0..cfg.win_length {
            window[left + n] = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / wl).cos();
        }

        // torchaudio.functional.melscale_fbanks(n_freqs, f_min, f_max, n_mels,
        // sample_rate, norm=None, mel_scale="htk").
        let n_freqs = n_fft / 2 + 1;
        let sr_half = (cfg.sample_rate / 2) as f64;
        let f_min = cfg.f_min as f64;
        let f_max = cfg.f_max.map(|f| f as f64).unwrap_or(sr_half);
        let all_freqs = linspace(0.0, sr_half, n_freqs);
        let m_pts = linspace(hz_to_mel_htk(f_min), hz_to_mel_htk(f_max), cfg.n_mels + 2);
        let f_pts: Vec<f64> = m_pts.iter().map(|&m| mel_to_hz_htk(m)).collect();
        let filters = (0..cfg.n_mels)
            .map(|m| {
                let (lo, center, hi) = (f_pts[m], f_pts[m + 1], f_pts[m + 2]);
                let weights: Vec<f64> = all_freqs
                    .iter()
                    .map(|&f| {
                        let down = (f - lo) / (center - lo);
                        let up = (hi - f) / (hi - center);
                        down.min(up).max(0.0)
                    })
                    .collect();
                let first = weights.iter().position(|w| *w > 0.0).unwrap_or(0);
                let last = weights.iter().rposition(|w| *w > 0.0).map_or(0, |l| l + 1);
                let last = last.max(first);
                (first, weights[first..last].to_vec())
            })
            .collect();

        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(n_fft);
        Self {
            n_fft,
            hop_length: cfg.hop_length,
            n_mels: cfg.n_mels,
            log_eps: cfg.log_eps as f64,
            window,
            filters,
            fft,
        }
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// The number of frames [`compute`](Self::compute) returns for a clip of `len`
    /// samples: `1 + (max(len, n_fft/2 + 1) + 2*(n_fft/2) - n_fft) / hop`, which is
    /// `1 + len / hop` for an even `n_fft` and a clip longer than `n_fft / 2`.
    pub fn frames_for(&self, len: usize) -> usize {
        let pad = self.n_fft / 2;
        let len = len.max(pad + 1);
        1 + (len + 2 * pad - self.n_fft) / self.hop_length
    }

    /// Log-mel features of a mono clip at the configured sample rate, returned as
    /// `(values, frames)` with `values` row-major frames x n_mels.
    ///
    /// The clip is reflect-padded by `n_fft / 2` on both sides (torch.stft with
    /// `center=True`). Reflect padding needs more than `n_fft / 2` samples; torch
    /// refuses shorter input, so a shorter clip (including an empty one) is first
    /// zero-padded at the end to `n_fft / 2 + 1` samples, which is what its silence
    /// would look like after the clip ends.
    pub fn compute(&self, mono: &[f32]) -> (Vec<f32>, usize) {
        let pad = self.n_fft / 2;
        let mut signal: Vec<f64> = mono.iter().map(|&x| x as f64).collect();
        if signal.len() <= pad {
            signal.resize(pad + 1, 0.0);
        }
        let len = signal.len();
        // Reflect padding (the edge sample is not repeated): x[-k] = x[k].
        let mut padded = Vec::with_capacity(len + 2 * pad);
        padded.extend((1..=pad).rev().map(|k| signal[k]));
        padded.extend_from_slice(&signal);
        padded.extend((1..=pad).map(|k| signal[len - 1 - k]));

        let frames = self.frames_for(mono.len());
        debug_assert_eq!(frames, 1 + (padded.len() - self.n_fft) / self.hop_length);

        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0.0f64; spectrum.len()];
        let mut out = Vec::with_capacity(frames * self.n_mels);
        for t in 0..frames {
            let start = t * self.hop_length;
            let frame = &padded[start..start + self.n_fft];
            for ((dst, &x), &w) in input.iter_mut().zip(frame).zip(&self.window) {
                *dst = x * w;
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("FFT buffers are sized by the plan");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = Complex::norm_sqr(c);
            }
            for (first, weights) in &self.filters {
                let energy: f64 = weights
                    .iter()
                    .zip(&power[*first..])
                    .map(|(w, p)| w * p)
                    .sum();
                out.push((energy + self.log_eps).ln() as f32);
            }
        }
        (out, frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_count_follows_center_padding() {
        let mel = MelFrontEnd::new(&AudioConfig::default());
        assert_eq!(mel.frames_for(8000), 1 + 8000 / 128);
        assert_eq!(mel.frames_for(129), 2);
        // Short clips are zero-padded to n_fft/2 + 1 = 129 samples first.
        assert_eq!(mel.frames_for(1), 2);
        assert_eq!(mel.frames_for(0), 2);
        let (v, f) = mel.compute(&[0.5; 10]);
        assert_eq!(f, 2);
        assert_eq!(v.len(), 2 * 40);
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn silence_is_log_eps() {
        let cfg = AudioConfig::default();
        let mel = MelFrontEnd::new(&cfg);
        let (v, _) = mel.compute(&[0.0; 1000]);
        let expected = (cfg.log_eps as f64).ln() as f32;
        assert!(v.iter().all(|x| (x - expected).abs() < 1e-6));
    }

    #[test]
    fn a_tone_lights_up_its_band() {
        let cfg = AudioConfig::default();
        let mel = MelFrontEnd::new(&cfg);
        let tone: Vec<f32> = (0..4000)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 8000.0).sin())
            .collect();
        let (v, frames) = mel.compute(&tone);
        let mid = &v[(frames / 2) * 40..(frames / 2 + 1) * 40];
        let best = (0..40).max_by(|&a, &b| mid[a].total_cmp(&mid[b])).unwrap();
        let m = |f: f64| hz_to_mel_htk(f);
        let step = (m(4000.0) - m(20.0)) / 41.0;
        let expected = ((m(1000.0) - m(20.0)) / step).round() as usize - 1;
        assert!(
            best.abs_diff(expected) <= 1,
            "best band {best}, expected ~{expected}"
        );
    }
}
