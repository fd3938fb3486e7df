//! Reads the time claims (`exp`, `iat`, `nbf`) of a JWT *without verifying its
//! signature*. This is only for scheduling: an access token's own `exp` tells when to
//! refresh when a token response has no `expires_in`. Never use it to trust a token.
//!
//! Bad input gives a typed [`JwtError`], never a panic ([C13](crate#c13)).

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Tokens longer than this are not decoded (a JWT access token is a few KiB at most).
const MAX_JWT_LEN: usize = 16 * 1024;

/// base64url as RFC 7515 §2 uses it: no padding, but padding is tolerated because
/// some issuers add it anyway.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The time claims of a JWT; each is `None` when the claim is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TimeClaims {
    /// `exp`: when the token expires.
    pub exp: Option<SystemTime>,
    /// `iat`: when the token was issued.
    pub iat: Option<SystemTime>,
    /// `nbf`: the token is not valid before this time.
    pub nbf: Option<SystemTime>,
}

/// Why a string could not be read as a JWT. Never contains the token itself ([C12](crate#c12)).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three dot-separated segments (header.payload.signature).
    #[error("not a JWT: expected three dot-separated segments")]
    NotAJwt,
    /// The token is longer than the reader accepts.
    #[error("JWT longer than {limit} bytes")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// A segment is not valid base64url.
    #[error("JWT {segment} is not valid base64url")]
    Base64 {
        /// `"header"` or `"payload"`.
        segment: &'static str,
    },
    /// A segment is not a JSON object.
    #[error("JWT {segment} is not a JSON object")]
    Json {
        /// `"header"` or `"payload"`.
        segment: &'static str,
    },
    /// A time claim is not a non-negative number of seconds that fits a timestamp.
    #[error("JWT claim `{claim}` is not a valid NumericDate")]
    InvalidClaim {
        /// The claim's name.
        claim: &'static str,
    },
}

/// Reads `exp`, `iat` and `nbf` from a compact JWS without checking its signature.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// // header {"alg":"none"}, payload {"exp":1700000000}
/// let claims = tokenflight::oauth2::jwt::time_claims("eyJhbGciOiJub25lIn0.eyJleHAiOjE3MDAwMDAwMDB9.").unwrap();
/// assert_eq!(claims.exp, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
/// assert!(tokenflight::oauth2::jwt::time_claims("not a jwt").is_err());
/// ```
pub fn time_claims(token: &str) -> Result<TimeClaims, JwtError> {
    if token.len() > MAX_JWT_LEN {
        return Err(JwtError::TooLong { limit: MAX_JWT_LEN });
    }
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(JwtError::NotAJwt);
    };
    // The header must at least be a JSON object: this is what tells a JWT from an
    // opaque token that happens to contain two dots.
    decode_object(header, "header")?;
    let payload = decode_object(payload, "payload")?;
    Ok(TimeClaims {
        exp: numeric_date(&payload, "exp")?,
        iat: numeric_date(&payload, "iat")?,
        nbf: numeric_date(&payload, "nbf")?,
    })
}

/// The `exp` claim of `token` if it is a JWT that has one; `None` for anything else.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tokenflight::oauth2::jwt::expiry;
/// // header {"alg":"none"}, payload {"exp":1700000000}
/// let jwt = "eyJhbGciOiJub25lIn0.eyJleHAiOjE3MDAwMDAwMDB9.";
/// assert_eq!(expiry(jwt), Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
/// assert_eq!(expiry("an opaque token"), None);
/// ```
pub fn expiry(token: &str) -> Option<SystemTime> {
    time_claims(token).ok().and_then(|claims| claims.exp)
}

fn decode_object(
    segment: &str,
    name: &'static str,
) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    let bytes = BASE64URL
        .decode(segment)
        .map_err(|_| JwtError::Base64 { segment: name })?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Json { segment: name }),
    }
}

/// RFC 7519 §2 NumericDate: seconds since the epoch, possibly fractional.
fn numeric_date(
    payload: &serde_json::Map<String, serde_json::Value>,
    claim: &'static str,
) -> Result<Option<SystemTime>, JwtError> {
    let Some(value) = payload.get(claim) else {
        return Ok(None);
    };
    let invalid = JwtError::InvalidClaim { claim };
    let since_epoch = if let Some(secs) = value.as_u64() {
        Duration::from_secs(secs)
    } else {
        let secs = value.as_f64().ok_or(invalid.clone())?;
        if !(secs.is_finite() && secs >= 0.0) {
            return Err(invalid);
        }
        Duration::try_from_secs_f64(secs).map_err(|_| invalid.clone())?
    };
    SystemTime::UNIX_EPOCH
        .checked_add(since_epoch)
        .map(Some)
        .ok_or(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn reads_exp_iat_nbf() {
        let claims =
            time_claims(&jwt(r#"{"sub":"x","exp":2000,"iat":1000,"nbf":1500.5}"#)).unwrap();
        assert_eq!(claims.exp, Some(at(2000)));
        assert_eq!(claims.iat, Some(at(1000)));
        assert_eq!(claims.nbf, Some(at(1500) + Duration::from_millis(500)));
        assert_eq!(expiry(&jwt(r#"{"sub":"x"}"#)), None);
    }

    #[test]
    fn tolerates_padding() {
        let padded = format!(
            "{}.{}.",
            URL_SAFE.encode(r#"{"alg":"none"}"#),
            URL_SAFE.encode(r#"{"exp":7}"#)
        );
        assert!(padded.contains('='), "{padded}");
        assert_eq!(expiry(&padded), Some(at(7)));
    }

    #[test]
    fn c13_garbage_is_a_typed_error() {
        assert_eq!(time_claims(""), Err(JwtError::NotAJwt));
        assert_eq!(time_claims("a.b"), Err(JwtError::NotAJwt));
        assert_eq!(time_claims("a.b.c.d"), Err(JwtError::NotAJwt));
        assert_eq!(
            time_claims("!!!.e30.x"),
            Err(JwtError::Base64 { segment: "header" })
        );
        let not_object = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode("{}"),
            URL_SAFE_NO_PAD.encode("[1]")
        );
        assert_eq!(
            time_claims(&not_object),
            Err(JwtError::Json { segment: "payload" })
        );
        for bad in [
            r#"{"exp":-1}"#,
            r#"{"exp":"soon"}"#,
            r#"{"exp":1e308}"#,
            r#"{"iat":null}"#,
        ] {
            let claim = if bad.contains("iat") { "iat" } else { "exp" };
            assert_eq!(
                time_claims(&jwt(bad)),
                Err(JwtError::InvalidClaim { claim }),
                "{bad}"
            );
        }
        let long = "a".repeat(MAX_JWT_LEN + 1);
        assert!(matches!(time_claims(&long), Err(JwtError::TooLong { .. })));
    }

    #[test]
    fn c12_errors_never_show_the_token() {
        let secret = jwt(r#"{"exp":"SECRET-CLAIM"}"#);
        let err = time_claims(&secret).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains("SECRET") && !shown.contains(&secret),
            "{shown}"
        );
    }

    proptest::proptest! {
        #[test]
        fn c13_never_panics_on_arbitrary_strings(s in ".{0,300}") {
            let _ = time_claims(&s);
        }

        #[test]
        fn c13_never_panics_on_jwt_shaped_input(
            header in "[A-Za-z0-9_=-]{0,40}",
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let token = format!("{header}.{}.sig", URL_SAFE_NO_PAD.encode(&payload));
            let _ = time_claims(&token);
        }

        #[test]
        fn exp_round_trips(exp in 0u64..(1 << 40)) {
            prop_assert_eq_exp(exp)?;
        }
    }

    fn prop_assert_eq_exp(exp: u64) -> Result<(), proptest::test_runner::TestCaseError> {
        proptest::prop_assert_eq!(expiry(&jwt(&format!(r#"{{"exp":{exp}}}"#))), Some(at(exp)));
        Ok(())
    }
}
