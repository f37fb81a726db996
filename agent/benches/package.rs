//! The cost of each processing step of a model package against the model run it feeds, in one
//! process on one thread, as JSON lines for scripts/bench-package.sh:
//!
//!     cargo bench -p outpost --bench package -- --iters 300 [--minilm DIR]
//!
//! Cases: text through MiniLM's tokenizer at about 16 and 128 tokens (with `--minilm`, the
//! `minilm-text` package), a 640×480 JPEG through the digits package's image step (decode,
//! greyscale, resize to 8×8), and a row of 30 named fields through the tabular step. Each
//! line has the p50 and p99 of the step before the model, the model run, and the step after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost::config::ModelConfig;
use outpost::engine::package::{Package, Processing};
use outpost::protocol::{Tensor, TensorData};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn pct(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6
}

struct Loaded {
    package: Package,
    model: outpost::engine::LoadedModel,
}

fn load(dir: &Path) -> Loaded {
    let onnx = std::fs::read(dir.join("model.onnx")).expect("model.onnx");
    let golden = std::fs::read(dir.join("golden.json")).ok();
    let prepared =
        outpost::engine::prepare(&onnx, golden.as_deref(), &ModelConfig::default().prepare_options(onnx.len()))
            .expect("model prepares");
    let decl: Processing = serde_json::from_slice(&std::fs::read(dir.join("package.json")).expect("package.json"))
        .expect("package declaration");
    let mut files = BTreeMap::new();
    for f in outpost::engine::package::needed_files(&decl) {
        files.insert(f.to_owned(), std::fs::read(dir.join(f)).expect("package file"));
    }
    let (package, _) = outpost::engine::package::prepare(&decl, &files, &prepared.model).expect("package holds");
    Loaded { package, model: prepared.model }
}

fn bench(name: &str, what: &str, l: &Loaded, input: Tensor, iters: usize) {
    let (mut pre, mut run, mut post) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        let x = l.package.pre(vec![input.clone()]).expect("pre");
        let x = l.model.validate(x).expect("valid");
        let t1 = Instant::now();
        let y = l.model.run(x).expect("run");
        let t2 = Instant::now();
        let _ = l.package.post(y).expect("post");
        let t3 = Instant::now();
        if i >= iters / 10 {
            pre.push(t1 - t);
            run.push(t2 - t1);
            post.push(t3 - t2);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "case": name, "input": what,
            "pre_p50_us": pct(&mut pre, 0.5), "pre_p99_us": pct(&mut pre, 0.99),
            "model_p50_us": pct(&mut run, 0.5), "model_p99_us": pct(&mut run, 0.99),
            "post_p50_us": pct(&mut post, 0.5),
        })
    );
}

fn bytes(name: &str, item: Vec<u8>) -> Tensor {
    Tensor { name: name.into(), shape: vec![1], data: TensorData::Bytes(vec![item]) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = arg(&args, "--iters").and_then(|s| s.parse().ok()).unwrap_or(300);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(dir) = arg(&args, "--minilm") {
        let l = load(Path::new(&dir));
        let short = "Please refund the last card payment made at the pharmacy counter today.";
        let long = "The branch opens at nine and closes at five, except on Saturdays. ".repeat(10);
        for (what, text) in [("text, 16 tokens", short.to_owned()), ("text, 128 tokens (truncated)", long)] {
            let ids = l.package.pre(vec![bytes("text", text.clone().into_bytes())]).expect("tokenizes");
            let n = ids[0].shape[1];
            bench("minilm-text", &format!("{what}: {n} ids"), &l, bytes("text", text.into_bytes()), iters);
        }
    }
    let digits = load(&root.join("models/digits-png"));
    let img = image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8])
    });
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, image::ImageFormat::Jpeg).expect("jpeg encodes");
    let jpeg = jpeg.into_inner();
    let what = format!("640×480 JPEG ({} KiB) to 8×8", jpeg.len() >> 10);
    bench("digits-png", &what, &digits, bytes("image", jpeg), iters);
    let png = std::fs::read(root.join("models/digits-png/sample.png")).expect("sample.png");
    bench("digits-png", "8×8 PNG", &digits, bytes("image", png), iters);
    let fields = load(&root.join("models/cancer-fields"));
    let row = std::fs::read(root.join("models/cancer-fields/sample.json")).expect("sample.json");
    bench("cancer-fields", "JSON object, 30 fields", &fields, bytes("fields", row), iters);
}
