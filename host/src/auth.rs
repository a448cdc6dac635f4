//! Access control: API keys from the environment, the `Authorization: Bearer` check for
//! generation and admin routes, and the listen-address policy.
//!
//! Owns key parsing and key comparison (the 401/403 answers are `http::access`'s and `/api/v2`'s). Must never log or echo a
//! key (only key *names*), never read keys from the query string, and never compare
//! keys in a way whose timing depends on how much of a key matched.
//!
//! Keys are compared as SHA-256 digests with `subtle`, against *every* configured key,
//! so neither the position of the first differing byte nor the key's length nor which
//! key matched shows in the timing.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::bail;
use axum::http::{HeaderValue, header};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// Environment variable with the keys accepted on generation routes.
pub const API_KEYS_ENV: &str = "FLOWHOST_API_KEYS";
/// Environment variable with the keys accepted on every route, admin ones included.
pub const ADMIN_KEYS_ENV: &str = "FLOWHOST_ADMIN_KEYS";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Generation routes.
    User,
    /// Generation routes and admin routes (`/metrics`, `/plugins`, ...).
    Admin,
}

/// Who made a request; put into the request's extensions once a key was accepted.
/// The `name` is safe to log and to send to analytics; the key never is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

#[derive(Clone)]
struct ConfiguredKey {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The configured keys. Cheap to clone (shared). Empty = access control off.
#[derive(Clone, Default)]
pub struct AccessKeys {
    keys: Arc<[ConfiguredKey]>,
}

impl std::fmt::Debug for AccessKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and roles only: a key must never reach a log through `{:?}`.
        f.debug_list()
            .entries(self.keys.iter().map(|key| (&key.name, key.role)))
            .finish()
    }
}

impl AccessKeys {
    /// Keys from `FLOWHOST_API_KEYS` and `FLOWHOST_ADMIN_KEYS` (unset or empty = none).
    pub fn from_env() -> anyhow::Result<Self> {
        let user = std::env::var(API_KEYS_ENV).ok();
        let admin = std::env::var(ADMIN_KEYS_ENV).ok();
        Self::parse(user.as_deref(), admin.as_deref())
    }

    /// Parse the two lists: comma-separated entries, each `key` or `name:key` (split at
    /// the first `:`). An unnamed key is named `key-<first 8 hex digits of its SHA-256>`.
    /// Errors name the variable and the entry's position, never the key.
    pub fn parse(user_keys: Option<&str>, admin_keys: Option<&str>) -> anyhow::Result<Self> {
        let mut keys: Vec<ConfiguredKey> = Vec::new();
        for (variable, list, role) in [
            (API_KEYS_ENV, user_keys, Role::User),
            (ADMIN_KEYS_ENV, admin_keys, Role::Admin),
        ] {
            let Some(list) = list.filter(|list| !list.trim().is_empty()) else {
                continue;
            };
            for (index, entry) in list.split(',').enumerate() {
                let position = index + 1;
                let key = parse_entry(variable, position, entry.trim(), role)?;
                if let Some(other) = keys.iter().find(|other| other.name == key.name) {
                    bail!(
                        "{variable}: entry {position} reuses the key name `{}` (already used in {}); \
                         every key needs its own name",
                        key.name,
                        variable_of(other.role)
                    );
                }
                if let Some(other) = keys.iter().find(|other| other.digest == key.digest) {
                    bail!(
                        "{variable}: entry {position} (`{}`) is the same key as `{}` in {}; \
                         give each caller its own key",
                        key.name,
                        other.name,
                        variable_of(other.role)
                    );
                }
                keys.push(key);
            }
        }
        Ok(Self { keys: keys.into() })
    }

    /// Whether any key is configured (access control on).
    pub fn is_configured(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The names of the configured keys, for the startup log.
    pub fn names(&self) -> Vec<(String, Role)> {
        self.keys
            .iter()
            .map(|key| (key.name.clone(), key.role))
            .collect()
    }

    /// The caller a presented key belongs to, comparing against every key in constant time.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (position, key) in self.keys.iter().enumerate() {
            let matches = key.digest.ct_eq(&digest);
            // Key counts are tiny; the cast cannot truncate in practice, and a wrong index
            // would only ever select another *matching* key, of which there is at most one.
            index.conditional_assign(&(position as u32), matches);
            found |= matches;
        }
        if bool::from(found) {
            self.keys.get(index as usize).map(|key| Caller {
                name: key.name.clone(),
                role: key.role,
            })
        } else {
            None
        }
    }
}

fn variable_of(role: Role) -> &'static str {
    match role {
        Role::User => API_KEYS_ENV,
        Role::Admin => ADMIN_KEYS_ENV,
    }
}

fn parse_entry(
    variable: &str,
    position: usize,
    entry: &str,
    role: Role,
) -> anyhow::Result<ConfiguredKey> {
    if entry.is_empty() {
        bail!("{variable}: entry {position} is empty (a doubled or trailing comma?)");
    }
    let (name, key) = match entry.split_once(':') {
        Some((name, key)) => {
            let name = name.trim();
            if name.is_empty() {
                bail!("{variable}: entry {position} has an empty name before `:`");
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
            {
                bail!(
                    "{variable}: entry {position} has the name `{name}`; names may hold only \
                     letters, digits, `-`, `_`, `.` and `@`"
                );
            }
            (Some(name.to_owned()), key.trim())
        }
        None => (None, entry),
    };
    if key.is_empty() {
        bail!("{variable}: entry {position} has an empty key");
    }
    if !key.chars().all(|c| c.is_ascii_graphic()) {
        bail!(
            "{variable}: entry {position} has a key with spaces or non-ASCII characters; \
             keys are sent in an HTTP header and must be printable ASCII"
        );
    }
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let name = name.unwrap_or_else(|| format!("key-{}", &hex::encode(digest)[..8]));
    Ok(ConfiguredKey { name, role, digest })
}

/// Refuse to listen beyond loopback without keys, unless the operator said
/// `--insecure-no-auth`.
pub fn check_listen_policy(
    addr: SocketAddr,
    keys_configured: bool,
    insecure_no_auth: bool,
) -> anyhow::Result<()> {
    if addr.ip().to_canonical().is_loopback() || keys_configured {
        return Ok(());
    }
    if insecure_no_auth {
        tracing::warn!(
            %addr,
            "listening beyond loopback WITHOUT access control (--insecure-no-auth): anyone who can \
             reach this address can generate images and read /metrics"
        );
        return Ok(());
    }
    bail!(
        "refusing to listen on {addr} without API keys: anyone who can reach it could use the \
         service. Set {API_KEYS_ENV} (and {ADMIN_KEYS_ENV}), listen on 127.0.0.1, or pass \
         --insecure-no-auth if something in front of flowhost already checks callers"
    )
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <key>`.
    Malformed,
    /// Well-formed, but no configured key.
    UnknownKey,
    /// A valid user key on an admin route.
    NotAdmin,
}

/// The caller of a request on a route that needs `needed`, or why it is refused. Each
/// surface answers a refusal in its own error shape: problem+json (`http::access`), or
/// `/api/v2`'s envelope.
pub fn check_request(
    keys: &AccessKeys,
    needed: Role,
    headers: &axum::http::HeaderMap,
) -> Result<Caller, Refusal> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Refusal::Missing)?;
    if values.next().is_some() {
        return Err(Refusal::Malformed); // two Authorization headers: ambiguous
    }
    let presented = bearer_token(value).ok_or(Refusal::Malformed)?;
    let caller = keys.authenticate(presented).ok_or(Refusal::UnknownKey)?;
    if needed == Role::Admin && caller.role != Role::Admin {
        return Err(Refusal::NotAdmin);
    }
    Ok(caller)
}

/// The token of `Bearer <token>`: the scheme case-insensitive, exactly one space, and a
/// token without any whitespace (no padding is trimmed: a padded key is a different key).
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case("bearer ") || token.is_empty() {
        return None;
    }
    if token.chars().any(|c| !c.is_ascii_graphic()) {
        return None;
    }
    Some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(user: Option<&str>, admin: Option<&str>) -> String {
        format!("{:#}", AccessKeys::parse(user, admin).unwrap_err())
    }

    #[test]
    fn named_and_unnamed_keys_parse_and_authenticate_with_their_role() {
        let keys =
            AccessKeys::parse(Some("alice:k-alice-123, k-bob-456"), Some("ops:k-ops-789")).unwrap();
        assert!(keys.is_configured());
        assert_eq!(
            keys.authenticate("k-alice-123"),
            Some(Caller {
                name: "alice".into(),
                role: Role::User
            })
        );
        assert_eq!(
            keys.authenticate("k-ops-789").map(|c| c.role),
            Some(Role::Admin)
        );
        let bob = keys.authenticate("k-bob-456").unwrap();
        assert!(
            bob.name.starts_with("key-") && bob.name.len() == 12,
            "{}",
            bob.name
        );
        assert!(
            !bob.name.contains("bob"),
            "the generated name must not reveal the key"
        );
        assert_eq!(keys.authenticate("k-bob-45"), None);
        assert_eq!(keys.authenticate(""), None);
    }

    #[test]
    fn unset_or_blank_variables_mean_no_keys() {
        assert!(!AccessKeys::parse(None, None).unwrap().is_configured());
        assert!(
            !AccessKeys::parse(Some("  "), Some(""))
                .unwrap()
                .is_configured()
        );
    }

    #[test]
    fn a_key_may_contain_colons_after_its_name() {
        let keys = AccessKeys::parse(Some("svc:abc:def"), None).unwrap();
        assert_eq!(
            keys.authenticate("abc:def").map(|c| c.name),
            Some("svc".into())
        );
    }

    #[test]
    fn configuration_mistakes_are_named_without_echoing_keys() {
        assert!(error_of(Some("a:k1,,b:k2"), None).contains("FLOWHOST_API_KEYS: entry 2 is empty"));
        assert!(error_of(Some("a:k1,"), None).contains("entry 2 is empty"));
        assert!(error_of(Some("a:"), None).contains("entry 1 has an empty key"));
        assert!(error_of(Some(":secret1"), None).contains("empty name"));
        let duplicate = error_of(Some("a:secret1"), Some("a:secret2"));
        assert!(
            duplicate.contains("FLOWHOST_ADMIN_KEYS: entry 1 reuses the key name `a`"),
            "{duplicate}"
        );
        assert!(!duplicate.contains("secret"), "{duplicate}");
        let same_key = error_of(Some("a:secret1,b:secret1"), None);
        assert!(same_key.contains("same key as `a`"), "{same_key}");
        assert!(!same_key.contains("secret1"), "{same_key}");
        assert!(error_of(Some("a:has space"), None).contains("printable ASCII"));
        assert!(error_of(Some("bad name:k"), None).contains("names may hold only"));
    }

    #[test]
    fn debug_output_shows_names_not_keys() {
        let keys = AccessKeys::parse(Some("alice:very-secret-key"), None).unwrap();
        let debug = format!("{keys:?}");
        assert!(
            debug.contains("alice") && !debug.contains("very-secret-key"),
            "{debug}"
        );
    }

    #[test]
    fn loopback_is_always_allowed() {
        for addr in ["127.0.0.1:8000", "[::1]:8000", "[::ffff:127.0.0.1]:8000"] {
            check_listen_policy(addr.parse().unwrap(), false, false).unwrap();
        }
    }

    #[test]
    fn a_public_address_without_keys_is_refused_unless_insecure_no_auth() {
        for addr in ["0.0.0.0:8000", "[::]:8000", "10.1.2.3:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let error = check_listen_policy(addr, false, false)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("FLOWHOST_API_KEYS") && error.contains("--insecure-no-auth"),
                "{error}"
            );
            check_listen_policy(addr, true, false).unwrap();
            check_listen_policy(addr, false, true).unwrap();
        }
    }

    #[test]
    fn only_a_single_space_bearer_token_is_accepted() {
        let token = |v: &str| bearer_token(&HeaderValue::from_str(v).unwrap()).map(str::to_owned);
        assert_eq!(token("Bearer abc"), Some("abc".into()));
        assert_eq!(token("bearer abc"), Some("abc".into()));
        assert_eq!(token("Bearer  abc"), None);
        assert_eq!(token("Bearer abc def"), None);
        assert_eq!(token("Bearer\tabc"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer"), None);
        assert_eq!(token("Basic YWxpY2U6cHc="), None);
        assert_eq!(token("Bearerabc"), None);
    }
}
