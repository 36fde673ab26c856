//! Probes and worker health: `/health` (TRE's shape), `/livez`, `/readyz`,
//! `/api/workers` and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use steward_core::{HealthSnapshot, WorkerHealth, WorkerState, error_chain};

use super::extract::ShowDetails;
use crate::http::AppState;
use crate::workers::names;

/// `OK` or `Not OK`, as TRE spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) enum ServiceStatusValue {
    /// Healthy.
    #[serde(rename = "OK")]
    Ok,
    /// Unhealthy.
    #[serde(rename = "Not OK")]
    NotOk,
}

/// One service in `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct ServiceStatus {
    /// `Database`, `Message Transport`, `Deployment Status Updater`, `Airlock Status
    /// Updater`, `Outbox`.
    pub service: String,
    /// `OK` or `Not OK`.
    pub status: ServiceStatusValue,
    /// Empty when OK; else, for `TREAdmin` only, the worker's state and last error.
    pub message: String,
    /// For an updater whose queue has a single active consumer: `active` when this
    /// replica receives, `standby` when it waits to take over (still `OK`). Absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// The body of `/health` (TRE's `HealthCheck`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct HealthCheck {
    /// One entry per service, in a fixed order.
    pub services: Vec<ServiceStatus>,
}

/// The `/health` services and the workers behind them, in TRE's fixed-order style.
pub(super) const SERVICES: [(&str, &str); 4] = [
    ("Database", names::DATABASE),
    ("Message Transport", names::TRANSPORT),
    ("Deployment Status Updater", names::DEPLOYMENT_STATUS),
    ("Airlock Status Updater", names::AIRLOCK_STATUS),
];

fn service(snapshot: &HealthSnapshot, service: &str, worker: &str, details: bool) -> ServiceStatus {
    let (status, mut message) = match snapshot.worker(worker) {
        Some(health) if health.state == WorkerState::Running => {
            (ServiceStatusValue::Ok, String::new())
        }
        // Paused on purpose by an operator: nothing is wrong, but say so.
        Some(health) if health.state == WorkerState::Paused => {
            (ServiceStatusValue::Ok, format!("{} is paused by an operator", health.name))
        }
        Some(health) => (ServiceStatusValue::NotOk, describe(health)),
        None => (ServiceStatusValue::NotOk, format!("{worker} is not running in this process")),
    };
    if !details {
        message.clear();
    }
    let role = snapshot.worker(worker).and_then(|w| w.role).map(|role| role.as_str().to_owned());
    ServiceStatus { service: service.to_owned(), status, message, role }
}

fn describe(health: &WorkerHealth) -> String {
    match &health.last_error {
        Some(error) => format!("{} is {}: {error}", health.name, health.state),
        None => format!("{} is {}", health.name, health.state),
    }
}

/// The `/health` entry for the outbox: `Not OK` while messages are parked (they were
/// not sent and need an operator), or when they cannot be counted, or were not: the
/// count reads the HTTP pool, so only a request holding a turn of the load limit
/// ([`DatabaseTurn`]) counts.
pub(super) const OUTBOX_SERVICE: &str = "Outbox";

async fn outbox(state: &AppState, turn: Option<DatabaseTurn>, details: bool) -> ServiceStatus {
    let (status, mut message) = match (state.db.serving(), turn) {
        (Err(not_ready), _) => (ServiceStatusValue::NotOk, not_ready.to_string()),
        (Ok(_), None) => (
            ServiceStatusValue::NotOk,
            "the parked outbox messages were not counted: every API turn is taken (see Retry-After on the API's 503s)"
                .to_owned(),
        ),
        (Ok(store), Some(DatabaseTurn)) => match store.parked_outbox().await {
            Ok(parked) if parked.count == 0 => (ServiceStatusValue::Ok, String::new()),
            Ok(parked) => {
                let now = crate::storage::millis(store.clock().now());
                let age = parked.oldest_parked_at.map_or(0, |at| now.saturating_sub(at).max(0));
                (
                    ServiceStatusValue::NotOk,
                    format!(
                        "{} outbox message(s) parked, the oldest {} s ago",
                        parked.count,
                        age / 1000
                    ),
                )
            }
            Err(error) => (
                ServiceStatusValue::NotOk,
                format!("cannot count the parked outbox messages: {}", error_chain(&error)),
            ),
        },
    };
    if !details {
        message.clear();
    }
    ServiceStatus { service: OUTBOX_SERVICE.to_owned(), status, message, role: None }
}

/// Left in a `/health` request's extensions when it holds a turn of the load limit, so
/// that it may read the database on the HTTP pool (see `limit_load`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DatabaseTurn;

/// The TRE-compatible health document; always 200. The messages (error chains with
/// host and queue names, parked outbox messages) only for `TREAdmin`; empty for
/// everyone else.
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = HealthCheck)))]
pub(super) async fn health(
    State(state): State<AppState>,
    turn: Option<Extension<DatabaseTurn>>,
    ShowDetails(details): ShowDetails,
) -> Json<HealthCheck> {
    let snapshot = state.health.snapshot();
    let mut services: Vec<ServiceStatus> =
        SERVICES.iter().map(|(name, worker)| service(&snapshot, name, worker, details)).collect();
    services.push(outbox(&state, turn.map(|Extension(turn)| turn), details).await);
    Json(HealthCheck { services })
}

/// The same document under `/api`.
#[utoipa::path(get, path = "/api/health", tag = "health", responses((status = 200, body = HealthCheck)))]
pub(super) async fn api_health(
    state: State<AppState>,
    turn: Option<Extension<DatabaseTurn>>,
    details: ShowDetails,
) -> Json<HealthCheck> {
    health(state, turn, details).await
}

/// The answer of `/livez` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct Probe {
    /// `ok`, or what is wrong.
    pub status: String,
    /// Why not, when not: only for `TREAdmin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `/livez` and `/readyz` last answered, so that each logs a change of answer once
/// instead of every 503 it gives: an orchestrator probing every few seconds would
/// otherwise flood the log. A 503 there is an expected answer, not a failed request:
/// turning unready or dead is a warning (not ready before the first ready answer,
/// while the service starts, is only information), coming back is information.
#[derive(Clone, Debug, Default)]
pub(super) struct ProbeLog {
    live: Arc<AtomicU8>,
    ready: Arc<AtomicU8>,
}

/// A probe's last answer: none yet, 200, 503.
const NOT_YET: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl ProbeLog {
    fn record(last: &AtomicU8, probe: &'static str, reasons: &[String]) {
        let now = if reasons.is_empty() { UP } else { DOWN };
        let before = last.swap(now, Ordering::AcqRel);
        let reason = reasons.join("; ");
        match (before, now) {
            (NOT_YET, UP) | (DOWN, UP) => tracing::info!(probe, "probe answers 200"),
            (NOT_YET, DOWN) => tracing::info!(probe, %reason, "probe answers 503 (starting)"),
            (UP, DOWN) => tracing::warn!(probe, %reason, "probe answers 503"),
            _ => {}
        }
    }
}

/// 200 while no worker has `failed`; 503 otherwise, so the orchestrator restarts the
/// process. The reason only for `TREAdmin`.
#[utoipa::path(get, path = "/livez", tag = "health", responses((status = 200, body = Probe), (status = 503, body = Probe)))]
pub(super) async fn livez(
    State(state): State<AppState>,
    Extension(log): Extension<ProbeLog>,
    ShowDetails(details): ShowDetails,
) -> Response {
    let snapshot = state.health.snapshot();
    let failed: Vec<String> =
        snapshot.workers.iter().filter(|w| w.state == WorkerState::Failed).map(describe).collect();
    ProbeLog::record(&log.live, "livez", &failed);
    if failed.is_empty() {
        (StatusCode::OK, Json(Probe { status: "ok".to_owned(), reason: None })).into_response()
    } else {
        let body =
            Probe { status: "failed".to_owned(), reason: details.then(|| failed.join("; ")) };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// How long `/readyz` waits for the database.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// 200 when the database answers and every worker is `running`; 503 otherwise, with
/// the reason for `TREAdmin`. The database check runs on the store's probe connection
/// ([`Store::ping`](crate::storage::Store::ping)), never queuing behind HTTP requests
/// that hold every connection of theirs.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, body = Probe), (status = 503, body = Probe)))]
pub(super) async fn readyz(
    State(state): State<AppState>,
    Extension(log): Extension<ProbeLog>,
    ShowDetails(details): ShowDetails,
) -> Response {
    let snapshot = state.health.snapshot();
    let mut reasons: Vec<String> = snapshot.not_ready_reason().into_iter().collect();
    match state.db.serving() {
        Ok(store) => match tokio::time::timeout(PING_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => reasons.push(format!(
                "the database does not answer: {}",
                steward_core::error_chain(&error)
            )),
            Err(_) => reasons.push(format!("the database did not answer within {PING_TIMEOUT:?}")),
        },
        Err(error) => reasons.push(error.to_string()),
    }
    ProbeLog::record(&log.ready, "readyz", &reasons);
    if reasons.is_empty() {
        (StatusCode::OK, Json(Probe { status: "ok".to_owned(), reason: None })).into_response()
    } else {
        let body =
            Probe { status: "not ready".to_owned(), reason: details.then(|| reasons.join("; ")) };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// One worker in `/api/workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkerStatus {
    /// The worker's name.
    pub name: String,
    /// `starting`, `running`, `backing_off`, `stalled`, `stopping`, `stopped`, `failed`
    /// or `paused`.
    pub state: String,
    /// Whether an operator paused it: its state is `paused`.
    pub paused: bool,
    /// Restarts so far.
    pub restarts: u64,
    /// The last error, with its chain.
    pub last_error: Option<String>,
    /// Seconds since the last progress.
    pub seconds_since_progress: Option<f64>,
    /// The last progress, RFC 3339.
    pub last_progress: Option<String>,
    /// The last message received, RFC 3339.
    pub last_message_at: Option<String>,
    /// Messages completed.
    pub completed: u64,
    /// Messages retried.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Handler panics.
    pub panicked: u64,
    /// Locks lost.
    pub lease_lost: u64,
    /// Messages held now.
    pub in_flight: usize,
    /// When the worker's queue has a single active consumer: `active` when this
    /// replica receives, `standby` when it waits to take over (a standby is `running`,
    /// ready and live). Absent for other workers and while not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

fn rfc3339(time: std::time::SystemTime) -> String {
    let seconds = time.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    crate::domain::rfc3339_utc(seconds)
}

impl From<&WorkerHealth> for WorkerStatus {
    fn from(w: &WorkerHealth) -> Self {
        WorkerStatus {
            name: w.name.clone(),
            state: w.state.as_str().to_owned(),
            paused: w.state == WorkerState::Paused,
            restarts: w.restarts,
            last_error: w.last_error.clone(),
            seconds_since_progress: w.since_progress.map(|d| d.as_secs_f64()),
            last_progress: w.last_progress.map(rfc3339),
            last_message_at: w.last_message_at.map(rfc3339),
            completed: w.outcomes.completed,
            retried: w.outcomes.retried,
            dead_lettered: w.outcomes.dead_lettered,
            panicked: w.outcomes.panicked,
            lease_lost: w.outcomes.lease_lost,
            in_flight: w.in_flight,
            role: w.role.map(|role| role.as_str().to_owned()),
        }
    }
}

/// The body of `/api/workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct Workers {
    /// Live: no worker failed.
    pub live: bool,
    /// Ready: every worker running.
    pub ready: bool,
    /// Every supervised worker.
    pub workers: Vec<WorkerStatus>,
}

/// The supervisor's health snapshot.
#[utoipa::path(get, path = "/api/workers", tag = "health", responses((status = 200, body = Workers)))]
pub(super) async fn workers(State(state): State<AppState>) -> Json<Workers> {
    let snapshot = state.health.snapshot();
    Json(Workers {
        live: snapshot.is_live(),
        ready: snapshot.is_ready(),
        workers: snapshot.workers.iter().map(WorkerStatus::from).collect(),
    })
}

/// Prometheus text exposition of every metric.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.as_ref().map_or_else(String::new, |render| render());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber wrote, one line per event.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Ensures that a probe logs each change of its answer once, whatever the number of
    /// probes between: a first 503 while starting as information, a 503 after a 200 as
    /// a warning, a 200 as information; never an error.
    #[test]
    fn a_probe_logs_each_change_of_answer_once() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let down = vec!["the database does not answer".to_owned()];
        tracing::subscriber::with_default(subscriber, || {
            let last = AtomicU8::new(NOT_YET);
            let answers: [&[String]; 9] = [&down, &down, &[], &[], &[], &down, &down, &down, &[]];
            for reasons in answers {
                ProbeLog::record(&last, "readyz", reasons);
            }
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<(&str, &str)> = text
            .lines()
            .map(|line| {
                let level = ["ERROR", "WARN", "INFO"].into_iter().find(|l| line.contains(l));
                let answer = if line.contains("probe answers 503") { "503" } else { "200" };
                (level.unwrap_or("?"), answer)
            })
            .collect();
        assert_eq!(
            logged,
            [("INFO", "503"), ("INFO", "200"), ("WARN", "503"), ("INFO", "200")],
            "{text}"
        );
        assert!(text.contains("the database does not answer"), "{text}");
    }
}
