//! One prompt from submission to output bytes: choose the prompt_id, register with the tracker, submit,
//! wait for the terminal event on the websocket while polling history as a fallback, enforce the
//! deadline (interrupt + dequeue THAT prompt), cancel the prompt if the caller goes away, then collect
//! the outputs (`executed`/history files via /view, SaveImageWebsocket frames, and the raw pixels of
//! flowhost's `FlowhostImageOutput`). Never retries a prompt (a raster lost on the socket is
//! reported as `OutputsLost`; the backend decides to re-run) and never decides HTTP statuses.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;

use crate::client::ComfyClient;
use crate::error::ComfyError;
use crate::health::BackendHealth;
use crate::media::{RASTER_MEDIA_TYPE, Raster, extension_for, sniff_media_type};
use crate::protocol::{FileRef, HistoryEntry, PromptOutcome, WsMessage, file_refs_in_ui_output};
use crate::tracker::PromptEvent;

/// Progress of a running prompt, as ComfyUI reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// ComfyUI started executing the prompt (it left the queue).
    Started,
    /// A node started executing.
    Node { node_id: String },
    /// A node reported step progress (samplers).
    Step {
        node_id: Option<String>,
        value: f64,
        max: f64,
    },
}

/// Callback for progress; called on the waiting task, keep it cheap.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// A preview image ComfyUI sent while a node ran (`--preview-method`: latent previews while
/// sampling). Not an output: outputs come from output nodes (files, SaveImageWebsocket frames).
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// The node that sent it (the sampler), when known.
    pub node_id: Option<String>,
    /// `image/jpeg` or `image/png`, from the frame's header or metadata (sniffed when absent).
    pub media_type: String,
    pub bytes: Bytes,
}

/// Callback for previews; called on the waiting task, keep it cheap (throttle elsewhere).
pub type PreviewFn = Arc<dyn Fn(Preview) + Send + Sync>;

/// What to run.
#[derive(Clone)]
pub struct RunRequest {
    /// API-format graph.
    pub graph: Value,
    /// Output node ids whose media to return; empty = the last output node that produced media.
    pub outputs: Vec<String>,
    /// Time allowed from submission to the terminal event.
    pub deadline: Duration,
    /// Sent as POST /prompt `extra_data` (echoed in history), e.g. `{"request_id": "..."}`.
    pub extra_data: Value,
    pub on_progress: Option<ProgressFn>,
    /// Receives preview frames (images a non-output node sent on the websocket).
    pub on_preview: Option<PreviewFn>,
    /// The prompt_id to submit under; a fresh UUID when None. A caller that records it
    /// before submission can find the prompt again (history) after its own restart.
    pub prompt_id: Option<String>,
    /// Take `SaveImage` outputs as raw pixels ([`crate::raster`]) when ComfyUI has the node:
    /// the caller will encode them anyway (JPEG), so ComfyUI's PNG is pure cost.
    pub raster_outputs: bool,
    /// Called once the prompt succeeded, as collecting its outputs (`/history`, `/view`)
    /// begins: a caller whose deadline passes later knows the output fetch was the slow part.
    pub on_fetch: Option<FetchFn>,
}

/// See [`RunRequest::on_fetch`].
pub type FetchFn = Arc<dyn Fn() + Send + Sync>;

impl RunRequest {
    pub fn new(graph: Value, deadline: Duration) -> Self {
        RunRequest {
            graph,
            outputs: Vec::new(),
            deadline,
            extra_data: Value::Null,
            on_progress: None,
            on_preview: None,
            prompt_id: None,
            raster_outputs: false,
            on_fetch: None,
        }
    }
}

impl std::fmt::Debug for RunRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRequest")
            .field("outputs", &self.outputs)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// One output file.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputMedia {
    pub node_id: String,
    /// The file's bytes; for a raster, its pixels.
    pub bytes: Bytes,
    /// Sniffed from the bytes (`image/png`, `image/jpeg`, `image/webp`, `image/gif`, `video/mp4`, …);
    /// [`RASTER_MEDIA_TYPE`] for a raster.
    pub media_type: String,
    pub filename: String,
    /// Set when the output came as raw pixels (`raster_outputs`): its shape. Encode before use.
    pub raster: Option<RasterShape>,
}

/// The shape of a raster output's pixels (see [`crate::media::Raster`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RasterShape {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
}

/// Where the time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunTimings {
    /// Submission until ComfyUI started executing (None if the start was not observed, e.g. socket lost).
    pub queued: Option<Duration>,
    /// Execution start (or submission) until the terminal event.
    pub executing: Duration,
    /// Fetching output bytes.
    pub fetching: Duration,
    /// ComfyUI's own account of its execution: `execution_success`'s timestamp minus
    /// `execution_start`'s (its clock, ms resolution), when both came over the socket.
    pub comfy_clock: Option<Duration>,
    pub total: Duration,
}

/// A successful run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub prompt_id: String,
    pub media: Vec<OutputMedia>,
    pub timings: RunTimings,
}

/// Removes the prompt from the tracker always, and cancels it in ComfyUI if still armed when dropped
/// (the caller's future was dropped: e.g. the HTTP client disconnected).
struct PromptGuard {
    client: Arc<ComfyClient>,
    prompt_id: String,
    cancel_on_drop: bool,
}

impl Drop for PromptGuard {
    fn drop(&mut self) {
        self.client.tracker().unregister(&self.prompt_id);
        if self.cancel_on_drop
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let client = self.client.clone();
            let prompt_id = self.prompt_id.clone();
            tracing::info!(prompt_id, "caller went away; cancelling the prompt");
            runtime.spawn(async move { client.cancel(&prompt_id).await });
        }
    }
}

/// Nodes whose websocket images are outputs: every `SaveImageWebsocket` node and the
/// requested output nodes. Any other node that sends an image sends a preview.
fn socket_output_nodes<'a>(graph: &'a Value, outputs: &'a [String]) -> HashSet<&'a str> {
    let mut nodes: HashSet<&str> = outputs.iter().map(String::as_str).collect();
    if let Some(map) = graph.as_object() {
        for (id, node) in map {
            if node.get("class_type").and_then(Value::as_str) == Some("SaveImageWebsocket") {
                nodes.insert(id.as_str());
            }
        }
    }
    nodes
}

enum Source {
    File(FileRef),
    Socket(Bytes),
    Raster(Raster, Option<String>),
}

/// Media per node in the order nodes produced it.
#[derive(Default)]
struct Collected {
    nodes: Vec<(String, Vec<Source>)>,
    seen_files: HashSet<(String, String, String, String)>,
}

impl Collected {
    fn slot(&mut self, node: &str) -> &mut Vec<Source> {
        let pos = match self.nodes.iter().position(|(n, _)| n == node) {
            Some(p) => p,
            None => {
                self.nodes.push((node.to_string(), Vec::new()));
                self.nodes.len() - 1
            }
        };
        &mut self.nodes[pos].1
    }
    fn add_ui_output(&mut self, node: &str, output: &Value) {
        for file in file_refs_in_ui_output(output) {
            let key = (
                node.to_string(),
                file.filename.clone(),
                file.subfolder.clone(),
                file.kind.clone(),
            );
            if self.seen_files.insert(key) {
                self.slot(node).push(Source::File(file));
            }
        }
    }
    fn add_history(&mut self, entry: &HistoryEntry) {
        for (node, output) in &entry.outputs {
            self.add_ui_output(node, output);
        }
    }
}

enum Poll {
    Finished(Box<HistoryEntry>, PromptOutcome),
    Waiting,
    Vanished,
}

/// Read history; when `check_queue`, also tell "still queued" from "lost" (GET /queue carries every
/// queued graph, so it is not read on every periodic poll).
async fn poll_history(
    client: &ComfyClient,
    prompt_id: &str,
    check_queue: bool,
) -> Result<Poll, ComfyError> {
    if let Some(entry) = client.history(prompt_id).await? {
        if let Some(outcome) = entry.outcome(prompt_id) {
            return Ok(Poll::Finished(Box::new(entry), outcome));
        }
        return Ok(Poll::Waiting);
    }
    if !check_queue {
        return Ok(Poll::Waiting);
    }
    let queue = client.queue().await?;
    if queue.is_running(prompt_id) || queue.is_pending(prompt_id) {
        return Ok(Poll::Waiting);
    }
    // It may have finished between the two reads.
    if let Some(entry) = client.history(prompt_id).await? {
        if let Some(outcome) = entry.outcome(prompt_id) {
            return Ok(Poll::Finished(Box::new(entry), outcome));
        }
        return Ok(Poll::Waiting);
    }
    Ok(Poll::Vanished)
}

/// Submit and wait. `health` turning `Down` fails the wait at once with `Unavailable`.
pub(crate) async fn run_prompt(
    client: &Arc<ComfyClient>,
    req: RunRequest,
    mut health: watch::Receiver<BackendHealth>,
) -> Result<RunResult, ComfyError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + req.deadline;
    let prompt_id = req
        .prompt_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut events = client.tracker().register(&prompt_id);
    let mut guard = PromptGuard {
        client: client.clone(),
        prompt_id: prompt_id.clone(),
        cancel_on_drop: false,
    };

    // The socket first, so no event can precede our knowing the prompt.
    if !client
        .wait_ws_connected(Duration::from_secs(2).min(req.deadline))
        .await
    {
        tracing::warn!(
            prompt_id,
            "ComfyUI websocket not connected; relying on history polling"
        );
    }
    let mut ws_state = client.ws_state();
    ws_state.borrow_and_update();
    // While the socket stays up from before submission to the terminal event, nothing it carries
    // was missed: its `executed` messages name every output, and history need not be read.
    let mut socket_intact = ws_state.borrow().connected;
    if let BackendHealth::Down { reason } = &*health.borrow_and_update() {
        return Err(ComfyError::unavailable(reason.clone()));
    }

    guard.cancel_on_drop = true; // from here on, a dropped future must not leave the prompt running
    let submit_started = Instant::now();
    match tokio::time::timeout_at(
        deadline,
        client.submit(&req.graph, &prompt_id, &req.extra_data),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            guard.cancel_on_drop = false;
            return Err(e);
        }
        Err(_) => {
            guard.cancel_on_drop = false;
            client.cancel(&prompt_id).await;
            return Err(ComfyError::Timeout {
                prompt_id,
                waited: started.elapsed(),
            });
        }
    }
    let submitted = Instant::now();
    tracing::debug!(prompt_id, submit_us = submitted.duration_since(submit_started).as_micros() as u64, "prompt submitted");

    let progress = |p: Progress| {
        if let Some(f) = &req.on_progress {
            f(p);
        }
    };
    // Socket images from these nodes are outputs; from any other node (a sampler), previews.
    let socket_outputs = socket_output_nodes(&req.graph, &req.outputs);
    let image = |collected: &mut Collected, node_id: Option<String>, bytes: Bytes, media_type: Option<String>| match node_id {
        Some(node) if !socket_outputs.contains(node.as_str()) => {
            if let Some(f) = &req.on_preview {
                let media_type = media_type.unwrap_or_else(|| sniff_media_type(&bytes).to_string());
                f(Preview { node_id: Some(node), media_type, bytes });
            }
        }
        node => collected.slot(&node.unwrap_or_default()).push(Source::Socket(bytes)),
    };
    let mut collected = Collected::default();
    let mut executed_ui: std::collections::HashMap<String, Value> = std::collections::HashMap::new();
    let mut execution_started: Option<Instant> = None;
    // ComfyUI's own stamps (its clock, ms): what it spent executing, however late its messages
    // reached us (its event loop waits for the GIL while the worker thread computes).
    let (mut comfy_started_ms, mut comfy_finished_ms): (Option<u64>, Option<u64>) = (None, None);
    let mut outcome: Option<PromptOutcome> = None;
    let mut final_history: Option<Box<HistoryEntry>> = None;
    let mut poll_failures = 0u32;
    let mut poll_timer = tokio::time::interval_at(
        tokio::time::Instant::now() + client.config().history_poll_interval,
        client.config().history_poll_interval,
    );
    poll_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ws_alive = true;

    let mut polls = 0u64;
    let (mut ws_watch_open, mut health_watch_open) = (true, true);
    while outcome.is_none() {
        let mut poll_now = false;
        let mut check_queue = false;
        tokio::select! {
            event = events.recv() => match event {
                Some(PromptEvent::Message(message)) => match message {
                    WsMessage::ExecutionStart { timestamp, .. } => {
                        execution_started.get_or_insert_with(Instant::now);
                        comfy_started_ms = comfy_started_ms.or(timestamp);
                        progress(Progress::Started);
                    }
                    WsMessage::Executing { node: Some(node), .. } => progress(Progress::Node { node_id: node }),
                    WsMessage::Progress { node, value, max, .. } => progress(Progress::Step { node_id: node, value, max }),
                    WsMessage::Executed { node, output, .. } => {
                        collected.add_ui_output(&node, &output);
                        executed_ui.insert(node, output);
                    }
                    WsMessage::ExecutionSuccess { timestamp, .. } => {
                        comfy_finished_ms = timestamp;
                        outcome = Some(PromptOutcome::Success);
                    }
                    WsMessage::ExecutionError(e) => outcome = Some(PromptOutcome::Error(e)),
                    WsMessage::ExecutionInterrupted(e) => outcome = Some(PromptOutcome::Interrupted(e)),
                    // End marker without a terminal message seen (lost frame?): ask history.
                    WsMessage::Executing { node: None, .. } => poll_now = true,
                    _ => {}
                },
                Some(PromptEvent::Image { node_id, bytes, media_type }) => image(&mut collected, node_id, bytes, media_type),
                Some(PromptEvent::Raster { node_id, filename, raster }) => collected.slot(&node_id).push(Source::Raster(raster, filename)),
                None => poll_now = true,
            },
            _ = poll_timer.tick() => poll_now = true,
            changed = ws_state.changed(), if ws_watch_open => {
                ws_watch_open = changed.is_ok(); // a closed watch must not wake this loop forever
                if ws_watch_open {
                    let state = *ws_state.borrow_and_update();
                    ws_alive = state.connected;
                    socket_intact = false;
                    // Lost or regained: events may have been missed either way, and ComfyUI may have restarted.
                    poll_now = true;
                    check_queue = true;
                }
            }
            changed = health.changed(), if health_watch_open => {
                health_watch_open = changed.is_ok();
                if health_watch_open
                    && let BackendHealth::Down { reason } = &*health.borrow_and_update() {
                        guard.cancel_on_drop = false;
                        return Err(ComfyError::unavailable(format!("ComfyUI went down while prompt {prompt_id} was running: {reason}")));
                    }
            }
            _ = tokio::time::sleep_until(deadline) => {
                guard.cancel_on_drop = false;
                tracing::warn!(prompt_id, waited = ?started.elapsed(), "prompt deadline expired; interrupting");
                client.cancel(&prompt_id).await;
                return Err(ComfyError::Timeout { prompt_id, waited: started.elapsed() });
            }
        }
        if poll_now && outcome.is_none() {
            polls += 1;
            match poll_history(client, &prompt_id, check_queue || polls % 5 == 1).await {
                Ok(Poll::Finished(entry, o)) => {
                    tracing::debug!(prompt_id, "completion taken from history");
                    outcome = Some(o);
                    final_history = Some(entry);
                }
                Ok(Poll::Waiting) => poll_failures = 0,
                Ok(Poll::Vanished) => {
                    guard.cancel_on_drop = false;
                    return Err(ComfyError::unavailable(format!(
                        "prompt {prompt_id} is neither queued nor in history: ComfyUI restarted or dropped it"
                    )));
                }
                Err(e) => {
                    poll_failures += 1;
                    let ws_down = !ws_state.borrow().connected || !ws_alive;
                    if matches!(e, ComfyError::Unavailable { .. })
                        && (ws_down || poll_failures >= 3)
                    {
                        guard.cancel_on_drop = false;
                        return Err(e);
                    }
                    tracing::warn!(prompt_id, error = %e, "history poll failed");
                }
            }
        }
    }
    let finished = Instant::now();
    guard.cancel_on_drop = false;

    let Some(outcome) = outcome else {
        return Err(ComfyError::protocol("wait loop ended without an outcome"));
    };
    match outcome {
        PromptOutcome::Success => {}
        PromptOutcome::Error(e) => {
            return Err(ComfyError::Execution {
                prompt_id,
                node_id: e.node_id,
                node_type: e.node_type,
                exception_type: e.exception_type,
                exception_message: e.exception_message.trim_end().to_string(),
                traceback: e.traceback,
            });
        }
        PromptOutcome::Interrupted(e) => {
            return Err(ComfyError::Interrupted {
                prompt_id,
                node_id: e.node_id,
                node_type: e.node_type,
            });
        }
    }

    if let Some(on_fetch) = &req.on_fetch {
        on_fetch();
    }
    // History names every file output even when `executed` frames were missed.
    // The deadline covers collecting the outputs too: a slow `/history` or `/view` ends the run at
    // the deadline (504), not after it.
    let past_deadline = |prompt_id: &str| ComfyError::Timeout { prompt_id: prompt_id.to_string(), waited: started.elapsed() };
    let history = match final_history {
        Some(h) => Some(h),
        None if socket_intact => None,
        None => match tokio::time::timeout_at(deadline, client.history(&prompt_id)).await.map_err(|_| past_deadline(&prompt_id))? {
            Ok(h) => h.map(Box::new),
            Err(e) => {
                tracing::warn!(prompt_id, error = %e, "reading history after success failed; using websocket outputs only");
                None
            }
        },
    };
    if let Some(h) = &history {
        collected.add_history(h);
    }
    // Drain images that were already routed but not yet read.
    while let Ok(event) = events.try_recv() {
        match event {
            PromptEvent::Image { node_id, bytes, media_type } => image(&mut collected, node_id, bytes, media_type),
            PromptEvent::Raster { node_id, filename, raster } => collected.slot(&node_id).push(Source::Raster(raster, filename)),
            PromptEvent::Message(WsMessage::Executed { node, output, .. }) => {
                collected.add_ui_output(&node, &output);
                executed_ui.insert(node, output);
            }
            PromptEvent::Message(_) => {}
        }
    }

    // Pixels exist only on the socket: a raster node that says it sent more than arrived lost
    // them (the socket dropped mid-run). The caller re-runs with files; never a partial answer.
    let node_outputs: Vec<(&String, &Value)> = match &history {
        Some(h) => h.outputs.iter().collect(),
        None => executed_ui.iter().collect(),
    };
    {
        for (node, output) in node_outputs {
            if let Some(sent) = crate::raster::rasters_sent(output) {
                let got = collected.nodes.iter().find(|(n, _)| n == node).map_or(0, |(_, s)| s.iter().filter(|s| matches!(s, Source::Raster(..))).count());
                if got < sent {
                    return Err(ComfyError::OutputsLost { prompt_id, node_id: node.clone(), sent, received: got });
                }
            }
        }
    }

    let selected: Vec<(String, Vec<Source>)> = if req.outputs.is_empty() {
        match collected
            .nodes
            .into_iter()
            .rev()
            .find(|(_, s)| !s.is_empty())
        {
            Some(last) => vec![last],
            None => {
                return Err(ComfyError::OutputMissing {
                    node_id: "*".into(),
                });
            }
        }
    } else {
        let mut picked = Vec::new();
        for wanted in &req.outputs {
            let pos = collected
                .nodes
                .iter()
                .position(|(n, s)| n == wanted && !s.is_empty());
            match pos {
                Some(p) => picked.push(collected.nodes.swap_remove(p)),
                None => {
                    return Err(ComfyError::OutputMissing {
                        node_id: wanted.clone(),
                    });
                }
            }
        }
        picked
    };

    let mut media = Vec::new();
    for (node_id, sources) in selected {
        for (index, source) in sources.into_iter().enumerate() {
            let (bytes, name, raster) = match source {
                Source::File(file) => {
                    let bytes = tokio::time::timeout_at(deadline, client.view(&file)).await.map_err(|_| past_deadline(&prompt_id))??;
                    (bytes, file.filename, None)
                }
                Source::Socket(bytes) => (bytes, String::new(), None),
                Source::Raster(r, name) => {
                    let shape = RasterShape { width: r.width, height: r.height, channels: r.channels };
                    (r.pixels, name.unwrap_or_default(), Some(shape))
                }
            };
            let media_type = match raster {
                Some(_) => RASTER_MEDIA_TYPE.to_string(),
                None => sniff_media_type(&bytes).to_string(),
            };
            let filename = if name.is_empty() {
                // A raster becomes the caller's JPEG or PNG; name it as the PNG it replaces.
                let extension = if raster.is_some() { "png" } else { extension_for(&media_type) };
                format!("{node_id}_{index:05}.{extension}")
            } else {
                name
            };
            media.push(OutputMedia {
                node_id: node_id.clone(),
                bytes,
                media_type,
                filename,
                raster,
            });
        }
    }
    tracing::debug!(
        prompt_id,
        queued_us = execution_started.map(|s| s.saturating_duration_since(submitted).as_micros() as u64),
        collect_us = finished.elapsed().as_micros() as u64,
        socket_intact,
        "prompt outputs collected"
    );
    let timings = RunTimings {
        queued: execution_started.map(|s| s.saturating_duration_since(submitted)),
        executing: finished.saturating_duration_since(execution_started.unwrap_or(submitted)),
        fetching: finished.elapsed(),
        comfy_clock: match (comfy_started_ms, comfy_finished_ms) {
            (Some(a), Some(b)) if b >= a => Some(Duration::from_millis(b - a)),
            _ => None,
        },
        total: started.elapsed(),
    };
    Ok(RunResult {
        prompt_id,
        media,
        timings,
    })
}
