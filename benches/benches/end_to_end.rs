//! (d) End to end: requests through reqwest + tokenflight's middleware against bare
//! reqwest carrying the same valid token, through hyper-util's client + the tower
//! `TokenLayer` against the bare hyper-util client, and through surf + tokenflight's surf
//! middleware against bare surf, on the testkit server (loopback, its own runtime
//! thread). One at a time (latency) and 32 in flight (throughput). The token stays valid
//! throughout, so this measures the middleware's cost on the normal path: the token
//! check, attaching the header, keeping a replayable copy of the request and classifying
//! the response.
//!
//! reqwest and hyper-util run on a tokio runtime with 2 workers; surf runs on async-std's
//! executor (`async_std::task::block_on`, the way surf is used), each client against its
//! own bare twin.
//!
//! Environment (all optional):
//! - `TOKENFLIGHT_BENCH_PIN=1`: pin the testkit server's thread to the last CPU and every
//!   client thread to the others, so the server's work does not preempt the client's
//!   (measurement check: what remains is the client's own cost).
//! - `TOKENFLIGHT_BENCH_INTERLEAVED=0`: skip the interleaved rounds (for profiling with
//!   `--profile-time`).
//! - `TOKENFLIGHT_BENCH_ROUNDS=N`: the number of interleaved rounds (default 201: a
//!   round's ratio scatters by about ±7 % on the 2-core VM, so the median of 31 rounds
//!   moved by ±2 % between runs; 201 rounds take about 2 minutes for all pairs).
//! - `TOKENFLIGHT_BENCH_PAIRS="tower surf"`: the interleaved rounds of these pairs only
//!   (`reqwest`, `tower`, `surf`, `reqwest_middleware_only`, `tower_clone_and_box_only`,
//!   `surf_pass_through_only`).
//! - `TOKENFLIGHT_BENCH_ONLY="<contender> <requests> [in flight]"`: send that many
//!   requests, one at a time (or in batches of `in flight`), through one contender (e.g.
//!   `reqwest_tokenflight`) and stop: for `perf stat` and `perf record`, whose counts per
//!   request then compare across contenders.

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use futures::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokenflight::{AuthPolicy, Token, from_fn};
use tokenflight_benches::extras::Extras;
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokenflight_reqwest::{TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};
use tokenflight_tower::TokenService;
use tower::ServiceExt;

type HyperClient = Client<HttpConnector, Empty<Bytes>>;

// Counts allocations (whole process, server included: the same for both sides of a
// pair), a figure load does not move, for the interleaved rounds.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Where a sender's futures run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Executor {
    /// The bench's tokio runtime (2 workers).
    Tokio,
    /// async-std's executor, on the calling thread.
    AsyncStd,
}

const IN_FLIGHT: usize = 32;

/// One way of sending an authenticated GET.
#[derive(Clone)]
enum Sender {
    Bare {
        client: reqwest::Client,
        header: Arc<str>,
    },
    Layered {
        client: ClientWithMiddleware,
    },
    BareHyper {
        client: HyperClient,
        header: http::HeaderValue,
    },
    Tower {
        service: TokenService<HyperClient>,
    },
    /// reqwest-middleware's client with no middleware: what the middleware stack itself
    /// costs (a control row, not a target).
    ReqwestMiddlewareOnly {
        client: ClientWithMiddleware,
        header: Arc<str>,
    },
    /// hyper-util's client under a tower layer that only does what any tower middleware
    /// that may send a request again does: clone the inner service per call and box
    /// its future (a control row, not a target: the cost of the tower pattern itself).
    CloneAndBox {
        service: CloneAndBox<HyperClient>,
        header: http::HeaderValue,
    },
    BareSurf {
        client: surf::Client,
        header: Arc<str>,
    },
    /// surf's client with one middleware that only passes the request on: what surf's
    /// middleware stack itself costs (a control row, not a target: surf clones the
    /// client's middleware list per request and boxes each middleware's future).
    SurfPassThrough {
        client: surf::Client,
        header: Arc<str>,
    },
    Surf {
        client: surf::Client,
    },
}

impl Sender {
    fn executor(&self) -> Executor {
        match self {
            Sender::BareSurf { .. } | Sender::Surf { .. } | Sender::SurfPassThrough { .. } => {
                Executor::AsyncStd
            }
            _ => Executor::Tokio,
        }
    }

    async fn get(&self, url: &str) {
        let response = match self {
            Sender::BareSurf { client, header } | Sender::SurfPassThrough { client, header } => {
                let request = client
                    .get(url)
                    .header(surf::http::headers::AUTHORIZATION, &**header);
                return check_surf(request.await).await;
            }
            Sender::Surf { client } => return check_surf(client.get(url).await).await,
            Sender::ReqwestMiddlewareOnly { client, header } => client
                .get(url)
                .header(reqwest::header::AUTHORIZATION, &**header)
                .send()
                .await
                .map_err(|e| match e {
                    tokenflight_reqwest::reqwest_middleware::Error::Reqwest(e) => e,
                    other => panic!("middleware error: {other}"),
                }),
            Sender::BareHyper { client, header } => {
                let request = http::Request::get(url)
                    .header(http::header::AUTHORIZATION, header.clone())
                    .body(Empty::new());
                let request = request.unwrap_or_else(|e| panic!("request: {e}"));
                let response = client.request(request).await;
                let response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
                return check_hyper(response).await;
            }
            Sender::CloneAndBox { service, header } => {
                let request = http::Request::get(url)
                    .header(http::header::AUTHORIZATION, header.clone())
                    .body(Empty::new());
                let request = request.unwrap_or_else(|e| panic!("request: {e}"));
                let response = service.clone().oneshot(request).await;
                let response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
                return check_hyper(response).await;
            }
            Sender::Tower { service } => {
                let request = http::Request::get(url).body(Empty::new());
                let request = request.unwrap_or_else(|e| panic!("request: {e}"));
                let response = service.clone().oneshot(request).await;
                let response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
                return check_hyper(response).await;
            }
            Sender::Bare { client, header } => {
                client
                    .get(url)
                    .header(reqwest::header::AUTHORIZATION, &**header)
                    .send()
                    .await
            }
            Sender::Layered { client } => client.get(url).send().await.map_err(|e| match e {
                tokenflight_reqwest::reqwest_middleware::Error::Reqwest(e) => e,
                other => panic!("middleware error: {other}"),
            }),
        };
        match response {
            Ok(response) => {
                assert_eq!(response.status(), 200, "the token should be accepted");
                if let Err(error) = response.bytes().await {
                    panic!("reading the body: {error}");
                }
            }
            Err(error) => panic!("request failed: {error}"),
        }
    }
}

/// The surf control's middleware: see [`Sender::SurfPassThrough`]. Its future is the
/// rest of the stack's, as it is (no async block around it).
#[derive(Debug)]
struct PassThrough;

impl surf::middleware::Middleware for PassThrough {
    fn handle<'life0, 'life1, 'async_trait>(
        &'life0 self,
        request: surf::Request,
        client: surf::Client,
        next: surf::middleware::Next<'life1>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = surf::Result<surf::Response>> + Send + 'async_trait>,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        next.run(request, client)
    }
}

/// The control layer's service: see [`Sender::CloneAndBox`].
#[derive(Clone)]
struct CloneAndBox<S> {
    inner: S,
}

impl<S, R> tower::Service<R> for CloneAndBox<S>
where
    S: tower::Service<R> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // tower's advice for services that move the inner one into their future.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        // Called now; the clone stays in the future, as a middleware that may resend
        // keeps it.
        let response = ready.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(ready);
            response
        })
    }
}

async fn check_surf(response: surf::Result<surf::Response>) {
    let mut response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
    assert_eq!(
        u16::from(response.status()),
        200,
        "the token should be accepted"
    );
    if let Err(error) = response.body_bytes().await {
        panic!("reading the body: {error}");
    }
}

async fn check_hyper<B>(response: http::Response<B>)
where
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    assert_eq!(response.status(), 200, "the token should be accepted");
    if let Err(error) = response.into_body().collect().await {
        panic!("reading the body: {error}");
    }
}

/// Whether an environment variable is set to `1`.
fn env_flag(name: &str, default: bool) -> bool {
    std::env::var(name).map_or(default, |value| value == "1")
}

/// Pins the testkit server's thread (named `testkit-<port>`) to the last CPU and the
/// calling thread (and so every thread it starts afterwards) to the others.
fn pin_threads(port: u16) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("pinning needs 2 CPUs; not pinned");
        return;
    }
    let server_name = format!("testkit-{port}");
    let mut server_cpu = rustix::thread::CpuSet::new();
    server_cpu.set(cpus - 1);
    let mut client_cpus = rustix::thread::CpuSet::new();
    for cpu in 0..cpus - 1 {
        client_cpus.set(cpu);
    }
    let mut pinned = false;
    // The server thread names itself when it starts running: look again until then.
    for _ in 0..100 {
        pinned = pin_named(&server_name, &server_cpu);
        if pinned {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Err(error) = rustix::thread::sched_setaffinity(None, &client_cpus) {
        eprintln!("pinning the client: {error}");
    }
    eprintln!(
        "pinned: server thread {} to CPU {}, client to CPUs 0..{}",
        if pinned { "found" } else { "NOT found" },
        cpus - 1,
        cpus - 1
    );
}

/// Pins the threads of this process named `name` to `cpus`; whether there was one.
fn pin_named(name: &str, cpus: &rustix::thread::CpuSet) -> bool {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap_or_else(|e| panic!("tasks: {e}"));
    let mut pinned = false;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // `comm` is cut at 15 bytes.
        if !name.starts_with(comm.trim_end()) || comm.trim_end().is_empty() {
            continue;
        }
        let tid = task.file_name().to_string_lossy().parse::<i32>().ok();
        if let Some(pid) = tid.and_then(rustix::process::Pid::from_raw) {
            match rustix::thread::sched_setaffinity(Some(pid), cpus) {
                Ok(()) => pinned = true,
                Err(error) => eprintln!("pinning {name}: {error}"),
            }
        }
    }
    pinned
}

fn end_to_end(c: &mut Criterion) {
    let server = TestServer::start(TestServerConfig::default());
    if env_flag("TOKENFLIGHT_BENCH_PIN", false) {
        pin_threads(server.addr().port());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    };
    let (access, expires_in) = server.issue_access_token();
    let url = server.api_url("bench");

    // Each pair shares one client (its connection pool): the bare contender and the one
    // with tokenflight then send over the same connection to the same server task, and
    // differ in the middleware only. (With a client each, the two connections' placement
    // on the cores differed between them for the whole run: the control pair, with no
    // tokenflight at all, scored 0.96–1.02.)
    let reqwest_client = reqwest::Client::new();
    let bare = Sender::Bare {
        client: reqwest_client.clone(),
        header: Arc::from(format!("Bearer {access}")),
    };
    let layer = runtime.block_on(async {
        TokenMiddleware::builder()
            .source(from_fn(|_cx| async {
                Err(tokenflight::RefreshError::permanent(
                    "the benchmark's token never needs a refresh",
                ))
            }))
            .initial_token(
                Token::new(access.as_str())
                    .expires_in(Duration::from_secs(expires_in), SystemTime::now()),
            )
            .allowed_origin(&server.origin())
            .build()
    });
    let layer = match layer {
        Ok(layer) => layer,
        Err(error) => panic!("building the layer: {error}"),
    };
    let hyper_client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let bare_hyper = Sender::BareHyper {
        client: hyper_client.clone(),
        header: match http::HeaderValue::from_str(&format!("Bearer {access}")) {
            Ok(header) => header,
            Err(error) => panic!("header: {error}"),
        },
    };
    let clone_and_box = Sender::CloneAndBox {
        service: CloneAndBox {
            inner: hyper_client.clone(),
        },
        header: match http::HeaderValue::from_str(&format!("Bearer {access}")) {
            Ok(header) => header,
            Err(error) => panic!("header: {error}"),
        },
    };
    let tower_layer = tokenflight_tower::TokenLayer::from(AuthPolicy::clone(layer.policy()));
    let tower = Sender::Tower {
        service: tower::Layer::layer(&tower_layer, hyper_client),
    };
    let layered = Sender::Layered {
        client: ClientBuilder::new(reqwest_client.clone())
            .with(layer.clone())
            .build(),
    };
    let middleware_only = Sender::ReqwestMiddlewareOnly {
        client: ClientBuilder::new(reqwest_client).build(),
        header: Arc::from(format!("Bearer {access}")),
    };
    let surf_client = surf::Client::new();
    let bare_surf = Sender::BareSurf {
        client: surf_client.clone(),
        header: Arc::from(format!("Bearer {access}")),
    };
    let surf_pass_through = Sender::SurfPassThrough {
        client: surf_client.clone().with(PassThrough),
        header: Arc::from(format!("Bearer {access}")),
    };
    let surf_layer = tokenflight_surf::TokenMiddleware::from(AuthPolicy::clone(layer.policy()));
    let surf = Sender::Surf {
        client: surf_client.with(surf_layer),
    };

    let all = [
        ("bare_reqwest", &bare),
        ("reqwest_tokenflight", &layered),
        ("reqwest_middleware_only", &middleware_only),
        ("bare_hyper", &bare_hyper),
        ("tower_tokenflight", &tower),
        ("tower_clone_and_box_only", &clone_and_box),
        ("bare_surf", &bare_surf),
        ("surf_tokenflight", &surf),
        ("surf_pass_through_only", &surf_pass_through),
    ];
    if let Ok(only) = std::env::var("TOKENFLIGHT_BENCH_ONLY") {
        // For `perf stat` / `perf record` of one client: `<name> <requests>`, sent one
        // after the other, and nothing else.
        let mut words = only.split_whitespace();
        let name = words.next().unwrap_or_default();
        let requests: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
        let in_flight: usize = words
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1)
            .max(1);
        let Some((_, sender)) = all.iter().find(|(n, _)| *n == name) else {
            panic!("TOKENFLIGHT_BENCH_ONLY: no sender {name}");
        };
        let run = async {
            for _ in 0..requests / in_flight {
                join_all((0..in_flight).map(|_| sender.get(&url))).await;
            }
        };
        match sender.executor() {
            Executor::Tokio => runtime.block_on(run),
            Executor::AsyncStd => async_std::task::block_on(run),
        }
        return;
    }
    for (mode, in_flight) in [("sequential", 1), ("concurrent_32", IN_FLIGHT)] {
        let mut group = c.benchmark_group(format!("end_to_end/{mode}"));
        group
            .sample_size(30)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for (name, sender) in all {
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                match sender.executor() {
                    Executor::Tokio => b.to_async(&runtime).iter(|| async {
                        join_all((0..in_flight).map(|_| sender.get(&url))).await;
                    }),
                    Executor::AsyncStd => b.iter_custom(|iters| {
                        async_std::task::block_on(async {
                            let start = Instant::now();
                            for _ in 0..iters {
                                join_all((0..in_flight).map(|_| sender.get(&url))).await;
                            }
                            start.elapsed()
                        })
                    }),
                }
            });
        }
        group.finish();
    }
    // Criterion measures one contender after the other; on a shared machine the load can
    // change in between. These ratios alternate the two in short rounds instead.
    if env_flag("TOKENFLIGHT_BENCH_INTERLEAVED", true) {
        let rounds = std::env::var("TOKENFLIGHT_BENCH_ROUNDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(201);
        let mut extras = Extras::new();
        for (mode, in_flight, batches) in [("sequential", 1, 300), ("concurrent_32", IN_FLIGHT, 30)]
        {
            let pairs = [
                ("reqwest", &bare, &layered),
                ("tower", &bare_hyper, &tower),
                ("surf", &bare_surf, &surf),
                // Control: reqwest-middleware's own cost, no tokenflight.
                ("reqwest_middleware_only", &bare, &middleware_only),
                // Control: the tower pattern's own cost (clone the service, box the
                // future), no tokenflight.
                ("tower_clone_and_box_only", &bare_hyper, &clone_and_box),
                // Control: surf's middleware stack's own cost, no tokenflight.
                ("surf_pass_through_only", &bare_surf, &surf_pass_through),
            ];
            let wanted = std::env::var("TOKENFLIGHT_BENCH_PAIRS").ok();
            for (client, bare, layered) in pairs {
                if wanted
                    .as_deref()
                    .is_some_and(|w| !w.split_whitespace().any(|p| p == client))
                {
                    continue;
                }
                let rounds = Rounds {
                    rounds,
                    in_flight,
                    batches,
                };
                let spread = interleaved_ratio(&runtime, bare, layered, &url, rounds);
                extras.record(&format!("interleaved_{mode}_{client}"), spread.median);
                extras.record(&format!("interleaved_{mode}_{client}_q1"), spread.q1);
                extras.record(&format!("interleaved_{mode}_{client}_q3"), spread.q3);
                extras.record(&format!("cpu_{mode}_{client}_bare_us"), spread.cpu_bare_us);
                extras.record(
                    &format!("cpu_{mode}_{client}_tokenflight_us"),
                    spread.cpu_layered_us,
                );
                extras.record(
                    &format!("client_cpu_{mode}_{client}_bare_us"),
                    spread.client_cpu_bare_us,
                );
                extras.record(
                    &format!("client_cpu_{mode}_{client}_tokenflight_us"),
                    spread.client_cpu_layered_us,
                );
                extras.record(&format!("allocs_{mode}_{client}_bare"), spread.allocs_bare);
                extras.record(
                    &format!("allocs_{mode}_{client}_tokenflight"),
                    spread.allocs_layered,
                );
            }
        }
        extras.save("end_to_end");
    }

    let stats = layer.policy().stats();
    assert_eq!(stats.source_calls, 0, "the token source must not be called");
    assert_eq!(stats.rejections, 0, "no request may be rejected");
}

/// How the interleaved rounds are made.
#[derive(Clone, Copy)]
struct Rounds {
    rounds: usize,
    in_flight: usize,
    batches: usize,
}

/// What the interleaved rounds found.
struct Spread {
    /// Quartiles and median of the rounds' throughput ratios (bare time ÷ layered time).
    q1: f64,
    median: f64,
    q3: f64,
    /// Median CPU time per request of the whole process (client and server threads),
    /// in microseconds: bare, then layered. Load on other processes barely moves it.
    cpu_bare_us: f64,
    cpu_layered_us: f64,
    /// Median CPU time per request of the thread that polls the requests (where the
    /// middleware runs; the connections' tasks and the server run on other threads),
    /// in microseconds: bare, then layered. The middleware's own cost in situ, with the
    /// caches as a real round trip leaves them.
    client_cpu_bare_us: f64,
    client_cpu_layered_us: f64,
    /// Median allocations per request (whole process): bare, then layered.
    allocs_bare: f64,
    allocs_layered: f64,
}

/// The process's CPU time so far (all threads: the client's and the server's).
fn process_cpu() -> Duration {
    cpu_time(rustix::time::ClockId::ProcessCPUTime)
}

/// The calling thread's CPU time so far.
fn thread_cpu() -> Duration {
    cpu_time(rustix::time::ClockId::ThreadCPUTime)
}

fn cpu_time(clock: rustix::time::ClockId) -> Duration {
    let ts = rustix::time::clock_gettime(clock);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn median(values: &mut [f64], fraction: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len().saturating_sub(1)) as f64 * fraction).round() as usize;
    values.get(index).copied().unwrap_or(f64::NAN)
}

/// Throughput of `layered` relative to `bare` (above 1: faster): the median (and
/// quartiles) over the rounds of (time of `bare`) / (time of `layered`), each round
/// timing `batches` batches of `in_flight` requests on both, back to back, alternating
/// which goes first. A stretch where the shared machine stalls spoils one round, not the
/// figure. Also the CPU time per request of each (the process's, server included).
fn interleaved_ratio(
    runtime: &tokio::runtime::Runtime,
    bare: &Sender,
    layered: &Sender,
    url: &str,
    rounds: Rounds,
) -> Spread {
    let Rounds {
        rounds,
        in_flight,
        batches,
    } = rounds;
    let requests = (in_flight * batches) as f64;
    // (wall seconds, CPU microseconds per request, allocations per request, the polling
    // thread's CPU microseconds per request)
    let time = |sender: &Sender| {
        let run = async {
            let allocations = GLOBAL.stats().allocations;
            let client_cpu = thread_cpu();
            let cpu = process_cpu();
            let start = Instant::now();
            for _ in 0..batches {
                join_all((0..in_flight).map(|_| sender.get(url))).await;
            }
            let wall = start.elapsed().as_secs_f64();
            let cpu = process_cpu().saturating_sub(cpu).as_secs_f64() * 1e6 / requests;
            let client_cpu = thread_cpu().saturating_sub(client_cpu).as_secs_f64() * 1e6 / requests;
            let allocations = GLOBAL.stats().allocations.saturating_sub(allocations);
            (wall, cpu, allocations as f64 / requests, client_cpu)
        };
        match sender.executor() {
            Executor::Tokio => runtime.block_on(run),
            Executor::AsyncStd => async_std::task::block_on(run),
        }
    };
    let mut ratios = Vec::with_capacity(rounds);
    let mut cpu_bare = Vec::with_capacity(rounds);
    let mut cpu_layered = Vec::with_capacity(rounds);
    let mut allocs_bare = Vec::with_capacity(rounds);
    let mut allocs_layered = Vec::with_capacity(rounds);
    let mut client_cpu_bare = Vec::with_capacity(rounds);
    let mut client_cpu_layered = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (b, l) = if round % 2 == 0 {
            let b = time(bare);
            (b, time(layered))
        } else {
            let l = time(layered);
            (time(bare), l)
        };
        ratios.push(b.0 / l.0);
        cpu_bare.push(b.1);
        cpu_layered.push(l.1);
        allocs_bare.push(b.2);
        allocs_layered.push(l.2);
        client_cpu_bare.push(b.3);
        client_cpu_layered.push(l.3);
    }
    Spread {
        q1: median(&mut ratios, 0.25),
        median: median(&mut ratios, 0.5),
        q3: median(&mut ratios, 0.75),
        cpu_bare_us: median(&mut cpu_bare, 0.5),
        cpu_layered_us: median(&mut cpu_layered, 0.5),
        client_cpu_bare_us: median(&mut client_cpu_bare, 0.5),
        client_cpu_layered_us: median(&mut client_cpu_layered, 0.5),
        allocs_bare: median(&mut allocs_bare, 0.5),
        allocs_layered: median(&mut allocs_layered, 0.5),
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    end_to_end(&mut criterion);
    criterion.final_summary();
}
