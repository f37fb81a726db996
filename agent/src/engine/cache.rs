//! A response cache for one served model version (opt-in per model, `cache_bytes`): the outputs
//! of a request, keyed by a digest of its input tensors and requested outputs, bounded in bytes
//! with least-recently-used eviction. It lives in the version's `Served`, so an answer is never
//! served across versions: a new version starts empty and the old cache goes with the old one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::locks::MutexExt;
use crate::protocol::Tensor;

/// The key: SHA-256 over every input (name, datatype, shape, data) and the requested outputs.
pub fn key(inputs: &[Tensor], outputs: &[String]) -> [u8; 32] {
    let mut h = Sha256::new();
    for t in inputs {
        h.update((t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(t.datatype().as_str().as_bytes());
        h.update((t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        let data = t.data.to_le_bytes();
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    h.update([0xff]);
    for o in outputs {
        h.update((o.len() as u64).to_le_bytes());
        h.update(o.as_bytes());
    }
    h.finalize().into()
}

fn size_of(outputs: &[Tensor]) -> usize {
    outputs.iter().map(|t| t.data.to_le_bytes().len() + t.name.len() + t.shape.len() * 8 + 64).sum()
}

struct Inner {
    entries: HashMap<[u8; 32], (u64, usize, Vec<Tensor>)>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, [u8; 32]>,
    tick: u64,
    bytes: usize,
}

pub struct ResponseCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl ResponseCache {
    pub fn new(capacity_bytes: usize) -> ResponseCache {
        ResponseCache {
            inner: Mutex::new(Inner { entries: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0 }),
            capacity: capacity_bytes,
        }
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<Vec<Tensor>> {
        let mut g = self.inner.locked();
        g.tick += 1;
        let tick = g.tick;
        let (old, outputs) = {
            let e = g.entries.get_mut(key)?;
            let old = std::mem::replace(&mut e.0, tick);
            (old, e.2.clone())
        };
        g.order.remove(&old);
        g.order.insert(tick, *key);
        Some(outputs)
    }

    /// Stores an answer; entries larger than a quarter of the capacity are not kept.
    pub fn put(&self, key: [u8; 32], outputs: &[Tensor]) {
        let size = size_of(outputs);
        if size > self.capacity / 4 {
            return;
        }
        let mut g = self.inner.locked();
        if g.entries.contains_key(&key) {
            return;
        }
        while g.bytes + size > self.capacity {
            let Some((_, oldest)) = g.order.pop_first() else { break };
            if let Some((_, s, _)) = g.entries.remove(&oldest) {
                g.bytes -= s;
            }
        }
        g.tick += 1;
        let tick = g.tick;
        g.order.insert(tick, key);
        g.entries.insert(key, (tick, size, outputs.to_vec()));
        g.bytes += size;
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.locked().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;

    fn t(v: f32) -> Tensor {
        Tensor { name: "x".into(), shape: vec![1], data: TensorData::F32(vec![v]) }
    }

    #[test]
    fn keys_separate_inputs_and_requested_outputs() {
        assert_eq!(key(&[t(1.0)], &[]), key(&[t(1.0)], &[]));
        assert_ne!(key(&[t(1.0)], &[]), key(&[t(2.0)], &[]));
        assert_ne!(key(&[t(1.0)], &[]), key(&[t(1.0)], &["y".into()]));
    }

    #[test]
    fn bounded_in_bytes_evicting_the_least_recently_used() {
        let one = size_of(&[t(0.0)]);
        let c = ResponseCache::new(one * 4);
        for i in 0..3 {
            c.put(key(&[t(i as f32)], &[]), &[t(i as f32)]);
        }
        // Touch 0, then add two more: 1 and 2 are the oldest, 1 goes first.
        assert!(c.get(&key(&[t(0.0)], &[])).is_some());
        c.put(key(&[t(3.0)], &[]), &[t(3.0)]);
        c.put(key(&[t(4.0)], &[]), &[t(4.0)]);
        assert!(c.bytes() <= one * 4);
        assert!(c.get(&key(&[t(0.0)], &[])).is_some(), "recently used stays");
        assert!(c.get(&key(&[t(1.0)], &[])).is_none(), "least recently used goes");
    }
}
