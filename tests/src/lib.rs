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
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

/// A real model file by name.
///
/// # Panics
/// If the file is missing: the tests that need it run only after
/// `scripts/fetch-models.sh`, which `scripts/test.sh` calls.
pub fn model(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `embody` with arguments and returns its output.
pub fn embody(args: &[&str]) -> Output {
    Command::new(bin("embody"))
        .args(args)
        .output()
        .expect("running embody")
}

/// `embody perplexity` of `model` on the GPL text (`tests/fixtures/gpl-3.0.txt`),
/// `chunks` chunks of 512 tokens, with `extra` arguments: the PPL figure.
///
/// # Panics
/// If embody fails or prints no PPL line (its output is in the message).
pub fn perplexity(model: &std::path::Path, chunks: u32, extra: &[&str]) -> f64 {
    let text = repo_root().join("tests/fixtures/gpl-3.0.txt");
    let chunks = chunks.to_string();
    let mut args = vec!["perplexity", "-m", model.to_str().unwrap()];
    args.extend(["-f", text.to_str().unwrap(), "--chunks", &chunks]);
    args.extend(extra);
    let o = embody(&args);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{all}");
    all.lines()
        .find_map(|l| l.strip_prefix("PPL = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a PPL line: {all}"))
}

/// A folder under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty folder whose name starts with `prefix`.
    pub fn new(prefix: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        Self(p)
    }

    /// The folder.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny Llama with random weights as GGUF bytes: 2 layers, d=32, 4 query
/// heads over 2 KV heads, a 256-token context and a byte-level vocabulary
/// of printable ASCII, space and newline, with a plain chat template
/// (`role: content` lines, then `assistant:`). Fast enough that the tests
/// which need a model but not a good one stay quick.
pub fn tiny_model_gguf() -> Vec<u8> {
    use embody_engine::gguf::writer::{write, TensorSpec};
    use embody_engine::gguf::Value;
    use embody_engine::quant::{quantize_row, GgmlType};

    let (d, ff, layers, heads, kv_heads) = (32usize, 64usize, 2usize, 4u32, 2u32);
    let kvd = kv_heads as usize * (d / heads as usize);
    let merges = ["h e", "Ġ t", "Ġ a", "t h"];
    let mut tokens: Vec<String> = vec!["<|bos|>".into(), "<|eos|>".into()];
    tokens.extend((33u8..=126).map(|b| (b as char).to_string()));
    tokens.push("Ġ".into());
    tokens.push("Ċ".into());
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let vocab = tokens.len();
    let mut token_type = vec![Value::I32(1); vocab];
    token_type[0] = Value::I32(3);
    token_type[1] = Value::I32(3);
    let s = |v: &str| Value::String(v.into());
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".to_string(), s("tiny")),
        ("llama.block_count".to_string(), Value::U32(layers as u32)),
        ("llama.context_length".to_string(), Value::U32(256)),
        ("llama.embedding_length".to_string(), Value::U32(d as u32)),
        ("llama.feed_forward_length".to_string(), Value::U32(ff as u32)),
        ("llama.attention.head_count".to_string(), Value::U32(heads)),
        ("llama.attention.head_count_kv".to_string(), Value::U32(kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon".to_string(), Value::F32(1e-5)),
        ("llama.rope.freq_base".to_string(), Value::F32(10000.0)),
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s("gpt-2")),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(token_type)),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(true)),
        (
            "tokenizer.chat_template".to_string(),
            s("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"),
        ),
    ];
    // Deterministic values in [-0.5, 0.5).
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    };
    let tensor = |name: &str, ty: GgmlType, shape: &[usize], values: &[f32]| {
        let cols = shape[0];
        let row_bytes = ty.row_bytes(cols).expect("row size");
        let rows = values.len() / cols;
        let mut data = vec![0u8; row_bytes * rows];
        for r in 0..rows {
            quantize_row(
                ty,
                &values[r * cols..(r + 1) * cols],
                &mut data[r * row_bytes..(r + 1) * row_bytes],
            );
        }
        TensorSpec {
            name: name.into(),
            ty,
            shape: shape.to_vec(),
            data,
        }
    };
    let ones = |v: Vec<f32>| v.iter().map(|x| 1.0 + x * 0.2).collect::<Vec<_>>();
    let (q8, f32t) = (GgmlType::Q8_0, GgmlType::F32);
    let mut t = vec![tensor(
        "token_embd.weight",
        q8,
        &[d, vocab],
        &noise(d * vocab),
    )];
    for l in 0..layers {
        let n = |x: &str| format!("blk.{l}.{x}.weight");
        t.push(tensor(&n("attn_norm"), f32t, &[d], &ones(noise(d))));
        t.push(tensor(&n("attn_q"), q8, &[d, d], &noise(d * d)));
        t.push(tensor(&n("attn_k"), q8, &[d, kvd], &noise(d * kvd)));
        t.push(tensor(&n("attn_v"), q8, &[d, kvd], &noise(d * kvd)));
        t.push(tensor(&n("attn_output"), q8, &[d, d], &noise(d * d)));
        t.push(tensor(&n("ffn_norm"), f32t, &[d], &ones(noise(d))));
        t.push(tensor(&n("ffn_gate"), q8, &[d, ff], &noise(d * ff)));
        t.push(tensor(&n("ffn_up"), q8, &[d, ff], &noise(d * ff)));
        t.push(tensor(&n("ffn_down"), q8, &[ff, d], &noise(ff * d)));
    }
    t.push(tensor("output_norm.weight", f32t, &[d], &ones(noise(d))));
    write(&meta, &t)
}

/// Writes [`tiny_model_gguf`] into `dir` and returns its path.
pub fn write_tiny_model(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, tiny_model_gguf()).expect("writing the tiny model");
    p
}

/// A running `embodyd` started by a test: its own runtime folder (the socket
/// lands there through `$XDG_RUNTIME_DIR`), a config file written by the test,
/// stderr captured to a log file. Killed when dropped if still running.
pub struct Daemon {
    child: std::process::Child,
    /// The daemon's folder: config, log, socket.
    pub dir: TempDir,
    /// The socket it serves.
    pub socket: PathBuf,
}

impl Daemon {
    /// Writes `config` (TOML) and starts `embodyd --config` on it with
    /// `$XDG_RUNTIME_DIR` set to a fresh folder, plus `env`. Does not wait.
    /// A config without a `[zenoh]` section gets zenoh turned off, and one
    /// without an `[http]` section gets the HTTP API on a free port (see
    /// [`Daemon::http_url`]), so that daemons of tests running side by side
    /// never compete for a fixed port.
    pub fn spawn(config: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_with(config, env, |_| {})
    }

    /// [`Daemon::spawn`], with `prepare` given the command before it starts
    /// (to confine it, say).
    pub fn spawn_with(
        config: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut Command),
    ) -> Self {
        Self::spawn_program(&bin("embodyd"), config, env, prepare)
    }

    /// [`Daemon::spawn_with`] of another `embodyd` binary (an installed one).
    pub fn spawn_program(
        program: &std::path::Path,
        config: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut Command),
    ) -> Self {
        let dir = TempDir::new("embodyd");
        let cfg = dir.path().join("embodyd.toml");
        let mut config = config.to_string();
        if !config.contains("[zenoh]") {
            config.push_str("\n[zenoh]\nenabled = false\n");
        }
        if !config.lines().any(|l| l.trim() == "[http]") {
            config.push_str("\n[http]\nbind = \"127.0.0.1:0\"\n");
        }
        std::fs::write(&cfg, config).expect("writing the config");
        let log = std::fs::File::create(dir.path().join("embodyd.log")).expect("log file");
        let mut cmd = Command::new(program);
        cmd.arg("--config")
            .arg(&cfg)
            .env("XDG_RUNTIME_DIR", dir.path())
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        prepare(&mut cmd);
        let child = cmd.spawn().expect("starting embodyd");
        let socket = dir.path().join("embodyd.sock");
        Self { child, dir, socket }
    }

    /// [`Daemon::spawn`], then waits until it answers status as ready.
    ///
    /// # Panics
    /// If it exits or is not ready within 60 s (the log is in the message).
    pub fn start(config: &str) -> Self {
        let mut d = Self::spawn(config, &[]);
        d.wait_ready();
        d
    }

    /// Runs `tests/python/<script>` with the interop venv's Python and
    /// `args`, and returns its standard output.
    ///
    /// # Panics
    /// If the script fails (its output and the daemon's log are in the message).
    pub fn python_checks(&self, script: &str, args: &[&str]) -> String {
        let out = Command::new(test_python())
            .arg(repo_root().join("tests/python").join(script))
            .args(args)
            .output()
            .expect("running the Python checks");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "the checks failed:\n{stdout}\n{}\n--- daemon log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        stdout
    }

    /// Waits until the daemon answers status as ready.
    pub fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("polling embodyd") {
                panic!(
                    "embodyd exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if let Ok(st) = status(&self.socket) {
                if st.ready {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "embodyd not ready after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The base URL of the HTTP API (`http://127.0.0.1:PORT`), from the
    /// line the daemon logs when it starts listening.
    ///
    /// # Panics
    /// If the daemon has not logged it within 60 s.
    pub fn http_url(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let log = self.log();
            if let Some(addr) = log
                .lines()
                .find_map(|l| l.split("http: listening on ").nth(1))
            {
                return format!("http://{}", addr.trim());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "embodyd did not start its HTTP API:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `embodyd_requests_total` of `/metrics` for one interface and outcome.
    ///
    /// # Panics
    /// If the daemon serves no HTTP or the series is missing.
    pub fn requests_total(&self, interface: &str, outcome: &str) -> u64 {
        use std::io::{Read, Write};
        let addr = self.http_url().trim_start_matches("http://").to_string();
        let mut h = std::net::TcpStream::connect(&addr).expect("the HTTP API");
        write!(
            h,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        h.read_to_string(&mut text).unwrap();
        let key =
            format!("embodyd_requests_total{{interface=\"{interface}\",outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key}in:\n{text}"))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`libc::SIGTERM`, ...).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.child.id());
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("polling embodyd") {
                return Some(s);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("embodyd.log")).unwrap_or_default()
    }

    /// The config file's path (rewrite it, then SIGHUP).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("embodyd.toml")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A memory figure of a process from `/proc/<pid>/status`, in bytes:
/// `"VmRSS"` (resident now) or `"VmHWM"` (the most it has been resident).
///
/// # Panics
/// If the process or the field is not there.
pub fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb * 1024
}

/// Asks the daemon at `socket` for its status over a plain blocking socket
/// (no async runtime), with a 5 s limit.
pub fn status(socket: &std::path::Path) -> std::io::Result<embody_protocol::Status> {
    use embody_protocol::wire::Frame;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    match exchange(&mut s, &Frame::Status { id: 1 })? {
        Frame::StatusReply { status, .. } => Ok(*status),
        other => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
    }
}

/// Writes raw bytes and reads one frame back over a blocking socket.
pub fn exchange(
    s: &mut std::os::unix::net::UnixStream,
    frame: &embody_protocol::wire::Frame,
) -> std::io::Result<embody_protocol::wire::Frame> {
    use std::io::Write;
    let bytes = embody_protocol::wire::encode(frame).map_err(std::io::Error::other)?;
    s.write_all(&bytes)?;
    read_frame(s)
}

/// Reads one frame from a blocking socket.
pub fn read_frame(
    s: &mut std::os::unix::net::UnixStream,
) -> std::io::Result<embody_protocol::wire::Frame> {
    use embody_protocol::wire::{decode_body, decode_header, HEADER_LEN};
    use std::io::Read;
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header)?;
    let h = decode_header(&header).map_err(std::io::Error::other)?;
    let mut body = vec![0u8; h.body_len()];
    s.read_exact(&mut body)?;
    let (meta, att) = body.split_at(h.meta_len);
    decode_body(&h, meta, att).map_err(std::io::Error::other)
}

/// A config for tests: `model` as the model, two threads, a 64 MiB KV
/// cache; `extra` is appended (further TOML sections). Without a `[zenoh]`
/// section in `extra`, zenoh is off.
pub fn test_config(model: &std::path::Path, extra: &str) -> String {
    let zenoh = if extra.contains("[zenoh]") {
        ""
    } else {
        "[zenoh]\nenabled = false\n\n"
    };
    format!(
        "[model]\npath = \"{}\"\nthreads = 2\n\n[cache]\nkv_cache_mb = 64\n\n{zenoh}{extra}\n",
        model.display()
    )
}

/// The default model, SmolLM2-135M-Instruct (Q4_1).
pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for zenoh endpoints
/// of tests, so tests running side by side do not collide).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free loopback port")
        .port()
}

/// The Python of the interop tests' venv: `$EMBODY_TEST_PYTHON`, else
/// `~/.cache/embody/test-venv/bin/python` (made by scripts/test-venv.sh).
///
/// # Panics
/// If neither exists: these tests never skip silently.
pub fn test_python() -> PathBuf {
    let p = std::env::var_os("EMBODY_TEST_PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/embody/test-venv/bin/python"));
    assert!(
        p.exists(),
        "the interop tests' Python ({}) is missing: run scripts/test-venv.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Address families by the names systemd's `RestrictAddressFamilies=` uses.
pub fn address_family(name: &str) -> Option<i32> {
    Some(match name {
        "AF_UNIX" => libc::AF_UNIX,
        "AF_INET" => libc::AF_INET,
        "AF_INET6" => libc::AF_INET6,
        "AF_NETLINK" => libc::AF_NETLINK,
        "AF_PACKET" => libc::AF_PACKET,
        _ => return None,
    })
}

/// Confines the command to the given address families as systemd's
/// `RestrictAddressFamilies=` does: a seccomp filter, installed in the child
/// before it executes, fails `socket()` of any other family with
/// `EAFNOSUPPORT`.
pub fn restrict_address_families(cmd: &mut Command, families: &[i32]) {
    use std::os::unix::process::CommandExt;
    // BPF over struct seccomp_data { nr: i32, arch: u32, ip: u64, args: [u64; 6] }.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let n = u8::try_from(families.len()).expect("a few families");
    // 0: the call; 1: not socket() -> allow; 2: its family; 3..3+n: a listed
    // family -> allow; 3+n: refuse; 4+n: allow.
    let mut filter = vec![
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, 0, 2 + n, libc::SYS_socket as u32),
        op(LD_W_ABS, 0, 0, 16),
    ];
    for (i, &f) in (0u8..).zip(families) {
        filter.push(op(JEQ_K, n - i, 0, f as u32));
    }
    filter.push(op(RET_K, 0, 0, ERRNO | libc::EAFNOSUPPORT as u32));
    filter.push(op(RET_K, 0, 0, ALLOW));
    // SAFETY: between fork and exec the closure only makes two prctl calls
    // on memory it owns; the program outlives them.
    unsafe {
        cmd.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A vision-language fixture of `tests/fixtures/hf/` (written by
/// `scripts/gen-vision-fixtures.py`): the folder, the prompt and images
/// transformers answered, and its greedy tokens.
pub struct VisionFixture {
    /// The model folder.
    pub dir: PathBuf,
    /// The user message's text.
    pub prompt: String,
    /// The images' bytes, in the prompt's order.
    pub images: Vec<Vec<u8>>,
    /// Transformers' greedy tokens after the prompt.
    pub generated: Vec<u32>,
}

/// Reads the vision fixture `name` (`qwen2vl`, `qwen25vl`).
///
/// # Panics
/// If the fixture's files are missing or malformed.
pub fn vision_fixture(name: &str) -> VisionFixture {
    let dir = repo_root().join("tests/fixtures/hf").join(name);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected_prompt.json")).unwrap()).unwrap();
    let images = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| std::fs::read(dir.join(n.as_str().unwrap())).unwrap())
        .collect();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let generated = st
        .tensor("generated")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    VisionFixture {
        prompt: meta["prompt"].as_str().unwrap().to_string(),
        dir,
        images,
        generated,
    }
}

/// POSTs a JSON `body` to `path` on the HTTP API at `addr` (`host:port`) with
/// `Connection: close`, and returns the raw response (status line, headers,
/// body) as far as it came.
pub fn http_post(addr: &str, path: &str, body: &str) -> String {
    http_request(addr, "POST", path, body)
}

/// Sends `method` to `path` on the HTTP API at `addr` (`host:port`) with a
/// JSON `body` (may be empty) and `Connection: close`, and returns the raw
/// response as far as it came.
pub fn http_request(addr: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to the HTTP API");
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("sending the request");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

/// A zenoh session for a test: `mode` ("peer" or "client"), listening on
/// `listen` and connecting to `connect` (ports on 127.0.0.1), no scouting.
pub async fn zenoh_session(
    mode: &str,
    listen: Option<u16>,
    connect: Option<u16>,
) -> zenoh::Session {
    let endpoints = |p: Option<u16>| match p {
        Some(p) => format!("[\"tcp/127.0.0.1:{p}\"]"),
        None => "[]".into(),
    };
    let mut c = zenoh::Config::default();
    for (k, v) in [
        ("mode", format!("\"{mode}\"")),
        ("listen/endpoints", endpoints(listen)),
        ("connect/endpoints", endpoints(connect)),
        ("scouting/multicast/enabled", "false".to_string()),
    ] {
        c.insert_json5(k, &v).expect("a valid zenoh setting");
    }
    zenoh::open(c)
        .await
        .expect("the test's zenoh session opens")
}
