//! The fleet view: one row per node, from the database (so every collector shows the same), as
//! JSON (`GET /v1/fleet`), a terminal table (`outpost-collector fleet`), an HTML page
//! (`GET /fleet`, no external assets) and Prometheus gauges.

use serde::Serialize;
use serde_json::Value;

use crate::store::{now_ms, Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    pub name: String,
    pub version: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    pub node: String,
    pub site: Option<String>,
    pub last_seen_ms: Option<i64>,
    /// Not heard from within `silent_after_s`.
    pub silent: bool,
    pub agent_version: Option<String>,
    pub models: Vec<ModelRow>,
    /// The node's own alarms, as its last heartbeat listed them.
    pub alarms: Vec<String>,
    pub breaker: Option<String>,
    /// Records the node holds that the collector has not stored yet (from its last heartbeat).
    pub audit_lag: Option<u64>,
    pub audit_head_seq: u64,
    pub audit_records: i64,
    pub checkpoint_seq: Option<i64>,
    /// `ok`, or `alarm` when the chain raised any alarm (see `chain_alarm`).
    pub chain: &'static str,
    pub chain_alarms: i64,
    pub chain_alarm: Option<String>,
}

fn strs(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn models(hb: &Value) -> Vec<ModelRow> {
    let Some(list) = hb.get("models").and_then(Value::as_array) else { return Vec::new() };
    list.iter()
        .map(|m| {
            let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
            ModelRow {
                name: s("name").unwrap_or_default(),
                version: s("version").unwrap_or_default(),
                state: s("state").unwrap_or_default(),
                plan: s("plan"),
                canary: s("canary"),
            }
        })
        .collect()
}

/// Every enrolled node, by name.
pub async fn rows(store: &Store, silent_after_s: u64) -> Result<Vec<NodeRow>, StoreError> {
    let c = store.pool.get().await?;
    let rows = c
        .query(
            "SELECT n.node, n.last_seen_ms, n.heartbeat, c.head_seq, c.records, c.checkpoint_seq, \
             c.alarms, c.last_alarm FROM nodes n LEFT JOIN chains c USING (node) ORDER BY n.node",
            &[],
        )
        .await?;
    let now = now_ms();
    Ok(rows
        .iter()
        .map(|r| {
            let hb: Value = r.get::<_, Option<Value>>(2).unwrap_or(Value::Null);
            let last_seen_ms: Option<i64> = r.get(1);
            let head = r.get::<_, Option<i64>>(3).unwrap_or(0).max(0) as u64;
            let alarms = r.get::<_, Option<i64>>(6).unwrap_or(0);
            let node_head = hb.pointer("/audit/head_seq").and_then(Value::as_u64);
            NodeRow {
                node: r.get(0),
                site: hb.get("site").and_then(Value::as_str).map(str::to_owned),
                last_seen_ms,
                silent: last_seen_ms.is_none_or(|t| now - t > (silent_after_s as i64) * 1000),
                agent_version: hb.get("agent_version").and_then(Value::as_str).map(str::to_owned),
                models: models(&hb),
                alarms: strs(hb.get("alarms")),
                breaker: hb.get("breaker").and_then(Value::as_str).map(str::to_owned),
                audit_lag: node_head.map(|h| h.saturating_sub(head)),
                audit_head_seq: head,
                audit_records: r.get::<_, Option<i64>>(4).unwrap_or(0),
                checkpoint_seq: r.get(5),
                chain: if alarms > 0 { "alarm" } else { "ok" },
                chain_alarms: alarms,
                chain_alarm: r.get(7),
            }
        })
        .collect())
}

fn ago(now: i64, t: Option<i64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let s = ((now - t) / 1000).max(0);
            match s {
                0..=119 => format!("{s}s ago"),
                120..=7199 => format!("{}m ago", s / 60),
                7200..=172_799 => format!("{}h ago", s / 3600),
                _ => format!("{}d ago", s / 86400),
            }
        }
    }
}

fn model_summary(m: &[ModelRow]) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|m| {
            let mut s = format!("{}@{}", m.name, m.version);
            if !m.state.eq_ignore_ascii_case("ready") {
                s.push_str(&format!(" ({})", m.state));
            }
            if let Some(c) = &m.canary {
                s.push_str(&format!(" canary {c}"));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fleet at a glance, one line per node, for a terminal.
pub fn table(rows: &[NodeRow]) -> String {
    let now = now_ms();
    let mut lines = vec![[
        "NODE".to_owned(),
        "SEEN".into(),
        "AGENT".into(),
        "MODELS".into(),
        "ALARMS".into(),
        "AUDIT LAG".into(),
        "CHAIN".into(),
    ]];
    for r in rows {
        let seen = if r.silent { format!("{} (silent)", ago(now, r.last_seen_ms)) } else { ago(now, r.last_seen_ms) };
        let chain = match &r.chain_alarm {
            Some(a) if r.chain_alarms > 0 => format!("ALARM ({}): {a}", r.chain_alarms),
            _ => "ok".into(),
        };
        lines.push([
            r.node.clone(),
            seen,
            r.agent_version.clone().unwrap_or_else(|| "-".into()),
            model_summary(&r.models),
            if r.alarms.is_empty() { "-".into() } else { r.alarms.join(", ") },
            r.audit_lag.map_or("-".into(), |l| l.to_string()),
            chain,
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// The fleet page: server-rendered, no script, no external asset; it refreshes itself.
pub fn page(rows: &[NodeRow]) -> String {
    let now = now_ms();
    let alarms = rows.iter().filter(|r| r.chain_alarms > 0 || !r.alarms.is_empty()).count();
    let silent = rows.iter().filter(|r| r.silent).count();
    let mut body = String::new();
    for r in rows {
        let class = if r.chain_alarms > 0 {
            "bad"
        } else if r.silent || !r.alarms.is_empty() {
            "warn"
        } else {
            "ok"
        };
        let models: String = if r.models.is_empty() {
            "<span class=dim>none</span>".into()
        } else {
            r.models
                .iter()
                .map(|m| {
                    let canary = m.canary.as_ref().map(|c| format!(" <em>canary {}</em>", esc(c))).unwrap_or_default();
                    let plan =
                        m.plan.as_ref().map(|p| format!(" <span class=dim>{}</span>", esc(p))).unwrap_or_default();
                    format!(
                        "<li>{}@{} <span class=state>{}</span>{plan}{canary}</li>",
                        esc(&m.name),
                        esc(&m.version),
                        esc(&m.state)
                    )
                })
                .collect()
        };
        let chain = match &r.chain_alarm {
            Some(a) if r.chain_alarms > 0 => format!("<b>ALARM</b> ({}): {}", r.chain_alarms, esc(a)),
            _ => format!("ok, {} records", r.audit_records),
        };
        body.push_str(&format!(
            "<tr class={class}><td><b>{node}</b><br><span class=dim>{site}</span></td><td>{seen}{silent}</td>\
             <td>{agent}</td><td><ul>{models}</ul></td><td>{alarms}</td><td>{lag}</td><td>{chain}</td></tr>\n",
            node = esc(&r.node),
            site = esc(r.site.as_deref().unwrap_or("")),
            seen = ago(now, r.last_seen_ms),
            silent = if r.silent { " <b>silent</b>" } else { "" },
            agent = esc(r.agent_version.as_deref().unwrap_or("-")),
            alarms = if r.alarms.is_empty() { "-".into() } else { esc(&r.alarms.join(", ")) },
            lag = r.audit_lag.map_or("-".into(), |l| l.to_string()),
        ));
    }
    format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=30>\
<title>Outpost fleet</title><style>\
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}h1{{font-size:1.3em}}\
table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.45em .6em;border-bottom:1px solid #ddd;vertical-align:top}}\
th{{background:#f4f4f4}}ul{{margin:0;padding-left:1em}}.dim{{color:#777}}.state{{color:#2a6}}\
tr.bad td{{background:#fde8e8}}tr.warn td{{background:#fff6dd}}.summary span{{margin-right:1.5em}}\
</style></head><body><h1>Outpost fleet</h1>\
<p class=summary><span id=nodes>{n} nodes</span><span id=alarms>{alarms} with alarms</span><span id=silent>{silent} silent</span></p>\
<table><thead><tr><th>Node</th><th>Last seen</th><th>Agent</th><th>Models</th><th>Alarms</th><th>Audit lag</th><th>Chain</th></tr></thead>\
<tbody>\n{body}</tbody></table></body></html>\n",
        n = rows.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(node: &str) -> NodeRow {
        NodeRow {
            node: node.into(),
            site: Some("branch-7".into()),
            last_seen_ms: Some(now_ms()),
            silent: false,
            agent_version: Some("0.1.0".into()),
            models: vec![ModelRow {
                name: "mlp".into(),
                version: "3".into(),
                state: "READY".into(),
                plan: None,
                canary: Some("4".into()),
            }],
            alarms: vec![],
            breaker: None,
            audit_lag: Some(0),
            audit_head_seq: 10,
            audit_records: 10,
            checkpoint_seq: None,
            chain: "ok",
            chain_alarms: 0,
            chain_alarm: None,
        }
    }

    #[test]
    fn the_page_escapes_what_nodes_send() {
        let mut r = row("till-1");
        r.models[0].name = "<script>alert(1)</script>".into();
        let html = page(&[r]);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
    }

    #[test]
    fn the_table_shows_a_chain_alarm() {
        let mut r = row("till-2");
        r.chain_alarms = 2;
        r.chain_alarm = Some("a second record for seq 5".into());
        let t = table(&[row("till-1"), r]);
        assert!(t.lines().nth(1).is_some_and(|l| l.starts_with("till-1") && l.contains("mlp@3 canary 4")), "{t}");
        assert!(t.lines().nth(2).is_some_and(|l| l.contains("ALARM (2): a second record for seq 5")), "{t}");
    }
}
