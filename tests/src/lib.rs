//! End-to-end tests of embodyd live in `tests/tests/`; they start the real
//! binaries built by cargo and, where a test needs them, the real model files
//! fetched by `scripts/fetch-models.sh`. This library holds what they share.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The folder holding the workspace's binaries for the profile the tests run under.
pub fn bin_dir() -> PathBuf {
    // Test executables live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target profile folder")
        .to_path_buf()
}

/// The path of a workspace binary, built on demand if cargo has not built it yet.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.exists() {
        let release = bin_dir().ends_with("release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "embodyd", "--bin", name]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of {name} failed");
    }
    path
}

/// Where the real models are (`$EMBODY_MODELS`, default `~/.cache/embody/models`).
pub fn models_dir() -> PathBuf {
    std::env::var_os("EMBODY_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/embody/models"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into())
}

/// A real model file by name.
///
/// # Panics
/// If the file is missing: the tests that need it run only after
/// `scripts/fetch-models.sh`, which `scripts/test.sh` calls.
pub fn model(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `embody` with arguments and returns its output.
pub fn embody(args: &[&str]) -> Output {
    Command::new(bin("embody")).args(args).output().expect("running embody")
}
