//! The admin port: `/metrics` (Prometheus text), `/live` and `/ready` (probes), over HTTP/1.1
//! on the island — HTTPS when `[admin]` has a certificate, and a bearer token asked on every
//! path but the probes when it has `token_sha256`. Tasks on the island only; a connection
//! holds one task, a request is answered from memory (the recorder's render, a flag).
//!
//! Paths and answers:
//! - `/live`: 200 `live` while the process runs;
//! - `/ready`: 200 `ready` once every source, core and listener is up (`shardgate serving`),
//!   503 `not ready` before that and from the stop signal on;
//! - `/metrics`: 200 Prometheus text; 401 without the token when one is configured;
//! - `/v1/cores`: 200 JSON, the totals per core, route and job (`snapshot::Snapshot`) from the
//!   same render as `/metrics` (one render per request: `shardgate top` asks once a second);
//!   401 without the token when one is configured;
//! - anything else: 404 (401 first when a token is configured and missing).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::tls::Reloadable;

/// Set once the gateway serves, cleared from the stop signal on: what `/ready` answers.
static READY: AtomicBool = AtomicBool::new(false);

/// Marks the gateway ready (or, from the stop signal on, not): `/ready`, the `shardgate_ready`
/// gauge and the service manager (`READY=1` / `STOPPING=1`) all say the same.
pub fn set_ready(ready: bool) {
    READY.store(ready, Ordering::Relaxed);
    metrics::gauge!(super::metric::READY).set(if ready { 1.0 } else { 0.0 });
    super::notify_service_manager(ready);
}

/// How long a client may take over its TLS handshake or to send its request head.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often histograms' summaries are drained into their snapshot.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What every connection of the admin port shares.
struct Admin {
    metrics: PrometheusHandle,
    token_sha256: Option<[u8; 32]>,
}

/// Installs the metrics recorder and serves the admin port on `listen`. Binds now (an address
/// in use is the caller's error); serves on the island runtime `island`.
pub fn start(
    island: &tokio::runtime::Handle,
    listen: SocketAddr,
    tls: Option<Arc<Reloadable>>,
    token_sha256: Option<[u8; 32]>,
) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    super::describe_metrics();
    let upkeep = metrics.clone();
    let _entered = island.enter();
    let listener = tokio::net::TcpListener::from_std(listener)?;
    island.spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let admin = Arc::new(Admin { metrics, token_sha256 });
    island.spawn(accept_forever(listener, tls, admin));
    Ok(())
}

async fn accept_forever(listener: tokio::net::TcpListener, tls: Option<Arc<Reloadable>>, admin: Arc<Admin>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        // New connections take the certificate in use now (SIGHUP may have replaced it).
        let acceptor = tls.as_ref().map(|tls| futures_rustls::TlsAcceptor::from(tls.current()));
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                return serve_connection(TokioIo::new(stream), admin).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream.compat())).await {
                Ok(Ok(stream)) => serve_connection(TokioIo::new(stream.compat()), admin).await,
                Ok(Err(error)) => {
                    metrics::counter!(super::metric::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::debug!(%peer, %error, "admin port: TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!(super::metric::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::debug!(%peer, "admin port: TLS handshake timed out");
                }
            }
        });
    }
}

async fn serve_connection<I>(io: I, admin: Arc<Admin>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let admin = Arc::clone(&admin);
        async move { Ok::<_, Infallible>(answer(&admin, &request)) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(io, service)
        .await;
    if let Err(error) = result {
        tracing::debug!(%error, "admin port: connection ended with an error");
    }
}

/// The answer to one request (see the module's list).
fn answer<B>(admin: &Admin, request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    match path {
        "/live" => return text(StatusCode::OK, "live\n"),
        "/ready" if READY.load(Ordering::Relaxed) => return text(StatusCode::OK, "ready\n"),
        "/ready" => return text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => {}
    }
    if let Some(expected) = &admin.token_sha256 {
        if !bearer_matches(request, expected) {
            let mut refused = text(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (`Authorization: Bearer <token>`, the token whose SHA-256 is `admin.token_sha256`)\n",
            );
            refused.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"shardgate admin\""),
            );
            return refused;
        }
    }
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(admin.metrics.render())));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/v1/cores" => {
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |t| t.as_secs_f64());
            let samples = super::snapshot::parse_prometheus_text(&admin.metrics.render());
            let snapshot = super::snapshot::Snapshot::of(&samples, at, READY.load(Ordering::Relaxed));
            let body = serde_json::to_vec(&snapshot).unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: the admin port serves /metrics, /v1/cores, /live and /ready\n",
        ),
    }
}

/// Whether the request's `Authorization: Bearer` token hashes to `expected` (compared in
/// constant time).
fn bearer_matches<B>(request: &Request<B>, expected: &[u8; 32]) -> bool {
    let Some(value) = request.headers().get(hyper::header::AUTHORIZATION) else {
        return false;
    };
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    bool::from(crate::auth::token_sha256(token.trim()).ct_eq(expected))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(token: Option<&str>) -> Admin {
        Admin {
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            token_sha256: token.map(crate::auth::token_sha256),
        }
    }

    fn get(path: &str, authorization: Option<&str>) -> Request<()> {
        let mut request = Request::get(path);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request.body(()).expect("request")
    }

    /// The probes answer without a token; `/metrics` and unknown paths ask for it when one is
    /// configured and take only the right one.
    #[test]
    fn the_token_guards_everything_but_the_probes() {
        let guarded = admin(Some("s3cret"));
        assert_eq!(answer(&guarded, &get("/live", None)).status(), StatusCode::OK);
        assert!(matches!(
            answer(&guarded, &get("/ready", None)).status(),
            StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE
        ));
        for refused in [None, Some("Bearer wrong"), Some("s3cret"), Some("Basic s3cret")] {
            let response = answer(&guarded, &get("/metrics", refused));
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{refused:?}");
            assert!(response.headers().contains_key("www-authenticate"));
        }
        assert_eq!(
            answer(&guarded, &get("/metrics", Some("Bearer s3cret"))).status(),
            StatusCode::OK
        );
        assert_eq!(
            answer(&guarded, &get("/other", None)).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            answer(&guarded, &get("/other", Some("Bearer s3cret"))).status(),
            StatusCode::NOT_FOUND
        );
        let open = admin(None);
        assert_eq!(answer(&open, &get("/metrics", None)).status(), StatusCode::OK);
    }
}
