//! Preprocessing: one test per kind of bad input (field path + key phrase of the
//! message), and happy paths on real av-digits data (read from
//! `../shared/data/av-digits`, never copied into the repository).

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fusion_serve::error::InputError;
use fusion_serve::model::config::ModelConfig;
use fusion_serve::preprocess::{
    AudioInput, ImageInput, InputLimits, Preprocessor, RawSample, MAX_INPUT_SAMPLE_RATE,
};
use image::{DynamicImage, ImageFormat};

fn limits() -> InputLimits {
    InputLimits {
        max_image_pixels: 512 * 512,
        max_audio_seconds: 5.0,
    }
}

fn pre() -> Preprocessor {
    Preprocessor::new(&ModelConfig::default(), limits()).unwrap()
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/av-digits")
}

fn read_data(rel: &str) -> Vec<u8> {
    let path = data_dir().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the av-digits data must be at ../shared/data/av-digits)",
            path.display()
        )
    })
}

fn png_bytes(img: &DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn grey_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
    png_bytes(&DynamicImage::ImageLuma8(img))
}

fn wav_i16(rate: u32, channels: u16, samples: &[i16]) -> Vec<u8> {
    wav(rate, channels, 16, hound::SampleFormat::Int, samples)
}

/// A 32-bit float WAV; `samples` interleaved by channel.
fn wav_f32(rate: u32, channels: u16, samples: &[f32]) -> Vec<u8> {
    wav(rate, channels, 32, hound::SampleFormat::Float, samples)
}

fn wav<S: hound::Sample + Copy>(
    rate: u32,
    channels: u16,
    bits_per_sample: u16,
    sample_format: hound::SampleFormat,
    samples: &[S],
) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample,
        sample_format,
    };
    let mut cursor = Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    cursor.into_inner()
}

fn tone(n: usize) -> Vec<i16> {
    (0..n)
        .map(|i| ((i as f32 * 0.3).sin() * 12_000.0) as i16)
        .collect()
}

/// A plain WAVE_FORMAT_* header with a custom format code, then `data`.
fn wav_with_format(code: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let align = channels * bits.div_ceil(8);
    let mut v = b"RIFF".to_vec();
    v.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&code.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * align as u32).to_le_bytes());
    v.extend_from_slice(&align.to_le_bytes());
    v.extend_from_slice(&bits.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(data);
    v
}

fn good_image() -> ImageInput {
    ImageInput::Encoded(grey_png(28, 28))
}

fn good_audio() -> AudioInput {
    AudioInput::Wav(wav_i16(8000, 1, &tone(4000)))
}

/// The error of `prepare` for sample `index`, which must fail.
fn fails(p: &Preprocessor, index: usize, image: ImageInput, audio: AudioInput) -> InputError {
    match p.prepare(index, &RawSample { image, audio }) {
        Ok(_) => panic!("sample {index} should have been refused"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_err(e: &InputError, field: &str, phrase: &str) {
    assert_eq!(e.field, field, "field of {e}");
    assert!(
        e.message.contains(phrase),
        "message {:?} lacks {phrase:?}",
        e.message
    );
}

// ---------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------

#[test]
fn wrong_image_tensor_shape() {
    let p = pre();
    let image = ImageInput::Tensor {
        shape: vec![3, 28, 28],
        values: vec![0.5; 3 * 28 * 28],
    };
    let e = fails(&p, 2, image, good_audio());
    assert_err(&e, "samples[2].image.tensor.shape", "has 3 channels");
    assert!(e.message.contains("expected [C, H, W] with C = 1"), "{e}");

    let image = ImageInput::Tensor {
        shape: vec![28, 28],
        values: vec![0.5; 28 * 28],
    };
    let e = fails(&p, 0, image, good_audio());
    assert_err(&e, "samples[0].image.tensor.shape", "has 2 dimensions");
}

#[test]
fn wrong_image_tensor_value_count() {
    let e = fails(
        &pre(),
        1,
        ImageInput::Tensor {
            shape: vec![1, 28, 28],
            values: vec![0.5; 700],
        },
        good_audio(),
    );
    assert_err(&e, "samples[1].image.tensor.values", "700 values");
    assert!(e.message.contains("expected 1 x 28 x 28 = 784"), "{e}");
}

#[test]
fn nan_in_image_tensor() {
    let mut values = vec![0.5; 784];
    values[30] = f32::NAN;
    let e = fails(
        &pre(),
        0,
        ImageInput::Tensor {
            shape: vec![1, 28, 28],
            values,
        },
        good_audio(),
    );
    assert_err(&e, "samples[0].image.tensor.values", "index 30");
    assert!(
        e.message.contains("NaN") && e.message.contains("row 1, column 2"),
        "{e}"
    );
}

#[test]
fn nan_in_features() {
    let mut values = vec![-3.0; 5 * 40];
    values[41] = f32::NAN;
    let e = fails(
        &pre(),
        3,
        good_image(),
        AudioInput::Features {
            shape: vec![5, 40],
            values,
        },
    );
    assert_err(
        &e,
        "samples[3].audio.features.values",
        "index 41 (frame 1, mel band 1) is NaN",
    );
}

#[test]
fn infinity_in_pcm() {
    let mut samples = vec![0.1; 800];
    samples[7] = f32::INFINITY;
    let e = fails(
        &pre(),
        2,
        good_image(),
        AudioInput::Pcm {
            sample_rate: 8000,
            samples,
        },
    );
    assert_err(&e, "samples[2].audio.pcm.samples", "index 7 is inf");
}

#[test]
fn infinity_in_float_wav() {
    // Stereo: the right channel of frame 100 is -inf.
    let samples: Vec<f32> = (0..400)
        .map(|i| if i == 201 { f32::NEG_INFINITY } else { 0.1 })
        .collect();
    let e = fails(
        &pre(),
        0,
        good_image(),
        AudioInput::Wav(wav_f32(8000, 2, &samples)),
    );
    assert_err(
        &e,
        "samples[0].audio.wav",
        "non-finite sample (-inf) at frame 100, channel 1",
    );
}

#[test]
fn unscaled_float_wav_is_refused() {
    let samples: Vec<f32> = (0..200)
        .map(|i| if i == 50 { 12000.0 } else { 0.1 })
        .collect();
    let e = fails(
        &pre(),
        1,
        good_image(),
        AudioInput::Wav(wav_f32(8000, 1, &samples)),
    );
    assert_err(
        &e,
        "samples[1].audio.wav",
        "sample 12000 at frame 50, channel 0 is outside [-1, 1]",
    );
}

#[test]
fn empty_modality_data() {
    let p = pre();
    let e = fails(&p, 0, ImageInput::Encoded(Vec::new()), good_audio());
    assert_err(&e, "samples[0].image.encoded", "no image bytes");

    let e = fails(&p, 1, good_image(), AudioInput::Wav(Vec::new()));
    assert_err(&e, "samples[1].audio.wav", "empty audio");

    let empty = AudioInput::Pcm {
        sample_rate: 8000,
        samples: Vec::new(),
    };
    let e = fails(&p, 2, good_image(), empty);
    assert_err(&e, "samples[2].audio.pcm.samples", "empty audio: 0 samples");

    // A well-formed WAV whose data chunk is empty.
    let e = fails(&p, 3, good_image(), AudioInput::Wav(wav_i16(8000, 1, &[])));
    assert_err(&e, "samples[3].audio.wav", "empty audio: 0 samples");

    let no_frames = AudioInput::Features {
        shape: vec![0, 40],
        values: Vec::new(),
    };
    let e = fails(&p, 4, good_image(), no_frames);
    assert_err(&e, "samples[4].audio.features.shape", "0 frames");

    let e = fails(
        &p,
        5,
        ImageInput::Tensor {
            shape: vec![1, 0, 28],
            values: Vec::new(),
        },
        good_audio(),
    );
    assert_err(&e, "samples[5].image.tensor.shape", "empty dimension");
}

#[test]
fn undecodable_image() {
    let p = pre();
    let e = fails(
        &p,
        0,
        ImageInput::Encoded(b"hello, not an image".to_vec()),
        good_audio(),
    );
    assert_err(&e, "samples[0].image.encoded", "unsupported image format");
    assert!(e.message.contains("expected PNG or JPEG"), "{e}");

    // A GIF is recognised but not supported.
    let e = fails(
        &p,
        1,
        ImageInput::Encoded(b"GIF89a\x01\x00\x01\x00".to_vec()),
        good_audio(),
    );
    assert_err(
        &e,
        "samples[1].image.encoded",
        "unsupported image format Gif",
    );

    // PNG signature, garbage after it.
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(&[0x55; 64]);
    let e = fails(&p, 2, ImageInput::Encoded(bytes), good_audio());
    assert_err(&e, "samples[2].image.encoded", "cannot decode PNG image");
}

#[test]
fn truncated_png() {
    let png = grey_png(64, 64);
    let e = fails(
        &pre(),
        1,
        ImageInput::Encoded(png[..png.len() / 2].to_vec()),
        good_audio(),
    );
    assert_err(&e, "samples[1].image.encoded", "cannot decode PNG image");
}

#[test]
fn truncated_jpeg_header() {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageLuma8(image::GrayImage::new(40, 40))
        .write_to(&mut out, ImageFormat::Jpeg)
        .unwrap();
    let jpeg = out.into_inner();
    let e = fails(
        &pre(),
        0,
        ImageInput::Encoded(jpeg[..20].to_vec()),
        good_audio(),
    );
    assert_err(&e, "samples[0].image.encoded", "cannot decode JPEG image");
}

#[test]
fn unsupported_wav() {
    let p = pre();
    let e = fails(
        &p,
        0,
        good_image(),
        AudioInput::Wav(b"OggS\0\x02 not a wave file".to_vec()),
    );
    assert_err(
        &e,
        "samples[0].audio.wav",
        "unsupported WAV format: not a RIFF/WAVE file",
    );

    let alaw = wav_with_format(6, 1, 8000, 8, &[0xd5; 800]);
    let e = fails(&p, 1, good_image(), AudioInput::Wav(alaw));
    assert_err(
        &e,
        "samples[1].audio.wav",
        "unsupported WAV format: format code 0x0006 (A-law)",
    );

    let adpcm = wav_with_format(2, 1, 8000, 4, &[0; 800]);
    let e = fails(&p, 2, good_image(), AudioInput::Wav(adpcm));
    assert_err(&e, "samples[2].audio.wav", "(Microsoft ADPCM)");

    let mut avi = wav_i16(8000, 1, &tone(100));
    avi[8..12].copy_from_slice(b"AVI ");
    let e = fails(&p, 3, good_image(), AudioInput::Wav(avi));
    assert_err(
        &e,
        "samples[3].audio.wav",
        "unsupported WAV format: a RIFF file of type \"AVI \"",
    );
}

#[test]
fn truncated_wav() {
    let p = pre();
    let wav = wav_i16(8000, 1, &tone(4000));
    let e = fails(
        &p,
        0,
        good_image(),
        AudioInput::Wav(wav[..wav.len() - 1001].to_vec()),
    );
    assert_err(
        &e,
        "samples[0].audio.wav",
        "truncated WAV: the data chunk declares 8000 bytes",
    );

    // Cut inside the header.
    let e = fails(&p, 1, good_image(), AudioInput::Wav(wav[..30].to_vec()));
    assert_err(&e, "samples[1].audio.wav", "truncated WAV");

    // Every cut is an error, never a panic.
    for cut in 1..wav.len() - 1 {
        let e = p
            .prepare_audio(0, &AudioInput::Wav(wav[..cut].to_vec()))
            .unwrap_err();
        assert!(e.message.starts_with("truncated WAV"), "cut {cut}: {e}");
    }
}

#[test]
fn over_the_pixel_limit() {
    let p = Preprocessor::new(
        &ModelConfig::default(),
        InputLimits {
            max_image_pixels: 4096,
            max_audio_seconds: 5.0,
        },
    )
    .unwrap();
    let e = fails(&p, 0, ImageInput::Encoded(grey_png(100, 50)), good_audio());
    assert_err(
        &e,
        "samples[0].image.encoded",
        "100x50 = 5000 pixels, over the limit of 4096",
    );

    let e = fails(
        &p,
        1,
        ImageInput::Tensor {
            shape: vec![1, 100, 50],
            values: vec![0.0; 5000],
        },
        good_audio(),
    );
    assert_err(
        &e,
        "samples[1].image.tensor.shape",
        "over the limit of 4096",
    );
}

/// A PNG whose header claims 100000 x 100000 pixels but holds a few bytes of data
/// (a decompression bomb) is refused from its header, before any pixel is decoded.
#[test]
fn pixel_limit_is_checked_before_decoding() {
    let mut png = grey_png(8, 8);
    // IHDR: 8-byte signature, length, "IHDR", width, height, ..., CRC over type + data.
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let e = fails(&pre(), 0, ImageInput::Encoded(png), good_audio());
    assert_err(
        &e,
        "samples[0].image.encoded",
        "100000x100000 = 10000000000 pixels, over the limit of 262144",
    );
}

#[test]
fn over_the_audio_seconds_limit() {
    let p = pre(); // 5 s
    let e = fails(
        &p,
        0,
        good_image(),
        AudioInput::Wav(wav_i16(8000, 1, &tone(48_000))),
    );
    assert_err(
        &e,
        "samples[0].audio.wav",
        "6.000 s long (48000 samples at 8000 Hz), over the limit of 5 s",
    );

    // The header's duration is checked before the data: a file declaring an hour of
    // audio but cut short is refused as too long, not read.
    let mut wav = wav_i16(8000, 1, &tone(100));
    let declared = 8000u32 * 3600 * 2;
    wav[40..44].copy_from_slice(&declared.to_le_bytes());
    let e = fails(&p, 1, good_image(), AudioInput::Wav(wav));
    assert_err(&e, "samples[1].audio.wav", "3600.000 s long");

    let long = AudioInput::Pcm {
        sample_rate: 16_000,
        samples: vec![0.0; 16_000 * 5 + 1],
    };
    let e = fails(&p, 2, good_image(), long);
    assert_err(&e, "samples[2].audio.pcm.samples", "over the limit of 5 s");

    // Features are bounded by the frames 5 s of audio give: 1 + 40000 / 128 = 313.
    let too_many = AudioInput::Features {
        shape: vec![314, 40],
        values: vec![0.0; 314 * 40],
    };
    let e = fails(&p, 3, good_image(), too_many);
    assert_err(
        &e,
        "samples[3].audio.features.shape",
        "314 frames is over the limit of 313",
    );
}

#[test]
fn wrong_n_mels_in_features() {
    let e = fails(
        &pre(),
        1,
        good_image(),
        AudioInput::Features {
            shape: vec![10, 64],
            values: vec![0.0; 640],
        },
    );
    assert_err(
        &e,
        "samples[1].audio.features.shape",
        "has 64 mel bands, the model uses 40",
    );

    let e = fails(
        &pre(),
        0,
        good_image(),
        AudioInput::Features {
            shape: vec![10, 40],
            values: vec![0.0; 399],
        },
    );
    assert_err(
        &e,
        "samples[0].audio.features.values",
        "399 values for shape [10, 40]; expected 10 x 40 = 400",
    );
}

#[test]
fn zero_sample_rate() {
    let p = pre();
    let zero = AudioInput::Pcm {
        sample_rate: 0,
        samples: vec![0.0; 100],
    };
    let e = fails(&p, 3, good_image(), zero);
    assert_err(
        &e,
        "samples[3].audio.pcm.sample_rate",
        "sample rate is 0 Hz",
    );

    let wav = wav_with_format(1, 1, 0, 16, &[0; 200]);
    let e = fails(&p, 0, good_image(), AudioInput::Wav(wav));
    assert_err(
        &e,
        "samples[0].audio.wav",
        "invalid WAV: the header declares a sample rate of 0 Hz",
    );

    let absurd = AudioInput::Pcm {
        sample_rate: MAX_INPUT_SAMPLE_RATE + 1,
        samples: vec![0.0; 100],
    };
    let e = fails(&p, 1, good_image(), absurd);
    assert_err(
        &e,
        "samples[1].audio.pcm.sample_rate",
        "above the supported maximum",
    );
}

#[test]
fn image_errors_come_before_audio_errors() {
    let e = fails(
        &pre(),
        0,
        ImageInput::Encoded(vec![1, 2, 3]),
        AudioInput::Wav(vec![1, 2, 3]),
    );
    assert_eq!(e.field, "samples[0].image.encoded");
}

// ---------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------

#[test]
fn real_fsdd_wav_gives_one_frame_per_hop() {
    let p = pre();
    for name in ["0_jackson_0.wav", "7_theo_3.wav", "4_nicolas_12.wav"] {
        let bytes = read_data(&format!("fsdd/{name}"));
        // The number of samples from the header: 16-bit mono, data after 44 bytes
        // in FSDD files, but read it the portable way.
        let len = hound::WavReader::new(Cursor::new(&bytes))
            .unwrap()
            .duration() as usize;
        let sample = RawSample {
            image: good_image(),
            audio: AudioInput::Wav(bytes),
        };
        let prepared = p.prepare(7, &sample).unwrap();
        assert_eq!(prepared.frames, 1 + len / 128, "{name}");
        assert_eq!(prepared.audio.len(), prepared.frames * 40);
        assert!(prepared.audio.iter().all(|v| v.is_finite()));
        // Speech is well above the log floor somewhere.
        let max = prepared.audio.iter().cloned().fold(f32::MIN, f32::max);
        assert!(max > 0.0, "{name}: max log-mel {max}");
        // The same as log_mel of the decoded waveform.
        let mono = p.waveform(7, &sample.audio).unwrap().unwrap();
        assert_eq!(mono.len(), len);
        assert_eq!(p.log_mel(&mono), (prepared.audio, prepared.frames));
    }
}

/// Reads image `index` of the MNIST test set (gzipped IDX) as 28x28 bytes.
fn mnist_image(index: usize) -> Vec<u8> {
    let gz = read_data("mnist/t10k-images-idx3-ubyte.gz");
    let mut idx = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut idx)
        .unwrap();
    assert_eq!(u32::from_be_bytes(idx[0..4].try_into().unwrap()), 0x0803);
    let (rows, cols) = (
        u32::from_be_bytes(idx[8..12].try_into().unwrap()) as usize,
        u32::from_be_bytes(idx[12..16].try_into().unwrap()) as usize,
    );
    assert_eq!((rows, cols), (28, 28));
    let start = 16 + index * 784;
    idx[start..start + 784].to_vec()
}

#[test]
fn real_mnist_digit_decodes() {
    let p = pre();
    let pixels = mnist_image(0);
    let png = png_bytes(&DynamicImage::ImageLuma8(
        image::GrayImage::from_raw(28, 28, pixels.clone()).unwrap(),
    ));
    let from_png = p.prepare_image(0, &ImageInput::Encoded(png)).unwrap();
    assert_eq!(from_png.len(), 32 * 32);
    let (lo, hi) = from_png
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    // Background is 0 -> (0 - 0.1307) / 0.3081; strokes reach near 1 -> ~2.82.
    assert!((lo - (-0.1307 / 0.3081)).abs() < 1e-5, "min {lo}");
    assert!(hi > 2.5 && hi <= (1.0 - 0.1307) / 0.3081 + 1e-5, "max {hi}");
    // The corners are background; the middle has ink.
    assert!((from_png[0] - lo).abs() < 1e-6);
    let ink = from_png.iter().filter(|&&v| v > 0.0).count();
    assert!((50..600).contains(&ink), "{ink} inked pixels");

    // The same digit sent as a [1, 28, 28] tensor in [0, 1] gives the same input.
    let tensor = ImageInput::Tensor {
        shape: vec![1, 28, 28],
        values: pixels.iter().map(|&b| b as f32 / 255.0).collect(),
    };
    let from_tensor = p.prepare_image(0, &tensor).unwrap();
    let diff = from_png
        .iter()
        .zip(&from_tensor)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "PNG vs tensor: {diff}");
}

#[test]
fn colour_images_convert_to_the_models_channels() {
    // Pure red RGBA (with alpha dropped): luma = 0.299 (BT.601, as PIL/torchvision).
    let red = image::RgbaImage::from_pixel(32, 32, image::Rgba([255, 0, 0, 7]));
    let png = png_bytes(&DynamicImage::ImageRgba8(red));
    let grey = pre()
        .prepare_image(0, &ImageInput::Encoded(png.clone()))
        .unwrap();
    let expected = (0.299 - 0.1307) / 0.3081;
    assert!(
        grey.iter().all(|v| (v - expected).abs() < 1e-5),
        "{}",
        grey[0]
    );

    // A 3-channel model keeps the channels, CHW, each with its own mean/std.
    let mut cfg = ModelConfig::default();
    cfg.image.channels = 3;
    cfg.image.height = 16;
    cfg.image.width = 24;
    cfg.image.mean = vec![0.485, 0.456, 0.406];
    cfg.image.std = vec![0.229, 0.224, 0.225];
    let p3 = Preprocessor::new(&cfg, limits()).unwrap();
    let rgb = p3.prepare_image(0, &ImageInput::Encoded(png)).unwrap();
    assert_eq!(rgb.len(), 3 * 16 * 24);
    for (c, v) in [(0, 1.0f32), (1, 0.0), (2, 0.0)] {
        let want = (v - cfg.image.mean[c]) / cfg.image.std[c];
        let plane = &rgb[c * 384..(c + 1) * 384];
        assert!(plane.iter().all(|x| (x - want).abs() < 1e-5), "channel {c}");
    }

    // A greyscale JPEG to a 3-channel model: replicated channels.
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageLuma8(image::GrayImage::from_pixel(40, 30, image::Luma([128])))
        .write_to(&mut out, ImageFormat::Jpeg)
        .unwrap();
    let jpeg = p3
        .prepare_image(0, &ImageInput::Encoded(out.into_inner()))
        .unwrap();
    for c in 0..3 {
        let want = (128.0 / 255.0 - cfg.image.mean[c]) / cfg.image.std[c];
        let got = jpeg[c * 384 + 200];
        assert!((got - want).abs() < 0.05, "channel {c}: {got} vs {want}");
    }
}

#[test]
fn tensor_values_outside_unit_range_are_refused_rounding_is_not() {
    let p = pre();
    let mut pixels = vec![0.5; 1024];
    pixels[33] = 255.0; // 8-bit pixels sent unscaled
    let e = p
        .prepare_image(
            3,
            &ImageInput::Tensor {
                shape: vec![1, 32, 32],
                values: pixels,
            },
        )
        .unwrap_err();
    assert_err(
        &e,
        "samples[3].image.tensor.values",
        "index 33 (channel 0, row 1, column 1) is 255; expected finite pixels in [0, 1] (divide 8-bit",
    );
    let rounded = ImageInput::Tensor {
        shape: vec![1, 32, 32],
        values: vec![1.000_000_1; 1024],
    };
    let at_one = ImageInput::Tensor {
        shape: vec![1, 32, 32],
        values: vec![1.0; 1024],
    };
    assert_eq!(
        p.prepare_image(0, &rounded).unwrap(),
        p.prepare_image(0, &at_one).unwrap()
    );
}

#[test]
fn wav_sample_formats_agree() {
    let p = pre();
    let reference = p
        .waveform(0, &AudioInput::Wav(wav_i16(8000, 1, &tone(800))))
        .unwrap()
        .unwrap();

    // 24 valid bits in a 32-bit WAVE_FORMAT_EXTENSIBLE container: the valid bits are
    // the high three bytes (hound 3.5 would read the low three).
    let mut data = Vec::new();
    for s in tone(800) {
        data.extend_from_slice(&((s as i32) << 16).to_le_bytes());
    }
    let mut v = b"RIFF".to_vec();
    v.extend_from_slice(&(60 + data.len() as u32).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&40u32.to_le_bytes());
    v.extend_from_slice(&0xFFFEu16.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // channels
    v.extend_from_slice(&8000u32.to_le_bytes());
    v.extend_from_slice(&32000u32.to_le_bytes());
    v.extend_from_slice(&4u16.to_le_bytes()); // block align
    v.extend_from_slice(&32u16.to_le_bytes()); // container bits
    v.extend_from_slice(&22u16.to_le_bytes()); // cbSize
    v.extend_from_slice(&24u16.to_le_bytes()); // valid bits
    v.extend_from_slice(&4u32.to_le_bytes()); // channel mask
    v.extend_from_slice(&[
        1, 0, 0, 0, 0, 0, 0x10, 0, 0x80, 0, 0, 0xAA, 0, 0x38, 0x9B, 0x71,
    ]);
    v.extend_from_slice(b"fact");
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&800u32.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(&data);
    let ext = p.waveform(0, &AudioInput::Wav(v)).unwrap().unwrap();
    assert_eq!(ext, reference);

    // 8-bit unsigned: the same tone within 8-bit quantisation.
    let eight: Vec<u8> = tone(800)
        .iter()
        .map(|&s| ((s as f32 / 256.0).round() as i32 + 128) as u8)
        .collect();
    let wav8 = wav_with_format(1, 1, 8000, 8, &eight);
    let w8 = p.waveform(0, &AudioInput::Wav(wav8)).unwrap().unwrap();
    let worst = w8
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 1.0 / 256.0 + 1e-6, "8-bit: {worst}");
}

#[test]
fn very_short_clips_still_give_a_frame() {
    let p = pre();
    for n in [1usize, 10, 128, 129] {
        let (mel, frames) = p
            .prepare_audio(
                0,
                &AudioInput::Pcm {
                    sample_rate: 8000,
                    samples: vec![0.3; n],
                },
            )
            .unwrap();
        assert!(frames >= 1);
        assert_eq!(frames, 1 + n.max(129) / 128, "n = {n}");
        assert_eq!(mel.len(), frames * 40);
    }
    // One sample at 44.1 kHz rounds to no sample at 8 kHz: still a (silent) frame.
    let (_, frames) = p
        .prepare_audio(
            0,
            &AudioInput::Pcm {
                sample_rate: 44_100,
                samples: vec![0.3],
            },
        )
        .unwrap();
    assert_eq!(frames, 2);
}

#[test]
fn features_are_used_as_is() {
    let values: Vec<f32> = (0..3 * 40).map(|i| i as f32 * 0.01 - 0.5).collect();
    let (got, frames) = pre()
        .prepare_audio(
            0,
            &AudioInput::Features {
                shape: vec![3, 40],
                values: values.clone(),
            },
        )
        .unwrap();
    assert_eq!((got, frames), (values, 3));
}

#[test]
fn one_preprocessor_serves_many_threads() {
    let p = Arc::new(pre());
    let wav = wav_i16(22_050, 2, &tone(2 * 11_025));
    let expected = p
        .prepare(
            0,
            &RawSample {
                image: good_image(),
                audio: AudioInput::Wav(wav.clone()),
            },
        )
        .unwrap();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (p, wav, expected) = (p.clone(), wav.clone(), expected.clone());
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let s = RawSample {
                        image: good_image(),
                        audio: AudioInput::Wav(wav.clone()),
                    };
                    assert_eq!(p.prepare(i, &s).unwrap(), expected);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(expected.frames, 1 + 4000 / 128);
}
