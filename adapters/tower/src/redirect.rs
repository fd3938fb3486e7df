//! A tower-http redirect policy that never lets `FollowRedirect` carry a token where it
//! may not go: to an origin not allowed, or — with a keyed policy — to a request of
//! another key.
//!
//! The core checks the URL a request is sent to ([C12](tokenflight#c12)), but
//! `FollowRedirect` below the layer follows redirects by itself, and every hop keeps what
//! the first request carried: it puts the first request's headers back on every hop, and
//! its standard policy drops `Authorization` (and cookies) only on a hop that itself
//! changes origin. So a token in `Authorization` goes along on every hop that stays on
//! the origin of the hop before it (the second hop of A → B → B), a token in any other
//! header on every hop, and a query token wherever a `Location` repeats the query
//! (tower-http sends no `Referer`). The rule is the core's
//! [`Placement::travels_on_redirect`](tokenflight::Placement::travels_on_redirect).
//!
//! As in the reqwest adapter, a hop that would carry the token where
//! [`AuthPolicy::token_may_follow`] does not allow it is not followed: the caller gets the
//! redirect response, and following it is a new request through the layer, which
//! attaches that URL's own token (or none). Every other hop is followed as tower-http's
//! standard policy would.

use std::fmt;

use http::{Method, Request};
use tokenflight::adapter::RequestOptions;
use tokenflight::{AuthPolicy, SkipAuth};
use tower_http::follow_redirect::policy::{Action, Attempt, Policy, Standard};
use url::Url;

use crate::message::{probe, url_of};

/// A tower-http `FollowRedirect` policy for the service under a
/// [`TokenLayer`](crate::TokenLayer): tower-http's standard policy (up to 20 redirects,
/// `Authorization` and cookies dropped on a hop that changes origin), except that it
/// does not follow a hop that would carry the token to an origin not allowed, or to a
/// URL of another key of a keyed policy ([`AuthPolicy::token_may_follow`], judged with
/// the hop's method); the caller gets the redirect response (the `3xx`) instead.
/// Made by [`TokenLayer::redirect_policy`](crate::TokenLayer::redirect_policy).
///
/// The standard policy alone is not enough: it drops `Authorization` only on the hop
/// that leaves an origin and puts it back on the next, so A → B → B carries A's token
/// to B on the second hop; a token in another header goes along on every hop, a query
/// token wherever a `Location` repeats the query.
///
/// A request the layer sent without a token ([`SkipAuth`], a skipped route, an origin
/// not allowed) is followed as the standard policy would. Each `FollowRedirect` call
/// works on its own clone, which remembers the request it started with. Combine it
/// with other policies through tower-http's `PolicyExt` (`and`, `or`); its
/// `on_request` must be called for the first request (`And` and `Or` do), or it judges
/// that request by its origin alone, as if it carried the token.
#[derive(Clone)]
pub struct RedirectPolicy {
    auth: AuthPolicy,
    standard: Standard,
    first: First,
}

/// What this clone knows of the request its `FollowRedirect` call started with.
#[derive(Clone)]
enum First {
    /// Nothing yet.
    Unseen,
    /// Its method and whether it was marked [`SkipAuth`]; its URI is the first
    /// redirect's `previous`.
    Sent { method: Method, skip_auth: bool },
    /// Judged at the first redirect: the URL the token went to, or `None` when it
    /// carried no token. Never printed: it may hold a query token.
    Judged(Option<Url>),
}

impl RedirectPolicy {
    pub(crate) fn new(auth: AuthPolicy) -> Self {
        RedirectPolicy {
            auth,
            standard: Standard::default(),
            first: First::Unseen,
        }
    }

    /// Judges the first request at the first redirect, whose `previous` is that
    /// request's URI: whether the layer attached the token to it.
    fn judge_first(&mut self, attempt: &Attempt<'_>) {
        if matches!(self.first, First::Judged(_)) {
            return;
        }
        let carried = url_of(attempt.previous()).filter(|url| match &self.first {
            First::Sent { method, skip_auth } => {
                probe(method, attempt.previous()).is_some_and(|sent| {
                    let options = RequestOptions::from_markers(*skip_auth, false);
                    self.auth.attaches_token(&sent, &options)
                })
            }
            // `on_request` was not passed on: judged by the origin alone.
            _ => self.auth.allows_origin(url),
        });
        self.first = First::Judged(carried);
    }

    fn carries_token_where_it_may_not_go(&mut self, attempt: &Attempt<'_>) -> bool {
        self.judge_first(attempt);
        let First::Judged(Some(first)) = &self.first else {
            return false;
        };
        let (Some(previous), Some(next)) = (url_of(attempt.previous()), url_of(attempt.location()))
        else {
            // Cannot be judged (tower-http resolved both, so this does not happen).
            return true;
        };
        // tower-http sends no `Referer`.
        self.auth
            .redirect_carries_token_away(attempt.method(), first, &previous, &next, false)
    }
}

impl fmt::Debug for RedirectPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the first URL: it may hold a query token (C12).
        f.debug_struct("RedirectPolicy")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl<B, E> Policy<B, E> for RedirectPolicy {
    fn redirect(&mut self, attempt: &Attempt<'_>) -> Result<Action, E> {
        if self.carries_token_where_it_may_not_go(attempt) {
            tracing::debug!(
                status = attempt.status().as_u16(),
                "redirect not followed: the hop would carry the token where it may not go"
            );
            return Ok(Action::Stop);
        }
        Policy::<B, E>::redirect(&mut self.standard, attempt)
    }

    fn on_request(&mut self, request: &mut Request<B>) {
        if matches!(self.first, First::Unseen) {
            self.first = First::Sent {
                method: request.method().clone(),
                skip_auth: request.extensions().get::<SkipAuth>().is_some(),
            };
        }
        Policy::<B, E>::on_request(&mut self.standard, request);
    }

    fn clone_body(&self, body: &B) -> Option<B> {
        Policy::<B, E>::clone_body(&self.standard, body)
    }
}
