//! A DPoP-enforcing (RFC 9449) authorization server and resource server on loopback,
//! each on its own `127.0.0.1:0` port (two origins, so the client's per-origin nonces
//! are really per server). Every proof goes through the independent [`Verifier`]:
//! signature by the header's `jwk`, `typ`/`alg`, `htm`/`htu`, the `iat` window, `jti`
//! replay, `ath`, the nonce, and the token's binding to the key's thumbprint.
//!
//! - `POST /token` (authorization server): `grant_type=client_credentials` and
//!   `grant_type=refresh_token` with one-time refresh tokens (a spent one is counted as
//!   a reuse and answered `invalid_grant`). The proof is checked *before* the grant, so a
//!   `400 use_dpop_nonce` answer spends nothing. Tokens come back as `token_type: DPoP`,
//!   bound to the proof's key.
//! - `ANY /api/{*path}` (resource server): needs `Authorization: DPoP <token>` and a
//!   proof by the key the token is bound to; echoes the body. A missing or stale nonce
//!   answers `401` with `WWW-Authenticate: DPoP error="use_dpop_nonce"` and the current
//!   `DPoP-Nonce`; any other failure `401 ... error="invalid_token"`. Every answer
//!   carries the current nonce.
//!
//! Nonces rotate by count ([`DpopServerConfig::rotate_every`] accepted resource
//! requests) or on the test's signal ([`DpopServer::rotate_resource_nonce`],
//! [`DpopServer::rotate_token_nonce`]), never on a wall-clock timer; the nonce just
//! replaced is still accepted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};

use super::dpop::{Expect, Refusal, Verifier};

/// How a [`DpopServer`] starts.
#[derive(Clone, Debug)]
pub struct DpopServerConfig {
    /// The token endpoint demands a nonce. Default: on.
    pub token_nonce: bool,
    /// The resource server demands a nonce. Default: on.
    pub resource_nonce: bool,
    /// The resource server issues a new nonce after this many accepted requests.
    /// Default: never (only on [`DpopServer::rotate_resource_nonce`]).
    pub rotate_every: Option<u64>,
    /// Lifetime of issued access tokens. Default: one hour.
    pub token_lifetime: Duration,
}

impl Default for DpopServerConfig {
    fn default() -> Self {
        DpopServerConfig {
            token_nonce: true,
            resource_nonce: true,
            rotate_every: None,
            token_lifetime: Duration::from_secs(3600),
        }
    }
}

/// What the DPoP server counted.
#[derive(Clone, Debug, Default)]
pub struct DpopCounts {
    /// Requests to the token endpoint.
    pub token_requests: u64,
    /// Token requests answered `use_dpop_nonce`.
    pub token_nonce_demands: u64,
    /// Access tokens issued.
    pub issued: u64,
    /// Refresh tokens presented at the token endpoint (after the proof passed), by value.
    pub refresh_presented: HashMap<String, u32>,
    /// Spent refresh tokens presented again (answered `invalid_grant`).
    pub refresh_reuse: u64,
    /// Requests to the resource server.
    pub resource_requests: u64,
    /// Resource requests answered `use_dpop_nonce`.
    pub resource_nonce_demands: u64,
    /// Resource requests accepted.
    pub accepted: u64,
    /// Proofs refused for any reason but a nonce, by kind (both servers).
    pub refused: Vec<Refusal>,
    /// Resource requests refused without a proof check: no `DPoP` token, or one this
    /// server never issued.
    pub unknown_tokens: u64,
    /// Requests per resource path.
    pub hits: HashMap<String, u32>,
    /// Nonces the resource server issued after its first.
    pub resource_rotations: u64,
    /// Thumbprints (`cnf.jkt`) of the keys tokens were bound to.
    pub bound_keys: HashSet<String>,
}

impl DpopCounts {
    /// How many proofs were refused as a `jti` replay.
    pub fn replayed(&self) -> usize {
        self.refused
            .iter()
            .filter(|r| **r == Refusal::Replayed)
            .count()
    }
}

struct Bound {
    jkt: String,
    expires: SystemTime,
}

struct Server {
    token_port: u16,
    resource_port: u16,
    config: DpopServerConfig,
    token: Verifier,
    resource: Verifier,
    token_nonces: u64,
    bound: HashMap<String, Bound>,
    live_refresh: HashSet<String>,
    spent_refresh: HashSet<String>,
    serial: u64,
    counts: DpopCounts,
}

type Shared = Arc<Mutex<Server>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Server> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A secret nobody can guess from another one.
fn random(prefix: &str, serial: u64) -> String {
    format!("{prefix}-{serial}-{:016x}", fastrand::u64(..))
}

fn with_nonce(mut response: Response, nonce: Option<&str>) -> Response {
    if let Some(value) = nonce.and_then(|n| n.parse().ok()) {
        response.headers_mut().insert("dpop-nonce", value);
    }
    response
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn token_endpoint(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let mut guard = lock(&shared);
    let s = &mut *guard;
    s.counts.token_requests += 1;
    let htu = format!("http://127.0.0.1:{}/token", s.token_port);
    let expect = Expect {
        method: "POST",
        htu: &htu,
        access_token: None,
        bound_jkt: None,
        now: now_secs(),
    };
    let verdict = s.token.verify(header_text(&headers, "dpop"), &expect);
    let nonce = s.token.nonce.clone();
    let jkt = match verdict {
        Ok(jkt) => jkt,
        Err(Refusal::UseNonce) => {
            s.counts.token_nonce_demands += 1;
            let body = r#"{"error":"use_dpop_nonce","error_description":"the DPoP proof needs the server's nonce"}"#;
            return with_nonce(json(StatusCode::BAD_REQUEST, body.into()), nonce.as_deref());
        }
        Err(other) => {
            s.counts.refused.push(other);
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_dpop_proof"}"#.into(),
            );
        }
    };
    // The proof passed: only now is the grant looked at (a refused proof spends nothing).
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some("refresh_token") => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            *s.counts
                .refresh_presented
                .entry(presented.clone())
                .or_default() += 1;
            if !s.live_refresh.remove(&presented) {
                if s.spent_refresh.contains(&presented) {
                    s.counts.refresh_reuse += 1;
                }
                return with_nonce(
                    json(
                        StatusCode::BAD_REQUEST,
                        r#"{"error":"invalid_grant"}"#.into(),
                    ),
                    nonce.as_deref(),
                );
            }
            s.spent_refresh.insert(presented);
        }
        _ => {
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"unsupported_grant_type"}"#.into(),
            );
        }
    }
    s.serial += 1;
    s.counts.issued += 1;
    let access = random("dpop-at", s.serial);
    let refresh = random("dpop-rt", s.serial);
    s.live_refresh.insert(refresh.clone());
    s.counts.bound_keys.insert(jkt.clone());
    let lifetime = s.config.token_lifetime;
    s.bound.insert(
        access.clone(),
        Bound {
            jkt,
            expires: SystemTime::now() + lifetime,
        },
    );
    let body = serde_json::json!({
        "access_token": access,
        "token_type": "DPoP",
        "expires_in": lifetime.as_secs(),
        "refresh_token": refresh,
    });
    with_nonce(json(StatusCode::OK, body.to_string()), nonce.as_deref())
}

fn unauthorized(error: &str, nonce: Option<&str>) -> Response {
    let challenge = format!(r#"DPoP error="{error}", algs="ES256""#);
    with_nonce(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
        )
            .into_response(),
        nonce,
    )
}

async fn resource_endpoint(
    State(shared): State<Shared>,
    method: Method,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut guard = lock(&shared);
    let s = &mut *guard;
    s.counts.resource_requests += 1;
    *s.counts.hits.entry(path.clone()).or_default() += 1;
    let htu = format!("http://127.0.0.1:{}/api/{path}", s.resource_port);
    let token = header_text(&headers, "authorization")
        .strip_prefix("DPoP ")
        .unwrap_or("")
        .to_owned();
    let nonce = s.resource.nonce.clone();
    let Some(bound) = s
        .bound
        .get(&token)
        .filter(|b| b.expires > SystemTime::now())
    else {
        s.counts.unknown_tokens += 1;
        return unauthorized("invalid_token", nonce.as_deref());
    };
    let expect = Expect {
        method: method.as_str(),
        htu: &htu,
        access_token: Some(&token),
        bound_jkt: Some(&bound.jkt),
        now: now_secs(),
    };
    match s.resource.verify(header_text(&headers, "dpop"), &expect) {
        Ok(_) => {
            s.counts.accepted += 1;
            if s.config
                .rotate_every
                .is_some_and(|every| every > 0 && s.counts.accepted % every == 0)
            {
                rotate_resource(s);
            }
            with_nonce(
                (StatusCode::OK, body).into_response(),
                s.resource.nonce.as_deref(),
            )
        }
        Err(Refusal::UseNonce) => {
            s.counts.resource_nonce_demands += 1;
            unauthorized("use_dpop_nonce", nonce.as_deref())
        }
        Err(other) => {
            s.counts.refused.push(other);
            unauthorized("invalid_token", nonce.as_deref())
        }
    }
}

fn rotate_resource(s: &mut Server) {
    s.counts.resource_rotations += 1;
    let next = format!("rs-nonce-{}", s.counts.resource_rotations);
    s.resource.rotate_nonce(next);
}

/// A running DPoP authorization + resource server; stops when dropped.
pub struct DpopServer {
    shared: Shared,
    stop: Option<futures::channel::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for DpopServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.shared);
        f.debug_struct("DpopServer")
            .field("token_port", &s.token_port)
            .field("resource_port", &s.resource_port)
            .finish_non_exhaustive()
    }
}

fn bind() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("dpop testkit: bind 127.0.0.1:0: {e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("dpop testkit: local address: {e}"))
        .port();
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("dpop testkit: non-blocking: {e}"));
    (listener, port)
}

impl DpopServer {
    /// Starts both servers, each on its own `127.0.0.1:0`, on a runtime thread of their
    /// own (so tests under any runtime can use them).
    pub fn start(config: DpopServerConfig) -> DpopServer {
        let (token_listener, token_port) = bind();
        let (resource_listener, resource_port) = bind();
        let verifier = |on: bool, nonce: &str| {
            if on {
                Verifier::with_nonce(nonce)
            } else {
                Verifier::default()
            }
        };
        let shared = Arc::new(Mutex::new(Server {
            token_port,
            resource_port,
            token: verifier(config.token_nonce, "as-nonce-0"),
            resource: verifier(config.resource_nonce, "rs-nonce-0"),
            config,
            token_nonces: 0,
            bound: HashMap::new(),
            live_refresh: HashSet::new(),
            spent_refresh: HashSet::new(),
            serial: 0,
            counts: DpopCounts::default(),
        }));
        let token_app = Router::new()
            .route("/token", post(token_endpoint))
            .with_state(shared.clone());
        let resource_app = Router::new()
            .route("/api/{*path}", any(resource_endpoint))
            .with_state(shared.clone());
        let (stop, stopped) = futures::channel::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("dpop testkit: runtime: {e}"));
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listen = |l| {
                    tokio::net::TcpListener::from_std(l)
                        .unwrap_or_else(|e| panic!("dpop testkit: listener: {e}"))
                };
                let token = axum::serve(listen(token_listener), token_app).into_future();
                let resource = axum::serve(listen(resource_listener), resource_app).into_future();
                let both = futures::future::join(token, resource);
                let _ = futures::future::select(std::pin::pin!(both), stopped).await;
            });
        });
        DpopServer {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", lock(&self.shared).token_port)
    }

    /// The resource server's origin, `http://127.0.0.1:port`.
    pub fn resource_origin(&self) -> String {
        format!("http://127.0.0.1:{}", lock(&self.shared).resource_port)
    }

    /// The URL of resource `path` (`/api/<path>`).
    pub fn api_url(&self, path: &str) -> String {
        format!("{}/api/{path}", self.resource_origin())
    }

    /// A new live refresh token, as a login would hand it over.
    pub fn issue_refresh_token(&self) -> String {
        let mut s = lock(&self.shared);
        s.serial += 1;
        let refresh = random("dpop-rt", s.serial);
        s.live_refresh.insert(refresh.clone());
        refresh
    }

    /// The resource server demands a new nonce from now on (the replaced one is still
    /// accepted until the next rotation).
    pub fn rotate_resource_nonce(&self) {
        rotate_resource(&mut lock(&self.shared));
    }

    /// The token endpoint demands a new nonce from now on, and no longer accepts the
    /// old one: the next token request is answered `use_dpop_nonce`.
    pub fn rotate_token_nonce(&self) {
        let mut s = lock(&self.shared);
        s.token_nonces += 1;
        let next = format!("as-nonce-{}", s.token_nonces);
        s.token.replace_nonce(next);
    }

    /// Every access token issued so far is refused from now on (`invalid_token`): the
    /// server revoked them.
    pub fn expire_all_tokens(&self) {
        let expired = SystemTime::UNIX_EPOCH;
        for bound in lock(&self.shared).bound.values_mut() {
            bound.expires = expired;
        }
    }

    /// Everything counted so far.
    pub fn counts(&self) -> DpopCounts {
        lock(&self.shared).counts.clone()
    }

    /// Distinct `jti`s the two servers have seen.
    pub fn jtis_seen(&self) -> usize {
        let s = lock(&self.shared);
        s.token.jtis_seen() + s.resource.jtis_seen()
    }
}

impl Drop for DpopServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
