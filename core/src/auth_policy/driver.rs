//! The retry driver behind [`AuthPolicy::send`]: the common road polled by hand, every
//! other road one `async fn`.

use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::{BoxFuture, Either};
use tracing::field::Empty;
use tracing::instrument::Instrumented;
use tracing::{Instrument, Span};

use super::AuthPolicy;
use crate::error::{AuthError, Error};
use crate::flight::SingleFlight;
use crate::observe::{RequestAuthorized, RequestResent};
use crate::policy::{Head, Rules, SentTo};
use crate::request::{AuthRequest, AuthResponse, RequestOptions};
use crate::token::Token;

pin_project_lite::pin_project! {
    /// The future of [`AuthPolicy::send`]. Its common road — a token at once, one send,
    /// a response whose head clears the token — is polled here without an allocation;
    /// every other road (waiting for a token, reading a body, the resend) is one
    /// boxed `async fn`. Polled again after it completed, it stays pending (as
    /// `futures::future::Fuse` does).
    #[must_use = "futures do nothing unless polled"]
    pub struct SendFuture<'a, Req, Resp, E, F, Fut> {
        #[pin]
        state: State<'a, Req, Resp, E, F, Fut>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<'a, Req, Resp, E, F, Fut> {
        // `Some`: not yet polled (nothing is decided before the first poll); `None`:
        // completed. The request waits here, in the place its send future takes.
        Idle { start: Option<Start<Req, F>> },
        // The request is out. `sent: None`: it went without a token (skipped, or to an
        // origin not allowed), and its response is not classified.
        Sending {
            #[pin]
            future: Either<Fut, Instrumented<Fut>>,
            sent: Option<Sent<Req, F>>,
        },
        Slow { future: BoxFuture<'a, Result<Resp, AuthError<E>>> },
    }
}

impl<Req, Resp, E, F, Fut> SendFuture<'_, Req, Resp, E, F, Fut> {
    pub(super) fn new(policy: AuthPolicy, request: Req, options: RequestOptions, send: F) -> Self {
        let start = Start {
            policy,
            request,
            options,
            send,
        };
        SendFuture {
            state: State::Idle { start: Some(start) },
        }
    }
}

impl<Req, Resp, E, F, Fut> fmt::Debug for SendFuture<'_, Req, Resp, E, F, Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Idle { start: Some(_) } => "not polled",
            State::Idle { start: None } => "done",
            State::Sending { .. } => "sending",
            State::Slow { .. } => "waiting, classifying or resending",
        };
        f.debug_struct("SendFuture").field("state", &state).finish()
    }
}

/// A request before the first poll.
struct Start<Req, F> {
    policy: AuthPolicy,
    request: Req,
    options: RequestOptions,
    send: F,
}

/// What a request that carries a token keeps until its response is judged.
struct Attempt<F> {
    policy: AuthPolicy,
    /// The request's coordinator: the policy's one, or its key's.
    flight: SingleFlight,
    send: F,
    span: Span,
    /// Where the response must come from to be a verdict on the token.
    sent_to: SentTo,
}

/// A request that went out with a token.
struct Sent<Req, F> {
    attempt: Attempt<F>,
    replay: Option<Req>,
    generation: u64,
}

/// Where a request leaves the common road.
enum Road<Req, Resp> {
    /// Before its first send: waiting for a token (or a forced refresh).
    Wait {
        request: Req,
        force_refresh: bool,
        /// How long the token must stay valid after sending ([C20](crate#c20)).
        valid_for: Option<std::time::Duration>,
    },
    /// A response whose head did not clear the token.
    Judge {
        response: Resp,
        head: Head,
        replay: Option<Req>,
        generation: u64,
    },
}

impl<'a, Req, Resp, E, F, Fut> Future for SendFuture<'a, Req, Resp, E, F, Fut>
where
    Req: AuthRequest + 'a,
    Resp: AuthResponse + 'a,
    E: Send + 'a,
    F: FnMut(Req) -> Fut + Send + 'a,
    Fut: Future<Output = Result<Resp, E>> + Send + 'a,
{
    type Output = Result<Resp, AuthError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Idle { start } => {
                    let Some(start) = start.take() else {
                        return Poll::Pending;
                    };
                    match start.begin() {
                        Ok(state) => this.state.set(state),
                        Err(error) => return Poll::Ready(Err(error)),
                    }
                }
                StateProj::Sending { future, sent } => {
                    let result = ready!(future.poll(cx));
                    let sent = sent.take();
                    this.state.set(State::Idle { start: None });
                    let response = match result {
                        Ok(response) => response,
                        Err(error) => return Poll::Ready(Err(AuthError::Transport(error))),
                    };
                    let Some(sent) = sent else {
                        return Poll::Ready(Ok(response));
                    };
                    let Sent {
                        attempt,
                        replay,
                        generation,
                    } = sent;
                    let head = attempt
                        .policy
                        .inner
                        .rules
                        .head(&response, Some(&attempt.sent_to));
                    // Every response's DPoP nonce is recorded, a success's too.
                    #[cfg(feature = "dpop")]
                    if let Head::Clears = head {
                        let rules = &attempt.policy.inner.rules;
                        rules.dpop_nonce_demanded(&response, rules.dpop_url(replay.as_ref()));
                    }
                    if let Head::Clears = head {
                        attempt.cleared();
                        return Poll::Ready(Ok(response));
                    }
                    let road = Road::Judge {
                        response,
                        head,
                        replay,
                        generation,
                    };
                    let future = Box::pin(attempt.slow_road(road));
                    this.state.set(State::Slow { future });
                }
                StateProj::Slow { future } => {
                    let output = ready!(future.as_mut().poll(cx));
                    this.state.set(State::Idle { start: None });
                    return Poll::Ready(output);
                }
            }
        }
    }
}

impl<'a, Req, F> Start<Req, F> {
    /// The first poll: the request sent at once (without a token, or with the current
    /// one), or the slow road. Errors: no coordinator for the request (misuse), or the
    /// token cannot be a header value.
    fn begin<Resp, E, Fut>(self) -> Result<State<'a, Req, Resp, E, F, Fut>, AuthError<E>>
    where
        Req: AuthRequest + 'a,
        Resp: AuthResponse + 'a,
        E: Send + 'a,
        F: FnMut(Req) -> Fut + Send + 'a,
        Fut: Future<Output = Result<Resp, E>> + Send + 'a,
    {
        let Start {
            policy,
            mut request,
            options,
            mut send,
        } = self;
        let Some(sent_to) = policy.inner.rules.admit(&request, &options) else {
            let future = Either::Left(send(request));
            return Ok(State::Sending { future, sent: None });
        };
        let flight = policy.flight_for(&request, options.key.as_ref())?;
        let replay = match options.force_refresh {
            true => None,
            false => policy.inner.rules.replay_copy(&request),
        };
        // The token is lent, not cloned: after attaching it the request needs only its
        // generation.
        let attached = match options.force_refresh {
            true => None,
            false => flight
                .with_ready_token(|token| {
                    // C20: a token that would expire before the request's deadline
                    // waits for the refresh on the slow road.
                    if let Some(need) = options.valid_for {
                        if !flight.lasts_for(token, need) {
                            return None;
                        }
                    }
                    let attached = policy.inner.rules.attach(&mut request, token);
                    Some(attached.map(|()| token.generation()))
                })
                .flatten(),
        };
        let mut attempt = Attempt {
            policy,
            flight,
            send,
            span: request_span(),
            sent_to,
        };
        let Some(attached) = attached else {
            // No token at once (or a forced refresh). The copy is made again after the
            // wait, with the token's place still empty.
            let road = Road::Wait {
                request,
                force_refresh: options.force_refresh,
                valid_for: options.valid_for,
            };
            let future = Box::pin(attempt.slow_road(road));
            return Ok(State::Slow { future });
        };
        let generation = attached?;
        attempt.authorized_at_once(generation);
        let future = traced((attempt.send)(request), &attempt.span);
        let sent = Sent {
            attempt,
            replay,
            generation,
        };
        Ok(State::Sending {
            future,
            sent: Some(sent),
        })
    }
}

impl<F> Attempt<F> {
    /// Every road but the common one: the token (waiting for it), the send, the
    /// verdict (reading the body if the rule says so), and after a rejection the
    /// token that supersedes the rejected one and the one resend ([C3](crate#c3),
    /// [C4](crate#c4)).
    async fn slow_road<Req, Resp, E, Fut>(
        mut self,
        road: Road<Req, Resp>,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let (response, head, replay, generation) = match road {
            Road::Judge {
                response,
                head,
                replay,
                generation,
            } => (response, head, replay, generation),
            Road::Wait {
                mut request,
                force_refresh,
                valid_for,
            } => {
                let token = authorize(&self.flight, &self.span, force_refresh, valid_for).await?;
                let rules = &self.policy.inner.rules;
                let replay = rules.replay_copy(&request);
                rules.attach(&mut request, &token)?;
                let generation = token.generation();
                drop(token);
                let response = traced((self.send)(request), &self.span)
                    .await
                    .map_err(AuthError::Transport)?;
                let head = self.policy.inner.rules.head(&response, Some(&self.sent_to));
                (response, head, replay, generation)
            }
        };
        // A DPoP nonce demand is cured by one resend with a proof carrying the nonce,
        // not by a refresh: the token is not marked rejected.
        #[cfg(feature = "dpop")]
        if let Some(nonce) = self
            .policy
            .inner
            .rules
            .dpop_nonce_demanded(&response, self.policy.inner.rules.dpop_url(replay.as_ref()))
        {
            if let Some(replay) = replay {
                drop(response);
                return self.nonce_resend(replay, &nonce).await;
            }
        }
        let (response, rejected) = Rules::classify(response, head).await;
        if !rejected {
            self.cleared();
            return Ok(response);
        }
        let Some(replay) = replay else {
            self.span.record("resent", false);
            tracing::debug!(
                generation,
                "token rejected; the body cannot be replayed, returning the response"
            );
            self.flight.mark_rejected(generation);
            return Ok(response);
        };
        drop(response);
        self.resend(replay, generation).await
    }

    /// After a rejection of `rejected`: the token that supersedes it, then the resend.
    async fn resend<Req, Resp, E, Fut>(
        mut self,
        mut replay: Req,
        rejected: u64,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let (newer, kind) = self
            .flight
            .token_after_rejection_kind(rejected)
            .instrument(self.span.clone())
            .await?;
        let with = newer.generation();
        self.span.record("resent", true);
        self.span.record("resent_with", with);
        self.flight.count_retry();
        tracing::debug!(generation = with, "resending once with a newer token");
        self.policy.inner.rules.attach(&mut replay, &newer)?;
        drop(newer);
        self.flight.observers().emit(|o| {
            o.request_resent(&RequestResent {
                kind,
                rejected,
                with,
            })
        });
        traced((self.send)(replay), &self.span)
            .await
            .map_err(AuthError::Transport)
    }

    /// After a DPoP nonce demand: the one resend, with the current token and a new
    /// proof carrying the demanded `nonce`. Its response is the answer, whatever it is (a second
    /// demand included: no loop, [C4](crate#c4)); its nonce is recorded.
    #[cfg(feature = "dpop")]
    async fn nonce_resend<Req, Resp, E, Fut>(
        mut self,
        mut replay: Req,
        nonce: &str,
    ) -> Result<Resp, AuthError<E>>
    where
        Req: AuthRequest,
        Resp: AuthResponse,
        F: FnMut(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let token = authorize(&self.flight, &self.span, false, None).await?;
        let rules = &self.policy.inner.rules;
        let origin = replay.url().clone();
        rules.attach_after_demand(&mut replay, &token, nonce)?;
        drop(token);
        self.span.record("resent", true);
        tracing::debug!("the resource server demanded a DPoP nonce; resending once");
        let response = traced((self.send)(replay), &self.span)
            .await
            .map_err(AuthError::Transport)?;
        self.policy
            .inner
            .rules
            .dpop_nonce_demanded(&response, Some(&origin));
        Ok(response)
    }

    /// Tells the span and the observers about a token taken on the common road.
    fn authorized_at_once(&self, generation: u64) {
        if !self.flight.observers().is_empty() || !self.span.is_disabled() {
            authorized(&self.flight, &self.span, generation, false);
        }
    }

    /// The response stands: no resend. Not even a call into the span when nobody looks
    /// (recording on a span without metadata still runs tracing's record path).
    fn cleared(&self) {
        if !self.span.is_none() {
            self.span.record("resent", false);
        }
    }
}

/// The token for a request that had none at once, telling the span whether it waited.
/// Borrows only the coordinator and the span (not the client's `send`, which need not
/// be `Sync`).
async fn authorize(
    flight: &SingleFlight,
    span: &Span,
    force_refresh: bool,
    valid_for: Option<std::time::Duration>,
) -> Result<Arc<Token>, Error> {
    let fetch = async {
        match (force_refresh, valid_for) {
            (true, _) => flight.force_refresh().await,
            (false, Some(need)) => flight.token_valid_for(need).await,
            (false, None) => flight.token().await,
        }
    };
    let fetch = fetch.instrument(span.clone());
    if flight.observers().is_empty() && span.is_disabled() {
        return fetch.await;
    }
    let before = flight.current().map(|t| t.generation());
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
    authorized(flight, span, generation, waited);
    Ok(token)
}

/// Records the token a request goes out with on its span and tells the observers.
fn authorized(flight: &SingleFlight, span: &Span, generation: u64, waited: bool) {
    span.record("generation", generation);
    span.record("waited", waited);
    if !flight.observers().is_empty() {
        flight
            .observers()
            .emit(|o| o.request_authorized(&RequestAuthorized { generation, waited }));
    }
}

/// The span of one request that carries a token; a span without metadata when nobody
/// looks (no subscriber wants it), whose enter, exit and record do nothing. A disabled
/// span still has its metadata, and with tracing's `log` feature (which axum, tower and
/// others switch on) every poll through `instrument` asks the `log` crate whether to
/// print it. When no subscriber takes `info` at all, not even the disabled span is made.
fn request_span() -> Span {
    if tracing::Level::INFO > tracing::level_filters::LevelFilter::current() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "tokenflight.request",
        generation = Empty,
        waited = Empty,
        resent = Empty,
        resent_with = Empty,
    );
    if span.is_disabled() {
        Span::none()
    } else {
        span
    }
}

/// `future` inside `span`, or as it is when nobody looks at the span (no wrapper to
/// poll through). Not an `async fn`: that would hold `future` twice in its state.
fn traced<F: Future>(future: F, span: &Span) -> Either<F, Instrumented<F>> {
    if span.is_none() {
        Either::Left(future)
    } else {
        Either::Right(future.instrument(span.clone()))
    }
}
