//! The Prometheus exporter behind `/metrics`.

use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Handler latency buckets, in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder (once per
/// process) and returns what renders `/metrics`; `None` when another recorder was
/// installed first.
pub(super) fn install() -> Option<Arc<dyn Fn() -> String + Send + Sync>> {
    let handle = HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(steward_core::metrics::names::HANDLER_DURATION.to_owned()),
                LATENCY_BUCKETS,
            )
            .ok()?;
        match builder.install_recorder() {
            Ok(handle) => Some(handle),
            Err(error) => {
                tracing::warn!(error = %steward_core::error_chain(&error), "metrics recorder not installed; /metrics stays empty");
                None
            }
        }
    });
    let handle = handle.clone()?;
    Some(Arc::new(move || handle.render()))
}
