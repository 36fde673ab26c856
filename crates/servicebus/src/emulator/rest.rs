//! The REST protocol: parsing the path, authentication, and each operation on the broker.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body_util::BodyExt;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::Deserialize;
use serde_json::{Map, Value};
use steward_core::{ErrorKind, OutgoingMessage, TransportError, error_chain};
use steward_inmem::{DEAD_LETTER_SUFFIX, InMemoryBroker, LockRef, LockedMessage};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::faults::{Action, Faults, Operation};
use super::properties::{
    META_PROPERTY, Meta, PropertyType, ReceivedBrokerProperties, SentBrokerProperties,
    decode_custom_property, encode_custom_property, renewed_lock_json,
};
use super::sas::Authenticator;
use crate::message::is_protocol_header;

/// The `Content-Type` of a received message sent without one, as the service answers.
const DEFAULT_MESSAGE_CONTENT_TYPE: &str = "application/atom+xml;type=entry;charset=utf-8";
/// The `Content-Type` of the service's empty and error answers.
const XML_CONTENT_TYPE: &str = "application/xml; charset=utf-8";
/// The `Content-Type` of a Send Message Batch request.
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";
const BROKER_PROPERTIES: HeaderName = HeaderName::from_static("brokerproperties");
/// Request body bytes read and thrown away beyond those an operation keeps. Every
/// request's body is read to its end before the answer goes out: the HTTP server closes
/// a connection whose request body is left unread, and a client still writing the body
/// then gets a broken pipe instead of the answer. A body longer than this is left
/// unread, and its connection closed after the answer.
const MAX_DISCARDED_BYTES: usize = 64 * 1024 * 1024;

/// The service's text for a non-session receive on a session-enabled queue (it
/// answers 405 Method Not Allowed).
pub(crate) const SESSION_RECEIVE_REFUSED: &str = "It is not possible for an entity that requires sessions to create a non-sessionful message receiver.";
/// The service's text for a message without a session id sent to a session-enabled
/// queue (405 Method Not Allowed).
pub(crate) const SESSION_ID_REQUIRED: &str = "The SessionId was not set on a message, and it cannot be sent to the entity. Entities that have session support enabled can only receive messages that have the SessionId set to a valid value.";

/// Characters escaped in one path segment of a lock URI (`$` stays as it is).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'^')
    .add(b'|')
    .add(b'\\')
    .add(b'[')
    .add(b']');

/// Closes the connection a request came in on, without an answer; the server puts one
/// into every request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionControl(pub(crate) CancellationToken);

/// Everything the handler needs, shared by all connections.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) broker: InMemoryBroker,
    pub(crate) auth: Authenticator,
    pub(crate) faults: Faults,
    pub(crate) session_queues: HashSet<String>,
    pub(crate) max_message_bytes: usize,
    pub(crate) default_receive_timeout: Duration,
    pub(crate) local_addr: SocketAddr,
    pub(crate) shutdown: CancellationToken,
}

/// The emulator's router: one handler, since Service Bus entity paths may have any
/// number of segments and `$DeadLetterQueue` segments.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// An answer other than success: the status and the text of the service's
/// `<Error><Code/><Detail/></Error>` body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl fmt::Display) -> Self {
        Self { status, detail: detail.to_string() }
    }

    /// The status the service gives for a broker error.
    fn from_broker(error: &TransportError, entity: &str) -> Self {
        let (status, detail) = match error.kind() {
            ErrorKind::NotFound => {
                (StatusCode::GONE, format!("The messaging entity '{entity}' could not be found."))
            }
            ErrorKind::LockLost => (
                StatusCode::NOT_FOUND,
                "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.".to_owned(),
            ),
            ErrorKind::Auth => (StatusCode::UNAUTHORIZED, error.to_string()),
            ErrorKind::Protocol => (StatusCode::BAD_REQUEST, error.to_string()),
            ErrorKind::Connection => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
            ErrorKind::Timeout | ErrorKind::Other => {
                (StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
            }
            // A kind added to the core later is an internal error here.
            _ => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        };
        if status.is_server_error() {
            tracing::debug!(queue = entity, error = %error_chain(error), "broker error");
        }
        Self { status, detail }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = format!(
            "<Error><Code>{}</Code><Detail>{} TrackingId:{}, Timestamp:{}</Detail></Error>",
            self.status.as_u16(),
            xml_escape(&self.detail),
            Uuid::new_v4(),
            super::properties::format_date(SystemTime::now()),
        );
        (self.status, [(header::CONTENT_TYPE, XML_CONTENT_TYPE)], body).into_response()
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// What a path addresses inside an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `/{entity}/messages`
    Messages,
    /// `/{entity}/messages/head`
    Head,
    /// `/{entity}/messages/{messageId or sequenceNumber}/{lockToken}`
    Lock { id: String, token: String },
}

/// A parsed request path: the entity (`queue` or `queue/$DeadLetterQueue`, as the
/// broker names them) and the target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    entity: String,
    target: Target,
}

fn parse_route(path: &str) -> Result<Route, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("The path '{path}' is not a Service Bus messaging path."),
        )
    };
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let n = segments.len();
    let is = |i: usize, word: &str| segments[i].eq_ignore_ascii_case(word);
    let (entity_len, target) = if n >= 2 && is(n - 1, "messages") {
        (n - 1, Target::Messages)
    } else if n >= 3 && is(n - 2, "messages") && is(n - 1, "head") {
        (n - 2, Target::Head)
    } else if n >= 4 && is(n - 3, "messages") {
        (n - 3, Target::Lock { id: segments[n - 2].clone(), token: segments[n - 1].clone() })
    } else {
        return Err(not_found());
    };
    let mut entity_segments = segments[..entity_len].to_vec();
    if entity_segments.iter().any(String::is_empty) {
        return Err(not_found());
    }
    if entity_segments.iter().any(|s| s.eq_ignore_ascii_case("subscriptions")) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Topics and subscriptions are not emulated; only queues are.",
        ));
    }
    // `$DeadLetterQueue` may only end an entity path, after a queue name.
    let dead_letter = DEAD_LETTER_SUFFIX.trim_start_matches('/');
    let last = entity_segments.len() - 1;
    for (i, segment) in entity_segments.iter_mut().enumerate() {
        if segment.eq_ignore_ascii_case(dead_letter) {
            if i != last || i == 0 {
                return Err(not_found());
            }
            dead_letter.clone_into(segment);
        }
    }
    Ok(Route { entity: entity_segments.join("/"), target })
}

fn operation(method: &Method, target: &Target) -> Option<Operation> {
    Some(match (method.as_str(), target) {
        ("POST", Target::Messages) => Operation::Send,
        ("POST", Target::Head) => Operation::PeekLock,
        ("DELETE", Target::Head) => Operation::ReceiveAndDelete,
        ("PUT", Target::Lock { .. }) => Operation::Unlock,
        ("DELETE", Target::Lock { .. }) => Operation::Complete,
        ("POST", Target::Lock { .. }) => Operation::RenewLock,
        _ => return None,
    })
}

/// The `timeout` query parameter in seconds (at most [`MAX_DURATION`](super::MAX_DURATION));
/// other parameters (`api-version`) are accepted and ignored.
fn receive_timeout(query: Option<&str>, default: Duration) -> Result<Duration, ApiError> {
    for pair in query.unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name.eq_ignore_ascii_case("timeout") {
            let seconds: u64 = value.trim().parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("The timeout {value:?} is not a whole number of seconds."),
                )
            })?;
            return Ok(Duration::from_secs(seconds).min(super::MAX_DURATION));
        }
    }
    Ok(default)
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let (parts, mut body) = request.into_parts();
    let response = match serve(&shared, &parts, &mut body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    // Whatever the answer, the client may still be sending: read the rest.
    discard(&mut body).await;
    tracing::debug!(%method, path, status = response.status().as_u16(), "request");
    response
}

async fn serve(shared: &Shared, parts: &Parts, body: &mut Body) -> Result<Response, ApiError> {
    let route = parse_route(parts.uri.path())?;
    let Some(operation) = operation(&parts.method, &route.target) else {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("The method {} is not allowed on '{}'.", parts.method, parts.uri.path()),
        ));
    };

    let (latency, action) = shared.faults.take(operation);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match action {
        Some(Action::Fail(status)) => {
            return Err(ApiError::new(
                status,
                format!("Injected fault: {operation} on '{}' failed.", route.entity),
            ));
        }
        Some(Action::Drop) => {
            tracing::debug!(queue = route.entity, %operation, "dropping the connection (injected)");
            if let Some(control) = parts.extensions.get::<ConnectionControl>() {
                control.0.cancel();
                // The connection goes away with this request's future.
                std::future::pending::<()>().await;
            }
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "connection dropped"));
        }
        None => {}
    }

    let authorization = parts.headers.get(header::AUTHORIZATION).map(|v| v.to_str());
    let authorization = match authorization {
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "MalformedToken: the Authorization header is not ASCII",
            ));
        }
        None => None,
    };
    shared
        .auth
        .check(authorization, parts.uri.path(), SystemTime::now())
        .map_err(|failure| ApiError::new(StatusCode::UNAUTHORIZED, failure))?;

    let entity = route.entity.as_str();
    match route.target {
        Target::Messages => send(shared, entity, &parts.headers, body).await,
        Target::Head => {
            // Before waiting for a message, so that the client is not left writing.
            discard(body).await;
            let wait = receive_timeout(parts.uri.query(), shared.default_receive_timeout)?;
            let location = LocationBase::new(&parts.headers, shared.local_addr);
            let mode = match operation {
                Operation::PeekLock => ReceiveMode::PeekLock(location),
                _ => ReceiveMode::ReceiveAndDelete,
            };
            receive(shared, entity, mode, wait).await
        }
        Target::Lock { id, token } => {
            discard(body).await;
            settle(shared, entity, &id, &token, operation).await
        }
    }
}

// ---- request bodies ------------------------------------------------------------------

/// Reads `body` to its end, keeping it if it has at most `keep` bytes: `Ok(None)` for a
/// longer body, whose bytes are thrown away as they arrive. Past `keep` plus
/// [`MAX_DISCARDED_BYTES`] it stops reading.
async fn read_body(body: &mut Body, keep: usize) -> Result<Option<Bytes>, axum::Error> {
    let mut kept = Some(BytesMut::new());
    let mut read = 0_usize;
    while let Some(frame) = body.frame().await {
        // Trailers carry no body bytes.
        let Ok(data) = frame?.into_data() else { continue };
        read = read.saturating_add(data.len());
        kept = kept.filter(|_| read <= keep).map(|mut kept| {
            kept.extend_from_slice(&data);
            kept
        });
        if read > keep.saturating_add(MAX_DISCARDED_BYTES) {
            break;
        }
    }
    Ok(kept.map(BytesMut::freeze))
}

/// Reads what is left of a request body and throws it away.
async fn discard(body: &mut Body) {
    if let Err(error) = read_body(body, 0).await {
        // The connection is broken; the server closes it.
        tracing::debug!(error = %error_chain(&error), "reading the request body failed");
    }
}

// ---- send ----------------------------------------------------------------------------

async fn send(
    shared: &Shared,
    entity: &str,
    headers: &HeaderMap,
    body: &mut Body,
) -> Result<Response, ApiError> {
    if entity.ends_with(DEAD_LETTER_SUFFIX) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("Messages cannot be sent to the dead-letter queue '{entity}'."),
        ));
    }
    let max = shared.max_message_bytes;
    // A body over the limit is still read to its end, so that the client gets the 413.
    let body = match read_body(body, max).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("The message to '{entity}' exceeds the limit of {max} bytes."),
            ));
        }
        Err(error) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("The request body could not be read: {error}"),
            ));
        }
    };
    let content_type = header_text(headers, &header::CONTENT_TYPE)?;
    let is_batch = content_type
        .as_deref()
        .is_some_and(|t| t.trim().to_ascii_lowercase().starts_with(BATCH_CONTENT_TYPE));

    let messages = if is_batch {
        parse_batch(shared, entity, &body)?
    } else {
        let sent = match header_text(headers, &BROKER_PROPERTIES)? {
            Some(json) => SentBrokerProperties::parse(&json)
                .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?,
            None => SentBrokerProperties::default(),
        };
        let custom = custom_properties(headers)?;
        vec![build_message(shared, entity, body, sent, content_type, custom)?]
    };
    // Everything is checked before anything is stored, so a bad batch stores nothing.
    for (message, visible_at) in messages {
        let enqueued = shared.broker.enqueue(entity, message, visible_at).await;
        let enqueued = enqueued.map_err(|e| ApiError::from_broker(&e, entity))?;
        tracing::debug!(queue = entity, message_id = enqueued.message_id, "sent");
    }
    Ok((StatusCode::CREATED, [(header::CONTENT_TYPE, XML_CONTENT_TYPE)]).into_response())
}

fn header_text(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, ApiError> {
    headers
        .get(name)
        .map(|value| {
            std::str::from_utf8(value.as_bytes()).map(str::to_owned).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("The value of the {name} header is not UTF-8."),
                )
            })
        })
        .transpose()
}

/// Custom properties: every header that is not part of HTTP or of the protocol, named
/// in lower case (HTTP header names are case-insensitive).
fn custom_properties(
    headers: &HeaderMap,
) -> Result<Vec<(String, String, Option<PropertyType>)>, ApiError> {
    let mut custom = Vec::new();
    for name in headers.keys() {
        let text = name.as_str();
        if is_protocol_header(text) {
            continue;
        }
        if let Some(raw) = header_text(headers, name)? {
            let (value, kind) = decode_custom_property(&raw);
            custom.push((text.to_owned(), value, kind));
        }
    }
    Ok(custom)
}

/// One entry of a Send Message Batch body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BatchEntry {
    body: String,
    #[serde(default)]
    broker_properties: Option<SentBrokerProperties>,
    #[serde(default)]
    user_properties: Option<Map<String, Value>>,
}

fn parse_batch(
    shared: &Shared,
    entity: &str,
    body: &Bytes,
) -> Result<Vec<(OutgoingMessage, Option<Instant>)>, ApiError> {
    let entries: Vec<BatchEntry> = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("The batch body is not valid: {e}"))
    })?;
    entries
        .into_iter()
        .map(|entry| {
            let sent = entry.broker_properties.unwrap_or_default();
            sent.validate().map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
            let mut custom = Vec::new();
            for (name, value) in entry.user_properties.unwrap_or_default() {
                let (text, kind) = match value {
                    Value::String(text) => (text, None),
                    Value::Number(n) => (n.to_string(), Some(PropertyType::Number)),
                    Value::Bool(b) => (b.to_string(), Some(PropertyType::Boolean)),
                    other => {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "The user property {name:?} has the unsupported value {other}."
                            ),
                        ));
                    }
                };
                custom.push((name, text, kind));
            }
            let content_type = sent.content_type.clone();
            build_message(shared, entity, Bytes::from(entry.body), sent, content_type, custom)
        })
        .collect()
}

fn build_message(
    shared: &Shared,
    entity: &str,
    body: Bytes,
    sent: SentBrokerProperties,
    content_type_header: Option<String>,
    custom: Vec<(String, String, Option<PropertyType>)>,
) -> Result<(OutgoingMessage, Option<Instant>), ApiError> {
    let sessions = shared.session_queues.contains(entity);
    if sessions && sent.session_id.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, SESSION_ID_REQUIRED));
    }
    let scheduled =
        sent.scheduled_enqueue_time().map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    let mut meta = Meta {
        label: sent.label,
        reply_to: sent.reply_to,
        to: sent.to,
        reply_to_session_id: sent.reply_to_session_id,
        partition_key: sent.partition_key,
        via_partition_key: sent.via_partition_key,
        // On a queue without sessions the session id is only a property: the broker
        // must not hand its messages out one at a time, as it does for sessions.
        session_id: if sessions { None } else { sent.session_id.clone() },
        time_to_live: sent.time_to_live,
        scheduled_enqueue_time: scheduled.map(unix_seconds),
        types: Default::default(),
    };
    let mut message = OutgoingMessage::new(body);
    message.message_id = sent.message_id.filter(|id| !id.is_empty());
    message.correlation_id = sent.correlation_id;
    message.content_type = sent.content_type.or(content_type_header);
    if sessions {
        message.session_id = sent.session_id;
    }
    for (name, value, kind) in custom {
        if name == META_PROPERTY {
            continue;
        }
        if let Some(kind) = kind {
            meta.types.insert(name.clone(), kind);
        }
        message.properties.insert(name, value);
    }
    if let Some(json) = meta.to_property() {
        message.properties.insert(META_PROPERTY.to_owned(), json);
    }
    let visible_at = scheduled.and_then(|at| {
        let delay = at.duration_since(SystemTime::now()).ok()?;
        Some(Instant::now() + delay)
    });
    Ok((message, visible_at))
}

fn unix_seconds(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

// ---- receive -------------------------------------------------------------------------

/// Where lock URIs point: the scheme and host the client used.
#[derive(Debug, Clone)]
struct LocationBase {
    scheme: String,
    host: String,
}

impl LocationBase {
    fn new(headers: &HeaderMap, local_addr: SocketAddr) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or_default().trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        Self {
            scheme: text("x-forwarded-proto").unwrap_or_else(|| "http".to_owned()),
            host: text("host").unwrap_or_else(|| local_addr.to_string()),
        }
    }

    fn lock_uri(&self, entity: &str, sequence: u64, token: Uuid) -> String {
        let path: Vec<String> =
            entity.split('/').map(|s| utf8_percent_encode(s, SEGMENT).to_string()).collect();
        format!("{}://{}/{}/messages/{sequence}/{token}", self.scheme, self.host, path.join("/"))
    }
}

#[derive(Debug)]
enum ReceiveMode {
    PeekLock(LocationBase),
    ReceiveAndDelete,
}

async fn receive(
    shared: &Shared,
    entity: &str,
    mode: ReceiveMode,
    wait: Duration,
) -> Result<Response, ApiError> {
    if shared.session_queues.contains(entity) {
        return Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, SESSION_RECEIVE_REFUSED));
    }
    let deadline = Instant::now() + wait;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let received = tokio::select! {
            result = shared.broker.receive(entity, 1, remaining) => {
                result.map_err(|e| ApiError::from_broker(&e, entity))?
            }
            // A waiting receive must not hold up shutdown: it ends with nothing.
            () = shared.shutdown.cancelled() => Vec::new(),
        };
        let Some(locked) = received.into_iter().next() else {
            return Ok((StatusCode::NO_CONTENT, [(header::CONTENT_TYPE, XML_CONTENT_TYPE)])
                .into_response());
        };
        let lock = LockRef { sequence: locked.sequence, token: locked.lock_token };
        let meta = Meta::from_properties(&locked.message.properties);
        let enqueued = locked.message.enqueued_at.unwrap_or_else(SystemTime::now);
        if meta.expires_at(enqueued).is_some_and(|at| at <= SystemTime::now()) {
            // Expired messages are removed, not delivered, as the service does with
            // dead-lettering on expiry off (its default).
            tracing::debug!(
                queue = entity,
                message_id = locked.message.id,
                "expired message dropped"
            );
            shared.broker.complete(entity, lock).await.ok();
            continue;
        }
        return match mode {
            ReceiveMode::PeekLock(base) => {
                let location = base.lock_uri(entity, locked.sequence, locked.lock_token);
                Ok(message_response(StatusCode::CREATED, &locked, &meta, Some(&location)))
            }
            ReceiveMode::ReceiveAndDelete => match shared.broker.complete(entity, lock).await {
                Ok(()) => Ok(message_response(StatusCode::OK, &locked, &meta, None)),
                Err(error) if error.kind() == ErrorKind::LockLost => continue,
                Err(error) => Err(ApiError::from_broker(&error, entity)),
            },
        };
    }
}

/// A received message: body, `BrokerProperties`, custom properties as headers and, for
/// a peek-lock, the lock URI in `Location`.
fn message_response(
    status: StatusCode,
    locked: &LockedMessage,
    meta: &Meta,
    location: Option<&str>,
) -> Response {
    let message = &locked.message;
    let lock = location.map(|_| (locked.lock_token, to_system_time(locked.locked_until)));
    let broker_properties = ReceivedBrokerProperties {
        message_id: &message.id,
        sequence_number: locked.sequence,
        delivery_count: message.delivery_count,
        enqueued_time: message.enqueued_at,
        lock,
        correlation_id: message.correlation_id.as_deref(),
        session_id: message.session_id.as_deref(),
        content_type: message.content_type.as_deref(),
        meta,
    }
    .to_json();

    let mut headers = HeaderMap::new();
    let content_type = message.content_type.as_deref().unwrap_or(DEFAULT_MESSAGE_CONTENT_TYPE);
    let content_type = HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| HeaderValue::from_static(DEFAULT_MESSAGE_CONTENT_TYPE));
    headers.insert(header::CONTENT_TYPE, content_type);
    match HeaderValue::from_str(&broker_properties) {
        Ok(value) => {
            headers.insert(BROKER_PROPERTIES, value);
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The broker properties cannot be carried in a header.",
            )
            .into_response();
        }
    }
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        headers.insert(header::LOCATION, location);
    }
    for (name, value) in &message.properties {
        if name == META_PROPERTY {
            continue;
        }
        let Ok(header_name) = HeaderName::from_bytes(name.as_bytes()) else {
            tracing::debug!(
                message_id = message.id,
                property = name,
                "property name is not a header name"
            );
            continue;
        };
        if is_protocol_header(header_name.as_str()) {
            continue;
        }
        let encoded = encode_custom_property(value, meta.types.get(name).copied());
        match HeaderValue::from_str(&encoded) {
            Ok(value) => {
                headers.append(header_name, value);
            }
            Err(_) => {
                tracing::debug!(
                    message_id = message.id,
                    property = name,
                    "property value is not a header value"
                );
            }
        }
    }
    (status, headers, message.body.clone()).into_response()
}

/// The wall-clock time of a tokio instant.
fn to_system_time(at: Instant) -> SystemTime {
    let (now, wall) = (Instant::now(), SystemTime::now());
    if at >= now { wall + (at - now) } else { wall.checked_sub(now - at).unwrap_or(wall) }
}

// ---- settle --------------------------------------------------------------------------

async fn settle(
    shared: &Shared,
    entity: &str,
    id: &str,
    token: &str,
    operation: Operation,
) -> Result<Response, ApiError> {
    let token = Uuid::parse_str(token).map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("The lock token {token:?} is not a GUID."))
    })?;
    let broker = &shared.broker;
    // The real service accepts the message id or the sequence number here.
    let lock = broker
        .lock_by_message_id(entity, id, token)
        .or_else(|| id.parse().ok().map(|sequence| LockRef { sequence, token }));
    let Some(lock) = lock else {
        let error = if broker.has_queue(entity) {
            TransportError::lock_lost(id)
        } else {
            TransportError::not_found(entity)
        };
        return Err(ApiError::from_broker(&error, entity));
    };
    let ok = || (StatusCode::OK, [(header::CONTENT_TYPE, XML_CONTENT_TYPE)]);
    let result = match operation {
        Operation::Complete => broker.complete(entity, lock).await.map(|()| ok().into_response()),
        Operation::Unlock => {
            broker.abandon(entity, lock, None).await.map(|()| ok().into_response())
        }
        _ => broker.renew_lock(entity, lock).await.map(|until| {
            let json = renewed_lock_json(lock.sequence, token, to_system_time(until));
            let mut response = ok().into_response();
            if let Ok(value) = HeaderValue::from_str(&json) {
                response.headers_mut().insert(BROKER_PROPERTIES, value);
            }
            response
        }),
    };
    result.map_err(|e| ApiError::from_broker(&e, entity))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Route {
        parse_route(path).unwrap()
    }

    #[test]
    fn paths_parse_into_entity_and_target() {
        assert_eq!(
            route("/jobs/messages"),
            Route { entity: "jobs".into(), target: Target::Messages }
        );
        assert_eq!(
            route("/jobs/messages/head"),
            Route { entity: "jobs".into(), target: Target::Head }
        );
        assert_eq!(
            route("/a/b/messages/7/0f8fad5b-d9cb-469f-a165-70867728950e"),
            Route {
                entity: "a/b".into(),
                target: Target::Lock {
                    id: "7".into(),
                    token: "0f8fad5b-d9cb-469f-a165-70867728950e".into()
                },
            }
        );
    }

    #[test]
    fn dead_letter_segment_routes_literally_or_encoded_in_any_case() {
        for path in [
            "/jobs/$DeadLetterQueue/messages/head",
            "/jobs/%24DeadLetterQueue/messages/head",
            "/jobs/$deadletterqueue/messages/head",
        ] {
            assert_eq!(route(path).entity, "jobs/$DeadLetterQueue", "{path}");
        }
        assert!(parse_route("/$DeadLetterQueue/messages/head").is_err());
        assert!(parse_route("/jobs/$DeadLetterQueue/x/messages").is_err());
    }

    #[test]
    fn other_paths_are_refused() {
        for path in ["/", "/jobs", "/messages", "//messages", "/t/subscriptions/s/messages/head"] {
            assert!(parse_route(path).is_err(), "{path}");
        }
    }

    #[test]
    fn timeout_comes_from_the_query_and_other_parameters_are_ignored() {
        let default = Duration::from_secs(60);
        let timeout = |q| receive_timeout(q, default).unwrap();
        assert_eq!(timeout(None), default);
        assert_eq!(timeout(Some("timeout=5")), Duration::from_secs(5));
        assert_eq!(timeout(Some("api-version=2015-01&timeout=0")), Duration::ZERO);
        assert!(receive_timeout(Some("timeout=soon"), default).is_err());
        assert_eq!(timeout(Some("timeout=18446744073709551615")), crate::emulator::MAX_DURATION);
    }

    #[test]
    fn lock_uri_uses_the_client_host_and_escapes_segments() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("ns.servicebus.windows.net"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let base = LocationBase::new(&headers, "127.0.0.1:1".parse().unwrap());
        let token = Uuid::nil();
        assert_eq!(
            base.lock_uri("a b/$DeadLetterQueue", 3, token),
            format!("https://ns.servicebus.windows.net/a%20b/$DeadLetterQueue/messages/3/{token}")
        );
        let fallback = LocationBase::new(&HeaderMap::new(), "127.0.0.1:9".parse().unwrap());
        assert_eq!(
            fallback.lock_uri("q", 1, token),
            format!("http://127.0.0.1:9/q/messages/1/{token}")
        );
    }
}
