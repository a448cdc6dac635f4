//! The queue worker: runs one prompt at a time in queue order and emits ComfyUI's real message sequence
//! (status, execution_start, execution_cached, per node progress_state/executing/progress/executed,
//! execution_success | execution_error | execution_interrupted, status, executing(null)); writes real
//! output files sized from the graph; applies the fault knobs; records history entries.
//!
//! Must never: send execution events to a socket other than the prompt's `client_id` (except the
//! broadcast kinds ComfyUI broadcasts when there is no client), or write outside its output/temp dirs.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::render::{self, Fill, ImageSpec};
use crate::state::{QueueItem, Shared, lock, text_frame};
use crate::validate::annotated_path;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The worker loop; runs until the task is aborted.
pub(crate) async fn worker(s: Arc<Shared>) {
    loop {
        let item = loop {
            let notified = s.queue_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = lock(&s.queue);
                if let Some(item) = q.pop_next() {
                    q.running = Some(item.clone());
                    break item;
                }
            }
            notified.await;
        };
        s.broadcast_status();
        let entry = run_prompt(&s, &item).await;
        if s.keep_record && entry["status"]["completed"] == json!(true) {
            s.record().completed.push(item.prompt_id.clone());
        }
        {
            let mut q = lock(&s.queue);
            q.history.insert(item.prompt_id.clone(), entry);
            while q.history.len() > s.max_history {
                let Some(oldest) = q.history.keys().next().cloned() else { break };
                q.history.shift_remove(&oldest);
            }
            q.running = None;
        }
        *lock(&s.exec) = Default::default();
        s.broadcast_status();
        if let Some(client) = item.client_id() {
            s.send_json("executing", json!({"node": null, "prompt_id": item.prompt_id}), Some(&client));
        }
    }
}

enum Stop {
    Error { node: String, class: String, exception_type: String, message: String },
    Interrupted { node: String, class: String },
}

struct Run<'a> {
    s: &'a Shared,
    prompt_id: String,
    client: Option<String>,
    progress: Map<String, Value>,
    progress_events: u32,
    dropped: bool,
}

impl Run<'_> {
    /// Events ComfyUI only sends when the prompt has a client_id.
    fn send_client(&self, kind: &str, data: Value) {
        if let Some(c) = &self.client {
            self.s.send_json(kind, data, Some(c));
        }
    }

    /// Events ComfyUI sends to the client, or to everyone when there is none.
    fn send_client_or_all(&mut self, kind: &str, data: Value) {
        self.s.send(text_frame(kind, data), self.client.as_deref());
        if kind == "progress" || kind == "progress_state" {
            self.progress_events += 1;
            if let Some(limit) = self.s.faults.settings().drop_ws_after
                && !self.dropped
                && self.progress_events >= limit
            {
                self.dropped = true;
                tracing::info!(prompt_id = %self.prompt_id, "fault: dropping all websockets");
                self.s.drop_all_sockets();
            }
        }
    }

    fn set_progress(&mut self, node: &str, value: Value, max: Value, state: &str) {
        self.progress.insert(
            node.to_string(),
            json!({"value": value, "max": max, "state": state, "node_id": node, "prompt_id": self.prompt_id,
                   "display_node_id": node, "parent_node_id": null, "real_node_id": node}),
        );
        let data = json!({"prompt_id": self.prompt_id, "nodes": self.progress});
        self.send_client_or_all("progress_state", data);
    }

    fn interrupted(&self) -> bool {
        self.s.interrupt.load(Ordering::SeqCst)
    }
}

/// Nodes needed by the outputs, dependencies first. Iterative (an explicit stack), so no graph depth
/// can overflow the thread's stack.
fn execution_order(graph: &Map<String, Value>, outputs: &[String]) -> Vec<String> {
    let sources = |id: &str| -> Vec<String> {
        graph
            .get(id)
            .and_then(|n| n.get("inputs"))
            .and_then(Value::as_object)
            .map(|inputs| inputs.values().filter_map(link_source).filter(|src| graph.contains_key(*src)).map(str::to_string).collect())
            .unwrap_or_default()
    };
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for o in outputs {
        if !seen.insert(o.clone()) {
            continue;
        }
        // (node, its sources, next source to visit): the same order as visiting recursively.
        let mut stack: Vec<(String, Vec<String>, usize)> = vec![(o.clone(), sources(o), 0)];
        while let Some((id, srcs, next)) = stack.last_mut() {
            if let Some(src) = srcs.get(*next).cloned() {
                *next += 1;
                if seen.insert(src.clone()) {
                    let s = sources(&src);
                    stack.push((src, s, 0));
                }
                continue;
            }
            order.push(std::mem::take(id));
            stack.pop();
        }
    }
    order
}

fn link_source(v: &Value) -> Option<&str> {
    match v.as_array() {
        Some(a) if a.len() == 2 && a[1].is_number() => a[0].as_str(),
        _ => None,
    }
}

fn class_of<'g>(graph: &'g Map<String, Value>, id: &str) -> &'g str {
    graph.get(id).and_then(|n| n.get("class_type")).and_then(Value::as_str).unwrap_or_default()
}

fn input<'g>(graph: &'g Map<String, Value>, id: &str, name: &str) -> Option<&'g Value> {
    graph.get(id)?.get("inputs")?.get(name)
}

fn input_u64(graph: &Map<String, Value>, id: &str, name: &str) -> Option<u64> {
    input(graph, id, name).and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)))
}

fn input_f64(graph: &Map<String, Value>, id: &str, name: &str) -> Option<f64> {
    input(graph, id, name).and_then(Value::as_f64)
}

/// Nodes that never come from the cache: SaveImageWebsocket has no IS_CHANGED but its cached
/// run would send nothing; FlowhostImageOutput's IS_CHANGED returns NaN for that reason.
const UNCACHEABLE: &[&str] = &["SaveImageWebsocket", "FlowhostImageOutput"];

/// ComfyUI-like input signature: class + literal inputs + signatures of linked nodes.
fn signatures(s: &Shared, graph: &Map<String, Value>, order: &[String], run_nonce: u64) -> HashMap<String, String> {
    let mut sigs: HashMap<String, String> = HashMap::new();
    for id in order {
        let class = class_of(graph, id);
        let mut parts = vec![id.clone(), class.to_string()];
        if let Some(inputs) = graph.get(id).and_then(|n| n.get("inputs")).and_then(Value::as_object) {
            for (name, v) in inputs {
                match link_source(v) {
                    Some(src) => parts.push(format!("{name}=<{}>{}", sigs.get(src).cloned().unwrap_or_default(), v[1])),
                    None => parts.push(format!("{name}={v}")),
                }
            }
        }
        if class == "LoadImage"
            && let Some(p) = input(graph, id, "image").and_then(Value::as_str).and_then(|v| annotated_path(v, &s.input_dir, &s.output_dir, &s.temp_dir))
            && let Ok(meta) = std::fs::metadata(&p)
        {
            parts.push(format!("{:?}{}", meta.modified().ok(), meta.len()));
        }
        if UNCACHEABLE.contains(&class) {
            parts.push(format!("nonce{run_nonce}"));
        }
        sigs.insert(id.clone(), parts.join("\u{1f}"));
    }
    sigs
}

/// The image batch each node produces, traced from its sources.
fn image_spec(s: &Shared, graph: &Map<String, Value>, id: &str, memo: &mut HashMap<String, Option<ImageSpec>>, depth: u32) -> Option<ImageSpec> {
    if let Some(v) = memo.get(id) {
        return v.clone();
    }
    if depth > 256 {
        return None;
    }
    let class = class_of(graph, id);
    let upstream = |name: &str, memo: &mut HashMap<String, Option<ImageSpec>>| -> Option<ImageSpec> {
        let src = input(graph, id, name).and_then(link_source)?;
        image_spec(s, graph, src, memo, depth + 1)
    };
    let dim = |name: &str| input_u64(graph, id, name).map(|v| v.min(16384) as u32);
    let spec = match class {
        "EmptyImage" => Some(ImageSpec {
            width: dim("width").unwrap_or(512).max(1),
            height: dim("height").unwrap_or(512).max(1),
            batch: dim("batch_size").unwrap_or(1).clamp(1, 64),
            fill: Fill::Solid(input_u64(graph, id, "color").unwrap_or(0) as u32),
        }),
        c if c.starts_with("Empty") && c.contains("Latent") => Some(ImageSpec {
            width: dim("width").unwrap_or(512).max(1),
            height: dim("height").unwrap_or(512).max(1),
            batch: dim("batch_size").unwrap_or(1).clamp(1, 64),
            fill: Fill::Seeded(0),
        }),
        "KSampler" | "SamplerCustom" | "KSamplerAdvanced" => {
            let seed = input_u64(graph, id, "seed").or_else(|| input_u64(graph, id, "noise_seed")).unwrap_or(0);
            upstream("latent_image", memo).map(|l| ImageSpec { fill: Fill::Seeded(seed), ..l })
        }
        "SamplerCustomAdvanced" => {
            let seed = input(graph, id, "noise").and_then(link_source).and_then(|n| input_u64(graph, n, "noise_seed")).unwrap_or(0);
            upstream("latent_image", memo).map(|l| ImageSpec { fill: Fill::Seeded(seed), ..l })
        }
        "ImageScale" | "LatentUpscale" => {
            let src = upstream(if class == "ImageScale" { "image" } else { "samples" }, memo).unwrap_or_default();
            let (w, h) = (dim("width").unwrap_or(0), dim("height").unwrap_or(0));
            let (w, h) = match (w, h) {
                (0, 0) => (src.width, src.height),
                (0, h) => (((src.width as f64) * h as f64 / src.height as f64).round().max(1.0) as u32, h),
                (w, 0) => (w, ((src.height as f64) * w as f64 / src.width as f64).round().max(1.0) as u32),
                wh => wh,
            };
            // Images are resized for real (latents keep their pattern: a latent has no pixels).
            let method = input(graph, id, "upscale_method").and_then(Value::as_str).unwrap_or("bilinear");
            let center = input(graph, id, "crop").and_then(Value::as_str) == Some("center");
            let real = if class == "ImageScale" { render::scale(&src, w, h, method, center) } else { None };
            real.or(Some(ImageSpec { width: w, height: h, ..src }))
        }
        "ImageScaleBy" | "LatentUpscaleBy" => {
            let src = upstream(if class == "ImageScaleBy" { "image" } else { "samples" }, memo).unwrap_or_default();
            let k = input_f64(graph, id, "scale_by").unwrap_or(1.0);
            let (w, h) = (((src.width as f64 * k).round() as u32).clamp(1, 16384), ((src.height as f64 * k).round() as u32).clamp(1, 16384));
            let method = input(graph, id, "upscale_method").and_then(Value::as_str).unwrap_or("bilinear");
            let real = if class == "ImageScaleBy" { render::scale(&src, w, h, method, false) } else { None };
            real.or(Some(ImageSpec { width: w, height: h, ..src }))
        }
        "ImageInvert" => {
            let src = upstream("image", memo).unwrap_or_default();
            render::invert(&src).or(Some(src))
        }
        "ImageCrop" => {
            let src = upstream("image", memo).unwrap_or_default();
            let (w, h) = (dim("width").unwrap_or(512).max(1), dim("height").unwrap_or(512).max(1));
            let (x, y) = (dim("x").unwrap_or(0), dim("y").unwrap_or(0));
            render::crop(&src, w, h, x, y).or_else(|| {
                let (x, y) = (x.min(src.width.saturating_sub(1)), y.min(src.height.saturating_sub(1)));
                Some(ImageSpec { width: w.min(src.width - x).max(1), height: h.min(src.height - y).max(1), ..src })
            })
        }
        "ImageBlur" => {
            let src = upstream("image", memo).unwrap_or_default();
            let radius = input_u64(graph, id, "blur_radius").unwrap_or(1);
            let sigma = input_f64(graph, id, "sigma").unwrap_or(1.0);
            render::blur(&src, radius, sigma).or(Some(src))
        }
        "ImageScaleToTotalPixels" => {
            let src = upstream("image", memo).unwrap_or_default();
            let mp = input_f64(graph, id, "megapixels").unwrap_or(1.0);
            let k = (mp * 1024.0 * 1024.0 / (src.width as f64 * src.height as f64)).sqrt();
            Some(ImageSpec { width: (src.width as f64 * k).round().max(1.0) as u32, height: (src.height as f64 * k).round().max(1.0) as u32, ..src })
        }
        "ImageUpscaleWithModel" => {
            let src = upstream("image", memo).unwrap_or_default();
            Some(ImageSpec { width: (src.width * 4).min(16384), height: (src.height * 4).min(16384), ..src })
        }
        "LoadImage" => {
            let path = input(graph, id, "image").and_then(Value::as_str).and_then(|v| annotated_path(v, &s.input_dir, &s.output_dir, &s.temp_dir));
            let bytes = path.and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
            // The file's own pixels; a file that does not decode (or is huge) keeps its size only.
            render::decode(&bytes).or_else(|| {
                let (w, h) = render::image_size(&bytes).unwrap_or((512, 512));
                let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
                Some(ImageSpec { width: w.max(1), height: h.max(1), batch: 1, fill: Fill::Seeded(hash) })
            })
        }
        _ => {
            let mut found = None;
            if let Some(inputs) = graph.get(id).and_then(|n| n.get("inputs")).and_then(Value::as_object) {
                for v in inputs.values() {
                    if let Some(src) = link_source(v)
                        && let Some(spec) = image_spec(s, graph, src, memo, depth + 1)
                    {
                        found = Some(spec);
                        break;
                    }
                }
            }
            found
        }
    };
    memo.insert(id.to_string(), spec.clone());
    spec
}

fn safe_rel(p: &str) -> bool {
    Path::new(p).components().all(|c| matches!(c, Component::Normal(_)))
}

/// ComfyUI's `get_save_image_path`: (subfolder, name, next counter) for a prefix in `dir`.
fn save_path(dir: &Path, prefix: &str) -> Result<(String, String, u32), String> {
    let (subfolder, name) = match prefix.rsplit_once('/') {
        Some((sub, name)) => (sub.to_string(), name.to_string()),
        None => (String::new(), prefix.to_string()),
    };
    if !subfolder.is_empty() && !safe_rel(&subfolder) || name.contains("..") {
        return Err(format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}",
            dir.join(&subfolder).display(),
            dir.display()
        ));
    }
    let folder = dir.join(&subfolder);
    let mut counter = 0u32;
    if let Ok(entries) = std::fs::read_dir(&folder) {
        for e in entries.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = f.strip_prefix(&format!("{name}_"))
                && let Some((digits, _)) = rest.split_once('_')
                && let Ok(n) = digits.parse::<u32>()
            {
                counter = counter.max(n);
            }
        }
    }
    Ok((subfolder, name, counter + 1))
}

/// Runs an output node's side effects; returns its UI output (None for nodes without one).
fn write_outputs(
    s: &Shared,
    graph: &Map<String, Value>,
    extra_pnginfo: Option<&Map<String, Value>>,
    id: &str,
    spec: ImageSpec,
) -> Result<Option<Value>, (String, String)> {
    let class = class_of(graph, id);
    let io_err = |e: std::io::Error| ("OSError".to_string(), e.to_string());
    let any_err = |e: anyhow::Error| ("RuntimeError".to_string(), format!("{e:#}"));
    match class {
        "SaveImage" | "PreviewImage" => {
            let (dir, prefix, kind) = if class == "SaveImage" {
                let prefix = input(graph, id, "filename_prefix").and_then(Value::as_str).unwrap_or("ComfyUI").to_string();
                (&s.output_dir, prefix, "output")
            } else {
                (&s.temp_dir, format!("ComfyUI{}", s.temp_prefix), "temp")
            };
            let (subfolder, name, mut counter) = save_path(dir, &prefix).map_err(|m| ("Exception".to_string(), m))?;
            std::fs::create_dir_all(dir.join(&subfolder)).map_err(io_err)?;
            let mut texts = vec![("prompt".to_string(), render::py_json(&Value::Object(graph.clone())))];
            if let Some(extra) = extra_pnginfo {
                texts.extend(extra.iter().map(|(k, v)| (k.clone(), render::py_json(v))));
            }
            let mut images = Vec::new();
            for i in 0..spec.batch {
                let file = format!("{name}_{counter:05}_.png");
                let png = render::encode_png_with_text(spec.width, spec.height, &render::pixels(&spec, i), &texts).map_err(any_err)?;
                std::fs::write(dir.join(&subfolder).join(&file), png).map_err(io_err)?;
                images.push(json!({"filename": file, "subfolder": subfolder, "type": kind}));
                counter += 1;
            }
            Ok(Some(json!({"images": images})))
        }
        "SaveAnimatedWEBP" | "SaveAnimatedPNG" => {
            let prefix = input(graph, id, "filename_prefix").and_then(Value::as_str).unwrap_or("ComfyUI").to_string();
            let (subfolder, name, counter) = save_path(&s.output_dir, &prefix).map_err(|m| ("Exception".to_string(), m))?;
            std::fs::create_dir_all(s.output_dir.join(&subfolder)).map_err(io_err)?;
            let fps = input_f64(graph, id, "fps").unwrap_or(6.0);
            let (bytes, ext) = if class == "SaveAnimatedWEBP" {
                (render::encode_animated_webp(&spec, fps).map_err(any_err)?, "webp")
            } else {
                (render::encode_apng(&spec, fps).map_err(any_err)?, "png")
            };
            let file = format!("{name}_{counter:05}_.{ext}");
            std::fs::write(s.output_dir.join(&subfolder).join(&file), bytes).map_err(io_err)?;
            Ok(Some(json!({"images": [{"filename": file, "subfolder": subfolder, "type": "output"}], "animated": [true]})))
        }
        _ => Ok(None),
    }
}

fn sampler_steps(graph: &Map<String, Value>, id: &str) -> Option<u64> {
    match class_of(graph, id) {
        "KSampler" | "KSamplerAdvanced" | "SamplerCustom" => input_u64(graph, id, "steps").or(Some(1)),
        "SamplerCustomAdvanced" => {
            let sigmas = input(graph, id, "sigmas").and_then(link_source);
            Some(sigmas.and_then(|s| input_u64(graph, s, "steps")).unwrap_or(1))
        }
        _ => None,
    }
}

const TRACEBACK: &[&str] = &[
    "  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n",
    "  File \"/opt/ComfyUI/execution.py\", line 315, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n",
    "  File \"/opt/ComfyUI/execution.py\", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n",
    "  File \"/opt/ComfyUI/execution.py\", line 277, in process_inputs\n    result = f(**inputs)\n             ^^^^^^^^^^^\n",
];

/// Sleeps `d` unless the prompt is interrupted or the double crashes first; true = interrupted.
async fn pause(s: &Shared, d: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        if s.interrupt.load(Ordering::SeqCst) {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(20))).await;
    }
}

/// The signature of the models a graph loads (checkpoint or diffusion model, LoRAs with
/// their strengths), sorted so node order does not matter; `None` when it loads none.
fn model_set(graph: &Map<String, Value>) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for node in graph.values() {
        let inputs = &node["inputs"];
        let text = |k: &str| inputs[k].as_str().unwrap_or_default().to_string();
        let num = |k: &str| inputs[k].as_f64().map(|v| format!("{v:.3}")).unwrap_or_default();
        match node["class_type"].as_str().unwrap_or_default() {
            "UNETLoader" => parts.push(format!("unet:{}:{}", text("unet_name"), text("weight_dtype"))),
            "CheckpointLoaderSimple" => parts.push(format!("ckpt:{}", text("ckpt_name"))),
            "LoraLoader" => parts.push(format!("lora:{}:{}:{}", text("lora_name"), num("strength_model"), num("strength_clip"))),
            "LoraLoaderModelOnly" => parts.push(format!("lora:{}:{}", text("lora_name"), num("strength_model"))),
            _ => {}
        }
    }
    parts.sort();
    (!parts.is_empty()).then(|| parts.join("|"))
}

/// Executes one prompt and returns its history entry.
async fn run_prompt(s: &Shared, item: &QueueItem) -> Value {
    let graph = item.prompt.as_object().cloned().unwrap_or_default();
    let client = item.client_id();
    *lock(&s.exec) = crate::state::ExecState { prompt_id: Some(item.prompt_id.clone()), client_id: client.clone(), last_node: None };
    s.interrupt.store(false, Ordering::SeqCst);
    let mut run = Run { s, prompt_id: item.prompt_id.clone(), client, progress: Map::new(), progress_events: 0, dropped: false };
    let mut messages: Vec<Value> = Vec::new();

    let start = json!({"prompt_id": item.prompt_id, "timestamp": now_ms()});
    run.send_client("execution_start", start.clone());
    messages.push(json!(["execution_start", start]));

    let order = execution_order(&graph, &item.outputs);
    let sigs = signatures(s, &graph, &order, item.seq);
    // While an execution fault is armed nothing is served from cache, so the fault always fires.
    let armed = {
        let f = s.faults.settings();
        f.hang || f.fail_at.is_some() || !f.step_latency.is_zero()
    };
    let cached: HashMap<String, Option<Value>> = if armed {
        HashMap::new()
    } else {
        let cache = lock(&s.cache);
        order.iter().filter_map(|id| cache.get(&sigs[id]).map(|ui| (id.clone(), ui.clone()))).collect()
    };
    let cached_ids: Vec<&String> = graph.keys().filter(|k| cached.contains_key(*k)).collect();
    let cached_msg = json!({"nodes": cached_ids, "prompt_id": item.prompt_id, "timestamp": now_ms()});
    run.send_client("execution_cached", cached_msg.clone());
    messages.push(json!(["execution_cached", cached_msg]));

    // Another model set than the last prompt's: the "GPU" loads it first (interruptible).
    if let Some(set) = model_set(&graph) {
        let switched = {
            let mut models = lock(&s.loaded_models);
            let switched = models.loaded.as_deref() != Some(set.as_str());
            if switched {
                models.loaded = Some(set);
                models.switches += 1;
            }
            switched
        };
        let cost = s.faults.settings().model_switch;
        if switched && !cost.is_zero() {
            pause(s, cost).await;
        }
    }

    let mut memo = HashMap::new();
    let mut outputs = Map::new();
    let mut meta = Map::new();
    let mut executed: Vec<String> = Vec::new();
    let mut stop: Option<Stop> = None;

    for id in &order {
        let class = class_of(&graph, id).to_string();
        if let Some(ui) = cached.get(id) {
            if let Some(ui) = ui {
                run.send_client("executed", json!({"node": id, "display_node": id, "output": ui, "prompt_id": item.prompt_id}));
                outputs.insert(id.clone(), ui.clone());
                meta.insert(id.clone(), json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}));
                run.set_progress(id, json!(1), json!(1), "finished");
            }
            continue;
        }
        run.set_progress(id, json!(0.0), json!(1.0), "running");
        lock(&s.exec).last_node = Some(id.clone());
        run.send_client("executing", json!({"node": id, "display_node": id, "prompt_id": item.prompt_id}));
        if run.interrupted() {
            stop = Some(Stop::Interrupted { node: id.clone(), class });
            break;
        }
        let faults = s.faults.settings();
        if let Some(f) = &faults.fail_at
            && (f.class_or_node_id == class || &f.class_or_node_id == id)
        {
            stop = Some(Stop::Error { node: id.clone(), class, exception_type: f.exception_type.clone(), message: f.message.clone() });
            break;
        }
        if faults.hang {
            loop {
                if run.interrupted() {
                    break;
                }
                if !s.faults.settings().hang {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if run.interrupted() {
                stop = Some(Stop::Interrupted { node: id.clone(), class });
                break;
            }
        }
        // Real ComfyUI opens the file when LoadImage executes: one removed since validation
        // (another request's cleanup, say) fails the node, it never reads as an empty image.
        if class == "LoadImage"
            && let Some(path) = input(&graph, id, "image").and_then(Value::as_str).and_then(|v| annotated_path(v, &s.input_dir, &s.output_dir, &s.temp_dir))
            && !path.is_file()
        {
            let message = format!("[Errno 2] No such file or directory: '{}'", path.display());
            stop = Some(Stop::Error { node: id.clone(), class, exception_type: "FileNotFoundError".into(), message });
            break;
        }
        let latency = faults.step_latency;
        let spec = image_spec(s, &graph, id, &mut memo, 0).unwrap_or_default();
        if let Some(steps) = sampler_steps(&graph, id) {
            let steps = steps.clamp(1, 10_000);
            let mut was_interrupted = false;
            for step in 1..=steps {
                if pause(s, latency).await {
                    was_interrupted = true;
                    break;
                }
                run.set_progress(id, json!(step), json!(steps), "running");
                run.send_client_or_all("progress", json!({"value": step, "max": steps, "prompt_id": item.prompt_id, "node": id}));
                if s.preview_method.is_some() {
                    // As ComfyUI's latent previews: a small JPEG from the sampler after each step.
                    if let Some(jpeg) = render::preview_jpeg(step, steps) {
                        let metadata = format!(
                            "{{\"node_id\": {id}, \"prompt_id\": {pid}, \"display_node_id\": {id}, \"parent_node_id\": null, \"real_node_id\": {id}, \"image_type\": \"image/jpeg\"}}",
                            id = Value::from(id.as_str()),
                            pid = Value::from(item.prompt_id.as_str()),
                        );
                        s.send_image(&jpeg, 1, &metadata, run.client.as_deref());
                    }
                }
            }
            if was_interrupted {
                stop = Some(Stop::Interrupted { node: id.clone(), class });
                break;
            }
            run.set_progress(id, json!(steps), json!(steps), "finished");
        } else if class == "SaveImageWebsocket" {
            pause(s, latency).await;
            let n = spec.batch;
            let metadata = format!(
                "{{\"node_id\": {}, \"prompt_id\": {}, \"display_node_id\": {}, \"parent_node_id\": null, \"real_node_id\": {}, \"image_type\": \"image/png\"}}",
                Value::from(id.as_str()),
                Value::from(item.prompt_id.as_str()),
                Value::from(id.as_str()),
                Value::from(id.as_str())
            );
            let mut failure = None;
            for i in 0..n {
                run.set_progress(id, json!(i), json!(n), "running");
                match render::encode_png(spec.width, spec.height, &render::pixels(&spec, i)) {
                    Ok(png) => s.send_preview(&png, &metadata, run.client.as_deref()),
                    Err(e) => {
                        failure = Some(format!("{e:#}"));
                        break;
                    }
                }
                run.send_client_or_all("progress", json!({"value": i, "max": n, "prompt_id": item.prompt_id, "node": id}));
            }
            if let Some(message) = failure {
                stop = Some(Stop::Error { node: id.clone(), class, exception_type: "RuntimeError".into(), message });
                break;
            }
            run.set_progress(id, json!(n), json!(n), "finished");
        } else if class == "FlowhostImageOutput" && s.flowhost_nodes {
            // flowhost's node (comfy/comfyui_nodes/flowhost): each image as raw 8-bit RGB, one
            // frame per image to the prompt's client, then its `ui` lists what it sent.
            pause(s, latency).await;
            let prefix = input(&graph, id, "filename_prefix").and_then(Value::as_str).unwrap_or("ComfyUI").to_string();
            let n = spec.batch;
            let mut sent = Vec::new();
            for i in 0..n {
                let filename = format!("{prefix}_{:05}_.png", i + 1);
                let header = json!({
                    "version": 1, "prompt_id": item.prompt_id, "node_id": id, "index": i, "count": n,
                    "width": spec.width, "height": spec.height, "channels": 3, "dtype": "uint8", "layout": "hwc", "filename": filename,
                });
                if run.client.is_none() {
                    continue; // the real node sends nothing to a prompt without a client (and lists nothing)
                }
                if s.faults.settings().drop_ws_on_raster {
                    s.drop_all_sockets();
                } else {
                    s.send_raster(&header.to_string(), &render::pixels(&spec, i), run.client.as_deref());
                }
                sent.push(json!({"index": i, "width": spec.width, "height": spec.height, "channels": 3, "name": filename}));
            }
            let ui = json!({"flowhost_rasters": sent});
            run.send_client("executed", json!({"node": id, "display_node": id, "output": ui, "prompt_id": item.prompt_id}));
            outputs.insert(id.clone(), ui);
            meta.insert(id.clone(), json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}));
            run.set_progress(id, json!(1.0), json!(1.0), "finished");
        } else {
            if pause(s, latency).await {
                // ComfyUI notices an interrupt only when the next node starts.
            }
            let extra_pnginfo = item.extra_data.get("extra_pnginfo").and_then(Value::as_object);
            match write_outputs(s, &graph, extra_pnginfo, id, spec) {
                Ok(Some(ui)) => {
                    run.send_client("executed", json!({"node": id, "display_node": id, "output": ui, "prompt_id": item.prompt_id}));
                    outputs.insert(id.clone(), ui);
                    meta.insert(id.clone(), json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}));
                }
                Ok(None) => {}
                Err((exception_type, message)) => {
                    stop = Some(Stop::Error { node: id.clone(), class, exception_type, message });
                    break;
                }
            }
            run.set_progress(id, json!(1.0), json!(1.0), "finished");
        }
        executed.push(id.clone());
        lock(&s.cache).insert(sigs[id].clone(), outputs.get(id).cloned());
    }

    // ComfyUI's classic cache keeps only what the last prompt used.
    {
        let keep: HashSet<&String> = sigs.values().collect();
        lock(&s.cache).retain(|k, _| keep.contains(k));
    }

    let (status_str, completed) = match stop {
        None => {
            let data = json!({"prompt_id": item.prompt_id, "timestamp": now_ms()});
            run.send_client("execution_success", data.clone());
            messages.push(json!(["execution_success", data]));
            ("success", true)
        }
        Some(Stop::Error { node, class, exception_type, message }) => {
            let current_inputs: Map<String, Value> = graph
                .get(&node)
                .and_then(|n| n.get("inputs"))
                .and_then(Value::as_object)
                .map(|inputs| {
                    inputs
                        .iter()
                        .map(|(k, v)| (k.clone(), if link_source(v).is_some() { json!(["<linked output>"]) } else { json!([v]) }))
                        .collect()
                })
                .unwrap_or_default();
            let data = json!({
                "prompt_id": item.prompt_id, "node_id": node, "node_type": class, "executed": executed,
                "exception_message": message, "exception_type": exception_type, "traceback": TRACEBACK,
                "current_inputs": current_inputs, "current_outputs": graph.keys().collect::<Vec<_>>(), "timestamp": now_ms()
            });
            run.send_client("execution_error", data.clone());
            messages.push(json!(["execution_error", data]));
            ("error", false)
        }
        Some(Stop::Interrupted { node, class }) => {
            let data = json!({"prompt_id": item.prompt_id, "node_id": node, "node_type": class, "executed": executed, "timestamp": now_ms()});
            run.send_client_or_all("execution_interrupted", data.clone());
            messages.push(json!(["execution_interrupted", data]));
            ("error", false)
        }
    };
    json!({
        "prompt": item.to_json(),
        "outputs": outputs,
        "status": {"status_str": status_str, "completed": completed, "messages": messages},
        "meta": meta
    })
}

#[cfg(test)]
mod model_set_tests {
    use super::*;

    #[test]
    fn a_model_set_is_the_loaders_in_any_order_and_a_strength_change_is_another_set() {
        let graph = |strength: f64, flip: bool| -> Map<String, Value> {
            let unet = json!({"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}});
            let lora = json!({"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "a.safetensors", "strength_model": strength, "model": ["1", 0]}});
            let (a, b) = if flip { ("2", "1") } else { ("1", "2") };
            let mut m = Map::new();
            m.insert(a.into(), unet);
            m.insert(b.into(), lora);
            m.insert("3".into(), json!({"class_type": "KSampler", "inputs": {}}));
            m
        };
        assert_eq!(model_set(&graph(0.8, false)), model_set(&graph(0.8, true)));
        assert_ne!(model_set(&graph(0.8, false)), model_set(&graph(1.0, false)));
        let none: Map<String, Value> = json!({"1": {"class_type": "EmptyImage", "inputs": {}}}).as_object().cloned().unwrap();
        assert_eq!(model_set(&none), None);
    }
}
