//! The .deb and .rpm packages (full suite, as root, on a Debian machine): build from the test
//! build's binary, lintian, install, check-config with the packaged config, upgrade keeping a
//! locally edited config, remove (config and state stay), purge (nothing stays); rpm metadata;
//! the systemd unit's verification and exposure score. Then the same for `outpost-collector`
//! (in the same test: dpkg takes one lock).

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::*;

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(cmd).args(args).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}

fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().is_ok_and(|o| o.status.success())
}

/// The agent binary of this build: the CLI built for the tests (`outpost::cli::main`, the same
/// program as the `outpost` binary, which `cargo test` does not build on its own).
fn agent_binary() -> anyhow::Result<PathBuf> {
    let bin = crate::outpost_bin();
    anyhow::ensure!(bin.is_file(), "{} not built", bin.display());
    Ok(bin)
}

fn build(version: &str, out: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let bin = agent_binary()?;
    let (code, text) = run(
        root().join("scripts/package.sh").to_str().unwrap_or_default(),
        &["--bin", bin.to_str().unwrap_or_default(), "--out", out.to_str().unwrap_or_default(), "--version", version],
    )?;
    anyhow::ensure!(code == 0, "package.sh failed: {text}");
    anyhow::ensure!(!text.contains("brp-") && !text.contains("Illegal option"), "package.sh printed errors: {text}");
    let deb = out.join(format!("outpost_{version}_amd64.deb"));
    anyhow::ensure!(deb.is_file(), "no deb: {text}");
    let rpm = std::fs::read_dir(out)?.flatten().map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("outpost-{version}-1.")) && n.ends_with(".rpm"))
    });
    Ok((deb, rpm))
}

/// Runs `f`, turning a failed assertion into an error: the caller then purges what it
/// installed, so a failure does not leave the package on the machine for the next run.
fn guarded(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(anyhow::anyhow!("assertion failed: {message}"))
    })
}

/// Files the package owns or leaves, below the paths it uses.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for p in [
        "/usr/bin/outpost",
        "/lib/systemd/system/outpost.service",
        "/etc/outpost",
        "/etc/outpost/outpost.toml",
        "/var/lib/outpost",
        "/usr/share/outpost",
        "/usr/share/doc/outpost",
    ] {
        if Path::new(p).exists() {
            found.push(p.to_owned());
        }
    }
    found
}

#[test]
fn deb_install_upgrade_remove_purge_and_rpm_metadata() -> anyhow::Result<()> {
    let root_user = run("id", &["-u"])?.1.trim() == "0";
    if !(full_suite() && root_user && have("dpkg-deb") && Path::new("/var/lib/dpkg").is_dir()) {
        eprintln!("skipped: needs OUTPOST_TEST_FULL=1, root and dpkg (a Debian machine)");
        return Ok(());
    }
    if run("dpkg", &["-s", "outpost"])?.0 == 0 {
        anyhow::bail!("an outpost package is already installed on this machine; not touching it");
    }
    let dist = tempfile::tempdir()?;
    let (deb, rpm) = build("0.1.0", dist.path())?;
    let upgrade_rpm = std::cell::Cell::new(None);
    let result = guarded(|| -> anyhow::Result<()> {
        if have("lintian") {
            // Nothing beyond the package's documented overrides (its 0640 configuration).
            let (code, text) = run("lintian", &["--fail-on", "warning", deb.to_str().unwrap_or_default()])?;
            eprintln!("lintian:\n{text}");
            assert_eq!(code, 0, "lintian reports warnings:\n{text}");
            assert!(!text.contains("W: ") && !text.contains("E: "), "lintian:\n{text}");
        }
        // The maintainer scripts handle the service as debhelper's would.
        let ctrl = tempfile::tempdir()?;
        let (code, text) =
            run("dpkg-deb", &["-e", deb.to_str().unwrap_or_default(), ctrl.path().to_str().unwrap_or_default()])?;
        assert_eq!(code, 0, "dpkg-deb -e: {text}");
        let script = |n: &str| std::fs::read_to_string(ctrl.path().join(n)).unwrap_or_default();
        let (postinst, prerm, postrm) = (script("postinst"), script("prerm"), script("postrm"));
        assert!(postinst.contains("deb-systemd-helper enable 'outpost.service'"), "{postinst}");
        assert!(postinst.contains("deb-systemd-invoke \"$action\" 'outpost.service'"), "{postinst}");
        assert!(prerm.contains("deb-systemd-invoke stop 'outpost.service'"), "{prerm}");
        assert!(postrm.contains("deb-systemd-helper purge 'outpost.service'"), "{postrm}");
        assert!(!postinst.contains("systemctl enable") && !prerm.contains("systemctl stop"), "{postinst}{prerm}");
        let (code, text) = run("dpkg", &["-i", deb.to_str().unwrap_or_default()])?;
        assert_eq!(code, 0, "dpkg -i: {text}");
        let (_, changelog) = run("sh", &["-c", "zcat /usr/share/doc/outpost/changelog.gz"])?;
        assert!(changelog.lines().count() > 3, "{changelog}");
        let long: Vec<&str> = changelog.lines().filter(|l| l.chars().count() > 80).collect();
        assert!(long.is_empty(), "changelog lines over 80 columns: {long:?}");
        let (code, text) = run("/usr/bin/outpost", &["check-config", "--config", "/etc/outpost/outpost.toml"])?;
        assert_eq!(code, 0, "installed check-config: {text}");
        assert!(run("getent", &["passwd", "outpost"])?.0 == 0, "system user created");
        let unit = std::fs::read_to_string("/lib/systemd/system/outpost.service")?;
        assert!(unit.contains("WatchdogSec=30s") && unit.contains("Type=notify"), "{unit}");
        assert!(unit.contains("ExecReload=/usr/bin/outpost reload"), "systemctl reload reports the outcome: {unit}");
        if have("systemd-analyze") {
            let (code, text) = run("systemd-analyze", &["verify", "/lib/systemd/system/outpost.service"])?;
            assert_eq!(code, 0, "systemd-analyze verify: {text}");
            assert!(!text.contains("outpost.service"), "systemd-analyze verify names the unit: {text}");
            let (_, text) =
                run("systemd-analyze", &["security", "--offline=yes", "/lib/systemd/system/outpost.service"])?;
            let score = text
                .lines()
                .find(|l| l.contains("Overall exposure level"))
                .and_then(|l| l.split(": ").nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok());
            eprintln!("systemd-analyze security: {score:?}");
            assert!(score.is_some_and(|x| x <= 2.0), "exposure above 2.0: {text}");
        }

        // A local edit survives an upgrade.
        let mut cfg = std::fs::read_to_string("/etc/outpost/outpost.toml")?;
        cfg.push_str("\n# edited on site\n");
        std::fs::write("/etc/outpost/outpost.toml", &cfg)?;
        let (deb2, rpm2) = build("0.1.1", dist.path())?;
        upgrade_rpm.set(rpm2);
        let (code, text) = run("dpkg", &["-i", "--force-confold", deb2.to_str().unwrap_or_default()])?;
        assert_eq!(code, 0, "upgrade: {text}");
        assert!(run("dpkg-query", &["-W", "-f=${Version}", "outpost"])?.1.contains("0.1.1"));
        assert!(std::fs::read_to_string("/etc/outpost/outpost.toml")?.contains("# edited on site"), "local edit kept");

        // remove: configuration and state stay.
        let (code, text) = run("dpkg", &["-r", "outpost"])?;
        assert_eq!(code, 0, "remove: {text}");
        assert_eq!(leftovers(), vec!["/etc/outpost", "/etc/outpost/outpost.toml", "/var/lib/outpost"]);
        // purge: nothing stays.
        let (code, text) = run("dpkg", &["-P", "outpost"])?;
        assert_eq!(code, 0, "purge: {text}");
        assert_eq!(leftovers(), Vec::<String>::new());
        assert!(run("getent", &["passwd", "outpost"])?.0 != 0, "system user removed");
        Ok(())
    });
    if result.is_err() {
        let _ = run("dpkg", &["-P", "outpost"]);
    }
    result?;

    match rpm {
        Some(rpm) => {
            let p = rpm.to_str().unwrap_or_default();
            let (code, info) = run("rpm", &["-qip", p])?;
            assert_eq!(code, 0, "{info}");
            assert!(info.contains("Name        : outpost") && info.contains("Version     : 0.1.0"), "{info}");
            let (_, files) = run("rpm", &["-qlp", p])?;
            for f in [
                "/usr/bin/outpost",
                "/usr/lib/systemd/system/outpost.service",
                "/etc/outpost/outpost.toml",
                "/var/lib/outpost",
                "/usr/share/outpost/models/mlp/model.onnx",
                "/usr/share/man/man1/outpost.1.gz",
            ] {
                assert!(files.lines().any(|l| l == f), "{f} in the rpm:\n{files}");
            }
            let (_, scripts) = run("rpm", &["-qp", "--scripts", p])?;
            assert!(scripts.contains("useradd -r -g outpost") && scripts.contains("systemctl preset"), "{scripts}");
            let (_, conf) = run("rpm", &["-qpc", p])?;
            assert!(conf.contains("/etc/outpost/outpost.toml"), "config file marked: {conf}");
            if have("rpmlint") {
                let (_, lint) = run("rpmlint", &[p])?;
                eprintln!("rpmlint:\n{lint}");
            }
            rpm_install_upgrade_erase(&rpm, upgrade_rpm.take().as_deref())?;
        }
        None => assert!(!have("rpmbuild"), "rpmbuild is installed but no rpm was built"),
    }
    collector_packages()
}

/// The rpm installed, upgraded (a locally edited configuration kept) and erased (the edit saved
/// as `.rpmsave`) in a scratch root. Scriptlets do not run there: the root has no shell or
/// `useradd`; their text is checked above.
fn rpm_install_upgrade_erase(rpm: &Path, upgrade: Option<&Path>) -> anyhow::Result<()> {
    let upgrade = upgrade.ok_or_else(|| anyhow::anyhow!("no 0.1.1 rpm was built"))?;
    let scratch = tempfile::tempdir()?;
    let r = scratch.path().to_str().unwrap_or_default();
    let rpm_in = |args: &[&str]| -> anyhow::Result<(i32, String)> {
        let mut all = vec!["--root", r, "--nodeps", "--noscripts"];
        all.extend_from_slice(args);
        run("rpm", &all)
    };
    let (code, text) = run("rpm", &["--root", r, "--initdb"])?;
    assert_eq!(code, 0, "rpm --initdb: {text}");
    let (code, text) = rpm_in(&["-i", rpm.to_str().unwrap_or_default()])?;
    assert_eq!(code, 0, "rpm -i: {text}");
    let at = |p: &str| scratch.path().join(p.trim_start_matches('/'));
    assert!(at("/usr/bin/outpost").is_file() && at("/usr/lib/systemd/system/outpost.service").is_file());
    let config = at("/etc/outpost/outpost.toml");
    let mut edited = std::fs::read_to_string(&config)?;
    edited.push_str("\n# edited on site\n");
    std::fs::write(&config, &edited)?;
    let (code, text) = rpm_in(&["-U", upgrade.to_str().unwrap_or_default()])?;
    assert_eq!(code, 0, "rpm -U: {text}");
    let (_, version) = run("rpm", &["--root", r, "-q", "--qf", "%{VERSION}", "outpost"])?;
    assert_eq!(version.trim(), "0.1.1", "upgraded");
    assert_eq!(std::fs::read_to_string(&config)?, edited, "the local edit survives the upgrade");
    let (code, text) = rpm_in(&["-e", "outpost"])?;
    assert_eq!(code, 0, "rpm -e: {text}");
    assert!(!at("/usr/bin/outpost").exists(), "erased");
    assert!(at("/etc/outpost/outpost.toml.rpmsave").is_file(), "the edited configuration is saved as .rpmsave");
    assert_ne!(run("rpm", &["--root", r, "-q", "outpost"])?.0, 0, "no longer installed");
    Ok(())
}

fn collector_packages() -> anyhow::Result<()> {
    let dist = tempfile::tempdir()?;
    let bin = crate::collector_bin();
    let out = dist.path().to_str().unwrap_or_default();
    let (code, text) = run(
        root().join("scripts/package.sh").to_str().unwrap_or_default(),
        &["--collector", bin.to_str().unwrap_or_default(), "--out", out, "--version", "0.1.0"],
    )?;
    anyhow::ensure!(code == 0, "package.sh --collector failed: {text}");
    let deb = dist.path().join("outpost-collector_0.1.0_amd64.deb");
    let deb_s = deb.to_str().unwrap_or_default();
    if have("lintian") {
        let (code, text) = run("lintian", &["--fail-on", "warning", deb_s])?;
        assert_eq!(code, 0, "lintian reports warnings:\n{text}");
        assert!(!text.contains("W: ") && !text.contains("E: "), "lintian:\n{text}");
    }
    let present = || -> Vec<&'static str> {
        ["/usr/bin/outpost-collector", "/lib/systemd/system/outpost-collector.service", "/etc/outpost-collector"]
            .into_iter()
            .filter(|p| Path::new(p).exists())
            .collect()
    };
    let result = guarded(|| -> anyhow::Result<()> {
        let (code, text) = run("dpkg", &["-i", deb_s])?;
        assert_eq!(code, 0, "install: {text}");
        let (code, text) = run("/usr/bin/outpost-collector", &["--version"])?;
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("outpost-collector"), "{text}");
        assert!(run("getent", &["passwd", "outpost-collector"])?.0 == 0, "system user created");
        let unit = std::fs::read_to_string("/lib/systemd/system/outpost-collector.service")?;
        assert!(unit.contains("User=outpost-collector") && unit.contains("ProtectSystem=strict"), "{unit}");
        if have("systemd-analyze") {
            let (code, text) = run("systemd-analyze", &["verify", "/lib/systemd/system/outpost-collector.service"])?;
            eprintln!("systemd-analyze verify ({code}): {text}");
        }
        // The packaged configuration is valid: `migrate` gets past it to the database.
        let (code, text) = run(
            "/usr/bin/outpost-collector",
            &[
                "migrate",
                "--config",
                "/etc/outpost-collector/collector.toml",
                "--database",
                "host=127.0.0.1 port=1 dbname=x connect_timeout=2",
            ],
        )?;
        assert_eq!(code, 69, "a configuration error would be 78: {text}");
        let (code, text) = run("dpkg", &["-r", "outpost-collector"])?;
        assert_eq!(code, 0, "remove: {text}");
        assert_eq!(present(), vec!["/etc/outpost-collector"], "remove keeps the configuration");
        let (code, text) = run("dpkg", &["-P", "outpost-collector"])?;
        assert_eq!(code, 0, "purge: {text}");
        assert!(present().is_empty(), "purge leaves nothing: {:?}", present());
        Ok(())
    });
    if result.is_err() {
        let _ = run("dpkg", &["-P", "outpost-collector"]);
    }
    result?;
    if let Some(rpm) =
        std::fs::read_dir(dist.path())?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "rpm"))
    {
        let (_, files) = run("rpm", &["-qlp", rpm.to_str().unwrap_or_default()])?;
        for f in [
            "/usr/bin/outpost-collector",
            "/usr/lib/systemd/system/outpost-collector.service",
            "/etc/outpost-collector/collector.toml",
        ] {
            assert!(files.lines().any(|l| l == f), "{f} in the rpm:\n{files}");
        }
    }
    Ok(())
}
