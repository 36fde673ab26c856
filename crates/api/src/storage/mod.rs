//! Storage on SQLite or PostgreSQL through sqlx's `Any` driver.
//!
//! A [`Store`] holds the connection pools; [`Store::begin`] opens a [`Tx`], whose
//! methods read and write resources, operations, resource history, airlock requests and
//! the outbox. Everything a request or a message changes goes through one `Tx`, so it
//! commits or rolls back as a whole; dropping a `Tx` without
//! [`commit`](Tx::commit) rolls it back.
//!
//! Each record is a JSON document with TRE's field names plus the columns queries
//! filter on. Updates are compare-and-swap on an `etag` column: a write whose etag no
//! longer matches fails with [`StoreError::EtagMismatch`], and the `*_with_retries`
//! helpers re-read and try again, returning the updated value.
//!
//! HTTP requests and the workers draw on separate pools, so a flood of requests cannot
//! starve the workers of connections: [`Store::for_workers`] gives the workers' handle
//! of the same store. A third pool of one connection answers [`Store::ping`], so a
//! readiness probe never queues behind either.
//!
//! On SQLite the database runs in WAL mode and writes are serialised: one writer
//! connection, shared by HTTP and the workers (SQLite has one writer at a time in any
//! case), each transaction opened with `BEGIN IMMEDIATE`, so a transaction never fails
//! with `SQLITE_BUSY` halfway; reads outside a transaction use a read pool of each
//! side's size. In-memory SQLite is refused, since every pooled connection would see a
//! different database. On PostgreSQL each side's one pool serves reads and
//! transactions, at the default `READ COMMITTED` isolation: a compare-and-swap that
//! loses a race sees the winner's etag on its next read, even inside the same
//! transaction. Every PostgreSQL connection gets the [`SessionSettings`] when it opens.

mod airlock;
mod database;
mod document;
mod error;
mod history;
mod migrations;
mod operations;
mod operator;
mod outbox;
mod resources;
mod roles;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Executor, Transaction};
use tokio::sync::Notify;

use crate::domain::Clock;

pub use airlock::AirlockRequestFilter;
pub use database::{Database, NotReady};
pub use document::{Listed, PageKey};
pub use error::{Entity, StoreError};
pub use operations::OperationPage;
pub use outbox::{LeaseClock, OutboxMessage, OutboxRecord, ParkedOutbox, ParkedRecord};
pub use resources::{ResourceFilter, StatusWrite, UserResourceScope};

named_enum! {
    /// The database behind a [`Store`], chosen by the URL scheme.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Backend {
        /// `sqlite:` URLs.
        Sqlite => "sqlite",
        /// `postgres:` and `postgresql:` URLs.
        Postgres => "postgres",
    }
}

impl Backend {
    /// The backend a database URL names.
    ///
    /// # Errors
    ///
    /// The scheme is neither `sqlite:` nor `postgres:`/`postgresql:`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("sqlite") => Ok(Backend::Sqlite),
            Some("postgres" | "postgresql") => Ok(Backend::Postgres),
            _ => Err(StoreError::InvalidUrl {
                message: "the scheme must be sqlite: or postgres: (postgresql:)".to_owned(),
            }),
        }
    }
}

/// How to open a [`Store`].
#[derive(Clone)]
pub struct StoreOptions {
    url: String,
    max_connections: u32,
    worker_connections: u32,
    acquire_timeout: Duration,
    session: SessionSettings,
    clock: Clock,
}

/// What every PostgreSQL connection is set to when it opens (`SET` in the session; a
/// pooler in transaction mode would lose them). Zero leaves a setting off (the
/// timeouts) or at the operating system's default (the keepalives), as PostgreSQL reads
/// it. SQLite has none of these.
///
/// The keepalives are the server's (`tcp_keepalives_*`): the server probes an idle
/// connection and ends the session of a client that vanished, releasing its locks and
/// its transaction. They do not make this side notice a server that vanished; sqlx
/// sets no keepalive on its own sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSettings {
    /// `statement_timeout`: the longest one statement may run (default 30 s).
    pub statement_timeout: Duration,
    /// `lock_timeout`: the longest a statement waits for a lock (default 10 s).
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: the longest a transaction may sit idle
    /// before the server ends its session (default 60 s).
    pub idle_in_transaction_timeout: Duration,
    /// `tcp_keepalives_idle`: idle time before the server's first keepalive probe
    /// (default 60 s; whole seconds).
    pub tcp_keepalives_idle: Duration,
    /// `tcp_keepalives_interval`: time between unanswered probes (default 10 s; whole
    /// seconds).
    pub tcp_keepalives_interval: Duration,
    /// `tcp_keepalives_count`: unanswered probes before the server drops the connection
    /// (default 6).
    pub tcp_keepalives_count: u32,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(60),
            tcp_keepalives_idle: Duration::from_secs(60),
            tcp_keepalives_interval: Duration::from_secs(10),
            tcp_keepalives_count: 6,
        }
    }
}

impl SessionSettings {
    /// The `SET` statements, one string (PostgreSQL's simple query runs them in turn).
    fn sql(&self) -> String {
        // PostgreSQL reads a bare number as milliseconds for the timeouts and as seconds
        // for the keepalives; both are 32-bit integers there.
        let millis = |d: Duration| d.as_millis().min(i32::MAX as u128);
        let seconds = |d: Duration| d.as_secs().min(i32::MAX as u64);
        format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; \
             SET idle_in_transaction_session_timeout = {}; SET tcp_keepalives_idle = {}; \
             SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = {}",
            millis(self.statement_timeout),
            millis(self.lock_timeout),
            millis(self.idle_in_transaction_timeout),
            seconds(self.tcp_keepalives_idle),
            seconds(self.tcp_keepalives_interval),
            self.tcp_keepalives_count.min(i32::MAX as u32),
        )
    }
}

/// How long [`Store::ping`] waits for its one connection.
const PROBE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: show only the scheme.
        let scheme = self.url.split_once(':').map_or("?", |(scheme, _)| scheme);
        f.debug_struct("StoreOptions")
            .field("url", &format_args!("{scheme}:…"))
            .field("max_connections", &self.max_connections)
            .field("worker_connections", &self.worker_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("session", &self.session)
            .field("clock", &self.clock)
            .finish()
    }
}

impl StoreOptions {
    /// Options for `url` (`sqlite://steward.db?mode=rwc`, `postgres://user@host/db`;
    /// a PostgreSQL schema can be chosen with `?options[search_path]=name`).
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        StoreOptions {
            url: url.into(),
            max_connections: 5,
            worker_connections: 5,
            acquire_timeout: Duration::from_secs(10),
            session: SessionSettings::default(),
            clock: Clock::system(),
        }
    }

    /// The most connections of the pool HTTP requests use (default 5). SQLite always
    /// has one writer, shared with the workers.
    #[must_use]
    pub fn with_max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections.max(1);
        self
    }

    /// The most connections of the pool HTTP requests use.
    #[must_use]
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// The most connections of the workers' pool ([`Store::for_workers`], default 5).
    #[must_use]
    pub fn with_worker_connections(mut self, worker_connections: u32) -> Self {
        self.worker_connections = worker_connections.max(1);
        self
    }

    /// What every PostgreSQL connection is set to (default: [`SessionSettings::default`]).
    #[must_use]
    pub fn with_session(mut self, session: SessionSettings) -> Self {
        self.session = session;
        self
    }

    /// How long to wait for a free connection before [`StoreError::Busy`] (every
    /// connection in use) or [`StoreError::Unavailable`] (none could be opened)
    /// (default 10 s).
    #[must_use]
    pub fn with_acquire_timeout(mut self, acquire_timeout: Duration) -> Self {
        self.acquire_timeout = acquire_timeout;
        self
    }

    /// The clock that stamps `updatedWhen` and friends (default: the system clock).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }
}

/// The pools of one side (HTTP or the workers).
struct Pools {
    /// Reads outside a transaction.
    reader: AnyPool,
    /// Transactions. On SQLite a pool of exactly one connection, shared by both sides;
    /// on PostgreSQL the reader pool itself.
    writer: AnyPool,
}

/// Whose pools a [`Store`] handle draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Http,
    Workers,
}

struct Inner {
    backend: Backend,
    http: Pools,
    workers: Pools,
    /// One connection for [`Store::ping`].
    probe: AnyPool,
    /// For the migration's own connection.
    connect_options: AnyConnectOptions,
    acquire_timeout: Duration,
    session: SessionSettings,
    clock: Clock,
    outbox_written: Notify,
}

/// The database: clone-able, cheap to clone (the pools are shared).
///
/// # Examples
///
/// ```
/// use steward_api::storage::{Store, StoreError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), StoreError> {
/// let dir = tempfile::tempdir().expect("temp dir");
/// let url = format!("sqlite://{}?mode=rwc", dir.path().join("steward.db").display());
/// let store = Store::connect(&url).await?;
/// store.ping().await?;
/// let tx = store.begin().await?;
/// tx.commit().await?;
/// store.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    side: Side,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.backend)
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the database at `url` and brings its schema up to date.
    ///
    /// # Errors
    ///
    /// The URL is invalid ([`StoreError::InvalidUrl`]), the database cannot be reached
    /// ([`StoreError::Unavailable`]), or a migration fails.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe while migrating: a cancelled migration is rolled back by the
    /// database, but the next call repeats it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(StoreOptions::new(url)).await
    }

    /// [`connect`](Self::connect) with options.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    ///
    /// # Cancellation safety
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_with(options: StoreOptions) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(options)?;
        store.migrate().await?;
        Ok(store)
    }

    /// Creates the pools without connecting: the first use connects. A service starts
    /// with this, then calls [`migrate`](Self::migrate) until the database answers.
    ///
    /// # Errors
    ///
    /// The URL is invalid or names an in-memory SQLite database.
    pub fn connect_lazy(options: StoreOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(&options.url)?;
        let url = match backend {
            Backend::Sqlite => sqlite_create_by_default(&options.url),
            Backend::Postgres => options.url.clone(),
        };
        let connect_options = AnyConnectOptions::from_str(&url)
            .map_err(|error| StoreError::InvalidUrl { message: error.to_string() })?;
        let session_sql: Arc<str> = options.session.sql().into();
        let pool_options = |max_connections: u32| {
            pool_options(backend, options.acquire_timeout, max_connections, &session_sql)
        };
        if backend == Backend::Sqlite {
            let url = options.url.to_ascii_lowercase();
            if url.contains(":memory:") || url.contains("mode=memory") {
                return Err(StoreError::InvalidUrl {
                    message: "in-memory SQLite is not supported (each pooled connection would see its own database); use a file".to_owned(),
                });
            }
        }
        let pool = |max_connections: u32| {
            pool_options(max_connections).connect_lazy_with(connect_options.clone())
        };
        let (http, workers) = match backend {
            Backend::Sqlite => {
                let writer = pool(1);
                (
                    Pools { reader: pool(options.max_connections), writer: writer.clone() },
                    Pools { reader: pool(options.worker_connections), writer },
                )
            }
            Backend::Postgres => {
                let http = pool(options.max_connections);
                let workers = pool(options.worker_connections);
                (
                    Pools { reader: http.clone(), writer: http },
                    Pools { reader: workers.clone(), writer: workers },
                )
            }
        };
        let probe = pool_options(1)
            .acquire_timeout(PROBE_ACQUIRE_TIMEOUT.min(options.acquire_timeout))
            .connect_lazy_with(connect_options.clone());
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                http,
                workers,
                probe,
                connect_options,
                acquire_timeout: options.acquire_timeout,
                session: options.session,
                clock: options.clock,
                outbox_written: Notify::new(),
            }),
            side: Side::Http,
        })
    }

    /// The same store drawing on the workers' pools (the status updaters, the outbox,
    /// the watchers), so that HTTP requests holding every connection of theirs cannot
    /// starve them. Cheap; the outbox wake-up ([`outbox_written`](Self::outbox_written))
    /// is shared.
    #[must_use]
    pub fn for_workers(&self) -> Store {
        Store { inner: self.inner.clone(), side: Side::Workers }
    }

    /// The most connections of this handle's pool: HTTP's, or the workers' after
    /// [`for_workers`](Self::for_workers) (on SQLite, its read pool; the writer is one).
    #[must_use]
    pub fn max_connections(&self) -> u32 {
        self.pools().reader.options().get_max_connections()
    }

    fn pools(&self) -> &Pools {
        match self.side {
            Side::Http => &self.inner.http,
            Side::Workers => &self.inner.workers,
        }
    }

    /// Brings the schema up to date (embedded migrations for the backend).
    ///
    /// # Errors
    ///
    /// [`StoreError::Migrate`]; [`StoreError::is_unavailable`] tells whether the database
    /// was unreachable.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: see [`connect`](Self::connect).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = migrations::migrator(self.inner.backend)
            .await
            .map_err(|source| StoreError::Migrate { source })?;
        match self.inner.backend {
            Backend::Sqlite => {
                let pool = &self.inner.workers.writer;
                migrator.run(pool).await.map_err(|source| StoreError::Migrate { source })
            }
            Backend::Postgres => {
                // A connection of its own with no statement or lock timeout: a migration
                // may rightly take long, and waits for another replica's to finish.
                let session = SessionSettings {
                    statement_timeout: Duration::ZERO,
                    lock_timeout: Duration::ZERO,
                    ..self.inner.session
                };
                let sql: Arc<str> = session.sql().into();
                let pool = pool_options(Backend::Postgres, self.inner.acquire_timeout, 1, &sql)
                    .connect_lazy_with(self.inner.connect_options.clone());
                let migrated = match pool.acquire().await {
                    Ok(conn) => {
                        drop(conn);
                        migrator.run(&pool).await.map_err(|source| StoreError::Migrate { source })
                    }
                    Err(error) => Err(StoreError::from_acquire(&pool, error)),
                };
                pool.close().await;
                migrated
            }
        }
    }

    /// The backend.
    #[must_use]
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The store's clock.
    #[must_use]
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Checks that the database answers (`SELECT 1`), for readiness probes and the
    /// database watcher: on a pool of one connection of its own, so it never queues
    /// behind HTTP requests or workers holding theirs.
    ///
    /// # Errors
    ///
    /// The database does not answer. A probe connection still taken when the acquire
    /// timeout ends is [`StoreError::Unavailable`], not busy: the pool is the pings'
    /// alone and a ping takes a moment, so it is held by a ping that was given up (as
    /// `/readyz` gives up) and whose connection the pool cannot take back before the
    /// database answers.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let pool = &self.inner.probe;
        let mut conn = pool.acquire().await.map_err(|error| match error {
            sqlx::Error::PoolTimedOut => StoreError::Unavailable { source: error },
            error => StoreError::from_acquire(pool, error),
        })?;
        conn.execute("SELECT 1").await?;
        Ok(())
    }

    /// A PostgreSQL run-time setting as a connection of this handle's pool sees it
    /// (`current_setting`, the text `SHOW` prints), e.g. `statement_timeout`; `None` on
    /// SQLite.
    ///
    /// # Errors
    ///
    /// The database failed, or there is no such setting.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn postgres_setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        if self.inner.backend != Backend::Postgres {
            return Ok(None);
        }
        let row = sqlx::query("SELECT current_setting($1) AS value")
            .bind(name)
            .fetch_one(&mut *self.read_connection().await?)
            .await?;
        Ok(Some(sqlx::Row::try_get(&row, "value")?))
    }

    /// Opens a transaction on this handle's pool. On SQLite this waits for the single
    /// writer connection.
    ///
    /// # Errors
    ///
    /// [`StoreError::Busy`] when every connection stayed in use for the acquire timeout,
    /// [`StoreError::Unavailable`] when none could be opened.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled `begin` opens nothing.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let pool = &self.pools().writer;
        let begun = match self.inner.backend {
            Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => pool.begin().await,
        };
        let tx = begun.map_err(|error| StoreError::from_acquire(pool, error))?;
        Ok(Tx { tx, store: self.clone(), wrote_outbox: false, max_message_bytes: None })
    }

    /// Waits until a transaction that wrote to the outbox commits (or returns at once if
    /// one committed since the last call). The outbox worker waits on this, with a poll
    /// interval as fallback.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn outbox_written(&self) {
        self.inner.outbox_written.notified().await;
    }

    /// Closes every connection; later calls fail with [`StoreError::Unavailable`].
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe; the pools are closed either way.
    pub async fn close(&self) {
        let Inner { http, workers, probe, .. } = &*self.inner;
        for pool in [&http.writer, &http.reader, &workers.writer, &workers.reader, probe] {
            pool.close().await;
        }
    }

    /// A connection of this handle's read pool, for one read outside a transaction.
    pub(crate) async fn read_connection(&self) -> Result<PoolConnection<Any>, StoreError> {
        let pool = &self.pools().reader;
        pool.acquire().await.map_err(|error| StoreError::from_acquire(pool, error))
    }

    /// Reads outside any transaction, each on a connection of this handle's read pool.
    #[must_use]
    pub fn read(&self) -> Reader<'_> {
        Reader(ReadFrom::Store(self))
    }
}

/// Reads records: on the store's read pool ([`Store::read`]) or inside a transaction
/// ([`Tx::read`]). Each read is written once, over either connection, and takes the
/// reader by value: `store.read().resource(id)`, `tx.read().resource(id)`.
#[derive(Debug)]
pub struct Reader<'a>(ReadFrom<'a>);

#[derive(Debug)]
enum ReadFrom<'a> {
    Store(&'a Store),
    Tx(&'a mut AnyConnection),
}

/// The connection one read runs on: [`Acquire`](sqlx::Acquire) for the pool and the
/// transaction, as one type.
enum ReadConnection<'a> {
    Pooled(PoolConnection<Any>),
    Tx(&'a mut AnyConnection),
}

impl Deref for ReadConnection<'_> {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self {
            ReadConnection::Pooled(conn) => conn,
            ReadConnection::Tx(conn) => conn,
        }
    }
}

impl DerefMut for ReadConnection<'_> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            ReadConnection::Pooled(conn) => conn,
            ReadConnection::Tx(conn) => conn,
        }
    }
}

impl<'a> Reader<'a> {
    /// A connection for this read.
    async fn connection(self) -> Result<ReadConnection<'a>, StoreError> {
        Ok(match self.0 {
            ReadFrom::Store(store) => ReadConnection::Pooled(store.read_connection().await?),
            ReadFrom::Tx(conn) => ReadConnection::Tx(conn),
        })
    }
}

/// A pool's options: its size and acquire timeout, and what each new connection runs
/// first (SQLite's pragmas, or PostgreSQL's session settings `session_sql`).
fn pool_options(
    backend: Backend,
    acquire_timeout: Duration,
    max_connections: u32,
    session_sql: &Arc<str>,
) -> AnyPoolOptions {
    let options =
        AnyPoolOptions::new().acquire_timeout(acquire_timeout).max_connections(max_connections);
    match backend {
        Backend::Sqlite => {
            options.after_connect(|conn, _| Box::pin(async move { sqlite_pragmas(conn).await }))
        }
        Backend::Postgres => {
            let sql = session_sql.clone();
            options.after_connect(move |conn, _| {
                let sql = sql.clone();
                Box::pin(async move { conn.execute(&*sql).await.map(|_| ()) })
            })
        }
    }
}

/// WAL, a busy timeout for readers during checkpoints, and foreign keys.
async fn sqlite_pragmas(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in [
        "PRAGMA busy_timeout = 5000",
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = NORMAL",
        "PRAGMA foreign_keys = ON",
    ] {
        conn.execute(pragma).await?;
    }
    Ok(())
}

/// An open transaction. Commit with [`commit`](Self::commit); dropping it rolls back.
///
/// `NotFound`, `AlreadyExists` and `EtagMismatch` errors leave the transaction usable.
/// After any other error, roll back: PostgreSQL aborts a transaction at its first
/// failed statement, and [`commit`](Self::commit) then reports
/// [`StoreError::Aborted`] instead of pretending to commit.
pub struct Tx {
    tx: Transaction<'static, Any>,
    store: Store,
    wrote_outbox: bool,
    max_message_bytes: Option<usize>,
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx")
            .field("backend", &self.store.inner.backend)
            .field("side", &self.store.side)
            .field("wrote_outbox", &self.wrote_outbox)
            .finish_non_exhaustive()
    }
}

impl Tx {
    /// Commits, and wakes the outbox worker if this transaction wrote to the outbox.
    ///
    /// # Errors
    ///
    /// The commit failed; nothing was written.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled commit may or may not have been applied.
    pub async fn commit(self) -> Result<(), StoreError> {
        let Tx { mut tx, store, wrote_outbox, .. } = self;
        if store.inner.backend == Backend::Postgres {
            // PostgreSQL turns the COMMIT of a transaction that saw an error into a
            // silent ROLLBACK; ask first, so the caller learns nothing was written.
            if let Err(error) = (&mut *tx).execute("SELECT 1").await {
                let aborted = matches!(&error, sqlx::Error::Database(db) if db.code().as_deref() == Some("25P02"));
                let _ = tx.rollback().await;
                return Err(if aborted {
                    StoreError::Aborted { source: error }
                } else {
                    error.into()
                });
            }
        }
        tx.commit().await?;
        if wrote_outbox {
            store.inner.outbox_written.notify_one();
        }
        Ok(())
    }

    /// Rolls back.
    ///
    /// # Errors
    ///
    /// The rollback failed (the database drops the transaction anyway when the
    /// connection closes).
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a dropped transaction is rolled back.
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }

    /// Marks a savepoint named `name` (an SQL identifier), so a part of the transaction
    /// can be undone with [`rollback_to_savepoint`](Self::rollback_to_savepoint) while the
    /// rest stays. On PostgreSQL, rolling back to a savepoint also clears the aborted
    /// state an error inside it left.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn().execute(format!("SAVEPOINT {name}").as_str()).await?;
        Ok(())
    }

    /// Undoes everything since [`savepoint`](Self::savepoint) `name` and drops the
    /// savepoint.
    ///
    /// # Errors
    ///
    /// The database failed, or there is no such savepoint.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn rollback_to_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn().execute(format!("ROLLBACK TO SAVEPOINT {name}").as_str()).await?;
        self.conn().execute(format!("RELEASE SAVEPOINT {name}").as_str()).await?;
        Ok(())
    }

    /// Keeps everything since [`savepoint`](Self::savepoint) `name` and drops the
    /// savepoint.
    ///
    /// # Errors
    ///
    /// The database failed, or there is no such savepoint.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn release_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn().execute(format!("RELEASE SAVEPOINT {name}").as_str()).await?;
        Ok(())
    }

    /// The store's clock reading, for `updatedWhen` stamps.
    #[must_use]
    pub fn now(&self) -> f64 {
        self.store.inner.clock.now()
    }

    /// The store this transaction belongs to.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Reads inside this transaction: they see its own writes.
    #[must_use]
    pub fn read(&mut self) -> Reader<'_> {
        Reader(ReadFrom::Tx(&mut self.tx))
    }

    pub(crate) fn conn(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }
}

/// A SQLite URL with no `mode` parameter gets `mode=rwc`, so a missing database file is
/// created (as with the default URL) rather than leaving the service unready with
/// "unable to open database file"; an explicit `mode` (`ro`, `rw`, …) is kept.
fn sqlite_create_by_default(url: &str) -> String {
    let query = url.split_once('?').map(|(_, query)| query);
    let has_mode = query.is_some_and(|query| {
        query.split('&').any(|pair| pair.split('=').next().is_some_and(|key| key == "mode"))
    });
    match query {
        _ if has_mode => url.to_owned(),
        Some("") => format!("{url}mode=rwc"),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    }
}

/// POSIX seconds as whole milliseconds, the unit of the time columns.
#[must_use]
pub(crate) fn millis(seconds: f64) -> i64 {
    // Saturating float-to-int conversion; times are far inside the i64 range.
    #[allow(clippy::cast_possible_truncation)]
    let millis = (seconds * 1000.0).round() as i64;
    millis
}

#[cfg(test)]
mod tests {
    use super::sqlite_create_by_default;

    #[test]
    fn a_sqlite_url_without_mode_gets_rwc_and_an_explicit_mode_is_kept() {
        let cases = [
            ("sqlite://steward.db", "sqlite://steward.db?mode=rwc"),
            ("sqlite://steward.db?", "sqlite://steward.db?mode=rwc"),
            ("sqlite://a.db?cache=shared", "sqlite://a.db?cache=shared&mode=rwc"),
            ("sqlite://a.db?mode=ro", "sqlite://a.db?mode=ro"),
            ("sqlite://a.db?cache=shared&mode=rw", "sqlite://a.db?cache=shared&mode=rw"),
            ("sqlite://a.db?xmode=ro", "sqlite://a.db?xmode=ro&mode=rwc"),
        ];
        for (url, expected) in cases {
            assert_eq!(sqlite_create_by_default(url), expected, "{url}");
        }
    }
}
