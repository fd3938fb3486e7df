//! The clients the storm demo drives: tokenflight under reqwest or surf, and the naive
//! client (see [`crate::naive`]), all behind one small trait so a phase runs them the
//! same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::observe::{AuthLost, RequestAuthorized, RequestResent, ResendKind};
use tokenflight::{AuthPolicyBuilder, ConfigError, Token, adapter::Transport, observe::Observer};
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

/// What one request ended with, as the application saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response: the error's message.
    Error(String),
}

/// Counters a client keeps about itself (the server counts the rest).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientCounters {
    /// Calls of the token endpoint the client made (every attempt, retries included).
    pub source_calls: u64,
    /// Refreshes as the client coordinates them: flights, each one or more attempts
    /// shared by every caller that needed it (tokenflight only).
    pub flights: Option<u64>,
    /// Flights that ended in an error after their attempts (tokenflight only).
    pub failed_flights: Option<u64>,
    /// Callers that waited for a refresh someone else started (tokenflight only).
    pub coalesced: Option<u64>,
    /// Requests resent after a rejection.
    pub retries: u64,
    /// Rejections of an already replaced token, resent without a refresh (tokenflight).
    pub stale_rejections: Option<u64>,
    /// Times the client lost its login (a refresh failed permanently) and had to log in
    /// again.
    pub relogins: u64,
    /// Requests that waited for a token before they were sent or resent (tokenflight:
    /// as its observer reports them; naive: one per refresh, its caller waits).
    pub waited: u64,
}

/// Counts, through tokenflight's observer interface, the requests that had to wait for
/// a token: before they were sent ([`RequestAuthorized`] with `waited`) or before they
/// were resent after a rejection that was not stale ([`RequestResent`], fresh).
#[derive(Clone, Debug, Default)]
pub struct WaitCounter(Arc<AtomicU64>);

impl WaitCounter {
    /// Requests that waited so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Observer for WaitCounter {
    fn request_authorized(&self, event: &RequestAuthorized) {
        if event.waited {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn request_resent(&self, event: &RequestResent) {
        if event.kind == ResendKind::Fresh {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A client of the protected API.
pub trait Api: Send + Sync {
    /// `GET url`, reading the whole body.
    fn get(&self, url: String) -> BoxFuture<'static, Outcome>;
    /// The client's own counters.
    fn counters(&self) -> ClientCounters;
}

/// How the demo logs in and where it sends tokens.
#[derive(Clone, Debug)]
pub struct Login {
    /// The token endpoint.
    pub token_url: String,
    /// The OAuth client id.
    pub client_id: String,
    /// The OAuth client secret.
    pub client_secret: String,
    /// The API's origin: the only one the token may go to.
    pub origin: String,
    /// The access token the login gave.
    pub access_token: String,
    /// Its lifetime in seconds.
    pub expires_in: u64,
    /// The refresh token the login gave.
    pub refresh_token: String,
    /// DPoP (RFC 9449): the key and nonces every token request and API call proves
    /// possession with; `None`: bearer tokens.
    pub dpop: Option<tokenflight::dpop::Dpop>,
}

impl Login {
    /// The login's token as tokenflight's `Token`.
    pub fn token(&self) -> Token {
        let token =
            Token::new(self.access_token.as_str()).with_refresh(self.refresh_token.as_str());
        if self.dpop.is_some() {
            // A DPoP access token must be bound to the key; the login's is not, so the
            // client starts from the refresh token alone (the first request refreshes).
            return token.expires_at(SystemTime::UNIX_EPOCH);
        }
        token.expires_in(Duration::from_secs(self.expires_in), SystemTime::now())
    }

    /// The refresh_token grant over `transport` (a bare client).
    pub fn grant(&self, transport: Arc<dyn Transport>) -> Result<RefreshTokenGrant, ConfigError> {
        let grant = RefreshTokenGrant::new(transport, &self.token_url, &self.client_id)?
            .client_secret(self.client_secret.as_str())
            .initial_refresh_token(self.refresh_token.as_str());
        Ok(match &self.dpop {
            Some(dpop) => grant.dpop(dpop.clone()),
            None => grant,
        })
    }

    /// Configures a tokenflight builder for this login: the grant, the login's token,
    /// the API origin, a hook that counts lost logins and an observer that counts the
    /// requests that waited for a token. Timing (leeway, refresh-ahead,
    /// retries, backoff) stays at the defaults: what the demo shows is what a user gets
    /// without tuning anything.
    pub fn configure<Out>(
        &self,
        builder: AuthPolicyBuilder<Out>,
        transport: Arc<dyn Transport>,
        relogins: Arc<AtomicU64>,
        waits: WaitCounter,
    ) -> Result<AuthPolicyBuilder<Out>, ConfigError> {
        let builder = match &self.dpop {
            Some(dpop) => builder.dpop(dpop.clone()),
            None => builder,
        };
        Ok(builder
            .observer(waits)
            .source(self.grant(transport)?)
            .initial_token(self.token())
            .allowed_origin(&self.origin)
            .observer(Relogins(relogins)))
    }
}

/// Counts the times re-authentication became necessary.
struct Relogins(Arc<AtomicU64>);

impl Observer for Relogins {
    fn auth_lost(&self, _event: &AuthLost<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn tokenflight_counters(
    stats: tokenflight::observe::Stats,
    relogins: &AtomicU64,
    waits: &WaitCounter,
) -> ClientCounters {
    ClientCounters {
        source_calls: stats.source_calls,
        flights: Some(stats.flights),
        failed_flights: Some(stats.failures),
        coalesced: Some(stats.coalesced),
        retries: stats.retries,
        stale_rejections: Some(stats.stale_rejections),
        relogins: relogins.load(Ordering::Relaxed),
        waited: waits.get(),
    }
}

/// reqwest with tokenflight's middleware. Build it inside the tokio runtime (the layer
/// picks up its spawner there).
#[derive(Debug)]
pub struct ReqwestTokenflight {
    client: ClientWithMiddleware,
    layer: tokenflight_reqwest::TokenMiddleware,
    relogins: Arc<AtomicU64>,
    waits: WaitCounter,
}

impl ReqwestTokenflight {
    /// A client for `login`.
    pub fn new(login: &Login) -> Result<Self, ConfigError> {
        let relogins = Arc::new(AtomicU64::new(0));
        let waits = WaitCounter::default();
        let bare = Arc::new(tokenflight_reqwest::BareTransport::default());
        let layer = login
            .configure(
                tokenflight_reqwest::TokenMiddleware::builder(),
                bare,
                relogins.clone(),
                waits.clone(),
            )?
            .build()?;
        let client = ClientBuilder::new(tokenflight_reqwest::reqwest::Client::new())
            .with(layer.clone())
            .build();
        Ok(ReqwestTokenflight {
            client,
            layer,
            relogins,
            waits,
        })
    }
}

impl Api for ReqwestTokenflight {
    fn get(&self, url: String) -> BoxFuture<'static, Outcome> {
        let client = self.client.clone();
        async move {
            match client.get(url).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    match response.bytes().await {
                        Ok(_) => Outcome::Status(status),
                        Err(error) => Outcome::Error(error.to_string()),
                    }
                }
                Err(error) => Outcome::Error(error.to_string()),
            }
        }
        .boxed()
    }

    fn counters(&self) -> ClientCounters {
        tokenflight_counters(self.layer.policy().stats(), &self.relogins, &self.waits)
    }
}

/// surf with tokenflight's middleware (async-std).
#[derive(Debug)]
pub struct SurfTokenflight {
    client: surf::Client,
    layer: tokenflight_surf::TokenMiddleware,
    relogins: Arc<AtomicU64>,
    waits: WaitCounter,
}

impl SurfTokenflight {
    /// A client for `login`.
    pub fn new(login: &Login) -> Result<Self, ConfigError> {
        let relogins = Arc::new(AtomicU64::new(0));
        let waits = WaitCounter::default();
        let bare = Arc::new(tokenflight_surf::BareTransport::default());
        let layer = login
            .configure(
                tokenflight_surf::TokenMiddleware::builder(),
                bare,
                relogins.clone(),
                waits.clone(),
            )?
            .build()?;
        let client = surf::Client::new().with(layer.clone());
        Ok(SurfTokenflight {
            client,
            layer,
            relogins,
            waits,
        })
    }
}

impl Api for SurfTokenflight {
    fn get(&self, url: String) -> BoxFuture<'static, Outcome> {
        let client = self.client.clone();
        async move {
            match client.get(url).await {
                Ok(mut response) => {
                    let status = u16::from(response.status());
                    match response.body_bytes().await {
                        Ok(_) => Outcome::Status(status),
                        Err(error) => Outcome::Error(error.to_string()),
                    }
                }
                Err(error) => Outcome::Error(error.to_string()),
            }
        }
        .boxed()
    }

    fn counters(&self) -> ClientCounters {
        tokenflight_counters(self.layer.policy().stats(), &self.relogins, &self.waits)
    }
}
