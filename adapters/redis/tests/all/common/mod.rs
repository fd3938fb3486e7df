//! Test support: a private `redis-server` on a free loopback port, stopped on drop.
//!
//! No system service is used. The port is picked by binding 127.0.0.1:0 and closing it
//! (redis cannot report a port it picked itself); readiness is a PING answered with
//! PONG, tried a bounded number of times.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub mod deployments;
pub mod fleet;

/// A `redis-server` child process.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers PING.
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        server
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]) and waits
    /// for it to answer. The data is gone: it runs without persistence.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); install it (`.ci/deps` does: \
                     apt-get install redis-server)"
                )
            });
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        // 400 tries at most 25 ms apart: a started server answers long before.
        for _ in 0..400 {
            if ping(self.port) {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server exited early with {status} (port {} taken?)",
                        self.port
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A stand-in authorization server for in-process tests: rotating refresh tokens with
/// reuse detection, like the real thing. Every fetch presents the previous token's
/// refresh secret; presenting one that was already spent counts as a reuse (the
/// double-spend these tests must never see) and fails with `invalid_grant`.
pub mod issuer {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokenflight::{RefreshContext, RefreshError, Token, TokenSource, from_fn};

    pub const LIFETIME: Duration = Duration::from_secs(3600);

    #[derive(Default)]
    pub struct Issuer {
        /// The one refresh secret that may be spent next.
        live: Mutex<Option<String>>,
        issued: AtomicU64,
        pub calls: AtomicU64,
        pub reuses: AtomicU64,
    }

    impl Issuer {
        pub fn new() -> Arc<Issuer> {
            Arc::new(Issuer::default())
        }

        /// A first token (a login): its refresh secret is the live one.
        pub fn login(&self, now: std::time::SystemTime) -> Token {
            self.mint(now)
        }

        fn mint(&self, now: std::time::SystemTime) -> Token {
            let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let refresh = format!("refresh-{n}");
            *self.live.lock().unwrap() = Some(refresh.clone());
            Token::new(format!("access-{n}"))
                .with_refresh(refresh)
                .expires_in(LIFETIME, now)
        }

        /// Spends `presented` and mints the next token, or records a reuse.
        pub fn refresh(
            &self,
            presented: Option<&str>,
            now: std::time::SystemTime,
        ) -> Result<Token, RefreshError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut live = self.live.lock().unwrap();
            if presented.is_none() || live.as_deref() != presented {
                self.reuses.fetch_add(1, Ordering::SeqCst);
                return Err(RefreshError::permanent(
                    "invalid_grant: refresh token reuse",
                ));
            }
            *live = None;
            drop(live);
            Ok(self.mint(now))
        }

        pub fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }

        pub fn reuses(&self) -> u64 {
            self.reuses.load(Ordering::SeqCst)
        }

        /// A token source that refreshes with the previous token's refresh secret.
        pub fn source(self: &Arc<Self>) -> impl TokenSource + 'static {
            let issuer = Arc::clone(self);
            from_fn(move |cx: RefreshContext| {
                let presented = cx
                    .previous
                    .as_ref()
                    .and_then(|t| t.refresh().map(|r| r.expose().to_owned()));
                let result = issuer.refresh(presented.as_deref(), cx.now);
                async move { result }
            })
        }
    }
}

/// A snapshot of `INFO commandstats`: how often the server ran each command (the
/// commands scripts run included).
pub struct CommandStats(String);

/// Takes a [`CommandStats`] snapshot.
pub async fn commandstats(con: &mut redis::aio::MultiplexedConnection) -> CommandStats {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    CommandStats(info)
}

impl CommandStats {
    /// The calls of `commands` (lower-case names), added up.
    pub fn calls(&self, commands: &[&str]) -> u64 {
        commands
            .iter()
            .map(|name| {
                self.0
                    .lines()
                    .filter_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
                    .filter_map(|rest| rest.split(',').next())
                    .map(|n| n.parse::<u64>().unwrap())
                    .sum::<u64>()
            })
            .sum()
    }
}

/// Scripts the server has run (`EVAL` and `EVALSHA`).
pub async fn script_calls(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    commandstats(con).await.calls(&["evalsha", "eval"])
}
