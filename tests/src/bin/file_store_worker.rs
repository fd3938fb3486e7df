//! A worker process for `tests/tests/all/file_store_processes.rs`: one `SingleFlight` with a
//! `FileStore` and a `RefreshTokenGrant` against the testkit, driven line by line over
//! stdin so the test can synchronise several processes deterministically.
//!
//! Configuration comes from the environment (secrets are not put on command lines):
//! `FSW_STORE` (token file), `FSW_TOKEN_URL`, `FSW_CLIENT_ID`, `FSW_CLIENT_SECRET`.
//! With `FSW_DPOP_KEY` (a PEM file: every process of the fleet loads the same key) and
//! `FSW_DPOP_ORIGIN` (a resource server's origin), tokens are DPoP-bound (RFC 9449): the
//! grant sends proofs, and `get` goes through an `AuthPolicy` with that key.
//!
//! Commands (one per line) and answers (one line each):
//! - `token` → `token <generation> <access hash> <refresh hash>` or `error <message>`;
//!   hashes (FNV-1a, hex) let the test compare tokens without printing secrets.
//! - `advance <secs>` → `advanced`: moves this process's clock forward, so tokens
//!   expire without waiting.
//! - `stats` → `stats <source calls> <adopted>`.
//! - `seen` → `seen <generation> <access hash>` of the newest token the process's
//!   subscription (made at start) delivered so far, `seen none`, or `error ..` if it
//!   ever delivered an older generation after a newer one.
//! - `hold` → `locked` once the store's refresh lock is held; it stays held until the
//!   process ends (the test kills it).
//! - `lock <timeout ms>` → `locked` (released again at once), `timeout` or `error ..`.
//! - `jkt` (DPoP) → `jkt <thumbprint>` of the key this process signs with.
//! - `get <path>` (DPoP) → `status <code>` of `GET <origin>/api/<path>` through the
//!   policy, or `error <message>`.
//!
//! It prints `ready` when set up, and exits at the end of stdin.

use std::io::{BufRead as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokenflight::adapter::{
    AuthRequest, AuthResponse, InvalidHeader, RequestOptions, ResponseView,
};
use tokenflight::dpop::{Dpop, DpopKey};
use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{
    AuthPolicy, SingleFlight, adapter::Clock, store::FileStore, store::StoreError,
    store::TokenStore,
};
use tokenflight_tests::transport::{ReqwestTransport as BareTransport, TokioSpawner, TokioTimer};

/// The wall clock plus an offset the test moves forward.
#[derive(Debug, Default)]
struct OffsetClock {
    offset_secs: AtomicU64,
}

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_secs(self.offset_secs.load(Ordering::SeqCst))
    }
}

fn fnv1a(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn main() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(run())
}

async fn run() -> Result<(), String> {
    let store_path = env("FSW_STORE")?;
    let clock = Arc::new(OffsetClock::default());
    let grant = RefreshTokenGrant::new(
        Arc::new(BareTransport::default()),
        &env("FSW_TOKEN_URL")?,
        &env("FSW_CLIENT_ID")?,
    )
    .map_err(|e| e.to_string())?
    .client_secret(env("FSW_CLIENT_SECRET")?);
    let dpop = match std::env::var("FSW_DPOP_KEY") {
        Ok(path) => Some((
            Dpop::new(DpopKey::from_pem_file(&path).map_err(|e| e.to_string())?),
            env("FSW_DPOP_ORIGIN")?,
        )),
        Err(_) => None,
    };
    let (flight, policy) = match &dpop {
        None => {
            let flight = SingleFlight::builder()
                .source(grant)
                .store(FileStore::new(&store_path))
                .clock(clock.clone())
                .timer(Arc::new(TokioTimer))
                .spawner(TokioSpawner::current())
                .refresh_timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| e.to_string())?;
            (flight, None)
        }
        Some((dpop, origin)) => {
            let policy = AuthPolicy::builder()
                .source(grant.dpop(dpop.clone()))
                .store(FileStore::new(&store_path))
                .clock(clock.clone())
                .timer(Arc::new(TokioTimer))
                .spawner(TokioSpawner::current())
                .refresh_timeout(Duration::from_secs(30))
                .allowed_origin(origin)
                .dpop(dpop.clone())
                .build()
                .map_err(|e| e.to_string())?;
            let flight = policy.flight().ok_or("an unkeyed policy")?.clone();
            (flight, Some(policy))
        }
    };
    let http = reqwest::Client::new();
    let mut changes = flight.subscribe();
    let mut last_seen: Option<(u64, String)> = None;
    let mut out_of_order = false;
    // Held for the rest of the process once `hold` is received.
    let mut held = None;

    reply("ready");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("token"), None) => match flight.token().await {
                Ok(token) => reply(&format!(
                    "token {} {} {}",
                    token.generation(),
                    fnv1a(token.access().expose()),
                    fnv1a(token.refresh().map_or("", |r| r.expose())),
                )),
                Err(error) => reply(&format!("error {error}")),
            },
            (Some("advance"), Some(secs)) => {
                let secs: u64 = secs.parse().map_err(|_| "advance needs seconds")?;
                clock.offset_secs.fetch_add(secs, Ordering::SeqCst);
                reply("advanced");
            }
            (Some("stats"), None) => {
                let stats = flight.stats();
                reply(&format!("stats {} {}", stats.source_calls, stats.adopted));
            }
            (Some("seen"), None) => {
                while let Some(change) = changes.try_next() {
                    if let Some(token) = change.token() {
                        out_of_order |= last_seen
                            .as_ref()
                            .is_some_and(|(g, _)| *g >= token.generation());
                        last_seen = Some((token.generation(), fnv1a(token.access().expose())));
                    }
                }
                match &last_seen {
                    _ if out_of_order => reply("error out of order"),
                    Some((generation, hash)) => reply(&format!("seen {generation} {hash}")),
                    None => reply("seen none"),
                }
            }
            (Some("hold"), None) => match FileStore::new(&store_path).lock().await {
                Ok(lock) => {
                    held = Some(lock);
                    reply("locked");
                }
                Err(error) => reply(&format!("error {error}")),
            },
            (Some("lock"), Some(ms)) => {
                let ms: u64 = ms.parse().map_err(|_| "lock needs milliseconds")?;
                let store = FileStore::new(&store_path).lock_timeout(Duration::from_millis(ms));
                match store.lock().await {
                    Ok(lock) => {
                        drop(lock);
                        reply("locked");
                    }
                    Err(StoreError::LockTimeout) => reply("timeout"),
                    Err(error) => reply(&format!("error {error}")),
                }
            }
            (Some("jkt"), None) => match &dpop {
                Some((dpop, _)) => reply(&format!("jkt {}", dpop.key().thumbprint())),
                None => reply("error no DPoP key"),
            },
            (Some("get"), Some(path)) => match (&policy, &dpop) {
                (Some(policy), Some((_, origin))) => {
                    match get(policy, &http, &format!("{origin}/api/{path}")).await {
                        Ok(status) => reply(&format!("status {status}")),
                        Err(error) => reply(&format!("error {error}")),
                    }
                }
                _ => reply("error no DPoP key"),
            },
            _ => reply(&format!("error unknown command {line:?}")),
        }
    }
    drop(held);
    Ok(())
}

/// A GET as the policy sees it: a URL and the headers it sets.
struct Get {
    url: url::Url,
    headers: Vec<(String, String)>,
}

impl AuthRequest for Get {
    fn method(&self) -> http::Method {
        http::Method::GET
    }
    fn url(&self) -> &url::Url {
        &self.url
    }
    fn url_mut(&mut self) -> &mut url::Url {
        &mut self.url
    }
    fn set_sensitive_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.to_owned()));
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        Some(Get {
            url: self.url.clone(),
            headers: self.headers.clone(),
        })
    }
}

/// A response's status and headers (the body is not needed).
struct Got(u16, http::HeaderMap);

impl ResponseView for Got {
    fn status(&self) -> u16 {
        self.0
    }
    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        self.1.get(name).and_then(|v| v.to_str().ok())
    }
}

impl AuthResponse for Got {}

async fn get(policy: &AuthPolicy, http: &reqwest::Client, url: &str) -> Result<u16, String> {
    let url = url::Url::parse(url).map_err(|e| e.to_string())?;
    let request = Get {
        url,
        headers: Vec::new(),
    };
    let response = policy
        .send(request, RequestOptions::default(), |request: Get| {
            let mut builder = http.get(request.url.as_str());
            for (name, value) in &request.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            async move {
                let response = builder.send().await?;
                Ok::<_, reqwest::Error>(Got(response.status().as_u16(), response.headers().clone()))
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.0)
}

fn reply(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the test is gone; nothing left to tell it.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
