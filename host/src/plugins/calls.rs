//! The host's own types for what crosses a plugin call (refusals, execution
//! failures, user errors, log levels), whichever contract version the plugin
//! speaks. Each `since_v*` module converts its generated types into these, so
//! the rest of the host never sees generated code and never branches on a
//! version. Nothing here calls a plugin.

/// One problem with one request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Why `build` refused a request; mapped to HTTP once, in `http/generate.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// 400: every problem, one per field.
    InvalidRequest(Vec<FieldError>),
    /// 404: something the request names does not exist.
    NotFound(FieldError),
    /// 503: the plugin cannot serve right now.
    Unavailable(String),
    /// 500: a bug in the plugin.
    Internal(String),
}

/// A ComfyUI `execution_error` in a plugin's graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionFailure {
    pub node_id: String,
    pub node_type: String,
    pub exception_type: String,
    pub exception_message: String,
}

/// A user-facing error a plugin derives from an execution failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserError {
    pub status: u16,
    pub title: String,
    pub detail: String,
    pub field: Option<String>,
}

impl UserError {
    /// Longest `detail` kept, characters; `title` and `field` keep [`Self::MAX_SHORT`].
    pub const MAX_DETAIL: usize = 500;
    pub const MAX_SHORT: usize = 200;

    /// The error with its texts cut to the caps: they reach answers, the job store and webhook
    /// payloads, and a plugin must not make them unbounded.
    pub fn bounded(self) -> Self {
        fn cut(s: String, max: usize) -> String {
            match s.char_indices().nth(max) {
                Some((at, _)) => format!("{}…", &s[..at]),
                None => s,
            }
        }
        Self {
            status: self.status,
            title: cut(self.title, Self::MAX_SHORT),
            detail: cut(self.detail, Self::MAX_DETAIL),
            field: self.field.map(|f| cut(f, Self::MAX_SHORT)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UserError;

    #[test]
    fn explained_texts_within_the_caps_are_kept() {
        let e = UserError { status: 422, title: "t".repeat(UserError::MAX_SHORT), detail: "d".repeat(UserError::MAX_DETAIL), field: Some("f".into()) };
        assert_eq!(e.clone().bounded(), e);
    }

    #[test]
    fn explained_texts_beyond_the_caps_are_cut() {
        let e = UserError { status: 422, title: "日".repeat(10_000), detail: "d".repeat(31 << 20), field: Some("f".repeat(1000)) }.bounded();
        assert_eq!(e.title.chars().count(), UserError::MAX_SHORT + 1);
        assert_eq!(e.detail.chars().count(), UserError::MAX_DETAIL + 1);
        assert!(e.detail.ends_with('…'));
        assert_eq!(e.field.map(|f| f.chars().count()), Some(UserError::MAX_SHORT + 1));
    }
}

/// Log levels of the `log` host import (the same in every contract version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}
