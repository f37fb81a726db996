//! The gRPC adapter: the Open Inference Protocol's `inference.GRPCInferenceService` with the
//! Triton extensions `tritonclient.grpc` calls, and the standard `grpc.health.v1` service, on
//! their own listener (`[grpc]`). A thin layer like HTTP's: the same access control
//! ([`HttpState::admit`]), then [`crate::api::InferenceService`], so routing, overflow, the
//! cache, batching, audit and metrics are the ones every transport shares. The listener is the
//! HTTP server's ([`crate::http::server`]): the same TLS (reloaded with it), connection limits
//! and timeouts, with HTTP/2 only in practice.
//!
//! Messages are prost structs (`outpost_proto::protocol::grpc`); the service table is written
//! here rather than generated, so the build needs no `protoc`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse as _;
use futures::StreamExt as _;
use prost::Message;
use tonic::Status;

use crate::api::triton::{statistics, EXTENSIONS};
use crate::api::{InferError, RequestContext, Transport};
use crate::auth::{Permission, Principal};
use crate::http::{HttpState, Refusal};
use crate::protocol::grpc as pb;

/// Requests of one `ModelStreamInfer` stream run at once; more wait for a free slot.
const STREAM_CONCURRENCY: usize = 64;

/// Both gRPC services, as the gRPC listener serves them (see [`Services`]).
pub fn services(state: HttpState, max_message_bytes: usize, started: tokio::sync::watch::Receiver<bool>) -> Services {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Overall health follows the agent's readiness to take inference (models loaded).
    tokio::spawn(follow_readiness(health, started));
    let health = tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: axum::extract::Request| {
        let health = health_service.clone();
        async move {
            match tower::ServiceExt::oneshot(health, req).await {
                Ok(answer) => Ok(answer.into_response()),
                Err(never) => match never {},
            }
        }
    }));
    Services { shared: Arc::new(Shared { state, max: max_message_bytes }), health }
}

/// The gRPC listener's service table: a call goes by its path's service name to the inference
/// service or to the health service; anything else is UNIMPLEMENTED, and a request that is not
/// gRPC gets 415. Matched by prefix here, without a general router: every inference call
/// takes this path.
#[derive(Clone)]
pub struct Services {
    shared: Arc<Shared>,
    health: tower::util::BoxCloneSyncService<axum::extract::Request, axum::response::Response, Infallible>,
}

impl tower::Service<axum::extract::Request> for Services {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = futures::future::Either<
        futures::future::Map<BoxFuture<axum::response::Response>, Answered>,
        BoxFuture<Result<axum::response::Response, Infallible>>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        use futures::future::Either;
        use futures::FutureExt as _;
        let path = req.uri().path();
        let inference =
            path.strip_prefix('/').and_then(|p| p.strip_prefix(pb::SERVICE)).is_some_and(|p| p.starts_with('/'));
        let health = path.starts_with("/grpc.health.v1.Health/");
        if !is_grpc(&req) {
            return Either::Right(Box::pin(std::future::ready(Ok(not_grpc()))));
        }
        if inference {
            // The call's path, for the records of refused calls (tonic's request has no URI).
            let path = MethodPath(req.uri().clone());
            let mut req = req;
            req.extensions_mut().insert(path);
            return Either::Left(dispatch(self.shared.clone(), req).map(Ok as Answered));
        }
        if health {
            return Either::Right(self.health.call(req));
        }
        let answer = status_response(Status::unimplemented(format!("no such method: {}", bounded(path))));
        Either::Right(Box::pin(std::future::ready(Ok(answer))))
    }
}

/// A request path cut to at most 256 bytes (on a character boundary), for messages and records.
fn bounded(path: &str) -> &str {
    let mut end = path.len().min(256);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// gRPC's own headers, named once: a lookup by a string parses the name on every call.
const GRPC_ENCODING: axum::http::HeaderName = axum::http::HeaderName::from_static("grpc-encoding");
const GRPC_TIMEOUT: axum::http::HeaderName = axum::http::HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: axum::http::HeaderName = axum::http::HeaderName::from_static("grpc-status");

/// Whether a request is gRPC (its content type says so).
fn is_grpc(req: &axum::extract::Request) -> bool {
    req.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The answer to a request that is not gRPC (a browser, curl, an HTTP client at the wrong
/// port): 415, as the gRPC protocol asks, rather than an empty 200.
fn not_grpc() -> axum::response::Response {
    (
        axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "this port serves gRPC (content-type application/grpc); the HTTP API is on http.listen\n",
    )
        .into_response()
}

async fn follow_readiness(
    health: tonic_health::server::HealthReporter,
    mut started: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_service_status(pb::SERVICE, ServingStatus::NotServing).await;
    if started.wait_for(|s| *s).await.is_ok() {
        health.set_service_status("", ServingStatus::Serving).await;
        health.set_service_status(pb::SERVICE, ServingStatus::Serving).await;
    }
}

/// A gRPC answer carrying only a status (for paths no service serves).
fn status_response(status: Status) -> axum::response::Response {
    status.into_http::<Body>()
}

struct Shared {
    state: HttpState,
    max: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The service's answer as `tower` wants it (it never fails).
type Answered = fn(axum::response::Response) -> Result<axum::response::Response, Infallible>;

/// The path of a call (`/inference.GRPCInferenceService/ModelInfer`).
#[derive(Clone)]
struct MethodPath(axum::http::Uri);

/// Who called and by when the answer is due.
struct Call {
    principal: Principal,
    timeout: Duration,
}

/// The call's method, each boxed on its own: the allocation is the size of the one method's
/// state, not of the largest.
fn dispatch(s: Arc<Shared>, req: axum::extract::Request) -> BoxFuture<axum::http::Response<Body>> {
    let method = req.uri().path().rsplit('/').next().unwrap_or_default();
    match method {
        "ServerLive" => Box::pin(unary(
            s,
            req,
            |_: &pb::ServerLiveRequest| Permission::Public,
            |_, _, _| async { Ok(pb::ServerLiveResponse { live: true }) },
        )),
        "ServerReady" => Box::pin(unary(
            s,
            req,
            |_: &pb::ServerReadyRequest| Permission::Public,
            |s, _, _| async move { Ok(pb::ServerReadyResponse { ready: crate::http::not_ready(&s.state).is_none() }) },
        )),
        "ModelReady" => Box::pin(unary(
            s,
            req,
            |_: &pb::ModelRef| Permission::Read,
            |s, _, r| async move {
                if let Some(p) = s.state.service.pipelines.get(&r.name) {
                    return Ok(pb::ModelReadyResponse { ready: p.ready(&s.state.service.repository).is_ok() });
                }
                let ready = s.state.service.repository.serving(&r.name, version(&r.version)).is_ok();
                if !ready && s.state.service.repository.status(&r.name).is_none() {
                    return Err(Status::not_found(format!("unknown model '{}'", r.name)));
                }
                Ok(pb::ModelReadyResponse { ready })
            },
        )),
        "ServerMetadata" => Box::pin(unary(
            s,
            req,
            |_: &pb::ServerMetadataRequest| Permission::Read,
            |_, _, _| async {
                Ok(pb::ServerMetadataResponse {
                    name: "outpost".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
                })
            },
        )),
        "ModelMetadata" => Box::pin(unary(
            s,
            req,
            |_: &pb::ModelRef| Permission::Read,
            |s, _, r| async move {
                let spec = |(name, datatype, shape): crate::engine::package::Spec| pb::TensorMetadata {
                    name,
                    datatype: datatype.as_str().to_owned(),
                    shape,
                };
                if let Some(p) = s.state.service.pipelines.get(&r.name) {
                    let (inputs, outputs) = p.io(&s.state.service.repository);
                    return Ok(pb::ModelMetadataResponse {
                        name: p.name.clone(),
                        versions: vec![p.version.clone()],
                        platform: "pipeline".into(),
                        inputs: inputs.into_iter().map(spec).collect(),
                        outputs: outputs.into_iter().map(spec).collect(),
                    });
                }
                let served = s.state.service.repository.serving(&r.name, version(&r.version)).map_err(status)?;
                let (inputs, outputs) = served.io();
                Ok(pb::ModelMetadataResponse {
                    name: served.name.clone(),
                    versions: s.state.service.repository.versions(&r.name),
                    platform: "onnx".into(),
                    inputs: inputs.into_iter().map(spec).collect(),
                    outputs: outputs.into_iter().map(spec).collect(),
                })
            },
        )),
        "ModelConfig" => Box::pin(unary(
            s,
            req,
            |_: &pb::ModelRef| Permission::Read,
            |s, _, r| async move {
                let config =
                    crate::api::triton::config_for(&s.state.service, &r.name, version(&r.version)).map_err(status)?;
                Ok(pb::ModelConfigResponse { config: Some(config) })
            },
        )),
        "ModelStatistics" => Box::pin(unary(
            s,
            req,
            |_: &pb::ModelRef| Permission::Observe,
            |s, _, r| async move { statistics(&s.state.service, &r.name, version(&r.version)).map_err(status) },
        )),
        "RepositoryIndex" => Box::pin(unary(
            s,
            req,
            |_: &pb::RepositoryIndexRequest| Permission::Observe,
            |s, _, r| async move {
                let models = s
                    .state
                    .service
                    .repository
                    .list()
                    .into_iter()
                    .filter(|(_, st, _)| !r.ready || st.state == crate::api::ModelState::Ready)
                    .map(|(name, st, _)| pb::ModelIndex {
                        name,
                        version: st.version.unwrap_or_default(),
                        state: st.state.as_str().to_owned(),
                        reason: st.reason.unwrap_or_default(),
                    })
                    .collect();
                Ok(pb::RepositoryIndexResponse { models })
            },
        )),
        "RepositoryModelLoad" | "RepositoryModelUnload" => {
            let load = method == "RepositoryModelLoad";
            Box::pin(unary(
                s,
                req,
                |_: &pb::RepositoryModelRequest| Permission::Admin,
                move |s, call, r| async move {
                    // tritonclient always sends `unload_dependents` (there are none here). A
                    // model's files and settings come from the registry and the configuration:
                    // `config` and `file:` overrides are refused rather than ignored.
                    if let Some(key) = r.parameters.keys().find(|k| k.as_str() != "unload_dependents") {
                        return Err(Status::invalid_argument(format!(
                            "parameter '{key}' is not taken here: a model's files and settings come from the \
                             registry and the configuration"
                        )));
                    }
                    let control = &s.state.control;
                    let result =
                        if load { control.load(r.model_name.clone()) } else { control.unload(r.model_name.clone()) }
                            .await;
                    let action = if load { "load" } else { "unload" };
                    let outcome = result.as_ref().map_or_else(|e| e.to_string(), Clone::clone);
                    s.state.audit_admin(&call.principal, action, &r.model_name, &outcome).await;
                    result.map(|_| pb::Empty {}).map_err(|e| {
                        use crate::api::control::ControlError;
                        match e {
                            ControlError::NotFound(m) => Status::not_found(format!("unknown model '{m}'")),
                            ControlError::Failed(m) => Status::invalid_argument(m),
                            ControlError::Unavailable(m) => with_retry(Status::unavailable(m), Duration::from_secs(1)),
                        }
                    })
                },
            ))
        }
        "ModelInfer" => Box::pin(unary(
            s,
            req,
            |r: &pb::ModelInferRequest| Permission::Infer(r.model_name.clone()),
            |s, call, r| async move { infer(&s, &call, r).await },
        )),
        "ModelStreamInfer" => Box::pin(stream_infer(s, req)),
        _ => {
            let answer = status_response(Status::unimplemented(format!("{}/{method} is not served here", pb::SERVICE)));
            Box::pin(std::future::ready(answer))
        }
    }
}

fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// One unary call: read the one message (size-capped), decode it, admit, run `f`, encode.
/// Written against HTTP/2 directly rather than through tonic's server machinery (a request
/// stream, an encoder stream and metadata conversions per call): a unary call is one framed
/// message each way, and this is the path every inference takes.
async fn unary<M, R, P, F, Fut>(
    s: Arc<Shared>,
    req: axum::extract::Request,
    permission: P,
    f: F,
) -> axum::http::Response<Body>
where
    M: Message + Default + Send + 'static,
    R: Reply,
    P: Fn(&M) -> Permission,
    F: FnOnce(Arc<Shared>, Call, M) -> Fut,
    Fut: Future<Output = Result<R, Status>>,
{
    let (parts, mut body) = req.into_parts();
    let answer = async {
        refuse_encoding(&parts.headers)?;
        // The call's deadline covers its message's arrival too: a slow sender is cut off, as
        // an HTTP body is.
        let timeout = call_timeout(&s.state, &parts.headers);
        let message = tokio::time::timeout(timeout, read_message(&mut body, s.max))
            .await
            .map_err(|_| Status::deadline_exceeded("the request message did not arrive before the deadline"))??;
        let request =
            M::decode(message).map_err(|e| Status::invalid_argument(format!("the message does not decode: {e}")))?;
        let call = admit(&s.state, &parts.headers, &parts.extensions, &permission(&request), timeout).await?;
        f(s, call, request).await
    };
    match answer.await {
        // The request's head and spent body go with the answer, so they are freed after it
        // is written rather than before.
        Ok(r) => framed_response(r, (parts, body)),
        Err(status) => status_response(status),
    }
}

/// A request in a compression the agent does not take (it announces none, so a client
/// compresses only when told to by its user).
fn refuse_encoding(headers: &axum::http::HeaderMap) -> Result<(), Status> {
    match headers.get(GRPC_ENCODING).map(axum::http::HeaderValue::as_bytes) {
        None | Some(b"identity") => Ok(()),
        Some(other) => Err(Status::unimplemented(format!(
            "compression '{}' is not taken here: send messages uncompressed (identity)",
            String::from_utf8_lossy(other).chars().take(32).collect::<String>()
        ))),
    }
}

/// The one length-prefixed message of a unary request, read up to `max` bytes: a message
/// declared larger is refused when its prefix arrives, before its bytes are read.
async fn read_message(body: &mut Body, max: usize) -> Result<bytes::Bytes, Status> {
    use http_body_util::BodyExt as _;
    let mut got = Received::default();
    let mut declared: Option<usize> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::cancelled(format!("the request ended early: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        got.push(data);
        let bytes = got.as_slice();
        if declared.is_none() && bytes.len() >= 5 {
            match bytes[0] {
                0 => {}
                1 => {
                    return Err(Status::unimplemented("compressed messages are not taken here: send them uncompressed"))
                }
                flag => return Err(Status::invalid_argument(format!("bad message flag {flag} (0 or 1)"))),
            }
            let n = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            if n > max {
                return Err(Status::out_of_range(format!(
                    "the message is {n} bytes, over grpc.max_message_bytes: the limit is: {max} bytes"
                )));
            }
            declared = Some(n);
        }
        if declared.is_some_and(|n| bytes.len() > 5 + n) {
            return Err(Status::invalid_argument("a unary call carries one message; this one carries more"));
        }
    }
    let all = got.into_bytes();
    match declared {
        Some(n) if all.len() == 5 + n => Ok(all.slice(5..)),
        Some(n) => Err(Status::invalid_argument(format!(
            "the request ended inside its message ({} of {n} bytes)",
            all.len() - 5
        ))),
        None => Err(Status::invalid_argument("a unary call carries one message; this one carries none")),
    }
}

/// A request body as it arrives: most come in one chunk, kept as it is; more are joined.
#[derive(Default)]
enum Received {
    #[default]
    Nothing,
    One(bytes::Bytes),
    Joined(bytes::BytesMut),
}

impl Received {
    fn push(&mut self, data: bytes::Bytes) {
        *self = match std::mem::take(self) {
            Received::Nothing => Received::One(data),
            Received::One(head) => {
                let mut all = bytes::BytesMut::with_capacity(head.len() + data.len());
                all.extend_from_slice(&head);
                all.extend_from_slice(&data);
                Received::Joined(all)
            }
            Received::Joined(mut all) => {
                all.extend_from_slice(&data);
                Received::Joined(all)
            }
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Received::Nothing => &[],
            Received::One(b) => b,
            Received::Joined(b) => b,
        }
    }

    fn into_bytes(self) -> bytes::Bytes {
        match self {
            Received::Nothing => bytes::Bytes::new(),
            Received::One(b) => b,
            Received::Joined(b) => b.freeze(),
        }
    }
}

/// What a unary method answers: the message sent back, and with it anything that may wait to
/// be freed until the answer is written.
trait Reply: Send + 'static {
    type Message: Message;
    fn message(&self) -> &Self::Message;
}

/// Messages answered alone.
macro_rules! replies {
    ($($t:ty),* $(,)?) => {$(
        impl Reply for $t {
            type Message = $t;
            fn message(&self) -> &$t {
                self
            }
        }
    )*};
}

replies!(
    pb::ServerLiveResponse,
    pb::ServerReadyResponse,
    pb::ModelReadyResponse,
    pb::ServerMetadataResponse,
    pb::ModelMetadataResponse,
    pb::ModelConfigResponse,
    pb::ModelStatisticsResponse,
    pb::RepositoryIndexResponse,
    pb::Empty,
);

/// A message and what is left of the request that made it.
impl<M: Message + Send + 'static, K: Send + 'static> Reply for (M, K) {
    type Message = M;
    fn message(&self) -> &M {
        &self.0
    }
}

/// A successful unary answer: the message, framed, then `grpc-status: 0` in the trailers. The
/// reply, and `spent` (what is left of the request), ride along in the body, so they are
/// freed when the body is, after the answer is written (see `http::h2conn`).
fn framed_response<R: Reply, K: Send + 'static>(r: R, spent: K) -> axum::http::Response<Body> {
    use bytes::BufMut as _;
    let message = r.message();
    let len = message.encoded_len();
    let mut buf = bytes::BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // The buffer has room for the message: encoding cannot fail.
    let _ = message.encode(&mut buf);
    let mut trailers = axum::http::HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, axum::http::HeaderValue::from_static("0"));
    let mut response = axum::http::Response::new(Body::new(OneMessage {
        data: Some(buf.freeze()),
        trailers: Some(trailers),
        _spent: Box::new((r, spent)),
    }));
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/grpc"));
    response
}

/// A body of one data frame and then trailers.
struct OneMessage {
    data: Option<bytes::Bytes>,
    trailers: Option<axum::http::HeaderMap>,
    /// The answer's message and the request's remains, freed with the body.
    _spent: Box<dyn Send>,
}

impl hyper::body::Body for OneMessage {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(hyper::body::Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// Access control for one call (or one message of a stream), as HTTP's.
async fn admit(
    state: &HttpState,
    headers: &axum::http::HeaderMap,
    extensions: &axum::http::Extensions,
    permission: &Permission,
    timeout: Duration,
) -> Result<Call, Status> {
    let path = extensions.get::<MethodPath>().map_or("grpc", |p| bounded(p.0.path()));
    let authorization = headers.get(axum::http::header::AUTHORIZATION).map(axum::http::HeaderValue::as_bytes);
    let peer = extensions.get::<crate::http::server::Peer>();
    let principal = state.admit(permission, authorization, peer, path, "grpc").await.map_err(|r| match r {
        Refusal::Unauthenticated(m) => Status::unauthenticated(m),
        Refusal::Forbidden(m) => Status::permission_denied(m),
        Refusal::SourceBlocked { message, retry_after } | Refusal::RateLimited { message, retry_after } => {
            with_retry(Status::resource_exhausted(message), retry_after)
        }
    })?;
    Ok(Call { principal, timeout })
}

/// A call's deadline: the client's (`grpc-timeout`), at most `http.request_timeout`.
fn call_timeout(state: &HttpState, headers: &axum::http::HeaderMap) -> Duration {
    let limit = state.config().http.request_timeout;
    headers.get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_timeout).map_or(limit, |t| t.min(limit))
}

/// Prost's codec with one change: a request that does not decode is the client's error,
/// `INVALID_ARGUMENT` (tonic's codec says `INTERNAL`, the code for the server's own faults).
/// Used by the streaming call, which tonic frames.
struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(std::marker::PhantomData)
    }
}

struct Decoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|e| Status::invalid_argument(format!("the message does not decode: {}", e.message())))
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(tonic_prost::ProstDecoder::default())
    }
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The status for an inference error (as HTTP maps them to 404, 400, 503 and 500).
fn status(e: InferError) -> Status {
    match e {
        InferError::ModelNotFound(_) | InferError::VersionNotFound { .. } => Status::not_found(e.to_string()),
        InferError::InvalidInput(m) => Status::invalid_argument(m),
        InferError::NotReady(_) => with_retry(Status::unavailable(e.to_string()), Duration::from_secs(1)),
        InferError::Overloaded { retry_after, .. } => {
            with_retry(Status::resource_exhausted(e.to_string()), retry_after)
        }
        InferError::DeadlineExceeded => Status::deadline_exceeded(e.to_string()),
        InferError::Unavailable(_) => with_retry(Status::unavailable(e.to_string()), Duration::from_secs(30)),
        InferError::Internal(m) => Status::internal(m),
    }
}

/// `google.rpc.Status` with a `google.rpc.RetryInfo` detail, as `grpc-status-details-bin`.
mod rich {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Duration {
        #[prost(int64, tag = "1")]
        pub(super) seconds: i64,
        #[prost(int32, tag = "2")]
        pub(super) nanos: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub(super) retry_delay: Option<Duration>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Any {
        #[prost(string, tag = "1")]
        pub(super) type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub(super) value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct RpcStatus {
        #[prost(int32, tag = "1")]
        pub(super) code: i32,
        #[prost(string, tag = "2")]
        pub(super) message: String,
        #[prost(message, repeated, tag = "3")]
        pub(super) details: Vec<Any>,
    }
}

/// A status that tells the client when to retry: a `google.rpc.RetryInfo` detail and a
/// `retry-after` metadata entry (seconds, as HTTP's header).
fn with_retry(s: Status, after: Duration) -> Status {
    let info = rich::RetryInfo {
        retry_delay: Some(rich::Duration { seconds: after.as_secs() as i64, nanos: after.subsec_nanos() as i32 }),
    };
    let details = rich::RpcStatus {
        code: s.code() as i32,
        message: s.message().to_owned(),
        details: vec![rich::Any {
            type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
            value: info.encode_to_vec(),
        }],
    };
    let mut out = Status::with_details(s.code(), s.message(), details.encode_to_vec().into());
    if let Ok(v) = after.as_secs().max(1).to_string().parse() {
        out.metadata_mut().insert("retry-after", v);
    }
    out
}

/// One inference through the shared service: its answer, and what is left of its request and
/// context (for the caller to free after the answer is written).
async fn infer(
    s: &Shared,
    call: &Call,
    mut r: pb::ModelInferRequest,
) -> Result<(pb::ModelInferResponse, impl Send + 'static), Status> {
    let (request, raw) = match pb::take_request_from_grpc(&mut r) {
        Ok(x) => x,
        Err(e) => {
            s.state.service.metrics.record_http_error();
            return Err(Status::invalid_argument(e.to_string()));
        }
    };
    let mut ctx = RequestContext::new(Transport::Grpc, call.timeout);
    ctx.principal.clone_from(&call.principal.name);
    if let Some(id) = &request.id {
        ctx.id = id.clone();
    }
    let wanted = version(&r.model_version);
    let response = s.state.service.infer(&ctx, &r.model_name, wanted, request).await.map_err(status)?;
    Ok((pb::response_to_grpc(response, raw), (r, ctx)))
}

/// `ModelStreamInfer`: many requests on one stream, the stream refused at once without
/// credentials (when `[auth]` is on), each request admitted on its own (its model's role, the
/// rate limit), up to [`STREAM_CONCURRENCY`] running at once; answers go back as
/// they finish, each carrying its request's id. A failed request is answered in the stream
/// (`error_message`) and the stream goes on, as Triton does.
async fn stream_infer(s: Arc<Shared>, req: axum::extract::Request) -> axum::http::Response<Body> {
    let max = s.max;
    let mut grpc = tonic::server::Grpc::new(Codec::<pb::ModelStreamInferResponse, pb::ModelInferRequest>::default())
        .apply_max_message_size_config(Some(max), Some(max));
    let svc = tower::service_fn(move |request: tonic::Request<tonic::Streaming<pb::ModelInferRequest>>| {
        let s = s.clone();
        async move {
            // The stream's credentials and deadline apply to each of its requests.
            let (metadata, extensions, incoming) = request.into_parts();
            let headers = metadata.into_headers();
            // Credentials are checked as the stream opens: a client without them holds no
            // stream (each request is then admitted for its own model, as below).
            admit(&s.state, &headers, &extensions, &Permission::Read, call_timeout(&s.state, &headers)).await?;
            let headers = Arc::new(headers);
            let extensions = Arc::new(extensions);
            let stream_s = s.clone();
            let answers = incoming
                .map(move |msg| {
                    let s = stream_s.clone();
                    let (headers, extensions) = (headers.clone(), extensions.clone());
                    async move {
                        let r = msg?;
                        let id = r.id.clone();
                        let permission = Permission::Infer(r.model_name.clone());
                        let answer =
                            match admit(&s.state, &headers, &extensions, &permission, call_timeout(&s.state, &headers))
                                .await
                            {
                                Ok(call) => infer(&s, &call, r).await.map(|(answer, _)| answer),
                                Err(e) => Err(e),
                            };
                        Ok(match answer {
                            Ok(resp) => pb::ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(resp),
                            },
                            Err(e) => pb::ModelStreamInferResponse {
                                error_message: e.message().to_owned(),
                                infer_response: Some(pb::ModelInferResponse { id, ..Default::default() }),
                            },
                        })
                    }
                })
                .buffer_unordered(STREAM_CONCURRENCY);
            Ok::<_, Status>(tonic::Response::new(answers))
        }
    });
    grpc.streaming(svc, req).await.map(Body::new)
}

#[cfg(test)]
mod tests {
    use super::{bounded, parse_timeout};
    use std::time::Duration;

    #[test]
    fn paths_in_records_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("/inference.GRPCInferenceService/ModelInfer"), "/inference.GRPCInferenceService/ModelInfer");
        let long = format!("/{}", "é".repeat(200));
        let cut = bounded(&long);
        assert!(cut.len() <= 256 && cut.len() >= 254, "{}", cut.len());
        assert!(long.starts_with(cut));
    }

    #[test]
    fn grpc_timeouts_parse_by_unit_and_refuse_garbage() {
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
