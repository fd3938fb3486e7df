//! Signing keys and compact JWS (RFC 7515) signing: what `private_key_jwt` client
//! authentication and the JWT bearer grant (RFC 7523) sign their assertions with, and
//! what any other signed proof (a DPoP proof, say) can reuse.
//!
//! Keys are loaded from PEM — PKCS#8 (`BEGIN PRIVATE KEY`) for RSA and P-256, PKCS#1
//! (`BEGIN RSA PRIVATE KEY`) and SEC1 (`BEGIN EC PRIVATE KEY`) too — and sign with
//! [ring](https://docs.rs/ring): RS256 (RSASSA-PKCS1-v1_5 with SHA-256, 2048 to 4096
//! bit keys) and ES256 (ECDSA P-256 with SHA-256, the fixed-width `r || s` signature
//! JWS wants). The private key never appears in `Debug`, `Display` or an error
//! ([C12](crate#c12)): errors say what kind of input was wrong, never show it.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivateKeyDer, PrivateSec1KeyDer};

use crate::token::Secret;

/// base64url without padding (RFC 7515 §2).
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A JWS signature algorithm a [`SigningKey`] signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA with P-256 and SHA-256.
    Es256,
}

impl Algorithm {
    /// The JWS `alg` name: `"RS256"`, `"ES256"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
        }
    }
}

/// Why a key could not be loaded or could not sign. Never contains key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The input holds no PEM private key block, or its base64 is broken.
    #[error("no PEM private key found")]
    NotPem,
    /// A private key of a kind other than RSA or P-256 (Ed25519, P-384, …).
    #[error("unsupported private key: only RSA (RS256) and P-256 (ES256) keys are supported")]
    Unsupported,
    /// The key's encoding or parameters were refused (too short an RSA key, say).
    #[error("invalid {kind} private key: {reason}")]
    Invalid {
        /// `"RSA"` or `"P-256"`.
        kind: &'static str,
        /// What the crypto library said, without key material.
        reason: String,
    },
    /// The key file could not be read.
    #[error("cannot read the private key file: {0}")]
    Io(String),
    /// Signing failed (the system random generator, for ES256).
    #[error("signing failed")]
    Signing,
}

enum Inner {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A private key that signs compact JWS: RS256 or ES256, from PEM. Cheap to clone
/// (the key is shared).
///
/// ```
/// use tokenflight::oauth2::{Algorithm, SigningKey};
/// // A test key; never use it for anything real.
/// let pem = "-----BEGIN PRIVATE KEY-----
/// MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSHs7lk0UXZap3eaY
/// Xl3d7ejcG+7ZPjvk1WCaiHrw9LahRANCAATRaQYySBWfUM+bW8E16mk3VD7XhHiC
/// iONpjaWczeUra+dMGDrCCHltsd/tNDVjGd2JkW23x89zZB2DqUM3ffbO
/// -----END PRIVATE KEY-----";
/// let key = SigningKey::from_pem(pem)?.with_key_id("k1");
/// assert_eq!(key.algorithm(), Algorithm::Es256);
/// let jws = key.sign_jwt(&serde_json::json!({"iss": "me"}))?;
/// assert_eq!(jws.expose().split('.').count(), 3);
/// // Debug shows the algorithm and key id, never the key.
/// assert!(!format!("{key:?}").contains("MIGH"));
/// assert!(SigningKey::from_pem("not a key").is_err());
/// # Ok::<(), tokenflight::oauth2::KeyError>(())
/// ```
#[derive(Clone)]
pub struct SigningKey {
    inner: Arc<Inner>,
    kid: Option<String>,
    rng: SystemRandom,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.algorithm())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads the first private key in `pem`: PKCS#8 (RSA or P-256), PKCS#1 RSA, or
    /// SEC1 P-256. The algorithm follows from the key: RS256 for RSA, ES256 for P-256.
    pub fn from_pem(pem: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        // Whatever the PEM reader says (no block, broken base64), no key came out of it;
        // its errors are not passed on, as they could quote the input.
        let der = PrivateKeyDer::from_pem_slice(pem.as_ref()).map_err(|_| KeyError::NotPem)?;
        let rng = SystemRandom::new();
        let inner = match der {
            PrivateKeyDer::Pkcs8(der) => {
                let bytes = der.secret_pkcs8_der();
                match RsaKeyPair::from_pkcs8(bytes) {
                    Ok(key) => Inner::Rsa(key),
                    Err(rsa) => match EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                        bytes,
                        &rng,
                    ) {
                        Ok(key) => Inner::Ec(key),
                        Err(ec) => return Err(classify_pkcs8(rsa, ec)),
                    },
                }
            }
            PrivateKeyDer::Pkcs1(der) => Inner::Rsa(
                RsaKeyPair::from_der(der.secret_pkcs1_der()).map_err(|e| invalid("RSA", &e))?,
            ),
            PrivateKeyDer::Sec1(der) => Inner::Ec(sec1_key(&der, &rng)?),
            _ => return Err(KeyError::Unsupported),
        };
        Ok(SigningKey {
            inner: Arc::new(inner),
            kid: None,
            rng,
        })
    }

    /// [`from_pem`](Self::from_pem) of a file's contents.
    pub fn from_pem_file(path: impl AsRef<std::path::Path>) -> Result<Self, KeyError> {
        // The path is not echoed either: the error says what failed, the caller knows where.
        let pem = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| KeyError::Io(e.kind().to_string()))?,
        );
        Self::from_pem(&*pem)
    }

    /// A new random P-256 key (ES256) as PKCS#8 PEM (`BEGIN PRIVATE KEY`), from the
    /// system's secure random generator: what [`from_pem`](Self::from_pem) loads.
    #[cfg_attr(not(feature = "dpop"), allow(dead_code))]
    pub(crate) fn generate_es256_pem() -> Result<Secret, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Signing)?;
        let body = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref()),
        );
        let mut pem = zeroize::Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
        // PEM lines carry 64 base64 characters (RFC 7468 §2); base64 is ASCII, so
        // byte chunks are whole characters.
        for line in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok(Secret::new(pem.as_str()))
    }

    /// Puts `kid` in the header of every JWS this key signs (the key's id at the
    /// server, when it knows several).
    pub fn with_key_id(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// The key id set by [`with_key_id`](Self::with_key_id).
    pub fn key_id(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        match &*self.inner {
            Inner::Rsa(_) => Algorithm::Rs256,
            Inner::Ec(_) => Algorithm::Es256,
        }
    }

    /// The public key: the DER `RSAPublicKey` (PKCS#1) for RSA, the uncompressed SEC1
    /// point (65 bytes) for P-256 — the forms a verifier such as ring's takes.
    pub fn public_key(&self) -> &[u8] {
        match &*self.inner {
            Inner::Rsa(key) => key.public().as_ref(),
            Inner::Ec(key) => key.public_key().as_ref(),
        }
    }

    /// Signs `claims` (a JSON object) as a compact JWS with header
    /// `{"alg":…,"typ":"JWT"}` (and `kid` when set).
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> Result<Secret, KeyError> {
        self.sign_jws("JWT", claims)
    }

    /// Signs `claims` as a compact JWS with the header type `typ` (`"JWT"`,
    /// `"dpop+jwt"`, …).
    pub(crate) fn sign_jws(
        &self,
        typ: &str,
        claims: &serde_json::Value,
    ) -> Result<Secret, KeyError> {
        self.sign_jws_with(typ, serde_json::Map::new(), claims)
    }

    /// [`sign_jws`](Self::sign_jws) with more header parameters (`jwk`, say) after
    /// `alg`, `typ` and `kid`.
    #[cfg_attr(not(feature = "dpop"), allow(dead_code))]
    pub(crate) fn sign_jws_with(
        &self,
        typ: &str,
        extra: serde_json::Map<String, serde_json::Value>,
        claims: &serde_json::Value,
    ) -> Result<Secret, KeyError> {
        let mut header = serde_json::json!({ "alg": self.algorithm().as_str(), "typ": typ });
        if let Some(map) = header.as_object_mut() {
            if let Some(kid) = &self.kid {
                map.insert("kid".into(), kid.clone().into());
            }
            map.extend(extra);
        }
        let mut jws = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = self.sign(jws.as_bytes())?;
        jws.push('.');
        jws.push_str(&B64.encode(signature));
        Ok(Secret::new(jws))
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &*self.inner {
            Inner::Rsa(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &self.rng,
                    message,
                    &mut signature,
                )
                .map_err(|_| KeyError::Signing)?;
                Ok(signature)
            }
            Inner::Ec(key) => key
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Signing),
        }
    }

    /// A fresh random identifier (128 bits, base64url): a `jti` never used before.
    pub(crate) fn random_id(&self) -> Result<String, KeyError> {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes).map_err(|_| KeyError::Signing)?;
        Ok(B64.encode(bytes))
    }
}

fn invalid(kind: &'static str, error: &ring::error::KeyRejected) -> KeyError {
    KeyError::Invalid {
        kind,
        reason: error.to_string(),
    }
}

/// A PKCS#8 key that neither RSA nor P-256 accepted: if one of them recognised its
/// algorithm and refused the key, that is the error; otherwise it is another kind.
fn classify_pkcs8(rsa: ring::error::KeyRejected, ec: ring::error::KeyRejected) -> KeyError {
    const WRONG: &str = "WrongAlgorithm";
    match (rsa.to_string() == WRONG, ec.to_string() == WRONG) {
        (false, _) => invalid("RSA", &rsa),
        (true, false) => invalid("P-256", &ec),
        (true, true) => KeyError::Unsupported,
    }
}

/// ring reads P-256 keys as PKCS#8 only; a SEC1 `ECPrivateKey` is wrapped in the
/// PKCS#8 `PrivateKeyInfo` for `id-ecPublicKey` / `prime256v1` (RFC 5915 §1, RFC 5208).
fn sec1_key(der: &PrivateSec1KeyDer<'_>, rng: &SystemRandom) -> Result<EcdsaKeyPair, KeyError> {
    const VERSION_AND_ALGORITHM: [u8; 24] = [
        0x02, 0x01, 0x00, // version 0
        0x30, 0x13, // AlgorithmIdentifier
        0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
        0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, // prime256v1
    ];
    let sec1 = der.secret_sec1_der();
    let mut octets = vec![0x04];
    der_length(&mut octets, sec1.len());
    octets.extend_from_slice(sec1);
    let mut body = VERSION_AND_ALGORITHM.to_vec();
    body.extend_from_slice(&octets);
    let mut pkcs8 = zeroize::Zeroizing::new(vec![0x30]);
    der_length(&mut pkcs8, body.len());
    pkcs8.extend_from_slice(&body);
    zeroize::Zeroize::zeroize(&mut octets);
    zeroize::Zeroize::zeroize(&mut body);
    EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, rng)
        .map_err(|e| invalid("P-256", &e))
}

/// A DER definite length (X.690 §8.1.3).
fn der_length(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        _ => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ES256_SEC1: &str = include_str!("../../tests/src/testkit/keys/test-es256-sec1.pem");
    const ES256: &str = include_str!("../../tests/src/testkit/keys/test-es256.pem");
    const RS256: &str = include_str!("../../tests/src/testkit/keys/test-rs256.pem");
    const RS256_PKCS1: &str = include_str!("../../tests/src/testkit/keys/test-rs256-pkcs1.pem");

    fn verify(key: &SigningKey, jws: &str) -> bool {
        let Some((input, signature)) = jws.rsplit_once('.') else {
            return false;
        };
        let Ok(signature) = B64.decode(signature) else {
            return false;
        };
        let alg: &dyn signature::VerificationAlgorithm = match key.algorithm() {
            Algorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
        };
        signature::UnparsedPublicKey::new(alg, key.public_key())
            .verify(input.as_bytes(), &signature)
            .is_ok()
    }

    #[test]
    fn every_pem_form_loads_and_signs_a_verifiable_jws() {
        for (pem, alg) in [
            (ES256, Algorithm::Es256),
            (ES256_SEC1, Algorithm::Es256),
            (RS256, Algorithm::Rs256),
            (RS256_PKCS1, Algorithm::Rs256),
        ] {
            let key = SigningKey::from_pem(pem).unwrap().with_key_id("kid-1");
            assert_eq!(key.algorithm(), alg);
            let jws = key.sign_jwt(&serde_json::json!({"sub": "x"})).unwrap();
            assert!(verify(&key, jws.expose()), "{alg:?}");
            let header = jws.expose().split('.').next().unwrap();
            let header: serde_json::Value =
                serde_json::from_slice(&B64.decode(header).unwrap()).unwrap();
            assert_eq!(header["alg"], alg.as_str());
            assert_eq!(header["kid"], "kid-1");
            // A tampered payload does not verify.
            let mut parts: Vec<&str> = jws.expose().split('.').collect();
            let other = B64.encode("{\"sub\":\"y\"}");
            parts[1] = &other;
            assert!(!verify(&key, &parts.join(".")));
        }
        // The SEC1 and PKCS#8 forms are the same key.
        assert_eq!(
            SigningKey::from_pem(ES256).unwrap().public_key(),
            SigningKey::from_pem(ES256_SEC1).unwrap().public_key()
        );
    }

    #[test]
    fn c12_c13_bad_keys_are_typed_errors_that_show_no_key() {
        assert_eq!(SigningKey::from_pem("").unwrap_err(), KeyError::NotPem);
        assert_eq!(
            SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n")
                .unwrap_err(),
            KeyError::NotPem
        );
        // A PKCS#8 block with garbage DER.
        let garbage = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n";
        let error = SigningKey::from_pem(garbage).unwrap_err();
        assert!(
            matches!(error, KeyError::Invalid { .. } | KeyError::Unsupported),
            "{error:?}"
        );
        assert!(!error.to_string().contains("MIGH"));
        let key = SigningKey::from_pem(RS256).unwrap();
        assert!(!format!("{key:?}").contains("MII"));
    }

    #[test]
    fn random_ids_differ() {
        let key = SigningKey::from_pem(ES256).unwrap();
        assert_ne!(key.random_id().unwrap(), key.random_id().unwrap());
    }
}
