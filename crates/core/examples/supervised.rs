//! Two updaters on the in-memory broker under a supervisor, with faults injected:
//! receive failures and backoff, a dropped connection, handler panics, retries and
//! dead letters. Prints the health snapshot every second and shuts down gracefully on
//! Ctrl-C.
//!
//! ```sh
//! cargo run -p steward-core --example supervised            # until Ctrl-C
//! cargo run -p steward-core --example supervised -- --run-for 5
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    ErrorKind, HealthSnapshot, MessageSink, Outcome, OutgoingMessage, Supervisor, SupervisorConfig,
    Updater, UpdaterConfig, Worker, WorkerContext, WorkerError, handler_fn,
};
use steward_inmem::InMemoryBroker;
use tokio::time::Instant;

/// Sends a message to each queue every 100 ms: a supervised worker like the others.
struct Producer {
    broker: InMemoryBroker,
}

#[async_trait]
impl Worker for Producer {
    fn name(&self) -> &str {
        "producer"
    }

    fn stall_timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(10))
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        ctx.set_running();
        let mut n: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = ctx.cancelled() => return Ok(()),
            }
            n += 1;
            let body = if n % 13 == 0 { "not json".to_owned() } else { format!("{{\"n\":{n}}}") };
            let session = format!("customer-{}", n % 4);
            self.broker
                .send("orders", OutgoingMessage::json(body.clone()).with_session_id(session))
                .await?;
            self.broker.send("invoices", OutgoingMessage::json(body)).await?;
            ctx.progress();
        }
    }
}

fn print_health(snapshot: &HealthSnapshot) {
    for w in &snapshot.workers {
        println!(
            "  {:<9} {:<11} restarts={:<2} in_flight={:<2} completed={:<4} retried={:<3} dead={:<3} panics={:<2} lease_lost={} {}",
            w.name,
            w.state.as_str(),
            w.restarts,
            w.in_flight,
            w.outcomes.completed,
            w.outcomes.retried,
            w.outcomes.dead_lettered,
            w.outcomes.panicked,
            w.outcomes.lease_lost,
            w.last_error.as_deref().map(|e| format!("last error: {e}")).unwrap_or_default(),
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let run_for = std::env::args()
        .skip_while(|a| a != "--run-for")
        .nth(1)
        .map(|secs| secs.parse().map(Duration::from_secs))
        .transpose()?;

    let broker = InMemoryBroker::new();
    // The invoices consumer cannot connect at first: watch it back off and recover.
    broker.faults("invoices").fail_receives(2, ErrorKind::Connection);

    let orders = handler_fn(|message| async move {
        if serde_like_json(&message.body) {
            Outcome::Complete
        } else {
            Outcome::dead_letter("MessageFormatIncorrect", "body is not a JSON object")
        }
    });
    let invoices = handler_fn(|message| async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        if message.body.ends_with(b"7}") && message.delivery_count == 1 {
            panic!("invoice rounding bug");
        }
        if message.body.ends_with(b"5}") && message.delivery_count == 1 {
            return Outcome::retry_after(
                Duration::from_millis(500),
                "exchange rate not published yet",
            );
        }
        Outcome::Complete
    });

    let supervisor = Arc::new(Supervisor::new(SupervisorConfig::default()));
    let config = UpdaterConfig::default().with_wait(Duration::from_secs(1)).with_concurrency(4);
    // Each (re)start opens a new source: a dropped connection is not reused.
    let connect = |queue: &'static str| {
        let broker = broker.clone();
        move || {
            let broker = broker.clone();
            async move { broker.source(queue) }
        }
    };
    supervisor.spawn(Updater::new("orders", connect("orders"), orders).with_config(config.clone()));
    supervisor.spawn(Updater::new("invoices", connect("invoices"), invoices).with_config(config));
    supervisor.spawn(Producer { broker: broker.clone() });

    let health = supervisor.health();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            result = tokio::signal::ctrl_c() => {
                result?;
                println!("Ctrl-C: shutting down");
                break;
            }
        }
        let elapsed = started.elapsed();
        println!("after {:.0?}:", elapsed);
        print_health(&health.snapshot());
        if elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(3) {
            println!("  (dropping the orders consumer's connection)");
            broker.faults("orders").disconnect();
        }
        if run_for.is_some_and(|limit| elapsed >= limit) {
            break;
        }
    }

    let supervisor = Arc::try_unwrap(supervisor).map_err(|_| "supervisor still shared")?;
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    println!("shutdown: {report:?}");
    print_health(&health.snapshot());
    println!("dead letters in orders: {}", broker.dead_letter_count("orders"));
    if !report.is_clean() {
        return Err("shutdown was not clean".into());
    }
    Ok(())
}

/// A minimal check that the body looks like a JSON object (the example has no JSON parser).
fn serde_like_json(body: &[u8]) -> bool {
    body.first() == Some(&b'{') && body.last() == Some(&b'}')
}
