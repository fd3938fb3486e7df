//! A WebSocket client (tokio-tungstenite) that re-authenticates in band: the loopback
//! server here checks the token at the upgrade, refuses every message sent while the
//! connection's token has expired, and takes a new token as an `auth` message. The
//! client sends `auth <token>` whenever its subscription (C21) yields a newer
//! generation, so the connection outlives every token.
//!
//! Runs over 10 token lifetimes (1-second tokens) and checks: every message answered
//! `ok`, none refused for an expired token, one connection throughout.
//!
//! `cargo run -p tokenflight-examples --example websocket`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{SinkExt, StreamExt};
use tokenflight::subscribe::TokenChange;
use tokenflight::{SingleFlight, Token, from_fn};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

const LIFETIME: Duration = Duration::from_secs(1);
const LIFETIMES: u32 = 10;
const MESSAGE_EVERY: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Server {
    issued: Mutex<HashMap<String, SystemTime>>,
    next: AtomicU64,
    refused_expired: AtomicU32,
    connections: AtomicU32,
}

impl Server {
    fn expiry(&self, token: &str) -> Option<SystemTime> {
        self.issued.lock().ok()?.get(token).copied()
    }
}

fn refuse() -> ErrorResponse {
    let mut response = ErrorResponse::new(Some("expired or unknown token".into()));
    *response.status_mut() = http::StatusCode::UNAUTHORIZED;
    response
}

/// One connection: authenticated at the upgrade, re-authenticated by `auth` messages.
async fn serve(server: Arc<Server>, stream: tokio::net::TcpStream) {
    let mut expiry = None;
    // The error type is tungstenite's handshake callback's (an HTTP response).
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| {
        let token = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match token.and_then(|t| server.expiry(t)) {
            Some(at) if SystemTime::now() < at => {
                expiry = Some(at);
                Ok(response)
            }
            _ => {
                server.refused_expired.fetch_add(1, Ordering::SeqCst);
                Err(refuse())
            }
        }
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    server.connections.fetch_add(1, Ordering::SeqCst);
    while let Some(Ok(message)) = socket.next().await {
        let Ok(text) = message.to_text() else {
            continue;
        };
        let reply = if let Some(token) = text.strip_prefix("auth ") {
            match server.expiry(token) {
                Some(at) if SystemTime::now() < at => {
                    expiry = Some(at);
                    continue;
                }
                _ => "refused auth".to_string(),
            }
        } else if expiry.is_some_and(|at| SystemTime::now() < at) {
            format!("ok {text}")
        } else {
            server.refused_expired.fetch_add(1, Ordering::SeqCst);
            format!("refused {text}")
        };
        if socket.send(Message::text(reply)).await.is_err() {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Arc::new(Server::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/socket", listener.local_addr()?);
    let accepting = Arc::clone(&server);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(Arc::clone(&accepting), stream));
        }
    });

    let issuer = Arc::clone(&server);
    let flight = SingleFlight::builder()
        .source(from_fn(move |_cx| {
            let n = issuer.next.fetch_add(1, Ordering::SeqCst);
            let secret = format!("ws-token-{n}");
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

    let mut token = flight.token().await?;
    changes.skip_current();
    let mut request = url.as_str().into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token.access().expose()).parse()?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;

    let (mut sent, mut ok, mut refused, mut reauthenticated) = (0_u32, 0_u32, 0_u32, 0_u32);
    let end = tokio::time::Instant::now() + LIFETIME * LIFETIMES;
    while tokio::time::Instant::now() < end {
        // The application's traffic keeps the token fresh (a refresh at its leeway);
        // the subscription says when the connection must re-authenticate.
        flight.token().await?;
        while let Some(change) = changes.try_next() {
            match change {
                TokenChange::Token(newer) if newer.generation() > token.generation() => {
                    let auth = format!("auth {}", newer.access().expose());
                    socket.send(Message::text(auth)).await?;
                    token = newer;
                    reauthenticated += 1;
                }
                TokenChange::AuthLost(_) => return Err("re-authentication required".into()),
                _ => {}
            }
        }
        sent += 1;
        socket
            .send(Message::text(format!("message {sent}")))
            .await?;
        match socket.next().await {
            Some(Ok(reply)) if reply.to_text()?.starts_with("ok ") => ok += 1,
            Some(Ok(_)) => refused += 1,
            Some(Err(error)) => return Err(error.into()),
            None => return Err("the server closed the connection".into()),
        }
        tokio::time::sleep(MESSAGE_EVERY).await;
    }
    socket.close(None).await?;

    let refused_server = server.refused_expired.load(Ordering::SeqCst);
    let connections = server.connections.load(Ordering::SeqCst);
    println!(
        "websocket: {sent} messages over {LIFETIMES} token lifetimes on {connections} \
         connection(s), {reauthenticated} in-band re-authentications, {} refreshes; \
         ok {ok}, refused for an expired token {refused_server}",
        flight.stats().source_calls,
    );
    if ok != sent || refused != 0 || refused_server != 0 || reauthenticated < LIFETIMES - 2 {
        return Err("messages refused or lost".into());
    }
    Ok(())
}
