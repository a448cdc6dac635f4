//! PNG → JPEG, the part of every image request flowhost spends on its own CPU:
//! decode-only, encode-only and the whole conversion, single-threaded (the old
//! path) against `flowhost::media`'s strip-parallel encoder at several thread
//! counts, on a worst-case image; and raw pixels → JPEG (the raster transport,
//! where no PNG exists).
//!
//! ```sh
//! cargo run --release -p flowhost-benches --bin jpeg_bench                 # 1024² noise, generated
//! cargo run --release -p flowhost-benches --bin jpeg_bench -- a.png b.png   # PNGs ComfyUI wrote
//! ```
//!
//! Without arguments it makes a 1024×1024 RGB PNG of random samples (the worst case
//! for both codecs: nothing compresses, every coefficient is coded); for ComfyUI's
//! exact bytes pass the files it wrote (`SaveImage`: compress_level 4;
//! `SaveImageWebsocket`: compress_level 1). Quality 90, 4:2:0, as served.
//! Env: `JPEG_BENCH_N` (iterations, default 30), `JPEG_BENCH_THREADS` (comma list).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flowhost::media;

const QUALITY: u8 = 90;

fn main() -> Result<()> {
    let n: usize = std::env::var("JPEG_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let threads: Vec<usize> = match std::env::var("JPEG_BENCH_THREADS") {
        Ok(list) => list.split(',').filter_map(|t| t.trim().parse().ok()).collect(),
        Err(_) => [1, 2, 4, 8].into_iter().filter(|&t| t == 1 || t <= cores.max(2)).collect(),
    };
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    for path in std::env::args().skip(1) {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
        inputs.push((path, bytes));
    }
    if inputs.is_empty() {
        inputs.push(("generated 1024² RGB noise (png crate, default compression)".into(), noise_png(1024, 1024)?));
    }
    out(&format!(
        "cores: {cores}; default threads: {}; quality {QUALITY}; {n} iterations after 3 warm-up\n",
        media::default_threads()
    ));
    for (name, png_bytes) in &inputs {
        let (w, h, pixels) = decode(png_bytes)?;
        out(&format!("\n{name}: {w}×{h}, PNG {:.2} MiB\n\n", png_bytes.len() as f64 / 1048576.0));
        out("| step | threads | p50 ms | p90 ms | min ms | JPEG KiB |\n| --- | ---: | ---: | ---: | ---: | ---: |\n");
        let t = time(n, || decode(png_bytes).map(|_| 0));
        line("PNG decode alone", "1", &t, None);
        let t = time(n, || encode_plain(&pixels, w, h).map(|j| j.len()));
        line("JPEG encode alone (jpeg-encoder, one image)", "1", &t, Some(encode_plain(&pixels, w, h)?.len()));
        for &threads in &threads {
            let t = time(n, || media::png_to_jpeg_threads(png_bytes, QUALITY, threads).map(|j| j.len()));
            let size = media::png_to_jpeg_threads(png_bytes, QUALITY, threads)?.len();
            let label = if threads == 1 { "PNG → JPEG (old path: one thread, no restart markers)" } else { "PNG → JPEG, strips in parallel" };
            line(label, &threads.to_string(), &t, Some(size));
        }
        if pixels.len() == (w * h * 3) as usize {
            // The raster transport: the same pixels arrive raw, so only the encode is left.
            for &threads in &threads {
                let t = time(n, || media::raster_to_jpeg_threads(&pixels, w, h, 3, QUALITY, threads).map(|j| j.len()));
                let size = media::raster_to_jpeg_threads(&pixels, w, h, 3, QUALITY, threads)?.len();
                line("raw pixels → JPEG (raster transport), strips in parallel", &threads.to_string(), &t, Some(size));
            }
        }
    }
    Ok(())
}

fn decode(png_bytes: &[u8]) -> Result<(u32, u32, Vec<u8>)> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    decoder.set_ignore_text_chunk(true);
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0u8; reader.output_buffer_size().context("too large")?];
    let info = reader.next_frame(&mut buf)?;
    anyhow::ensure!(info.color_type == png::ColorType::Rgb, "the bench takes RGB PNGs (ComfyUI's)");
    buf.truncate(info.buffer_size());
    Ok((info.width, info.height, buf))
}

fn encode_plain(pixels: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, QUALITY);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    enc.encode(pixels, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)?;
    Ok(out)
}

fn noise_png(w: u32, h: u32) -> Result<Vec<u8>> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let data: Vec<u8> = (0..(w * h * 3))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&data)?;
    writer.finish()?;
    Ok(out)
}

fn time(n: usize, mut f: impl FnMut() -> Result<usize>) -> Vec<Duration> {
    for _ in 0..3 {
        let _ = std::hint::black_box(f());
    }
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let _ = std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    samples.sort();
    samples
}

fn line(step: &str, threads: &str, sorted: &[Duration], size: Option<usize>) {
    let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    let size = size.map(|s| format!("{:.0}", s as f64 / 1024.0)).unwrap_or_else(|| "–".into());
    out(&format!("| {step} | {threads} | {:.2} | {:.2} | {:.2} | {size} |\n", at(0.5), at(0.9), at(0.0)));
}

/// A bench binary's output is its table.
fn out(s: &str) {
    use std::io::Write;
    std::io::stdout().write_all(s.as_bytes()).ok();
}
