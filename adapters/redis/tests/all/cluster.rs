//! A 3-primary Redis Cluster on loopback: the store's keys share one hash tag (so the
//! fenced scripts that touch the token and the lock together never hit CROSSSLOT), the
//! fleet's promise holds through a cluster connection, and pub/sub wake-ups reach
//! replicas subscribed on other nodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::common;

use common::deployments::{Cluster, cli};
use common::fleet::{CLIENTS_PER_PROCESS, CYCLES, Deployment, Fleet, PROCESSES};
use tokenflight::{
    RefreshError, SingleFlight, Token, from_fn, store::StoreError, store::StoreWatcher,
    store::TokenStore,
};
use tokenflight_redis::{RedisStore, ReplicaAck};

const WORKER: &str = "cluster::cluster_fleet_worker";

fn deployment(cluster: &Cluster) -> Deployment {
    Deployment {
        kind: "cluster",
        urls: cluster.urls(),
        // This test cluster has no replicas to acknowledge anything.
        ack: "none".into(),
        ..Deployment::node(String::new())
    }
}

#[test]
fn a_fleet_on_a_three_primary_cluster_makes_one_refresh_per_expiry() {
    let cluster = Cluster::start();
    let mut fleet = Fleet::start(&deployment(&cluster), WORKER);
    for cycle in 1..=CYCLES {
        fleet.advance(cycle);
        let reports = fleet.go(cycle);
        fleet.assert_all_on(&reports, cycle + 1);
        let counters = fleet.server.counters();
        assert_eq!(counters.refresh_token_calls, cycle, "one call per expiry");
        assert_eq!(counters.reuse_detections, 0);
        assert_eq!(counters.token_errors, 0);
        assert_eq!(
            counters.resource_calls,
            cycle * (PROCESSES * CLIENTS_PER_PROCESS) as u64
        );
    }
    // The keys really are in one slot, on one node of three.
    let slots: Vec<String> = ["{fleet:}token", "{fleet:}lock"]
        .iter()
        .map(|key| cli(cluster.nodes[0].port, &["CLUSTER", "KEYSLOT", key]))
        .collect();
    assert_eq!(slots[0], slots[1]);
    let holding: Vec<u16> = cluster
        .nodes
        .iter()
        .filter(|n| cli(n.port, &["DBSIZE"]).trim() != "0")
        .map(|n| n.port)
        .collect();
    assert_eq!(holding.len(), 1, "{holding:?}");
    fleet.quit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_node_is_woken_by_pubsub_across_the_cluster() {
    let cluster = Cluster::start();
    let urls = cluster.urls();
    // a's subscription is on the first node, b's on the second (each store subscribes
    // through the first URL it is given); the keys live on whichever node owns the slot.
    let store = |first: usize| {
        let mut nodes = urls.clone();
        nodes.rotate_left(first);
        RedisStore::cluster(nodes)
            .key_prefix("{wake}:")
            .replica_ack(ReplicaAck::None)
            // Polling so slow that only a pub/sub message can wake b within the test.
            .poll_interval(Duration::from_secs(30), Duration::from_secs(30))
            .lock_wait(Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let a = store(0);
    let b = store(1);
    let held = a.lock().await.unwrap();
    let waiting = tokio::spawn(async move {
        let lock = b.lock().await;
        (b, lock.map(drop))
    });
    // b is subscribed and polled once (its lock attempt failed) before a saves:
    // wait for the subscriber count on the channel across the cluster.
    common::deployments::wait_until("b subscribed", || {
        cli(
            cluster.nodes[1].port,
            &["PUBSUB", "NUMSUB", "{wake}:events"],
        )
        .contains("\n1")
    });
    held.save(&Token::new("x").with_generation(2))
        .await
        .unwrap();
    held.unlock().await;
    let (b, result) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("b was woken by pub/sub well before its 30 s poll")
        .unwrap();
    result.unwrap();
    assert_eq!(b.load().await.unwrap().unwrap().generation(), 2);
}

/// Issue 20: a save on the cluster is pushed to coordinators whose stores subscribe
/// through other nodes; each reads the record once (routed to the slot's owner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_is_pushed_to_coordinators_subscribed_on_other_nodes() {
    struct Signal(usize, tokio::sync::mpsc::UnboundedSender<(usize, u64)>);
    impl StoreWatcher for Signal {
        fn token_saved(&self, token: Token) {
            let _ = self.1.send((self.0, token.generation()));
        }
    }
    let cluster = Cluster::start();
    let urls = cluster.urls();
    let store = |first: usize| {
        let mut nodes = urls.clone();
        nodes.rotate_left(first);
        RedisStore::cluster(nodes)
            .key_prefix("{push}:")
            .replica_ack(ReplicaAck::None)
            .build()
            .unwrap()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let calls = Arc::new(AtomicU64::new(0));
    let mut flights = Vec::new();
    let mut signals = Vec::new();
    for node in 0..3 {
        let s = store(node);
        let counted = calls.clone();
        flights.push(
            SingleFlight::builder()
                .store(s.clone())
                .source(from_fn(move |_cx| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Err(RefreshError::transient("not expected in this test")) }
                }))
                .build()
                .unwrap(),
        );
        // After the coordinator: called once it has adopted the token.
        let signal: Arc<dyn StoreWatcher> = Arc::new(Signal(node, tx.clone()));
        s.watch(Arc::downgrade(&signal) as Weak<dyn StoreWatcher>);
        signals.push(signal);
    }
    // Every store is subscribed (one subscriber per node) before the save.
    for node in 0..3 {
        common::deployments::wait_until("subscribed", || {
            cli(
                cluster.nodes[node].port,
                &["PUBSUB", "NUMSUB", "{push}:events"],
            )
            .contains("\n1")
        });
    }
    let saver = store(0);
    let token = Token::new("pushed")
        .expires_in(Duration::from_secs(3600), std::time::SystemTime::now())
        .with_generation(7);
    tokenflight_tests::save_locked(&saver, &token)
        .await
        .unwrap();
    let mut missing = vec![0, 1, 2];
    tokio::time::timeout(Duration::from_secs(30), async {
        while !missing.is_empty() {
            let (node, generation) = rx.recv().await.unwrap();
            if generation == 7 {
                missing.retain(|n| *n != node);
            }
        }
    })
    .await
    .expect("the push reached every coordinator");
    for flight in &flights {
        let current = flight.current().unwrap();
        assert_eq!(current.generation(), 7);
        assert_eq!(current.access().expose(), "pushed");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_replica_ack_refuses_to_refresh_on_a_cluster_without_replicas() {
    let cluster = Cluster::start();
    let store = RedisStore::cluster(cluster.urls())
        .key_prefix("{ack}:")
        .replica_ack_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    match store.lock().await {
        Err(StoreError::Unavailable(error)) => {
            assert!(
                error.to_string().contains("0 of 1 required replica"),
                "{error}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // The unconfirmed lock was given back: nobody holds it.
    let holder = cli(cluster.nodes[0].port, &["-c", "GET", "{ack}:lock"]);
    assert_eq!(holder.trim(), "", "{holder}");
}

/// A fleet worker process (see `common/fleet.rs`); run by the fleet test above.
#[test]
#[ignore = "a worker process started by the cluster fleet test"]
fn cluster_fleet_worker() {
    common::fleet::worker();
}

/// Issue 17 on a cluster: a namespace per key, each under a hash tag of its own, so the
/// keys spread over the shards while each namespace's scripts stay in one slot; three
/// stores (subscribed through different nodes) share each key's token, and a save in
/// one namespace is pushed across nodes to that key's coordinators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_spread_over_the_shards_and_share_each_keys_token() {
    use tokenflight::keyed::KeyedFlights;
    const KEYS: u32 = 30;
    struct Signal(usize, tokio::sync::mpsc::UnboundedSender<(usize, Token)>);
    impl StoreWatcher for Signal {
        fn token_saved(&self, token: Token) {
            let _ = self.1.send((self.0, token));
        }
    }
    let cluster = Cluster::start();
    let urls = cluster.urls();
    let calls = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stores = Vec::new();
    let mut keyed = Vec::new();
    let mut signals = Vec::new();
    for node in 0..3 {
        let mut nodes = urls.clone();
        nodes.rotate_left(node);
        let store = RedisStore::cluster(nodes)
            .key_prefix("keyed:")
            .replica_ack(ReplicaAck::None)
            .build()
            .unwrap();
        let factory_store = store.clone();
        let counted = calls.clone();
        let flights = KeyedFlights::builder(move |key: &u32| {
            let key = *key;
            let counted = counted.clone();
            SingleFlight::builder()
                .store(factory_store.namespace_for_key(&key.to_be_bytes()))
                .source(from_fn(move |_cx| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let token = Token::new(format!("k{key}-{}", fastrand::u64(..)))
                        .expires_in(Duration::from_secs(3600), std::time::SystemTime::now());
                    async move { Ok(token) }
                }))
                .build()
        })
        .build();
        // Key 0's coordinator, then a test watcher on its namespace.
        flights.flight(&0).unwrap();
        let signal: Arc<dyn StoreWatcher> = Arc::new(Signal(node, tx.clone()));
        store
            .namespace_for_key(&0u32.to_be_bytes())
            .watch(Arc::downgrade(&signal) as Weak<dyn StoreWatcher>);
        signals.push(signal);
        stores.push(store);
        keyed.push(flights);
    }
    let guard = Duration::from_secs(30);
    let tokens = |flights: KeyedFlights<u32>| async move {
        let all = futures::future::join_all((0..KEYS).map(|key| {
            let flights = flights.clone();
            async move { flights.token(&key).await.unwrap() }
        }));
        tokio::time::timeout(guard, all).await.expect("tokens")
    };
    let first = tokens(keyed[0].clone()).await;
    assert_eq!(calls.load(Ordering::SeqCst), u64::from(KEYS));
    for flights in &keyed[1..] {
        let theirs = tokens(flights.clone()).await;
        for (key, (a, b)) in first.iter().zip(&theirs).enumerate() {
            assert!(a.access().expose().starts_with(&format!("k{key}-")));
            assert_eq!(a.access().expose(), b.access().expose(), "key {key}");
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        u64::from(KEYS),
        "one call per key"
    );
    // Spread over the shards: every primary holds some of the namespaces.
    for node in &cluster.nodes {
        assert_ne!(
            cli(node.port, &["DBSIZE"]).trim(),
            "0",
            "node {}",
            node.port
        );
    }
    // A refresh of key 0 through the first store reaches key 0's coordinators in the
    // others, subscribed through other nodes.
    let refreshed = keyed[0].flight(&0).unwrap().force_refresh().await.unwrap();
    let mut missing = vec![1, 2];
    tokio::time::timeout(guard, async {
        while !missing.is_empty() {
            let (node, token) = rx.recv().await.unwrap();
            assert!(token.access().expose().starts_with("k0-"));
            if token.generation() == refreshed.generation() {
                missing.retain(|n| *n != node);
            }
        }
    })
    .await
    .expect("the push reached key 0's coordinators");
    for flights in &keyed[1..] {
        let current = flights.get(&0).unwrap().current().unwrap();
        assert_eq!(current.access().expose(), refreshed.access().expose());
    }
    assert_eq!(calls.load(Ordering::SeqCst), u64::from(KEYS) + 1);
}
