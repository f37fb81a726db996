//! Fault injection for crash tests: with the `failpoints` feature, `OUTPOST_FAILPOINTS=name`
//! (comma-separated) makes the process abort the first time it reaches that point, as a
//! `kill -9` would stop it there (`hit`), or the thread stop there (`hang`). Without the
//! feature, both compile to nothing.

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
