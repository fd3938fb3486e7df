//! [`FollowRedirects`]: redirect following that keeps the token on allowed origins.
//!
//! surf's own `surf::middleware::Redirect` probes each redirect by sending a clone of
//! the request, headers included, through the bare HTTP client. Registered after the
//! [`TokenMiddleware`](crate::TokenMiddleware), those probes carry the `Authorization` header to
//! whatever origin the server names (tested in `tests/all/redirects.rs`). Registered before
//! it, the token is safe, but every request is sent twice (probe, then the real one).
//! This middleware sends each hop once, through the rest of the chain, so the token
//! layer decides again for every hop's origin.

use surf::http::headers::{AUTHORIZATION, COOKIE, LOCATION, PROXY_AUTHORIZATION};
use surf::http::{Method, Url};
use surf::middleware::{Middleware, Next};
use surf::{Client, Request, Response, StatusCode};
use tokenflight::SkipAuth;
use tokenflight::adapter::AuthRequest;

use crate::layer::DEFAULT_REPLAY_BODY_LIMIT;
use crate::message::Attempt;

/// Follows `301`, `302`, `303`, `307` and `308` redirects, each hop through the
/// middleware registered after this one. Register it **before** the
/// [`TokenMiddleware`](crate::TokenMiddleware):
///
/// ```no_run
/// # fn demo(layer: tokenflight_surf::TokenMiddleware) {
/// use tokenflight_surf::FollowRedirects;
/// let client = surf::client().with(FollowRedirects::default()).with(layer);
/// # }
/// ```
///
/// - `303`, and `301`/`302` after a `POST`, continue as a `GET` without a body (as
///   browsers do); `307`/`308` keep method and body. A body too large to buffer (see
///   [`FollowRedirects::body_limit`]) cannot be sent twice: the `307`/`308` response is
///   returned instead.
/// - On a hop to another origin, `Authorization`, `Proxy-Authorization` and `Cookie`
///   headers the caller set are dropped; the token layer attaches the token again only
///   if the new origin is allowed.
/// - A [`SkipAuth`] marker applies to every hop. After the last allowed hop, or with a
///   `Location` that is missing or not a URL, the redirect response is returned as is.
#[derive(Clone, Copy, Debug)]
pub struct FollowRedirects {
    max_hops: usize,
    body_limit: usize,
}

impl Default for FollowRedirects {
    /// Up to 10 hops, bodies up to 1 MiB resent on `307`/`308`.
    fn default() -> Self {
        FollowRedirects::new(10)
    }
}

impl FollowRedirects {
    /// Follows at most `max_hops` redirects per request.
    pub fn new(max_hops: usize) -> Self {
        FollowRedirects {
            max_hops,
            body_limit: DEFAULT_REPLAY_BODY_LIMIT,
        }
    }

    /// The largest request body (bytes) kept to resend on a `307`/`308` (default 1 MiB).
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }
}

#[surf::utils::async_trait]
impl Middleware for FollowRedirects {
    async fn handle(&self, req: Request, client: Client, next: Next<'_>) -> surf::Result<Response> {
        let skip_auth = req.ext::<SkipAuth>().is_some();
        let mut attempt = Attempt::without_reading(req)
            .read_body(self.body_limit)
            .await?;
        let mut hops = 0;
        loop {
            let from = attempt.url().clone();
            let same_method = attempt.try_clone();
            let as_get = attempt.without_body();
            let method = attempt.request_mut().method();
            let response = next.run(attempt.into_request(), client.clone()).await?;
            if hops >= self.max_hops {
                return Ok(response);
            }
            let Some(to) = location(&response, &from) else {
                return Ok(response);
            };
            let follow = match response.status() {
                StatusCode::SeeOther if method != Method::Head => Some((as_get, true)),
                StatusCode::MovedPermanently | StatusCode::Found if method == Method::Post => {
                    Some((as_get, true))
                }
                StatusCode::MovedPermanently
                | StatusCode::Found
                | StatusCode::SeeOther
                | StatusCode::TemporaryRedirect
                | StatusCode::PermanentRedirect => same_method.map(|a| (a, false)),
                _ => return Ok(response),
            };
            let Some((next_attempt, to_get)) = follow else {
                // 307/308 with a body that was not buffered: it cannot be sent again.
                return Ok(response);
            };
            hops += 1;
            attempt = next_attempt;
            let request: &mut surf::http::Request = attempt.request_mut().as_mut();
            if to_get {
                request.set_method(Method::Get);
            }
            if to.origin() != from.origin() {
                request.remove_header(AUTHORIZATION);
                request.remove_header(PROXY_AUTHORIZATION);
                request.remove_header(COOKIE);
            }
            if skip_auth {
                request.ext_mut().insert(SkipAuth);
            }
            *request.url_mut() = to;
        }
    }
}

/// The redirect target: `Location` resolved against the URL the response came from.
fn location(response: &Response, from: &Url) -> Option<Url> {
    let value = response.header(LOCATION)?.iter().next()?;
    from.join(value.as_str()).ok()
}
