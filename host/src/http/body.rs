//! Reading a request body whole, within a size limit and a read deadline: the one rule both
//! the typed routes and `/api/v2` follow. A declared `Content-Length` over the limit is
//! refused before a byte is read; a body that stops arriving is cut off at the deadline; a
//! body that breaks off (bad chunking, reset) is the caller's broken body, not "too large".
//!
//! Owns the reading and the [`BodyError`] it ends in. Must never decide a status or a
//! response shape: each protocol maps a `BodyError` once (problem+json, the v2 envelope).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};

/// Why a body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over `limit` bytes (declared or counted).
    TooLarge { limit: usize },
    /// Not all there within `within`.
    Timeout { within: Duration },
    /// Broke off or malformed in transfer.
    Broken,
}

/// 413 before reading when the declared `Content-Length` is over `limit`.
pub fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        Err(BodyError::TooLarge { limit })
    } else {
        Ok(())
    }
}

/// The whole body, at most `limit` bytes, all of it within `within`.
pub async fn read(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    within: Duration,
) -> Result<Bytes, BodyError> {
    check_declared_length(headers, limit)?;
    match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(BodyError::Timeout { within }),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if is_length_limit(&e) => Err(BodyError::TooLarge { limit }),
        Ok(Err(_)) => Err(BodyError::Broken),
    }
}

/// Whether a body-read error is the size limit (and not a broken body).
fn is_length_limit(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_over_the_limit_is_too_large_and_a_declared_one_is_refused_unread() {
        let none = HeaderMap::new();
        let err = read(
            Body::from(vec![b'x'; 11]),
            &none,
            10,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 10 });
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, "11".parse().unwrap());
        let err = read(
            Body::from(vec![b'x'; 3]),
            &declared,
            10,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 10 });
        let ok = read(
            Body::from(vec![b'x'; 10]),
            &none,
            10,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(ok.len(), 10);
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_broken_not_too_large() {
        let stream = futures::stream::iter(vec![
            Ok::<_, std::io::Error>(Bytes::from_static(b"{\"a\"")),
            Err(std::io::Error::other("reset")),
        ]);
        let err = read(
            Body::from_stream(stream),
            &HeaderMap::new(),
            1 << 20,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(err, BodyError::Broken);
    }
}
