//! The HTTP side: the token endpoint, the protected resources, the redirect, and the
//! middleware that notices credentials. Handlers hold the state lock only between
//! awaits, never across one.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;

use super::dpop::Refusal;
use axum::body::Body;
use axum::extract::{Request, State as Extract};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;

use super::Failure;
use super::assertions::{self, Refused};
use super::state::{Issued, OAuthError, RecordedRequest, Shared, State};

/// RFC 8693 §2.1.
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 7523 §2.1.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 §2.2.
const JWT_CLIENT_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

const TOKEN_PATH: &str = "/oauth/token";

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(TOKEN_PATH, post(token_endpoint))
        .route("/api/{*path}", get(resource).post(resource).put(resource))
        .route("/redirect", any(redirect))
        .route("/stream", get(stream))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            notice_credentials,
        ))
        .with_state(shared)
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Counts requests outside the token endpoint and whether they carried credentials: the
/// "other origin" server's record that no token leaked to it (C12).
async fn notice_credentials(
    Extract(shared): Extract<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() != TOKEN_PATH {
        let credentialed = request.headers().contains_key(header::AUTHORIZATION)
            || query_param(request.uri(), "token").is_some();
        shared.update(|state| {
            state.counters.other_requests += 1;
            if credentialed {
                state.counters.credentialed_requests += 1;
            }
        });
    }
    next.run(request).await
}

// ---- token endpoint -------------------------------------------------------------------

async fn token_endpoint(
    Extract(shared): Extract<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let grant = form
        .as_ref()
        .ok()
        .and_then(|f| f.get("grant_type").cloned());
    // The assertion's `jti` is recorded on arrival, before any injected failure: a
    // client that resends one after a failed attempt is caught.
    let assertion_jti = form.as_ref().ok().and_then(|f| {
        f.get("client_assertion")
            .or_else(|| f.get("assertion"))
            .map(|a| assertions::jti_of(a))
    });
    let (failure, latency, replayed) = shared.update(|state| {
        state.counters.token_calls += 1;
        match grant.as_deref() {
            Some("refresh_token") => state.counters.refresh_token_calls += 1,
            Some("client_credentials") => state.counters.client_credentials_calls += 1,
            Some(TOKEN_EXCHANGE) => state.counters.token_exchange_calls += 1,
            Some(JWT_BEARER) => state.counters.jwt_bearer_calls += 1,
            _ => {}
        }
        let replayed = assertion_jti
            .as_ref()
            .is_some_and(|jti| state.note_assertion(jti.as_deref()));
        (state.next_failure(), state.config.token_latency, replayed)
    });
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(failure) = failure {
        if failure == Failure::Hang {
            // Cut off only when the server's runtime is dropped.
            std::future::pending::<()>().await;
        }
        shared.update(|state| state.counters.token_errors += 1);
        return injected(failure);
    }
    // DPoP mode: the proof is checked before the grant, so a refused proof spends no
    // refresh token (RFC 9449 §8).
    let proof = shared.update(|state| {
        let htu = token_endpoint_url(&headers);
        let dpop = state.dpop.as_mut()?;
        let verdict = dpop.check_token_request(&headers, &htu);
        let nonce = dpop.nonce().map(str::to_owned);
        match &verdict {
            Err(Refusal::UseNonce) => state.counters.dpop_nonce_demands += 1,
            Err(_) => state.counters.dpop_refused += 1,
            Ok(_) => {}
        }
        Some((verdict, nonce))
    });
    let (jkt, nonce) = match proof {
        None => (None, None),
        Some((Ok(jkt), nonce)) => (Some(jkt), nonce),
        Some((Err(refusal), nonce)) => {
            let error = if refusal == Refusal::UseNonce {
                "use_dpop_nonce"
            } else {
                "invalid_dpop_proof"
            };
            let response = json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": error }),
            );
            return with_dpop_nonce(no_store(response), nonce.as_deref());
        }
    };
    let outcome = shared.update(|state| {
        let outcome = form.and_then(|form| grant_token(state, &headers, &form, replayed));
        if outcome.is_err() {
            state.counters.token_errors += 1;
        }
        if let (Ok(issued), Some(jkt), Some(dpop)) = (&outcome, &jkt, state.dpop.as_mut()) {
            dpop.bind(&issued.access_token, jkt.clone());
        }
        outcome
    });
    let response = match outcome {
        Ok(issued) => token_answer(&issued, jkt.is_some()),
        Err(error) => oauth_error(error),
    };
    with_dpop_nonce(response, nonce.as_deref())
}

/// Adds the `DPoP-Nonce` header (DPoP mode).
fn with_dpop_nonce(mut response: Response, nonce: Option<&str>) -> Response {
    if let Some(value) = nonce.and_then(|n| HeaderValue::from_str(n).ok()) {
        response.headers_mut().insert("dpop-nonce", value);
    }
    response
}

/// Parses `application/x-www-form-urlencoded`; a repeated parameter is an
/// `invalid_request` (RFC 6749 §3.1).
fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let mut form = HashMap::new();
    for (key, value) in url::form_urlencoded::parse(body) {
        if form.insert(key.into_owned(), value.into_owned()).is_some() {
            return Err(OAuthError::InvalidRequest);
        }
    }
    Ok(form)
}

/// The `aud` an assertion must name: this token endpoint, as the client addressed it.
fn token_endpoint_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    format!("http://{host}{TOKEN_PATH}")
}

fn grant_token(
    state: &mut State,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    replayed: bool,
) -> Result<Issued, OAuthError> {
    let grant = form.get("grant_type").map(String::as_str);
    let client = authenticate_client(state, headers, form, replayed)?;
    // The API the token is for: bound into the token, checked by the resource.
    let audience = form.get("audience").map(String::as_str);
    // A security token service may trust the subject (or the assertion) alone; the
    // other grants need an authenticated client.
    if !client && !matches!(grant, Some(TOKEN_EXCHANGE | JWT_BEARER)) {
        return Err(OAuthError::InvalidClient);
    }
    match grant {
        Some("refresh_token") => {
            let presented = form
                .get("refresh_token")
                .ok_or(OAuthError::InvalidRequest)?;
            state.refresh_grant(presented, audience)
        }
        Some("client_credentials") => Ok(state.client_credentials_grant(audience)),
        Some(TOKEN_EXCHANGE) => {
            let subject = form
                .get("subject_token")
                .ok_or(OAuthError::InvalidRequest)?;
            match form.get("subject_token_type").map(String::as_str) {
                Some(
                    "urn:ietf:params:oauth:token-type:jwt"
                    | "urn:ietf:params:oauth:token-type:access_token",
                ) => {}
                _ => return Err(OAuthError::InvalidRequest),
            }
            if audience == Some(REFUSED_AUDIENCE) {
                return Err(OAuthError::InvalidTarget);
            }
            state.exchange_grant(subject, audience)
        }
        Some(JWT_BEARER) => {
            let assertion = form.get("assertion").ok_or(OAuthError::InvalidRequest)?;
            let keys = state.client_keys.clone();
            let issuer = state.config.client_id.clone();
            match assertions::verify(
                assertion,
                &keys,
                &issuer,
                true,
                &token_endpoint_url(headers),
                replayed,
            ) {
                Ok(_) => Ok(state.client_credentials_grant(audience)),
                Err(refused) => {
                    if refused != Refused::Replayed {
                        state.counters.assertions_refused += 1;
                    }
                    Err(OAuthError::InvalidGrant)
                }
            }
        }
        Some(_) => Err(OAuthError::UnsupportedGrantType),
        None => Err(OAuthError::InvalidRequest),
    }
}

/// The audience the token exchange refuses with `invalid_target` (RFC 8693 §2.2.2).
pub const REFUSED_AUDIENCE: &str = "refused-audience";

/// RFC 6749 §2.3.1: HTTP Basic (id and secret form-urlencoded first), the form fields
/// `client_id` and `client_secret`, or (RFC 7523 §2.2) a `client_assertion` signed by a
/// registered key — exactly one of them. `Ok(false)`: no client credentials at all.
fn authenticate_client(
    state: &mut State,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    replayed: bool,
) -> Result<bool, OAuthError> {
    if let Some(assertion) = form.get("client_assertion") {
        if headers.contains_key(header::AUTHORIZATION) || form.contains_key("client_secret") {
            return Err(OAuthError::InvalidRequest);
        }
        if form.get("client_assertion_type").map(String::as_str) != Some(JWT_CLIENT_ASSERTION) {
            return Err(OAuthError::InvalidRequest);
        }
        let client_id = state.config.client_id.clone();
        if form.get("client_id").is_some_and(|id| *id != client_id) {
            return Err(OAuthError::InvalidClient);
        }
        let keys = state.client_keys.clone();
        return match assertions::verify(
            assertion,
            &keys,
            &client_id,
            false,
            &token_endpoint_url(headers),
            replayed,
        ) {
            Ok(_) => Ok(true),
            Err(refused) => {
                if refused != Refused::Replayed {
                    state.counters.assertions_refused += 1;
                }
                Err(OAuthError::InvalidClient)
            }
        };
    }
    let (id, secret) = match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            if form.contains_key("client_secret") {
                return Err(OAuthError::InvalidRequest);
            }
            basic_credentials(value).ok_or(OAuthError::InvalidClient)?
        }
        None => {
            if !form.contains_key("client_id") && !form.contains_key("client_secret") {
                return Ok(false);
            }
            let id = form.get("client_id").ok_or(OAuthError::InvalidClient)?;
            let secret = form.get("client_secret").ok_or(OAuthError::InvalidClient)?;
            (id.clone(), secret.clone())
        }
    };
    if id == state.config.client_id && secret == state.config.client_secret {
        Ok(true)
    } else {
        Err(OAuthError::InvalidClient)
    }
}

fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| -> String {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = (status, value.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// RFC 6749 §5.1.
fn token_answer(issued: &Issued, dpop: bool) -> Response {
    let mut body = serde_json::json!({
        "access_token": issued.access_token,
        "token_type": if dpop { "DPoP" } else { "Bearer" },
        "expires_in": issued.expires_in,
    });
    if let (Some(refresh), Some(map)) = (&issued.refresh_token, body.as_object_mut()) {
        map.insert("refresh_token".into(), refresh.clone().into());
    }
    no_store(json(StatusCode::OK, &body))
}

/// RFC 6749 §5.2: 400, or 401 with `WWW-Authenticate` for `invalid_client`. No
/// description: nothing presented is ever echoed.
fn oauth_error(error: OAuthError) -> Response {
    let status = match error {
        OAuthError::InvalidClient => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut response = json(status, &serde_json::json!({ "error": error.code() }));
    if error == OAuthError::InvalidClient {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"testkit\""),
        );
    }
    no_store(response)
}

fn injected(failure: Failure) -> Response {
    match failure {
        Failure::Status500 => no_store(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": "server_error" }),
        )),
        Failure::TooMany { retry_after_secs } => {
            let mut response = json(
                StatusCode::TOO_MANY_REQUESTS,
                &serde_json::json!({ "error": "temporarily_unavailable" }),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            no_store(response)
        }
        Failure::Unavailable => no_store(json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "error": "temporarily_unavailable" }),
        )),
        Failure::InvalidGrant => oauth_error(OAuthError::InvalidGrant),
        Failure::MalformedJson => {
            let mut response = (StatusCode::OK, "{\"access_token\": ").into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            no_store(response)
        }
        // Handled before: a hang never answers.
        Failure::Hang => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

// ---- protected resources --------------------------------------------------------------

fn presented_token(query_mode: bool, dpop: bool, uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if query_mode {
        return query_param(uri, "token");
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let expected = if dpop { "dpop" } else { "bearer" };
    scheme
        .eq_ignore_ascii_case(expected)
        .then(|| token.trim().to_owned())
}

/// The audience of a protected resource: `<audience>` for `/api/aud/<audience>/...`,
/// none for the other `/api/...` paths.
fn audience_of(path: &str) -> Option<&str> {
    path.strip_prefix("/api/aud/")?.split('/').next()
}

async fn resource(
    Extract(shared): Extract<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The verdict is taken on arrival, so a test that expires tokens afterwards does not
    // change the answer of a request already in the server.
    let (accepted, token_given, business_code, latency, held, dpop) = shared.update(|state| {
        let token = presented_token(
            state.config.query_token,
            state.dpop.is_some(),
            &uri,
            &headers,
        );
        let audience = audience_of(uri.path());
        let mut accepted = !state.config.require_auth
            || (!state.config.reject_all
                && token
                    .as_deref()
                    .is_some_and(|t| state.access_valid(t, audience)));
        // DPoP mode: a valid token also needs a proof by the key it is bound to.
        let mut dpop = None;
        if let (true, Some(mode), Some(token)) = (accepted, state.dpop.as_mut(), &token) {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let htu = format!("http://{host}{}", uri.path());
            let verdict = mode.check_resource(&headers, method.as_str(), &htu, token);
            match &verdict {
                Err(Refusal::UseNonce) => state.counters.dpop_nonce_demands += 1,
                Err(_) => state.counters.dpop_refused += 1,
                Ok(()) => {}
            }
            accepted = verdict.is_ok();
            dpop = Some((verdict.err(), mode.nonce().map(str::to_owned)));
        } else if let Some(mode) = &state.dpop {
            dpop = Some((None, mode.nonce().map(str::to_owned)));
        }
        if token
            .as_deref()
            .is_some_and(|t| state.issued_for_other_audience(t, audience))
        {
            state.counters.cross_audience_requests += 1;
        }
        let held = (state.hold_next > 0).then(|| {
            state.hold_next -= 1;
            state.counters.held_resource_calls += 1;
            state.releases
        });
        state.counters.resource_calls += 1;
        if let Some(token) = &token {
            *state
                .counters
                .requests_per_token
                .entry(token.clone())
                .or_default() += 1;
        }
        if !accepted {
            state.counters.rejections += 1;
        }
        let token_given = token.is_some();
        state.requests.push(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            referer: headers
                .get(header::REFERER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            token,
            authorization: headers.contains_key(header::AUTHORIZATION),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
            accepted,
        });
        (
            accepted,
            token_given,
            state.config.business_code,
            state.config.resource_latency,
            held,
            dpop,
        )
    });
    if let Some(before) = held {
        wait_for_release(&shared, before).await;
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some((refusal, nonce)) = dpop {
        if accepted {
            return with_dpop_nonce(echo(&method, &uri, body), nonce.as_deref());
        }
        let challenge = if refusal == Some(Refusal::UseNonce) {
            "DPoP error=\"use_dpop_nonce\", algs=\"ES256\""
        } else {
            "DPoP error=\"invalid_token\", algs=\"ES256\""
        };
        let mut response = (StatusCode::UNAUTHORIZED, "invalid token").into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        return with_dpop_nonce(response, nonce.as_deref());
    }
    if accepted {
        return echo(&method, &uri, body);
    }
    if business_code {
        return json(
            StatusCode::OK,
            &serde_json::json!({ "code": 401, "message": "token expired" }),
        );
    }
    // RFC 6750 §3.1: no error code when no token was presented at all.
    let challenge = if token_given {
        "Bearer error=\"invalid_token\""
    } else {
        "Bearer"
    };
    let mut response = (StatusCode::UNAUTHORIZED, "invalid token").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

async fn wait_for_release(shared: &Shared, before: u64) {
    loop {
        let changed = shared.changed().notified();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        if shared.read(|state| state.releases) != before {
            return;
        }
        changed.await;
    }
}

fn echo(method: &Method, uri: &Uri, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(value) = HeaderValue::from_str(method.as_str()) {
        headers.insert("x-echo-method", value);
    }
    if let Ok(value) = HeaderValue::from_str(uri.path()) {
        headers.insert("x-echo-path", value);
    }
    response
}

// ---- redirect -------------------------------------------------------------------------

async fn redirect(Extract(shared): Extract<Arc<Shared>>, uri: Uri) -> Response {
    let Some(mut target) = query_param(&uri, "to") else {
        return (StatusCode::BAD_REQUEST, "missing `to`").into_response();
    };
    if query_param(&uri, "keep_query").is_some() {
        // The rest of the query, byte for byte, as a site that moved keeps it.
        let rest: Vec<&str> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|piece| {
                let name = piece.split('=').next().unwrap_or("");
                !piece.is_empty() && name != "to" && name != "keep_query"
            })
            .collect();
        if !rest.is_empty() {
            target.push(if target.contains('?') { '&' } else { '?' });
            target.push_str(&rest.join("&"));
        }
    }
    let Ok(location) = HeaderValue::from_str(&target) else {
        return (StatusCode::BAD_REQUEST, "bad `to`").into_response();
    };
    shared.update(|state| state.counters.redirects += 1);
    let mut response = StatusCode::FOUND.into_response();
    response.headers_mut().insert(header::LOCATION, location);
    response
}

// ---- stream ---------------------------------------------------------------------------

/// A response whose body never ends by itself: a first chunk at once, then the last
/// one after a release (or after [`STREAM_CUT_OFF`], counted as cut off). No
/// `Content-Length`; the `Content-Type` is the `content_type` query parameter
/// (`text/event-stream` when missing).
async fn stream(Extract(shared): Extract<Arc<Shared>>, uri: Uri) -> Response {
    let content_type =
        query_param(&uri, "content_type").unwrap_or_else(|| "text/event-stream".to_owned());
    // Counted before a byte goes out: whoever sees the first chunk sees the count.
    let before = shared.update(|state| {
        state.counters.streams_opened += 1;
        state.releases
    });
    let first = futures::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(
        Bytes::from_static(STREAM_FIRST),
    )));
    let last = futures::stream::once(async move {
        let released = tokio::time::timeout(STREAM_CUT_OFF, wait_for_release(&shared, before));
        if released.await.is_err() {
            shared.update(|state| state.counters.streams_cut_off += 1);
        }
        Ok(Bytes::from_static(STREAM_LAST))
    });
    let mut response = Response::new(Body::from_stream(futures::StreamExt::chain(first, last)));
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// The first chunk of a `/stream` response.
pub const STREAM_FIRST: &[u8] = b"data: first\n\n";
/// The last chunk of a `/stream` response.
pub const STREAM_LAST: &[u8] = b"data: last\n\n";
/// How long a `/stream` response waits for a release before it ends anyway: a safety
/// net that turns a client stuck waiting for the end into a failed check
/// ([`Counters::streams_cut_off`](super::Counters::streams_cut_off)) instead of a hung
/// test. Not a timing threshold: a client that works never waits for it.
pub(super) const STREAM_CUT_OFF: std::time::Duration = std::time::Duration::from_secs(30);
