//! RFC 6750 / RFC 9110 `WWW-Authenticate` parsing: several challenges per header,
//! auth-params with quoted strings and escapes, token68. Bad input gives a typed error,
//! never a panic ([C13](crate#c13)).

use std::fmt;

/// One challenge of a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Challenge {
    /// The auth scheme as written (compare case-insensitively).
    pub scheme: String,
    /// A token68 value, if the challenge carried one instead of parameters.
    pub token68: Option<String>,
    /// The auth-params in order, names lower-cased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (case-insensitive).
    ///
    /// ```
    /// use tokenflight::adapter::www_authenticate::parse;
    /// let challenges = parse(r#"Bearer realm="api", error="invalid_token""#).unwrap();
    /// assert_eq!(challenges[0].param("ERROR"), Some("invalid_token"));
    /// assert_eq!(challenges[0].param("scope"), None);
    /// ```
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True when the scheme is `Bearer`.
    ///
    /// ```
    /// use tokenflight::adapter::www_authenticate::parse;
    /// let challenges = parse(r#"Basic realm="x", bearer realm="y""#).unwrap();
    /// assert!(!challenges[0].is_bearer());
    /// assert!(challenges[1].is_bearer(), "schemes compare case-insensitively");
    /// ```
    pub fn is_bearer(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("bearer")
    }
}

/// A `WWW-Authenticate` value that does not follow the grammar.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed WWW-Authenticate header at byte {position}: {reason}")]
#[non_exhaustive]
pub struct ParseError {
    /// Byte offset where parsing failed.
    pub position: usize,
    /// What was expected.
    pub reason: &'static str,
}

/// What an RFC 6750 `error` attribute says about the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BearerError {
    /// `invalid_token`: expired, revoked or malformed — a refresh can cure it.
    InvalidToken,
    /// `insufficient_scope`: the token is fine but lacks a scope — a refresh cannot help.
    InsufficientScope,
    /// `invalid_request`: the request was malformed.
    InvalidRequest,
    /// Any other code.
    Other,
}

impl fmt::Display for BearerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BearerError::InvalidToken => "invalid_token",
            BearerError::InsufficientScope => "insufficient_scope",
            BearerError::InvalidRequest => "invalid_request",
            BearerError::Other => "other",
        })
    }
}

/// True when a `DPoP` challenge of the header says `error="use_dpop_nonce"` (RFC 9449
/// §9): the server wants a proof with the nonce of its `DPoP-Nonce` header. A header
/// that does not parse says no such thing.
///
/// ```
/// use tokenflight::adapter::www_authenticate::is_use_dpop_nonce;
/// assert!(is_use_dpop_nonce(r#"DPoP error="use_dpop_nonce", algs="ES256""#));
/// assert!(is_use_dpop_nonce(r#"Bearer realm="x", DPoP error="use_dpop_nonce""#));
/// assert!(!is_use_dpop_nonce(r#"DPoP error="invalid_token""#));
/// assert!(!is_use_dpop_nonce(r#"Bearer error="use_dpop_nonce""#));
/// assert!(!is_use_dpop_nonce("DPoP error=\"unterminated"));
/// ```
pub fn is_use_dpop_nonce(header: &str) -> bool {
    parse(header).is_ok_and(|challenges| {
        challenges.iter().any(|c| {
            c.scheme.eq_ignore_ascii_case("dpop") && c.param("error") == Some("use_dpop_nonce")
        })
    })
}

/// The `error` of the first Bearer challenge in a header value, if any.
///
/// ```
/// use tokenflight::adapter::www_authenticate::{BearerError, bearer_error};
/// let header = r#"Basic realm="x", Bearer error="invalid_token""#;
/// assert_eq!(bearer_error(header).unwrap(), Some(BearerError::InvalidToken));
/// assert_eq!(bearer_error(r#"Bearer realm="api""#).unwrap(), None);
/// assert!(bearer_error(r#"Bearer error="unclosed"#).is_err());
/// ```
pub fn bearer_error(header: &str) -> Result<Option<BearerError>, ParseError> {
    let challenges = parse(header)?;
    let code = challenges
        .iter()
        .filter(|c| c.is_bearer())
        .find_map(|c| c.param("error"));
    Ok(code.map(|code| match code {
        "invalid_token" => BearerError::InvalidToken,
        "insufficient_scope" => BearerError::InsufficientScope,
        "invalid_request" => BearerError::InvalidRequest,
        _ => BearerError::Other,
    }))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn skip_ws_and_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.pos += 1;
        }
    }

    fn take_while(&mut self, pred: impl Fn(u8) -> bool) -> &str {
        let start = self.pos;
        while self.peek().is_some_and(&pred) {
            self.pos += 1;
        }
        // Only ASCII bytes pass the predicates used here, so this is valid UTF-8.
        std::str::from_utf8(self.bytes.get(start..self.pos).unwrap_or_default()).unwrap_or("")
    }

    fn error(&self, reason: &'static str) -> ParseError {
        ParseError {
            position: self.pos,
            reason,
        }
    }

    fn quoted_string(&mut self) -> Result<String, ParseError> {
        // Opening quote already seen.
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated quoted string")),
                Some(b'"') => {
                    self.pos += 1;
                    return String::from_utf8(out)
                        .map_err(|_| self.error("quoted string is not UTF-8"));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b) => {
                            out.push(b);
                            self.pos += 1;
                        }
                        None => return Err(self.error("dangling escape in quoted string")),
                    }
                }
                Some(b) => {
                    out.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    /// True when what follows is `token =` (an auth-param), not a new challenge.
    fn at_auth_param(&self) -> bool {
        let mut i = self.pos;
        while self.bytes.get(i).copied().is_some_and(is_tchar) {
            i += 1;
        }
        if i == self.pos {
            return false;
        }
        while matches!(self.bytes.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        if self.bytes.get(i) != Some(&b'=') {
            return false;
        }
        // `token=` is a param only if a value follows the '=': otherwise it is a token68
        // with '=' padding (`Basic YWJj==`, `Negotiate YWI=`, `Negotiate YWI=, Basic`).
        i += 1;
        while matches!(self.bytes.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        self.bytes
            .get(i)
            .copied()
            .is_some_and(|b| b == b'"' || is_tchar(b))
    }
}

/// Parses all challenges of one `WWW-Authenticate` header value.
///
/// ```
/// use tokenflight::adapter::www_authenticate::parse;
/// let challenges = parse(r#"Bearer realm="api", scope="read write", DPoP algs="ES256""#).unwrap();
/// assert_eq!(challenges.len(), 2);
/// assert_eq!(challenges[0].params, [
///     ("realm".to_owned(), "api".to_owned()),
///     ("scope".to_owned(), "read write".to_owned()),
/// ]);
/// assert_eq!(challenges[1].param("algs"), Some("ES256"));
/// ```
pub fn parse(header: &str) -> Result<Vec<Challenge>, ParseError> {
    let mut cur = Cursor {
        bytes: header.as_bytes(),
        pos: 0,
    };
    let mut challenges = Vec::new();
    cur.skip_ws_and_commas();
    while cur.peek().is_some() {
        let scheme = cur.take_while(is_tchar).to_owned();
        if scheme.is_empty() {
            return Err(cur.error("expected an auth scheme"));
        }
        let mut challenge = Challenge {
            scheme,
            token68: None,
            params: Vec::new(),
        };
        cur.skip_ws();
        if !cur.at_auth_param() && cur.peek().is_some_and(is_token68_char) {
            let value = cur.take_while(is_token68_char).to_owned();
            let padding = cur.take_while(|b| b == b'=').to_owned();
            challenge.token68 = Some(value + &padding);
            cur.skip_ws();
        }
        // Parameters, separated by commas, until a new challenge or the end.
        loop {
            cur.skip_ws_and_commas();
            if challenge.token68.is_some() || !cur.at_auth_param() {
                break;
            }
            let name = cur.take_while(is_tchar).to_ascii_lowercase();
            cur.skip_ws();
            // at_auth_param guaranteed the '='.
            cur.pos += 1;
            cur.skip_ws();
            let value = match cur.peek() {
                Some(b'"') => cur.quoted_string()?,
                Some(b) if is_tchar(b) => cur.take_while(is_tchar).to_owned(),
                _ => return Err(cur.error("expected a token or quoted string after '='")),
            };
            challenge.params.push((name, value));
            cur.skip_ws();
            match cur.peek() {
                None | Some(b',') => {}
                Some(_) => return Err(cur.error("expected ',' between parameters")),
            }
        }
        challenges.push(challenge);
        cur.skip_ws_and_commas();
    }
    Ok(challenges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_several_challenges_with_quoted_escapes() {
        let parsed = parse(
            r#"Basic realm="a \"b\", c", Bearer realm="api", error="invalid_token", error_description="expired", Negotiate abc=="#,
        )
        .unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].param("realm"), Some(r#"a "b", c"#));
        assert!(parsed[1].is_bearer());
        assert_eq!(parsed[1].param("ERROR"), Some("invalid_token"));
        assert_eq!(parsed[2].token68.as_deref(), Some("abc=="));
    }

    #[test]
    fn bearer_error_distinguishes_invalid_token_from_scope() {
        assert_eq!(
            bearer_error(r#"Bearer error="invalid_token""#).unwrap(),
            Some(BearerError::InvalidToken)
        );
        assert_eq!(
            bearer_error(r#"Bearer realm="x", error=insufficient_scope, scope="read""#).unwrap(),
            Some(BearerError::InsufficientScope)
        );
        assert_eq!(bearer_error("Bearer").unwrap(), None);
        assert_eq!(bearer_error(r#"Basic realm="x""#).unwrap(), None);
    }

    #[test]
    fn token68_with_single_padding_is_not_a_parameter() {
        let parsed = parse(r#"Negotiate YWI=, Bearer error="invalid_token""#).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].token68.as_deref(), Some("YWI="));
        assert!(parsed[0].params.is_empty());
        assert_eq!(parsed[1].param("error"), Some("invalid_token"));
        assert_eq!(
            parse("Negotiate YWI=").unwrap()[0].token68.as_deref(),
            Some("YWI=")
        );
        // Whitespace around '=' still makes a parameter.
        assert_eq!(
            parse("Bearer error = invalid_token").unwrap()[0].param("error"),
            Some("invalid_token")
        );
    }

    #[test]
    fn quoted_strings_keep_utf8_and_escapes() {
        let parsed = parse(r#"Bearer realm="caf\é \\ \"q\"""#).unwrap();
        assert_eq!(parsed[0].param("realm"), Some(r#"café \ "q""#));
    }

    proptest::proptest! {
        #[test]
        fn c13_parse_never_panics(header in r#"[ -~\t]{0,120}"#) {
            let _ = parse(&header);
            let _ = bearer_error(&header);
        }

        #[test]
        fn c13_parse_never_panics_on_challenge_like_text(
            header in r#"(( |,)*[A-Za-z]{1,8}( [A-Za-z0-9+/]{1,6}=*)?( *[a-z_]{1,6} *= *("([^"\\]|\\.){0,6}"?|[a-z]{0,4}) *,?)*){0,4}"#,
        ) {
            if let Ok(challenges) = parse(&header) {
                for challenge in &challenges {
                    proptest::prop_assert!(!challenge.scheme.is_empty());
                }
            }
        }

        #[test]
        fn quoted_values_round_trip(value in "[ -~é]{0,20}") {
            let quoted: String = value.chars().flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c => vec![c],
            }).collect();
            let parsed = parse(&format!(r#"Bearer realm="{quoted}", error="invalid_token""#)).unwrap();
            proptest::prop_assert_eq!(parsed[0].param("realm"), Some(value.as_str()));
            proptest::prop_assert_eq!(parsed[0].param("error"), Some("invalid_token"));
        }
    }

    #[test]
    fn c13_garbage_is_a_typed_error() {
        assert!(parse(r#"Bearer error="unterminated"#).is_err());
        assert!(parse(r#"Bearer error="x" junk"#).is_err());
        assert!(parse("=").is_err());
        assert!(parse(r#"Bearer a="\"#).is_err());
        assert_eq!(parse("").unwrap(), vec![]);
    }
}
