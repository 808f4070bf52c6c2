//! The run's examples, held preprocessed in memory: label checking, the validation
//! split, shuffled batches, augmentation and collation into tensors.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::error::InputError;
use crate::model::config::{ModelConfig, Task};
use crate::preprocess::PreparedSample;
use crate::proto;

use super::settings::Augment;

/// What an example should produce.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Multiclass: the class index.
    Class(usize),
    /// Multilabel/binary: the positive outputs.
    Labels(Vec<usize>),
}

/// One preprocessed, labelled example.
#[derive(Clone, Debug)]
pub struct Example {
    pub sample: PreparedSample,
    pub target: Target,
    /// Marked by the client as a validation example.
    pub validation: bool,
}

impl Example {
    /// Bytes this example holds in memory (what the memory limit counts).
    pub fn bytes(&self) -> usize {
        let labels = match &self.target {
            Target::Class(_) => 0,
            Target::Labels(l) => l.len() * std::mem::size_of::<usize>(),
        };
        (self.sample.image.len() + self.sample.audio.len()) * std::mem::size_of::<f32>()
            + labels
            + std::mem::size_of::<Self>()
    }
}

/// Checks the label of `examples[index]` against the model's task and labels.
pub fn target(
    index: usize,
    e: &proto::TrainExample,
    model: &ModelConfig,
) -> Result<Target, InputError> {
    let n = model.labels.len();
    let field = |f: &str| format!("examples[{index}].{f}");
    let by_name = |f: &str, name: &str| -> Result<usize, InputError> {
        model.labels.iter().position(|l| l == name).ok_or_else(|| {
            InputError::new(
                field(f),
                format!(
                    "unknown label {name:?}; the model's labels are {:?}",
                    model.labels
                ),
            )
        })
    };
    let check_index = |f: &str, i: u32| -> Result<usize, InputError> {
        if (i as usize) < n {
            Ok(i as usize)
        } else {
            Err(InputError::new(
                field(f),
                format!(
                    "label index {i} is out of range: the model has {n} outputs (0 to {})",
                    n - 1
                ),
            ))
        }
    };
    match model.task {
        Task::Multiclass => {
            if !e.label_indices.is_empty() || !e.label_names.is_empty() {
                return Err(InputError::new(
                    field("label_indices"),
                    "a multiclass model takes one label: set label_index or label_name",
                ));
            }
            match (e.label_index, e.label_name.is_empty()) {
                (Some(_), false) => Err(InputError::new(
                    field("label_name"),
                    "set label_index or label_name, not both",
                )),
                (Some(i), true) => Ok(Target::Class(check_index("label_index", i)?)),
                (None, false) => Ok(Target::Class(by_name("label_name", &e.label_name)?)),
                (None, true) => Err(InputError::new(
                    field("label_index"),
                    "missing: set label_index or label_name",
                )),
            }
        }
        Task::Multilabel | Task::Binary => {
            if e.label_index.is_some() || !e.label_name.is_empty() {
                return Err(InputError::new(
                    field("label_index"),
                    format!(
                        "a {} model takes a set of labels: use label_indices or label_names",
                        model.task
                    ),
                ));
            }
            let mut out = Vec::new();
            for (j, &i) in e.label_indices.iter().enumerate() {
                out.push(check_index(&format!("label_indices[{j}]"), i)?);
            }
            for (j, name) in e.label_names.iter().enumerate() {
                out.push(by_name(&format!("label_names[{j}]"), name)?);
            }
            out.sort_unstable();
            out.dedup();
            Ok(Target::Labels(out))
        }
    }
}

/// Renames a preprocessing error's field from Predict's `samples[i]` to
/// `examples[i].sample`.
pub fn example_field(index: usize, mut e: InputError) -> InputError {
    let from = format!("samples[{index}]");
    if let Some(rest) = e.field.strip_prefix(&from) {
        e.field = format!("examples[{index}].sample{rest}");
    }
    e
}

/// Splits examples into (train, validation): the ones the client marked, or, if none
/// is marked, a seeded random `fraction` of them (at least one when the fraction is
/// positive and there are at least two examples).
pub fn split(examples: Vec<Example>, fraction: f32, seed: u64) -> (Vec<Example>, Vec<Example>) {
    if examples.iter().any(|e| e.validation) {
        return examples.into_iter().partition(|e| !e.validation);
    }
    if fraction <= 0.0 || examples.len() < 2 {
        return (examples, Vec::new());
    }
    let n_val =
        ((examples.len() as f64 * fraction as f64).round() as usize).clamp(1, examples.len() - 1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5eed_5a11));
    let mut is_val = vec![false; examples.len()];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let mut train = Vec::with_capacity(examples.len() - n_val);
    let mut val = Vec::with_capacity(n_val);
    for (e, v) in examples.into_iter().zip(is_val) {
        if v {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    (train, val)
}

/// One epoch's micro-batches: a seeded shuffle cut into `batch_size` pieces. A last
/// piece of one example joins the one before it (batch norm needs two).
pub fn batches(n: usize, batch_size: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut out: Vec<Vec<usize>> = order.chunks(batch_size).map(|c| c.to_vec()).collect();
    if out.len() > 1 && out.last().is_some_and(|b| b.len() < 2) {
        let last = out.pop().unwrap_or_default();
        if let Some(prev) = out.last_mut() {
            prev.extend(last);
        }
    }
    out
}

/// A batch as the model's tensors and the loss's targets.
pub struct Batch {
    pub images: Tensor,
    pub audio: Tensor,
    pub lengths: Vec<usize>,
    /// `(B,)` u32 class indices (cross-entropy) or `(B, K)` f32 0/1 (BCE).
    pub targets: Tensor,
    pub classes: Vec<Option<usize>>,
}

/// Collates `examples`, augmenting each with `augment` when `rng` is given.
pub fn collate(
    examples: &[&Example],
    model: &ModelConfig,
    one_hot: bool,
    augment: Option<(&Augment, &mut StdRng)>,
    device: &Device,
) -> candle_core::Result<Batch> {
    let owned: Vec<PreparedSample>;
    let samples: Vec<&PreparedSample> = match augment {
        Some((a, rng)) if !a.is_off() => {
            owned = examples
                .iter()
                .map(|e| augmented(&e.sample, a, model, rng))
                .collect();
            owned.iter().collect()
        }
        _ => examples.iter().map(|e| &e.sample).collect(),
    };
    let c = crate::engine::collate(&samples, model, device)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let k = model.labels.len();
    let b = examples.len();
    let targets = if one_hot {
        let mut t = vec![0f32; b * k];
        for (i, e) in examples.iter().enumerate() {
            match &e.target {
                Target::Class(c) => t[i * k + c] = 1.0,
                Target::Labels(l) => l.iter().for_each(|&c| t[i * k + c] = 1.0),
            }
        }
        Tensor::from_vec(t, (b, k), device)?
    } else {
        let t: Vec<u32> = examples
            .iter()
            .map(|e| match &e.target {
                Target::Class(c) => *c as u32,
                Target::Labels(l) => l.first().copied().unwrap_or(0) as u32,
            })
            .collect();
        Tensor::from_vec(t, b, device)?
    };
    Ok(Batch {
        images: c.images,
        audio: c.audio,
        lengths: c.lengths,
        targets,
        classes: examples
            .iter()
            .map(|e| match e.target {
                Target::Class(c) => Some(c),
                Target::Labels(_) => None,
            })
            .collect(),
    })
}

/// A randomly changed copy of `s`. Images shift by whole pixels (the uncovered border
/// takes the image's smallest value, the background of a normalised digit). Audio is
/// changed in the log-mel domain: a gain `g` adds `2 ln g` to every value; a time
/// shift moves frames (filling with the clip's quietest frame value); white noise of
/// standard deviation `s` adds its expected power per band, `s^2 * n_fft * 3/8` (a
/// periodic Hann window's energy), to `exp(x)`. Modality dropout, applied last,
/// replaces the image by a black one or the audio by silence (same number of frames):
/// what a client sends when it has only the other modality.
pub fn augmented(
    s: &PreparedSample,
    a: &Augment,
    model: &ModelConfig,
    rng: &mut StdRng,
) -> PreparedSample {
    let mut out = s.clone();
    let (c, h, w) = (model.image.channels, model.image.height, model.image.width);
    let m = a.image_max_shift_pixels as isize;
    if m > 0 && out.image.len() == c * h * w {
        let (dy, dx) = (
            rng.random_range(-m as i64..=m as i64) as isize,
            rng.random_range(-m as i64..=m as i64) as isize,
        );
        let fill = s.image.iter().copied().fold(f32::INFINITY, f32::min);
        for ch in 0..c {
            for y in 0..h as isize {
                for x in 0..w as isize {
                    let (sy, sx) = (y - dy, x - dx);
                    let v = if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                        s.image[ch * h * w + sy as usize * w + sx as usize]
                    } else {
                        fill
                    };
                    out.image[ch * h * w + y as usize * w + x as usize] = v;
                }
            }
        }
    }
    let n_mels = model.audio.n_mels;
    if a.audio_gain > 0.0 {
        let g: f32 = rng.random_range(1.0 - a.audio_gain..=1.0 + a.audio_gain);
        let add = 2.0 * g.max(1e-6).ln();
        out.audio.iter_mut().for_each(|v| *v += add);
    }
    let max_shift = (a.audio_max_shift_seconds * model.audio.sample_rate as f32
        / model.audio.hop_length as f32)
        .round() as isize;
    if max_shift > 0 && out.frames > 0 {
        let shift = rng.random_range(-max_shift as i64..=max_shift as i64) as isize;
        let fill = out.audio.iter().copied().fold(f32::INFINITY, f32::min);
        let src = out.audio.clone();
        let t = out.frames as isize;
        for f in 0..t {
            let sf = f - shift;
            for b in 0..n_mels {
                out.audio[f as usize * n_mels + b] = if sf >= 0 && sf < t {
                    src[sf as usize * n_mels + b]
                } else {
                    fill
                };
            }
        }
    }
    if a.audio_noise_std > 0.0 {
        let power = a.audio_noise_std.powi(2) * model.audio.n_fft as f32 * 0.375;
        let jitter = Normal::new(1.0f32, 0.1).ok();
        let eps = model.audio.log_eps;
        out.audio.iter_mut().for_each(|v| {
            let j = jitter.map_or(1.0, |d| d.sample(rng).max(0.0));
            *v = (((*v).exp() - eps).max(0.0) + power * j + eps).ln();
        });
    }
    if a.modality_dropout > 0.0 && rng.random_bool(f64::from(a.modality_dropout)) {
        if rng.random_bool(0.5) {
            // A black image: pixel 0 normalised, per channel.
            let plane = h * w;
            for (ch, values) in out.image.chunks_mut(plane).enumerate().take(c) {
                values.fill((0.0 - model.image.mean[ch]) / model.image.std[ch]);
            }
        } else {
            out.audio.fill(model.audio.log_eps.ln());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(label: usize, validation: bool) -> Example {
        Example {
            sample: PreparedSample {
                image: vec![0.0; 4],
                audio: vec![0.0; 6],
                frames: 3,
            },
            target: Target::Class(label),
            validation,
        }
    }

    #[test]
    fn labels_are_checked_and_named() {
        let m = ModelConfig::default();
        let e = proto::TrainExample {
            label_index: Some(10),
            ..Default::default()
        };
        let err = target(4, &e, &m).unwrap_err();
        assert_eq!(err.field, "examples[4].label_index");
        let e = proto::TrainExample {
            label_name: "eleven".into(),
            ..Default::default()
        };
        assert_eq!(
            target(2, &e, &m).unwrap_err().field,
            "examples[2].label_name"
        );
        let e = proto::TrainExample {
            label_name: "7".into(),
            ..Default::default()
        };
        assert_eq!(target(0, &e, &m).unwrap(), Target::Class(7));
        let e = proto::TrainExample::default();
        assert!(target(0, &e, &m).is_err());
    }

    #[test]
    fn split_prefers_marked_examples_else_a_seeded_fraction() {
        let marked = vec![ex(0, false), ex(1, true), ex(2, false)];
        let (t, v) = split(marked, 0.5, 1);
        assert_eq!((t.len(), v.len()), (2, 1));
        let all: Vec<Example> = (0..10).map(|i| ex(i % 3, false)).collect();
        let (t, v) = split(all.clone(), 0.2, 7);
        assert_eq!((t.len(), v.len()), (8, 2));
        let (t2, _) = split(all, 0.2, 7);
        let key = |x: &Vec<Example>| x.iter().map(|e| e.target.clone()).collect::<Vec<_>>();
        assert_eq!(key(&t), key(&t2));
    }

    #[test]
    fn no_batch_of_one() {
        let mut rng = StdRng::seed_from_u64(0);
        let b = batches(9, 4, &mut rng);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![4, 5]);
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn modality_dropout_blanks_one_modality_like_a_client_would() {
        let m = ModelConfig::default();
        let (pixels, n_mels, frames) = (m.image.height * m.image.width, m.audio.n_mels, 5);
        let s = PreparedSample {
            image: (0..pixels).map(|i| i as f32 / pixels as f32).collect(),
            audio: (0..frames * n_mels).map(|i| i as f32).collect(),
            frames,
        };
        // What preprocessing makes of a black image and of silence.
        let black = (0.0 - m.image.mean[0]) / m.image.std[0];
        let silence = m.audio.log_eps.ln();
        let a = Augment {
            modality_dropout: 0.5,
            ..Augment::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        let (mut images, mut audios, mut kept) = (0, 0, 0);
        for _ in 0..400 {
            let o = augmented(&s, &a, &m, &mut rng);
            assert_eq!(o.frames, frames);
            let image_blank = o.image.iter().all(|&v| v == black);
            let audio_blank = o.audio.iter().all(|&v| v == silence);
            assert!(!(image_blank && audio_blank), "never both");
            match (image_blank, audio_blank) {
                (true, _) => images += 1,
                (_, true) => audios += 1,
                _ => {
                    assert_eq!((&o.image, &o.audio), (&s.image, &s.audio));
                    kept += 1;
                }
            }
        }
        // 400 draws at p = 0.5, each modality half of the blanked ones.
        assert!((150..250).contains(&kept), "kept {kept}");
        assert!((60..140).contains(&images) && (60..140).contains(&audios));
    }

    #[test]
    fn field_paths_are_renamed() {
        let e = example_field(3, InputError::new("samples[3].audio.wav", "bad"));
        assert_eq!(e.field, "examples[3].sample.audio.wav");
    }
}
