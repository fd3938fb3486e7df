//! Where the token goes (placement), who may receive it (allowed origins), and how a
//! response says "token rejected" (classification).

use std::fmt;
use std::sync::Arc;

use url::{Origin, Url};

use crate::error::ConfigError;
use crate::request::{AuthRequest, InvalidHeader, ResponseView};
use crate::token::Token;
use crate::www_authenticate::{BearerError, bearer_error};

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
    Query {
        /// Parameter name.
        param: String,
    },
}

impl Default for Placement {
    fn default() -> Self {
        Placement::bearer()
    }
}

impl Placement {
    /// `Authorization: Bearer <token>`.
    pub fn bearer() -> Self {
        Placement::Header {
            name: "authorization".into(),
            scheme: Some("Bearer".into()),
        }
    }

    /// A custom header, with an optional scheme.
    pub fn header(name: impl Into<String>, scheme: Option<&str>) -> Result<Self, ConfigError> {
        let name = name.into();
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
        Ok(Placement::Header {
            name,
            scheme: scheme.map(str::to_owned),
        })
    }

    /// A query parameter.
    pub fn query(param: impl Into<String>) -> Result<Self, ConfigError> {
        let param = param.into();
        if param.is_empty() {
            return Err(ConfigError::InvalidPlacement(
                "empty query parameter".into(),
            ));
        }
        Ok(Placement::Query { param })
    }

    /// Puts `token` on `request`.
    pub fn attach<R: AuthRequest>(
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
                // Replace, never duplicate, a parameter of the same name.
                let kept: Vec<(String, String)> = url
                    .query_pairs()
                    .filter(|(k, _)| k != param.as_str())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                url.query_pairs_mut()
                    .clear()
                    .extend_pairs(kept)
                    .append_pair(param, secret);
                Ok(())
            }
        }
    }
}

/// Which origins may receive the token (C12).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllowedOrigins {
    /// Only these origins (scheme, host and port must match).
    List(Vec<Origin>),
    /// Every origin: an explicit opt-in.
    Any,
}

impl AllowedOrigins {
    /// Parses `scheme://host[:port]` (a path is ignored).
    pub fn parse_origin(origin: &str) -> Result<Origin, ConfigError> {
        let url = Url::parse(origin).map_err(|_| ConfigError::InvalidOrigin(origin.to_owned()))?;
        match url.origin() {
            tuple @ Origin::Tuple(..) => Ok(tuple),
            Origin::Opaque(_) => Err(ConfigError::InvalidOrigin(origin.to_owned())),
        }
    }

    /// True when a request to `url` may carry the token.
    pub fn allows(&self, url: &Url) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::List(origins) => {
                let origin = url.origin();
                origins.contains(&origin)
            }
        }
    }
}

/// A predicate on status and headers.
pub type HeadPredicate = Arc<dyn Fn(&dyn ResponseView) -> bool + Send + Sync>;
/// A predicate on a buffered body.
pub type BodyPredicate = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Decides whether a response means "the token was rejected".
///
/// Default: HTTP 401. Options: a set of status codes, RFC 6750 `WWW-Authenticate`
/// hints (`invalid_token` is a rejection whatever the status, `insufficient_scope`
/// never is), a predicate on status and headers (replaces the status rule), and a
/// predicate on the first `limit` bytes of the body, for APIs that answer HTTP 200
/// with `{"code": 401}`.
#[derive(Clone)]
pub struct Classifier {
    statuses: Vec<u16>,
    headers: Vec<(String, String)>,
    www_authenticate: bool,
    head: Option<HeadPredicate>,
    body: Option<(usize, BodyPredicate)>,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier {
            statuses: vec![401],
            headers: Vec::new(),
            www_authenticate: true,
            head: None,
            body: None,
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
            .finish()
    }
}

impl Classifier {
    /// The default: 401, with `WWW-Authenticate` hints.
    pub fn new() -> Self {
        Self::default()
    }

    /// Status codes that mean "token rejected".
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
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Whether RFC 6750 `WWW-Authenticate` hints are honoured (default: yes).
    pub fn www_authenticate(mut self, honour: bool) -> Self {
        self.www_authenticate = honour;
        self
    }

    /// A predicate on status and headers that replaces the status and header rules.
    pub fn when(
        mut self,
        predicate: impl Fn(&dyn ResponseView) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.head = Some(Arc::new(predicate));
        self
    }

    /// A predicate on up to `limit` buffered body bytes, checked when the head rules say
    /// "not rejected". The caller still gets the full, intact response.
    pub fn body(
        mut self,
        limit: usize,
        predicate: impl Fn(&[u8]) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.body = Some((limit, Arc::new(predicate)));
        self
    }

    /// The verdict of the status and header rules.
    pub fn head_rejects(&self, response: &dyn ResponseView) -> bool {
        if let Some(head) = &self.head {
            return head(response);
        }
        if self.www_authenticate {
            if let Some(value) = response.header("www-authenticate") {
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

    /// The body rule, if any: its byte limit and predicate.
    pub fn body_rule(&self) -> Option<(usize, &BodyPredicate)> {
        self.body.as_ref().map(|(limit, p)| (*limit, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Head(u16, &'static [(&'static str, &'static str)]);

    impl ResponseView for Head {
        fn status(&self) -> u16 {
            self.0
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.1
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
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
