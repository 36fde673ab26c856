//! Where the current time comes from, so tests can fix it.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time in POSIX seconds (TRE stores times as float seconds).
///
/// # Examples
///
/// ```
/// use steward_api::Clock;
///
/// assert_eq!(Clock::fixed(1_755_424_800.5).now(), 1_755_424_800.5);
/// assert!(Clock::system().now() > 1_700_000_000.0);
/// ```
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> f64 + Send + Sync>);

impl Clock {
    /// The system clock.
    #[must_use]
    pub fn system() -> Self {
        Clock(Arc::new(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
        }))
    }

    /// A clock that always reads `seconds`.
    #[must_use]
    pub fn fixed(seconds: f64) -> Self {
        Clock(Arc::new(move || seconds))
    }

    /// A clock that reads `now()`.
    #[must_use]
    pub fn from_fn(now: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    /// The current time in POSIX seconds.
    #[must_use]
    pub fn now(&self) -> f64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}
