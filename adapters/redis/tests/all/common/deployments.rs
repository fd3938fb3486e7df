//! Production-shaped Redis deployments on loopback, started by the tests themselves from
//! Debian's `redis-server` (and `redis-cli` from `redis-tools`): a TLS server with a
//! private CA and an ACL user, a 3-primary cluster, and a primary with two replicas
//! watched by a sentinel (`redis-server --sentinel`). Everything lives in a private
//! temporary directory and every process is killed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, ping};

/// A private directory under the system's temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "tokenflight-redis-{name}-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One `redis-server` process (a data node or a sentinel), killed on drop.
pub struct Proc {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Proc {
    pub fn start(port: u16, args: Vec<String>) -> Proc {
        let mut proc = Proc {
            port,
            args,
            child: None,
        };
        proc.restart();
        proc
    }

    /// SIGKILL: no goodbye to clients or to the sentinel.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again with the same arguments (no data survives).
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); `.ci/deps` installs it"));
        self.child = Some(child);
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` (at most 800 tries, 25 ms apart) until it holds.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..800 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting until {what}");
}

/// `redis-cli -p port args...` on loopback; its standard output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); `.ci/deps` installs it"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn data_node_args(port: u16, dir: &TempDir) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        // A replica re-pointed by a failover may need a full sync; the default 5 s
        // delay (to batch replicas) would only slow the tests down.
        "--repl-diskless-sync-delay",
        "0",
        "--dir",
        dir.path().to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Starts `redis-server` with the arguments `args` gives for a free loopback port and
/// waits until it answers PING. Another test may take the port between the check and
/// the start: then the server exits at once, and the next free port is tried.
fn start_on_free_port(what: &str, args: impl Fn(u16) -> Vec<String>) -> Proc {
    for _ in 0..5 {
        let port = free_port();
        let mut proc = Proc::start(port, args(port));
        let mut exited = false;
        wait_until(what, || {
            exited = proc.exited();
            exited || ping(port)
        });
        if !exited {
            return proc;
        }
    }
    panic!("{what}: redis-server kept exiting at start");
}

fn start_plain(extra: Vec<String>, dir: &TempDir, what: &str) -> Proc {
    start_on_free_port(what, |port| {
        let mut all = data_node_args(port, dir);
        all.extend(extra.iter().cloned());
        all
    })
}

/// A TLS-only server (no plain port) whose certificate a private CA signed, where the
/// default user is off and only an ACL user with a password may use the store's keys.
pub struct TlsRedis {
    pub proc: Proc,
    pub ca_pem: String,
    /// A client certificate and key the CA signed (for mutual TLS).
    pub client_pem: (String, String),
    mutual: bool,
    pub user: &'static str,
    pub password: String,
    _dir: TempDir,
}

impl TlsRedis {
    pub fn start() -> TlsRedis {
        TlsRedis::start_with(false)
    }

    /// With `mutual`, the server also requires a client certificate the CA signed.
    pub fn start_with(mutual: bool) -> TlsRedis {
        let dir = TempDir::new("tls");
        let pki = certificates();
        fs::write(dir.file("ca.pem"), &pki.ca).unwrap();
        fs::write(dir.file("server.pem"), &pki.server.0).unwrap();
        fs::write(dir.file("server.key"), &pki.server.1).unwrap();
        let password = format!("pw-{:016x}", fastrand::u64(..));
        let port = free_port();
        // The ACL user reaches only the store's keys and channel ({fleet:}... and the
        // tests' own prefixes under {tls-...}) and no dangerous command.
        let conf = format!(
            "user default off\n\
             user tokenflight on >{password} ~{{fleet:}}* ~{{tls-* &{{fleet:}}* &{{tls-* +@all -@dangerous\n"
        );
        fs::write(dir.file("acl.conf"), conf).unwrap();
        let mut args = data_node_args(0, &dir);
        args.extend(
            [
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &dir.file("server.pem"),
                "--tls-key-file",
                &dir.file("server.key"),
                "--tls-ca-cert-file",
                &dir.file("ca.pem"),
                "--tls-auth-clients",
                if mutual { "yes" } else { "no" },
                "--aclfile",
                &dir.file("acl.conf"),
            ]
            .map(str::to_owned),
        );
        let proc = Proc::start(port, args);
        let server = TlsRedis {
            proc,
            ca_pem: pki.ca,
            client_pem: pki.client,
            mutual,
            user: "tokenflight",
            password,
            _dir: dir,
        };
        // Ready when a TLS connection as the ACL user answers PING.
        wait_until("the TLS server answers PING over TLS", || {
            server.sync_ping().is_ok()
        });
        server
    }

    pub fn url(&self) -> String {
        format!(
            "rediss://{}:{}@127.0.0.1:{}/",
            self.user, self.password, self.proc.port
        )
    }

    fn sync_ping(&self) -> redis::RedisResult<String> {
        // The store installs a provider when it is built; this probe may come first.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::build_with_tls(
            self.url(),
            redis::TlsCertificates {
                client_tls: self.mutual.then(|| redis::ClientTlsConfig {
                    client_cert: self.client_pem.0.clone().into_bytes(),
                    client_key: self.client_pem.1.clone().into_bytes(),
                }),
                root_cert: Some(self.ca_pem.clone().into_bytes()),
            },
        )?;
        let mut con = client.get_connection_with_timeout(Duration::from_millis(500))?;
        redis::cmd("PING").query(&mut con)
    }
}

/// Test certificates, PEM: a private CA, and what it signed.
pub struct Pki {
    pub ca: String,
    /// For 127.0.0.1: (certificate, key).
    pub server: (String, String),
    /// For a client (mutual TLS): (certificate, key).
    pub client: (String, String),
}

/// A fresh private CA, a server certificate for 127.0.0.1 and a client certificate.
pub fn certificates() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tokenflight test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, name: &str, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca_cert.pem(),
        server: leaf(
            vec!["127.0.0.1".to_owned()],
            "127.0.0.1",
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(
            Vec::new(),
            "tokenflight",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    }
}

/// Three primaries (no replicas) in one cluster, slots split by `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<Proc>,
    _dir: TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = TempDir::new("cluster");
        let nodes: Vec<Proc> = (0..3)
            .map(|i| {
                // The bus port defaults to port + 10000, which may be taken or past
                // 65535 for an ephemeral port: pick a free one too.
                let bus = free_port();
                let args = [
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &dir.file(&format!("nodes-{i}.conf")),
                    "--cluster-node-timeout",
                    "5000",
                ]
                .map(str::to_owned)
                .to_vec();
                start_plain(args, &dir, "a cluster node answers PING")
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.push("--cluster-yes");
        let out = cli(nodes[0].port, &args);
        assert!(out.contains("[OK] All 16384 slots covered"), "{out}");
        for node in &nodes {
            wait_until("every node sees the cluster as ok", || {
                cli(node.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        Cluster { nodes, _dir: dir }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }
}

/// A primary, two replicas and one sentinel (quorum 1). Failure detection after 2 s:
/// shorter, and a loaded machine makes the sentinel see healthy primaries as down (it
/// pings once a second) and fail over again and again.
pub struct SentinelSet {
    pub nodes: Vec<Proc>,
    pub sentinel: Proc,
    pub service: &'static str,
    _dir: TempDir,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        let dir = TempDir::new("sentinel");
        let primary = start_plain(Vec::new(), &dir, "the primary answers PING");
        let primary_port = primary.port;
        let mut nodes = vec![primary];
        for _ in 0..2 {
            let args = ["--replicaof", "127.0.0.1", &primary_port.to_string()]
                .map(str::to_owned)
                .to_vec();
            nodes.push(start_plain(args, &dir, "a replica answers PING"));
        }
        for node in &nodes[1..] {
            wait_until("a replica is in sync", || {
                cli(node.port, &["INFO", "replication"]).contains("master_link_status:up")
            });
        }
        let service = "tokenflight";
        // The sentinel rewrites its config file, so it gets its own.
        let conf_file = dir.file("sentinel.conf");
        let sentinel = start_on_free_port("the sentinel answers PING", |port| {
            let conf = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nlogfile {}\n\
                 sentinel monitor {service} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {service} 2000\n\
                 sentinel failover-timeout {service} 5000\n\
                 sentinel parallel-syncs {service} 2\n",
                dir.path().display(),
                dir.file("sentinel.log"),
            );
            fs::write(&conf_file, conf).unwrap();
            vec![conf_file.clone(), "--sentinel".to_owned()]
        });
        let port = sentinel.port;
        let set = SentinelSet {
            nodes,
            sentinel,
            service,
            _dir: dir,
        };
        wait_until("the sentinel sees the primary up", || {
            sentinel_flags(port, service).as_deref() == Some("master")
        });
        wait_until("the sentinel knows both replicas", || {
            cli(port, &["SENTINEL", "REPLICAS", service])
                .matches("slave")
                .count()
                >= 2
        });
        set
    }

    /// How many times the sentinel switched the primary so far (from its log).
    pub fn switches(&self) -> usize {
        fs::read_to_string(self._dir.file("sentinel.log"))
            .unwrap_or_default()
            .matches("+switch-master")
            .count()
    }

    pub fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.sentinel.port)
    }

    /// The port of the primary the sentinel names now.
    pub fn primary_port(&self) -> u16 {
        let out = cli(
            self.sentinel.port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service],
        );
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until every replica of the current primary has everything written so far
    /// (a probe write and `WAIT` on one connection: replication is one ordered stream).
    pub fn sync_replicas(&self, replicas: usize) {
        let port = self.primary_port();
        // One redis-cli connection for both: WAIT counts that connection's writes.
        let out = cli_batch(
            port,
            format!("SET {{fleet:}}probe 1\nWAIT {replicas} 5000\n"),
        );
        assert!(
            out.trim_end().ends_with(&replicas.to_string()),
            "replicas did not catch up: {out}"
        );
    }

    /// Kills the primary and waits until the sentinel names another one that accepts
    /// writes and has `replicas` replicas online; returns its port.
    pub fn fail_over(&mut self, replicas: usize) -> u16 {
        let old = self.primary_port();
        let node = self.nodes.iter_mut().find(|n| n.port == old).unwrap();
        node.kill();
        wait_until("the sentinel promotes a replica", || {
            let now = self.primary_port();
            now != 0 && now != old
        });
        let new = self.primary_port();
        wait_until(
            "the new primary is writable with its replicas online",
            || {
                let info = cli(new, &["INFO", "replication"]);
                info.contains("role:master") && info.matches("state=online").count() >= replicas
            },
        );
        new
    }
}

/// The sentinel's flags for the primary of `service` (`master` when all is well).
fn sentinel_flags(port: u16, service: &str) -> Option<String> {
    let master = cli(port, &["SENTINEL", "MASTER", service]);
    let mut lines = master.lines();
    while let Some(line) = lines.next() {
        if line == "flags" {
            return lines.next().map(str::to_owned);
        }
    }
    None
}

/// Several commands through one `redis-cli` connection (read from its stdin).
pub fn cli_batch(port: u16, commands: String) -> String {
    use std::io::Write;
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
