//! Triton's extensions over the V2 protocol, shared by the HTTP and gRPC adapters: the model
//! configuration and the statistics, as protobuf messages and as Triton's JSON.

use super::{InferError, InferenceService};
use crate::protocol::grpc as pb;

/// The V2 extensions served (HTTP and gRPC alike).
pub const EXTENSIONS: [&str; 4] = ["model_repository", "binary_tensor_data", "model_configuration", "statistics"];

/// Triton's model configuration of a model or pipeline, by name (`version` for a model).
pub fn config_for(
    service: &InferenceService,
    name: &str,
    version: Option<&str>,
) -> Result<pb::ModelConfig, InferError> {
    if let Some(p) = service.pipelines.get(name) {
        let (inputs, outputs) = p.io(&service.repository);
        return Ok(config_of(&p.name, "pipeline", None, &inputs, &outputs));
    }
    Ok(model_config(&*service.repository.serving(name, version)?))
}

/// Triton's model configuration for a serving version: its tensors, and with batching the
/// batch size it takes (dims then leave out the batch dimension).
pub fn model_config(served: &crate::engine::Served) -> pb::ModelConfig {
    // What callers send and get: a package's raw inputs and final outputs.
    let (inputs, outputs) = served.io();
    config_of(&served.name, "onnx", served.batching.as_ref(), &inputs, &outputs)
}

fn config_of(
    name: &str,
    platform: &str,
    batch: Option<&crate::engine::BatchPolicy>,
    inputs: &[crate::engine::package::Spec],
    outputs: &[crate::engine::package::Spec],
) -> pb::ModelConfig {
    let dims = |shape: &[i64]| {
        if batch.is_some() {
            shape.get(1..).unwrap_or_default().to_vec()
        } else {
            shape.to_vec()
        }
    };
    pb::ModelConfig {
        name: name.to_owned(),
        platform: platform.into(),
        // A pipeline is run by the agent itself, its models by tract.
        backend: if platform == "pipeline" { "outpost" } else { "tract" }.into(),
        max_batch_size: batch.map_or(0, |b| i32::try_from(b.max_batch).unwrap_or(i32::MAX)),
        input: inputs
            .iter()
            .map(|(name, datatype, shape)| pb::ModelTensorConfig {
                name: name.clone(),
                data_type: pb::ConfigDataType::from(*datatype) as i32,
                dims: dims(shape),
            })
            .collect(),
        output: outputs
            .iter()
            .map(|(name, datatype, shape)| pb::ModelOutputConfig {
                name: name.clone(),
                data_type: pb::ConfigDataType::from(*datatype) as i32,
                dims: dims(shape),
            })
            .collect(),
        dynamic_batching: batch.map(|b| pb::ModelDynamicBatching {
            preferred_batch_size: b.preferred.iter().map(|&p| i32::try_from(p).unwrap_or(i32::MAX)).collect(),
            max_queue_delay_microseconds: b.max_delay.as_micros() as u64,
        }),
    }
}

/// The same configuration as Triton's JSON (`GET /v2/models/{name}/config`).
pub fn model_config_json(c: &pb::ModelConfig) -> serde_json::Value {
    let name = |d: i32| pb::ConfigDataType::try_from(d).map_or("TYPE_INVALID".to_owned(), |t| t.as_str().to_owned());
    let mut v = serde_json::json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|t| serde_json::json!({"name": t.name, "data_type": name(t.data_type), "dims": t.dims})).collect::<Vec<_>>(),
        "output": c.output.iter().map(|t| serde_json::json!({"name": t.name, "data_type": name(t.data_type), "dims": t.dims})).collect::<Vec<_>>(),
    });
    if let Some(b) = &c.dynamic_batching {
        v["dynamic_batching"] = serde_json::json!({
            "preferred_batch_size": b.preferred_batch_size,
            "max_queue_delay_microseconds": b.max_queue_delay_microseconds,
        });
    }
    v
}

/// Triton's statistics extension: one entry per version that served requests (of `name`, or
/// of every model when empty).
pub fn statistics(
    service: &InferenceService,
    name: &str,
    version: Option<&str>,
) -> Result<pb::ModelStatisticsResponse, InferError> {
    if !name.is_empty() && service.repository.status(name).is_none() {
        return Err(InferError::ModelNotFound(name.to_owned()));
    }
    let stats = service.metrics.statistics((!name.is_empty()).then_some(name));
    let d = |count: u64, ns: u64| Some(pb::StatisticDuration { count, ns });
    let model_stats = stats
        .into_iter()
        .filter(|s| version.is_none_or(|v| v == s.version))
        .map(|s| pb::ModelStatistics {
            name: s.name,
            version: s.version,
            last_inference: s.last_inference_ms,
            inference_count: s.success,
            execution_count: s.executions,
            inference_stats: Some(pb::InferStatistics {
                success: d(s.success, s.success_ns),
                fail: d(s.fail, s.fail_ns),
                queue: d(s.success, s.success_ns.saturating_sub(s.compute_ns)),
                compute_input: d(s.executions, 0),
                compute_infer: d(s.executions, s.compute_ns),
                compute_output: d(s.executions, 0),
                cache_hit: d(0, 0),
                cache_miss: d(0, 0),
            }),
        })
        .collect();
    Ok(pb::ModelStatisticsResponse { model_stats })
}

/// The statistics as Triton's JSON (`GET /v2/models/{name}/stats`).
pub fn statistics_json(r: &pb::ModelStatisticsResponse) -> serde_json::Value {
    let d = |x: &Option<pb::StatisticDuration>| {
        let x = x.unwrap_or_default();
        serde_json::json!({ "count": x.count, "ns": x.ns })
    };
    serde_json::json!({
        "model_stats": r.model_stats.iter().map(|m| {
            let s = m.inference_stats.clone().unwrap_or_default();
            serde_json::json!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": {
                    "success": d(&s.success), "fail": d(&s.fail), "queue": d(&s.queue),
                    "compute_input": d(&s.compute_input), "compute_infer": d(&s.compute_infer),
                    "compute_output": d(&s.compute_output), "cache_hit": d(&s.cache_hit), "cache_miss": d(&s.cache_miss),
                },
                "batch_stats": [],
            })
        }).collect::<Vec<_>>(),
    })
}
