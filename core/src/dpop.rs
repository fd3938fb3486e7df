//! DPoP (RFC 9449): sender-constrained tokens. The client holds a key pair; every HTTP
//! request carries a fresh proof — a JWS of type `dpop+jwt` whose header holds the
//! public key (`jwk`) and whose claims name the request (`htm`, `htu`), the time
//! (`iat`), a never-reused id (`jti`), the access token's hash (`ath`, on resource
//! requests) and the server's `nonce` once it demanded one. A token the server bound to
//! the key's thumbprint (`cnf.jkt`, RFC 7638) is useless to whoever steals it without
//! the key.
//!
//! Keys are ES256 (P-256) and sign with [ring](https://docs.rs/ring), as
//! [`oauth2::SigningKey`](crate::oauth2::SigningKey) does: constant-time, audited, no OpenSSL,
//! and already the workspace's TLS provider. The private key never appears in `Debug`,
//! `Display` or an error ([C12](crate#c12)).
//!
//! Sharing across processes: a token bound to one key is useless with another, so
//! every process that adopts a token from a shared store must sign with the same key.
//! tokenflight does not store the key with the token; every process loads the same key
//! from PEM ([`DpopKey::from_pem_file`]), written once with [`DpopKey::generate_pem`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use url::Url;

use crate::jws::{Algorithm, KeyError, SigningKey};
use crate::request::ResponseView;
use crate::token::Secret;

/// base64url without padding (RFC 7515 §2).
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The `DPoP-Nonce` response header (RFC 9449 §8).
pub const DPOP_NONCE: http::HeaderName = http::HeaderName::from_static("dpop-nonce");
/// The `DPoP` request header that carries the proof (RFC 9449 §4.1).
pub const DPOP: http::HeaderName = http::HeaderName::from_static("dpop");

/// A DPoP key pair (ES256): signs proofs, knows its public JWK and thumbprint. Cheap to
/// clone (the key is shared).
///
/// ```
/// use tokenflight::dpop::DpopKey;
/// let key = DpopKey::generate()?;
/// assert_eq!(key.jwk()["kty"], "EC");
/// assert_eq!(key.thumbprint().len(), 43); // SHA-256, base64url without padding
/// // Debug shows the thumbprint, never the private key.
/// assert!(format!("{key:?}").contains(key.thumbprint()));
/// # Ok::<(), tokenflight::oauth2::KeyError>(())
/// ```
#[derive(Clone)]
pub struct DpopKey {
    key: SigningKey,
    jwk: Arc<serde_json::Value>,
    thumbprint: Arc<str>,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("alg", &self.key.algorithm())
            .field("jkt", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// The parts of a P-256 public key's JWK, from its uncompressed SEC1 point
/// `0x04 || x || y` (32 bytes each).
fn ec_coordinates(point: &[u8]) -> Option<(&[u8], &[u8])> {
    match point {
        [0x04, rest @ ..] if rest.len() == 64 => Some(rest.split_at(32)),
        _ => None,
    }
}

impl DpopKey {
    /// A new random key pair from the system's secure random generator. It lives only
    /// in this process: for a fleet, use [`generate_pem`](Self::generate_pem) once and
    /// [`from_pem_file`](Self::from_pem_file) everywhere.
    pub fn generate() -> Result<Self, KeyError> {
        Self::from_pem(Self::generate_pem()?.expose())
    }

    /// A new random P-256 private key as PKCS#8 PEM, to store where every process that
    /// shares a token can load it.
    ///
    /// ```
    /// use tokenflight::dpop::DpopKey;
    /// let pem = DpopKey::generate_pem()?;
    /// let a = DpopKey::from_pem(pem.expose())?;
    /// let b = DpopKey::from_pem(pem.expose())?;
    /// assert_eq!(a.thumbprint(), b.thumbprint()); // the same key
    /// assert_ne!(a.thumbprint(), DpopKey::generate()?.thumbprint());
    /// # Ok::<(), tokenflight::oauth2::KeyError>(())
    /// ```
    pub fn generate_pem() -> Result<Secret, KeyError> {
        SigningKey::generate_es256_pem()
    }

    /// Loads a P-256 private key from PEM (PKCS#8 or SEC1). RSA keys are refused
    /// ([`KeyError::Unsupported`]): DPoP here signs ES256 only.
    ///
    /// ```
    /// use tokenflight::dpop::DpopKey;
    /// // A test key; never use it for anything real.
    /// let pem = "-----BEGIN PRIVATE KEY-----
    /// MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSHs7lk0UXZap3eaY
    /// Xl3d7ejcG+7ZPjvk1WCaiHrw9LahRANCAATRaQYySBWfUM+bW8E16mk3VD7XhHiC
    /// iONpjaWczeUra+dMGDrCCHltsd/tNDVjGd2JkW23x89zZB2DqUM3ffbO
    /// -----END PRIVATE KEY-----";
    /// let key = DpopKey::from_pem(pem)?;
    /// assert_eq!(key.jwk()["crv"], "P-256");
    /// assert!(DpopKey::from_pem("not a key").is_err());
    /// # Ok::<(), tokenflight::oauth2::KeyError>(())
    /// ```
    pub fn from_pem(pem: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        let key = SigningKey::from_pem(pem)?;
        if key.algorithm() != Algorithm::Es256 {
            return Err(KeyError::Unsupported);
        }
        let (x, y) = ec_coordinates(key.public_key()).ok_or(KeyError::Unsupported)?;
        let (x, y) = (B64.encode(x), B64.encode(y));
        // RFC 7638 §3.2: the required members only, in lexicographic order, no spaces.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = B64.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ));
        let jwk = serde_json::json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y });
        Ok(DpopKey {
            key,
            jwk: Arc::new(jwk),
            thumbprint: thumbprint.into(),
        })
    }

    /// [`from_pem`](Self::from_pem) of a file's contents.
    pub fn from_pem_file(path: impl AsRef<std::path::Path>) -> Result<Self, KeyError> {
        let pem = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| KeyError::Io(e.kind().to_string()))?,
        );
        Self::from_pem(&*pem)
    }

    /// The public key as a JWK (`kty`, `crv`, `x`, `y`): what each proof's header carries.
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// The JWK thumbprint (RFC 7638, SHA-256, base64url): the `jkt` a server binds
    /// tokens to (`cnf.jkt`, the `dpop_jkt` authorization parameter).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A proof for one request at the current time: see [`proof_at`](Self::proof_at).
    pub fn proof(
        &self,
        method: &http::Method,
        url: &Url,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<Secret, KeyError> {
        self.proof_at(method, url, access_token, nonce, SystemTime::now())
    }

    /// A proof for one request (RFC 9449 §4.2): `htm` is `method`, `htu` is `url`
    /// without query and fragment ([`htu`]), `iat` is `now`, `jti` is fresh (128
    /// random bits), `ath` is the hash of `access_token` when given (resource
    /// requests), `nonce` when given.
    ///
    /// ```
    /// use tokenflight::dpop::DpopKey;
    /// let key = DpopKey::generate()?;
    /// let url = url::Url::parse("https://api.example/v1/items?page=2#top").unwrap();
    /// let proof = key.proof(&http::Method::GET, &url, Some("AT"), Some("n-1"))?;
    /// assert_eq!(proof.expose().split('.').count(), 3);
    /// // Each proof is new (its own jti), even for the same request.
    /// let again = key.proof(&http::Method::GET, &url, Some("AT"), Some("n-1"))?;
    /// assert_ne!(proof.expose(), again.expose());
    /// # Ok::<(), tokenflight::oauth2::KeyError>(())
    /// ```
    pub fn proof_at(
        &self,
        method: &http::Method,
        url: &Url,
        access_token: Option<&str>,
        nonce: Option<&str>,
        now: SystemTime,
    ) -> Result<Secret, KeyError> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut claims = serde_json::json!({
            "jti": self.key.random_id()?,
            "htm": method.as_str(),
            "htu": htu(url),
            "iat": iat,
        });
        if let Some(map) = claims.as_object_mut() {
            if let Some(token) = access_token {
                map.insert("ath".into(), access_token_hash(token).into());
            }
            if let Some(nonce) = nonce {
                map.insert("nonce".into(), nonce.into());
            }
        }
        let mut header = serde_json::Map::new();
        header.insert("jwk".into(), (*self.jwk).clone());
        self.key.sign_jws_with("dpop+jwt", header, &claims)
    }
}

/// The `htu` of a request to `url` (RFC 9449 §4.2): scheme, host, port and path,
/// without query, fragment or user info.
///
/// ```
/// let url = url::Url::parse("https://user:pw@API.example:443/a/b?q=1#f").unwrap();
/// assert_eq!(tokenflight::dpop::htu(&url), "https://api.example/a/b");
/// ```
pub fn htu(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    // Fails only for URLs without a host, which have no user info to remove.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.into()
}

/// The `ath` of an access token (RFC 9449 §4.2): base64url of its SHA-256.
///
/// ```
/// // The example of RFC 9449 §7.1.
/// assert_eq!(
///     tokenflight::dpop::access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
///     "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
/// );
/// ```
pub fn access_token_hash(access_token: &str) -> String {
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        access_token.as_bytes(),
    ))
}

/// The last nonce each origin (scheme, host, port) gave, shared by all requests to
/// that origin: updated from every `DPoP-Nonce` response header, read by every proof.
/// Cheap to clone (the cache is shared).
///
/// ```
/// use tokenflight::dpop::NonceCache;
/// let cache = NonceCache::default();
/// let a = url::Url::parse("https://api.example/x").unwrap();
/// let b = url::Url::parse("https://other.example/x").unwrap();
/// assert_eq!(cache.get(&a), None);
/// cache.set(&a, "n-1");
/// cache.set(&a, "n-2"); // a rotated nonce replaces the old one
/// assert_eq!(cache.get(&a).as_deref(), Some("n-2"));
/// assert_eq!(cache.get(&url::Url::parse("https://api.example/y?z").unwrap()).as_deref(), Some("n-2"));
/// assert_eq!(cache.get(&b), None);
/// ```
#[derive(Clone, Default, Debug)]
pub struct NonceCache {
    nonces: Arc<Mutex<HashMap<String, Arc<str>>>>,
}

impl NonceCache {
    /// The nonce last given by `url`'s origin.
    pub fn get(&self, url: &Url) -> Option<Arc<str>> {
        let key = url.origin().ascii_serialization();
        self.nonces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned()
    }

    /// Records `nonce` as the current one of `url`'s origin.
    pub fn set(&self, url: &Url, nonce: &str) {
        let key = url.origin().ascii_serialization();
        let mut nonces = self.nonces.lock().unwrap_or_else(PoisonError::into_inner);
        if nonces.get(&key).map(|n| &**n) != Some(nonce) {
            nonces.insert(key, nonce.into());
        }
    }

    /// Records the `DPoP-Nonce` of a response from `url`, if it has one. Returns the
    /// response's own nonce, not what the cache holds afterwards: a response to another
    /// request of the same origin may have written there meanwhile.
    pub fn update(&self, url: &Url, response: &impl ResponseView) -> Option<Arc<str>> {
        let nonce = response.header(&DPOP_NONCE)?.trim();
        if nonce.is_empty() {
            return None;
        }
        self.set(url, nonce);
        Some(nonce.into())
    }
}

/// A key and the nonces of the origins it talks to: what the auth layer attaches proofs
/// with. Cheap to clone.
///
/// ```
/// use tokenflight::dpop::Dpop;
/// let dpop = Dpop::new(tokenflight::dpop::DpopKey::generate()?);
/// let url = url::Url::parse("https://api.example/x").unwrap();
/// let proof = dpop.proof(&http::Method::POST, &url, Some("AT"))?;
/// assert!(!proof.expose().is_empty());
/// # Ok::<(), tokenflight::oauth2::KeyError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Dpop {
    key: DpopKey,
    nonces: NonceCache,
}

impl Dpop {
    /// Proofs signed by `key`, with a new nonce cache.
    pub fn new(key: DpopKey) -> Self {
        Dpop {
            key,
            nonces: NonceCache::default(),
        }
    }

    /// The key.
    pub fn key(&self) -> &DpopKey {
        &self.key
    }

    /// The nonce cache.
    pub fn nonces(&self) -> &NonceCache {
        &self.nonces
    }

    /// A proof for a request to `url`, with the origin's cached nonce if any.
    pub fn proof(
        &self,
        method: &http::Method,
        url: &Url,
        access_token: Option<&str>,
    ) -> Result<Secret, KeyError> {
        let nonce = self.nonces.get(url);
        self.key.proof(method, url, access_token, nonce.as_deref())
    }

    /// Reads a resource server's response to a request to `url`: records its
    /// `DPoP-Nonce`, and returns the nonce it demands, if it is a demand — a `401`
    /// whose `WWW-Authenticate` has a `DPoP` challenge with `error="use_dpop_nonce"`
    /// and that came with a nonce. Such a response is cured by one resend with a new
    /// proof carrying that nonce (the demand's own, whatever the cache holds by then),
    /// not by a refresh.
    pub fn observe_resource(&self, url: &Url, response: &impl ResponseView) -> Option<Arc<str>> {
        let nonce = self.nonces.update(url, response)?;
        let demand = response.status() == 401
            && response
                .header(&http::header::WWW_AUTHENTICATE)
                .is_some_and(crate::www_authenticate::is_use_dpop_nonce);
        demand.then_some(nonce)
    }

    /// A proof for a request to `url` carrying `nonce` (a demand's), not the cache's.
    pub(crate) fn proof_with_nonce(
        &self,
        method: &http::Method,
        url: &Url,
        access_token: Option<&str>,
        nonce: &str,
    ) -> Result<Secret, KeyError> {
        self.key.proof(method, url, access_token, Some(nonce))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ES256: &str = include_str!("../../tests/src/testkit/keys/test-es256.pem");
    const ES256_SEC1: &str = include_str!("../../tests/src/testkit/keys/test-es256-sec1.pem");
    const RS256: &str = include_str!("../../tests/src/testkit/keys/test-rs256.pem");

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
    }

    /// Verifies a proof the way a server does: with the key in its own header.
    fn verify(proof: &str) -> (serde_json::Value, serde_json::Value) {
        let (input, signature) = proof.rsplit_once('.').unwrap();
        let (header, claims) = input.split_once('.').unwrap();
        let (header, claims) = (decode(header), decode(claims));
        let jwk = &header["jwk"];
        let mut point = vec![0x04];
        point.extend(B64.decode(jwk["x"].as_str().unwrap()).unwrap());
        point.extend(B64.decode(jwk["y"].as_str().unwrap()).unwrap());
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(input.as_bytes(), &B64.decode(signature).unwrap())
            .unwrap();
        (header, claims)
    }

    #[test]
    fn a_proof_has_every_claim_rfc_9449_asks_for_and_verifies_with_its_own_jwk() {
        let key = DpopKey::from_pem(ES256).unwrap();
        let url = Url::parse("https://api.example:8443/v1/x?secret=1#frag").unwrap();
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let proof = key
            .proof_at(&http::Method::POST, &url, Some("AT"), Some("n-1"), now)
            .unwrap();
        let (header, claims) = verify(proof.expose());
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(&header["jwk"], key.jwk());
        assert!(header["jwk"].get("d").is_none(), "no private part");
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], "https://api.example:8443/v1/x");
        assert_eq!(claims["iat"], 1_700_000_000);
        assert_eq!(claims["ath"], access_token_hash("AT"));
        assert_eq!(claims["nonce"], "n-1");
        assert_eq!(claims["jti"].as_str().unwrap().len(), 22);
        // Token endpoint proofs carry neither ath nor, before a demand, a nonce.
        let bare = key
            .proof_at(&http::Method::POST, &url, None, None, now)
            .unwrap();
        let (_, claims) = verify(bare.expose());
        assert!(claims.get("ath").is_none() && claims.get("nonce").is_none());
    }

    #[test]
    fn jti_is_never_reused() {
        let key = DpopKey::generate().unwrap();
        let url = Url::parse("https://api.example/").unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let proof = key.proof(&http::Method::GET, &url, None, None).unwrap();
            let (_, claims) = verify(proof.expose());
            assert!(seen.insert(claims["jti"].as_str().unwrap().to_owned()));
        }
    }

    #[test]
    fn thumbprint_follows_rfc_7638() {
        // RFC 7638 has no EC example; compute the canonical form independently.
        let key = DpopKey::from_pem(ES256).unwrap();
        let jwk = key.jwk();
        let canonical = serde_json::to_string(&serde_json::json!({
            "crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"],
        }))
        .unwrap();
        // serde_json keeps keys sorted (no preserve_order), as RFC 7638 requires.
        assert!(canonical.starts_with(r#"{"crv":"P-256","kty":"EC","x":""#));
        use sha2::Digest as _;
        let expected = B64.encode(sha2::Sha256::digest(canonical.as_bytes()));
        assert_eq!(key.thumbprint(), expected);
        // The SEC1 form of the same key has the same thumbprint.
        assert_eq!(
            DpopKey::from_pem(ES256_SEC1).unwrap().thumbprint(),
            expected
        );
    }

    #[test]
    fn c12_rsa_keys_are_refused_and_debug_shows_no_key() {
        assert_eq!(DpopKey::from_pem(RS256).unwrap_err(), KeyError::Unsupported);
        let pem = DpopKey::generate_pem().unwrap();
        let key = DpopKey::from_pem(pem.expose()).unwrap();
        let body: String = pem.expose().lines().nth(1).unwrap().into();
        assert!(!format!("{key:?}").contains(&body));
        assert!(!format!("{:?}", Dpop::new(key)).contains(&body));
    }

    struct Response(u16, Vec<(http::HeaderName, &'static str)>);
    impl ResponseView for Response {
        fn status(&self) -> u16 {
            self.0
        }
        fn header(&self, name: &http::HeaderName) -> Option<&str> {
            self.1.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
        }
    }

    #[test]
    fn a_nonce_demand_is_recognised_and_every_nonce_is_cached_per_origin() {
        let dpop = Dpop::new(DpopKey::generate().unwrap());
        let url = Url::parse("https://api.example/a").unwrap();
        let demand = Response(
            401,
            vec![
                (
                    http::header::WWW_AUTHENTICATE,
                    r#"DPoP error="use_dpop_nonce", algs="ES256""#,
                ),
                (DPOP_NONCE, "n-1"),
            ],
        );
        assert_eq!(dpop.observe_resource(&url, &demand).as_deref(), Some("n-1"));
        let proof = dpop.proof(&http::Method::GET, &url, Some("AT")).unwrap();
        assert_eq!(verify(proof.expose()).1["nonce"], "n-1");
        // A success that rotates the nonce updates the cache, and is no demand.
        let ok = Response(200, vec![(DPOP_NONCE, "n-2")]);
        assert!(dpop.observe_resource(&url, &ok).is_none());
        assert_eq!(dpop.nonces().get(&url).as_deref(), Some("n-2"));
        // invalid_token is a refresh's business, not a nonce demand.
        let invalid = Response(
            401,
            vec![
                (
                    http::header::WWW_AUTHENTICATE,
                    r#"DPoP error="invalid_token""#,
                ),
                (DPOP_NONCE, "n-3"),
            ],
        );
        assert!(dpop.observe_resource(&url, &invalid).is_none());
        // A demand without a nonce cannot be cured by resending.
        let no_nonce = Response(
            401,
            vec![(
                http::header::WWW_AUTHENTICATE,
                r#"DPoP error="use_dpop_nonce""#,
            )],
        );
        assert!(dpop.observe_resource(&url, &no_nonce).is_none());
        let other = Url::parse("https://other.example/a").unwrap();
        assert_eq!(dpop.nonces().get(&other), None);
    }
}
