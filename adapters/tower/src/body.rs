//! Bodies: which request bodies can be sent twice ([C4](tokenflight#c4)), and reading the first bytes of
//! a body without the receiver noticing.
//!
//! A rejected request is resent only if its body can be produced again: either its type
//! makes a cheap copy ([`ReplayBody::try_clone`]: `Full<Bytes>`, `String`, `Empty`), or
//! the whole body is in memory when the request is sent and fits the replay limit, and
//! the body type can hold a buffered body ([`ReplayBody::wrap_buffered`]: boxed bodies,
//! tonic's body). Anything else goes out as it is and is not replayed.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{Empty, Full};
use pin_project_lite::pin_project;

/// A request body type the [`TokenLayer`](crate::TokenLayer) may send again after a
/// rejection.
///
/// Implemented for the body types of the ecosystem; implement it for your own body type
/// (both methods have defaults that mean "cannot replay": such requests get a token but
/// are never resent).
pub trait ReplayBody: Body<Data = Bytes> + Send + Unpin + Sized + 'static {
    /// A copy of the body that costs little (shares its bytes), when the type can make
    /// one. Used for types without [`wrap_buffered`](Self::wrap_buffered); a type that
    /// has both is read ahead instead.
    fn try_clone(&self) -> Option<Self> {
        None
    }

    /// How to make this type from a [`BufferedBody`], when it can hold any body (a boxed
    /// body). Only then does the layer read the body ahead into memory, and it has to:
    /// it cannot know whether the body fits before reading it.
    fn wrap_buffered() -> Option<fn(BufferedBody<Self>) -> Self> {
        None
    }
}

impl ReplayBody for Full<Bytes> {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for Empty<Bytes> {
    fn try_clone(&self) -> Option<Self> {
        Some(*self)
    }
}

impl ReplayBody for String {
    fn try_clone(&self) -> Option<Self> {
        // A copy, not a shared buffer: callers who send large bodies use `Full<Bytes>`.
        Some(self.clone())
    }
}

impl<E: Send + Sync + 'static> ReplayBody for BoxBody<Bytes, E> {
    fn wrap_buffered() -> Option<fn(BufferedBody<Self>) -> Self> {
        Some(BoxBody::new)
    }
}

impl<E: Send + 'static> ReplayBody for UnsyncBoxBody<Bytes, E> {
    fn wrap_buffered() -> Option<fn(BufferedBody<Self>) -> Self> {
        Some(UnsyncBoxBody::new)
    }
}

/// A server's request body (a proxy forwarding it): streamed, never replayed.
impl ReplayBody for hyper::body::Incoming {}

#[cfg(feature = "tonic")]
impl ReplayBody for tonic::body::Body {
    fn wrap_buffered() -> Option<fn(BufferedBody<Self>) -> Self> {
        Some(tonic::body::Body::new)
    }
}

pin_project! {
    /// A body whose first bytes may have been read ahead: it yields them, then the rest
    /// of the original body, exactly as the original would have (data, trailers, or the
    /// error reading stopped at). The [`TokenService`](crate::TokenService)'s responses
    /// carry this body, so a body classifier can look at a response the caller then
    /// reads in full.
    pub struct BufferedBody<B: Body> {
        read: Bytes,
        #[pin]
        rest: Option<B>,
        // Boxed: rare, and every response's future and body carry this field.
        trailers: Option<Box<HeaderMap>>,
        error: Option<B::Error>,
    }
}

impl<B: Body> fmt::Debug for BufferedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the bytes: a request body may hold credentials.
        f.debug_struct("BufferedBody")
            .field("read_ahead", &self.read.len())
            .field("rest", &self.rest.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: Body> BufferedBody<B> {
    /// `body`, nothing read ahead.
    pub fn new(body: B) -> Self {
        BufferedBody {
            read: Bytes::new(),
            rest: Some(body),
            trailers: None,
            error: None,
        }
    }

    /// A body of exactly `bytes`.
    pub fn from_bytes(bytes: Bytes) -> Self {
        BufferedBody {
            read: bytes,
            rest: None,
            trailers: None,
            error: None,
        }
    }

    /// The original body, if nothing was read from it; otherwise `self` back.
    // `Err` is the body handed back whole, not an error worth boxing.
    #[allow(clippy::result_large_err)]
    pub fn into_inner(self) -> Result<B, Self> {
        match self {
            BufferedBody {
                read,
                rest: Some(body),
                trailers: None,
                error: None,
            } if read.is_empty() => Ok(body),
            other => Err(other),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for BufferedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if !this.read.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(this.read)))));
        }
        if let Some(body) = this.rest.as_mut().as_pin_mut() {
            match ready!(body.poll_frame(cx)) {
                None => this.rest.set(None),
                frame => return Poll::Ready(frame),
            }
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        Poll::Ready(this.error.take().map(Err))
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty()
            && self.trailers.is_none()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.read.len() as u64;
        match &self.rest {
            Some(body) => {
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint
            }
            None => SizeHint::with_exact(read),
        }
    }
}

/// Whether reading ahead waits for data that is not there yet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Wait (a response: the server is sending it).
    Yes,
    /// Stop at the first frame that is not ready (a request body the caller may still be
    /// producing: a client-streaming call must not wait for its own end before it starts).
    No,
}

/// Reads `body` ahead, up to `limit` bytes. Returns the body, intact for its receiver,
/// and all of its bytes when it ended (without trailers) within the limit.
pub(crate) async fn read_ahead<B>(
    body: B,
    limit: usize,
    wait: Wait,
) -> (BufferedBody<B>, Option<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut reading = match Reading::start(body, limit) {
        Ok(reading) => reading,
        Err(too_long) => return (BufferedBody::new(too_long), None),
    };
    poll_fn(|cx| reading.poll(cx, wait)).await
}

/// [`read_ahead`] without waiting, and without a task: what the body has ready now (a
/// request's body, read before the request's future exists, so that future need not
/// hold the reading's state). A frame that is not ready stops the reading, as with
/// [`Wait::No`]; the body is polled again, with its receiver's waker, when it is sent.
pub(crate) fn read_ready<B>(body: B, limit: usize) -> (BufferedBody<B>, Option<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut reading = match Reading::start(body, limit) {
        Ok(reading) => reading,
        Err(too_long) => return (BufferedBody::new(too_long), None),
    };
    match reading.poll(&mut Context::from_waker(Waker::noop()), Wait::No) {
        Poll::Ready(read) => read,
        // Not reached: without waiting, a frame that is not ready ends the reading.
        Poll::Pending => reading.unread(),
    }
}

/// A body being read ahead.
struct Reading<B> {
    /// `None` once it ended, failed or passed the limit.
    body: Option<B>,
    read: Read,
    limit: usize,
}

impl<B: Body<Data = Bytes> + Unpin> Reading<B> {
    /// `Err`: the body says it is longer than `limit`; it is not read.
    fn start(body: B, limit: usize) -> Result<Self, B> {
        if body.size_hint().lower() > limit as u64 {
            return Err(body);
        }
        Ok(Reading {
            body: Some(body),
            read: Read::default(),
            limit,
        })
    }

    /// Reads frames until the body ends, fails, passes the limit or (without waiting) has
    /// none ready.
    fn poll(&mut self, cx: &mut Context<'_>, wait: Wait) -> Poll<(BufferedBody<B>, Option<Bytes>)> {
        while let Some(current) = self.body.as_mut() {
            let frame = match Pin::new(current).poll_frame(cx) {
                // Not ready: the caller is still producing it.
                Poll::Pending if wait == Wait::No => break,
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            match frame {
                None => {
                    let bytes = std::mem::take(&mut self.read).finish();
                    let buffered = BufferedBody::from_bytes(bytes.clone());
                    return Poll::Ready((buffered, Some(bytes)));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.read.push(data);
                        if self.read.len() > self.limit {
                            break;
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body. Kept for the receiver; such a body is not
                        // classified or replayed (the trailers would have to come along).
                        let trailers = frame.into_trailers().ok().map(Box::new);
                        return Poll::Ready((
                            BufferedBody {
                                read: std::mem::take(&mut self.read).finish(),
                                rest: None,
                                trailers,
                                error: None,
                            },
                            None,
                        ));
                    }
                },
                Some(Err(error)) => {
                    return Poll::Ready((
                        BufferedBody {
                            read: std::mem::take(&mut self.read).finish(),
                            rest: None,
                            trailers: None,
                            error: Some(error),
                        },
                        None,
                    ));
                }
            }
        }
        Poll::Ready(self.unread())
    }

    /// What was read, followed by the rest of the body.
    fn unread(&mut self) -> (BufferedBody<B>, Option<Bytes>) {
        let buffered = BufferedBody {
            read: std::mem::take(&mut self.read).finish(),
            rest: self.body.take(),
            trailers: None,
            error: None,
        };
        (buffered, None)
    }
}

/// Bytes read so far; one chunk (the common case) is kept without copying.
#[derive(Default)]
struct Read {
    first: Bytes,
    more: Option<BytesMut>,
}

impl Read {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        match &mut self.more {
            Some(more) => more.extend_from_slice(&data),
            None if self.first.is_empty() => self.first = data,
            None => {
                let mut more = BytesMut::with_capacity(self.first.len() + data.len());
                more.extend_from_slice(&self.first);
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    fn len(&self) -> usize {
        match &self.more {
            Some(more) => more.len(),
            None => self.first.len(),
        }
    }

    fn finish(self) -> Bytes {
        match self.more {
            Some(more) => more.freeze(),
            None => self.first,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;

    fn stream(frames: Frames) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn data(text: &'static str) -> Result<Frame<Bytes>, std::io::Error> {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test]
    async fn a_small_complete_body_is_read_whole_and_given_back_intact() {
        let (body, bytes) = read_ahead(stream(vec![data("ab"), data("cd")]), 10, Wait::No).await;
        assert_eq!(bytes.as_deref(), Some(&b"abcd"[..]));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_kept_but_intact() {
        let (body, bytes) = read_ahead(
            stream(vec![data("abc"), data("def"), data("g")]),
            4,
            Wait::No,
        )
        .await;
        assert!(bytes.is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdefg");
    }

    #[tokio::test]
    async fn a_body_still_being_produced_is_not_waited_for() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        tx.send(data("first")).await.unwrap();
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (body, bytes) = read_ahead(body, 1024, Wait::No).await;
        assert!(bytes.is_none(), "the stream has not ended");
        tx.send(data(" second")).await.unwrap();
        drop(tx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "first second");
    }

    #[tokio::test]
    async fn trailers_and_errors_reach_the_receiver_where_they_were() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "16".parse().unwrap());
        let frames = vec![data("x"), Ok(Frame::trailers(trailers.clone()))];
        let (body, bytes) = read_ahead(stream(frames), 10, Wait::Yes).await;
        assert!(bytes.is_none());
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "x");

        let frames = vec![data("y"), Err(std::io::Error::other("reset"))];
        let (mut body, bytes) = read_ahead(stream(frames), 10, Wait::Yes).await;
        assert!(bytes.is_none());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "y");
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(error.to_string(), "reset");
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn size_hint_counts_the_bytes_read_ahead() {
        let body = BufferedBody::<Full<Bytes>>::from_bytes(Bytes::from_static(b"12345"));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let untouched = BufferedBody::new(Full::new(Bytes::from_static(b"123")));
        assert_eq!(untouched.size_hint().exact(), Some(3));
        assert!(untouched.into_inner().is_ok());
    }
}
