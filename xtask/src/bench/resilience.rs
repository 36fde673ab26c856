//! Resilience on RabbitMQ, with the Updater in a bench worker process:
//!
//! - **reconnect**: a steady stream of messages (one every [`PACE`]) through an Updater;
//!   the worker has the broker close its consumer's connection (`rabbitmqctl
//!   close_connection`, found by the worker's unique connection name; the broker is
//!   never restarted), and measures the outage: the longest pause between two handled
//!   messages around the close, i.e. from the last message handled on the old connection
//!   to the first on the new one. The close counts only once the broker lists a new
//!   connection of the worker and the old one is gone.
//! - **SIGTERM**: an Updater at concurrency 64 on a backlog, each handler taking
//!   [`HOLD`]; once 64 handlers run at once the orchestrator sends SIGTERM and times the
//!   exit. Every message handled must be acked and every other one left in the queue.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use steward_core::{Outcome, SupervisorConfig, handler_fn};

use super::rabbitmq::{self, spawn_supervised, spawn_updater, transport_named, url};

/// The pace of the reconnect test's stream.
const PACE: Duration = Duration::from_millis(2);
/// Tries of the reconnect test.
const TRIES: usize = 5;
/// The healthy run after which the reconnect worker's supervisor starts its restart
/// backoff afresh.
const HEALTHY_RESET: Duration = Duration::from_secs(2);
/// Messages in flight at SIGTERM, and how long each handler takes.
const IN_FLIGHT: usize = 64;
const HOLD: Duration = Duration::from_millis(100);
/// The backlog the SIGTERM test starts from.
const BACKLOG: usize = 2_000;

/// The broker's connections whose client-provided name starts with `prefix` and a
/// space (steward-rabbitmq names them `<prefix> source …` and `<prefix> sink …`): their
/// `pid`s, for `rabbitmqctl close_connection`.
fn connections(prefix: &str) -> Result<Vec<String>> {
    let output = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-s"])
        .output()
        .context("could not run rabbitmqctl")?;
    if !output.status.success() {
        bail!("rabbitmqctl list_connections: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    // One line per connection: `<pid>\t<client properties>`, the connection name among
    // the properties as `{"connection_name","<prefix> source <queue> <id>"}`.
    let named = format!("{{\"connection_name\",\"{prefix} ");
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&named))
        .filter_map(|line| line.split('\t').next())
        .map(str::to_owned)
        .collect())
}

fn close_connection(pid: &str) -> Result<()> {
    let status = Command::new("rabbitmqctl")
        .args(["close_connection", pid, "steward benchmark: forced close", "-q"])
        .stdout(Stdio::null())
        .status()
        .context("could not run rabbitmqctl")?;
    if !status.success() {
        bail!("rabbitmqctl close_connection {pid} failed: {status}");
    }
    Ok(())
}

/// The reconnect worker: prints `{"outages_ms": [...]}`, one per try.
pub(crate) async fn reconnect(queue: &str) -> Result<()> {
    let name = format!("steward-bench-reconnect-{}", std::process::id());
    let rabbit = transport_named(queue, &name, 8)?;
    let handled: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handler = {
        let handled = handled.clone();
        handler_fn(move |_message| {
            if let Ok(mut handled) = handled.lock() {
                handled.push(Instant::now());
            }
            async { Outcome::Complete }
        })
    };
    // A lost connection ends the Updater's run; the supervisor restarts it after its
    // backoff, which starts afresh only after a healthy run of `healthy_reset` (60 s by
    // default). Each try stands for an isolated close, so the tries are spaced by more
    // than a shortened healthy reset instead of by 60 s.
    let config = SupervisorConfig::default().with_healthy_reset(HEALTHY_RESET);
    let supervisor = spawn_supervised(config, &rabbit, queue, handler, 8);
    let publisher = tokio::spawn(stream(queue.to_owned()));
    let last = || handled.lock().ok().and_then(|h| h.last().copied());
    let wait_for = |after: Instant, limit: Duration| {
        let last = &last;
        async move {
            let started = Instant::now();
            while last().is_none_or(|t| t <= after) {
                if started.elapsed() > limit {
                    bail!("no message handled within {limit:?}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        }
    };
    let mut outages = Vec::new();
    let result: Result<()> = async {
        wait_for(Instant::now(), Duration::from_secs(30)).await?;
        for attempt in 0..TRIES {
            tokio::time::sleep(HEALTHY_RESET + Duration::from_secs(1)).await;
            let prefix = name.clone();
            let old = tokio::task::spawn_blocking(move || connections(&prefix)).await??;
            if old.is_empty() {
                bail!("the broker lists no connection named {name}");
            }
            let before = Instant::now();
            let closing = old.clone();
            tokio::task::spawn_blocking(move || {
                closing.iter().try_for_each(|p| close_connection(p))
            })
            .await??;
            // The close has happened once the old connection is gone and a new one is up.
            let started = Instant::now();
            loop {
                let prefix = name.clone();
                let now = tokio::task::spawn_blocking(move || connections(&prefix)).await??;
                if !now.is_empty() && now.iter().all(|pid| !old.contains(pid)) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("no new connection within 60 s of the close");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let reconnected = Instant::now();
            wait_for(reconnected, Duration::from_secs(30)).await?;
            let times = handled.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
            let from = times.iter().rposition(|t| *t < before).unwrap_or(0);
            let outage = times[from..]
                .windows(2)
                .take_while(|w| w[0] <= reconnected)
                .map(|w| w[1] - w[0])
                .max()
                .context("no message around the close")?;
            eprintln!("reconnect: try {} of {TRIES}: {outage:.0?}", attempt + 1);
            outages.push(outage.as_secs_f64() * 1e3);
        }
        Ok(())
    }
    .await;
    publisher.abort();
    let _ = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(10)).await;
    result?;
    println!("{}", serde_json::json!({ "outages_ms": outages }));
    Ok(())
}

/// Publishes one message every [`PACE`] to `queue`, until aborted.
async fn stream(queue: String) -> Result<()> {
    let connection = Connection::connect(
        &url(),
        ConnectionProperties::default().with_connection_name("steward-bench-stream".into()),
    )
    .await?;
    let channel = connection.create_channel().await?;
    let mut tick = tokio::time::interval(PACE);
    for n in 0.. {
        tick.tick().await;
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &rabbitmq::body(n),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(rabbitmq::message_id(n).into()),
            )
            .await?;
    }
    Ok(())
}

/// The SIGTERM worker: an Updater at concurrency [`IN_FLIGHT`] whose handlers take
/// [`HOLD`]; prints `{"in_flight": 64}` once that many run at once, and after SIGTERM
/// and the drain, `{"handled": n}`.
pub(crate) async fn sigterm(queue: &str) -> Result<()> {
    let mut signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let name = format!("steward-bench-sigterm-{}", std::process::id());
    let rabbit = transport_named(queue, &name, IN_FLIGHT)?;
    let running = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let announced = Arc::new(std::sync::Once::new());
    let handler = {
        let (running, handled, announced) = (running.clone(), handled.clone(), announced.clone());
        handler_fn(move |_message| {
            let (running, handled, announced) =
                (running.clone(), handled.clone(), announced.clone());
            async move {
                if running.fetch_add(1, Ordering::SeqCst) + 1 >= IN_FLIGHT {
                    announced.call_once(|| {
                        println!("{}", serde_json::json!({ "in_flight": IN_FLIGHT }))
                    });
                }
                tokio::time::sleep(HOLD).await;
                running.fetch_sub(1, Ordering::SeqCst);
                handled.fetch_add(1, Ordering::SeqCst);
                Outcome::Complete
            }
        })
    };
    let supervisor = spawn_updater(&rabbit, queue, handler, IN_FLIGHT);
    signal.recv().await;
    let _ = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(25)).await;
    println!("{}", serde_json::json!({ "handled": handled.load(Ordering::SeqCst) }));
    Ok(())
}

/// The resilience figures.
pub(super) fn bench(bench: &super::Bench, report: &mut super::Report) {
    let keys = ["resilience.reconnect.median", "resilience.reconnect.max"];
    println!("resilience: reconnect, {TRIES} forced connection closes");
    match measure_reconnect(bench) {
        Ok(outages) => {
            let max = outages.iter().copied().fold(f64::NAN, f64::max);
            // The tries are the rounds: the figure is their median.
            report.figure(keys[0], "ms", outages);
            report.figure(keys[1], "ms", vec![max]);
        }
        Err(error) => {
            eprintln!("resilience reconnect: {error:#}");
            for key in keys {
                report.missing(key, "ms", format!("{error:#}"));
            }
        }
    }
    let key = "resilience.sigterm-64-in-flight";
    let mut exits = Vec::new();
    let mut failure = None;
    for round in 0..super::ROUNDS {
        println!("resilience: SIGTERM with {IN_FLIGHT} in flight, round {}", round + 1);
        match measure_sigterm(bench) {
            Ok(ms) => exits.push(ms),
            Err(error) => {
                eprintln!("resilience sigterm: {error:#}");
                failure = Some(format!("{error:#}"));
            }
        }
    }
    if exits.is_empty() {
        report.missing(key, "ms", failure.unwrap_or_default());
    } else {
        report.figure(key, "ms", exits);
    }
}

fn measure_reconnect(bench: &super::Bench) -> Result<Vec<f64>> {
    let queue = rabbitmq::unique_queue("reconnect");
    rabbitmq::declare(&queue)?;
    let result = (|| {
        let line = super::run_line(
            {
                let mut command = Command::new(&bench.exe);
                command.args(["bench-worker", "rabbitmq-reconnect", &queue]);
                command
            },
            Duration::from_secs(300),
        )?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        let outages: Vec<f64> = value["outages_ms"]
            .as_array()
            .context("no outages_ms")?
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect();
        if outages.len() != TRIES {
            bail!("{} outages measured, not {TRIES}: {line}", outages.len());
        }
        Ok(outages)
    })();
    rabbitmq::delete(&queue);
    result
}

/// One SIGTERM round: ms from the signal to the exit.
fn measure_sigterm(bench: &super::Bench) -> Result<f64> {
    use std::io::BufRead as _;
    let queue = rabbitmq::unique_queue("sigterm");
    rabbitmq::declare(&queue)?;
    let result = (|| {
        bench.worker(
            &["rabbitmq-publish-raw", &queue, &BACKLOG.to_string()],
            Duration::from_secs(120),
        )?;
        let mut child = Command::new(&bench.exe)
            .args(["bench-worker", "rabbitmq-sigterm", &queue])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("could not start the SIGTERM worker")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let outcome = (|| {
            let line = lines.recv_timeout(Duration::from_secs(60)).context("never 64 in flight")?;
            if !line.contains("in_flight") {
                bail!("the worker printed {line:?}");
            }
            let signalled = Instant::now();
            super::signal::terminate(child.id())?;
            let status = loop {
                if let Some(status) = child.try_wait()? {
                    break status;
                }
                if signalled.elapsed() > Duration::from_secs(60) {
                    bail!("no exit within 60 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let exit = signalled.elapsed();
            if !status.success() {
                bail!("the worker exited with {status}");
            }
            let line = lines.recv_timeout(Duration::from_secs(5)).context("no handled count")?;
            let value: serde_json::Value = serde_json::from_str(&line)?;
            let handled = value["handled"].as_u64().context("no handled count")? as usize;
            // The broker requeues what the closed connection held unacked: wait for it.
            let mut left = rabbitmq::depth(&queue)? as usize;
            let counted = Instant::now();
            while handled + left != BACKLOG && counted.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
                left = rabbitmq::depth(&queue)? as usize;
            }
            if handled + left != BACKLOG {
                bail!("{handled} handled and acked + {left} left in the queue ≠ {BACKLOG}");
            }
            println!("    exit {exit:.0?} after SIGTERM; {handled} handled, {left} left queued");
            Ok(exit.as_secs_f64() * 1e3)
        })();
        if outcome.is_err() {
            let _ = child.kill();
        }
        let _ = child.wait();
        outcome
    })();
    rabbitmq::delete(&queue);
    result
}
