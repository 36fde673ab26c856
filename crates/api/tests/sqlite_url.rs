//! Issue 16 §4: a SQLite `STEWARD_DATABASE_URL` without `mode=` creates its file, as the
//! default `?mode=rwc` does; `mode=ro` and `mode=rw` keep their meaning.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use steward_api::storage::{Store, StoreOptions};

async fn open(url: String) -> Result<Store, steward_api::storage::StoreError> {
    let store = Store::connect_lazy(StoreOptions::new(url))?;
    store.migrate().await?;
    Ok(store)
}

/// Ensures that a URL with no `mode` (with or without other parameters) creates the
/// database file and migrates it, instead of leaving the service unready with "unable to
/// open database file".
#[tokio::test]
async fn a_url_without_mode_creates_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, suffix) in [("plain.db", ""), ("with-params.db", "?cache=shared")] {
        let path = dir.path().join(name);
        let store = open(format!("sqlite://{}{suffix}", path.display())).await.unwrap();
        store.ping().await.unwrap();
        assert!(path.exists(), "{name} was created");
        store.close().await;
    }
}

/// Ensures that `mode=ro` and `mode=rw` are honoured: neither creates a missing file,
/// and opening one fails with an unavailable database.
#[tokio::test]
async fn explicit_modes_do_not_create_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["ro", "rw"] {
        let path = dir.path().join(format!("{mode}.db"));
        let error = open(format!("sqlite://{}?mode={mode}", path.display())).await.unwrap_err();
        assert!(error.is_unavailable(), "{mode}: {error}");
        assert!(!path.exists(), "{mode}: no file created");
    }
}
