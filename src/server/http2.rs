//! HTTP/2 serving of the tonic routes on glommio sockets. Runs on every core: each core accepts
//! on the shared port (SO_REUSEPORT: the kernel spreads connections) and on its own port, and
//! every connection it accepts is served by tasks on that core only.
//!
//! tonic's tokio transport is not used on the data plane: hyper's HTTP/2 connection builder is
//! driven with an executor that spawns onto the current glommio executor, over glommio's
//! `TcpStream` adapted to tokio's IO traits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use glommio::net::TcpListener;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::gate::Gate;
use crate::auth::{certificate_names, Principals};
use crate::telemetry::metric;

/// HTTP/2 flow-control windows: large enough that one stream can carry a core's full rate.
const STREAM_WINDOW_BYTES: u32 = 1 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 4 << 20;

/// Spawns hyper's connection tasks on the current core.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalExecutor;

impl<F> hyper::rt::Executor<F> for LocalExecutor
where
    F: Future + 'static,
    F::Output: 'static,
{
    fn execute(&self, future: F) {
        glommio::spawn_local(future).detach();
    }
}

/// Binds `addr` on the current core.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| std::io::Error::other(e.to_string()))
}

/// What the listeners of a core serve, and how.
#[derive(Clone)]
pub struct Serving {
    /// The tonic routes.
    pub routes: tonic::service::Routes,
    /// Request messages over this are skipped and answered TOO_LARGE (see `server::limit`).
    pub message_bytes_max: usize,
    /// TLS, when on; each new connection takes the configuration in use (SIGHUP reloads it).
    pub tls: Option<Arc<crate::tls::Reloadable>>,
    /// `ingest.auth`'s principals, when callers are authenticated (see `server::gate`).
    pub principals: Option<Arc<Principals>>,
}

/// Accepts connections forever, serving `serving.routes` on each with HTTP/2 behind the gate
/// (`server::gate`). Dropping the returned future stops accepting.
///
/// The accept loop runs as a task of its own: glommio 0.9 keeps one more clone of the waker of
/// whichever task polls a pending `accept` on every poll, until a connection arrives. Polled
/// from a core's main task — woken by every mesh message — a quiet listener piled up clones
/// until the task's waker count overflowed (an `i16` in glommio) and the core panicked after
/// about 32,768 forwarded requests on one connection. Its own task is woken by the accept only.
pub async fn serve(listener: TcpListener, serving: Serving) {
    // Dropping the task cancels it.
    glommio::spawn_local(accept_forever(listener, serving)).await;
}

async fn accept_forever(listener: TcpListener, serving: Serving) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = serving
            .tls
            .as_ref()
            .map(|tls| futures_rustls::TlsAcceptor::from(tls.current()));
        let serving = serving.clone();
        // The handshake runs in the connection's task: a slow client holds up no other.
        glommio::spawn_local(async move {
            let gate = |certificate| {
                TowerToHyperService::new(Gate::new(
                    serving.routes,
                    serving.message_bytes_max,
                    serving.principals.clone(),
                    certificate,
                ))
            };
            let Some(acceptor) = acceptor else {
                return serve_connection(TokioIo::new(stream.compat()), gate(None)).await;
            };
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            match glommio::timer::timeout(HANDSHAKE_TIMEOUT, async {
                acceptor.accept(stream).await.map_err(glommio::GlommioError::from)
            })
            .await
            {
                Ok(stream) => {
                    let certificate = serving.principals.as_deref().and_then(|principals| {
                        let der = stream.get_ref().1.peer_certificates()?.first()?;
                        principals.by_certificate(&certificate_names(der))
                    });
                    serve_connection(TokioIo::new(stream.compat()), gate(certificate)).await
                }
                Err(error) => {
                    metrics::counter!(metric::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                }
            }
        })
        .detach();
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_connection<I, S>(io: I, service: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<tonic::body::Body>>
        + 'static,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let result = hyper::server::conn::http2::Builder::new(LocalExecutor)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .serve_connection(io, service)
        .await;
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener with no connection coming, served from a task that is woken 100,000 times
    /// for other reasons (as a core's main task is by mesh messages), keeps accepting: a
    /// connection made afterwards is accepted and answered.
    #[test]
    fn a_quiet_listener_survives_its_task_being_woken_often() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let listener = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
                let addr = listener.local_addr().expect("address");
                let routes = tonic::service::Routes::default();
                let serving = serve(
                    listener,
                    Serving {
                        routes,
                        message_bytes_max: 1 << 20,
                        tls: None,
                        principals: None,
                    },
                );
                futures::pin_mut!(serving);
                let wakes = async {
                    for _ in 0..100_000 {
                        // Wake this task and yield once.
                        let mut yielded = false;
                        futures::future::poll_fn(|cx| {
                            if std::mem::replace(&mut yielded, true) {
                                std::task::Poll::Ready(())
                            } else {
                                cx.waker().wake_by_ref();
                                std::task::Poll::Pending
                            }
                        })
                        .await;
                    }
                    // Then a connection: HTTP/2's preface is answered with the server's SETTINGS.
                    let mut client = glommio::net::TcpStream::connect(addr).await.expect("connect");
                    use futures::{AsyncReadExt, AsyncWriteExt};
                    client
                        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                        .await
                        .expect("preface");
                    let mut frame = [0u8; 9];
                    client.read_exact(&mut frame).await.expect("the server's first frame");
                    assert_eq!(frame[3], 4, "a SETTINGS frame");
                };
                futures::pin_mut!(wakes);
                match futures::future::select(serving, wakes).await {
                    futures::future::Either::Left(_) => panic!("the accept loop ended"),
                    futures::future::Either::Right(_) => {}
                }
            })
            .expect("executor")
            .join()
            .expect("the executor ran to the end");
    }
}
