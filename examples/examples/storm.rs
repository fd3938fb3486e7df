//! The storm demo: `cargo run --release --example storm`.
//!
//! Starts the testkit auth + API server on loopback and runs C clients × R requests
//! through an HTTP client with tokenflight, across several forced token expiries and
//! injected refresh failures; then the same run with a naive client (each 401 refreshes
//! on its own) for contrast: a timeline of both runs (per time bucket: requests, 401s on
//! the wire, token-endpoint calls, requests that waited for a token), one above the
//! other, and a summary table. `--json` carries the same, timeline series included.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokenflight_examples::report::{PhaseReport, table};
use tokenflight_examples::storm::{AdapterKind, Approach, StormConfig, run_phase};
use tokenflight_examples::timeline;

/// A token-refresh storm against a real (loopback) OAuth server and API, through
/// tokenflight and through a naive client.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// Requests per client, one after another.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    requests: u32,
    /// Access-token lifetime on the server, in seconds.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    ttl: u64,
    /// Share (0 to 1) of forced expiries whose next token-endpoint call fails with 500.
    #[arg(long, default_value_t = 0.4, value_parser = parse_rate)]
    fail_rate: f64,
    /// Times the server expires every token during a run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1_000))]
    expiries: u32,
    /// Server-side latency of each API call, in milliseconds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    api_latency_ms: u64,
    /// Server-side latency of the token endpoint, in milliseconds.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    token_latency_ms: u64,
    /// The HTTP client: reqwest (tokio) or surf (async-std).
    #[arg(long, value_enum, default_value_t = Adapter::Reqwest)]
    adapter: Adapter,
    /// Skip the naive run.
    #[arg(long)]
    no_naive: bool,
    /// Print the summary as JSON (and no progress bar).
    #[arg(long)]
    json: bool,
    /// Exit with status 2 unless tokenflight's run kept its promises (for CI): no refresh
    /// token presented twice, no lost login, at most 1 % of requests not successful,
    /// and, when the naive client ran, fewer requests not successful than it (or none).
    #[arg(long)]
    check: bool,
    /// DPoP (RFC 9449): the embedded server enforces proofs, demands a nonce and
    /// rotates it during the run, and binds tokens to the client's key. Implies
    /// --no-naive (the naive client has no key).
    #[arg(long)]
    dpop: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Adapter {
    Reqwest,
    Surf,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0 and 1"))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = StormConfig {
        clients: args.clients as usize,
        requests: args.requests as usize,
        ttl: Duration::from_secs(args.ttl),
        fail_rate: args.fail_rate,
        expiries: args.expiries,
        api_latency: Duration::from_millis(args.api_latency_ms),
        token_latency: Duration::from_millis(args.token_latency_ms),
        adapter: match args.adapter {
            Adapter::Reqwest => AdapterKind::Reqwest,
            Adapter::Surf => AdapterKind::Surf,
        },
        progress: !args.json && std::io::stdout().is_terminal(),
        dpop: args.dpop,
    };
    if !args.json {
        println!(
            "storm: {} clients x {} requests via {}, token ttl {}s, {} forced expiries, \
             fail rate {}, API {}ms, token endpoint {}ms",
            args.clients,
            args.requests,
            config.adapter.name(),
            args.ttl,
            args.expiries,
            args.fail_rate,
            args.api_latency_ms,
            args.token_latency_ms
        );
    }
    let mut approaches = vec![Approach::Tokenflight];
    if !args.no_naive && !args.dpop {
        approaches.push(Approach::Naive);
    }
    let mut phases: Vec<PhaseReport> = Vec::new();
    for approach in approaches {
        match run_phase(&config, approach) {
            Ok(report) => phases.push(report),
            Err(error) => {
                eprintln!("storm: the {} run failed: {error}", approach.name());
                return ExitCode::FAILURE;
            }
        }
    }
    let width = timeline::bucket_width(&phases.iter().map(|p| p.wall).collect::<Vec<_>>());
    let series: Vec<_> = phases
        .iter()
        .map(|p| timeline::buckets(&p.samples, width))
        .collect();
    if args.json {
        let json = serde_json::json!({
            "config": {
                "clients": args.clients,
                "requests": args.requests,
                "ttl_s": args.ttl,
                "fail_rate": args.fail_rate,
                "expiries": args.expiries,
                "api_latency_ms": args.api_latency_ms,
                "token_latency_ms": args.token_latency_ms,
                "adapter": config.adapter.name(),
            },
            "timeline_bucket_s": width.as_secs_f64(),
            "phases": phases
                .iter()
                .zip(&series)
                .map(|(phase, buckets)| {
                    let mut json = phase.to_json();
                    if let Some(object) = json.as_object_mut() {
                        object.insert("timeline".into(), timeline::to_json(buckets));
                    }
                    json
                })
                .collect::<Vec<_>>(),
        });
        println!("{json:#}");
    } else {
        let names: Vec<&str> = phases.iter().map(|p| p.approach.as_str()).collect();
        println!();
        print!("{}", timeline::render(width, &names, &series));
        println!();
        print!("{}", table(&phases));
        println!(
            "\ntokenflight (default settings): one flight per expiry for all clients, \
             refreshing ahead of expiry; a failed token-endpoint attempt is retried inside \
             the flight, so the attempts can outnumber the flights. A refresh token is \
             never presented twice, and callers only see a refresh failure when no usable \
             token is left.\n\
             naive: every rejected request refreshes on its own; with rotating refresh \
             tokens the second one presents a spent token, the server revokes the login \
             and the user is logged out."
        );
    }
    if args.check {
        if let Err(broken) = check(&phases) {
            eprintln!("storm --check: {broken}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// Most requests tokenflight may leave without success, as a share of all.
const MAX_FAILED_SHARE: f64 = 0.01;

/// `--check`: tokenflight's promises, and that it beats the naive client.
fn check(phases: &[PhaseReport]) -> Result<(), String> {
    let naive = phases.iter().find(|p| p.approach == "naive");
    let mut checked = false;
    for phase in phases.iter().filter(|p| p.approach == "tokenflight") {
        checked = true;
        if phase.reuse_detections != 0 || phase.relogins != 0 || phase.successes == 0 {
            return Err(format!("tokenflight's run broke a promise: {phase:?}"));
        }
        if phase.failed_share() > MAX_FAILED_SHARE {
            return Err(format!(
                "tokenflight left {} of {} requests without success ({:.2} %, at most {} % \
                 allowed): {:?}",
                phase.not_ok(),
                phase.requests,
                phase.failed_share() * 100.0,
                MAX_FAILED_SHARE * 100.0,
                phase.errors
            ));
        }
        if let Some(naive) = naive {
            if phase.not_ok() > 0 && phase.not_ok() >= naive.not_ok() {
                return Err(format!(
                    "tokenflight left {} requests without success, the naive client {}",
                    phase.not_ok(),
                    naive.not_ok()
                ));
            }
        }
    }
    if checked {
        Ok(())
    } else {
        Err("no tokenflight run to check".into())
    }
}
