//! Doubles for the unit tests of the Updater's parts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::held::Held;
use crate::{Capabilities, Delivery, Message, MessageSource, Settle, TransportError};

/// A settle handle that answers at once (or after `latency`), hangs, or reports the
/// lock lost.
#[derive(Debug, Default, Clone)]
pub(super) struct TestSettle {
    /// Every call pends for ever.
    pub(super) hang: bool,
    /// Every call answers this late.
    pub(super) latency: Duration,
    /// Counts the abandons that were answered.
    pub(super) abandoned: Arc<AtomicUsize>,
    /// Every call fails with `LockLost`.
    pub(super) lost: bool,
    /// Counts the abandons.
    pub(super) abandons: Arc<AtomicUsize>,
    /// The lock's expiry: 10 s from when it was first asked for (at receipt), and from
    /// each renewal.
    pub(super) until: Arc<std::sync::Mutex<Option<Instant>>>,
}

#[async_trait]
impl Settle for TestSettle {
    fn locked_until(&self) -> Option<Instant> {
        let mut until = self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(*until.get_or_insert_with(|| Instant::now() + Duration::from_secs(10)))
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        self.answer().await?;
        let renewed = Instant::now() + Duration::from_secs(10);
        *self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(renewed);
        Ok(Some(renewed))
    }

    async fn complete(&self) -> Result<(), TransportError> {
        self.answer().await
    }

    async fn abandon(&self, _delay: Option<Duration>) -> Result<(), TransportError> {
        self.abandons.fetch_add(1, Ordering::SeqCst);
        self.answer().await?;
        self.abandoned.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn dead_letter(&self, _reason: &str, _description: &str) -> Result<(), TransportError> {
        self.answer().await
    }
}

impl TestSettle {
    async fn answer(&self) -> Result<(), TransportError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.latency).await;
        if self.lost {
            return Err(TransportError::lock_lost("test"));
        }
        Ok(())
    }
}

/// A held message `id` (no session) whose settle handle answers at once.
pub(super) fn held(key: u64, id: &str) -> Held {
    held_with(key, id, None, TestSettle::default())
}

/// A held message `id` of `session` with `settle`.
pub(super) fn held_with(key: u64, id: &str, session: Option<&str>, settle: TestSettle) -> Held {
    let mut message = Message::new(id, "body");
    message.session_id = session.map(str::to_owned);
    Held::new(key, Delivery::new(message, settle), Instant::now(), Duration::from_secs(2))
}

/// A source whose receives never return.
#[derive(Debug)]
pub(super) struct SilentSource;

#[async_trait]
impl MessageSource for SilentSource {
    fn queue(&self) -> &str {
        "silent"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn receive(&self, _max: usize, _wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        std::future::pending().await
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        Ok(())
    }
}
