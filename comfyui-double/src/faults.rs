//! Runtime fault knobs and the observation record of a running double.
//!
//! Owns: what tests can switch at runtime (latency, failures, hang, crash, socket drops, slow `/view`)
//! and what the double saw (interrupts, queue deletes, uploads, accepted prompts).
//! Must never: act on a fault itself — the executor, HTTP layer and socket layer read these knobs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;

/// A node failure to inject: matched against a node's `class_type` or its id.
#[derive(Clone, Debug)]
pub struct InjectedFailure {
    pub class_or_node_id: String,
    pub exception_type: String,
    pub message: String,
}

/// The current fault settings (a snapshot; see [`Faults`]).
#[derive(Clone, Debug, Default)]
pub struct FaultSettings {
    pub step_latency: Duration,
    pub fail_at: Option<InjectedFailure>,
    pub hang: bool,
    pub drop_ws_after: Option<u32>,
    pub view_delay: Duration,
    /// What loading another model set costs: paid before a prompt whose loaders (checkpoint /
    /// diffusion model, LoRAs and their strengths) differ from the previous prompt's. Real
    /// ComfyUI re-patches the model then (9–22 s for a LoRA change of Flux on an H200).
    pub model_switch: Duration,
    /// Websocket upgrades answered 503 (HTTP keeps answering): a ComfyUI whose socket
    /// cannot connect yet.
    pub refuse_ws: bool,
    /// Close every client websocket instead of sending a `FlowhostImageOutput` raster (the
    /// frames are lost as on a real drop); the prompt still completes and lands in history.
    pub drop_ws_on_raster: bool,
    /// Delay between receiving an upload's body and writing its file. The write happens
    /// even when the client hung up meanwhile, as in a server that finishes a request it
    /// has read: the file lands late.
    pub upload_delay: Duration,
}

/// Fires once: after it, every connection of the double errors and nothing answers any more.
#[derive(Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    notify: Notify,
}

impl KillSwitch {
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Resolves once [`KillSwitch::kill`] has been called (immediately if it already was).
    pub(crate) async fn wait(self: Arc<Self>) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_killed() {
                return;
            }
            notified.await;
        }
    }
}

/// Runtime fault knobs of one double. Cheap to clone; all clones act on the same double.
/// While latency, a failure or a hang is armed, prompts are not served from the execution cache
/// (a repeated prompt would otherwise finish without running the node the fault targets).
#[derive(Clone)]
pub struct Faults {
    settings: Arc<Mutex<FaultSettings>>,
    pub(crate) kill: Arc<KillSwitch>,
}

impl Faults {
    pub(crate) fn new(kill: Arc<KillSwitch>) -> Self {
        Faults { settings: Arc::new(Mutex::new(FaultSettings::default())), kill }
    }

    fn lock(&self) -> MutexGuard<'_, FaultSettings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delay per executed node and per sampler step.
    pub fn set_step_latency(&self, d: Duration) {
        self.lock().step_latency = d;
    }

    /// Make the node whose `class_type` or id equals `class_or_node_id` raise `exception_type: message`
    /// when it executes (→ `execution_error`, history status error).
    pub fn fail_at(&self, class_or_node_id: &str, exception_type: &str, message: &str) {
        self.lock().fail_at = Some(InjectedFailure {
            class_or_node_id: class_or_node_id.to_string(),
            exception_type: exception_type.to_string(),
            message: message.to_string(),
        });
    }

    /// While on, the first node a prompt executes never finishes until the prompt is interrupted.
    pub fn hang(&self, on: bool) {
        self.lock().hang = on;
    }

    /// Like a dead process: every open connection (HTTP and websocket) is dropped, the port stops
    /// accepting, the running prompt never finishes. Irreversible for this double.
    pub fn crash(&self) {
        self.kill.kill();
    }

    /// Close every client websocket after this many `progress`/`progress_state` events of a prompt
    /// (once per prompt); the prompt itself still completes and lands in history.
    pub fn drop_ws_after(&self, progress_events: Option<u32>) {
        self.lock().drop_ws_after = progress_events;
    }

    /// The cost of a model switch (see [`FaultSettings::model_switch`]); zero: free.
    /// Unlike the other knobs it does not turn the execution cache off.
    pub fn set_model_switch_cost(&self, d: Duration) {
        self.lock().model_switch = d;
    }

    /// Delay before `GET /view` answers.
    pub fn set_view_delay(&self, d: Duration) {
        self.lock().view_delay = d;
    }

    /// Delay before an upload's file is written (see [`FaultSettings::upload_delay`]).
    pub fn set_upload_delay(&self, d: Duration) {
        self.lock().upload_delay = d;
    }

    /// While on, every `FlowhostImageOutput` frame is lost with the socket (see
    /// [`FaultSettings::drop_ws_on_raster`]).
    pub fn drop_ws_on_raster(&self, on: bool) {
        self.lock().drop_ws_on_raster = on;
    }

    /// While on, `GET /ws` is refused with 503 (new connections only; open sockets stay).
    pub fn refuse_websocket(&self, on: bool) {
        self.lock().refuse_ws = on;
    }

    /// Back to no faults (a crash cannot be undone). The model-switch cost stays: it is how
    /// this "GPU" behaves, not a fault.
    pub fn clear(&self) {
        let mut settings = self.lock();
        let model_switch = settings.model_switch;
        *settings = FaultSettings { model_switch, ..FaultSettings::default() };
    }

    /// The current settings.
    pub fn settings(&self) -> FaultSettings {
        self.lock().clone()
    }

    pub fn is_crashed(&self) -> bool {
        self.kill.is_killed()
    }
}

/// One `POST /upload/image` the double accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadRecord {
    /// The name the file was stored under (after renaming).
    pub name: String,
    pub subfolder: String,
    /// "input", "temp" or "output".
    pub kind: String,
    pub size: usize,
}

/// What the double received, for assertions ("the timeout interrupted THAT prompt").
#[derive(Clone, Debug, Default)]
pub struct Record {
    /// Every `POST /interrupt`: `Some(prompt_id)` when targeted, `None` when global.
    pub interrupts: Vec<Option<String>>,
    /// Every prompt id named in a `POST /queue {"delete": [...]}`.
    pub queue_deletes: Vec<String>,
    /// Number of `POST /queue {"clear": true}` calls.
    pub queue_clears: u32,
    pub uploads: Vec<UploadRecord>,
    /// Every prompt accepted into the queue: (prompt_id, graph as submitted).
    pub prompts: Vec<(String, Value)>,
    /// Every prompt that ran to `execution_success` (not interrupted, not failed): what
    /// "ran twice" counts in the fault tests.
    pub completed: Vec<String>,
}
