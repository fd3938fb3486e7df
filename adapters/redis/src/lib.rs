//! # tokenflight-redis
//!
//! A [`tokenflight::store::TokenStore`] in Redis, so the single flight spans a whole fleet:
//! many replicas of a service that share one OAuth client with rotating refresh tokens
//! make one refresh per expiry between them, instead of racing each other into the
//! authorization server's reuse detection.
//!
//! Plug a [`RedisStore`] into the coordinator's builder with `.store(store)`. Each
//! refresh then runs: take the Redis refresh lock → reload the token → adopt it if
//! another replica already refreshed → else call the token source → fenced save → release.
//! See [`RedisStore`] for the lock, lease, fencing and failure behaviour. The lease and
//! fence of a held lock live in the guard each refresh gets, so one store (one
//! connection, one pub/sub listener) can serve any number of coordinators.
//!
//! ## Namespaces: one refresh per user, tenant or audience for the whole fleet
//!
//! A backend that holds a token per end user (each with its own rotating refresh
//! token), per tenant or per audience keeps one coordinator per key in a
//! [`KeyedFlights`](tokenflight::keyed::KeyedFlights). Give each key's coordinator its
//! own namespace of one store — [`RedisStore::namespace_for_key`], or
//! [`RedisStore::namespace`] with a name from
//! [`key_namespace`](tokenflight::keyed::key_namespace) — and every replica of the fleet
//! that serves the same user shares that user's token, refresh lock and pushed updates:
//! one refresh per user per expiry for the whole fleet, and users never wait for each
//! other's refreshes.
//!
//! - Raw keys never become Redis keys: a namespace is a hash of the key (32 hex digits,
//!   the same in every process and release), and [`RedisStore::namespace`] refuses
//!   anything that is not a short token of letters, digits, `-` and `_`
//!   ([`InvalidNamespace`], which never quotes the value).
//! - Each namespace has its own keys and channel under a hash tag of its own
//!   (`{<prefix>ns:<namespace>}token`, `…lock`, `…events`), so in a Cluster the
//!   namespaces spread over the shards while each one's scripts stay in one slot.
//! - However many namespaces a process uses, its store keeps **two connections**: the
//!   command connection (the lock uses it too) and one pub/sub connection, on which each
//!   namespace with a coordinator or a lock waiter has its own `SUBSCRIBE` (so a replica
//!   only hears about the users it serves). Dropping the last view of a namespace —
//!   `KeyedFlights` evicting an idle key — unsubscribes it; after a reconnect every
//!   namespace is subscribed again and catches up with one read.
//!
//! A keyed `AuthPolicy` (`.keyed(|key: &TokenKey, shared| ..)` on an adapter's builder)
//! does the same in its factory:
//! `shared.store(store.namespace_for_key(key.as_str().as_bytes()))`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tokenflight::keyed::KeyedFlights;
//! use tokenflight::{SingleFlight, Token, from_fn};
//! use tokenflight_redis::RedisStore;
//!
//! // One store per process: two connections for every user.
//! let store = RedisStore::builder("redis://127.0.0.1:6379/")
//!     .key_prefix("billing:users:")
//!     .connect()
//!     .await?;
//! let users = KeyedFlights::builder(move |user: &String| {
//!     SingleFlight::builder()
//!         // This user's namespace: every replica serving the user shares it.
//!         .store(store.namespace_for_key(user.as_bytes()))
//!         .source(from_fn(|_cx| async {
//!             // ... spend this user's refresh token at the authorization server.
//!             Ok(Token::new("..."))
//!         }))
//!         .build()
//! })
//! .max_entries(100_000)
//! .build();
//! let token = users.token(&"alice@example.com".to_string()).await?;
//! # drop(token); Ok(())
//! # }
//! ```
//!
//! ## Deployments
//!
//! - One node: [`RedisStore::builder`] with a `redis://` or `rediss://` URL.
//! - Redis Cluster: [`RedisStore::cluster`] with some of the nodes. The store's keys
//!   share one hash tag (`{<prefix>}token`, `{<prefix>}lock`), so they live on one
//!   shard and the scripts that touch both never fail with `CROSSSLOT`; wake-ups use
//!   classic pub/sub, which every node relays to its subscribers.
//! - Sentinel: [`RedisStore::sentinel`] with the sentinels and the service name; the
//!   store asks the sentinels for the primary again after its connection breaks or the
//!   node answers `READONLY` (it was demoted).
//!
//! TLS is rustls (no system OpenSSL): a `rediss://` URL, with
//! [`RedisStoreBuilder::tls_ca_pem`] for a private CA and
//! [`RedisStoreBuilder::tls_client_cert_pem`] for mutual TLS. ACL users come from the
//! URL (`rediss://user:password@host/`) or [`RedisStoreBuilder::credentials`].
//! Passwords never appear in `Debug` output, errors or logs. If the application has
//! not installed a rustls crypto provider, the store installs ring's.
//!
//! ## What the lease, fencing and `WAIT` guarantee — and what they do not
//!
//! The Redlock debate (Kleppmann's "How to do distributed locking" and antirez's reply)
//! taught that a lock with a timeout is only as safe as the resource's ability to
//! reject a holder whose lease lapsed. Here there are two resources:
//!
//! - **The stored token** checks its fence. The save and the load under the lock are
//!   atomic scripts that compare the lock's unique value, so a holder whose lease lapsed
//!   can neither overwrite a newer token nor read the token in order to spend it. This
//!   holds whatever the timing.
//! - **The token endpoint** cannot check a fence: it only sees a refresh token. The
//!   lock is what keeps two replicas from presenting the same one, and that rests on
//!   timing assumptions:
//!   - *Pauses.* The lease (45 s by default) is renewed while the holder runs. A holder
//!     whose process stops for longer than the lease *after* its fenced load and
//!     *before* the token endpoint answers (a VM freeze, a request stuck in the
//!     network) may spend the refresh token after the next holder did. Keep the lease
//!     well above the coordinator's refresh timeout, which bounds a live holder.
//!   - *Clocks.* Redis expires the lease by its own wall clock; a server clock stepped
//!     forward ends leases early.
//!   - *Failover.* Replication is asynchronous, so a lock taken on a primary that dies
//!     may be missing on the replica promoted after it. With
//!     [`ReplicaAck::Required(n)`](ReplicaAck::Required) (the default for Sentinel and
//!     Cluster) the store sends `WAIT n` after taking the lock, and does not refresh
//!     under a lock that fewer than `n` replicas acknowledged; after the save it waits
//!     again (and saves again after a failover) before the lock is released, so the
//!     new token is on a replica before the fleet relies on it. This closes the window
//!     in which a promoted replica has neither the lock nor the new token, and it stops
//!     a primary cut off from its replicas (split brain) from handing out locks: its
//!     `WAIT` gets no acknowledgements. It does not make Redis strongly consistent:
//!     `WAIT` means "received", not "persisted"; Sentinel may promote a replica that had
//!     not acknowledged when more than `n` replicas exist and the acknowledging ones
//!     are down; lease renewals are not waited for, so after a failover a lease may end
//!     up to one renewal interval early; and if a primary dies after the holder spent
//!     the refresh token and the holder cannot reach the new primary within the lease,
//!     its new token stays in its own memory only, and another replica will present
//!     the spent refresh token (the authorization server then refuses it, and the
//!     coordinator reports that re-authentication is needed).
//!
//! In short: one refresh per expiry holds while holders are not frozen for longer than
//! a lease and while, through any failover, the replica promoted is one that
//! acknowledged. An authorization server with reuse detection turns any remaining
//! double spend into a failed refresh and a re-login, never into two live token
//! families.
//!
//! ## Push: a new token reaches every replica at once
//!
//! A coordinator built with a [`RedisStore`] registers with it
//! ([`tokenflight::store::TokenStore::watch`]). Every save announces the new token's
//! *generation* on the store's channel (`<prefix>events`) — never the token: secrets
//! do not travel over pub/sub. Each store that has live watchers then reads the record
//! once (`GET`) and hands it to them; a coordinator adopts it if it is usable and newer
//! than its own (never over a login it has not saved yet), without the lock and
//! without calling its token source. So the rest of the fleet has a refreshed token
//! within about one round trip of its save, and its Redis work per refresh is one
//! `GET` per replica, whatever the size of the fleet. A burst of announcements while a
//! read is in progress costs one more read, not one per message; after every
//! (re)subscription — a Redis restart, a failover — each store reads once to catch up
//! with saves it may have missed. Push is a shortcut, not a dependency: a coordinator
//! that missed it reads the store at its own refresh-ahead, as without push.
//!
//! ## When Redis is unreachable
//!
//! A replica that cannot reach Redis degrades to a local single flight: callers in the
//! process still share one flight and its backoff, and keep the current token while it
//! is usable. It does not spend the refresh token on its own, because without the
//! fleet's lock every replica would do the same and the authorization server would
//! revoke the grant for all of them. Refreshing resumes with the first round trip that
//! Redis answers. The store logs one warning when Redis becomes unreachable and one
//! line when it is back, not one per request.
//!
//! ## Runtimes
//!
//! The store runs its Redis I/O (through the `redis` crate's tokio connection manager),
//! lease renewal and pub/sub listener on a tokio runtime: the one it is built in, or the
//! one passed to [`RedisStoreBuilder::runtime`]. Its futures only wait for results from
//! that runtime, so they can be awaited from any executor.
//!
//! An async-std/surf (or smol) application therefore keeps a small tokio runtime for
//! the store and hands its handle over:
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // One worker thread is plenty: it only does the store's Redis round trips.
//! let tokio_rt = tokio::runtime::Builder::new_multi_thread()
//!     .worker_threads(1)
//!     .enable_all()
//!     .build()?;
//! let store = tokenflight_redis::RedisStore::builder("redis://127.0.0.1/")
//!     .runtime(tokio_rt.handle().clone())
//!     .build()?;
//! // ... build the surf TokenLayer with `.store(store)` and run it on async-std; keep
//! // `tokio_rt` alive as long as the store is used.
//! # let _ = store; Ok(())
//! # }
//! ```
//!
//! The `redis` crate also has a smol runtime (`smol-comp`), but its connection manager,
//! which this store relies on to reconnect, is tokio-only; hence the handle.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod config;
mod conn;
mod counts;
mod events;
mod inner;
mod io;
mod listener;
mod lock;
mod namespace;
mod ops;
mod scripts;
mod settings;
mod store;
mod wire;

pub use config::RedisStoreBuilder;
pub use counts::RedisStoreCounters;
pub use namespace::InvalidNamespace;
pub use settings::ReplicaAck;
pub use store::RedisStore;
