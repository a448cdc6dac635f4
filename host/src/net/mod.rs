//! Outbound HTTP under the operator's destination policy: the SSRF guard
//! ([`destination`], shared by webhook deliveries and fetches) and the bounded fetcher
//! ([`fetch`]) that downloads models and images named by URL.
//!
//! Owns: every rule about where flowhost may connect and how much it may read.
//! Must never: open a connection to an address the guard did not vet, or know about jobs,
//! ComfyUI or HTTP status codes (callers map the errors).

pub mod destination;
pub mod fetch;
