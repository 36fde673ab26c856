#![doc = include_str!("../README.md")]

mod auth;
mod builder;
mod client;
mod dead_letters;
mod error;
mod http;
mod message;
mod sink;
mod source;

#[cfg(feature = "emulator")]
pub mod emulator;

use steward_core::Capabilities;

pub use auth::{
    AccessToken, BearerTokenClient, IMDS_TOKEN_ENDPOINT, ManagedIdentityCredential,
    SERVICE_BUS_RESOURCE, Secret, StaticToken, TokenError, TokenProvider,
};
pub use builder::{AuthMethod, ConfigError, NAMESPACE_SUFFIX, ServiceBusBuilder};
pub use client::{MAX_DEAD_LETTERS_READ, ServiceBusTransport};
pub use dead_letters::ServiceBusDeadLetters;
pub use http::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, PooledHttpClient};
pub use message::{
    DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_PROPERTY, DELIVERY_COUNT_PROPERTY,
    MAX_DEAD_LETTER_DESCRIPTION_CHARS, MESSAGE_ID_PROPERTY, PROTOCOL_HEADER_PREFIXES,
    PROTOCOL_HEADERS,
};
pub use sink::ServiceBusSink;
pub use source::ServiceBusSource;

/// The largest body this transport claims to carry: the Standard tier's 256 KB.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// What this transport supports; see the crate docs for what is missing and why.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    sessions: false,
    native_dead_letter: false,
    lock_renewal: true,
    delayed_abandon: true,
    delivery_count: true,
    binary_body: false,
    max_body_bytes: Some(MAX_BODY_BYTES),
};

/// The queue dead-lettered messages of `queue` are copied to: `<queue>.dlq`.
pub use steward_core::transport::dead_letter_queue;
