//! Conformance harness for `/api/v2`: every response a test sees is checked against the
//! vendored Comfy API v2 OpenAPI document (`host/api/comfy-api-v2.yaml`, plus flowhost's
//! documented additions for the paths the spec lacks).
//!
//! A response conforms when its status is one the operation documents and, where the
//! operation gives an `application/json` schema for that status, the body validates against
//! it (formats `date-time` and `uri` asserted). [`V2Client`] does this on every call, so a
//! test cannot forget to.

use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use flowhost::http::v2::spec;

/// The loaded contract.
pub struct Contract {
    paths: Map<String, Value>,
    components: Value,
}

impl Contract {
    /// The contract, loaded once per test process.
    pub fn get() -> &'static Contract {
        static CONTRACT: OnceLock<Contract> = OnceLock::new();
        CONTRACT.get_or_init(|| Contract {
            paths: spec::paths(),
            components: json!({"schemas": Value::Object(spec::component_schemas())}),
        })
    }

    /// The path template an actual path matches (literal segments win over `{params}`).
    pub fn template_of(&self, method: &str, path: &str) -> Option<&str> {
        let method = method.to_ascii_lowercase();
        let actual: Vec<&str> = path.split('?').next().unwrap_or(path).trim_end_matches('/').split('/').collect();
        let mut best: Option<(&str, usize)> = None;
        for (template, item) in &self.paths {
            if item.get(&method).is_none() {
                continue;
            }
            let segments: Vec<&str> = template.split('/').collect();
            if segments.len() != actual.len() {
                continue;
            }
            let mut literal = 0;
            let matches = segments.iter().zip(&actual).all(|(t, a)| {
                if t.starts_with('{') && t.ends_with('}') {
                    !a.is_empty()
                } else {
                    literal += 1;
                    t == a
                }
            });
            if matches && best.is_none_or(|(_, n)| literal > n) {
                best = Some((template.as_str(), literal));
            }
        }
        best.map(|(t, _)| t)
    }

    /// Check one response. `body` is the raw body (empty for HEAD).
    pub fn check(&self, method: &str, path: &str, status: u16, content_type: Option<&str>, body: &[u8]) -> Result<()> {
        let template = self.template_of(method, path).with_context(|| format!("{method} {path} is not an operation of the v2 contract"))?;
        let operation = &self.paths[template][method.to_ascii_lowercase()];
        let responses = operation.get("responses").and_then(Value::as_object).context("operation without responses")?;
        let Some(response) = responses.get(&status.to_string()) else {
            bail!(
                "{method} {template} answered {status}, which the contract does not document (documented: {:?}); body: {}",
                responses.keys().collect::<Vec<_>>(),
                String::from_utf8_lossy(&body[..body.len().min(500)])
            );
        };
        let response = spec::resolve_response(response);
        let Some(schema) = response.pointer("/content/application~1json/schema") else {
            return Ok(()); // no JSON body documented (binary content, SSE, HEAD, 204)
        };
        let media = content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if media != "application/json" {
            bail!("{method} {template} {status}: the contract says application/json, the response said {content_type:?}");
        }
        let value: Value = serde_json::from_slice(body).with_context(|| format!("{method} {template} {status}: body is not JSON"))?;
        self.validate(schema, &value).with_context(|| format!("{method} {template} {status}: {value}"))
    }

    /// Validate `value` against an OpenAPI schema (converted here) with the components in scope.
    pub fn validate(&self, schema: &Value, value: &Value) -> Result<()> {
        let mut root = spec::to_json_schema(schema);
        if let Value::Object(map) = &mut root {
            map.insert("components".into(), self.components.clone());
        }
        let validator = jsonschema::options().should_validate_formats(true).build(&root).context("building the schema validator")?;
        let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        if errors.is_empty() { Ok(()) } else { bail!("does not conform: {}", errors.join("; ")) }
    }

    /// Validate an SSE event's data against the schema the spec's `x-sse-events` names.
    pub fn check_event(&self, event: &str, data: &Value) -> Result<()> {
        let catalog = self.paths["/api/v2/jobs/{id}/events"]["get"]["x-sse-events"].as_object().context("no x-sse-events")?;
        let entry = catalog.get(event).with_context(|| format!("SSE event `{event}` is not in the contract's catalog"))?;
        let reference = entry["schema"].as_str().context("event without schema")?;
        self.validate(&json!({"$ref": reference}), data).with_context(|| format!("SSE `{event}` {data}"))
    }
}

/// One response from [`V2Client`], already checked against the contract.
#[derive(Debug)]
pub struct V2Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl V2Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// The envelope's `error.code` (panics with the body when there is none).
    pub fn code(&self) -> String {
        let body = self.json();
        body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error envelope: {body}")).to_string()
    }
}

/// An HTTP client for `/api/v2` that checks every answer against the contract.
#[derive(Clone)]
pub struct V2Client {
    pub base: String,
    pub client: reqwest::Client,
    pub bearer: Option<String>,
}

impl V2Client {
    pub fn new(base: &str) -> Self {
        Self { base: base.trim_end_matches('/').to_string(), client: reqwest::Client::new(), bearer: None }
    }

    pub fn with_key(mut self, key: &str) -> Self {
        self.bearer = Some(key.to_string());
        self
    }

    /// A request builder for `method path` with the key, if any.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut builder = self.client.request(method, format!("{}{}", self.base, path));
        if let Some(key) = &self.bearer {
            builder = builder.bearer_auth(key);
        }
        builder
    }

    /// Send, read the whole body, check it against the contract (panicking on a violation,
    /// since a non-conforming answer is a test failure wherever it happens).
    pub async fn send(&self, builder: reqwest::RequestBuilder) -> Result<V2Response> {
        let request = builder.build()?;
        let method = request.method().as_str().to_string();
        let path = request.url().path().to_string();
        let response = self.client.execute(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
        if let Err(err) = Contract::get().check(&method, &path, status, content_type, &body) {
            panic!("contract violation: {err:#}");
        }
        Ok(V2Response { status, headers, body })
    }

    pub async fn get(&self, path: &str) -> V2Response {
        self.send(self.request(reqwest::Method::GET, path)).await.expect("GET")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> V2Response {
        self.send(self.request(reqwest::Method::POST, path).json(body)).await.expect("POST")
    }

    pub async fn post(&self, path: &str) -> V2Response {
        self.send(self.request(reqwest::Method::POST, path)).await.expect("POST")
    }
}
