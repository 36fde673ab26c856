//! The embedded schema migrations, one list per backend with the same file names.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use super::Backend;

/// `(file name, SQLite text, PostgreSQL text)`, in order. Each file name is
/// `NNNN_name.sql`; `NNNN` is the version.
pub(crate) const MIGRATIONS: &[(&str, &str, &str)] = &[
    (
        "0001_initial.sql",
        include_str!("../../migrations/sqlite/0001_initial.sql"),
        include_str!("../../migrations/postgres/0001_initial.sql"),
    ),
    (
        "0002_workspace_roles.sql",
        include_str!("../../migrations/sqlite/0002_workspace_roles.sql"),
        include_str!("../../migrations/postgres/0002_workspace_roles.sql"),
    ),
    (
        "0003_outbox_message_key.sql",
        include_str!("../../migrations/sqlite/0003_outbox_message_key.sql"),
        include_str!("../../migrations/postgres/0003_outbox_message_key.sql"),
    ),
    (
        "0004_status_order.sql",
        include_str!("../../migrations/sqlite/0004_status_order.sql"),
        include_str!("../../migrations/postgres/0004_status_order.sql"),
    ),
    (
        "0005_outbox_parked.sql",
        include_str!("../../migrations/sqlite/0005_outbox_parked.sql"),
        include_str!("../../migrations/postgres/0005_outbox_parked.sql"),
    ),
    (
        "0006_user_resource_owner.sql",
        include_str!("../../migrations/sqlite/0006_user_resource_owner.sql"),
        include_str!("../../migrations/postgres/0006_user_resource_owner.sql"),
    ),
    (
        "0007_worker_controls.sql",
        include_str!("../../migrations/sqlite/0007_worker_controls.sql"),
        include_str!("../../migrations/postgres/0007_worker_controls.sql"),
    ),
];

/// The migrations of one backend, as a source sqlx's `Migrator` reads.
#[derive(Debug, Clone, Copy)]
struct Embedded(Backend);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async move { migrations(self.0) })
    }
}

fn migrations(backend: Backend) -> Result<Vec<Migration>, BoxDynError> {
    MIGRATIONS
        .iter()
        .map(|(file, sqlite, postgres)| {
            let stem = file.strip_suffix(".sql").unwrap_or(file);
            let (version, name) =
                stem.split_once('_').ok_or_else(|| format!("bad migration name {file}"))?;
            let version: i64 =
                version.parse().map_err(|_| format!("bad migration version in {file}"))?;
            let sql = match backend {
                Backend::Sqlite => *sqlite,
                Backend::Postgres => *postgres,
            };
            Ok(Migration::new(
                version,
                Cow::Owned(name.replace('_', " ")),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            ))
        })
        .collect()
}

/// The migrator for `backend`.
pub(crate) async fn migrator(backend: Backend) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Embedded(backend)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that every migration file is listed, in both folders, under the same name.
    #[test]
    fn migration_folders_match_the_embedded_list() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let list = |dir: &str| {
            let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let embedded: Vec<String> =
            MIGRATIONS.iter().map(|(file, _, _)| (*file).to_owned()).collect();
        assert_eq!(list("sqlite"), embedded);
        assert_eq!(list("postgres"), embedded);
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let resolved = migrations(backend).unwrap();
            let versions: Vec<i64> = resolved.iter().map(|m| m.version).collect();
            assert!(versions.windows(2).all(|pair| pair[0] < pair[1]), "versions increase");
        }
    }
}
