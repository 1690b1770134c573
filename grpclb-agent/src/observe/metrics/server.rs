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
use crate::observe::status::{parse_status_query, Report, ServiceName, UnknownService};

/// Asks the data plane owner for what a request shows.
pub type Reader<T> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<T>> + Send>> + Send + Sync>;
/// The maps for a scrape; on an error the counters are still served.
pub type GaugeReader = Reader<TableGauges>;
/// What `/status` serves: the report on every Service, or on the one
/// asked about.
pub type StatusReader = Arc<
    dyn Fn(Option<ServiceName>) -> Pin<Box<dyn Future<Output = Result<StatusPage>> + Send>>
        + Send
        + Sync,
>;

/// The report `grpclb-agent status` shows, or why there is none for the
/// Service asked about, and the pin directory of the maps it shows (in the
/// `x-grpclb-bpffs` header: `status` shows an agent's answer only for the
/// maps it was asked about).
pub struct StatusPage {
    pub bpffs: String,
    pub report: std::result::Result<Report, UnknownService>,
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
        "/status" => {
            let service = match parse_status_query(request.uri().query()) {
                Ok(service) => service,
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            match status(service).await {
                Ok(page) => status_response(page),
                Err(e) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading the maps failed: {e:#}\n"),
                ),
            }
        }
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

/// The report as JSON, or 404 and why the Service is unknown.
fn status_response(page: StatusPage) -> Response<Full<Bytes>> {
    let mut response = match page.report.map(|r| serde_json::to_string(&r)) {
        Ok(Ok(json)) => {
            let mut response = text(StatusCode::OK, json);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the report: {e}\n"),
        ),
        Err(unknown) => text(StatusCode::NOT_FOUND, format!("{unknown}\n")),
    };
    if let Ok(value) = hyper::header::HeaderValue::from_str(&page.bpffs) {
        response.headers_mut().insert(BPFFS_HEADER, value);
    }
    response
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
        let report = status::Report {
            schema_version: status::SCHEMA_VERSION,
            agent: status::AgentReport {
                state: status::AgentCondition::Ready,
                pid: Some(1),
                reason: None,
            },
            services: Vec::new(),
            frontends: None,
            draining: status::Draining::default(),
            not_balanced: Vec::new(),
            selection_unknown: None,
            waiting_moves: Vec::new(),
        };
        let served = report.clone();
        let status: StatusReader = Arc::new(move |service| {
            let report = match service {
                None => Ok(served.clone()),
                Some(s) => Err(status::UnknownService(format!("no balanced Service {s}"))),
            };
            Box::pin(async move {
                Ok(StatusPage {
                    bpffs: "/sys/fs/bpf/grpclb".into(),
                    report,
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
        let page = tokio::task::spawn_blocking(move || status::fetch_status(addr, None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page.bpffs, "/sys/fs/bpf/grpclb");
        assert_eq!(page.report, Ok(report));
        let page = tokio::task::spawn_blocking(move || {
            status::fetch_status(addr, Some(&"apps/nope".parse().unwrap()))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            page.report,
            Err(status::UnknownService(
                "no balanced Service apps/nope".into()
            ))
        );
        let (code, body) = get(addr, "/status?services=apps/echo").await;
        assert_eq!(code, 400);
        assert!(body.contains("takes service=NS/NAME"), "{body}");
        let mut state = DesiredState::default();
        state.not_balanced.insert(
            "apps/sticky".into(),
            "sessionAffinity: ClientIP: left to kube-proxy".into(),
        );
        metrics.follow_states(tokio::sync::watch::channel(Some(state.clone())).1);
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
