//! The Python peers, aio-pika and faststream, installed into a virtualenv under
//! `target/bench/venv` and run as consumers of the same queue and messages.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::worker::Sample;

/// The consumer script: `peers.py <aio-pika|faststream> <url> <queue> <count>`.
const SCRIPT: &str = include_str!("peers.py");
/// The packages the script needs.
const PACKAGES: &[&str] = &["aio-pika==10.2.*", "faststream[rabbit]==0.7.*"];

/// The virtualenv's Python and the script, or why they are not available.
#[derive(Debug)]
pub(crate) struct Peers {
    ready: Result<(PathBuf, PathBuf), String>,
}

impl Peers {
    /// Creates the virtualenv and installs the peers unless that was done before.
    pub(crate) fn prepare(bench: &super::Bench) -> Self {
        let ready = prepare(&bench.dir()).map_err(|error| format!("{error:#}"));
        if let Err(reason) = &ready {
            eprintln!("python peers unavailable: {reason}");
        }
        Self { ready }
    }

    /// `Ok` when the peers can run, else why not.
    pub(crate) fn available(&self) -> Result<(), String> {
        self.ready.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// Runs peer `kind` on `count` messages of `queue` in its own process.
    pub(crate) fn consume(
        &self,
        kind: &str,
        url: &str,
        queue: &str,
        count: usize,
        limit: Duration,
    ) -> Result<Sample> {
        let (python, script) = self.ready.as_ref().map_err(|reason| anyhow::anyhow!("{reason}"))?;
        // Python's AMQP URLs name the default virtual host as a bare `/`.
        let url = url.strip_suffix("%2f").unwrap_or(url);
        let mut command = Command::new(python);
        command.arg(script).args([kind, url, queue, &count.to_string()]);
        super::run_sample(command, limit).with_context(|| format!("python peer {kind}"))
    }
}

fn prepare(dir: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
    let venv = dir.join("venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        println!("==> python3 -m venv {}", venv.display());
        let status = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
        if !status.is_ok_and(|s| s.success()) {
            bail!(
                "could not create a virtualenv with `python3 -m venv` (on Debian: apt-get install python3-venv)"
            );
        }
    }
    let check = Command::new(&python).args(["-c", "import aio_pika, faststream"]).output();
    if !check.is_ok_and(|out| out.status.success()) {
        println!("==> pip install {}", PACKAGES.join(" "));
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(PACKAGES)
            .status()
            .context("could not run pip")?;
        if !status.success() {
            bail!("pip install {} failed: {status}", PACKAGES.join(" "));
        }
    }
    let script = dir.join("peers.py");
    std::fs::write(&script, SCRIPT).context("writing the peer script")?;
    Ok((python, script))
}
