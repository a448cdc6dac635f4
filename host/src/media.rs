//! Output encoding: ComfyUI saves PNG; callers were promised `image/jpeg`, and the
//! old service labelled PNG bytes as JPEG. Here PNG is decoded and re-encoded as a
//! real baseline JPEG (4:2:0, quality configurable); anything else (animated WEBP,
//! GIF, MP4, or JPEG already) passes through with its true media type. Raw pixels
//! from ComfyUI's `FlowhostImageOutput` (the raster transport) are encoded the same
//! way, without the PNG round trip.
//!
//! Speed: one 1024² image is on every request's critical path, and a photographic
//! (or worst case: noisy) image costs a single core tens of milliseconds to
//! entropy-code. So the image is cut into horizontal strips of whole MCU rows that
//! are encoded on several threads while the PNG is still being decoded, and the
//! strips are joined with JPEG restart markers (`DRI` + `RSTn`, ITU T.81 §B.2.4.4):
//! each strip starts with fresh DC predictors and ends byte-aligned, which is exactly
//! what a restart interval of one strip's MCUs means. The result is byte for byte
//! what the same encoder writes single-threaded with that restart interval (a test
//! proves it), decodable by every baseline decoder. This module never touches files
//! or the network; it only turns bytes into bytes.

use std::sync::{Mutex, mpsc};

use anyhow::{Context, Result, bail};

/// The media type of `bytes`, sniffed from their magic numbers: the comfy
/// crate's sniffer, the only one (so the type the ComfyUI client reports and
/// the type the host answers with cannot disagree).
pub use flowhost_comfy::media::sniff_media_type;

/// At most this many encoder threads per image: past 8 the strips of a 1024² image
/// get too short for the thread hand-off to pay, and concurrent requests share cores.
const MAX_THREADS: usize = 8;

/// Overrides the encoder thread count per image (1–64): `FLOWHOST_JPEG_THREADS`.
pub const THREADS_ENV: &str = "FLOWHOST_JPEG_THREADS";

/// Encoder threads a call uses: [`THREADS_ENV`] when set, else the machine's cores, at most
/// [`MAX_THREADS`]. Read once.
pub fn default_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        threads_from(std::env::var(THREADS_ENV).ok().as_deref(), cores)
    })
}

fn threads_from(setting: Option<&str>, cores: usize) -> usize {
    match setting.and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(n) => n.clamp(1, 64),
        None => cores.clamp(1, MAX_THREADS),
    }
}

/// Decode a PNG and encode it as a baseline JPEG at `quality` (1–100), on up to
/// [`default_threads`] threads. Alpha is composited onto white (JPEG has none);
/// 16-bit samples are narrowed.
pub fn png_to_jpeg(png_bytes: &[u8], quality: u8) -> Result<Vec<u8>> {
    png_to_jpeg_threads(png_bytes, quality, default_threads())
}

/// [`png_to_jpeg`] on exactly `threads` encoder threads (1 = one plain JPEG with
/// no restart markers). Public for the benchmark that compares thread counts.
pub fn png_to_jpeg_threads(png_bytes: &[u8], quality: u8, threads: usize) -> Result<Vec<u8>> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    // ComfyUI embeds the whole workflow as text chunks; nothing here reads them.
    decoder.set_ignore_text_chunk(true);
    let mut reader = decoder.read_info().context("reading the PNG header")?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width > u16::MAX as u32 || height > u16::MAX as u32 {
        bail!("{width}x{height} is larger than JPEG allows");
    }
    let (color_type, _) = reader.output_color_type();
    let layout = Layout::of(color_type)?;
    let line = reader.output_line_size(width).context("PNG too large to decode")?;
    let plan = StripPlan::new(width, height, layout.mcu, threads);
    if plan.strips <= 1 || reader.info().interlaced {
        // Adam7 rows arrive in seven passes, so strips could not start early: decode
        // whole, then encode (still in strips when more than one thread is asked for).
        let size = reader.output_buffer_size().context("PNG too large to decode")?;
        let mut buf = vec![0u8; size];
        let info = reader.next_frame(&mut buf).context("decoding the PNG")?;
        let pixels = &buf[..info.buffer_size()];
        if plan.strips <= 1 {
            return encode_strip(pixels, width, height, layout, quality, None);
        }
        let strips = pixels.chunks(plan.rows_per_strip as usize * line).map(Ok);
        return encode_strips(strips, &plan, width, line, layout, quality, threads);
    }
    // Decode strip by strip on this thread; encoder threads pick strips up as they
    // complete, so decoding and encoding overlap.
    let rows = plan.rows_per_strip as usize;
    let decoded = (0..plan.strips).map(|i| {
        let n = rows.min(height as usize - i * rows);
        let mut strip = vec![0u8; n * line];
        for row in strip.chunks_exact_mut(line) {
            reader.read_row(row).context("decoding the PNG")?.context("PNG ended early")?;
        }
        Ok(strip)
    });
    encode_strips(decoded, &plan, width, line, layout, quality, threads)
}

/// Raw 8-bit pixels (`channels` of 1–4: grey, grey + alpha, RGB, RGBA; rows of `width`, no
/// padding) as a baseline JPEG at `quality`, in strips on up to [`default_threads`] threads.
/// What the raster output transport (`FlowhostImageOutput`) needs: the same JPEG
/// [`png_to_jpeg`] makes of a PNG of these pixels, without the PNG.
pub fn raster_to_jpeg(pixels: &[u8], width: u32, height: u32, channels: u8, quality: u8) -> Result<Vec<u8>> {
    raster_to_jpeg_threads(pixels, width, height, channels, quality, default_threads())
}

/// [`raster_to_jpeg`] on exactly `threads` encoder threads (for the benchmark).
pub fn raster_to_jpeg_threads(pixels: &[u8], width: u32, height: u32, channels: u8, quality: u8, threads: usize) -> Result<Vec<u8>> {
    if width == 0 || height == 0 || width > u16::MAX as u32 || height > u16::MAX as u32 {
        bail!("a {width}x{height} image cannot be a JPEG");
    }
    let layout = Layout::of(raster_color(channels)?)?;
    let line = width as usize * layout.channels;
    if pixels.len() != line * height as usize {
        bail!("{} bytes are not {width}x{height} pixels of {channels} channels", pixels.len());
    }
    let plan = StripPlan::new(width, height, layout.mcu, threads);
    if plan.strips <= 1 {
        return encode_strip(pixels, width, height, layout, quality, None);
    }
    // The pixels are all here: strips are borrowed, never copied.
    let strips = pixels.chunks(plan.rows_per_strip as usize * line).map(Ok);
    encode_strips(strips, &plan, width, line, layout, quality, threads)
}

/// Raw 8-bit pixels as a PNG (fast compression), for a raster output a job wants as PNG.
pub fn raster_to_png(pixels: &[u8], width: u32, height: u32, channels: u8) -> Result<Vec<u8>> {
    let color = raster_color(channels)?;
    let expected = width as usize * height as usize * channels as usize;
    if pixels.len() != expected || width == 0 || height == 0 {
        bail!("{} bytes are not {width}x{height} pixels of {channels} channels", pixels.len());
    }
    let mut out = Vec::with_capacity(expected / 2 + 1024);
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().context("writing the PNG header")?;
    writer.write_image_data(pixels).context("encoding the PNG")?;
    writer.finish().context("finishing the PNG")?;
    Ok(out)
}

fn raster_color(channels: u8) -> Result<png::ColorType> {
    Ok(match channels {
        1 => png::ColorType::Grayscale,
        2 => png::ColorType::GrayscaleAlpha,
        3 => png::ColorType::Rgb,
        4 => png::ColorType::Rgba,
        n => bail!("an image of {n} channels is not grey, grey + alpha, RGB or RGBA"),
    })
}

/// How decoded PNG pixels map onto the JPEG encoder's input.
#[derive(Clone, Copy)]
struct Layout {
    /// Channels per decoded pixel.
    channels: usize,
    /// The last channel is alpha, to composite onto white.
    alpha: bool,
    color: jpeg_encoder::ColorType,
    /// MCU edge in pixels: 16 for 4:2:0 colour, 8 for greyscale.
    mcu: u32,
}

impl Layout {
    fn of(color: png::ColorType) -> Result<Layout> {
        use jpeg_encoder::ColorType::{Luma, Rgb};
        Ok(match color {
            png::ColorType::Rgb => Layout { channels: 3, alpha: false, color: Rgb, mcu: 16 },
            png::ColorType::Rgba => Layout { channels: 4, alpha: true, color: Rgb, mcu: 16 },
            png::ColorType::Grayscale => Layout { channels: 1, alpha: false, color: Luma, mcu: 8 },
            png::ColorType::GrayscaleAlpha => Layout { channels: 2, alpha: true, color: Luma, mcu: 8 },
            png::ColorType::Indexed => bail!("indexed PNG was not expanded"),
        })
    }
}

/// How an image is cut: `strips` strips of `rows_per_strip` rows (the last may be
/// shorter), each a whole number of MCU rows and one restart interval long.
struct StripPlan {
    strips: usize,
    rows_per_strip: u32,
    /// MCUs per strip = the restart interval written in `DRI`.
    interval: u16,
}

impl StripPlan {
    fn new(width: u32, height: u32, mcu: u32, threads: usize) -> StripPlan {
        let mcu_cols = width.div_ceil(mcu).max(1);
        let mcu_rows = height.div_ceil(mcu).max(1);
        // Two strips per thread evens out the load; a restart interval must fit in u16.
        let wanted = (threads.max(1) as u32 * 2).min(mcu_rows);
        let max_rows_per_interval = (u16::MAX as u32 / mcu_cols).max(1);
        let mcu_rows_per_strip = mcu_rows.div_ceil(wanted).clamp(1, max_rows_per_interval);
        let strips = if threads <= 1 { 1 } else { mcu_rows.div_ceil(mcu_rows_per_strip) as usize };
        let interval = (mcu_cols * mcu_rows_per_strip).min(u16::MAX as u32) as u16;
        StripPlan { strips, rows_per_strip: mcu_rows_per_strip * mcu, interval }
    }
}

/// One JPEG of `pixels` (`height` rows of the decoded layout). With `interval`,
/// the header carries that restart interval (the strip path; each strip is exactly
/// one interval, so no `RSTn` appears inside it).
fn encode_strip(pixels: &[u8], width: u32, height: u32, layout: Layout, quality: u8, interval: Option<u16>) -> Result<Vec<u8>> {
    let composited;
    let data = if layout.alpha {
        composited = composite_on_white(pixels, layout.channels);
        &composited[..]
    } else {
        pixels
    };
    let mut out = Vec::with_capacity(data.len() / 6 + 1024);
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100));
    // 4:2:0 chroma subsampling at every quality, as libjpeg and Pillow do (the
    // encoder's own default switches to 4:4:4 at q ≥ 90, doubling the work for
    // differences the eye does not see in photographic output).
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    if let Some(interval) = interval {
        encoder.set_restart_interval(interval);
    }
    encoder.encode(data, width as u16, height as u16, layout.color).context("encoding JPEG")?;
    Ok(out)
}

/// Encode strips (arriving in order from `strips`) on `threads` threads and join
/// them into one JPEG with restart markers between them.
fn encode_strips<S: AsRef<[u8]> + Send>(
    strips: impl Iterator<Item = Result<S>>,
    plan: &StripPlan,
    width: u32,
    line: usize,
    layout: Layout,
    quality: u8,
    threads: usize,
) -> Result<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<(usize, S)>();
    let rx = Mutex::new(rx);
    let results: Mutex<Vec<Option<Result<Vec<u8>>>>> = Mutex::new((0..plan.strips).map(|_| None).collect());
    let work = || {
        loop {
            // The lock is held only to take the next strip, not while encoding it.
            let next = match rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok((index, pixels)) = next else { return };
            let pixels = pixels.as_ref();
            let height = (pixels.len() / line.max(1)) as u32;
            let encoded = encode_strip(pixels, width, height, layout, quality, Some(plan.interval));
            if let Ok(mut results) = results.lock() {
                results[index] = Some(encoded);
            }
        }
    };
    let mut decode_error = None;
    std::thread::scope(|scope| {
        for _ in 1..threads.max(1) {
            scope.spawn(work);
        }
        for (index, strip) in strips.enumerate() {
            match strip {
                Ok(strip) => {
                    let _ = tx.send((index, strip));
                }
                Err(err) => {
                    decode_error = Some(err);
                    break;
                }
            }
        }
        drop(tx);
        // This thread has finished decoding: it encodes what is left too.
        work();
    });
    if let Some(err) = decode_error {
        return Err(err);
    }
    let results = results.into_inner().map_err(|_| anyhow::anyhow!("an encoder thread panicked"))?;
    let mut parts = Vec::with_capacity(results.len());
    for part in results {
        parts.push(part.context("an encoder thread stopped early")??);
    }
    let last = parts.last().and_then(|p| jpeg_dimensions(p)).map(|(_, h)| h).context("strip without a frame header")?;
    let total_height = plan.rows_per_strip * (parts.len() as u32 - 1) + last;
    join_strips(&parts, total_height)
}

/// One JPEG from per-strip JPEGs that share tables and restart interval: the first
/// strip's header (frame height patched to the whole image), then each strip's
/// entropy-coded segment, `RST0`…`RST7` (cycling) between them, then `EOI`.
fn join_strips(parts: &[Vec<u8>], total_height: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum::<usize>() + parts.len() * 2);
    let (first_header_end, sof_at) = scan_header(&parts[0])?;
    out.extend_from_slice(&parts[0][..first_header_end]);
    let h = u16::try_from(total_height).context("image too tall for JPEG")?;
    out[sof_at + 5..sof_at + 7].copy_from_slice(&h.to_be_bytes());
    for (i, part) in parts.iter().enumerate() {
        let (header_end, _) = scan_header(part)?;
        let end = part.len().checked_sub(2).filter(|&e| e >= header_end && part[e..] == [0xFF, 0xD9]).context("strip without EOI")?;
        out.extend_from_slice(&part[header_end..end]);
        if i + 1 < parts.len() {
            out.extend_from_slice(&[0xFF, 0xD0 + (i % 8) as u8]);
        }
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    Ok(out)
}

/// (offset just past the SOS segment, offset of the SOF0 marker) of a JPEG the
/// encoder wrote.
fn scan_header(jpeg: &[u8]) -> Result<(usize, usize)> {
    let mut i = 2;
    let mut sof = None;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            bail!("malformed JPEG header from the encoder");
        }
        let marker = jpeg[i + 1];
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if marker == 0xC0 {
            sof = Some(i);
        }
        if marker == 0xDA {
            let end = i + 2 + len;
            return Ok((end, sof.context("JPEG without SOF0")?));
        }
        i += 2 + len;
    }
    bail!("JPEG without a scan")
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
        let data: Vec<u8> = px.iter().copied().cycle().take((width * height) as usize * px.len()).collect();
        png_of(width, height, color, &data)
    }

    fn png_of(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(data).unwrap();
        drop(w);
        out
    }

    /// Worst case for both codecs: every sample random (xorshift, fixed seed).
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// What jpeg-encoder itself writes single-threaded with the same restart interval.
    fn reference(pixels: &[u8], width: u32, height: u32, color: jpeg_encoder::ColorType, interval: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
        enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
        enc.set_restart_interval(interval);
        enc.encode(pixels, width as u16, height as u16, color).unwrap();
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
    fn strips_joined_are_byte_for_byte_the_encoders_own_restart_interval_output() {
        // 300×200: neither side a multiple of 16, so the last strip and the last MCU
        // column are partial; 4 threads → 7 strips, RST0..RST5 between them.
        let (w, h) = (300, 200);
        let pixels = noise((w * h * 3) as usize);
        let plan = StripPlan::new(w, h, 16, 4);
        assert!(plan.strips > 1, "the image is cut: {} strips", plan.strips);
        let ours = png_to_jpeg_threads(&png_of(w, h, png::ColorType::Rgb, &pixels), 90, 4).unwrap();
        assert_eq!(ours, reference(&pixels, w, h, jpeg_encoder::ColorType::Rgb, plan.interval));
    }

    #[test]
    fn more_than_eight_strips_cycle_the_restart_markers() {
        let (w, h) = (64, 600);
        let pixels = noise((w * h * 3) as usize);
        let plan = StripPlan::new(w, h, 16, 8);
        assert!(plan.strips > 8, "{} strips", plan.strips);
        let ours = png_to_jpeg_threads(&png_of(w, h, png::ColorType::Rgb, &pixels), 90, 8).unwrap();
        assert_eq!(ours, reference(&pixels, w, h, jpeg_encoder::ColorType::Rgb, plan.interval));
    }

    #[test]
    fn greyscale_strips_use_eight_pixel_mcus() {
        let (w, h) = (100, 90);
        let pixels = noise((w * h) as usize);
        let plan = StripPlan::new(w, h, 8, 3);
        let ours = png_to_jpeg_threads(&png_of(w, h, png::ColorType::Grayscale, &pixels), 90, 3).unwrap();
        assert_eq!(ours, reference(&pixels, w, h, jpeg_encoder::ColorType::Luma, plan.interval));
    }

    #[test]
    fn the_threaded_jpeg_shows_the_same_picture_as_the_single_threaded_one() {
        let (w, h) = (256, 208);
        let pixels = noise((w * h * 3) as usize);
        let png_bytes = png_of(w, h, png::ColorType::Rgb, &pixels);
        let one = png_to_jpeg_threads(&png_bytes, 90, 1).unwrap();
        let many = png_to_jpeg_threads(&png_bytes, 90, 6).unwrap();
        assert_ne!(one, many, "the threaded one carries restart markers");
        let a = image::load_from_memory_with_format(&one, image::ImageFormat::Jpeg).unwrap().to_rgb8();
        let b = image::load_from_memory_with_format(&many, image::ImageFormat::Jpeg).unwrap().to_rgb8();
        assert_eq!(a.dimensions(), (w, h));
        assert!(a.as_raw() == b.as_raw(), "same decoded pixels");
    }

    #[test]
    fn transparent_pixels_become_white() {
        let jpeg = png_to_jpeg(&png(16, 16, png::ColorType::Rgba, &[0, 0, 0, 0]), 90).unwrap();
        let decoded = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert!(decoded.get_pixel(8, 8)[0] > 240);
        let jpeg = png_to_jpeg_threads(&png(40, 100, png::ColorType::Rgba, &[0, 0, 0, 0]), 90, 4).unwrap();
        let decoded = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (40, 100));
        assert!(decoded.get_pixel(20, 90)[0] > 240);
    }

    #[test]
    fn broken_png_is_an_error_not_a_panic() {
        assert!(png_to_jpeg(b"\x89PNG\r\n\x1a\nnot really", 90).is_err());
        assert!(png_to_jpeg(b"", 90).is_err());
        // A valid header whose pixel data is cut short fails in a strip, not a panic.
        let full = png_of(64, 256, png::ColorType::Rgb, &noise(64 * 256 * 3));
        assert!(png_to_jpeg_threads(&full[..full.len() / 2], 90, 4).is_err());
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

    #[test]
    fn raw_pixels_become_byte_for_byte_the_jpeg_their_png_becomes() {
        let (w, h) = (203, 77);
        let rgb = noise((w * h * 3) as usize);
        for threads in [1, 2, 8] {
            let from_png = png_to_jpeg_threads(&png_of(w, h, png::ColorType::Rgb, &rgb), 90, threads).unwrap();
            assert_eq!(raster_to_jpeg_threads(&rgb, w, h, 3, 90, threads).unwrap(), from_png, "{threads} threads");
        }
        let rgba = noise((w * h * 4) as usize);
        let from_png = png_to_jpeg_threads(&png_of(w, h, png::ColorType::Rgba, &rgba), 85, 4).unwrap();
        assert_eq!(raster_to_jpeg_threads(&rgba, w, h, 4, 85, 4).unwrap(), from_png);
        let grey = noise((w * h) as usize);
        let from_png = png_to_jpeg_threads(&png_of(w, h, png::ColorType::Grayscale, &grey), 90, 3).unwrap();
        assert_eq!(raster_to_jpeg_threads(&grey, w, h, 1, 90, 3).unwrap(), from_png);
    }

    #[test]
    fn raw_pixels_of_the_wrong_size_or_shape_are_errors() {
        assert!(raster_to_jpeg(&[0; 11], 2, 2, 3, 90).unwrap_err().to_string().contains("not 2x2 pixels"));
        assert!(raster_to_jpeg(&[0; 20], 2, 2, 5, 90).is_err());
        assert!(raster_to_jpeg(&[], 0, 0, 3, 90).is_err());
        assert!(raster_to_png(&[0; 11], 2, 2, 3).is_err());
    }

    #[test]
    fn raw_pixels_as_png_decode_to_the_same_pixels() {
        let rgb = noise(31 * 17 * 3);
        let png_bytes = raster_to_png(&rgb, 31, 17, 3).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(&png_bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (31, 17));
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
    }

    #[test]
    fn the_thread_count_follows_the_setting_else_the_cores_up_to_eight() {
        assert_eq!(threads_from(None, 16), 8);
        assert_eq!(threads_from(None, 2), 2);
        assert_eq!(threads_from(Some("16"), 4), 16);
        assert_eq!(threads_from(Some("0"), 4), 1);
        assert_eq!(threads_from(Some("many"), 4), 4);
    }
}
