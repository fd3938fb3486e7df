//! OAuth 2.0 token sources over a bare [`Transport`]: the `refresh_token` grant
//! (RFC 6749 §6), the `client_credentials` grant (§4.4), token exchange (RFC 8693,
//! [`TokenExchangeGrant`]) and, with the feature `private-key-jwt`, the JWT bearer grant
//! (RFC 7523 §2.1, `JwtBearerGrant`).
//!
//! All send a form-encoded POST, authenticate the client with HTTP Basic
//! (`client_secret_basic`, the default), in the body (`client_secret_post`, §2.3.1) or,
//! with the feature `private-key-jwt`, with an assertion signed by the client's key
//! (`private_key_jwt`, RFC 7523 §2.2: a new assertion for every attempt), and map the answer onto [`RefreshError`]s the coordinator acts
//! on ([C9](crate#c9)): `invalid_grant`, `invalid_client`, `unauthorized_client` (and the other
//! codes no retry can cure) are permanent; 5xx, 429, network failures and timeouts are
//! transient, with the server's `Retry-After` honoured. Responses are read up to
//! [`MAX_RESPONSE_BYTES`]. Secrets never appear in errors or `Debug` output ([C12](crate#c12)).
//!
//! ```no_run
//! # fn demo(transport: std::sync::Arc<dyn tokenflight::adapter::Transport>) -> Result<(), tokenflight::ConfigError> {
//! use tokenflight::oauth2::{ClientAuth, RefreshTokenGrant};
//! let source = RefreshTokenGrant::new(transport, "https://auth.example/oauth/token", "my-client")?
//!     .client_secret("s3cret")
//!     .client_auth(ClientAuth::Basic)
//!     .scope("read write")
//!     .param("audience", "https://api.example")
//!     .initial_refresh_token("refresh-from-login");
//! let flight = tokenflight::SingleFlight::builder().source(source).build()?;
//! # let _ = flight; Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use url::form_urlencoded;

use crate::error::{Cause, ConfigError, RefreshError};
use crate::source::{RefreshContext, TokenSource};
use crate::token::{Secret, Token};
use crate::token_response::{printable, retry_after};
use crate::transport::{HttpResponse, Transport, TransportError};

pub mod jwt {
    //! Reads the time claims (`exp`, `iat`, `nbf`) of a JWT *without verifying its
    //! signature*. This is only for scheduling: an access token's own `exp` tells when to
    //! refresh when a token response has no `expires_in`. Never use it to trust a token.
    //!
    //! Bad input gives a typed [`JwtError`], never a panic ([C13](crate#c13)).
    pub use crate::jwt::*;
}
pub use crate::token_response::{ErrorResponse, TokenResponse, TokenResponseError};

#[cfg(feature = "private-key-jwt")]
pub use crate::jws::{Algorithm, KeyError, SigningKey};
#[cfg(feature = "private-key-jwt")]
pub use assertion::JwtBearerGrant;
pub use exchange::{SubjectToken, TokenExchangeGrant, subject_from_fn, token_type};

#[cfg(feature = "private-key-jwt")]
mod assertion;
#[cfg(all(test, feature = "dpop"))]
mod dpop_tests;
mod exchange;

/// The largest token endpoint response read (passed to the transport as its body limit).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Parameter names the grants set themselves; [`RefreshTokenGrant::param`] ignores them.
const RESERVED_PARAMS: [&str; 11] = [
    "grant_type",
    "refresh_token",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "assertion",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "scope",
];

/// `client_assertion_type` of a signed JWT (RFC 7523 §2.2).
const CLIENT_ASSERTION_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1, RFC 7523 §2.2;
/// the names in parentheses are OpenID Connect's `token_endpoint_auth_method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientAuth {
    /// HTTP Basic with the form-urlencoded id and secret (`client_secret_basic`; the
    /// default, which servers must support). A client without a secret sends its
    /// `client_id` in the body.
    #[default]
    #[doc(alias = "client_secret_basic")]
    Basic,
    /// `client_id` and `client_secret` as body parameters (`client_secret_post`).
    #[doc(alias = "client_secret_post")]
    Body,
    /// A JWT signed by the client's private key (`private_key_jwt`, RFC 7523 §2.2):
    /// `client_assertion_type` and `client_assertion` in the body, a new assertion
    /// (fresh `jti`, `iat`, `exp`, `aud` = the token endpoint) for every attempt, dated
    /// by the coordinator's clock. Set with the grants' `private_key_jwt(key)`.
    #[cfg(feature = "private-key-jwt")]
    #[doc(alias = "private_key_jwt")]
    PrivateKeyJwt,
    /// A client assertion the client does not sign itself (RFC 7521 §4.2): a token
    /// from a [`SubjectToken`] — the federated token file of Azure / Entra workload
    /// identity — sent as the `client_assertion` of type JWT bearer, fetched anew for
    /// every attempt. Set with the grants' `client_assertion(source)`.
    ClientAssertion,
}

impl ClientAuth {
    /// `client_secret_basic`: [`ClientAuth::Basic`].
    pub const SECRET_BASIC: ClientAuth = ClientAuth::Basic;
    /// `client_secret_post`: [`ClientAuth::Body`].
    pub const SECRET_POST: ClientAuth = ClientAuth::Body;
}

/// How long a client assertion is valid after it is signed: long enough for a slow
/// round trip, short enough that a leaked one is soon useless (RFC 7523 §3 asks for a
/// limited window).
#[cfg(feature = "private-key-jwt")]
const ASSERTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// What both grants share: where and how to ask.
struct Endpoint {
    transport: Arc<dyn Transport>,
    token_url: http::Uri,
    client_id: String,
    client_secret: Option<Secret>,
    client_auth: ClientAuth,
    #[cfg(feature = "private-key-jwt")]
    signing_key: Option<SigningKey>,
    /// The DPoP key and nonces every token request proves possession with, and the
    /// token endpoint as a URL (its `htu`).
    #[cfg(feature = "dpop")]
    dpop: Option<(crate::dpop::Dpop, url::Url)>,
    /// Where a [`ClientAuth::ClientAssertion`] comes from.
    assertion_source: Option<Arc<dyn SubjectToken>>,
    scope: Option<String>,
    params: Vec<(String, String)>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Extra parameter values are not shown: users put all sorts in them.
        let params: Vec<&str> = self.params.iter().map(|(name, _)| name.as_str()).collect();
        let mut f = f.debug_struct("Endpoint");
        f.field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("client_auth", &self.client_auth);
        #[cfg(feature = "private-key-jwt")]
        f.field("signing_key", &self.signing_key);
        #[cfg(feature = "dpop")]
        f.field("dpop", &self.dpop.as_ref().map(|(dpop, _)| dpop));
        f.field("scope", &self.scope)
            .field("params", &params)
            .finish()
    }
}

impl Endpoint {
    fn new(
        transport: Arc<dyn Transport>,
        token_url: &str,
        client_id: &str,
    ) -> Result<Self, ConfigError> {
        // The URL is not echoed: it might carry credentials in its userinfo.
        let invalid =
            || ConfigError::InvalidSetting("token_url must be an absolute http(s) URL".into());
        let parsed = url::Url::parse(token_url).map_err(|_| invalid())?;
        if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
            return Err(invalid());
        }
        let token_url = parsed
            .as_str()
            .parse::<http::Uri>()
            .map_err(|_| invalid())?;
        Ok(Endpoint {
            transport,
            token_url,
            client_id: client_id.to_owned(),
            client_secret: None,
            client_auth: ClientAuth::default(),
            #[cfg(feature = "private-key-jwt")]
            signing_key: None,
            #[cfg(feature = "dpop")]
            dpop: None,
            assertion_source: None,
            scope: None,
            params: Vec::new(),
        })
    }

    fn set_assertion_source(&mut self, source: impl SubjectToken + 'static) {
        self.assertion_source = Some(Arc::new(source));
        self.client_auth = ClientAuth::ClientAssertion;
    }

    #[cfg(feature = "private-key-jwt")]
    fn set_signing_key(&mut self, key: SigningKey) {
        self.signing_key = Some(key);
        self.client_auth = ClientAuth::PrivateKeyJwt;
    }

    #[cfg(feature = "dpop")]
    fn set_dpop(&mut self, dpop: crate::dpop::Dpop) {
        // The URL was validated by `new`; `http::Uri` and `url::Url` agree on it.
        if let Ok(url) = url::Url::parse(&self.token_url.to_string()) {
            self.dpop = Some((dpop, url));
        }
    }

    /// Sends the grant request; with a DPoP key, each request carries a new proof, and
    /// a `400 use_dpop_nonce` answer (RFC 9449 §8) is followed by one resend with the
    /// server's nonce and a new proof and client assertion. That resend is part of the
    /// same attempt: the server refused the request before looking at the grant, so a
    /// refresh token is not spent by it. A second nonce demand is answered as is.
    async fn send_grant(
        &self,
        grant: &[(&str, &str)],
        now: SystemTime,
        external: Option<Secret>,
    ) -> Result<(HttpResponse, Option<Secret>), RefreshError> {
        #[cfg(feature = "dpop")]
        let mut nonce_resend = true;
        // Without DPoP there is nothing to resend for: the loop runs once.
        #[cfg_attr(not(feature = "dpop"), allow(clippy::never_loop))]
        loop {
            #[cfg_attr(not(feature = "dpop"), allow(unused_mut))]
            let (mut request, assertion) = self.request(grant, now, external.as_ref())?;
            #[cfg(feature = "dpop")]
            if let Some((dpop, url)) = &self.dpop {
                let nonce = dpop.nonces().get(url);
                let proof = dpop
                    .key()
                    .proof_at(&http::Method::POST, url, None, nonce.as_deref(), now)
                    .map_err(assertion::sign_error)?;
                let value = HeaderValue::try_from(proof.expose())
                    .map_err(|_| RefreshError::permanent("could not build the DPoP header"))?;
                request.headers_mut().insert(crate::dpop::DPOP, value);
            }
            let response = self
                .transport
                .send(request, MAX_RESPONSE_BYTES)
                .await
                .map_err(transport_error)?;
            // The external assertion is a secret of the request too.
            let assertion = assertion.or_else(|| external.clone());
            #[cfg(feature = "dpop")]
            if let Some((dpop, url)) = &self.dpop {
                let nonce = response
                    .headers()
                    .get(crate::dpop::DPOP_NONCE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|n| !n.is_empty());
                if let Some(nonce) = nonce {
                    dpop.nonces().set(url, nonce);
                    let demanded = response.status() == http::StatusCode::BAD_REQUEST
                        && ErrorResponse::parse(response.body())
                            .is_ok_and(|e| e.error == "use_dpop_nonce");
                    if demanded && std::mem::take(&mut nonce_resend) {
                        tracing::debug!("token endpoint demanded a DPoP nonce; resending once");
                        continue;
                    }
                }
            }
            return Ok((response, assertion));
        }
    }

    /// Where the token endpoint is, as the `aud` of a client assertion.
    #[cfg(feature = "private-key-jwt")]
    fn audience(&self) -> String {
        self.token_url.to_string()
    }

    /// A new client assertion (RFC 7523 §3): `iss` and `sub` the client, `aud` the token
    /// endpoint, a fresh `jti`; valid from `now` for [`ASSERTION_LIFETIME`].
    #[cfg(feature = "private-key-jwt")]
    fn client_assertion(&self, key: &SigningKey, now: SystemTime) -> Result<Secret, RefreshError> {
        let claims = assertion::claims(
            key,
            &self.client_id,
            &self.client_id,
            &self.audience(),
            now,
            ASSERTION_LIFETIME,
            None,
        )?;
        key.sign_jwt(&claims).map_err(assertion::sign_error)
    }

    fn has_dpop(&self) -> bool {
        #[cfg(feature = "dpop")]
        return self.dpop.is_some();
        #[cfg(not(feature = "dpop"))]
        false
    }

    fn add_param(&mut self, name: &str, value: &str) {
        if RESERVED_PARAMS.contains(&name) {
            tracing::warn!(
                name,
                "ignoring an extra token request parameter the grant sets itself"
            );
            return;
        }
        self.params.push((name.to_owned(), value.to_owned()));
    }

    /// The request for `grant`, and the client assertion it carries (a secret of the
    /// request, kept out of error messages).
    fn request(
        &self,
        grant: &[(&str, &str)],
        now: SystemTime,
        external: Option<&Secret>,
    ) -> Result<(http::Request<Bytes>, Option<Secret>), RefreshError> {
        // `now` dates client assertions; without them it is not needed.
        #[cfg(not(feature = "private-key-jwt"))]
        let _ = now;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.extend_pairs(grant.iter().copied());
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        form.extend_pairs(self.params.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let mut authorization = None;
        #[cfg_attr(not(feature = "private-key-jwt"), allow(unused_mut))]
        let mut assertion = None;
        match (self.client_auth, &self.client_secret) {
            (ClientAuth::ClientAssertion, _) => {
                let external = external.ok_or_else(|| {
                    RefreshError::permanent("client_assertion needs an assertion source")
                })?;
                if !self.client_id.is_empty() {
                    form.append_pair("client_id", &self.client_id);
                }
                form.append_pair("client_assertion_type", CLIENT_ASSERTION_JWT);
                form.append_pair("client_assertion", external.expose());
            }
            #[cfg(feature = "private-key-jwt")]
            (ClientAuth::PrivateKeyJwt, _) => {
                let key = self.signing_key.as_ref().ok_or_else(|| {
                    RefreshError::permanent("private_key_jwt needs a signing key")
                })?;
                let signed = self.client_assertion(key, now)?;
                if !self.client_id.is_empty() {
                    form.append_pair("client_id", &self.client_id);
                }
                form.append_pair("client_assertion_type", CLIENT_ASSERTION_JWT);
                form.append_pair("client_assertion", signed.expose());
                assertion = Some(signed);
            }
            (ClientAuth::Basic, Some(secret)) => {
                authorization = Some(basic_auth(&self.client_id, secret)?);
            }
            (ClientAuth::Body, Some(secret)) => {
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_secret", secret.expose());
            }
            // A public client identifies itself in the body (§3.2.1); a grant that
            // needs no client (an STS that trusts the subject token) sends nothing.
            (_, None) => {
                if !self.client_id.is_empty() {
                    form.append_pair("client_id", &self.client_id);
                }
            }
        }
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(Bytes::from(form.finish()))
            .map_err(|_| RefreshError::permanent("could not build the token request"))?;
        if let Some(value) = authorization {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        Ok((request, assertion))
    }

    /// Sends one grant request and turns the answer into a token. `used_refresh` is
    /// kept when the response brings no new refresh token.
    async fn exchange(
        &self,
        grant: &[(&str, &str)],
        now: SystemTime,
        used_refresh: Option<Secret>,
    ) -> Result<Token, RefreshError> {
        self.exchange_with(grant, now, used_refresh, &[])
            .await
            .map_err(|(error, _)| error)
    }

    /// [`exchange`](Self::exchange) that also says which §5.2 `error` code the server
    /// answered (for grants that classify some codes their own way) and keeps
    /// `secrets` (tokens the grant sent) out of the error message.
    async fn exchange_with(
        &self,
        grant: &[(&str, &str)],
        now: SystemTime,
        used_refresh: Option<Secret>,
        secrets: &[&Secret],
    ) -> Result<Token, (RefreshError, Option<String>)> {
        let external = match (&self.client_auth, &self.assertion_source) {
            (ClientAuth::ClientAssertion, Some(source)) => Some(
                source
                    .subject_token(None, now)
                    .await
                    .map_err(|e| (e, None))?
                    .access()
                    .clone(),
            ),
            _ => None,
        };
        let (response, assertion) = self
            .send_grant(grant, now, external)
            .await
            .map_err(|e| (e, None))?;
        let status = response.status();
        tracing::debug!(status = status.as_u16(), "token endpoint answered");
        let mut known = vec![
            self.client_secret.as_ref(),
            used_refresh.as_ref(),
            assertion.as_ref(),
        ];
        known.extend(secrets.iter().map(|s| Some(*s)));
        if response.body().len() > MAX_RESPONSE_BYTES {
            // The transport should have enforced the limit; do not trust that it did.
            return Err((
                transport_error(TransportError::TooLarge {
                    limit: MAX_RESPONSE_BYTES,
                }),
                None,
            ));
        }
        if !status.is_success() {
            let code = ErrorResponse::parse(response.body()).ok().map(|e| e.error);
            return Err((error_response(&response, now, &known), code));
        }
        match TokenResponse::parse(response.body()) {
            // A DPoP-bound token is of no use without the key it is bound to.
            Ok(parsed) if parsed.token_type.eq_ignore_ascii_case("dpop") && !self.has_dpop() => {
                let error = TokenResponseError::UnsupportedTokenType(parsed.token_type);
                Err((
                    RefreshError::permanent(error.to_string()).with_source(error),
                    None,
                ))
            }
            Ok(parsed) => Ok(parsed.into_token(now, used_refresh)),
            Err(error @ TokenResponseError::UnsupportedTokenType(_)) => Err((
                RefreshError::permanent(error.to_string()).with_source(error),
                None,
            )),
            // A proxy's error page or a truncated body: the next attempt may do better.
            Err(error) => Err((
                RefreshError::transient(error.to_string()).with_source(error),
                None,
            )),
        }
    }
}

fn basic_auth(client_id: &str, secret: &Secret) -> Result<HeaderValue, RefreshError> {
    // §2.3.1: both halves are form-urlencoded before the Basic encoding.
    let id: String = form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
    let secret: String = form_urlencoded::byte_serialize(secret.expose().as_bytes()).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    let mut value = HeaderValue::try_from(format!("Basic {encoded}"))
        .map_err(|_| RefreshError::permanent("could not build the Basic authorization header"))?;
    value.set_sensitive(true);
    Ok(value)
}

fn transport_error(error: TransportError) -> RefreshError {
    let message = error.to_string();
    let error_kind = match &error {
        TransportError::Timeout => RefreshError::transient_because(Cause::Timeout, message),
        // A request that cannot be built will not build next time either.
        TransportError::InvalidRequest(_) => RefreshError::permanent(message),
        _ => RefreshError::transient(message),
    };
    error_kind.with_source(error)
}

/// Classifies a non-2xx answer (§5.2 and HTTP semantics).
fn error_response(
    response: &HttpResponse,
    now: SystemTime,
    secrets: &[Option<&Secret>],
) -> RefreshError {
    let status = response.status();
    let parsed = ErrorResponse::parse(response.body()).ok();
    let transient_status = status.is_server_error()
        || status == http::StatusCode::TOO_MANY_REQUESTS
        || status == http::StatusCode::REQUEST_TIMEOUT
        || status.is_informational()
        || status.is_redirection();
    let permanent = !transient_status
        && match &parsed {
            Some(body) => body.is_permanent(),
            // Any other 4xx without a §5.2 body (401 from a gateway, 404 from a wrong
            // URL) will not change by retrying.
            None => status.is_client_error(),
        };
    let mut message = format!("token endpoint answered HTTP {}", status.as_u16());
    if let Some(body) = &parsed {
        message.push_str(": ");
        message.push_str(&redact(&printable(&body.error, 64), secrets));
        if let Some(description) = &body.error_description {
            message.push_str(" (");
            message.push_str(&redact(&printable(description, 200), secrets));
            message.push(')');
        }
    }
    let error = if permanent {
        RefreshError::permanent(message)
    } else {
        RefreshError::transient(message)
    };
    match retry_after(response.headers(), now) {
        Some(after) => error.with_retry_after(after),
        None => error,
    }
}

/// Server text is shown to callers; a server that echoes what it was sent must not
/// make it leak the secrets of the request.
fn redact(text: &str, secrets: &[Option<&Secret>]) -> String {
    secrets
        .iter()
        .flatten()
        .map(|s| s.expose())
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |text, secret| {
            text.replace(secret, "[redacted]")
        })
}

/// The `refresh_token` grant (RFC 6749 §6): trades the refresh token of the token being
/// replaced for a new access token, and keeps the new refresh token when the server
/// rotates it (the old one otherwise).
///
/// The refresh token comes from [`RefreshContext::previous`]; before the first refresh
/// it is the one given to [`RefreshTokenGrant::initial_refresh_token`]. With neither,
/// the fetch fails permanently (a login is needed).
pub struct RefreshTokenGrant {
    endpoint: Endpoint,
    initial_refresh: Option<Secret>,
}

impl RefreshTokenGrant {
    /// A grant against `token_url` for the client `client_id`; fails if the URL is not
    /// an absolute http(s) URL.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::RefreshTokenGrant;
    /// let grant = RefreshTokenGrant::new(transport.clone(), "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .initial_refresh_token("from-login");
    /// assert!(sent(&grant).contains("grant_type=refresh_token&refresh_token=from-login"));
    /// assert!(RefreshTokenGrant::new(transport, "not a url", "my-app").is_err());
    /// ```
    pub fn new(
        transport: Arc<dyn Transport>,
        token_url: &str,
        client_id: &str,
    ) -> Result<Self, ConfigError> {
        Ok(RefreshTokenGrant {
            endpoint: Endpoint::new(transport, token_url, client_id)?,
            initial_refresh: None,
        })
    }

    /// The client secret (a confidential client).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::RefreshTokenGrant;
    /// let grant = RefreshTokenGrant::new(transport, "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .client_secret("s3cret")
    ///     .initial_refresh_token("from-login");
    /// // HTTP Basic by default: base64("my-app:s3cret").
    /// assert!(sent(&grant).starts_with("Basic bXktYXBwOnMzY3JldA=="));
    /// ```
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.endpoint.client_secret = Some(secret.into());
        self
    }

    /// How to send the client's credentials (default: HTTP Basic).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::{ClientAuth, RefreshTokenGrant};
    /// let grant = RefreshTokenGrant::new(transport, "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .client_secret("s3cret")
    ///     .client_auth(ClientAuth::Body)
    ///     .initial_refresh_token("from-login");
    /// let sent = sent(&grant);
    /// assert!(sent.starts_with("- "), "no Authorization header");
    /// assert!(sent.contains("client_id=my-app") && sent.contains("client_secret=s3cret"));
    /// ```
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.endpoint.client_auth = auth;
        self
    }

    /// Authenticates the client with assertions signed by `key` (`private_key_jwt`,
    /// RFC 7523 §2.2) instead of a secret: a new one for every attempt.
    ///
    /// ```
    /// # fn demo(key: tokenflight::oauth2::SigningKey, transport: std::sync::Arc<dyn tokenflight::adapter::Transport>) {
    /// use tokenflight::oauth2::RefreshTokenGrant;
    /// // `key` from `SigningKey::from_pem(..)`: every attempt sends a new signed assertion.
    /// let grant = RefreshTokenGrant::new(transport, "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .private_key_jwt(key);
    /// # let _ = grant; }
    /// ```
    #[cfg(feature = "private-key-jwt")]
    pub fn private_key_jwt(mut self, key: SigningKey) -> Self {
        self.endpoint.set_signing_key(key);
        self
    }

    /// Proves possession of `dpop`'s key on every token request (DPoP, RFC 9449): a
    /// new proof each time, the server's nonce once it demands one (one resend within
    /// the same attempt), and `token_type: DPoP` tokens accepted. The resource
    /// requests must then carry proofs of the same key: pass the same `Dpop`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # fn demo(transport: Arc<dyn tokenflight::adapter::Transport>) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokenflight::dpop::{Dpop, DpopKey};
    /// let dpop = Dpop::new(DpopKey::generate()?);
    /// let grant = tokenflight::oauth2::RefreshTokenGrant::new(transport, "https://idp.example/token", "app")?
    ///     .dpop(dpop.clone());
    /// # let _ = grant; Ok(()) }
    /// ```
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.endpoint.set_dpop(dpop);
        self
    }

    /// Authenticates the client with an assertion it is given rather than signs: the
    /// current token of `source` (Azure / Entra workload identity's federated token
    /// file, through a [`FileTokenSource`](crate::sources::FileTokenSource)), fetched
    /// for every attempt ([`ClientAuth::ClientAssertion`]).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::{RefreshTokenGrant, subject_from_fn};
    /// let federated = subject_from_fn(|_now| async { Ok(tokenflight::Secret::new("federated-jwt")) });
    /// let grant = RefreshTokenGrant::new(transport, "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .client_assertion(federated)
    ///     .initial_refresh_token("from-login");
    /// assert!(sent(&grant).contains("client_assertion=federated-jwt"));
    /// ```
    pub fn client_assertion(mut self, source: impl SubjectToken + 'static) -> Self {
        self.endpoint.set_assertion_source(source);
        self
    }

    /// The `scope` parameter.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::RefreshTokenGrant;
    /// let grant = RefreshTokenGrant::new(transport, "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .scope("read write")
    ///     .initial_refresh_token("from-login");
    /// assert!(sent(&grant).contains("scope=read+write"));
    /// ```
    pub fn scope(mut self, scope: &str) -> Self {
        self.endpoint.scope = Some(scope.to_owned());
        self
    }

    /// An extra body parameter (e.g. `audience`, `resource`); may be repeated. Names
    /// the grant sets itself (`grant_type`, `refresh_token`, `client_id`,
    /// `client_secret`, `scope`) are ignored.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::RefreshTokenGrant;
    /// let grant = RefreshTokenGrant::new(transport, "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .param("audience", "https://api.example")
    ///     .param("grant_type", "ignored")
    ///     .initial_refresh_token("from-login");
    /// let sent = sent(&grant);
    /// assert!(sent.contains("audience=https%3A%2F%2Fapi.example"));
    /// assert!(!sent.contains("ignored"));
    /// ```
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.endpoint.add_param(name, value);
        self
    }

    /// The refresh token to use while the token being replaced carries none (e.g. the
    /// one a login returned).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::RefreshTokenGrant;
    /// let grant = RefreshTokenGrant::new(transport, "https://auth.example/token", "my-app")
    ///     .unwrap()
    ///     .initial_refresh_token("from-login");
    /// assert!(sent(&grant).contains("refresh_token=from-login"));
    /// ```
    pub fn initial_refresh_token(mut self, refresh: impl Into<Secret>) -> Self {
        self.initial_refresh = Some(refresh.into());
        self
    }
}

impl fmt::Debug for RefreshTokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenGrant")
            .field("endpoint", &self.endpoint)
            .field("initial_refresh", &self.initial_refresh)
            .finish()
    }
}

impl TokenSource for RefreshTokenGrant {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin(async move {
            let refresh = cx
                .previous
                .as_ref()
                .and_then(|token| token.refresh().cloned())
                .or_else(|| self.initial_refresh.clone())
                .ok_or_else(|| {
                    RefreshError::permanent("no refresh token available: a new login is needed")
                })?;
            let grant = [
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.expose()),
            ];
            self.endpoint
                .exchange(&grant, cx.now, Some(refresh.clone()))
                .await
        })
    }
}

/// The `client_credentials` grant (RFC 6749 §4.4): the client asks for a token on its
/// own behalf with its credentials; there is no refresh token to spend.
pub struct ClientCredentialsGrant {
    endpoint: Endpoint,
}

impl ClientCredentialsGrant {
    /// A grant against `token_url` for the client `client_id`; fails if the URL is not
    /// an absolute http(s) URL.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::ClientCredentialsGrant;
    /// let grant = ClientCredentialsGrant::new(transport.clone(), "https://auth.example/token", "svc")
    ///     .unwrap()
    ///     .client_secret("s3cret");
    /// assert!(sent(&grant).contains("grant_type=client_credentials"));
    /// assert!(ClientCredentialsGrant::new(transport, "ftp://auth.example/", "svc").is_err());
    /// ```
    pub fn new(
        transport: Arc<dyn Transport>,
        token_url: &str,
        client_id: &str,
    ) -> Result<Self, ConfigError> {
        Ok(ClientCredentialsGrant {
            endpoint: Endpoint::new(transport, token_url, client_id)?,
        })
    }

    /// The client secret.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::ClientCredentialsGrant;
    /// let grant = ClientCredentialsGrant::new(transport, "https://auth.example/token", "svc")
    ///     .unwrap()
    ///     .client_secret("s3cret");
    /// // HTTP Basic by default: base64("svc:s3cret").
    /// assert!(sent(&grant).starts_with("Basic c3ZjOnMzY3JldA=="));
    /// ```
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.endpoint.client_secret = Some(secret.into());
        self
    }

    /// How to send the client's credentials (default: HTTP Basic).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::{ClientAuth, ClientCredentialsGrant};
    /// let grant = ClientCredentialsGrant::new(transport, "https://auth.example/token", "svc")
    ///     .unwrap()
    ///     .client_secret("s3cret")
    ///     .client_auth(ClientAuth::SECRET_POST);
    /// assert!(sent(&grant).contains("client_secret=s3cret"));
    /// ```
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.endpoint.client_auth = auth;
        self
    }

    /// Authenticates the client with assertions signed by `key` (`private_key_jwt`,
    /// RFC 7523 §2.2) instead of a secret: a new one for every attempt.
    ///
    /// ```
    /// # fn demo(key: tokenflight::oauth2::SigningKey, transport: std::sync::Arc<dyn tokenflight::adapter::Transport>) {
    /// use tokenflight::oauth2::ClientCredentialsGrant;
    /// // `key` from `SigningKey::from_pem(..)`: every attempt sends a new signed assertion.
    /// let grant = ClientCredentialsGrant::new(transport, "https://auth.example/token", "svc")
    ///     .unwrap()
    ///     .private_key_jwt(key);
    /// # let _ = grant; }
    /// ```
    #[cfg(feature = "private-key-jwt")]
    pub fn private_key_jwt(mut self, key: SigningKey) -> Self {
        self.endpoint.set_signing_key(key);
        self
    }

    /// Proves possession of `dpop`'s key on every token request (DPoP, RFC 9449): a
    /// new proof each time, the server's nonce once it demands one (one resend within
    /// the same attempt), and `token_type: DPoP` tokens accepted. The resource
    /// requests must then carry proofs of the same key: pass the same `Dpop`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # fn demo(transport: Arc<dyn tokenflight::adapter::Transport>) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokenflight::dpop::{Dpop, DpopKey};
    /// let dpop = Dpop::new(DpopKey::generate()?);
    /// let grant = tokenflight::oauth2::ClientCredentialsGrant::new(transport, "https://idp.example/token", "app")?
    ///     .dpop(dpop.clone());
    /// # let _ = grant; Ok(()) }
    /// ```
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.endpoint.set_dpop(dpop);
        self
    }

    /// Authenticates the client with an assertion it is given rather than signs: the
    /// current token of `source` (Azure / Entra workload identity's federated token
    /// file, through a [`FileTokenSource`](crate::sources::FileTokenSource)), fetched
    /// for every attempt ([`ClientAuth::ClientAssertion`]).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::{ClientCredentialsGrant, subject_from_fn};
    /// let federated = subject_from_fn(|_now| async { Ok(tokenflight::Secret::new("federated-jwt")) });
    /// let grant = ClientCredentialsGrant::new(transport, "https://auth.example/token", "svc")
    ///     .unwrap()
    ///     .client_assertion(federated);
    /// let sent = sent(&grant);
    /// assert!(sent.contains("client_assertion=federated-jwt"));
    /// assert!(sent.contains("client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"));
    /// ```
    pub fn client_assertion(mut self, source: impl SubjectToken + 'static) -> Self {
        self.endpoint.set_assertion_source(source);
        self
    }

    /// The `scope` parameter.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::ClientCredentialsGrant;
    /// let grant = ClientCredentialsGrant::new(transport, "https://auth.example/token", "svc")
    ///     .unwrap()
    ///     .scope("orders:read");
    /// assert!(sent(&grant).contains("scope=orders%3Aread"));
    /// ```
    pub fn scope(mut self, scope: &str) -> Self {
        self.endpoint.scope = Some(scope.to_owned());
        self
    }

    /// An extra body parameter (e.g. `audience`, `resource`); may be repeated. Names
    /// the grant sets itself are ignored.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError};
    /// # use tokenflight::{RefreshContext, RefreshReason, TokenSource};
    /// # // Answers every request with a token whose value shows what was sent: the
    /// # // Authorization header (or "-") and the form body.
    /// # struct Echo;
    /// # impl Transport for Echo {
    /// #     fn send(&self, request: HttpRequest, _limit: usize)
    /// #         -> futures::future::BoxFuture<'_, Result<HttpResponse, TransportError>> {
    /// #         let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    /// #         let body = String::from_utf8_lossy(request.body());
    /// #         let value = format!("{} {body}", auth.unwrap_or("-"));
    /// #         let json = serde_json::json!({"access_token": value, "token_type": "Bearer"});
    /// #         Box::pin(async move { Ok(http::Response::new(json.to_string().into())) })
    /// #     }
    /// # }
    /// # let transport: Arc<dyn Transport> = Arc::new(Echo);
    /// # let sent = |source: &dyn TokenSource| {
    /// #     let cx = RefreshContext::new(RefreshReason::Initial, None, std::time::SystemTime::now());
    /// #     let token = futures::executor::block_on(source.fetch(cx)).unwrap();
    /// #     token.access().expose().to_owned()
    /// # };
    /// use tokenflight::oauth2::ClientCredentialsGrant;
    /// let grant = ClientCredentialsGrant::new(transport, "https://auth.example/token", "svc")
    ///     .unwrap()
    ///     .param("resource", "https://api.example");
    /// assert!(sent(&grant).contains("resource=https%3A%2F%2Fapi.example"));
    /// ```
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.endpoint.add_param(name, value);
        self
    }
}

impl fmt::Debug for ClientCredentialsGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentialsGrant")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl TokenSource for ClientCredentialsGrant {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin(async move {
            self.endpoint
                .exchange(&[("grant_type", "client_credentials")], cx.now, None)
                .await
        })
    }
}
