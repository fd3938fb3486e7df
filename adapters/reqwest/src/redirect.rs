//! A redirect policy that keeps the token on the allowed origins when it travels in a
//! header reqwest does not strip by itself, or in the query.
//!
//! The core checks the URL a request is sent to ([C12](tokenflight#c12)), but reqwest follows redirects
//! inside the client, below the middleware. On a redirect to another origin reqwest
//! drops `Authorization` (and cookies), yet keeps every other header, so a token in
//! `X-Api-Key` would go along; and it sends the previous URL, query included, as
//! `Referer`, so a token in the query would go along too.

use reqwest::redirect::{Attempt, Policy};
use tokenflight::{AuthPolicy, Placement};

pub(crate) fn policy(auth: &AuthPolicy) -> Policy {
    let origins = auth.clone();
    let survives_redirects = match auth.placement() {
        Placement::Header { name, .. } => !name.eq_ignore_ascii_case("authorization"),
        // A query token is part of the old URL, which reqwest sends along as the
        // `Referer` of the next request (unless the client was built with
        // `.referer(false)`, which a policy cannot see).
        _ => true,
    };
    Policy::custom(move |attempt: Attempt<'_>| {
        if survives_redirects && leaves_allowed_origins(&origins, &attempt) {
            // The caller gets the redirect response itself, without the token leaving.
            attempt.stop()
        } else {
            Policy::default().redirect(attempt)
        }
    })
}

fn leaves_allowed_origins(origins: &AuthPolicy, attempt: &Attempt<'_>) -> bool {
    let started_allowed = attempt
        .previous()
        .first()
        .is_some_and(|first| origins.allows_origin(first));
    started_allowed && !origins.allows_origin(attempt.url())
}
