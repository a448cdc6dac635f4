//! The job service's settings ([`JobConfig`]), read once when the service and its parts
//! are built: each part copies the fields it needs.
//!
//! Owns: the settings and their defaults. Must never: change after the service is built
//! (no part reads it again).

use std::path::PathBuf;
use std::time::Duration;

use super::affinity::DispatchRule;

/// Settings of the job service.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Prompts in each ComfyUI worker at once (dispatch loops per worker).
    pub max_in_flight: usize,
    /// Jobs waiting beyond the running ones; a full queue refuses with `QueueFull`.
    pub queue_depth: usize,
    /// Per-job deadline: execution (uploads to the last output byte) always; for a sync
    /// typed request also its wait in the queue (admission to the last byte).
    pub job_timeout: Duration,
    pub jpeg_quality: u8,
    /// Ask for JPEG outputs as raw pixels (`--output-transport auto`; used only when
    /// ComfyUI lists the node).
    pub raster_outputs: bool,
    /// The inputs volume for path-valued image fields.
    pub inputs: Option<PathBuf>,
    /// How long jobs and their assets are kept after creation.
    pub retention: Duration,
    /// Which queued job a free worker takes (`--dispatch`, `--affinity-wait-bound`).
    pub dispatch: DispatchRule,
    /// The speed profile's graph transform (`--comfyui-profile speed`): applied to every
    /// job's graph before preflight and submit, on the routes it names. `None`: graphs go as built.
    pub speed: Option<SpeedRouting>,
}

/// Where the speed profile's graph transform applies.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedRouting {
    pub graph: flowhost_comfy::SpeedGraph,
    /// Routes (`/flux-dev`) whose jobs get it; empty: every route.
    pub routes: Vec<String>,
}

impl SpeedRouting {
    /// The transform for a job of `route` (`None` for a job without one, e.g. `/api/v2`
    /// prompts, only when routes are named).
    pub fn for_route(&self, route: Option<&str>) -> Option<&flowhost_comfy::SpeedGraph> {
        let on = self.routes.is_empty() || route.is_some_and(|r| self.routes.iter().any(|x| x == r));
        on.then_some(&self.graph)
    }
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig { max_in_flight: 5, queue_depth: 100, job_timeout: Duration::from_secs(120), jpeg_quality: 90, raster_outputs: true, inputs: None, retention: Duration::from_secs(24 * 3600), dispatch: DispatchRule::default(), speed: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_speed_transform_applies_to_the_named_routes_or_to_all() {
        let graph = flowhost_comfy::SpeedGraph { compile: true, step_cache: None };
        let all = SpeedRouting { graph, routes: vec![] };
        assert!(all.for_route(Some("/flux-dev")).is_some() && all.for_route(None).is_some());
        let some = SpeedRouting { graph, routes: vec!["/flux-dev".into()] };
        assert!(some.for_route(Some("/flux-dev")).is_some());
        assert!(some.for_route(Some("/flux-lora")).is_none());
        assert!(some.for_route(None).is_none(), "v2 prompts have no route");
    }
}
