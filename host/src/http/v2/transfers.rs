//! A cap on concurrent asset transfers (uploads and streamed downloads, issue #22): each
//! holds a bounded buffer, so the cap bounds what transfers can hold in all; one past the
//! cap is answered 503 + Retry-After at once rather than queued behind the others.
//!
//! Owns the slots. Must never wait for one (a waiting transfer would hold its connection
//! and its buffers anyway).

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::envelope::{ErrorCode, V2Error};

/// Default `--max-transfers`.
pub const DEFAULT_MAX_TRANSFERS: usize = 64;
/// What a refused transfer is told to wait.
const RETRY_AFTER_S: u64 = 2;

/// The transfer slots. Cheap to clone.
#[derive(Clone)]
pub struct Transfers {
    slots: Arc<Semaphore>,
    limit: usize,
}

impl Transfers {
    pub fn new(limit: usize) -> Transfers {
        let limit = limit.max(1);
        Transfers { slots: Arc::new(Semaphore::new(limit)), limit }
    }

    /// A slot held until the permit is dropped (with the response body, for downloads), or
    /// the envelope's 503 + Retry-After when all are taken.
    pub fn start(&self) -> Result<OwnedSemaphorePermit, V2Error> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            tracing::info!(limit = self.limit, "asset transfer refused: every transfer slot is taken");
            V2Error::new(ErrorCode::UpstreamError, format!("{} asset transfers are in progress, the most this service runs at once; retry after the Retry-After seconds.", self.limit))
                .with_status(StatusCode::SERVICE_UNAVAILABLE)
                .retry_after(RETRY_AFTER_S)
        })
    }
}

impl Default for Transfers {
    fn default() -> Transfers {
        Transfers::new(DEFAULT_MAX_TRANSFERS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_past_the_cap_is_503_with_retry_after_until_a_slot_frees() {
        let transfers = Transfers::new(2);
        let (a, _b) = (transfers.start().unwrap(), transfers.start().unwrap());
        let refused = transfers.start().unwrap_err();
        assert_eq!((refused.status, refused.retry_after), (StatusCode::SERVICE_UNAVAILABLE, Some(RETRY_AFTER_S)));
        drop(a);
        assert!(transfers.start().is_ok());
    }
}
