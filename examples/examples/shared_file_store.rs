//! Two processes, one refresh: tokenflight's `FileStore` shares the token between the
//! processes of one machine, and its file lock makes the refresh a single flight across
//! them. This program starts the testkit server, seeds the store with an expired token
//! (and the login's refresh token), then runs itself twice as child processes at once.
//! Each child needs a token; one refreshes, the other waits on the lock and adopts the
//! token the first one saved. The server counts one token-endpoint call.
//!
//! `cargo run --example shared_file_store`

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenflight::oauth2::RefreshTokenGrant;
use tokenflight::{Token, store::FileStore, store::TokenStore};
use tokenflight_reqwest::reqwest_middleware::ClientBuilder;
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::{TestServer, TestServerConfig};

const CHILDREN: usize = 2;
/// How the parent hands the OAuth client credentials to its children (not in argv,
/// which other users of the machine can read).
const SECRET_ENV: &str = "TOKENFLIGHT_DEMO_CLIENT_SECRET";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("child") => child(&args),
        _ => parent(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shared_file_store: {error}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn parent() -> Result<()> {
    // A slow token endpoint, so the children's refreshes would overlap without the lock.
    let server = TestServer::start(TestServerConfig {
        token_latency: Duration::from_millis(300),
        ..TestServerConfig::default()
    });
    let dir = std::env::temp_dir().join(format!("tokenflight-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store_path = dir.join("token.json");
    seed(&store_path, server.issue_refresh_token())?;
    println!("store: {}", store_path.display());

    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..CHILDREN)
        .map(|n| {
            Command::new(&exe)
                .args(["child", &n.to_string()])
                .arg(&store_path)
                .args([server.token_url(), server.api_url("me"), server.client_id()])
                .env(SECRET_ENV, server.client_secret())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut all_ok = true;
    for mut child in children {
        all_ok &= child.wait()?.success();
    }
    let counters = server.counters();
    println!(
        "token-endpoint calls for {CHILDREN} processes: {} (refresh-token reuse seen: {})",
        counters.token_calls, counters.reuse_detections
    );
    let _ = std::fs::remove_dir_all(&dir);
    if !all_ok {
        return Err("a child process failed".into());
    }
    if counters.token_calls != 1 {
        return Err(format!("expected one refresh, saw {}", counters.token_calls).into());
    }
    Ok(())
}

/// Saves an expired token carrying the login's refresh token: both children start from
/// it and need a refresh.
fn seed(path: &Path, refresh_token: String) -> Result<()> {
    let expired = SystemTime::now()
        .checked_sub(Duration::from_secs(60))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let token = Token::new("expired")
        .with_refresh(refresh_token)
        .expires_at(expired)
        .with_generation(1);
    // A store saves only under its refresh lock.
    futures::executor::block_on(async {
        let guard = FileStore::new(path).lock().await?;
        let saved = guard.save(&token).await;
        guard.unlock().await;
        saved
    })?;
    Ok(())
}

fn child(args: &[String]) -> Result<()> {
    let [_, _, n, store, token_url, api_url, client_id] = args else {
        return Err("usage: shared_file_store child N STORE TOKEN_URL API_URL CLIENT_ID".into());
    };
    let secret = std::env::var(SECRET_ENV)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let bare = Arc::new(BareTransport::new(reqwest::Client::new()));
        let grant = RefreshTokenGrant::new(bare, token_url, client_id)?.client_secret(secret);
        let layer = TokenMiddleware::builder()
            .source(grant)
            .store(FileStore::new(PathBuf::from(store)))
            .allowed_origin(api_url)
            .build()?;
        let client = ClientBuilder::new(reqwest::Client::new())
            .with(layer.clone())
            .build();
        let status = client.get(api_url).send().await?.status();
        let stats = layer.policy().stats();
        println!(
            "process {n} (pid {}): GET -> {status}; refreshed here: {}, adopted the other's token: {}",
            std::process::id(),
            stats.source_calls,
            stats.adopted
        );
        if !status.is_success() {
            return Err(format!("process {n}: {status}").into());
        }
        Ok(())
    })
}
