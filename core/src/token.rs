//! The token itself: secrets that never print, an expiry, and a generation.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use zeroize::Zeroize;

/// A secret string (an access or refresh token).
///
/// `Debug` and `Display` print `[redacted]`; the value is reachable only through
/// [`Secret::expose`], so every place that reads it is easy to find ([C12](crate#c12)).
///
/// Clones share one allocation. When the last clone is dropped, its bytes are
/// overwritten with zeros (the [`zeroize`] crate) before the memory is freed;
/// [`Secret::from`] a `String` also wipes the `String` it copied. Copies made elsewhere
/// are not wiped (header values, HTTP clients' buffers, parsers' buffers): see the
/// guide, [Secrets in memory](crate::guide::secrets).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

/// Overwrites `value` with zeros if this is its only holder; says whether it did.
fn wipe_if_last(value: &mut Arc<str>) -> bool {
    match Arc::get_mut(value) {
        Some(bytes) => {
            bytes.zeroize();
            true
        }
        None => false,
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe_if_last(&mut self.0);
    }
}

impl Secret {
    /// Wraps a secret value.
    ///
    /// ```
    /// use tokenflight::Secret;
    /// let secret = Secret::new("s3cr3t");
    /// assert_eq!(secret.expose(), "s3cr3t");
    /// ```
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Do not log it.
    ///
    /// ```
    /// use tokenflight::Secret;
    /// let secret = Secret::new("s3cr3t");
    /// assert_eq!(secret.expose(), "s3cr3t");
    /// // Debug never shows it.
    /// assert!(!format!("{secret:?}").contains("s3cr3t"));
    /// ```
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    /// Copies the value into the secret's shared allocation and wipes the `String`.
    fn from(mut value: String) -> Self {
        let secret = Secret::new(value.as_str());
        value.zeroize();
        secret
    }
}

/// An access token with its optional refresh token, expiry and generation.
///
/// The `generation` grows by one with every new token the coordinator installs (also
/// across processes when a shared store is used); a request remembers the generation it
/// carried, so a rejection of an older token is recognised as stale ([C3](crate#c3)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    access: Secret,
    refresh: Option<Secret>,
    expires_at: Option<SystemTime>,
    obtained: Option<SystemTime>,
    generation: u64,
}

impl Token {
    /// A token with the given access secret, no refresh token, no known expiry and
    /// generation 0 (the coordinator assigns generations when it installs a token).
    ///
    /// ```
    /// use tokenflight::Token;
    /// let token = Token::new("access");
    /// assert_eq!(token.access().expose(), "access");
    /// assert!(token.refresh().is_none() && token.expiry().is_none());
    /// assert_eq!(token.generation(), 0);
    /// ```
    pub fn new(access: impl Into<Secret>) -> Self {
        Token {
            access: access.into(),
            refresh: None,
            expires_at: None,
            obtained: None,
            generation: 0,
        }
    }

    /// Sets the refresh token.
    ///
    /// ```
    /// use tokenflight::Token;
    /// let token = Token::new("access").with_refresh("refresh");
    /// assert_eq!(token.refresh().map(|r| r.expose()), Some("refresh"));
    /// ```
    pub fn with_refresh(mut self, refresh: impl Into<Secret>) -> Self {
        self.refresh = Some(refresh.into());
        self
    }

    /// Sets or clears the refresh token (for a response that may or may not carry one).
    pub(crate) fn set_refresh(mut self, refresh: Option<Secret>) -> Self {
        self.refresh = refresh;
        self
    }

    /// Sets the absolute expiry time.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let token = Token::new("access").expires_at(at);
    /// assert_eq!(token.expiry(), Some(at));
    /// ```
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets the expiry as a lifetime counted from `now`, and records `now` as the time
    /// the token was obtained, so the coordinator knows its lifetime ([C15](crate#c15)).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let token = Token::new("access").expires_in(Duration::from_secs(3600), now);
    /// assert_eq!(token.expiry(), Some(now + Duration::from_secs(3600)));
    /// assert_eq!(token.obtained(), Some(now));
    /// assert_eq!(token.lifetime(), Some(Duration::from_secs(3600)));
    /// ```
    pub fn expires_in(self, lifetime: Duration, now: SystemTime) -> Self {
        match now.checked_add(lifetime) {
            Some(at) => self.expires_at(at).obtained_at(now),
            // A lifetime too large to represent never expires in practice.
            None => self.obtained_at(now),
        }
    }

    /// Records when the token was obtained (received from the server). With an expiry
    /// this gives the token's lifetime, to which the coordinator scales its timing
    /// ([C15](crate#c15)). The coordinator stamps tokens that arrive without it.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let token = Token::new("access")
    ///     .obtained_at(now)
    ///     .expires_at(now + Duration::from_secs(60));
    /// assert_eq!(token.lifetime(), Some(Duration::from_secs(60)));
    /// ```
    pub fn obtained_at(mut self, at: SystemTime) -> Self {
        self.obtained = Some(at);
        self
    }

    /// When the token was obtained, if known.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// assert_eq!(Token::new("a").obtained(), None);
    /// assert_eq!(Token::new("a").obtained_at(now).obtained(), Some(now));
    /// ```
    pub fn obtained(&self) -> Option<SystemTime> {
        self.obtained
    }

    /// The token's whole lifetime (expiry minus the time it was obtained), if both are
    /// known. Zero for a token that arrived already expired.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let token = Token::new("a").expires_in(Duration::from_secs(300), now);
    /// assert_eq!(token.lifetime(), Some(Duration::from_secs(300)));
    /// assert_eq!(Token::new("a").expires_at(now).lifetime(), None);
    /// ```
    pub fn lifetime(&self) -> Option<Duration> {
        let (obtained, expires) = (self.obtained?, self.expires_at?);
        Some(expires.duration_since(obtained).unwrap_or(Duration::ZERO))
    }

    /// How long ago the token was obtained at `now` (zero if the clock stepped back past
    /// it), if known.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let token = Token::new("a").obtained_at(now);
    /// assert_eq!(token.age(now + Duration::from_secs(7)), Some(Duration::from_secs(7)));
    /// assert_eq!(token.age(now - Duration::from_secs(7)), Some(Duration::ZERO));
    /// ```
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.obtained
            .map(|at| now.duration_since(at).unwrap_or(Duration::ZERO))
    }

    /// For [token stores](crate::store::TokenStore) and their tests: the token numbered
    /// with the generation it was saved under. Applications never number tokens; the
    /// coordinator does ([C3](crate#c3), [C17](crate#c17)), and numbers every token a
    /// source returns itself.
    ///
    /// ```
    /// use tokenflight::Token;
    /// let stored = Token::new("secret").with_generation(7);
    /// assert_eq!(stored.generation(), 7);
    /// ```
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// The access secret.
    ///
    /// ```
    /// use tokenflight::Token;
    /// let token = Token::new("access");
    /// let header = format!("Bearer {}", token.access().expose());
    /// assert_eq!(header, "Bearer access");
    /// ```
    pub fn access(&self) -> &Secret {
        &self.access
    }

    /// Whether the access secret can be sent at all: only the characters RFC 6749
    /// allows in an access token (VSCHAR, `%x20-7E`). A control character or a
    /// non-ASCII byte would make every request fail to build its header, and a token
    /// that never reaches a server is never rejected by one, so the coordinator
    /// refuses such a token where it arrives instead of serving it until it expires.
    pub(crate) fn is_sendable(&self) -> bool {
        self.access
            .expose()
            .bytes()
            .all(|byte| (0x20..=0x7e).contains(&byte))
    }

    /// The refresh secret, if any.
    ///
    /// ```
    /// use tokenflight::Token;
    /// assert!(Token::new("a").refresh().is_none());
    /// let token = Token::new("a").with_refresh("r");
    /// assert_eq!(token.refresh().unwrap().expose(), "r");
    /// ```
    pub fn refresh(&self) -> Option<&Secret> {
        self.refresh.as_ref()
    }

    /// When the token expires, if known. `None` means "valid until rejected".
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// assert_eq!(Token::new("a").expiry(), None);
    /// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(60);
    /// assert_eq!(Token::new("a").expires_at(at).expiry(), Some(at));
    /// ```
    pub fn expiry(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// The generation (see the type's docs).
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(async {
    ///     let first = flight.token().await.unwrap();
    ///     let second = flight.force_refresh().await.unwrap();
    ///     assert!(second.generation() > first.generation());
    /// });
    /// ```
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True when the token is expired at `now`, or will be within `leeway` ([C7](crate#c7)).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let token = Token::new("a").expires_at(now + Duration::from_secs(30));
    /// assert!(!token.is_expired(now, Duration::from_secs(10)));
    /// // Within the leeway counts as expired.
    /// assert!(token.is_expired(now, Duration::from_secs(30)));
    /// assert!(!Token::new("no expiry").is_expired(now, Duration::from_secs(3600)));
    /// ```
    pub fn is_expired(&self, now: SystemTime, leeway: Duration) -> bool {
        match self.expires_at {
            None => false,
            Some(at) => now.checked_add(leeway).is_none_or(|t| t >= at),
        }
    }

    /// Time left until expiry at `now` (zero if already expired, `None` if unknown).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenflight::Token;
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let token = Token::new("a").expires_at(now + Duration::from_secs(30));
    /// assert_eq!(token.remaining(now), Some(Duration::from_secs(30)));
    /// assert_eq!(token.remaining(now + Duration::from_secs(60)), Some(Duration::ZERO));
    /// assert_eq!(Token::new("a").remaining(now), None);
    /// ```
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.expires_at
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c12_secrets_never_print() {
        let token = Token::new("access-XYZ").with_refresh("refresh-ABC");
        let shown = format!("{token:?} {} {:?}", token.access(), token.refresh());
        assert!(!shown.contains("XYZ") && !shown.contains("ABC"), "{shown}");
        assert!(shown.contains("[redacted]"));
        assert_eq!(token.access().expose(), "access-XYZ");
    }

    #[test]
    fn c12_the_last_holder_wipes_the_secret() {
        let mut value: Arc<str> = Arc::from("access-XYZ");
        let other = Arc::clone(&value);
        // Shared: nobody wipes what another holder still reads.
        assert!(!wipe_if_last(&mut value));
        assert_eq!(&*other, "access-XYZ");
        drop(other);
        // The last holder: the bytes themselves are zeros before the memory is freed.
        assert!(wipe_if_last(&mut value));
        assert_eq!(value.as_bytes(), &[0u8; 10]);
    }

    #[test]
    fn c12_dropping_a_clone_leaves_the_others_intact() {
        let secret = Secret::from(String::from("refresh-ABC"));
        let token = Token::new(secret.clone());
        drop(secret);
        assert_eq!(token.access().expose(), "refresh-ABC");
        let copy = token.clone();
        drop(token);
        assert_eq!(copy.access().expose(), "refresh-ABC");
    }

    #[test]
    fn c7_leeway_counts_as_expired() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let token = Token::new("a").expires_in(Duration::from_secs(30), now);
        assert!(!token.is_expired(now, Duration::from_secs(29)));
        assert!(token.is_expired(now, Duration::from_secs(30)));
        assert!(!Token::new("a").is_expired(now, Duration::from_secs(1 << 40)));
    }
}
