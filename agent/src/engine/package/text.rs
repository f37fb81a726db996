//! Text in, token ids out: a Hugging Face `tokenizer.json` run by the `tokenizers` crate.

use outpost_proto::registry::package::TextStep;
use tokenizers::{Tokenizer, TruncationParams};

use crate::protocol::{Tensor, TensorData};

/// Longest sequence a step may declare.
const MAX_LENGTH: usize = 8192;
/// Most token positions (texts × length) one request may fill (32 MiB per INT64 tensor).
const MAX_REQUEST_TOKENS: usize = 4 << 20;

pub(super) struct Text {
    step: TextStep,
    tokenizer: Tokenizer,
    fixed: bool,
}

impl Text {
    pub(super) fn build(step: &TextStep, json: &[u8]) -> Result<Text, String> {
        if step.max_length == 0 || step.max_length > MAX_LENGTH {
            return Err(format!("text step: max_length must be 1-{MAX_LENGTH}"));
        }
        let fixed = match step.padding.as_str() {
            "longest" => false,
            "max_length" => true,
            other => return Err(format!("text step: padding '{other}' is not longest or max_length")),
        };
        let built = std::panic::catch_unwind(|| -> Result<Tokenizer, String> {
            let mut t = Tokenizer::from_bytes(json).map_err(|e| format!("tokenizer '{}': {e}", step.tokenizer))?;
            t.with_truncation(Some(TruncationParams { max_length: step.max_length, ..Default::default() }))
                .map_err(|e| format!("tokenizer '{}': {e}", step.tokenizer))?;
            t.with_padding(None);
            Ok(t)
        })
        .map_err(|_| format!("tokenizer '{}' cannot be loaded", step.tokenizer))??;
        Ok(Text { step: step.clone(), tokenizer: built, fixed })
    }

    pub(super) fn feeds(&self) -> Vec<&str> {
        let s = &self.step;
        std::iter::once(s.input_ids.as_str())
            .chain(s.attention_mask.as_deref())
            .chain(s.token_type_ids.as_deref())
            .collect()
    }

    pub(super) fn input(&self) -> &str {
        &self.step.input
    }

    /// `[n]` texts to `[n, length]` ids, mask and type ids (those the model takes).
    pub(super) fn run(&self, t: &Tensor) -> Result<Vec<Tensor>, String> {
        let texts = super::items(t, "text")?;
        // Bounded before tokenizing: padded to max_length, this is the tensor's size.
        if texts.len() * self.step.max_length > MAX_REQUEST_TOKENS.max(self.step.max_length) {
            return Err(format!(
                "input '{}': {} texts of up to {} tokens are more than one request takes; send at most {}",
                t.name,
                texts.len(),
                self.step.max_length,
                MAX_REQUEST_TOKENS / self.step.max_length
            ));
        }
        let mut encoded = Vec::with_capacity(texts.len());
        for (i, b) in texts.iter().enumerate() {
            if b.len() > self.step.max_text_bytes {
                return Err(format!(
                    "input '{}' item {i} is {} bytes of text; at most {}",
                    t.name,
                    b.len(),
                    self.step.max_text_bytes
                ));
            }
            let s = std::str::from_utf8(b).map_err(|_| format!("input '{}' item {i} is not UTF-8 text", t.name))?;
            // A tokenizer fault on hostile text is this request's error, never a lost thread.
            let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.tokenizer.encode(s, true)))
                .map_err(|_| format!("input '{}' item {i}: the tokenizer failed on this text", t.name))?
                .map_err(|e| format!("input '{}' item {i}: {e}", t.name))?;
            encoded.push(e);
        }
        let longest = encoded.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let len = if self.fixed { self.step.max_length } else { longest };
        let n = encoded.len();
        let (mut ids, mut mask, mut types) = (vec![0i64; n * len], vec![0i64; n * len], vec![0i64; n * len]);
        ids.fill(i64::from(self.step.pad_id));
        for (row, e) in encoded.iter().enumerate() {
            let at = row * len;
            for (j, ((&id, &m), &ty)) in
                e.get_ids().iter().zip(e.get_attention_mask()).zip(e.get_type_ids()).enumerate().take(len)
            {
                ids[at + j] = i64::from(id);
                mask[at + j] = i64::from(m);
                types[at + j] = i64::from(ty);
            }
        }
        let shape = vec![n, len];
        let mut out =
            vec![Tensor { name: self.step.input_ids.clone(), shape: shape.clone(), data: TensorData::I64(ids) }];
        if let Some(name) = &self.step.attention_mask {
            out.push(Tensor { name: name.clone(), shape: shape.clone(), data: TensorData::I64(mask) });
        }
        if let Some(name) = &self.step.token_type_ids {
            out.push(Tensor { name: name.clone(), shape, data: TensorData::I64(types) });
        }
        Ok(out)
    }
}
