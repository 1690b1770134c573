//! The HTTP server on `--metrics-addr`: `/metrics`, `/healthz`, `/readyz`,
//! `/status` and `/selection` (for `grpclb-agent status`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tokio::net::TcpListener;

use super::{render, Metrics, MetricsDetail, TableGauges};

/// Asks the data plane owner for what a request shows.
pub type Reader<T> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<T>> + Send>> + Send + Sync>;
/// The maps for a scrape; on an error the counters are still served.
pub type GaugeReader = Reader<TableGauges>;
/// What `/status` serves.
pub type StatusReader = Reader<StatusPage>;

/// The text `grpclb-agent status` prints, and the pin directory of the
/// maps it shows (in the `x-grpclb-bpffs` header: `status` shows an
/// agent's answer only for the maps it was asked about).
pub struct StatusPage {
    pub bpffs: String,
    pub text: String,
}

/// The header naming the pin directory of `/status`.
pub const BPFFS_HEADER: &str = "x-grpclb-bpffs";

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr}"))
}

/// Serves `/metrics` (with the series `detail` allows), `/healthz`,
/// `/readyz`, `/status` and `/selection` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    (gauges, status): (GaugeReader, StatusReader),
    detail: MetricsDetail,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let readers = (gauges.clone(), status.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                let readers = readers.clone();
                async move { Ok::<_, Infallible>(respond(request, &metrics, &readers, detail).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection from {peer}: {e}");
            }
        });
    }
}

async fn respond(
    request: Request<Incoming>,
    metrics: &Metrics,
    (gauges, status): &(GaugeReader, StatusReader),
    detail: MetricsDetail,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let tables = match gauges().await {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("metrics: reading the maps failed: {e:#}");
                    None
                }
            };
            let mut response = text(StatusCode::OK, render(metrics, tables, detail));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(CONTENT_TYPE),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/status" => match status().await {
            Ok(page) => {
                let mut response = text(StatusCode::OK, page.text);
                if let Ok(value) = hyper::header::HeaderValue::from_str(&page.bpffs) {
                    response.headers_mut().insert(BPFFS_HEADER, value);
                }
                response
            }
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reading the maps failed: {e:#}\n"),
            ),
        },
        "/selection" => text(StatusCode::OK, metrics.selection().to_text()),
        "/readyz" => match metrics.readiness() {
            r if r.ready => text(StatusCode::OK, "ready\n".into()),
            r => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", r.reason),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz, /readyz, /status or /selection\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::gauges::tests::{gauges_of, tables_with};
    use crate::observe::readiness::Readiness;
    use crate::observe::status;
    use crate::state::model::DesiredState;

    #[tokio::test]
    async fn server_answers_metrics_health_readiness_and_selection() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let gauges: GaugeReader =
            Arc::new(|| Box::pin(async { Ok(gauges_of(&tables_with(&[&[1, 2]]))) }));
        let status: StatusReader = Arc::new(|| {
            Box::pin(async {
                Ok(StatusPage {
                    bpffs: "/sys/fs/bpf/grpclb".into(),
                    text: "agent: ready (pid 1)\n".into(),
                })
            })
        });
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            (gauges, status),
            MetricsDetail::Service,
        ));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: starting\n".into())
        );
        metrics.set_readiness(Readiness::ready());
        assert_eq!(get(addr, "/readyz").await.0, 200);
        metrics.set_readiness(Readiness::not_ready("FRONTENDS is full"));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: FRONTENDS is full\n".into())
        );
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("grpclb_frontend_backends{frontend=\"apps/echo:grpc\",address=\"10.96.0.1:50051\"} 2"),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);
        let page = tokio::task::spawn_blocking(move || status::fetch_status(addr))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page.bpffs, "/sys/fs/bpf/grpclb");
        assert_eq!(page.text, "agent: ready (pid 1)\n");
        let mut state = DesiredState::default();
        state.not_balanced.insert(
            "apps/sticky".into(),
            "sessionAffinity: ClientIP: left to kube-proxy".into(),
        );
        metrics.record_selection(&state);
        let fetched = tokio::task::spawn_blocking(move || status::fetch_selection(addr))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fetched, status::Selection::of(&state));
        let (_, body) = get(addr, "/metrics").await;
        assert!(
            body.contains("grpclb_service_not_balanced{service=\"apps/sticky\",reason=\"sessionAffinity: ClientIP: left to kube-proxy\"} 1"),
            "{body}"
        );
        server.abort();
    }

    /// A minimal HTTP/1.0 client: status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }
}
