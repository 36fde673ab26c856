//! What every transport means the same way: the dead-letter type, the reason a transport
//! gives when it dead-letters a message itself, the names transports give their
//! dead-letter queues and bookkeeping properties, and how a broker URL is redacted.
//!
//! A transport crate uses these instead of defining its own, so a dead letter read from
//! RabbitMQ, Service Bus or the in-memory broker looks the same to tests and tools.

use std::time::Duration;

use tokio::time::Instant;

use crate::Message;

/// The reason a message carries into the dead-letter queue when it was delivered more
/// often than allowed, by the broker's limit or the Updater's `max_deliveries`. Service
/// Bus uses the same name on its own dead-letter queue.
pub const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// The suffix of the dead-letter queue a transport keeps itself, beside each queue.
pub const DEAD_LETTER_QUEUE_SUFFIX: &str = ".dlq";

/// The property (or header) where a transport keeps the deliveries a message had before
/// the transport re-sent it (an abandon with delay, a dead letter), to be added to the
/// broker's own count.
pub const DELIVERY_COUNT_PROPERTY: &str = "x-steward-delivery-count";

/// The property of a dead-lettered message holding the reason (the name Service Bus
/// uses on its own dead-letter queue).
pub const DEAD_LETTER_REASON_PROPERTY: &str = "DeadLetterReason";

/// The property of a dead-lettered message holding the description (the name Service
/// Bus uses on its own dead-letter queue).
pub const DEAD_LETTER_DESCRIPTION_PROPERTY: &str = "DeadLetterErrorDescription";

/// The header where a transport that dead-letters by publishing the message again (on a
/// broker with no dead-letter reason of its own, such as RabbitMQ) keeps the reason. It
/// is in the `x-steward-` namespace of the transport's own bookkeeping, like
/// [`DELIVERY_COUNT_PROPERTY`], so it cannot collide with a caller's property; read back,
/// it becomes [`DeadLetter::reason`].
pub const DEAD_LETTER_REASON_HEADER: &str = "x-steward-dead-letter-reason";

/// The header where such a transport keeps the description; read back, it becomes
/// [`DeadLetter::description`].
pub const DEAD_LETTER_DESCRIPTION_HEADER: &str = "x-steward-dead-letter-description";

/// The dead-letter queue a transport keeps beside `queue`: `<queue>.dlq`.
///
/// # Examples
///
/// ```
/// assert_eq!(steward_core::transport::dead_letter_queue("jobs"), "jobs.dlq");
/// ```
#[must_use]
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_QUEUE_SUFFIX}")
}

/// `now + duration`, or a moment decades away when that does not fit the clock: for
/// deadlines and visibility times computed from durations a caller chose.
#[must_use]
pub fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration).unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 60 * 60))
}

/// The URL schemes of NATS servers, whose user part without a password is a token.
const TOKEN_SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];

/// A broker URL with the credentials it carries hidden, for logs, `Debug` output and
/// error texts. The rule, for every transport:
///
/// - a password (`user:password@`) becomes `user:***@`;
/// - a user part without a password is a user name and stays (`amqp://u@h/`), except
///   in a NATS URL (scheme `nats`, `tls`, `ws`, `wss` in any case, or none), where it is a token and
///   becomes `***` whole;
/// - a NATS URL may list several servers separated by commas; each is redacted on its
///   own. Other URLs are one server;
/// - the value of a query parameter whose name looks secret (`password`, `sslpassword`,
///   `access_token`, `SharedAccessKey`, `sig`, …) becomes `***`.
///
/// # Examples
///
/// ```
/// use steward_core::transport::redact_url;
///
/// assert_eq!(redact_url("amqp://u:pw@h:5672/%2f"), "amqp://u:***@h:5672/%2f");
/// assert_eq!(redact_url("amqp://u@h/"), "amqp://u@h/");
/// assert_eq!(redact_url("nats://t0ken@h:4222,nats://h2"), "nats://***@h:4222,nats://h2");
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    let (url, query) = url.split_once('?').map_or((url, None), |(url, query)| (url, Some(query)));
    let first = url.split(',').next().unwrap_or(url);
    let scheme = first.find("://").map(|end| &first[..end]);
    // Schemes are case-insensitive (`NATS://t0ken@h` connects as well).
    let nats = scheme
        .is_none_or(|scheme| TOKEN_SCHEMES.iter().any(|token| token.eq_ignore_ascii_case(scheme)));
    let base = if nats {
        url.split(',').map(|server| redact_server(server, true)).collect::<Vec<_>>().join(",")
    } else {
        redact_server(url, false)
    };
    match query {
        Some(query) => format!("{base}?{}", redact_query(query)),
        None => base,
    }
}

/// A URL query with the value of every parameter whose name looks secret hidden: the
/// name (in any case) contains `pass`, `pwd`, `secret`, `token`, `key`, `sig` or
/// `credential` (`password`, `sslpassword`, `access_token`, `SharedAccessKey`, `sig`,
/// `client_secret`, …).
fn redact_query(query: &str) -> String {
    const SECRET: [&str; 7] = ["pass", "pwd", "secret", "token", "key", "sig", "credential"];
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if SECRET.iter().any(|s| name.to_ascii_lowercase().contains(s)) => {
                format!("{name}=***")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A broker URL whose `Debug` output is [`redact_url`]ed, so configuration that holds
/// one can derive `Debug`.
///
/// # Examples
///
/// ```
/// use steward_core::transport::BrokerUrl;
///
/// let url = BrokerUrl::new("amqp://u:s3cret@h/%2f");
/// assert_eq!(url.as_str(), "amqp://u:s3cret@h/%2f");
/// assert_eq!(format!("{url:?}"), r#""amqp://u:***@h/%2f""#);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    /// Wraps `url`.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, credentials included; never log it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL with its credentials hidden, by [`redact_url`].
    #[must_use]
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.redacted(), f)
    }
}

/// One server's URL with its password hidden, and a bare user part too when it is a
/// `token`.
fn redact_server(url: &str, token: bool) -> String {
    let start = url.find("://").map_or(0, |scheme_end| scheme_end + 3);
    let rest = &url[start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_owned() };
    let user = match rest[..at].find(':') {
        Some(colon) => format!("{}:***", &rest[..colon]),
        None if token => "***".to_owned(),
        None => return url.to_owned(),
    };
    format!("{}{user}{}", &url[..start], &rest[at..])
}

/// A message in a dead-letter queue, with why it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as it sits in the dead-letter queue, with its original ids and
    /// properties (less the transport's own bookkeeping).
    pub message: Message,
    /// The reason given to `dead_letter`, or the transport's or broker's own
    /// ([`MAX_DELIVERY_COUNT_EXCEEDED`] for a delivery limit); empty when unknown.
    pub reason: String,
    /// The description given to `dead_letter`; empty for messages the broker moved.
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 60 * 60));
    }

    #[test]
    fn urls_lose_passwords_and_nats_tokens_but_keep_user_names() {
        for (url, redacted) in [
            ("amqp://u:p@h:1/%2f", "amqp://u:***@h:1/%2f"),
            ("amqp://h:1/%2f", "amqp://h:1/%2f"),
            ("amqp://u@h/", "amqp://u@h/"),
            ("amqps://u:p,w@h/", "amqps://u:***@h/"),
            ("nats://u:secret@h:4222", "nats://u:***@h:4222"),
            ("nats://s3cr3t-token@h:4222", "nats://***@h:4222"),
            ("tls://s3cr3t-token@h:4222", "tls://***@h:4222"),
            ("nats://h:4222", "nats://h:4222"),
            ("u:p@h:4222,nats://h2", "u:***@h:4222,nats://h2"),
            ("nats://h1,t0ken@h2", "nats://h1,***@h2"),
            ("nats://h/path@x", "nats://h/path@x"),
            ("NATS://s3cr3t@h:4222", "NATS://***@h:4222"),
            ("Nats://h1,t0k@h2", "Nats://h1,***@h2"),
            (
                "postgres://db/tre?user=app&Password=s3&sslmode=x",
                "postgres://db/tre?user=app&Password=***&sslmode=x",
            ),
            (
                "amqp://u:p@h/?auth_token=t&heartbeat=5",
                "amqp://u:***@h/?auth_token=***&heartbeat=5",
            ),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn dead_letter_queue_appends_the_suffix() {
        assert_eq!(dead_letter_queue("q"), "q.dlq");
    }
}
