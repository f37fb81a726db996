//! Verdicts shared by the boxes of a site: a version one box rejects (canary rolled back, golden
//! vectors failed, an operator's rollback) is not promoted by its peer. Each rejection is
//! signed with the node key and published as a retained MQTT message under
//! `<prefix>/<site>/verdicts/<model>/<manifest sha256>`, so a box that starts later gets it
//! too. A verdict counts only when signed by a key of the site (`ha.peer_keys`, and this
//! box's own); any other is ignored and counted.
//!
//! This module signs, verifies and keeps this box's own verdicts (republished at every MQTT
//! connection, from `<state_dir>/verdicts.json`); the MQTT adapter carries them and the
//! registry task applies what arrives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ed25519_dalek::VerifyingKey;
use outpost_proto::registry::dsse::Envelope;
use outpost_proto::registry::KeyPair;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::locks::RwLockExt;

pub const VERDICT_TYPE: &str = "application/vnd.outpost.verdict+json";
/// A verdict is small; anything larger is not one.
pub const MAX_VERDICT_BYTES: usize = 16 << 10;
/// Own verdicts kept (and republished); the oldest go first.
const KEEP: usize = 256;

/// One box's rejection of one model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteVerdict {
    #[serde(rename = "_type")]
    pub kind: String,
    pub site: String,
    pub node: String,
    pub model: String,
    pub version: String,
    pub manifest_sha256: String,
    pub reason: String,
    pub at: i64,
}

/// What the status shows of the verdict exchange.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SyncStatus {
    /// Verdicts published by this box.
    pub published: u64,
    /// Peers' verdicts accepted.
    pub received: u64,
    /// Messages ignored: not signed by a key of the site, another site's, malformed.
    pub ignored: u64,
    /// The last accepted peer verdict: its node and when it arrived.
    pub last_from: Option<String>,
    pub last_at: Option<String>,
}

/// A signed verdict ready to publish: (model, manifest sha256, envelope bytes).
pub type Signed = (String, String, Vec<u8>);

pub struct SiteVerdicts {
    pub site: String,
    pub node: String,
    signer: KeyPair,
    keys: BTreeMap<String, VerifyingKey>,
    path: PathBuf,
    own: RwLock<Vec<Signed>>,
    outgoing: broadcast::Sender<Signed>,
    incoming: mpsc::UnboundedSender<SiteVerdict>,
    status: RwLock<SyncStatus>,
    /// Set once the retained verdicts of the site have arrived (after this box's own marker
    /// message, which the broker sends after them).
    synced: tokio::sync::watch::Sender<bool>,
    /// This connection's marker: a random token published to the sync topic.
    marker: String,
}

impl SiteVerdicts {
    /// `peers`: the site's other boxes' node public keys. Returns the receiver of accepted
    /// peer verdicts (for the registry task).
    pub fn new(
        site: &str,
        node: &str,
        signer: KeyPair,
        peers: &[outpost_proto::registry::PublicKey],
        state_dir: &Path,
    ) -> Result<(SiteVerdicts, mpsc::UnboundedReceiver<SiteVerdict>), String> {
        let mut keys = BTreeMap::new();
        for k in peers.iter().chain(std::iter::once(&signer.public())) {
            let id = k.keyid().map_err(|e| e.to_string())?;
            keys.insert(id, k.verifying_key().map_err(|e| e.to_string())?);
        }
        let path = state_dir.join("verdicts.json");
        let own: Vec<(String, String, String)> =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let own = own.into_iter().map(|(m, sha, env)| (m, sha, env.into_bytes())).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let sv = SiteVerdicts {
            site: site.to_owned(),
            node: node.to_owned(),
            signer,
            keys,
            path,
            own: RwLock::new(own),
            outgoing: broadcast::channel(64).0,
            incoming: tx,
            status: RwLock::new(SyncStatus::default()),
            synced: tokio::sync::watch::channel(false).0,
            marker: {
                let mut b = [0u8; 16];
                let _ = getrandom::fill(&mut b);
                outpost_proto::registry::hex::encode(&b)
            },
        };
        Ok((sv, rx))
    }

    /// Signs this box's rejection, keeps it and hands it to the MQTT adapter.
    pub fn publish(&self, model: &str, version: &str, manifest_sha256: &str, reason: &str) {
        let v = SiteVerdict {
            kind: "verdict".into(),
            site: self.site.clone(),
            node: self.node.clone(),
            model: model.to_owned(),
            version: version.to_owned(),
            manifest_sha256: manifest_sha256.to_owned(),
            reason: reason.chars().take(512).collect(),
            at: outpost_proto::registry::now(),
        };
        let Ok(payload) = serde_json::to_vec(&v) else { return };
        let bytes = Envelope::sign(VERDICT_TYPE, &payload, &[&self.signer]).to_bytes();
        let signed = (model.to_owned(), manifest_sha256.to_owned(), bytes);
        {
            let mut own = self.own.write_locked();
            own.retain(|(m, sha, _)| !(m == model && sha == manifest_sha256));
            own.push(signed.clone());
            let excess = own.len().saturating_sub(KEEP);
            own.drain(..excess);
            let kept: Vec<(String, String, String)> =
                own.iter().map(|(m, s, b)| (m.clone(), s.clone(), String::from_utf8_lossy(b).into_owned())).collect();
            if let Err(e) = serde_json::to_vec(&kept)
                .map_err(|e| e.to_string())
                .and_then(|b| crate::store::write_atomic(&self.path, &b).map_err(|e| e.to_string()))
            {
                tracing::warn!(error = %e, "could not keep a site verdict; it is published while the agent runs");
            }
        }
        self.status.write_locked().published += 1;
        tracing::info!(%model, %version, "rejection shared with the site's other boxes");
        let _ = self.outgoing.send(signed);
    }

    /// This box's verdicts, to publish (retained) at each connection.
    pub fn own(&self) -> Vec<Signed> {
        self.own.read_locked().clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Signed> {
        self.outgoing.subscribe()
    }

    /// Checks a message from the verdicts topic: a verdict of this site, signed by one of its
    /// keys. Accepted peer verdicts go to the registry task; own ones are dropped quietly.
    pub fn receive(&self, bytes: &[u8]) -> Result<(), String> {
        let result = self.verify(bytes);
        let mut st = self.status.write_locked();
        match result {
            Ok(v) if v.node == self.node => Ok(()),
            Ok(v) => {
                st.received += 1;
                st.last_from = Some(v.node.clone());
                st.last_at = Some(outpost_proto::registry::format_time(outpost_proto::registry::now()));
                let _ = self.incoming.send(v);
                Ok(())
            }
            Err(e) => {
                st.ignored += 1;
                Err(e)
            }
        }
    }

    fn verify(&self, bytes: &[u8]) -> Result<SiteVerdict, String> {
        if bytes.len() > MAX_VERDICT_BYTES {
            return Err(format!("{} bytes: not a verdict", bytes.len()));
        }
        let env = Envelope::parse(bytes).map_err(|e| e.to_string())?;
        let payload = env
            .verify(VERDICT_TYPE, &self.keys, 1, "site verdict")
            .map_err(|e| format!("not signed by a key of the site: {e}"))?;
        let v: SiteVerdict = serde_json::from_slice(&payload).map_err(|e| format!("verdict payload: {e}"))?;
        if v.kind != "verdict" || v.site != self.site {
            return Err(format!("a verdict of site '{}', not this one", v.site));
        }
        outpost_proto::registry::check_hex_digest(&v.manifest_sha256).map_err(|e| e.to_string())?;
        if !outpost_proto::valid_name(&v.model) {
            return Err("a verdict naming an invalid model".into());
        }
        Ok(v)
    }

    /// The marker this box publishes (non-retained) to `<verdicts>/_sync/<node>` after
    /// subscribing: when it comes back, the retained verdicts before it have arrived.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// A message on this box's sync topic: the marker means the retained verdicts are in.
    pub fn sync_message(&self, payload: &[u8]) {
        if payload == self.marker.as_bytes() {
            self.synced.send_replace(true);
        }
    }

    /// Waits until the site's retained verdicts have arrived, at most `limit`; false when
    /// they have not (no broker): the caller goes on without them.
    pub async fn wait_synced(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.synced.subscribe();
        let synced = tokio::time::timeout(limit, async { rx.wait_for(|s| *s).await.is_ok() }).await;
        synced.unwrap_or(false)
    }

    pub fn status(&self) -> SyncStatus {
        self.status.read_locked().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sites_keys_count() {
        let dir = tempfile::tempdir().unwrap();
        let (a_key, b_key, stranger) =
            (KeyPair::generate().unwrap(), KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let b_pub = b_key.public();
        let (a, _rx_a) = SiteVerdicts::new("s", "a", a_key, std::slice::from_ref(&b_pub), dir.path()).unwrap();
        let (b, mut rx_b) = SiteVerdicts::new("s", "b", b_key, &[a.signer.public()], &dir.path().join("b")).unwrap();
        let mut out = a.subscribe();
        let sha = "ab".repeat(32);
        a.publish("mlp", "3.0.0", &sha, "canary error rate");
        let (_, _, bytes) = out.try_recv().unwrap();
        b.receive(&bytes).unwrap();
        assert_eq!(rx_b.try_recv().unwrap().version, "3.0.0");
        // Signed by a stranger: ignored.
        let forged =
            Envelope::sign(VERDICT_TYPE, &Envelope::parse(&bytes).unwrap().payload_bytes().unwrap(), &[&stranger]);
        assert!(b.receive(&forged.to_bytes()).is_err());
        assert!(b.receive(b"{}").is_err());
        assert_eq!((b.status().received, b.status().ignored), (1, 2));
        // Kept across a restart.
        let (again, _) = SiteVerdicts::new("s", "a", KeyPair::generate().unwrap(), &[], dir.path()).unwrap();
        assert_eq!(again.own().len(), 1);
    }
}
