//! A test OIDC issuer: RSA and P-256 keys generated here, tokens minted with them, and
//! its discovery document and key set served on 127.0.0.1, counting the fetches.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use serde_json::{Value, json};

/// The audience of the tokens minted here.
pub const AUDIENCE: &str = "api://steward-test";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    )
    .unwrap()
}

/// An RSA signing key with its `kid`.
pub struct RsaKey {
    pub kid: String,
    key: Rsa<Private>,
}

impl RsaKey {
    pub fn generate(kid: &str) -> Self {
        Self::generate_with_bits(kid, 2048)
    }

    /// A key of `bits` bits: a weak one, to see that it is refused.
    pub fn generate_with_bits(kid: &str, bits: u32) -> Self {
        RsaKey { kid: kid.to_owned(), key: Rsa::generate(bits).unwrap() }
    }

    pub fn jwk(&self) -> Value {
        json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
               "n": b64(&self.key.n().to_vec()), "e": b64(&self.key.e().to_vec())})
    }

    /// The public key in PEM, as an attacker would have it.
    pub fn public_pem(&self) -> Vec<u8> {
        self.key.public_key_to_pem().unwrap()
    }

    /// RS256 signed with OpenSSL rather than `jsonwebtoken`, which refuses to sign
    /// with a key shorter than 2048 bits.
    pub fn sign_plainly(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = PKey::from_rsa(self.key.clone()).unwrap();
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key).unwrap();
        let signature = signer.sign_oneshot_to_vec(input.as_bytes()).unwrap();
        format!("{input}.{}", b64(&signature))
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_rsa_der(&self.key.private_key_to_der().unwrap());
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

/// A P-256 signing key with its `kid`.
pub struct EcSigningKey {
    pub kid: String,
    key: EcKey<Private>,
}

impl EcSigningKey {
    pub fn generate(kid: &str) -> Self {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        EcSigningKey { kid: kid.to_owned(), key: EcKey::generate(&group).unwrap() }
    }

    pub fn jwk(&self) -> Value {
        let mut ctx = BigNumContext::new().unwrap();
        let (mut x, mut y) =
            (openssl::bn::BigNum::new().unwrap(), openssl::bn::BigNum::new().unwrap());
        self.key
            .public_key()
            .affine_coordinates(self.key.group(), &mut x, &mut y, &mut ctx)
            .unwrap();
        json!({"kty": "EC", "use": "sig", "crv": "P-256", "kid": self.kid,
               "x": b64(&x.to_vec_padded(32).unwrap()), "y": b64(&y.to_vec_padded(32).unwrap())})
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let pkcs8 = PKey::from_ec_key(self.key.clone()).unwrap().private_key_to_pkcs8().unwrap();
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&pkcs8)).unwrap()
    }
}

struct Served {
    issuer: Mutex<String>,
    /// The discovery document's `jwks_uri`, when not `<issuer>/keys`.
    jwks_uri: Mutex<Option<String>>,
    keys: Mutex<Vec<Value>>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
    /// While set, the key set is never answered.
    hang: std::sync::atomic::AtomicBool,
    /// A permit for every request of the key set.
    jwks_requested: tokio::sync::Notify,
}

/// The test issuer, serving until dropped.
pub struct Idp {
    pub issuer: String,
    pub rsa: RsaKey,
    pub ec: EcSigningKey,
    served: Arc<Served>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn discovery(State(served): State<Arc<Served>>) -> Json<Value> {
    served.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let issuer = served.issuer.lock().unwrap().clone();
    let jwks_uri =
        served.jwks_uri.lock().unwrap().clone().unwrap_or_else(|| format!("{issuer}/keys"));
    Json(
        json!({"issuer": issuer, "jwks_uri": jwks_uri, "id_token_signing_alg_values_supported": ["RS256", "ES256"]}),
    )
}

/// A redirect to the key set.
async fn moved() -> axum::response::Redirect {
    axum::response::Redirect::temporary("/keys")
}

async fn keys(State(served): State<Arc<Served>>) -> Json<Value> {
    served.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    served.jwks_requested.notify_one();
    if served.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    Json(json!({"keys": served.keys.lock().unwrap().clone()}))
}

impl Idp {
    /// Starts serving, with one RSA key (`rsa-1`) and one P-256 key (`ec-1`).
    pub async fn start() -> Idp {
        let rsa = RsaKey::generate("rsa-1");
        let ec = EcSigningKey::generate("ec-1");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(Served {
            issuer: Mutex::new(issuer.clone()),
            jwks_uri: Mutex::new(None),
            // A key this service cannot use sits among them and must not spoil the set.
            keys: Mutex::new(vec![
                json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
                rsa.jwk(),
                ec.jwk(),
            ]),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
            hang: std::sync::atomic::AtomicBool::new(false),
            jwks_requested: tokio::sync::Notify::new(),
        });
        // The test issuer's own server, not the service's router: it has no OpenAPI
        // document to keep in step.
        #[allow(clippy::disallowed_methods)]
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/keys", get(keys))
            .route("/moved", get(moved))
            .with_state(served.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Idp { issuer, rsa, ec, served, server }
    }

    /// Adds a key to the served set.
    pub fn add_key(&self, jwk: Value) {
        self.served.keys.lock().unwrap().push(jwk);
    }

    /// Makes the key set hang (never answer) or answer again.
    pub fn set_hanging(&self, hang: bool) {
        self.served.hang.store(hang, Ordering::SeqCst);
    }

    /// Waits until the key set is requested (a request before the call counts once).
    pub async fn jwks_requested(&self) {
        self.served.jwks_requested.notified().await;
    }

    /// Makes the discovery document name another key set.
    pub fn set_jwks_uri(&self, uri: &str) {
        *self.served.jwks_uri.lock().unwrap() = Some(uri.to_owned());
    }

    /// Makes the discovery document name another issuer.
    pub fn set_discovered_issuer(&self, issuer: &str) {
        *self.served.issuer.lock().unwrap() = issuer.to_owned();
    }

    pub fn jwks_fetches(&self) -> usize {
        self.served.jwks_fetches.load(Ordering::SeqCst)
    }

    pub fn discovery_fetches(&self) -> usize {
        self.served.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Valid claims for `oid`, with these global roles.
    pub fn claims(&self, oid: &str, roles: &[&str]) -> Value {
        let now = now();
        json!({
            "iss": self.issuer, "aud": AUDIENCE, "exp": now + 600, "nbf": now - 10, "iat": now - 10,
            "oid": oid, "sub": format!("sub-{oid}"), "name": format!("User {oid}"),
            "preferred_username": format!("{oid}@example.com"), "roles": roles,
        })
    }

    /// An RS256 token for `oid` with these roles.
    pub fn token(&self, oid: &str, roles: &[&str]) -> String {
        self.rsa.sign(&self.claims(oid, roles))
    }
}

/// A token with `alg: none` and no signature.
pub fn unsigned_token(kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT", "kid": kid});
    format!("{}.{}.", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

/// An HS256 token whose HMAC secret is `secret` (e.g. the issuer's public key).
pub fn hmac_token(kid: &str, secret: &[u8], claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}
