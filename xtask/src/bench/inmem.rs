//! In memory: the Updater with a no-op handler against tokio mpsc plus the same number of
//! tasks, both moving the same preloaded messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use steward_core::{
    MessageSink, Outcome, OutgoingMessage, Supervisor, SupervisorConfig, Updater, UpdaterConfig,
    handler_fn,
};
use steward_inmem::InMemoryBroker;
use tokio::sync::{Notify, mpsc};

use super::worker::{Sample, Window};

fn body(i: usize) -> String {
    format!("{i}")
}

/// The Updater at `concurrency` on `count` messages preloaded into the in-memory broker.
pub(crate) async fn updater(count: usize, concurrency: usize) -> Result<Sample> {
    let broker = InMemoryBroker::new();
    for i in 0..count {
        broker.send("q", OutgoingMessage::new(body(i))).await.context("preloading")?;
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(Notify::new());
    let handler = {
        let (handled, finished) = (handled.clone(), finished.clone());
        handler_fn(move |_| {
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == count {
                finished.notify_one();
            }
            async { Outcome::Complete }
        })
    };
    let source = broker.source("q").context("in-memory source")?;
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let window = Window::start();
    supervisor.spawn(Updater::with_source("bench", source, handler).with_config(
        UpdaterConfig::default().with_concurrency(concurrency).with_batch_size(64.max(concurrency)),
    ));
    finished.notified().await;
    // Every message settled, not only handled.
    while broker.message_count("q") > 0 {
        tokio::task::yield_now().await;
    }
    let sample = window.finish(count);
    let _ = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    Ok(sample)
}

/// The baseline: `count` messages preloaded into one tokio mpsc channel, a dispatcher
/// handing them round-robin to `concurrency` tasks over their own channels.
pub(crate) async fn mpsc(count: usize, concurrency: usize) -> Result<Sample> {
    let (sender, mut receiver) = mpsc::unbounded_channel::<OutgoingMessage>();
    for i in 0..count {
        sender.send(OutgoingMessage::new(body(i))).context("preloading")?;
    }
    drop(sender);
    let window = Window::start();
    let mut workers = Vec::with_capacity(concurrency);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (sender, mut inbox) = mpsc::channel::<OutgoingMessage>(64);
        workers.push(sender);
        tasks.push(tokio::spawn(async move {
            let mut handled = 0usize;
            while let Some(message) = inbox.recv().await {
                std::hint::black_box(&message);
                handled += 1;
            }
            handled
        }));
    }
    let mut next = 0;
    while let Some(message) = receiver.recv().await {
        workers[next].send(message).await.context("a baseline task stopped")?;
        next = (next + 1) % concurrency;
    }
    drop(workers);
    let mut handled = 0;
    for task in tasks {
        handled += task.await.context("a baseline task panicked")?;
    }
    anyhow::ensure!(handled == count, "the baseline moved {handled} of {count} messages");
    Ok(window.finish(count))
}

/// The in-memory figures: Updater and mpsc baseline at concurrency 1, 8 and 64, rounds
/// interleaved so both see the same machine load.
pub(super) fn bench(bench: &super::Bench, report: &mut super::Report) {
    let count = if bench.quick { 200_000 } else { 1_000_000 };
    let limit = Duration::from_secs(if bench.quick { 60 } else { 300 });
    for concurrency in [1, 8, 64] {
        let (n, c) = (count.to_string(), concurrency.to_string());
        let mut updater = Vec::new();
        let mut baseline = Vec::new();
        let mut failure = None;
        for round in 0..super::ROUNDS {
            println!("inmem: concurrency {concurrency}, round {}", round + 1);
            match bench.worker(&["inmem-updater", &n, &c], limit) {
                Ok(sample) => updater.push(sample),
                Err(error) => failure = Some(format!("{error:#}")),
            }
            match bench.worker(&["inmem-mpsc", &n, &c], limit) {
                Ok(sample) => baseline.push(sample),
                Err(error) => failure = Some(format!("{error:#}")),
            }
        }
        for (key, samples) in [("updater", &updater), ("mpsc", &baseline)] {
            let key = format!("inmem.{key}.c{concurrency}");
            if samples.is_empty() {
                let reason = failure.clone().unwrap_or_default();
                report.missing(&format!("{key}.rate"), "msg/s", reason);
            } else {
                report.samples(&key, samples);
            }
        }
        report.ratio(
            &format!("inmem.updater.c{concurrency}.rate"),
            &format!("inmem.mpsc.c{concurrency}.rate"),
        );
    }
}
