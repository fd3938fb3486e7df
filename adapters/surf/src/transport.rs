//! [`BareTransport`]: a `surf::Client` as the core's `Transport`, for token sources.

use std::str::FromStr;

use surf::http::headers::{CONTENT_TYPE, HeaderName, HeaderValue};
use surf::http::{Method, Url};
use surf::{Body, Client, Request};
use tokenflight::adapter::{HttpRequest, HttpResponse, Transport, TransportError, TransportFuture};

use crate::body::{self, Bounded, Unknown};

/// A `surf::Client` *without* the [`TokenMiddleware`](crate::TokenMiddleware), for token sources
/// to reach the token endpoint: a refresh request can never wait for itself or loop
/// through the layer. Give it a client with no auth middleware.
///
/// # Use a client without keep-alive
/// When a refresh attempt times out ([C10](tokenflight#c10)), its request is dropped mid-flight. surf's h1
/// backend then puts the connection back into its pool although the server is still
/// working on the abandoned request, and the next refresh on that connection waits
/// behind it: it times out too, and so does every later one (tested in
/// `tests/all/layer.rs`). Token calls are rare, so give the transport a client that opens a
/// connection per request: `surf::Config::new().set_http_keep_alive(false)` — which is
/// what `BareTransport::default()` (feature `h1-client-rustls`) does.
#[derive(Clone, Debug)]
pub struct BareTransport {
    client: Client,
}

impl BareTransport {
    /// Wraps `client` (which must not carry a `TokenMiddleware`).
    pub fn new(client: Client) -> Self {
        BareTransport { client }
    }
}

#[cfg(feature = "h1-client-rustls")]
impl Default for BareTransport {
    /// A new `surf::Client` (async-h1 with rustls) with keep-alive off (see above).
    fn default() -> Self {
        let config = surf::Config::new().set_http_keep_alive(false);
        let client = match Client::try_from(config) {
            Ok(client) => client,
            Err(never) => match never {},
        };
        BareTransport::new(client)
    }
}

impl Transport for BareTransport {
    fn send(&self, request: HttpRequest, body_limit: usize) -> TransportFuture<'_> {
        Box::pin(async move {
            let request = to_surf(request)?;
            let response = self.client.send(request).await.map_err(network)?;
            from_surf(response, body_limit).await
        })
    }
}

fn invalid(what: &str) -> TransportError {
    TransportError::InvalidRequest(what.to_owned())
}

fn network(error: surf::Error) -> TransportError {
    let error = error.into_inner();
    match error.downcast_ref::<std::io::Error>() {
        Some(io) if io.kind() == std::io::ErrorKind::TimedOut => TransportError::Timeout,
        _ => TransportError::Network(error.into()),
    }
}

fn to_surf(request: HttpRequest) -> Result<Request, TransportError> {
    let (parts, bytes) = request.into_parts();
    let method = Method::from_str(parts.method.as_str()).map_err(|_| invalid("method"))?;
    let url = Url::parse(&parts.uri.to_string()).map_err(|_| invalid("URL"))?;
    let mut surf_request = Request::new(method, url);
    for (name, value) in &parts.headers {
        let name = HeaderName::from_str(name.as_str()).map_err(|_| invalid("header name"))?;
        // Visible ASCII only (what `to_str` accepts): no control characters.
        let value = value.to_str().map_err(|_| invalid("header value"))?;
        let value = HeaderValue::from_str(value).map_err(|_| invalid("header value"))?;
        surf_request.append_header(name, value);
    }
    if !bytes.is_empty() {
        let had_content_type = surf_request.header(CONTENT_TYPE).is_some();
        surf_request.set_body(body::from_bytes(bytes, surf::http::mime::BYTE_STREAM));
        if !had_content_type {
            surf_request.remove_header(CONTENT_TYPE);
        }
    }
    Ok(surf_request)
}

async fn from_surf(
    mut response: surf::Response,
    body_limit: usize,
) -> Result<HttpResponse, TransportError> {
    let status = http::StatusCode::from_u16(u16::from(response.status()))
        .map_err(|_| TransportError::Network("invalid status code".into()))?;
    let mut builder = http::Response::builder().status(status);
    for (name, values) in response.iter() {
        // A header `http` cannot represent is dropped rather than failing the refresh.
        let Ok(name) = http::HeaderName::from_str(name.as_str()) else {
            continue;
        };
        for value in values.iter() {
            if let Ok(value) = http::HeaderValue::from_str(value.as_str()) {
                builder = builder.header(name.clone(), value);
            }
        }
    }
    let body: Body = response.take_body();
    let bytes = match body::read_bounded(body, body_limit, Unknown::Read).await {
        Ok(Bounded::Complete(bytes)) => bytes,
        Ok(Bounded::TooLarge(_)) => return Err(TransportError::TooLarge { limit: body_limit }),
        Err((_, e)) => return Err(TransportError::Network(e.into())),
    };
    builder
        .body(bytes)
        .map_err(|e| TransportError::Network(e.into()))
}
