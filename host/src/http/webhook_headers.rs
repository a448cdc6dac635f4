//! `Flowhost-Webhook-Url` / `Flowhost-Webhook-Events` on typed routes: read, vetted (the
//! SSRF policy, at submission) and mapped to a 400 problem naming the header.
//!
//! Owns only that edge. Must never echo more of the header than the bounded URL.

use axum::http::{HeaderMap, StatusCode};

use super::{AppState, Problem};
use crate::webhooks::{EVENTS_HEADER, Subscription, URL_HEADER};

/// The request's webhook subscription, `None` when it names none.
pub async fn subscription(state: &AppState, headers: &HeaderMap, respond_async: bool) -> Result<Option<Subscription>, Problem> {
    let url = headers.get(URL_HEADER).map(|v| v.as_bytes());
    let events = headers.get(EVENTS_HEADER).map(|v| v.as_bytes());
    if url.is_none() && events.is_none() {
        return Ok(None);
    }
    let outcome = match &state.webhooks {
        Some(webhooks) => webhooks.subscription_from_headers(url, events, respond_async).await,
        None => Err(crate::webhooks::WebhookRequestError::NotEnabled),
    };
    outcome.map_err(|error| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid_webhook", "The webhook is refused", format!("{}: {error}", error.header())).with("header", error.header())
    })
}
