//! `GET /` for browsers: one page to try every endpoint (issue #27), embedded in the binary.
//!
//! The page is plain HTML, CSS and JavaScript (`page/`), compiled in with `include_str!`: no
//! CDN, no build step, nothing fetched from elsewhere at run time. It talks only to this
//! service's own API (`/openapi.json`, the typed routes with `Prefer: respond-async`,
//! `/api/v2/jobs`), with the caller's key as a header when keys are on.
//!
//! Owns the page's bytes and the headers that confine it: a Content-Security-Policy with no
//! inline script and no third-party origin, `nosniff`, no referrer. Must never put anything a
//! caller or a plugin supplies into the HTML (the page renders such text itself, as text), and
//! never answer HTML to a client that did not ask for it: `GET /` from an API client keeps its
//! problem+json 404.

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::Problem;

const INDEX_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/page.js");
const PAGE_CSS: &str = include_str!("page/page.css");

/// Where the page's script and style are served (two segments: no plugin route, which is one
/// segment, can ever shadow them or be shadowed by them).
pub const SCRIPT_PATH: &str = "/_page/page.js";
pub const STYLE_PATH: &str = "/_page/page.css";

/// Scripts and styles only from this origin (no inline script, no `eval`), images from this
/// origin or made by the page (`data:` previews, `blob:` outputs), requests only to this origin,
/// no frames, no plugins, no form posts elsewhere, not framable.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
     connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// Whether the client asked for HTML (a browser navigating here), by `Accept`.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| {
            let mut parts = media.split(';');
            let essence = parts.next().unwrap_or_default().trim();
            // `text/html;q=0` is a refusal, not a request.
            let refused = parts.any(|p| matches!(p.trim().split_once('='), Some(("q", q)) if q.trim().parse::<f32>().is_ok_and(|q| q == 0.0)));
            !refused && (essence.eq_ignore_ascii_case("text/html") || essence.eq_ignore_ascii_case("application/xhtml+xml"))
        })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Revalidate each time: a new binary serves a new page at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`: the page for browsers; the API's 404 for everyone else (as before the page).
pub async fn index(headers: HeaderMap) -> Response {
    if !wants_html(&headers) {
        return Problem::not_found_route("/").into_response();
    }
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_clients_asking_for_html_get_the_page() {
        assert!(wants_html(&accept("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")));
        assert!(wants_html(&accept("TEXT/HTML")));
        for api in ["application/json", "*/*", "application/problem+json", "text/html;q=0, application/json"] {
            assert!(!wants_html(&accept(api)), "{api}");
        }
        assert!(!wants_html(&HeaderMap::new()));
    }

    #[test]
    fn the_page_loads_its_script_and_style_from_their_routes_and_has_no_inline_script() {
        assert!(INDEX_HTML.contains(&format!("<script src=\"{SCRIPT_PATH}\" defer></script>")));
        assert!(INDEX_HTML.contains(&format!("href=\"{STYLE_PATH}\"")));
        // Every <script> has a src (CSP would block an inline one anyway; keep the page honest).
        assert_eq!(INDEX_HTML.matches("<script").count(), INDEX_HTML.matches("<script src=").count());
        for handler in ["onclick=", "onload=", "onerror=", "onsubmit=", "javascript:"] {
            assert!(!INDEX_HTML.contains(handler), "inline {handler} in the page");
        }
        assert!(!PAGE_JS.contains("innerHTML") && !PAGE_JS.contains("outerHTML") && !PAGE_JS.contains("insertAdjacentHTML"));
        assert!(!PAGE_JS.contains("eval(") && !PAGE_JS.contains("new Function"));
    }
}
