//! The model cache (issue #24): a cold fetch of a 150 MB LoRA from a loopback file server
//! into `--model-cache` (throughput, this process's CPU time, peak memory while downloading),
//! and what a cache hit adds to a job (URL check + lookup + pin + unpin).
//!
//! The file server is `python3 -m http.server` in a child process, so the CPU and memory
//! figures are flowhost's side only. `cargo run --release -p flowhost-benches --bin model_fetch`
//! (`MODEL_FETCH_MB=150`, `MODEL_FETCH_RUNS=3`).

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flowhost::models::cache::{CacheConfig, Expected, ModelCache, ModelSource};
use flowhost::net::destination::DestinationPolicy;
use flowhost::net::fetch::{FetchLimits, Fetcher};
use flowhost_benches::{row, summarize};

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / 100.0)
}

/// Resident set size now, bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(8765)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mb: usize = std::env::var("MODEL_FETCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
    let runs: usize = std::env::var("MODEL_FETCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let size = mb * 1_000_000;
    let served = tempfile::tempdir()?;
    // Written in 1 MB pieces: this process never holds the file.
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(served.path().join("lora.safetensors"))?);
        // A valid safetensors file of `size` bytes: one U8 tensor, the header padded to 256 bytes.
        let full_header = {
            let data_len = size - 8 - 256;
            let mut h =
                format!(r#"{{"__metadata__":{{"format":"pt"}},"lora_unet.weight":{{"dtype":"U8","shape":[{data_len}],"data_offsets":[0,{data_len}]}}}}"#);
            while h.len() < 256 {
                h.push(' ');
            }
            h
        };
        file.write_all(&(full_header.len() as u64).to_le_bytes())?;
        file.write_all(full_header.as_bytes())?;
        let chunk = vec![7u8; 1 << 20];
        let mut left = size - 8 - 256;
        while left > 0 {
            let n = left.min(chunk.len());
            file.write_all(&chunk[..n])?;
            left -= n;
        }
        file.flush()?;
    }
    let port = free_port();
    let mut server = std::process::Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(served.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting python3 -m http.server")?;
    let url = url::Url::parse(&format!("http://127.0.0.1:{port}/lora.safetensors"))?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let fetcher = Fetcher::new(DestinationPolicy::new(["127.0.0.1".to_owned()]), FetchLimits::default())?;
    println!("### Cold fetch of a {mb} MB LoRA from loopback (python3 http.server in a child process)\n");
    row(&["run".into(), "wall s".into(), "MB/s".into(), "CPU s (this process)".into(), "CPU s per 100 MB".into(), "peak RSS over baseline MiB".into()]);
    row(&["---".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into()]);
    for run in 1..=runs {
        let dir = tempfile::tempdir()?;
        let config = CacheConfig {
            root: dir.path().to_path_buf(),
            cap_bytes: 10 * size as u64,
            max_file_bytes: 2 * size as u64,
            fetch_timeout: Duration::from_secs(600),
        };
        let cache = ModelCache::open(config, fetcher.clone(), None, Arc::default())?;
        let baseline = rss();
        let peak = Arc::new(AtomicU64::new(baseline));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let (cpu0, t0) = (cpu_time(), Instant::now());
        let placed = cache.place("loras", &ModelSource::Url(url.clone()), &Expected::default(), tokio::time::Instant::now() + Duration::from_secs(600)).await?;
        let (wall, cpu) = (t0.elapsed(), cpu_time() - cpu0);
        done.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        anyhow::ensure!(placed.size == size as u64, "placed {} bytes", placed.size);
        let over = peak.load(Ordering::Relaxed).saturating_sub(baseline) as f64 / (1 << 20) as f64;
        row(&[
            run.to_string(),
            format!("{:.2}", wall.as_secs_f64()),
            format!("{:.0}", size as f64 / 1e6 / wall.as_secs_f64()),
            format!("{:.2}", cpu.as_secs_f64()),
            format!("{:.2}", cpu.as_secs_f64() / (size as f64 / 1e8)),
            format!("{over:.1}"),
        ]);
        drop(placed);
    }

    // Cache hits: what a job naming a cached LoRA by URL adds (URL check, lookup, pin, unpin).
    let dir = tempfile::tempdir()?;
    let config =
        CacheConfig { root: dir.path().to_path_buf(), cap_bytes: 10 * size as u64, max_file_bytes: 2 * size as u64, fetch_timeout: Duration::from_secs(600) };
    let cache = ModelCache::open(config, fetcher.clone(), None, Arc::default())?;
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(600);
    drop(cache.place("loras", &ModelSource::Url(url.clone()), &Expected::default(), deadline()).await?);
    let mut samples = Vec::with_capacity(20_000);
    for i in 0..20_000 {
        let t = Instant::now();
        let checked = fetcher.check(url.as_str())?;
        let pinned = cache.place("loras", &ModelSource::Url(checked), &Expected::default(), deadline()).await?;
        drop(pinned);
        if i >= 1000 {
            samples.push(t.elapsed());
        }
    }
    let hits = summarize(samples);
    println!("\n### A cache hit's added time per job (URL check + lookup + pin + unpin)\n");
    row(&["measure".into(), "p50 µs".into(), "p99 µs".into(), "mean µs".into(), "n".into()]);
    row(&["---".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into()]);
    row(&["cache hit".into(), format!("{:.1}", hits.p50_us), format!("{:.1}", hits.p99_us), format!("{:.1}", hits.mean_us), hits.n.to_string()]);
    let _ = server.kill();
    let _ = server.wait();
    Ok(())
}
