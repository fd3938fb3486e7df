//! surf's request and response as the core's `AuthRequest` / `AuthResponse`.
//!
//! Cloning a `surf::Request` silently drops its body (and its extensions), so the body
//! is read into memory once, bounded, and attached to every attempt. A body that is
//! larger than the limit, or a stream of unknown length, is sent as it is and the
//! request is not replayable: on a rejection the caller gets the original response ([C4](tokenflight#c4)).

use std::str::FromStr;

use bytes::Bytes;
use surf::http::headers::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use surf::http::{Mime, Url};
use surf::{Request, Response, StatusCode};
use tokenflight::adapter::{AuthRequest, AuthResponse, InvalidHeader, ResponseView};

use crate::body::{self, Bounded, Unknown};

/// One attempt of a request, with the buffered body to make the next one from.
pub(crate) struct Attempt {
    request: Request,
    replay: Replay,
}

/// How the next attempt gets its body.
#[derive(Clone)]
enum Replay {
    /// An empty body (surf's clone gives one).
    Empty,
    /// These bytes, of this type (boxed: the attempt and its copy live in every
    /// request's future, and most requests have no body).
    Bytes(Box<(Bytes, Mime)>),
    /// Not replayable: a stream, or larger than the limit.
    No,
    /// A body not read yet: not replayable unless [`Attempt::read_body`] reads it.
    Unread,
}

impl Attempt {
    /// `request` as it is, its body not read: replayable at once when the body is empty
    /// (a GET, most requests: a resend gets an empty body), otherwise only after
    /// [`Attempt::read_body`].
    pub(crate) fn without_reading(request: Request) -> Attempt {
        let empty = AsRef::<surf::http::Request>::as_ref(&request).is_empty() == Some(true);
        Attempt {
            request,
            replay: if empty { Replay::Empty } else { Replay::Unread },
        }
    }

    /// Whether the body is still to be read ([`Attempt::read_body`]) before the request
    /// can be replayed.
    pub(crate) fn is_unread(&self) -> bool {
        matches!(self.replay, Replay::Unread)
    }

    /// This attempt with its body read into memory if it was not yet and has a known
    /// length of at most `limit` bytes; otherwise the body stays as it is and the
    /// request is not replayable.
    pub(crate) async fn read_body(self, limit: usize) -> surf::Result<Attempt> {
        if !self.is_unread() {
            return Ok(self);
        }
        let mut request = self.request;
        let had_content_type = request.header(CONTENT_TYPE).is_some();
        let original = request.take_body();
        let mime = original.mime().clone();
        let (body, replay) = match body::read_bounded(original, limit, Unknown::Skip).await {
            Ok(Bounded::Complete(bytes)) => {
                let body = body::from_bytes(bytes.clone(), mime.clone());
                (body, Replay::Bytes(Box::new((bytes, mime))))
            }
            Ok(Bounded::TooLarge(body)) => (body, Replay::No),
            Err((_, e)) => return Err(surf::Error::new(StatusCode::UnprocessableEntity, e)),
        };
        request.set_body(body);
        if !had_content_type {
            // Setting a body adds a `Content-Type` header when there was none; the
            // request must go out as the caller built it.
            request.remove_header(CONTENT_TYPE);
        }
        Ok(Attempt { request, replay })
    }

    /// The same method, URL and headers with no body (always replayable), for a
    /// redirect that turns the request into a `GET`.
    pub(crate) fn without_body(&self) -> Attempt {
        // surf's clone keeps method, URL and headers and leaves the body empty.
        let mut request = self.request.clone();
        request.remove_header(CONTENT_TYPE);
        request.remove_header(CONTENT_LENGTH);
        Attempt {
            request,
            replay: Replay::Empty,
        }
    }

    /// The request as it stands, to adjust before it is sent.
    pub(crate) fn request_mut(&mut self) -> &mut Request {
        &mut self.request
    }

    pub(crate) fn into_request(self) -> Request {
        self.request
    }
}

impl AuthRequest for Attempt {
    fn method(&self) -> http::Method {
        method_of(self.request.method())
    }

    fn url(&self) -> &Url {
        self.request.url()
    }

    fn url_mut(&mut self) -> &mut Url {
        AsMut::<surf::http::Request>::as_mut(&mut self.request).url_mut()
    }

    /// http-types has no "sensitive" flag on a header: the value is kept out of this
    /// crate's logs and errors, but `Debug` of the `surf::Request` that middleware after
    /// the [`TokenMiddleware`](crate::TokenMiddleware) sees would show it. Do not log requests there.
    fn set_sensitive_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        // http-types only checks for ASCII; the `http` crate also refuses control
        // characters, so a token cannot inject a header line.
        if http::HeaderName::from_str(name).is_err() || http::HeaderValue::from_str(value).is_err()
        {
            return Err(InvalidHeader);
        }
        let name = HeaderName::from_str(name).map_err(|_| InvalidHeader)?;
        let value = HeaderValue::from_str(value).map_err(|_| InvalidHeader)?;
        self.request.insert_header(name, value);
        Ok(())
    }

    /// The value comes from the `http` crate, which has checked it (no control
    /// characters): only http-types' own types are made here, and the usual header's
    /// name is http-types' constant (no allocation for it).
    fn set_header_value(
        &mut self,
        name: &http::HeaderName,
        value: &http::HeaderValue,
    ) -> Result<(), InvalidHeader> {
        let text = value.to_str().map_err(|_| InvalidHeader)?;
        let value = HeaderValue::from_str(text).map_err(|_| InvalidHeader)?;
        if name == http::header::AUTHORIZATION {
            self.request
                .insert_header(surf::http::headers::AUTHORIZATION, value);
        } else {
            let name = HeaderName::from_str(name.as_str()).map_err(|_| InvalidHeader)?;
            self.request.insert_header(name, value);
        }
        Ok(())
    }

    fn try_clone(&self) -> Option<Self> {
        // Clones method, URL and headers; the body comes from the buffer.
        let request = match &self.replay {
            Replay::No | Replay::Unread => return None,
            // surf's clone already has an empty body; setting one would add a
            // `Content-Type` only to remove it again.
            Replay::Empty => self.request.clone(),
            Replay::Bytes(buffered) => {
                let (bytes, mime) = &**buffered;
                let mut request = self.request.clone();
                let had_content_type = request.header(CONTENT_TYPE).is_some();
                request.set_body(body::from_bytes(bytes.clone(), mime.clone()));
                if !had_content_type {
                    request.remove_header(CONTENT_TYPE);
                }
                request
            }
        };
        Some(Attempt {
            request,
            replay: self.replay.clone(),
        })
    }
}

/// A `surf::Response` the core can classify.
pub(crate) struct Reply(pub(crate) Response);

impl ResponseView for Reply {
    fn status(&self) -> u16 {
        u16::from(self.0.status())
    }

    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        // Found by comparing names, not through surf's `HeaderName`: its `from_str`
        // allocates the lower-cased name, and the classifier asks on every response.
        // surf keeps its names lower-cased, one entry per name.
        self.0
            .iter()
            .find(|(have, _)| have.as_str().eq_ignore_ascii_case(name.as_str()))?
            .1
            .iter()
            .next()
            .map(HeaderValue::as_str)
    }
}

impl AuthResponse for Reply {
    async fn buffer_body(mut self, limit: usize) -> (Self, Option<Bytes>) {
        let had_content_type = self.0.header(CONTENT_TYPE).is_some();
        let original = self.0.take_body();
        let mime = original.mime().clone();
        let (body, bytes) = match body::read_bounded(original, limit, Unknown::Read).await {
            Ok(Bounded::Complete(bytes)) => (body::from_bytes(bytes.clone(), mime), Some(bytes)),
            Ok(Bounded::TooLarge(body)) | Err((body, _)) => (body, None),
        };
        self.0.set_body(body);
        if !had_content_type {
            // The caller gets the headers the server sent, nothing added.
            self.0.remove_header(CONTENT_TYPE);
        }
        (self, bytes)
    }
}

/// surf's method as the `http` crate's (the core's [`AuthRequest::method`]).
pub(crate) fn method_of(method: surf::http::Method) -> http::Method {
    use surf::http::Method as M;
    match method {
        M::Get => http::Method::GET,
        M::Post => http::Method::POST,
        M::Put => http::Method::PUT,
        M::Delete => http::Method::DELETE,
        M::Head => http::Method::HEAD,
        M::Options => http::Method::OPTIONS,
        M::Patch => http::Method::PATCH,
        M::Connect => http::Method::CONNECT,
        M::Trace => http::Method::TRACE,
        // The WebDAV and other extension methods: by name (always a valid token).
        other => http::Method::from_bytes(other.to_string().as_bytes()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_std::task::block_on;
    use surf::Body;

    fn request(method: surf::http::Method) -> Request {
        Request::new(method, Url::parse("http://127.0.0.1:1/api/x").unwrap())
    }

    #[test]
    fn buffering_adds_no_content_type_and_keeps_one_that_was_set() {
        block_on(async {
            let attempt = Attempt::without_reading(request(surf::http::Method::Get))
                .read_body(1024)
                .await
                .unwrap();
            assert!(attempt.request.header(CONTENT_TYPE).is_none());
            let copy = attempt.try_clone().unwrap();
            assert!(copy.request.header(CONTENT_TYPE).is_none());

            let mut post = request(surf::http::Method::Post);
            post.set_body(Body::from_string("{\"a\":1}".into()));
            post.set_content_type("application/json".into());
            let attempt = Attempt::without_reading(post)
                .read_body(1024)
                .await
                .unwrap();
            let mut copy = attempt.try_clone().unwrap();
            for r in [&mut attempt.into_request(), &mut copy.request] {
                assert_eq!(r.header(CONTENT_TYPE).unwrap().as_str(), "application/json");
                assert_eq!(r.take_body().into_string().await.unwrap(), "{\"a\":1}");
            }
        });
    }

    #[test]
    fn streams_and_large_bodies_are_not_replayable_but_intact() {
        block_on(async {
            let mut post = request(surf::http::Method::Post);
            post.set_body(Body::from_reader(
                futures_util::io::Cursor::new(b"streamed".to_vec()),
                None,
            ));
            let attempt = Attempt::without_reading(post)
                .read_body(1024)
                .await
                .unwrap();
            assert!(attempt.try_clone().is_none());
            let mut sent = attempt.into_request();
            assert_eq!(sent.take_body().into_string().await.unwrap(), "streamed");

            let mut post = request(surf::http::Method::Post);
            post.set_body(Body::from_bytes(vec![7; 11]));
            let attempt = Attempt::without_reading(post).read_body(10).await.unwrap();
            assert!(attempt.try_clone().is_none());
            let mut sent = attempt.into_request();
            assert_eq!(sent.take_body().into_bytes().await.unwrap(), vec![7; 11]);
        });
    }

    #[test]
    fn response_headers_are_found_whatever_the_case_of_the_name() {
        let mut response = surf::http::Response::new(StatusCode::Unauthorized);
        response.insert_header("WWW-Authenticate", "Bearer error=\"invalid_token\"");
        response.append_header("x-Two", "first");
        response.append_header("x-two", "second");
        let reply = Reply(Response::from(response));
        let name = |name: &'static str| http::HeaderName::from_static(name);
        // `http` names are lower-case; surf's came in any case.
        assert_eq!(
            reply.header(&name("www-authenticate")),
            Some("Bearer error=\"invalid_token\"")
        );
        assert_eq!(reply.header(&name("x-two")), Some("first"));
        assert_eq!(reply.header(&name("x-three")), None);
    }

    #[test]
    fn sensitive_header_refuses_line_breaks() {
        block_on(async {
            let mut attempt = Attempt::without_reading(request(surf::http::Method::Get))
                .read_body(0)
                .await
                .unwrap();
            assert_eq!(
                attempt.set_sensitive_header("authorization", "Bearer a\r\nx-evil: 1"),
                Err(InvalidHeader)
            );
            assert_eq!(
                attempt.set_sensitive_header("authorization", "Bearer ok"),
                Ok(())
            );
            attempt
                .set_sensitive_header("authorization", "Bearer new")
                .unwrap();
            let values = attempt.request.header("authorization").unwrap();
            assert_eq!(values.iter().count(), 1, "replaced, not appended");
            assert_eq!(values.last().as_str(), "Bearer new");
        });
    }

    fn response(body: Body, content_type: Option<&str>) -> Reply {
        let mut res = surf::http::Response::new(StatusCode::Ok);
        res.set_body(body);
        match content_type {
            Some(ct) => {
                res.insert_header(CONTENT_TYPE, ct);
            }
            None => {
                res.remove_header(CONTENT_TYPE);
            }
        }
        Reply(Response::from(res))
    }

    #[test]
    fn buffered_response_is_intact() {
        block_on(async {
            // Chunked (unknown length) and small: read and put back.
            let body = Body::from_reader(
                futures_util::io::Cursor::new(b"{\"code\":401}".to_vec()),
                None,
            );
            let (mut reply, bytes) = response(body, None).buffer_body(64).await;
            assert_eq!(bytes.as_deref(), Some(&b"{\"code\":401}"[..]));
            assert!(reply.0.header(CONTENT_TYPE).is_none(), "no header added");
            assert_eq!(reply.0.body_bytes().await.unwrap(), b"{\"code\":401}");

            // Larger than the limit: not classified, but every byte still there.
            let long: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
            let body = Body::from_reader(futures_util::io::Cursor::new(long.clone()), None);
            let (mut reply, bytes) = response(body, Some("text/plain")).buffer_body(100).await;
            assert!(bytes.is_none());
            assert_eq!(reply.0.header(CONTENT_TYPE).unwrap().as_str(), "text/plain");
            assert_eq!(reply.0.body_bytes().await.unwrap(), long);

            // Known length above the limit: not read at all.
            let (mut reply, bytes) = response(Body::from_bytes(long.clone()), None)
                .buffer_body(999)
                .await;
            assert!(bytes.is_none());
            assert_eq!(reply.0.body_bytes().await.unwrap(), long);
        });
    }

    #[test]
    fn response_view_reads_status_and_headers_without_panicking() {
        let reply = response(Body::empty(), Some("text/plain"));
        assert_eq!(reply.status(), 200);
        assert_eq!(
            reply.header(&http::header::CONTENT_TYPE),
            Some("text/plain")
        );
        assert_eq!(
            reply.header(&http::HeaderName::from_static("x-missing")),
            None
        );
    }
}
