//! When a failed delivery is tried again: exponential backoff with jitter for about a day,
//! then the message is dead-lettered.
//!
//! Owns the schedule only (pure arithmetic, no clock, no I/O). The steps are multiples of
//! one base unit (5 s in production) so tests can run the very same schedule scaled down
//! (`--webhook-retry-base-ms`).
//!
//! | after attempt | next attempt in (base 5 s) | cumulative |
//! |---------------|----------------------------|------------|
//! | 1 (at once)   | 5 s                        | 5 s        |
//! | 2             | 30 s                       | 35 s       |
//! | 3             | 2 min                      | ~2.6 min   |
//! | 4             | 10 min                     | ~13 min    |
//! | 5             | 30 min                     | ~43 min    |
//! | 6             | 1 h                        | ~1.7 h     |
//! | 7             | 2 h                        | ~3.7 h     |
//! | 8             | 4 h                        | ~7.7 h     |
//! | 9             | 6 h                        | ~13.7 h    |
//! | 10            | 8 h                        | ~21.7 h    |
//! | 11            | — dead-lettered            |            |
//!
//! Each delay is stretched by a random 0–25 % (jitter, so receivers that come back after
//! an outage are not hit by every message at the same instant): the last attempt lands
//! about 22–27 h after the first.

use std::time::Duration;

/// The delays in base units (5 s each at the production base).
const STEPS: [u32; 10] = [1, 6, 24, 120, 360, 720, 1440, 2880, 4320, 5760];

/// Largest jitter, as a fraction of the delay.
const MAX_JITTER: f64 = 0.25;

/// The production base unit.
pub const DEFAULT_BASE: Duration = Duration::from_secs(5);

/// A retry schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySchedule {
    base: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self { base: DEFAULT_BASE }
    }
}

impl RetrySchedule {
    /// The same steps over another base unit (tests: a few milliseconds).
    pub fn with_base(base: Duration) -> Self {
        Self { base }
    }

    /// How many attempts a message gets before it is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        STEPS.len() as u32 + 1
    }

    /// The delay before the next attempt after `attempts_made` failed attempts, without
    /// jitter; `None` when the message is out of attempts (dead-letter it).
    pub fn nominal_delay(&self, attempts_made: u32) -> Option<Duration> {
        let index = usize::try_from(attempts_made.checked_sub(1)?).ok()?;
        STEPS.get(index).map(|units| self.base * *units)
    }

    /// [`nominal_delay`](Self::nominal_delay) stretched by `jitter` (0..1 → 0–25 %).
    pub fn delay(&self, attempts_made: u32, jitter: f64) -> Option<Duration> {
        let nominal = self.nominal_delay(attempts_made)?;
        Some(nominal.mul_f64(1.0 + MAX_JITTER * jitter.clamp(0.0, 1.0)))
    }

    /// With a random jitter.
    pub fn random_delay(&self, attempts_made: u32) -> Option<Duration> {
        self.delay(attempts_made, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_schedule_grows_and_spans_about_a_day() {
        let schedule = RetrySchedule::default();
        let delays: Vec<Duration> = (1..schedule.max_attempts()).map(|n| schedule.nominal_delay(n).unwrap()).collect();
        assert_eq!(delays[0], Duration::from_secs(5));
        assert_eq!(delays[1], Duration::from_secs(30));
        assert_eq!(delays[2], Duration::from_secs(120));
        assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
        let total: Duration = delays.iter().sum();
        let with_jitter: Duration = (1..schedule.max_attempts()).map(|n| schedule.delay(n, 1.0).unwrap()).sum();
        let (shortest, longest) = (total.as_secs_f64() / 3600.0, with_jitter.as_secs_f64() / 3600.0);
        assert!((20.0..=23.0).contains(&shortest), "{shortest} h");
        assert!((24.0..=28.0).contains(&longest), "{longest} h");
    }

    #[test]
    fn out_of_attempts_after_the_last_step() {
        let schedule = RetrySchedule::default();
        assert_eq!(schedule.max_attempts(), 11);
        assert!(schedule.nominal_delay(10).is_some());
        assert_eq!(schedule.nominal_delay(11), None);
        assert_eq!(schedule.nominal_delay(0), None);
    }

    #[test]
    fn jitter_stretches_by_at_most_a_quarter_and_scaling_keeps_the_shape() {
        let schedule = RetrySchedule::with_base(Duration::from_millis(10));
        assert_eq!(schedule.delay(1, 0.0), Some(Duration::from_millis(10)));
        assert_eq!(schedule.delay(1, 1.0), Some(Duration::from_micros(12_500)));
        assert_eq!(schedule.delay(2, 7.0), Some(Duration::from_millis(75)), "jitter is clamped");
        for _ in 0..100 {
            let d = schedule.random_delay(3).unwrap();
            assert!(d >= Duration::from_millis(240) && d <= Duration::from_millis(300), "{d:?}");
        }
    }
}
