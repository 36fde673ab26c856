//! SIGTERM to a child process, through `kill` (the xtask has no signal API of its own).

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Sends SIGTERM to process `pid`.
pub(crate) fn terminate(pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("could not run kill")?;
    if !status.success() {
        bail!("kill -TERM {pid} failed: {status}");
    }
    Ok(())
}
