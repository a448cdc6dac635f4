//! A plugin's stdout or stderr: the first `cap` bytes kept (they are logged after the call), the
//! rest counted and dropped.
//!
//! wasmtime-wasi's `MemoryOutputPipe` closes the stream once it is full, and the guest's next
//! `eprintln!` panics on the broken pipe: a plugin that prints a debug dump would fail every
//! request. This stream never refuses a write; what is past the cap vanishes and the call logs,
//! once, how much it dropped.
//!
//! Owns: the kept bytes and the drop count of one stream of one call. Must never: fail a write,
//! block, or log by itself.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// How much a guest may hand over in one write (a permit, not a cap: everything is accepted).
const WRITE_PERMIT: usize = 64 << 10;

#[derive(Debug, Default)]
struct Captured {
    kept: Vec<u8>,
    dropped: u64,
}

/// One captured stream; clones share it (WASI asks for a fresh stream per `get-stderr`).
#[derive(Debug, Clone)]
pub struct CappedOutput {
    cap: usize,
    captured: Arc<Mutex<Captured>>,
}

impl CappedOutput {
    pub fn new(cap: usize) -> Self {
        Self { cap, captured: Arc::default() }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn accept(&self, bytes: &[u8]) {
        let mut captured = self.captured.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let room = self.cap.saturating_sub(captured.kept.len());
        let keep = bytes.len().min(room);
        captured.kept.extend_from_slice(&bytes[..keep]);
        captured.dropped += (bytes.len() - keep) as u64;
    }

    /// The kept bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.captured.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).kept.clone()
    }

    /// Bytes written past the cap and dropped.
    pub fn dropped(&self) -> u64 {
        self.captured.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).dropped
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.accept(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.accept(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_is_dropped_and_counted_never_refused() {
        let out = CappedOutput::new(10);
        let mut stream = out.p2_stream();
        for _ in 0..1000 {
            assert!(stream.check_write().unwrap() > 0);
            stream.write(Bytes::from_static(b"0123456")).unwrap();
        }
        assert_eq!(out.contents(), b"0123456012");
        assert_eq!(out.dropped(), 7000 - 10);
    }
}
