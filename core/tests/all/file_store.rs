//! `FileStore` in one process: format, privacy, atomic replace, corruption handling, and
//! the advisory refresh lock between two store instances (the OS lock is per open file,
//! so two instances contend exactly like two processes do). The multi-process tests are
//! in `tests/tests/file_store_processes.rs`.
#![cfg(all(feature = "file-store", unix))]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use futures::executor::block_on;
use proptest::prelude::*;
use tokenflight::{
    RefreshContext, SingleFlight, Token, from_fn, store::FileStore, store::StoreError,
    store::TokenStore, test_util::ManualClock,
};

/// Saves `token` the only way a store allows: under its lock.
async fn save_locked(store: &FileStore, token: &Token) -> Result<(), StoreError> {
    let guard = store.lock().await?;
    let saved = guard.save(token).await;
    guard.unlock().await;
    saved
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn token(generation: u64) -> Token {
    Token::new(format!("access-{generation}"))
        .with_refresh(format!("refresh-{generation}"))
        // Records keep whole milliseconds.
        .expires_at(SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_042))
        .with_generation(generation)
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn round_trip_with_private_files_and_no_temp_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("token.json"));
    assert_eq!(block_on(store.load()).unwrap(), None);
    block_on(save_locked(&store, &token(1))).unwrap();
    block_on(save_locked(&store, &token(2))).unwrap();
    assert_eq!(block_on(store.load()).unwrap(), Some(token(2)));
    assert_eq!(mode(store.path()), 0o600);
    let text = fs::read_to_string(store.path()).unwrap();
    assert!(text.starts_with("{\"format\":2,"), "{text}");
    let guard = block_on(store.lock()).unwrap();
    assert_eq!(block_on(guard.load()).unwrap(), Some(token(2)));
    block_on(guard.unlock());
    assert_eq!(mode(store.lock_path()), 0o600);
    assert_eq!(leftovers(dir.path()), ["token.json", "token.json.lock"]);
}

#[test]
fn a_group_or_world_readable_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("token.json"));
    block_on(save_locked(&store, &token(1))).unwrap();
    let before = fs::read(store.path()).unwrap();
    for lax in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(store.path(), fs::Permissions::from_mode(lax)).unwrap();
        let load = block_on(store.load());
        assert!(
            matches!(load, Err(StoreError::Insecure(_))),
            "{lax:o}: {load:?}"
        );
        let save = block_on(save_locked(&store, &token(2)));
        assert!(
            matches!(save, Err(StoreError::Insecure(_))),
            "{lax:o}: {save:?}"
        );
        assert_eq!(fs::read(store.path()).unwrap(), before);
    }
    let Err(error) = block_on(store.load()) else {
        unreachable!()
    };
    assert!(error.to_string().contains("chmod 600"), "{error}");
    fs::set_permissions(store.path(), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(block_on(store.load()).unwrap(), Some(token(1)));
}

#[test]
fn c13_a_corrupt_file_is_a_typed_error_and_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let garbage = b"{\"format\":1,\"token\":{\"access\":\"access-SECRET\",\"gener";
    fs::write(&path, garbage).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let store = FileStore::new(&path);
    let error = block_on(store.load()).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
    assert!(!error.to_string().contains("SECRET"), "{error}");
    let names = leftovers(dir.path());
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("token.json.corrupt-"), "{names:?}");
    assert!(error.to_string().contains(&names[0]), "{error}");
    assert_eq!(fs::read(dir.path().join(&names[0])).unwrap(), garbage);
    // The store is empty now and usable again.
    assert_eq!(block_on(store.load()).unwrap(), None);
    block_on(save_locked(&store, &token(3))).unwrap();
    assert_eq!(block_on(store.load()).unwrap(), Some(token(3)));
}

#[test]
fn a_save_never_overwrites_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    fs::write(&path, "not json at all").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let store = FileStore::new(&path);
    block_on(save_locked(&store, &token(1))).unwrap();
    let kept: Vec<_> = leftovers(dir.path())
        .into_iter()
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        fs::read_to_string(dir.path().join(&kept[0])).unwrap(),
        "not json at all"
    );
    assert_eq!(block_on(store.load()).unwrap(), Some(token(1)));
}

#[test]
fn a_newer_format_is_refused_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let newer = r#"{"format":99,"whatever":{}}"#;
    fs::write(&path, newer).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let store = FileStore::new(&path);
    assert!(matches!(
        block_on(store.load()),
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        block_on(save_locked(&store, &token(1))),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(fs::read_to_string(&path).unwrap(), newer);
    // Only the lock's sidecar (the save took the lock) is new: nothing moved aside.
    assert_eq!(leftovers(dir.path()), ["token.json", "token.json.lock"]);
}

#[test]
fn c1_the_lock_excludes_another_holder_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let first = FileStore::new(&path);
    let second = FileStore::new(&path).lock_timeout(Duration::from_millis(50));
    let held = block_on(first.lock()).unwrap();
    assert!(matches!(
        block_on(second.lock()),
        Err(StoreError::LockTimeout)
    ));
    drop(held);
    let taken = block_on(second.lock()).unwrap();
    assert!(matches!(
        block_on(first.clone().lock_timeout(Duration::ZERO).lock()),
        Err(StoreError::LockTimeout)
    ));
    drop(taken);
}

#[test]
fn a_waiting_lock_gets_it_when_the_holder_releases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let holder = FileStore::new(&path);
    let waiter = FileStore::new(&path);
    let held = block_on(holder.lock()).unwrap();
    block_on(async {
        let mut waiting = Box::pin(waiter.lock());
        // Polled once: the lock is busy, so the wait moves to the helper thread.
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(held);
        let guard = waiting.await.unwrap();
        guard.save(&token(4)).await.unwrap();
        guard.unlock().await;
    });
}

#[test]
fn c6_a_dropped_waiter_does_not_keep_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let holder = FileStore::new(&path);
    let held = block_on(holder.lock()).unwrap();
    let abandoned = FileStore::new(&path);
    block_on(async {
        let mut waiting = Box::pin(abandoned.lock());
        assert!(futures::poll!(waiting.as_mut()).is_pending());
    });
    drop(held);
    // The abandoned waiter's thread may grab the lock once before it notices nobody
    // waits; it lets go at once, so a patient third party always gets it.
    let third = FileStore::new(&path).lock_timeout(Duration::from_secs(30));
    assert!(block_on(third.lock()).is_ok());
}

#[test]
fn c1_a_second_flight_adopts_the_token_the_first_one_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let calls = Arc::new(AtomicU32::new(0));
    let flight = |name: &'static str| {
        let calls = calls.clone();
        SingleFlight::builder()
            .store(FileStore::new(&path))
            .source(from_fn(move |cx: RefreshContext| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                let refresh = cx.previous.and_then(|t| t.refresh().cloned());
                async move {
                    let token = Token::new(format!("{name}-{n}"))
                        .expires_in(Duration::from_secs(3600), SystemTime::now());
                    Ok(match refresh {
                        Some(refresh) => token.with_refresh(refresh),
                        None => token,
                    })
                }
            }))
            .build()
            .unwrap()
    };
    let (a, b) = (flight("a"), flight("b"));
    block_on(save_locked(
        &FileStore::new(&path),
        &Token::new("old")
            .with_refresh("rt")
            .expires_at(SystemTime::UNIX_EPOCH)
            .with_generation(5),
    ))
    .unwrap();
    let from_a = block_on(a.token()).unwrap();
    let from_b = block_on(b.token()).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(from_a.generation(), 6);
    assert_eq!(from_b.generation(), 6);
    assert_eq!(from_a.access(), from_b.access());
    assert_eq!(from_a.refresh().unwrap().expose(), "rt");
    assert_eq!(b.stats().adopted, 1);
}

/// One `FileStore` shared by four coordinators (issue 15: the lock lives in the guard,
/// not in the store): each expiry costs one source call, the other three adopt the
/// saved token, and every coordinator ends on the same generation.
#[test]
fn c1_coordinators_sharing_one_file_store_make_one_refresh_per_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::new(dir.path().join("token.json")));
    let clock = ManualClock::at_fixed_point();
    let lifetime = Duration::from_secs(3600);
    let calls = Arc::new(AtomicU32::new(0));
    let flights: Vec<_> = (0..4)
        .map(|_| {
            let calls = calls.clone();
            let clock_in_source = clock.clone();
            SingleFlight::builder()
                .store(store.clone())
                .clock(Arc::new(clock.clone()))
                .refresh_ahead(None)
                .source(from_fn(move |cx: RefreshContext| {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let spent = cx.previous.and_then(|t| t.refresh().cloned());
                    let now = tokenflight::adapter::Clock::now(&clock_in_source);
                    async move {
                        // Rotation: each refresh token is spent once, by one refresh.
                        assert_eq!(
                            spent.as_ref().map(|r| r.expose().to_owned()),
                            Some(format!("rt-{}", n - 1))
                        );
                        Ok(Token::new(format!("at-{n}"))
                            .with_refresh(format!("rt-{n}"))
                            .expires_in(lifetime, now))
                    }
                }))
                .build()
                .unwrap()
        })
        .collect();
    block_on(save_locked(
        &store,
        &Token::new("at-0")
            .with_refresh("rt-0")
            .expires_in(lifetime, tokenflight::adapter::Clock::now(&clock))
            .with_generation(1),
    ))
    .unwrap();
    for cycle in 1..=3u32 {
        clock.advance(lifetime);
        let tokens = block_on(futures::future::join_all(flights.iter().map(|f| f.token())));
        let generations: Vec<u64> = tokens
            .iter()
            .map(|t| t.as_ref().unwrap().generation())
            .collect();
        assert!(
            generations.iter().all(|g| *g == u64::from(cycle) + 1),
            "cycle {cycle}: {generations:?}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            cycle,
            "one refresh per expiry"
        );
        assert_eq!(
            block_on(store.load()).unwrap().map(|t| t.generation()),
            Some(u64::from(cycle) + 1),
            "saved before it was handed out"
        );
    }
    let adopted: u64 = flights.iter().map(|f| f.stats().adopted).sum();
    assert_eq!(
        adopted,
        3 * 3,
        "the other three adopted the saved token each cycle"
    );
}

fn arb_token() -> impl Strategy<Value = Token> {
    (
        any::<String>(),
        proptest::option::of(any::<String>()),
        proptest::option::of(0u64..(1 << 50)),
        any::<u64>(),
    )
        .prop_map(|(access, refresh, expiry, generation)| {
            let token = Token::new(access).with_generation(generation);
            let token = match refresh {
                Some(refresh) => token.with_refresh(refresh),
                None => token,
            };
            match expiry {
                Some(millis) => {
                    token.expires_at(SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
                }
                None => token,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_stored_token_round_trips(token in arb_token()) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("token.json"));
        block_on(save_locked(&store, &token)).unwrap();
        prop_assert_eq!(block_on(store.load()).unwrap(), Some(token));
    }

    #[test]
    fn c13_arbitrary_file_contents_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        fs::write(&path, &bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        match block_on(FileStore::new(&path).load()) {
            Ok(_) | Err(StoreError::Corrupt(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }
}
