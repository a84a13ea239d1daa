//! Metrics (:15020 /metrics) and readiness (:15021 /healthz/ready) over HTTP/1.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::{accept, ProxyError, Shared, METRICS, READINESS};

/// Serves /metrics until `stop`; fails if the listener does.
pub(crate) async fn serve_metrics(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), ProxyError> {
    let creds = shared.credentials.clone();
    let mut registry = shared.metrics.registry(Arc::new(move || creds.expiries()));
    shared
        .flows
        .metrics()
        .register(registry.sub_registry_with_prefix("zmesh"));
    let handler: Handler = Arc::new(move |req: &Request<Incoming>| metrics_page(req, &registry));
    let name = (METRICS, shared.addrs.metrics);
    serve_one(listener, name, stop, handler).await
}

/// Serves /healthz/ready until `stop`; fails if the listener does.
pub(crate) async fn serve_readiness(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), ProxyError> {
    let name = (READINESS, shared.addrs.readiness);
    let handler: Handler = Arc::new(move |req: &Request<Incoming>| ready_page(req, &shared));
    serve_one(listener, name, stop, handler).await
}

type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

async fn serve_one(
    listener: TcpListener,
    name: (&'static str, SocketAddr),
    stop: CancellationToken,
    handler: Handler,
) -> Result<(), ProxyError> {
    while let Some((stream, _)) = accept(&listener, name, &stop).await? {
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = handler(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

fn metrics_page(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    let mut resp = text(StatusCode::OK, crate::metrics::encode(registry));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    resp
}

fn ready_page(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET || req.uri().path() != "/healthz/ready" {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if let Some(why) = shared.failure.get() {
        return text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    }
    if shared.ready.load(Ordering::Acquire) {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
    }
}
