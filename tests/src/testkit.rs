//! The testkit: a real OAuth 2.0 authorization server and protected API on loopback,
//! for every test, demo and benchmark.
//!
//! [`TestServer::start`] binds `127.0.0.1:0` and serves on its own tokio runtime thread,
//! so tests under any runtime (tokio, async-std, smol, `futures::executor`) can use it.
//! The server stops when the handle is dropped; requests that hang (see
//! [`Failure::Hang`]) are cut off then.
//!
//! Routes:
//! - `POST /oauth/token`: `grant_type=refresh_token` with rotation and reuse detection
//!   (a spent refresh token revokes its whole family and answers `invalid_grant`), and
//!   `grant_type=client_credentials`; RFC 6749 §5.1 answers and §5.2 errors; client
//!   authentication by HTTP Basic or by the form fields `client_id`/`client_secret`.
//!   Also token exchange (RFC 8693: a [workload token](TestServer::issue_workload_token)
//!   as the subject, a token for the `audience` asked; [`REFUSED_AUDIENCE`] answers
//!   `invalid_target`), the JWT bearer grant (RFC 7523 §2.1), and client assertions
//!   (`private_key_jwt`) verified against [registered keys](TestServer::register_client_key):
//!   signature, `iss`/`sub`, `aud`, `exp`, and `jti` replay (recorded on arrival, so a
//!   replay after an injected failure is refused too).
//! - `GET/POST/PUT /api/{*path}`: needs a valid, unexpired access token (in
//!   `Authorization: Bearer`, or `?token=` in query mode). Answers `200` with the
//!   request body echoed byte for byte and headers `x-echo-method` / `x-echo-path`;
//!   otherwise `401` with `WWW-Authenticate: Bearer error="invalid_token"`, or in
//!   business-code mode `200` with `{"code":401,"message":"token expired"}`.
//! - `GET /redirect?to=<absolute url>`: `302 Found` to `to` (another origin, say).
//! - `GET /stream?content_type=<type>`: a response that streams (server-sent events by
//!   default, no `Content-Length`): its first chunk at once, its last one only after
//!   [`TestServer::release_held`] (see [`TestServer::stream_url`]).
//!
//! [`ClosingServer`] plays an origin whose connections break: every request to it
//! fails in the client's transport.
//!
//! [`RotatingTokenFile`] plays a platform that rotates a projected token file.
//!
//! Everything the server saw is counted in [`Counters`]; knobs on the handle inject
//! token-endpoint failures (queued, seeded random, or a whole outage) and latency, and
//! expire tokens.

mod assertions;
pub mod dpop;
mod dpop_mode;
pub mod dpop_server;
mod routes;
mod state;
mod token_file;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

pub use routes::{REFUSED_AUDIENCE, STREAM_FIRST, STREAM_LAST};
pub use token_file::{RotatingTokenFile, Rotation};

/// A P-256 private key (PKCS#8 PEM) for tests of `private_key_jwt` and the JWT bearer
/// grant; register it with [`TestServer::register_client_key`]. Never use it for
/// anything real.
pub const TEST_ES256_PEM: &str = include_str!("testkit/keys/test-es256.pem");
/// A 2048-bit RSA private key (PKCS#8 PEM), as [`TEST_ES256_PEM`].
pub const TEST_RS256_PEM: &str = include_str!("testkit/keys/test-rs256.pem");
pub use state::{Counters, RecordedRequest};
use state::{Shared, State};

/// How the server is set up at start. Everything except the client credentials can also
/// be changed later through the handle.
#[derive(Clone, Debug)]
pub struct TestServerConfig {
    /// Lifetime of newly issued access tokens (`expires_in` is its whole seconds).
    /// Default: one hour.
    pub token_lifetime: Duration,
    /// Delay before the token endpoint answers. Default: none.
    pub token_latency: Duration,
    /// Delay before a protected resource answers. Default: none.
    pub resource_latency: Duration,
    /// Answer a bad token with `200 {"code":401,...}` instead of a `401`. Default: off.
    pub business_code: bool,
    /// Take the access token from the `token` query parameter instead of the
    /// `Authorization` header. Default: off.
    pub query_token: bool,
    /// Refuse every token at protected resources, valid or not (a server that keeps
    /// saying 401). Default: off.
    pub reject_all: bool,
    /// Protected resources need a token. Off makes `/api/...` an open echo, for a
    /// server that plays "another origin" and only records what it is sent.
    /// Default: on.
    pub require_auth: bool,
    /// DPoP (RFC 9449): the token endpoint and the protected resources demand a valid
    /// proof with the server's nonce (`use_dpop_nonce` until the client sends it), tokens
    /// are `token_type: DPoP` and bound to the proof's key, and resources take them
    /// only as `Authorization: DPoP` with a proof by that key. Default: off.
    pub dpop: bool,
    /// In DPoP mode, the nonce rotates after this many accepted resource requests (the
    /// replaced one is still accepted until the next rotation); 0: never. Default: 0.
    pub dpop_rotate_every: u64,
    /// The pre-registered client's id. Default: `"testkit-client"`.
    pub client_id: String,
    /// The pre-registered client's secret. Default: `"testkit-secret"`.
    pub client_secret: String,
}

impl Default for TestServerConfig {
    fn default() -> Self {
        TestServerConfig {
            token_lifetime: Duration::from_secs(3600),
            token_latency: Duration::ZERO,
            resource_latency: Duration::ZERO,
            business_code: false,
            query_token: false,
            reject_all: false,
            require_auth: true,
            dpop: false,
            dpop_rotate_every: 0,
            client_id: "testkit-client".into(),
            client_secret: "testkit-secret".into(),
        }
    }
}

impl TestServerConfig {
    /// The configuration of a server that plays "another origin": open resources that
    /// only record whether credentials reached them.
    pub fn other_origin() -> Self {
        TestServerConfig {
            require_auth: false,
            ..TestServerConfig::default()
        }
    }
}

/// What the token endpoint does instead of its normal answer (see
/// [`TestServer::fail_next_token_calls`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// `500 Internal Server Error` with an RFC 6749 `server_error` body.
    Status500,
    /// `503 Service Unavailable` with an RFC 6749 `temporarily_unavailable` body (what
    /// the outage switch and the random failures answer).
    Unavailable,
    /// `429 Too Many Requests` with `Retry-After: <retry_after_secs>`.
    TooMany {
        /// The `Retry-After` value in seconds.
        retry_after_secs: u64,
    },
    /// Never answers (until the server is dropped).
    Hang,
    /// `400` with `{"error":"invalid_grant"}`; a refresh token presented is not spent.
    InvalidGrant,
    /// `200` with a body that is not JSON.
    MalformedJson,
}

/// A running testkit server; dropping it stops the server.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on `127.0.0.1:0` on its own runtime thread.
    ///
    /// # Panics
    /// If the loopback socket cannot be bound or the runtime cannot be built (a broken
    /// test environment, not a test outcome).
    pub fn start(config: TestServerConfig) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("testkit: cannot bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("testkit: no local address: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("testkit: cannot set non-blocking: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("testkit: cannot build a tokio runtime: {e}"));
        let shared = Arc::new(Shared::new(State::new(config)));
        let (shutdown, stop) = oneshot::channel::<()>();
        let app = routes::router(shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("testkit-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => panic!("testkit: cannot register the listener: {e}"),
                    };
                    // Not a graceful shutdown: a hanging token call must not keep the
                    // server alive. Dropping the runtime below cancels every connection.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stop => {}
                    }
                });
                drop(runtime);
            })
            .unwrap_or_else(|e| panic!("testkit: cannot spawn the server thread: {e}"));
        TestServer {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Changes the state and wakes [`wait_for`](Self::wait_for) and held requests.
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.shared.update(f)
    }

    /// Reads the state. Must not wake anyone: `wait_for` reads in its loop, and a read
    /// that woke it would make it spin without ever yielding.
    fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        self.shared.read(f)
    }

    /// Whether the API would accept `token` now (issued here, unexpired, not revoked):
    /// for other servers in a test that share this server's tokens (the gRPC testkit).
    pub fn access_token_valid(&self, token: &str) -> bool {
        self.read(|state| state.access_valid(token, None))
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's origin, `http://127.0.0.1:PORT` (the same as [`base_url`](Self::base_url)).
    pub fn origin(&self) -> String {
        self.base_url()
    }

    /// The token endpoint, `http://127.0.0.1:PORT/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.base_url())
    }

    /// A protected resource, `http://127.0.0.1:PORT/api/<path>` (a leading `/` of `path`
    /// is ignored).
    pub fn api_url(&self, path: &str) -> String {
        format!("{}/api/{}", self.base_url(), path.trim_start_matches('/'))
    }

    /// A protected resource of `audience`, `http://127.0.0.1:PORT/api/aud/<audience>/<path>`:
    /// it accepts only tokens issued with that `audience` parameter (and the other
    /// resources only tokens issued without one). `audience` must be one path segment.
    pub fn audience_url(&self, audience: &str, path: &str) -> String {
        format!(
            "{}/api/aud/{audience}/{}",
            self.base_url(),
            path.trim_start_matches('/')
        )
    }

    /// `http://127.0.0.1:PORT/redirect?to=<to>`: answers `302 Found` to `to`.
    pub fn redirect_url(&self, to: &str) -> String {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("to", to)
            .finish();
        format!("{}/redirect?{query}", self.base_url())
    }

    /// `http://127.0.0.1:PORT/redirect?to=<to>&keep_query`: answers `302 Found` to `to`
    /// with the rest of the request's query (everything but `to` and `keep_query`, byte
    /// for byte) added to `to`'s query, as a site that moved keeps the query. A query
    /// token added to this URL is in the `Location`.
    pub fn redirect_keeping_query_url(&self, to: &str) -> String {
        format!("{}&keep_query", self.redirect_url(to))
    }

    /// `http://127.0.0.1:PORT/stream?content_type=<content_type>`: answers `200` with
    /// `content_type`, no `Content-Length`, [`STREAM_FIRST`] at once and [`STREAM_LAST`]
    /// after the next [`release_held`](Self::release_held). A stream nobody releases
    /// ends after 30 s anyway and counts in [`Counters::streams_cut_off`]: a client
    /// that holds the response back until the body ends shows there, not as a hang.
    pub fn stream_url(&self, content_type: &str) -> String {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("content_type", content_type)
            .finish();
        format!("{}/stream?{query}", self.base_url())
    }

    /// The pre-registered client's id.
    pub fn client_id(&self) -> String {
        self.read(|s| s.config.client_id.clone())
    }

    /// The pre-registered client's secret.
    pub fn client_secret(&self) -> String {
        self.read(|s| s.config.client_secret.clone())
    }

    /// Starts a new refresh-token family for the client (as a login would) and returns
    /// its first refresh token.
    pub fn issue_refresh_token(&self) -> String {
        self.with_state(|s| s.issue_refresh_token_new_family())
    }

    /// Registers `key`'s public half for the pre-registered client: the token endpoint
    /// then accepts `client_assertion`s (`private_key_jwt`) and JWT bearer `assertion`s
    /// it signed, with `iss` = the client id, `aud` = the token endpoint, an unexpired
    /// `exp` and a `jti` it has not seen before.
    pub fn register_client_key(&self, key: &tokenflight::oauth2::SigningKey) {
        let client_key = assertions::ClientKey {
            alg: key.algorithm().as_str().to_owned(),
            public: key.public_key().to_vec(),
        };
        self.with_state(|s| s.client_keys.push(client_key));
    }

    /// Issues a workload token: a JWT with `exp` = now + `lifetime` (whole seconds),
    /// accepted as the `subject_token` of a token exchange (RFC 8693; the exchange at
    /// [`token_url`](Self::token_url) answers a token for the request's `audience`) and
    /// as a bearer token at the resources without an audience, until its `exp`. Not
    /// touched by [`expire_all_tokens`](Self::expire_all_tokens).
    pub fn issue_workload_token(&self, lifetime: Duration) -> String {
        self.with_state(|s| s.issue_workload_token(lifetime))
    }

    /// A token file rotated with a new [workload token](Self::issue_workload_token)
    /// living `lifetime` every `every`, as `rotation` says; stops when dropped.
    pub fn rotating_token_file(
        &self,
        every: Duration,
        lifetime: Duration,
        rotation: Rotation,
    ) -> RotatingTokenFile {
        RotatingTokenFile::start(self.shared.clone(), every, lifetime, rotation)
    }

    /// Issues an access token (outside any refresh family, as a login would) and
    /// returns it with its `expires_in` in seconds.
    pub fn issue_access_token(&self) -> (String, u64) {
        self.with_state(|s| s.issue_access_token(None, None))
    }

    /// The next `n` token-endpoint calls answer with `failure` instead (queued after
    /// failures already pending).
    pub fn fail_next_token_calls(&self, n: usize, failure: Failure) {
        self.with_state(|s| s.failures.extend(std::iter::repeat_n(failure, n)));
    }

    /// Drops the failures still queued.
    pub fn clear_failures(&self) {
        self.with_state(|s| s.failures.clear());
    }

    /// From now on each token call (not answered by a queued failure or the outage)
    /// fails with [`Failure::Unavailable`] with probability `rate` (0 to 1), drawn from
    /// a generator seeded with `seed`: the n-th call under the rate fails or not the
    /// same way in every run. A rate of 0 turns it off. Counted in
    /// [`Counters::random_failures`].
    pub fn set_token_failure_rate(&self, rate: f64, seed: u64) {
        self.with_state(|s| {
            s.failure_rate = if rate.is_nan() {
                0.0
            } else {
                rate.clamp(0.0, 1.0)
            };
            s.rng = fastrand::Rng::with_seed(seed);
        });
    }

    /// Switches a token-endpoint outage: while on, every token call (not answered by a
    /// queued failure) fails with [`Failure::Unavailable`]. Counted in
    /// [`Counters::outage_answers`].
    pub fn set_token_outage(&self, on: bool) {
        self.with_state(|s| s.outage = on);
    }

    /// The remaining life of the valid access token (unexpired, not revoked) that
    /// expires last among those issued before `issued_before`, or `None` if there is
    /// none: whether a client could still have used a token at some point, e.g. when
    /// one of its requests failed.
    pub fn longest_valid_life(&self, issued_before: std::time::Instant) -> Option<Duration> {
        self.read(|s| s.longest_valid_life(issued_before, None))
    }

    /// [`longest_valid_life`](Self::longest_valid_life) among the tokens of `audience`.
    pub fn longest_valid_life_for(
        &self,
        audience: &str,
        issued_before: std::time::Instant,
    ) -> Option<Duration> {
        self.read(|s| s.longest_valid_life(issued_before, Some(audience)))
    }

    /// Lifetime of access tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.with_state(|s| s.config.token_lifetime = lifetime);
    }

    /// Delay before the token endpoint answers.
    pub fn set_token_latency(&self, latency: Duration) {
        self.with_state(|s| s.config.token_latency = latency);
    }

    /// Delay before a protected resource answers.
    pub fn set_resource_latency(&self, latency: Duration) {
        self.with_state(|s| s.config.resource_latency = latency);
    }

    /// Switches business-code mode (`200 {"code":401}` instead of `401`).
    pub fn set_business_code(&self, on: bool) {
        self.with_state(|s| s.config.business_code = on);
    }

    /// Switches query mode (token in `?token=` instead of the `Authorization` header).
    pub fn set_query_token(&self, on: bool) {
        self.with_state(|s| s.config.query_token = on);
    }

    /// Switches "refuse every token" at the protected resources.
    pub fn set_reject_all(&self, on: bool) {
        self.with_state(|s| s.config.reject_all = on);
    }

    /// Holds the next `n` protected-resource requests after the server has taken its
    /// verdict (accepted or rejected) and before it answers, until
    /// [`release_held`](Self::release_held). Lets a test order a late answer after
    /// other requests deterministically (with [`wait_for`](Self::wait_for) on
    /// [`Counters::held_resource_calls`]).
    pub fn hold_next_resource_calls(&self, n: usize) {
        self.with_state(|s| s.hold_next += n);
    }

    /// Lets every held request answer.
    pub fn release_held(&self) {
        self.with_state(|s| s.releases += 1);
    }

    /// Makes every access token issued so far invalid, as if its lifetime had passed.
    /// Tokens issued afterwards are valid as usual.
    pub fn expire_all_tokens(&self) {
        self.with_state(State::expire_all_tokens);
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.read(|s| s.counters.clone())
    }

    /// Sets every counter to zero and forgets the recorded requests.
    pub fn reset_counters(&self) {
        self.with_state(|s| {
            s.counters = Counters::default();
            s.requests.clear();
        });
    }

    /// Waits until the counters satisfy `done`, and returns them. A deterministic way to
    /// wait for "the token call has arrived" and the like; works under any runtime.
    /// Waits forever if it never happens.
    pub async fn wait_for(&self, done: impl Fn(&Counters) -> bool) -> Counters {
        loop {
            let changed = self.shared.changed().notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the check, so a change between check and await wakes us.
            changed.as_mut().enable();
            let counters = self.counters();
            if done(&counters) {
                return counters;
            }
            changed.await;
        }
    }

    /// Every request to a protected resource so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.read(|s| s.requests.clone())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The server thread may already be gone; nothing to stop then.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic on the server thread was already reported there.
            let _ = thread.join();
        }
    }
}

/// An origin whose every connection is closed as soon as it is accepted, before any
/// answer: requests to it fail in the client's transport (the errors a client shows
/// for that, URL included, are what a test looks at). Stops when dropped.
#[derive(Debug)]
pub struct ClosingServer {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ClosingServer {
    /// Listens on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If the loopback socket cannot be bound (a broken test environment).
    pub fn start() -> ClosingServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("testkit: cannot bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("testkit: no local address: {e}"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("testkit-closing-{}", addr.port()))
            .spawn(move || {
                for connection in listener.incoming() {
                    if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    // Closed unanswered: the client's request fails.
                    drop(connection);
                }
            })
            .unwrap_or_else(|e| panic!("testkit: cannot spawn the closing thread: {e}"));
        ClosingServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ClosingServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the blocking `accept` so the thread sees the flag; if the connect
        // fails the listener is gone already.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
