//! How many plugin calls may run at once, per plugin and in total. Every call takes one of the
//! pooling allocator's component-instance slots ([`POOL_COMPONENT_INSTANCES`]); without a bound one
//! slow plugin fills them all and every other plugin's calls fail ("maximum concurrent limit"). The
//! bounds here sit below the pool, leaving room for loads and `explain-failure`, and a call that
//! finds them full is refused at once (the caller answers 503 with Retry-After) instead of queueing.
//!
//! This module only counts; it must never wait for a slot or know what a call does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::engine::POOL_COMPONENT_INSTANCES;

/// Default bound on concurrent calls of one plugin.
pub const DEFAULT_PER_PLUGIN: usize = 64;
/// Default bound on concurrent calls of all plugins together.
pub const DEFAULT_TOTAL: usize = 192;

/// Which bound was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// This plugin has as many calls running as it may.
    Plugin { limit: usize },
    /// All plugins together do.
    AllPlugins { limit: usize },
}

/// Held for the length of one call; dropping it frees the slots.
#[derive(Debug)]
pub struct CallPermit {
    _plugin: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

/// The counters. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct CallSlots {
    per_plugin: usize,
    total_limit: usize,
    total: Arc<Semaphore>,
    plugins: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Default for CallSlots {
    fn default() -> Self {
        Self::new(DEFAULT_PER_PLUGIN, DEFAULT_TOTAL)
    }
}

impl CallSlots {
    /// `per_plugin` calls of one plugin, `total` of all; `total` is kept below the pool's instance
    /// slots (and at least 1), `per_plugin` at most `total`.
    pub fn new(per_plugin: usize, total: usize) -> Self {
        let total = total.clamp(1, POOL_COMPONENT_INSTANCES as usize - 16);
        let per_plugin = per_plugin.clamp(1, total);
        Self { per_plugin, total_limit: total, total: Arc::new(Semaphore::new(total)), plugins: Mutex::new(HashMap::new()) }
    }

    /// A slot for one call of `plugin` (its name: all versions share the bound), or which bound is full.
    pub fn try_acquire(&self, plugin: &str) -> Result<CallPermit, Busy> {
        let semaphore = {
            let mut plugins = self.plugins.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            plugins.entry(plugin.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.per_plugin))).clone()
        };
        let plugin_permit = semaphore.try_acquire_owned().map_err(|_| Busy::Plugin { limit: self.per_plugin })?;
        let total_permit = self.total.clone().try_acquire_owned().map_err(|_| Busy::AllPlugins { limit: self.total_limit })?;
        Ok(CallPermit { _plugin: plugin_permit, _total: total_permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_plugin_limit_obeyed_and_violated() {
        let slots = CallSlots::new(2, 10);
        let a = slots.try_acquire("slow").unwrap();
        let _b = slots.try_acquire("slow").unwrap();
        assert_eq!(slots.try_acquire("slow").unwrap_err(), Busy::Plugin { limit: 2 });
        // Another plugin is unaffected by the slow one's calls.
        assert!(slots.try_acquire("fast").is_ok());
        drop(a);
        assert!(slots.try_acquire("slow").is_ok());
    }

    #[test]
    fn total_limit_violated() {
        let slots = CallSlots::new(2, 3);
        let _held: Vec<_> = ["a", "a", "b"].iter().map(|p| slots.try_acquire(p).unwrap()).collect();
        assert_eq!(slots.try_acquire("c").unwrap_err(), Busy::AllPlugins { limit: 3 });
    }

    #[test]
    fn the_total_stays_below_the_pool() {
        let slots = CallSlots::new(10_000, 10_000);
        assert!(slots.total_limit < POOL_COMPONENT_INSTANCES as usize);
        assert!(DEFAULT_TOTAL < POOL_COMPONENT_INSTANCES as usize);
    }
}
