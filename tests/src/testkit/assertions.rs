//! Signed assertions as the token endpoint checks them (RFC 7523 §3): the signature
//! against the client's registered public keys, `iss`/`sub`, `aud` = the token
//! endpoint, `exp` in the future (and not too far), and a `jti` never seen before.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde_json::Value;

/// The longest assertion lifetime accepted (`exp` this far after now at most).
const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// A public key registered for the client: the JWS `alg` it verifies and its bytes
/// (DER `RSAPublicKey` for RS256, the uncompressed point for ES256).
#[derive(Clone, Debug)]
pub(crate) struct ClientKey {
    pub(crate) alg: String,
    pub(crate) public: Vec<u8>,
}

/// Why an assertion was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    Malformed,
    Signature,
    Issuer,
    Audience,
    Expired,
    Replayed,
}

fn decode(segment: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).ok()?).ok()
}

/// The `jti` of a compact JWS, read without any check (recorded on arrival, so a
/// replay is noticed even when the first request was answered by an injected failure).
pub(crate) fn jti_of(jws: &str) -> Option<String> {
    let payload = decode(jws.split('.').nth(1)?)?;
    payload.get("jti")?.as_str().map(str::to_owned)
}

/// Checks `jws`: signed by one of `keys`, issued by `issuer` (`sub` too unless
/// `any_subject`), for `audience`, unexpired. `replayed` says whether its `jti` was seen
/// on an earlier request.
pub(crate) fn verify(
    jws: &str,
    keys: &[ClientKey],
    issuer: &str,
    any_subject: bool,
    audience: &str,
    replayed: bool,
) -> Result<(), Refused> {
    let mut parts = jws.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::Malformed);
    };
    let header = decode(header_b64).ok_or(Refused::Malformed)?;
    let claims = decode(payload_b64).ok_or(Refused::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| Refused::Malformed)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let algorithm: &dyn signature::VerificationAlgorithm = match alg {
        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "ES256" => &signature::ECDSA_P256_SHA256_FIXED,
        _ => return Err(Refused::Signature),
    };
    let signed = format!("{header_b64}.{payload_b64}");
    let good = keys.iter().filter(|k| k.alg == alg).any(|key| {
        UnparsedPublicKey::new(algorithm, &key.public)
            .verify(signed.as_bytes(), &signature)
            .is_ok()
    });
    if !good {
        return Err(Refused::Signature);
    }
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let sub = text("sub").ok_or(Refused::Malformed)?;
    if text("iss") != Some(issuer) || (!any_subject && sub != issuer) {
        return Err(Refused::Issuer);
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !aud_ok {
        return Err(Refused::Audience);
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| Refused::Expired)?
        .as_secs();
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(Refused::Malformed)?;
    if exp <= now || exp > now + MAX_ASSERTION_LIFETIME.as_secs() {
        return Err(Refused::Expired);
    }
    if text("jti").is_none() {
        return Err(Refused::Malformed);
    }
    if replayed {
        return Err(Refused::Replayed);
    }
    Ok(())
}
