//! Graceful shutdown against the local RabbitMQ broker: settlements made after
//! `stop_receiving` requeued a full buffer reach the quorum queue before the
//! connection closes.
//!
//! Without a reachable broker the test prints one skip line and passes, unless
//! `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use steward_core::{MessageSink, MessageSource, OutgoingMessage};
use tokio::time::Instant;

/// Ensures that deliveries completed right after `stop_receiving` requeued many
/// buffered messages stay completed when the connection closes at once (a graceful
/// shutdown): a new consumer gets exactly the requeued messages, not the completed
/// ones (RabbitMQ's quorum queue client holds back settlements after a burst of
/// requeues and drops them with the channel, rabbitmq-server#10327).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_after_stop_receiving_survive_the_connection_close() {
    if !support::broker_available("completions_after_stop_receiving_survive_the_connection_close")
        .await
    {
        return;
    }
    const SENT: usize = 80;
    const HANDLED: usize = 10;
    // Rounds, because the broker drops held-back settlements only some of the time.
    for round in 0..5 {
        let queue = support::TestQueue::declare("shutdown-acks", |b| b).await;
        let sink = queue.rabbit.sink();
        for i in 0..SENT {
            let message =
                OutgoingMessage::json(format!("{{\"n\":{i}}}")).with_message_id(format!("m-{i}"));
            sink.send(&queue.name, message).await.unwrap();
        }
        let source = queue.rabbit.source(&queue.name).await.unwrap();
        let mut handled = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while handled.len() < HANDLED && Instant::now() < deadline {
            let more = source.receive(HANDLED - handled.len(), Duration::from_secs(1));
            handled.extend(more.await.unwrap());
        }
        assert_eq!(handled.len(), HANDLED, "round {round}");
        let completed: BTreeSet<String> = handled.iter().map(|d| d.message().id.clone()).collect();
        source.stop_receiving().await.unwrap();
        for delivery in handled {
            delivery.complete().await.unwrap();
        }
        drop(source);

        let next = queue.rabbit.source(&queue.name).await.unwrap();
        let mut rest = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while rest.len() < SENT - HANDLED && Instant::now() < deadline {
            for delivery in next.receive(SENT, Duration::from_secs(1)).await.unwrap() {
                rest.insert(delivery.message().id.clone());
                delivery.complete().await.unwrap();
            }
        }
        // Anything completed that comes back would arrive with the others.
        for delivery in next.receive(SENT, Duration::from_secs(1)).await.unwrap() {
            rest.insert(delivery.message().id.clone());
            delivery.complete().await.unwrap();
        }
        let again: Vec<_> = rest.intersection(&completed).collect();
        assert!(again.is_empty(), "round {round}: completed messages came back: {again:?}");
        assert_eq!(rest.len(), SENT - HANDLED, "round {round}: the requeued messages");
        next.stop_receiving().await.unwrap();
    }
}
