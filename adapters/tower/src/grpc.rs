//! gRPC: what a rejected token looks like on the wire, and what the layer cannot see.

use tokenflight::Classifier;

/// The classifier for gRPC services: a response whose *headers* carry `grpc-status: 16`
/// (UNAUTHENTICATED) is a rejection, and so is HTTP 401 (a gateway in front of the
/// service). RFC 6750 hints in `www-authenticate` still apply: `invalid_token` is a
/// rejection, `insufficient_scope` never is.
///
/// ```
/// # use tokenflight_tower::{TokenLayer, grpc, tokenflight::{Token, from_fn}};
/// let layer = TokenLayer::builder()
///     .source(from_fn(|_cx| async { Ok(Token::new("token")) }))
///     .classifier(grpc::classifier())
///     .allowed_origin("https://grpc.example.com")
///     .build()
///     .unwrap();
/// # drop(layer);
/// ```
///
/// # What cannot be classified
///
/// A gRPC server that rejects a call before sending any message answers with a
/// *trailers-only* response: HTTP 200 whose headers hold the `grpc-status`. tonic does
/// this for a `Status` returned by an interceptor or by a handler before its first
/// message, which is how token checks are written. That is what this classifier sees.
///
/// A status sent in the trailers, after response messages (a server-streaming handler
/// that checks the token late, or a proxy that always streams), arrives after the
/// response has been handed to the caller: the layer cannot wait for the end of a
/// stream before answering. Such a call is not classified: no refresh, no resend; the
/// caller's client sees `UNAUTHENTICATED` as usual, and the next call that needs a
/// token gets the one in memory. If that keeps happening, refresh on the caller's side
/// with the [`ForceRefresh`](tokenflight::ForceRefresh) marker, or call
/// `authenticator().flight().force_refresh()`.
pub fn classifier() -> Classifier {
    Classifier::new().header_equals("grpc-status", "16")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenflight::adapter::{AuthResponse, ResponseView};
    use tokenflight::{AuthPolicy, Token, from_fn};

    struct Head(u16, Vec<(&'static str, &'static str)>);

    impl AuthResponse for Head {}

    /// The policy's verdict on `head` with classifier `c` (`AuthPolicy::classify`).
    trait Verdict {
        fn head_rejects(&self, head: &Head) -> bool;
    }

    impl Verdict for Classifier {
        fn head_rejects(&self, head: &Head) -> bool {
            let policy = AuthPolicy::builder()
                .source(from_fn(|_cx| async { Ok(Token::new("unused")) }))
                .classifier(self.clone())
                .allow_any_origin()
                .build()
                .unwrap();
            let head = Head(head.0, head.1.clone());
            futures::executor::block_on(policy.classify(head)).1
        }
    }

    impl ResponseView for Head {
        fn status(&self) -> u16 {
            self.0
        }

        fn header(&self, name: &http::HeaderName) -> Option<&str> {
            self.1
                .iter()
                .find(|(n, _)| *n == name.as_str())
                .map(|(_, v)| *v)
        }
    }

    #[test]
    fn unauthenticated_in_trailers_only_headers_is_a_rejection() {
        let c = classifier();
        assert!(c.head_rejects(&Head(200, vec![("grpc-status", "16")])));
        assert!(c.head_rejects(&Head(200, vec![("grpc-status", " 16 ")])));
        assert!(!c.head_rejects(&Head(200, vec![("grpc-status", "7")])));
        assert!(!c.head_rejects(&Head(200, vec![("grpc-status", "0")])));
        assert!(!c.head_rejects(&Head(200, vec![])), "a streamed response");
        assert!(c.head_rejects(&Head(401, vec![])), "a gateway's 401");
    }

    #[test]
    fn rfc_6750_hints_still_apply() {
        let c = classifier();
        let scope = ("www-authenticate", "Bearer error=\"insufficient_scope\"");
        assert!(!c.head_rejects(&Head(200, vec![("grpc-status", "16"), scope])));
        let invalid = ("www-authenticate", "Bearer error=\"invalid_token\"");
        assert!(c.head_rejects(&Head(200, vec![("grpc-status", "7"), invalid])));
    }
}
