//! What one plugin call may use: memory, wall time, captured output, and the host's budget
//! over all calls. Its own module because the engine is configured with it and the sandbox
//! enforces it per call, and neither should import the other for it.

use std::time::Duration;

/// How often the epoch advances. A call's deadline is rounded up to this.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits applied to every plugin call.
#[derive(Debug, Clone)]
pub struct PluginLimits {
    /// Linear memory a plugin instance may grow to.
    pub memory_bytes: usize,
    /// Wall time of one call (instantiate + `build`).
    pub call_timeout: Duration,
    /// Bytes of stdout/stderr kept per call (the rest is dropped).
    pub output_capture_bytes: usize,
    /// Guest memory plus bytes copied out of guests, over all calls in flight
    /// (see [`super::budget`]).
    pub host_budget_bytes: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_timeout: Duration::from_secs(1),
            output_capture_bytes: 16 << 10,
            host_budget_bytes: super::budget::DEFAULT_BYTES,
        }
    }
}

impl PluginLimits {
    /// Epoch ticks a call may run for.
    pub fn deadline_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_micros().max(1);
        (self.call_timeout.as_micros().div_ceil(tick) as u64).max(1)
    }
}
