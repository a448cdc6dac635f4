//! ComfyUI's HTTP and websocket surface (every route also under `/api`), with the captured status
//! codes, empty bodies for mutating endpoints and 500 text/plain for unparsable prompts.
//!
//! Must never: answer with shapes the real server does not produce.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::UNIX_EPOCH;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Multipart, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::catalogue::{live_catalogue, live_node};
use crate::faults::UploadRecord;
use crate::models::FOLDER_NAMES;
use crate::state::{QueueItem, Shared, SocketHandle, lock, text_frame};
use crate::validate::{PromptCheck, ValidationContext, validate_prompt};

type S = State<Arc<Shared>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let routes = Router::new()
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_class))
        .route("/embeddings", get(embeddings))
        .route("/extensions", get(|| async { Json(json!([])) }))
        .route("/models", get(models))
        .route("/models/{folder}", get(models_folder))
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{id}", get(get_history_id))
        .route("/free", post(|| async { empty(StatusCode::OK) }))
        .route("/upload/image", post(upload_image))
        .route("/view", get(view))
        .route("/ws", get(ws));
    Router::new().merge(routes.clone()).nest("/api", routes).with_state(shared)
}

fn empty(status: StatusCode) -> Response {
    (status, Body::empty()).into_response()
}

fn server_trouble() -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "500 Internal Server Error\n\nServer got itself in trouble")
        .into_response()
}

async fn system_stats(State(s): S) -> Json<Value> {
    Json(json!({
        "system": {
            "os": "posix", "ram_total": 25276510208u64, "ram_free": 23603888128u64, "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10", "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]", "pytorch_version": "2.9.1+cu128",
            "embedded_python": false, "argv": s.argv
        },
        "devices": [{"name": "cpu", "type": "cpu", "index": null, "vram_total": 25276510208u64, "vram_free": 23603888128u64,
                     "torch_vram_total": 25276510208u64, "torch_vram_free": 23603888128u64}]
    }))
}

fn server_features() -> Value {
    json!({"supports_preview_metadata": true, "max_upload_size": 104857600})
}

async fn features() -> Json<Value> {
    Json(server_features())
}

async fn object_info(State(s): S) -> Json<Value> {
    Json(Value::Object(live_catalogue(s.flowhost_nodes, &s.models, &s.input_dir)))
}

async fn object_info_class(State(s): S, UrlPath(class): UrlPath<String>) -> Json<Value> {
    match live_node(&class, s.flowhost_nodes, &s.models, &s.input_dir) {
        Some(node) => Json(json!({ class: node })),
        None => Json(json!({})),
    }
}

async fn embeddings(State(s): S) -> Json<Value> {
    let names: Vec<String> = s.models.list("embeddings").into_iter().map(|f| f.rsplit_once('.').map(|(n, _)| n.to_string()).unwrap_or(f)).collect();
    Json(json!(names))
}

async fn models() -> Json<Value> {
    Json(json!(FOLDER_NAMES))
}

async fn models_folder(State(s): S, UrlPath(folder): UrlPath<String>) -> Response {
    if !s.models.is_known_folder(&folder) {
        return empty(StatusCode::NOT_FOUND);
    }
    Json(json!(s.models.list(&folder))).into_response()
}

async fn get_prompt(State(s): S) -> Json<Value> {
    Json(json!({"exec_info": {"queue_remaining": lock(&s.queue).remaining()}}))
}

async fn post_prompt(State(s): S, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else { return server_trouble() };
    let explicit_number = request.get("number").cloned();
    let number = match explicit_number {
        Some(n) => match n.as_f64().or_else(|| n.as_str().and_then(|t| t.trim().parse().ok())) {
            Some(f) => json!(f),
            None => return server_trouble(),
        },
        None => {
            let mut q = lock(&s.queue);
            let mut n = q.number;
            if request.get("front").and_then(Value::as_bool) == Some(true) {
                n = -n;
            }
            q.number += 1;
            json!(n)
        }
    };
    let Some(prompt) = request.get("prompt") else {
        let error = json!({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}});
        return (StatusCode::BAD_REQUEST, Json(json!({"error": error, "node_errors": {}}))).into_response();
    };
    let prompt_id = match request.get("prompt_id") {
        Some(Value::String(id)) => id.clone(),
        Some(other) => crate::validate::py_str(other),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let partial: Option<Vec<String>> =
        request.get("partial_execution_targets").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect());
    let ctx = ValidationContext { catalogue: crate::catalogue::catalogue(s.flowhost_nodes), models: &s.models, input_dir: &s.input_dir, output_dir: &s.output_dir, temp_dir: &s.temp_dir };
    let (check, coerced) = match validate_prompt(prompt, partial.as_deref(), &ctx) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(reason = %e.0, "POST /prompt: 500");
            return server_trouble();
        }
    };
    let mut extra_data = match request.get("extra_data") {
        None => json!({}),
        Some(Value::Object(m)) => Value::Object(m.clone()),
        Some(_) => return server_trouble(),
    };
    if let Some(client_id) = request.get("client_id") {
        extra_data["client_id"] = client_id.clone();
    }
    match check {
        PromptCheck::Accepted { outputs, node_errors } => {
            {
                let mut q = lock(&s.queue);
                q.seq += 1;
                let seq = q.seq;
                q.pending.push(QueueItem { number: number.clone(), seq, prompt_id: prompt_id.clone(), prompt: coerced, extra_data, outputs });
            }
            if s.keep_record {
                s.record().prompts.push((prompt_id.clone(), prompt.clone()));
            }
            s.broadcast_status();
            s.queue_notify.notify_waiters();
            Json(json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})).into_response()
        }
        PromptCheck::Rejected { error, node_errors } => {
            (StatusCode::BAD_REQUEST, Json(json!({"error": error, "node_errors": node_errors}))).into_response()
        }
    }
}

async fn get_queue(State(s): S) -> Json<Value> {
    let q = lock(&s.queue);
    let running: Vec<Value> = q.running.iter().map(QueueItem::to_json).collect();
    let pending: Vec<Value> = q.pending.iter().map(QueueItem::to_json).collect();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

async fn post_queue(State(s): S, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else { return server_trouble() };
    if request.get("clear").and_then(Value::as_bool) == Some(true) {
        lock(&s.queue).pending.clear();
        s.record().queue_clears += 1;
        s.broadcast_status();
    }
    if let Some(ids) = request.get("delete").and_then(Value::as_array) {
        for id in ids.iter().filter_map(Value::as_str) {
            s.record().queue_deletes.push(id.to_string());
            let removed = {
                let mut q = lock(&s.queue);
                let before = q.pending.len();
                q.pending.retain(|i| i.prompt_id != id);
                before != q.pending.len()
            };
            if removed {
                s.broadcast_status();
            }
        }
    }
    empty(StatusCode::OK)
}

async fn post_interrupt(State(s): S, body: Bytes) -> Response {
    let target = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("prompt_id").and_then(Value::as_str).map(str::to_string));
    s.record().interrupts.push(target.clone());
    let running = lock(&s.exec).prompt_id.clone();
    match target {
        None => s.interrupt.store(true, Ordering::SeqCst),
        Some(id) if running.as_deref() == Some(id.as_str()) => s.interrupt.store(true, Ordering::SeqCst),
        Some(_) => {}
    }
    empty(StatusCode::OK)
}

async fn get_history(State(s): S, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let queue = lock(&s.queue);
    let len = queue.history.len();
    let max_items = q.get("max_items").and_then(|v| v.parse::<usize>().ok());
    let offset = q.get("offset").and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
    let (start, count) = match max_items {
        Some(m) => (if offset < 0 { len.saturating_sub(m) } else { offset as usize }, m),
        None => (if offset < 0 { 0 } else { offset as usize }, len),
    };
    let out: serde_json::Map<String, Value> = queue.history.iter().skip(start).take(count).map(|(k, v)| (k.clone(), v.clone())).collect();
    Json(Value::Object(out))
}

async fn get_history_id(State(s): S, UrlPath(id): UrlPath<String>) -> Json<Value> {
    match lock(&s.queue).history.get(&id) {
        Some(entry) => Json(json!({ id: entry })),
        None => Json(json!({})),
    }
}

async fn post_history(State(s): S, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else { return server_trouble() };
    let mut q = lock(&s.queue);
    if request.get("clear").and_then(Value::as_bool) == Some(true) {
        q.history.clear();
    }
    if let Some(ids) = request.get("delete").and_then(Value::as_array) {
        for id in ids.iter().filter_map(Value::as_str) {
            q.history.remove(id);
        }
    }
    empty(StatusCode::OK)
}

fn dir_for_type(s: &Shared, kind: Option<&str>) -> Option<(PathBuf, &'static str)> {
    match kind.unwrap_or("input") {
        "input" | "" => Some((s.input_dir.clone(), "input")),
        "temp" => Some((s.temp_dir.clone(), "temp")),
        "output" => Some((s.output_dir.clone(), "output")),
        _ => None,
    }
}

/// Lexically normalises `rel` under `root`; None if it would leave `root`.
fn contained(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => return None,
        }
    }
    let mut out = root.to_path_buf();
    out.extend(parts);
    Some(out)
}

async fn upload_image(State(s): S, mut multipart: Multipart) -> Response {
    let mut file: Option<(String, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                if name == "image" && field.file_name().is_some() {
                    let filename = field.file_name().unwrap_or_default().to_string();
                    match field.bytes().await {
                        Ok(b) => file = Some((filename, b)),
                        Err(_) => return empty(StatusCode::BAD_REQUEST),
                    }
                } else if let Ok(text) = field.text().await {
                    fields.insert(name, text);
                }
            }
            Ok(None) => break,
            Err(_) => return empty(StatusCode::BAD_REQUEST),
        }
    }
    let Some((filename, bytes)) = file else { return empty(StatusCode::BAD_REQUEST) };
    if filename.is_empty() {
        return empty(StatusCode::BAD_REQUEST);
    }
    let delay = s.faults.settings().upload_delay;
    if delay.is_zero() {
        return store_upload(&s, filename, bytes, fields);
    }
    // A slow upload: the body is read; the file is written after the delay in a task of its
    // own, so it lands even when the client has gone (the case a job's cleanup must survive).
    let shared = s.clone();
    let write = tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        store_upload(&shared, filename, bytes, fields)
    });
    write.await.unwrap_or_else(|_| server_trouble())
}

/// Write an upload's file into ComfyUI's folders and answer as ComfyUI does.
fn store_upload(s: &Shared, filename: String, bytes: Bytes, fields: HashMap<String, String>) -> Response {
    let Some((root, kind)) = dir_for_type(s, fields.get("type").map(String::as_str)) else { return empty(StatusCode::BAD_REQUEST) };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let Some(folder) = contained(&root, &subfolder) else { return empty(StatusCode::BAD_REQUEST) };
    let Some(mut path) = contained(&folder, &filename).filter(|p| p.starts_with(&folder) && p != &folder) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if std::fs::create_dir_all(&folder).is_err() {
        return server_trouble();
    }
    let overwrite = matches!(fields.get("overwrite").map(String::as_str), Some("true") | Some("1"));
    let mut name = filename.clone();
    let mut duplicate = false;
    if !overwrite {
        let (stem, ext) = match filename.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => (stem.to_string(), format!(".{ext}")),
            _ => (filename.clone(), String::new()),
        };
        let mut i = 1;
        while path.exists() {
            if std::fs::read(&path).is_ok_and(|existing| existing == bytes.as_ref()) {
                duplicate = true;
                break;
            }
            name = format!("{stem} ({i}){ext}");
            path = folder.join(&name);
            i += 1;
        }
    }
    if !duplicate && let Err(e) = std::fs::write(&path, &bytes) {
        tracing::warn!(error = %e, "upload write failed");
        return server_trouble();
    }
    if s.keep_record {
        s.record().uploads.push(UploadRecord { name: name.clone(), subfolder: subfolder.clone(), kind: kind.to_string(), size: bytes.len() });
    }
    Json(json!({"name": name, "subfolder": subfolder, "type": kind})).into_response()
}

fn content_type_for(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// RFC 7231 date from seconds since the epoch.
fn http_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, sec) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days.rem_euclid(7)) as usize];
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if month <= 2 { y + 1 } else { y };
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(month - 1) as usize];
    format!("{weekday}, {d:02} {mon} {y} {h:02}:{m:02}:{sec:02} GMT")
}

async fn view(State(s): S, Query(q): Query<HashMap<String, String>>) -> Response {
    let delay = s.faults.settings().view_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let Some(filename) = q.get("filename") else { return empty(StatusCode::NOT_FOUND) };
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let Some((root, _)) = dir_for_type(&s, Some(q.get("type").map(String::as_str).unwrap_or("output"))) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let subfolder = q.get("subfolder").cloned().unwrap_or_default();
    let Some(folder) = contained(&root, &subfolder) else { return empty(StatusCode::FORBIDDEN) };
    let path = folder.join(filename);
    let Ok(bytes) = tokio::fs::read(&path).await else { return empty(StatusCode::NOT_FOUND) };
    let modified = tokio::fs::metadata(&path).await.ok().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    let name = Path::new(filename).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(preview) = q.get("preview").filter(|p| p.starts_with("webp"))
        && let Some(webp) = webp_preview(&bytes)
    {
        tracing::debug!(%preview, "serving a webp preview");
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "image/webp")
            .header(header::CONTENT_DISPOSITION, format!("filename=\"{name}\""))
            .body(Body::from(webp))
            .unwrap_or_else(|_| server_trouble());
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type_for(&name))
        .header(header::CONTENT_DISPOSITION, format!("filename=\"{name}\""))
        .header(header::ETAG, format!("\"{:x}-{:x}\"", modified.as_nanos(), bytes.len()))
        .header(header::LAST_MODIFIED, http_date(modified.as_secs()))
        .header(header::ACCEPT_RANGES, "bytes")
        .body(Body::from(bytes))
        .unwrap_or_else(|_| server_trouble())
}

/// `preview=webp;Q`: ComfyUI re-encodes the image as WebP (lossless here; quality ignored).
fn webp_preview(bytes: &[u8]) -> Option<Vec<u8>> {
    let img = image::load_from_memory(bytes).ok()?.to_rgb8();
    let mut out = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(std::io::Cursor::new(&mut out))
        .encode(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .ok()?;
    Some(out)
}

async fn ws(State(s): S, Query(q): Query<HashMap<String, String>>, upgrade: WebSocketUpgrade) -> Response {
    if s.faults.settings().refuse_ws {
        return (StatusCode::SERVICE_UNAVAILABLE, "websocket refused (fault)").into_response();
    }
    let sid = q.get("clientId").filter(|c| !c.is_empty()).cloned().unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| run_socket(s, sid, socket))
}

async fn run_socket(s: Arc<Shared>, sid: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let conn = s.next_conn.fetch_add(1, Ordering::SeqCst);
    let preview_metadata = Arc::new(AtomicBool::new(false));
    {
        let mut sockets = lock(&s.sockets);
        sockets.insert(sid.clone(), SocketHandle { conn, tx: tx.clone(), preview_metadata: preview_metadata.clone() });
        let _ = tx.send(text_frame("status", s.status_data(Some(&sid))));
        let exec = lock(&s.exec);
        if exec.client_id.as_deref() == Some(sid.as_str())
            && let Some(node) = &exec.last_node
        {
            let _ = tx.send(text_frame("executing", json!({"node": node})));
        }
    }
    drop(tx);
    let mut first_message = true;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(m) => if sink.send(m).await.is_err() { break },
                None => break,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if first_message
                        && let Ok(v) = serde_json::from_str::<Value>(text.as_str())
                        && v.get("type").and_then(Value::as_str) == Some("feature_flags")
                    {
                        let wants = v.get("data").and_then(|d| d.get("supports_preview_metadata")).and_then(Value::as_bool) == Some(true);
                        preview_metadata.store(wants, Ordering::SeqCst);
                        if sink.send(text_frame("feature_flags", server_features())).await.is_err() { break }
                    }
                    first_message = false;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let mut sockets = lock(&s.sockets);
    if sockets.get(&sid).is_some_and(|h| h.conn == conn) {
        sockets.remove(&sid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_795_806_307), "Fri, 27 Nov 2026 19:05:07 GMT");
    }

    #[test]
    fn containment() {
        let root = Path::new("/in");
        assert_eq!(contained(root, "faces"), Some(PathBuf::from("/in/faces")));
        assert_eq!(contained(root, "a/../b"), Some(PathBuf::from("/in/b")));
        assert_eq!(contained(root, "../escape"), None);
        assert_eq!(contained(root, "/abs"), None);
    }
}
