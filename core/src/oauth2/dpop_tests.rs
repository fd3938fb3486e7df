//! The grants with a DPoP key: a proof on every token request, the token endpoint's
//! nonce demand cured by one resend within the attempt, `token_type: DPoP` accepted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::*;
use crate::dpop::{Dpop, DpopKey};
use crate::source::RefreshReason;
use crate::transport::HttpRequest;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const ES256: &str = include_str!("../../../tests/src/testkit/keys/test-es256.pem");

/// What one token request carried.
#[derive(Debug)]
struct Seen {
    form: HashMap<String, String>,
    proof: Option<serde_json::Value>,
}

/// Answers the scripted responses in order (status, body, DPoP-Nonce), the last one
/// again when the script runs out.
struct Scripted {
    script: Vec<(u16, &'static str, Option<&'static str>)>,
    seen: Mutex<Vec<Seen>>,
}

impl Transport for Scripted {
    fn send(
        &self,
        request: HttpRequest,
        _limit: usize,
    ) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
        let form = url::form_urlencoded::parse(request.body())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let proof = request
            .headers()
            .get("dpop")
            .and_then(|v| v.to_str().ok())
            .and_then(|jws| jws.split('.').nth(1))
            .map(|claims| serde_json::from_slice(&B64.decode(claims).unwrap()).unwrap());
        let mut seen = self.seen.lock().unwrap();
        let n = seen.len().min(self.script.len() - 1);
        seen.push(Seen { form, proof });
        let (status, body, nonce) = self.script[n];
        let mut response = http::Response::builder().status(status);
        if let Some(nonce) = nonce {
            response = response.header("dpop-nonce", nonce);
        }
        let response = response.body(Bytes::from_static(body.as_bytes())).unwrap();
        Box::pin(async move { Ok(response) })
    }
}

fn scripted(script: Vec<(u16, &'static str, Option<&'static str>)>) -> Arc<Scripted> {
    Arc::new(Scripted {
        script,
        seen: Mutex::new(Vec::new()),
    })
}

const DEMAND: &str = r#"{"error":"use_dpop_nonce","error_description":"a nonce is needed"}"#;
const DPOP_TOKEN: &str = r#"{"access_token":"AT","token_type":"DPoP","expires_in":60}"#;

fn cx() -> RefreshContext {
    let previous = Arc::new(Token::new("old").with_refresh("RT-1"));
    RefreshContext::new(RefreshReason::Expired, Some(previous), SystemTime::now())
}

#[test]
fn a_nonce_demand_is_resent_once_in_the_same_attempt_with_a_new_proof_and_assertion() {
    let transport = scripted(vec![
        (400, DEMAND, Some("n-1")),
        (200, DPOP_TOKEN, Some("n-2")),
    ]);
    let dpop = Dpop::new(DpopKey::generate().unwrap());
    let grant = RefreshTokenGrant::new(transport.clone(), "https://idp.example/token", "app")
        .unwrap()
        .private_key_jwt(SigningKey::from_pem(ES256).unwrap())
        .dpop(dpop.clone());
    let token = futures::executor::block_on(grant.fetch(cx())).unwrap();
    assert_eq!(token.access().expose(), "AT");
    let seen = transport.seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "one resend, no more");
    let (first, second) = (&seen[0], &seen[1]);
    let (p1, p2) = (
        first.proof.as_ref().unwrap(),
        second.proof.as_ref().unwrap(),
    );
    assert_eq!(p1["htm"], "POST");
    assert_eq!(p1["htu"], "https://idp.example/token");
    assert!(p1.get("nonce").is_none() && p1.get("ath").is_none());
    assert_eq!(p2["nonce"], "n-1");
    assert_ne!(p1["jti"], p2["jti"]);
    // The resend carries the same refresh token (the demand did not spend it) and a
    // new client assertion (a reused assertion's jti would be refused).
    assert_eq!(first.form["refresh_token"], "RT-1");
    assert_eq!(second.form["refresh_token"], "RT-1");
    assert_ne!(
        first.form["client_assertion"],
        second.form["client_assertion"]
    );
    // The nonce of the success is the origin's current one.
    let url = url::Url::parse("https://idp.example/other").unwrap();
    assert_eq!(dpop.nonces().get(&url).as_deref(), Some("n-2"));
}

#[test]
fn c4_a_second_nonce_demand_is_the_answer() {
    let transport = scripted(vec![(400, DEMAND, Some("n-1")), (400, DEMAND, Some("n-2"))]);
    let grant = ClientCredentialsGrant::new(transport.clone(), "https://idp.example/token", "app")
        .unwrap()
        .client_secret("client-secret")
        .dpop(Dpop::new(DpopKey::generate().unwrap()));
    let error = futures::executor::block_on(grant.fetch(cx())).unwrap_err();
    assert!(error.message().contains("use_dpop_nonce"), "{error}");
    assert_eq!(transport.seen.lock().unwrap().len(), 2);
}

#[test]
fn every_token_request_has_its_own_proof() {
    let transport = scripted(vec![(200, DPOP_TOKEN, None)]);
    let grant = ClientCredentialsGrant::new(transport.clone(), "https://idp.example/token", "app")
        .unwrap()
        .client_secret("client-secret")
        .dpop(Dpop::new(DpopKey::generate().unwrap()));
    for _ in 0..20 {
        futures::executor::block_on(grant.fetch(cx())).unwrap();
    }
    let seen = transport.seen.lock().unwrap();
    let jtis: HashSet<String> = seen
        .iter()
        .map(|s| {
            s.proof.as_ref().unwrap()["jti"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(jtis.len(), 20);
}

#[test]
fn a_dpop_token_without_a_dpop_key_is_refused_and_a_nonce_demand_is_not_resent() {
    let transport = scripted(vec![(200, DPOP_TOKEN, None)]);
    let grant = ClientCredentialsGrant::new(transport.clone(), "https://idp.example/token", "app")
        .unwrap()
        .client_secret("client-secret");
    let error = futures::executor::block_on(grant.fetch(cx())).unwrap_err();
    assert!(error.is_permanent(), "{error}");
    assert!(transport.seen.lock().unwrap()[0].proof.is_none());
    let transport = scripted(vec![(400, DEMAND, Some("n-1")), (200, DPOP_TOKEN, None)]);
    let grant = ClientCredentialsGrant::new(transport.clone(), "https://idp.example/token", "app")
        .unwrap()
        .client_secret("client-secret");
    assert!(futures::executor::block_on(grant.fetch(cx())).is_err());
    assert_eq!(transport.seen.lock().unwrap().len(), 1);
}
