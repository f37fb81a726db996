//! The gRPC listener attacked with a raw client (tonic): bytes that are no protobuf, messages
//! over the size limit, hostile shapes, unknown methods and services, HTTP/1.1 on the gRPC
//! port, a stream dropped mid-flight, a reader that opens no window, calls reset while queued.
//! Each gets its status code (or its stream reset) and the agent serves on.

use std::time::Duration;

use bytes::{Buf as _, BufMut as _};
use outpost_proto::protocol::grpc as pb;
use outpost_tests::*;
use tonic::codec::{DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

/// Sends and receives message bodies as they are (no protobuf), to say what a client must
/// not.
#[derive(Default, Clone)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

pub(crate) async fn raw_call(
    channel: &tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(tonic::Response::into_inner)
}

pub(crate) const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

fn mlp_request(shape: Vec<i64>, raw: Vec<u8>) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![pb::InferInputTensor { name: "X".into(), datatype: "FP32".into(), shape, ..Default::default() }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_grpc_requests_get_their_status_and_the_agent_serves_on() -> anyhow::Result<()> {
    use prost::Message as _;
    let models = mlp_only()?;
    let extra = "[grpc]\nlisten = \"127.0.0.1:0\"\nmax_message_bytes = 8192\nmax_concurrent_streams = 4\n";
    let agent = TestAgent::start(&[models.path().to_owned()], extra).await?;
    let addr = agent.agent.grpc_addr().ok_or_else(|| anyhow::anyhow!("no gRPC listener"))?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let good = mlp_request(vec![1, 30], vec![0; 120]).encode_to_vec();
    let ok = raw_call(&channel, INFER, good.clone()).await?;
    let answer = pb::ModelInferResponse::decode(ok.as_slice())?;
    assert_eq!(answer.raw_output_contents.len(), answer.outputs.len());

    let code = |r: Result<Vec<u8>, tonic::Status>| r.err().map(|s| (s.code(), s.message().to_owned()));
    // Bytes that are no protobuf: the client's error, not the server's.
    let (c, m) = code(raw_call(&channel, INFER, vec![0xff; 64]).await).unwrap_or((Code::Ok, String::new()));
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // A field of the wrong wire type (the model name as a varint).
    let (c, m) = code(raw_call(&channel, INFER, vec![0x08, 0x01]).await).unwrap_or((Code::Ok, String::new()));
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // Over grpc.max_message_bytes: refused before it is decoded (tonic's OUT_OF_RANGE).
    let big = mlp_request(vec![1, 30], vec![0; 20_000]).encode_to_vec();
    let (c, m) = code(raw_call(&channel, INFER, big).await).unwrap_or((Code::Ok, String::new()));
    assert_eq!(c, Code::OutOfRange, "{m}");
    assert!(m.contains("limit is: 8192"), "{m}");
    // A shape claiming 2^80 elements with 120 bytes, and a negative dimension.
    for shape in [vec![1 << 40, 1 << 40], vec![-1, 30]] {
        let (c, m) = code(raw_call(&channel, INFER, mlp_request(shape, vec![0; 120]).encode_to_vec()).await)
            .unwrap_or((Code::Ok, String::new()));
        assert_eq!(c, Code::InvalidArgument, "{m}");
    }
    // Triton calls not served here, and services that do not exist.
    for path in ["/inference.GRPCInferenceService/SystemSharedMemoryStatus", "/no.Such/Service"] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await?;
        let r = grpc
            .unary(
                tonic::Request::new(Vec::new()),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                RawCodec,
            )
            .await;
        assert_eq!(r.err().map(|s| s.code()), Some(Code::Unimplemented), "{path}");
    }
    // A stream dropped with requests in flight, over the stream limit's worth of streams.
    for _ in 0..8 {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await?;
        let requests = futures::stream::iter(vec![good.clone(); 50]);
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelStreamInfer");
        let mut answers = grpc.streaming(tonic::Request::new(requests), path, RawCodec).await?.into_inner();
        let first = answers.message().await?;
        assert!(first.is_some());
        drop(answers);
    }
    // HTTP/1.1 (not gRPC) on the gRPC port: 415 and a word on where the HTTP API is.
    let r = http_client().post(format!("http://{addr}{INFER}")).body(good.clone()).send().await?;
    assert_eq!(r.status().as_u16(), 415);
    assert!(r.text().await?.contains("serves gRPC"));
    // The health service too: a plain HTTP probe learns it is talking to a gRPC port.
    let r = http_client().post(format!("http://{addr}/grpc.health.v1.Health/Check")).body("").send().await?;
    assert_eq!(r.status().as_u16(), 415);
    // The agent serves on.
    let ok = raw_call(&channel, INFER, good).await?;
    assert!(!pb::ModelInferResponse::decode(ok.as_slice())?.outputs.is_empty());
    let (s, _) = agent.get("/v2/health/ready").await?;
    assert_eq!(s, 200);
    tokio::time::timeout(Duration::from_secs(30), agent.stop()).await??;
    Ok(())
}

/// One framed gRPC message.
fn framed(message: &[u8]) -> bytes::Bytes {
    let mut out = bytes::BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// Reads one framed message from an HTTP/2 answer body.
async fn read_framed(body: &mut h2::RecvStream, got: &mut bytes::BytesMut) -> anyhow::Result<Vec<u8>> {
    loop {
        if got.len() >= 5 {
            let n = u32::from_be_bytes([got[1], got[2], got[3], got[4]]) as usize;
            if got.len() >= 5 + n {
                let message = got.split_to(5 + n);
                return Ok(message[5..].to_vec());
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
            .ok_or_else(|| anyhow::anyhow!("the answer ended"))??;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
}

/// A gRPC call's request head for a hand-driven HTTP/2 client, with a bearer token if given.
fn call_to(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<axum::http::Request<()>, axum::http::Error> {
    let mut r = axum::http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    r.body(())
}

/// The `grpc-status` of an answer that ends in its headers (no message), which must come
/// within 10 s; `what` names the call in the error.
async fn status_within(answer: h2::client::ResponseFuture, what: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| anyhow::anyhow!("{what} was kept waiting"))??;
    Ok(answer.headers().get("grpc-status").map(|v| v.as_bytes().to_vec()))
}

/// A `ModelStreamInfer` answer's body and what was read of it past its first message, which
/// must carry no error.
async fn first_stream_answer(answer: h2::client::ResponseFuture) -> anyhow::Result<(h2::RecvStream, bytes::BytesMut)> {
    use prost::Message as _;
    let mut body = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??
        .into_body();
    let mut got = bytes::BytesMut::new();
    let first = pb::ModelStreamInferResponse::decode(read_framed(&mut body, &mut got).await?.as_slice())?;
    anyhow::ensure!(first.error_message.is_empty(), "{}", first.error_message);
    Ok((body, got))
}

/// An agent serving the MLP over gRPC, with `http` added to its `[http]` settings.
async fn grpc_agent(models: &std::path::Path, http: &str) -> anyhow::Result<TestAgent> {
    let state = tempfile::tempdir()?;
    let text = config_text(state.path(), &[models.to_owned()], "[grpc]\nlisten = \"127.0.0.1:0\"\n")
        .replace("[http]\n", &format!("[http]\n{http}"));
    TestAgent::start_text(state, &text, "http", http_client()).await
}

/// The gRPC listener's own HTTP/2 connections: one that stays silent, or stalls inside the
/// HTTP/2 preface, is closed after the header read timeout; a call whose message stalls ends
/// with DEADLINE_EXCEEDED after the request timeout; at shutdown the connection is told
/// (GOAWAY: no new calls), a stream open before it is still answered, and the agent stops once
/// that stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_close_when_silent_and_drain_at_shutdown() -> anyhow::Result<()> {
    use prost::Message as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let models = mlp_only()?;
    let agent = grpc_agent(models.path(), "header_read_timeout = \"300ms\"\nrequest_timeout = \"1s\"\n").await?;
    let addr = agent.agent.grpc_addr().ok_or_else(|| anyhow::anyhow!("no gRPC listener"))?;

    // Silent, and stalled after half the preface: both closed by the agent (EOF), well before
    // the test's own bound.
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(sent).await?;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("a connection that sent {sent:?} was kept open"))?
            .unwrap_or(0);
        assert_eq!(n, 0, "a connection that sent {sent:?} got an answer");
    }

    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(conn);
    let call = |path: &str| call_to(addr, path, None);
    let good = mlp_request(vec![1, 30], vec![0; 120]).encode_to_vec();

    // A unary call whose message never comes (half of it sent): DEADLINE_EXCEEDED once
    // http.request_timeout has passed, not a stream held open for ever.
    let mut sender = send.clone().ready().await?;
    let (answer, mut stalled) = sender.send_request(call(INFER)?, false)?;
    stalled.send_data(framed(&good).slice(..40), false)?;
    let status = status_within(answer, "a call with no message").await?;
    assert_eq!(status.as_deref(), Some(&b"4"[..]));

    // A stream of calls, open before the shutdown.
    let mut sender = send.clone().ready().await?;
    let (answer, mut stream) = sender.send_request(call("/inference.GRPCInferenceService/ModelStreamInfer")?, false)?;
    stream.send_data(framed(&good), false)?;
    let (mut body, mut got) = first_stream_answer(answer).await?;

    let stopping = tokio::spawn(agent.stop());
    // The GOAWAY arrives: a new call on the connection is refused (bounded wait).
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        for _ in 0..10_000 {
            let Ok(mut s) = send.clone().ready().await else { return true };
            let Ok((answer, mut st)) = s.send_request(call(INFER).expect("a request"), false) else { return true };
            let _ = st.send_data(framed(&good), true);
            match answer.await {
                Err(_) => return true,
                Ok(r) => {
                    // Answered before the GOAWAY: drain it and try again.
                    let mut b = r.into_body();
                    while b.data().await.is_some() {}
                }
            }
        }
        false
    })
    .await;
    assert_eq!(refused.ok(), Some(true), "new calls still accepted after the shutdown began");

    // The stream opened before is still answered, and ends cleanly.
    stream.send_data(framed(&good), true)?;
    let second = pb::ModelStreamInferResponse::decode(read_framed(&mut body, &mut got).await?.as_slice())?;
    assert!(second.error_message.is_empty(), "{}", second.error_message);
    let rest = async {
        while body.data().await.is_some() {}
        body.trailers().await
    };
    let trailers = tokio::time::timeout(Duration::from_secs(10), rest)
        .await
        .map_err(|_| anyhow::anyhow!("the stream did not end within 10 s"))??
        .unwrap_or_default();
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .map_err(|_| anyhow::anyhow!("shutdown hung"))???;
    driver.abort();
    Ok(())
}

/// A client that asks and then opens no flow-control window for the answer (a reader that
/// stops reading): its stream is reset (CANCEL) once the idle timeout has passed, instead of
/// holding the stream, its answer and the connection for ever; the agent serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_opens_no_window_has_its_stream_reset_after_the_idle_timeout() -> anyhow::Result<()> {
    use prost::Message as _;
    let models = mlp_only()?;
    let agent = grpc_agent(models.path(), "idle_timeout = \"1s\"\n").await?;
    let addr = agent.agent.grpc_addr().ok_or_else(|| anyhow::anyhow!("no gRPC listener"))?;
    let good = mlp_request(vec![1, 30], vec![0; 120]).encode_to_vec();
    let call = || call_to(addr, INFER, None);

    // Every stream of this connection starts with no window: headers pass, data cannot.
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, conn) = h2::client::Builder::new().initial_window_size(0).handshake(tcp).await?;
    let driver = tokio::spawn(conn);
    let mut sender = send.ready().await?;
    let (answer, mut body) = sender.send_request(call()?, false)?;
    body.send_data(framed(&good), true)?;
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| anyhow::anyhow!("no answer headers within 10 s"))??;
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let ended = tokio::time::timeout(Duration::from_secs(20), body.data())
        .await
        .map_err(|_| anyhow::anyhow!("the stream was still held 20 s after its answer stalled"))?;
    let reason = match ended {
        Some(Err(e)) => e.reason(),
        other => anyhow::bail!("expected the stream reset, got {other:?}"),
    };
    assert_eq!(reason, Some(h2::Reason::CANCEL));
    driver.abort();

    // The agent serves on.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let ok = raw_call(&channel, INFER, good).await?;
    assert!(!pb::ModelInferResponse::decode(ok.as_slice())?.outputs.is_empty());
    tokio::time::timeout(Duration::from_secs(30), agent.stop()).await??;
    Ok(())
}

/// Calls cancelled by their client while queued (each stream reset after its request, the
/// rapid-reset pattern) are not run: the model does no work for answers nobody waits for.
/// Forty calls queue behind one slow worker; once the connection has taken them all (a cheap
/// call on the same connection, answered after them, says so), they are reset; a last call
/// queued behind them tells when the worker has been through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reset_while_queued_are_not_run() -> anyhow::Result<()> {
    use prost::Message as _;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("slow"))?;
    for f in ["model.onnx", "golden.json"] {
        std::fs::copy(root().join("tests/fixtures/models/mlp-slow").join(f), dir.path().join("slow").join(f))?;
    }
    let extra = "[grpc]\nlisten = \"127.0.0.1:0\"\n\n[models.slow]\ninstances = 1\nmax_queue = 256\n";
    let agent = TestAgent::start(&[dir.path().to_path_buf()], extra).await?;
    let addr = agent.agent.grpc_addr().ok_or_else(|| anyhow::anyhow!("no gRPC listener"))?;
    let mut request = mlp_request(vec![1, 30], vec![0; 120]);
    request.model_name = "slow".into();
    let message = framed(&request.encode_to_vec());
    let call = |path: &str| call_to(addr, path, None);
    let runs = |meta: &serde_json::Value| meta["parameters"]["runs"].as_u64().unwrap_or(0);
    let (_, before) = agent.get("/v2/models/slow").await?;

    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(conn);
    let mut queued = Vec::new();
    for _ in 0..40 {
        let mut sender = send.clone().ready().await?;
        let (answer, mut stream) = sender.send_request(call(INFER)?, false)?;
        stream.send_data(message.clone(), true)?;
        queued.push((answer, stream));
    }
    // Streams are taken in order: once this one is answered, the forty are queued.
    let mut sender = send.clone().ready().await?;
    let (live, mut stream) = sender.send_request(call("/inference.GRPCInferenceService/ServerLive")?, false)?;
    stream.send_data(framed(&pb::ServerLiveRequest {}.encode_to_vec()), true)?;
    tokio::time::timeout(Duration::from_secs(30), live)
        .await
        .map_err(|_| anyhow::anyhow!("ServerLive not answered within 30 s"))??;
    for (_, stream) in &mut queued {
        stream.send_reset(h2::Reason::CANCEL);
    }
    drop(queued);

    // A call queued behind them, on another connection: answered once the worker is through.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let last = tokio::time::timeout(Duration::from_secs(60), raw_call(&channel, INFER, request.encode_to_vec()))
        .await
        .map_err(|_| anyhow::anyhow!("the last call was not answered within 60 s"))??;
    assert!(!pb::ModelInferResponse::decode(last.as_slice())?.outputs.is_empty());
    let (_, after) = agent.get("/v2/models/slow").await?;
    let ran = runs(&after) - runs(&before);
    let abandoned = after["parameters"]["abandoned"].as_u64().unwrap_or(0);
    // The one running when the resets came (and a few more on a slow machine) plus the last.
    assert!(ran <= 10, "{ran} runs for 40 cancelled calls and 1 live one: {after}");
    assert!(ran + abandoned >= 41, "{ran} runs and {abandoned} abandoned: {after}");
    driver.abort();
    tokio::time::timeout(Duration::from_secs(30), agent.stop()).await??;
    Ok(())
}

/// With `[auth]` on, a `ModelStreamInfer` stream without credentials is refused as it opens
/// (UNAUTHENTICATED, before any message), instead of being held open waiting for requests it
/// would refuse one by one; with a token the stream serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_credentials_is_refused_as_it_opens() -> anyhow::Result<()> {
    use prost::Message as _;
    let models = mlp_only()?;
    let (secret, entry) =
        outpost::auth::create_token("pos", &[outpost::auth::Role::Infer], None).map_err(anyhow::Error::msg)?;
    let extra = format!("[auth]\ntokens = [{entry}]\n\n[grpc]\nlisten = \"127.0.0.1:0\"\n");
    let agent = TestAgent::start(&[models.path().to_owned()], &extra).await?;
    let addr = agent.agent.grpc_addr().ok_or_else(|| anyhow::anyhow!("no gRPC listener"))?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(conn);
    let open = |token: Option<&str>| call_to(addr, "/inference.GRPCInferenceService/ModelStreamInfer", token);

    for token in [None, Some("opt_not-a-token")] {
        let mut sender = send.clone().ready().await?;
        // The stream is opened and left silent: the answer must not wait for a message.
        let (answer, _silent) = sender.send_request(open(token)?, false)?;
        let status = status_within(answer, &format!("a stream with token {token:?}")).await?;
        assert_eq!(status.as_deref(), Some(&b"16"[..]), "{token:?}");
    }

    let mut sender = send.clone().ready().await?;
    let (answer, mut stream) = sender.send_request(open(Some(&secret))?, false)?;
    stream.send_data(framed(&mlp_request(vec![1, 30], vec![0; 120]).encode_to_vec()), true)?;
    let (_body, _) = first_stream_answer(answer).await?;
    driver.abort();
    tokio::time::timeout(Duration::from_secs(30), agent.stop()).await??;
    Ok(())
}
