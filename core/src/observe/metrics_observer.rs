//! [`MetricsObserver`]: the coordinator's events as metrics (feature `metrics`).

use super::{
    AttemptFailed, AuthLost, FlightJoined, Observer, RefreshFinished, RefreshStarted,
    RequestResent, TokenInstalled, error_kind_str, reason_str,
};

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
/// | `tokenflight.request.resent` | counter | `kind` = stale\|fresh | rejected requests resent once |
/// | `tokenflight.rejection.stale` | counter | — | rejections of an already-replaced token (no refresh) |
/// | `tokenflight.auth.lost` | counter | — | entries into "re-authentication required" |
/// | `tokenflight.token.installed` | counter | — | logins installed |
///
/// An optional `coordinator` label (a name the application chooses, e.g. per API) is
/// added to every metric when set with [`MetricsObserver::named`].
#[derive(Clone, Debug, Default)]
pub struct MetricsObserver {
    name: Option<&'static str>,
}

impl MetricsObserver {
    /// Metrics without a `coordinator` label.
    pub fn new() -> Self {
        Self::default()
    }

    /// Metrics labelled `coordinator = name` (a static name: labels stay bounded).
    pub fn named(name: &'static str) -> Self {
        MetricsObserver { name: Some(name) }
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
            self.labels(&[("kind", error_kind_str(e.error))])
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
