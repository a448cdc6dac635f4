//! The aggregate bound on host memory that plugin calls can make the service hold.
//!
//! Each call is bounded on its own (the instance's memory limit, the log budget), but 192 calls at
//! once, each at its own limit, add up to gigabytes. One [`HostBudget`] per engine counts, over
//! every call in flight, the linear memory of the call's instances (charged by the store's
//! `ResourceLimiter` when the memory grows, *before* it grows) and the bytes the host copies out of
//! the guest (a returned job, charged from the lengths in guest memory *before* anything is
//! copied). A call whose next charge would pass the limit is stopped: it fails with
//! [`Refusal::Exhausted`], which the HTTP edge answers 503 `plugin_busy` with Retry-After, because
//! it is the other calls' weight, not this call's, that filled the budget.
//!
//! Every charge belongs to one [`CallShare`], which gives it back when the call's store is dropped;
//! when the budget empties after a burst the process hands freed heap pages back to the OS
//! (glibc's `malloc_trim`), so resident memory returns near its idle figure.
//!
//! Owns: the counter and the trimming. Must never: wait for budget (a call that does not fit is
//! refused at once), or know what a plugin call is.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Default bound: 1 GiB of guest memory and lifted bytes over all calls in flight. A normal call
/// holds 1–4 MiB, so 192 concurrent calls fit several times over; in a 24–48 GB container the
/// bound keeps plugins to a few percent of memory whatever they do.
pub const DEFAULT_BYTES: usize = 1 << 30;

/// Trim the heap after a burst only if the budget held at least this much at its peak (trimming
/// walks the heap; after ordinary calls there is nothing to give back).
const TRIM_AFTER_PEAK: usize = 64 << 20;

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The calls in flight already hold so much that this charge would pass the limit.
    Exhausted { limit: usize, wanted: usize },
}

/// The shared counter.
#[derive(Debug)]
pub struct HostBudget {
    limit: usize,
    used: AtomicUsize,
    /// The most held since the budget was last empty (decides whether to trim).
    peak: AtomicUsize,
}

impl HostBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit: limit.max(1), used: AtomicUsize::new(0), peak: AtomicUsize::new(0) })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held by calls in flight now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A share for one call.
    pub fn share(self: &Arc<Self>) -> CallShare {
        CallShare { budget: self.clone(), held: 0, refused: None }
    }

    fn try_take(&self, bytes: usize) -> Result<(), Refusal> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(bytes).filter(|n| *n <= self.limit).ok_or(Refusal::Exhausted { limit: self.limit, wanted: bytes })?;
            match self.used.compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        if before == bytes && self.peak.swap(0, Ordering::Relaxed) >= TRIM_AFTER_PEAK {
            trim_heap();
        }
    }
}

/// What one call holds of the budget; everything is given back when it is dropped.
#[derive(Debug)]
pub struct CallShare {
    budget: Arc<HostBudget>,
    held: usize,
    /// The first refusal this call met (the call fails because of it).
    pub refused: Option<Refusal>,
}

impl CallShare {
    /// Charge `bytes` more to this call, or refuse (and remember why).
    pub fn take(&mut self, bytes: usize) -> Result<(), Refusal> {
        match self.budget.try_take(bytes) {
            Ok(()) => {
                self.held += bytes;
                Ok(())
            }
            Err(refusal) => {
                self.refused.get_or_insert(refusal);
                Err(refusal)
            }
        }
    }

    /// Give back `bytes` of what this call holds (a memory that shrank, a copy that was dropped).
    pub fn give_back(&mut self, bytes: usize) {
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        self.budget.give_back(bytes);
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// A new, empty share of the same budget (for charges kept apart from this one's).
    pub fn sibling(&self) -> CallShare {
        self.budget.share()
    }
}

impl Drop for CallShare {
    fn drop(&mut self) {
        if self.held > 0 {
            self.budget.give_back(self.held);
        }
    }
}

/// Hand freed heap pages back to the OS. glibc keeps freed memory in its arenas (one per thread
/// that allocated, and blocking threads are many), so without this a burst's copies stay resident
/// long after they were freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim only releases free pages of glibc's own arenas; it takes no pointers.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_budget_obeyed_across_calls() {
        let budget = HostBudget::new(100);
        let mut a = budget.share();
        let mut b = budget.share();
        assert!(a.take(60).is_ok());
        assert!(b.take(40).is_ok());
        assert_eq!(budget.in_use(), 100);
        drop(a);
        assert_eq!(budget.in_use(), 40);
        assert!(b.take(60).is_ok());
    }

    #[test]
    fn host_budget_violated_by_the_call_that_would_pass_it() {
        let budget = HostBudget::new(100);
        let mut a = budget.share();
        let mut b = budget.share();
        assert!(a.take(70).is_ok());
        assert_eq!(b.take(31), Err(Refusal::Exhausted { limit: 100, wanted: 31 }));
        assert_eq!(b.refused, Some(Refusal::Exhausted { limit: 100, wanted: 31 }));
        // The refused charge holds nothing, and the other call keeps its share.
        assert_eq!(budget.in_use(), 70);
        b.give_back(10);
        assert_eq!(budget.in_use(), 70);
        a.give_back(20);
        assert_eq!(budget.in_use(), 50);
        drop(a);
        assert_eq!(budget.in_use(), 0);
    }
}
