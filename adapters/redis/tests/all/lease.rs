//! The lease: a refresh that stalls keeps the lock while its holder renews it, and a
//! holder whose lease lapsed (renewal off: the stall is injected by a store wrapper
//! that parks one call) neither spends a refresh token another replica may have spent
//! nor overwrites the newer token that replica saved.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::issuer::{Issuer, LIFETIME};
use common::{RedisServer, script_calls};
use futures::future::BoxFuture;
use tokenflight::{
    SingleFlight, Token, adapter::Clock, config::Backoff, from_fn, store::StoreError,
    store::StoreGuard, store::TokenStore, test_util::ManualClock,
};
use tokenflight_redis::RedisStore;
use tokio::sync::oneshot;

const HANG_GUARD: Duration = Duration::from_secs(30);

async fn guarded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

/// Where the injected stall happens.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Load,
    Save,
}

/// The holder's side of the stall: "I stalled" and "go on", taken by the first stall.
type SharedGate = Arc<Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>>;

/// A `RedisStore` whose first `load` or `save` under the lock (through a guard) parks
/// until the test lets it go: the holder "stalls" at that point while keeping (or,
/// without renewal, losing) the lock. (The store's own `load`, the coordinator's
/// unlocked read, never stalls.)
struct StallingStore {
    inner: RedisStore,
    phase: Phase,
    gate: SharedGate,
}

/// The test's side of the gate: learn that the holder stalled, then let it go.
struct Stall {
    stalled: oneshot::Receiver<()>,
    resume: oneshot::Sender<()>,
}

impl StallingStore {
    fn new(inner: RedisStore, phase: Phase) -> (StallingStore, Stall) {
        let (stalled_tx, stalled) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        let store = StallingStore {
            inner,
            phase,
            gate: Arc::new(Mutex::new(Some((stalled_tx, resume_rx)))),
        };
        (store, Stall { stalled, resume })
    }
}

impl TokenStore for StallingStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.inner.load()
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        Box::pin(async move {
            let guard: Box<dyn StoreGuard> = Box::new(StallingGuard {
                inner: self.inner.lock().await?,
                phase: self.phase,
                gate: Arc::clone(&self.gate),
            });
            Ok(guard)
        })
    }
}

struct StallingGuard {
    inner: Box<dyn StoreGuard>,
    phase: Phase,
    gate: SharedGate,
}

impl StallingGuard {
    async fn maybe_stall(&self, phase: Phase) {
        if phase != self.phase {
            return;
        }
        let gate = self.gate.lock().unwrap().take();
        if let Some((stalled, resume)) = gate {
            let _ = stalled.send(());
            let _ = resume.await;
        }
    }
}

impl StoreGuard for StallingGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        Box::pin(async move {
            self.maybe_stall(Phase::Load).await;
            self.inner.load().await
        })
    }

    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.maybe_stall(Phase::Save).await;
            self.inner.save(token).await
        })
    }

    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.inner.unlock()
    }
}

fn flight(
    store: impl TokenStore + 'static,
    source: impl tokenflight::TokenSource + 'static,
    clock: &Arc<ManualClock>,
) -> SingleFlight {
    SingleFlight::builder()
        .store(store)
        .source(source)
        .clock(clock.clone())
        .refresh_ahead(None)
        .backoff(Backoff::none())
        .build()
        .unwrap()
}

fn start_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
    ))
}

/// Seeds the store with a logged-in token and expires it.
async fn seed_expired(server: &RedisServer, prefix: &str, issuer: &Issuer, clock: &ManualClock) {
    let seed = RedisStore::builder(server.url())
        .key_prefix(prefix)
        .connect()
        .await
        .unwrap();
    tokenflight_tests::save_locked(&seed, &issuer.login(clock.now()).with_generation(1))
        .await
        .unwrap();
    clock.advance(LIFETIME);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_outlives_a_stalled_refresh_so_nobody_double_spends() {
    let server = RedisServer::start();
    let issuer = Issuer::new();
    let clock = start_clock();
    seed_expired(&server, "l1:", &issuer, &clock).await;
    let lease = Duration::from_millis(300);

    // a's token source stalls until the test lets it go; its lease is renewed meanwhile.
    let (entered_tx, entered) = oneshot::channel::<()>();
    let (go, go_rx) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some((entered_tx, go_rx))));
    let a_issuer = issuer.clone();
    let stalling_source = from_fn(move |cx: tokenflight::RefreshContext| {
        let gate = gate.lock().unwrap().take();
        let issuer = a_issuer.clone();
        async move {
            if let Some((entered, go)) = gate {
                let _ = entered.send(());
                let _ = go.await;
            }
            let presented = cx
                .previous
                .as_ref()
                .and_then(|t| t.refresh().map(|r| r.expose().to_owned()));
            issuer.refresh(presented.as_deref(), cx.now)
        }
    });
    let a_store = RedisStore::builder(server.url())
        .key_prefix("l1:")
        .lease(lease)
        .connect()
        .await
        .unwrap();
    let b_store = RedisStore::builder(server.url())
        .key_prefix("l1:")
        .connect()
        .await
        .unwrap();
    let a = flight(a_store, stalling_source, &clock);
    let b = flight(b_store, issuer.source(), &clock);

    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.token().await }
    });
    guarded("a reaches its token source", entered)
        .await
        .unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let holder: Option<String> = redis::cmd("GET")
        .arg("{l1:}lock")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(holder.is_some());

    let b_task = tokio::spawn({
        let b = b.clone();
        async move { b.token().await }
    });
    // The stall lasts until a has run six lease scripts (renewals; the first may be a
    // NOSCRIPT retry): well past one lease.
    let baseline = script_calls(&mut con).await;
    guarded("six renewals", async {
        while script_calls(&mut con).await < baseline + 6 {
            tokio::time::sleep(lease / 10).await;
        }
    })
    .await;
    let still: Option<String> = redis::cmd("GET")
        .arg("{l1:}lock")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(still, holder, "a kept the lock through the stall");
    assert_eq!(issuer.calls(), 0, "b did not refresh behind a's back");
    assert!(!b_task.is_finished());

    go.send(()).unwrap();
    let a_token = guarded("a", a_task).await.unwrap().unwrap();
    let b_token = guarded("b", b_task).await.unwrap().unwrap();
    assert_eq!(a_token.generation(), 2);
    assert_eq!(b_token, a_token, "b adopted a's token");
    assert_eq!(issuer.calls(), 1);
    assert_eq!(issuer.reuses(), 0);
    assert_eq!(b.stats().source_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_lapsed_does_not_spend_a_refresh_token_twice() {
    let server = RedisServer::start();
    let issuer = Issuer::new();
    let clock = start_clock();
    seed_expired(&server, "l2:", &issuer, &clock).await;

    // a takes the lock, then stalls before it reads the token, and its lease lapses.
    let a_store = RedisStore::builder(server.url())
        .key_prefix("l2:")
        .lease(Duration::from_millis(200))
        .renew_every(None)
        .connect()
        .await
        .unwrap();
    let (a_store, stall) = StallingStore::new(a_store, Phase::Load);
    let a = flight(a_store, issuer.source(), &clock);
    let b_store = RedisStore::builder(server.url())
        .key_prefix("l2:")
        .connect()
        .await
        .unwrap();
    let b = flight(b_store, issuer.source(), &clock);

    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.token().await }
    });
    guarded("a stalls holding the lock", stall.stalled)
        .await
        .unwrap();
    // b gets the lock once a's lease lapses, and refreshes with the live refresh token.
    let b_token = guarded("b refreshes", b.token()).await.unwrap();
    assert_eq!(b_token.generation(), 2);
    assert_eq!(issuer.calls(), 1);

    // a wakes up: its read is fenced (LeaseLost), so it never presents the spent
    // refresh token; the store error is retried inside the same flight (C16), whose
    // next attempt takes the lock again and adopts b's token.
    stall.resume.send(()).unwrap();
    let a_token = guarded("a", a_task).await.unwrap().unwrap();
    assert_eq!(a_token, b_token);
    assert_eq!(issuer.calls(), 1, "a did not call the token endpoint");
    assert_eq!(issuer.reuses(), 0);
    assert_eq!(a.stats().attempt_retries, 1, "the fenced read was retried");
    assert_eq!(a.stats().source_calls, 0);
    assert_eq!(a.stats().adopted, 1, "a adopted b's token");

    // Later calls keep b's token.
    let again = guarded("a again", a.token()).await.unwrap();
    assert_eq!(again, b_token);
    assert_eq!(issuer.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_lapsed_cannot_overwrite_the_newer_token() {
    let server = RedisServer::start();
    let clock = start_clock();
    // A source without refresh tokens (client credentials): two fetches spend nothing,
    // so this test is only about the save.
    let fetched = Arc::new(AtomicU64::new(0));
    let source = |name: &'static str| {
        let fetched = fetched.clone();
        from_fn(move |cx: tokenflight::RefreshContext| {
            let n = fetched.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(Token::new(format!("{name}-{n}")).expires_in(LIFETIME, cx.now)) }
        })
    };
    let a_store = RedisStore::builder(server.url())
        .key_prefix("l3:")
        .lease(Duration::from_millis(200))
        .renew_every(None)
        .connect()
        .await
        .unwrap();
    let (a_store, stall) = StallingStore::new(a_store, Phase::Save);
    let a = flight(a_store, source("a"), &clock);
    let b_store = RedisStore::builder(server.url())
        .key_prefix("l3:")
        .connect()
        .await
        .unwrap();
    let b = flight(b_store, source("b"), &clock);
    let check = RedisStore::builder(server.url())
        .key_prefix("l3:")
        .connect()
        .await
        .unwrap();

    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.token().await }
    });
    guarded("a stalls before saving", stall.stalled)
        .await
        .unwrap();
    let b_token = guarded("b refreshes", b.token()).await.unwrap();
    assert!(b_token.access().expose().starts_with("b-"));

    stall.resume.send(()).unwrap();
    let a_token = guarded("a", a_task).await.unwrap().unwrap();
    assert_eq!(
        a_token, b_token,
        "a's save was refused and a adopted b's token"
    );
    assert_eq!(
        check.load().await.unwrap().as_ref(),
        Some(&*b_token),
        "the store kept b's token"
    );
    assert_eq!(fetched.load(Ordering::SeqCst), 2);
}

/// The flight's budget as a switch: every sleep of this timer ends when the test (or a
/// part of the flight it instruments) fires it, so the budget runs out at a chosen step
/// of the flight instead of after a duration.
#[derive(Clone)]
struct Budget(Arc<tokio::sync::watch::Sender<bool>>);

impl Budget {
    fn new() -> Budget {
        Budget(Arc::new(tokio::sync::watch::channel(false).0))
    }

    fn run_out(&self) {
        self.0.send_replace(true);
    }
}

impl tokenflight::adapter::Timer for Budget {
    fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
        let mut spent = self.0.subscribe();
        Box::pin(async move {
            let _ = spent.wait_for(|spent| *spent).await;
        })
    }
}

/// A `RedisStore` whose guards use up the flight's budget the moment a save succeeds:
/// the next step, the unlock, is then past the budget.
struct SpendOnSave {
    inner: RedisStore,
    budget: Budget,
}

struct SpendOnSaveGuard {
    inner: Box<dyn StoreGuard>,
    budget: Budget,
}

impl TokenStore for SpendOnSave {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.inner.load()
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        Box::pin(async move {
            let guard: Box<dyn StoreGuard> = Box::new(SpendOnSaveGuard {
                inner: self.inner.lock().await?,
                budget: self.budget.clone(),
            });
            Ok(guard)
        })
    }
}

impl StoreGuard for SpendOnSaveGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        self.inner.load()
    }

    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let saved = self.inner.save(token).await;
            self.budget.run_out();
            saved
        })
    }

    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.inner.unlock()
    }
}

/// A store whose lease outlives the test by far: a lock left behind shows up as a
/// `LockTimeout` of the next holder, not as a lock that lapsed meanwhile.
async fn long_lease_store(server: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::builder(server.url())
        .key_prefix(prefix)
        .lease(Duration::from_secs(600))
        .lock_wait(Duration::from_secs(15))
        .connect()
        .await
        .unwrap()
}

/// Another replica takes the lock: at once if the holder released it, only after the
/// whole lease (here: never within its lock wait) if it was left behind.
async fn next_holder_gets_the_lock(server: &RedisServer, prefix: &str, after: &str) {
    let other = long_lease_store(server, prefix).await;
    match guarded("the next holder's lock", other.lock()).await {
        Ok(guard) => guard.unlock().await,
        Err(error) => panic!("{after}, the refresh lock was left held: {error}"),
    }
}

// A current-thread runtime: a task the store spawns runs only when the test's thread
// yields, so a release that the cancelled unlock aborts never reaches Redis (and one
// that survives the cancellation always does), with no race to lose either way.
#[tokio::test(flavor = "current_thread")]
async fn c10_a_flight_out_of_budget_still_releases_the_redis_lock() {
    let server = RedisServer::start();

    // The budget runs out inside the source: the flight ends with a timeout and
    // unlocks past its budget.
    let budget = Budget::new();
    let spend = budget.clone();
    let flight = SingleFlight::builder()
        .store(long_lease_store(&server, "t-budget-source:").await)
        .source(from_fn(move |_cx| {
            spend.run_out();
            std::future::pending::<Result<Token, tokenflight::RefreshError>>()
        }))
        .timer(budget)
        .refresh_timeout(Duration::from_secs(3600))
        .refresh_ahead(None)
        .backoff(Backoff::none())
        .build()
        .unwrap();
    let error = guarded("flight", flight.token()).await.unwrap_err();
    assert!(error.to_string().contains("budget"), "{error}");
    next_holder_gets_the_lock(&server, "t-budget-source:", "after a flight out of budget").await;

    // The budget runs out right after a login's save: the unlock is cut off.
    let budget = Budget::new();
    let flight = SingleFlight::builder()
        .store(SpendOnSave {
            inner: long_lease_store(&server, "t-budget-login:").await,
            budget: budget.clone(),
        })
        .source(from_fn(|_cx| async {
            Err::<Token, _>(tokenflight::RefreshError::permanent("not called"))
        }))
        .timer(budget)
        .refresh_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let login = Token::new("login").expires_in(LIFETIME, SystemTime::now());
    let installed = guarded("install", flight.install(login)).await.unwrap();
    assert_eq!(installed.access().expose(), "login");
    next_holder_gets_the_lock(
        &server,
        "t-budget-login:",
        "after an install cut off in its unlock",
    )
    .await;
}

/// A TCP proxy in front of a `redis-server` that can hold back the server's replies
/// (requests still reach the server): a command then runs on the server while its
/// client is still waiting for the answer.
struct ReplyHoldingProxy {
    port: u16,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ReplyHoldingProxy {
    async fn start(upstream: u16) -> ReplyHoldingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(tokio::sync::watch::channel(false).0);
        let holding = Arc::clone(&hold);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut released = holding.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if released.wait_for(|held| !*held).await.is_err() {
                            return;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ReplyHoldingProxy { port, hold }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn hold_replies(&self, hold: bool) {
        self.hold.send_replace(hold);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_a_lock_request_given_up_before_its_reply_still_releases_the_lock() {
    use futures::StreamExt;
    let server = RedisServer::start();
    let prefix = "t-budget-acquire:";
    let proxy = ReplyHoldingProxy::start(server.port()).await;
    let store = RedisStore::builder(proxy.url())
        .key_prefix(prefix)
        .lease(Duration::from_secs(600))
        .connect()
        .await
        .unwrap();
    // One round first: the server then has the script cached, and the request below is
    // a single EVALSHA (a NOSCRIPT answer held back would stop it before the server
    // ran anything).
    guarded("a first lock", store.lock())
        .await
        .unwrap()
        .unlock()
        .await;
    // The signal that the lock was taken on the server: a keyspace event for its key
    // (subscribed after the first round, so its event is not among them).
    let client = redis::Client::open(server.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut events = client.get_async_pubsub().await.unwrap();
    events
        .subscribe(format!("__keyspace@0__:{{{prefix}}}lock"))
        .await
        .unwrap();
    let mut events = events.into_on_message();

    // The caller gives up (a flight's budget ran out) after its request took the lock
    // on the server and before the reply came back.
    proxy.hold_replies(true);
    tokio::select! {
        taken = store.lock() => panic!("lock() returned with its reply held: {:?}", taken.map(drop)),
        event = guarded("the lock's keyspace event", events.next()) => {
            assert_eq!(event.unwrap().get_payload::<String>().unwrap(), "set");
        }
    }
    proxy.hold_replies(false);
    next_holder_gets_the_lock(&server, prefix, "after a lock() given up before its reply").await;
}
