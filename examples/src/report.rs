//! The storm demo's summary: one column per approach, as a table or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

/// What one phase (one approach, one client library) did.
#[derive(Clone, Debug, Default)]
pub struct PhaseReport {
    /// "tokenflight" or "naive".
    pub approach: String,
    /// "reqwest" or "surf".
    pub adapter: String,
    /// Requests the application made.
    pub requests: u64,
    /// Requests that ended with a 2xx response.
    pub successes: u64,
    /// Requests that ended with a 401 handed to the application.
    pub unauthorized_returned: u64,
    /// Requests that ended with an error (no response) or another status.
    pub failures: u64,
    /// The failures by message.
    pub errors: BTreeMap<String, u64>,
    /// 401s the server sent (rejections on the wire, retries included).
    pub wire_401s: u64,
    /// Calls of the token endpoint, as the server counted them.
    pub token_calls: u64,
    /// Token-endpoint attempts as the client counted them (every attempt, retries inside
    /// a flight included).
    pub source_calls: u64,
    /// Refreshes as tokenflight coordinates them: flights, each shared by every caller
    /// that needed it and made of one or more attempts (tokenflight only).
    pub flights: Option<u64>,
    /// Flights that failed after their attempts (tokenflight only).
    pub failed_flights: Option<u64>,
    /// Spent refresh tokens presented again (each revoked a login).
    pub reuse_detections: u64,
    /// Callers that waited for a refresh someone else started (tokenflight only).
    pub coalesced: Option<u64>,
    /// Requests resent after a rejection.
    pub retries: u64,
    /// Rejections of an already replaced token (tokenflight only).
    pub stale_rejections: Option<u64>,
    /// Times the client lost its login and had to log in again.
    pub relogins: u64,
    /// Requests that waited for a token (see [`crate::timeline::Sample::waited`]).
    pub waited: u64,
    /// The counters over time, for the timeline.
    pub samples: Vec<crate::timeline::Sample>,
    /// Tokens expired by the server while the phase ran.
    pub forced_expiries: u32,
    /// Token-endpoint failures injected.
    pub injected_failures: u32,
    /// Median request latency (application's view: refresh waits and resends included).
    pub p50: Duration,
    /// 99th-percentile request latency.
    pub p99: Duration,
    /// Wall time of the phase.
    pub wall: Duration,
}

/// The `q`-quantile (0..=1) of `samples`, which it sorts; zero when empty.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let last = samples.len() - 1;
    let rank = ((last as f64) * q.clamp(0.0, 1.0)).round() as usize;
    samples.get(rank.min(last)).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

impl PhaseReport {
    /// Requests that did not end with a 2xx response: errors, other statuses and 401s
    /// handed to the application.
    pub fn not_ok(&self) -> u64 {
        self.requests.saturating_sub(self.successes)
    }

    /// [`not_ok`](Self::not_ok) as a share of the requests (0 to 1).
    pub fn failed_share(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.not_ok() as f64 / self.requests as f64
        }
    }

    /// Requests per second over the phase's wall time.
    pub fn throughput(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// The report as a JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "approach": self.approach,
            "adapter": self.adapter,
            "requests": self.requests,
            "successes": self.successes,
            "unauthorized_returned": self.unauthorized_returned,
            "failures": self.failures,
            "errors": self.errors,
            "wire_401s": self.wire_401s,
            "not_ok": self.not_ok(),
            "failed_share": self.failed_share(),
            "token_calls": self.token_calls,
            "source_calls": self.source_calls,
            "flights": self.flights,
            "failed_flights": self.failed_flights,
            "reuse_detections": self.reuse_detections,
            "coalesced_waiters": self.coalesced,
            "retries": self.retries,
            "stale_rejections": self.stale_rejections,
            "relogins": self.relogins,
            "waited": self.waited,
            "forced_expiries": self.forced_expiries,
            "injected_failures": self.injected_failures,
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
            "wall_s": ms(self.wall) / 1e3,
            "requests_per_s": self.throughput().round(),
        })
    }
}

/// The summary table, one column per phase.
pub fn table(phases: &[PhaseReport]) -> String {
    type Row = (&'static str, fn(&PhaseReport) -> String);
    let rows: [Row; 22] = [
        ("client", |p| p.adapter.clone()),
        ("requests", |p| p.requests.to_string()),
        ("successes", |p| p.successes.to_string()),
        ("401s returned to the app", |p| {
            p.unauthorized_returned.to_string()
        }),
        ("failed (errors, other)", |p| p.failures.to_string()),
        ("not successful, share", |p| {
            format!("{:.2} %", p.failed_share() * 100.0)
        }),
        ("401s seen on the wire", |p| p.wire_401s.to_string()),
        ("token-endpoint calls", |p| p.token_calls.to_string()),
        ("  attempts by the client", |p| p.source_calls.to_string()),
        ("  flights (refreshes)", |p| opt(p.flights)),
        ("  failed flights", |p| opt(p.failed_flights)),
        ("coalesced waiters", |p| opt(p.coalesced)),
        ("requests that waited", |p| p.waited.to_string()),
        ("retries (resent once)", |p| p.retries.to_string()),
        ("stale rejections", |p| opt(p.stale_rejections)),
        ("refresh-token reuse seen", |p| {
            p.reuse_detections.to_string()
        }),
        ("logged out, re-login", |p| p.relogins.to_string()),
        ("forced expiries / failures", |p| {
            format!("{} / {}", p.forced_expiries, p.injected_failures)
        }),
        ("p50 latency (ms)", |p| format!("{:.2}", ms(p.p50))),
        ("p99 latency (ms)", |p| format!("{:.2}", ms(p.p99))),
        ("wall time (s)", |p| format!("{:.2}", p.wall.as_secs_f64())),
        ("requests/s", |p| format!("{:.0}", p.throughput())),
    ];
    let mut out = String::new();
    let _ = write!(out, "{:<28}", "");
    for phase in phases {
        let _ = write!(out, "{:>14}", phase.approach);
    }
    out.push('\n');
    for (label, cell) in rows {
        let _ = write!(out, "{label:<28}");
        for phase in phases {
            let _ = write!(out, "{:>14}", cell(phase));
        }
        out.push('\n');
    }
    for phase in phases.iter().filter(|p| !p.errors.is_empty()) {
        let _ = writeln!(out, "\n{} failures by cause:", phase.approach);
        let mut errors: Vec<_> = phase.errors.iter().collect();
        errors.sort_by(|a, b| b.1.cmp(a.1));
        for (error, count) in errors.into_iter().take(5) {
            let _ = writeln!(out, "  {count:>7}  {error}");
        }
    }
    out
}
