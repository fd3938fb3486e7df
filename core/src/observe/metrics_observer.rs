//! [`MetricsObserver`]: the coordinator's events as metrics (feature `metrics`).

use metrics::{Key, Label, Level, Metadata};

use super::{
    AttemptFailed, AuthLost, FlightJoined, Observer, RefreshFinished, RefreshStarted,
    RequestAuthorized, RequestResent, TokenInstalled, error_kind_str, reason_str,
};

/// Where the per-request counters come from (what `metrics::counter!` would give).
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

const FAST_PATH: &str = "tokenflight.request.fast_path";
const WAITED: &str = "tokenflight.request.waited";

/// Records the coordinator's events through the [`metrics`] facade; install any
/// `metrics` exporter (Prometheus, StatsD, …) in the application.
///
/// Stable names and labels (every label value is from a small fixed set; no label
/// carries a token, a secret, a generation or an error message):
///
/// | name | type | labels | what |
/// |---|---|---|---|
/// | `tokenflight.refresh.started` | counter | `reason` = initial\|expired\|rejected\|refresh_ahead\|forced\|reload | flights started |
/// | `tokenflight.refresh.outcome` | counter | `outcome` = success\|adopted\|transient\|permanent\|timeout\|store\|panicked\|superseded | flights ended |
/// | `tokenflight.refresh.duration` | histogram (seconds) | `outcome` | flight duration, monotonic clock |
/// | `tokenflight.refresh.attempts` | histogram | `outcome` | source calls per flight (0 = adopted) |
/// | `tokenflight.attempt.failed` | counter | `kind` = transient\|timeout\|store\|… | attempts retried inside a flight |
/// | `tokenflight.flight.waiters` | counter | `reason` | callers that joined a flight in progress instead of starting one |
/// | `tokenflight.request.fast_path` | counter | — | requests sent at once with the token in memory (fast-path hits) |
/// | `tokenflight.request.waited` | counter | — | requests that waited for a token (a refresh) before being sent |
/// | `tokenflight.request.resent` | counter | `kind` = stale\|fresh | rejected requests resent once |
/// | `tokenflight.rejection.stale` | counter | — | rejections of an already-replaced token (no refresh) |
/// | `tokenflight.auth.lost` | counter | — | entries into "re-authentication required" |
/// | `tokenflight.token.installed` | counter | — | logins installed |
///
/// An optional `coordinator` label (a name the application chooses, e.g. per API) is
/// added to every metric when set with [`MetricsObserver::named`].
///
/// The two per-request counters (`tokenflight.request.fast_path`, `.waited`) are
/// counted with keys built once, here: counting them allocates nothing in this observer
/// (what the installed recorder does is up to it).
#[derive(Clone, Debug)]
pub struct MetricsObserver {
    name: Option<&'static str>,
    fast_path: Key,
    waited: Key,
}

impl Default for MetricsObserver {
    fn default() -> Self {
        MetricsObserver {
            name: None,
            fast_path: Key::from_static_name(FAST_PATH),
            waited: Key::from_static_name(WAITED),
        }
    }
}

impl MetricsObserver {
    /// Metrics without a `coordinator` label.
    pub fn new() -> Self {
        Self::default()
    }

    /// Metrics labelled `coordinator = name` (a static name: labels stay bounded).
    pub fn named(name: &'static str) -> Self {
        let label = || vec![Label::from_static_parts("coordinator", name)];
        MetricsObserver {
            name: Some(name),
            fast_path: Key::from_parts(FAST_PATH, label()),
            waited: Key::from_parts(WAITED, label()),
        }
    }

    fn labels(&self, extra: &[(&'static str, &'static str)]) -> Vec<metrics::Label> {
        self.name
            .map(|name| metrics::Label::from_static_parts("coordinator", name))
            .into_iter()
            .chain(
                extra
                    .iter()
                    .map(|(k, v)| metrics::Label::from_static_parts(k, v)),
            )
            .collect()
    }
}

impl Observer for MetricsObserver {
    fn refresh_started(&self, e: &RefreshStarted) {
        metrics::counter!(
            "tokenflight.refresh.started",
            self.labels(&[("reason", reason_str(e.reason))])
        )
        .increment(1);
    }

    fn attempt_failed(&self, e: &AttemptFailed<'_>) {
        metrics::counter!(
            "tokenflight.attempt.failed",
            self.labels(&[("kind", error_kind_str(e.error.kind()))])
        )
        .increment(1);
    }

    fn refresh_finished(&self, e: &RefreshFinished) {
        let labels = self.labels(&[("outcome", e.outcome.as_str())]);
        metrics::counter!("tokenflight.refresh.outcome", labels.clone()).increment(1);
        metrics::histogram!("tokenflight.refresh.duration", labels.clone())
            .record(e.duration.as_secs_f64());
        metrics::histogram!("tokenflight.refresh.attempts", labels).record(f64::from(e.attempts));
    }

    fn flight_joined(&self, e: &FlightJoined) {
        metrics::counter!(
            "tokenflight.flight.waiters",
            self.labels(&[("reason", reason_str(Some(e.reason)))])
        )
        .increment(1);
    }

    fn request_authorized(&self, e: &RequestAuthorized) {
        let key = if e.waited {
            &self.waited
        } else {
            &self.fast_path
        };
        metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA)).increment(1);
    }

    fn request_resent(&self, e: &RequestResent) {
        metrics::counter!(
            "tokenflight.request.resent",
            self.labels(&[("kind", e.kind.as_str())])
        )
        .increment(1);
        if e.kind == super::ResendKind::Stale {
            metrics::counter!("tokenflight.rejection.stale", self.labels(&[])).increment(1);
        }
    }

    fn auth_lost(&self, _e: &AuthLost<'_>) {
        metrics::counter!("tokenflight.auth.lost", self.labels(&[])).increment(1);
    }

    fn token_installed(&self, _e: &TokenInstalled) {
        metrics::counter!("tokenflight.token.installed", self.labels(&[])).increment(1);
    }
}
