//! The retry driver: attach token → send → classify → on rejection wait for the refresh
//! that supersedes the token this request used → resend exactly once (C3, C4). Adapters
//! call [`Authenticator::send`] with their request type and a closure that sends it.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::error::Error;
use crate::flight::SingleFlight;
use crate::observe::{RequestAuthorized, RequestResent};
use crate::policy::{AllowedOrigins, Classifier, HeaderCache, Placement};
use crate::request::{AuthRequest, AuthResponse, InvalidHeader, RequestOptions};
use crate::stats::Stats;
use crate::token::Token;

/// Why an authenticated send failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError<E> {
    /// No token could be had (the refresh failed, backoff, or re-authentication needed).
    #[error(transparent)]
    Token(#[from] Error),
    /// The access token cannot be put in a header (the source returned bad characters).
    #[error(transparent)]
    InvalidHeader(#[from] InvalidHeader),
    /// The client failed to send the request.
    #[error("sending the request failed")]
    Transport(#[source] E),
}

/// The auth layer: a [`SingleFlight`] plus where the token goes, who may receive it and
/// what counts as a rejection. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    flight: SingleFlight,
    policy: Arc<Policy>,
    /// The token's header value, built once per token and shared by all clones.
    header: Arc<HeaderCache>,
}

pub(crate) struct Policy {
    pub(crate) placement: Placement,
    pub(crate) origins: AllowedOrigins,
    pub(crate) classifier: Classifier,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("flight", &self.flight)
            .field("placement", &self.policy.placement)
            .field("origins", &self.policy.origins)
            .field("classifier", &self.policy.classifier)
            .finish()
    }
}

impl Authenticator {
    pub(crate) fn new(flight: SingleFlight, policy: Policy) -> Self {
        Authenticator {
            header: Arc::new(HeaderCache::new(&policy.placement)),
            flight,
            policy: Arc::new(policy),
        }
    }

    /// The coordinator behind this layer (for `install`, `stats`, `current`).
    pub fn flight(&self) -> &SingleFlight {
        &self.flight
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.flight.stats()
    }

    /// Where the token goes.
    pub fn placement(&self) -> &Placement {
        &self.policy.placement
    }

    /// Which origins may receive the token.
    pub fn allowed_origins(&self) -> &AllowedOrigins {
        &self.policy.origins
    }

    /// Sends `request` with a valid token through `send`, and resends it once with a
    /// newer token if the response says the token was rejected.
    ///
    /// - Requests with `skip_auth`, and requests to origins not allowed, are sent as
    ///   they are and not classified (C11, C12).
    /// - A rejected request whose body cannot be replayed is not resent; the caller
    ///   gets the original response and the token is marked rejected (C4).
    /// - A second rejection is returned to the caller as it is: no loop (C4).
    /// - Each request that carries a token runs in an `info` span `tokenflight.request`
    ///   with the fields `generation` (of the token sent), `waited` (whether the request
    ///   waited for a token: false is a fast-path hit), `resent` and `resent_with` (the
    ///   generation of the resend). The refresh a request waited for is the
    ///   `tokenflight.refresh` span whose `generation` is the one the request carries.
    ///   No field carries a token or a secret (C12).
    /// - A response from another origin than the one the request (and its token) was
    ///   sent to — the client followed a redirect — is returned as it is, unclassified:
    ///   its 401 is not about the token, which never went there (C4, C12). So is one
    ///   from a URL without the token's query parameter, with query placement (a
    ///   same-origin redirect whose `Location` does not repeat the token).
    ///
    /// # Cancellation
    /// Dropping the future at any await point is safe: a refresh it started goes on for
    /// the other waiters (and, with a spawner, to completion) (C6); a request already
    /// handed to `send` is dropped with it.
    pub async fn send<Req, Resp, E, F, Fut>(
        &self,
        mut request: Req,
        options: RequestOptions,
        mut send: F,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        if options.skip_auth {
            return send(request).await.map_err(AuthError::Transport);
        }
        // Also where the response must come from to be a verdict on the token.
        let sent_to = request.url().origin();
        if !self.policy.origins.allows_origin(&sent_to) {
            return send(request).await.map_err(AuthError::Transport);
        }
        let span = tracing::info_span!(
            "tokenflight.request",
            generation = Empty,
            waited = Empty,
            resent = Empty,
            resent_with = Empty,
        );
        let token = self
            .authorize(options.force_refresh, &span)
            .instrument(span.clone())
            .await?;
        // A copy to resend only if a response can reject the token at all.
        let replay = if self.policy.classifier.can_reject() {
            request.try_clone()
        } else {
            None
        };
        self.policy
            .placement
            .attach_cached(&self.header, &mut request, &token)?;
        let response = send(request)
            .instrument(span.clone())
            .await
            .map_err(AuthError::Transport)?;
        if response.final_url().is_some_and(|url| {
            url.origin() != sent_to || !self.policy.placement.may_carry_token(url)
        }) {
            tracing::debug!("the response comes from where the token did not go; not classified");
            return Ok(response);
        }
        let (response, rejected) = self.classify(response).await;
        if !rejected {
            span.record("resent", false);
            return Ok(response);
        }
        let Some(mut replay) = replay else {
            span.record("resent", false);
            tracing::debug!(
                generation = token.generation(),
                "token rejected; the body cannot be replayed, returning the response"
            );
            self.flight.mark_rejected(token.generation());
            return Ok(response);
        };
        drop(response);
        let (newer, kind) = self
            .flight
            .token_after_rejection_kind(token.generation())
            .instrument(span.clone())
            .await?;
        span.record("resent", true);
        span.record("resent_with", newer.generation());
        self.resend(&mut replay, &newer)?;
        self.flight.observers().emit(|o| {
            o.request_resent(&RequestResent {
                kind,
                rejected: token.generation(),
                with: newer.generation(),
            })
        });
        send(replay)
            .instrument(span)
            .await
            .map_err(AuthError::Transport)
    }

    /// The token for a request. When anyone looks (an observer is registered, or the
    /// request's span is enabled) also whether the request waited, reported as
    /// [`RequestAuthorized`] and on `span`; otherwise this is just the coordinator's
    /// call. Waiting = the token was not ready at the first poll, or it is not the
    /// token that was current before (a refresh ran, possibly without suspending).
    async fn authorize(&self, force_refresh: bool, span: &Span) -> Result<Arc<Token>, Error> {
        let fetch = async {
            if force_refresh {
                self.flight.force_refresh().await
            } else {
                self.flight.token().await
            }
        };
        let observed = !self.flight.observers().is_empty();
        if !observed && span.is_disabled() {
            return fetch.await;
        }
        let before = self.flight.current().map(|t| t.generation());
        let mut fetch = pin!(fetch);
        let mut pended = false;
        let token = std::future::poll_fn(|cx| {
            let poll = fetch.as_mut().poll(cx);
            pended |= poll.is_pending();
            poll
        })
        .await?;
        let generation = token.generation();
        let waited = force_refresh || pended || before != Some(generation);
        span.record("generation", generation);
        span.record("waited", waited);
        if observed {
            self.flight
                .observers()
                .emit(|o| o.request_authorized(&RequestAuthorized { generation, waited }));
        }
        Ok(token)
    }

    fn resend<Req: AuthRequest>(
        &self,
        replay: &mut Req,
        token: &Arc<Token>,
    ) -> Result<(), InvalidHeader> {
        self.flight.count_retry();
        tracing::debug!(
            generation = token.generation(),
            "resending once with a newer token"
        );
        self.policy
            .placement
            .attach_cached(&self.header, replay, token)
    }

    /// Classifies `response`; returns it intact with the verdict. The body is read only
    /// when the classifier's body rule applies to the response
    /// ([`Classifier::body_rule_for`]).
    pub async fn classify<Resp: AuthResponse>(&self, response: Resp) -> (Resp, bool) {
        let classifier = &self.policy.classifier;
        if classifier.head_rejects(&response) {
            return (response, true);
        }
        match classifier.body_rule_for(&response) {
            None => (response, false),
            Some((limit, predicate)) => {
                let (response, body) = response.buffer_body(limit).await;
                let rejected = body.is_some_and(|bytes| predicate(&bytes));
                (response, rejected)
            }
        }
    }
}
