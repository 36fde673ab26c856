//! Who is told about an airlock request's change: e-mail addresses by workspace role,
//! for the `airlockNotification` event.
//!
//! TRE asks Microsoft Graph for the users assigned to each of the workspace's app roles
//! (`get_workspace_user_emails_by_role_assignment`). steward has no directory service,
//! so the provider is pluggable: [`StaticRecipients`] (from configuration) is the
//! default, and a deployment with a directory implements [`RecipientProvider`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use steward_core::BoxError;

use crate::domain::Resource;

/// E-mail addresses by snake_case role name (`workspace_owner`, `airlock_manager`, …),
/// as the notification carries them.
pub type RecipientsByRole = BTreeMap<String, Vec<String>>;

/// The recipients of a workspace could not be looked up.
#[derive(Debug, thiserror::Error)]
#[error("cannot look up the notification recipients of workspace {workspace_id}")]
pub struct RecipientError {
    /// The workspace.
    pub workspace_id: String,
    /// Why.
    #[source]
    pub source: BoxError,
}

/// Looks up who is told about changes of airlock requests in a workspace.
///
/// # Contract
///
/// Keys are snake_case role names; a role without members may be left out. A failure is
/// an outage of the provider's directory: the airlock handler retries the message with
/// [`RetryCause::Dependency`](steward_core::RetryCause::Dependency), so the worker
/// pauses until [`probe`](Self::probe) succeeds.
#[async_trait]
pub trait RecipientProvider: Send + Sync + 'static {
    /// The e-mail addresses by role of `workspace`.
    ///
    /// # Errors
    ///
    /// The directory cannot be reached.
    ///
    /// # Cancellation safety
    ///
    /// Should be cancel safe: the handler may be aborted at shutdown.
    async fn recipient_emails_by_role(
        &self,
        workspace: &Resource,
    ) -> Result<RecipientsByRole, RecipientError>;

    /// Checks that the directory answers again after a failure. The default succeeds.
    ///
    /// # Errors
    ///
    /// The directory is still failing.
    ///
    /// # Cancellation safety
    ///
    /// Should be cancel safe.
    async fn probe(&self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The same recipients for every workspace, from configuration: a map of role →
/// e-mail addresses. Role names are turned into snake_case as TRE sends them
/// (`WorkspaceOwner` → `workspace_owner`).
///
/// # Examples
///
/// ```
/// use steward_api::workers::StaticRecipients;
///
/// let recipients: StaticRecipients =
///     "WorkspaceOwner=owner@example.com;lead@example.com, AirlockManager=am@example.com"
///         .parse()
///         .expect("valid spec");
/// assert_eq!(
///     recipients.by_role()["workspace_owner"],
///     ["owner@example.com", "lead@example.com"]
/// );
/// assert_eq!(recipients.by_role()["airlock_manager"], ["am@example.com"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaticRecipients {
    by_role: RecipientsByRole,
}

impl StaticRecipients {
    /// Recipients from a map of role → e-mail addresses.
    #[must_use]
    pub fn new<R, E>(by_role: impl IntoIterator<Item = (R, E)>) -> Self
    where
        R: AsRef<str>,
        E: IntoIterator,
        E::Item: Into<String>,
    {
        let mut map = RecipientsByRole::new();
        for (role, emails) in by_role {
            map.entry(snake_case(role.as_ref()))
                .or_default()
                .extend(emails.into_iter().map(Into::into));
        }
        StaticRecipients { by_role: map }
    }

    /// No recipients at all.
    #[must_use]
    pub fn none() -> Self {
        StaticRecipients::default()
    }

    /// The recipients by snake_case role name.
    #[must_use]
    pub fn by_role(&self) -> &RecipientsByRole {
        &self.by_role
    }
}

/// A recipient specification that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid recipient entry {entry:?}: expected Role=email[;email…]")]
pub struct RecipientSpecError {
    /// The entry that is wrong.
    pub entry: String,
}

impl FromStr for StaticRecipients {
    type Err = RecipientSpecError;

    /// Reads `Role=email[;email…][,Role=email…]`; whitespace around names and
    /// addresses is ignored, and an empty string means no recipients.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut entries = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            let invalid = || RecipientSpecError { entry: entry.to_owned() };
            let (role, emails) = entry.split_once('=').ok_or_else(invalid)?;
            let role = role.trim();
            let emails: Vec<String> = emails
                .split(';')
                .map(str::trim)
                .filter(|email| !email.is_empty())
                .map(str::to_owned)
                .collect();
            if role.is_empty() || emails.iter().any(|email| !email.contains('@')) {
                return Err(invalid());
            }
            entries.push((role.to_owned(), emails));
        }
        Ok(StaticRecipients::new(entries))
    }
}

impl fmt::Display for StaticRecipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .by_role
            .iter()
            .map(|(role, emails)| format!("{role}={}", emails.join(";")))
            .collect();
        f.write_str(&entries.join(","))
    }
}

#[async_trait]
impl RecipientProvider for StaticRecipients {
    async fn recipient_emails_by_role(
        &self,
        _workspace: &Resource,
    ) -> Result<RecipientsByRole, RecipientError> {
        Ok(self.by_role.clone())
    }
}

/// TRE's role key: `WorkspaceOwner` → `workspace_owner`; spaces and hyphens become `_`.
#[must_use]
pub(crate) fn snake_case(role: &str) -> String {
    let mut out = String::with_capacity(role.len() + 4);
    let mut previous: Option<char> = None;
    for c in role.chars() {
        if c == ' ' || c == '-' || c == '_' {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
        } else if c.is_uppercase() {
            if previous.is_some_and(|p| p.is_lowercase() || p.is_ascii_digit())
                && !out.ends_with('_')
            {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
        previous = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_become_snake_case() {
        assert_eq!(snake_case("WorkspaceOwner"), "workspace_owner");
        assert_eq!(snake_case("WorkspaceResearcher"), "workspace_researcher");
        assert_eq!(snake_case("AirlockManager"), "airlock_manager");
        assert_eq!(snake_case("airlock_manager"), "airlock_manager");
        assert_eq!(snake_case("Airlock Manager"), "airlock_manager");
        assert_eq!(snake_case("TREAdmin"), "treadmin");
    }

    #[test]
    fn spec_parses_roles_and_addresses() {
        let parsed: StaticRecipients =
            " WorkspaceOwner = a@x ; b@x ,AirlockManager=c@x,".parse().unwrap();
        assert_eq!(parsed.by_role()["workspace_owner"], ["a@x", "b@x"]);
        assert_eq!(parsed.by_role()["airlock_manager"], ["c@x"]);
        assert_eq!(parsed.to_string(), "airlock_manager=c@x,workspace_owner=a@x;b@x");
        assert_eq!("".parse::<StaticRecipients>().unwrap(), StaticRecipients::none());
        assert!("WorkspaceOwner".parse::<StaticRecipients>().is_err());
        assert!("=a@x".parse::<StaticRecipients>().is_err());
        assert!("WorkspaceOwner=not-an-address".parse::<StaticRecipients>().is_err());
    }

    #[test]
    fn the_same_role_in_two_spellings_is_merged() {
        let recipients = StaticRecipients::new([
            ("WorkspaceOwner", vec!["a@x"]),
            ("workspace_owner", vec!["b@x"]),
        ]);
        assert_eq!(recipients.by_role().len(), 1);
        assert_eq!(recipients.by_role()["workspace_owner"], ["a@x", "b@x"]);
    }
}
