//! The server's memory: issued tokens, refresh-token families, counters, knobs. Every
//! handler works on it under one mutex, so what a test reads is always consistent.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{Failure, TestServerConfig};

/// What the server has seen, through [`TestServer::counters`](super::TestServer::counters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Calls of `POST /oauth/token`, whatever the grant and outcome.
    pub token_calls: u64,
    /// Token calls with `grant_type=refresh_token`.
    pub refresh_token_calls: u64,
    /// Token calls with `grant_type=client_credentials`.
    pub client_credentials_calls: u64,
    /// Token calls answered with an error (injected failures included; hangs not).
    pub token_errors: u64,
    /// Access tokens issued by the token endpoint.
    pub tokens_issued: u64,
    /// Spent refresh tokens presented again (each revoked a family).
    pub reuse_detections: u64,
    /// Requests to protected resources (`/api/...`).
    pub resource_calls: u64,
    /// DPoP mode: requests answered `use_dpop_nonce` (token endpoint and resources).
    pub dpop_nonce_demands: u64,
    /// DPoP mode: requests refused for a bad proof (any other reason than the nonce).
    pub dpop_refused: u64,
    /// Protected-resource requests refused for a missing or bad token (`401`s sent, or
    /// `{"code":401}` answers in business-code mode).
    pub rejections: u64,
    /// Protected-resource requests per access token they carried (valid or not).
    pub requests_per_token: BTreeMap<String, u64>,
    /// Requests outside the token endpoint that carried credentials: an
    /// `Authorization` header or a `token` query parameter.
    pub credentialed_requests: u64,
    /// Requests outside the token endpoint, whatever they carried.
    pub other_requests: u64,
    /// Redirects answered by `/redirect`.
    pub redirects: u64,
    /// Protected-resource requests held back (see
    /// [`TestServer::hold_next_resource_calls`](super::TestServer::hold_next_resource_calls)),
    /// counted when they arrive, before they are held.
    pub held_resource_calls: u64,
    /// Responses of `/stream` started (counted before their first chunk goes out).
    pub streams_opened: u64,
    /// Responses of `/stream` that ended because nobody released them in time (see
    /// [`TestServer::stream_url`](super::TestServer::stream_url)).
    pub streams_cut_off: u64,
    /// Token calls answered `503` because of the outage switch (see
    /// [`TestServer::set_token_outage`](super::TestServer::set_token_outage)).
    pub outage_answers: u64,
    /// Token calls answered `503` by the seeded random failures (see
    /// [`TestServer::set_token_failure_rate`](super::TestServer::set_token_failure_rate)).
    pub random_failures: u64,
    /// Access tokens issued per audience (the token request's `audience` parameter; RFC
    /// 8707's resource indicator in spirit). Tokens without one are not counted here.
    pub issued_per_audience: BTreeMap<String, u64>,
    /// Protected-resource requests that carried a token the server issued for another
    /// audience than the one of the resource (`/api/aud/<audience>/...`, or none): a
    /// token sent to the wrong API. Always rejected.
    pub cross_audience_requests: u64,
    /// Token calls with `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`
    /// (RFC 8693).
    pub token_exchange_calls: u64,
    /// Token calls with `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 §2.1).
    pub jwt_bearer_calls: u64,
    /// Token calls that carried a signed assertion (a `client_assertion` or a JWT bearer
    /// `assertion`), counted on arrival, before any injected failure.
    pub assertions_seen: u64,
    /// Assertions whose `jti` had been seen on an earlier call: refused (`invalid_client`
    /// or `invalid_grant`), whatever else they got right.
    pub assertion_replays: u64,
    /// Assertions refused for their signature, issuer, audience or expiry (replays not
    /// included).
    pub assertions_refused: u64,
    /// Workload tokens issued (see
    /// [`TestServer::issue_workload_token`](super::TestServer::issue_workload_token)).
    pub workload_tokens_issued: u64,
}

impl Counters {
    /// Token calls of either grant.
    pub fn grant_calls(&self) -> u64 {
        self.refresh_token_calls + self.client_credentials_calls
    }

    /// Token exchanges that issued a token for `audience`.
    pub fn issued_for(&self, audience: &str) -> u64 {
        self.issued_per_audience.get(audience).copied().unwrap_or(0)
    }

    /// How many protected-resource requests carried `token`.
    pub fn requests_with(&self, token: &str) -> u64 {
        self.requests_per_token.get(token).copied().unwrap_or(0)
    }
}

/// One protected-resource request as the server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedRequest {
    /// The method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query exactly as it arrived (no decoding, no normalising), if there was one.
    pub query: Option<String>,
    /// The `Referer` header, if any.
    pub referer: Option<String>,
    /// The access token it carried, if any (from the header, or from the query in
    /// query mode).
    pub token: Option<String>,
    /// Whether it had an `Authorization` header (whatever the mode).
    pub authorization: bool,
    /// Every header as it arrived: the name (lowercase) and the value (lossily as text),
    /// for credentials in headers the server does not read (`x-api-key`).
    pub headers: Vec<(String, String)>,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// Whether the token was accepted.
    pub accepted: bool,
}

struct AccessToken {
    issued_at: Instant,
    expires_at: Instant,
    family: Option<u64>,
    /// The audience it was issued for; valid only at that audience's resources.
    audience: Option<String>,
}

struct RefreshToken {
    family: u64,
    spent: bool,
}

/// An RFC 6749 §5.2 error the token endpoint answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OAuthError {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnsupportedGrantType,
    InvalidTarget,
}

impl OAuthError {
    pub(crate) fn code(self) -> &'static str {
        match self {
            OAuthError::InvalidRequest => "invalid_request",
            OAuthError::InvalidClient => "invalid_client",
            OAuthError::InvalidGrant => "invalid_grant",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
            OAuthError::InvalidTarget => "invalid_target",
        }
    }
}

/// A successful token answer (RFC 6749 §5.1).
#[derive(Clone, Debug)]
pub(crate) struct Issued {
    pub(crate) access_token: String,
    pub(crate) expires_in: u64,
    pub(crate) refresh_token: Option<String>,
}

/// The state shared by the handle and the handlers: every change wakes
/// [`TestServer::wait_for`](super::TestServer::wait_for).
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    pub(crate) fn new(state: State) -> Self {
        Shared {
            state: Mutex::new(state),
            changed: Notify::new(),
        }
    }

    /// Runs `f` on the state, then wakes everyone waiting for a change.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_waiters();
        result
    }

    pub(crate) fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Reads the state without waking anyone.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

pub(crate) struct State {
    pub(crate) config: TestServerConfig,
    pub(crate) counters: Counters,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) failures: VecDeque<Failure>,
    /// Resource calls still to be held back on arrival.
    pub(crate) hold_next: usize,
    /// Bumped by every release; a held call waits until it moves.
    pub(crate) releases: u64,
    /// Every token call answers `503` while this is on.
    pub(crate) outage: bool,
    /// Share of token calls answered `503` at random, and the seeded generator that
    /// draws them (the same seed gives the same sequence of outcomes, call by call).
    pub(crate) failure_rate: f64,
    pub(crate) rng: fastrand::Rng,
    access: HashMap<String, AccessToken>,
    refresh: HashMap<String, RefreshToken>,
    revoked_families: HashSet<u64>,
    next_id: u64,
    /// Workload tokens (the subject tokens of an exchange, a projected token file's
    /// contents) and when each expires; valid as bearer tokens without an audience too.
    workload: HashMap<String, Instant>,
    /// Public keys of the client's assertions.
    pub(crate) client_keys: Vec<super::assertions::ClientKey>,
    /// Every assertion `jti` seen, for replay detection.
    seen_jtis: HashSet<String>,
    /// DPoP mode's proofs, nonce and bindings.
    pub(crate) dpop: Option<super::dpop_mode::DpopMode>,
}

// Never prints tokens or the client secret.
impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("access_tokens", &self.access.len())
            .field("refresh_tokens", &self.refresh.len())
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl State {
    pub(crate) fn new(config: TestServerConfig) -> Self {
        let dpop = config
            .dpop
            .then(|| super::dpop_mode::DpopMode::new(config.dpop_rotate_every));
        State {
            config,
            counters: Counters::default(),
            requests: Vec::new(),
            failures: VecDeque::new(),
            hold_next: 0,
            releases: 0,
            outage: false,
            failure_rate: 0.0,
            rng: fastrand::Rng::with_seed(0),
            access: HashMap::new(),
            refresh: HashMap::new(),
            revoked_families: HashSet::new(),
            next_id: 0,
            workload: HashMap::new(),
            client_keys: Vec::new(),
            seen_jtis: HashSet::new(),
            dpop,
        }
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}.{:016x}", self.next_id, fastrand::u64(..))
    }

    pub(crate) fn issue_access_token(
        &mut self,
        family: Option<u64>,
        audience: Option<&str>,
    ) -> (String, u64) {
        let token = self.fresh("at");
        let lifetime = self.config.token_lifetime;
        let issued_at = Instant::now();
        let expires_at = issued_at
            .checked_add(lifetime)
            .unwrap_or_else(|| issued_at + Duration::from_secs(86_400 * 365));
        self.access.insert(
            token.clone(),
            AccessToken {
                issued_at,
                expires_at,
                family,
                audience: audience.map(str::to_owned),
            },
        );
        if let Some(audience) = audience {
            *self
                .counters
                .issued_per_audience
                .entry(audience.to_owned())
                .or_default() += 1;
        }
        (token, lifetime.as_secs())
    }

    fn issue_refresh_token(&mut self, family: u64) -> String {
        let token = self.fresh("rt");
        self.refresh.insert(
            token.clone(),
            RefreshToken {
                family,
                spent: false,
            },
        );
        token
    }

    pub(crate) fn issue_refresh_token_new_family(&mut self) -> String {
        self.next_id += 1;
        let family = self.next_id;
        self.issue_refresh_token(family)
    }

    pub(crate) fn expire_all_tokens(&mut self) {
        let now = Instant::now();
        for token in self.access.values_mut() {
            token.expires_at = now;
        }
    }

    /// Whether `token` is a valid, unexpired access token of a family not revoked, for
    /// `audience` (`None`: a token issued without one).
    pub(crate) fn access_valid(&self, token: &str, audience: Option<&str>) -> bool {
        if audience.is_none() && self.workload_valid(token) {
            return true;
        }
        self.access.get(token).is_some_and(|t| {
            Instant::now() < t.expires_at
                && t.audience.as_deref() == audience
                && t.family.is_none_or(|f| !self.revoked_families.contains(&f))
        })
    }

    /// Whether `token` is an unexpired workload token issued here.
    pub(crate) fn workload_valid(&self, token: &str) -> bool {
        self.workload
            .get(token)
            .is_some_and(|expires| Instant::now() < *expires)
    }

    /// A workload token: a JWT (not signed by anything a client checks) with `iss`,
    /// `sub`, `aud`, `iat` and `exp` = `iat` + `lifetime` in whole seconds, valid here
    /// until that `exp`.
    pub(crate) fn issue_workload_token(&mut self, lifetime: Duration) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let iat = now.as_secs();
        let exp = iat + lifetime.as_secs().max(1);
        self.next_id += 1;
        let claims = serde_json::json!({
            "iss": "https://testkit.invalid/workload",
            "sub": "system:serviceaccount:default:testkit",
            "aud": "testkit-sts",
            "iat": iat,
            "exp": exp,
            "jti": format!("wl{}.{:016x}", self.next_id, fastrand::u64(..)),
        });
        let token = format!(
            "{}.{}.{}",
            b64.encode(r#"{"alg":"RS256","typ":"JWT","kid":"testkit"}"#),
            b64.encode(claims.to_string()),
            b64.encode(fastrand::u64(..).to_be_bytes())
        );
        // Valid here exactly until its `exp`, as a verifier of the JWT would see it.
        let left = Duration::from_secs(exp).saturating_sub(now);
        self.workload.insert(token.clone(), Instant::now() + left);
        self.counters.workload_tokens_issued += 1;
        token
    }

    /// Records an assertion's `jti` on arrival; true if it had been seen before.
    pub(crate) fn note_assertion(&mut self, jti: Option<&str>) -> bool {
        self.counters.assertions_seen += 1;
        let replayed = jti.is_some_and(|jti| !self.seen_jtis.insert(jti.to_owned()));
        if replayed {
            self.counters.assertion_replays += 1;
        }
        replayed
    }

    /// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693 §2.1): a
    /// valid workload token as the subject, a token for `audience` in return.
    pub(crate) fn exchange_grant(
        &mut self,
        subject: &str,
        audience: Option<&str>,
    ) -> Result<Issued, OAuthError> {
        if !self.workload_valid(subject) {
            return Err(OAuthError::InvalidGrant);
        }
        let (access_token, expires_in) = self.issue_access_token(None, audience);
        self.counters.tokens_issued += 1;
        Ok(Issued {
            access_token,
            expires_in,
            refresh_token: None,
        })
    }

    /// Whether `token` is one this server issued for another audience than `audience`.
    pub(crate) fn issued_for_other_audience(&self, token: &str, audience: Option<&str>) -> bool {
        self.access
            .get(token)
            .is_some_and(|t| t.audience.as_deref() != audience)
    }

    /// The remaining life of the valid access token (unexpired, family not revoked)
    /// that expires last among those issued before `issued_before`; `None` if there is
    /// none.
    pub(crate) fn longest_valid_life(
        &self,
        issued_before: Instant,
        audience: Option<&str>,
    ) -> Option<Duration> {
        let now = Instant::now();
        self.access
            .values()
            .filter(|t| t.issued_at < issued_before && now < t.expires_at)
            .filter(|t| t.audience.as_deref() == audience)
            .filter(|t| t.family.is_none_or(|f| !self.revoked_families.contains(&f)))
            .map(|t| t.expires_at.saturating_duration_since(now))
            .max()
    }

    /// What a token call answers instead of its normal answer, if anything: a queued
    /// failure first, then the outage switch, then the seeded random failures. Counts
    /// the two latter.
    pub(crate) fn next_failure(&mut self) -> Option<Failure> {
        if let Some(failure) = self.failures.pop_front() {
            return Some(failure);
        }
        if self.outage {
            self.counters.outage_answers += 1;
            return Some(Failure::Unavailable);
        }
        // Drawn only while a rate is set, so the sequence depends on the seed and the
        // number of calls made under the rate, nothing else.
        if self.failure_rate > 0.0 && self.rng.f64() < self.failure_rate {
            self.counters.random_failures += 1;
            return Some(Failure::Unavailable);
        }
        None
    }

    /// `grant_type=refresh_token` (RFC 6749 §6) with rotation and reuse detection.
    pub(crate) fn refresh_grant(
        &mut self,
        presented: &str,
        audience: Option<&str>,
    ) -> Result<Issued, OAuthError> {
        let Some(entry) = self.refresh.get_mut(presented) else {
            return Err(OAuthError::InvalidGrant);
        };
        let family = entry.family;
        if self.revoked_families.contains(&family) {
            return Err(OAuthError::InvalidGrant);
        }
        if entry.spent {
            // A spent token presented again means it leaked (or a client raced itself):
            // revoke the whole family, as real servers do.
            self.counters.reuse_detections += 1;
            self.revoked_families.insert(family);
            return Err(OAuthError::InvalidGrant);
        }
        entry.spent = true;
        let refresh_token = self.issue_refresh_token(family);
        let (access_token, expires_in) = self.issue_access_token(Some(family), audience);
        self.counters.tokens_issued += 1;
        Ok(Issued {
            access_token,
            expires_in,
            refresh_token: Some(refresh_token),
        })
    }

    /// `grant_type=client_credentials` (RFC 6749 §4.4): no refresh token (§4.4.3).
    pub(crate) fn client_credentials_grant(&mut self, audience: Option<&str>) -> Issued {
        let (access_token, expires_in) = self.issue_access_token(None, audience);
        self.counters.tokens_issued += 1;
        Issued {
            access_token,
            expires_in,
            refresh_token: None,
        }
    }
}
