//! Where the token goes (placement), who may receive it (allowed origins), and how a
//! response says "token rejected" (classification).

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use url::{Origin, Url};

use crate::error::ConfigError;
use crate::request::{
    AuthRequest, AuthResponse, InvalidHeader, RequestOptions, RequestOrigin, ResponseView,
};
use crate::token::Token;
use crate::www_authenticate::{BearerError, bearer_error};

/// What a policy decides besides the token itself: where it goes, who may receive it,
/// which routes go without it and what counts as a rejection. The retry driver asks
/// these questions and does what the answers say; it reads no rule itself.
pub(crate) struct Rules {
    pub(crate) placement: Placement,
    pub(crate) origins: AllowedOrigins,
    pub(crate) classifier: Classifier,
    pub(crate) skip: SkipRoutes,
    /// The token's header value, built once per token and shared by all requests.
    header: HeaderCache,
    /// With DPoP: the key every request proves possession of, and the nonces.
    #[cfg(feature = "dpop")]
    pub(crate) dpop: Option<crate::dpop::Dpop>,
}

/// The verdict of a response's head on the token a request carried.
pub(crate) enum Head {
    /// The token stands: return the response as it is.
    Clears,
    /// The token was rejected.
    Rejects,
    /// The body rule decides: read at most `limit` bytes and ask `predicate`.
    ReadBody {
        limit: usize,
        predicate: BodyPredicate,
    },
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("placement", &self.placement)
            .field("origins", &self.origins)
            .field("skip", &self.skip)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl Rules {
    pub(crate) fn new(
        placement: Placement,
        origins: AllowedOrigins,
        classifier: Classifier,
        skip: SkipRoutes,
    ) -> Self {
        Rules {
            header: HeaderCache::new(&placement),
            placement,
            origins,
            classifier,
            skip,
            #[cfg(feature = "dpop")]
            dpop: None,
        }
    }

    /// Where a request goes if it is to carry a token ([C11](crate#c11),
    /// [C12](crate#c12)); `None`: it goes as it is and its response is not classified.
    pub(crate) fn admit<R: AuthRequest>(
        &self,
        request: &R,
        options: &RequestOptions,
    ) -> Option<SentTo> {
        self.admission(request, options).map(Admission::sent_to)
    }

    /// Whether `send` puts a token on `request` with `options` ([`Rules::admit`]
    /// without keeping where it goes).
    pub(crate) fn admits<R: AuthRequest>(&self, request: &R, options: &RequestOptions) -> bool {
        self.admission(request, options).is_some()
    }

    fn admission<'r, R: AuthRequest>(
        &self,
        request: &'r R,
        options: &RequestOptions,
    ) -> Option<Admission<'r>> {
        if options.skip_auth {
            return None;
        }
        // The origin first: only a request that may carry the token has its full URL
        // read (for a skipped route), and only an admitted `Uri` surely has one.
        let admission = self.origins.admission(request.origin())?;
        (!self.skip.skips_request(request)).then_some(admission)
    }

    /// A copy to resend, only if a response can reject the token at all. Taken before
    /// the token is attached: the copy gets the newer token if it is ever sent.
    pub(crate) fn replay_copy<R: AuthRequest>(&self, request: &R) -> Option<R> {
        if self.classifier.can_reject() {
            request.try_clone()
        } else {
            None
        }
    }

    /// Puts `token` on `request`; with a header placement through the shared value.
    pub(crate) fn attach<R: AuthRequest>(
        &self,
        request: &mut R,
        token: &Arc<Token>,
    ) -> Result<(), InvalidHeader> {
        self.attach_with_nonce(request, token, None)
    }

    /// Puts `token` on `request` for the resend that answers a nonce demand: the proof
    /// carries the demand's `nonce`. Not the cache's: a response to another request of
    /// the origin, with an older nonce, may have landed there since the demand.
    #[cfg(feature = "dpop")]
    pub(crate) fn attach_after_demand<R: AuthRequest>(
        &self,
        request: &mut R,
        token: &Arc<Token>,
        nonce: &str,
    ) -> Result<(), InvalidHeader> {
        self.attach_with_nonce(request, token, Some(nonce))
    }

    /// `demanded`: the nonce a demand gave, for its resend; `None`: the origin's cached
    /// one (only DPoP proofs carry a nonce).
    fn attach_with_nonce<R: AuthRequest>(
        &self,
        request: &mut R,
        token: &Arc<Token>,
        demanded: Option<&str>,
    ) -> Result<(), InvalidHeader> {
        self.placement.attach_cached(&self.header, request, token)?;
        // With DPoP, a new proof for this send of this request with this token (a
        // resend gets its own): `htm`, `htu`, `ath` and the nonce.
        #[cfg(feature = "dpop")]
        if let Some(dpop) = &self.dpop {
            let (method, at) = (request.method(), Some(token.access().expose()));
            let proof = match demanded {
                Some(nonce) => dpop.proof_with_nonce(&method, request.url(), at, nonce),
                None => dpop.proof(&method, request.url(), at),
            }
            .map_err(|_| InvalidHeader)?;
            request.set_sensitive_header(crate::dpop::DPOP.as_str(), proof.expose())?;
        }
        #[cfg(not(feature = "dpop"))]
        let _ = demanded;
        Ok(())
    }

    /// With DPoP: records the response's `DPoP-Nonce` for the origin of `sent` (the
    /// request's URL; a request without a copy to resend has none here) and says
    /// whether the response demands a nonce (a resend with a new proof cures it, not a
    /// refresh).
    #[cfg(feature = "dpop")]
    pub(crate) fn dpop_nonce_demanded<Resp: AuthResponse>(
        &self,
        response: &Resp,
        sent: Option<&Url>,
    ) -> Option<Arc<str>> {
        match (&self.dpop, sent) {
            (Some(dpop), Some(url)) => dpop.observe_resource(url, response),
            _ => None,
        }
    }

    /// The URL of `replay` when DPoP needs it (for the nonce of its origin); without
    /// DPoP it is not built.
    #[cfg(feature = "dpop")]
    pub(crate) fn dpop_url<'r, R: AuthRequest>(&self, replay: Option<&'r R>) -> Option<&'r Url> {
        self.dpop.as_ref().and(replay).map(AuthRequest::url)
    }

    /// The verdict of `response`'s head on the token of a request sent to `sent_to`
    /// (`None`: a caller that classifies outside the driver, from the request's URL).
    /// A response from where the token did not go (a redirect to another origin, or a
    /// hop without the query token) is not about the token: it clears
    /// ([C4](crate#c4), [C12](crate#c12)).
    pub(crate) fn head<Resp: AuthResponse>(
        &self,
        response: &Resp,
        sent_to: Option<&SentTo>,
    ) -> Head {
        if let (Some(sent_to), Some(url)) = (sent_to, response.final_url()) {
            if !sent_to.is_origin_of(&self.origins, url) || !self.placement.may_carry_token(url) {
                tracing::debug!(
                    "the response comes from where the token did not go; not classified"
                );
                return Head::Clears;
            }
        }
        if self.classifier.head_rejects(response) {
            return Head::Rejects;
        }
        match self.classifier.body_rule_for(response) {
            None => Head::Clears,
            Some((limit, predicate)) => Head::ReadBody {
                limit,
                predicate: Arc::clone(predicate),
            },
        }
    }

    /// Classifies `response` by `head` (reading the body if it says so); returns it
    /// intact with the verdict (`true`: the token was rejected).
    pub(crate) async fn classify<Resp: AuthResponse>(response: Resp, head: Head) -> (Resp, bool) {
        match head {
            Head::Clears => (response, false),
            Head::Rejects => (response, true),
            Head::ReadBody { limit, predicate } => {
                let (response, body) = response.buffer_body(limit).await;
                let rejected = body.is_some_and(|bytes| predicate(&bytes));
                (response, rejected)
            }
        }
    }
}

/// Where the access token is put on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// A header, optionally with a scheme prefix: `Authorization: Bearer <token>` by
    /// default.
    Header {
        /// Header name.
        name: String,
        /// Scheme written before the token, if any.
        scheme: Option<String>,
    },
    /// A query parameter (`?token=<token>`), for APIs that want it. Leakier than a
    /// header: URLs end up in logs, proxies and `Referer` headers, and a redirect keeps
    /// the query. Prefer a header where the API allows.
    ///
    /// The pair `param=<token>` (form-encoded) is added to the request's query and
    /// every other byte of the query is left as the caller wrote it: flags keep having
    /// no `=`, percent-escapes are not re-encoded, order is kept, so a signed URL stays
    /// valid. Pairs already named `param` (compared after decoding, as a server reads
    /// them) are the caller's stale token: the first is replaced in place by the token
    /// pair and the others are dropped; nothing else moves. The adapters keep the token
    /// out of the errors and response URLs they hand back ([`Placement::redacted`]) and
    /// out of `Referer` headers on redirects (see each adapter's docs).
    Query {
        /// Parameter name.
        param: String,
    },
}

/// The header a layer puts on its requests, built once per token. Holds the secret:
/// never printed.
pub(crate) struct HeaderCache {
    /// The header's name, parsed once; `None` for query placement (no cache).
    name: Option<http::HeaderName>,
    scheme: Option<String>,
    value: ArcSwapOption<CachedHeader>,
}

struct CachedHeader {
    /// The token the value was built from (compared by pointer: one published token,
    /// one value).
    token: Arc<Token>,
    value: http::HeaderValue,
}

impl HeaderCache {
    pub(crate) fn new(placement: &Placement) -> Self {
        let (name, scheme) = match placement {
            Placement::Header { name, scheme } => (
                http::HeaderName::from_bytes(name.as_bytes()).ok(),
                scheme.clone(),
            ),
            Placement::Query { .. } => (None, None),
        };
        HeaderCache {
            name,
            scheme,
            value: ArcSwapOption::empty(),
        }
    }
}

impl Default for Placement {
    fn default() -> Self {
        Placement::bearer()
    }
}

impl Placement {
    /// `Authorization: Bearer <token>`.
    ///
    /// ```
    /// use tokenflight::Placement;
    /// assert_eq!(Placement::bearer(), Placement::header("authorization", Some("Bearer")));
    /// assert_eq!(Placement::default(), Placement::bearer());
    /// ```
    pub fn bearer() -> Self {
        Placement::Header {
            name: "authorization".into(),
            scheme: Some("Bearer".into()),
        }
    }

    /// A custom header, with an optional scheme: `Placement::header("x-api-key", None)`.
    /// Checked when the policy is built ([`ConfigError::InvalidPlacement`]).
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, ConfigError, Placement, Token, from_fn};
    /// # let source = || from_fn(|_cx| async { Ok(Token::new("t")) });
    /// let api_key = Placement::header("x-api-key", None);
    /// let policy = AuthPolicy::builder().source(source()).placement(api_key).allow_any_origin().build();
    /// assert!(policy.is_ok());
    /// let bad = Placement::header("not a header", None);
    /// let refused = AuthPolicy::builder().source(source()).placement(bad).allow_any_origin().build();
    /// assert!(matches!(refused, Err(ConfigError::InvalidPlacement(_))));
    /// ```
    pub fn header(name: impl Into<String>, scheme: Option<&str>) -> Self {
        Placement::Header {
            name: name.into(),
            scheme: scheme.map(str::to_owned),
        }
    }

    /// A query parameter: `Placement::query("access_token")`. Leakier than a header
    /// (see [`Placement::Query`]). Checked when the policy is built
    /// ([`ConfigError::InvalidPlacement`]).
    ///
    /// ```
    /// use tokenflight::Placement;
    /// let query = Placement::query("access_token");
    /// let url = url::Url::parse("https://api.example.com/v1?access_token=s3cr3t&page=2").unwrap();
    /// assert!(!query.redacted(&url).unwrap().as_str().contains("s3cr3t"));
    /// ```
    pub fn query(param: impl Into<String>) -> Self {
        Placement::Query {
            param: param.into(),
        }
    }

    /// Whether the placement can work: a valid header name and scheme, a non-empty
    /// parameter.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        match self {
            Placement::Header { name, scheme } => {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(ConfigError::InvalidPlacement(format!(
                        "{name:?} is not a header name"
                    )));
                }
                if let Some(scheme) = scheme {
                    if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(ConfigError::InvalidPlacement(format!(
                            "{scheme:?} is not an auth scheme"
                        )));
                    }
                }
                Ok(())
            }
            Placement::Query { param } if param.is_empty() => Err(ConfigError::InvalidPlacement(
                "empty query parameter".into(),
            )),
            Placement::Query { .. } => Ok(()),
        }
    }

    /// Puts `token` on `request`.
    pub(crate) fn attach<R: AuthRequest>(
        &self,
        request: &mut R,
        token: &Token,
    ) -> Result<(), InvalidHeader> {
        let secret = token.access().expose();
        match self {
            Placement::Header { name, scheme: None } => request.set_sensitive_header(name, secret),
            Placement::Header {
                name,
                scheme: Some(scheme),
            } => {
                let mut value = String::with_capacity(scheme.len() + 1 + secret.len());
                value.push_str(scheme);
                value.push(' ');
                value.push_str(secret);
                request.set_sensitive_header(name, &value)
            }
            Placement::Query { param } => {
                let url = request.url_mut();
                let query = with_pair(url.query(), param, secret);
                url.set_query(Some(&query));
                Ok(())
            }
        }
    }

    /// Puts `token` on `request` through `cache`: with a header placement the value is
    /// built once per token and shared by every request that carries it.
    pub(crate) fn attach_cached<R: AuthRequest>(
        &self,
        cache: &HeaderCache,
        request: &mut R,
        token: &Arc<Token>,
    ) -> Result<(), InvalidHeader> {
        let Some(name) = &cache.name else {
            return self.attach(request, token);
        };
        if let Some(cached) = cache.value.load().as_ref() {
            if Arc::ptr_eq(&cached.token, token) {
                return request.set_header_value(name, &cached.value);
            }
        }
        let secret = token.access().expose();
        let text = match &cache.scheme {
            Some(scheme) => {
                let mut value = String::with_capacity(scheme.len() + 1 + secret.len());
                value.push_str(scheme);
                value.push(' ');
                value.push_str(secret);
                value
            }
            None => secret.to_owned(),
        };
        let mut value = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
            .map_err(|_| InvalidHeader)?;
        value.set_sensitive(true);
        let result = request.set_header_value(name, &value);
        // Racing builders of the same token store equal values: either one serves.
        cache.value.store(Some(Arc::new(CachedHeader {
            token: Arc::clone(token),
            value,
        })));
        result
    }

    /// Whether a request to `url` can have carried the token: with a header placement,
    /// yes (the client decides which hops keep headers); with query placement, only if
    /// `url` has the parameter. A redirect's `Location` does not repeat our query, so
    /// the hop it leads to got no token.
    pub(crate) fn may_carry_token(&self, url: &Url) -> bool {
        match self {
            Placement::Header { .. } => true,
            Placement::Query { param } => url
                .query()
                .is_some_and(|query| query.split('&').any(|piece| names(piece, param))),
        }
    }

    /// Whether the token a request carried goes along on a redirect hop from `previous`
    /// to `next`, when the HTTP client follows redirects by itself, below the policy, the
    /// way reqwest and tower-http's standard `FollowRedirect` policy do: the first
    /// request's headers are put back on every hop, `Authorization` is dropped only on
    /// a hop that itself changes origin, and a hop goes to its `Location` as it is.
    ///
    /// - `Authorization` travels on every hop that stays on `previous`'s origin —
    ///   including the second hop of A → B → B, inside an origin the token may not go to;
    /// - any other header travels on every hop;
    /// - a query token travels when `next` has the parameter (a `Location` that repeats
    ///   the query) and, if the client sends the previous URL as `Referer`
    ///   (`sends_referer`: reqwest does, tower-http does not), when `previous` has it.
    ///
    /// For adapters' redirect hooks, together with
    /// [`AuthPolicy::token_may_follow`](crate::AuthPolicy::token_may_follow): a hop that
    /// carries the token where it may not go is not followed. A client that sends every
    /// hop through the policy needs neither.
    ///
    /// ```
    /// use tokenflight::Placement;
    /// let url = |s: &str| url::Url::parse(s).unwrap();
    /// let (a, b) = (url("https://a.example/x"), url("https://b.example/y"));
    /// // Dropped on the hop that changes origin, back on the next one inside it.
    /// assert!(!Placement::bearer().travels_on_redirect(&a, &b, false));
    /// assert!(Placement::bearer().travels_on_redirect(&b, &url("https://b.example/z"), false));
    /// // Another header is never dropped.
    /// assert!(Placement::header("x-api-key", None).travels_on_redirect(&a, &b, false));
    /// // A query token: in the next URL, or in the `Referer` the client sends.
    /// let query = Placement::query("token");
    /// let from = url("https://a.example/x?token=t");
    /// assert!(!query.travels_on_redirect(&from, &b, false));
    /// assert!(query.travels_on_redirect(&from, &b, true));
    /// assert!(query.travels_on_redirect(&a, &url("https://b.example/y?token=t"), false));
    /// ```
    pub fn travels_on_redirect(&self, previous: &Url, next: &Url, sends_referer: bool) -> bool {
        match self {
            Placement::Header { name, .. } if name.eq_ignore_ascii_case("authorization") => {
                previous.scheme() == next.scheme()
                    && previous.host_str() == next.host_str()
                    && previous.port_or_known_default() == next.port_or_known_default()
            }
            Placement::Header { .. } => true,
            Placement::Query { .. } => {
                self.may_carry_token(next) || (sends_referer && self.may_carry_token(previous))
            }
        }
    }

    /// `url` with the value of the token's query parameter replaced by `redacted`, for
    /// errors and URLs shown to people; `None` when there is nothing to hide (a header
    /// placement, or no such parameter in `url`). Every other byte stays as it is.
    ///
    /// ```
    /// use tokenflight::Placement;
    /// let query = Placement::query("token");
    /// let url = url::Url::parse("https://api.example.com/v1?page=2&token=s3cr3t").unwrap();
    /// let shown = query.redacted(&url).unwrap();
    /// assert!(!shown.as_str().contains("s3cr3t"));
    /// assert!(shown.as_str().starts_with("https://api.example.com/v1?page=2&token="));
    /// // Nothing to hide: no token parameter, or a header placement.
    /// assert!(query.redacted(&url::Url::parse("https://api.example.com/v1").unwrap()).is_none());
    /// assert!(Placement::bearer().redacted(&url).is_none());
    /// ```
    pub fn redacted(&self, url: &Url) -> Option<Url> {
        let Placement::Query { param } = self else {
            return None;
        };
        let query = url.query()?;
        if !query.split('&').any(|piece| names(piece, param)) {
            return None;
        }
        let mut redacted = url.clone();
        redacted.set_query(Some(&with_pair(Some(query), param, REDACTED)));
        Some(redacted)
    }

    /// `text` (an error message, say) with every occurrence of the token that went out
    /// in `sent`'s query replaced by `redacted`, as it appears in a URL and decoded;
    /// `None` when `text` shows no such token (or the placement is a header). For errors
    /// of other code that print the request URL in ways [`redacted`](Self::redacted)
    /// cannot reach.
    ///
    /// ```
    /// use tokenflight::Placement;
    /// let query = Placement::query("token");
    /// let sent = url::Url::parse("https://api.example.com/v1?token=s3cr3t").unwrap();
    /// let message = "error sending request for url (https://api.example.com/v1?token=s3cr3t)";
    /// let scrubbed = query.scrub(&sent, message).unwrap();
    /// assert!(!scrubbed.contains("s3cr3t"));
    /// assert!(query.scrub(&sent, "connection refused").is_none());
    /// ```
    pub fn scrub(&self, sent: &Url, text: &str) -> Option<String> {
        let Placement::Query { param } = self else {
            return None;
        };
        let mut scrubbed = None::<String>;
        for (key, value) in sent.query_pairs() {
            if key != param.as_str() || value.is_empty() {
                continue;
            }
            let encoded: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
            for shown in [value.as_ref(), encoded.as_str()] {
                let current = scrubbed.as_deref().unwrap_or(text);
                if current.contains(shown) {
                    scrubbed = Some(current.replace(shown, REDACTED));
                }
            }
        }
        scrubbed
    }
}

/// What [`Placement::redacted`] writes instead of the token.
const REDACTED: &str = "redacted";

/// `query` with `name=value` (form-encoded) in place of the first pair named `name`,
/// other pairs of that name dropped, or appended; every other byte of `query` as it
/// was. Splitting on `&` and comparing decoded names is how servers read a query
/// (`application/x-www-form-urlencoded`); re-serialising the pairs instead would add
/// `=` to flags and re-encode escapes, breaking signed URLs.
fn with_pair(query: Option<&str>, name: &str, value: &str) -> String {
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}={}", encode(name), encode(value));
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return pair;
    };
    let mut out = String::with_capacity(query.len() + 1 + pair.len());
    let mut placed = false;
    let mut first = true;
    for piece in query.split('&') {
        let piece = if names(piece, name) {
            if placed {
                continue;
            }
            placed = true;
            pair.as_str()
        } else {
            piece
        };
        if !first {
            out.push('&');
        }
        first = false;
        out.push_str(piece);
    }
    if !placed {
        // `a=1&` stays `a=1&`, followed by the pair, not by a second `&`.
        if !out.is_empty() && !out.ends_with('&') {
            out.push('&');
        }
        out.push_str(&pair);
    }
    out
}

/// Whether the query piece `piece` (`key`, `key=value`) is named `name` once decoded.
fn names(piece: &str, name: &str) -> bool {
    url::form_urlencoded::parse(piece.as_bytes())
        .next()
        .is_some_and(|(key, _)| key == name)
}

/// Which origins may receive the token ([C12](crate#c12)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AllowedOrigins {
    /// Only these origins (scheme, host and port must match).
    List(Vec<Origin>),
    /// Every origin: an explicit opt-in.
    Any,
}

impl AllowedOrigins {
    /// Parses `scheme://host[:port]` (a path is ignored).
    pub(crate) fn parse_origin(origin: &str) -> Result<Origin, ConfigError> {
        let url = Url::parse(origin).map_err(|_| ConfigError::InvalidOrigin(origin.to_owned()))?;
        match url.origin() {
            tuple @ Origin::Tuple(..) => Ok(tuple),
            Origin::Opaque(_) => Err(ConfigError::InvalidOrigin(origin.to_owned())),
        }
    }

    /// True when a request to `url` may carry the token.
    pub(crate) fn allows(&self, url: &Url) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::List(origins) => origins.iter().any(|o| same_origin(o, url)),
        }
    }

    /// Whether a request to `origin` may carry the token, and how it was let in.
    pub(crate) fn admission<'a>(&self, origin: RequestOrigin<'a>) -> Option<Admission<'a>> {
        let uri = match origin {
            RequestOrigin::Url(url) => {
                return match self {
                    AllowedOrigins::Any => Some(Admission::Url(url)),
                    AllowedOrigins::List(origins) => origins
                        .iter()
                        .position(|o| same_origin(o, url))
                        .map(Admission::Listed),
                };
            }
            RequestOrigin::Uri(uri) => uri,
        };
        let (scheme, authority) = (uri.scheme()?, uri.authority()?);
        let at = UriOrigin::split(scheme.as_str(), authority.as_str());
        match (self, at) {
            (AllowedOrigins::List(origins), Some(at)) => {
                origins.iter().position(|o| at.is(o)).map(Admission::Listed)
            }
            (AllowedOrigins::List(_), None) => None,
            (AllowedOrigins::Any, Some(at)) if at.is_plain() => {
                Some(Admission::Uri(scheme, authority))
            }
            // A spelling the URL parser may rewrite (an IDN, `0x7f.1`): its URL decides,
            // as for a client with URLs; one it refuses names no origin.
            (AllowedOrigins::Any, _) => Url::parse(&format!("{scheme}://{authority}"))
                .ok()
                .map(|url| Admission::Parsed(url.origin())),
        }
    }
}

/// How [`AllowedOrigins::admission`] let a request in.
#[derive(Debug)]
pub(crate) enum Admission<'a> {
    /// By the allowed origin at this place in the list.
    Listed(usize),
    /// Any origin is allowed: the request's URL.
    Url(&'a Url),
    /// Any origin is allowed: the request's URI, in a plain spelling.
    Uri(&'a http::uri::Scheme, &'a http::uri::Authority),
    /// Any origin is allowed: the request URI's origin, parsed.
    Parsed(Origin),
}

impl Admission<'_> {
    /// Where the request (and its token) goes: the listed origin (by its place in the
    /// list: no allocation per request, and the answer borrows nothing, so a request's
    /// future can keep it), or with [`AllowedOrigins::Any`] the request's own.
    fn sent_to(self) -> SentTo {
        match self {
            Admission::Listed(at) => SentTo::Listed(at),
            Admission::Url(url) => SentTo::Built(url.origin()),
            Admission::Uri(scheme, authority) => SentTo::Uri(scheme.clone(), authority.clone()),
            Admission::Parsed(origin) => SentTo::Built(origin),
        }
    }
}

/// The origin a request (and its token) went to; see [`Admission::sent_to`].
#[derive(Debug)]
pub(crate) enum SentTo {
    /// The allowed origin at this place in the list.
    Listed(usize),
    /// Any origin is allowed: the request URL's own.
    Built(Origin),
    /// Any origin is allowed: the request URI's own, in a plain spelling
    /// ([`UriOrigin::is_plain`]).
    Uri(http::uri::Scheme, http::uri::Authority),
}

impl SentTo {
    /// Whether `url` has this origin (`origins`: the list that admitted the request).
    pub(crate) fn is_origin_of(&self, origins: &AllowedOrigins, url: &Url) -> bool {
        match (self, origins) {
            (SentTo::Listed(at), AllowedOrigins::List(list)) => {
                list.get(*at).is_some_and(|origin| same_origin(origin, url))
            }
            (SentTo::Built(origin), _) => url.origin() == *origin,
            (SentTo::Uri(scheme, authority), _) => {
                UriOrigin::split(scheme.as_str(), authority.as_str())
                    .is_some_and(|at| at.is_at(url))
            }
            // Admitted by another list than this one: not the same origin.
            (SentTo::Listed(_), AllowedOrigins::Any) => false,
        }
    }
}

/// `url.origin() == *origin`, without building `url`'s origin (which allocates its
/// scheme and host) for the schemes requests use; other schemes take the exact way.
fn same_origin(origin: &Origin, url: &Url) -> bool {
    let Origin::Tuple(scheme, host, port) = origin else {
        // An opaque origin equals no URL's origin (each one is unique).
        return false;
    };
    if !matches!(url.scheme(), "http" | "https" | "ws" | "wss") {
        return url.origin() == *origin;
    }
    // For these schemes `Url::origin` is (scheme, host, port or the scheme's default).
    url.scheme() == scheme
        && url.port_or_known_default() == Some(*port)
        && url.host().is_some_and(|h| match (h, host) {
            (url::Host::Domain(a), url::Host::Domain(b)) => a == b,
            (url::Host::Ipv4(a), url::Host::Ipv4(b)) => a == *b,
            (url::Host::Ipv6(a), url::Host::Ipv6(b)) => a == *b,
            _ => false,
        })
}

/// A URI's scheme, host and port, read from the text as `http` keeps it, without the
/// URL parser; only spellings the URL parser reads as they are (see [`RequestOrigin`]).
#[derive(Debug, Clone, Copy)]
struct UriOrigin<'a> {
    scheme: &'a str,
    host: UriHost<'a>,
    port: u16,
}

#[derive(Debug, Clone, Copy)]
enum UriHost<'a> {
    /// Letters, digits, `-`, `_` and `.`, not ending in a label the URL parser takes
    /// for a number (it would read the host as an IPv4 address).
    Domain(&'a str),
    Ipv4(std::net::Ipv4Addr),
    Ipv6(std::net::Ipv6Addr),
}

impl<'a> UriOrigin<'a> {
    /// `None`: a scheme without a tuple origin, or a host or port in a spelling the URL
    /// parser may read otherwise (those fail closed: no token).
    fn split(scheme: &'a str, authority: &'a str) -> Option<Self> {
        let default = match scheme {
            "http" | "ws" => 80,
            "https" | "wss" => 443,
            _ => return None,
        };
        // The host follows the last `@`, for the URL parser too.
        let host_port = authority.rsplit('@').next()?;
        let (host, port) = match host_port.strip_prefix('[') {
            Some(bracketed) => {
                let (address, rest) = bracketed.split_once(']')?;
                let port = match rest {
                    "" => None,
                    rest => Some(rest.strip_prefix(':')?),
                };
                (UriHost::Ipv6(address.parse().ok()?), port)
            }
            None => {
                let (host, port) = match host_port.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (host_port, None),
                };
                (UriHost::parse(host)?, port)
            }
        };
        let port = match port {
            None | Some("") => default,
            Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().ok()?,
            Some(_) => return None,
        };
        Some(UriOrigin { scheme, host, port })
    }

    /// Whether this is the allowed `origin`.
    fn is(&self, origin: &Origin) -> bool {
        let Origin::Tuple(scheme, host, port) = origin else {
            return false;
        };
        *scheme == self.scheme && *port == self.port && self.host.is(host)
    }

    /// Whether `url` has this origin.
    fn is_at(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url.port_or_known_default() == Some(self.port)
            && url.host().is_some_and(|host| self.host.is(&host))
    }

    /// A domain that surely is a valid host as it is spelled (no IDN label the URL
    /// parser would check), or an address: what an allowed-any policy lets in without
    /// parsing.
    fn is_plain(&self) -> bool {
        match self.host {
            UriHost::Domain(domain) => domain.split('.').all(|label| {
                !label.is_empty()
                    && !label
                        .get(..4)
                        .is_some_and(|p| p.eq_ignore_ascii_case("xn--"))
            }),
            UriHost::Ipv4(_) | UriHost::Ipv6(_) => true,
        }
    }
}

impl<'a> UriHost<'a> {
    fn parse(host: &'a str) -> Option<Self> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if host.is_empty() || !host.bytes().all(allowed) {
            return None;
        }
        if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            // Only std's strict dotted form (four decimal parts, no leading zeros), which the
            // URL parser reads the same; `127.1` or `0177.0.0.1` it reads otherwise.
            return host.parse().ok().map(UriHost::Ipv4);
        }
        let last = host.strip_suffix('.').unwrap_or(host);
        let last = last.rsplit('.').next().unwrap_or(last);
        let hex = last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"))
            && last.bytes().skip(2).all(|b| b.is_ascii_hexdigit());
        if hex || last.bytes().all(|b| b.is_ascii_digit()) {
            // The URL parser reads a host ending in a number as an IPv4 address.
            return None;
        }
        Some(UriHost::Domain(host))
    }

    fn is<S: AsRef<str>>(&self, host: &url::Host<S>) -> bool {
        match (self, host) {
            (UriHost::Domain(a), url::Host::Domain(b)) => a.eq_ignore_ascii_case(b.as_ref()),
            (UriHost::Ipv4(a), url::Host::Ipv4(b)) => a == b,
            (UriHost::Ipv6(a), url::Host::Ipv6(b)) => a == b,
            _ => false,
        }
    }
}

/// A predicate on status and headers.
pub(crate) type HeadPredicate = Arc<dyn Fn(&dyn ResponseView) -> bool + Send + Sync>;
/// A predicate on a buffered body.
pub(crate) type BodyPredicate = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Decides whether a response means "the token was rejected".
///
/// Default: HTTP 401. Options: a set of status codes, RFC 6750 `WWW-Authenticate`
/// hints (`invalid_token` is a rejection whatever the status, `insufficient_scope`
/// never is), a predicate on status and headers (replaces the status rule), and a
/// predicate on the body, for APIs that answer HTTP 200 with `{"code": 401}`.
///
/// # Which bodies the body rule reads
/// Reading a body means holding the response back from the caller until it is read, so
/// the body rule reads only bodies that say they end soon (see
/// below):
/// - a `Content-Length` of at most `limit` bytes: read whole;
/// - no `Content-Length` (chunked, or decompressed on the fly): not read, since a long
///   poll or a JSON stream looks just like that — unless
///   [`body_of_unknown_length(true)`](Self::body_of_unknown_length), which reads up to
///   `limit` bytes or the end, for APIs that answer chunked and never stream;
/// - a `Content-Type` that declares a stream (`text/event-stream`, `application/x-ndjson`,
///   `application/jsonl`, `application/json-seq`, `multipart/x-mixed-replace`,
///   `application/grpc…`): never read, whatever the length.
///
/// A body that is not read is not classified: the head rules alone decide.
#[derive(Clone)]
pub struct Classifier {
    statuses: Vec<u16>,
    headers: Vec<(http::HeaderName, String)>,
    www_authenticate: bool,
    head: Option<HeadPredicate>,
    body: Option<(usize, BodyPredicate)>,
    body_of_unknown_length: bool,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier {
            statuses: vec![401],
            headers: Vec::new(),
            www_authenticate: true,
            head: None,
            body: None,
            body_of_unknown_length: false,
        }
    }
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("statuses", &self.statuses)
            .field("headers", &self.headers)
            .field("www_authenticate", &self.www_authenticate)
            .field("head_predicate", &self.head.is_some())
            .field("body_limit", &self.body.as_ref().map(|(limit, _)| *limit))
            .field("body_of_unknown_length", &self.body_of_unknown_length)
            .finish()
    }
}

impl Classifier {
    /// The default: 401, with `WWW-Authenticate` hints.
    ///
    /// ```
    /// use tokenflight::{AuthPolicy, Classifier, Token, from_fn};
    /// let policy = AuthPolicy::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .classifier(Classifier::new())
    ///     .allow_any_origin()
    ///     .build();
    /// assert!(policy.is_ok());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Status codes that mean "token rejected".
    ///
    /// ```
    /// use tokenflight::Classifier;
    /// // An API that answers an expired token with 401 or 419.
    /// let classifier = Classifier::new().statuses([401, 419]);
    /// # drop(classifier);
    /// ```
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// A response header that means "token rejected" whatever the status, when its value
    /// is `value` (surrounding whitespace ignored); may be repeated. For protocols that
    /// answer HTTP 200 with the verdict in a header, such as gRPC's `grpc-status: 16`
    /// (UNAUTHENTICATED) in a trailers-only response. RFC 6750 hints still take
    /// precedence (an `insufficient_scope` challenge is never a rejection).
    ///
    /// ```
    /// use tokenflight::Classifier;
    /// let grpc = Classifier::new().header_equals("grpc-status", "16");
    /// # drop(grpc);
    /// ```
    pub fn header_equals(mut self, name: &str, value: &str) -> Self {
        // A name HTTP cannot carry is on no response: such a rule could never match.
        if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
            self.headers.push((name, value.to_owned()));
        }
        self
    }

    /// Whether RFC 6750 `WWW-Authenticate` hints are honoured (default: yes).
    ///
    /// ```
    /// use tokenflight::Classifier;
    /// // Only the status decides, whatever the server's challenge says.
    /// let classifier = Classifier::new().www_authenticate(false);
    /// # drop(classifier);
    /// ```
    pub fn www_authenticate(mut self, honour: bool) -> Self {
        self.www_authenticate = honour;
        self
    }

    /// A predicate on status and headers that replaces the status and header rules.
    ///
    /// ```
    /// use tokenflight::Classifier;
    /// let classifier = Classifier::new().when(|response| {
    ///     response.status() == 401
    ///         || response.header(&http::HeaderName::from_static("x-token-expired")).is_some()
    /// });
    /// # drop(classifier);
    /// ```
    pub fn when(
        mut self,
        predicate: impl Fn(&dyn ResponseView) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.head = Some(Arc::new(predicate));
        self
    }

    /// A predicate on a body of at most `limit` bytes, checked when the head rules say
    /// "not rejected" and the response says its body can be read without holding back a
    /// stream (see [which bodies](Self#which-bodies-the-body-rule-reads)). The caller
    /// still gets the full, intact response.
    ///
    /// ```
    /// use tokenflight::Classifier;
    /// // An API that answers 200 with `{"code":"TOKEN_EXPIRED"}`.
    /// let classifier = Classifier::new().body(256, |body| {
    ///     body.windows(13).any(|w| w == b"TOKEN_EXPIRED")
    /// });
    /// # drop(classifier);
    /// ```
    pub fn body(
        mut self,
        limit: usize,
        predicate: impl Fn(&[u8]) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.body = Some((limit, Arc::new(predicate)));
        self
    }

    /// Whether the body rule also reads bodies of unknown length (no `Content-Length`:
    /// chunked, or decompressed on the fly), up to its limit or their end. Default: no,
    /// because such a response may be a long poll or a stream that the caller would
    /// then get only after `limit` bytes or its end. Switch it on for an API that answers
    /// business codes chunked and never streams. Declared streams (server-sent events
    /// and the like) are never read either way.
    ///
    /// ```
    /// use tokenflight::Classifier;
    /// let classifier = Classifier::new()
    ///     .body(256, |body| body.starts_with(b"{\"code\":\"TOKEN_EXPIRED\""))
    ///     .body_of_unknown_length(true);
    /// # drop(classifier);
    /// ```
    pub fn body_of_unknown_length(mut self, read: bool) -> Self {
        self.body_of_unknown_length = read;
        self
    }

    /// The verdict of the status and header rules.
    pub(crate) fn head_rejects(&self, response: &dyn ResponseView) -> bool {
        if let Some(head) = &self.head {
            return head(response);
        }
        if self.www_authenticate {
            if let Some(value) = response.header(&http::header::WWW_AUTHENTICATE) {
                match bearer_error(value) {
                    Ok(Some(BearerError::InvalidToken)) => return true,
                    Ok(Some(BearerError::InsufficientScope)) => return false,
                    // Malformed or silent headers fall back to the status rule.
                    _ => {}
                }
            }
        }
        self.statuses.contains(&response.status())
            || self.headers.iter().any(|(name, value)| {
                response
                    .header(name)
                    .is_some_and(|found| found.trim() == value.as_str())
            })
    }

    /// Whether any response can be classified as a rejection. When none can, the
    /// layer keeps no copy of the request for a resend.
    pub(crate) fn can_reject(&self) -> bool {
        self.head.is_some()
            || self.www_authenticate
            || !self.statuses.is_empty()
            || !self.headers.is_empty()
            || self.body.is_some()
    }

    /// The body rule if it applies to `response`: when its headers say the body can be
    /// read without holding back a stream (see
    /// [which bodies](Self#which-bodies-the-body-rule-reads)). `None`: do not read the
    /// body; the head rules' verdict stands.
    pub(crate) fn body_rule_for(
        &self,
        response: &dyn ResponseView,
    ) -> Option<(usize, &BodyPredicate)> {
        let (limit, predicate) = self.body.as_ref()?;
        if response
            .header(&http::header::CONTENT_TYPE)
            .is_some_and(declares_stream)
        {
            return None;
        }
        let readable = match response.header(&http::header::CONTENT_LENGTH) {
            Some(length) => length
                .trim()
                .parse::<u64>()
                .is_ok_and(|length| length <= u64::try_from(*limit).unwrap_or(u64::MAX)),
            None => self.body_of_unknown_length,
        };
        readable.then_some((*limit, predicate))
    }
}

/// A rule of [`SkipRoutes`]: a method (any if `None`) and a path prefix, or a predicate.
#[derive(Clone)]
enum SkipRule {
    Route {
        method: Option<http::Method>,
        path: String,
    },
    When(RoutePredicate),
}

/// A predicate on a request's method and URL.
pub(crate) type RoutePredicate = Arc<dyn Fn(&http::Method, &Url) -> bool + Send + Sync>;

/// The routes the policy sends without a token and does not classify ([C11](crate#c11)):
/// a login or token endpoint on the API's own origin, a health check.
#[derive(Clone, Default)]
pub(crate) struct SkipRoutes {
    rules: Vec<SkipRule>,
}

impl fmt::Debug for SkipRoutes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for rule in &self.rules {
            match rule {
                SkipRule::Route { method, path } => list.entry(&(method, path)),
                SkipRule::When(_) => list.entry(&"<predicate>"),
            };
        }
        list.finish()
    }
}

impl SkipRoutes {
    pub(crate) fn route(&mut self, method: Option<http::Method>, path: &str) {
        self.rules.push(SkipRule::Route {
            method,
            path: path.to_owned(),
        });
    }

    pub(crate) fn when(&mut self, predicate: RoutePredicate) {
        self.rules.push(SkipRule::When(predicate));
    }

    /// Whether `request` is sent without a token; its URL is not read when no route is
    /// skipped.
    pub(crate) fn skips_request<R: AuthRequest>(&self, request: &R) -> bool {
        !self.rules.is_empty() && self.skips(&request.method(), request.url())
    }

    /// Whether a request with `method` to `url` is sent without a token.
    pub(crate) fn skips(&self, method: &http::Method, url: &Url) -> bool {
        self.rules.iter().any(|rule| match rule {
            SkipRule::Route { method: m, path } => {
                m.as_ref().is_none_or(|m| m == method) && path_under(url.path(), path)
            }
            SkipRule::When(predicate) => predicate(method, url),
        })
    }
}

/// Whether `path` is `prefix` or below it, segment-wise: `/login` covers `/login` and
/// `/login/x`, not `/loginx`.
fn path_under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// Whether a `Content-Type` says the body is a stream of events or records, which ends
/// when the server decides (maybe never).
fn declares_stream(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "text/event-stream"
            | "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "application/json-seq"
            | "multipart/x-mixed-replace"
    ) || essence.starts_with("application/grpc")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Request(Url);

    impl AuthRequest for Request {
        fn method(&self) -> http::Method {
            http::Method::GET
        }
        fn url(&self) -> &Url {
            &self.0
        }
        fn url_mut(&mut self) -> &mut Url {
            &mut self.0
        }
        fn set_sensitive_header(&mut self, _: &str, _: &str) -> Result<(), InvalidHeader> {
            Ok(())
        }
        fn try_clone(&self) -> Option<Self> {
            Some(Request(self.0.clone()))
        }
    }

    /// Records the header values it is given.
    struct HeaderRequest(Url, Vec<http::HeaderValue>);

    impl AuthRequest for HeaderRequest {
        fn method(&self) -> http::Method {
            http::Method::GET
        }
        fn url(&self) -> &Url {
            &self.0
        }
        fn url_mut(&mut self) -> &mut Url {
            &mut self.0
        }
        fn set_sensitive_header(&mut self, _: &str, _: &str) -> Result<(), InvalidHeader> {
            unreachable!("the layer hands over ready-made values")
        }
        fn set_header_value(
            &mut self,
            _: &http::HeaderName,
            value: &http::HeaderValue,
        ) -> Result<(), InvalidHeader> {
            self.1.push(value.clone());
            Ok(())
        }
        fn try_clone(&self) -> Option<Self> {
            None
        }
    }

    #[test]
    fn the_header_value_is_built_once_per_token_and_shared() {
        let placement = Placement::bearer();
        let cache = HeaderCache::new(&placement);
        let mut request = HeaderRequest(Url::parse("https://api.example.com/").unwrap(), vec![]);
        let first = Arc::new(Token::new("one"));
        let second = Arc::new(Token::new("two"));
        for token in [&first, &first, &second, &second] {
            placement
                .attach_cached(&cache, &mut request, token)
                .unwrap();
        }
        let values = &request.1;
        assert_eq!(values[0], "Bearer one");
        assert_eq!(values[2], "Bearer two");
        assert!(values.iter().all(http::HeaderValue::is_sensitive));
        // The same bytes, not an equal copy: one value per token.
        assert_eq!(values[0].as_bytes().as_ptr(), values[1].as_bytes().as_ptr());
        assert_eq!(values[2].as_bytes().as_ptr(), values[3].as_bytes().as_ptr());
        assert_ne!(values[1].as_bytes().as_ptr(), values[2].as_bytes().as_ptr());
        // A token that cannot be a header value is refused, not cached.
        let bad = Arc::new(Token::new("bad\nvalue"));
        assert_eq!(
            placement.attach_cached(&cache, &mut request, &bad),
            Err(InvalidHeader)
        );
    }

    fn attached(url: &str, token: &str) -> String {
        let mut request = Request(Url::parse(url).unwrap());
        Placement::query("token")
            .attach(&mut request, &Token::new(token))
            .unwrap();
        request.0.into()
    }

    #[test]
    fn c12_query_placement_keeps_the_callers_query_byte_for_byte() {
        let base = "https://api.example.com/x";
        let cases = [
            ("", "token=t"),
            ("?", "token=t"),
            ("?flag", "flag&token=t"),
            ("?a=1&", "a=1&token=t"),
            ("?a=1&&b=2", "a=1&&b=2&token=t"),
            (
                "?sig=a%2Fb%3D&p=a+b&e=%7e",
                "sig=a%2Fb%3D&p=a+b&e=%7e&token=t",
            ),
            // The caller's own pair is replaced in place, repeats dropped.
            ("?a&token=old&b=%7e&token=older", "a&token=t&b=%7e"),
            ("?%74oken=old&b", "token=t&b"),
            ("?token&b", "token=t&b"),
            ("?tokens=1&xtoken=2", "tokens=1&xtoken=2&token=t"),
        ];
        for (query, expected) in cases {
            let url = attached(&format!("{base}{query}#frag"), "t");
            assert_eq!(url, format!("{base}?{expected}#frag"), "query {query:?}");
        }
        // The token itself is form-encoded.
        assert_eq!(
            attached(base, "a b&c=d/é"),
            format!("{base}?token=a+b%26c%3Dd%2F%C3%A9")
        );
    }

    #[test]
    fn c12_a_redacted_url_hides_the_query_token_and_keeps_the_rest() {
        let placement = Placement::query("token");
        let url = Url::parse("http://h/p?flag&token=secret&x=%7e&token=again").unwrap();
        let redacted = placement.redacted(&url).unwrap();
        assert_eq!(redacted.as_str(), "http://h/p?flag&token=redacted&x=%7e");
        assert_eq!(
            placement.redacted(&Url::parse("http://h/p?flag").unwrap()),
            None
        );
        assert_eq!(placement.redacted(&Url::parse("http://h/p").unwrap()), None);
        assert_eq!(Placement::bearer().redacted(&url), None);
    }

    #[test]
    fn c12_scrub_hides_the_sent_query_token_in_any_text() {
        let placement = Placement::query("token");
        let sent = Url::parse("http://h/p?a=1&token=s%2Fb+c").unwrap();
        let text = "GET http://h/p?a=1&token=s%2Fb+c failed; token s/b c";
        assert_eq!(
            placement.scrub(&sent, text).as_deref(),
            Some("GET http://h/p?a=1&token=redacted failed; token redacted")
        );
        assert_eq!(placement.scrub(&sent, "connection reset"), None);
        assert_eq!(Placement::bearer().scrub(&sent, text), None);
        let unsent = Url::parse("http://h/p?a=1").unwrap();
        assert_eq!(placement.scrub(&unsent, text), None);
    }

    struct Head(&'static [(&'static str, &'static str)]);

    impl ResponseView for Head {
        fn status(&self) -> u16 {
            200
        }
        fn header(&self, name: &http::HeaderName) -> Option<&str> {
            self.0
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
                .map(|(_, v)| *v)
        }
    }

    #[test]
    fn c4_body_rule_reads_only_bodies_that_say_they_end() {
        let rule = Classifier::new().body(100, |_| true);
        let reads = |classifier: &Classifier, headers| {
            classifier
                .body_rule_for(&Head(headers))
                .map(|(limit, _)| limit)
        };
        assert_eq!(reads(&rule, &[("content-length", "100")]), Some(100));
        assert_eq!(reads(&rule, &[("Content-Length", " 0 ")]), Some(100));
        assert_eq!(reads(&rule, &[("content-length", "101")]), None);
        assert_eq!(reads(&rule, &[("content-length", "-1")]), None);
        assert_eq!(reads(&rule, &[("content-length", "lots")]), None);
        // Unknown length: a long poll or a stream, unless the caller opts in.
        assert_eq!(reads(&rule, &[("content-type", "application/json")]), None);
        let opted_in = rule.clone().body_of_unknown_length(true);
        assert_eq!(
            reads(&opted_in, &[("content-type", "application/json")]),
            Some(100)
        );
        assert_eq!(reads(&opted_in, &[("content-length", "101")]), None);
        // Declared streams: never, whatever the length says.
        for stream in [
            "text/event-stream",
            "Text/Event-Stream; charset=utf-8",
            "application/x-ndjson",
            "application/grpc+proto",
            "multipart/x-mixed-replace; boundary=x",
        ] {
            let headers: &'static [(&str, &str)] = Box::leak(Box::new([
                ("content-type", stream),
                ("content-length", "10"),
            ]));
            assert_eq!(reads(&opted_in, headers), None, "{stream}");
        }
        assert_eq!(
            reads(&Classifier::new(), &[("content-length", "1")]),
            None,
            "no body rule"
        );
    }
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn c12_same_origin_agrees_with_url_origin() {
        let origins = [
            "http://127.0.0.1:8080",
            "https://api.example.com",
            "https://api.example.com:8443",
            "http://[::1]:80",
            "wss://push.example.com",
            "ftp://files.example.com",
        ];
        let urls = [
            "http://127.0.0.1:8080/api/x?y=1",
            "http://127.0.0.1/api",
            "https://127.0.0.1:8080/",
            "http://127.0.0.2:8080/",
            "https://api.example.com/me",
            "https://api.example.com:443/me",
            "https://API.example.com/me",
            "https://api.example.com:8443/",
            "http://api.example.com/",
            "https://api.example.com.evil.test/",
            "http://[::1]/x",
            "http://[::1]:8080/x",
            "wss://push.example.com:443/s",
            "ws://push.example.com/s",
            "ftp://files.example.com/a",
            "blob:https://api.example.com/uuid",
            "file:///etc/passwd",
            "data:text/plain,hi",
            "unknown://api.example.com/",
        ];
        for origin in origins {
            let origin = AllowedOrigins::parse_origin(origin).unwrap();
            for url in urls {
                let url = Url::parse(url).unwrap();
                assert_eq!(
                    same_origin(&origin, &url),
                    url.origin() == origin,
                    "{origin:?} vs {url}"
                );
            }
        }
        let list = AllowedOrigins::List(vec![
            AllowedOrigins::parse_origin("https://api.example.com").unwrap(),
        ]);
        let url = Url::parse("https://api.example.com/x").unwrap();
        let admit = |list: &AllowedOrigins, url: &Url| {
            list.admission(RequestOrigin::Url(url))
                .map(Admission::sent_to)
        };
        let sent_to = admit(&list, &url).unwrap();
        assert!(sent_to.is_origin_of(&list, &Url::parse("https://api.example.com:443/y").unwrap()));
        assert!(!sent_to.is_origin_of(&list, &Url::parse("https://other.example.com/").unwrap()));
        assert!(admit(&list, &Url::parse("http://api.example.com/").unwrap()).is_none());
        let any = admit(&AllowedOrigins::Any, &url).unwrap();
        assert!(any.is_origin_of(&AllowedOrigins::Any, &url));
        assert!(!any.is_origin_of(
            &AllowedOrigins::Any,
            &Url::parse("https://other.example.com/").unwrap()
        ));
    }
}

#[cfg(test)]
mod skip_route_tests {
    use super::*;

    #[test]
    fn c11_a_route_rule_matches_method_and_whole_path_segments() {
        let mut routes = SkipRoutes::default();
        routes.route(Some(http::Method::POST), "/login");
        routes.route(None, "/health/");
        let url = |path: &str| Url::parse(&format!("https://api.example.com{path}")).unwrap();
        let post = http::Method::POST;
        let get = http::Method::GET;
        assert!(routes.skips(&post, &url("/login")));
        assert!(routes.skips(&post, &url("/login/sso?x=1")));
        assert!(!routes.skips(&post, &url("/loginx")));
        assert!(!routes.skips(&get, &url("/login")), "another method");
        assert!(routes.skips(&get, &url("/health/live")));
        assert!(
            !routes.skips(&get, &url("/health")),
            "the prefix ends with a slash"
        );
        assert!(!routes.skips(&get, &url("/api/me")));
        routes.when(Arc::new(|method, url| {
            method == http::Method::GET && url.path().ends_with(".png")
        }));
        assert!(routes.skips(&get, &url("/static/logo.png")));
        assert!(!routes.skips(&post, &url("/static/logo.png")));
    }
}

#[cfg(test)]
mod header_rule_tests {
    use super::*;

    struct Head(u16, &'static [(&'static str, &'static str)]);

    impl ResponseView for Head {
        fn status(&self) -> u16 {
            self.0
        }

        fn header(&self, name: &http::HeaderName) -> Option<&str> {
            self.1
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
                .map(|(_, v)| *v)
        }
    }

    #[test]
    fn a_header_rule_rejects_whatever_the_status_and_yields_to_rfc_6750_hints() {
        let classifier = Classifier::new().header_equals("grpc-status", "16");
        assert!(classifier.head_rejects(&Head(200, &[("grpc-status", "16")])));
        assert!(classifier.head_rejects(&Head(200, &[("grpc-status", " 16")])));
        assert!(!classifier.head_rejects(&Head(200, &[("grpc-status", "160")])));
        assert!(!classifier.head_rejects(&Head(200, &[])));
        assert!(
            classifier.head_rejects(&Head(401, &[])),
            "statuses still apply"
        );
        const SCOPE: (&str, &str) = ("www-authenticate", "Bearer error=\"insufficient_scope\"");
        assert!(!classifier.head_rejects(&Head(200, &[("grpc-status", "16"), SCOPE])));
        // Without the rule, the same response is fine.
        assert!(!Classifier::new().head_rejects(&Head(200, &[("grpc-status", "16")])));
    }
}

#[cfg(test)]
mod uri_origin_tests {
    use super::*;

    /// The old check: the URL parser's origin of `scheme://authority`.
    fn parsed(uri: &http::Uri) -> Option<Url> {
        Url::parse(&format!("{}://{}", uri.scheme()?, uri.authority()?)).ok()
    }

    fn listed(origins: &[&str]) -> AllowedOrigins {
        AllowedOrigins::List(
            origins
                .iter()
                .map(|o| AllowedOrigins::parse_origin(o).unwrap())
                .collect(),
        )
    }

    /// The allowed origins of the table, one list each, and the request origins tried on
    /// them (with a path and query, which are not read).
    const ALLOWED: [&str; 8] = [
        "http://127.0.0.1:1",
        "https://api.example.com",
        "http://[::1]:8080",
        "https://xn--bcher-kva.example",
        "http://my_service:8000",
        "wss://push.example.com",
        "http://0.0.0.0",
        "http://[::ffff:1.2.3.4]",
    ];
    const ORDINARY: [&str; 22] = [
        "http://127.0.0.1:1",
        "https://API.Example.com",
        "https://api.example.com:443",
        "https://api.example.com:0443",
        "https://api.example.com:",
        "https://user:pass@api.example.com",
        "http://api.example.com",
        "https://api.example.com:8443",
        "https://api.example.com.evil.test",
        "http://[::1]:8080",
        "http://[0:0:0:0:0:0:0:1]:8080",
        "http://[::1]",
        "https://XN--BCHER-KVA.example",
        "http://my_service:8000",
        "http://MY_SERVICE:8000",
        "wss://push.example.com:443",
        "ws://push.example.com",
        "http://0.0.0.0:80",
        "http://[::ffff:102:304]",
        "http://localhost",
        "http://127.0.0.2:1",
        "https://api.example.com:99999",
    ];
    /// Spellings the URL parser reads otherwise than they are written: the new check
    /// may refuse them where the old one admits (no token: fail closed).
    const ODD: [&str; 12] = [
        "http://0x7f.1:1",
        "http://127.1:1",
        "http://2130706433:1",
        "http://0177.0.0.1:1",
        "http://127.0.0.1.:1",
        "https://api%2Eexample.com",
        "https://api.example.com.",
        "https://api..example.com",
        "WSS://push.example.com",
        "http://a.0x10",
        "http://1.2.3.999",
        "https://xn--zz.example",
    ];

    fn uris() -> impl Iterator<Item = (&'static str, http::Uri)> {
        ORDINARY.iter().chain(&ODD).filter_map(|text| {
            let uri = format!("{text}/a/b?c=d").parse().ok()?;
            Some((*text, uri))
        })
    }

    /// C12: a URI the check without the URL parser admits is admitted by the URL
    /// parser's origin too (no token goes where the old check would not send it), and
    /// on ordinary spellings both agree.
    #[test]
    fn c12_a_uri_is_admitted_only_where_its_parsed_url_is() {
        for allowed in ALLOWED {
            let list = listed(&[allowed]);
            for (text, uri) in uris() {
                let new = list.admission(RequestOrigin::Uri(&uri)).is_some();
                let old = parsed(&uri).is_some_and(|url| list.allows(&url));
                assert!(!new || old, "{text} admitted on {allowed} by the URI only");
                if ORDINARY.contains(&text) {
                    assert_eq!(new, old, "{text} on {allowed}");
                }
            }
        }
    }

    /// With any origin allowed, a URI let in without the URL parser has a URL (built
    /// later for a skipped route, a key, a query token), of the same origin; the
    /// response's origin check agrees with the parsed one.
    #[test]
    fn c12_any_origin_admits_what_parses_and_remembers_its_origin() {
        for (text, uri) in uris() {
            let admission = AllowedOrigins::Any.admission(RequestOrigin::Uri(&uri));
            let old = parsed(&uri);
            assert_eq!(admission.is_some(), old.is_some(), "{text}");
            let (Some(admission), Some(url)) = (admission, old) else {
                continue;
            };
            assert!(Url::parse(&uri.to_string()).is_ok(), "{text}");
            let sent_to = admission.sent_to();
            for (other, _) in uris() {
                let Ok(other) = Url::parse(&format!("{other}/x")) else {
                    continue;
                };
                assert_eq!(
                    sent_to.is_origin_of(&AllowedOrigins::Any, &other),
                    other.origin() == url.origin(),
                    "{text} vs {other}"
                );
            }
        }
    }

    proptest::proptest! {
        /// The same, for hosts and ports made of the characters that tell the URL
        /// parser's forms apart.
        #[test]
        fn c12_a_generated_uri_is_admitted_only_where_its_parsed_url_is(
            scheme in "(http|https|ws|wss|HTTP|ftp)",
            host in "([0-9a-fxA-FX_%-]{1,4}\\.?){1,5}|\\[[0-9a-f:.]{2,12}\\]",
            port in proptest::option::of("[0-9]{0,6}"),
        ) {
            let text = match &port {
                Some(port) => format!("{scheme}://{host}:{port}/p"),
                None => format!("{scheme}://{host}/p"),
            };
            let Ok(uri) = text.parse::<http::Uri>() else { return Ok(()) };
            let old = parsed(&uri);
            if let Some(url) = &old {
                // The URI's own origin, listed, must admit it (or refuse: fail closed).
                if let Ok(origin) = AllowedOrigins::parse_origin(url.as_str()) {
                    let list = AllowedOrigins::List(vec![origin]);
                    let new = list.admission(RequestOrigin::Uri(&uri)).is_some();
                    proptest::prop_assert!(!new || list.allows(url), "{}", text);
                }
            }
            for allowed in ALLOWED {
                let list = listed(&[allowed]);
                let new = list.admission(RequestOrigin::Uri(&uri)).is_some();
                let was = old.as_ref().is_some_and(|url| list.allows(url));
                proptest::prop_assert!(!new || was, "{} on {}", text, allowed);
            }
            if let Some(admission) = AllowedOrigins::Any.admission(RequestOrigin::Uri(&uri)) {
                proptest::prop_assert!(old.is_some(), "{}", text);
                proptest::prop_assert!(Url::parse(&uri.to_string()).is_ok(), "{}", text);
                let sent_to = admission.sent_to();
                if let Some(url) = &old {
                    proptest::prop_assert!(sent_to.is_origin_of(&AllowedOrigins::Any, url), "{}", text);
                }
            }
        }
    }
}
