//! Exponential backoff with injectable jitter.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Exponential backoff: `initial`, doubling, capped at `max`, each delay shortened by
/// jitter so that many workers do not retry in step.
///
/// The `n`-th consecutive delay (from 0) is `min(initial × 2ⁿ, max)` before jitter.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use steward_core::{Backoff, Jitter};
///
/// let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5))
///     .with_jitter(Jitter::none());
/// let delays: Vec<_> = (0..5).map(|n| backoff.delay(n).as_secs()).collect();
/// assert_eq!(delays, [1, 2, 4, 5, 5]);
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max`, with the default jitter
    /// ([`Jitter::default`]).
    #[must_use]
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max: max.max(initial), jitter: Jitter::default() }
    }

    /// Replaces the jitter.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay.
    #[must_use]
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay.
    #[must_use]
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay before attempt `n + 1` after `n + 1` consecutive failures (`n` from 0),
    /// jitter applied.
    #[must_use]
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.min(31));
        let base = self.initial.saturating_mul(factor).min(self.max);
        self.jitter.apply(base)
    }
}

impl Default for Backoff {
    /// 1 s doubling to 5 min, with the default jitter.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// Shortens each backoff delay by a random fraction, so that workers restarted together
/// do not retry together. Deterministic for a given seed, so tests are exact.
#[derive(Clone)]
pub struct Jitter {
    ratio: f64,
    rng: Option<Arc<Mutex<SplitMix64>>>,
}

impl Jitter {
    /// No jitter: delays are exactly the exponential sequence.
    #[must_use]
    pub fn none() -> Self {
        Self { ratio: 0.0, rng: None }
    }

    /// Each delay is shortened by up to `ratio` (0.0–1.0) of itself, drawn from a
    /// pseudo-random sequence seeded with `seed`.
    #[must_use]
    pub fn seeded(ratio: f64, seed: u64) -> Self {
        Self { ratio: ratio.clamp(0.0, 1.0), rng: Some(Arc::new(Mutex::new(SplitMix64(seed)))) }
    }

    /// The delay after jitter, in whole milliseconds (the resolution of tokio's timer).
    #[must_use]
    pub fn apply(&self, delay: Duration) -> Duration {
        let Some(rng) = &self.rng else { return delay };
        let unit = rng.lock().unwrap_or_else(PoisonError::into_inner).next_unit();
        let jittered = delay.mul_f64(1.0 - self.ratio * unit);
        Duration::from_millis(u64::try_from(jittered.as_millis()).unwrap_or(u64::MAX))
    }
}

impl Default for Jitter {
    /// Up to 20 % shorter, seeded from the clock.
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5eed, |d| d.as_nanos() as u64);
        Self::seeded(0.2, seed)
    }
}

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jitter").field("ratio", &self.ratio).finish_non_exhaustive()
    }
}

/// SplitMix64: a tiny, good-enough generator for jitter (not for anything secret).
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A float in `[0, 1)`.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_max_without_jitter() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
            .with_jitter(Jitter::none());
        let delays: Vec<_> = (0..6).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1), "no overflow");
    }

    #[test]
    fn seeded_jitter_is_repeatable_and_bounded() {
        let a = Jitter::seeded(0.5, 42);
        let b = Jitter::seeded(0.5, 42);
        let base = Duration::from_secs(10);
        for _ in 0..100 {
            let (x, y) = (a.apply(base), b.apply(base));
            assert_eq!(x, y);
            assert!(x <= base && x >= base / 2, "{x:?} outside [5 s, 10 s]");
        }
        let other = Jitter::seeded(0.5, 43);
        let differs = (0..10).any(|_| a.apply(base) != other.apply(base));
        assert!(differs, "different seeds give different sequences");
    }
}
