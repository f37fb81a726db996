//! Fault injection for crash tests: with the `failpoints` feature, `OUTPOST_FAILPOINTS=name`
//! (comma-separated) makes the process abort the first time it reaches that point, as a
//! `kill -9` would stop it there (`hit`), the thread stop there (`hang`), or wait there until
//! the test lets it go (`pause`). Without the feature, all compile to nothing.

/// Marks a point where a crash must leave consistent state.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        if let Ok(list) = std::env::var("OUTPOST_FAILPOINTS") {
            if list.split(',').any(|p| p == name) {
                eprintln!("failpoint {name}: aborting");
                std::process::abort();
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Marks a point where a stuck thread must be noticed: with the `failpoints` feature and
/// `OUTPOST_FAILPOINTS` naming it, the thread stops there for an hour.
#[inline]
pub fn hang(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        if let Ok(list) = std::env::var("OUTPOST_FAILPOINTS") {
            if list.split(',').any(|p| p == name) {
                eprintln!("failpoint {name}: hanging");
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Marks a point a test holds a thread at, to order a race: with the `failpoints` feature and
/// `OUTPOST_FAILPOINTS` naming it, a thread that reaches it says `failpoint <name>: paused` on
/// stderr and waits until the test writes a byte to the FIFO `$OUTPOST_FAILPOINT_DIR/<name>`
/// (one byte each time it reaches it).
#[inline]
pub fn pause(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        let named = std::env::var("OUTPOST_FAILPOINTS").is_ok_and(|list| list.split(',').any(|p| p == name));
        if named {
            if let Ok(dir) = std::env::var("OUTPOST_FAILPOINT_DIR") {
                use std::io::Read as _;
                eprintln!("failpoint {name}: paused");
                // Opening a FIFO for reading blocks until a writer opens it, and a read until
                // it writes; a writer that leaves without writing (an earlier release closing
                // late) is waited past.
                let path = std::path::Path::new(&dir).join(name);
                while let Ok(mut fifo) = std::fs::File::open(&path) {
                    if fifo.read(&mut [0u8; 1]).is_ok_and(|n| n == 1) {
                        break;
                    }
                }
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// A bound on short runs a test sets in place of the engine's (`OUTPOST_SHORT_RUN_US`, µs,
/// with the `failpoints` feature only): under an instruction counter every run is some fifty
/// times slower, and the engine would queue the runs it takes inline at full speed.
#[inline]
pub fn short_run_us() -> Option<u64> {
    #[cfg(feature = "failpoints")]
    {
        std::env::var("OUTPOST_SHORT_RUN_US").ok().and_then(|v| v.parse().ok())
    }
    #[cfg(not(feature = "failpoints"))]
    None
}
