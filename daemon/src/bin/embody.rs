//! `embody`: the command-line tool. Generates text from a model (a GGUF file or
//! a Hugging Face folder), measures perplexity, and inspects GGUF files.
//! Generated text goes to stdout and nothing else does; progress and errors go
//! to stderr.
//!
//! `chat`, `status` and `flush-cache` talk to a running embodyd through its socket.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use embody_engine::backend::{self, BackendKind};
use embody_engine::chat_template::{ChatMessage, ChatTemplate};
use embody_engine::gguf::Gguf;
use embody_engine::models::{self, LoadOptions, Model, ModelFiles};
use embody_engine::perplexity::perplexity;
use embody_engine::sampling::SamplingParams;
use embody_engine::scheduler::{Scheduler, SchedulerConfig, SeqEvent, SeqRequest, MAX_DRAFT};
use embody_engine::speculate::Lookup;
use embody_engine::tokenizer::Tokenizer;
use embody_engine::vision::prompt::{lay_out, Laid};

#[path = "../cli/daemon_cmds.rs"]
mod daemon_cmds;

#[derive(Parser)]
#[command(name = "embody", version, about = "embodyd's command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A GGUF model file, or a Hugging Face model folder (config.json,
    /// tokenizer.json, *.safetensors).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Compute threads (0: one per core).
    #[arg(long, short = 't', default_value_t = 0)]
    threads: usize,
    /// Backend: cpu, reference (the scalar oracle: slow), cuda or vulkan.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// The GPU of a GPU backend: its index or part of its name (default:
    /// the first GPU).
    #[arg(long)]
    device: Option<String>,
    /// llama.cpp's vision projector GGUF (`mmproj`) for a GGUF
    /// vision-language model (a Hugging Face folder carries its own).
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// Quantize a Hugging Face folder's float weight matrices as they load
    /// (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    #[arg(long)]
    quantize: Option<String>,
    /// How the KV cache stores keys and values: f16, q8_0 (half the memory)
    /// or q4_0 (a quarter, less exact).
    #[arg(long, default_value = "f16")]
    kv_cache_type: embody_engine::kv_cache::KvType,
}

#[derive(Subcommand)]
enum Command {
    /// Send a message to a running embodyd and stream its answer to stdout.
    Chat(daemon_cmds::ChatArgs),
    /// Show a running embodyd's status; exits 0 only when it is ready.
    Status(daemon_cmds::StatusArgs),
    /// Drop a running embodyd's cached prompt prefixes (their KV memory is freed).
    FlushCache(daemon_cmds::FlushArgs),
    /// Load a model into a running embodyd, or replace the one served under its name.
    Load(daemon_cmds::LoadArgs),
    /// Unload a model from a running embodyd once its requests have finished.
    Unload(daemon_cmds::UnloadArgs),
    /// Generate text from a prompt, streaming only the generated text to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt (raw text, or the user message with --chat).
        #[arg(long, short = 'p')]
        prompt: String,
        /// Format the prompt with the model's chat template (or, for a model
        /// without one, the architecture's standard template).
        #[arg(long)]
        chat: bool,
        /// A Jinja chat template file to use with --chat instead of the model's.
        #[arg(long)]
        chat_template: Option<PathBuf>,
        /// System message for --chat.
        #[arg(long)]
        system: Option<String>,
        /// Most tokens to generate.
        #[arg(long, short = 'n', default_value_t = 256)]
        max_tokens: usize,
        /// Sampling temperature (0: greedy) [default: 0.8, or a folder's
        /// generation_config.json].
        #[arg(long)]
        temperature: Option<f32>,
        /// Keep the K most likely tokens (0: off) [default: 40, or a folder's
        /// generation_config.json].
        #[arg(long)]
        top_k: Option<u32>,
        /// Nucleus sampling threshold (1: off) [default: 0.95, or a folder's
        /// generation_config.json].
        #[arg(long)]
        top_p: Option<f32>,
        /// Drop tokens below this fraction of the top probability (0: off)
        /// [default: 0.05, or a folder's generation_config.json].
        #[arg(long)]
        min_p: Option<f32>,
        /// Penalty for recently seen tokens (1: off) [default: 1, or a folder's
        /// generation_config.json].
        #[arg(long)]
        repeat_penalty: Option<f32>,
        /// Random seed, for reproducible sampling.
        #[arg(long)]
        seed: Option<u64>,
        /// A string that ends generation (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Context length to serve (0: the model's, capped at 4096).
        #[arg(long, default_value_t = 0)]
        ctx: usize,
        /// An image file to look at (repeatable; PNG or JPEG), for
        /// vision-language models: placed before the prompt's text.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// Speculative decoding by prompt lookup: most tokens drafted per
        /// step from earlier text (0: off, at most 32). The output does not
        /// change.
        #[arg(long, default_value_t = 8)]
        draft_tokens: usize,
    },
    /// Perplexity of a text file, by llama.cpp's method (second half of each chunk).
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        /// The text file.
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Tokens per chunk.
        #[arg(long, short = 'c', default_value_t = 512)]
        ctx: usize,
        /// Score at most this many chunks (0: all).
        #[arg(long, default_value_t = 0)]
        chunks: usize,
    },
    /// Measure prefill and decode speed the way llama-bench does.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt tokens prefilled in one pass.
        #[arg(long, short = 'p', default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens generated one at a time.
        #[arg(long, short = 'n', default_value_t = 128)]
        gen_tokens: usize,
        /// Repetitions; the median is reported.
        #[arg(long, short = 'r', default_value_t = 3)]
        reps: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List a GGUF file's metadata and tensors, or a Hugging Face folder's
    /// configuration, weight files and tensors.
    Inspect {
        /// The GGUF file or model folder.
        file: PathBuf,
    },
    /// Requantize a GGUF file's weights, typed per tensor as llama-quantize
    /// types them (llama.cpp loads the result).
    Quantize {
        /// The GGUF file to read (F32, F16, BF16 or any quantized type).
        #[arg(long, short = 'm')]
        model: PathBuf,
        /// Q8_0, Q4_0, Q4_K (= Q4_K_M), Q4_K_S, Q5_K (= Q5_K_M), Q5_K_S or Q6_K.
        #[arg(long = "type", short = 't')]
        ty: String,
        /// The GGUF file to write.
        #[arg(long, short = 'o')]
        out: PathBuf,
    },
    /// Print the token ids of a text, one line, comma-separated.
    Tokenize {
        /// A GGUF model file or a Hugging Face model folder.
        #[arg(long, short = 'm')]
        model: PathBuf,
        /// The text.
        #[arg(long, short = 'p')]
        prompt: String,
        /// Do not add BOS/EOS.
        #[arg(long)]
        no_special: bool,
    },
}

fn main() -> ExitCode {
    // A reader that goes away (`embody inspect M | head`) ends us quietly, as
    // it ends other command-line tools, instead of a panic on the next write.
    // SAFETY: restoring the default disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Loaded {
    files: ModelFiles,
    backend: Arc<dyn backend::Backend>,
    threads: usize,
    tokenizer: Tokenizer,
    model: Box<dyn Model>,
}

fn load(args: &ModelArgs, ctx: usize) -> Result<Loaded> {
    let kind: BackendKind = args.backend.parse()?;
    // A GPU backend holds the weights itself: the file is only mapped.
    let files = if kind.on_device() {
        ModelFiles::open_mapped(&args.model)?
    } else {
        ModelFiles::open(&args.model)?
    };
    let tokenizer = files.tokenizer()?;
    let backend: Arc<dyn backend::Backend> =
        backend::create(kind, args.threads, args.device.as_deref())?.into();
    let quantize = match args.quantize.as_deref() {
        None | Some("") => None,
        Some(q) => Some(
            embody_engine::quant::GgmlType::weight_type(q).ok_or_else(|| {
                anyhow::anyhow!(
                    "--quantize {q:?}: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k or q6_k"
                )
            })?,
        ),
    };
    let opts = LoadOptions {
        context_length: serving_ctx(&files, ctx)?,
        quantize,
        kv_type: args.kv_cache_type,
        ..LoadOptions::default()
    };
    let threads = backend.threads();
    let model = files.load(backend.clone(), opts)?;
    Ok(Loaded {
        files,
        backend,
        threads,
        tokenizer,
        model,
    })
}

/// The context asked for, or the model's trained context capped so the CLI
/// does not reserve KV for 128k positions.
fn serving_ctx(files: &ModelFiles, asked: usize) -> Result<usize> {
    if asked > 0 {
        return Ok(asked);
    }
    let trained = match files {
        ModelFiles::Gguf(g) => {
            let arch = g.get_str("general.architecture")?.to_string();
            g.get_u32(&format!("{arch}.context_length")).unwrap_or(4096) as usize
        }
        ModelFiles::Hf(f) => {
            let c = f.config_json();
            let text = c.get("text_config").unwrap_or(c);
            text["max_position_embeddings"].as_u64().unwrap_or(4096) as usize
        }
    };
    Ok(trained.min(4096))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Chat(a) => daemon_cmds::chat(a),
        Command::Status(a) => daemon_cmds::status(a),
        Command::FlushCache(a) => daemon_cmds::flush_cache(a),
        Command::Load(a) => daemon_cmds::load(a),
        Command::Unload(a) => daemon_cmds::unload(a),
        Command::Inspect { file } => inspect(&file),
        Command::Quantize { model, ty, out } => quantize(&model, &ty, &out),
        Command::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            reps,
            json,
        } => {
            let ctx = (prompt_tokens + gen_tokens).next_multiple_of(256);
            let mut m = load(&model, ctx)?;
            let r = embody_engine::bench::run(
                m.model.as_mut(),
                m.backend.as_ref(),
                prompt_tokens,
                gen_tokens,
                reps,
            )?;
            // The wall decode runs against: the machine's read bandwidth on
            // as many threads (host backends; a GPU's is its own).
            let wall = (m.backend.bytes_read() > 0)
                .then(|| embody_engine::bench::read_bandwidth(m.threads, 1 << 30, 5));
            let reached = r.decode_bytes_per_token * r.decode_tok_s;
            if json {
                let v = serde_json::json!({
                    "model": model.model.display().to_string(),
                    "backend": m.backend.describe(),
                    "threads": m.threads,
                    "prompt_tokens": prompt_tokens,
                    "gen_tokens": gen_tokens,
                    "prefill_tok_s": r.prefill_tok_s,
                    "decode_tok_s": r.decode_tok_s,
                    "ttft_ms": r.ttft_ms,
                    "peak_rss_mb": r.peak_rss_mb,
                    "decode_bytes_per_token": r.decode_bytes_per_token,
                    "decode_bytes_per_s": reached,
                    "read_bandwidth_bytes_per_s": wall,
                });
                println!("{v}");
            } else {
                println!("model          {}", model.model.display());
                println!("backend        {}", m.backend.describe());
                println!("threads        {}", m.threads);
                println!(
                    "prefill        {:.1} tok/s ({prompt_tokens} tokens)",
                    r.prefill_tok_s
                );
                println!(
                    "decode         {:.1} tok/s ({gen_tokens} tokens)",
                    r.decode_tok_s
                );
                println!("time to first  {:.1} ms", r.ttft_ms);
                println!("peak RSS       {:.1} MiB", r.peak_rss_mb);
                if let Some(wall) = wall {
                    println!(
                        "decode reads   {:.1} MB/token: {:.1} GB/s of the {:.1} GB/s the machine reads on {} threads ({:.0}%)",
                        r.decode_bytes_per_token / 1e6,
                        reached / 1e9,
                        wall / 1e9,
                        m.threads,
                        100.0 * reached / wall
                    );
                }
            }
            Ok(())
        }
        Command::Tokenize {
            model,
            prompt,
            no_special,
        } => {
            let tok = ModelFiles::open_mapped(&model)?.tokenizer()?;
            let ids = tok.encode(&prompt, !no_special, true)?;
            let s: Vec<String> = ids.iter().map(u32::to_string).collect();
            println!("{}", s.join(","));
            Ok(())
        }
        Command::Perplexity {
            model,
            file,
            ctx,
            chunks,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut m = load(&model, ctx)?;
            // As llama-perplexity: BOS when the vocabulary adds one, no special-token parsing.
            let tokens = m.tokenizer.encode(&text, true, false)?;
            let bos = if !tokens.is_empty() && tokens.first() == m.tokenizer.bos_id().as_ref() {
                m.tokenizer.bos_id()
            } else {
                None
            };
            eprintln!("perplexity: {} tokens, ctx {ctx}", tokens.len());
            let r = perplexity(m.model.as_mut(), &tokens, ctx, bos, chunks, |c, p| {
                eprint!("[{c}]{p:.4} ");
            })?;
            eprintln!();
            println!("PPL = {:.4} +/- {:.5}", r.ppl, r.stderr);
            Ok(())
        }
        Command::Generate {
            model,
            prompt,
            chat,
            chat_template,
            system,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
            ctx,
            draft_tokens,
            image,
        } => {
            if draft_tokens > MAX_DRAFT {
                bail!("--draft-tokens is at most {MAX_DRAFT}");
            }
            let m = load(&model, ctx)?;
            let vision = if image.is_empty() {
                None
            } else {
                let v = m
                    .files
                    .vision(&m.tokenizer, model.mmproj.as_deref(), m.backend.clone())?;
                let Some(v) = v else {
                    bail!(
                        "{} has no vision encoder: --image needs a vision-language model (a Qwen2-VL or Qwen2.5-VL folder)",
                        model.model.display()
                    );
                };
                let mut encoded = Vec::new();
                for p in &image {
                    let bytes =
                        std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                    let started = std::time::Instant::now();
                    let e = v.encode(&bytes).with_context(|| p.display().to_string())?;
                    eprintln!(
                        "[{}: {} image tokens, encoded in {} ms]",
                        p.display(),
                        e.grid.iter().product::<usize>(),
                        started.elapsed().as_millis()
                    );
                    encoded.push(e);
                }
                Some((v, encoded))
            };
            // Each image's slot goes before the prompt's text.
            let slots = match &vision {
                Some((v, encoded)) => v.slot.repeat(encoded.len()),
                None => String::new(),
            };
            let ids = if chat {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(ChatMessage::new("system", s));
                }
                messages.push(ChatMessage::new("user", prompt));
                let override_src = match &chat_template {
                    Some(p) => Some(
                        std::fs::read_to_string(p)
                            .with_context(|| format!("reading chat template {}", p.display()))?,
                    ),
                    None => None,
                };
                let arch = m.model.info().arch.clone();
                chat_prompt(
                    &m.tokenizer,
                    &messages,
                    &slots,
                    override_src.as_deref(),
                    &arch,
                )?
            } else {
                m.tokenizer
                    .encode(&format!("{slots}{prompt}"), true, true)?
            };
            // Defaults, then a folder's generation_config.json, then the flags.
            let mut sampling = SamplingParams::default();
            if let ModelFiles::Hf(f) = &m.files {
                sampling = f.generation_config().sampling(sampling);
            }
            sampling.temperature = temperature.unwrap_or(sampling.temperature);
            sampling.top_k = top_k.unwrap_or(sampling.top_k);
            sampling.top_p = top_p.unwrap_or(sampling.top_p);
            sampling.min_p = min_p.unwrap_or(sampling.min_p);
            sampling.repeat_penalty = repeat_penalty.unwrap_or(sampling.repeat_penalty);
            sampling.seed = seed;
            let info = m.model.info().clone();
            let cfg = SchedulerConfig {
                kv_blocks: info.kv.blocks_for_tokens(info.context_length),
                max_running: 1,
                max_queued: 1,
                lookup: Lookup::tokens(draft_tokens),
            };
            let laid = match &vision {
                Some((v, encoded)) => lay_out(&ids, v.image_token, encoded, info.mrope)?,
                None => Laid {
                    tokens: ids,
                    ..Laid::default()
                },
            };
            let mut sched = Scheduler::new(m.model, Arc::new(m.tokenizer), cfg)?;
            let req = SeqRequest {
                id: 0,
                prompt: laid.tokens,
                sampling,
                max_tokens,
                stop,
                priority: 0,
                images: laid.images,
                image_rows: laid.rows,
                positions: laid.positions,
                next_position: laid.next_position,
                constraint: None,
                logprobs: None,
            };
            let (tx, rx) = std::sync::mpsc::channel();
            // `Started` comes with the prompt's logits: the prefill's time.
            let started = std::time::Instant::now();
            let prefilled_in = Arc::new(std::sync::OnceLock::new());
            let prefill = prefilled_in.clone();
            sched.submit(
                req,
                Box::new(move |ev| {
                    let mut out = std::io::stdout().lock();
                    match ev {
                        SeqEvent::Started { .. } => {
                            prefilled_in.set(started.elapsed()).ok();
                            true
                        }
                        SeqEvent::Delta { text, .. } => out
                            .write_all(text.as_bytes())
                            .and_then(|_| out.flush())
                            .is_ok(),
                        other => tx.send(other).is_ok(),
                    }
                }),
            )?;
            while sched.has_work() {
                sched.step()?;
            }
            let total = started.elapsed();
            println!();
            let prefill_ms = prefill.get().map_or(0.0, |d| d.as_secs_f64() * 1e3);
            let decode_s = (total.as_secs_f64() - prefill_ms / 1e3).max(1e-9);
            let stats = sched.stats();
            for ev in rx.try_iter() {
                match ev {
                    SeqEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        // The first token comes with the prefill.
                        let rate = completion_tokens.saturating_sub(1) as f64 / decode_s;
                        let drafts = if draft_tokens > 0 {
                            format!(
                                ", {} of {} drafted tokens accepted",
                                stats.accepted, stats.drafted
                            )
                        } else {
                            String::new()
                        };
                        eprintln!(
                            "[{prompt_tokens} prompt tokens prefilled in {prefill_ms:.0} ms, {completion_tokens} generated at {rate:.1} tok/s{drafts}, finish: {reason:?}]"
                        )
                    }
                    SeqEvent::Error { message } => bail!(message),
                    _ => {}
                }
            }
            Ok(())
        }
    }
}

/// Renders messages through a chat template and tokenizes the result: the
/// `--chat-template` file, else the model's own, else the architecture's
/// standard one (Gemma 3 GGUF conversions often carry none). `slots` (the
/// image placeholders) go before the last message's text.
fn chat_prompt(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    slots: &str,
    override_src: Option<&str>,
    arch: &str,
) -> Result<Vec<u32>> {
    let src = match (override_src, tok.chat_template()) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => match models::default_chat_template(arch) {
            Some(s) => {
                eprintln!("note: the model has no chat template; using the standard {arch} template");
                s
            }
            None => bail!(
                "the model has no chat template (tokenizer.chat_template); pass --chat-template FILE or run without --chat"
            ),
        },
    };
    let template = ChatTemplate::new(src)?;
    let bos = tok.bos_id().and_then(|b| tok.token_text(b)).unwrap_or("");
    let eos = tok.eos_id().and_then(|e| tok.token_text(e)).unwrap_or("");
    // Control-token text typed into a message stays text, as in the daemon.
    let mut guard = embody_engine::message_text::MessageText::new(tok, &template);
    let mut messages = messages
        .iter()
        .map(|m| guard.message(m))
        .collect::<embody_engine::Result<Vec<_>>>()?;
    // The image slots are markup: placed after the guard, before the last
    // message's text.
    if let Some(last) = messages.last_mut() {
        last.content.insert_str(0, slots);
    }
    let text = template.render(&messages, true, bos, eos, None)?;
    Ok(guard.encode(&text)?)
}

fn inspect(path: &Path) -> Result<()> {
    if path.is_dir() {
        return inspect_folder(path);
    }
    let g = Gguf::open_mapped(path)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}: GGUF v{}", path.display(), g.version())?;
    writeln!(out, "metadata ({} keys):", g.metadata().len())?;
    for (k, v) in g.metadata() {
        writeln!(out, "  {k} = {}", v.summary())?;
    }
    writeln!(out, "tensors ({}):", g.tensors().len())?;
    let mut total = 0usize;
    for t in g.tensors() {
        total += t.size;
        writeln!(
            out,
            "  {:<40} {:<5} {:?} {} bytes",
            t.name,
            t.ty.name(),
            t.shape,
            t.size
        )?;
    }
    writeln!(out, "total tensor bytes: {total}")?;
    Ok(())
}

/// The configuration fields a reader of a model folder looks for first.
const CONFIG_SUMMARY: [&str; 10] = [
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "torch_dtype",
];

fn inspect_folder(dir: &Path) -> Result<()> {
    let f = embody_engine::hf::HfFolder::open_mapped(dir)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}: Hugging Face folder", dir.display())?;
    writeln!(out, "architecture: {}", f.architecture()?)?;
    let config = f.config_json();
    // Text settings may sit under `text_config` (vision-language models).
    let text = config.get("text_config").unwrap_or(config);
    writeln!(out, "config:")?;
    for key in CONFIG_SUMMARY {
        if let Some(v) = text.get(key).or_else(|| config.get(key)) {
            writeln!(out, "  {key} = {v}")?;
        }
    }
    if let Some(v) = config.get("vision_config") {
        let depth = v.get("depth").or_else(|| v.get("num_hidden_layers"));
        let width = v.get("embed_dim").or_else(|| v.get("hidden_size"));
        let show = |x: Option<&serde_json::Value>| x.map_or("?".to_string(), |v| v.to_string());
        writeln!(
            out,
            "  vision_config: {} layers, width {}",
            show(depth),
            show(width)
        )?;
    }
    writeln!(out, "weight files ({}):", f.files().len())?;
    for file in f.files() {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        writeln!(out, "  {name}")?;
    }
    let names = f.tensor_names();
    writeln!(out, "tensors ({}):", names.len())?;
    let mut total = 0usize;
    for name in names {
        let (dtype, shape, bytes) = f.tensor_info(name).context("a listed tensor")?;
        total += bytes;
        writeln!(out, "  {name:<40} {dtype:<5} {shape:?} {bytes} bytes")?;
    }
    writeln!(out, "total tensor bytes: {total}")?;
    Ok(())
}

/// `embody quantize`: writes the requantized file and says what it holds.
fn quantize(model: &Path, ty: &str, out: &Path) -> Result<()> {
    let recipe: embody_engine::quantize::Recipe = ty.parse()?;
    if model.is_dir() {
        bail!(
            "{} is a folder: quantize reads GGUF files (convert a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py first)",
            model.display()
        );
    }
    let start = std::time::Instant::now();
    let (bytes, report) = embody_engine::quantize::quantize_gguf(model, recipe)?;
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(t, n)| format!("{n} {}", t.name()))
        .collect();
    eprintln!(
        "wrote {} ({} MiB of tensors from {} MiB; {}) in {:.1} s",
        out.display(),
        report.bytes_out >> 20,
        report.bytes_in >> 20,
        types.join(", "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
