//! `steward-sb-emulator`: a Service Bus REST emulator on the steward in-memory broker.
//!
//! Runs the service (or any Service Bus REST client) with Service Bus semantics and no
//! Azure account: point the client's `https://<namespace>.servicebus.windows.net` at
//! the address this prints. Everything is in memory. Stops cleanly on SIGTERM or Ctrl-C.
//!
//! ```text
//! cargo run -p steward-servicebus --features emulator --bin steward-sb-emulator -- \
//!     --listen 127.0.0.1:5300 --sas-key-name RootManageSharedAccessKey --sas-key secret
//! ```

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use steward_servicebus::emulator::{
    DEFAULT_MAX_DELIVERY_COUNT, DEFAULT_MAX_MESSAGE_BYTES, Emulator, EmulatorBuilder,
};
use tracing_subscriber::EnvFilter;

/// A Service Bus REST emulator: the real paths, headers and status codes, on an
/// in-memory broker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "STEWARD_SB_EMULATOR_LISTEN", default_value = "127.0.0.1:5300")]
    listen: SocketAddr,

    /// Name of the shared access key that signs requests (a namespace's shared access
    /// policy, e.g. RootManageSharedAccessKey). Without a key, requests need no
    /// credentials.
    #[arg(long, env = "SERVICE_BUS_SAS_KEY_NAME", requires = "sas_key")]
    sas_key_name: Option<String>,

    /// The shared access key itself.
    #[arg(long, env = "SERVICE_BUS_SAS_KEY", requires = "sas_key_name", hide_env_values = true)]
    sas_key: Option<String>,

    /// How long a peek-lock holds a message: `30s`, `500ms`, `2m`, or plain seconds.
    #[arg(long, env = "STEWARD_SB_EMULATOR_LOCK_DURATION", default_value = "60s", value_parser = parse_duration)]
    lock_duration: Duration,

    /// After this many deliveries a message goes to the dead-letter queue
    /// (`MaxDeliveryCountExceeded`).
    #[arg(long, env = "STEWARD_SB_EMULATOR_MAX_DELIVERY_COUNT", default_value_t = DEFAULT_MAX_DELIVERY_COUNT, value_parser = clap::value_parser!(u32).range(1..))]
    max_delivery_count: u32,

    /// Create this queue as session-enabled (REST receives on it fail as on Azure).
    /// Repeat for more.
    #[arg(long = "session-queue", value_name = "NAME")]
    session_queues: Vec<String>,

    /// Create this queue at start. Repeat for more.
    #[arg(long = "queue", value_name = "NAME")]
    queues: Vec<String>,

    /// Do not create queues on first use: only `--queue` and `--session-queue` queues
    /// exist, and others answer 410 Gone.
    #[arg(long)]
    no_auto_create: bool,

    /// Largest message body accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
}

/// Parses `500ms`, `30s`, `2m`, `1h` or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30s"))?;
    let too_long = || format!("{text:?} is too long");
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60).ok_or_else(too_long)?),
        "h" => Duration::from_secs(number.checked_mul(3600).ok_or_else(too_long)?),
        other => return Err(format!("unknown unit {other:?} in {text:?}: use ms, s, m or h")),
    };
    if duration.is_zero() {
        return Err("the duration must not be zero".to_owned());
    }
    Ok(duration)
}

impl Args {
    fn builder(&self) -> EmulatorBuilder {
        let mut builder = Emulator::builder()
            .with_listen_addr(self.listen)
            .with_lock_duration(self.lock_duration)
            .with_max_delivery_count(self.max_delivery_count)
            .with_auto_create_queues(!self.no_auto_create)
            .with_max_message_bytes(self.max_message_bytes);
        if let (Some(name), Some(key)) = (&self.sas_key_name, &self.sas_key) {
            builder = builder.with_sas_key(name, key);
        }
        for queue in &self.session_queues {
            builder = builder.with_session_queue(queue);
        }
        for queue in &self.queues {
            builder = builder.with_queue(queue);
        }
        builder
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "steward-sb-emulator failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let emulator = args.builder().start().await.context("starting the emulator")?;
    tracing::info!(
        addr = %emulator.addr(),
        endpoint = emulator.endpoint(),
        sas = args.sas_key_name.is_some(),
        lock_duration = ?args.lock_duration,
        max_delivery_count = args.max_delivery_count,
        session_queues = ?args.session_queues,
        "service bus emulator listening"
    );
    shutdown_signal().await.context("waiting for a shutdown signal")?;
    tracing::info!("shutting down");
    emulator.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_or_as_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
    }

    #[test]
    fn sas_key_name_without_key_is_refused() {
        let parsed = Args::try_parse_from(["steward-sb-emulator", "--sas-key-name", "root"]);
        assert!(parsed.is_err());
        let parsed = Args::try_parse_from([
            "steward-sb-emulator",
            "--sas-key-name",
            "root",
            "--sas-key",
            "k",
        ])
        .unwrap();
        assert_eq!(parsed.sas_key.as_deref(), Some("k"));
    }
}
