//! Processing steps shipped with a model (DESIGN §3, "packages"): what turns a raw input (text,
//! an encoded image, named fields) into the model's tensors, and its outputs into answers
//! (softmax, top-k with labels, thresholds). Declared in the signed manifest (or a local
//! model's `package.json`); the files the steps read are named here with their digests, so
//! they are covered by the same signature as the model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest file a step may read (a tokenizer, a labels file).
pub const MAX_PACKAGE_FILE_BYTES: u64 = 32 << 20;
/// Most files one package may carry.
pub const MAX_PACKAGE_FILES: usize = 16;

/// A package's processing: steps before and after the model, the files they read, and golden
/// vectors from raw input to final output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Processing {
    /// Each step turns one raw input into model inputs; inputs no step names go to the model
    /// as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre: Vec<PreStep>,
    /// Run in order on the model's outputs; each adds or replaces named outputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<PostStep>,
    /// The outputs a caller gets, in order (empty: every output after the steps).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// The files the steps read, by name, with their digests (a registry package must list
    /// every file a step names; a local package may leave this empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileRef>,
    /// Golden vectors of the whole package: raw inputs, final outputs (`engine::golden`
    /// format; a BYTES input with `"encoding": "base64"` carries binary data).
    pub golden: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub sha256: String,
    pub size: u64,
}

/// A pre-processing step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PreStep {
    Text(TextStep),
    Image(ImageStep),
    Tabular(TabularStep),
}

impl PreStep {
    /// The raw input the step reads.
    pub fn input(&self) -> &str {
        match self {
            PreStep::Text(s) => &s.input,
            PreStep::Image(s) => &s.input,
            PreStep::Tabular(s) => &s.input,
        }
    }
}

/// Text (BYTES, UTF-8) through a Hugging Face `tokenizer.json`: token ids, attention mask and
/// token type ids as INT64 `[n, length]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextStep {
    pub input: String,
    /// The package file holding the tokenizer.
    pub tokenizer: String,
    /// Longer texts are truncated to this many tokens (special tokens included).
    pub max_length: usize,
    /// `longest` (the batch's longest text) or `max_length`.
    #[serde(default = "default_padding")]
    pub padding: String,
    /// The id padding uses.
    #[serde(default)]
    pub pad_id: u32,
    /// The model input that takes the token ids.
    #[serde(default = "default_ids")]
    pub input_ids: String,
    /// The model input that takes the attention mask, if the model has one.
    #[serde(default)]
    pub attention_mask: Option<String>,
    /// The model input that takes the token type ids, if the model has one.
    #[serde(default)]
    pub token_type_ids: Option<String>,
    /// Largest text accepted, in bytes.
    #[serde(default = "default_max_text_bytes")]
    pub max_text_bytes: usize,
}

fn default_padding() -> String {
    "longest".into()
}

fn default_ids() -> String {
    "input_ids".into()
}

fn default_max_text_bytes() -> usize {
    64 << 10
}

/// An encoded image (BYTES: PNG or JPEG) decoded, resized, normalized and laid out as FP32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageStep {
    pub input: String,
    /// The model input that takes the pixels.
    pub output: String,
    /// Accepted encodings: `png`, `jpeg`.
    #[serde(default = "default_formats")]
    pub formats: Vec<String>,
    pub width: u32,
    pub height: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u8,
    /// `nchw` or `nhwc`.
    #[serde(default = "default_layout")]
    pub layout: String,
    /// Each pixel value (0-255) is multiplied by this, then `(x - mean[c]) / std[c]`.
    #[serde(default = "default_scale")]
    pub scale: f32,
    #[serde(default)]
    pub mean: Vec<f32>,
    #[serde(default)]
    pub std: Vec<f32>,
    /// Largest encoded image accepted, in bytes.
    #[serde(default = "default_max_image_bytes")]
    pub max_bytes: usize,
    /// Largest decoded image (width × height), checked from the header before decoding.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

fn default_formats() -> Vec<String> {
    vec!["png".into(), "jpeg".into()]
}

fn default_layout() -> String {
    "nchw".into()
}

fn default_scale() -> f32 {
    1.0 / 255.0
}

fn default_max_image_bytes() -> usize {
    16 << 20
}

fn default_max_pixels() -> u64 {
    16 << 20
}

/// Named fields (BYTES: a JSON object, or a CSV line in field order) mapped to an FP32
/// `[n, fields]` input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TabularStep {
    pub input: String,
    pub output: String,
    pub fields: Vec<Field>,
}

/// One field: its value becomes `(x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub name: String,
    #[serde(default)]
    pub mean: f32,
    #[serde(default = "one")]
    pub std: f32,
    /// Used when the field is absent; without one, an absent field is an error.
    #[serde(default)]
    pub default: Option<f32>,
}

fn one() -> f32 {
    1.0
}

/// A post-processing step, on one model output (FP32 `[n, classes]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PostStep {
    /// Softmax over the last axis, in place.
    Softmax { output: String },
    /// The `k` best classes of each row: their labels (BYTES, from the labels file, one per
    /// line) as `labels_output` and their scores (FP32) as `scores_output`, best first.
    TopK { output: String, k: usize, labels: String, labels_output: String, scores_output: String },
    /// `output >= threshold`, element-wise, as BOOL `as`.
    Threshold {
        output: String,
        threshold: f32,
        #[serde(rename = "as")]
        name: String,
    },
}
