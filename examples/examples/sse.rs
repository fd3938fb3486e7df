//! A Server-Sent Events client that stays connected across token lifetimes: the
//! loopback server here closes a stream once the token it was opened with expires, and
//! refuses a connection with an expired token. The client reconnects with a fresh token
//! and `Last-Event-ID` when the server closes, or as soon as its subscription says the
//! token changed (C21), and closes for good on "re-authentication required".
//!
//! Runs over 10 token lifetimes (1-second tokens) and checks: every event id arrives
//! exactly once, in order, and no connection was refused for an expired token.
//!
//! `cargo run -p tokenflight-examples --example sse`

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokenflight::subscribe::TokenChange;
use tokenflight::{SingleFlight, Token, from_fn};

const LIFETIME: Duration = Duration::from_secs(1);
const LIFETIMES: u32 = 10;
const EVENT_EVERY: Duration = Duration::from_millis(20);

/// The server's view: which tokens it issued and until when; counters for the check.
#[derive(Default)]
struct Server {
    issued: Mutex<HashMap<String, SystemTime>>,
    next_id: AtomicU64,
    refused_expired: AtomicU32,
    connections: AtomicU32,
}

impl Server {
    fn expiry(&self, headers: &HeaderMap) -> Option<SystemTime> {
        let token = headers
            .get("authorization")?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        self.issued.lock().ok()?.get(token).copied()
    }
}

/// `GET /events`: events numbered from `Last-Event-ID` + 1; the stream ends when the
/// token expires.
async fn events(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    let Some(expiry) = server.expiry(&headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if SystemTime::now() >= expiry {
        server.refused_expired.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    server.connections.fetch_add(1, Ordering::SeqCst);
    let after: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = futures::stream::unfold(after, move |last| async move {
        tokio::time::sleep(EVENT_EVERY).await;
        // An expired token's stream is closed, as real servers do.
        if SystemTime::now() >= expiry {
            return None;
        }
        let id = last + 1;
        let event = Event::default()
            .id(id.to_string())
            .data(format!("event {id}"));
        Some((Ok::<_, Infallible>(event), id))
    });
    Sse::new(stream).into_response()
}

/// What one connection ended with.
enum Ended {
    ServerClosed,
    TokenChanged,
    AuthLost,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Arc::new(Server::default());
    let app = axum::Router::new()
        .route("/events", axum::routing::get(events))
        .with_state(Arc::clone(&server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/events", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let issuer = Arc::clone(&server);
    let flight = SingleFlight::builder()
        .source(from_fn(move |_cx| {
            let n = issuer.next_id.fetch_add(1, Ordering::SeqCst);
            let secret = format!("sse-token-{n}");
            let now = SystemTime::now();
            if let Ok(mut issued) = issuer.issued.lock() {
                issued.insert(secret.clone(), now + LIFETIME);
            }
            async move { Ok(Token::new(secret).expires_in(LIFETIME, now)) }
        }))
        // One-second tokens: the defaults would count a token younger than the
        // one-second `min_refresh_interval` as fresh until it expires (C15), and allow
        // a second of leeway for servers that round `expires_in`, longer than its life.
        // This server's expiry is exact, to the millisecond.
        .leeway(Duration::from_millis(200))
        .min_refresh_interval(Duration::from_millis(200))
        .build()?;
    let mut changes = flight.subscribe();
    changes.skip_current();
    let client = reqwest::Client::new();

    let mut last_id = 0_u64;
    let (mut lost, mut duplicated, mut reconnects) = (0_u64, 0_u64, 0_u32);
    let end = tokio::time::Instant::now() + LIFETIME * LIFETIMES;
    'connections: while tokio::time::Instant::now() < end {
        let token = flight.token().await?;
        let mut response = client
            .get(&url)
            .bearer_auth(token.access().expose())
            .header("last-event-id", last_id.to_string())
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("connection refused: {}", response.status()).into());
        }
        let mut buffer = String::new();
        let ended = loop {
            tokio::select! {
                chunk = response.chunk() => match chunk? {
                    Some(bytes) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
                    None => break Ended::ServerClosed,
                },
                change = changes.next() => match change {
                    Some(TokenChange::Token(new)) if new.generation() > token.generation() => {
                        break Ended::TokenChanged;
                    }
                    Some(TokenChange::AuthLost(_)) | None => break Ended::AuthLost,
                    Some(_) => {}
                },
            }
            // Complete events end with a blank line.
            while let Some(at) = buffer.find("\n\n") {
                let event: String = buffer.drain(..at + 2).collect();
                let id = event
                    .lines()
                    .find_map(|line| line.strip_prefix("id:"))
                    .and_then(|id| id.trim().parse::<u64>().ok());
                let Some(id) = id else { continue };
                if id <= last_id {
                    duplicated += 1;
                } else {
                    lost += id - last_id - 1;
                    last_id = id;
                }
            }
            if tokio::time::Instant::now() >= end {
                break 'connections;
            }
        };
        match ended {
            Ended::ServerClosed | Ended::TokenChanged => reconnects += 1,
            Ended::AuthLost => return Err("re-authentication required".into()),
        }
    }

    let refused = server.refused_expired.load(Ordering::SeqCst);
    let stats = flight.stats();
    println!(
        "sse: {last_id} events over {LIFETIMES} token lifetimes, {reconnects} reconnects \
         ({} connections), {} refreshes; lost {lost}, duplicated {duplicated}, \
         refused for an expired token {refused}",
        server.connections.load(Ordering::SeqCst),
        stats.source_calls,
    );
    if lost != 0 || duplicated != 0 || refused != 0 || reconnects < LIFETIMES - 2 {
        return Err("events lost, duplicated or refused".into());
    }
    Ok(())
}
