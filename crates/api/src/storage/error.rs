//! The storage error, named for what the caller does next.

named_enum! {
    /// The kind of record an error is about.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum Entity {
        /// A resource.
        Resource => "resource",
        /// An operation.
        Operation => "operation",
        /// A resource history item.
        ResourceHistory => "resource history item",
        /// An airlock request.
        AirlockRequest => "airlock request",
        /// An outbox message.
        OutboxMessage => "outbox message",
        /// A user's roles in a workspace.
        WorkspaceRoles => "workspace roles",
    }
}

/// What went wrong reading or writing the database.
///
/// - [`Unavailable`](Self::Unavailable): the database cannot be reached or is
///   overloaded; retry later (a handler answers `Retry { cause: Dependency }`).
/// - [`NotFound`](Self::NotFound), [`AlreadyExists`](Self::AlreadyExists),
///   [`EtagMismatch`](Self::EtagMismatch): about this record; re-read, or tell the
///   client.
/// - [`Database`](Self::Database), [`Corrupt`](Self::Corrupt), [`Migrate`](Self::Migrate),
///   [`InvalidUrl`](Self::InvalidUrl): a defect or bad configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record does not exist.
    #[error("{entity} {id} does not exist")]
    NotFound {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
    },
    /// A record with this id exists already.
    #[error("{entity} {id} already exists")]
    AlreadyExists {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
    },
    /// The record changed since it was read (its etag no longer matches).
    #[error("{entity} {id} was changed by someone else (etag mismatch)")]
    EtagMismatch {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
    },
    /// The database cannot be reached, is shutting down, or is too busy. Retry later.
    #[error("database unavailable")]
    Unavailable {
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// The database refused a statement (a defect, not an outage).
    #[error("database error")]
    Database {
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// A stored document cannot be read or a record cannot be written as JSON.
    #[error("{entity} {id} is not valid JSON for its type")]
    Corrupt {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An earlier statement of the transaction failed, so PostgreSQL aborted it; nothing
    /// was committed. Retry the whole transaction.
    #[error("the transaction was aborted by an earlier error; nothing was committed")]
    Aborted {
        /// The driver error reported at commit.
        #[source]
        source: sqlx::Error,
    },
    /// The schema migrations failed.
    #[error("database migration failed")]
    Migrate {
        /// The migration error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A message written to the outbox is larger than the transport accepts, so it
    /// could never be sent; nothing of the transaction is committed.
    #[error("a message to {queue} of {size} bytes is over the transport's limit of {limit} bytes")]
    MessageTooLarge {
        /// Where it was going.
        queue: String,
        /// Its size, as [`OutgoingMessage::size_bytes`](steward_core::OutgoingMessage::size_bytes)
        /// counts it, with room for the message id and the subject.
        size: usize,
        /// The transport's limit.
        limit: usize,
    },
    /// The database URL is not one steward supports.
    #[error("invalid database url: {message}")]
    InvalidUrl {
        /// What is wrong with it.
        message: String,
    },
}

impl StoreError {
    /// Whether the database is unreachable or overloaded, so the same request may
    /// succeed later.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Migrate { source } => matches!(
                source,
                sqlx::migrate::MigrateError::Execute(error) if is_unavailable(error)
            ),
            _ => false,
        }
    }

    /// Whether a message was over the transport's limit.
    #[must_use]
    pub fn is_message_too_large(&self) -> bool {
        matches!(self, StoreError::MessageTooLarge { .. })
    }

    /// Whether the record does not exist.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// Whether the write lost an optimistic-concurrency race.
    #[must_use]
    pub fn is_etag_mismatch(&self) -> bool {
        matches!(self, StoreError::EtagMismatch { .. })
    }

    pub(crate) fn not_found(entity: Entity, id: &str) -> Self {
        StoreError::NotFound { entity, id: id.to_owned() }
    }

    pub(crate) fn corrupt(entity: Entity, id: &str, source: serde_json::Error) -> Self {
        StoreError::Corrupt { entity, id: id.to_owned(), source }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(source: sqlx::Error) -> Self {
        if is_unavailable(&source) {
            StoreError::Unavailable { source }
        } else {
            StoreError::Database { source }
        }
    }
}

/// Checks an `INSERT … ON CONFLICT (id) DO NOTHING`: no row inserted means the id is
/// taken. (A unique-violation error would abort a PostgreSQL transaction; a skipped
/// insert does not.)
pub(crate) fn inserted(
    result: &sqlx::any::AnyQueryResult,
    entity: Entity,
    id: &str,
) -> Result<(), StoreError> {
    if result.rows_affected() == 0 {
        Err(StoreError::AlreadyExists { entity, id: id.to_owned() })
    } else {
        Ok(())
    }
}

/// Whether a driver error means the database is unreachable, shutting down or busy
/// rather than that the statement is wrong.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL SQLSTATE classes: 08 connection exception, 53 insufficient
            // resources, 57 operator intervention (shutdown), 58 system error; 40001
            // serialization failure and 40P01 deadlock are transient too.
            let postgres = ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class))
                || code == "40001"
                || code == "40P01";
            // SQLite (extended) result codes: BUSY 5 (+ 261, 517), LOCKED 6 (+ 262),
            // IOERR 10, FULL 13, CANTOPEN 14.
            let sqlite =
                code.parse::<i64>().is_ok_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13 | 14));
            postgres || sqlite
        }
        _ => false,
    }
}
