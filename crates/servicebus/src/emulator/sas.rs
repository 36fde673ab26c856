//! Shared access signatures: making tokens and checking the `Authorization` header.
//!
//! A token is `SharedAccessSignature sr=<url-encoded resource URI>&sig=<url-encoded
//! signature>&se=<expiry, unix seconds>&skn=<key name>`, where the signature is the
//! base64 HMAC-SHA256, keyed with the key's text, of `<sr as it appears in the token>`,
//! a newline and `<se>`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

/// What `application/x-www-form-urlencoded` leaves alone, as Service Bus SDKs encode.
const FORM: &AsciiSet = &NON_ALPHANUMERIC.remove(b'*').remove(b'-').remove(b'.').remove(b'_');

/// Makes a shared access signature token for `resource_uri` (for example
/// `https://<namespace>.servicebus.windows.net/<queue>`), valid until `expiry`.
///
/// It is the value of an `Authorization` header, as Microsoft's "Generate SAS token"
/// documentation builds it.
///
/// # Examples
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use steward_servicebus::emulator::sas_token;
///
/// let expiry = SystemTime::now() + Duration::from_secs(3600);
/// let token = sas_token("https://ns.servicebus.windows.net/jobs", "send", "c2VjcmV0", expiry);
/// assert!(token.starts_with("SharedAccessSignature sr=https%3A%2F%2Fns.servicebus.windows.net%2Fjobs&sig="));
/// assert!(token.ends_with("&skn=send"));
/// ```
#[must_use]
pub fn sas_token(resource_uri: &str, key_name: &str, key: &str, expiry: SystemTime) -> String {
    let sr = utf8_percent_encode(resource_uri, FORM).to_string();
    let se = expiry.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let signature = BASE64.encode(sign(key, &sr, &se.to_string()).finalize().into_bytes());
    let sig = utf8_percent_encode(&signature, FORM);
    let skn = utf8_percent_encode(key_name, FORM);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={skn}")
}

fn sign(key: &str, sr: &str, se: &str) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256>>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(se.as_bytes());
    mac
}

/// Why a request was refused with 401. The texts follow the service's error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    Missing,
    Malformed(String),
    UnknownKeyName(String),
    InvalidSignature,
    Expired { expiry: u64 },
    OutsideScope { scope: String, path: String },
    BearerRejected,
    SchemeNotAccepted,
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("MissingToken: the request has no Authorization header"),
            Self::Malformed(why) => write!(f, "MalformedToken: {why}"),
            Self::UnknownKeyName(name) => write!(
                f,
                "InvalidSignature: the SharedAccessKeyName {name:?} is not a key of this namespace"
            ),
            Self::InvalidSignature => {
                f.write_str("InvalidSignature: the token has an invalid signature")
            }
            Self::Expired { expiry } => {
                write!(f, "ExpiredToken: the token expired at {expiry} (unix seconds)")
            }
            Self::OutsideScope { scope, path } => write!(
                f,
                "InvalidAudience: the token's resource {scope:?} does not cover the path {path:?}"
            ),
            Self::BearerRejected => f.write_str("InvalidToken: the bearer token is not accepted"),
            Self::SchemeNotAccepted => f.write_str(
                "InvalidToken: the Authorization header must be a SharedAccessSignature or a Bearer token",
            ),
        }
    }
}

/// The credentials an emulator accepts. With none configured, every request is let in.
#[derive(Clone, Default)]
pub(crate) struct Authenticator {
    keys: HashMap<String, String>,
    bearer_tokens: HashSet<String>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key names are not secret; keys and tokens are.
        let mut names: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Authenticator")
            .field("sas_key_names", &names)
            .field("bearer_tokens", &self.bearer_tokens.len())
            .finish()
    }
}

impl Authenticator {
    pub(crate) fn add_key(&mut self, name: String, key: String) {
        self.keys.insert(name, key);
    }

    pub(crate) fn add_bearer_token(&mut self, token: String) {
        self.bearer_tokens.insert(token);
    }

    /// Whether requests need no credentials.
    pub(crate) fn is_open(&self) -> bool {
        self.keys.is_empty() && self.bearer_tokens.is_empty()
    }

    /// Checks an `Authorization` header for a request to `path` (percent-encoded, as
    /// on the request line) at `now`.
    pub(crate) fn check(
        &self,
        header: Option<&str>,
        path: &str,
        now: SystemTime,
    ) -> Result<(), AuthFailure> {
        if self.is_open() {
            return Ok(());
        }
        let header = header.map(str::trim).ok_or(AuthFailure::Missing)?;
        if let Some(token) = strip_prefix_ignore_case(header, "SharedAccessSignature ") {
            self.check_sas(token.trim(), path, now)
        } else if let Some(token) = strip_prefix_ignore_case(header, "Bearer ") {
            if self.bearer_tokens.contains(token.trim()) {
                Ok(())
            } else {
                Err(AuthFailure::BearerRejected)
            }
        } else {
            Err(AuthFailure::SchemeNotAccepted)
        }
    }

    fn check_sas(&self, token: &str, path: &str, now: SystemTime) -> Result<(), AuthFailure> {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for pair in token.split('&') {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| AuthFailure::Malformed(format!("{pair:?} is not name=value")))?;
            fields.insert(name.trim(), value.trim());
        }
        let field = |name: &str| {
            fields
                .get(name)
                .copied()
                .ok_or_else(|| AuthFailure::Malformed(format!("the token has no {name}")))
        };
        let (sr, sig, se, skn) = (field("sr")?, field("sig")?, field("se")?, field("skn")?);
        let skn = decode(skn);
        let key = self.keys.get(&skn).ok_or(AuthFailure::UnknownKeyName(skn))?;
        let expiry: u64 = se
            .parse()
            .map_err(|_| AuthFailure::Malformed(format!("se {se:?} is not unix seconds")))?;
        // A `+` left unencoded in the signature is base64, not a space.
        let signature = BASE64
            .decode(percent_decode_str(sig).decode_utf8_lossy().as_bytes())
            .map_err(|_| AuthFailure::InvalidSignature)?;
        sign(key, sr, se).verify_slice(&signature).map_err(|_| AuthFailure::InvalidSignature)?;
        let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if expiry <= now_secs {
            return Err(AuthFailure::Expired { expiry });
        }
        let scope = decode(sr);
        if !covers(&scope_path(&scope), &decode(path)) {
            return Err(AuthFailure::OutsideScope { scope, path: decode(path) });
        }
        Ok(())
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// Percent-decodes a form-encoded value (`+` is a space).
fn decode(text: &str) -> String {
    percent_decode_str(&text.replace('+', " ")).decode_utf8_lossy().into_owned()
}

/// The path of a token's resource URI: `https://ns.servicebus.windows.net/q/messages`
/// → `/q/messages`; `ns.servicebus.windows.net` → `/`. Query and fragment dropped.
fn scope_path(scope: &str) -> String {
    let without_scheme = scope.split_once("://").map_or(scope, |(_, rest)| rest);
    let without_query = without_scheme.split(['?', '#']).next().unwrap_or_default();
    match without_query.find('/') {
        Some(at) => without_query[at..].to_owned(),
        None => "/".to_owned(),
    }
}

/// Whether `scope` covers `path`: equal, or a prefix ending at a segment boundary.
/// Entity names are case-insensitive in Service Bus.
fn covers(scope: &str, path: &str) -> bool {
    let scope = scope.trim_end_matches('/').to_ascii_lowercase();
    let path = path.to_ascii_lowercase();
    if scope.is_empty() {
        return true;
    }
    path.strip_prefix(&scope).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn authenticator() -> Authenticator {
        let mut auth = Authenticator::default();
        auth.add_key("send".into(), "key-one".into());
        auth
    }

    fn in_an_hour() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    #[test]
    fn token_signed_with_the_key_is_accepted_for_paths_under_its_resource() {
        let auth = authenticator();
        let token =
            sas_token("https://ns.servicebus.windows.net/jobs", "send", "key-one", in_an_hour());
        let now = SystemTime::now();
        assert_eq!(auth.check(Some(&token), "/jobs/messages/head", now), Ok(()));
        assert_eq!(auth.check(Some(&token), "/JOBS/messages", now), Ok(()));
        assert_eq!(auth.check(Some(&token), "/jobs", now), Ok(()));
        assert!(matches!(
            auth.check(Some(&token), "/jobs2/messages", now),
            Err(AuthFailure::OutsideScope { .. })
        ));
    }

    #[test]
    fn namespace_wide_token_without_scheme_covers_everything() {
        let auth = authenticator();
        let token = sas_token("ns.servicebus.windows.net", "send", "key-one", in_an_hour());
        assert_eq!(auth.check(Some(&token), "/a/b/messages", SystemTime::now()), Ok(()));
    }

    #[test]
    fn wrong_key_unknown_name_expiry_and_garbage_are_refused() {
        let auth = authenticator();
        let uri = "https://ns.servicebus.windows.net/jobs";
        let now = SystemTime::now();
        let path = "/jobs/messages";
        let wrong_key = sas_token(uri, "send", "key-two", in_an_hour());
        assert_eq!(auth.check(Some(&wrong_key), path, now), Err(AuthFailure::InvalidSignature));
        let wrong_name = sas_token(uri, "listen", "key-one", in_an_hour());
        assert_eq!(
            auth.check(Some(&wrong_name), path, now),
            Err(AuthFailure::UnknownKeyName("listen".into()))
        );
        let expired = sas_token(uri, "send", "key-one", now - Duration::from_secs(1));
        assert!(matches!(auth.check(Some(&expired), path, now), Err(AuthFailure::Expired { .. })));
        assert_eq!(auth.check(None, path, now), Err(AuthFailure::Missing));
        assert!(matches!(
            auth.check(Some("SharedAccessSignature sr=x"), path, now),
            Err(AuthFailure::Malformed(_))
        ));
        assert_eq!(auth.check(Some("Basic abc"), path, now), Err(AuthFailure::SchemeNotAccepted));
    }

    #[test]
    fn tampered_resource_breaks_the_signature() {
        let auth = authenticator();
        let token =
            sas_token("https://ns.servicebus.windows.net/a", "send", "key-one", in_an_hour());
        let tampered = token.replace("%2Fa&", "%2Fb&");
        assert_eq!(
            auth.check(Some(&tampered), "/b/messages", SystemTime::now()),
            Err(AuthFailure::InvalidSignature)
        );
    }

    #[test]
    fn bearer_tokens_are_matched_exactly_and_no_credentials_means_open() {
        let mut auth = Authenticator::default();
        assert!(auth.is_open());
        assert_eq!(auth.check(None, "/q", SystemTime::now()), Ok(()));
        auth.add_bearer_token("t0k3n".into());
        assert_eq!(auth.check(Some("Bearer t0k3n"), "/q", SystemTime::now()), Ok(()));
        assert_eq!(
            auth.check(Some("Bearer other"), "/q", SystemTime::now()),
            Err(AuthFailure::BearerRejected)
        );
    }

    #[test]
    fn debug_shows_key_names_but_not_keys() {
        let text = format!("{:?}", authenticator());
        assert!(text.contains("send"));
        assert!(!text.contains("key-one"));
    }
}
