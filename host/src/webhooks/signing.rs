//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): the `whsec_` secret
//! format and the `webhook-id` / `webhook-timestamp` / `webhook-signature` headers.
//!
//! Owns parsing secrets and computing `v1,<base64(HMAC-SHA256(key, "{id}.{ts}.{body}"))>`.
//! Must never log, echo or `Debug`-print a secret's key bytes, and never sign anything but
//! the exact body bytes that are sent (a receiver verifies the bytes it got).
//!
//! Rotation: the operator lists several secrets; every delivery carries one signature per
//! secret, space-separated, so a receiver holding either the old or the new secret accepts
//! it while it switches over.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Fewest key bytes accepted: the spec asks for 24 to 64 random bytes.
pub const MIN_KEY_BYTES: usize = 24;
/// Most key bytes accepted.
pub const MAX_KEY_BYTES: usize = 64;

/// Why a secret was refused. Never carries the secret itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a webhook secret must start with `whsec_` followed by base64 (e.g. the output of `openssl rand -base64 32` after `whsec_`)")]
    MissingPrefix,
    #[error("the part after `whsec_` is not valid base64")]
    NotBase64,
    #[error("the key is {0} bytes; use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes")]
    WrongLength(usize),
}

/// One signing key. `Debug` shows nothing of the key.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl std::str::FromStr for WebhookSecret {
    type Err = SecretError;

    /// `whsec_<base64>`; padding may be left off (the official libraries accept both).
    fn from_str(text: &str) -> Result<Self, SecretError> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).ok_or(SecretError::MissingPrefix)?;
        let encoded = encoded.trim_end_matches('=');
        let key = base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded).map_err(|_| SecretError::NotBase64)?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SecretError::WrongLength(key.len()));
        }
        Ok(Self { key })
    }
}

impl WebhookSecret {
    /// A fresh random 32-byte secret, as `whsec_…` text (for `flowhost` docs and tests).
    pub fn generate() -> String {
        let key: [u8; 32] = rand::random();
        format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
    }

    /// One `v1,<base64>` signature over `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for HMAC-SHA256.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The secrets every delivery is signed with (newest first is customary, order is kept).
#[derive(Debug, Clone, Default)]
pub struct SigningKeys {
    secrets: Vec<WebhookSecret>,
}

impl SigningKeys {
    pub fn new(secrets: Vec<WebhookSecret>) -> Self {
        Self { secrets }
    }

    /// Whether there is any key (no key = webhooks cannot be signed, so none are sent).
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The `webhook-signature` header value: one signature per key, space-separated.
    pub fn signature_header(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        self.secrets.iter().map(|secret| secret.sign(id, timestamp, body)).collect::<Vec<_>>().join(" ")
    }
}

/// A fresh `webhook-id`: stable for the life of one message, the receiver's dedup key.
pub fn new_message_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks specification's published test vector (also in every
    // official library's test suite).
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: u64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let secret: WebhookSecret = SPEC_SECRET.parse().unwrap();
        assert_eq!(secret.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY), SPEC_SIGNATURE);
    }

    #[test]
    fn a_changed_body_id_or_timestamp_changes_the_signature() {
        let secret: WebhookSecret = SPEC_SECRET.parse().unwrap();
        assert_ne!(secret.sign(SPEC_ID, SPEC_TIMESTAMP, br#"{"test": 2432232315}"#), SPEC_SIGNATURE);
        assert_ne!(secret.sign("msg_other", SPEC_TIMESTAMP, SPEC_BODY), SPEC_SIGNATURE);
        assert_ne!(secret.sign(SPEC_ID, SPEC_TIMESTAMP + 1, SPEC_BODY), SPEC_SIGNATURE);
    }

    #[test]
    fn rotation_sends_one_signature_per_secret_space_separated() {
        let old: WebhookSecret = SPEC_SECRET.parse().unwrap();
        let new: WebhookSecret = WebhookSecret::generate().parse().unwrap();
        let keys = SigningKeys::new(vec![new.clone(), old]);
        let header = keys.signature_header(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2, "{header}");
        assert_eq!(parts[0], new.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY));
        assert_eq!(parts[1], SPEC_SIGNATURE);
    }

    #[test]
    fn secrets_without_prefix_not_base64_or_too_short_are_refused() {
        assert_eq!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse::<WebhookSecret>(), Err(SecretError::MissingPrefix));
        assert_eq!("whsec_not base64!".parse::<WebhookSecret>(), Err(SecretError::NotBase64));
        assert_eq!("whsec_c2hvcnQ=".parse::<WebhookSecret>(), Err(SecretError::WrongLength(5)));
        // Padded and unpadded forms are the same key.
        let padded: WebhookSecret = format!("whsec_{}", STANDARD.encode([7u8; 32])).parse().unwrap();
        let unpadded: WebhookSecret = format!("whsec_{}", STANDARD.encode([7u8; 32]).trim_end_matches('=')).parse().unwrap();
        assert_eq!(padded, unpadded);
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let secret: WebhookSecret = SPEC_SECRET.parse().unwrap();
        let text = format!("{secret:?} {:?}", SigningKeys::new(vec![secret.clone()]));
        assert_eq!(text, "WebhookSecret(..) SigningKeys { secrets: [WebhookSecret(..)] }");
    }

    #[test]
    fn message_ids_are_unique_and_prefixed() {
        let (a, b) = (new_message_id(), new_message_id());
        assert!(a.starts_with("msg_") && a.len() == 36, "{a}");
        assert_ne!(a, b);
    }
}
