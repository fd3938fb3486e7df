//! Reading a surf body into memory without ever reading more than a limit, and putting
//! back a body that is intact when it turns out larger.

use bytes::Bytes;
use futures_util::AsyncReadExt;
use futures_util::io::Cursor;
use surf::Body;
use surf::http::Mime;

/// What a bounded read found.
pub(crate) enum Bounded {
    /// The whole body, at most `limit` bytes.
    Complete(Bytes),
    /// The body is larger than the limit (or of unknown length where that counts):
    /// here it is again, intact, with the bytes already read put back in front.
    TooLarge(Body),
}

/// Whether a body of unknown length (a stream) is read at all.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// Read up to the limit (a response body sent chunked).
    Read,
    /// Leave it alone (a request body the caller streams: never buffered, never replayed).
    Skip,
}

/// Reads `body` if it has at most `limit` bytes. An I/O error hands back what could be
/// kept: the bytes read so far, then the rest of the reader.
pub(crate) async fn read_bounded(
    mut body: Body,
    limit: usize,
    unknown: Unknown,
) -> Result<Bounded, (Body, std::io::Error)> {
    match body.len() {
        Some(len) if len > limit => return Ok(Bounded::TooLarge(body)),
        None if unknown == Unknown::Skip => return Ok(Bounded::TooLarge(body)),
        _ => {}
    }
    let mime = body.mime().clone();
    let mut buffer = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let read = (&mut body).take(cap).read_to_end(&mut buffer).await;
    if let Err(e) = read {
        return Err((put_back(buffer, body, mime), e));
    }
    if buffer.len() > limit {
        return Ok(Bounded::TooLarge(put_back(buffer, body, mime)));
    }
    Ok(Bounded::Complete(Bytes::from(buffer)))
}

/// The bytes read so far followed by the unread rest, with the original MIME type.
fn put_back(read: Vec<u8>, rest: Body, mime: Mime) -> Body {
    let mut body = Body::from_bytes(read).chain(rest);
    body.set_mime(mime);
    body
}

/// A body over buffered bytes (no copy), with `mime`.
pub(crate) fn from_bytes(bytes: Bytes, mime: Mime) -> Body {
    let len = bytes.len();
    let mut body = Body::from_reader(Cursor::new(bytes), Some(len));
    body.set_mime(mime);
    body
}
