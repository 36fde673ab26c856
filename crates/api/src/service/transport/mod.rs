//! The message transports the service can run on, one file each in this folder, chosen
//! by `STEWARD_TRANSPORT` among those compiled in.
//!
//! A transport is a file `<name>.rs` here, compiled in by the cargo feature `<name>`:
//! the build script finds the files, so adding a transport changes nothing else under
//! `src/`. The file defines a `Settings` struct, its own flags and environment
//! variables (a [`clap::Args`] flattened into the service's
//! [`Config`](super::Config)), implementing [`OpenTransport`]; what it opens
//! implements [`Transport`]: a source per consuming worker, one sink, a check at start
//! and by the watcher, and what to hand back at shutdown.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use steward_core::{
    Connect, DeadLetterQueues, Message, MessageSink, MessageSource, TransportError,
};

/// For a broker client `$client` that opens sources and sinks and declares its
/// topology itself (RabbitMQ, NATS): declares `$name`, its [`Transport`] (the check
/// declares the queues, checking those that exist), and implements [`OpenTransport`] for
/// the file's `Settings`, with `$builder` (where `$settings` is the `Settings`, and
/// `$topology`, when named, the [`Topology`]) given the service's connection name,
/// delivery limit and queues.
#[allow(unused_macros, reason = "used only by the transports compiled in")]
macro_rules! broker_transport {
    ($name:ident($client:ty), |$settings:ident| $builder:expr $(, dead_letters: |$client_ref:ident| $dead_letters:expr)?) => {
        broker_transport!($name($client), |$settings, _topology| $builder $(, dead_letters: |$client_ref| $dead_letters)?);
    };
    ($name:ident($client:ty), |$settings:ident, $topology:ident| $builder:expr $(, dead_letters: |$client_ref:ident| $dead_letters:expr)?) => {
        impl super::OpenTransport for Settings {
            fn open(
                &self,
                topology: &super::Topology,
            ) -> Result<Arc<dyn super::Transport>, steward_core::BoxError> {
                let $settings = self;
                let $topology = topology;
                let builder = $builder
                    .with_connection_name("steward-api")
                    .with_max_deliveries(topology.max_deliveries);
                let builder = topology.consumed.iter().fold(builder, |b, q| b.with_queue(q));
                let builder =
                    topology.published.iter().fold(builder, |b, q| b.with_publish_queue(q));
                Ok(Arc::new($name(builder.build()?)))
            }
        }

        #[derive(Debug)]
        struct $name($client);

        #[async_trait::async_trait]
        impl super::Transport for $name {
            async fn source(
                &self,
                queue: &str,
            ) -> Result<Arc<dyn steward_core::MessageSource>, steward_core::TransportError> {
                Ok(Arc::new(self.0.source(queue).await?))
            }

            fn sink(&self) -> Arc<dyn steward_core::MessageSink> {
                Arc::new(self.0.sink())
            }

            /// Declares the topology, checking what exists.
            async fn check(&self) -> Result<(), steward_core::TransportError> {
                self.0.declare_topology().await
            }

            $(
                fn dead_letter_queues(&self) -> Option<Arc<dyn steward_core::DeadLetterQueues>> {
                    let $client_ref = &self.0;
                    Some(Arc::new($dead_letters))
                }
            )?
        }
    };
}

include!(concat!(env!("OUT_DIR"), "/transports.rs"));

/// The queues the service uses, for transports that declare or probe them.
#[derive(Debug, Clone, Default)]
#[allow(
    dead_code,
    reason = "each transport reads what it needs: a build without some leaves parts unread"
)]
pub(crate) struct Topology {
    /// The queues workers of this process consume.
    pub(crate) consumed: Vec<String>,
    /// The queues the service publishes to.
    pub(crate) published: Vec<String>,
    /// Deliveries after which a message is dead-lettered.
    pub(crate) max_deliveries: u32,
    /// The consumed queues whose messages must be handled in order across replicas
    /// (the two status queues): a transport that can gives them one consumer at a time.
    pub(crate) ordered: Vec<String>,
}

impl Topology {
    /// Every queue, consumed or published, each once, in that order.
    #[allow(
        dead_code,
        reason = "each transport reads what it needs: a build without some leaves parts unread"
    )]
    pub(crate) fn queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = Vec::new();
        for queue in self.consumed.iter().chain(&self.published) {
            if !queues.contains(queue) {
                queues.push(queue.clone());
            }
        }
        queues
    }
}

/// A transport's own settings, and how they build it: what each transport file
/// provides, as its `Settings`, a `#[derive(clap::Args)]` with `#[group(skip)]` (every
/// transport's flags sit side by side in the service's command line).
pub(crate) trait OpenTransport:
    clap::Args + clap::FromArgMatches + Clone + fmt::Debug + Send + Sync + 'static
{
    /// Whether the broker runs inside this process. Then the simulated processors run
    /// by default: nothing else would answer.
    const IN_PROCESS: bool = false;

    /// Builds the transport over `topology`. An unreachable broker is no error here:
    /// [`Transport::check`] and the workers find out, and back off.
    ///
    /// # Errors
    ///
    /// The settings are invalid.
    fn open(&self, topology: &Topology) -> Result<Arc<dyn Transport>, steward_core::BoxError>;
}

/// A message transport, as the service uses it.
#[async_trait]
pub(crate) trait Transport: fmt::Debug + Send + Sync + 'static {
    /// Opens a source of `queue`: on every (re)start of the worker that consumes it.
    ///
    /// # Errors
    ///
    /// The broker cannot be reached (retryable) or refuses the queue.
    async fn source(&self, queue: &str) -> Result<Arc<dyn MessageSource>, TransportError>;

    /// The sink every outbound message goes through.
    fn sink(&self) -> Arc<dyn MessageSink>;

    /// The largest message the sink accepts, whole, when known at start (see
    /// [`Capabilities::max_body_bytes`](steward_core::Capabilities::max_body_bytes)).
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }

    /// Checks that the broker answers and the topology is right (declaring it where the
    /// transport can): once at start, then by the transport watcher.
    ///
    /// # Errors
    ///
    /// Retryable errors while the broker is unreachable; others (credentials, a queue
    /// with other settings) need a human.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    async fn check(&self) -> Result<(), TransportError>;

    /// The broker's dead-letter queues, for the operator routes, where the transport
    /// has them.
    fn dead_letter_queues(&self) -> Option<Arc<dyn DeadLetterQueues>> {
        None
    }

    /// At shutdown, once the workers stopped: the messages still queued that would be
    /// lost with the process, by queue. The service saves them to the outbox, so the
    /// next start sends them again. Only an in-process broker has any.
    fn take_queued(&self) -> Vec<(String, Message)> {
        Vec::new()
    }
}

/// Why the transport cannot be set up: bad configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportConfigError {
    /// The transport was not compiled into this build.
    #[error(
        "transport {transport} is not compiled in: rebuild with `--features {transport}` (this build has: {available})"
    )]
    NotCompiledIn {
        /// The transport asked for; its cargo feature has the same name.
        transport: String,
        /// The transports this build has.
        available: String,
    },
    /// Several transports are compiled in, none runs in process, and none was chosen.
    #[error("this build has several transports ({available}): choose one with STEWARD_TRANSPORT")]
    NotChosen {
        /// The transports this build has.
        available: String,
    },
    /// The transport's own settings are wrong.
    #[error("invalid {transport} settings")]
    Invalid {
        /// The transport.
        transport: String,
        /// What is wrong.
        #[source]
        source: steward_core::BoxError,
    },
}

impl TransportOptions {
    /// The transport in effect: `requested`, else the only one compiled in, else the
    /// one whose broker runs in process.
    ///
    /// # Errors
    ///
    /// `requested` is not compiled in, or nothing is requested and there is no default.
    pub(crate) fn resolve(
        &self,
        requested: Option<&str>,
    ) -> Result<&'static str, TransportConfigError> {
        let available = || COMPILED_IN.join(", ");
        match requested {
            Some(name) => {
                COMPILED_IN.iter().copied().find(|known| *known == name).ok_or_else(|| {
                    TransportConfigError::NotCompiledIn {
                        transport: name.to_owned(),
                        available: available(),
                    }
                })
            }
            None => match COMPILED_IN {
                [only] => Ok(only),
                _ => COMPILED_IN
                    .iter()
                    .copied()
                    .find(|name| self.in_process_named(name) == Some(true))
                    .ok_or_else(|| TransportConfigError::NotChosen { available: available() }),
            },
        }
    }

    /// Whether the broker of `name` runs inside this process.
    pub(crate) fn in_process(&self, name: &str) -> bool {
        self.in_process_named(name).unwrap_or(false)
    }

    /// Builds transport `name` (see [`resolve`](Self::resolve)) over `topology`.
    ///
    /// # Errors
    ///
    /// The transport is not compiled in, or its settings are invalid.
    pub(crate) fn open(
        &self,
        name: &'static str,
        topology: &Topology,
    ) -> Result<TransportHandle, TransportConfigError> {
        match self.open_named(name, topology) {
            Some(Ok(transport)) => Ok(TransportHandle { name, transport }),
            Some(Err(source)) => {
                Err(TransportConfigError::Invalid { transport: name.to_owned(), source })
            }
            None => Err(TransportConfigError::NotCompiledIn {
                transport: name.to_owned(),
                available: COMPILED_IN.join(", "),
            }),
        }
    }
}

/// The transport the service runs on, with its name: cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct TransportHandle {
    name: &'static str,
    transport: Arc<dyn Transport>,
}

impl TransportHandle {
    /// The transport's name (`STEWARD_TRANSPORT`).
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The sink every outbound message goes through.
    pub(crate) fn sink(&self) -> Arc<dyn MessageSink> {
        self.transport.sink()
    }

    /// See [`Transport::max_message_bytes`].
    pub(crate) fn max_message_bytes(&self) -> Option<usize> {
        self.transport.max_message_bytes()
    }

    /// A [`Connect`] opening a new source of `queue` on every worker (re)start.
    pub(crate) fn connect(&self, queue: &str) -> impl Connect + use<> {
        QueueSource { transport: self.transport.clone(), queue: queue.to_owned() }
    }

    /// See [`Transport::dead_letter_queues`].
    pub(crate) fn dead_letter_queues(&self) -> Option<Arc<dyn DeadLetterQueues>> {
        self.transport.dead_letter_queues()
    }

    /// See [`Transport::check`].
    pub(crate) async fn check(&self) -> Result<(), TransportError> {
        self.transport.check().await
    }

    /// See [`Transport::take_queued`].
    pub(crate) fn take_queued(&self) -> Vec<(String, Message)> {
        self.transport.take_queued()
    }
}

/// Opens `queue` on the transport, for one updater.
struct QueueSource {
    transport: Arc<dyn Transport>,
    queue: String,
}

#[async_trait]
impl Connect for QueueSource {
    async fn connect(&self) -> Result<Arc<dyn MessageSource>, TransportError> {
        self.transport.source(&self.queue).await
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, Command, FromArgMatches};

    use super::*;

    fn options() -> TransportOptions {
        let matches =
            TransportOptions::augment_args(Command::new("test")).get_matches_from(["test"]);
        TransportOptions::from_arg_matches(&matches).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn every_compiled_in_transport_resolves_and_the_others_name_their_feature() {
        let options = options();
        assert!(!COMPILED_IN.is_empty());
        for name in COMPILED_IN {
            assert!(KNOWN.contains(name), "{name}");
            assert_eq!(options.resolve(Some(name)).ok(), Some(*name));
        }
        // A name with a '-' can never be a transport's file (build.rs refuses it), so it
        // stays unknown whatever transports are added.
        let missing =
            KNOWN.iter().filter(|name| !COMPILED_IN.contains(name)).chain(&["no-such-transport"]);
        for name in missing {
            let error = options.resolve(Some(name)).unwrap_err();
            assert!(matches!(error, TransportConfigError::NotCompiledIn { .. }), "{error}");
            assert!(error.to_string().contains(&format!("--features {name}")), "{error}");
        }
    }

    #[test]
    fn the_default_is_the_only_transport_else_the_in_process_one() {
        let options = options();
        let in_process: Vec<&str> =
            COMPILED_IN.iter().copied().filter(|name| options.in_process(name)).collect();
        match (COMPILED_IN, in_process.as_slice()) {
            ([only], _) => assert_eq!(options.resolve(None).ok(), Some(*only)),
            (_, [local, ..]) => assert_eq!(options.resolve(None).ok(), Some(*local)),
            _ => assert!(matches!(
                options.resolve(None),
                Err(TransportConfigError::NotChosen { .. })
            )),
        }
    }

    #[test]
    fn the_queues_are_the_consumed_then_the_published_each_once() {
        let topology = Topology {
            consumed: vec!["a".to_owned(), "b".to_owned(), "c".to_owned()],
            published: vec!["c".to_owned(), "d".to_owned(), "a".to_owned()],
            max_deliveries: 10,
            ordered: Vec::new(),
        };
        assert_eq!(topology.queues(), ["a", "b", "c", "d"]);
    }
}
