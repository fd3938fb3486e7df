//! reqwest's request and response seen through the core's `AuthRequest` and
//! `AuthResponse` (newtypes, since both the traits and the types are foreign here).

use std::future::Future;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, future, stream};
use reqwest::{Body, ResponseBuilderExt, Url};
use tokenflight::adapter::{AuthRequest, AuthResponse, ResponseView};

/// A request on its way through the [`TokenMiddleware`](crate::TokenMiddleware).
pub(crate) struct Outgoing(pub(crate) reqwest::Request);

impl AuthRequest for Outgoing {
    fn method(&self) -> http::Method {
        self.0.method().clone()
    }

    fn url(&self) -> &Url {
        self.0.url()
    }

    fn url_mut(&mut self) -> &mut Url {
        self.0.url_mut()
    }

    fn header_map(&mut self) -> Option<&mut http::HeaderMap> {
        Some(self.0.headers_mut())
    }

    fn try_clone(&self) -> Option<Self> {
        replay_copy(&self.0).map(Outgoing)
    }
}

/// A copy of `request` to resend; `None` for a streaming body, which cannot be replayed
/// (C4).
///
/// `reqwest::Request::try_clone` sets the copy's timeout before anything else, which
/// creates the request's extension map (a map and a boxed value: three allocations)
/// that the next line replaces with a copy of the original's extensions; this copy was
/// most of the middleware's extra allocations per request. reqwest 0.13 keeps
/// only the timeout in a request's extensions, so a request without a timeout or a body
/// is its method, URL, headers and version, copied here directly; any other request goes
/// through reqwest's own copy.
fn replay_copy(request: &reqwest::Request) -> Option<reqwest::Request> {
    if request.body().is_some() || request.timeout().is_some() {
        return request.try_clone();
    }
    let mut copy = reqwest::Request::new(request.method().clone(), request.url().clone());
    // An empty map stays as `new` made it: a clone of one that has room allocates its
    // table.
    if !request.headers().is_empty() {
        *copy.headers_mut() = request.headers().clone();
    }
    *copy.version_mut() = request.version();
    Some(copy)
}

/// A response on its way back through the [`TokenMiddleware`](crate::TokenMiddleware).
pub(crate) struct Incoming(pub(crate) reqwest::Response);

impl ResponseView for Incoming {
    fn status(&self) -> u16 {
        self.0.status().as_u16()
    }

    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        self.0.headers().get(name)?.to_str().ok()
    }
}

impl AuthResponse for Incoming {
    /// reqwest follows redirects inside the client: the response may come from
    /// elsewhere.
    fn final_url(&self) -> Option<&Url> {
        Some(self.0.url())
    }

    fn buffer_body(self, limit: usize) -> impl Future<Output = (Self, Option<Bytes>)> + Send {
        buffer_body(self.0, limit)
    }
}

/// What follows the bytes already read when the response is put back together.
enum Rest {
    /// The body ended: the bytes read are all of it.
    Nothing,
    /// The body is longer than the limit: the unread part follows.
    Unread,
    /// Reading failed: the caller gets the same error where it happened.
    Failed(reqwest::Error),
}

async fn buffer_body(mut response: reqwest::Response, limit: usize) -> (Incoming, Option<Bytes>) {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        // Too long to classify; nothing read, nothing to rebuild.
        return (Incoming(response), None);
    }
    let mut read = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read.extend_from_slice(&chunk);
                if read.len() > limit {
                    return (rebuild(response, read.freeze(), Rest::Unread), None);
                }
            }
            Ok(None) => {
                let body = read.freeze();
                return (rebuild(response, body.clone(), Rest::Nothing), Some(body));
            }
            Err(error) => return (rebuild(response, read.freeze(), Rest::Failed(error)), None),
        }
    }
}

/// The same status, version, headers, extensions and URL, with a body that yields
/// `read` and then `rest`: the caller cannot tell the body was looked at.
fn rebuild(mut response: reqwest::Response, read: Bytes, rest: Rest) -> Incoming {
    let status = response.status();
    let version = response.version();
    let headers = std::mem::take(response.headers_mut());
    let extensions = std::mem::take(response.extensions_mut());
    let url = response.url().clone();
    let body = match rest {
        Rest::Nothing => Body::from(read),
        Rest::Unread => {
            let read = stream::once(future::ready(Ok(read)));
            Body::wrap_stream(read.chain(response.bytes_stream()))
        }
        Rest::Failed(error) => Body::wrap_stream(stream::iter([Ok(read), Err(error)])),
    };
    let mut rebuilt = http::Response::new(body);
    *rebuilt.status_mut() = status;
    *rebuilt.version_mut() = version;
    *rebuilt.headers_mut() = headers;
    *rebuilt.extensions_mut() = extensions;
    set_url(&mut rebuilt, url);
    Incoming(reqwest::Response::from(rebuilt))
}

/// `response` with its URL (`Response::url`, and the URL in errors made from it)
/// replaced by `url`; status, headers, extensions and the body stream as they were.
pub(crate) fn with_url(response: reqwest::Response, url: Url) -> reqwest::Response {
    let mut response = http::Response::<Body>::from(response);
    set_url(&mut response, url);
    reqwest::Response::from(response)
}

/// reqwest keeps the response URL in a private extension that only its builder
/// extension can set.
fn set_url<B>(response: &mut http::Response<B>, url: Url) {
    if let Ok(marker) = http::Response::builder().url(url).body(()) {
        response
            .extensions_mut()
            .extend(marker.into_parts().0.extensions);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn requests() -> Vec<reqwest::Request> {
        let client = reqwest::Client::new();
        let built = [
            client.get("https://api.example.com/a?b=c"),
            client
                .post("http://127.0.0.1:8080/x")
                .header("x-one", "1")
                .header("x-one", "2")
                .version(http::Version::HTTP_2),
            client.put("https://api.example.com/").body("body"),
            client
                .get("https://api.example.com/slow")
                .timeout(Duration::from_secs(7)),
            client
                .delete("https://api.example.com/both")
                .body(Bytes::from_static(b"bytes"))
                .timeout(Duration::from_millis(5)),
        ];
        built
            .into_iter()
            .map(|builder| match builder.build() {
                Ok(request) => request,
                Err(error) => panic!("building a request: {error}"),
            })
            .collect()
    }

    /// The direct copy agrees with reqwest's `try_clone` in everything a request shows.
    #[test]
    fn c4_the_replay_copy_agrees_with_reqwests_try_clone() {
        for request in requests() {
            let Some(ours) = replay_copy(&request) else {
                panic!("a request with a reusable body must be copied");
            };
            let Some(theirs) = request.try_clone() else {
                panic!("reqwest copies it too");
            };
            assert_eq!(ours.method(), theirs.method());
            assert_eq!(ours.url(), theirs.url());
            assert_eq!(ours.headers(), theirs.headers());
            assert_eq!(ours.version(), theirs.version());
            assert_eq!(ours.timeout(), theirs.timeout());
            assert_eq!(ours.timeout(), request.timeout());
            assert_eq!(
                ours.body().and_then(reqwest::Body::as_bytes),
                theirs.body().and_then(reqwest::Body::as_bytes)
            );
        }
    }

    #[test]
    fn c4_a_streaming_body_is_not_copied() {
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from("x"))]);
        let request = reqwest::Client::new()
            .post("https://api.example.com/upload")
            .body(reqwest::Body::wrap_stream(stream))
            .build();
        let request = request.unwrap_or_else(|error| panic!("building a request: {error}"));
        assert!(replay_copy(&request).is_none());
    }
}
