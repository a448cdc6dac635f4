//! flowhost: serve ComfyUI workflows as HTTP endpoints, one sandboxed WebAssembly
//! component per endpoint.
//!
//! Rooms, top to bottom (a room imports only rooms below it; `tests/tests/all/structure.rs`
//! checks that no import runs upward and no two rooms import each other):
//! - `app`: the assembly and the commands (`server` wires the rooms for `flowhost serve`,
//!   `cli`, `backing` — which job store and blob store —, `simulate` — the embedded ComfyUI
//!   double —, `check_plugin`, `new_plugin`, `models_command`);
//! - `http`: the router, headers, the mapping of domain errors to problem+json and the v2
//!   envelope (`access`: API-key refusals; `idempotency`: the one `Idempotency-Key` rule;
//!   `page`: the browser page);
//! - `warm_up`: one cheap job per route before the service calls itself ready;
//! - `generation`: a typed request becomes a job, protocol-free (schema check, the one
//!   `PluginJob → JobSpec`), used by the typed route, warm-up and `check-plugin`;
//! - `webhooks`: vetting destinations, signing and sending the outbox's messages;
//! - `jobs`: durable jobs and every table they live in (store, leases and fencing, queue,
//!   pool, runner, recovery, tenants, assets, labels, the webhook outbox and subscriptions,
//!   and `view`, the v2 Job document every response, event and webhook carries);
//! - `plugins` (the wasm sandbox, its memory budget, route ownership) and `flowhost_comfy`;
//! - below them, in this order: `metrics`, `models` (the volume and the model cache), `net`
//!   (outbound HTTP under the destination guard: webhooks, model and image fetches), `media`,
//!   `events`, `auth` (keys and their comparison), `timestamp`, `state_lock`.

pub mod app;
pub mod auth;
pub mod events;
pub mod generation;
pub mod http;
pub mod jobs;
pub mod media;
pub mod metrics;
pub mod models;
pub mod net;
pub mod plugins;
pub mod state_lock;
pub mod timestamp;
pub mod warm_up;
pub mod webhooks;
