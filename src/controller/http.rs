//! The controller's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process
//! runs) and `/readyz` (a standby is ready; a leader once its caches have synced).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// What `/readyz` answers; 0 is starting (not ready).
#[derive(Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    const STANDBY: u8 = 1;
    const SYNCING: u8 = 2;
    const READY: u8 = 3;

    pub fn standby(&self) {
        self.0.store(Self::STANDBY, Ordering::Relaxed);
    }
    pub fn syncing(&self) {
        self.0.store(Self::SYNCING, Ordering::Relaxed);
    }
    pub fn synced(&self) {
        self.0.store(Self::READY, Ordering::Relaxed);
    }
    fn answer(&self) -> (StatusCode, &'static str) {
        match self.0.load(Ordering::Relaxed) {
            Self::STANDBY => (StatusCode::OK, "ok: standby, waiting for the lease\n"),
            Self::READY => (StatusCode::OK, "ok\n"),
            Self::SYNCING => (StatusCode::SERVICE_UNAVAILABLE, "caches are syncing\n"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        }
    }
}

/// Where the endpoints listen: `:PORT` is every address of the pod, IPv6 and IPv4 (a
/// cluster may probe and scrape either family), or IPv4 alone where the kernel has no
/// IPv6; `HOST:PORT` is that address only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Every(u16),
    At(SocketAddr),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Every(port) => write!(f, ":{port}"),
            ListenAddr::At(addr) => write!(f, "{addr}"),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix(':') {
            Some(port) => port.parse().map(ListenAddr::Every).map_err(|e| {
                format!("{s:?}: the port after ':' must be a number from 0 to 65535 ({e})")
            }),
            None => s.parse().map(ListenAddr::At).map_err(|e| {
                format!("{s:?}: give :PORT (every address) or HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 ({e})")
            }),
        }
    }
}

/// Binds every address for `port`: one IPv6 socket that takes IPv4 too (not left to the
/// node's `bindv6only`), or IPv4 alone when IPv6 is switched off.
fn bind_every(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    };
    match dual() {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e),
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 here: listening on IPv4 only");
            let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port))?;
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        }
    }
}

/// Binds `addr` and serves until the task is dropped. Returns the bound address (port 0
/// picks a free one).
pub async fn serve(
    addr: ListenAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = match addr {
        ListenAddr::Every(port) => bind_every(port)?,
        ListenAddr::At(addr) => TcpListener::bind(addr).await?,
    };
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, readiness) = (metrics.clone(), readiness.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (metrics, readiness) = (metrics.clone(), readiness.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(route(
                            req.uri().path(),
                            &metrics,
                            &readiness,
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((bound, task))
}

fn route(path: &str, metrics: &Metrics, readiness: &Readiness) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            let (status, text) = readiness.answer();
            (status, "text/plain", text.to_string())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(":8080".parse(), Ok(ListenAddr::Every(8080)));
        assert_eq!(
            "127.0.0.1:9".parse(),
            Ok(ListenAddr::At("127.0.0.1:9".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:9".parse(),
            Ok(ListenAddr::At("[::1]:9".parse().unwrap()))
        );
        for bad in [":http", ":70000", "localhost:80", "8080"] {
            let e = bad.parse::<ListenAddr>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    async fn healthz(addr: SocketAddr) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// `:PORT` answers on IPv6 and on IPv4, as a kubelet's probe or Prometheus may use
    /// either (this machine has both on loopback).
    #[tokio::test]
    async fn every_address_answers_over_ipv6_and_ipv4() {
        let (bound, _task) = serve(
            ListenAddr::Every(0),
            Arc::new(Metrics::new(false)),
            Arc::default(),
        )
        .await
        .unwrap();
        // A host without IPv6 (some containers) gets IPv4 alone, which must still answer.
        let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let hosts: &[&str] = if ipv6 {
            &["::1", "127.0.0.1"]
        } else {
            &["127.0.0.1"]
        };
        for host in hosts {
            let addr = SocketAddr::new(host.parse().unwrap(), bound.port());
            let answer = healthz(addr).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
        }
    }
}
