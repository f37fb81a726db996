//! Dynamic batching, the queue policy and the plan chooser: the real MLP and fixture models,
//! the engine's own queue and real HTTP over loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::engine::{
    cpu, BatchPolicy, Handoff, JobError, LoadedModel, NotInline, ServeOptions, Served, INLINE_MAX_US,
};
use outpost::protocol::{Tensor, TensorData};
use outpost_tests::{golden_for, root, TestAgent};
use proptest::prelude::*;
use serde_json::Value;

fn mlp() -> Arc<LoadedModel> {
    let onnx = std::fs::read(root().join("models/mlp/model.onnx")).expect("demo MLP");
    Arc::new(LoadedModel::load(&onnx, 16).expect("MLP loads"))
}

/// `rows` rows of 30 features, distinct per caller so mixed-up rows cannot pass.
fn input(caller: usize, rows: usize, seed: u32) -> Vec<Tensor> {
    let data = (0..rows * 30)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 100.0 + caller as f32)
        .collect();
    vec![Tensor { name: "X".into(), shape: vec![rows, 30], data: TensorData::F32(data) }]
}

fn close(a: &[Tensor], b: &[Tensor]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} outputs, expected {}", a.len(), b.len()));
    }
    for (x, y) in a.iter().zip(b) {
        if x.name != y.name || x.shape != y.shape {
            return Err(format!("output {} {:?}, expected {} {:?}", x.name, x.shape, y.name, y.shape));
        }
        let (Some(p), Some(q)) = (x.data.to_f64(), y.data.to_f64()) else { return Err("not numeric".into()) };
        for (i, (u, v)) in p.iter().zip(&q).enumerate() {
            if (u - v).abs() > 1e-5 + 1e-4 * v.abs() {
                return Err(format!("output {} element {i} is {u}, alone it is {v}", x.name));
            }
        }
    }
    Ok(())
}

/// What the tests of the inline and led paths count as a short run: far above any MLP run on a
/// slow or crowded machine (these tests share few cores), so the paths are taken whatever the
/// machine; the default limit is exercised by the slow fixture's long runs.
const SHORT: Duration = Duration::from_millis(20);

/// The MLP served with `opts`, driven from a current-thread runtime with a 60 s deadline, and a
/// validated one-row input whose plan is built (as the loader warms it).
struct ServedMlp {
    model: Arc<LoadedModel>,
    rt: tokio::runtime::Runtime,
    deadline: Instant,
    served: Served,
    one: Vec<Tensor>,
}

fn served_mlp(opts: &ServeOptions) -> ServedMlp {
    let model = mlp();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(60);
    let served = Served::start("mlp", "1", model.clone(), opts);
    let one = model.validate(input(0, 1, 7)).expect("valid");
    model.run(one.clone()).expect("warm-up run");
    ServedMlp { model, rt, deadline, served, one }
}

proptest! {
    // Shrinking is bounded in time: a failing case can take its whole 30 s deadline, and
    // unbounded shrinking of such cases would run for hours instead of failing.
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    })]

    /// Concurrent callers with random batch sizes: each gets exactly the outputs its own rows
    /// give when run alone, whatever batches the queue formed; with `batch_sizes`, runs are
    /// padded and the model builds plans for those sizes only (or a request's own size, when
    /// it is larger than all of them).
    #[test]
    fn batching_returns_each_caller_exactly_its_own_rows(
        sizes in prop::collection::vec(1usize..=5, 2..=12),
        seed in any::<u32>(),
        max_batch in 2usize..=9,
        instances in 1usize..=2,
        run_sizes in prop::sample::subsequence(vec![1usize, 2, 3, 4, 6, 8, 9], 0..=3),
        led in any::<bool>(),
    ) {
        let model = mlp();
        let inputs: Vec<Vec<Tensor>> = sizes.iter().enumerate().map(|(c, &r)| input(c, r, seed)).collect();
        let alone: Vec<Vec<Tensor>> = inputs
            .iter()
            .map(|i| model.run(model.validate(i.clone()).expect("valid")).expect("runs"))
            .collect();
        let run_sizes: Vec<usize> = run_sizes.into_iter().filter(|&s| s <= max_batch).collect();
        // Batches formed by the workers (waiting up to 50 ms for company), or, with no delay and
        // runs known to be short, led on the runtime's thread by the first request (plans not
        // built yet go to the workers from there).
        let max_delay = if led { Duration::ZERO } else { Duration::from_millis(50) };
        let policy = BatchPolicy { max_batch, max_delay, preferred: vec![], sizes: run_sizes.clone() };
        let opts =
            ServeOptions { instances, max_queue: 64, batch: Some(policy), short_run: SHORT, ..ServeOptions::default() };
        // Its own copy of the model, so its plans are the served runs' only.
        let served_model = mlp();
        let served = Served::start("mlp", "1", served_model.clone(), &opts);
        prop_assert!(served.batching.is_some(), "the MLP has a batch dimension");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let deadline = Instant::now() + Duration::from_secs(30);
        if led {
            let one = served_model.validate(input(0, 1, seed)).expect("valid");
            settle(&rt, &served, &one, deadline, &mut 0);
        }
        // The settling runs, not counted below.
        let warm_runs = served.stats.runs.load(std::sync::atomic::Ordering::Relaxed);
        let warm_rows = served.stats.rows.load(std::sync::atomic::Ordering::Relaxed);
        let answers = rt.block_on(async {
            if led {
                // All submitted at once: the first leads, the rest queue behind it.
                return futures::future::join_all(inputs.iter().map(|i| async {
                    let rx = served.submit(i.clone(), deadline, true).await.expect("queued");
                    rx.await.expect("answered").0.expect("inference succeeds")
                }))
                .await;
            }
            // Every request is queued before any answer is awaited, so the queue can batch them.
            let mut pending = Vec::new();
            for i in &inputs {
                pending.push(served.submit(i.clone(), deadline, true).await.expect("queued"));
            }
            let mut out = Vec::new();
            for rx in pending {
                out.push(rx.await.expect("answered").0.expect("inference succeeds"));
            }
            out
        });
        for (caller, (got, want)) in answers.iter().zip(&alone).enumerate() {
            prop_assert!(close(got, want).is_ok(), "caller {caller} ({} rows): {:?}", sizes[caller], close(got, want));
        }
        if let Some(&largest) = run_sizes.last() {
            let total: usize = sizes.iter().sum();
            for shape in served_model.plan_shapes() {
                let n = shape[0];
                let ok = run_sizes.contains(&n) || (largest < n && n <= total);
                prop_assert!(ok, "a plan for {} rows; runs are padded to {:?}", n, run_sizes);
            }
        }
        let runs = served.stats.runs.load(std::sync::atomic::Ordering::Relaxed) - warm_runs;
        let rows = served.stats.rows.load(std::sync::atomic::Ordering::Relaxed) - warm_rows;
        prop_assert_eq!(rows as usize, sizes.iter().sum::<usize>());
        prop_assert!(runs as usize <= sizes.len());
        // With everything queued at once, fewer runs than requests unless each request alone
        // fills a batch.
        // (FIFO batching with one worker: some batch holds two requests as soon as two
        // neighbours fit together.)
        if !led && instances == 1 && sizes.windows(2).any(|w| w[0] + w[1] <= max_batch) {
            prop_assert!((runs as usize) < sizes.len(), "{runs} runs for {} requests: nothing was batched", sizes.len());
        }
    }
}

/// Statuses of `n` concurrent golden requests to `model`, with their bodies and Retry-After.
async fn flood(agent: &TestAgent, model: &str, golden: &Value, n: usize) -> Vec<(u16, Value, Option<String>)> {
    let url = agent.url(&format!("/v2/models/{model}/infer"));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (http, url, body) = (agent.http.clone(), url.clone(), golden.clone());
            tokio::spawn(async move {
                let resp = http.post(url).json(&body).send().await.expect("request sent");
                let status = resp.status().as_u16();
                let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
                (status, resp.json::<Value>().await.unwrap_or(Value::Null), retry)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_policy_answers_503_with_retry_after_and_batches_over_http() -> anyhow::Result<()> {
    let fixtures = root().join("tests/fixtures/models");
    let dir = tempfile::tempdir()?;
    for (name, src) in
        [("mlp", root().join("models/mlp")), ("slowq", fixtures.join("mlp-slow")), ("slowt", fixtures.join("mlp-slow"))]
    {
        std::fs::create_dir_all(dir.path().join(name))?;
        for f in ["model.onnx", "golden.json"] {
            std::fs::copy(src.join(f), dir.path().join(name).join(f))?;
        }
    }
    let extra = "[models.mlp]\nmax_batch = 8\nmax_queue_delay = \"2ms\"\npreferred_batch = [4, 8]\n\n\
                 [models.slowq]\ninstances = 1\nmax_queue = 2\n\n\
                 [models.slowt]\ninstances = 1\nmax_queue = 256\nqueue_timeout = \"1ms\"\n";
    let agent = TestAgent::start(&[dir.path().to_path_buf()], extra).await?;
    let golden = golden_for(&root().join("models/mlp"))?;

    // A full queue: refused at once with 503 and Retry-After; the rest answered.
    let answers = flood(&agent, "slowq", &golden.request(0), 40).await;
    let full: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!full.is_empty(), "40 concurrent requests against a queue of 2 must overflow it");
    for (status, body, retry) in &answers {
        assert!(*status == 200 || *status == 503, "{status} {body}");
        if *status == 503 {
            assert!(body["error"].as_str().unwrap_or_default().contains("queue full"), "{body}");
            let secs: u64 = retry.as_deref().unwrap_or_default().parse()?;
            assert!((1..=60).contains(&secs), "Retry-After {retry:?}");
        }
    }
    assert!(answers.iter().any(|(s, _, _)| *s == 200), "the queue still serves");

    // Queued longer than queue_timeout: answered 503 with Retry-After, not run.
    let answers = flood(&agent, "slowt", &golden.request(0), 40).await;
    let late: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!late.is_empty(), "40 requests behind one thread wait more than 1 ms");
    for (status, body, retry) in &answers {
        assert!(*status == 200 || *status == 503, "{status} {body}");
        if *status == 503 {
            assert!(body["error"].as_str().unwrap_or_default().contains("queue_timeout"), "{body}");
            assert!(retry.is_some(), "{body}");
        } else {
            golden.check(0, body)?;
        }
    }

    // Every size a batch can run at has its plan before traffic: none is built under load.
    let (_, meta) = agent.get("/v2/models/mlp").await?;
    let mut sizes: Vec<u64> =
        meta["parameters"]["plans"].as_array().into_iter().flatten().filter_map(|p| p[0].as_u64()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, (1..=8).collect::<Vec<u64>>(), "plans built at load: {meta}");

    // Batching over HTTP: every caller gets its golden answer, in fewer runs than requests.
    let n = 48;
    let answers = flood(&agent, "mlp", &golden.request(1), n).await;
    for (status, body, _) in &answers {
        assert_eq!(*status, 200, "{body}");
        golden.check(1, body)?;
    }
    let (_, meta) = agent.get("/v2/models/mlp").await?;
    let p = &meta["parameters"];
    assert_eq!(p["max_batch"], 8, "{meta}");
    assert_eq!(p["preferred_batch"], serde_json::json!([4, 8]), "{meta}");
    let runs = p["runs"].as_u64().unwrap_or(0);
    eprintln!("{n} requests in {runs} runs, mean batch {}", p["mean_batch_rows"]);
    assert!(runs >= 1 && runs <= n as u64, "{meta}");

    // The metadata's run_us is the moving average of run time per request: the slow fixture
    // (~150x the MLP's compute) shows it. `slowq` is the copy asserted above to have served
    // (on a loaded machine every `slowt` request may time out in its queue, and never run).
    let mlp_us = p["run_us"].as_u64().unwrap_or(0);
    let (_, slow) = agent.get("/v2/models/slowq").await?;
    let slow_us = slow["parameters"]["run_us"].as_u64().unwrap_or(0);
    eprintln!("run_us: MLP {mlp_us}, slow fixture {slow_us}");
    assert!(mlp_us > 0, "the MLP ran: {meta}");
    assert!(slow_us > 10 * mlp_us, "slow fixture {slow_us} µs per run against the MLP's {mlp_us} µs");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_chooser_serves_the_fastest_plan_that_passes_golden_vectors() -> anyhow::Result<()> {
    let fixtures = root().join("tests/fixtures/models");
    let agent = TestAgent::start(&[root().join("models"), fixtures.clone()], "").await?;

    // DequantizeLinear → Softmax → QuantizeLinear: tract's published plan is wrong; with the
    // Q/DQ pairs folded the graph reproduces a golden file whose tolerance is two quantization
    // steps, so that plan serves, and correctly.
    let (_, meta) = agent.get("/v2/models/qdq-softmax-u8-loose").await?;
    let p = &meta["parameters"];
    assert_eq!(p["plan"], "qdq-folded", "{meta}");
    let published = p["plan_candidates"].as_array().and_then(|c| c.iter().find(|c| c["plan"] == "as-published"));
    let rejected = published.map(|c| c["rejected"].as_str().unwrap_or_default()).unwrap_or_default();
    // Rejected by its golden check, or left unchecked when far slower than the passing plan.
    assert!(
        rejected.contains("golden vectors not reproduced") || rejected.contains("not checked"),
        "the published plan is rejected: {meta}"
    );
    let golden = golden_for(&fixtures.join("qdq-softmax-u8-loose"))?;
    let (status, body) = agent.post("/v2/models/qdq-softmax-u8-loose/infer", &golden.request(0)).await?;
    assert_eq!(status, 200, "{body}");
    golden.check(0, &body)?;

    // The same graph held to 1e-4 fails every plan: refused, and the reason names each.
    let (status, index) = agent.post("/v2/repository/index", &serde_json::json!({})).await?;
    assert_eq!(status, 200);
    let entry = index.as_array().and_then(|a| a.iter().find(|m| m["name"] == "qdq-softmax-u8")).cloned();
    let reason = entry.as_ref().and_then(|e| e["reason"].as_str()).unwrap_or_default().to_owned();
    assert_eq!(entry.as_ref().map(|e| e["state"].clone()), Some(Value::from("UNAVAILABLE")), "{index}");
    assert!(
        reason.contains("as-published rejected (golden vectors not reproduced")
            && reason.contains("qdq-folded rejected (golden vectors not reproduced"),
        "{reason}"
    );

    // Dynamic int8 models: whatever plan is chosen passed the golden vectors, and it serves them.
    for name in ["mlp-int8-dyn", "cnn-int8-dyn"] {
        let (_, meta) = agent.get(&format!("/v2/models/{name}")).await?;
        let p = &meta["parameters"];
        let chosen = p["plan"].as_str().unwrap_or_default();
        let candidates = p["plan_candidates"].as_array().cloned().unwrap_or_default();
        assert!(candidates.iter().any(|c| c["plan"] == "integer-ops-as-float"), "{name}: {meta}");
        let entry = candidates.iter().find(|c| c["plan"] == chosen);
        assert!(entry.is_some_and(|c| c["median_us"].is_u64()), "{name}: the chosen plan passed: {meta}");
        let golden = golden_for(&root().join("models").join(name))?;
        for i in 0..golden.golden.cases.len() {
            let (status, body) = agent.post(&format!("/v2/models/{name}/infer"), &golden.request(i)).await?;
            assert_eq!(status, 200, "{body}");
            golden.check(i, &body)?;
        }
    }
    agent.stop().await
}

/// Runs until the version's run-time average is short enough to run inline or lead (a new
/// thread's first runs are slow, and the other tests of this binary share the two cores, so a
/// run may be preempted); returns the last outputs. Counts the runs in `runs`. Bounded by the
/// requests' deadline, past which it fails.
fn settle(
    rt: &tokio::runtime::Runtime,
    served: &Served,
    one: &[Tensor],
    deadline: Instant,
    runs: &mut u64,
) -> Vec<Tensor> {
    let short = |s: &Served| !s.run_time().is_zero() && s.run_time() <= s.short_run();
    let mut outputs = Vec::new();
    let mut i = 0;
    while i < 2 || !short(served) {
        assert!(
            Instant::now() < deadline,
            "the run-time average ({:?}) did not come down to {:?} in {i} runs",
            served.run_time(),
            served.short_run()
        );
        outputs = rt.block_on(async {
            served.submit(one.to_vec(), deadline, true).await.expect("queued").await.expect("answered").0.expect("runs")
        });
        *runs += 1;
        i += 1;
    }
    outputs
}

/// `Served::run_inline` once the run can only be refused for its own reasons: the tests of this
/// binary run in parallel on few cores, so every CPU slot (shared by the process) may be taken
/// (then this waits for one), and a run slowed by them may lift the average above the inline
/// limit (then worker runs settle it again, counted in `runs`). Any other hand-off is returned.
type Inline = Result<(Result<Vec<Tensor>, JobError>, Duration), Handoff>;
fn inline_when_eligible(
    rt: &tokio::runtime::Runtime,
    served: &Served,
    mut inputs: Vec<Tensor>,
    deadline: Instant,
    runs: &mut u64,
) -> Inline {
    for _ in 0..100 {
        match served.run_inline(inputs, deadline) {
            Err(h) if h.why == NotInline::NoCpu && Instant::now() < deadline => {
                inputs = h.inputs;
                // Blocks until some run gives its slot back.
                drop(cpu::acquire());
            }
            Err(h) if h.why == NotInline::LongRuns && Instant::now() < deadline => {
                inputs = h.inputs;
                settle(rt, served, &inputs, deadline, runs);
            }
            done => return done,
        }
    }
    Err(Handoff { why: NotInline::NoCpu, inputs: Vec::new() })
}

/// A short run on an idle model is answered on the caller's thread, with the outputs a worker
/// gives; a busy queue, batching that waits for company, or a shape without a built plan go
/// to the workers as before.
#[test]
fn short_runs_on_an_idle_model_run_inline_with_the_workers_outputs() {
    // Warmed as at load (the plan for one row is built), but no run time known yet: the first
    // request goes to a worker.
    let ServedMlp { model, rt, deadline, served, one } =
        served_mlp(&ServeOptions { short_run: SHORT, ..ServeOptions::default() });
    let handoff = served.run_inline(one, deadline).expect_err("no run time known yet");
    assert_eq!(handoff.why, NotInline::NoRunTime);
    let one = handoff.inputs;
    let mut worker_runs = 0;
    let queued = settle(&rt, &served, &one, deadline, &mut worker_runs);
    let (inline, ran) = inline_when_eligible(&rt, &served, one.clone(), deadline, &mut worker_runs)
        .expect("short run on an idle model runs inline");
    let inline = inline.expect("runs");
    assert!(close(&inline, &queued).is_ok(), "{:?}", close(&inline, &queued));
    assert!(ran < Duration::from_millis(100), "{ran:?}");
    assert_eq!(served.queue_depth(), 0, "the inline run left the queue as it found it");
    assert_eq!(served.stats.runs.load(std::sync::atomic::Ordering::Relaxed), worker_runs + 1, "counted as a run");
    // A shape whose plan is not built yet (3 rows) is not built on the caller's thread.
    let three = model.validate(input(0, 3, 7)).expect("valid");
    let handoff = served.run_inline(three, deadline).expect_err("plan building stays on the workers");
    assert_eq!(handoff.why, NotInline::NoPlan);
    let three = handoff.inputs;
    // The worker run that builds it does not count as a run time (a build takes milliseconds).
    let before = served.run_time();
    rt.block_on(async {
        served.submit(three, deadline, true).await.expect("queued").await.expect("answered").0.expect("runs")
    });
    assert_eq!(served.run_time(), before, "a run that built a plan leaves the run-time average alone");
    let after = inline_when_eligible(&rt, &served, one.clone(), deadline, &mut worker_runs).map_err(|h| h.why);
    assert!(after.is_ok(), "still inline after the build: {:?}", after.err());
    // Batching that waits for company never runs inline.
    let policy = BatchPolicy { max_batch: 8, max_delay: Duration::from_millis(5), preferred: vec![], sizes: vec![] };
    let batched =
        Served::start("mlp", "1", model.clone(), &ServeOptions { batch: Some(policy), ..ServeOptions::default() });
    rt.block_on(async {
        batched.submit(one.clone(), deadline, true).await.expect("queued").await.expect("answered").0.expect("runs")
    });
    let why = batched.run_inline(one.clone(), deadline).map(|_| ()).map_err(|h| h.why);
    assert_eq!(why, Err(NotInline::Batching), "a batch being formed waits for company");
    // A slow model (the canary fixture, ~2 ms a run) keeps its runs on the workers under the
    // default limit.
    let slow_onnx = std::fs::read(root().join("tests/fixtures/models/mlp-slow/model.onnx")).expect("fixture");
    let slow = Arc::new(LoadedModel::load(&slow_onnx, 4).expect("loads"));
    let slow_served = Served::start("slow", "1", slow.clone(), &ServeOptions::default());
    assert_eq!(slow_served.short_run(), Duration::from_micros(INLINE_MAX_US));
    let x = slow.validate(input(0, 1, 7)).expect("valid");
    slow.run(x.clone()).expect("warm-up run builds the plan, so the worker's run is timed");
    rt.block_on(async {
        slow_served.submit(x.clone(), deadline, true).await.expect("queued").await.expect("answered").0.expect("runs")
    });
    let why = slow_served.run_inline(x, deadline).map(|_| ()).map_err(|h| h.why);
    assert_eq!(why, Err(NotInline::LongRuns), "long runs are handed to a worker");
}

/// Under load, a short run's requests are led on the runtime's thread: the first to arrive
/// yields once, then runs the batch the others formed behind it and answers each with exactly
/// its own rows. A leader dropped at its yield (its requester went away) hands what is queued
/// behind it to the workers: nothing is lost.
#[test]
fn requests_under_load_are_led_on_the_runtime_thread_and_a_dropped_leader_loses_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    let policy = BatchPolicy { max_batch: 8, max_delay: Duration::ZERO, preferred: vec![], sizes: vec![] };
    // Plans for one row and for the four-row wave below, as the loader warms them.
    let ServedMlp { model, rt, deadline, served, one } =
        served_mlp(&ServeOptions { batch: Some(policy), short_run: SHORT, ..ServeOptions::default() });
    model.run(model.validate(input(0, 4, 7)).expect("valid")).expect("warm-up run");
    let mut worker_runs = 0;
    settle(&rt, &served, &one, deadline, &mut worker_runs);

    // The leader is dropped at its yield, with three requests queued behind it.
    let behind: Vec<Vec<Tensor>> = (1..=3).map(|c| model.validate(input(c, 2, 11)).expect("valid")).collect();
    let alone: Vec<Vec<Tensor>> = behind.iter().map(|i| model.run(i.clone()).expect("runs")).collect();
    let led_before = served.stats.led_runs.load(Relaxed);
    let answers = rt.block_on(async {
        let mut leader = Box::pin(served.submit(one.clone(), deadline, true));
        assert!(futures::poll!(leader.as_mut()).is_pending(), "the first request under load leads and yields once");
        let mut pending = Vec::new();
        for i in &behind {
            pending.push(served.submit(i.clone(), deadline, true).await.expect("queued behind the leader"));
        }
        drop(leader);
        let mut out = Vec::new();
        for rx in pending {
            let answer = tokio::time::timeout(Duration::from_secs(10), rx).await.expect("answered, not left queued");
            out.push(answer.expect("answered by a worker").0.expect("inference succeeds"));
        }
        out
    });
    for (caller, (got, want)) in answers.iter().zip(&alone).enumerate() {
        assert!(close(got, want).is_ok(), "caller {caller}: {:?}", close(got, want));
    }
    assert_eq!(served.stats.led_runs.load(Relaxed), led_before, "the dropped leader ran nothing");
    assert_eq!(served.queue_depth(), 0, "everything queued was answered");

    // A wave of four one-row requests: one led run of four rows. The run needs a CPU slot,
    // shared with the other tests of this binary; without one the wave goes to the workers
    // (still answered right) and is tried again.
    let wave: Vec<Vec<Tensor>> = (4..8).map(|c| model.validate(input(c, 1, 13)).expect("valid")).collect();
    let alone: Vec<Vec<Tensor>> = wave.iter().map(|i| model.run(i.clone()).expect("runs")).collect();
    let mut led = false;
    for _ in 0..50 {
        settle(&rt, &served, &one, deadline, &mut worker_runs);
        drop(cpu::acquire());
        let (led_before, runs_before, rows_before) =
            (served.stats.led_runs.load(Relaxed), served.stats.runs.load(Relaxed), served.stats.rows.load(Relaxed));
        let answers = rt.block_on(futures::future::join_all(wave.iter().map(|i| async {
            let rx = served.submit(i.clone(), deadline, true).await.expect("queued");
            rx.await.expect("answered").0.expect("inference succeeds")
        })));
        for (caller, (got, want)) in answers.iter().zip(&alone).enumerate() {
            assert!(close(got, want).is_ok(), "caller {caller}: {:?}", close(got, want));
        }
        if served.stats.led_runs.load(Relaxed) > led_before {
            assert_eq!(served.stats.led_runs.load(Relaxed), led_before + 1, "one led run for the wave");
            assert_eq!(served.stats.runs.load(Relaxed), runs_before + 1, "the wave ran as one batch");
            assert_eq!(served.stats.rows.load(Relaxed), rows_before + 4);
            led = true;
            break;
        }
    }
    assert!(led, "no wave was led on the runtime's thread in 50 tries");
    assert_eq!(served.queue_depth(), 0);

    // A leader lets go after its slice (~500 µs): of 200 full batches queued behind it (at
    // least ~10 µs each), it runs some and hands the rest to the workers, which answer them.
    let big = Served::start(
        "mlp",
        "1",
        model.clone(),
        &ServeOptions {
            batch: Some(BatchPolicy { max_batch: 8, max_delay: Duration::ZERO, preferred: vec![], sizes: vec![] }),
            max_queue: 256,
            short_run: SHORT,
            ..ServeOptions::default()
        },
    );
    let eight = model.validate(input(9, 8, 17)).expect("valid");
    model.run(eight.clone()).expect("warm-up run builds the plan for eight rows");
    let want = model.run(eight.clone()).expect("runs");
    let mut stopped = false;
    for _ in 0..50 {
        settle(&rt, &big, &one, deadline, &mut worker_runs);
        drop(cpu::acquire());
        let (led_before, runs_before) = (big.stats.led_runs.load(Relaxed), big.stats.runs.load(Relaxed));
        let answers = rt.block_on(futures::future::join_all((0..200).map(|_| async {
            let rx = big.submit(eight.clone(), deadline, true).await.expect("queued");
            tokio::time::timeout(Duration::from_secs(30), rx).await.expect("answered").expect("answered").0
        })));
        for a in &answers {
            let got = a.as_ref().expect("inference succeeds");
            assert!(close(got, &want).is_ok(), "{:?}", close(got, &want));
        }
        let (led, runs) = (big.stats.led_runs.load(Relaxed) - led_before, big.stats.runs.load(Relaxed) - runs_before);
        assert_eq!(runs, 200, "one run per full batch");
        if led > 0 {
            assert!(led < 200, "the leader ran all 200 batches itself (its answer waited for all of them)");
            stopped = true;
            break;
        }
    }
    assert!(stopped, "no batch was led in 50 tries");
    assert_eq!(big.queue_depth(), 0);
}

/// Requests that wait for a core held by other runs (another model's, here the test's) count
/// that wait in the model's latency estimate, which the overflow router weighs against the
/// objective, and in its metadata; the run times themselves stay clean of it.
#[test]
fn the_latency_estimate_counts_waits_for_a_core_held_by_other_runs() {
    let ServedMlp { model, rt, deadline, served, one } = served_mlp(&ServeOptions::default());
    // Runs with cores to spare: the estimate is about one MLP run.
    for _ in 0..16 {
        let rx = rt.block_on(served.submit(one.clone(), deadline, true)).expect("queued");
        rt.block_on(rx).expect("answered").0.expect("inference succeeds");
    }
    let free = served.estimated_latency();
    assert!(free < Duration::from_millis(1), "{free:?} with free cores");
    // Every core held, as another model's long runs would: of the two requests queued
    // meanwhile, the one its worker thread took waits for a core. Once it waits, the cores stay
    // held another 50 ms (the size of the wait, not a synchronisation).
    let held: Vec<_> = (0..cpu::threads()).map(|_| cpu::acquire().expect("slot")).collect();
    let pending: Vec<_> = (0..2)
        .map(|c| rt.block_on(served.submit(model.validate(input(c, 1, 9)).expect("valid"), deadline, true)))
        .collect();
    let blocked = (0..10_000_000).any(|_| {
        let waits = cpu::waiting() >= 1;
        if !waits {
            std::thread::yield_now();
        }
        waits
    });
    assert!(blocked, "the request taken waits for a core");
    std::thread::sleep(Duration::from_millis(50));
    drop(held);
    for rx in pending {
        rt.block_on(rx.expect("queued")).expect("answered").0.expect("inference succeeds");
    }
    let waited = served.stats.slot_wait_us();
    assert!(waited >= 1_000, "mean wait for a core {waited} µs after a wait of 50 ms");
    let estimate = served.estimated_latency();
    assert!(estimate >= Duration::from_micros(waited), "estimate {estimate:?} counts the wait ({waited} µs)");
    // What is left of the estimate is the run time, still about one MLP run.
    assert!(estimate - Duration::from_micros(waited) < Duration::from_millis(1), "{estimate:?}");
}

/// A one-row request of `model` from its golden case `case`, float inputs scaled by `scale`.
fn scaled_request(golden: &outpost_tests::GoldenSet, case: usize, scale: f64, id: &str) -> Value {
    let mut body = golden.request(case);
    for input in body["inputs"].as_array_mut().into_iter().flatten() {
        if input["datatype"].as_str().is_some_and(|d| d.starts_with("FP")) {
            if let Some(data) = input["data"].as_array_mut() {
                for x in data.iter_mut() {
                    *x = serde_json::json!(x.as_f64().unwrap_or(0.0) * scale);
                }
            }
        }
    }
    body["id"] = serde_json::json!(id);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_answered_in_a_batch_equals_the_same_row_answered_alone_for_every_demo_model() -> anyhow::Result<()> {
    use outpost_tests::DEMO_MODELS;
    let extra: String =
        DEMO_MODELS.iter().map(|m| format!("[models.{m}]\nmax_batch = 16\nmax_queue_delay = \"5ms\"\n\n")).collect();
    let agent = TestAgent::start(&[root().join("models")], &extra).await?;
    // Rows of varied range: each golden case at scales 1/4 to 16 (random draws, fixed seed).
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for model in DEMO_MODELS {
        let golden = golden_for(&root().join("models").join(model))?;
        let cases = golden.golden.cases.len();
        let requests: Vec<Value> = (0..64)
            .map(|i| {
                let scale = 2f64.powf(rand_f64(&mut rng) * 6.0 - 2.0);
                scaled_request(&golden, i % cases, scale, &format!("{model}-{i}"))
            })
            .collect();
        // Alone: one at a time.
        let mut alone = Vec::new();
        for r in &requests {
            let (s, answer) = agent.post(&format!("/v2/models/{model}/infer"), r).await?;
            anyhow::ensure!(s == 200, "{model}: {s} {answer}");
            alone.push(outpost::protocol::json::tensors_from_value(answer["outputs"].clone())?);
        }
        // Together: 64 at once, batched with each other.
        let path = format!("/v2/models/{model}/infer");
        let calls = requests.iter().map(|r| agent.post(&path, r));
        let together = futures::future::join_all(calls).await;
        for (i, (r, want)) in together.into_iter().zip(&alone).enumerate() {
            let (s, answer) = r?;
            anyhow::ensure!(s == 200, "{model}: {s} {answer}");
            let have = outpost::protocol::json::tensors_from_value(answer["outputs"].clone())?;
            for w in want {
                let h = have.iter().find(|t| t.name == w.name).ok_or_else(|| anyhow::anyhow!("no {}", w.name))?;
                outpost::engine::golden::compare(h, w, &golden.golden.tolerance)
                    .map_err(|e| anyhow::anyhow!("{model} request {i}, output {}: {e}", w.name))?;
            }
        }
        let (_, meta) = agent.get(&format!("/v2/models/{model}")).await?;
        let p = &meta["parameters"];
        eprintln!("{model}: max_batch {}, runs {}, batching_off {}", p["max_batch"], p["runs"], p["batching_off"]);
        anyhow::ensure!(
            p["max_batch"] == 16 || p["batching_off"].is_string(),
            "batching is on, or the metadata says why not: {meta}"
        );
    }
    agent.stop().await
}

/// A uniform draw in [0, 1) (xorshift64*: repeatable, no dependency).
fn rand_f64(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}
