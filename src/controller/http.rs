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

/// Binds `addr` and serves until the task is dropped. Returns the bound address (port 0
/// picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
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
