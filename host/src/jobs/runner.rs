//! Running one job against ComfyUI, from its dispatch to its terminal status:
//! uploads into a per-job folder named by the job id (server-made, never a caller's
//! id), preflight against the live node catalogue, submission under a prompt id
//! recorded *before* submitting (so a restart can reconcile), progress, one
//! deadline to the last output byte, outputs encoded and stored as assets, then
//! the job's files on ComfyUI's side deleted — whatever the outcome. A job cut by its
//! deadline records the phase it was in (upload, ComfyUI, output fetch) and the limit.
//!
//! Owns: a job's run (its signals read from [`LiveJobs`], its outputs stored) and the
//! per-prompt `extra_data` held in memory only for the job's run.
//! Must never: decide HTTP statuses, leave a prompt running in ComfyUI after the job
//! ended (timeout and cancel interrupt it), or leave an upload the deadline cut to land
//! in ComfyUI's input folder after the job's cleanup (it is removed again when it ends).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use flowhost_comfy::{ComfyBackend, ComfyError, RunRequest};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::blobs::BlobStore;
use super::config::{JobConfig, SpeedRouting};
use super::failure::{JobFailure, RunPhase, from_comfy, job_limit, validation_failure};
use super::live::LiveJobs;
use super::lock;
use super::model::{Asset, AssetRole, Job, JobEvent, JobStatus, OutputEncoding};
use super::progress::ProgressTracker;
use super::references::ReferencedFiles;
use super::store::{JobStore, StoreError};
use crate::events::{Analytics, JobTimings};
use crate::media;
use crate::metrics::Metrics;
use crate::plugins::PluginRegistry;
use crate::plugins::bindings::wit;

/// Progress snapshots are stored and published at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Previews are published at most this often (the newest wins; never stored).
const PREVIEW_INTERVAL: Duration = Duration::from_millis(500);
/// A preview larger than this is dropped (previews are small: latent2rgb/TAESD JPEGs).
const MAX_PREVIEW_BYTES: usize = 4 << 20;
/// How long an upload may go on past the job's deadline. The deadline does not abort an
/// upload request ComfyUI may already have read (it would write the file after the job's
/// cleanup); the request finishes in the background, bounded by this, and the job's upload
/// folder is removed again once it has.
const UPLOAD_GRACE: Duration = Duration::from_secs(30);

/// The phase a running job is in, shared by the run (which moves it on) and the code that
/// turns the job's deadline into a [`JobFailure::Timeout`] naming the slow part.
#[derive(Clone)]
struct PhaseCell(Arc<AtomicU8>);

impl PhaseCell {
    fn new(phase: RunPhase) -> Self {
        let cell = PhaseCell(Arc::new(AtomicU8::new(0)));
        cell.set(phase);
        cell
    }

    fn set(&self, phase: RunPhase) {
        let n = match phase {
            RunPhase::Queue => 0,
            RunPhase::Upload => 1,
            RunPhase::ComfyUi => 2,
            RunPhase::OutputFetch => 3,
        };
        self.0.store(n, Ordering::Relaxed);
    }

    fn get(&self) -> RunPhase {
        match self.0.load(Ordering::Relaxed) {
            0 => RunPhase::Queue,
            1 => RunPhase::Upload,
            2 => RunPhase::ComfyUi,
            _ => RunPhase::OutputFetch,
        }
    }
}

/// After the run: if an upload request is still in flight (the deadline or a cancel cut the
/// job while uploading), wait for it in the background (bounded) and remove the job's
/// upload folder again, so a file ComfyUI writes late does not outlive the job's cleanup.
fn clean_late_uploads(mut alive: tokio::sync::mpsc::Receiver<()>, backend: Arc<ComfyBackend>, job_id: Uuid) {
    if matches!(alive.try_recv(), Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)) {
        return;
    }
    tokio::spawn(async move {
        // `None` once every upload task has ended (their senders dropped).
        let _ = tokio::time::timeout(UPLOAD_GRACE + Duration::from_secs(1), alive.recv()).await;
        match backend.remove_uploads(&upload_subfolder(job_id)).await {
            Ok(removed) => tracing::info!(%job_id, removed, "an upload cut by the job's end finished; the job's upload folder is removed again"),
            Err(err) => tracing::warn!(%job_id, error = %format!("{err:#}"), "could not remove a late upload in ComfyUI"),
        }
    });
}

/// One output as fetched from ComfyUI.
pub(super) struct FetchedOutput {
    pub node_id: String,
    pub filename: String,
    pub bytes: Bytes,
    pub media_type: String,
    /// Set when `bytes` are raw pixels (the raster transport): encode them, never store them.
    pub raster: Option<flowhost_comfy::run::RasterShape>,
}

impl From<flowhost_comfy::OutputMedia> for FetchedOutput {
    fn from(m: flowhost_comfy::OutputMedia) -> Self {
        FetchedOutput { node_id: m.node_id, filename: m.filename, bytes: m.bytes, media_type: m.media_type, raster: m.raster }
    }
}

/// The per-job upload folder in ComfyUI's input directory.
pub fn upload_subfolder(job_id: Uuid) -> String {
    format!("flowhost-{job_id}")
}

/// The job service's part that runs jobs against ComfyUI.
pub struct Runner {
    store: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    live: Arc<LiveJobs>,
    /// Model files fetched by reference, placed again before a run.
    references: Arc<ReferencedFiles>,
    /// For `explain-failure` on jobs whose plugin is still loaded.
    plugins: Option<Arc<PluginRegistry>>,
    /// Whether instances share one queue: then a database outage at a job's end is waited
    /// out rather than turned into a failure.
    shared_queue: bool,
    job_timeout: Duration,
    jpeg_quality: u8,
    raster_outputs: bool,
    speed: Option<SpeedRouting>,
    /// Per-prompt `extra_data` that must never be stored (v2's `api_key_comfy_org`): held in
    /// memory for the job's run only, so a restart loses it (the job then runs without it).
    transient_extra: Mutex<HashMap<Uuid, Map<String, Value>>>,
    metrics: Metrics,
    analytics: Analytics,
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &JobConfig,
        store: Arc<dyn JobStore>,
        blobs: Arc<dyn BlobStore>,
        live: Arc<LiveJobs>,
        references: Arc<ReferencedFiles>,
        plugins: Option<Arc<PluginRegistry>>,
        shared_queue: bool,
        metrics: Metrics,
        analytics: Analytics,
    ) -> Runner {
        Runner {
            store,
            blobs,
            live,
            references,
            plugins,
            shared_queue,
            job_timeout: config.job_timeout,
            jpeg_quality: config.jpeg_quality,
            raster_outputs: config.raster_outputs,
            speed: config.speed.clone(),
            transient_extra: Mutex::new(HashMap::new()),
            metrics,
            analytics,
        }
    }

    /// Extra `extra_data` for one job's prompt that is forwarded to ComfyUI and never
    /// persisted (set before the job is submitted, with its preassigned id).
    pub(super) fn set_transient_extra_data(&self, id: Uuid, extra: Map<String, Value>) {
        lock(&self.transient_extra).insert(id, extra);
    }

    fn take_transient_extra_data(&self, id: Uuid) -> Option<Map<String, Value>> {
        lock(&self.transient_extra).remove(&id)
    }

    /// Run a queued job to its end on `backend` (the worker that claimed it). Every path
    /// ends in a committed terminal status.
    pub(super) async fn execute(&self, mut job: Job, backend: Option<Arc<ComfyBackend>>) {
        let _in_flight = self.metrics.job_started();
        let now = SystemTime::now();
        job.status = JobStatus::Running;
        job.started_at = Some(now);
        job.queue_position = None;
        job.metrics.queue_ms = Some(now.duration_since(job.created_at).unwrap_or_default().as_millis() as u64);
        let prompt_id = Uuid::new_v4().to_string();
        job.prompt_id = Some(prompt_id.clone());
        if self.live.commit_typed(&job).await.is_err() {
            // Not started: refused (not this instance's any more) or the store is down.
            // Either way nothing runs here; with the shared queue its lease lapses and
            // whoever takes it over settles it.
            self.live.forget(job.id);
            return;
        }
        let Some((mut cancel, mut fence)) = self.live.signals(job.id) else { return };

        // One deadline: execution is bounded by the job timeout; a sync request's
        // deadline (admission + timeout) bounds it further.
        let (deadline, limit) = job_limit(self.job_timeout, job.created_at, job.spec.deadline);
        let started = Instant::now();
        let created_at = job.created_at;
        let phase = PhaseCell::new(RunPhase::ComfyUi);
        // A timeout names the phase that ran out and the limit; a prompt id only once one was submitted.
        let timed_out = |waited_ms: Option<u64>| {
            let at = phase.get();
            JobFailure::Timeout {
                prompt_id: (at != RunPhase::Upload).then(|| prompt_id.clone()),
                waited_ms: waited_ms.unwrap_or_else(|| created_at.elapsed().unwrap_or_default().as_millis() as u64),
                phase: Some(at),
                limit: Some(limit),
            }
        };
        // Every upload task holds a sender: while one lives, an upload is still in flight.
        let (uploads_alive, uploads_done) = tokio::sync::mpsc::channel::<()>(1);
        let (outcome, fenced) = {
            let run = tokio::time::timeout_at(deadline.into(), self.run_in_comfy(&mut job, &prompt_id, deadline, backend.clone(), phase.clone(), uploads_alive));
            tokio::pin!(run);
            let stop = tokio::select! {
                r = &mut run => Some(r.unwrap_or_else(|_| Err(timed_out(None)))),
                _ = cancel.wait_for(|c| *c) => Some(Err(JobFailure::Canceled)),
                _ = fence.wait_for(|f| *f) => None,
            };
            match stop {
                Some(outcome) => (outcome, false),
                None => {
                    // Fenced: this instance may no longer hold the job. Stop the prompt now
                    // (before the lease can be taken over); a prompt that finished before
                    // the interrupt took effect is still a result, recorded only if the
                    // store's fence lets it (nobody took the job over meanwhile).
                    if let Some(backend) = &backend {
                        backend.client().cancel(&prompt_id).await;
                    }
                    ((&mut run).await.unwrap_or_else(|_| Err(timed_out(None))), true)
                }
            }
        };
        // ComfyUI's own deadline (inside the run) may fire first: name the phase all the same.
        let outcome = match outcome {
            Err(JobFailure::Timeout { phase: None, waited_ms, .. }) => Err(timed_out(Some(waited_ms))),
            other => other,
        };
        if let Some(backend) = &backend
            && !job.spec.uploads.is_empty()
        {
            clean_late_uploads(uploads_done, backend.clone(), job.id);
        }
        if fenced && outcome.is_err() {
            tracing::warn!(job_id = %job.id, "stopped a job this instance may no longer hold; the instance that takes it over settles it");
            self.live.forget(job.id);
            if let Some(backend) = &backend {
                clean_comfy_side(backend, job.id, job.prompt_id.as_deref(), !job.spec.uploads.is_empty()).await;
            }
            return;
        }
        if let (Err(JobFailure::Timeout { .. } | JobFailure::Canceled), Some(backend)) = (&outcome, &backend) {
            // The run future is gone; make sure ComfyUI stops THAT prompt now.
            backend.client().cancel(&prompt_id).await;
        }
        let elapsed = started.elapsed();
        self.end(job, outcome, elapsed, backend.as_deref()).await;
    }

    /// The end of a job, recorded: with the shared queue a database outage is waited out
    /// (retried) rather than turned into a failure, until the store records it or refuses
    /// it (another instance took the job over, or it ended already). `false`: not recorded.
    async fn record_end(&self, job: &Job) -> bool {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.live.commit_typed(job).await {
                Ok(()) => return true,
                Err(StoreError::LeaseLost | StoreError::Ended) => return false,
                Err(_) if self.shared_queue => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(_) => return false,
            }
        }
    }

    /// An output's record, written only while this instance may still report the job
    /// (the same fence as its state), and retried across a database outage like the end.
    async fn record_output(&self, asset: &Asset) -> Result<(), JobFailure> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.store.insert_output(asset).await {
                Ok(()) => return Ok(()),
                Err(e @ (StoreError::LeaseLost | StoreError::Ended)) => {
                    return Err(JobFailure::internal(e));
                }
                Err(e) if !self.shared_queue => return Err(JobFailure::internal(e)),
                Err(e) => {
                    tracing::warn!(job_id = ?asset.job_id, error = %e, "recording an output failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Record the outcome, emit events and metrics, clean ComfyUI's side.
    async fn end(&self, mut job: Job, outcome: Result<RunPhases, JobFailure>, elapsed: Duration, backend: Option<&ComfyBackend>) {
        let now = SystemTime::now();
        job.completed_at = Some(now);
        job.metrics.total_ms = Some(now.duration_since(job.created_at).unwrap_or_default().as_millis() as u64);
        let mut timings = JobTimings { plugin_build: job.metrics.build_ms.map(Duration::from_millis), total: Some(now.duration_since(job.created_at).unwrap_or_default()), ..Default::default() };
        match outcome {
            Ok(phases) => {
                job.status = JobStatus::Succeeded;
                job.metrics.comfyui_queue_ms = Some(phases.comfy_queue.as_millis() as u64);
                job.metrics.execution_ms = Some(phases.execution.as_millis() as u64);
                job.metrics.comfyui_clock_ms = phases.comfy_clock.map(|d| d.as_millis() as u64);
                job.metrics.fetch_ms = Some(phases.fetch.as_millis() as u64);
                if let Some(p) = job.progress.as_mut() {
                    p.value = 1.0;
                }
                timings.queue_wait = Some(Duration::from_millis(job.metrics.queue_ms.unwrap_or(0)) + phases.comfy_queue);
                timings.execution = Some(phases.execution);
                timings.encode = Some(phases.fetch);
            }
            Err(JobFailure::Canceled) => job.status = JobStatus::Canceled,
            Err(failure) => {
                job.status = JobStatus::Failed;
                job.error = Some(failure);
            }
        }
        tracing::info!(job_id = %job.id, status = job.status.as_str(), elapsed_ms = elapsed.as_millis() as u64, "job ended");
        if !self.record_end(&job).await {
            if let Some(backend) = backend {
                clean_comfy_side(backend, job.id, job.prompt_id.as_deref(), !job.spec.uploads.is_empty()).await;
            }
            return;
        }
        self.metrics.observe_job(job.source.route_label(), &timings);
        self.metrics.job_finished(job.source.route_label(), job.status.as_str());
        if let Some(events) = &job.spec.events {
            match (&job.status, &job.error) {
                (JobStatus::Succeeded, _) => self.analytics.emit(events.completed(&job.spec.analytics, &timings)),
                (_, Some(error)) => self.analytics.emit(events.failed(&job.spec.analytics, &timings, error.failure_kind(), &error.message())),
                _ => {}
            }
        }
        if let Some(backend) = backend {
            clean_comfy_side(backend, job.id, job.prompt_id.as_deref(), !job.spec.uploads.is_empty()).await;
        }
    }

    /// Uploads, preflight, run, outputs. The job's workflow becomes the executed graph.
    async fn run_in_comfy(
        &self,
        job: &mut Job,
        prompt_id: &str,
        deadline: Instant,
        backend: Option<Arc<ComfyBackend>>,
        phase: PhaseCell,
        uploads_alive: tokio::sync::mpsc::Sender<()>,
    ) -> Result<RunPhases, JobFailure> {
        let backend = backend.ok_or_else(|| JobFailure::ComfyUnavailable { detail: "no ComfyUI backend is configured; only ?dry_run=true works".into(), retry_after_s: 30 })?;
        if let Some(events) = &job.spec.events
            && let Some(event) = events.resolved(&job.spec.analytics)
        {
            self.analytics.emit(event);
        }
        let phase_started = Instant::now();
        let mut workflow = job.spec.workflow.clone();
        // Model files fetched by reference at admission, pinned for the run: a cache hit,
        // or fetched again where this instance never had them (a shared queue) or they were
        // evicted across a restart.
        let _model_pins = if job.spec.model_files.is_empty() {
            Vec::new()
        } else {
            phase.set(RunPhase::Upload);
            self.references.replace_models(&job.spec.model_files, tokio::time::Instant::from_std(deadline)).await?
        };
        let subfolder = upload_subfolder(job.id);
        if !job.spec.uploads.is_empty() {
            phase.set(RunPhase::Upload);
        }
        for upload in &job.spec.uploads {
            let bytes = self.blobs.get(&upload.hash).await.map_err(|e| JobFailure::internal(format!("input {}: {e}", upload.filename)))?;
            // In a task of its own: if the deadline drops this run mid-upload, the request
            // still ends (bounded) and `clean_late_uploads` removes what it wrote.
            let task = tokio::spawn({
                let (backend, name, subfolder, alive) = (backend.clone(), safe_filename(&upload.filename), subfolder.clone(), uploads_alive.clone());
                let bound = deadline.saturating_duration_since(Instant::now()) + UPLOAD_GRACE;
                async move {
                    let _alive = alive;
                    match tokio::time::timeout(bound, backend.upload_image(bytes, &name, &subfolder)).await {
                        Ok(r) => r,
                        Err(_) => Err(ComfyError::Unavailable { detail: "an upload to ComfyUI did not finish".into() }),
                    }
                }
            });
            let uploaded = task.await.map_err(JobFailure::internal)?;
            let reference = uploaded.map_err(|e| from_comfy(e, &job.spec.caller_nodes))?;
            if let Some(Value::Object(node)) = workflow.get_mut(&upload.node_id)
                && let Some(Value::Object(inputs)) = node.get_mut("inputs")
            {
                inputs.insert(upload.input_name.clone(), Value::String(reference));
            }
        }
        let mut graph = Value::Object(workflow.clone());
        if let Some(speed) = self.speed.as_ref().and_then(|s| s.for_route(job.source.route()))
            && let Some(fast) = speed.apply(&graph)
        {
            // The executed graph (recorded as the job's workflow below) is the transformed one.
            graph = fast;
        }
        drop(uploads_alive);
        phase.set(RunPhase::ComfyUi);
        if let Err(issues) = backend.preflight(&graph).await {
            return Err(validation_failure(issues, &job.spec.caller_nodes, "preflight"));
        }
        job.workflow = graph.clone();
        let _ = self.store.update_job(job).await;
        tracing::debug!(job_id = %job.id, prepare_us = phase_started.elapsed().as_micros() as u64, "uploads, preflight and the workflow record done");
        let graph = with_job_output_names(graph, job.id);
        // Fenced while preparing: never hand ComfyUI a prompt this instance may not hold.
        if self.live.is_fenced(job.id) {
            return Err(JobFailure::Canceled);
        }

        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut request = RunRequest::new(graph, deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        request.outputs = job.spec.outputs.clone();
        request.prompt_id = Some(prompt_id.to_string());
        // The job wants a JPEG we encode anyway: ComfyUI's PNG would only be decoded again.
        request.raster_outputs = self.raster_outputs && job.spec.encoding == OutputEncoding::Jpeg;
        let mut extra = match &job.spec.extra_data {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        extra.insert("flowhost".into(), json!({"job_id": job.id.to_string(), "request_id": job.spec.request_id}));
        if let Some(transient) = self.take_transient_extra_data(job.id) {
            extra.extend(transient);
        }
        request.extra_data = Value::Object(extra);
        request.on_progress = Some(Arc::new(move |p| {
            let _ = progress_tx.send(p);
        }));
        // Only the newest preview matters: a watch slot, read at most every PREVIEW_INTERVAL.
        let (preview_tx, mut preview_rx) = tokio::sync::watch::channel::<Option<flowhost_comfy::Preview>>(None);
        request.on_fetch = Some(Arc::new({
            let phase = phase.clone();
            move || phase.set(RunPhase::OutputFetch)
        }));
        request.on_preview = Some(Arc::new(move |p: flowhost_comfy::Preview| {
            if p.bytes.len() <= MAX_PREVIEW_BYTES {
                preview_tx.send_replace(Some(p));
            }
        }));
        let mut last_preview = Instant::now() - PREVIEW_INTERVAL;
        let mut preview_pending = false;
        let mut tracker = ProgressTracker::new(&workflow);
        let run = backend.run(request);
        tokio::pin!(run);
        let mut last_stored = Instant::now() - PROGRESS_INTERVAL;
        let mut pending: Option<super::model::Progress> = None;
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(p) = progress_rx.recv() => {
                    pending = Some(tracker.apply(&p));
                }
                Ok(()) = preview_rx.changed() => preview_pending = true,
                _ = tick.tick() => {}
            }
            if preview_pending && last_preview.elapsed() >= PREVIEW_INTERVAL {
                preview_pending = false;
                last_preview = Instant::now();
                if let Some(p) = preview_rx.borrow_and_update().clone() {
                    self.live.send_event(job.id, JobEvent::Preview { bytes: p.bytes, media_type: p.media_type, node_id: p.node_id });
                }
            }
            if let Some(p) = pending.take() {
                if last_stored.elapsed() >= PROGRESS_INTERVAL {
                    last_stored = Instant::now();
                    job.progress = Some(p.clone());
                    let _ = self.store.update_job(job).await;
                    self.live.send_event(job.id, JobEvent::Progress(p));
                } else {
                    pending = Some(p);
                }
            }
        };
        let result = match result {
            Ok(r) => r,
            Err(ComfyError::Execution { prompt_id, node_id, node_type, exception_type, exception_message, traceback }) => {
                return Err(self.explain(job, prompt_id, node_id, node_type, exception_type, exception_message, traceback).await);
            }
            Err(e) => return Err(from_comfy(e, &job.spec.caller_nodes)),
        };
        // Everything between the dispatch slot and execution: uploads, the websocket wait,
        // preflight, submission and ComfyUI's own queue (Server-Timing's `prepare`).
        let comfy_queue = phase_started.elapsed().saturating_sub(result.timings.executing + result.timings.fetching);
        let fetch_started = Instant::now();
        phase.set(RunPhase::OutputFetch);
        if result.media.is_empty() {
            return Err(JobFailure::OutputMissing { node_id: job.spec.outputs.first().cloned().unwrap_or_else(|| "*".into()), caller_fault: !job.spec.caller_nodes.is_empty() });
        }
        let fetched: Vec<FetchedOutput> = result.media.into_iter().map(FetchedOutput::from).collect();
        self.store_outputs(job, fetched).await?;
        Ok(RunPhases { comfy_queue, execution: result.timings.executing, comfy_clock: result.timings.comfy_clock, fetch: result.timings.fetching + fetch_started.elapsed() })
    }

    /// Store one output's bytes; while the blob store (a bucket) cannot be reached, try
    /// again with a growing pause until the job's deadline instead of failing the job at
    /// once (issue #22: a 30 s S3 outage failed 86 of 100 jobs `internal`).
    async fn put_output(&self, job: &Job, bytes: Bytes) -> Result<(String, bool), JobFailure> {
        let started = job.started_at.unwrap_or_else(SystemTime::now);
        let deadline = job.spec.deadline.unwrap_or(started + self.job_timeout);
        let mut pause = Duration::from_millis(500);
        loop {
            match self.blobs.put(bytes.clone()).await {
                Ok(stored) => return Ok(stored),
                Err(e @ super::blobs::BlobError::Io(_)) if SystemTime::now() + pause < deadline => {
                    tracing::warn!(job_id = %job.id, error = %e, retry_in_ms = pause.as_millis() as u64, "could not store an output; retrying within the job's deadline");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(JobFailure::internal(e)),
            }
        }
    }

    /// Encode (per the job's encoding), store as blobs and asset records, tell subscribers.
    pub(super) async fn store_outputs(&self, job: &mut Job, outputs: Vec<FetchedOutput>) -> Result<(), JobFailure> {
        for output in outputs {
            self.metrics.output_stored(if output.raster.is_some() { "raster" } else { "encoded" });
            let started = Instant::now();
            let (bytes, media_type) = match output.raster {
                Some(shape) => encode_raster(output.bytes, shape, job.spec.encoding, self.jpeg_quality).await?,
                None => encode(output.bytes, &output.media_type, job.spec.encoding, self.jpeg_quality).await?,
            };
            let encoded = Instant::now();
            let size = bytes.len() as u64;
            let (hash, _) = self.put_output(job, bytes).await?;
            tracing::debug!(job_id = %job.id, encode_us = encoded.duration_since(started).as_micros() as u64, blob_us = encoded.elapsed().as_micros() as u64, "output encoded and stored");
            let asset = Asset {
                id: Uuid::new_v4(),
                hash,
                size_bytes: size,
                name: Some(rename_for(&output.filename, &media_type)),
                content_type: media_type,
                job_id: Some(job.id),
                node_id: Some(output.node_id),
                role: AssetRole::Output,
                created_at: SystemTime::now(),
                expires_at: Some(job.expires_at),
                tenant: job.spec.tenant.clone(),
            };
            self.record_output(&asset).await?;
            job.outputs.push(asset.clone());
            self.live.send_event(job.id, JobEvent::Output(asset));
        }
        Ok(())
    }

    /// Let the plugin that built the graph explain an execution error in its words.
    #[allow(clippy::too_many_arguments)]
    async fn explain(
        &self,
        job: &Job,
        prompt_id: String,
        node_id: String,
        node_type: String,
        exception_type: String,
        exception_message: String,
        traceback: Vec<String>,
    ) -> JobFailure {
        let plugin = match (&job.source, self.plugins.as_ref()) {
            (super::model::JobSource::Route { route, version, .. }, Some(registry)) => registry
                .lookup(route)
                .filter(|p| &p.manifest.version == version),
            _ => None,
        };
        if let Some(plugin) = plugin {
            let failure = wit::ExecutionFailure { node_id: node_id.clone(), node_type: node_type.clone(), exception_type: exception_type.clone(), exception_message: exception_message.clone() };
            let rid = job.spec.request_id.clone();
            let explained = tokio::task::spawn_blocking(move || plugin.explain_failure(&failure, &rid)).await.ok().flatten();
            if let Some(user) = explained {
                return JobFailure::Explained { status: user.status, title: user.title, detail: user.detail, field: user.field, node_id, class_type: node_type };
            }
        }
        JobFailure::Execution { prompt_id, node_id, class_type: node_type, exception_type, exception_message: exception_message.trim_end().to_string(), traceback }
    }
}

/// The graph as submitted: every save node's `filename_prefix` gets the job's short id, so the
/// job's output files are its own. Why: flowhost deletes a job's files in ComfyUI when it ends,
/// and ComfyUI answers an identical prompt from its cache with the *earlier* prompt's file
/// names — files already deleted (a 404 on `/view`). With the job id in the prefix the save
/// node re-runs (writing new files) while everything upstream still comes from the cache.
pub(super) fn with_job_output_names(mut graph: Value, job_id: Uuid) -> Value {
    let tag = job_id.simple().to_string();
    let tag = &tag[..8];
    if let Value::Object(nodes) = &mut graph {
        for node in nodes.values_mut() {
            if let Some(Value::String(prefix)) = node.get_mut("inputs").and_then(|i| i.get_mut("filename_prefix")) {
                *prefix = format!("{prefix}_{tag}");
            }
        }
    }
    graph
}

/// Where the time of a successful run went.
pub(super) struct RunPhases {
    pub comfy_queue: Duration,
    pub execution: Duration,
    /// ComfyUI's own stamps of the same span, when it sent them.
    pub comfy_clock: Option<Duration>,
    pub fetch: Duration,
}

/// Delete what the job left on ComfyUI's side: its upload folder and its output
/// files (then its history entry). Best effort, logged.
pub(super) async fn clean_comfy_side(backend: &ComfyBackend, job_id: Uuid, prompt_id: Option<&str>, uploaded: bool) {
    if uploaded && let Err(err) = backend.remove_uploads(&upload_subfolder(job_id)).await {
        tracing::warn!(%job_id, error = %format!("{err:#}"), "could not remove the job's uploads in ComfyUI");
    }
    if let Some(prompt_id) = prompt_id {
        match backend.remove_prompt_files(prompt_id).await {
            Ok(n) => tracing::debug!(%job_id, removed = n, "removed the job's outputs in ComfyUI"),
            Err(err) => tracing::warn!(%job_id, error = %format!("{err:#}"), "could not remove the job's outputs in ComfyUI"),
        }
    }
}

/// PNG → JPEG (or PNG) per the job's encoding; other media pass through.
pub(super) async fn encode(bytes: Bytes, media_type: &str, encoding: OutputEncoding, quality: u8) -> Result<(Bytes, String), JobFailure> {
    let sniffed = media::sniff_media_type(&bytes);
    let media_type = if sniffed == "application/octet-stream" { media_type.to_string() } else { sniffed.to_string() };
    if media_type != "image/png" || encoding != OutputEncoding::Jpeg {
        return Ok((bytes, media_type));
    }
    let encoded = tokio::task::spawn_blocking(move || media::png_to_jpeg(&bytes, quality)).await;
    match encoded {
        Ok(Ok(jpeg)) => Ok((jpeg.into(), "image/jpeg".into())),
        Ok(Err(err)) => Err(JobFailure::OutputUnreadable { detail: format!("{err:#}") }),
        Err(err) => Err(JobFailure::internal(err)),
    }
}

/// Raw pixels → JPEG (or PNG, for a job that keeps PNG), on the blocking pool.
pub(super) async fn encode_raster(pixels: Bytes, shape: flowhost_comfy::run::RasterShape, encoding: OutputEncoding, quality: u8) -> Result<(Bytes, String), JobFailure> {
    let flowhost_comfy::run::RasterShape { width, height, channels } = shape;
    let encoded = tokio::task::spawn_blocking(move || match encoding {
        OutputEncoding::Jpeg => media::raster_to_jpeg(&pixels, width, height, channels, quality).map(|b| (b, "image/jpeg")),
        _ => media::raster_to_png(&pixels, width, height, channels).map(|b| (b, "image/png")),
    })
    .await;
    match encoded {
        Ok(Ok((bytes, media_type))) => Ok((bytes.into(), media_type.into())),
        Ok(Err(err)) => Err(JobFailure::OutputUnreadable { detail: format!("{err:#}") }),
        Err(err) => Err(JobFailure::internal(err)),
    }
}

/// The output's file name with the extension of what it now is.
fn rename_for(filename: &str, media_type: &str) -> String {
    if media_type == "image/jpeg" && filename.to_ascii_lowercase().ends_with(".png") {
        format!("{}.jpg", &filename[..filename.len() - 4])
    } else {
        filename.to_string()
    }
}

pub(super) fn safe_filename(name: &str) -> String {
    let clean: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).take(100).collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() { "input.png".into() } else { clean }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names_cannot_escape_their_folder() {
        assert_eq!(safe_filename("../../etc/passwd"), "etcpasswd");
        assert_eq!(safe_filename(".hidden.png"), "hidden.png");
        assert_eq!(safe_filename(""), "input.png");
        let id = Uuid::new_v4();
        assert_eq!(upload_subfolder(id), format!("flowhost-{id}"));
    }

    #[test]
    fn jpeg_outputs_are_named_jpg() {
        assert_eq!(rename_for("ComfyUI_00001_.png", "image/jpeg"), "ComfyUI_00001_.jpg");
        assert_eq!(rename_for("a.webp", "image/webp"), "a.webp");
    }
}

#[cfg(test)]
mod output_name_tests {
    use super::*;

    #[test]
    fn save_nodes_get_the_jobs_tag_and_links_are_left_alone() {
        let id = Uuid::parse_str("0123456789abcdef0123456789abcdef").unwrap();
        let graph = serde_json::json!({
            "1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "flux-dev"}},
            "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": ["5", 0]}},
        });
        let out = with_job_output_names(graph, id);
        assert_eq!(out["1"]["inputs"]["filename_prefix"], "flux-dev_01234567");
        assert_eq!(out["4"]["inputs"]["filename_prefix"], serde_json::json!(["5", 0]));
        assert_eq!(out["2"]["inputs"]["samples"], serde_json::json!(["3", 0]));
    }
}

