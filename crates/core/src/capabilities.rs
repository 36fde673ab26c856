//! What a transport can do, so callers and the conformance suite know what to expect.

/// What a transport supports. A missing capability has a documented fallback, or the
/// conformance case that needs it is skipped with a reason.
///
/// Transports build it with struct update syntax:
///
/// ```
/// use steward_core::Capabilities;
///
/// let caps = Capabilities { lock_renewal: true, delivery_count: true, ..Capabilities::default() };
/// assert!(!caps.sessions);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Messages with the same session id are delivered one at a time, in order, across
    /// consumers. Fallback: the updater orders them within one process.
    pub sessions: bool,
    /// The transport has a dead-letter queue whose reason and description can be read
    /// back. Without it, dead-lettering is the transport's documented equivalent.
    pub native_dead_letter: bool,
    /// Messages are locked for a limited time, the lock can be renewed, and an expired
    /// lock makes the message available again. Without it, a message stays with its
    /// consumer until settled or until the connection closes.
    pub lock_renewal: bool,
    /// `abandon(Some(delay))` hides the message for the delay. Fallback: the updater
    /// sleeps before abandoning.
    pub delayed_abandon: bool,
    /// `Message::delivery_count` counts every delivery, including redeliveries after an
    /// abandon, a lock expiry or a lost connection.
    pub delivery_count: bool,
    /// Bodies may hold any bytes; without it, bodies must be UTF-8 text.
    pub binary_body: bool,
    /// The largest message the transport accepts, if it has a limit: the whole message
    /// as [`OutgoingMessage::size_bytes`](crate::OutgoingMessage::size_bytes) counts
    /// it (body, ids, content type and properties; Service Bus counts properties
    /// too), not the body alone.
    pub max_body_bytes: Option<usize>,
}

impl Capabilities {
    /// Every capability, no body limit: what the in-memory broker offers.
    #[must_use]
    pub const fn all() -> Self {
        Self {
            sessions: true,
            native_dead_letter: true,
            lock_renewal: true,
            delayed_abandon: true,
            delivery_count: true,
            binary_body: true,
            max_body_bytes: None,
        }
    }

    /// Whether the transport has capability `cap`.
    #[must_use]
    pub const fn has(&self, cap: Capability) -> bool {
        match cap {
            Capability::Sessions => self.sessions,
            Capability::NativeDeadLetter => self.native_dead_letter,
            Capability::LockRenewal => self.lock_renewal,
            Capability::DelayedAbandon => self.delayed_abandon,
            Capability::DeliveryCount => self.delivery_count,
            Capability::BinaryBody => self.binary_body,
        }
    }
}

/// One boolean capability of [`Capabilities`], by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// [`Capabilities::sessions`].
    Sessions,
    /// [`Capabilities::native_dead_letter`].
    NativeDeadLetter,
    /// [`Capabilities::lock_renewal`].
    LockRenewal,
    /// [`Capabilities::delayed_abandon`].
    DelayedAbandon,
    /// [`Capabilities::delivery_count`].
    DeliveryCount,
    /// [`Capabilities::binary_body`].
    BinaryBody,
}

impl Capability {
    /// The field name of the capability.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sessions => "sessions",
            Self::NativeDeadLetter => "native_dead_letter",
            Self::LockRenewal => "lock_renewal",
            Self::DelayedAbandon => "delayed_abandon",
            Self::DeliveryCount => "delivery_count",
            Self::BinaryBody => "binary_body",
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
