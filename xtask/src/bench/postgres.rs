//! A scratch PostgreSQL database per service run, created and dropped with `psql`
//! through the server of `STEWARD_BENCH_POSTGRES_URL` (default: the local server's
//! `test` database, user `postgres`).

use std::process::Command;

use anyhow::{Context, Result, bail};

fn admin_url() -> String {
    std::env::var("STEWARD_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn psql(sql: &str) -> Result<()> {
    let output = Command::new("psql")
        .args([&admin_url(), "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .context("could not run psql")?;
    if !output.status.success() {
        bail!("psql {sql:?}: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// A database of its own, dropped (with its connections) when this is dropped.
#[derive(Debug)]
pub(crate) struct Scratch {
    name: String,
    /// The URL the service connects with.
    pub(crate) url: String,
}

impl Scratch {
    pub(crate) fn create() -> Result<Self> {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let name = format!("steward_bench_{}_{millis}", std::process::id());
        psql(&format!("CREATE DATABASE {name}"))?;
        let admin = admin_url();
        let server = admin.rsplit_once('/').map_or(admin.as_str(), |(server, _)| server);
        Ok(Self { url: format!("{server}/{name}"), name })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = psql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("could not drop the benchmark's database {}: {error:#}", self.name);
        }
    }
}
