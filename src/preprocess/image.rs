//! Image input: PNG/JPEG decoding or a CHW tensor, converted to the model's channel
//! count, resized to its input size with a bilinear (triangle) filter and normalised
//! per channel.

use std::io::Cursor;

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, ImageFormat, ImageReader, Luma};

use crate::error::InputError;
use crate::model::config::ImageConfig;

/// Accepted tensor pixel values: [0, 1] plus a little rounding slack.
const PIXEL_RANGE: std::ops::RangeInclusive<f32> = -1e-3..=1.0 + 1e-3;

/// ITU-R BT.601 luma weights, as PIL's `convert("L")` and torchvision's
/// `rgb_to_grayscale` use (the `image` crate's own conversion uses BT.709 weights).
const LUMA_WEIGHTS: [f32; 3] = [0.299, 0.587, 0.114];

/// The precomputed image settings.
#[derive(Clone, Debug)]
pub(crate) struct ImagePipeline {
    channels: usize,
    height: u32,
    width: u32,
    mean: Vec<f32>,
    std: Vec<f32>,
    max_pixels: u64,
}

/// Pixels in [0, 1], one plane per channel, each `height * width` row-major.
struct Planes {
    height: u32,
    width: u32,
    planes: Vec<Vec<f32>>,
}

impl ImagePipeline {
    pub(crate) fn new(cfg: &ImageConfig, max_pixels: u64) -> Self {
        Self {
            channels: cfg.channels,
            height: cfg.height as u32,
            width: cfg.width as u32,
            mean: cfg.mean.clone(),
            std: cfg.std.clone(),
            max_pixels,
        }
    }

    fn check_pixels(&self, field: &str, height: u64, width: u64) -> Result<(), InputError> {
        let pixels = height.saturating_mul(width);
        if pixels > self.max_pixels {
            return Err(InputError::new(
                field,
                format!(
                    "image is {width}x{height} = {pixels} pixels, over the limit of {} pixels",
                    self.max_pixels
                ),
            ));
        }
        Ok(())
    }

    /// PNG or JPEG bytes to a normalised C x H x W vector. `field` is the path of
    /// the bytes, e.g. `samples[0].image.encoded`.
    pub(crate) fn encoded(&self, field: &str, bytes: &[u8]) -> Result<Vec<f32>, InputError> {
        let err = |message: String| InputError::new(field, message);
        if bytes.is_empty() {
            return Err(err("no image bytes; expected a PNG or JPEG file".into()));
        }
        let format = match image::guess_format(bytes) {
            Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
            Ok(other) => {
                return Err(err(format!(
                    "unsupported image format {other:?}; expected PNG or JPEG"
                )))
            }
            Err(_) => {
                let head = &bytes[..bytes.len().min(8)];
                return Err(err(format!(
                    "unsupported image format: unrecognised signature {head:02x?}; expected PNG or JPEG"
                )));
            }
        };
        let name = if format == ImageFormat::Png {
            "PNG"
        } else {
            "JPEG"
        };
        let undecodable = |e: image::ImageError| err(format!("cannot decode {name} image: {e}"));

        // Header only: refuse a decompression bomb before allocating its pixels.
        let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
            .into_dimensions()
            .map_err(undecodable)?;
        if width == 0 || height == 0 {
            return Err(err(format!(
                "{name} image is {width}x{height}; expected a non-empty image"
            )));
        }
        self.check_pixels(field, height as u64, width as u64)?;

        let decoded = ImageReader::with_format(Cursor::new(bytes), format)
            .decode()
            .map_err(undecodable)?;
        let planes = self.planes_from_image(&decoded);
        Ok(self.finish(planes))
    }

    fn planes_from_image(&self, img: &DynamicImage) -> Planes {
        let (width, height) = (img.width(), img.height());
        let n = width as usize * height as usize;
        let planes = if self.channels == 1 && !img.color().has_color() {
            vec![img.to_luma32f().into_raw()]
        } else {
            let rgb = img.to_rgb32f().into_raw();
            if self.channels == 1 {
                let luma = rgb
                    .chunks_exact(3)
                    .map(|p| {
                        LUMA_WEIGHTS[0] * p[0] + LUMA_WEIGHTS[1] * p[1] + LUMA_WEIGHTS[2] * p[2]
                    })
                    .collect();
                vec![luma]
            } else {
                let mut planes: Vec<Vec<f32>> = (0..3).map(|_| Vec::with_capacity(n)).collect();
                for p in rgb.chunks_exact(3) {
                    for (plane, v) in planes.iter_mut().zip(p) {
                        plane.push(*v);
                    }
                }
                planes
            }
        };
        Planes {
            height,
            width,
            planes,
        }
    }

    /// A C x H x W tensor of pixels in [0, 1] to the normalised model input.
    /// `field` is the tensor's path, e.g. `samples[0].image.tensor`. Values outside
    /// [0, 1] by more than rounding ([`PIXEL_RANGE`]) are refused: they are almost
    /// always 0-255 pixels sent unscaled, which clamping would turn into a white
    /// image. Values within the rounding slack are clamped.
    pub(crate) fn tensor(
        &self,
        field: &str,
        shape: &[usize],
        values: &[f32],
    ) -> Result<Vec<f32>, InputError> {
        let shape_field = format!("{field}.shape");
        let values_field = format!("{field}.values");
        let expected = format!(
            "expected [C, H, W] with C = {} (the model's channels), e.g. [{}, {}, {}]",
            self.channels, self.channels, self.height, self.width
        );
        if shape.len() != 3 {
            return Err(InputError::new(
                shape_field,
                format!("shape {shape:?} has {} dimensions; {expected}", shape.len()),
            ));
        }
        let (c, h, w) = (shape[0], shape[1], shape[2]);
        if c != self.channels {
            return Err(InputError::new(
                shape_field,
                format!("shape {shape:?} has {c} channels; {expected}"),
            ));
        }
        if h == 0 || w == 0 {
            return Err(InputError::new(
                shape_field,
                format!("shape {shape:?} has an empty dimension; {expected}"),
            ));
        }
        self.check_pixels(&shape_field, h as u64, w as u64)?;
        let count = c * h * w; // cannot overflow: h * w <= max_pixels (a u64) and c <= 3
        if values.len() != count {
            return Err(InputError::new(
                values_field,
                format!(
                    "{} values for shape {shape:?}; expected {c} x {h} x {w} = {count}",
                    values.len()
                ),
            ));
        }
        if let Some(i) = values.iter().position(|v| !PIXEL_RANGE.contains(v)) {
            return Err(InputError::new(
                values_field,
                format!(
                    "value at index {i} (channel {}, row {}, column {}) is {}; expected finite pixels in [0, 1] (divide 8-bit pixel values by 255)",
                    i / (h * w),
                    i / w % h,
                    i % w,
                    values[i]
                ),
            ));
        }
        let planes = values
            .chunks_exact(h * w)
            .map(|p| p.iter().map(|v| v.clamp(0.0, 1.0)).collect())
            .collect();
        Ok(self.finish(Planes {
            height: h as u32,
            width: w as u32,
            planes,
        }))
    }

    /// Resizes each plane to the model's size if needed and normalises it.
    fn finish(&self, planes: Planes) -> Vec<f32> {
        let n = self.height as usize * self.width as usize;
        let mut out = Vec::with_capacity(self.channels * n);
        for (c, plane) in planes.planes.into_iter().enumerate() {
            let plane = if (planes.height, planes.width) == (self.height, self.width) {
                plane
            } else {
                let buf: ImageBuffer<Luma<f32>, Vec<f32>> =
                    ImageBuffer::from_raw(planes.width, planes.height, plane)
                        .expect("plane length is width * height");
                imageops::resize(&buf, self.width, self.height, FilterType::Triangle).into_raw()
            };
            let (mean, std) = (self.mean[c], self.std[c]);
            out.extend(plane.iter().map(|v| (v - mean) / std));
        }
        out
    }
}
