//! flowhost: serve ComfyUI workflows as HTTP endpoints, one sandboxed WebAssembly
//! component per endpoint.
//!
//! Rooms, top to bottom:
//! - the assembly and the commands: `server` (wires the rooms for `flowhost serve`), `cli`,
//!   `backing` (which job store and blob store), `simulate` (the embedded ComfyUI double),
//!   `warm_up`, `check_plugin`, `new_plugin`, `models_command`;
//! - `http`: the router, headers, the mapping of domain errors to problem+json and the v2
//!   envelope (`access`: API-key refusals; `idempotency`: the one `Idempotency-Key` rule;
//!   `page`: the browser page);
//! - `generation`: a typed request becomes a job, protocol-free (schema check, the one
//!   `PluginJob → JobSpec`), used by the typed route, warm-up and `check-plugin`;
//! - `jobs`: durable jobs (store, leases and fencing, queue, pool, runner, recovery, tenants,
//!   assets, labels) and `webhooks` (the outbox's deliveries);
//! - `plugins` (the wasm sandbox, its memory budget, route ownership) and `flowhost_comfy`;
//! - beside them: `net` (outbound HTTP under the destination guard: webhooks, model and
//!   image fetches), `media`, `models`, `events`, `auth` (keys and their comparison), `metrics`,
//!   `timestamp`, `state_lock`.
//!
//! Not yet as drawn (issue 21, open): `jobs` ⇄ `webhooks` still import each other, the v2 job
//! document is built in `http::job_view` and handed to the outbox by function pointer, and
//! `JobService` is one type implemented across several files of `jobs/`.

pub mod auth;
pub mod backing;
pub mod check_plugin;
pub mod cli;
pub mod events;
pub mod generation;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod models_command;
pub mod net;
pub mod new_plugin;
pub mod plugins;
pub mod server;
pub mod media;
pub mod simulate;
pub mod state_lock;
pub mod timestamp;
pub mod warm_up;
pub mod webhooks;
