//! Parsing of a token endpoint's answer: the RFC 6749 §5.1 success body, the §5.2 error
//! body, and `Retry-After`. Bad input gives a typed error, never a panic ([C13](crate#c13)), and no
//! error or `Debug` output carries a secret ([C12](crate#c12)): field values are never echoed.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use crate::jwt;
use crate::token::{Secret, Token};

/// A successful token response (RFC 6749 §5.1).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenResponse {
    /// `access_token`.
    pub access_token: Secret,
    /// `token_type` as sent (`Bearer` or `DPoP` in some letter case, or absent → `Bearer`).
    pub token_type: String,
    /// `expires_in`, if the server sent it.
    pub expires_in: Option<Duration>,
    /// `refresh_token`, if the server issued a new one (rotation).
    pub refresh_token: Option<Secret>,
    /// `scope`, if the server said which scope it granted.
    pub scope: Option<String>,
}

/// An error response (RFC 6749 §5.2).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorResponse {
    /// The `error` code, e.g. `invalid_grant`.
    pub error: String,
    /// `error_description`, if sent.
    pub error_description: Option<String>,
    /// `error_uri`, if sent.
    pub error_uri: Option<String>,
}

/// Why a token endpoint's body could not be understood. Never contains field values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenResponseError {
    /// The body is not JSON.
    #[error("token endpoint response is not JSON")]
    NotJson,
    /// The body is JSON but not an object.
    #[error("token endpoint response is not a JSON object")]
    NotAnObject,
    /// A required field is missing or empty.
    #[error("token endpoint response lacks `{field}`")]
    Missing {
        /// The field's name.
        field: &'static str,
    },
    /// A field has the wrong type or an impossible value.
    #[error("token endpoint response has an invalid `{field}`")]
    InvalidField {
        /// The field's name.
        field: &'static str,
    },
    /// `token_type` is neither `Bearer` nor `DPoP` (e.g. `mac`), or is `DPoP` for a
    /// grant without a DPoP key: a token this client cannot use.
    #[error("unsupported token_type {0:?}: only Bearer (and DPoP with a DPoP key) is supported")]
    UnsupportedTokenType(String),
}

impl TokenResponse {
    /// Parses a §5.1 body. `token_type` is compared case-insensitively (an absent one is
    /// taken as `Bearer`), `expires_in` may be a number or a numeric string.
    ///
    /// ```
    /// use tokenflight::oauth2::TokenResponse;
    /// let parsed = TokenResponse::parse(br#"{"access_token":"a","token_type":"bearer","expires_in":"60"}"#).unwrap();
    /// assert_eq!(parsed.expires_in, Some(std::time::Duration::from_secs(60)));
    /// ```
    pub fn parse(body: &[u8]) -> Result<Self, TokenResponseError> {
        let map = object(body)?;
        let access_token = match map.get("access_token") {
            Some(Value::String(s)) if !s.is_empty() => Secret::new(s.as_str()),
            Some(Value::String(_)) | Some(Value::Null) | None => {
                return Err(TokenResponseError::Missing {
                    field: "access_token",
                });
            }
            Some(_) => {
                return Err(TokenResponseError::InvalidField {
                    field: "access_token",
                });
            }
        };
        let token_type = match map.get("token_type") {
            None | Some(Value::Null) => "Bearer".to_owned(),
            // DPoP (RFC 9449 §5) is parsed too; the grant decides whether it can use it
            // (only with a DPoP key).
            Some(Value::String(t))
                if t.eq_ignore_ascii_case("bearer") || t.eq_ignore_ascii_case("dpop") =>
            {
                t.clone()
            }
            Some(Value::String(t)) => {
                return Err(TokenResponseError::UnsupportedTokenType(printable(t, 32)));
            }
            Some(_) => {
                return Err(TokenResponseError::InvalidField {
                    field: "token_type",
                });
            }
        };
        let refresh_token = match map.get("refresh_token") {
            Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s.as_str())),
            Some(Value::String(_)) | Some(Value::Null) | None => None,
            Some(_) => {
                return Err(TokenResponseError::InvalidField {
                    field: "refresh_token",
                });
            }
        };
        let scope = match map.get("scope") {
            Some(Value::String(s)) => Some(s.clone()),
            // Scope is informational here; a non-standard form is not worth failing for.
            _ => None,
        };
        Ok(TokenResponse {
            access_token,
            token_type,
            expires_in: expires_in(map.get("expires_in"))?,
            refresh_token,
            scope,
        })
    }

    /// When the access token expires: `now + expires_in`, else the access token's JWT
    /// `exp` (read without verification), else unknown.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::oauth2::TokenResponse;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    /// let timed = TokenResponse::parse(br#"{"access_token":"a","expires_in":60}"#).unwrap();
    /// assert_eq!(timed.expires_at(now), Some(now + Duration::from_secs(60)));
    /// let untimed = TokenResponse::parse(br#"{"access_token":"opaque"}"#).unwrap();
    /// assert_eq!(untimed.expires_at(now), None);
    /// ```
    pub fn expires_at(&self, now: SystemTime) -> Option<SystemTime> {
        match self.expires_in {
            Some(lifetime) => now.checked_add(lifetime),
            None => jwt::expiry(self.access_token.expose()),
        }
    }

    /// Makes the token. `used_refresh` is the refresh token the request spent: it is
    /// kept when the response carries no new one, and replaced when it does (rotation).
    ///
    /// The token is marked as obtained at `now`, so its lifetime is known and the
    /// coordinator's timing scales to it ([C15](crate#c15)). The relative `expires_in` is preferred
    /// over an absolute JWT `exp` because it does not depend on the two clocks agreeing;
    /// an `exp` already past by the local clock gives a lifetime of zero, and such a
    /// token is still sent (the server decides) for `min_refresh_interval`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::oauth2::TokenResponse;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    /// let body = br#"{"access_token":"a","expires_in":60}"#;
    /// // No new refresh token in the response: the one the request spent is kept.
    /// let token = TokenResponse::parse(body).unwrap().into_token(now, Some("spent".into()));
    /// assert_eq!(token.access().expose(), "a");
    /// assert_eq!(token.refresh().map(|r| r.expose()), Some("spent"));
    /// assert_eq!(token.expiry(), Some(now + Duration::from_secs(60)));
    /// assert_eq!(token.obtained(), Some(now));
    /// // A rotated one replaces it.
    /// let rotated = br#"{"access_token":"b","refresh_token":"next"}"#;
    /// let token = TokenResponse::parse(rotated).unwrap().into_token(now, Some("spent".into()));
    /// assert_eq!(token.refresh().map(|r| r.expose()), Some("next"));
    /// ```
    pub fn into_token(self, now: SystemTime, used_refresh: Option<Secret>) -> Token {
        let expires_at = self.expires_at(now);
        let token = Token::new(self.access_token)
            .set_refresh(self.refresh_token.or(used_refresh))
            .obtained_at(now);
        match expires_at {
            Some(at) => token.expires_at(at),
            None => token,
        }
    }
}

impl ErrorResponse {
    /// Parses a §5.2 body.
    ///
    /// ```
    /// use tokenflight::oauth2::{ErrorResponse, TokenResponseError};
    /// let parsed = ErrorResponse::parse(br#"{"error":"invalid_grant","error_description":"revoked"}"#).unwrap();
    /// assert_eq!(parsed.error, "invalid_grant");
    /// assert_eq!(parsed.error_description.as_deref(), Some("revoked"));
    /// assert_eq!(ErrorResponse::parse(b"{}"), Err(TokenResponseError::Missing { field: "error" }));
    /// ```
    pub fn parse(body: &[u8]) -> Result<Self, TokenResponseError> {
        let map = object(body)?;
        let error = match map.get("error") {
            Some(Value::String(code)) if !code.is_empty() => code.clone(),
            Some(Value::String(_)) | Some(Value::Null) | None => {
                return Err(TokenResponseError::Missing { field: "error" });
            }
            Some(_) => return Err(TokenResponseError::InvalidField { field: "error" }),
        };
        let text = |field| match map.get(field) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(ErrorResponse {
            error,
            error_description: text("error_description"),
            error_uri: text("error_uri"),
        })
    }

    /// True for the codes that retrying cannot cure (RFC 6749 §5.2, and RFC 8693
    /// §2.2.2's `invalid_target`): the grant or the client is bad,
    /// or the request can never succeed as configured. A new login (or a config fix)
    /// is needed.
    ///
    /// ```
    /// use tokenflight::oauth2::ErrorResponse;
    /// let code = |body: &[u8]| ErrorResponse::parse(body).unwrap();
    /// assert!(code(br#"{"error":"invalid_grant"}"#).is_permanent());
    /// assert!(!code(br#"{"error":"temporarily_unavailable"}"#).is_permanent());
    /// ```
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.error.as_str(),
            "invalid_grant"
                | "invalid_client"
                | "unauthorized_client"
                | "unsupported_grant_type"
                | "invalid_scope"
                | "invalid_request"
                | "invalid_target"
        )
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, TokenResponseError> {
    // Parsed as a `Value` first: serde_json's type errors quote the offending value,
    // which could be a secret; syntax errors do not, and are all that can happen here.
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(TokenResponseError::NotAnObject),
        Err(_) => Err(TokenResponseError::NotJson),
    }
}

fn expires_in(value: Option<&Value>) -> Result<Option<Duration>, TokenResponseError> {
    let invalid = TokenResponseError::InvalidField {
        field: "expires_in",
    };
    let secs = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(secs) => return Ok(Some(Duration::from_secs(secs))),
            None => n.as_f64(),
        },
        Some(Value::String(s)) => {
            let s = s.trim();
            if let Ok(secs) = s.parse::<u64>() {
                return Ok(Some(Duration::from_secs(secs)));
            }
            s.parse::<f64>().ok()
        }
        Some(_) => None,
    };
    match secs {
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            // Whole seconds: the fraction of a lifetime is noise.
            Duration::try_from_secs_f64(secs.floor())
                .map(Some)
                .map_err(|_| invalid)
        }
        _ => Err(invalid),
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date, relative to `now`.
/// A date in the past means "now" (zero); garbage is ignored.
pub(crate) fn retry_after(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Server-provided text made safe to show: control characters dropped, length bounded.
pub(crate) fn printable(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect();
    if text
        .chars()
        .filter(|c| !c.is_control())
        .nth(max_chars)
        .is_some()
    {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn epoch(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn parses_a_full_response() {
        let parsed = TokenResponse::parse(
            br#"{"access_token":"AT","token_type":"BeArEr","expires_in":3600,"refresh_token":"RT","scope":"read write","extra":1}"#,
        )
        .unwrap();
        assert_eq!(parsed.access_token.expose(), "AT");
        assert_eq!(parsed.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(
            parsed.refresh_token.as_ref().map(Secret::expose),
            Some("RT")
        );
        assert_eq!(parsed.scope.as_deref(), Some("read write"));
        let token = parsed.into_token(epoch(100), Some(Secret::new("OLD")));
        assert_eq!(token.expiry(), Some(epoch(3700)));
        assert_eq!(token.lifetime(), Some(Duration::from_secs(3600)), "C15");
        assert_eq!(token.refresh().map(Secret::expose), Some("RT"));
    }

    #[test]
    fn expires_in_as_number_string_or_float() {
        for (body, secs) in [
            (r#"{"access_token":"a","expires_in":"120"}"#, 120),
            (r#"{"access_token":"a","expires_in":" 7 "}"#, 7),
            (r#"{"access_token":"a","expires_in":59.9}"#, 59),
            (r#"{"access_token":"a","expires_in":"30.5"}"#, 30),
        ] {
            let parsed = TokenResponse::parse(body.as_bytes()).unwrap();
            assert_eq!(parsed.expires_in, Some(Duration::from_secs(secs)), "{body}");
        }
        for body in [
            r#"{"access_token":"a","expires_in":-5}"#,
            r#"{"access_token":"a","expires_in":"soon"}"#,
            r#"{"access_token":"a","expires_in":[1]}"#,
            r#"{"access_token":"a","expires_in":"1e300"}"#,
            r#"{"access_token":"a","expires_in":1e300}"#,
        ] {
            assert_eq!(
                TokenResponse::parse(body.as_bytes()),
                Err(TokenResponseError::InvalidField {
                    field: "expires_in"
                }),
                "{body}"
            );
        }
    }

    #[test]
    fn keeps_the_old_refresh_token_when_none_is_sent() {
        for body in [
            r#"{"access_token":"a","token_type":"Bearer"}"#,
            r#"{"access_token":"a","token_type":"Bearer","refresh_token":null}"#,
            r#"{"access_token":"a","token_type":"Bearer","refresh_token":""}"#,
        ] {
            let token = TokenResponse::parse(body.as_bytes())
                .unwrap()
                .into_token(epoch(0), Some(Secret::new("OLD")));
            assert_eq!(token.refresh().map(Secret::expose), Some("OLD"), "{body}");
            assert_eq!(token.expiry(), None, "opaque token without expires_in");
        }
    }

    #[test]
    fn missing_expires_in_falls_back_to_the_jwt_exp() {
        let access = format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"exp":5000}"#)
        );
        let body = format!(r#"{{"access_token":"{access}","token_type":"bearer"}}"#);
        let token = TokenResponse::parse(body.as_bytes())
            .unwrap()
            .into_token(epoch(10), None);
        assert_eq!(token.expiry(), Some(epoch(5000)));
        // expires_in wins over the JWT.
        let body = format!(r#"{{"access_token":"{access}","expires_in":1}}"#);
        let token = TokenResponse::parse(body.as_bytes())
            .unwrap()
            .into_token(epoch(10), None);
        assert_eq!(token.expiry(), Some(epoch(11)));
        // An `exp` already past by the local clock (skew): a lifetime of zero, not an
        // error; the coordinator still sends it for its minimum refresh interval.
        let token = TokenResponse::parse(
            format!(r#"{{"access_token":"{access}","token_type":"bearer"}}"#).as_bytes(),
        )
        .unwrap()
        .into_token(epoch(6000), None);
        assert_eq!(token.lifetime(), Some(Duration::ZERO));
    }

    #[test]
    fn c13_malformed_bodies_are_typed_errors() {
        assert_eq!(
            TokenResponse::parse(b"<html>"),
            Err(TokenResponseError::NotJson)
        );
        assert_eq!(
            TokenResponse::parse(b"[1]"),
            Err(TokenResponseError::NotAnObject)
        );
        assert_eq!(
            TokenResponse::parse(b"{}"),
            Err(TokenResponseError::Missing {
                field: "access_token"
            })
        );
        assert_eq!(
            TokenResponse::parse(br#"{"access_token":5}"#),
            Err(TokenResponseError::InvalidField {
                field: "access_token"
            })
        );
        assert_eq!(
            TokenResponse::parse(br#"{"access_token":"a","token_type":"mac"}"#),
            Err(TokenResponseError::UnsupportedTokenType("mac".into()))
        );
        assert_eq!(
            ErrorResponse::parse(br#"{"error":7}"#),
            Err(TokenResponseError::InvalidField { field: "error" })
        );
    }

    #[test]
    fn c12_parse_errors_never_echo_values() {
        let err = TokenResponse::parse(br#"{"access_token":"a","refresh_token":{"x":"SECRET"}}"#)
            .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        let parsed =
            TokenResponse::parse(br#"{"access_token":"SECRET-A","refresh_token":"SECRET-R"}"#)
                .unwrap();
        assert!(!format!("{parsed:?}").contains("SECRET"));
    }

    #[test]
    fn error_codes_permanent_or_not() {
        let parse = |code: &str| {
            ErrorResponse::parse(
                format!(r#"{{"error":"{code}","error_description":"d"}}"#).as_bytes(),
            )
            .unwrap()
        };
        for code in ["invalid_grant", "invalid_client", "unauthorized_client"] {
            assert!(parse(code).is_permanent(), "{code}");
        }
        for code in ["temporarily_unavailable", "server_error", "slow_down"] {
            assert!(!parse(code).is_permanent(), "{code}");
        }
        assert_eq!(parse("x").error_description.as_deref(), Some("d"));
    }

    #[test]
    fn retry_after_seconds_or_http_date() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(retry_after(&headers, epoch(0)), None);
        headers.insert(http::header::RETRY_AFTER, "17".parse().unwrap());
        assert_eq!(
            retry_after(&headers, epoch(0)),
            Some(Duration::from_secs(17))
        );
        let date = httpdate::fmt_http_date(epoch(1_700_000_030));
        headers.insert(http::header::RETRY_AFTER, date.parse().unwrap());
        assert_eq!(
            retry_after(&headers, epoch(1_700_000_000)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(&headers, epoch(1_800_000_000)),
            Some(Duration::ZERO)
        );
        headers.insert(http::header::RETRY_AFTER, "later".parse().unwrap());
        assert_eq!(retry_after(&headers, epoch(0)), None);
    }

    #[test]
    fn printable_bounds_and_strips_controls() {
        assert_eq!(printable("a\nb\u{7}c", 10), "abc");
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable("abc", 3), "abc");
    }

    proptest::proptest! {
        #[test]
        fn c13_parsers_never_panic_on_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = TokenResponse::parse(&body);
            let _ = ErrorResponse::parse(&body);
        }

        #[test]
        fn c13_parsers_never_panic_on_json_like_text(body in r#"\{("[a-z_]{1,14}":("[^"]{0,12}"|-?[0-9.e+]{1,25}|null|true|\[\]|\{\}),?){0,6}\}"#) {
            if let Ok(parsed) = TokenResponse::parse(body.as_bytes()) {
                let _ = parsed.into_token(SystemTime::UNIX_EPOCH, None);
            }
            let _ = ErrorResponse::parse(body.as_bytes());
        }

        #[test]
        fn c13_retry_after_never_panics(value in "[ -~]{0,40}", now in 0u64..(1 << 36)) {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::RETRY_AFTER, value);
                let _ = retry_after(&headers, epoch(now));
            }
        }
    }
}
