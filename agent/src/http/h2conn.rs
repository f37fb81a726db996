//! HTTP/2 connections served by the `h2` crate directly, for the gRPC listener: every stream
//! of a connection is answered inside the connection's own task (no task spawned per call,
//! no waiting on the connection task for send capacity before a one-message answer). A call
//! is the same `http::Request` the hyper path hands the listener's app, with the same [`Peer`];
//! what the app answers goes back as headers, data and trailers. The connection runs inside
//! [`super::selfwake::SelfWakes`] (see `server`): h2's wakes of its own task while a call is
//! answered in it are met by another poll, not by rousing a second worker.
//!
//! Bounds are hyper's defaults and the listener's limits: 1 MiB flow-control windows per stream
//! and per connection (so at most 1 MiB of unread request data per connection), 400 KiB of
//! buffered answer per stream, the configured header-list size and concurrent streams, and
//! at most one answer chunk buffered beyond the peer's window per stream, for at most the idle
//! timeout (then the stream is reset). A connection yields to the runtime every 16 calls. An
//! answer's frames leave in one write ([`Gather`], at most 16 KiB held per connection).

use std::future::{poll_fn, Future as _};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::server::{closed_at_shutdown, until_shutdown, Activity, App, Busy, Limits, Peer};

/// The connection preface every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Per-stream and per-connection flow-control windows (hyper's defaults).
const WINDOW: u32 = 1024 * 1024;
/// Answer bytes one stream may have buffered (hyper's default).
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Streams a client may make the server reset for its errors before the connection is closed.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Calls a connection answers before it yields to the runtime's other tasks.
const CALLS_PER_TURN: u64 = 16;
/// Bytes [`Gather`] holds for one write (a default-size DATA frame's worth); past this,
/// writes go straight to the socket.
const GATHER_MAX: usize = 16 * 1024;

/// Serves one HTTP/2 connection until the client closes it, it stays idle for the idle
/// timeout, or `cancel` asks for a graceful shutdown (a GOAWAY, then the calls in flight end).
pub(super) async fn serve<T, A: App>(
    io: T,
    peer: Peer,
    app: A,
    limits: Limits,
    activity: Arc<Activity>,
    cancel: CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    let handshake = tokio::time::timeout(limits.header_read_timeout, builder.handshake::<_, Bytes>(Gather::new(io)));
    let Some(handshake) = until_shutdown(&cancel, handshake).await else { return closed_at_shutdown(peer.addr) };
    let mut conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer.addr, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer.addr, "HTTP/2 handshake timed out");
            return;
        }
    };
    // Calls still running after their first poll; most finish in it (an inline model run) and
    // never join this set.
    let mut calls = FuturesUnordered::new();
    let mut tick = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(10)));
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut closing = false;
    let mut answered: u64 = 0;
    loop {
        tokio::select! {
            biased;
            () = &mut cancelled, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = poll_fn(|cx| finish_one(&mut calls, &peer, cx)), if !calls.is_empty() => {}
            accepted = poll_fn(|cx| conn.poll_accept(cx)) => match accepted {
                Some(Ok((request, respond))) => {
                    let busy = activity.begin();
                    // A call that panics takes down its own stream (reset when its handle
                    // drops), not the connection's other calls.
                    let call = AssertUnwindSafe(answer(request, respond, peer.clone(), app.clone(), busy, limits.idle_timeout));
                    let mut call = Box::pin(call.catch_unwind());
                    let first = poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
                    let spent = match first {
                        Poll::Ready(ended) => report(&peer, ended),
                        Poll::Pending => {
                            calls.push(call);
                            None
                        }
                    };
                    // What the call queued is written now; then its remains are freed.
                    match poll_fn(|cx| Poll::Ready(conn.poll_closed(cx))).await {
                        Poll::Pending => drop(spent),
                        Poll::Ready(Ok(())) => return,
                        Poll::Ready(Err(e)) => {
                            tracing::debug!(peer = %peer.addr, error = %e, "connection ended with an error");
                            return;
                        }
                    }
                    // A burst of streams in one read is answered some at a time, the other
                    // connections' calls in between, not all before them: a yield every
                    // `CALLS_PER_TURN` calls, as hyper yields every 16 pipelined requests (the
                    // runtime defers a yield's wake, so `SelfWakes` does not meet it with a
                    // repoll).
                    answered += 1;
                    if answered.is_multiple_of(CALLS_PER_TURN) {
                        tokio::task::yield_now().await;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %peer.addr, error = %e, "connection ended with an error");
                    return;
                }
                None => return,
            },
            _ = tick.tick() => {
                if activity.idle_for() >= limits.idle_timeout {
                    tracing::debug!(peer = %peer.addr, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// Polls the calls still running; one that ended is reported and its remains freed.
fn finish_one<F>(calls: &mut FuturesUnordered<F>, peer: &Peer, cx: &mut Context<'_>) -> Poll<()>
where
    F: std::future::Future<Output = std::thread::Result<Option<Spent>>>,
{
    match calls.poll_next_unpin(cx) {
        Poll::Ready(Some(ended)) => {
            drop(report(peer, ended));
            Poll::Ready(())
        }
        Poll::Ready(None) => Poll::Ready(()),
        Poll::Pending => Poll::Pending,
    }
}

/// Logs a call that panicked (its stream was reset when its handle dropped); what an answered
/// call left, to be dropped.
fn report(peer: &Peer, ended: std::thread::Result<Option<Spent>>) -> Option<Spent> {
    ended.unwrap_or_else(|_| {
        tracing::error!(peer = %peer.addr, "a gRPC call panicked; its stream was reset");
        None
    })
}

/// What an answered call leaves: its answer's body (and what the body was made from) and its
/// stream's handle. Dropped once the answer is written, so freeing them does not delay it.
struct Spent {
    _body: axum::body::Body,
    _send: h2::SendStream<Bytes>,
}

/// One call: the app's answer to the request, sent back on its stream. A client that
/// resets the stream cancels the call; one that opens no window for `stall` while an answer
/// chunk waits has the stream reset (CANCEL): as a stalled write on the HTTP listener leaves its
/// connection idle, a reader that stops reading does not hold the stream and its answer for ever.
async fn answer<A: App>(
    request: axum::http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: Peer,
    app: A,
    _busy: Busy,
    stall: Duration,
) -> Option<Spent> {
    let addr = peer.addr;
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(peer);
    let request = axum::http::Request::from_parts(parts, axum::body::Body::new(Incoming(body)));
    // The call first: most finish in their first poll (an inline model run), with no need to
    // look for a reset.
    let response = tokio::select! {
        biased;
        answered = app.answer(request) => match answered {
            Ok(response) => response,
            Err(never) => match never {},
        },
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return None,
    };
    let (mut parts, mut body) = response.into_parts();
    strip_connection_headers(&mut parts.headers);
    let empty = hyper::body::Body::is_end_stream(&body);
    let Ok(mut send) = respond.send_response(axum::http::Response::from_parts(parts, ()), empty) else { return None };
    if empty {
        return Some(Spent { _body: body, _send: send });
    }
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return None,
        };
        let frame = match frame {
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return Some(Spent { _body: body, _send: send });
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "an answer's body failed");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return None;
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                // Wait for window before handing over a chunk, so at most one chunk per stream
                // waits beyond what the peer accepts (a one-message answer usually has room).
                send.reserve_capacity(data.len().max(1));
                if send.capacity() == 0 {
                    match tokio::time::timeout(stall, poll_fn(|cx| poll_capacity_or_reset(&mut send, cx))).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return None,
                        Err(_) => {
                            tracing::debug!(peer = %addr, ?stall, "a stream's reader opened no window: reset");
                            send.send_reset(h2::Reason::CANCEL);
                            return None;
                        }
                    }
                }
                let last = hyper::body::Body::is_end_stream(&body);
                if send.send_data(data, last).is_err() {
                    return None;
                }
                if last {
                    return Some(Spent { _body: body, _send: send });
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = send.send_trailers(trailers);
                }
                return Some(Spent { _body: body, _send: send });
            }
        }
    }
}

/// Capacity assigned to the stream, or `None` when the stream is reset or broken.
fn poll_capacity_or_reset(send: &mut h2::SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Option<usize>> {
    if send.poll_reset(cx).is_ready() {
        return Poll::Ready(None);
    }
    match send.poll_capacity(cx) {
        Poll::Ready(Some(Ok(n))) => Poll::Ready(Some(n)),
        Poll::Ready(_) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }
}

/// Headers HTTP/2 forbids in an answer (RFC 9113 §8.2.2); h2 refuses an answer carrying them.
fn strip_connection_headers(headers: &mut axum::http::HeaderMap) {
    use axum::http::header::{HeaderName, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    fn forbidden(name: &HeaderName) -> bool {
        [CONNECTION, TE, TRANSFER_ENCODING, UPGRADE, KEEP_ALIVE, PROXY_CONNECTION].contains(name)
    }
    // Answers rarely carry any (gRPC's never): look before removing.
    let found: Vec<HeaderName> = headers.keys().filter(|n| forbidden(n)).cloned().collect();
    for name in found {
        headers.remove(name);
    }
}

/// A request body read from its stream, handing the window back as data is read.
struct Incoming(h2::RecvStream);

impl hyper::body::Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, h2::Error>>> {
        match self.0.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = self.0.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        match self.0.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// The connection's writes, an answer's frames gathered into one. h2 hands a DATA payload over
/// 256 bytes to the socket on its own (a vectored write of the frames before it and the
/// payload, then a flush) before it encodes the frames after it, so a gRPC answer whose
/// message is over 256 bytes went out in two writes and two segments: headers and message,
/// then trailers. Here such a vectored write is copied and the flush after it is put off once,
/// so the frames h2 encodes next in the same pass (the trailers) go out with it; every other
/// flush writes what is held. A put-off flush wakes the task, so what is held is written on the
/// next pass at the latest. At most [`GATHER_MAX`] bytes are held; larger writes go straight
/// through, after what is held.
struct Gather<T> {
    inner: T,
    held: bytes::BytesMut,
    /// The last write was a gathered vectored one: the next flush is put off.
    put_off: bool,
}

impl<T> Gather<T> {
    fn new(inner: T) -> Self {
        Self { inner, held: bytes::BytesMut::new(), put_off: false }
    }
}

impl<T: AsyncWrite + Unpin> Gather<T> {
    /// Writes what is held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        use bytes::Buf as _;
        while !self.held.is_empty() {
            let n = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.held.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gather<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gather<T> {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let parts = bufs.iter().filter(|b| !b.is_empty()).count();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        // Nothing to join: straight through.
        if this.held.is_empty() && parts <= 1 {
            return std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        if this.held.len() + len > GATHER_MAX {
            std::task::ready!(this.poll_drain(cx))?;
            this.put_off = false;
            return std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        this.put_off |= parts > 1;
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if std::mem::take(&mut this.put_off) {
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.put_off = false;
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// How a connection began: the HTTP/2 preface, or something else (its first bytes kept).
pub(super) enum Sniffed {
    H2,
    Other,
}

/// Reads the first bytes of a connection, up to the preface's length or the first byte that
/// differs from it, within `within`. `None`: the client sent nothing in time, or left.
pub(super) async fn sniff<T: AsyncRead + Unpin>(io: &mut T, within: Duration) -> Option<(Sniffed, Bytes)> {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::with_capacity(PREFACE.len());
    let read = async {
        let mut buf = [0u8; PREFACE.len()];
        while head.len() < PREFACE.len() {
            let n = io.read(&mut buf[..PREFACE.len() - head.len()]).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
            if !PREFACE.starts_with(&head) {
                return Some(Sniffed::Other);
            }
        }
        Some(Sniffed::H2)
    };
    let sniffed = tokio::time::timeout(within, read).await.ok()??;
    Some((sniffed, Bytes::from(head)))
}

/// A byte stream whose first bytes were already read: they are read again first.
pub(super) struct Prefixed<T> {
    pub(super) head: Bytes,
    pub(super) inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let chunk = self.head.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_util::sync::CancellationToken;

    use super::super::server::{Activity, Limits, Peer};

    /// `calls` requests for `path` on streams 1, 3, 5..., headers only (literals, no Huffman).
    fn burst(path: &str, calls: u32) -> Vec<u8> {
        let mut block = vec![0x83, 0x86, 0x04, u8::try_from(path.len()).unwrap_or(0)];
        block.extend_from_slice(path.as_bytes());
        let mut out = Vec::new();
        for i in 0..calls {
            out.extend_from_slice(&u32::try_from(block.len()).unwrap_or(0).to_be_bytes()[1..]);
            out.extend([0x1, 0x5]); // HEADERS, END_STREAM | END_HEADERS
            out.extend_from_slice(&(2 * i + 1).to_be_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    /// Reads frames until `calls` streams have ended.
    async fn answered(tcp: &mut tokio::net::TcpStream, calls: usize) {
        let (mut buf, mut ended) = (Vec::new(), 0);
        while ended < calls {
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
                .await
                .expect("answers within 10 s")
                .expect("read");
            assert!(n > 0, "the connection ended after {ended} of {calls} answers");
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                if (buf[3] == 0x0 || buf[3] == 0x1) && buf[4] & 0x1 != 0 {
                    ended += 1;
                }
                buf.drain(..9 + len);
            }
        }
    }

    /// A socket that counts the writes that reached it.
    struct Counting {
        inner: tokio::net::TcpStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Counting {
        fn count<T>(&self, written: std::task::Poll<std::io::Result<T>>) -> std::task::Poll<std::io::Result<T>> {
            if let std::task::Poll::Ready(Ok(_)) = &written {
                self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            written
        }
    }

    impl tokio::io::AsyncRead for Counting {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Counting {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
            self.count(written)
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let written = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            self.count(written)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Reads one frame: (type, flags).
    async fn frame(tcp: &mut tokio::net::TcpStream) -> (u8, u8) {
        let mut head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut head))
            .await
            .expect("a frame within 10 s")
            .expect("read");
        let mut payload = vec![0u8; usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2])];
        tcp.read_exact(&mut payload).await.expect("payload");
        (head[3], head[4])
    }

    /// Serves one call whose answer is a `size`-byte message and trailers (as a gRPC answer is)
    /// and reads it whole: the writes that reached the socket for it.
    async fn writes_for_an_answer_of(size: usize) -> usize {
        let app = tower::service_fn(move |_req: axum::extract::Request| async move {
            let mut trailers = axum::http::HeaderMap::new();
            trailers.insert("grpc-status", axum::http::HeaderValue::from_static("0"));
            let frames: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
                Ok(hyper::body::Frame::data(bytes::Bytes::from(vec![7u8; size]))),
                Ok(hyper::body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            Ok::<_, std::convert::Infallible>(axum::response::Response::new(axum::body::Body::new(body)))
        });
        let limits = Limits {
            max_connections: 8,
            max_header_bytes: 16384,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 16,
            direct_h2: true,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut tcp = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (io, peer) = listener.accept().await.expect("accept");
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let io = Counting { inner: io, writes: writes.clone() };
        let peer = Peer { addr: peer, cert_names: Arc::new(Vec::new()) };
        tokio::spawn(super::serve(io, peer, app, limits, Arc::new(Activity::new()), CancellationToken::new()));
        // The preface, SETTINGS with a 1 MiB stream window and a 1 MiB more connection window.
        tcp.write_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x06\x04\0\0\0\0\0\0\x04\0\x10\0\0\0\0\x04\x08\0\0\0\0\0\0\x10\0\0",
        )
        .await
        .expect("preface");
        // The server's SETTINGS, and its ACK of ours, before the call.
        let (mut settings, mut ack) = (false, false);
        while !(settings && ack) {
            match frame(&mut tcp).await {
                (0x4, 0x1) => ack = true,
                (0x4, _) => settings = true,
                _ => {}
            }
        }
        let before = writes.load(std::sync::atomic::Ordering::SeqCst);
        tcp.write_all(&burst("/a", 1)).await.expect("request");
        answered(&mut tcp, 1).await;
        writes.load(std::sync::atomic::Ordering::SeqCst) - before
    }

    /// An answer with a message over 256 bytes and trailers (a gRPC answer of a 1.5 KB
    /// embedding) leaves in one write, as a smaller one does: h2 alone writes its message, then
    /// its trailers in a second write (and segment). One past what a connection holds for a
    /// write still arrives whole.
    #[test]
    fn an_answer_over_256_bytes_leaves_in_one_write_with_its_trailers() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let writes = writes_for_an_answer_of(1541).await;
            assert_eq!(writes, 1, "a 1541-byte answer took {writes} writes");
            let writes = writes_for_an_answer_of(200).await;
            assert_eq!(writes, 1, "a 200-byte answer took {writes} writes");
            let writes = writes_for_an_answer_of(100_000).await;
            assert!(writes >= 2, "a 100,000-byte answer in {writes} writes: the rest went straight through");
        });
    }

    /// A burst of 300 calls written at once on one connection is answered 16 at a time: a call
    /// that arrives with it on another connection is answered in between, not after all 300.
    /// One runtime thread, an app that answers at once: the order is the connections' own.
    #[test]
    fn a_burst_of_calls_yields_to_other_connections() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let order = Arc::new(Mutex::new(Vec::<String>::new()));
            let seen = order.clone();
            let app = tower::service_fn(move |req: axum::extract::Request| {
                seen.lock().expect("order").push(req.uri().path().to_owned());
                async { Ok::<_, std::convert::Infallible>(axum::response::Response::new(axum::body::Body::empty())) }
            });
            let limits = Limits {
                max_connections: 8,
                max_header_bytes: 16384,
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                max_concurrent_streams: 1024,
                direct_h2: true,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let mut clients = Vec::new();
            for _ in 0..2 {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                // Room for the whole burst in the kernel: it goes out in one write.
                socket.set_send_buffer_size(4 << 20).expect("send buffer");
                let mut tcp = socket.connect(addr).await.expect("connect");
                let (io, peer) = listener.accept().await.expect("accept");
                let peer = Peer { addr: peer, cert_names: Arc::new(Vec::new()) };
                let cancel = CancellationToken::new();
                tokio::spawn(super::serve(io, peer, app.clone(), limits, Arc::new(Activity::new()), cancel));
                // Past the handshake: the preface and SETTINGS out, the server's SETTINGS in.
                tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.expect("preface");
                let mut head = [0u8; 9];
                tcp.read_exact(&mut head).await.expect("settings");
                let mut settings =
                    vec![0u8; usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2])];
                tcp.read_exact(&mut settings).await.expect("settings");
                clients.push(tcp);
            }
            let (mut b, mut a) = (clients.remove(1), clients.remove(0));
            let calls = burst("/a", 300);
            assert_eq!(a.try_write(&calls).expect("write"), calls.len(), "the burst in one write");
            let call = burst("/b", 1);
            assert_eq!(b.try_write(&call).expect("write"), call.len());
            answered(&mut b, 1).await;
            answered(&mut a, 300).await;
            let order = order.lock().expect("order").clone();
            let at = order.iter().position(|p| p == "/b").expect("the other call");
            // 16 here; without the yield, only the runtime's budget stops the burst (at 127).
            assert!(at <= 32, "the other connection's call came after {at} of the burst's");
        });
    }
}
