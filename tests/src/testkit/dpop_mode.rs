//! The [`TestServer`](super::TestServer)'s DPoP mode ([`TestServerConfig::dpop`]): the
//! token endpoint and the protected resources check every request's proof with the
//! independent [`Verifier`], both with the server's one nonce (one server, one origin),
//! which rotates after a number of accepted requests. Tokens are bound to the key of
//! the proof they were issued with.
//!
//! [`TestServerConfig::dpop`]: super::TestServerConfig::dpop

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;

use super::dpop::{Expect, Refusal, Verifier};

#[derive(Debug)]
pub(crate) struct DpopMode {
    verifier: Verifier,
    /// Access token → thumbprint of the key it is bound to.
    bound: HashMap<String, String>,
    accepted: u64,
    rotate_every: u64,
    rotations: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn proof(headers: &HeaderMap) -> &str {
    headers
        .get("dpop")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

impl DpopMode {
    pub(crate) fn new(rotate_every: u64) -> Self {
        DpopMode {
            verifier: Verifier::with_nonce("testkit-nonce-0"),
            bound: HashMap::new(),
            accepted: 0,
            rotate_every,
            rotations: 0,
        }
    }

    /// The nonce proofs must carry now.
    pub(crate) fn nonce(&self) -> Option<&str> {
        self.verifier.nonce.as_deref()
    }

    /// A token request's proof; the key's thumbprint to bind the token to.
    pub(crate) fn check_token_request(
        &mut self,
        headers: &HeaderMap,
        htu: &str,
    ) -> Result<String, Refusal> {
        let expect = Expect {
            method: "POST",
            htu,
            access_token: None,
            bound_jkt: None,
            now: now(),
        };
        self.verifier.verify(proof(headers), &expect)
    }

    pub(crate) fn bind(&mut self, access_token: &str, jkt: String) {
        self.bound.insert(access_token.to_owned(), jkt);
    }

    /// A resource request's proof for `token` (which must be bound, to the proof's key).
    pub(crate) fn check_resource(
        &mut self,
        headers: &HeaderMap,
        method: &str,
        htu: &str,
        token: &str,
    ) -> Result<(), Refusal> {
        let Some(bound) = self.bound.get(token).cloned() else {
            return Err(Refusal::WrongKey);
        };
        let expect = Expect {
            method,
            htu,
            access_token: Some(token),
            bound_jkt: Some(&bound),
            now: now(),
        };
        self.verifier.verify(proof(headers), &expect)?;
        self.accepted += 1;
        if self.rotate_every > 0 && self.accepted % self.rotate_every == 0 {
            self.rotations += 1;
            let next = format!("testkit-nonce-{}", self.rotations);
            self.verifier.rotate_nonce(next);
        }
        Ok(())
    }
}
