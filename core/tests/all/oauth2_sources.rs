//! The OAuth 2.0 grants against a scripted in-memory transport: what goes on the wire
//! (RFC 6749 §2.3.1, §4.4, §6) and how every kind of answer is classified (§5.1, §5.2,
//! C9), with secrets kept out of errors and `Debug` output (C12). The same grants run
//! against the real testkit server in `tests/tests/oauth2_grants.rs`.
#![cfg(feature = "oauth2")]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use futures::executor::block_on;
use futures_util::future::BoxFuture;
use tokenflight::oauth2::{
    ClientAuth, ClientCredentialsGrant, MAX_RESPONSE_BYTES, RefreshTokenGrant,
};
use tokenflight::{
    RefreshContext, RefreshReason, SingleFlight, Token, TokenSource, adapter::HttpRequest,
    adapter::HttpResponse, adapter::Transport, adapter::TransportError,
};

const TOKEN_URL: &str = "https://auth.example/oauth/token";

type Answer = Result<HttpResponse, TransportError>;

/// Answers requests from a script and records what was sent.
#[derive(Default)]
struct Scripted {
    answers: Mutex<VecDeque<Answer>>,
    sent: Mutex<Vec<(HttpRequest, usize)>>,
}

impl Scripted {
    fn new(answers: impl IntoIterator<Item = Answer>) -> Arc<Self> {
        Arc::new(Scripted {
            answers: Mutex::new(answers.into_iter().collect()),
            sent: Mutex::default(),
        })
    }

    fn requests(&self) -> Vec<(HttpRequest, usize)> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

impl Transport for Scripted {
    fn send(&self, request: HttpRequest, body_limit: usize) -> BoxFuture<'_, Answer> {
        self.sent.lock().unwrap().push((request, body_limit));
        let answer = self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .expect("no scripted answer left");
        Box::pin(async move { answer })
    }
}

fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut builder = http::Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.body(Bytes::from(body.to_owned())).unwrap())
}

fn ok(body: &str) -> Answer {
    answer(200, &[("content-type", "application/json")], body)
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn cx(previous: Option<Token>) -> RefreshContext {
    RefreshContext::new(RefreshReason::Expired, previous.map(Arc::new), now())
}

fn form(request: &HttpRequest) -> Vec<(String, String)> {
    url::form_urlencoded::parse(request.body())
        .into_owned()
        .collect()
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn refresh_grant(transport: &Arc<Scripted>) -> RefreshTokenGrant {
    RefreshTokenGrant::new(transport.clone(), TOKEN_URL, "client-1")
        .unwrap()
        .client_secret("client-SECRET")
}

#[test]
fn refresh_grant_posts_a_form_with_basic_auth_scope_and_params() {
    let transport = Scripted::new([ok(
        r#"{"access_token":"AT-2","token_type":"Bearer","expires_in":300}"#,
    )]);
    let grant = RefreshTokenGrant::new(transport.clone(), TOKEN_URL, "my client:1")
        .unwrap()
        .client_secret("s&cr=t é")
        .scope("read write")
        .param("audience", "https://api.example")
        .param("resource", "urn:x");
    let previous = Token::new("AT-1").with_refresh("RT-1");
    let token = block_on(grant.fetch(cx(Some(previous)))).unwrap();
    assert_eq!(token.access().expose(), "AT-2");
    assert_eq!(token.expiry(), Some(now() + Duration::from_secs(300)));

    let sent = transport.requests();
    assert_eq!(sent.len(), 1);
    let (request, limit) = &sent[0];
    assert_eq!(*limit, MAX_RESPONSE_BYTES);
    assert_eq!(request.method(), http::Method::POST);
    assert_eq!(request.uri(), TOKEN_URL);
    assert_eq!(
        request.headers()["content-type"],
        "application/x-www-form-urlencoded"
    );
    // §2.3.1: id and secret are form-urlencoded before the Basic encoding.
    let basic = request.headers()["authorization"].clone();
    assert!(basic.is_sensitive());
    let expected =
        base64::engine::general_purpose::STANDARD.encode("my+client%3A1:s%26cr%3Dt+%C3%A9");
    assert_eq!(basic.to_str().unwrap(), format!("Basic {expected}"));
    let form = form(request);
    assert_eq!(field(&form, "grant_type"), Some("refresh_token"));
    assert_eq!(field(&form, "refresh_token"), Some("RT-1"));
    assert_eq!(field(&form, "scope"), Some("read write"));
    assert_eq!(field(&form, "audience"), Some("https://api.example"));
    assert_eq!(field(&form, "resource"), Some("urn:x"));
    assert_eq!(field(&form, "client_secret"), None);
    assert_eq!(field(&form, "client_id"), None);
}

#[test]
fn body_client_auth_and_public_clients() {
    let transport = Scripted::new([ok(r#"{"access_token":"a"}"#), ok(r#"{"access_token":"b"}"#)]);
    let body_auth = ClientCredentialsGrant::new(transport.clone(), TOKEN_URL, "client-1")
        .unwrap()
        .client_secret("client-SECRET")
        .client_auth(ClientAuth::Body);
    block_on(body_auth.fetch(cx(None))).unwrap();
    let public = ClientCredentialsGrant::new(transport.clone(), TOKEN_URL, "public-1").unwrap();
    block_on(public.fetch(cx(None))).unwrap();

    let sent = transport.requests();
    let (with_secret, without) = (&sent[0].0, &sent[1].0);
    assert!(with_secret.headers().get("authorization").is_none());
    let f = form(with_secret);
    assert_eq!(field(&f, "grant_type"), Some("client_credentials"));
    assert_eq!(field(&f, "client_id"), Some("client-1"));
    assert_eq!(field(&f, "client_secret"), Some("client-SECRET"));
    assert_eq!(field(&f, "refresh_token"), None);
    // A client without a secret names itself in the body (§3.2.1), Basic or not.
    assert!(without.headers().get("authorization").is_none());
    assert_eq!(field(&form(without), "client_id"), Some("public-1"));
    assert_eq!(field(&form(without), "client_secret"), None);
}

#[test]
fn reserved_params_cannot_be_overridden() {
    let transport = Scripted::new([ok(r#"{"access_token":"a"}"#)]);
    let grant = ClientCredentialsGrant::new(transport.clone(), TOKEN_URL, "c")
        .unwrap()
        .param("grant_type", "password")
        .param("client_id", "evil");
    block_on(grant.fetch(cx(None))).unwrap();
    let f = form(&transport.requests()[0].0);
    let grant_types: Vec<_> = f.iter().filter(|(n, _)| n == "grant_type").collect();
    assert_eq!(grant_types.len(), 1);
    assert_eq!(field(&f, "grant_type"), Some("client_credentials"));
    assert_eq!(field(&f, "client_id"), Some("c"));
}

#[test]
fn rotation_uses_the_new_refresh_token_and_keeps_the_old_one_otherwise() {
    let transport = Scripted::new([
        ok(r#"{"access_token":"AT-2","token_type":"bearer","refresh_token":"RT-2"}"#),
        ok(r#"{"access_token":"AT-3","token_type":"BEARER"}"#),
    ]);
    let grant = refresh_grant(&transport);
    let second = block_on(grant.fetch(cx(Some(Token::new("AT-1").with_refresh("RT-1"))))).unwrap();
    assert_eq!(second.refresh().unwrap().expose(), "RT-2");
    let third = block_on(grant.fetch(cx(Some(second)))).unwrap();
    // No new refresh token in the answer: the one just spent stays.
    assert_eq!(third.refresh().unwrap().expose(), "RT-2");
    let sent = transport.requests();
    assert_eq!(field(&form(&sent[0].0), "refresh_token"), Some("RT-1"));
    assert_eq!(field(&form(&sent[1].0), "refresh_token"), Some("RT-2"));
}

#[test]
fn initial_refresh_token_is_the_fallback_and_none_at_all_is_permanent() {
    let transport = Scripted::new([ok(r#"{"access_token":"a"}"#), ok(r#"{"access_token":"b"}"#)]);
    let grant = refresh_grant(&transport).initial_refresh_token("RT-LOGIN");
    block_on(grant.fetch(cx(None))).unwrap();
    block_on(grant.fetch(cx(Some(Token::new("no-refresh"))))).unwrap();
    let sent = transport.requests();
    assert_eq!(field(&form(&sent[0].0), "refresh_token"), Some("RT-LOGIN"));
    assert_eq!(field(&form(&sent[1].0), "refresh_token"), Some("RT-LOGIN"));

    let transport = Scripted::new([]);
    let error = block_on(refresh_grant(&transport).fetch(cx(Some(Token::new("x"))))).unwrap_err();
    assert!(error.is_permanent());
    assert!(
        transport.requests().is_empty(),
        "nothing sent without a refresh token"
    );
}

#[test]
fn c9_error_classes() {
    let date = httpdate::fmt_http_date(now() + Duration::from_secs(40));
    let cases: Vec<(Answer, RefreshErrorKind, Option<Duration>)> = vec![
        (
            answer(400, &[], r#"{"error":"invalid_grant"}"#),
            RefreshErrorKind::Permanent,
            None,
        ),
        (
            answer(401, &[], r#"{"error":"invalid_client"}"#),
            RefreshErrorKind::Permanent,
            None,
        ),
        (
            answer(400, &[], r#"{"error":"unauthorized_client"}"#),
            RefreshErrorKind::Permanent,
            None,
        ),
        (
            answer(401, &[], "<html>gateway says no</html>"),
            RefreshErrorKind::Permanent,
            None,
        ),
        (answer(500, &[], "oops"), RefreshErrorKind::Transient, None),
        // Even a 5xx carrying an OAuth error code is the server's trouble.
        (
            answer(502, &[], r#"{"error":"invalid_grant"}"#),
            RefreshErrorKind::Transient,
            None,
        ),
        (
            answer(
                503,
                &[("retry-after", "7")],
                r#"{"error":"temporarily_unavailable"}"#,
            ),
            RefreshErrorKind::Transient,
            Some(Duration::from_secs(7)),
        ),
        (
            answer(429, &[("retry-after", &date)], ""),
            RefreshErrorKind::Transient,
            Some(Duration::from_secs(40)),
        ),
        (
            answer(400, &[], r#"{"error":"slow_down"}"#),
            RefreshErrorKind::Transient,
            None,
        ),
        (ok("{not json"), RefreshErrorKind::Transient, None),
        (
            ok(r#"{"token_type":"Bearer"}"#),
            RefreshErrorKind::Transient,
            None,
        ),
        (
            ok(r#"{"access_token":"a","token_type":"DPoP"}"#),
            RefreshErrorKind::Permanent,
            None,
        ),
        (
            Err(TransportError::Network("connection refused".into())),
            RefreshErrorKind::Transient,
            None,
        ),
        (
            Err(TransportError::Timeout),
            RefreshErrorKind::Timeout,
            None,
        ),
        (
            Err(TransportError::TooLarge {
                limit: MAX_RESPONSE_BYTES,
            }),
            RefreshErrorKind::Transient,
            None,
        ),
        // A transport that ignores the limit does not get the oversized body parsed.
        (
            ok(&format!(
                r#"{{"access_token":"{}"}}"#,
                "a".repeat(MAX_RESPONSE_BYTES)
            )),
            RefreshErrorKind::Transient,
            None,
        ),
    ];
    for (i, (scripted, kind, retry_after)) in cases.into_iter().enumerate() {
        let transport = Scripted::new([scripted]);
        let error = block_on(
            refresh_grant(&transport).fetch(cx(Some(Token::new("a").with_refresh("RT-1")))),
        )
        .unwrap_err();
        assert_eq!(kind_of(&error), kind, "case {i}: {error}");
        assert_eq!(error.retry_after(), retry_after, "case {i}: {error}");
    }
}

#[test]
fn error_messages_carry_the_oauth_code() {
    let transport = Scripted::new([answer(
        400,
        &[],
        r#"{"error":"invalid_grant","error_description":"refresh token revoked"}"#,
    )]);
    let error =
        block_on(refresh_grant(&transport).fetch(cx(Some(Token::new("a").with_refresh("RT")))))
            .unwrap_err();
    let shown = error.to_string();
    assert!(
        shown.contains("HTTP 400") && shown.contains("invalid_grant"),
        "{shown}"
    );
    assert!(shown.contains("refresh token revoked"), "{shown}");
}

#[test]
fn c12_errors_and_debug_never_show_secrets() {
    // A server that echoes what it was sent must not make the error leak it.
    let transport = Scripted::new([answer(
        400,
        &[],
        r#"{"error":"invalid_grant","error_description":"bad token refresh-SECRET for client-SECRET"}"#,
    )]);
    let grant = refresh_grant(&transport).initial_refresh_token("login-SECRET");
    let shown_grant = format!("{grant:?}");
    assert!(!shown_grant.contains("SECRET"), "{shown_grant}");
    assert!(shown_grant.contains("client-1"), "{shown_grant}");
    let error = block_on(grant.fetch(cx(Some(Token::new("a").with_refresh("refresh-SECRET")))))
        .unwrap_err();
    let mut shown = format!("{error} {error:?}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        shown.push_str(&format!(" {cause} {cause:?}"));
        source = cause.source();
    }
    assert!(!shown.contains("SECRET"), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");

    // Parse failures do not quote the body either.
    let transport = Scripted::new([ok(r#"{"access_token":{"nested":"access-SECRET"}}"#)]);
    let error =
        block_on(refresh_grant(&transport).fetch(cx(Some(Token::new("a").with_refresh("r")))))
            .unwrap_err();
    assert!(!format!("{error} {error:?}").contains("SECRET"));

    let cc = ClientCredentialsGrant::new(Scripted::new([]), TOKEN_URL, "c")
        .unwrap()
        .client_secret("cc-SECRET");
    assert!(!format!("{cc:?}").contains("SECRET"));
}

#[test]
fn client_credentials_expiry_from_expires_in_or_jwt() {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let jwt = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"RS256"}"#),
        b64(r#"{"exp":1700000900}"#)
    );
    let transport = Scripted::new([
        ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":"60"}"#),
        ok(&format!(
            r#"{{"access_token":"{jwt}","token_type":"Bearer"}}"#
        )),
        ok(r#"{"access_token":"opaque","token_type":"Bearer"}"#),
    ]);
    let grant = ClientCredentialsGrant::new(transport.clone(), TOKEN_URL, "c")
        .unwrap()
        .client_secret("s");
    let first = block_on(grant.fetch(cx(None))).unwrap();
    assert_eq!(first.expiry(), Some(now() + Duration::from_secs(60)));
    let second = block_on(grant.fetch(cx(None))).unwrap();
    assert_eq!(second.expiry(), Some(now() + Duration::from_secs(900)));
    let third = block_on(grant.fetch(cx(None))).unwrap();
    assert_eq!(third.expiry(), None);
}

#[test]
fn token_url_must_be_absolute_http() {
    for bad in [
        "not a url",
        "ftp://auth.example/token",
        "/oauth/token",
        "mailto:a@b",
    ] {
        assert!(
            RefreshTokenGrant::new(Scripted::new([]), bad, "c").is_err(),
            "{bad}"
        );
        assert!(
            ClientCredentialsGrant::new(Scripted::new([]), bad, "c").is_err(),
            "{bad}"
        );
    }
    let error =
        RefreshTokenGrant::new(Scripted::new([]), "ftp://user:PASS@host/", "c").unwrap_err();
    assert!(!error.to_string().contains("PASS"));
}

#[test]
fn the_flight_hands_the_newest_refresh_token_to_the_grant() {
    let transport = Scripted::new([
        ok(
            r#"{"access_token":"AT-1","token_type":"Bearer","expires_in":3600,"refresh_token":"RT-2"}"#,
        ),
        ok(
            r#"{"access_token":"AT-2","token_type":"Bearer","expires_in":3600,"refresh_token":"RT-3"}"#,
        ),
    ]);
    let grant = refresh_grant(&transport).initial_refresh_token("RT-1");
    let flight = SingleFlight::builder().source(grant).build().unwrap();
    block_on(async {
        let first = flight.token().await.unwrap();
        assert_eq!(first.access().expose(), "AT-1");
        let second = flight.force_refresh().await.unwrap();
        assert_eq!(second.access().expose(), "AT-2");
        assert_eq!(second.refresh().unwrap().expose(), "RT-3");
    });
    let sent = transport.requests();
    assert_eq!(field(&form(&sent[0].0), "refresh_token"), Some("RT-1"));
    assert_eq!(field(&form(&sent[1].0), "refresh_token"), Some("RT-2"));
}

/// A failure's severity and cause as one value, for the tables and assertions here
/// (the 0.1 API keeps them on two axes: `is_permanent()` and `cause()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)]
enum RefreshErrorKind {
    Transient,
    Permanent,
    Timeout,
    Store,
    Panicked,
}

#[allow(dead_code)]
fn kind_of(error: &tokenflight::RefreshError) -> RefreshErrorKind {
    match error.cause() {
        tokenflight::Cause::Timeout => RefreshErrorKind::Timeout,
        tokenflight::Cause::Store => RefreshErrorKind::Store,
        tokenflight::Cause::Panicked => RefreshErrorKind::Panicked,
        _ if error.is_permanent() => RefreshErrorKind::Permanent,
        _ => RefreshErrorKind::Transient,
    }
}
