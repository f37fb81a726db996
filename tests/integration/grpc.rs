//! The gRPC listener attacked with a raw client (tonic): bytes that are no protobuf, messages
//! over the size limit, hostile shapes, unknown methods and services, HTTP/1.1 on the gRPC
//! port, a stream dropped mid-flight. Each gets its status code and the agent serves on.

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
