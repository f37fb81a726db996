//! MQTT request/response through a real Mosquitto: the MLP through the agent vs an echo
//! responder on the same client stack (rumqttc, manual acks, reply to the response topic),
//! which is the broker-and-client ceiling. 1 and 32 requests in flight, same run, the targets
//! alternating in each of `--rounds` rounds; the last lines give each round's ratio to the
//! ceiling and their median.
//!
//!     cargo bench -p outpost-tests --bench mqtt -- [--requests 5000] [--rounds 3]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_tests::broker::{Broker, BrokerOptions};
use outpost_tests::*;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

fn opts(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(Some(16 << 20));
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    o
}

/// Connects, subscribes to `topic`, and hands every incoming publish to `on_publish`;
/// returns once the subscription is acknowledged.
async fn subscribed(
    o: MqttOptions,
    cap: usize,
    topic: &'static str,
    on_publish: impl Fn(&AsyncClient, Publish) + Send + 'static,
) -> anyhow::Result<AsyncClient> {
    let (client, mut ev) = AsyncClient::new(o, cap);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let c = client.clone();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Ok(e) = ev.poll().await {
            match e {
                Event::Incoming(Packet::ConnAck(_)) => {
                    let _ = c.subscribe(topic, QoS::AtLeastOnce).await;
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => on_publish(&c, p),
                _ => {}
            }
        }
    });
    rx.await?;
    Ok(client)
}

/// The echo responder: answers each request with its own payload.
async fn echo(port: u16) -> anyhow::Result<()> {
    let mut o = opts("echo", port);
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(64));
    subscribed(o, 256, "echo/#", |client, p| {
        let client = client.clone();
        tokio::spawn(async move {
            let props = p.properties.clone().unwrap_or_default();
            let reply = PublishProperties { correlation_data: props.correlation_data.clone(), ..Default::default() };
            let topic = props.response_topic.clone().unwrap_or_default();
            let _ = client.publish_with_properties(topic, QoS::AtLeastOnce, false, p.payload.clone(), reply).await;
            let _ = client.ack(&p).await;
        });
    })
    .await?;
    Ok(())
}

type Arrivals = Arc<Mutex<HashMap<u64, Instant>>>;

/// A requester that records when each reply arrives.
async fn requester(port: u16) -> anyhow::Result<(AsyncClient, Arrivals, Arc<tokio::sync::Notify>)> {
    let arrivals: Arrivals = Default::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let (a, n) = (arrivals.clone(), notify.clone());
    let client = subscribed(opts("bench-requester", port), 4096, "bench/replies", move |_, p| {
        let corr = p.properties.as_ref().and_then(|x| x.correlation_data.clone()).unwrap_or_default();
        if let Ok(b) = <[u8; 8]>::try_from(&corr[..]) {
            if let Ok(mut m) = a.lock() {
                m.insert(u64::from_be_bytes(b), Instant::now());
            }
            n.notify_waiters();
        }
    })
    .await?;
    Ok((client, arrivals, notify))
}

async fn run(
    port: u16,
    topic: &str,
    body: &[u8],
    requests: u64,
    inflight: usize,
    base: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let (client, arrivals, notify) = requester(port).await?;
    let mut sent = Vec::with_capacity(requests as usize);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    for i in 0..requests {
        let id = base + i;
        // Keep `inflight` requests outstanding: wait for a reply before sending more.
        loop {
            let done = arrivals.lock().map(|m| m.len()).unwrap_or(0) as u64;
            if i - done < inflight as u64 {
                break;
            }
            let n = notify.notified();
            let done = arrivals.lock().map(|m| m.len()).unwrap_or(0) as u64;
            if i - done < inflight as u64 {
                break;
            }
            anyhow::ensure!(tokio::time::timeout_at(deadline.into(), n).await.is_ok(), "bench timed out");
        }
        let props = PublishProperties {
            response_topic: Some("bench/replies".into()),
            correlation_data: Some(Bytes::copy_from_slice(&id.to_be_bytes())),
            ..Default::default()
        };
        sent.push((id, Instant::now()));
        client.publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_vec(), props).await?;
    }
    while arrivals.lock().map(|m| m.len()).unwrap_or(0) < requests as usize {
        let n = notify.notified();
        if arrivals.lock().map(|m| m.len()).unwrap_or(0) >= requests as usize {
            break;
        }
        anyhow::ensure!(tokio::time::timeout_at(deadline.into(), n).await.is_ok(), "bench timed out");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = {
        let m = arrivals.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        sent.iter().filter_map(|(id, t)| m.get(id).map(|a| (*a - *t).as_secs_f64() * 1e3)).collect()
    };
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    let _ = client.disconnect().await;
    Ok((requests as f64 / elapsed, p(0.5), p(0.99)))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let requests = arg("--requests", 5000);
    let rounds = arg("--rounds", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let broker = Broker::start(BrokerOptions::default())?;
        echo(broker.port).await?;
        let models = tempfile::tempdir()?;
        let dst = models.path().join("mlp");
        std::fs::create_dir_all(&dst)?;
        for f in ["model.onnx", "golden.json"] {
            std::fs::copy(root().join("models/mlp").join(f), dst.join(f))?;
        }
        // Two agents on one broker: audit log on (topic prefix `outpost`) and off (`plain`).
        // The model is served as in the serving benchmark: dynamic batching up to 8 rows from
        // what is already queued (no waiting for company).
        let config = |prefix: &str, audit: bool| {
            format!(
                "[mqtt]\nurl = {:?}\ninflight = 64\ntopic_prefix = \"{prefix}\"\nclient_id = \"bench-{prefix}\"\n\n[audit]\nenabled = {audit}\n\n[models.mlp]\nmax_queue = 256\nmax_batch = 8\nmax_queue_delay = \"0s\"\n",
                broker.url()
            )
        };
        let audited = TestAgent::start(&[models.path().to_path_buf()], &config("outpost", true)).await?;
        let plain = TestAgent::start(&[models.path().to_path_buf()], &config("plain", false)).await?;
        let golden = golden_for(&root().join("models/mlp"))?;
        let body = serde_json::to_vec(&golden.request(0))?;
        let targets = [
            ("echo responder (ceiling)", "echo/mlp"),
            ("outpost MLP, audit off", "plain/test-site/infer/mlp"),
            ("outpost MLP, audit on", "outpost/test-site/infer/mlp"),
        ];
        println!("| round | target | in flight | requests | req/s | p50 ms | p99 ms |");
        println!("|---|---|---|---|---|---|---|");
        let mut base = 0;
        // (in flight, target index) -> req/s per round.
        let mut rates: HashMap<(usize, usize), Vec<f64>> = HashMap::new();
        for round in 1..=rounds {
            for inflight in [1usize, 32] {
                let n = if inflight == 1 { requests / 5 } else { requests };
                for (t, (name, topic)) in targets.iter().enumerate() {
                    let (rps, p50, p99) = run(broker.port, topic, &body, n, inflight, base).await?;
                    base += n;
                    rates.entry((inflight, t)).or_default().push(rps);
                    println!("| {round} | {name} | {inflight} | {n} | {rps:.0} | {p50:.2} | {p99:.2} |");
                }
            }
        }
        println!();
        println!("| in flight | target | share of the echo ceiling, per round | median |");
        println!("|---|---|---|---|");
        for inflight in [1usize, 32] {
            let echo = &rates[&(inflight, 0)];
            for (t, (name, _)) in targets.iter().enumerate().skip(1) {
                let mut shares: Vec<f64> = rates[&(inflight, t)].iter().zip(echo).map(|(r, e)| 100.0 * r / e).collect();
                let each: Vec<String> = shares.iter().map(|s| format!("{s:.0} %")).collect();
                shares.sort_by(f64::total_cmp);
                println!("| {inflight} | {name} | {} | {:.0} % |", each.join(", "), shares[shares.len() / 2]);
            }
        }
        audited.stop().await?;
        plain.stop().await
    })
}
