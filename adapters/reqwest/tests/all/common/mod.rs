//! Shared by the integration tests: a token source that talks to the testkit's token
//! endpoint through the bare transport, and a client with the layer.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokenflight::{RefreshContext, RefreshError, Token, TokenSource, adapter::Transport, from_fn};
use tokenflight_reqwest::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokenflight_reqwest::{BareTransport, TokenMiddleware, reqwest};
use tokenflight_tests::testkit::TestServer;
use tokio::sync::{Semaphore, mpsc};

/// The client-credentials grant, written out: one form POST per refresh.
pub fn client_credentials(server: &TestServer) -> impl TokenSource + use<> {
    let fetch = Fetch::new(server);
    from_fn(move |_cx: RefreshContext| fetch.token())
}

/// Like [`client_credentials`], but each refresh first reports on `started` and then
/// waits for a permit of `gate` before it calls the token endpoint: a test can act
/// while a refresh is certainly in flight, without guessing at timing.
pub fn gated_client_credentials(
    server: &TestServer,
    started: mpsc::UnboundedSender<()>,
    gate: Arc<Semaphore>,
) -> impl TokenSource + use<> {
    let fetch = Fetch::new(server);
    from_fn(move |_cx: RefreshContext| {
        let started = started.clone();
        let gate = gate.clone();
        let token = fetch.token();
        async move {
            let _ = started.send(());
            let _permit = gate
                .acquire()
                .await
                .map_err(|_| RefreshError::transient("gate closed"))?;
            token.await
        }
    })
}

#[derive(Clone)]
struct Fetch {
    transport: Arc<dyn Transport>,
    url: String,
    form: String,
}

impl Fetch {
    fn new(server: &TestServer) -> Self {
        Fetch {
            transport: Arc::new(BareTransport::default()),
            url: server.token_url(),
            form: format!(
                "grant_type=client_credentials&client_id={}&client_secret={}",
                server.client_id(),
                server.client_secret()
            ),
        }
    }

    fn token(&self) -> impl Future<Output = Result<Token, RefreshError>> + Send + use<> {
        let transport = self.transport.clone();
        let request = http::Request::post(self.url.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Bytes::from(self.form.clone()));
        async move {
            let request = request.map_err(|e| RefreshError::permanent(e.to_string()))?;
            let response = transport
                .send(request, 64 * 1024)
                .await
                .map_err(|e| RefreshError::transient("token endpoint").with_source(e))?;
            if !response.status().is_success() {
                return Err(RefreshError::transient(format!(
                    "token endpoint answered {}",
                    response.status()
                )));
            }
            let body: serde_json::Value = serde_json::from_slice(response.body())
                .map_err(|e| RefreshError::transient("malformed token response").with_source(e))?;
            let access = body["access_token"]
                .as_str()
                .ok_or_else(|| RefreshError::transient("no access_token"))?;
            let lifetime = body["expires_in"].as_u64().unwrap_or(3600);
            Ok(Token::new(access).expires_in(Duration::from_secs(lifetime), SystemTime::now()))
        }
    }
}

/// The OAuth 2.0 refresh_token grant of the core against `server`, over the bare
/// transport, starting from a new refresh-token family (as after a login).
pub fn refresh_token_grant(server: &TestServer) -> tokenflight::oauth2::RefreshTokenGrant {
    tokenflight::oauth2::RefreshTokenGrant::new(
        Arc::new(BareTransport::default()),
        &server.token_url(),
        &server.client_id(),
    )
    .unwrap()
    .client_secret(server.client_secret())
    .initial_refresh_token(server.issue_refresh_token())
}

/// A client with `layer` and nothing else.
pub fn client(layer: TokenMiddleware) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(layer)
        .build()
}

/// The layer the tests use unless they need something else: client credentials against
/// `server`, which is the one allowed origin.
pub fn layer(server: &TestServer) -> TokenMiddleware {
    TokenMiddleware::builder()
        .source(client_credentials(server))
        .allowed_origin(&server.origin())
        .build()
        .unwrap()
}

/// A one-request-per-connection server that answers every request with a chunked body
/// (no `Content-Length`, so the layer must read to learn the length), made of `chunks`,
/// and, if `cut`, closes the connection before the last chunk ends.
pub async fn chunked_server(chunks: Vec<Vec<u8>>, cut: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let chunks = chunks.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let mut response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kind: chunked\r\nconnection: close\r\n\r\n".to_vec();
                for chunk in &chunks {
                    response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    response.extend_from_slice(chunk);
                    response.extend_from_slice(b"\r\n");
                }
                if cut {
                    // Announce a chunk, send half of it, hang up.
                    response.extend_from_slice(b"10\r\nabcdefgh");
                } else {
                    response.extend_from_slice(b"0\r\n\r\n");
                }
                socket.write_all(&response).await.unwrap();
                socket.shutdown().await.unwrap();
            });
        }
    });
    format!("http://{addr}")
}

/// A server that records the head of every request it gets (lower-cased) and answers
/// `GET /redirect/<port>/<path>` with a `302` to `http://127.0.0.1:<port>/<path>`, and
/// everything else with `200 ok`. For checks on headers the testkit does not count.
pub async fn recording_server() -> (String, mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&request).to_lowercase();
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let _ = heads.send(head);
                let response = match path.strip_prefix("/redirect/") {
                    Some(rest) => {
                        let (port, path) = rest.split_once('/').unwrap();
                        format!(
                            "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{port}/{path}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                    }
                    None => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                        .to_owned(),
                };
                socket.write_all(response.as_bytes()).await.unwrap();
                socket.shutdown().await.unwrap();
            });
        }
    });
    (format!("http://{addr}"), received)
}
