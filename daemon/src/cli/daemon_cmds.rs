//! `embody chat`, `embody status`, `embody load` and `embody unload`: the
//! CLI as a client of a running embodyd, through `embody-client`. They find
//! the socket the way the daemon
//! chose it ($RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR, /run/embodyd), unless
//! `--socket` or `$EMBODY_SOCKET` names it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use embody_client::blocking::Client;
use embody_client::{Event, Image, Message, ModelSpec, Request, SamplingParams, Status};

/// Where the daemon is.
#[derive(clap::Args)]
pub struct ConnArgs {
    /// The daemon's socket (default: found as the daemon chose it; $EMBODY_SOCKET overrides).
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl ConnArgs {
    fn connect(&self) -> Result<Client> {
        let path = match &self.socket {
            Some(p) => p.clone(),
            None => embody_client::find_socket()?,
        };
        Ok(Client::connect(path)?)
    }
}

/// `embody chat`
#[derive(clap::Args)]
pub struct ChatArgs {
    /// The message to send.
    prompt: String,
    /// A system message before it.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate (default: the daemon's).
    #[arg(long, short = 'n')]
    max_tokens: Option<u32>,
    /// Sampling temperature (0: greedy; default 0.8).
    #[arg(long)]
    temperature: Option<f32>,
    /// Random seed, for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// A string that ends generation (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// An image file to send with the message (repeatable; PNG, JPEG or WebP).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// The model to ask, by name (default: the daemon's first model).
    #[arg(long, short = 'm')]
    model: Option<String>,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `embody load`
#[derive(clap::Args)]
pub struct LoadArgs {
    /// The name requests will use; loading under a served model's name
    /// replaces it (its running requests finish on the old copy).
    name: String,
    /// A GGUF file, a Hugging Face folder or id (org/name[@revision][:QUANT]);
    /// none reloads the configured model of that name.
    path: Option<String>,
    /// llama.cpp's vision projector GGUF for a GGUF vision-language model.
    #[arg(long)]
    mmproj: Option<String>,
    /// The backend (cpu, vulkan, ...; default: the daemon's [model] backend).
    #[arg(long)]
    backend: Option<String>,
    /// The GPU of a GPU backend: an index or part of its name.
    #[arg(long)]
    device: Option<String>,
    /// Compute threads (0: one per core).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Longest context, in tokens (0: the model's own).
    #[arg(long)]
    context_length: Option<usize>,
    /// KV cache memory, in MiB.
    #[arg(long)]
    kv_cache_mb: Option<usize>,
    /// How the KV cache stores keys and values (f16, q8_0, q4_0).
    #[arg(long)]
    kv_cache_type: Option<String>,
    /// Unload after this many ms without requests (0: never).
    #[arg(long)]
    keep_alive_ms: Option<u64>,
    /// Quantize a Hugging Face folder's float weights as they load (q8_0, ...).
    #[arg(long)]
    quantize: Option<String>,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `embody unload`
#[derive(clap::Args)]
pub struct UnloadArgs {
    /// The model's name.
    name: String,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Loads (or replaces) a model in the running daemon.
pub fn load(a: LoadArgs) -> Result<()> {
    let spec = ModelSpec {
        name: a.name.clone(),
        path: a.path.unwrap_or_default(),
        mmproj: a.mmproj,
        backend: a.backend,
        device: a.device,
        threads: a.threads,
        context_length: a.context_length,
        kv_cache_mb: a.kv_cache_mb,
        kv_cache_type: a.kv_cache_type,
        keep_alive_ms: a.keep_alive_ms,
        quantize: a.quantize,
    };
    let client = a.conn.connect()?;
    client.load_model(spec)?;
    let st = client.status()?;
    match st.models.iter().find(|m| m.name == a.name) {
        Some(m) => println!(
            "{} {} ({}, {} context, {} MiB) {}",
            m.name,
            m.state.as_str(),
            m.arch,
            m.context_length,
            m.memory_bytes >> 20,
            m.path
        ),
        None => println!("{} loaded", a.name),
    }
    Ok(())
}

/// Unloads a model from the running daemon.
pub fn unload(a: UnloadArgs) -> Result<()> {
    a.conn.connect()?.unload_model(&a.name)?;
    println!("{} unloaded", a.name);
    Ok(())
}

/// `embody flush-cache`
#[derive(clap::Args)]
pub struct FlushArgs {
    #[command(flatten)]
    conn: ConnArgs,
}

/// Drops the daemon's unused cached prompt prefixes.
pub fn flush_cache(a: FlushArgs) -> Result<()> {
    let blocks = a.conn.connect()?.flush_cache()?;
    println!("flushed {blocks} cached KV blocks");
    Ok(())
}

/// `embody status`
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

fn media_type(p: &std::path::Path) -> &'static str {
    match p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

/// Streams the answer to stdout; a one-line summary goes to stderr.
pub fn chat(a: ChatArgs) -> Result<()> {
    let mut messages = Vec::new();
    if let Some(s) = a.system {
        messages.push(Message::system(s));
    }
    messages.push(Message::user(a.prompt));
    let mut req = Request::new(messages);
    req.model = a.model;
    req.max_tokens = a.max_tokens;
    req.stop = a.stop;
    req.sampling = SamplingParams {
        temperature: a
            .temperature
            .unwrap_or(SamplingParams::default().temperature),
        seed: a.seed,
        ..SamplingParams::default()
    };
    for p in &a.image {
        let data = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        req.images.push(Image {
            media_type: media_type(p).into(),
            data,
        });
    }
    let client = a.conn.connect()?;
    let mut out = std::io::stdout().lock();
    for ev in client.chat(req)? {
        match ev {
            Event::Delta { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Event::Finished { reason, usage } => {
                writeln!(out)?;
                eprintln!(
                    "[{} prompt tokens, {} generated, finish: {reason:?}]",
                    usage.prompt_tokens, usage.completion_tokens
                );
            }
            Event::Error { code, message } => bail!("{code}: {message}"),
            Event::Started { .. } | Event::ToolCall { .. } => {}
        }
    }
    Ok(())
}

/// Prints the status; fails (exit 1) unless the daemon is ready.
pub fn status(a: StatusArgs) -> Result<()> {
    let st = a.conn.connect()?.status()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_status(&st);
    }
    if !st.ready {
        bail!(
            "embodyd is not ready ({})",
            if st.draining {
                "shutting down"
            } else {
                "the decoder is restarting"
            }
        );
    }
    Ok(())
}

fn print_status(st: &Status) {
    let mib = |b: u64| b >> 20;
    println!(
        "embodyd {}: {}, {}",
        st.version,
        if st.ready { "ready" } else { "not ready" },
        if st.healthy {
            "healthy"
        } else {
            "NOT making progress"
        }
    );
    println!(
        "model     {} ({}, {} context, vocab {}) {}",
        st.model.name, st.model.arch, st.model.context_length, st.model.vocab_size, st.model.path
    );
    println!("backend   {}, {} threads", st.backend, st.threads);
    println!(
        "requests  {} running, {} queued (at most {})",
        st.running, st.queued, st.max_queued
    );
    println!(
        "kv cache  {}/{} blocks of {} tokens ({}), {} holding cached prefixes",
        st.kv_blocks_used,
        st.kv_blocks_total,
        st.kv_block_tokens,
        st.kv_cache_type,
        st.kv_blocks_cached
    );
    println!(
        "prefixes  {} of {} prompt tokens reused, {} blocks evicted",
        st.prefix_hit_tokens, st.prefix_lookup_tokens, st.prefix_evicted_blocks
    );
    println!(
        "decoder   {} steps, {} restarts, {} of {} drafted tokens accepted",
        st.steps, st.decoder_restarts, st.draft_accepted_tokens, st.draft_tokens
    );
    println!(
        "memory    {} MiB resident, {} MiB of weights",
        mib(st.rss_bytes),
        mib(st.model.weights_bytes)
    );
    println!("uptime    {:.1} s", st.uptime_ms as f64 / 1000.0);
    if st.models.len() > 1
        || st
            .models
            .iter()
            .any(|m| m.state != embody_client::ModelState::Ready)
    {
        println!("models");
        for m in &st.models {
            let mut caps = vec!["text"];
            if m.vision {
                caps.push("vision");
            }
            if m.tools {
                caps.push("tools");
            }
            println!(
                "  {:<20} {:<9} {:<12} {} context, {} running, {} queued, {} MiB  {}{}",
                m.name,
                m.state.as_str(),
                caps.join("+"),
                m.context_length,
                m.running,
                m.queued,
                mib(m.memory_bytes),
                m.path,
                m.error
                    .as_deref()
                    .map_or(String::new(), |e| format!("  ({e})"))
            );
        }
    }
}
