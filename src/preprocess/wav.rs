//! A strict, allocation-bounded RIFF/WAVE reader for client uploads.
//!
//! Why not `hound::WavReader` (hound 3.5.1 is still used to *write* WAVs in tests):
//! - it does not skip the pad byte after an odd-sized chunk (RIFF chunks are
//!   word-aligned), so a valid file with, say, a 7-byte `LIST` chunk before `data`
//!   is misread as a truncated one;
//! - for `WAVE_FORMAT_EXTENSIBLE` with 24 valid bits in a 32-bit container it takes the
//!   *low* three bytes, while the format puts the valid bits in the high ones;
//!   20-bit-in-24 and similar files are refused;
//! - a data chunk shorter than declared only shows up as a per-sample
//!   `"Failed to read enough bytes."` io error, and every non-PCM format code is the
//!   same bare `Unsupported`, without saying which format it was.
//!
//! This reader parses the header itself, checks the declared duration before
//! touching the samples, and turns every problem into one of three messages:
//! `truncated WAV: ...`, `unsupported WAV format: ...` or `invalid WAV: ...`.

/// What the header says, before any sample is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WavInfo {
    pub channels: u16,
    pub sample_rate: u32,
    /// Sample frames (one sample per channel) in the data chunk.
    pub frames: u64,
    pub encoding: Encoding,
}

/// How one sample is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Little-endian signed integers in a `container_bytes` container (8-bit is
    /// unsigned, offset 128). Valid bits are the high ones, so the value is scaled by
    /// the container width.
    Int {
        container_bytes: u16,
        valid_bits: u16,
    },
    /// IEEE float, 4 or 8 bytes.
    Float { bytes: u16 },
}

impl WavInfo {
    pub fn duration_seconds(&self) -> f64 {
        self.frames as f64 / self.sample_rate as f64
    }

    fn bytes_per_sample(&self) -> usize {
        match self.encoding {
            Encoding::Int {
                container_bytes, ..
            } => container_bytes as usize,
            Encoding::Float { bytes } => bytes as usize,
        }
    }
}

/// A parsed header and the bytes of its complete sample frames.
#[derive(Clone, Copy, Debug)]
pub struct Wav<'a> {
    /// What the header declares (`frames` from the declared data chunk size).
    pub info: WavInfo,
    /// The complete frames actually present.
    data: &'a [u8],
    /// Declared and present data chunk bytes, when the file is cut short.
    truncated: Option<(u32, usize)>,
}

const WAVE_FORMAT_PCM: u16 = 0x0001;
const WAVE_FORMAT_IEEE_FLOAT: u16 = 0x0003;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;
/// The 14 bytes after the format code in a KSDATAFORMAT_SUBTYPE_* GUID.
const SUBTYPE_GUID_TAIL: [u8; 14] = [
    0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71,
];

fn format_name(code: u16) -> &'static str {
    match code {
        0x0001 => "PCM",
        0x0002 => "Microsoft ADPCM",
        0x0003 => "IEEE float",
        0x0006 => "A-law",
        0x0007 => "mu-law",
        0x0011 => "IMA ADPCM",
        0x0031 => "GSM 6.10",
        0x0050 => "MPEG",
        0x0055 => "MPEG layer 3",
        0x0092 => "Dolby AC-3",
        0x00FF => "AAC",
        0x1610 => "MPEG-4 AAC",
        0xF1AC => "FLAC",
        0xFFFE => "WAVE_FORMAT_EXTENSIBLE",
        _ => "unknown",
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn truncated(what: impl std::fmt::Display) -> String {
    format!("truncated WAV: {what}")
}

fn unsupported(what: impl std::fmt::Display) -> String {
    format!("unsupported WAV format: {what}")
}

fn invalid(what: impl std::fmt::Display) -> String {
    format!("invalid WAV: {what}")
}

const EXPECTED: &str =
    "expected 8/16/24/32-bit integer PCM or 32/64-bit IEEE float, plain or WAVE_FORMAT_EXTENSIBLE";

/// Parses the fmt chunk body into channels, rate and encoding.
fn parse_fmt(body: &[u8]) -> Result<(u16, u32, Encoding), String> {
    if body.len() < 16 {
        return Err(invalid(format!(
            "fmt chunk is {} bytes, at least 16 expected",
            body.len()
        )));
    }
    let mut code = le_u16(body, 0);
    let channels = le_u16(body, 2);
    let sample_rate = le_u32(body, 4);
    let block_align = le_u16(body, 12);
    let bits = le_u16(body, 14);
    let mut valid_bits = bits;
    if code == WAVE_FORMAT_EXTENSIBLE {
        if body.len() < 40 || le_u16(body, 16) < 22 {
            return Err(invalid(
                "WAVE_FORMAT_EXTENSIBLE fmt chunk is shorter than 40 bytes",
            ));
        }
        let declared_valid = le_u16(body, 18);
        if declared_valid != 0 {
            valid_bits = declared_valid;
        }
        if body[26..40] != SUBTYPE_GUID_TAIL {
            return Err(unsupported(format!(
                "WAVE_FORMAT_EXTENSIBLE with a non-standard sub-format GUID; {EXPECTED}"
            )));
        }
        code = le_u16(body, 24);
    }
    if channels == 0 {
        return Err(invalid("the header declares 0 channels"));
    }
    if sample_rate == 0 {
        return Err(invalid("the header declares a sample rate of 0 Hz"));
    }
    let container_bytes = block_align / channels;
    if container_bytes == 0 || !block_align.is_multiple_of(channels) {
        return Err(invalid(format!(
            "block align {block_align} is not a whole number of bytes per channel for {channels} channels"
        )));
    }
    if bits == 0 || bits > container_bytes * 8 || valid_bits > bits {
        return Err(invalid(format!(
            "{valid_bits} valid bits in {bits}-bit samples do not fit the {container_bytes}-byte \
             container (block align {block_align}, {channels} channels)"
        )));
    }
    let encoding = match code {
        WAVE_FORMAT_PCM if (1..=4).contains(&container_bytes) => Encoding::Int {
            container_bytes,
            valid_bits,
        },
        WAVE_FORMAT_PCM => {
            return Err(unsupported(format!(
                "{}-bit integer PCM samples; {EXPECTED}",
                container_bytes * 8
            )))
        }
        WAVE_FORMAT_IEEE_FLOAT
            if (container_bytes == 4 || container_bytes == 8) && bits == container_bytes * 8 =>
        {
            Encoding::Float {
                bytes: container_bytes,
            }
        }
        WAVE_FORMAT_IEEE_FLOAT => {
            return Err(unsupported(format!(
                "{bits}-bit IEEE float in a {container_bytes}-byte container; {EXPECTED}"
            )))
        }
        other => {
            return Err(unsupported(format!(
                "format code {other:#06x} ({}); {EXPECTED}",
                format_name(other)
            )))
        }
    };
    Ok((channels, sample_rate, encoding))
}

/// Reads the RIFF/WAVE header up to the start of the data chunk. Does not decode
/// samples, so it is cheap enough to run before any duration check; `info.frames`
/// is what the header declares.
///
/// A data chunk size of `0xFFFFFFFF` (written by streaming encoders that cannot seek
/// back) means "to the end of the file". A data chunk shorter than declared is
/// reported by [`Wav::decode_mono`] (so a caller can first refuse a clip whose
/// declared duration is too long); trailing bytes that do not fill a whole frame
/// are ignored.
pub fn parse(bytes: &[u8]) -> Result<Wav<'_>, String> {
    if bytes.is_empty() {
        return Err(unsupported("empty input; expected a RIFF/WAVE file"));
    }
    let head = &bytes[..bytes.len().min(12)];
    let is_prefix_of = |magic: &[u8]| head.len() <= magic.len() && magic.starts_with(head);
    if bytes.len() < 12 {
        return if is_prefix_of(b"RIFF") || head.starts_with(b"RIFF") {
            Err(truncated(format!(
                "{} bytes, shorter than the 12-byte RIFF/WAVE header",
                bytes.len()
            )))
        } else {
            Err(unsupported(
                "not a RIFF/WAVE file (too short, no RIFF signature)",
            ))
        };
    }
    match &bytes[0..4] {
        b"RIFF" => {}
        b"RIFX" => {
            return Err(unsupported(
                "big-endian RIFX; expected little-endian RIFF/WAVE",
            ))
        }
        b"RF64" | b"BW64" => {
            return Err(unsupported(
                "RF64/BW64 (64-bit RIFF); expected a plain RIFF/WAVE file",
            ))
        }
        other => {
            return Err(unsupported(format!(
                "not a RIFF/WAVE file (starts with {:02x?}, expected \"RIFF\")",
                other
            )))
        }
    }
    if &bytes[8..12] != b"WAVE" {
        return Err(unsupported(format!(
            "a RIFF file of type {:?}, expected \"WAVE\"",
            String::from_utf8_lossy(&bytes[8..12])
        )));
    }

    let mut fmt = None;
    let mut pos = 12usize;
    loop {
        if bytes.len() - pos < 8 {
            return Err(truncated(if fmt.is_none() {
                "the file ends before the fmt chunk"
            } else {
                "the file ends before the data chunk"
            }));
        }
        let id = &bytes[pos..pos + 4];
        let size = le_u32(bytes, pos + 4);
        let body_start = pos + 8;
        let available = bytes.len() - body_start;
        match id {
            b"fmt " => {
                if (size as usize) > available {
                    return Err(truncated(format!(
                        "the fmt chunk declares {size} bytes but only {available} are present"
                    )));
                }
                fmt = Some(parse_fmt(&bytes[body_start..body_start + size as usize])?);
            }
            b"data" => {
                let Some((channels, sample_rate, encoding)) = fmt else {
                    return Err(invalid("the data chunk comes before the fmt chunk"));
                };
                let declared = if size == u32::MAX {
                    available
                } else {
                    size as usize
                };
                let present = declared.min(available);
                let mut info = WavInfo {
                    channels,
                    sample_rate,
                    frames: 0,
                    encoding,
                };
                let frame = info.bytes_per_sample() * channels as usize;
                info.frames = (declared / frame) as u64;
                let data = &bytes[body_start..body_start + present / frame * frame];
                let truncated = (present < declared).then_some((size, available));
                return Ok(Wav {
                    info,
                    data,
                    truncated,
                });
            }
            _ => {}
        }
        // Chunks are word-aligned: an odd-sized chunk is followed by a pad byte.
        let skip = size as usize + (size as usize & 1);
        if skip > available {
            return Err(truncated(format!(
                "the {:?} chunk declares {size} bytes but only {available} are present",
                String::from_utf8_lossy(id)
            )));
        }
        pos = body_start + skip;
    }
}

impl Wav<'_> {
    /// Decodes the samples, averaging the channels of each frame: mono f32, integers
    /// scaled to [-1, 1) by their container width. A float sample that is NaN,
    /// infinite or outside [-1, 1] (integer PCM stored unscaled, say) is an error
    /// naming its frame and channel, as for raw PCM.
    /// A data chunk shorter than its header declares is a `truncated WAV` error.
    pub fn decode_mono(&self) -> Result<Vec<f32>, String> {
        let channels = self.info.channels as usize;
        let width = self.info.bytes_per_sample();
        let frame_bytes = width * channels;
        if let Some((declared, available)) = self.truncated {
            return Err(truncated(format!(
                "the data chunk declares {declared} bytes ({} frames) but only {available} \
                 bytes ({} frames) are present",
                self.info.frames,
                available / frame_bytes
            )));
        }
        let mut mono = Vec::with_capacity(self.data.len() / frame_bytes);
        let inv_channels = 1.0 / channels as f64;
        for (f, frame) in self.data.chunks_exact(frame_bytes).enumerate() {
            let mut sum = 0.0f64;
            for (c, s) in frame.chunks_exact(width).enumerate() {
                let v = match self.info.encoding {
                    Encoding::Int { .. } => int_sample(s),
                    Encoding::Float { bytes: 4 } => {
                        f32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f64
                    }
                    Encoding::Float { .. } => {
                        f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
                    }
                };
                if !v.is_finite() {
                    return Err(format!(
                        "non-finite sample ({v}) at frame {f}, channel {c}; samples must be finite"
                    ));
                }
                if v.abs() > 1.0 {
                    return Err(format!(
                        "sample {v} at frame {f}, channel {c} is outside [-1, 1]; float WAV \
                         samples must be scaled to [-1, 1] (for 16-bit PCM, divide by 32768)"
                    ));
                }
                sum += v;
            }
            mono.push((sum * inv_channels) as f32);
        }
        Ok(mono)
    }
}

/// One little-endian integer sample scaled by its container width to [-1, 1).
fn int_sample(s: &[u8]) -> f64 {
    match s.len() {
        1 => (s[0] as f64 - 128.0) / 128.0,
        2 => i16::from_le_bytes([s[0], s[1]]) as f64 / 32768.0,
        3 => (i32::from_le_bytes([0, s[0], s[1], s[2]]) >> 8) as f64 / 8_388_608.0,
        _ => i32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f64 / 2_147_483_648.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fmt: &[u8], data: &[u8], declared: Option<u32>) -> Vec<u8> {
        let mut v = b"RIFF\0\0\0\0WAVE".to_vec();
        v.extend_from_slice(b"fmt ");
        v.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        v.extend_from_slice(fmt);
        v.extend_from_slice(b"data");
        v.extend_from_slice(&declared.unwrap_or(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    fn pcm_fmt(code: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
        let align = channels * bits.div_ceil(8);
        let mut f = Vec::new();
        f.extend_from_slice(&code.to_le_bytes());
        f.extend_from_slice(&channels.to_le_bytes());
        f.extend_from_slice(&rate.to_le_bytes());
        f.extend_from_slice(&(rate * align as u32).to_le_bytes());
        f.extend_from_slice(&align.to_le_bytes());
        f.extend_from_slice(&bits.to_le_bytes());
        f
    }

    #[test]
    fn int_scaling() {
        assert_eq!(int_sample(&[0]), -1.0);
        assert_eq!(int_sample(&[128]), 0.0);
        assert_eq!(int_sample(&[0x00, 0x80]), -1.0);
        assert_eq!(int_sample(&[0xff, 0x7f]), 32767.0 / 32768.0);
        assert_eq!(int_sample(&[0x00, 0x00, 0x80]), -1.0);
        assert_eq!(int_sample(&[0x00, 0x00, 0x40]), 0.5);
        assert_eq!(int_sample(&[0x00, 0x00, 0x00, 0xC0]), -0.5);
    }

    #[test]
    fn odd_sized_chunk_is_padded() {
        let mut v = b"RIFF\0\0\0\0WAVE".to_vec();
        let fmt = pcm_fmt(1, 1, 8000, 16);
        v.extend_from_slice(b"fmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&fmt);
        v.extend_from_slice(b"LIST");
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(b"abc\0"); // 3 bytes + pad byte
        v.extend_from_slice(b"data");
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(&[0x00, 0x40, 0x00, 0xC0]);
        let wav = parse(&v).unwrap();
        assert_eq!(wav.info.frames, 2);
        assert_eq!(wav.decode_mono().unwrap(), vec![0.5, -0.5]);
    }

    #[test]
    fn alaw_is_named() {
        let v = header(&pcm_fmt(6, 1, 8000, 8), &[0; 8], None);
        let e = parse(&v).unwrap_err();
        assert!(
            e.starts_with("unsupported WAV format: format code 0x0006 (A-law)"),
            "{e}"
        );
    }

    #[test]
    fn streaming_size_means_rest_of_file() {
        let v = header(
            &pcm_fmt(1, 2, 8000, 16),
            &[0, 0x40, 0, 0x40, 0, 0],
            Some(u32::MAX),
        );
        let wav = parse(&v).unwrap();
        assert_eq!(wav.info.frames, 1);
        assert_eq!(wav.decode_mono().unwrap(), vec![0.5]);
    }

    #[test]
    fn short_data_is_truncated() {
        let v = header(&pcm_fmt(1, 1, 8000, 16), &[0; 10], Some(100));
        let wav = parse(&v).unwrap();
        assert_eq!(wav.info.frames, 50);
        let e = wav.decode_mono().unwrap_err();
        assert!(
            e.starts_with("truncated WAV: the data chunk declares 100 bytes (50 frames)"),
            "{e}"
        );
        for cut in 0..v.len() {
            let e = parse(&v[..cut]).and_then(|w| w.decode_mono()).unwrap_err();
            assert!(
                e.starts_with("truncated WAV") || (cut == 0 && e.contains("empty")),
                "cut {cut}: {e}"
            );
        }
    }
}
