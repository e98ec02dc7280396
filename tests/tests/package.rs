//! The Debian package as a robot gets it: `scripts/package.sh` builds the
//! .deb from the built binaries, and the test reads it back with dpkg-deb
//! into a scratch root: its control fields, its layout, its conffile, its
//! maintainer scripts, systemd's verdict on the installed unit, and the
//! installed daemon serving the installed config.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use embody_tests::{bin_dir, free_port, repo_root, smollm2, Daemon, TempDir};

/// Runs a command and returns its standard output.
///
/// # Panics
/// If it fails (its error output is in the message).
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The package of the built (debug) binaries, in `dir`.
fn build_package(dir: &Path) -> PathBuf {
    let out = run(Command::new("bash")
        .arg(repo_root().join("scripts/package.sh"))
        .env("PROFILE", "debug")
        .env("BINS", bin_dir())
        .env("OUT", dir));
    PathBuf::from(out.trim())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_package_installs_a_daemon_that_serves_its_own_config() {
    let dir = TempDir::new("package");
    let deb = build_package(dir.path());
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("embodyd_0.1.0_{}.deb", arch.trim())
    );

    // Control fields.
    let field = |name: &str| run(Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "embodyd");
    assert_eq!(field("Architecture").trim(), arch.trim());
    let depends = field("Depends");
    assert!(depends.starts_with("libc6 (>= 2."), "Depends: {depends}");
    // The Vulkan loader is opened at run time, so readelf does not see it.
    assert_eq!(field("Recommends").trim(), "libvulkan1");

    // Every file belongs to root: the embodyd user exists only after install.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for line in listing.lines() {
        assert!(line.contains(" root/root "), "not root's: {line}");
    }

    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let ctrl = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl));

    // The layout.
    for exe in ["usr/bin/embodyd", "usr/bin/embody"] {
        assert_eq!(mode(&root.join(exe)), 0o755, "{exe}");
    }
    let config = root.join("etc/embodyd/embodyd.toml");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        std::fs::read_to_string(repo_root().join("configs/default.toml")).unwrap()
    );
    assert_eq!(mode(&config), 0o644);
    assert!(root.join("var/lib/embodyd/models").is_dir());
    assert!(root.join("usr/share/doc/embodyd/README.md").is_file());
    assert!(root.join("usr/share/doc/embodyd/architecture.md").is_file());
    assert!(root
        .join("usr/share/doc/embodyd/examples/zenoh-secure.json5")
        .is_file());
    let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/embodyd/embodyd.toml");

    // The unit runs the installed binary on the installed config, as the
    // user the package makes.
    let unit_path = root.join("usr/lib/systemd/system/embodyd.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words = exec.split_whitespace();
    let program = words.next().unwrap();
    assert!(root.join(&program[1..]).is_file(), "ExecStart={exec}");
    assert_eq!(
        words.collect::<Vec<_>>(),
        ["--config", "/etc/embodyd/embodyd.toml"]
    );
    let sysusers = std::fs::read_to_string(root.join("usr/lib/sysusers.d/embodyd.conf")).unwrap();
    let user = unit
        .lines()
        .find_map(|l| l.strip_prefix("User="))
        .expect("User=");
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", user])),
        "sysusers.d makes no user {user}:\n{sysusers}"
    );
    let postinst = std::fs::read_to_string(ctrl.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers embodyd.conf"));
    assert!(postinst.contains("/var/lib/embodyd/models"));
    for script in ["postinst", "prerm", "postrm"] {
        let path = ctrl.join(script);
        assert_eq!(mode(&path), 0o755, "{script}");
        run(Command::new("sh").arg("-n").arg(&path));
    }

    // systemd reads the installed unit (pointed at the installed binary),
    // alone and with the GPU drop-in from the examples applied.
    let installed = root.join("usr/bin/embodyd");
    let unit_here = unit.replace(program, installed.to_str().unwrap());
    let gpu = std::fs::read_to_string(root.join("usr/share/doc/embodyd/examples/embodyd-gpu.conf"))
        .expect("the GPU drop-in among the examples");
    assert!(gpu.contains("MemoryDenyWriteExecute=no") && gpu.contains("PrivateDevices=no"));
    for (sub, text) in [
        ("plain", unit_here.clone()),
        ("gpu", format!("{unit_here}\n{gpu}")),
    ] {
        let checked = dir.path().join(sub).join("embodyd.service");
        std::fs::create_dir_all(checked.parent().unwrap()).unwrap();
        std::fs::write(&checked, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&checked)
            .output()
            .expect("systemd-analyze (scripts/test.sh installs it)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze verify ({sub}): {}\n{err}",
            out.status
        );
    }

    // The installed daemon on the installed config (the test's model and
    // free ports; no zenoh router is running, which the daemon rides out).
    let http = free_port();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "path = \"SmolLM2-135M-Instruct.Q4_1.gguf\"",
            &format!("path = \"{}\"", smollm2().display()),
        )
        .replace(
            "bind = \"127.0.0.1:8080\"",
            &format!("bind = \"127.0.0.1:{http}\""),
        )
        .replace(
            "tcp/127.0.0.1:7447",
            &format!("tcp/127.0.0.1:{}", free_port()),
        )
        .replace(
            "tcp/127.0.0.1:7448",
            &format!("tcp/127.0.0.1:{}", free_port()),
        );
    let mut d = Daemon::spawn_program(&installed, &text, &[], |_| {});
    d.wait_ready();
    assert_eq!(d.http_url(), format!("http://127.0.0.1:{http}"));
    let status = run(Command::new(root.join("usr/bin/embody"))
        .args(["status", "--json", "--socket"])
        .arg(&d.socket));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], true, "{status}");
}
