//! Helpers for the tests against the local RabbitMQ broker.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::process::Command;
use std::time::Duration;

use steward_core::testkit::unique_name;
use steward_rabbitmq::{RabbitMq, RabbitMqBuilder};

/// The broker the tests use: `STEWARD_RABBITMQ_URL`, else the local default.
pub fn broker_url() -> String {
    std::env::var("STEWARD_RABBITMQ_URL")
        .unwrap_or_else(|_| steward_rabbitmq::DEFAULT_URL.to_owned())
}

/// Whether the broker accepts TCP connections. With `CI=true` an unreachable broker
/// fails the test; otherwise the test prints one skip line and returns.
pub async fn broker_available(test: &str) -> bool {
    let address = broker_address();
    let reachable = matches!(
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(&address))
            .await,
        Ok(Ok(_))
    );
    if !reachable {
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("{test}: RabbitMQ is not reachable at {address} and CI=true");
        }
        eprintln!("skipped {test}: RabbitMQ is not reachable at {address}");
    }
    reachable
}

/// A builder for the test broker without queues: test connection names, queues that
/// expire ten minutes after their last use.
pub fn builder() -> RabbitMqBuilder {
    RabbitMqBuilder::new()
        .with_url(broker_url())
        .with_connection_name("steward-test")
        .with_queue_expiry(Duration::from_secs(600))
}

/// A builder for a uniquely named queue on the test broker; queues expire ten minutes
/// after their last use so test runs do not pile them up.
pub fn unique_queue(prefix: &str) -> (String, RabbitMqBuilder) {
    let queue = unique_name(prefix);
    let builder = builder().with_queue(&queue);
    (queue, builder)
}

/// A uniquely named queue with its topology declared; dropping it deletes the
/// topology again (the queue expiry is only the backstop for killed test processes:
/// every quorum queue holds file handles on the shared broker).
pub struct TestQueue {
    /// The queue name.
    pub name: String,
    /// The transport, configured for this queue.
    pub rabbit: RabbitMq,
}

impl TestQueue {
    /// Declares a new queue; `configure` adjusts the builder first.
    pub async fn declare(
        prefix: &str,
        configure: impl FnOnce(RabbitMqBuilder) -> RabbitMqBuilder,
    ) -> Self {
        let (name, builder) = unique_queue(prefix);
        let rabbit = configure(builder).build().unwrap();
        rabbit.declare_topology().await.unwrap();
        Self { name, rabbit }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        delete_topologies(vec![self.rabbit.clone()]);
    }
}

/// Deletes the topologies of `rabbits`, waiting for it, from a thread of its own (drop
/// handlers cannot await).
pub fn delete_topologies(rabbits: Vec<RabbitMq>) {
    if rabbits.is_empty() {
        return;
    }
    let deleting = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            for rabbit in rabbits {
                if let Err(error) = rabbit.delete_topology().await {
                    eprintln!("cleanup failed: {}", steward_core::error_chain(&error));
                }
            }
        });
    });
    let _ = deleting.join();
}

/// Runs `rabbitmqctl` with `args` and returns its standard output.
fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Erlang pids of the connections whose client properties (the connection name)
/// contain `needle`.
pub fn connections_containing(needle: &str) -> Vec<String> {
    rabbitmqctl(&["-q", "list_connections", "--no-table-headers", "pid", "client_properties"])
        .lines()
        .filter(|line| line.contains(needle))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Closes every connection whose name contains `needle` (a test's own unique queue
/// name) and returns how many it closed. Never touches other connections.
pub async fn close_connections_containing(needle: &str) -> usize {
    let needle = needle.to_owned();
    tokio::task::spawn_blocking(move || {
        let pids = connections_containing(&needle);
        for pid in &pids {
            // A connection may close on its own meanwhile; that is fine.
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "close_connection", pid, "closed by a steward fault test"])
                .output();
        }
        pids.len()
    })
    .await
    .unwrap()
}

/// The messages in `queue`, ready and unacknowledged, as the broker counts them.
pub fn queue_depth(queue: &str) -> Option<u64> {
    rabbitmqctl(&["-q", "list_queues", "--no-table-headers", "name", "messages"])
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, count)| count.trim().parse().ok())
}

/// Waits until the broker counts no message in `queue` (its counters trail a moment
/// behind acks), and returns the last count.
pub async fn wait_until_empty(queue: &str, within: Duration) -> Option<u64> {
    wait_until_depth(queue, 0, within).await
}

/// Waits until the broker counts `depth` messages in `queue`, and returns the last
/// count.
pub async fn wait_until_depth(queue: &str, depth: u64, within: Duration) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let owned = queue.to_owned();
        let now = tokio::task::spawn_blocking(move || queue_depth(&owned)).await.unwrap();
        if now == Some(depth) || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Deletes `queue` on the broker, as an operator would.
pub async fn delete_queue(queue: &str) {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || rabbitmqctl(&["-q", "delete_queue", &queue]))
        .await
        .unwrap();
}

/// A TCP proxy to the broker that can go silent: after [`SilentProxy::freeze`] it
/// forwards nothing in either direction but keeps every socket open, like a network
/// that drops packets.
pub struct SilentProxy {
    /// `host:port` to connect to instead of the broker.
    pub address: String,
    frozen: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentProxy {
    /// Starts a proxy in front of the broker of [`broker_url`].
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let upstream = broker_address();
        let (frozen, _) = tokio::sync::watch::channel(false);
        let watch = frozen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, watch.subscribe()));
                tokio::spawn(pipe(server_read, client_write, watch.subscribe()));
            }
        });
        Self { address, frozen, task }
    }

    /// The broker URL through this proxy.
    pub fn url(&self) -> String {
        let url = broker_url();
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let userinfo = authority.rsplit_once('@').map_or(String::new(), |(u, _)| format!("{u}@"));
        format!("{scheme}://{userinfo}{}/{path}", self.address)
    }

    /// Stops forwarding, keeping the sockets open.
    pub fn freeze(&self) {
        let _ = self.frozen.send(true);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = frozen.wait_for(|f| *f) => break,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if *frozen.borrow() || to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    // Silent: hold both halves open, forwarding nothing, until the test ends.
    let _held = (from, to);
    std::future::pending::<()>().await;
}

/// `host:port` of the broker of [`broker_url`].
pub fn broker_address() -> String {
    let url = broker_url();
    let authority = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("127.0.0.1:5672");
    if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5672") }
}
