//! systemd readiness notification (`Type=notify`) over `$NOTIFY_SOCKET`, without libsystemd.

/// Sends a state line ("READY=1", "RELOADING=1", "STOPPING=1", "STATUS=…") to systemd; does
/// nothing when not started by systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The watchdog timeout systemd set for this process (`WATCHDOG_USEC`, and `WATCHDOG_PID` when
/// it names this process), if any.
pub fn watchdog_timeout() -> Option<std::time::Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    #[test]
    fn notify_reaches_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Only this test touches NOTIFY_SOCKET in this process's environment.
        std::env::set_var("NOTIFY_SOCKET", &path);
        super::notify("READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
