//! What the auth policy needs from an HTTP client's request and response types.
//! Adapters implement these for their client; the core never names a client.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use url::Url;

pub use crate::error::InvalidHeader;

/// A request the auth policy can decorate and, maybe, send again.
pub trait AuthRequest: Sized + Send {
    /// The request's method (for the policy's skipped routes, [C11](crate#c11)).
    fn method(&self) -> http::Method;
    /// The request's URL (for the allowed-origin check, [C12](crate#c12)).
    fn url(&self) -> &Url;
    /// The request's URL, to add a query parameter (query placement).
    fn url_mut(&mut self) -> &mut Url;
    /// Where the request goes, as the client spells it. The origin checks
    /// ([C12](crate#c12)) read only this, so an adapter on the `http` crate returns
    /// its [`http::Uri`] here and builds [`url`](Self::url) only when it is asked for
    /// (a skipped route, a keyed token, query placement, a DPoP proof), after the
    /// origin check passed. Default: `url()`.
    fn origin(&self) -> RequestOrigin<'_> {
        RequestOrigin::Url(self.url())
    }
    /// The request's headers, for a client built on the `http` crate: with them, the
    /// two setters below need no implementation of their own (the token's header is
    /// inserted there, marked sensitive; the layer's shared value as a clone, a
    /// reference-count increment). A client with other header types returns `None`
    /// (the default) and implements [`set_sensitive_header`](Self::set_sensitive_header).
    fn header_map(&mut self) -> Option<&mut http::HeaderMap> {
        None
    }
    /// Sets header `name` to `value`, replacing earlier values, marked sensitive so
    /// clients and logs do not print it. `Err` if the value cannot be a header value.
    /// The default inserts it into [`header_map`](Self::header_map), and fails when
    /// there is none.
    fn set_sensitive_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        let (name, value) = crate::adapter::sensitive_header(name, value)?;
        self.header_map().ok_or(InvalidHeader)?.insert(name, value);
        Ok(())
    }
    /// Sets header `name` to a ready-made `value` (already marked sensitive),
    /// replacing earlier values. The layer builds the value once per token and hands
    /// the same one to every request. The default inserts a clone into
    /// [`header_map`](Self::header_map), or without one goes through
    /// [`AuthRequest::set_sensitive_header`].
    fn set_header_value(
        &mut self,
        name: &http::HeaderName,
        value: &http::HeaderValue,
    ) -> Result<(), InvalidHeader> {
        if let Some(headers) = self.header_map() {
            headers.insert(name.clone(), value.clone());
            return Ok(());
        }
        let text = value.to_str().map_err(|_| InvalidHeader)?;
        self.set_sensitive_header(name.as_str(), text)
    }
    /// A copy to resend, or `None` when the body cannot be replayed (a stream)
    /// ([C4](crate#c4)).
    fn try_clone(&self) -> Option<Self>;
}

/// A request's destination as its client holds it, for the origin checks
/// ([C12](crate#c12)); see [`AuthRequest::origin`].
///
/// A [`Uri`](RequestOrigin::Uri) is compared with the allowed origins without parsing
/// it as a URL: scheme, host and port (the scheme's default when none is given), the
/// domain case-insensitively. Only spellings the URL parser reads as they are count:
/// an IPv4 address in dotted decimal, an IPv6 address in brackets, a domain of
/// letters, digits, `-`, `_` and `.`. A host the URL parser would rewrite
/// (`0x7f.1`, `127.1`, percent-encoding) matches no allowed origin: the request gets
/// no token. A URI admitted this way always names an origin the URL parser agrees
/// with, so its [`AuthRequest::url`] can be built from it.
///
/// ```
/// use tokenflight::adapter::{AuthRequest, InvalidHeader, RequestOptions, RequestOrigin};
/// use tokenflight::{AuthPolicy, Token, from_fn};
/// // A client on the `http` crate: its request holds a `Uri`, and a URL only when asked.
/// struct Get(http::Uri, url::Url);
/// impl AuthRequest for Get {
///     fn method(&self) -> http::Method { http::Method::GET }
///     fn origin(&self) -> RequestOrigin<'_> { RequestOrigin::Uri(&self.0) }
///     fn url(&self) -> &url::Url { &self.1 }
///     fn url_mut(&mut self) -> &mut url::Url { &mut self.1 }
///     fn set_sensitive_header(&mut self, _: &str, _: &str) -> Result<(), InvalidHeader> { Ok(()) }
///     fn try_clone(&self) -> Option<Self> { None }
/// }
/// let get = |uri: &'static str| {
///     Get(http::Uri::from_static(uri), url::Url::parse("http://unused.invalid/").unwrap())
/// };
/// let policy = AuthPolicy::builder()
///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
///     .allowed_origin("http://127.0.0.1:8080")
///     .build()
///     .unwrap();
/// let plain = RequestOptions::default();
/// assert!(policy.attaches_token(&get("http://127.0.0.1:8080/v1"), &plain));
/// // The same address in a spelling only a URL parser reads as 127.0.0.1: no token.
/// assert!(!policy.attaches_token(&get("http://0x7f.1:8080/v1"), &plain));
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum RequestOrigin<'a> {
    /// The request's URL (its path and query are not read).
    Url(&'a Url),
    /// An absolute-form URI (`https://host:port/path`); a relative one (`/path`)
    /// names no origin and gets no token.
    Uri(&'a http::Uri),
}

/// The parts of a response that classification looks at.
pub trait ResponseView {
    /// The HTTP status code.
    fn status(&self) -> u16;
    /// The first value of header `name`, if it is valid text. Names are `http`'s, so
    /// a client built on the `http` crate looks them up as they are (no parse per
    /// response); others compare [`HeaderName::as_str`](http::HeaderName::as_str),
    /// always lower-case, with their own names case-insensitively.
    fn header(&self, name: &http::HeaderName) -> Option<&str>;
}

/// A response the auth policy can classify.
pub trait AuthResponse: ResponseView + Sized + Send {
    /// The URL this response came from, when the client may have followed redirects
    /// below the layer (reqwest does). A response from another origin than the request
    /// was sent to is not a verdict on the token (the token may never have reached it):
    /// it goes to the caller unclassified; so does one from a URL without the token's
    /// parameter, with query placement.
    ///
    /// The default, `None`, says the response comes from the request's URL.
    fn final_url(&self) -> Option<&Url> {
        None
    }

    /// Reads up to `limit` bytes of the body for a body classifier and hands back a
    /// response that is intact for the caller: the same status, headers and body bytes.
    /// The bytes are `None` when the body is longer than `limit` or could not be read.
    ///
    /// The default does not read and returns `None`.
    fn buffer_body(self, limit: usize) -> impl Future<Output = (Self, Option<Bytes>)> + Send {
        let _ = limit;
        async move { (self, None) }
    }
}

/// Per-request marker: send this request without credentials and do not classify its
/// response ([C11](crate#c11)). Put it in the request's extensions — the same in every
/// adapter:
///
/// - reqwest: `client.get(url).with_extension(SkipAuth)`
/// - surf: `request.set_ext(SkipAuth)`
/// - tower: `request.extensions_mut().insert(SkipAuth)`
///
/// Routes that never need a token (a login endpoint) can be exempted once for all
/// requests instead, with [`AuthPolicyBuilder::skip_route`](crate::AuthPolicyBuilder::skip_route).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkipAuth;

/// Per-request marker: refresh the token before sending this request
/// ([C11](crate#c11)). Put it in the request's extensions, like [`SkipAuth`]. When
/// both are present, [`SkipAuth`] wins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForceRefresh;

/// The key of a request's token in a keyed [`AuthPolicy`](crate::AuthPolicy): which
/// user, tenant or audience the request acts for.
///
/// A per-request marker like [`SkipAuth`]: put it in a request's extensions to
/// choose the token; without it, the policy's key function decides (by default the
/// request's origin, [`TokenKey::origin`]). Compared as a whole with `Eq`: two keys
/// share a token only if they are equal. Its value never appears in `Debug`, logs,
/// errors or metric labels.
///
/// ```
/// use tokenflight::keyed::TokenKey;
/// let key = TokenKey::new("tenant-42");
/// assert_eq!(key.as_str(), "tenant-42");
/// assert_eq!(format!("{key:?}"), "TokenKey(..)");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey(Arc<str>);

impl TokenKey {
    /// A key with this value (a user id, a tenant, an audience and scope).
    ///
    /// ```
    /// use tokenflight::keyed::TokenKey;
    /// let key = TokenKey::new("tenant-42");
    /// assert_eq!(key, TokenKey::new(String::from("tenant-42")));
    /// ```
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        TokenKey(value.into())
    }

    /// The key of `url`'s origin (`scheme://host:port`): one token per API a client
    /// talks to, the default key of a keyed policy.
    ///
    /// ```
    /// use tokenflight::keyed::TokenKey;
    /// let url = url::Url::parse("https://api.example.com:8443/v1/items?page=2").unwrap();
    /// assert_eq!(TokenKey::origin(&url).as_str(), "https://api.example.com:8443");
    /// ```
    pub fn origin(url: &url::Url) -> Self {
        TokenKey(url.origin().ascii_serialization().into())
    }

    /// The key's value.
    ///
    /// ```
    /// use tokenflight::keyed::TokenKey;
    /// assert_eq!(TokenKey::new("user-7").as_str(), "user-7");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are user data (user ids, e-mail addresses, tenants): never printed.
        f.write_str("TokenKey(..)")
    }
}

/// Per-request marker: the token this request is sent with must stay valid for at
/// least this long after it is sent — a large upload, a long poll, a server stream
/// with a deadline ([C20](crate#c20)). Put it in the request's extensions, like
/// [`SkipAuth`]; adapters also derive it where the client knows the deadline (a
/// per-request timeout in reqwest, `grpc-timeout` in the tower adapter), and the
/// marker wins over what they derive.
///
/// If the current token would expire before then (plus the leeway), the request waits
/// for the one refresh first (the same single flight, [C1](crate#c1), [C2](crate#c2)). A
/// token whose whole lifetime is shorter than asked cannot do better: the request gets
/// the freshest token and observers get
/// [`ShorterThanAsked`](crate::observe::ShorterThanAsked).
///
/// ```
/// use std::time::Duration;
/// use tokenflight::ValidFor;
/// use tokenflight::adapter::RequestOptions;
/// let mut extensions = http::Extensions::new();
/// extensions.insert(ValidFor(Duration::from_secs(90)));
/// let options = RequestOptions::from_extensions(&extensions);
/// assert_eq!(options.valid_for, Some(Duration::from_secs(90)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidFor(pub Duration);

/// The per-request options [`AuthPolicy::send`](crate::AuthPolicy::send) honours, read by
/// adapters from the [`SkipAuth`] and [`ForceRefresh`] markers in their request's
/// extensions (the one options mechanism of every adapter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestOptions {
    /// Send without credentials and do not classify.
    pub skip_auth: bool,
    /// Refresh before sending.
    pub force_refresh: bool,
    /// The key of the token to send, for a keyed policy (the [`TokenKey`] marker);
    /// `None`: the policy's key function decides.
    pub key: Option<TokenKey>,
    /// How long the token must stay valid after sending (the [`ValidFor`] marker, or
    /// what the adapter derived from the request's deadline); `None`: only now.
    pub valid_for: Option<Duration>,
}

impl RequestOptions {
    /// Options from the presence of the two markers.
    ///
    /// ```
    /// use tokenflight::adapter::RequestOptions;
    /// let options = RequestOptions::from_markers(true, false);
    /// assert!(options.skip_auth && !options.force_refresh);
    /// assert_eq!(RequestOptions::from_markers(false, false), RequestOptions::default());
    /// ```
    pub fn from_markers(skip_auth: bool, force_refresh: bool) -> Self {
        RequestOptions {
            skip_auth,
            force_refresh,
            key: None,
            valid_for: None,
        }
    }

    /// These options with the token key `key` (the [`TokenKey`] marker).
    ///
    /// ```
    /// use tokenflight::TokenKey;
    /// use tokenflight::adapter::RequestOptions;
    /// let options = RequestOptions::default().with_key(Some(TokenKey::new("tenant-42")));
    /// assert_eq!(options.key, Some(TokenKey::new("tenant-42")));
    /// ```
    pub fn with_key(mut self, key: Option<TokenKey>) -> Self {
        self.key = key;
        self
    }

    /// These options with the required validity `valid_for` (the [`ValidFor`]
    /// marker); `None` leaves them as they are.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenflight::adapter::RequestOptions;
    /// let options = RequestOptions::default().with_valid_for(Some(Duration::from_secs(5)));
    /// assert_eq!(options.valid_for, Some(Duration::from_secs(5)));
    /// ```
    pub fn with_valid_for(mut self, valid_for: Option<Duration>) -> Self {
        if valid_for.is_some() {
            self.valid_for = valid_for;
        }
        self
    }

    /// The options of a request whose extensions are `extensions` (every client built
    /// on the `http` crate keeps them in an `http::Extensions`): the [`SkipAuth`] and [`ForceRefresh`]
    /// markers, each of which switches its option on, and the [`TokenKey`] and
    /// [`ValidFor`] markers.
    ///
    /// ```
    /// use tokenflight::SkipAuth;
    /// use tokenflight::adapter::RequestOptions;
    /// let mut extensions = http::Extensions::new();
    /// extensions.insert(SkipAuth);
    /// let options = RequestOptions::from_extensions(&extensions);
    /// assert!(options.skip_auth && !options.force_refresh);
    /// ```
    ///
    /// A client whose extension map is not `http::Extensions` implements
    /// [`Markers`](crate::adapter::Markers) on a wrapper of its request.
    pub fn from_extensions<X: crate::adapter::Markers + ?Sized>(extensions: &X) -> Self {
        RequestOptions::from_markers(
            extensions.marker::<SkipAuth>().is_some(),
            extensions.marker::<ForceRefresh>().is_some(),
        )
        .with_key(extensions.marker::<TokenKey>())
        .with_valid_for(extensions.marker::<ValidFor>().map(|v| v.0))
    }
}
