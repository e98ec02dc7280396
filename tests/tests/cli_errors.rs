//! The `embody` CLI on bad input: a clear message on stderr, a non-zero exit,
//! and nothing on stdout.

use embody_tests::embody;

fn fails_with(args: &[&str], needle: &str) {
    let out = embody(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(
        out.stdout.is_empty(),
        "stdout must stay clean: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
}

#[test]
fn missing_model_file_is_named() {
    fails_with(
        &["generate", "-m", "/nonexistent/model.gguf", "-p", "hi"],
        "/nonexistent/model.gguf",
    );
}

#[test]
fn corrupt_and_truncated_files_give_typed_errors() {
    let dir = std::env::temp_dir().join(format!("embody-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model file at all").unwrap();
    fails_with(&["inspect", junk.to_str().unwrap()], "bad magic");
    fails_with(
        &["generate", "-m", junk.to_str().unwrap(), "-p", "hi"],
        "invalid GGUF file",
    );
    // A valid header that promises more tensors than the file holds.
    let mut trunc = b"GGUF".to_vec();
    trunc.extend_from_slice(&3u32.to_le_bytes());
    trunc.extend_from_slice(&1000u64.to_le_bytes());
    trunc.extend_from_slice(&0u64.to_le_bytes());
    let t = dir.join("truncated.gguf");
    std::fs::write(&t, &trunc).unwrap();
    fails_with(&["inspect", t.to_str().unwrap()], "tensor count 1000");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_flags_are_refused() {
    fails_with(
        &["generate", "-m", "x.gguf", "-p", "hi", "--backend", "tpu"],
        "unknown backend 'tpu'",
    );
    fails_with(&["perplexity", "-m", "x.gguf"], "--file");
}

/// A reader that closes the pipe early (`embody inspect M | head -1`) ends
/// the CLI quietly: no panic message, killed by SIGPIPE as other tools are.
#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let mut child = Command::new(embody_tests::bin("embody"))
        .args(["inspect", embody_tests::smollm2().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}
