//! Exploration: sled's on-disk size under append + prune with group flushes.
//!     cargo run --example sled_amp -- SEGMENT_KIB MODE(space|fast) BATCH
fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p).map(|es| es.flatten().map(|e| {
        let m = e.metadata().unwrap();
        if m.is_dir() { dir_size(&e.path()) } else { m.len() }
    }).sum()).unwrap_or(0)
}
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let seg: usize = a[1].parse().unwrap();
    let mode = if a[2] == "space" { sled::Mode::LowSpace } else { sled::Mode::HighThroughput };
    let batch: u64 = a[3].parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).mode(mode).segment_size(seg * 1024).open().unwrap();
    let t = db.open_tree("audit").unwrap();
    let val = vec![b'x'; 470];
    let mut seq = 0u64;
    let start = std::time::Instant::now();
    for cycle in 0..10 {
        for _ in 0..(100_000 / batch) {
            let mut b = sled::Batch::default();
            for _ in 0..batch { seq += 1; b.insert(&seq.to_be_bytes(), val.clone()); }
            t.apply_batch(b).unwrap();
            db.flush().unwrap();
        }
        let keep_from = seq - 10_000;
        let mut b = sled::Batch::default();
        for k in t.range(..keep_from.to_be_bytes()) { b.remove(k.unwrap().0); }
        t.apply_batch(b).unwrap();
        db.flush().unwrap();
        println!("cycle {cycle}: disk {} MB, retained {} MB", dir_size(dir.path()) / 1_000_000, t.len() * 478 / 1_000_000);
    }
    println!("{:.0} records/s", seq as f64 / start.elapsed().as_secs_f64());
}
