//! Fault injection for crash tests: with the `failpoints` feature, `OUTPOST_FAILPOINTS=name`
//! (comma-separated) makes the process abort the first time it reaches that point, as a
//! `kill -9` would stop it there. Without the feature, `hit` compiles to nothing.

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
