//! A DPoP (RFC 9449 §4.3) proof check as a server does it, written independently of
//! the client's code: the signature with the key in the proof's own header, `typ`,
//! `alg`, `htm`, `htu`, the `iat` window, `jti` replay, `ath`, the nonce the server
//! issued, and the token's binding (`cnf.jkt`, the RFC 7638 thumbprint of the key).

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

/// Why a proof was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a compact JWS with JSON header and claims, or a claim missing.
    Malformed,
    /// `typ` is not `dpop+jwt`, or `alg` not `ES256`, or the `jwk` is not a P-256 key.
    WrongHeader,
    /// The signature does not verify with the `jwk` of the header.
    BadSignature,
    /// `htm` or `htu` name another request.
    WrongRequest,
    /// `iat` outside the window.
    Stale,
    /// A `jti` seen before.
    Replayed,
    /// `ath` is not the hash of the presented token (or is missing).
    WrongAth,
    /// No nonce, or not the current one: answer `use_dpop_nonce`.
    UseNonce,
    /// The proof's key is not the one the token is bound to (a stolen token).
    WrongKey,
}

/// What the server expects of one request's proof.
#[derive(Clone, Debug)]
pub struct Expect<'a> {
    /// The request's method.
    pub method: &'a str,
    /// The request URL without query and fragment.
    pub htu: &'a str,
    /// The access token presented (`None` at the token endpoint).
    pub access_token: Option<&'a str>,
    /// The thumbprint the token is bound to (`None`: not bound yet).
    pub bound_jkt: Option<&'a str>,
    /// The server's time, in seconds since the epoch.
    pub now: u64,
}

/// A server's DPoP state: the current nonce (if it demands one), the one it replaced
/// (still accepted, as servers do, so a request in flight across a rotation is not
/// refused twice) and every `jti` seen.
#[derive(Debug, Default)]
pub struct Verifier {
    /// The nonce proofs must carry; `None`: no nonce demanded.
    pub nonce: Option<String>,
    previous: Option<String>,
    seen: HashSet<String>,
    /// Every proof checked, accepted or not (for "no jti reused" counts).
    pub checked: u64,
}

/// How far `iat` may be from the server's time, in seconds.
pub const IAT_WINDOW: u64 = 60;

/// A member of a JSON object, `null` when absent (no indexing that could panic).
fn field<'a>(value: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    static NULL: serde_json::Value = serde_json::Value::Null;
    value.get(name).unwrap_or(&NULL)
}

fn json(part: &str) -> Result<serde_json::Value, Refusal> {
    let bytes = B64.decode(part).map_err(|_| Refusal::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| Refusal::Malformed)
}

/// The RFC 7638 thumbprint of a P-256 JWK.
pub fn thumbprint(jwk: &serde_json::Value) -> Option<String> {
    let (crv, x, y) = (
        field(jwk, "crv").as_str()?,
        field(jwk, "x").as_str()?,
        field(jwk, "y").as_str()?,
    );
    let canonical = format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#);
    Some(B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    )))
}

impl Verifier {
    /// A verifier that demands `nonce`.
    pub fn with_nonce(nonce: impl Into<String>) -> Self {
        Verifier {
            nonce: Some(nonce.into()),
            ..Verifier::default()
        }
    }

    /// Demands `next` from now on; the nonce it replaces is still accepted until the
    /// next rotation.
    pub fn rotate_nonce(&mut self, next: impl Into<String>) {
        self.previous = self.nonce.replace(next.into());
    }

    /// Demands `next` from now on and no longer accepts any earlier nonce.
    pub fn replace_nonce(&mut self, next: impl Into<String>) {
        self.nonce = Some(next.into());
        self.previous = None;
    }

    /// The number of distinct `jti`s seen.
    pub fn jtis_seen(&self) -> usize {
        self.seen.len()
    }

    /// Checks `proof` against `expect`; returns the key's thumbprint on success. A
    /// `jti` is remembered once the signature holds, whether or not the rest passes.
    pub fn verify(&mut self, proof: &str, expect: &Expect<'_>) -> Result<String, Refusal> {
        self.checked += 1;
        let mut parts = proof.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        let (header, claims) = (json(h)?, json(c)?);
        let jwk = field(&header, "jwk");
        if field(&header, "typ") != "dpop+jwt"
            || field(&header, "alg") != "ES256"
            || field(jwk, "kty") != "EC"
            || field(jwk, "crv") != "P-256"
            || jwk.get("d").is_some()
        {
            return Err(Refusal::WrongHeader);
        }
        let coordinate = |name: &str| {
            field(jwk, name)
                .as_str()
                .and_then(|v| B64.decode(v).ok())
                .filter(|v| v.len() == 32)
        };
        let (Some(x), Some(y)) = (coordinate("x"), coordinate("y")) else {
            return Err(Refusal::WrongHeader);
        };
        let mut point = vec![0x04];
        point.extend(x);
        point.extend(y);
        let signature = B64.decode(s).map_err(|_| Refusal::Malformed)?;
        let input = proof
            .get(..h.len() + 1 + c.len())
            .ok_or(Refusal::Malformed)?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(input.as_bytes(), &signature)
            .map_err(|_| Refusal::BadSignature)?;
        let jti = field(&claims, "jti").as_str().ok_or(Refusal::Malformed)?;
        if !self.seen.insert(jti.to_owned()) {
            return Err(Refusal::Replayed);
        }
        if field(&claims, "htm") != expect.method || field(&claims, "htu") != expect.htu {
            return Err(Refusal::WrongRequest);
        }
        let iat = field(&claims, "iat").as_u64().ok_or(Refusal::Malformed)?;
        if iat.abs_diff(expect.now) > IAT_WINDOW {
            return Err(Refusal::Stale);
        }
        if let Some(token) = expect.access_token {
            let ath = B64.encode(ring::digest::digest(
                &ring::digest::SHA256,
                token.as_bytes(),
            ));
            if field(&claims, "ath") != ath.as_str() {
                return Err(Refusal::WrongAth);
            }
        }
        let jkt = thumbprint(jwk).ok_or(Refusal::WrongHeader)?;
        if expect.bound_jkt.is_some_and(|bound| bound != jkt) {
            return Err(Refusal::WrongKey);
        }
        if let Some(nonce) = &self.nonce {
            let sent = field(&claims, "nonce");
            if sent != nonce.as_str() && self.previous.as_deref().is_none_or(|p| sent != p) {
                return Err(Refusal::UseNonce);
            }
        }
        Ok(jkt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenflight::dpop::DpopKey;

    const NOW: u64 = 1_700_000_000;

    fn proof(key: &DpopKey, token: Option<&str>, nonce: Option<&str>, at: u64) -> String {
        let url = url::Url::parse("https://rs.test/api/x?q=1").unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at);
        let proof = key
            .proof_at(&http::Method::GET, &url, token, nonce, at)
            .unwrap();
        proof.expose().to_owned()
    }

    fn expect<'a>(token: Option<&'a str>, bound: Option<&'a str>) -> Expect<'a> {
        Expect {
            method: "GET",
            htu: "https://rs.test/api/x",
            access_token: token,
            bound_jkt: bound,
            now: NOW,
        }
    }

    #[test]
    fn the_clients_proofs_pass_and_every_kind_of_bad_proof_is_refused() {
        let key = DpopKey::generate().unwrap();
        let jkt = key.thumbprint().to_owned();
        let mut server = Verifier::default();
        let good = proof(&key, Some("AT"), None, NOW);
        assert_eq!(
            server.verify(&good, &expect(Some("AT"), Some(&jkt))),
            Ok(jkt.clone())
        );
        // The client's thumbprint and the server's independent one agree.
        assert_eq!(thumbprint(key.jwk()).as_deref(), Some(key.thumbprint()));
        assert_eq!(
            server.verify(&good, &expect(Some("AT"), Some(&jkt))),
            Err(Refusal::Replayed)
        );
        let p = proof(&key, Some("AT"), None, NOW);
        assert_eq!(
            server.verify(&p, &expect(Some("other"), None)),
            Err(Refusal::WrongAth)
        );
        let p = proof(&key, Some("AT"), None, NOW - 3600);
        assert_eq!(
            server.verify(&p, &expect(Some("AT"), None)),
            Err(Refusal::Stale)
        );
        let p = proof(&key, Some("AT"), None, NOW);
        let post = Expect {
            method: "POST",
            ..expect(Some("AT"), None)
        };
        assert_eq!(server.verify(&p, &post), Err(Refusal::WrongRequest));
        // A stolen token replayed with another key: the binding refuses it.
        let thief = DpopKey::generate().unwrap();
        let p = proof(&thief, Some("AT"), None, NOW);
        assert_eq!(
            server.verify(&p, &expect(Some("AT"), Some(&jkt))),
            Err(Refusal::WrongKey)
        );
        // A tampered claim breaks the signature.
        let p = proof(&key, Some("AT"), None, NOW);
        let mut parts: Vec<String> = p.split('.').map(str::to_owned).collect();
        parts[1] =
            B64.encode(r#"{"jti":"x","htm":"GET","htu":"https://rs.test/api/x","iat":1700000000}"#);
        assert_eq!(
            server.verify(&parts.join("."), &expect(None, None)),
            Err(Refusal::BadSignature)
        );
        // A nonce demand: without the nonce, then with it.
        server.nonce = Some("n-1".into());
        let p = proof(&key, Some("AT"), None, NOW);
        assert_eq!(
            server.verify(&p, &expect(Some("AT"), None)),
            Err(Refusal::UseNonce)
        );
        let p = proof(&key, Some("AT"), Some("n-1"), NOW);
        assert!(server.verify(&p, &expect(Some("AT"), None)).is_ok());
        // After a rotation the replaced nonce still passes, the one before it not.
        server.rotate_nonce("n-2");
        let p = proof(&key, Some("AT"), Some("n-1"), NOW);
        assert!(server.verify(&p, &expect(Some("AT"), None)).is_ok());
        server.rotate_nonce("n-3");
        let p = proof(&key, Some("AT"), Some("n-1"), NOW);
        assert_eq!(
            server.verify(&p, &expect(Some("AT"), None)),
            Err(Refusal::UseNonce)
        );
        assert_eq!(
            server.verify("a.b", &expect(None, None)),
            Err(Refusal::Malformed)
        );
    }
}
