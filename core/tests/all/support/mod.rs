//! Test doubles shared by the core's integration tests: a gated token source, a fake
//! HTTP request/response pair, a manual spawner and small polling helpers. No runtime.

#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokenflight::{
    RefreshContext, RefreshError, RefreshReason, Token, TokenSource, adapter::AuthRequest,
    adapter::AuthResponse, adapter::InvalidHeader, adapter::ResponseView, adapter::Spawn,
};
use url::Url;

/// An observer that calls `f` with the error when re-authentication becomes necessary.
pub struct OnAuthLost<F>(F);

/// An [`OnAuthLost`] observer of `f` (a function, so a closure's argument type is
/// inferred from the bound).
pub fn on_auth_lost<F: Fn(&RefreshError) + Send + Sync>(f: F) -> OnAuthLost<F> {
    OnAuthLost(f)
}

impl<F: Fn(&RefreshError) + Send + Sync> tokenflight::observe::Observer for OnAuthLost<F> {
    fn auth_lost(&self, event: &tokenflight::observe::AuthLost<'_>) {
        (self.0)(event.error)
    }
}

/// What the scripted source does on its n-th call.
#[derive(Clone, Debug)]
pub enum Step {
    /// Return a token `token-<n>` expiring in the given time.
    Ok(Duration),
    /// Fail transiently.
    Transient,
    /// Fail permanently.
    Permanent,
    /// Never answer.
    Hang,
}

/// A token source that follows a script, can be held at a gate, and counts calls.
pub struct ScriptedSource {
    pub calls: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub dropped_mid_call: AtomicUsize,
    pub reasons: Mutex<Vec<RefreshReason>>,
    script: Mutex<VecDeque<Step>>,
    default: Step,
    gate: Gate,
    clock: tokenflight::test_util::ManualClock,
}

impl ScriptedSource {
    pub fn new(clock: &tokenflight::test_util::ManualClock, default: Step) -> Arc<Self> {
        Arc::new(ScriptedSource {
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            dropped_mid_call: AtomicUsize::new(0),
            reasons: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            default,
            gate: Gate::open(),
            clock: clock.clone(),
        })
    }

    /// Steps for the next calls, before falling back to the default.
    pub fn then(self: &Arc<Self>, step: Step) -> Arc<Self> {
        self.script.lock().unwrap().push_back(step);
        self.clone()
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

struct InFlight<'a>(&'a ScriptedSource, bool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.dropped_mid_call.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl TokenSource for ScriptedSource {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.reasons.lock().unwrap().push(cx.reason);
            let now_in = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now_in, Ordering::SeqCst);
            let mut guard = InFlight(self, false);
            let step = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| self.default.clone());
            self.gate.wait().await;
            let result = match step {
                Step::Ok(lifetime) => Ok(Token::new(format!("token-{n}"))
                    .with_refresh(format!("refresh-{n}"))
                    .expires_in(lifetime, tokenflight::adapter::Clock::now(&self.clock))),
                Step::Transient => Err(RefreshError::transient(format!("transient failure {n}"))),
                Step::Permanent => Err(RefreshError::permanent(format!("invalid_grant {n}"))),
                Step::Hang => futures::future::pending().await,
            };
            guard.1 = true;
            result
        })
    }
}

/// A latch: `wait` is pending while closed.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Mutex<(bool, Vec<std::task::Waker>)>>,
}

impl Gate {
    pub fn open() -> Self {
        Gate {
            inner: Arc::new(Mutex::new((true, Vec::new()))),
        }
    }

    pub fn close(&self) {
        self.inner.lock().unwrap().0 = false;
    }

    pub fn release(&self) {
        let wakers = {
            let mut g = self.inner.lock().unwrap();
            g.0 = true;
            std::mem::take(&mut g.1)
        };
        wakers.into_iter().for_each(|w| w.wake());
    }

    pub fn wait(&self) -> impl Future<Output = ()> + Send + '_ {
        futures::future::poll_fn(move |cx| {
            let mut g = self.inner.lock().unwrap();
            if g.0 {
                Poll::Ready(())
            } else {
                g.1.push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Yields once to the executor.
pub async fn yield_now() {
    let mut yielded = false;
    futures::future::poll_fn(move |cx: &mut Context<'_>| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Yields until `cond` holds (a deterministic signal, not a sleep).
pub async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        yield_now().await;
    }
}

/// Polls `fut` once with a no-op waker; true if it completed.
pub fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    Pin::new(fut).poll(&mut cx)
}

/// A spawner that only queues tasks; the test runs them when it wants.
#[derive(Clone, Default)]
pub struct QueueSpawner {
    pub tasks: Arc<Mutex<Vec<BoxFuture<'static, ()>>>>,
}

impl QueueSpawner {
    pub fn take(&self) -> Vec<BoxFuture<'static, ()>> {
        std::mem::take(&mut *self.tasks.lock().unwrap())
    }

    pub async fn run_all(&self) {
        futures::future::join_all(self.take()).await;
    }
}

impl Spawn for QueueSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) -> bool {
        self.tasks.lock().unwrap().push(task);
        true
    }
}

/// A request as the fake client sees it.
#[derive(Debug)]
pub struct FakeRequest {
    pub url: Url,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub replayable: bool,
}

impl FakeRequest {
    pub fn get(url: &str) -> Self {
        FakeRequest {
            url: Url::parse(url).unwrap(),
            headers: Vec::new(),
            body: Vec::new(),
            replayable: true,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl AuthRequest for FakeRequest {
    fn method(&self) -> http::Method {
        http::Method::GET
    }
    fn url(&self) -> &Url {
        &self.url
    }
    fn url_mut(&mut self) -> &mut Url {
        &mut self.url
    }
    fn set_sensitive_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.to_owned()));
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        self.replayable.then(|| FakeRequest {
            url: self.url.clone(),
            headers: self.headers.clone(),
            body: self.body.clone(),
            replayable: true,
        })
    }
}

/// A response from the fake server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeResponse {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub body: Vec<u8>,
    /// The `Content-Length` header, if any (a body rule reads only bodies that have one).
    pub content_length: Option<String>,
    /// Where the response came from, if the client followed a redirect.
    pub final_url: Option<Url>,
}

impl FakeResponse {
    pub fn status(status: u16) -> Self {
        FakeResponse {
            status,
            www_authenticate: None,
            body: Vec::new(),
            content_length: None,
            final_url: None,
        }
    }

    /// `status` with `body` and its `Content-Length`.
    pub fn with_body(status: u16, body: Vec<u8>) -> Self {
        FakeResponse {
            content_length: Some(body.len().to_string()),
            body,
            ..FakeResponse::status(status)
        }
    }
}

impl ResponseView for FakeResponse {
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        if name == http::header::WWW_AUTHENTICATE {
            self.www_authenticate.as_deref()
        } else if name == http::header::CONTENT_LENGTH {
            self.content_length.as_deref()
        } else {
            None
        }
    }
}

impl AuthResponse for FakeResponse {
    fn final_url(&self) -> Option<&Url> {
        self.final_url.as_ref()
    }

    async fn buffer_body(self, limit: usize) -> (Self, Option<Bytes>) {
        let bytes = (self.body.len() <= limit).then(|| Bytes::from(self.body.clone()));
        (self, bytes)
    }
}

/// A fake API: accepts only the bearer token its `accept` closure approves, records
/// every request's Authorization header.
#[derive(Clone, Default)]
pub struct FakeServer {
    pub seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl FakeServer {
    pub fn seen(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().clone()
    }

    /// A send function: 200 when the bearer token satisfies `accept`, else 401.
    pub fn sender(
        &self,
        accept: impl Fn(&str) -> bool + Clone + Send + 'static,
    ) -> impl FnMut(FakeRequest) -> futures::future::Ready<Result<FakeResponse, std::convert::Infallible>>
    {
        let seen = self.seen.clone();
        move |req: FakeRequest| {
            let auth = req.header("authorization").map(str::to_owned);
            seen.lock().unwrap().push(auth.clone());
            let ok = auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(&accept);
            futures::future::ready(Ok(FakeResponse::status(if ok { 200 } else { 401 })))
        }
    }
}

/// An allocation-free check helper: a long-lived token.
pub const HOUR: Duration = Duration::from_secs(3600);

/// Saves `token` the only way a store allows: under its lock (lock → save → unlock).
pub async fn save_locked<S: tokenflight::store::TokenStore + ?Sized>(
    store: &S,
    token: &Token,
) -> Result<(), tokenflight::store::StoreError> {
    let guard = store.lock().await?;
    let saved = guard.save(token).await;
    guard.unlock().await;
    saved
}
