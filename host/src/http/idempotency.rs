//! The `Idempotency-Key` header (IETF httpapi draft), one rule for the typed routes and
//! `/api/v2`: sent at most once, a bare token or an sf-string (`"…"`), 1–255 printable ASCII
//! characters (space included). Each surface maps a refusal to its own error shape.
//!
//! Owns: reading and checking the header. Must never: claim or release a key (the job
//! service does, scoped per caller).

use axum::http::HeaderMap;

/// Longest accepted key.
pub const MAX_LEN: usize = 255;

/// Why a key was refused; [`Refused::message`] says it to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The header came more than once.
    Repeated,
    /// Empty, too long, or not printable ASCII.
    Malformed,
}

impl Refused {
    pub fn message(self) -> String {
        match self {
            Self::Repeated => "send the header once".into(),
            Self::Malformed => format!("must be 1 to {MAX_LEN} printable ASCII characters"),
        }
    }
}

/// The caller's key, if it sent one.
pub fn parse(headers: &HeaderMap) -> Result<Option<String>, Refused> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Refused::Repeated);
    }
    let text = value.to_str().map_err(|_| Refused::Malformed)?.trim();
    let key = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    if key.is_empty() || key.len() > MAX_LEN || !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(Refused::Malformed);
    }
    Ok(Some(key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn key(values: &[&str]) -> Result<Option<String>, Refused> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("idempotency-key", HeaderValue::from_str(v).unwrap());
        }
        parse(&h)
    }

    #[test]
    fn one_rule_at_the_boundary() {
        assert_eq!(key(&[]), Ok(None));
        assert_eq!(key(&["k-1"]).unwrap().as_deref(), Some("k-1"));
        assert_eq!(key(&["\"abc\""]).unwrap().as_deref(), Some("abc"), "an sf-string is its content");
        assert_eq!(key(&["order 17"]).unwrap().as_deref(), Some("order 17"), "spaces are printable");
        assert_eq!(key(&[&"k".repeat(255)]).unwrap().map(|k| k.len()), Some(255));
        assert_eq!(key(&[&"k".repeat(256)]), Err(Refused::Malformed));
        assert_eq!(key(&["\"\""]), Err(Refused::Malformed));
        assert_eq!(key(&["a", "b"]), Err(Refused::Repeated));
    }
}
