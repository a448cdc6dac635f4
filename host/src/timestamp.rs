//! RFC 3339 timestamps (`2026-11-27T20:03:33.123Z`) for analytics events, webhooks, job views and
//! `/plugins`: one spelling everywhere, by chrono (no calendar arithmetic of our own).
//!
//! Owns only formatting a `SystemTime` in UTC. Must never read the clock itself.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};

/// `time` as RFC 3339 UTC with milliseconds and a `Z` suffix.
pub fn rfc3339_utc(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day) 12:34:56.789
        let leap = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(rfc3339_utc(leap), "2000-02-29T12:34:56.789Z");
        let late = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // 2026-12-31T23:59:59
        assert_eq!(rfc3339_utc(late), "2026-12-31T23:59:59.000Z");
    }
}
