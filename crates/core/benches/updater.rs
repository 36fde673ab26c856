//! Throughput and latency of the Updater under a Supervisor on the in-memory broker,
//! as ratios against a hand-written receive/complete loop measured in the same run.
//!
//! Run through `cargo xtask bench` (release build); prints one JSON object per line:
//! `{"name": ..., "unit": ..., "value": ..., "baseline": ..., "ratio": ...}`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use steward_core::{
    MessageSink, MessageSource, Outcome, OutgoingMessage, Supervisor, SupervisorConfig, Updater,
    UpdaterConfig, handler_fn,
};
use steward_inmem::InMemoryBroker;
use tokio::sync::Notify;
use tokio::time::Instant;

const MESSAGES: usize = 20_000;
const LATENCY_MESSAGES: usize = 2_000;
const ROUNDS: usize = 3;

fn config() -> UpdaterConfig {
    UpdaterConfig::default()
        .with_concurrency(8)
        .with_batch_size(16)
        .with_wait(Duration::from_millis(100))
}

async fn fill(broker: &InMemoryBroker, queue: &str, n: usize) {
    for i in 0..n {
        broker.send(queue, OutgoingMessage::new(format!("{i}"))).await.expect("send");
    }
}

/// Messages per second of a plain loop: receive a batch, complete each.
async fn baseline_throughput() -> f64 {
    let broker = InMemoryBroker::new();
    fill(&broker, "q", MESSAGES).await;
    let source = broker.source("q").expect("source");
    let started = Instant::now();
    let mut done = 0;
    while done < MESSAGES {
        for delivery in source.receive(16, Duration::from_millis(100)).await.expect("receive") {
            delivery.complete().await.expect("complete");
            done += 1;
        }
    }
    MESSAGES as f64 / started.elapsed().as_secs_f64()
}

/// Messages per second through an Updater with a no-op handler.
async fn updater_throughput() -> f64 {
    let broker = InMemoryBroker::new();
    fill(&broker, "q", MESSAGES).await;
    let count = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(Notify::new());
    let handler = {
        let (count, finished) = (count.clone(), finished.clone());
        handler_fn(move |_| {
            if count.fetch_add(1, Ordering::Relaxed) + 1 == MESSAGES {
                finished.notify_one();
            }
            async { Outcome::Complete }
        })
    };
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let started = Instant::now();
    supervisor.spawn(
        Updater::with_source("bench", broker.source("q").expect("source"), handler)
            .with_config(config()),
    );
    finished.notified().await;
    // Completions lag the last handler by at most one settlement.
    while broker.message_count("q") > 0 {
        tokio::task::yield_now().await;
    }
    let elapsed = started.elapsed();
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    MESSAGES as f64 / elapsed.as_secs_f64()
}

fn now_micros() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

/// Sends timestamped messages at a steady pace while `consume` runs; returns the median
/// and 99th percentile of send-to-handler latency in microseconds.
async fn latency(broker: InMemoryBroker, latencies: Arc<Mutex<Vec<u128>>>) -> (f64, f64) {
    for _ in 0..LATENCY_MESSAGES {
        broker.send("q", OutgoingMessage::new(now_micros().to_string())).await.expect("send");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    while latencies.lock().expect("lock").len() < LATENCY_MESSAGES {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut values = latencies.lock().expect("lock").clone();
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q) as usize] as f64;
    (at(0.5), at(0.99))
}

fn record(latencies: &Mutex<Vec<u128>>, body: &[u8]) {
    let sent: u128 = std::str::from_utf8(body).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    latencies.lock().expect("lock").push(now_micros().saturating_sub(sent));
}

async fn baseline_latency() -> (f64, f64) {
    let broker = InMemoryBroker::new();
    let latencies: Arc<Mutex<Vec<u128>>> = Arc::default();
    let source = broker.source("q").expect("source");
    let consumer = {
        let latencies = latencies.clone();
        tokio::spawn(async move {
            loop {
                for delivery in
                    source.receive(16, Duration::from_millis(100)).await.expect("receive")
                {
                    record(&latencies, &delivery.message().body);
                    delivery.complete().await.expect("complete");
                }
            }
        })
    };
    let result = latency(broker, latencies).await;
    consumer.abort();
    result
}

async fn updater_latency() -> (f64, f64) {
    let broker = InMemoryBroker::new();
    let latencies: Arc<Mutex<Vec<u128>>> = Arc::default();
    let handler = {
        let latencies = latencies.clone();
        handler_fn(move |message| {
            record(&latencies, &message.body);
            async { Outcome::Complete }
        })
    };
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(
        Updater::with_source("bench", broker.source("q").expect("source"), handler)
            .with_config(config()),
    );
    let result = latency(broker, latencies).await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    result
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn report(name: &str, unit: &str, value: f64, baseline: f64) {
    println!(
        "{{\"name\":\"{name}\",\"unit\":\"{unit}\",\"value\":{value:.1},\"baseline\":{baseline:.1},\"ratio\":{:.3}}}",
        value / baseline
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut base = Vec::new();
        let mut updater = Vec::new();
        for _ in 0..ROUNDS {
            base.push(baseline_throughput().await);
            updater.push(updater_throughput().await);
        }
        report("updater_throughput", "msg/s", median(updater), median(base));

        let mut base50 = Vec::new();
        let mut base99 = Vec::new();
        let mut up50 = Vec::new();
        let mut up99 = Vec::new();
        for _ in 0..ROUNDS {
            let (p50, p99) = baseline_latency().await;
            base50.push(p50);
            base99.push(p99);
            let (p50, p99) = updater_latency().await;
            up50.push(p50);
            up99.push(p99);
        }
        report("updater_latency_p50", "us", median(up50), median(base50));
        report("updater_latency_p99", "us", median(up99), median(base99));
    });
}
