//! NATS JetStream through steward-nats (cargo feature `nats`).

use std::path::PathBuf;
use std::sync::Arc;

use steward_nats::{Credentials, Nats};

/// The NATS settings: the server, and at most one kind of credentials.
#[derive(Clone, clap::Args)]
#[group(skip)]
pub(super) struct Settings {
    /// The NATS server URL (transport `nats`).
    #[arg(long, env = "STEWARD_NATS_URL", default_value = steward_nats::DEFAULT_URL, hide_env_values = true)]
    nats_url: String,
    /// The NATS user, with `STEWARD_NATS_PASSWORD` (transport `nats`).
    #[arg(long, env = "STEWARD_NATS_USER")]
    nats_user: Option<String>,
    /// The NATS password of `STEWARD_NATS_USER` (transport `nats`).
    #[arg(long, env = "STEWARD_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// A NATS token, instead of a user (transport `nats`).
    #[arg(long, env = "STEWARD_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// A NATS `.creds` file, instead of a user or a token (transport `nats`).
    #[arg(long, env = "STEWARD_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
}

impl std::fmt::Debug for Settings {
    /// Names which credentials are set, never their values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |value: &Option<String>| value.as_ref().map(|_| "<hidden>");
        f.debug_struct("Settings")
            .field("nats_url", &steward_core::transport::redact_url(&self.nats_url))
            .field("nats_user", &self.nats_user)
            .field("nats_password", &hidden(&self.nats_password))
            .field("nats_token", &hidden(&self.nats_token))
            .field("nats_creds", &self.nats_creds)
            .finish()
    }
}

impl Settings {
    fn credentials(&self) -> Result<Credentials, steward_core::BoxError> {
        let user = match (&self.nats_user, &self.nats_password) {
            (Some(user), Some(password)) => {
                Some(Credentials::UserPassword { user: user.clone(), password: password.clone() })
            }
            (None, None) => None,
            _ => return Err("STEWARD_NATS_USER and STEWARD_NATS_PASSWORD go together".into()),
        };
        let token = self.nats_token.clone().map(Credentials::Token);
        let creds = self.nats_creds.clone().map(Credentials::CredsFile);
        let mut given = [user, token, creds].into_iter().flatten();
        let credentials = given.next().unwrap_or(Credentials::None);
        if given.next().is_some() {
            return Err(
                "give one of STEWARD_NATS_USER, STEWARD_NATS_TOKEN, STEWARD_NATS_CREDS".into()
            );
        }
        Ok(credentials)
    }
}

// The transport, `NatsTransport`: its check declares the streams and consumers.
broker_transport!(NatsTransport(Nats), |settings| {
    steward_nats::NatsBuilder::new()
        .with_url(settings.nats_url.clone())
        .with_credentials(settings.credentials()?)
});

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn settings(args: &[&str]) -> Settings {
        Cli::try_parse_from(std::iter::once("steward").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"))
            .settings
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let all = settings(&[
            "--nats-url",
            "nats://u:url-secret@h:4222",
            "--nats-user",
            "u",
            "--nats-password",
            "pw-secret",
        ]);
        let token = settings(&["--nats-token", "token-secret"]);
        let shown = format!("{all:?} {token:?}");
        for secret in ["url-secret", "pw-secret", "token-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("<hidden>"), "{shown}");
    }

    #[test]
    fn one_kind_of_credentials_at_most() {
        assert_eq!(settings(&[]).credentials().ok(), Some(Credentials::None));
        assert_eq!(
            settings(&["--nats-user", "u", "--nats-password", "p"]).credentials().ok(),
            Some(Credentials::UserPassword { user: "u".into(), password: "p".into() })
        );
        assert_eq!(
            settings(&["--nats-token", "t"]).credentials().ok(),
            Some(Credentials::Token("t".into()))
        );
        assert!(settings(&["--nats-user", "u"]).credentials().is_err());
        assert!(settings(&["--nats-token", "t", "--nats-creds", "x.creds"]).credentials().is_err());
    }
}
