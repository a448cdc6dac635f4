//! Accepting connections and serving the router on them with timeouts on the request head:
//! `axum::serve` gives hyper no timer, so a client that sends half a request line holds its
//! connection forever (2,000 such connections were all still open after 65 s). Here hyper's HTTP/1
//! `header_read_timeout` is armed, and shutdown is graceful (in-flight requests finish).
//!
//! Body read deadlines are the handler's (`generate.rs`), where the body is read. This module must
//! never look inside requests.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long in-flight requests get to finish once shutdown is asked for.
const DRAIN: Duration = Duration::from_secs(30);

/// Serve `app` on `listener` until `shutdown` resolves; a connection that has not sent a complete
/// request head `header_read_timeout` after it started one is closed.
pub async fn serve(listener: TcpListener, app: Router, header_read_timeout: Duration, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(seconds = DRAIN.as_secs(), "connections still open after the drain period; closing them");
    }
    Ok(())
}
