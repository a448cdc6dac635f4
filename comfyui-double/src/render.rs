//! Deterministic pixels and real image files: PNG (still and APNG), animated WebP.
//!
//! Must never: produce a file whose bytes do not match its extension / content type.

use std::io::Cursor;
use std::sync::Arc;

use anyhow::Context;

/// How an image's pixels are filled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// ComfyUI's EmptyImage `color` (0xRRGGBB).
    Solid(u32),
    /// A deterministic pattern from a sampler seed (same seed → same pixels), stamped
    /// "SIMULATED": a synthetic generation must never pass for a real one (or for a bug).
    Seeded(u64),
    /// Real pixels, one RGB8 buffer per batch image: a loaded file or what an image node
    /// (invert, scale, crop, blur) made of its input.
    Pixels(Arc<[Vec<u8>]>),
}

/// Most pixels (over the whole batch) an image node works on for real; beyond it the double keeps
/// only the output's shape (its pixels are then a pattern), so a huge graph cannot exhaust memory.
pub(crate) const MAX_REAL_PIXELS: u64 = 1 << 26;

/// An image batch flowing along the graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ImageSpec {
    pub width: u32,
    pub height: u32,
    pub batch: u32,
    pub fill: Fill,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec { width: 512, height: 512, batch: 1, fill: Fill::Seeded(0) }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// RGB8 pixels of image `index` of the batch.
pub(crate) fn pixels(spec: &ImageSpec, index: u32) -> Vec<u8> {
    let (w, h) = (spec.width as usize, spec.height as usize);
    let mut out = Vec::with_capacity(w * h * 3);
    match &spec.fill {
        Fill::Solid(color) => {
            let rgb = [(color >> 16) as u8, (color >> 8) as u8, *color as u8];
            for _ in 0..w * h {
                out.extend_from_slice(&rgb);
            }
        }
        Fill::Seeded(seed) => {
            let k = splitmix(*seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            let (a, b, c) = ((k & 0xff) as usize | 1, ((k >> 8) & 0xff) as usize | 1, ((k >> 16) & 0xff) as usize);
            let (d, e) = (((k >> 24) & 0xff) as usize, ((k >> 32) & 0xff) as usize);
            for y in 0..h {
                for x in 0..w {
                    out.push(((x * a / 4 + y + c) & 0xff) as u8);
                    out.push(((y * b / 4 + x / 2 + d) & 0xff) as u8);
                    out.push((((x ^ y) + e) & 0xff) as u8);
                }
            }
            stamp_simulated(&mut out, w, h);
        }
        Fill::Pixels(frames) => match frames.get(index as usize % frames.len().max(1)) {
            Some(frame) if frame.len() == w * h * 3 => out.extend_from_slice(frame),
            _ => out.resize(w * h * 3, 0),
        },
    }
    out
}

/// 5×7 glyphs of the letters in "SIMULATED", one row per byte (bit 4 = leftmost column).
fn glyph(c: char) -> [u8; 7] {
    match c {
        'S' => [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110],
        'I' => [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b11111],
        'M' => [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001],
        'U' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'L' => [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111],
        'A' => [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'T' => [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100],
        'E' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111],
        'D' => [0b11110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b11110],
        _ => [0; 7],
    }
}

/// The band's colours: black letters on amber.
pub(crate) const BAND_RGB: [u8; 3] = [255, 193, 7];
pub(crate) const INK_RGB: [u8; 3] = [0, 0, 0];

/// The rows the "SIMULATED" band covers in a `height`-row image: the bottom eighth (at least 9
/// rows, at most the whole image).
pub(crate) fn band_rows(height: usize) -> std::ops::Range<usize> {
    let band = (height / 8).max(9).min(height);
    height - band..height
}

/// Stamp a "SIMULATED" band across the bottom of an RGB8 image: whoever sees a simulated
/// generation knows at a glance it is synthetic.
pub(crate) fn stamp_simulated(rgb: &mut [u8], width: usize, height: usize) {
    if width == 0 || height == 0 || rgb.len() < width * height * 3 {
        return;
    }
    let rows = band_rows(height);
    for y in rows.clone() {
        for x in 0..width {
            rgb[(y * width + x) * 3..][..3].copy_from_slice(&BAND_RGB);
        }
    }
    const TEXT: &str = "SIMULATED";
    // 6 columns per letter (5 + a gap), 7 rows; as large as the band and the width allow.
    let band_height = rows.len();
    let scale = ((band_height.saturating_sub(2)) / 7).min(width / (TEXT.len() * 6)).max(1);
    let (text_w, text_h) = (TEXT.len() * 6 * scale, 7 * scale);
    let x0 = width.saturating_sub(text_w) / 2;
    let y0 = rows.start + band_height.saturating_sub(text_h) / 2;
    for (i, c) in TEXT.chars().enumerate() {
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5 {
                if bits & (0b10000 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (x, y) = (x0 + (i * 6 + col) * scale + dx, y0 + row * scale + dy);
                        if x < width && y < height {
                            rgb[(y * width + x) * 3..][..3].copy_from_slice(&INK_RGB);
                        }
                    }
                }
            }
        }
    }
}

/// Whether a batch this large is worked on for real (see [`MAX_REAL_PIXELS`]).
fn fits(width: u32, height: u32, batch: u32) -> bool {
    (width as u64) * (height as u64) * (batch as u64) <= MAX_REAL_PIXELS
}

fn frames_of(spec: &ImageSpec) -> Vec<image::RgbImage> {
    (0..spec.batch.max(1))
        .map(|i| image::RgbImage::from_raw(spec.width, spec.height, pixels(spec, i)).unwrap_or_else(|| image::RgbImage::new(spec.width, spec.height)))
        .collect()
}

fn from_frames(frames: Vec<image::RgbImage>) -> Option<ImageSpec> {
    let first = frames.first()?;
    let (width, height) = first.dimensions();
    let batch = frames.len() as u32;
    Some(ImageSpec { width, height, batch, fill: Fill::Pixels(frames.into_iter().map(image::RgbImage::into_raw).collect()) })
}

/// A decoded image file (PNG, JPEG, WebP) as a batch of one, if it decodes and fits.
pub(crate) fn decode(bytes: &[u8]) -> Option<ImageSpec> {
    let (w, h) = image_size(bytes)?;
    if !fits(w, h, 1) {
        return None;
    }
    let rgb = image::load_from_memory(bytes).ok()?.to_rgb8();
    from_frames(vec![rgb])
}

/// ComfyUI's ImageInvert: `1 - x` on every channel.
pub(crate) fn invert(src: &ImageSpec) -> Option<ImageSpec> {
    if !fits(src.width, src.height, src.batch) {
        return None;
    }
    let mut frames = frames_of(src);
    for frame in &mut frames {
        image::imageops::invert(frame);
    }
    from_frames(frames)
}

/// ComfyUI's ImageScale: `crop: center` first cuts the source to the target's aspect ratio
/// (as `comfy.utils.common_upscale` does), then resizes with the named method.
pub(crate) fn scale(src: &ImageSpec, width: u32, height: u32, method: &str, crop_center: bool) -> Option<ImageSpec> {
    if !fits(src.width, src.height, src.batch) || !fits(width, height, src.batch) || width == 0 || height == 0 {
        return None;
    }
    use image::imageops::FilterType;
    let filter = match method {
        "nearest-exact" => FilterType::Nearest,
        "bilinear" | "area" => FilterType::Triangle,
        "bicubic" => FilterType::CatmullRom,
        "lanczos" => FilterType::Lanczos3,
        _ => FilterType::Triangle,
    };
    let frames = frames_of(src)
        .into_iter()
        .map(|frame| {
            let frame = if crop_center {
                let (sw, sh) = (src.width as f64, src.height as f64);
                let (old_aspect, new_aspect) = (sw / sh, width as f64 / height as f64);
                let (x, y, w, h) = if old_aspect > new_aspect {
                    let x = ((sw - sw * (new_aspect / old_aspect)) / 2.0).round() as u32;
                    (x, 0, src.width - 2 * x.min(src.width / 2), src.height)
                } else if old_aspect < new_aspect {
                    let y = ((sh - sh * (old_aspect / new_aspect)) / 2.0).round() as u32;
                    (0, y, src.width, src.height - 2 * y.min(src.height / 2))
                } else {
                    (0, 0, src.width, src.height)
                };
                image::imageops::crop_imm(&frame, x, y, w.max(1), h.max(1)).to_image()
            } else {
                frame
            };
            image::imageops::resize(&frame, width, height, filter)
        })
        .collect();
    from_frames(frames)
}

/// ComfyUI's ImageCrop: `x`, `y` clamped into the image, the region clipped at its edges.
pub(crate) fn crop(src: &ImageSpec, width: u32, height: u32, x: u32, y: u32) -> Option<ImageSpec> {
    if !fits(src.width, src.height, src.batch) {
        return None;
    }
    let x = x.min(src.width.saturating_sub(1));
    let y = y.min(src.height.saturating_sub(1));
    let w = width.min(src.width - x).max(1);
    let h = height.min(src.height - y).max(1);
    let frames = frames_of(src).into_iter().map(|frame| image::imageops::crop_imm(&frame, x, y, w, h).to_image()).collect();
    from_frames(frames)
}

/// ComfyUI's ImageBlur: a Gaussian blur of `sigma` (none when the radius is 0).
pub(crate) fn blur(src: &ImageSpec, radius: u64, sigma: f64) -> Option<ImageSpec> {
    if !fits(src.width, src.height, src.batch) {
        return None;
    }
    if radius == 0 || !(sigma > 0.0) {
        return from_frames(frames_of(src));
    }
    let frames = frames_of(src).into_iter().map(|frame| image::imageops::blur(&frame, sigma as f32)).collect();
    from_frames(frames)
}

/// Python's `json.dumps(v)` (default separators, `ensure_ascii=True`), as ComfyUI writes PNG metadata.
pub(crate) fn py_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    fn string(s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    string(k, out);
                    out.push_str(": ");
                    walk(v, out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    walk(v, out);
                }
                out.push(']');
            }
            Value::String(s) => string(s, out),
            Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 && f.abs() < 1e16 { out.push_str(&format!("{f:.1}")) } else { out.push_str(&n.to_string()) }
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    walk(v, &mut out);
    out
}

/// Encodes RGB8 pixels as a PNG.
pub(crate) fn encode_png(width: u32, height: u32, rgb: &[u8]) -> anyhow::Result<Vec<u8>> {
    encode_png_with_text(width, height, rgb, &[])
}

/// Encodes RGB8 pixels as a PNG with tEXt chunks (ComfyUI's `prompt` / extra_pnginfo metadata).
pub(crate) fn encode_png_with_text(width: u32, height: u32, rgb: &[u8], texts: &[(String, String)]) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut buf, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        for (keyword, text) in texts {
            encoder.add_text_chunk(keyword.clone(), text.clone()).context("png text chunk")?;
        }
        let mut writer = encoder.write_header().context("png header")?;
        writer.write_image_data(rgb).context("png data")?;
        writer.finish().context("png finish")?;
    }
    Ok(buf)
}

/// An animated PNG with one frame per batch image.
pub(crate) fn encode_apng(spec: &ImageSpec, fps: f64) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut buf, spec.width, spec.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_animated(spec.batch.max(1), 0).context("apng")?;
        let delay_ms = (1000.0 / fps.max(0.01)).round().min(65535.0) as u16;
        encoder.set_frame_delay(delay_ms, 1000).context("apng delay")?;
        let mut writer = encoder.write_header().context("png header")?;
        for i in 0..spec.batch.max(1) {
            writer.write_image_data(&pixels(spec, i)).context("apng frame")?;
        }
        writer.finish().context("png finish")?;
    }
    Ok(buf)
}

fn chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
}

fn u24(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes()[..3]);
}

/// The VP8L chunk (fourcc + size + payload) of a lossless still WebP.
fn vp8l_chunk(spec: &ImageSpec, index: u32) -> anyhow::Result<Vec<u8>> {
    let mut still = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(Cursor::new(&mut still))
        .encode(&pixels(spec, index), spec.width, spec.height, image::ExtendedColorType::Rgb8)
        .context("webp encode")?;
    // RIFF(4) size(4) WEBP(4), then the VP8L chunk.
    let body = still.get(12..).context("short webp")?;
    anyhow::ensure!(body.starts_with(b"VP8L"), "unexpected webp layout");
    Ok(body.to_vec())
}

/// An animated WebP (VP8X + ANIM + one ANMF per batch image).
pub(crate) fn encode_animated_webp(spec: &ImageSpec, fps: f64) -> anyhow::Result<Vec<u8>> {
    let duration = (1000.0 / fps.max(0.01)).round().min(16_777_215.0) as u32;
    let mut body = Vec::new();
    let mut vp8x = vec![0x02u8, 0, 0, 0];
    u24(&mut vp8x, spec.width - 1);
    u24(&mut vp8x, spec.height - 1);
    chunk(&mut body, b"VP8X", &vp8x);
    chunk(&mut body, b"ANIM", &[0, 0, 0, 0, 0, 0]);
    for i in 0..spec.batch.max(1) {
        let mut frame = Vec::new();
        u24(&mut frame, 0);
        u24(&mut frame, 0);
        u24(&mut frame, spec.width - 1);
        u24(&mut frame, spec.height - 1);
        u24(&mut frame, duration);
        frame.push(0b10); // no blending, no disposal
        frame.extend_from_slice(&vp8l_chunk(spec, i)?);
        chunk(&mut body, b"ANMF", &frame);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&body);
    Ok(out)
}

/// Width and height of a PNG or JPEG file, if recognisable.
pub(crate) fn image_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() >= 24 {
        let w = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
        let h = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
        return Some((w, h));
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let mut i = 2;
        while i + 9 < bytes.len() {
            if bytes[i] != 0xFF {
                return None;
            }
            let marker = bytes[i + 1];
            let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
            if matches!(marker, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF) {
                let h = u16::from_be_bytes([bytes[i + 5], bytes[i + 6]]) as u32;
                let w = u16::from_be_bytes([bytes[i + 7], bytes[i + 8]]) as u32;
                return Some((w, h));
            }
            i += 2 + len;
        }
        return None;
    }
    if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        return image::load_from_memory(bytes).ok().map(|i| (i.width(), i.height()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_pixels_other_seed_other_pixels() {
        // Tall enough that the seeded pattern shows above the "SIMULATED" band (≥ 9 rows).
        let a = ImageSpec { width: 16, height: 32, batch: 1, fill: Fill::Seeded(42) };
        assert_eq!(pixels(&a, 0), pixels(&a, 0));
        assert_ne!(pixels(&a, 0), pixels(&ImageSpec { fill: Fill::Seeded(43), ..a }, 0));
    }

    #[test]
    fn animated_webp_decodes_with_its_frames() {
        let spec = ImageSpec { width: 10, height: 6, batch: 3, fill: Fill::Seeded(1) };
        let bytes = encode_animated_webp(&spec, 6.0).unwrap();
        use image::AnimationDecoder;
        let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(&bytes)).unwrap();
        let frames = decoder.into_frames().collect_frames().unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].buffer().dimensions(), (10, 6));
    }

    #[test]
    fn python_json_dumps_format() {
        let v = serde_json::json!({"a": [1, 2.0, "é\"x"], "b": {"c": null, "d": true}});
        assert_eq!(py_json(&v), r#"{"a": [1, 2.0, "\u00e9\"x"], "b": {"c": null, "d": true}}"#);
    }

    #[test]
    fn png_size_roundtrip() {
        let png = encode_png(7, 3, &pixels(&ImageSpec { width: 7, height: 3, batch: 1, fill: Fill::Solid(0xff0000) }, 0)).unwrap();
        assert_eq!(image_size(&png), Some((7, 3)));
    }
}

/// A 64×64 JPEG standing in for a latent preview at `step` of `steps` (brighter as sampling goes).
pub fn preview_jpeg(step: u64, steps: u64) -> Option<Vec<u8>> {
    let level = ((step * 255) / steps.max(1)).min(255) as u8;
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([level, (x * 4) as u8, (y * 4) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80).encode_image(&img).ok()?;
    Some(out.into_inner())
}
