//! The naive client the demo compares tokenflight with: the unguarded interceptor.
//! Every request sends the token it has; every request that gets a 401 refreshes on its
//! own (no coordination, no expiry check) and resends once. With a server that rotates
//! refresh tokens, concurrent refreshes present a refresh token another request already
//! spent: the server sees reuse, revokes the login, and the user is logged out. The
//! naive client then logs in again, which the report counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{RefreshContext, RefreshReason, Token, TokenSource, Transport};

use crate::api::{Api, ClientCounters, Outcome};

/// Logs in again, giving a new token (with a new refresh token).
pub type Relogin = Box<dyn Fn() -> Token + Send + Sync>;

/// The unguarded interceptor. Cheap to share behind an `Arc`.
pub struct NaiveClient {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    grant: RefreshTokenGrant,
    current: Mutex<Arc<Token>>,
    relogin: Relogin,
    refreshes: AtomicU64,
    retries: AtomicU64,
    relogins: AtomicU64,
}

impl std::fmt::Debug for NaiveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NaiveClient").finish_non_exhaustive()
    }
}

/// Largest response body the naive client reads.
const BODY_LIMIT: usize = 1 << 20;

impl NaiveClient {
    /// A client that sends with `transport`, refreshes with `grant`, starts with
    /// `login`'s token and logs in again with `relogin`.
    pub fn new(
        transport: Arc<dyn Transport>,
        grant: RefreshTokenGrant,
        login: Token,
        relogin: Relogin,
    ) -> Self {
        NaiveClient {
            inner: Arc::new(Inner {
                transport,
                grant,
                current: Mutex::new(Arc::new(login)),
                relogin,
                refreshes: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                relogins: AtomicU64::new(0),
            }),
        }
    }
}

impl Inner {
    fn current(&self) -> Arc<Token> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_current(&self, token: Token) -> Arc<Token> {
        let token = Arc::new(token);
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = token.clone();
        token
    }

    async fn send(&self, url: &str, token: &Token) -> Result<u16, String> {
        let request = http::Request::get(url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.access().expose()),
            )
            .body(Bytes::new())
            .map_err(|error| error.to_string())?;
        let response = self
            .transport
            .send(request, BODY_LIMIT)
            .await
            .map_err(|error| error.to_string())?;
        Ok(response.status().as_u16())
    }

    async fn get(&self, url: String) -> Outcome {
        let token = self.current();
        match self.send(&url, &token).await {
            Ok(401) => {}
            Ok(status) => return Outcome::Status(status),
            Err(error) => return Outcome::Error(error),
        }
        // Rejected: refresh, on its own, with the refresh token this request knows.
        let cx = RefreshContext::new(RefreshReason::Rejected, Some(token), SystemTime::now());
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let fresh = match self.grant.fetch(cx).await {
            Ok(fresh) => self.set_current(fresh),
            Err(error) => {
                if error.kind().is_permanent() {
                    // The login is gone (its refresh token family was revoked): the user
                    // is sent to log in again.
                    self.relogins.fetch_add(1, Ordering::Relaxed);
                    self.set_current((self.relogin)());
                }
                return Outcome::Error(error.to_string());
            }
        };
        self.retries.fetch_add(1, Ordering::Relaxed);
        match self.send(&url, &fresh).await {
            Ok(status) => Outcome::Status(status),
            Err(error) => Outcome::Error(error),
        }
    }
}

impl Api for NaiveClient {
    fn get(&self, url: String) -> BoxFuture<'static, Outcome> {
        let inner = self.inner.clone();
        async move { inner.get(url).await }.boxed()
    }

    fn counters(&self) -> ClientCounters {
        ClientCounters {
            source_calls: self.inner.refreshes.load(Ordering::Relaxed),
            flights: None,
            failed_flights: None,
            coalesced: None,
            retries: self.inner.retries.load(Ordering::Relaxed),
            stale_rejections: None,
            relogins: self.inner.relogins.load(Ordering::Relaxed),
            // Every refresh is made by the one request that got the 401, waiting for it.
            waited: self.inner.refreshes.load(Ordering::Relaxed),
        }
    }
}
