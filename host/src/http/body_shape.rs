//! The shape of a JSON body, checked on the raw bytes before it is parsed into a value or checked
//! against a schema: nesting depth and member counts are bounded, so a body of a million unknown keys
//! costs a scan of its bytes (no tree, no million error entries) and gets a short 400.
//!
//! This module only counts; it must never judge what the values mean (the schema does that), and it
//! keeps no part of the body.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Deepest nesting of objects and arrays accepted (request bodies are a few levels deep).
pub const MAX_DEPTH: usize = 32;
/// Most members one object (or elements one array) may have. A `/workflow` graph of the largest
/// accepted size (5,000 nodes) fits.
pub const MAX_MEMBERS: usize = 10_000;
/// Most values (members and elements, at any depth) one body may have.
pub const MAX_VALUES: usize = 200_000;

/// Which bound a body broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeViolation {
    TooDeep,
    TooManyMembers,
    TooManyValues,
}

impl ShapeViolation {
    /// What the caller is told.
    pub fn detail(self) -> String {
        match self {
            Self::TooDeep => format!("the body nests objects or arrays more than {MAX_DEPTH} levels deep"),
            Self::TooManyMembers => format!("an object or array in the body has more than {MAX_MEMBERS} members"),
            Self::TooManyValues => format!("the body has more than {MAX_VALUES} values in all"),
        }
    }
}

#[derive(Default)]
struct State {
    depth: usize,
    values: usize,
    violation: Option<ShapeViolation>,
}

impl State {
    fn count(&mut self) -> Result<(), ShapeViolation> {
        self.values += 1;
        if self.values > MAX_VALUES { Err(ShapeViolation::TooManyValues) } else { Ok(()) }
    }

    fn stop<E: de::Error>(&mut self, violation: ShapeViolation) -> E {
        self.violation = Some(violation);
        E::custom(violation.detail())
    }
}

/// Check `bytes`' shape. Malformed JSON is not this module's business: it passes here and the parser
/// reports it with its line and column.
pub fn check(bytes: &[u8]) -> Result<(), ShapeViolation> {
    let mut state = State::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let _ = Node(&mut state).deserialize(&mut de);
    match state.violation {
        Some(violation) => Err(violation),
        None => Ok(()),
    }
}

struct Node<'s>(&'s mut State);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.0;
        state.depth += 1;
        if state.depth > MAX_DEPTH {
            return Err(state.stop(ShapeViolation::TooDeep));
        }
        let mut members = 0usize;
        while map.next_key::<IgnoredAny>()?.is_some() {
            members += 1;
            if members > MAX_MEMBERS {
                return Err(state.stop(ShapeViolation::TooManyMembers));
            }
            if let Err(v) = state.count() {
                return Err(state.stop(v));
            }
            map.next_value_seed(Node(&mut *state))?;
        }
        state.depth -= 1;
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let state = self.0;
        state.depth += 1;
        if state.depth > MAX_DEPTH {
            return Err(state.stop(ShapeViolation::TooDeep));
        }
        let mut members = 0usize;
        loop {
            if members == MAX_MEMBERS {
                // One more element would break the bound: look without descending.
                return match seq.next_element::<IgnoredAny>()? {
                    Some(_) => Err(state.stop(ShapeViolation::TooManyMembers)),
                    None => {
                        state.depth -= 1;
                        Ok(())
                    }
                };
            }
            if let Err(v) = state.count() {
                return Err(state.stop(v));
            }
            if seq.next_element_seed(Node(&mut *state))?.is_none() {
                break;
            }
            members += 1;
        }
        state.depth -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object_of(n: usize) -> String {
        let members: Vec<String> = (0..n).map(|i| format!("\"k{i}\":1")).collect();
        format!("{{{}}}", members.join(","))
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn members_limit_obeyed() {
        assert_eq!(check(object_of(MAX_MEMBERS).as_bytes()), Ok(()));
    }

    #[test]
    fn members_limit_violated() {
        assert_eq!(check(object_of(MAX_MEMBERS + 1).as_bytes()), Err(ShapeViolation::TooManyMembers));
        let array = format!("[{}]", vec!["0"; MAX_MEMBERS + 1].join(","));
        assert_eq!(check(array.as_bytes()), Err(ShapeViolation::TooManyMembers));
        let array = format!("[{}]", vec!["0"; MAX_MEMBERS].join(","));
        assert_eq!(check(array.as_bytes()), Ok(()));
    }

    #[test]
    fn depth_limit_obeyed() {
        assert_eq!(check(nested(MAX_DEPTH).as_bytes()), Ok(()));
    }

    #[test]
    fn depth_limit_violated() {
        assert_eq!(check(nested(MAX_DEPTH + 1).as_bytes()), Err(ShapeViolation::TooDeep));
    }

    #[test]
    fn values_limit_violated() {
        let inner = object_of(9_000);
        let body = format!("[{}]", vec![inner.as_str(); 30].join(","));
        assert_eq!(check(body.as_bytes()), Err(ShapeViolation::TooManyValues));
    }

    #[test]
    fn malformed_json_is_left_to_the_parser() {
        assert_eq!(check(b"{\"a\": "), Ok(()));
    }
}
