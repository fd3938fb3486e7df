//! `http::Request` and `http::Response` seen through the core's `AuthRequest` and
//! `AuthResponse`.
//!
//! The core checks a request's origin on its `Uri` ([`RequestOrigin::Uri`]); the
//! `url::Url` is parsed only when something reads the path or query (a skipped route, a
//! keyed token, query placement, a DPoP proof), and written back only when the core
//! changed it (query placement).

use std::cell::OnceCell;
use std::sync::LazyLock;

use bytes::Bytes;
use http::Uri;
#[cfg(feature = "tower-http")]
use http_body_util::Empty;
#[cfg(test)]
use tokenflight::adapter::InvalidHeader;
use tokenflight::adapter::{AuthRequest, AuthResponse, RequestOrigin, ResponseView};
use url::Url;

use crate::body::{self, BufferedBody, ReplayBody, Wait};

/// The URL of an absolute-form request URI; `None` for a relative one (`/path`), which
/// names no origin, or one the URL parser refuses.
pub(crate) fn url_of(uri: &Uri) -> Option<Url> {
    uri.scheme()?;
    uri.authority()?;
    Url::parse(&uri.to_string()).ok()
}

/// Stands in for the URL of a URI the URL parser refuses. The core reads a request's URL
/// only after its origin check let it in, and it lets in only URIs whose URL parses, so
/// this is never read; were it, no route matches it and no request is sent to it
/// ([`Outgoing::into_request`]). `None` cannot be (a constant URL); the layer would then
/// send every request without a token.
pub(crate) static UNPARSED: LazyLock<Option<Url>> =
    LazyLock::new(|| Url::parse("http://unparsed.invalid/").ok());

/// How a request's body is produced again for the resend.
enum Replay<B: http_body::Body> {
    /// The body type copies cheaply.
    Copy,
    /// The whole body, read ahead, and how to make a `B` of it.
    Buffered(Bytes, fn(BufferedBody<B>) -> B),
    /// Not replayable (a stream, too large, or a type that can do neither).
    No,
}

/// A request on its way through the [`TokenService`](crate::TokenService).
pub(crate) struct Outgoing<B: http_body::Body> {
    parts: http::request::Parts,
    body: B,
    /// The full URL, built when first asked for (boxed: rarely built, and the request
    /// and its replay copy live in every request's future).
    url: OnceCell<Box<Url>>,
    /// [`UNPARSED`].
    unparsed: &'static Url,
    /// The URL once the core changed it (query placement), moved out of `url`.
    edited: Option<Box<Url>>,
    replay: Replay<B>,
}

/// A bodiless request with `method` to `uri`, to ask the policy about a request the
/// layer sent when only its method and URI are known (a redirect's first hop). `None`
/// only without the stand-in URL, as for `call()`.
#[cfg(feature = "tower-http")]
pub(crate) fn probe(method: &http::Method, uri: &Uri) -> Option<Outgoing<Empty<Bytes>>> {
    let mut request = http::Request::new(Empty::new());
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    UNPARSED
        .as_ref()
        .map(|unparsed| Outgoing::new(request, unparsed))
}

impl<B: ReplayBody> Outgoing<B> {
    /// Wraps `request`; its body is not replayable until [`Outgoing::keep_replayable`].
    pub(crate) fn new(request: http::Request<B>, unparsed: &'static Url) -> Self {
        let (parts, body) = request.into_parts();
        Outgoing {
            parts,
            body,
            url: OnceCell::new(),
            unparsed,
            edited: None,
            replay: Replay::No,
        }
    }

    /// With `read` (a limit), makes the body replayable if it can be: a body type that
    /// can hold a buffered body is read ahead (what is ready now, without waiting); any
    /// other is copied with `try_clone` when a resend needs it.
    pub(crate) fn keep_replayable(self, read: Option<usize>) -> Self {
        let (body, replay) = match (read, B::wrap_buffered()) {
            (None, _) => (self.body, Replay::No),
            // `try_clone` decides when (if) a copy is needed.
            (Some(_), None) => (self.body, Replay::Copy),
            (Some(limit), Some(wrap)) => {
                let (buffered, bytes) = body::read_ready(self.body, limit);
                let replay = match bytes {
                    Some(bytes) => Replay::Buffered(bytes, wrap),
                    None => Replay::No,
                };
                // The original when nothing was read (an empty stream not yet ready).
                let body = buffered.into_inner().unwrap_or_else(wrap);
                (body, replay)
            }
        };
        Outgoing {
            body,
            replay,
            ..self
        }
    }

    /// The request to send, with the URL the core may have changed.
    pub(crate) fn into_request(self) -> http::Request<B> {
        let mut parts = self.parts;
        let unparsed = self.unparsed.host();
        if let Some(url) = self.edited.filter(|url| url.host() != unparsed) {
            match Uri::try_from(url.as_str()) {
                Ok(uri) => parts.uri = uri,
                // `url` writes the query with form encoding, which `Uri` accepts; this
                // cannot happen, and if it did the request would go without the token
                // (the server rejects it; the token does not go anywhere it should not).
                Err(_) => tracing::debug!("the URL with the token is not a valid URI"),
            }
        }
        http::Request::from_parts(parts, self.body)
    }
}

impl<B: ReplayBody> AuthRequest for Outgoing<B> {
    fn method(&self) -> http::Method {
        self.parts.method.clone()
    }

    fn url(&self) -> &Url {
        match &self.edited {
            Some(url) => url,
            None => self
                .url
                .get_or_init(|| full_url(&self.parts.uri, self.unparsed)),
        }
    }

    fn origin(&self) -> RequestOrigin<'_> {
        RequestOrigin::Uri(&self.parts.uri)
    }

    fn url_mut(&mut self) -> &mut Url {
        let (uri, built) = (&self.parts.uri, self.url.take());
        let unparsed = self.unparsed;
        self.edited
            .get_or_insert_with(|| built.unwrap_or_else(|| full_url(uri, unparsed)))
    }

    fn header_map(&mut self) -> Option<&mut http::HeaderMap> {
        Some(&mut self.parts.headers)
    }

    fn try_clone(&self) -> Option<Self> {
        let (body, replay) = match &self.replay {
            Replay::Copy => (self.body.try_clone()?, Replay::Copy),
            Replay::Buffered(bytes, wrap) => (
                wrap(BufferedBody::from_bytes(bytes.clone())),
                Replay::Buffered(bytes.clone(), *wrap),
            ),
            Replay::No => return None,
        };
        Some(Outgoing {
            parts: copy_parts(&self.parts),
            body,
            // Parsed again if the copy is ever sent: most copies never are.
            url: OnceCell::new(),
            unparsed: self.unparsed,
            edited: self.edited.clone(),
            replay,
        })
    }
}

/// The URL of `uri` ([`url_of`]), or `unparsed` ([`UNPARSED`]).
fn full_url(uri: &Uri, unparsed: &Url) -> Box<Url> {
    Box::new(url_of(uri).unwrap_or_else(|| unparsed.clone()))
}

/// A copy of `parts`: `Parts::clone`, except that an empty header map stays as `new`
/// made it (a clone of an empty map that has room allocates its table; the replay copy
/// is taken before the token is attached, so many requests have no header yet; issue
/// 18).
fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut copy = http::Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.version_mut() = parts.version;
    if !parts.headers.is_empty() {
        *copy.headers_mut() = parts.headers.clone();
    }
    *copy.extensions_mut() = parts.extensions.clone();
    copy.into_parts().0
}

/// A response on its way back through the [`TokenService`](crate::TokenService).
pub(crate) struct Incoming<B: http_body::Body> {
    pub(crate) response: http::Response<BufferedBody<B>>,
    /// Where the response came from, when a redirect-following service below the layer
    /// says so (tower-http's `FollowRedirect`).
    final_url: Option<Box<Url>>,
}

impl<B: http_body::Body> Incoming<B> {
    pub(crate) fn new(response: http::Response<B>) -> Self {
        let final_url = final_url(&response);
        Incoming {
            response: response.map(BufferedBody::new),
            final_url,
        }
    }
}

#[cfg(feature = "tower-http")]
fn final_url<B>(response: &http::Response<B>) -> Option<Box<Url>> {
    let tower_http::follow_redirect::RequestUri(uri) = response.extensions().get()?;
    // A relative URI only follows a relative request, which carried no token.
    url_of(uri).map(Box::new)
}

/// Hides the query token in the `RequestUri` that tower-http's `FollowRedirect` (below
/// the layer) puts on a response: the URI of the last request it sent, which without
/// a redirect (or after a redirect whose `Location` repeats the query) is a request
/// the layer put the token in. The caller gets it with the token's value replaced by
/// `redacted`, the rest as it was, as reqwest's `Response::url()` ([C12](tokenflight#c12)).
/// A redacted URI that `http` would not take back is removed rather than shown.
#[cfg(feature = "tower-http")]
pub(crate) fn redact_request_uri<B>(
    response: &mut http::Response<B>,
    placement: &tokenflight::Placement,
) {
    use tower_http::follow_redirect::RequestUri;
    let extensions = response.extensions_mut();
    let Some(RequestUri(uri)) = extensions.get_mut::<RequestUri>() else {
        return;
    };
    let Some(redacted) = url_of(uri).and_then(|url| placement.redacted(&url)) else {
        return;
    };
    match Uri::try_from(redacted.as_str()) {
        Ok(redacted) => *uri = redacted,
        Err(_) => {
            extensions.remove::<RequestUri>();
        }
    }
}

#[cfg(not(feature = "tower-http"))]
fn final_url<B>(_response: &http::Response<B>) -> Option<Box<Url>> {
    None
}

impl<B: http_body::Body> ResponseView for Incoming<B> {
    fn status(&self) -> u16 {
        self.response.status().as_u16()
    }

    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        self.response.headers().get(name)?.to_str().ok()
    }
}

impl<B> AuthResponse for Incoming<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin,
    B::Error: Send,
{
    fn final_url(&self) -> Option<&Url> {
        self.final_url.as_deref()
    }

    async fn buffer_body(self, limit: usize) -> (Self, Option<Bytes>) {
        let (parts, body) = self.response.into_parts();
        // Only a body nothing was read from yet (always the case: one classification
        // per response) can be read here.
        let (body, bytes) = match body.into_inner() {
            Ok(body) => body::read_ahead(body, limit, Wait::Yes).await,
            Err(body) => (body, None),
        };
        let response = http::Response::from_parts(parts, body);
        (Incoming { response, ..self }, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full};

    fn post<B>(body: B) -> http::Request<B> {
        http::Request::post("http://127.0.0.1:1/api/x?a=1")
            .body(body)
            .unwrap()
    }

    fn unparsed() -> &'static Url {
        UNPARSED.as_ref().unwrap()
    }

    #[test]
    fn only_absolute_uris_have_a_url() {
        assert!(url_of(&Uri::from_static("/pkg.Service/Method")).is_none());
        assert_eq!(
            url_of(&Uri::from_static("https://api.example.com:8443/x?y=1"))
                .unwrap()
                .as_str(),
            "https://api.example.com:8443/x?y=1"
        );
        assert!(UNPARSED.as_ref().is_some_and(|url| url.host().is_some()));
    }

    /// The replay copy's parts are `Parts::clone`'s: method, URI, version, headers and
    /// extensions, with and without headers.
    #[test]
    fn copied_parts_agree_with_a_clone() {
        #[derive(Clone, Debug, PartialEq)]
        struct Marker(u8);
        let with_headers = http::Request::put("https://api.test:8443/a/b?c=d")
            .version(http::Version::HTTP_2)
            .header("x-one", "1")
            .header("x-two", "2")
            .extension(Marker(7))
            .body(())
            .unwrap();
        let bare = http::Request::get("http://api.test/").body(()).unwrap();
        for request in [with_headers, bare] {
            let (parts, ()) = request.into_parts();
            let (copy, clone) = (copy_parts(&parts), parts.clone());
            assert_eq!(copy.method, clone.method);
            assert_eq!(copy.uri, clone.uri);
            assert_eq!(copy.version, clone.version);
            assert_eq!(copy.headers, clone.headers);
            assert_eq!(
                copy.extensions.get::<Marker>(),
                clone.extensions.get::<Marker>()
            );
        }
    }

    #[tokio::test]
    async fn full_bodies_are_copied_not_read() {
        let request = Outgoing::new(post(Full::new(Bytes::from_static(b"payload"))), unparsed())
            .keep_replayable(Some(0));
        let copy = request.try_clone().expect("replayable");
        for r in [request, copy] {
            let body = r.into_request().into_body().collect().await.unwrap();
            assert_eq!(body.to_bytes(), "payload");
        }
    }

    #[tokio::test]
    async fn boxed_bodies_are_replayed_within_the_limit_only() {
        let boxed = || {
            Full::new(Bytes::from_static(b"0123456789"))
                .map_err(|never| match never {})
                .boxed()
        };
        let fits: Outgoing<BoxBody<Bytes, std::io::Error>> =
            Outgoing::new(post(boxed()), unparsed()).keep_replayable(Some(10));
        let copy = fits.try_clone().expect("fits the limit");
        for r in [fits, copy] {
            let body = r.into_request().into_body().collect().await.unwrap();
            assert_eq!(body.to_bytes(), "0123456789");
        }
        let too_large = Outgoing::new(post(boxed()), unparsed()).keep_replayable(Some(9));
        assert!(too_large.try_clone().is_none());
        let body = too_large
            .into_request()
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            body.to_bytes(),
            "0123456789",
            "intact although not replayable"
        );
    }

    #[tokio::test]
    async fn query_placement_reaches_the_uri_and_headers_are_sensitive() {
        let mut request = Outgoing::new(post(String::new()), unparsed()).keep_replayable(Some(0));
        request
            .url_mut()
            .query_pairs_mut()
            .append_pair("token", "s3cr+t");
        request
            .set_sensitive_header("authorization", "Bearer s")
            .unwrap();
        assert_eq!(
            request.set_sensitive_header("authorization", "Bearer a\r\nx-evil: 1"),
            Err(InvalidHeader)
        );
        let sent = request.into_request();
        assert_eq!(sent.uri().query(), Some("a=1&token=s3cr%2Bt"));
        assert!(sent.headers()["authorization"].is_sensitive());
    }
}
