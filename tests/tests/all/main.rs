//! The end-to-end tests as one binary (wasmtime's `tests/all/` layout): one link of
//! wasmtime, sqlx and axum instead of one per area. Each module is one area; shared
//! setup lives in `flowhost_tests` (`tests/support/`). Tests here run in one process, so
//! none may change the process environment: a test that needs an environment variable
//! starts the `flowhost` binary as a child with it (see `api_v2_auth`).

mod api_v2;
mod api_v2_auth;
mod api_v2_limits;
mod api_v2_tenants;
mod author_path;
mod blob_store_s3;
mod comfy_e2e;
mod database_url;
mod deadline_phases;
mod endpoints;
mod faults;
mod hardening;
mod job_store;
mod jobs;
mod liveness;
mod model_refs;
mod models_pull;
mod ops;
mod plugin_graphs;
mod pool;
mod raster;
mod runtime;
mod s3_outage;
mod shared;
mod shared_queue;
mod speed_profile;
mod structure;
mod warm_up;
mod webhooks;
