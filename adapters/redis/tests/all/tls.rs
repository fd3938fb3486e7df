//! `rediss://` with a private CA and an ACL user: the fleet's promise holds over TLS,
//! the password never shows in `Debug` output or errors, a server the CA did not sign
//! is refused, and the TLS stack is rustls (no OpenSSL in the dependency tree).

use std::process::Command;
use std::time::Duration;

use crate::common;

use common::deployments::{TempDir, TlsRedis};
use common::fleet::{CLIENTS_PER_PROCESS, CYCLES, Deployment, Fleet, PROCESSES};
use tokenflight::{ConfigError, store::StoreError, store::TokenStore};
use tokenflight_redis::RedisStore;

const WORKER: &str = "tls::tls_fleet_worker";

#[test]
fn a_fleet_over_tls_as_an_acl_user_makes_one_refresh_per_expiry() {
    let redis = TlsRedis::start();
    let dir = TempDir::new("tls-ca");
    let ca_file = dir.file("ca.pem");
    std::fs::write(&ca_file, &redis.ca_pem).unwrap();
    let deployment = Deployment {
        ca_file,
        ..Deployment::node(redis.url())
    };
    let mut fleet = Fleet::start(&deployment, WORKER);
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
    fleet.quit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_secrets_in_the_url_stay_out_of_debug_and_errors() {
    let redis = TlsRedis::start();
    // Right CA, wrong password: the server refuses, the error is typed and quiet.
    let wrong = format!("wrong-{}", redis.password);
    let url = format!(
        "rediss://{}:{wrong}@127.0.0.1:{}/",
        redis.user, redis.proc.port
    );
    let builder = RedisStore::builder(url.as_str())
        .tls_ca_pem(redis.ca_pem.clone())
        .connect_timeout(Duration::from_secs(2));
    assert!(!format!("{builder:?}").contains(&wrong));
    let store = builder.build().unwrap();
    assert!(!format!("{store:?}").contains(&wrong));
    let error = store.load().await.unwrap_err();
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(&wrong), "{shown}");
    assert!(!shown.contains(&redis.password), "{shown}");

    // The right password through `credentials` (not in the URL) works.
    let url = format!("rediss://127.0.0.1:{}/", redis.proc.port);
    let store = RedisStore::builder(url.as_str())
        .tls_ca_pem(redis.ca_pem.clone())
        .credentials(Some(redis.user), redis.password.clone())
        .key_prefix("{tls-credentials}:")
        .connect()
        .await
        .unwrap();
    assert!(store.load().await.unwrap().is_none());
    assert!(!format!("{store:?}").contains(&redis.password));

    // A typo in the URL: the error names no part of it.
    let bad = format!(
        "rediss://{}:{}@127.0.0.1:notaport/",
        redis.user, redis.password
    );
    let error = RedisStore::builder(bad.as_str()).build().unwrap_err();
    assert!(!format!("{error} {error:?}").contains(&redis.password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_private_ca_did_not_sign_is_refused() {
    let redis = TlsRedis::start();
    // Another CA (freshly made) does not vouch for the server's certificate.
    let other_ca = common::deployments::certificates().ca;
    let store = RedisStore::builder(redis.url())
        .tls_ca_pem(other_ca)
        .key_prefix("{tls-other-ca}:")
        .build()
        .unwrap();
    match store.load().await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // And without TLS the TLS-only port does not answer in plain text either.
    let plain = format!(
        "redis://{}:{}@127.0.0.1:{}/",
        redis.user, redis.password, redis.proc.port
    );
    let store = RedisStore::builder(plain.as_str())
        .command_timeout(Duration::from_secs(1))
        .key_prefix("{tls-plain}:")
        .build()
        .unwrap();
    assert!(store.load().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate() {
    let redis = TlsRedis::start_with(true);
    let builder = || {
        RedisStore::builder(redis.url())
            .tls_ca_pem(redis.ca_pem.clone())
            .key_prefix("{tls-mutual}:")
            .command_timeout(Duration::from_secs(1))
    };
    // Without a client certificate the server ends the handshake.
    let anonymous = builder().build().unwrap();
    assert!(matches!(
        anonymous.load().await,
        Err(StoreError::Unavailable(_))
    ));
    let (cert, key) = redis.client_pem.clone();
    let store = builder()
        .tls_client_cert_pem(cert, key)
        .connect()
        .await
        .unwrap();
    assert!(store.load().await.unwrap().is_none());
}

#[test]
fn the_tls_stack_is_rustls_without_openssl() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "tokenflight-redis",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("rustls v0.23"), "{tree}");
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split(' ').next()).collect();
    // `openssl-probe` (from rustls-native-certs) only looks for the system's CA file
    // paths; it neither links nor needs OpenSSL, so it is the one allowed match.
    for banned in ["openssl", "openssl-sys", "native-tls", "tokio-native-tls"] {
        assert!(!crates.contains(&banned), "{banned} is in the tree");
    }
    assert!(
        crates
            .iter()
            .filter(|c| c.contains("openssl"))
            .all(|c| *c == "openssl-probe"),
        "{crates:?}"
    );
}

/// Builds `builder` and expects the refusal of settings that cannot work together;
/// `what` names the case. A store that was built anyway is pinged, so the failure says
/// whether it talks to Redis in plaintext.
async fn expect_config_error(builder: tokenflight_redis::RedisStoreBuilder, what: &str) -> String {
    match builder.build() {
        Err(StoreError::Other(source)) => match source.downcast_ref::<ConfigError>() {
            Some(ConfigError::InvalidSetting(why)) => why.clone(),
            _ => panic!("{what}: expected a ConfigError, got {source}"),
        },
        Err(other) => panic!("{what}: expected a ConfigError, got {other}"),
        Ok(store) => panic!(
            "{what}: the settings were accepted; PING over the connection: {:?}",
            store.ping().await
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_tls_settings_with_a_plaintext_url_are_a_config_error() {
    let server = common::RedisServer::start();
    let pki = common::deployments::certificates();
    let password = "hunter2-secret";
    // The server has no password: a store built anyway answers PING in plaintext.
    let plain = server.url();
    let with_password = format!("redis://:{password}@127.0.0.1:{}/", server.port());
    let secure = format!("rediss://:{password}@127.0.0.1:{}/", server.port());
    let (cert, key) = pki.client.clone();
    let cases = [
        (
            RedisStore::builder(plain.as_str()).tls_ca_pem(pki.ca.clone()),
            "node with a CA",
        ),
        (
            RedisStore::builder(plain.as_str()).tls_client_cert_pem(cert.clone(), key.clone()),
            "node with a client certificate",
        ),
        (
            RedisStore::cluster([plain.as_str()]).tls_ca_pem(pki.ca.clone()),
            "cluster with a CA",
        ),
        (
            RedisStore::sentinel([with_password.as_str()], "primary")
                .tls_client_cert_pem(cert, key),
            "sentinel with a client certificate",
        ),
        (
            RedisStore::cluster([secure.as_str(), plain.as_str()]),
            "cluster nodes with and without TLS",
        ),
        (
            RedisStore::sentinel([secure.as_str(), with_password.as_str()], "primary")
                .tls_ca_pem(pki.ca.clone()),
            "sentinels with and without TLS",
        ),
    ];
    for (builder, what) in cases {
        let why = expect_config_error(builder, what).await;
        assert!(why.contains("rediss://"), "{what}: {why}");
        assert!(!why.contains(password), "{what}: {why}");
    }
    // Without certificates the plaintext URL is what it says, and it works.
    let store = RedisStore::builder(server.url())
        .key_prefix("{tls-none}:")
        .connect()
        .await
        .unwrap();
    assert!(store.load().await.unwrap().is_none());
}

/// A fleet worker process (see `common/fleet.rs`); run by the fleet test above.
#[test]
#[ignore = "a worker process started by the TLS fleet test"]
fn tls_fleet_worker() {
    common::fleet::worker();
}
