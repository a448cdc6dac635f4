//! Output encoding: ComfyUI saves PNG; callers were promised `image/jpeg`, and the
//! old service labelled PNG bytes as JPEG. Here PNG is decoded and re-encoded as a
//! real JPEG (SIMD encoder, quality configurable); anything else (animated WEBP,
//! GIF, MP4, or JPEG already) passes through with its true media type.

use anyhow::{Context, Result, bail};

/// The media type of `bytes`, sniffed from their magic numbers: the comfy
/// crate's sniffer, the only one (so the type the ComfyUI client reports and
/// the type the host answers with cannot disagree).
pub use flowhost_comfy::media::sniff_media_type;

/// Decode a PNG and encode it as a baseline JPEG at `quality` (1–100). Alpha is
/// composited onto white (JPEG has none); 16-bit samples are narrowed.
pub fn png_to_jpeg(png_bytes: &[u8], quality: u8) -> Result<Vec<u8>> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().context("reading the PNG header")?;
    let size = reader.output_buffer_size().context("PNG too large to decode")?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).context("decoding the PNG")?;
    let (width, height) = (info.width, info.height);
    if width > u16::MAX as u32 || height > u16::MAX as u32 {
        bail!("{width}x{height} is larger than JPEG allows");
    }
    let pixels = &buf[..info.buffer_size()];
    let (data, color) = match info.color_type {
        png::ColorType::Rgb => (pixels.to_vec(), jpeg_encoder::ColorType::Rgb),
        png::ColorType::Grayscale => (pixels.to_vec(), jpeg_encoder::ColorType::Luma),
        png::ColorType::Rgba => (composite_on_white(pixels, 4), jpeg_encoder::ColorType::Rgb),
        png::ColorType::GrayscaleAlpha => (composite_on_white(pixels, 2), jpeg_encoder::ColorType::Luma),
        png::ColorType::Indexed => bail!("indexed PNG was not expanded"),
    };
    let mut out = Vec::with_capacity(data.len() / 8);
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100));
    // 4:2:0 chroma subsampling at every quality, as libjpeg and Pillow do (the
    // encoder's own default switches to 4:4:4 at q ≥ 90, doubling the work for
    // differences the eye does not see in photographic output).
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    encoder.encode(&data, width as u16, height as u16, color).context("encoding JPEG")?;
    Ok(out)
}

/// Drop the alpha channel of `channels`-wide pixels (last channel = alpha),
/// blending onto white.
fn composite_on_white(pixels: &[u8], channels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(pixels.len() / channels * (channels - 1));
    for px in pixels.chunks_exact(channels) {
        let alpha = px[channels - 1] as u32;
        for &c in &px[..channels - 1] {
            out.push(((c as u32 * alpha + 255 * (255 - alpha)) / 255) as u8);
        }
    }
    out
}

/// Width and height of a JPEG (from its SOF marker), for tests and checks.
pub fn jpeg_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2;
    while i + 9 < bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if (0xC0..=0xCF).contains(&marker) && marker != 0xC4 && marker != 0xC8 && marker != 0xCC {
            let h = u16::from_be_bytes([bytes[i + 5], bytes[i + 6]]) as u32;
            let w = u16::from_be_bytes([bytes[i + 7], bytes[i + 8]]) as u32;
            return Some((w, h));
        }
        i += 2 + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, color: png::ColorType, px: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        let data: Vec<u8> = px.iter().copied().cycle().take((width * height) as usize * px.len()).collect();
        w.write_image_data(&data).unwrap();
        drop(w);
        out
    }

    #[test]
    fn png_becomes_a_real_jpeg_of_the_same_size() {
        let jpeg = png_to_jpeg(&png(64, 48, png::ColorType::Rgb, &[200, 10, 10]), 90).unwrap();
        assert_eq!(sniff_media_type(&jpeg), "image/jpeg");
        assert_eq!(jpeg_dimensions(&jpeg), Some((64, 48)));
        let decoded = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap().to_rgb8();
        let p = decoded.get_pixel(10, 10);
        assert!(p[0] > 180 && p[1] < 40, "colour survives: {p:?}");
    }

    #[test]
    fn transparent_pixels_become_white() {
        let jpeg = png_to_jpeg(&png(16, 16, png::ColorType::Rgba, &[0, 0, 0, 0]), 90).unwrap();
        let decoded = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert!(decoded.get_pixel(8, 8)[0] > 240);
    }

    #[test]
    fn broken_png_is_an_error_not_a_panic() {
        assert!(png_to_jpeg(b"\x89PNG\r\n\x1a\nnot really", 90).is_err());
        assert!(png_to_jpeg(b"", 90).is_err());
    }

    #[test]
    fn sniffs_the_media_types_comfyui_produces() {
        assert_eq!(sniff_media_type(b"RIFF\0\0\0\0WEBPVP8X"), "image/webp");
        assert_eq!(sniff_media_type(b"GIF89a"), "image/gif");
        assert_eq!(sniff_media_type(b"\0\0\0\x18ftypmp42\0\0\0\0"), "video/mp4");
    }

    #[test]
    fn quicktime_is_not_labelled_mp4() {
        // The host once had its own sniffer that called every ftyp file video/mp4.
        assert_eq!(sniff_media_type(b"\0\0\0\x14ftypqt  \0\0\0\0qt  "), "video/quicktime");
    }
}
