//! Helpers for the tests against the local RabbitMQ broker.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::process::Command;
use std::time::Duration;

use steward_core::testkit::unique_name;
use steward_core::{Delivery, MessageSource};
use steward_rabbitmq::{RabbitMq, RabbitMqBuilder, RabbitMqSource};
use tokio::time::Instant;

/// A generous bound for things that happen "within seconds" on a real broker.
pub const PROMPTLY: Duration = Duration::from_secs(30);

/// Returns from the test (after one skip line) when the broker is not reachable; see
/// [`broker_available`].
#[allow(unused_macros)]
macro_rules! require_broker {
    ($test:literal) => {
        if !$crate::support::broker_available($test).await {
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_broker;

/// An Updater's connect function: a new source of `queue` on `rabbit` at each start.
pub fn connector(
    rabbit: &RabbitMq,
    queue: &str,
) -> impl Fn() -> std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<RabbitMqSource, steward_core::TransportError>>
            + Send,
    >,
> + Send
+ Sync
+ 'static {
    let (rabbit, queue) = (rabbit.clone(), queue.to_owned());
    move || {
        let (rabbit, queue) = (rabbit.clone(), queue.clone());
        Box::pin(async move { rabbit.source(&queue).await })
    }
}

/// Receives until `n` deliveries arrived or `within` passed.
pub async fn receive_n(source: &RabbitMqSource, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        let wait = (deadline - Instant::now()).min(Duration::from_secs(1));
        got.extend(source.receive(n - got.len(), wait).await.unwrap());
    }
    got
}

/// The broker the tests use: `STEWARD_RABBITMQ_URL`, else the local default.
pub fn broker_url() -> String {
    std::env::var("STEWARD_RABBITMQ_URL")
        .unwrap_or_else(|_| steward_rabbitmq::DEFAULT_URL.to_owned())
}

/// Whether the broker accepts TCP connections. With `CI=true` an unreachable broker
/// fails the test; otherwise the test prints one skip line and returns.
pub async fn broker_available(test: &str) -> bool {
    steward_core::testkit::service_available(test, "RabbitMQ", &broker_address()).await
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
    steward_core::testkit::clean_up_blocking(rabbits, |rabbit| async move {
        rabbit.delete_topology().await
    });
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

/// The activity status of each consumer of `queue` as the broker reports it
/// (`single_active` or `waiting` on a queue with a single active consumer, `up`
/// otherwise), sorted.
pub fn consumer_activity(queue: &str) -> Vec<String> {
    let mut activity: Vec<String> = rabbitmqctl(&[
        "-q",
        "list_consumers",
        "--no-table-headers",
        "queue_name",
        "activity_status",
    ])
    .lines()
    .filter_map(|line| line.split_once('\t'))
    .filter(|(name, _)| *name == queue)
    .map(|(_, status)| status.trim().to_owned())
    .collect();
    activity.sort();
    activity
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
        url_via(&self.address)
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

/// [`broker_url`] with its `host:port` replaced by `address`.
fn url_via(address: &str) -> String {
    let url = broker_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let userinfo = authority.rsplit_once('@').map_or(String::new(), |(u, _)| format!("{u}@"));
    format!("{scheme}://{userinfo}{address}/{path}")
}

/// A TCP proxy to the broker that coalesces publisher confirms: it holds back the
/// `basic.ack`s of a channel until every publish the client sent on that channel so far
/// is acked, then sends one `basic.ack` with `multiple = true` for all of them.
/// Everything else passes through as it comes, returned (unroutable) messages at once.
///
/// A broker may coalesce confirms like this at any time; this proxy makes it happen
/// every time several publishes wait on one channel, deterministically (no timers).
pub struct CoalescingProxy {
    /// `host:port` to connect to instead of the broker.
    pub address: String,
    task: tokio::task::JoinHandle<()>,
}

/// AMQP 0-9-1 frame types and the methods the proxy looks at: (class, method).
mod amqp {
    pub const METHOD_FRAME: u8 = 1;
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
    pub const BASIC_PUBLISH: (u16, u16) = (60, 40);
    pub const BASIC_RETURN: (u16, u16) = (60, 50);
    pub const BASIC_ACK: (u16, u16) = (60, 80);
    pub const FRAME_END: u8 = 0xCE;
}

/// One AMQP frame: type, channel, payload (as read, header and frame end included).
struct Frame(Vec<u8>);

impl Frame {
    async fn read(from: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Self> {
        use tokio::io::AsyncReadExt;
        let mut bytes = vec![0u8; 7];
        from.read_exact(&mut bytes).await.ok()?;
        let size = u32::from_be_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]) as usize;
        bytes.resize(7 + size + 1, 0);
        from.read_exact(&mut bytes[7..]).await.ok()?;
        Some(Self(bytes))
    }

    fn channel(&self) -> u16 {
        u16::from_be_bytes([self.0[1], self.0[2]])
    }

    /// (class, method) of a method frame.
    fn method(&self) -> Option<(u16, u16)> {
        (self.0[0] == amqp::METHOD_FRAME && self.0.len() >= 12).then(|| {
            let class = u16::from_be_bytes([self.0[7], self.0[8]]);
            let method = u16::from_be_bytes([self.0[9], self.0[10]]);
            (class, method)
        })
    }

    /// The delivery tag of a `basic.ack`.
    fn ack_tag(&self) -> u64 {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&self.0[11..19]);
        u64::from_be_bytes(tag)
    }

    /// A `basic.ack` of every publish up to `tag` on `channel`.
    fn ack_multiple(channel: u16, tag: u64) -> Self {
        let mut bytes = vec![amqp::METHOD_FRAME];
        bytes.extend_from_slice(&channel.to_be_bytes());
        bytes.extend_from_slice(&13u32.to_be_bytes());
        bytes.extend_from_slice(&amqp::BASIC_ACK.0.to_be_bytes());
        bytes.extend_from_slice(&amqp::BASIC_ACK.1.to_be_bytes());
        bytes.extend_from_slice(&tag.to_be_bytes());
        bytes.push(1); // multiple
        bytes.push(amqp::FRAME_END);
        Self(bytes)
    }
}

type Published = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u16, u64>>>;

impl CoalescingProxy {
    /// Starts a proxy in front of the broker of [`broker_url`].
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let upstream = broker_address();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                // Frames are forwarded one by one: do not let Nagle hold them back.
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let published = Published::default();
                tokio::spawn(count_publishes(client_read, server_write, published.clone()));
                tokio::spawn(coalesce_acks(server_read, client_write, published));
            }
        });
        Self { address, task }
    }

    /// The broker URL through this proxy.
    pub fn url(&self) -> String {
        url_via(&self.address)
    }
}

impl Drop for CoalescingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Client to broker: forwards everything, counting the publishes of each channel (a
/// publish is counted before the broker can see it, so before it can be acked).
async fn count_publishes(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    published: Published,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut protocol_header = [0u8; 8];
    if from.read_exact(&mut protocol_header).await.is_err()
        || to.write_all(&protocol_header).await.is_err()
    {
        return;
    }
    while let Some(frame) = Frame::read(&mut from).await {
        match frame.method() {
            Some(amqp::CHANNEL_OPEN) => {
                published.lock().unwrap().insert(frame.channel(), 0);
            }
            Some(amqp::BASIC_PUBLISH) => {
                *published.lock().unwrap().entry(frame.channel()).or_default() += 1;
            }
            _ => {}
        }
        if to.write_all(&frame.0).await.is_err() {
            return;
        }
    }
}

/// Broker to client: holds a channel's acks until all its publishes so far are acked,
/// then sends one ack with `multiple = true`; a returned message passes at once, any
/// other frame of the channel first releases the acks held for it.
async fn coalesce_acks(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    published: Published,
) {
    use tokio::io::AsyncWriteExt;
    const CONTENT_HEADER: u8 = 2;
    const CONTENT_BODY: u8 = 3;
    let mut held: std::collections::HashMap<u16, u64> = std::collections::HashMap::new();
    while let Some(frame) = Frame::read(&mut from).await {
        let channel = frame.channel();
        let mut out = Vec::new();
        match frame.method() {
            Some(amqp::BASIC_ACK) => {
                let tag = held.get(&channel).copied().unwrap_or(0).max(frame.ack_tag());
                let sent = published.lock().unwrap().get(&channel).copied().unwrap_or(0);
                if tag >= sent {
                    held.remove(&channel);
                    out.push(Frame::ack_multiple(channel, tag));
                } else {
                    held.insert(channel, tag);
                }
            }
            Some(amqp::BASIC_RETURN) => out.push(frame),
            _ if matches!(frame.0[0], CONTENT_HEADER | CONTENT_BODY) => out.push(frame),
            _ => {
                if let Some(tag) = held.remove(&channel) {
                    out.push(Frame::ack_multiple(channel, tag));
                }
                out.push(frame);
            }
        }
        for frame in out {
            if to.write_all(&frame.0).await.is_err() {
                return;
            }
        }
    }
}

/// `host:port` of the broker of [`broker_url`].
pub fn broker_address() -> String {
    let url = broker_url();
    let authority = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("127.0.0.1:5672");
    if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5672") }
}
