//! Signed assertions (RFC 7523): the claims of a client assertion or a JWT bearer grant
//! assertion, and the JWT bearer grant itself (§2.1).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use super::{ClientAuth, Endpoint, SigningKey};
use crate::error::{ConfigError, RefreshError};
use crate::jws::KeyError;
use crate::source::{RefreshContext, TokenSource};
use crate::token::{Secret, Token};
use crate::transport::Transport;

/// `grant_type` of the JWT bearer grant (RFC 7523 §2.1).
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The claims of an assertion (RFC 7523 §3): `iss`, `sub`, `aud`, `iat`, `exp` = `iat`
/// + `lifetime`, a fresh random `jti`, and `extra` on top (which may not replace them).
pub(super) fn claims(
    key: &SigningKey,
    issuer: &str,
    subject: &str,
    audience: &str,
    now: SystemTime,
    lifetime: Duration,
    extra: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<serde_json::Value, RefreshError> {
    // A clock before 1970 cannot be written as a NumericDate; the server would refuse
    // the assertion anyway.
    let iat = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| RefreshError::transient("the clock reads before 1970"))?
        .as_secs();
    let jti = key.random_id().map_err(sign_error)?;
    let mut claims = serde_json::Map::new();
    if let Some(extra) = extra {
        claims.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    for (name, value) in [
        ("iss", serde_json::Value::from(issuer)),
        ("sub", subject.into()),
        ("aud", audience.into()),
        ("iat", iat.into()),
        ("exp", iat.saturating_add(lifetime.as_secs()).into()),
        ("jti", jti.into()),
    ] {
        claims.insert(name.into(), value);
    }
    Ok(serde_json::Value::Object(claims))
}

/// A key that cannot sign now may sign on the next attempt (the random generator); a
/// key refused at load time never gets here.
pub(super) fn sign_error(error: KeyError) -> RefreshError {
    RefreshError::transient(error.to_string()).with_source(error)
}

/// The JWT bearer grant (RFC 7523 §2.1): an assertion signed by the client's key,
/// exchanged for an access token — how Google service accounts (and Salesforce, and
/// others) authenticate without a token endpoint secret. A new assertion for every
/// attempt; no refresh token (§2.1 has none).
///
/// The assertion's `iss` is the issuer given to [`new`](Self::new); `sub` defaults to
/// it ([`subject`](Self::subject) for a user to impersonate); `aud` defaults to the
/// token endpoint ([`audience`](Self::audience)). Claims an issuer wants beyond those —
/// Google's `scope` — go in with [`claim`](Self::claim).
///
/// ```no_run
/// # fn demo(transport: std::sync::Arc<dyn tokenflight::adapter::Transport>, pem: &str) -> Result<(), Box<dyn std::error::Error>> {
/// use tokenflight::oauth2::{JwtBearerGrant, SigningKey};
/// let key = SigningKey::from_pem(pem)?.with_key_id("private_key_id from the JSON file");
/// let source = JwtBearerGrant::new(
///     transport,
///     "https://oauth2.googleapis.com/token",
///     key,
///     "my-sa@my-project.iam.gserviceaccount.com",
/// )?
/// .claim("scope", "https://www.googleapis.com/auth/cloud-platform");
/// let flight = tokenflight::SingleFlight::builder().source(source).build()?;
/// # let _ = flight; Ok(()) }
/// ```
pub struct JwtBearerGrant {
    endpoint: Endpoint,
    key: SigningKey,
    issuer: String,
    subject: Option<String>,
    audience: Option<String>,
    lifetime: Duration,
    claims: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Debug for JwtBearerGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Claim values are not shown: users put all sorts in them.
        let claims: Vec<&str> = self.claims.keys().map(String::as_str).collect();
        f.debug_struct("JwtBearerGrant")
            .field("endpoint", &self.endpoint)
            .field("key", &self.key)
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("audience", &self.audience)
            .field("lifetime", &self.lifetime)
            .field("claims", &claims)
            .finish()
    }
}

impl JwtBearerGrant {
    /// A grant against `token_url` whose assertions `key` signs, issued by `issuer`
    /// (a service account's email, a client id); fails if the URL is not an absolute
    /// http(s) URL. The client is not authenticated otherwise unless told
    /// ([`client_id`](Self::client_id) and friends).
    pub fn new(
        transport: Arc<dyn Transport>,
        token_url: &str,
        key: SigningKey,
        issuer: &str,
    ) -> Result<Self, ConfigError> {
        Ok(JwtBearerGrant {
            endpoint: Endpoint::new(transport, token_url, "")?,
            key,
            issuer: issuer.to_owned(),
            subject: None,
            audience: None,
            lifetime: super::ASSERTION_LIFETIME,
            claims: serde_json::Map::new(),
        })
    }

    /// The assertion's `sub` (default: the issuer).
    pub fn subject(mut self, subject: &str) -> Self {
        self.subject = Some(subject.to_owned());
        self
    }

    /// The assertion's `aud` (default: the token endpoint's URL).
    pub fn audience(mut self, audience: &str) -> Self {
        self.audience = Some(audience.to_owned());
        self
    }

    /// How long each assertion is valid (default 60 s; Google accepts up to an hour).
    pub fn assertion_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// An extra claim in the assertion (Google's `scope`, say). The registered claims
    /// the grant sets (`iss`, `sub`, `aud`, `iat`, `exp`, `jti`) cannot be replaced.
    pub fn claim(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.claims.insert(name.to_owned(), value.into());
        self
    }

    /// The `scope` body parameter.
    pub fn scope(mut self, scope: &str) -> Self {
        self.endpoint.scope = Some(scope.to_owned());
        self
    }

    /// An extra body parameter; names the grant sets itself are ignored.
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.endpoint.add_param(name, value);
        self
    }

    /// The client's id, for servers that also want the client authenticated (§3.1).
    pub fn client_id(mut self, client_id: &str) -> Self {
        self.endpoint.client_id = client_id.to_owned();
        self
    }

    /// The client secret, sent as [`client_auth`](Self::client_auth) says.
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.endpoint.client_secret = Some(secret.into());
        self
    }

    /// How to send the client's credentials (default: HTTP Basic).
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.endpoint.client_auth = auth;
        self
    }

    /// Authenticates the client with its own signed assertion too (`private_key_jwt`).
    pub fn private_key_jwt(mut self, key: SigningKey) -> Self {
        self.endpoint.set_signing_key(key);
        self
    }
}

impl TokenSource for JwtBearerGrant {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin(async move {
            let audience = self
                .audience
                .clone()
                .unwrap_or_else(|| self.endpoint.audience());
            let claims = claims(
                &self.key,
                &self.issuer,
                self.subject.as_deref().unwrap_or(&self.issuer),
                &audience,
                cx.now,
                self.lifetime,
                Some(&self.claims),
            )?;
            let assertion = self.key.sign_jwt(&claims).map_err(sign_error)?;
            let grant = [
                ("grant_type", JWT_BEARER_GRANT),
                ("assertion", assertion.expose()),
            ];
            self.endpoint
                .exchange_with(&grant, cx.now, None, &[&assertion])
                .await
                .map_err(|(error, _)| error)
        })
    }
}
