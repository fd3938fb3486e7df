//! What every adapter would otherwise write for itself: the token's header as `http`
//! types, the per-request markers read from any extension map, the query token kept
//! out of errors, and a bare transport's response read within its limit.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use url::Url;

use crate::error::{BoxError, InvalidHeader};
use crate::policy::Placement;
use crate::request::RequestOptions;
use crate::transport::TransportError;

/// Header `name` with `value`, marked sensitive so clients and logs do not print it;
/// `Err` when either cannot be a header (a value with a line break or a control
/// character cannot inject a header line). What
/// [`AuthRequest::set_sensitive_header`](crate::adapter::AuthRequest::set_sensitive_header)
/// inserts, for clients built on the `http` crate.
///
/// ```
/// use tokenflight::adapter::{InvalidHeader, sensitive_header};
/// let (name, value) = sensitive_header("authorization", "Bearer t0k3n").unwrap();
/// assert_eq!(name, http::header::AUTHORIZATION);
/// assert!(value.is_sensitive());
/// assert_eq!(sensitive_header("authorization", "a\r\nx-evil: 1"), Err(InvalidHeader));
/// ```
pub fn sensitive_header(
    name: &str,
    value: &str,
) -> Result<(HeaderName, HeaderValue), InvalidHeader> {
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| InvalidHeader)?;
    let mut value = HeaderValue::from_str(value).map_err(|_| InvalidHeader)?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// A request's extension map, as far as the per-request markers go
/// ([`SkipAuth`](crate::SkipAuth), [`ForceRefresh`](crate::ForceRefresh),
/// [`TokenKey`](crate::TokenKey), [`ValidFor`](crate::ValidFor)): implemented for
/// `http::Extensions`; a client with its own map (surf's) implements it on a wrapper,
/// and [`RequestOptions::from_extensions`] reads every marker the same way for all.
pub trait Markers {
    /// A copy of the marker of type `T`, if the request carries one.
    fn marker<T: Clone + Send + Sync + 'static>(&self) -> Option<T>;
}

impl Markers for http::Extensions {
    fn marker<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.get::<T>().cloned()
    }
}

impl RequestOptions {
    /// These options with the validity an adapter derived from the request's own
    /// deadline (reqwest's timeout, gRPC's `grpc-timeout`), unless a
    /// [`ValidFor`](crate::ValidFor) marker already set one: the marker wins.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::ValidFor;
    /// use tokenflight::adapter::RequestOptions;
    /// let timeout = Some(Duration::from_secs(30));
    /// let mut extensions = http::Extensions::new();
    /// let derived = RequestOptions::from_extensions(&extensions).or_valid_for(timeout);
    /// assert_eq!(derived.valid_for, timeout);
    /// extensions.insert(ValidFor(Duration::from_secs(5)));
    /// let marked = RequestOptions::from_extensions(&extensions).or_valid_for(timeout);
    /// assert_eq!(marked.valid_for, Some(Duration::from_secs(5)));
    /// ```
    pub fn or_valid_for(mut self, derived: Option<Duration>) -> Self {
        self.valid_for = self.valid_for.or(derived);
        self
    }
}

impl crate::AuthPolicy {
    /// Whether following a redirect from `previous` to `next` would carry the token
    /// where it may not go, for a client that follows redirects below the layer and
    /// puts the first request's token back on every hop: the token travels on that hop
    /// ([`Placement::travels_on_redirect`]; `sends_referer`: the client sends the
    /// previous URL as `Referer`) and may not follow the first request, whose token went
    /// to `first`, to `next` ([`token_may_follow`](Self::token_may_follow), judged with
    /// the hop's `method`). A redirect policy stops such a hop: the caller gets the
    /// redirect response, and following it is a new request with that URL's own token.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Placement, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .placement(Placement::header("x-api-key", None))
    ///     .allowed_origin("https://api.example.com")
    ///     .build()
    ///     .unwrap();
    /// let url = |s: &str| url::Url::parse(s).unwrap();
    /// let first = url("https://api.example.com/a");
    /// let get = http::Method::GET;
    /// assert!(!policy.redirect_carries_token_away(&get, &first, &first, &url("https://api.example.com/b"), true));
    /// assert!(policy.redirect_carries_token_away(&get, &first, &first, &url("https://elsewhere.example/"), true));
    /// ```
    pub fn redirect_carries_token_away(
        &self,
        method: &http::Method,
        first: &Url,
        previous: &Url,
        next: &Url,
        sends_referer: bool,
    ) -> bool {
        self.placement()
            .travels_on_redirect(previous, next, sends_referer)
            && !self.token_may_follow(method, first, next)
    }
}

/// The URLs a request went out with, when the token is in the query, so that an error
/// that prints one of them (reqwest's, or one of middleware further down) can be shown
/// with the token's value written `redacted` ([C12](crate#c12)). With a header
/// placement it records nothing and allocates nothing. Clones share the record: one
/// for the send closure, one for the error path.
///
/// ```
/// use tokenflight::Placement;
/// use tokenflight::adapter::SentUrls;
/// let placement = Placement::query("token");
/// let sent = SentUrls::new(&placement);
/// sent.record(&url::Url::parse("https://api.example.com/v1?token=s3cr3t").unwrap());
/// let error = "502 from https://api.example.com/v1?token=s3cr3t";
/// let shown = sent.scrub(error, error).unwrap();
/// assert_eq!(shown, "502 from https://api.example.com/v1?token=redacted");
/// assert_eq!(sent.scrub("connection refused", "connection refused"), None);
/// ```
#[derive(Clone, Debug)]
pub struct SentUrls<'a> {
    placement: &'a Placement,
    urls: Option<Arc<Mutex<Vec<Url>>>>,
}

impl<'a> SentUrls<'a> {
    /// A record for a request sent with `placement`: empty, and only kept with query
    /// placement.
    ///
    /// ```
    /// use tokenflight::Placement;
    /// use tokenflight::adapter::SentUrls;
    /// let bearer = Placement::bearer();
    /// let sent = SentUrls::new(&bearer);
    /// sent.record(&url::Url::parse("https://api.example.com/?token=x").unwrap());
    /// // A header token is never in a URL: nothing to hide.
    /// assert_eq!(sent.scrub("token=x", "token=x"), None);
    /// ```
    pub fn new(placement: &'a Placement) -> Self {
        let urls = matches!(placement, Placement::Query { .. }).then(Arc::default);
        SentUrls { placement, urls }
    }

    /// Notes that a request went out to `url` (the send closure calls it with each
    /// attempt's URL, after the token was attached).
    ///
    /// ```
    /// # use tokenflight::{Placement, adapter::SentUrls};
    /// let placement = Placement::query("key");
    /// let sent = SentUrls::new(&placement);
    /// sent.record(&url::Url::parse("https://api.example.com/?key=k3y").unwrap());
    /// assert!(sent.scrub("k3y", "k3y").is_some());
    /// ```
    pub fn record(&self, url: &Url) {
        if let Some(urls) = &self.urls {
            lock(urls).push(url.clone());
        }
    }

    /// `text` with the token of every recorded URL replaced by `redacted`, when
    /// `shown` (all that the error prints: its `Display`, its causes', its `Debug`)
    /// shows one of them; `None` when nothing shows a token. An adapter replaces the
    /// error by one carrying the returned text.
    ///
    /// ```
    /// # use tokenflight::{Placement, adapter::SentUrls};
    /// let placement = Placement::query("token");
    /// let sent = SentUrls::new(&placement);
    /// sent.record(&url::Url::parse("https://api.example.com/?token=a%2Bb").unwrap());
    /// // Found encoded or decoded, in what the error shows; `text` is what is kept.
    /// assert_eq!(sent.scrub("Debug { url: ..?token=a%2Bb }", "failed: a+b").as_deref(), Some("failed: redacted"));
    /// ```
    pub fn scrub(&self, shown: &str, text: &str) -> Option<String> {
        let urls = lock(self.urls.as_ref()?);
        if !urls
            .iter()
            .any(|url| self.placement.scrub(url, shown).is_some())
        {
            return None;
        }
        let mut text = text.to_owned();
        for url in urls.iter() {
            if let Some(scrubbed) = self.placement.scrub(url, &text) {
                text = scrubbed;
            }
        }
        Some(text)
    }

    /// [`scrub`](Self::scrub) for an error of the `std` kind: the text of `error` and
    /// its causes, redacted, when that text or its `Debug` shows a recorded token.
    ///
    /// ```
    /// # use tokenflight::{Placement, adapter::SentUrls};
    /// let placement = Placement::query("token");
    /// let sent = SentUrls::new(&placement);
    /// sent.record(&url::Url::parse("https://api.example.com/?token=s3cr3t").unwrap());
    /// let error = std::io::Error::other("GET https://api.example.com/?token=s3cr3t failed");
    /// assert!(!sent.scrub_error(&error).unwrap().contains("s3cr3t"));
    /// ```
    pub fn scrub_error(&self, error: &(dyn std::error::Error + 'static)) -> Option<String> {
        self.urls.as_ref()?;
        let text = chain(error);
        self.scrub(&format!("{text} {error:?}"), &text)
    }
}

fn lock(urls: &Mutex<Vec<Url>>) -> std::sync::MutexGuard<'_, Vec<Url>> {
    urls.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error's `Display` followed by its causes'.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl TransportError {
    /// A client's error as a transport error: [`Timeout`](Self::Timeout) when the
    /// client says it timed out, else [`Network`](Self::Network) holding it. Strip
    /// URLs from `error` first (reqwest's `without_url`): a token endpoint URL may carry
    /// credentials, and the error is shown to every waiter of the refresh
    /// ([C12](crate#c12)).
    ///
    /// ```
    /// use tokenflight::adapter::TransportError;
    /// let error = TransportError::from_client(false, std::io::Error::other("reset"));
    /// assert!(matches!(error, TransportError::Network(_)));
    /// let error = TransportError::from_client(true, std::io::Error::other("slow"));
    /// assert!(matches!(error, TransportError::Timeout));
    /// ```
    pub fn from_client(timed_out: bool, error: impl Into<BoxError>) -> Self {
        if timed_out {
            TransportError::Timeout
        } else {
            TransportError::Network(error.into())
        }
    }
}

#[cfg(feature = "http-body")]
pub use body::collect_response;

#[cfg(feature = "http-body")]
mod body {
    use bytes::{Bytes, BytesMut};
    use http_body::Body;

    use crate::transport::{HttpResponse, TransportError};

    /// A bare transport's response with its body read into memory: status, version and
    /// headers as they came, the body's bytes, no extensions (a client may keep the
    /// request URL there, which may carry credentials). A body longer than `limit`,
    /// declared (`Content-Length`, the body's size hint) or found while reading, is
    /// [`TransportError::TooLarge`], read no further; a read error is `error`'s.
    /// Feature `http-body`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tokenflight::adapter::{TransportError, collect_response};
    /// let response = http::Response::builder()
    ///     .status(200)
    ///     .body(http_body_util::Full::new(Bytes::from_static(b"{\"access_token\":\"t\"}")))
    ///     .unwrap();
    /// let never = |never: std::convert::Infallible| match never {};
    /// let read = futures::executor::block_on(collect_response(response, 1024, never)).unwrap();
    /// assert_eq!(read.body().as_ref(), b"{\"access_token\":\"t\"}");
    ///
    /// let long = http::Response::new(http_body_util::Full::new(Bytes::from(vec![b'x'; 11])));
    /// let read = futures::executor::block_on(collect_response(long, 10, never));
    /// assert!(matches!(read, Err(TransportError::TooLarge { limit: 10 })));
    /// ```
    pub async fn collect_response<B>(
        response: http::Response<B>,
        limit: usize,
        error: impl Fn(B::Error) -> TransportError,
    ) -> Result<HttpResponse, TransportError>
    where
        B: Body<Data = Bytes>,
    {
        let (mut parts, body) = response.into_parts();
        parts.extensions = http::Extensions::new();
        let too_large = TransportError::TooLarge { limit };
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
        if declared.is_some_and(|length| length > limit_u64) || body.size_hint().lower() > limit_u64
        {
            return Err(too_large);
        }
        let mut body = std::pin::pin!(body);
        let mut read = BytesMut::new();
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            let Ok(data) = frame.map_err(&error)?.into_data() else {
                continue; // trailers
            };
            if read.len().saturating_add(data.len()) > limit {
                return Err(too_large);
            }
            read.extend_from_slice(&data);
        }
        Ok(http::Response::from_parts(parts, read.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Extensions;

    use crate::adapter::RequestOptions;
    use crate::{ForceRefresh, SkipAuth, ValidFor};

    /// What an adapter that derives a deadline (reqwest's timeout) gets for a request.
    fn request_options(extensions: &Extensions, timeout: Option<Duration>) -> RequestOptions {
        RequestOptions::from_extensions(extensions).or_valid_for(timeout)
    }

    #[test]
    fn markers_switch_options_on() {
        let mut extensions = Extensions::new();
        assert_eq!(
            request_options(&extensions, None),
            RequestOptions::default()
        );
        extensions.insert(SkipAuth);
        assert_eq!(
            request_options(&extensions, None),
            RequestOptions::from_markers(true, false)
        );
        extensions.insert(ForceRefresh);
        assert_eq!(
            request_options(&extensions, None),
            RequestOptions::from_markers(true, true)
        );
    }

    #[test]
    fn c20_the_timeout_is_the_validity_unless_a_marker_says_otherwise() {
        let mut extensions = Extensions::new();
        let timeout = Some(Duration::from_secs(30));
        assert_eq!(request_options(&extensions, timeout).valid_for, timeout);
        extensions.insert(ValidFor(Duration::from_secs(5)));
        assert_eq!(
            request_options(&extensions, timeout).valid_for,
            Some(Duration::from_secs(5))
        );
    }
}
