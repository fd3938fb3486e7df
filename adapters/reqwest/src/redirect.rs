//! A redirect policy that never lets reqwest carry a token where it may not go: to an
//! origin not allowed, or — with a keyed policy — to a request of another key.
//!
//! The core checks the URL a request is sent to ([C12](tokenflight#c12)), but reqwest follows redirects
//! inside the client, below the middleware, and every hop keeps what the first request
//! carried:
//! - reqwest puts the caller's headers back on every hop and drops `Authorization`
//!   (and cookies) only on a hop that itself changes origin, so a token in
//!   `Authorization` goes along on every hop that stays on the origin of the hop
//!   before it — including the second hop of A → B → B;
//! - a token in any other header (`X-Api-Key`) goes along on every hop;
//! - a token in the query goes along in the `Referer` of the next hop (reqwest sends
//!   the previous URL, query included) and in the next URL itself when a `Location`
//!   repeats the query.
//!
//! A reqwest `Policy` cannot change a hop's headers, and the middleware never sees the
//! hops, so the token cannot be decided per hop (as the surf adapter, which sends each
//! hop through the middleware, does). What a reqwest user expects instead is what
//! reqwest itself does with credentials: they do not cross to another party on a
//! redirect. So a hop that would carry the token where it may not go is not followed:
//! the caller gets the redirect response, and following it is a new request through
//! the middleware, which attaches that URL's own token (or none). Every other hop is
//! followed as reqwest's default policy would.

use reqwest::redirect::{Attempt, Policy};
use tokenflight::AuthPolicy;

pub(crate) fn policy(auth: &AuthPolicy) -> Policy {
    let auth = auth.clone();
    Policy::custom(move |attempt: Attempt<'_>| {
        if carries_token_where_it_may_not_go(&auth, &attempt) {
            attempt.stop()
        } else {
            Policy::default().redirect(attempt)
        }
    })
}

fn carries_token_where_it_may_not_go(auth: &AuthPolicy, attempt: &Attempt<'_>) -> bool {
    // The request the middleware attached the token to (if it did: it went to an
    // allowed origin; a skipped request cannot be told apart here, and is judged as
    // if it carried one), and the hop before this one.
    let (Some(first), Some(previous)) = (attempt.previous().first(), attempt.previous().last())
    else {
        return false;
    };
    if !auth.allows_origin(first) {
        return false;
    }
    let next = attempt.url();
    // A redirect hook does not know the method of the hop (a 303 turns it into a GET);
    // key functions that ignore the method (the default, by origin) are judged exactly.
    // reqwest sends the previous URL as `Referer` (with `.referer(false)` it would not,
    // but a policy cannot see that).
    auth.redirect_carries_token_away(&http::Method::GET, first, previous, next, true)
}
