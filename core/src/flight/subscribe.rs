//! Token changes as a stream, for connections that stay open (a WebSocket, an SSE
//! stream, a gRPC stream, a database session) and must re-authenticate or reconnect
//! when the token changes ([C21](crate#c21)).
//!
//! One slot, not a queue: the coordinator keeps only its latest change, numbered by a
//! counter, and each subscriber remembers the number it saw last. A subscriber that
//! falls behind skips to the latest change; it can never see an older one after a
//! newer one, because the slot is written only under the coordinator's state lock, in
//! the machine's order, with a number that only grows. Subscribers are woken through
//! one `event_listener::Event`: no task, no channel and no buffer per subscriber.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use event_listener::{Event, EventListener};
use futures_core::Stream;

use crate::error::RefreshError;
use crate::token::Token;

/// One item of a [`Subscription`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum TokenChange {
    /// A new token generation is current (a refresh, a login, a token adopted from the
    /// store or pushed by another replica). A connection authenticated with an older
    /// generation should re-authenticate with this one, or reconnect.
    Token(Arc<Token>),
    /// Re-authentication is required ([C9](crate#c9)): no refresh will succeed until a
    /// new login is installed. A connection can close instead of retrying. If a login
    /// follows, its token arrives as the next item.
    AuthLost(RefreshError),
}

impl TokenChange {
    /// The token, for a [`TokenChange::Token`].
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .build()
    ///     .unwrap();
    /// let token = futures::executor::block_on(flight.token()).unwrap();
    /// let change = flight.subscribe().try_next().unwrap();
    /// assert_eq!(change.token().unwrap().generation(), token.generation());
    /// ```
    pub fn token(&self) -> Option<&Arc<Token>> {
        match self {
            TokenChange::Token(token) => Some(token),
            TokenChange::AuthLost(_) => None,
        }
    }
}

/// The latest change with its number.
struct Numbered {
    seq: u64,
    change: TokenChange,
}

/// The coordinator's side: the slot, the wake-up event and the "coordinator gone" flag.
/// Shared by the coordinator and every subscription.
pub(super) struct Changes {
    latest: ArcSwapOption<Numbered>,
    /// Serializes writers (they already hold the state lock; this keeps the slot's
    /// numbering right on its own) and remembers the last generation published.
    writer: Mutex<Writer>,
    event: Event,
    closed: AtomicBool,
}

#[derive(Default)]
struct Writer {
    seq: u64,
    generation: u64,
}

impl Changes {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Changes {
            latest: ArcSwapOption::empty(),
            writer: Mutex::new(Writer::default()),
            event: Event::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// The current token is `token`: a change if its generation is newer than the last
    /// one published (a rejection of the current token is not a change). Called under
    /// the state lock wherever the published token is renewed.
    pub(super) fn token(&self, token: Option<&Arc<Token>>) {
        let Some(token) = token else {
            return;
        };
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if token.generation() <= writer.generation {
            return;
        }
        writer.generation = token.generation();
        self.put(&mut writer, TokenChange::Token(Arc::clone(token)));
    }

    /// Re-authentication became required (under the state lock, as it is decided).
    pub(super) fn auth_lost(&self, error: &RefreshError) {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.put(&mut writer, TokenChange::AuthLost(error.clone()));
    }

    fn put(&self, writer: &mut Writer, change: TokenChange) {
        writer.seq += 1;
        self.latest.store(Some(Arc::new(Numbered {
            seq: writer.seq,
            change,
        })));
        self.event.notify(usize::MAX);
    }

    /// The coordinator is gone: every subscription ends after its last item.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }
}

/// What the coordinator holds: closes the subscriptions when the coordinator drops.
pub(super) struct ChangesOwner(pub(super) Arc<Changes>);

impl Drop for ChangesOwner {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl ChangesOwner {
    pub(super) fn subscribe(&self) -> Subscription {
        Subscription {
            changes: Arc::clone(&self.0),
            seen: 0,
            listener: None,
        }
    }
}

/// A stream of token changes of one coordinator, from
/// [`SingleFlight::subscribe`](crate::SingleFlight::subscribe).
///
/// Lossy but latest ([C21](crate#c21)): each poll yields the newest change not yet seen;
/// a subscriber that is slow skips the changes in between, and never sees an older
/// generation after a newer one. The first item is the current token, if there is one
/// when the subscription is first polled. The stream ends (`None`) once the coordinator
/// is dropped and its last change was seen.
///
/// Costs: a reference count, a number and, while pending, one `event_listener`
/// registration. No task, no buffer.
///
/// # Cancellation
/// Dropping a subscription, pending or not, only removes its registration.
pub struct Subscription {
    changes: Arc<Changes>,
    seen: u64,
    listener: Option<EventListener>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("seen", &self.seen)
            .field("closed", &self.changes.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The newest change not seen yet, without waiting; `None` if there is none.
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .build()
    ///     .unwrap();
    /// let mut changes = flight.subscribe();
    /// assert!(changes.try_next().is_none());
    /// futures::executor::block_on(flight.token()).unwrap();
    /// futures::executor::block_on(flight.force_refresh()).unwrap();
    /// // Two generations since: only the latest is delivered.
    /// let latest = changes.try_next().unwrap();
    /// assert_eq!(latest.token().unwrap().generation(), flight.current().unwrap().generation());
    /// assert!(changes.try_next().is_none());
    /// ```
    pub fn try_next(&mut self) -> Option<TokenChange> {
        let guard = self.changes.latest.load();
        let latest = guard.as_ref()?;
        if latest.seq <= self.seen {
            return None;
        }
        self.seen = latest.seq;
        Some(latest.change.clone())
    }

    /// Marks everything published so far as seen: the next item is the next change.
    ///
    /// ```
    /// use tokenflight::{SingleFlight, Token, from_fn};
    /// let flight = SingleFlight::builder()
    ///     .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
    ///     .build()
    ///     .unwrap();
    /// futures::executor::block_on(flight.token()).unwrap();
    /// let mut changes = flight.subscribe();
    /// changes.skip_current();
    /// assert!(changes.try_next().is_none());
    /// ```
    pub fn skip_current(&mut self) {
        let _ = self.try_next();
    }
}

impl Stream for Subscription {
    type Item = TokenChange;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TokenChange>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.try_next() {
                this.listener = None;
                return Poll::Ready(Some(change));
            }
            if this.changes.closed.load(Ordering::SeqCst) {
                this.listener = None;
                return Poll::Ready(None);
            }
            match &mut this.listener {
                // Registered before the next look: a change published in between
                // notifies this listener.
                None => this.listener = Some(this.changes.event.listen()),
                Some(listener) => match Pin::new(listener).poll(cx) {
                    Poll::Ready(()) => this.listener = None,
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}
