//! Helpers for the tests against NATS: the shared local server, and private servers a
//! test starts and stops itself.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use steward_core::testkit::unique_name;
use steward_nats::{Nats, NatsBuilder};

/// The lock of the test queues: short, because lock-expiry cases wait for it.
pub const ACK_WAIT: Duration = Duration::from_secs(3);

/// The server the tests use: `STEWARD_NATS_URL`, else the local default.
pub fn server_url() -> String {
    std::env::var("STEWARD_NATS_URL").unwrap_or_else(|_| steward_nats::DEFAULT_URL.to_owned())
}

fn address(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split(',').next().unwrap_or(rest).to_owned()
}

/// Whether the server accepts TCP connections. With `CI=true` an unreachable server
/// fails the test; otherwise the test prints one skip line and returns.
pub async fn server_available(test: &str) -> bool {
    steward_core::testkit::service_available(test, "NATS", &address(&server_url())).await
}

/// A builder for a uniquely named queue on `url`, with the short test lock.
pub fn unique_queue(url: &str, prefix: &str) -> (String, NatsBuilder) {
    let queue = unique_name(prefix);
    let builder = NatsBuilder::new()
        .with_url(url)
        .with_connection_name("steward-test")
        .with_ack_wait(ACK_WAIT)
        .with_queue(&queue);
    (queue, builder)
}

/// Deletes the streams of `transports` from a thread of its own (for `Drop`).
pub fn delete_topologies(transports: Vec<Nats>) {
    steward_core::testkit::clean_up_blocking(transports, |nats| async move {
        nats.delete_topology().await
    });
}

/// Deletes the durable consumer of `queue` behind the transport's back.
pub async fn delete_consumer(url: &str, nats: &Nats, queue: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(nats.stream_name(queue)).await.unwrap();
    stream.delete_consumer(steward_nats::CONSUMER_NAME).await.unwrap();
}

/// Deletes the dead-letter stream of `queue` behind the transport's back: the copy a
/// dead-letter publishes to `<queue>.dlq` is refused ("no responders").
pub async fn delete_dead_letter_stream(url: &str, nats: &Nats, queue: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.delete_stream(nats.dead_letter_stream_name(queue)).await.unwrap();
}

/// The shared server's URL and a client of it, or `None` (the test skips, saying why)
/// where no server answers or it is older than `major.minor`.
pub async fn client_at_least(
    test: &str,
    version: (u32, u32),
) -> Option<(String, async_nats::Client)> {
    if !server_available(test).await {
        return None;
    }
    let url = server_url();
    let client = async_nats::connect(&url).await.unwrap();
    server_at_least(&client, version, test).then_some((url, client))
}

/// Whether the server `client` is connected to is of release `major.minor` or later;
/// prints one skip line for `test` when not (the setting a test needs does not exist
/// there, and the server ignores it).
pub fn server_at_least(
    client: &async_nats::Client,
    (major, minor): (u32, u32),
    test: &str,
) -> bool {
    let version = client.server_info().version;
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u32>().ok());
    let at_least = match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => true,
    };
    if !at_least {
        eprintln!("skipped {test}: nats-server {version} is older than {major}.{minor}");
    }
    at_least
}

/// The `nats-server` program private servers run: `STEWARD_NATS_SERVER`, else the one on
/// the `PATH`.
pub fn server_program() -> String {
    std::env::var("STEWARD_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned())
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private `nats-server` with JetStream on a free port, killed when dropped.
pub struct PrivateServer {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    /// Its JetStream store, kept across restarts.
    pub store: tempfile::TempDir,
    extra: Vec<String>,
}

impl PrivateServer {
    /// Starts a server with `extra` arguments (say `--user u --pass p`), or returns
    /// `None` (after printing why) when [`server_program`] is not installed and CI is unset.
    pub async fn start(test: &str, extra: &[&str]) -> Option<Self> {
        let program = server_program();
        if Command::new(&program).arg("--version").output().is_err() {
            assert!(
                !std::env::var("CI").is_ok_and(|ci| ci == "true"),
                "{test}: {program} is not installed and CI=true"
            );
            eprintln!("skipped {test}: {program} is not installed");
            return None;
        }
        let mut server = Self {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.spawn().await;
        Some(server)
    }

    /// The URL without credentials.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new(server_program())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the private nats-server did not listen on {} within 5 s", self.port);
    }

    /// Kills the server (its store stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gracefully (SIGTERM, as a service manager does), waiting for it
    /// to exit; its store stays.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status =
                Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
            assert!(status.success(), "kill -TERM the private nats-server");
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deletes the streams of a test's transport when dropped, also when the test fails.
pub struct Cleanup(pub Nats);

impl Drop for Cleanup {
    fn drop(&mut self) {
        delete_topologies(vec![self.0.clone()]);
    }
}

/// A uniquely named queue declared on the shared server, with its transport, whose
/// streams are deleted when this is dropped.
pub struct Declared {
    pub url: String,
    pub queue: String,
    pub nats: Nats,
    pub _cleanup: Cleanup,
}

/// Declares a queue named after `prefix` for test `test`, or `None` (the test skips,
/// as [`server_available`] says) where no server answers.
pub async fn declared(test: &str, prefix: &str) -> Option<Declared> {
    if !server_available(test).await {
        return None;
    }
    let url = server_url();
    let (queue, builder) = unique_queue(&url, prefix);
    let nats = builder.build().unwrap();
    let cleanup = Cleanup(nats.clone());
    nats.declare_topology().await.unwrap();
    Some(Declared { url, queue, nats, _cleanup: cleanup })
}
