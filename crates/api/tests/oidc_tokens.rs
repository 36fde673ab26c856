//! OIDC bearer tokens checked against a local issuer whose keys are generated here:
//! what is accepted, what is refused and why, and how the key set is fetched.

#![allow(clippy::unwrap_used)]

mod idp;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idp::{AUDIENCE, EcSigningKey, Idp, RsaKey, hmac_token, now, unsigned_token};
use steward_api::http::auth::{Clock, KeySetError, OidcConfig, OidcVerifier, TokenError};

fn verifier(idp: &Idp) -> OidcVerifier {
    OidcVerifier::new(OidcConfig {
        issuer: idp.issuer.clone(),
        audience: AUDIENCE.to_owned(),
        jwks_url: None,
    })
    .unwrap()
}

/// Ensures that RS256 and ES256 tokens of the issuer are accepted and name their user:
/// `oid` before `sub`, `preferred_username` before `email`, only TRE's global roles.
#[tokio::test]
async fn rs256_and_es256_tokens_name_their_user() {
    let idp = Idp::start().await;
    let verifier = verifier(&idp);

    let user = verifier.verify(&idp.token("oid-1", &["TREAdmin", "Other"])).await.unwrap();
    assert_eq!(user.id, "oid-1");
    assert_eq!(user.name, "User oid-1");
    assert_eq!(user.email, "oid-1@example.com");
    assert_eq!(user.roles, ["TREAdmin"]);

    let mut claims = idp.claims("ignored", &["TREUser"]);
    let object = claims.as_object_mut().unwrap();
    object.remove("oid");
    object.remove("preferred_username");
    object.insert("email".into(), "e@example.com".into());
    let user = verifier.verify(&idp.ec.sign(&claims)).await.unwrap();
    assert_eq!(user.id, "sub-ignored", "sub when there is no oid");
    assert_eq!(user.email, "e@example.com", "email when there is no preferred_username");
    assert_eq!(user.roles, ["TREUser"]);
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (1, 1), "keys are cached");
}

/// Ensures that an expired token and one not yet valid are refused, beyond the leeway
/// only.
#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused() {
    let idp = Idp::start().await;
    let verifier = verifier(&idp);
    let mut expired = idp.claims("u", &[]);
    expired["exp"] = (now() - 3600).into();
    let error = verifier.verify(&idp.rsa.sign(&expired)).await.unwrap_err();
    assert!(matches!(error, TokenError::Expired), "{error:?}");

    let mut early = idp.claims("u", &[]);
    early["nbf"] = (now() + 3600).into();
    let error = verifier.verify(&idp.rsa.sign(&early)).await.unwrap_err();
    assert!(matches!(error, TokenError::NotYetValid), "{error:?}");

    // Within the leeway, a clock a little off does not matter.
    let mut skewed = idp.claims("u", &[]);
    skewed["exp"] = (now() - 5).into();
    skewed["nbf"] = (now() + 5).into();
    assert!(verifier.verify(&idp.rsa.sign(&skewed)).await.is_ok());

    let mut no_exp = idp.claims("u", &[]);
    no_exp.as_object_mut().unwrap().remove("exp");
    let error = verifier.verify(&idp.rsa.sign(&no_exp)).await.unwrap_err();
    assert!(matches!(error, TokenError::Invalid(_)), "{error:?}");
}

/// Ensures that a token for another audience, or from another issuer, is refused even
/// though its signature is good.
#[tokio::test]
async fn wrong_audience_and_wrong_issuer_are_refused() {
    let idp = Idp::start().await;
    let verifier = verifier(&idp);
    let mut other_audience = idp.claims("u", &[]);
    other_audience["aud"] = "api://someone-else".into();
    let error = verifier.verify(&idp.rsa.sign(&other_audience)).await.unwrap_err();
    assert!(matches!(error, TokenError::Audience), "{error:?}");

    let mut other_issuer = idp.claims("u", &[]);
    other_issuer["iss"] = "https://login.example/other".into();
    let error = verifier.verify(&idp.rsa.sign(&other_issuer)).await.unwrap_err();
    assert!(matches!(error, TokenError::Issuer), "{error:?}");
}

/// Ensures that `alg: none`, an HMAC token whose secret is the issuer's public key, and
/// an ES256 token naming the RSA key are refused.
#[tokio::test]
async fn none_hmac_and_mismatched_algorithms_are_refused() {
    let idp = Idp::start().await;
    let verifier = verifier(&idp);
    let claims = idp.claims("u", &["TREAdmin"]);

    let error = verifier.verify(&unsigned_token("rsa-1", &claims)).await.unwrap_err();
    assert!(matches!(&error, TokenError::Algorithm(alg) if alg == "none"), "{error:?}");

    let forged = hmac_token("rsa-1", &idp.rsa.public_pem(), &claims);
    let error = verifier.verify(&forged).await.unwrap_err();
    assert!(matches!(&error, TokenError::Algorithm(alg) if alg == "HS256"), "{error:?}");

    let impostor = EcSigningKey::generate("rsa-1");
    let error = verifier.verify(&impostor.sign(&claims)).await.unwrap_err();
    assert!(matches!(&error, TokenError::KeyMismatch(kid) if kid == "rsa-1"), "{error:?}");

    let error = verifier.verify("not.a-token").await.unwrap_err();
    assert!(matches!(error, TokenError::Malformed), "{error:?}");
}

/// Ensures that a token signed by another key under a known `kid` is refused.
#[tokio::test]
async fn a_signature_by_another_key_is_refused() {
    let idp = Idp::start().await;
    let verifier = verifier(&idp);
    let thief = RsaKey::generate("rsa-1");
    let error = verifier.verify(&thief.sign(&idp.claims("u", &["TREAdmin"]))).await.unwrap_err();
    assert!(matches!(error, TokenError::Signature), "{error:?}");
}

/// A clock the test moves by hand.
fn manual_clock() -> (Clock, Arc<Mutex<Duration>>) {
    let start = Instant::now();
    let offset = Arc::new(Mutex::new(Duration::ZERO));
    let read = offset.clone();
    (Arc::new(move || start + *read.lock().unwrap()), offset)
}

/// Ensures that an unknown `kid` makes the verifier fetch the key set again once, that
/// further unknown `kid`s within the interval fetch nothing (a key the issuer rotated in
/// meanwhile included), and that after the interval the rotated key is found.
#[tokio::test]
async fn an_unknown_kid_refetches_the_keys_at_most_once_per_interval() {
    let idp = Idp::start().await;
    let (clock, offset) = manual_clock();
    let verifier = verifier(&idp).with_refetch_interval(Duration::from_secs(60)).with_clock(clock);
    verifier.verify(&idp.token("u", &[])).await.unwrap();
    assert_eq!(idp.jwks_fetches(), 1);

    *offset.lock().unwrap() = Duration::from_secs(61);
    let stranger = RsaKey::generate("rsa-unknown");
    let error = verifier.verify(&stranger.sign(&idp.claims("u", &[]))).await.unwrap_err();
    assert!(matches!(&error, TokenError::UnknownKey(kid) if kid == "rsa-unknown"), "{error:?}");
    assert_eq!(idp.jwks_fetches(), 2, "one refetch for the unknown kid");

    for kid in ["x-1", "x-2", "x-3"] {
        let token = RsaKey::generate(kid).sign(&idp.claims("u", &[]));
        let error = verifier.verify(&token).await.unwrap_err();
        assert!(matches!(error, TokenError::UnknownKey(_)), "{error:?}");
    }
    let rotated = RsaKey::generate("rsa-2");
    idp.add_key(rotated.jwk());
    let token = rotated.sign(&idp.claims("rotated", &[]));
    let error = verifier.verify(&token).await.unwrap_err();
    assert!(matches!(error, TokenError::UnknownKey(_)), "{error:?}");
    assert_eq!(idp.jwks_fetches(), 2, "rate-limited: no fetch within the interval");

    *offset.lock().unwrap() = Duration::from_secs(122);
    let user = verifier.verify(&token).await.unwrap();
    assert_eq!(user.id, "rotated");
    assert_eq!(idp.jwks_fetches(), 3);
    // Known keys need no fetch.
    verifier.verify(&idp.token("u", &[])).await.unwrap();
    assert_eq!(idp.jwks_fetches(), 3);
}

/// Ensures that `STEWARD_AUTH_JWKS_URL` is used instead of discovery, and that a
/// discovery document naming another issuer, or an issuer that does not answer, leaves
/// tokens unchecked (unavailable, not accepted).
#[tokio::test]
async fn the_key_set_comes_from_discovery_or_the_override() {
    let idp = Idp::start().await;
    let direct = OidcVerifier::new(OidcConfig {
        issuer: idp.issuer.clone(),
        audience: AUDIENCE.to_owned(),
        jwks_url: Some(format!("{}/keys", idp.issuer)),
    })
    .unwrap();
    direct.verify(&idp.token("u", &[])).await.unwrap();
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (0, 1));

    idp.set_discovered_issuer("https://impostor.example");
    let error = verifier(&idp).verify(&idp.token("u", &[])).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(
        steward_core::error_chain(&error).contains("impostor.example"),
        "{}",
        steward_core::error_chain(&error)
    );

    // Nothing listens on port 9 of the loopback address.
    let gone = OidcVerifier::new(OidcConfig {
        issuer: "http://127.0.0.1:9".to_owned(),
        audience: AUDIENCE.to_owned(),
        jwks_url: None,
    })
    .unwrap();
    let error = gone.verify(&idp.token("u", &[])).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
}

fn config(issuer: &str, jwks_url: Option<&str>) -> OidcConfig {
    OidcConfig {
        issuer: issuer.to_owned(),
        audience: AUDIENCE.to_owned(),
        jwks_url: jwks_url.map(str::to_owned),
    }
}

/// Ensures that the issuer and the key set must be https URLs, plain http allowed only
/// on a loopback host, and that a discovery document naming a plain-http key set
/// elsewhere is not fetched from.
#[tokio::test]
async fn the_issuer_and_the_key_set_need_https_except_on_loopback() {
    for (issuer, jwks) in [
        ("http://login.example/tenant", None),
        ("https://login.example/tenant", Some("http://login.example/keys")),
        ("ftp://login.example/tenant", None),
        ("not a url", None),
    ] {
        let error = OidcVerifier::new(config(issuer, jwks)).unwrap_err();
        assert!(matches!(error, KeySetError::InsecureUrl { .. }), "{issuer} {jwks:?}: {error:?}");
    }
    for issuer in [
        "https://login.example/tenant",
        "http://127.0.0.1:1",
        "http://localhost:1",
        "http://[::1]:1",
    ] {
        assert!(OidcVerifier::new(config(issuer, None)).is_ok(), "{issuer}");
    }

    let idp = Idp::start().await;
    idp.set_jwks_uri("http://keys.example/keys");
    let error = verifier(&idp).verify(&idp.token("u", &[])).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    let chain = steward_core::error_chain(&error);
    assert!(chain.contains("https"), "{chain}");
    assert_eq!(idp.jwks_fetches(), 0);
}

/// Ensures that a redirect is never followed: a key set that answers one is no key set.
#[tokio::test]
async fn redirects_are_not_followed() {
    let idp = Idp::start().await;
    let moved = format!("{}/moved", idp.issuer);
    let verifier = OidcVerifier::new(config(&idp.issuer, Some(&moved))).unwrap();
    let error = verifier.verify(&idp.token("u", &[])).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(steward_core::error_chain(&error).contains("307"), "{error:?}");
    assert_eq!(idp.jwks_fetches(), 0, "the redirect's target is never fetched");
}

/// Ensures that while no key could be fetched, every token is unavailable (503), not
/// refused (401): also the requests that come before the failed fetch may be retried.
#[tokio::test]
async fn without_keys_every_token_is_unavailable_not_refused() {
    let idp = Idp::start().await;
    // Nothing listens on port 9 of the loopback address.
    let gone = OidcVerifier::new(config("http://127.0.0.1:9", None)).unwrap();
    for attempt in 0..3 {
        let error = gone.verify(&idp.token("u", &[])).await.unwrap_err();
        assert!(error.is_unavailable(), "attempt {attempt}: {error:?}");
    }
}

/// Ensures that a `kid` the key set names twice verifies nothing: neither the first key
/// nor the last silently wins, while the other keys stay usable.
#[tokio::test]
async fn a_kid_named_twice_in_the_key_set_is_refused() {
    let idp = Idp::start().await;
    let twin = RsaKey::generate("rsa-1");
    idp.add_key(twin.jwk());
    let verifier = verifier(&idp);
    for token in [idp.token("u", &[]), twin.sign(&idp.claims("u", &[]))] {
        let error = verifier.verify(&token).await.unwrap_err();
        assert!(matches!(&error, TokenError::UnknownKey(kid) if kid == "rsa-1"), "{error:?}");
    }
    let user = verifier.verify(&idp.ec.sign(&idp.claims("ec-user", &[]))).await.unwrap();
    assert_eq!(user.id, "ec-user");
}

/// Ensures that an issuer that hangs while old keys are refreshed stalls only the
/// request that fetches: the others meanwhile are checked with the keys there are.
#[tokio::test]
async fn a_hanging_issuer_stalls_no_request_behind_the_refresh() {
    let idp = Idp::start().await;
    let (clock, offset) = manual_clock();
    let verifier = Arc::new(verifier(&idp).with_clock(clock));
    verifier.verify(&idp.token("u", &[])).await.unwrap();
    idp.jwks_requested().await; // the permit of the first fetch
    assert_eq!(idp.jwks_fetches(), 1);

    idp.set_hanging(true);
    *offset.lock().unwrap() = steward_api::http::auth::KEYS_MAX_AGE + Duration::from_secs(1);
    let fetching = tokio::spawn({
        let (verifier, token) = (verifier.clone(), idp.token("first", &[]));
        async move { verifier.verify(&token).await.map(|user| user.id) }
    });
    idp.jwks_requested().await;
    // The refresh hangs; a request now is not held up behind it.
    let user =
        tokio::time::timeout(Duration::from_secs(2), verifier.verify(&idp.token("next", &[])))
            .await
            .expect("the request waited for the hanging refresh")
            .unwrap();
    assert_eq!(user.id, "next");
    fetching.abort();
}

/// Ensures that an RSA key shorter than 2048 bits in the issuer's key set verifies
/// nothing: a token signed with it is refused, not accepted.
#[tokio::test]
async fn a_weak_rsa_key_in_the_key_set_verifies_nothing() {
    let idp = Idp::start().await;
    let verifier = verifier(&idp);
    let weak = RsaKey::generate_with_bits("weak-1024", 1024);
    let strong = RsaKey::generate("strong-2048");
    idp.add_key(weak.jwk());
    idp.add_key(strong.jwk());
    let claims = idp.claims("u-1", &["TREUser"]);
    let refused = verifier.verify(&weak.sign_plainly(&claims)).await;
    assert!(refused.is_err(), "{refused:?}");
    // The same signing, with a key of 2048 bits, passes: the size is what is refused.
    assert!(verifier.verify(&strong.sign_plainly(&claims)).await.is_ok());
}
