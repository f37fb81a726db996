//! The lightest load generators there are, one per protocol, written to the same plan so the
//! two transports are compared on the server's work and not on their client libraries': each
//! protocol's connections as its clients use them (HTTP/1.1: one per client; gRPC: one shared
//! by all, a stream per call), the request's bytes built once, one write per call, the answer
//! read and checked (status, a whole message or body) without decoding it, no task per call
//! (a gRPC connection shared by several clients has one, which drives it; a lone client drives
//! its own). The HTTP/1.1 answer head is parsed with `httparse`; the HTTP/2 answers' header
//! blocks are decoded with `loona-hpack` (its table kept per connection), and the request's
//! blocks are built once from `loona-hpack`'s integer encoding: the first call of a connection
//! adds its headers to the server's table, later calls refer to them, as gRPC clients' HPACK
//! encoders (tonic's `h2`, gRPC core's) do.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The largest answer either client takes (the bench's answers are a few KiB).
const MAX_ANSWER: usize = 64 << 20;

async fn connect(port: u16) -> Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads more of the connection into `buf`; a closed connection is an error.
async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<()> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    ensure!(stream.read_buf(buf).await? > 0, "the server closed the connection");
    ensure!(buf.len() <= MAX_ANSWER, "an answer over {MAX_ANSWER} bytes");
    Ok(())
}

/// Whether a pooled connection can take another call: not closed by the server meanwhile (an
/// idle connection it timed out), with nothing unasked for waiting on it.
fn open_and_quiet(stream: &TcpStream, buf: &mut BytesMut) -> bool {
    buf.reserve(4096);
    match stream.try_read_buf(buf) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}

/// A pooled connection used this recently is taken as still open without asking the kernel:
/// servers close keep-alive connections after seconds of idleness, not milliseconds, and a
/// check on every call would put a system call on the HTTP client's path that the gRPC
/// client's has no counterpart for.
const FRESH: Duration = Duration::from_millis(100);

/// An HTTP/1.1 keep-alive connection sending one fixed POST.
pub(crate) struct Http1 {
    stream: TcpStream,
    request: Bytes,
    buf: BytesMut,
    /// When its last call ended.
    used: std::time::Instant,
}

impl Http1 {
    pub(crate) async fn connect(port: u16, path: &str, body: &[u8]) -> Result<Self> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        Ok(Self {
            stream: connect(port).await?,
            request: request.into(),
            buf: BytesMut::with_capacity(16 * 1024),
            used: std::time::Instant::now(),
        })
    }

    /// Whether the connection can take another call: used within [`FRESH`], or else checked
    /// (see `open_and_quiet`).
    pub(crate) fn reusable(&mut self) -> bool {
        self.used.elapsed() < FRESH || open_and_quiet(&self.stream, &mut self.buf)
    }

    /// One call: a 2xx status and a whole body (by its `content-length`), or an error.
    pub(crate) async fn call(&mut self) -> Result<()> {
        self.stream.write_all(&self.request).await?;
        let (status, head, length) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&self.buf)? {
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .context("an answer without content-length")?;
                break (response.code.unwrap_or(0), head, length);
            }
            fill(&mut self.stream, &mut self.buf).await?;
        };
        ensure!((200..300).contains(&status), "HTTP {status}");
        ensure!(length <= MAX_ANSWER, "an answer over {MAX_ANSWER} bytes");
        while self.buf.len() < head + length {
            fill(&mut self.stream, &mut self.buf).await?;
        }
        self.buf.advance(head + length);
        self.used = std::time::Instant::now();
        Ok(())
    }
}

/// HTTP/2 frame types (RFC 9113 §6).
mod frame_type {
    pub(super) const DATA: u8 = 0x0;
    pub(super) const HEADERS: u8 = 0x1;
    pub(super) const RST_STREAM: u8 = 0x3;
    pub(super) const SETTINGS: u8 = 0x4;
    pub(super) const PING: u8 = 0x6;
    pub(super) const GOAWAY: u8 = 0x7;
    pub(super) const WINDOW_UPDATE: u8 = 0x8;
    pub(super) const CONTINUATION: u8 = 0x9;
}

/// HTTP/2 frame flags (RFC 9113 §6): `ACK` on SETTINGS and PING, the rest on DATA and HEADERS.
mod flag {
    pub(super) const END_STREAM: u8 = 0x1;
    pub(super) const ACK: u8 = 0x1;
    pub(super) const END_HEADERS: u8 = 0x4;
    pub(super) const PADDED: u8 = 0x8;
    pub(super) const PRIORITY: u8 = 0x20;
}

use flag::{ACK, END_HEADERS, END_STREAM, PADDED, PRIORITY};
use frame_type::{CONTINUATION, DATA, GOAWAY, HEADERS, PING, RST_STREAM, SETTINGS, WINDOW_UPDATE};

/// The window this client opens for the server, per stream and per connection.
const OPEN_WINDOW: u32 = (1 << 31) - 1;
/// The largest frame payload a peer must take before it says otherwise.
const DEFAULT_MAX_FRAME: usize = 16 * 1024;

fn frame_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// A unary gRPC call's header blocks (RFC 7541), `:method POST` and `:scheme http` from the
/// static table in both: the first call's, which adds `:path`, `:authority`, `content-type`
/// and `te` to the server's dynamic table (literals with incremental indexing, static names
/// where there are), and every later call's, which refers to those four entries. The four
/// take [`indexed_entries_size`] bytes of the table; nothing else is added to it, so none is
/// evicted.
fn request_blocks(path: &str, authority: &str) -> (Bytes, Bytes) {
    use loona_hpack::encoder::encode_integer;
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend(encode_integer(s.len(), 7));
        out.extend_from_slice(s);
    }
    let mut first = vec![0x83, 0x86];
    // Literal with incremental indexing, name from the static table: `01` and a 6-bit index.
    for (index, value) in [(4, path.as_bytes()), (1, authority.as_bytes()), (31, b"application/grpc".as_slice())] {
        loona_hpack::encoder::encode_integer_into(index, 6, 0x40, &mut first).expect("a Vec takes every write");
        string(&mut first, value);
    }
    first.push(0x40);
    string(&mut first, b"te");
    string(&mut first, b"trailers");
    // The newest entry is 62 (RFC 7541 §2.3.3): te, content-type, :authority, :path.
    let later = vec![0x83, 0x86, 0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62];
    (first.into(), later.into())
}

/// The table space the request's four indexed headers take (RFC 7541 §4.1: each entry is its
/// name's and value's length plus 32), given the path's and authority's lengths.
fn indexed_entries_size(path: usize, authority: usize) -> usize {
    (5 + path + 32) + (10 + authority + 32) + (12 + 16 + 32) + (2 + 8 + 32)
}

/// An HTTP/2 connection making unary gRPC calls (driven by [`Mux`]'s task, or by its one client).
pub(crate) struct Grpc {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    /// The request's header blocks (see [`request_blocks`]): the first call's, and later ones'.
    first_block: Bytes,
    block: Bytes,
    /// Whether the first call's block has been sent.
    indexed: bool,
    /// Table space the request's indexed headers need, and what the server's table holds
    /// (SETTINGS_HEADER_TABLE_SIZE); with too little, every call sends the first block (its
    /// literals, which the server's table cannot keep) instead of referring to entries.
    table_needed: usize,
    table_size: usize,
    message: Bytes,
    next_id: u32,
    /// What the server lets this client send: on the connection, and on a new stream.
    send_window: i64,
    stream_window: i64,
    /// Answer bytes taken since the connection's window was last topped up.
    taken: u64,
    /// Streams the server takes at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams: usize,
}

/// What one frame meant for the call in flight.
enum Step {
    More,
    Ended,
}

impl Grpc {
    /// Connects and exchanges settings; `framed` is the length-prefixed request message.
    async fn connect(port: u16, path: &str, framed: Bytes) -> Result<Self> {
        let mut stream = connect(port).await?;
        let authority = format!("127.0.0.1:{port}");
        let (first_block, block) = request_blocks(path, &authority);
        let mut out = BytesMut::with_capacity(64 * 1024);
        out.put_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        frame_head(&mut out, 6, SETTINGS, 0, 0);
        out.put_u16(0x4); // SETTINGS_INITIAL_WINDOW_SIZE
        out.put_u32(OPEN_WINDOW);
        frame_head(&mut out, 4, WINDOW_UPDATE, 0, 0);
        out.put_u32(OPEN_WINDOW - 65_535);
        stream.write_all(&out).await?;
        out.clear();
        let mut c = Self {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            out,
            decoder: loona_hpack::Decoder::new(),
            first_block,
            block,
            indexed: false,
            table_needed: indexed_entries_size(path.len(), authority.len()),
            table_size: 4096,
            message: framed,
            next_id: 1,
            send_window: 65_535,
            stream_window: 65_535,
            taken: 0,
            max_streams: usize::MAX,
        };
        // The server's settings come first (RFC 9113 §3.4).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut settings = false;
        while !settings {
            while let Some((kind, flags, id, payload)) = c.next_frame()? {
                settings |= kind == SETTINGS && flags & ACK == 0;
                c.control(kind, flags, id, &payload)?;
            }
            if !settings {
                tokio::time::timeout_at(deadline, fill(&mut c.stream, &mut c.buf)).await??;
            }
        }
        Ok(c)
    }

    /// The next whole frame in the buffer: (type, flags, stream, payload).
    fn next_frame(&mut self) -> Result<Option<(u8, u8, u32, Bytes)>> {
        if self.buf.len() < 9 {
            return Ok(None);
        }
        let len = (usize::from(self.buf[0]) << 16) | (usize::from(self.buf[1]) << 8) | usize::from(self.buf[2]);
        ensure!(len <= MAX_ANSWER, "a frame of {len} bytes");
        if self.buf.len() < 9 + len {
            return Ok(None);
        }
        let mut head = self.buf.split_to(9);
        let payload = self.buf.split_to(len).freeze();
        head.advance(3);
        let (kind, flags, id) = (head.get_u8(), head.get_u8(), head.get_u32() & 0x7fff_ffff);
        Ok(Some((kind, flags, id, payload)))
    }

    /// Handles a connection-level frame (or one for a stream no longer in flight).
    fn control(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8]) -> Result<()> {
        match kind {
            SETTINGS if flags & ACK == 0 => {
                ensure!(payload.len().is_multiple_of(6), "a malformed SETTINGS frame");
                for s in payload.chunks_exact(6) {
                    let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    match u16::from_be_bytes([s[0], s[1]]) {
                        0x1 => self.table_size = value as usize,
                        0x3 => self.max_streams = value as usize,
                        0x4 => self.stream_window = i64::from(value),
                        _ => {}
                    }
                }
                frame_head(&mut self.out, 0, SETTINGS, ACK, 0);
            }
            PING if flags & ACK == 0 => {
                frame_head(&mut self.out, payload.len(), PING, ACK, 0);
                self.out.put_slice(payload);
            }
            WINDOW_UPDATE if id == 0 && payload.len() == 4 => {
                self.send_window +=
                    i64::from(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff);
            }
            GOAWAY => bail!("the server sent GOAWAY"),
            _ => {}
        }
        Ok(())
    }

    /// Header block fragment of a HEADERS frame's payload (padding and priority removed).
    fn fragment(flags: u8, mut payload: Bytes) -> Result<Bytes> {
        let mut pad = 0;
        if flags & PADDED != 0 {
            ensure!(!payload.is_empty(), "a malformed HEADERS frame");
            pad = usize::from(payload.get_u8());
        }
        if flags & PRIORITY != 0 {
            ensure!(payload.len() >= 5, "a malformed HEADERS frame");
            payload.advance(5);
        }
        ensure!(payload.len() >= pad, "a malformed HEADERS frame");
        payload.truncate(payload.len() - pad);
        Ok(payload)
    }

    /// A frame of a call in flight (DATA, HEADERS, CONTINUATION or RST_STREAM) into its answer.
    fn stream_frame(&mut self, kind: u8, flags: u8, payload: Bytes, answer: &mut Answer) -> Result<Step> {
        match kind {
            RST_STREAM => bail!("the server reset the stream"),
            DATA => {
                self.taken += payload.len() as u64;
                if self.taken > u64::from(OPEN_WINDOW / 2) {
                    frame_head(&mut self.out, 4, WINDOW_UPDATE, 0, 0);
                    self.out.put_u32(u32::try_from(self.taken).unwrap_or(OPEN_WINDOW / 2));
                    self.taken = 0;
                }
                let mut data = payload;
                if flags & PADDED != 0 {
                    ensure!(!data.is_empty(), "a malformed DATA frame");
                    let pad = usize::from(data.get_u8());
                    ensure!(data.len() >= pad, "a malformed DATA frame");
                    data.truncate(data.len() - pad);
                }
                answer.data(&data)?;
                if flags & END_STREAM != 0 {
                    bail!("the answer ended without trailers");
                }
                Ok(Step::More)
            }
            _ => {
                let fragment = if kind == HEADERS { Self::fragment(flags, payload)? } else { payload };
                if kind == HEADERS {
                    answer.end_stream = flags & END_STREAM != 0;
                }
                // A block in one frame (the usual case) is decoded where it lies.
                let block = if answer.block.is_empty() && flags & END_HEADERS != 0 {
                    fragment
                } else {
                    answer.block.extend_from_slice(&fragment);
                    if flags & END_HEADERS == 0 {
                        return Ok(Step::More);
                    }
                    Bytes::from(std::mem::take(&mut answer.block))
                };
                let trailers = answer.status.is_some();
                let (status, grpc_ok) = (&mut answer.status, &mut answer.grpc_ok);
                self.decoder
                    .decode_with_cb(&block, |name, value| match &name[..] {
                        b":status" if !trailers => {
                            *status = std::str::from_utf8(&value).ok().and_then(|s| s.parse().ok())
                        }
                        b"grpc-status" => *grpc_ok = Some(&value[..] == b"0"),
                        _ => {}
                    })
                    .map_err(|e| anyhow::anyhow!("a header block does not decode: {e:?}"))?;
                answer.status.get_or_insert(0);
                Ok(if answer.end_stream { Step::Ended } else { Step::More })
            }
        }
    }
}

/// Whether a frame type belongs to a stream's exchange (the rest are the connection's).
fn for_stream(kind: u8) -> bool {
    matches!(kind, DATA | HEADERS | CONTINUATION | RST_STREAM)
}

/// One HTTP/2 connection shared by every client, as gRPC clients use it: each call its own
/// stream, opened as soon as it is asked for (within the server's stream limit and window),
/// the frames of every waiting call written at once, answers matched by stream id. With
/// several clients one task drives the connection, and a call is a message to it and a message
/// back; with one client, the client drives the connection itself, as the HTTP/1.1 client does
/// its own (no hand-off to another task and back on each call).
#[derive(Clone)]
pub(crate) enum Mux {
    Shared(tokio::sync::mpsc::UnboundedSender<Reply>),
    Own(std::sync::Arc<tokio::sync::Mutex<Grpc>>),
}

impl Mux {
    /// Connects (as [`Grpc::connect`]) for `clients` clients; with more than one, starts the
    /// connection's task.
    pub(crate) async fn connect(port: u16, path: &str, framed: Bytes, clients: usize) -> Result<Self> {
        let conn = Grpc::connect(port, path, framed).await?;
        if clients <= 1 {
            return Ok(Self::Own(std::sync::Arc::new(tokio::sync::Mutex::new(conn))));
        }
        let (calls, waiting) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(drive(conn, waiting));
        Ok(Self::Shared(calls))
    }

    /// One call: HTTP 200, one whole message, `grpc-status: 0`; or an error.
    pub(crate) async fn call(&self) -> Result<()> {
        match self {
            Self::Shared(calls) => {
                let (done, answer) = tokio::sync::oneshot::channel();
                calls.send(done).map_err(|_| anyhow::anyhow!("the connection has ended"))?;
                answer.await.map_err(|_| anyhow::anyhow!("the connection ended during the call"))?
            }
            Self::Own(conn) => conn.lock().await.call().await,
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<()>>;

/// The shared connection's task: opens a stream per waiting call, reads and matches answers,
/// until every `Mux` is dropped and no call is in flight. A connection error fails every
/// call in flight and ends the task (later calls fail at once).
async fn drive(mut c: Grpc, mut waiting: tokio::sync::mpsc::UnboundedReceiver<Reply>) {
    /// What woke the task.
    enum Woke {
        Read,
        Asked(Option<Reply>),
    }
    let mut flight: std::collections::HashMap<u32, (Answer, Reply)> = std::collections::HashMap::new();
    let mut queued: std::collections::VecDeque<Reply> = std::collections::VecDeque::new();
    let mut open = true;
    let failed: anyhow::Error = 'conn: loop {
        while open {
            match waiting.try_recv() {
                Ok(reply) => queued.push_back(reply),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let size = c.message.len() as i64;
        if c.stream_window < size {
            // No stream could ever carry it: the calls would wait for window that never comes.
            break anyhow::anyhow!("the message ({size} bytes) is over the server's stream window");
        }
        while !queued.is_empty() && flight.len() < c.max_streams && c.send_window >= size && c.stream_window >= size {
            match c.open_stream() {
                Ok(id) => {
                    if let Some(reply) = queued.pop_front() {
                        flight.insert(id, (Answer::default(), reply));
                    }
                }
                Err(e) => break 'conn e,
            }
        }
        if !c.out.is_empty() {
            if let Err(e) = c.stream.write_all(&c.out).await {
                break e.into();
            }
            c.out.clear();
        }
        if !open && flight.is_empty() && queued.is_empty() {
            return;
        }
        let woke = tokio::select! {
            biased;
            filled = fill(&mut c.stream, &mut c.buf) => filled.map(|()| Woke::Read),
            reply = waiting.recv(), if open => Ok(Woke::Asked(reply)),
        };
        match woke {
            Ok(Woke::Read) => {}
            Ok(Woke::Asked(Some(reply))) => queued.push_back(reply),
            Ok(Woke::Asked(None)) => open = false,
            Err(e) => break e,
        }
        if let Err(e) = c.answers(&mut flight) {
            break e;
        }
    };
    let why = format!("{failed:#}");
    for (_, (_, reply)) in flight.drain() {
        let _ = reply.send(Err(anyhow::anyhow!("{why}")));
    }
    for reply in queued {
        let _ = reply.send(Err(anyhow::anyhow!("{why}")));
    }
}

impl Grpc {
    /// One call on a connection its one client drives: the stream opened (once the server's
    /// window has room), its frames written, frames read until its answer ends. Frames of the
    /// connection's own (settings, pings, window) are handled on the way.
    async fn call(&mut self) -> Result<()> {
        let size = self.message.len() as i64;
        ensure!(self.stream_window >= size, "the message ({size} bytes) is over the server's stream window");
        while self.send_window < size {
            self.flush().await?;
            fill(&mut self.stream, &mut self.buf).await?;
            while let Some((kind, flags, sid, payload)) = self.next_frame()? {
                self.control(kind, flags, sid, &payload)?;
            }
        }
        let id = self.open_stream()?;
        let mut answer = Answer::default();
        loop {
            self.flush().await?;
            fill(&mut self.stream, &mut self.buf).await?;
            while let Some((kind, flags, sid, payload)) = self.next_frame()? {
                if sid != id || !for_stream(kind) {
                    self.control(kind, flags, sid, &payload)?;
                    continue;
                }
                if let Step::Ended = self.stream_frame(kind, flags, payload, &mut answer)? {
                    self.flush().await?;
                    return answer.check();
                }
            }
        }
    }

    /// Writes what is queued.
    async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Queues a new stream's HEADERS and DATA frames; returns its id.
    fn open_stream(&mut self) -> Result<u32> {
        let id = self.next_id;
        ensure!(id < (1 << 31), "stream ids used up");
        self.next_id += 2;
        let block = if self.indexed {
            self.block.clone()
        } else {
            // A server whose table cannot hold the entries gets them added each time: its
            // table keeps none of them, and the next call adds them again.
            self.indexed = self.table_needed <= self.table_size;
            self.first_block.clone()
        };
        ensure!(block.len() <= DEFAULT_MAX_FRAME, "a header block over one frame");
        self.send_window -= self.message.len() as i64;
        frame_head(&mut self.out, block.len(), HEADERS, END_HEADERS, id);
        self.out.put_slice(&block);
        let mut rest = self.message.clone();
        loop {
            let n = rest.len().min(DEFAULT_MAX_FRAME);
            let last = n == rest.len();
            frame_head(&mut self.out, n, DATA, if last { END_STREAM } else { 0 }, id);
            self.out.put_slice(&rest.split_to(n));
            if last {
                return Ok(id);
            }
        }
    }

    /// Every whole frame in the buffer, each answer that ended given to its caller. A stream's
    /// own error (a reset, a malformed answer) fails that call only.
    fn answers(&mut self, flight: &mut std::collections::HashMap<u32, (Answer, Reply)>) -> Result<()> {
        while let Some((kind, flags, sid, payload)) = self.next_frame()? {
            let Some((answer, _)) = flight.get_mut(&sid).filter(|_| for_stream(kind)) else {
                self.control(kind, flags, sid, &payload)?;
                continue;
            };
            let step = self.stream_frame(kind, flags, payload, answer);
            let ended = match step {
                Ok(Step::More) => None,
                Ok(Step::Ended) => Some(answer.check()),
                Err(e) => Some(Err(e)),
            };
            if let Some(result) = ended {
                if let Some((_, reply)) = flight.remove(&sid) {
                    let _ = reply.send(result);
                }
            }
        }
        Ok(())
    }
}

/// What has come of the call in flight.
#[derive(Default)]
struct Answer {
    status: Option<u16>,
    /// Whether the trailers said `grpc-status: 0`.
    grpc_ok: Option<bool>,
    /// Length-prefixed message bytes seen, and the length the prefix declared.
    got: usize,
    declared: Option<usize>,
    prefix: [u8; 5],
    prefix_len: usize,
    /// A header block split over frames, joined.
    block: Vec<u8>,
    end_stream: bool,
}

impl Answer {
    fn data(&mut self, data: &[u8]) -> Result<()> {
        if self.declared.is_none() {
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            if self.prefix_len == 5 {
                ensure!(self.prefix[0] == 0, "a compressed answer");
                self.declared =
                    Some(u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]) as usize);
            }
            self.got += data.len() - n;
        } else {
            self.got += data.len();
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        ensure!(self.status == Some(200), "HTTP {:?}", self.status);
        ensure!(self.grpc_ok == Some(true), "grpc-status not 0");
        ensure!(self.declared.is_some_and(|n| n > 0 && n == self.got), "not one whole message");
        Ok(())
    }
}
