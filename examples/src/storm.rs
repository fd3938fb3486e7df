//! The storm demo's scenario. One phase = one testkit server (auth + API on loopback),
//! one client (tokenflight or naive) shared by C concurrent tasks, each making R
//! requests in a row. While they run, the server expires every token a few times at
//! evenly spaced points of progress (each time, every request in flight is rejected),
//! and some of those expiries come with a token-endpoint failure. Tokens also expire on
//! their own after `ttl`. Each client makes at most one request per API latency, like
//! a client with work to do between requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokenflight::{Token, adapter::FuturesTimer, adapter::Timer};
use tokenflight_tests::testkit::{Failure, TestServer, TestServerConfig};

use crate::api::{Api, Login, Outcome, ReqwestTokenflight, SurfTokenflight};
use crate::exec::Exec;
use crate::naive::NaiveClient;
use crate::report::{PhaseReport, quantile};
use crate::timeline::{Sample, Sampler};

/// Which HTTP client carries the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterKind {
    /// reqwest + reqwest-middleware on tokio.
    Reqwest,
    /// surf on async-std.
    Surf,
}

impl AdapterKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Reqwest => "reqwest",
            AdapterKind::Surf => "surf",
        }
    }
}

/// How the client deals with expired tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approach {
    /// tokenflight's middleware.
    Tokenflight,
    /// Each 401 refreshes on its own ([`NaiveClient`]).
    Naive,
}

impl Approach {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Approach::Tokenflight => "tokenflight",
            Approach::Naive => "naive",
        }
    }
}

/// The demo's settings (the command-line flags).
#[derive(Clone, Debug)]
pub struct StormConfig {
    /// Concurrent clients (tasks).
    pub clients: usize,
    /// Requests per client, one after another.
    pub requests: usize,
    /// Access-token lifetime on the server.
    pub ttl: Duration,
    /// Share of forced expiries whose next token-endpoint call fails (500).
    pub fail_rate: f64,
    /// Forced expiries over the run.
    pub expiries: u32,
    /// Latency of each API call on the server.
    pub api_latency: Duration,
    /// Latency of the token endpoint.
    pub token_latency: Duration,
    /// The HTTP client.
    pub adapter: AdapterKind,
    /// Show a progress bar.
    pub progress: bool,
    /// DPoP (RFC 9449): the server demands proofs and nonces (rotated during the run)
    /// and binds tokens to the client's key.
    pub dpop: bool,
}

/// In DPoP mode the server's nonce rotates after this many accepted API calls.
const DPOP_ROTATE_EVERY: u64 = 2_000;

/// Expires tokens (and injects failures) at evenly spaced points of progress.
struct Schedule {
    step: u64,
    expiries: u32,
    fail_rate: f64,
    done: AtomicU64,
    forced: AtomicU32,
    injected: AtomicU32,
}

impl Schedule {
    fn new(config: &StormConfig) -> Self {
        let total = (config.clients as u64).saturating_mul(config.requests as u64);
        Schedule {
            step: total / (u64::from(config.expiries) + 1),
            expiries: config.expiries,
            fail_rate: config.fail_rate,
            done: AtomicU64::new(0),
            forced: AtomicU32::new(0),
            injected: AtomicU32::new(0),
        }
    }

    /// Counts a finished request; at the k-th step expires all tokens, and injects a
    /// failure when the running share `k * fail_rate` passes a whole number.
    fn request_done(&self, server: &TestServer) {
        let done = self.done.fetch_add(1, Ordering::AcqRel) + 1;
        if self.step == 0 || done % self.step != 0 {
            return;
        }
        let k = done / self.step;
        if k > u64::from(self.expiries) {
            return;
        }
        let due = |k: u64| (k as f64 * self.fail_rate).floor();
        if due(k) > due(k - 1) {
            server.fail_next_token_calls(1, Failure::Status500);
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        server.expire_all_tokens();
        self.forced.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    successes: u64,
    unauthorized: u64,
    failures: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, outcome: &Outcome, latency: Duration) {
        self.latencies.push(latency);
        match outcome {
            Outcome::Status(200..=299) => self.successes += 1,
            Outcome::Status(401) => self.unauthorized += 1,
            Outcome::Status(status) => {
                self.failures += 1;
                *self.errors.entry(format!("HTTP {status}")).or_default() += 1;
            }
            Outcome::Error(error) => {
                self.failures += 1;
                *self.errors.entry(error_kind(error)).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.successes += other.successes;
        self.unauthorized += other.unauthorized;
        self.failures += other.failures;
        for (error, count) in other.errors {
            *self.errors.entry(error).or_default() += count;
        }
    }
}

/// The message without the numbers that differ from one request to the next (the
/// remaining backoff time), so equal causes are counted together.
fn error_kind(error: &str) -> String {
    match (error.find(" for "), error.find(" after")) {
        (Some(start), Some(end)) if start < end && error.contains("backing off") => {
            format!(
                "{}{}",
                error.get(..start).unwrap_or(error),
                error.get(end..).unwrap_or("")
            )
        }
        _ => error.to_owned(),
    }
}

fn progress_bar(total: u64, label: &str, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>22} [{bar:40.cyan/blue}] {pos:>7}/{len:7} {percent:>3}% {elapsed_precise}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_owned());
    bar
}

fn login(server: &TestServer, dpop: bool) -> Result<Login, String> {
    let (access_token, expires_in) = server.issue_access_token();
    Ok(Login {
        token_url: server.token_url(),
        client_id: server.client_id(),
        client_secret: server.client_secret(),
        origin: server.origin(),
        access_token,
        expires_in,
        refresh_token: server.issue_refresh_token(),
        dpop: match dpop {
            true => Some(tokenflight::dpop::Dpop::new(
                tokenflight::dpop::DpopKey::generate().map_err(|e| e.to_string())?,
            )),
            false => None,
        },
    })
}

fn client(
    approach: Approach,
    adapter: AdapterKind,
    login: &Login,
    server: &Arc<TestServer>,
) -> Result<Arc<dyn Api>, String> {
    let transport: Arc<dyn tokenflight::adapter::Transport> = match adapter {
        AdapterKind::Reqwest => Arc::new(tokenflight_reqwest::BareTransport::default()),
        AdapterKind::Surf => Arc::new(tokenflight_surf::BareTransport::default()),
    };
    let api: Arc<dyn Api> = match (approach, adapter) {
        (Approach::Tokenflight, AdapterKind::Reqwest) => {
            Arc::new(ReqwestTokenflight::new(login).map_err(|e| e.to_string())?)
        }
        (Approach::Tokenflight, AdapterKind::Surf) => {
            Arc::new(SurfTokenflight::new(login).map_err(|e| e.to_string())?)
        }
        (Approach::Naive, _) => {
            let grant = login.grant(transport.clone()).map_err(|e| e.to_string())?;
            let server = server.clone();
            let relogin = Box::new(move || {
                let (access, expires_in) = server.issue_access_token();
                Token::new(access)
                    .with_refresh(server.issue_refresh_token())
                    .expires_in(
                        Duration::from_secs(expires_in),
                        std::time::SystemTime::now(),
                    )
            });
            Arc::new(NaiveClient::new(transport, grant, login.token(), relogin))
        }
    };
    Ok(api)
}

/// Runs one phase on a fresh server and reports what happened.
pub fn run_phase(config: &StormConfig, approach: Approach) -> Result<PhaseReport, String> {
    let server = Arc::new(TestServer::start(TestServerConfig {
        token_lifetime: config.ttl,
        token_latency: config.token_latency,
        resource_latency: config.api_latency,
        dpop: config.dpop,
        dpop_rotate_every: if config.dpop { DPOP_ROTATE_EVERY } else { 0 },
        ..TestServerConfig::default()
    }));
    let login = login(&server, config.dpop)?;
    let exec = match config.adapter {
        AdapterKind::Reqwest => Exec::tokio().map_err(|e| format!("tokio runtime: {e}"))?,
        AdapterKind::Surf => Exec::AsyncStd,
    };
    // Built inside the runtime: the reqwest layer takes tokio's spawner from there.
    let api = exec.block_on(async { client(approach, config.adapter, &login, &server) })?;
    let schedule = Arc::new(Schedule::new(config));
    let total = (config.clients as u64).saturating_mul(config.requests as u64);
    let label = format!("{} ({})", approach.name(), config.adapter.name());
    let bar = progress_bar(total, &label, config.progress);
    let base = server.api_url("");

    let sampler = {
        let (api, server, schedule) = (api.clone(), server.clone(), schedule.clone());
        Sampler::start(move || {
            let counters = server.counters();
            Sample {
                requests: schedule.done.load(Ordering::Acquire),
                wire_401s: counters.rejections,
                token_calls: counters.token_calls,
                waited: api.counters().waited,
                ..Sample::default()
            }
        })
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..config.clients)
        .map(|c| {
            let (api, server, schedule) = (api.clone(), server.clone(), schedule.clone());
            let (bar, base, requests) = (bar.clone(), base.clone(), config.requests);
            let pace = config.api_latency;
            exec.spawn(async move {
                let mut tally = Tally {
                    latencies: Vec::with_capacity(requests),
                    ..Tally::default()
                };
                for r in 0..requests {
                    let sent = Instant::now();
                    let outcome = api.get(format!("{base}client-{c}/request-{r}")).await;
                    let latency = sent.elapsed();
                    tally.add(&outcome, latency);
                    schedule.request_done(&server);
                    bar.inc(1);
                    // A client asks at most once per `pace`: one that fails fast (say,
                    // while refreshes back off) does not burn through its requests.
                    if let Some(rest) = pace.checked_sub(latency).filter(|d| !d.is_zero()) {
                        FuturesTimer.sleep(rest).await;
                    }
                }
                tally
            })
        })
        .collect();
    let tallies = exec.block_on(futures::future::join_all(tasks));
    let wall = started.elapsed();
    let samples = sampler.finish();
    bar.finish_and_clear();

    let mut tally = Tally::default();
    tallies.into_iter().for_each(|t| tally.merge(t));
    let counters = server.counters();
    let own = api.counters();
    if config.dpop {
        eprintln!(
            "storm --dpop ({}): {} nonce demands answered by one resend each, {} proofs refused",
            approach.name(),
            counters.dpop_nonce_demands,
            counters.dpop_refused
        );
        if counters.dpop_refused > 0 {
            return Err(format!("{} DPoP proofs refused", counters.dpop_refused));
        }
    }
    Ok(PhaseReport {
        approach: approach.name().to_owned(),
        adapter: config.adapter.name().to_owned(),
        requests: total,
        successes: tally.successes,
        unauthorized_returned: tally.unauthorized,
        failures: tally.failures,
        errors: tally.errors,
        wire_401s: counters.rejections,
        token_calls: counters.token_calls,
        source_calls: own.source_calls,
        flights: own.flights,
        failed_flights: own.failed_flights,
        reuse_detections: counters.reuse_detections,
        coalesced: own.coalesced,
        retries: own.retries,
        stale_rejections: own.stale_rejections,
        relogins: own.relogins,
        waited: own.waited,
        samples,
        forced_expiries: schedule.forced.load(Ordering::Relaxed),
        injected_failures: schedule.injected.load(Ordering::Relaxed),
        p50: quantile(&mut tally.latencies, 0.50),
        p99: quantile(&mut tally.latencies, 0.99),
        wall,
    })
}
