//! `ComfyClient`: ComfyUI's HTTP API (reqwest; mutating endpoints answer 200 with an empty body, which
//! is never parsed) plus ONE websocket per client, opened with our `client_id` before anything is
//! submitted, reconnected with backoff when lost, and feeding a `PromptTracker`. This module speaks
//! the protocol; it does not decide deadlines, output selection or health (see `run.rs`, `backend.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

use crate::NodeIssue;
use crate::error::{ComfyError, error_chain};
use crate::protocol::{
    BinaryFrame, FileRef, HistoryEntry, PromptAccepted, PromptRejected, PromptRequest, QueueState,
    SystemStats, UploadAnswer, WsMessage, node_id_from_details, node_issues_from,
};
use crate::tracker::PromptTracker;

/// Tuning of the client. Defaults suit a real ComfyUI.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// e.g. `http://127.0.0.1:8188/`
    pub base_url: Url,
    /// Timeout for one ordinary HTTP request (not for waiting on a prompt).
    pub request_timeout: Duration,
    /// How often a waiting run polls `GET /history/{id}` even while the socket looks alive.
    pub history_poll_interval: Duration,
    /// First websocket reconnect delay; doubles up to `ws_backoff_max`.
    pub ws_backoff_initial: Duration,
    pub ws_backoff_max: Duration,
}

impl ClientConfig {
    pub fn new(base_url: Url) -> Self {
        ClientConfig {
            base_url,
            request_timeout: Duration::from_secs(30),
            history_poll_interval: Duration::from_secs(2),
            ws_backoff_initial: Duration::from_millis(100),
            ws_backoff_max: Duration::from_secs(5),
        }
    }
}

/// The websocket's state as seen by waiting runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WsState {
    pub connected: bool,
    /// Increments on every successful (re)connect.
    pub generation: u64,
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// HTTP + websocket client for one ComfyUI server.
pub struct ComfyClient {
    http: reqwest::Client,
    config: ClientConfig,
    client_id: String,
    tracker: Arc<PromptTracker>,
    ws_state: watch::Receiver<WsState>,
    /// Wakes the websocket loop out of its back-off (ComfyUI just started answering).
    ws_kick: Arc<tokio::sync::Notify>,
    _ws_task: AbortOnDrop,
}

impl std::fmt::Debug for ComfyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyClient")
            .field("base_url", &self.config.base_url.as_str())
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl ComfyClient {
    /// Build the client and start its websocket task (it keeps reconnecting until the client is dropped).
    /// Must be called inside a tokio runtime.
    pub fn new(config: ClientConfig) -> anyhow::Result<Arc<ComfyClient>> {
        use anyhow::Context;
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client for ComfyUI")?;
        let client_id = format!("flowhost-{}", uuid::Uuid::new_v4());
        let tracker = Arc::new(PromptTracker::new());
        let (state_tx, state_rx) = watch::channel(WsState::default());
        let ws_url = ws_url(&config.base_url, &client_id)?;
        let ws_kick = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run_websocket(
            ws_url,
            tracker.clone(),
            state_tx,
            config.clone(),
            ws_kick.clone(),
        ));
        Ok(Arc::new(ComfyClient {
            http,
            config,
            client_id,
            tracker,
            ws_state: state_rx,
            ws_kick,
            _ws_task: AbortOnDrop(task),
        }))
    }

    pub fn base_url(&self) -> &Url {
        &self.config.base_url
    }
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }
    pub fn tracker(&self) -> &Arc<PromptTracker> {
        &self.tracker
    }
    pub fn ws_state(&self) -> watch::Receiver<WsState> {
        self.ws_state.clone()
    }

    /// Reconnect the websocket now instead of at the end of its back-off: ComfyUI answers HTTP, so
    /// it will accept the socket (while it boots, the back-off has doubled to seconds).
    pub fn reconnect_ws_now(&self) {
        self.ws_kick.notify_one();
    }

    /// Wait until the websocket is connected, at most `wait`. Returns whether it is.
    pub async fn wait_ws_connected(&self, wait: Duration) -> bool {
        let mut rx = self.ws_state.clone();
        tokio::time::timeout(wait, rx.wait_for(|s| s.connected))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn url(&self, path: &str) -> Result<Url, ComfyError> {
        self.config
            .base_url
            .join(path)
            .map_err(|e| ComfyError::protocol(format!("bad URL path {path}: {e}")))
    }

    async fn get_json(&self, path: &str) -> Result<Value, ComfyError> {
        let what = format!("GET {path}");
        let resp = self
            .http
            .get(self.url(path)?)
            .send()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))?;
        let resp = ok_or_error(&what, resp).await?;
        resp.json::<Value>()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))
    }

    /// POST a JSON body to an endpoint that answers 200 with an empty body.
    async fn post_empty_answer(&self, path: &str, body: &Value) -> Result<(), ComfyError> {
        let what = format!("POST {path}");
        let resp = self
            .http
            .post(self.url(path)?)
            .json(body)
            .send()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))?;
        ok_or_error(&what, resp).await?;
        Ok(())
    }

    /// GET /system_stats.
    pub async fn system_stats(&self) -> Result<SystemStats, ComfyError> {
        let v = self.get_json("system_stats").await?;
        serde_json::from_value(v).map_err(|e| ComfyError::protocol(format!("system_stats: {e}")))
    }

    /// GET /prompt → `exec_info.queue_remaining`.
    pub async fn queue_remaining(&self) -> Result<u64, ComfyError> {
        let v = self.get_json("prompt").await?;
        v.pointer("/exec_info/queue_remaining")
            .and_then(Value::as_u64)
            .ok_or_else(|| ComfyError::protocol("GET /prompt without exec_info.queue_remaining"))
    }

    /// GET /object_info (the full catalogue source).
    pub async fn object_info(&self) -> Result<Value, ComfyError> {
        self.get_json("object_info").await
    }

    /// GET /object_info/{class}: `{class: info}`, or empty when ComfyUI does not know the class.
    pub async fn object_info_class(&self, class: &str) -> Result<Map<String, Value>, ComfyError> {
        let mut url = self.url("object_info/")?;
        url.path_segments_mut()
            .map_err(|_| ComfyError::protocol("base URL cannot take a path"))?
            .pop_if_empty()
            .push(class);
        let what = format!("GET /object_info/{class}");
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))?;
        let resp = ok_or_error(&what, resp).await?;
        match resp
            .json::<Value>()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))?
        {
            Value::Object(m) => Ok(m),
            other => Err(ComfyError::protocol(format!(
                "{what}: expected an object, got {other}"
            ))),
        }
    }

    /// POST /prompt with our `client_id` and a `prompt_id` we chose. A 400, and a 200 whose `node_errors`
    /// is not empty (ComfyUI queued only part of the graph), are both `Validation` errors.
    pub async fn submit(
        &self,
        graph: &Value,
        prompt_id: &str,
        extra_data: &Value,
    ) -> Result<PromptAccepted, ComfyError> {
        if !graph.is_object() {
            return Err(ComfyError::Validation {
                error_type: "invalid_prompt".into(),
                message: "the workflow must be a JSON object of nodes".into(),
                node_errors: vec![],
            });
        }
        let extra_data = match extra_data {
            Value::Null => Value::Null,
            Value::Object(_) => extra_data.clone(),
            other => json!({ "flowhost": other }),
        };
        let body = PromptRequest {
            prompt: graph,
            client_id: &self.client_id,
            prompt_id,
            extra_data,
        };
        let what = "POST /prompt";
        let resp = self
            .http
            .post(self.url("prompt")?)
            .json(&body)
            .send()
            .await
            .map_err(|e| ComfyError::from_transport(what, &e))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ComfyError::from_transport(what, &e))?;
        if status == StatusCode::BAD_REQUEST {
            let rejected: PromptRejected = serde_json::from_str(&text).map_err(|e| {
                ComfyError::protocol(format!(
                    "{what} 400 with an unreadable body ({e}): {}",
                    snippet(&text)
                ))
            })?;
            let mut node_errors = node_issues_from(&rejected.node_errors);
            if node_errors.is_empty()
                && rejected.error.kind == "invalid_prompt"
                && let Some(node_id) = node_id_from_details(&rejected.error.details)
            {
                let class_type = graph
                    .get(&node_id)
                    .and_then(|n| n.get("class_type"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                node_errors.push(NodeIssue {
                    node_id,
                    class_type,
                    kind: "invalid_prompt".into(),
                    input_name: None,
                    message: rejected.error.message.clone(),
                });
            }
            let message = if rejected.error.details.is_empty() {
                rejected.error.message
            } else {
                format!("{}: {}", rejected.error.message, rejected.error.details)
            };
            return Err(ComfyError::Validation {
                error_type: rejected.error.kind,
                message,
                node_errors,
            });
        }
        if status.is_server_error() {
            return Err(ComfyError::unavailable(format!(
                "{what} answered {status}: {}",
                snippet(&text)
            )));
        }
        if !status.is_success() {
            return Err(ComfyError::protocol(format!(
                "{what} answered {status}: {}",
                snippet(&text)
            )));
        }
        let accepted: PromptAccepted = serde_json::from_str(&text).map_err(|e| {
            ComfyError::protocol(format!(
                "{what} 200 with an unreadable body ({e}): {}",
                snippet(&text)
            ))
        })?;
        if !accepted.node_errors.is_empty() {
            // Part of the graph was queued anyway: take it back, then report.
            self.cancel(prompt_id).await;
            return Err(ComfyError::Validation {
                error_type: "prompt_outputs_failed_validation".into(),
                message: "ComfyUI accepted only part of the workflow; the rest failed validation"
                    .into(),
                node_errors: node_issues_from(&accepted.node_errors),
            });
        }
        if accepted.prompt_id != prompt_id {
            return Err(ComfyError::protocol(format!(
                "asked for prompt_id {prompt_id}, ComfyUI answered {}",
                accepted.prompt_id
            )));
        }
        Ok(accepted)
    }

    /// GET /history/{id}: `None` while unknown, pending, running, or deleted.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let v = self.get_json(&format!("history/{prompt_id}")).await?;
        match v.get(prompt_id) {
            None => Ok(None),
            Some(entry) => serde_json::from_value(entry.clone())
                .map(Some)
                .map_err(|e| ComfyError::protocol(format!("history entry for {prompt_id}: {e}"))),
        }
    }

    /// GET /queue.
    pub async fn queue(&self) -> Result<QueueState, ComfyError> {
        let v = self.get_json("queue").await?;
        serde_json::from_value(v).map_err(|e| ComfyError::protocol(format!("queue: {e}")))
    }

    /// POST /interrupt {prompt_id}: stops it if it is the running prompt, no-op otherwise.
    pub async fn interrupt(&self, prompt_id: &str) -> Result<(), ComfyError> {
        self.post_empty_answer("interrupt", &json!({ "prompt_id": prompt_id }))
            .await
    }

    /// POST /queue {delete:[ids]}: removes pending prompts, ignores others.
    pub async fn delete_from_queue(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_empty_answer("queue", &json!({ "delete": prompt_ids }))
            .await
    }

    /// POST /history {delete:[ids]}: forget finished prompts (ComfyUI keeps up to 10,000 otherwise).
    pub async fn delete_history(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_empty_answer("history", &json!({ "delete": prompt_ids }))
            .await
    }

    /// Stop `prompt_id` wherever it is: interrupt (if running) and delete (if pending). Both are harmless
    /// otherwise. Failures are logged, not returned: cancelling is best effort.
    pub async fn cancel(&self, prompt_id: &str) {
        if let Err(e) = self.interrupt(prompt_id).await {
            tracing::warn!(prompt_id, error = %e, "interrupting prompt failed");
        }
        if let Err(e) = self.delete_from_queue(&[prompt_id]).await {
            tracing::warn!(prompt_id, error = %e, "removing prompt from the queue failed");
        }
    }

    /// GET /view for one output file.
    pub async fn view(&self, file: &FileRef) -> Result<Bytes, ComfyError> {
        let mut url = self.url("view")?;
        url.query_pairs_mut()
            .append_pair("filename", &file.filename)
            .append_pair("subfolder", &file.subfolder)
            .append_pair("type", &file.kind);
        let what = format!(
            "GET /view {}/{} [{}]",
            file.subfolder, file.filename, file.kind
        );
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))?;
        let resp = ok_or_error(&what, resp).await?;
        resp.bytes()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))
    }

    /// POST /upload/image (type input, overwrite) into `subfolder`. Returns ComfyUI's answer; see
    /// `UploadAnswer::load_image_reference` for the string LoadImage takes.
    pub async fn upload_image(
        &self,
        bytes: Bytes,
        filename: &str,
        subfolder: &str,
    ) -> Result<UploadAnswer, ComfyError> {
        let what = format!("POST /upload/image {subfolder}/{filename}");
        let media_type = crate::media::sniff_media_type(&bytes);
        let part = reqwest::multipart::Part::stream(reqwest::Body::from(bytes))
            .file_name(filename.to_string())
            .mime_str(media_type)
            .map_err(|e| ComfyError::protocol(format!("{what}: {e}")))?;
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("type", "input")
            .text("subfolder", subfolder.to_string())
            .text("overwrite", "true");
        let resp = self
            .http
            .post(self.url("upload/image")?)
            .multipart(form)
            .send()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))?;
        let resp = ok_or_error(&what, resp).await?;
        resp.json::<UploadAnswer>()
            .await
            .map_err(|e| ComfyError::from_transport(&what, &e))
    }
}

impl UploadAnswer {
    /// What to put in LoadImage's `image` input: `subfolder/name` (ComfyUI resolves it under input/).
    pub fn load_image_reference(&self) -> String {
        if self.subfolder.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.subfolder, self.name)
        }
    }
}

/// Pass a 2xx through; turn 5xx into `Unavailable` and anything else into `Protocol`, with the body.
async fn ok_or_error(what: &str, resp: reqwest::Response) -> Result<reqwest::Response, ComfyError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    if status.is_server_error() {
        Err(ComfyError::unavailable(format!(
            "{what} answered {status}: {}",
            snippet(&body)
        )))
    } else {
        Err(ComfyError::protocol(format!(
            "{what} answered {status}: {}",
            snippet(&body)
        )))
    }
}

fn snippet(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_string(),
    }
}

fn ws_url(base: &Url, client_id: &str) -> anyhow::Result<Url> {
    use anyhow::Context;
    let mut url = base.join("ws").context("building the websocket URL")?;
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    url.set_scheme(scheme)
        .map_err(|()| anyhow::anyhow!("cannot use scheme {scheme} for {base}"))?;
    url.query_pairs_mut()
        .clear()
        .append_pair("clientId", client_id);
    Ok(url)
}

/// Largest websocket message (and frame: ComfyUI sends each message as one frame) accepted.
/// Raster outputs are raw pixels: 8192² RGBA is 256 MiB, tungstenite's default 16 MiB frame
/// limit would drop the socket at 2400² RGB. A bigger one fails the socket, and the run falls
/// back to file outputs.
const MAX_WS_MESSAGE: usize = 320 << 20;

fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
}

/// The websocket loop: connect, handshake, route frames, reconnect with backoff (cut short by
/// [`ComfyClient::reconnect_ws_now`]). Runs until aborted.
async fn run_websocket(
    url: Url,
    tracker: Arc<PromptTracker>,
    state: watch::Sender<WsState>,
    config: ClientConfig,
    kick: Arc<tokio::sync::Notify>,
) {
    let mut backoff = config.ws_backoff_initial;
    let mut generation = 0u64;
    loop {
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true),
        )
        .await
        {
            Ok(Ok((mut socket, _))) => {
                generation += 1;
                backoff = config.ws_backoff_initial;
                tracing::debug!(url = %url, generation, "ComfyUI websocket connected");
                // Ask for type-4 previews: they name their prompt and node.
                let hello =
                    json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}})
                        .to_string();
                if let Err(e) = socket.send(Message::text(hello)).await {
                    tracing::warn!(error = %e, "sending the feature_flags handshake failed");
                }
                state.send_replace(WsState {
                    connected: true,
                    generation,
                });
                while let Some(frame) = socket.next().await {
                    match frame {
                        Ok(Message::Text(text)) => match WsMessage::parse(text.as_str()) {
                            Ok(message) => tracker.route_message(message),
                            Err(e) => {
                                tracing::warn!(error = %e, "unreadable ComfyUI websocket message")
                            }
                        },
                        Ok(Message::Binary(data)) => match BinaryFrame::parse(&data) {
                            Ok(frame) => tracker.route_binary(frame),
                            Err(e) => tracing::warn!(error = %e, "unreadable ComfyUI binary frame"),
                        },
                        Ok(Message::Close(_)) => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "ComfyUI websocket failed");
                            break;
                        }
                    }
                }
                state.send_replace(WsState {
                    connected: false,
                    generation,
                });
                tracing::info!(generation, "ComfyUI websocket closed; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %error_chain(&e), "ComfyUI websocket connect failed")
            }
            Err(_) => tracing::debug!("ComfyUI websocket connect timed out"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(config.ws_backoff_max),
            () = kick.notified() => backoff = config.ws_backoff_initial,
        }
    }
}
