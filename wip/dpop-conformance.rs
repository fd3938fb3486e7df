//! DPoP conformance (RFC 9449), run by every adapter: a loopback authorization and
//! resource server that enforces proofs ([`testkit::dpop::Verifier`]), demands nonces at
//! both endpoints and rotates the resource server's nonce mid-storm.
//!
//! [`testkit::dpop::Verifier`]: crate::testkit::dpop::Verifier

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokenflight::dpop::{Dpop, DpopKey};
use tokenflight::oauth2::ClientCredentialsGrant;

use crate::conformance::{Adapter, TestRequest};
use crate::testkit::dpop::{Expect, Refusal, Verifier};

/// The resource server issues a new nonce after this many proofs it accepted.
const ROTATE_EVERY: u64 = 150;

/// What the DPoP server counted.
#[derive(Debug, Default)]
pub struct Counts {
    /// Tokens issued (each a refresh).
    pub issued: u64,
    /// Token requests refused for want of the nonce.
    pub token_nonce_demands: u64,
    /// Resource requests refused for want of the (current) nonce.
    pub resource_nonce_demands: u64,
    /// Proofs refused for any other reason, by kind.
    pub refused: Vec<Refusal>,
    /// Hits per resource path (one path per caller request).
    pub hits: HashMap<String, u32>,
    /// Nonces issued by the resource server.
    pub rotations: u64,
}

struct Server {
    port: u16,
    token: Verifier,
    resource: Verifier,
    previous_nonce: Option<String>,
    accepted: u64,
    bound: HashMap<String, String>,
    counts: Counts,
}

type Shared = Arc<Mutex<Server>>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn with_nonce(mut response: Response, nonce: &str) -> Response {
    if let Ok(value) = nonce.parse() {
        response.headers_mut().insert("dpop-nonce", value);
    }
    response
}

async fn token_endpoint(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let htu = format!("http://127.0.0.1:{}/token", s.port);
    let proof = headers
        .get("dpop")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let expect = Expect {
        method: "POST",
        htu: &htu,
        access_token: None,
        bound_jkt: None,
        now: now(),
    };
    let nonce = s.token.nonce.clone().unwrap_or_default();
    match s.token.verify(proof, &expect) {
        Ok(jkt) => {
            s.counts.issued += 1;
            let access = format!("at-{}", s.counts.issued);
            s.bound.insert(access.clone(), jkt);
            let body = serde_json::json!({"access_token": access, "token_type": "DPoP", "expires_in": 3600});
            with_nonce(
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response(),
                &nonce,
            )
        }
        Err(Refusal::UseNonce) => {
            s.counts.token_nonce_demands += 1;
            let body = r#"{"error":"use_dpop_nonce","error_description":"a nonce is required"}"#;
            with_nonce(
                (
                    StatusCode::BAD_REQUEST,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response(),
                &nonce,
            )
        }
        Err(other) => {
            s.counts.refused.push(other);
            (StatusCode::BAD_REQUEST, r#"{"error":"invalid_dpop_proof"}"#).into_response()
        }
    }
}

async fn resource_endpoint(
    State(shared): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    *s.counts.hits.entry(path.clone()).or_default() += 1;
    let htu = format!("http://127.0.0.1:{}/api/{path}", s.port);
    let proof = headers
        .get("dpop")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("DPoP "))
        .unwrap_or("")
        .to_owned();
    let Some(bound) = s.bound.get(&token).cloned() else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, r#"DPoP error="invalid_token""#)],
        )
            .into_response();
    };
    let expect = Expect {
        method: "GET",
        htu: &htu,
        access_token: Some(&token),
        bound_jkt: Some(&bound),
        now: now(),
    };
    let mut result = s.resource.verify(&proof, &expect);
    // The nonce just replaced is still accepted: a request in flight across a rotation
    // is not refused twice.
    if result == Err(Refusal::UseNonce) && s.previous_nonce.is_some() {
        let current = s.resource.nonce.clone();
        s.resource.nonce = s.previous_nonce.clone();
        s.resource.forget_last();
        result = s.resource.verify(&proof, &expect);
        s.resource.nonce = current;
    }
    let nonce = s.resource.nonce.clone().unwrap_or_default();
    match result {
        Ok(_) => {
            s.accepted += 1;
            if s.accepted % ROTATE_EVERY == 0 {
                s.counts.rotations += 1;
                s.previous_nonce = s.resource.nonce.take();
                s.resource.nonce = Some(format!("rs-{}", s.counts.rotations));
            }
            let nonce = s.resource.nonce.clone().unwrap_or_default();
            with_nonce((StatusCode::OK, "ok").into_response(), &nonce)
        }
        Err(Refusal::UseNonce) => {
            s.counts.resource_nonce_demands += 1;
            with_nonce(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, r#"DPoP error="use_dpop_nonce""#)],
                )
                    .into_response(),
                &nonce,
            )
        }
        Err(other) => {
            s.counts.refused.push(other);
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, r#"DPoP error="invalid_token""#)],
            )
                .into_response()
        }
    }
}

/// A loopback DPoP server on 127.0.0.1:0; stops when dropped.
pub struct DpopServer {
    shared: Shared,
    stop: Option<futures::channel::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DpopServer {
    /// Starts the server: both endpoints demand a nonce from the first request on.
    pub fn start() -> DpopServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("dpop testkit: bind 127.0.0.1:0: {e:?}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("dpop testkit: local address: {e:?}"))
            .port();
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("dpop testkit: non-blocking: {e:?}"));
        let token = Verifier {
            nonce: Some("as-0".into()),
            ..Verifier::default()
        };
        let resource = Verifier {
            nonce: Some("rs-0".into()),
            ..Verifier::default()
        };
        let shared = Arc::new(Mutex::new(Server {
            port,
            token,
            resource,
            previous_nonce: None,
            accepted: 0,
            bound: HashMap::new(),
            counts: Counts::default(),
        }));
        let app = Router::new()
            .route("/token", post(token_endpoint))
            .route("/api/{*path}", get(resource_endpoint))
            .with_state(shared.clone());
        let (stop, stopped) = futures::channel::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("dpop testkit: runtime: {e:?}"));
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .unwrap_or_else(|e| panic!("dpop testkit: listener: {e:?}"));
                let serve = std::pin::pin!(axum::serve(listener, app).into_future());
                let _ = futures::future::select(serve, stopped).await;
            });
        });
        DpopServer {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn origin(&self) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.shared.lock().unwrap_or_else(|e| e.into_inner()).port
        )
    }

    /// Reads the counts.
    pub fn counts<T>(&self, read: impl FnOnce(&Counts) -> T) -> T {
        read(&self.shared.lock().unwrap_or_else(|e| e.into_inner()).counts)
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

/// D1: 100 concurrent clients, a nonce demanded at both endpoints and the resource
/// server's rotated mid-storm: no caller-visible error, at most one resend per request,
/// one token (the nonce demands cost no refresh), no proof refused (no `jti` reused), and
/// the token endpoint's nonce demand answered once.
pub async fn d1_a_nonce_storm_costs_no_error_no_refresh_and_one_resend_at_most(
    adapter: &dyn Adapter,
) {
    let name = adapter.name();
    let server = DpopServer::start();
    let origin = server.origin();
    let dpop =
        Dpop::new(DpopKey::generate().unwrap_or_else(|e| panic!("dpop testkit: key: {e:?}")));
    let source =
        ClientCredentialsGrant::new(adapter.bare_transport(), &format!("{origin}/token"), "app")
            .unwrap_or_else(|e| panic!("dpop testkit: grant: {e:?}"))
            .client_secret("client-secret")
            .dpop(dpop.clone());
    let auth = adapter
        .builder()
        .source(source)
        .allowed_origin(&origin)
        .dpop(dpop)
        .build()
        .unwrap_or_else(|e| panic!("dpop testkit: policy: {e:?}"));
    let client = adapter.client(auth);
    const CLIENTS: usize = 100;
    const ROUNDS: usize = 5;
    let results = futures::future::join_all((0..CLIENTS).map(|c| {
        let client = client.clone();
        let origin = origin.clone();
        async move {
            let mut statuses = Vec::new();
            for r in 0..ROUNDS {
                let request = TestRequest {
                    method: "GET".into(),
                    url: format!("{origin}/api/{c}-{r}"),
                    ..TestRequest::default()
                };
                statuses.push(client.send(request).await.map(|r| r.status));
            }
            statuses
        }
    }))
    .await;
    let errors: Vec<_> = results
        .iter()
        .flatten()
        .filter(|r| !matches!(r, Ok(200)))
        .collect();
    assert!(
        errors.is_empty(),
        "{name}: caller-visible errors: {errors:?}"
    );
    server.counts(|c| {
        assert_eq!(c.issued, 1, "{name}: nonce demands cost no refresh");
        assert_eq!(
            c.token_nonce_demands, 1,
            "{name}: one nonce demand at the token endpoint"
        );
        assert!(
            c.refused.is_empty(),
            "{name}: refused proofs (a reused jti among them?): {:?}",
            c.refused
        );
        assert!(
            c.rotations >= 2,
            "{name}: the nonce rotated mid-storm ({} rotations)",
            c.rotations
        );
        assert!(
            c.resource_nonce_demands >= 1,
            "{name}: the resource server demanded a nonce"
        );
        let worst = c.hits.values().max().copied().unwrap_or(0);
        assert!(worst <= 2, "{name}: a request was sent {worst} times");
        assert_eq!(c.hits.len(), CLIENTS * ROUNDS, "{name}");
    });
}

/// D2: a token stolen without its key is refused: a second client with another key
/// replays the first one's token.
pub async fn d2_a_stolen_token_is_refused_without_its_key(adapter: &dyn Adapter) {
    let name = adapter.name();
    let server = DpopServer::start();
    let origin = server.origin();
    let dpop =
        Dpop::new(DpopKey::generate().unwrap_or_else(|e| panic!("dpop testkit: key: {e:?}")));
    let source =
        ClientCredentialsGrant::new(adapter.bare_transport(), &format!("{origin}/token"), "app")
            .unwrap_or_else(|e| panic!("dpop testkit: grant: {e:?}"))
            .client_secret("client-secret")
            .dpop(dpop.clone());
    let auth = adapter
        .builder()
        .source(source)
        .allowed_origin(&origin)
        .dpop(dpop)
        .build()
        .unwrap_or_else(|e| panic!("dpop testkit: policy: {e:?}"));
    let owner = adapter.client(auth.clone());
    let request = |path: &str| TestRequest {
        method: "GET".into(),
        url: format!("{origin}/api/{path}"),
        ..TestRequest::default()
    };
    assert_eq!(
        owner.send(request("mine")).await.map(|r| r.status),
        Ok(200),
        "{name}"
    );
    let stolen = auth
        .flight()
        .and_then(|f| f.current())
        .unwrap_or_else(|| panic!("no token after a success"))
        .access()
        .clone();
    // The thief has the token and its own key, not the owner's.
    let thief_key =
        Dpop::new(DpopKey::generate().unwrap_or_else(|e| panic!("dpop testkit: key: {e:?}")));
    let thief = adapter
        .builder()
        .source(tokenflight::from_fn(move |_| {
            let stolen = stolen.clone();
            async move { Ok(tokenflight::Token::new(stolen.expose())) }
        }))
        .allowed_origin(&origin)
        .dpop(thief_key)
        .build()
        .unwrap_or_else(|e| panic!("dpop testkit: policy: {e:?}"));
    let thief = adapter.client(thief);
    let status = thief.send(request("theirs")).await.map(|r| r.status);
    assert_eq!(status, Ok(401), "{name}: a stolen token must be refused");
    server.counts(|c| {
        assert!(
            c.refused.contains(&Refusal::WrongKey),
            "{name}: {:?}",
            c.refused
        )
    });
}
