//! `steward-api`: the TRE-style control plane, its queue consumers under a supervisor.
//!
//! ```sh
//! cargo run -p steward-api                 # in-memory broker, SQLite steward.db, simulators
//! cargo run -p steward-api -- --help       # every setting, with its environment variable
//! ```
//!
//! Exit codes: 0 after a graceful shutdown (SIGTERM or Ctrl-C), 2 for bad configuration
//! (one line on stderr), 1 when the HTTP server fails.

use std::process::ExitCode;

use clap::Parser;
use steward_api::service::Service;
use steward_api::service::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    // lapin logs connection failures itself, at error level; the transport reports
    // them once, with their chain, so its own lines are off unless RUST_LOG asks.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Clap's multi-line error as one line: bad configuration is reported in one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .map(|line| line.strip_prefix("error: ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Registers for SIGTERM and Ctrl-C at once and returns a future that resolves when
/// either arrives.
///
/// Registering before the service starts matters: a SIGTERM sent right after the
/// "listening" line must start a graceful shutdown, not meet the default action, which
/// kills the process. Must be called inside the runtime.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            let (mut terminate, mut interrupt) = match (terminate, interrupt) {
                (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::error!(%error, "cannot listen for SIGTERM and Ctrl-C; stop the process with SIGKILL");
                    return std::future::pending().await;
                }
            };
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("Ctrl-C received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received");
    }
}

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(error) if !error.use_stderr() => {
            // --help and --version.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("steward-api: {}", one_line(&error.render().to_string()));
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("steward-api: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let service = match Service::start(config).await {
            Ok(service) => service,
            Err(error) => {
                eprintln!("steward-api: {}", steward_core::error_chain(&error));
                return ExitCode::from(2);
            }
        };
        match service.serve(shutdown).await {
            Ok(stopped) if stopped.report.is_clean() => ExitCode::SUCCESS,
            Ok(stopped) => {
                tracing::warn!(report = ?stopped.report, "stopped, with work cut short");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!(
                    "steward-api: the HTTP server failed: {}",
                    steward_core::error_chain(&error)
                );
                ExitCode::from(1)
            }
        }
    });
    // The shutdown already waited for what it could: do not wait on threads a handler
    // may still be blocking.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
