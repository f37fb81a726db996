//! The LAN listener: accepts TCP connections (bounded in number), optionally terminates TLS
//! (reloadable, with client certificates for mTLS), and serves HTTP/1.1 and HTTP/2 through
//! hyper with bounded request heads, a header read timeout, an idle timeout and a graceful
//! shutdown. The verified client certificate's names reach handlers as a [`Peer`] extension.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::config::{HttpConfig, TlsFiles};
use crate::locks::RwLockExt;
use crate::telemetry::Metrics;

/// A TLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a request's connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Names from the verified client certificate (mTLS); empty otherwise.
    pub cert_names: Arc<Vec<String>>,
}

/// The listener's TLS configuration, swapped on reload; connections keep the one they began with.
pub struct TlsHandle {
    acceptor: RwLock<tokio_rustls::TlsAcceptor>,
}

impl TlsHandle {
    pub fn new(files: &TlsFiles) -> Result<TlsHandle, crate::tls::TlsError> {
        let config = crate::tls::server_config(files)?;
        Ok(TlsHandle { acceptor: RwLock::new(tokio_rustls::TlsAcceptor::from(Arc::new(config))) })
    }

    /// Reads the certificate, key and client CA again; on error the current ones stay.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), crate::tls::TlsError> {
        let config = crate::tls::server_config(files)?;
        *self.acceptor.write_locked() = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok(())
    }

    fn current(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.read_locked().clone()
    }
}

/// Connection limits, fixed when the listener starts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// HTTP/2 streams (requests) in flight on one connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 connections served by the `h2` crate directly ([`super::h2conn`]) rather than
    /// through hyper (the gRPC listener: no `Date` header, whose changing value would be
    /// header-compression work on every call); other connections still go through hyper.
    pub direct_h2: bool,
}

impl From<&HttpConfig> for Limits {
    fn from(h: &HttpConfig) -> Limits {
        Limits {
            max_connections: h.max_connections,
            max_header_bytes: h.max_header_bytes,
            header_read_timeout: h.header_read_timeout,
            idle_timeout: h.idle_timeout,
            max_concurrent_streams: 256,
            direct_h2: false,
        }
    }
}

/// What a listener serves: axum's router on the HTTP listener, the gRPC service table
/// ([`crate::grpc::Services`]) on the gRPC one; any `tower` service that always answers.
pub trait App: Clone + Send + Sync + 'static {
    type Answer: std::future::Future<Output = Result<axum::response::Response, std::convert::Infallible>>
        + Send
        + 'static;
    /// The answer to one request.
    fn answer(self, request: axum::extract::Request) -> Self::Answer;
}

impl<T> App for T
where
    T: tower::Service<axum::extract::Request, Response = axum::response::Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    T::Future: Send + 'static,
{
    type Answer = tower::util::Oneshot<T, axum::extract::Request>;

    fn answer(self, request: axum::extract::Request) -> Self::Answer {
        self.oneshot(request)
    }
}

/// Serves `app` on `listener` until `cancel`, then lets open connections finish their requests
/// for up to `grace`.
pub async fn serve<A: App>(
    listener: TcpListener,
    app: A,
    tls: Option<Arc<TlsHandle>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = cancel.cancelled() => break,
                    }
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.record_connection_refused();
            tracing::debug!(peer = %addr, max = limits.max_connections, "connection refused: too many open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = tls.as_ref().map(|t| t.current());
        let watcher = graceful.watcher();
        let app = app.clone();
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        metrics.connections_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let _slot = slot;
            let _open = OpenConnection(metrics.clone());
            serve_connection(stream, addr, acceptor, app, limits, metrics, Shutdown { watcher, cancel }).await;
        });
    }
    drop(listener);
    // hyper's connections end through `graceful`; the ones served by h2 directly hold their
    // connection slot until they end: all slots free means every connection has ended.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let ended = async {
        graceful.shutdown().await;
        let _ = slots.acquire_many(all).await;
    };
    if tokio::time::timeout(grace, ended).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

/// Counts a connection in `outpost_http_connections_open` until its task ends (also when the
/// task is dropped at shutdown).
struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn serve_connection<A: App>(
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: A,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let Shutdown { watcher, cancel } = shutdown;
    let (io, cert_names): (Box<dyn Io>, Vec<String>) = match acceptor {
        None => (Box::new(stream), Vec::new()),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            match until_shutdown(&cancel, handshake).await {
                None => return closed_at_shutdown(addr),
                Some(Ok(Ok(s))) => {
                    let names = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| crate::tls::certificate_names(c))
                        .unwrap_or_default();
                    (Box::new(s), names)
                }
                Some(Ok(Err(e))) => {
                    metrics.record_tls_failure();
                    tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
                    return;
                }
                Some(Err(_)) => {
                    metrics.record_tls_failure();
                    tracing::info!(peer = %addr, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let activity = Arc::new(Activity::new());
    let mut io = ActivityIo { inner: io, activity: activity.clone() };
    let peer = Peer { addr, cert_names: Arc::new(cert_names) };
    // On the gRPC listener, a connection that opens with the HTTP/2 preface is served by h2
    // directly; anything else (an HTTP/1.1 probe) by hyper, its first bytes read again.
    if !limits.direct_h2 {
        return serve_hyper(io, peer, app, limits, activity, watcher).await;
    }
    let sniffed = until_shutdown(&cancel, super::h2conn::sniff(&mut io, limits.header_read_timeout)).await;
    let Some(sniffed) = sniffed else { return closed_at_shutdown(addr) };
    let Some((sniffed, head)) = sniffed else {
        tracing::debug!(peer = %addr, "connection closed or silent before its first request");
        return;
    };
    let io = super::h2conn::Prefixed { head, inner: io };
    match sniffed {
        super::h2conn::Sniffed::H2 => {
            super::selfwake::SelfWakes::new(super::h2conn::serve(io, peer, app, limits, activity, cancel)).await
        }
        super::h2conn::Sniffed::Other => serve_hyper(io, peer, app, limits, activity, watcher).await,
    }
}

/// A connection that began no request (its TLS handshake or first bytes under way) is closed
/// at shutdown rather than waited for.
pub(super) fn closed_at_shutdown(addr: SocketAddr) {
    tracing::debug!(peer = %addr, "shutting down: closed a connection that began no request");
}

/// What `f` gives, unless the listener shuts down first (`None`): for the steps before a
/// connection's first request, which a shutdown need not wait for.
pub(super) async fn until_shutdown<F: std::future::Future>(cancel: &CancellationToken, f: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = f => Some(out),
        () = cancel.cancelled() => None,
    }
}

/// Serves a connection through hyper (HTTP/1.1, or HTTP/2 on the HTTP listener) until it ends
/// or stays idle for the idle timeout.
async fn serve_hyper<I: Io + 'static, A: App>(
    io: I,
    peer: Peer,
    app: A,
    limits: Limits,
    activity: Arc<Activity>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let addr = peer.addr;
    let svc_activity = activity.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let busy = svc_activity.begin();
        let app = app.clone();
        async move {
            let resp = app.answer(req.map(axum::body::Body::new)).await;
            drop(busy);
            resp
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams);
    // A request answered inline wakes its own connection's task: see `SelfWakes`.
    let mut conn =
        super::selfwake::SelfWakes::new(watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(io), svc)));
    let mut tick = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            done = &mut conn => {
                if let Err(e) = done {
                    tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tick.tick() => {
                if activity.idle_for() >= limits.idle_timeout {
                    tracing::debug!(peer = %addr, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// How a connection learns of the shutdown: hyper's connections through the watcher, the ones
/// served by h2 directly through the token.
struct Shutdown {
    watcher: hyper_util::server::graceful::Watcher,
    cancel: CancellationToken,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// When a connection last moved bytes, and how many requests it has in flight (a connection
/// waiting on a slow model is not idle).
pub(super) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
}

pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's byte stream, noting activity on every read and write.
struct ActivityIo {
    inner: Box<dyn Io>,
    activity: Arc<Activity>,
}

impl AsyncRead for ActivityIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
