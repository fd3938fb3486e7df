//! Namespaces: many token stores (one per user, tenant or audience) in one
//! [`crate::RedisStore`], sharing its command connection and its one pub/sub
//! connection.
//!
//! Every view of a store ([`crate::RedisStore::namespace`]) has keys and a channel of its
//! own, and a [`Namespace`]: the lock waiters' wake-up counter, the coordinators watching
//! it ([`Push`]) and the reader that fetches announced tokens for them. One
//! [`Namespace`] per name and process: views of the same name share it, so a save
//! through one is handed to the others' watchers without a read. The [`Registry`] maps
//! channel names to live namespaces (weakly: it never keeps one alive), and the single
//! listener (`listener.rs`) dispatches each message by its channel through
//! it. When the last view of a namespace is dropped (a keyed coordinator evicted), its
//! entry leaves the registry and its subscription is dropped: nothing grows with the
//! number of namespaces a process has ever used.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tokenflight::store::{StoreError, StoreWatcher};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::conn::Con;
use crate::counts::Counts;
use crate::events::{self, Push};
use crate::settings::{Keys, Settings};

/// The longest namespace accepted: room for a hex SHA-256 digest (64 characters);
/// [`tokenflight::keyed::key_namespace`] makes 32.
pub(crate) const MAX_LEN: usize = 64;

/// A namespace that is not a short, safe token; see [`crate::RedisStore::namespace`].
///
/// Its message never quotes the namespace: a caller that passes a raw key (an e-mail
/// address, a user id) by mistake must not see it in logs. It converts into
/// [`StoreError`] and into [`tokenflight::ConfigError`], so `?` works in a keyed
/// coordinator's factory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidNamespace {
    len: usize,
}

impl fmt::Display for InvalidNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid RedisStore namespace ({} bytes): expected 1 to {MAX_LEN} ASCII letters, \
             digits, '-' or '_', such as tokenflight::keyed::key_namespace makes \
             (or use RedisStore::namespace_for_key, which hashes the key)",
            self.len
        )
    }
}

impl std::error::Error for InvalidNamespace {}

impl From<InvalidNamespace> for StoreError {
    fn from(error: InvalidNamespace) -> Self {
        StoreError::Other(Box::new(error))
    }
}

impl From<InvalidNamespace> for tokenflight::ConfigError {
    fn from(error: InvalidNamespace) -> Self {
        tokenflight::ConfigError::InvalidSetting(error.to_string())
    }
}

/// Accepts only what is safe inside a Redis key's hash tag and a channel name, and
/// short: letters, digits, `-`, `_`. No braces (they would end the hash tag), no `:`
/// (namespaces could then collide with each other's keys), no `*`/`?`/`[` (a
/// namespace is never a pattern), nothing that needs quoting.
pub(crate) fn validate(namespace: &str) -> Result<(), InvalidNamespace> {
    let safe = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if (1..=MAX_LEN).contains(&namespace.len()) && namespace.bytes().all(safe) {
        Ok(())
    } else {
        Err(InvalidNamespace {
            len: namespace.len(),
        })
    }
}

/// What every view of one built store shares: the connection, the settings, the
/// runtime, the registry of live namespaces and the line to the listener.
pub(crate) struct Hub {
    pub(crate) settings: Arc<Settings>,
    pub(crate) con: Con,
    pub(crate) runtime: Handle,
    /// Whether the last Redis round trip got an answer (one warning per outage for the
    /// whole store, not one per namespace).
    pub(crate) reachable: AtomicBool,
    /// Round trips by reason, for every view of the store.
    pub(crate) counts: Arc<Counts>,
    registry: Arc<Registry>,
    /// Tells the listener that a channel's wish changed (a namespace wants its
    /// subscription, or is gone). The listener ends when the last sender is dropped,
    /// i.e. with the last view and namespace of the store.
    changed: mpsc::UnboundedSender<String>,
}

impl Hub {
    pub(crate) fn new(
        settings: Settings,
        con: Con,
        runtime: Handle,
    ) -> (Arc<Hub>, Arc<Registry>, mpsc::UnboundedReceiver<String>) {
        let (changed, receiver) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry::default());
        let hub = Arc::new(Hub {
            settings: Arc::new(settings),
            con,
            runtime,
            reachable: AtomicBool::new(true),
            counts: Arc::default(),
            registry: Arc::clone(&registry),
            changed,
        });
        (hub, registry, receiver)
    }

    /// The live [`Namespace`] with these keys, or a new one (not yet subscribed).
    pub(crate) fn namespace(self: &Arc<Self>, keys: &Keys) -> Arc<Namespace> {
        let mut map = self.registry.lock();
        if let Some(live) = map.get(&keys.channel).and_then(Weak::upgrade) {
            return live;
        }
        // A dead entry (its last view is being dropped right now) is replaced; its
        // `Drop` sees the new entry alive and leaves it alone.
        let (events, _) = watch::channel(0);
        let namespace = Arc::new(Namespace {
            channel: keys.channel.clone(),
            token_key: keys.token.clone(),
            events,
            push: Arc::new(Push::default()),
            reader: Mutex::new(None),
            wants_subscription: AtomicBool::new(false),
            confirmed: AtomicBool::new(false),
            hub: Arc::clone(self),
        });
        map.insert(keys.channel.clone(), Arc::downgrade(&namespace));
        namespace
    }
}

/// The live namespaces of one store, by channel name. Weak: a namespace lives as long
/// as a view of it does, never because the listener knows it.
#[derive(Default)]
pub(crate) struct Registry {
    map: Mutex<HashMap<String, Weak<Namespace>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<Namespace>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live namespace on `channel`, if it wants its subscription.
    pub(crate) fn wanted(&self, channel: &str) -> Option<Arc<Namespace>> {
        let namespace = self.lock().get(channel).and_then(Weak::upgrade)?;
        // The lock is released before the Arc may be dropped here (its `Drop` locks).
        namespace.wants_subscription().then_some(namespace)
    }

    /// Every channel a live namespace wants subscribed (after a reconnect).
    pub(crate) fn wanted_channels(&self) -> Vec<String> {
        let live: Vec<Arc<Namespace>> = self.lock().values().filter_map(Weak::upgrade).collect();
        live.iter()
            .filter(|namespace| namespace.wants_subscription())
            .map(|namespace| namespace.channel.clone())
            .collect()
    }

    /// Hands a message to the namespace of its channel, and to no other: a save or
    /// release in one namespace wakes only that namespace's lock waiters and makes
    /// only its watchers read.
    pub(crate) fn dispatch(&self, message: &redis::Msg) {
        let namespace = self
            .lock()
            .get(message.get_channel_name())
            .and_then(Weak::upgrade);
        if let Some(namespace) = namespace {
            namespace.notify(events::saved_generation(message));
        }
    }

    /// How many namespaces are live (tests: nothing is left behind).
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// One namespace's state in this process, shared by its views.
pub(crate) struct Namespace {
    pub(crate) channel: String,
    token_key: String,
    /// Bumped on every message on the channel and on every (re)subscription: lock
    /// waiters retry when it changes.
    events: watch::Sender<u64>,
    /// The coordinators watching this namespace.
    pub(crate) push: Arc<Push>,
    /// The reader of announced tokens, started with the first watcher; aborted when the
    /// namespace is dropped.
    reader: Mutex<Option<JoinHandle<()>>>,
    /// Set once: with the first watcher or lock waiter (a view that only loads never
    /// subscribes).
    wants_subscription: AtomicBool,
    /// Set once the listener confirmed a subscription of the channel: from then on a
    /// release or save reaches the waiters as a message, and their polls are only a
    /// fallback for a lost one.
    confirmed: AtomicBool,
    hub: Arc<Hub>,
}

impl Namespace {
    fn wants_subscription(&self) -> bool {
        self.wants_subscription.load(Ordering::Acquire)
    }

    /// Asks the listener to subscribe to this namespace's channel (once).
    pub(crate) fn subscribe(&self) {
        if !self.wants_subscription.swap(true, Ordering::AcqRel) {
            // Err: the listener is gone (the runtime shut down); waiters poll.
            let _ = self.hub.changed.send(self.channel.clone());
        }
    }

    /// Whether the channel's subscription was confirmed at least once.
    pub(crate) fn confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Acquire)
    }

    /// A receiver of the wake-up counter, for a lock waiter.
    pub(crate) fn events(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// Registers a watcher, starts the reader if this is the first, and subscribes.
    pub(crate) fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        self.push.watch(watcher);
        {
            let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
            if reader.is_none() {
                *reader = Some(self.hub.runtime.spawn(events::read_pushed(
                    Arc::clone(&self.push),
                    self.hub.con.clone(),
                    self.token_key.clone(),
                    self.hub.settings.command_timeout,
                    Arc::clone(&self.hub.counts),
                )));
            }
        }
        self.subscribe();
    }

    /// A message on the channel: wake the lock waiters; a save is announced to the
    /// watchers.
    pub(crate) fn notify(&self, saved: Option<u64>) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
        if let Some(generation) = saved {
            self.push.announce(generation);
        }
    }

    /// The channel was (re)subscribed: messages may have been missed meanwhile, so the
    /// lock waiters try again and the watchers get one catch-up read.
    pub(crate) fn subscribed(&self) {
        self.confirmed.store(true, Ordering::Release);
        self.events.send_modify(|n| *n = n.wrapping_add(1));
        self.push.catch_up();
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Some(reader) = self
            .reader
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            reader.abort();
        }
        let mut map = self.hub.registry.lock();
        // Only our own entry: a new namespace of the same name may have replaced it.
        if map
            .get(&self.channel)
            .is_some_and(|entry| entry.strong_count() == 0)
        {
            map.remove(&self.channel);
        }
        drop(map);
        if self.wants_subscription() {
            // The listener unsubscribes unless a new namespace of this name wants it.
            let _ = self.hub.changed.send(self.channel.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_safe_tokens_are_namespaces() {
        for ok in [
            "a",
            "0123456789abcdef0123456789abcdef",
            "tenant-7_eu",
            &"x".repeat(MAX_LEN),
        ] {
            assert!(validate(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "alice@example.com",
            "a:b",
            "{tag}",
            "a}",
            "a*",
            "a b",
            "é",
            "a\n",
            &"x".repeat(MAX_LEN + 1),
        ] {
            let text = validate(bad).unwrap_err().to_string();
            assert!(text.contains(&format!("({} bytes)", bad.len())), "{text}");
        }
        // The value itself is never quoted (it may be a raw key passed by mistake).
        assert!(
            !validate("alice@example.com")
                .unwrap_err()
                .to_string()
                .contains("alice")
        );
        let key = tokenflight::keyed::key_namespace(b"alice@example.com");
        assert!(validate(&key).is_ok());
    }

    use tokenflight::Token;

    /// A hub whose connection is never used (lazy, to a port nothing listens on).
    fn hub(
        runtime: &tokio::runtime::Runtime,
    ) -> (Arc<Hub>, Arc<Registry>, mpsc::UnboundedReceiver<String>) {
        let _context = runtime.enter();
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let con = redis::aio::ConnectionManager::new_lazy_with_config(
            client,
            redis::aio::ConnectionManagerConfig::new(),
        )
        .unwrap();
        Hub::new(
            Settings::default(),
            Con::Node(con),
            runtime.handle().clone(),
        )
    }

    fn message(channel: &str, payload: &str) -> redis::Msg {
        redis::Msg::from_owned_value(redis::Value::Array(vec![
            redis::Value::BulkString(b"message".to_vec()),
            redis::Value::BulkString(channel.as_bytes().to_vec()),
            redis::Value::BulkString(payload.as_bytes().to_vec()),
        ]))
        .unwrap()
    }

    struct Ignore;
    impl StoreWatcher for Ignore {
        fn token_saved(&self, _token: Token) {}
    }

    #[test]
    fn a_message_reaches_the_namespace_of_its_channel_and_no_other() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (hub, registry, _changed) = hub(&runtime);
        let keys_a = hub.settings.keys(Some("a"));
        let keys_b = hub.settings.keys(Some("b"));
        let a = hub.namespace(&keys_a);
        let b = hub.namespace(&keys_b);
        // Watched (without the reader, so the wake-ups stay observable here).
        let watcher: Arc<dyn StoreWatcher> = Arc::new(Ignore);
        for namespace in [&a, &b] {
            namespace.push.watch(Arc::downgrade(&watcher));
        }
        let (mut events_a, mut events_b) = (a.events(), b.events());
        events_a.borrow_and_update();
        events_b.borrow_and_update();

        registry.dispatch(&message(&keys_a.channel, "saved:5"));
        assert!(events_a.has_changed().unwrap(), "A's lock waiters woken");
        assert!(
            !events_b.has_changed().unwrap(),
            "B's lock waiters not woken"
        );
        assert!(a.push.wake_pending(), "A reads the announced token");
        assert!(!b.push.wake_pending(), "B reads nothing");

        registry.dispatch(&message(&keys_b.channel, "released"));
        assert!(events_b.has_changed().unwrap());
        assert!(!b.push.wake_pending(), "a release announces no token");
        // A channel nobody here holds, and the store's own: nobody is woken.
        events_a.borrow_and_update();
        events_b.borrow_and_update();
        registry.dispatch(&message(&hub.settings.keys(Some("c")).channel, "saved:9"));
        registry.dispatch(&message(&hub.settings.keys(None).channel, "saved:9"));
        assert!(!events_a.has_changed().unwrap() && !events_b.has_changed().unwrap());
        assert!(!a.push.wake_pending() && !b.push.wake_pending());
    }

    #[test]
    fn views_of_a_name_share_its_state_and_the_last_one_releases_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (hub, registry, mut changed) = hub(&runtime);
        let keys = hub.settings.keys(Some("a"));
        let first = hub.namespace(&keys);
        let second = hub.namespace(&keys);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(registry.live(), 1);
        // Subscribing asks the listener once.
        first.subscribe();
        second.subscribe();
        assert_eq!(changed.try_recv().unwrap(), keys.channel);
        assert!(changed.try_recv().is_err());
        assert_eq!(
            registry.wanted_channels(),
            std::slice::from_ref(&keys.channel)
        );
        drop(first);
        assert_eq!(registry.live(), 1, "a view is left");
        drop(second);
        assert_eq!(registry.live(), 0);
        assert!(registry.lock().is_empty(), "no entry is left behind");
        assert_eq!(changed.try_recv().unwrap(), keys.channel, "unsubscribe");
        assert!(registry.wanted(&keys.channel).is_none());
        // A thousand namespaces come and go: nothing accumulates.
        for n in 0..1000 {
            let namespace = hub.namespace(&hub.settings.keys(Some(&format!("n{n}"))));
            namespace.subscribe();
        }
        assert!(registry.lock().is_empty());
        assert!(registry.wanted_channels().is_empty());
    }

    #[test]
    fn a_namespace_dropped_while_its_name_is_reused_leaves_the_new_one_alone() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (hub, registry, _changed) = hub(&runtime);
        let keys = hub.settings.keys(Some("a"));
        let old = hub.namespace(&keys);
        // The registry entry is dead while `old` is being dropped: a new view then
        // replaces it, and `old`'s drop must not remove the new entry.
        let weak = Arc::downgrade(&old);
        registry.lock().insert(keys.channel.clone(), Weak::new());
        let new = hub.namespace(&keys);
        assert!(!Arc::ptr_eq(&old, &new));
        drop(old);
        assert!(weak.upgrade().is_none());
        new.subscribe();
        assert!(
            registry
                .wanted(&keys.channel)
                .is_some_and(|n| Arc::ptr_eq(&n, &new))
        );
    }

    #[test]
    fn an_invalid_namespace_is_a_typed_error_for_stores_and_factories() {
        let error = validate("not a token").unwrap_err();
        assert!(matches!(
            StoreError::from(error.clone()),
            StoreError::Other(_)
        ));
        assert!(matches!(
            tokenflight::ConfigError::from(error),
            tokenflight::ConfigError::InvalidSetting(_)
        ));
    }
}
