//! A relay to the bed's API server that reads the requests it carries, to hold back one
//! kind of answer: it ends TLS with a CA of its own (named in the kubeconfig it writes)
//! and goes on to the API server as the bed's admin. The answers on a connection that
//! asked for a request `delayed` picks reach the client that much later, in order; all
//! else passes at once. So one watch can lag behind the others, as under a loaded API
//! server, on purpose and every time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::Env;

pub struct DelayingRelay {
    /// A kubeconfig that reaches the API server through the relay.
    pub kubeconfig: PathBuf,
    /// Breaks the watches [`DelayingRelay::with_gap`] names.
    pub gap: Arc<Gap>,
}

/// A watch gap as a long disconnection makes one: while it is open, what the API server
/// sends on the watches it breaks is dropped; [`Gap::close`] then ends those watches, and
/// the first of each made again is answered "410 Gone", as the API server answers a watch
/// from a resourceVersion compacted meanwhile, so the client lists again. The relay
/// answers it itself: the bed's etcd is rarely compacted yet, and the API server serves
/// a watch of Secrets from an old resourceVersion out of etcd's history.
#[derive(Default)]
pub struct Gap {
    watches: std::sync::OnceLock<fn(&str) -> bool>,
    open: AtomicBool,
    /// The paths (`/api/v1/namespaces/x/secrets`) of the watches ended at the close whose
    /// next watch has not yet been made again: each of those gets its "410 Gone".
    expired: std::sync::Mutex<Vec<String>>,
    /// What ends each connection that carries a watch it breaks (made before it closes),
    /// with that watch's path.
    cuts: std::sync::Mutex<Vec<(String, Arc<tokio::sync::Notify>)>>,
}

/// The path of a request line, without its query.
fn path_of(line: &str) -> String {
    let target = line.split_whitespace().nth(1).unwrap_or_default();
    target.split('?').next().unwrap_or_default().to_string()
}

impl Gap {
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    pub fn close(&self) {
        let mut expired = self.expired.lock().unwrap();
        self.open.store(false, Ordering::SeqCst);
        for (path, cut) in self.cuts.lock().unwrap().drain(..) {
            if !expired.contains(&path) {
                expired.push(path);
            }
            cut.notify_one();
        }
    }

    fn breaks(&self, line: &str) -> bool {
        self.watches.get().is_some_and(|watches| watches(line))
    }

    /// Whether the request that `bytes` start is the first watch of a path this gap ended
    /// made after it closed, which is answered "410 Gone" (see [`GONE`]).
    fn expires(&self, bytes: &[u8]) -> bool {
        let text = String::from_utf8_lossy(bytes);
        let first = text.lines().next().unwrap_or_default();
        if !self.breaks(first) {
            return false;
        }
        let mut expired = self.expired.lock().unwrap();
        let path = path_of(first);
        let Some(at) = expired.iter().position(|p| *p == path) else {
            return false;
        };
        expired.remove(at);
        true
    }
}

/// The API server's answer to a watch from a compacted resourceVersion: an ERROR event
/// with status 410 ("Expired"), after which the watch ends.
const GONE: &str = r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (2)","reason":"Expired","code":410}}"#;

fn gone_response() -> Vec<u8> {
    let event = format!("{GONE}\n");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n0\r\n\r\n",
        event.len()
    )
    .into_bytes()
}

impl DelayingRelay {
    /// As [`DelayingRelay::start`], and the watches whose request line `watches` picks
    /// can be broken by the relay's [`Gap`].
    pub async fn with_gap(
        env: &Env,
        delay: Duration,
        delayed: fn(&str) -> bool,
        watches: fn(&str) -> bool,
    ) -> DelayingRelay {
        let relay = DelayingRelay::start(env, delay, delayed).await;
        relay.gap.watches.set(watches).unwrap();
        relay
    }

    /// Answers to requests whose request line (`GET /api/v1/...?watch=true HTTP/1.1`)
    /// `delayed` picks, and all that follow on their connection, come `delay` late.
    pub async fn start(env: &Env, delay: Duration, delayed: fn(&str) -> bool) -> DelayingRelay {
        let text = std::fs::read_to_string(env.bed.kubeconfig_path()).unwrap();
        let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let data = |v: &serde_yaml::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("kubeconfig data"))
                .unwrap()
        };
        let cluster = config["clusters"][0]["cluster"].clone();
        let user = config["users"][0]["user"].clone();
        let upstream = cluster["server"]
            .as_str()
            .unwrap()
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&data(&cluster["certificate-authority-data"])) {
            roots.add(cert.unwrap()).unwrap();
        }
        let client_certs: Vec<_> =
            CertificateDer::pem_slice_iter(&data(&user["client-certificate-data"]))
                .map(Result::unwrap)
                .collect();
        let client_key = PrivateKeyDer::from_pem_slice(&data(&user["client-key-data"])).unwrap();
        let to_upstream = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(client_certs, client_key)
                .unwrap(),
        );

        let ca = mailroom_testbed::Ca::new("mailroom test API relay CA").unwrap();
        let pair = ca.server("127.0.0.1", &["127.0.0.1"]).unwrap();
        let mut serving = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        // HTTP/1.1, whose request lines can be read as they pass.
        serving.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(serving));
        let connector = tokio_rustls::TlsConnector::from(to_upstream);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let gap = Arc::new(Gap::default());
        let broken = gap.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, connector, upstream, gap) = (
                    acceptor.clone(),
                    connector.clone(),
                    upstream.clone(),
                    broken.clone(),
                );
                tokio::spawn(async move {
                    let Ok(client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(tcp) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let name = ServerName::try_from("127.0.0.1").unwrap();
                    let Ok(server) = connector.connect(name, tcp).await else {
                        return;
                    };
                    relay(client, server, delay, delayed, gap).await;
                });
            }
        });

        config["clusters"][0]["cluster"]["server"] = format!("https://127.0.0.1:{port}").into();
        config["clusters"][0]["cluster"]["certificate-authority-data"] =
            base64::engine::general_purpose::STANDARD
                .encode(ca.cert_pem())
                .into();
        let kubeconfig = env.dir.path().join(format!("relay-{port}.kubeconfig"));
        std::fs::write(&kubeconfig, serde_yaml::to_string(&config).unwrap()).unwrap();
        DelayingRelay { kubeconfig, gap }
    }
}

async fn relay<C, S>(
    client: C,
    server: S,
    delay: Duration,
    delayed: fn(&str) -> bool,
    gap: Arc<Gap>,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    let held = Arc::new(AtomicBool::new(false));
    let hold = held.clone();
    // Whether this connection carries a watch the gap breaks.
    let breakable = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(tokio::sync::Notify::new());
    let (is_breakable, requests_gap, this_cut) = (breakable.clone(), gap.clone(), cut.clone());
    // Answers go through a queue, each due when it came plus the delay once the
    // connection is held, so that they keep their order.
    let (queue, mut due) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    // Weak: the answers' end (a cut) must close the queue, and so the connection.
    let injected = queue.downgrade();
    let requests = async move {
        let mut requests = Requests::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let lines = requests.feed(&buf[..n]);
            if lines.iter().any(|line| delayed(line)) {
                hold.store(true, Ordering::SeqCst);
            }
            if let Some(line) = lines.iter().find(|line| requests_gap.breaks(line))
                && !is_breakable.swap(true, Ordering::SeqCst)
            {
                let cut = (path_of(line), this_cut.clone());
                requests_gap.cuts.lock().unwrap().push(cut);
            }
            if requests_gap.expires(&buf[..n]) {
                // Answered here, not sent on: the API server never sees it.
                if let Some(queue) = injected.upgrade() {
                    let _ = queue.send((tokio::time::Instant::now(), gone_response()));
                }
                continue;
            }
            if server_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_tx.shutdown().await;
    };
    let answers = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = tokio::select! {
                read = server_rx.read(&mut buf) => read,
                () = cut.notified() => break,
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if breakable.load(Ordering::SeqCst) && gap.open.load(Ordering::SeqCst) {
                continue;
            }
            let at = tokio::time::Instant::now()
                + if held.load(Ordering::SeqCst) {
                    delay
                } else {
                    Duration::ZERO
                };
            if queue.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let deliver = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if client_tx.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = client_tx.shutdown().await;
    };
    tokio::join!(requests, answers, deliver);
}

/// Request lines out of an HTTP/1.1 byte stream, bodies skipped by their Content-Length.
#[derive(Default)]
struct Requests {
    head: Vec<u8>,
    body_left: usize,
    /// A body of unknown length (chunked): nothing more can be read from this stream.
    lost: bool,
}

impl Requests {
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        while !bytes.is_empty() && !self.lost {
            if self.body_left > 0 {
                let skip = self.body_left.min(bytes.len());
                self.body_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            self.head.push(bytes[0]);
            bytes = &bytes[1..];
            if !self.head.ends_with(b"\r\n\r\n") {
                continue;
            }
            let head = String::from_utf8_lossy(&self.head).into_owned();
            self.head.clear();
            lines.push(head.lines().next().unwrap_or_default().to_string());
            for header in head.lines().skip(1) {
                let Some((name, value)) = header.split_once(':') else {
                    continue;
                };
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => self.body_left = value.trim().parse().unwrap_or(0),
                    "transfer-encoding" => self.lost = true,
                    _ => {}
                }
            }
        }
        lines
    }
}
