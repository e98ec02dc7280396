//! Tiny random-weight Hugging Face folders (`tests/fixtures/hf/`, written by
//! `scripts/gen-fixtures.py` with transformers) load and reproduce transformers'
//! float32 logits: prefill in chunks, decode through the paged cache, ragged
//! batches, and for Gemma 3 a sequence five times its sliding window, run with a
//! window pool that holds only the window. llama.cpp's GGUF conversions of the
//! Llama and Qwen3 folders must give the same logits.
//!
//! Tolerance: the largest absolute logit difference must stay below
//! `TOLERANCE * (standard deviation of the reference logits)`. The differences
//! come from the f16 KV cache (as llama.cpp keeps it) and, for BF16/F16 weights,
//! from rounding the activations to the weight type before each product (as
//! llama.cpp does); a wrong model is off by the size of the logits themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::backend::reference::ReferenceBackend;
use embody_engine::backend::Backend;
use embody_engine::gguf::Gguf;
use embody_engine::hf::HfFolder;
use embody_engine::kv_cache::{BlockTable, KvCache};
use embody_engine::models::{
    load_gguf, load_hf_dir, EmbedRows, LoadOptions, Logits, Model, Positions, SeqBatch,
};
use embody_engine::tokenizer::Tokenizer;
use safetensors::SafeTensors;

/// Largest logit error, in units of the reference logits' standard deviation,
/// per family: F32 weights (Llama, Gemma 3) see only the f16 cache; BF16 (Qwen2)
/// and F16 (Qwen3) weights multiply rounded activations.
fn tolerance(name: &str) -> f32 {
    match name {
        "llama" | "gemma3" => 2e-3,
        "qwen3" => 4e-3,
        "qwen2" => 2.5e-2,
        other => panic!("no tolerance for {other}"),
    }
}

const BLOCK: usize = 4;
const CHUNK: usize = 16;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(name)
}

struct Expected {
    a: Vec<u32>,
    a_logits: Vec<f32>,
    decode: Vec<u32>,
    decode_logits: Vec<f32>,
    b: Vec<u32>,
    b_logits: Vec<f32>,
    std: f32,
}

fn expected(name: &str) -> Expected {
    let bytes = std::fs::read(dir(name).join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        let t = st.tensor(k).unwrap();
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    };
    let floats = |k: &str| -> Vec<f32> {
        let t = st.tensor(k).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let a_logits = floats("a_logits");
    let mean = a_logits.iter().sum::<f32>() / a_logits.len() as f32;
    let var = a_logits
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum::<f32>()
        / a_logits.len() as f32;
    Expected {
        a: ids("a_tokens"),
        a_logits,
        decode: ids("a_decode_tokens"),
        decode_logits: floats("a_decode_logits"),
        b: ids("b_tokens"),
        b_logits: floats("b_logits"),
        std: var.sqrt(),
    }
}

const FAMILIES: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

fn load(name: &str) -> Box<dyn Model> {
    load_on(name, Arc::new(CpuBackend::new(2)))
}

fn load_on(name: &str, backend: Arc<dyn Backend>) -> Box<dyn Model> {
    let opts = LoadOptions {
        max_batch_tokens: 64,
        block_size: BLOCK,
        ..Default::default()
    };
    load_hf_dir(&dir(name), backend, opts).unwrap()
}

/// Every row's logits of one forward over `tokens` from position 0 in a
/// fresh cache, with the given rows and position ids.
fn run_once(
    m: &mut dyn Model,
    tokens: &[u32],
    embeds: &[EmbedRows<'_>],
    positions: Positions<'_>,
) -> embody_engine::Result<Vec<f32>> {
    let v = m.info().vocab_size;
    let mut kv = KvCache::new(m.info().kv, 64);
    let mut table = BlockTable::new();
    table.reserve(&mut kv, tokens.len()).unwrap();
    let mut logits = vec![0.0; tokens.len() * v];
    let b = [SeqBatch {
        embeds,
        positions,
        ..SeqBatch::text(tokens, 0, &table, Logits::All)
    }];
    let r = m.forward(&b, &mut kv, &mut logits);
    table.release(&mut kv);
    r.map(|()| logits)
}

/// Largest absolute difference, after checking the rows' top tokens agree.
fn max_diff(ours: &[f32], want: &[f32], vocab: usize, what: &str) -> f32 {
    assert_eq!(ours.len(), want.len(), "{what}: row count");
    for (r, (o, w)) in ours
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .enumerate()
    {
        let top = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
        };
        let (ot, wt) = (top(o), top(w));
        // A near-tie may flip; otherwise the top token must match.
        assert!(
            ot.0 == wt.0 || (w[wt.0] - w[ot.0]).abs() < 1e-3,
            "{what}: row {r} top token {} vs {}",
            ot.0,
            wt.0
        );
    }
    ours.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Prefills sequence a in chunks and decodes the recorded tokens one at a
/// time, sliding the window before every forward; returns the largest error
/// relative to the logits' spread.
fn prefill_and_decode(name: &str, m: &mut dyn Model, kv: &mut KvCache, e: &Expected) -> f32 {
    let v = m.info().vocab_size;
    let mut table = BlockTable::new();
    let mut logits = vec![0.0; CHUNK * v];
    let mut worst = 0f32;
    let mut start = 0;
    while start < e.a.len() {
        let end = (start + CHUNK).min(e.a.len());
        table.slide(kv, start);
        table.reserve(kv, end).unwrap();
        let b = [SeqBatch {
            tokens: &e.a[start..end],
            start_pos: start,
            embeds: &[],
            positions: Default::default(),
            table: &table,
            logits: Logits::All,
        }];
        m.forward(&b, kv, &mut logits).unwrap();
        let n = end - start;
        let d = max_diff(
            &logits[..n * v],
            &e.a_logits[start * v..end * v],
            v,
            &format!("{name} prefill {start}..{end}"),
        );
        worst = worst.max(d);
        start = end;
    }
    for (i, &t) in e.decode.iter().enumerate() {
        let pos = e.a.len() + i;
        table.slide(kv, pos);
        table.reserve(kv, pos + 1).unwrap();
        let b = [SeqBatch {
            tokens: std::slice::from_ref(&t),
            start_pos: pos,
            embeds: &[],
            positions: Default::default(),
            table: &table,
            logits: Logits::Last,
        }];
        m.forward(&b, kv, &mut logits).unwrap();
        let d = max_diff(
            &logits[..v],
            &e.decode_logits[i * v..(i + 1) * v],
            v,
            &format!("{name} decode {i}"),
        );
        worst = worst.max(d);
    }
    table.release(kv);
    worst / e.std
}

fn check_family(name: &str) {
    let e = expected(name);
    let mut m = load(name);
    let info = m.info().clone();
    let mut kv = KvCache::new(info.kv, 64);
    let rel = prefill_and_decode(name, m.as_mut(), &mut kv, &e);
    eprintln!(
        "{name}: prefill {} + decode {} tokens, max |logit error| = {rel:.2e} x std {:.2} (tolerance {:.1e})",
        e.a.len(),
        e.decode.len(),
        e.std,
        tolerance(name)
    );
    assert!(
        rel < tolerance(name),
        "{name}: logit error {rel:.2e} x std exceeds {:.1e}",
        tolerance(name)
    );
    assert_eq!(
        (kv.free_blocks(), kv.free_window_blocks()),
        (kv.n_blocks(), kv.n_window_blocks())
    );
}

#[test]
fn llama_matches_transformers() {
    check_family("llama");
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_family("qwen3");
}

#[test]
fn gemma3_matches_transformers() {
    check_family("gemma3");
}

/// llama.cpp's own conversions of the Llama and Qwen3 folders (converted.gguf:
/// permuted Llama Q/K rows, Llama 3 scaling as a rope_freqs tensor, GGUF names
/// and keys) give the same logits as the folders.
#[test]
fn gguf_conversions_match_transformers() {
    for name in ["llama", "qwen3"] {
        let e = expected(name);
        let g = Gguf::open(&dir(name).join("converted.gguf")).unwrap();
        let opts = LoadOptions {
            max_batch_tokens: 64,
            block_size: BLOCK,
            ..Default::default()
        };
        let mut m = load_gguf(&g, Arc::new(CpuBackend::new(2)), opts).unwrap();
        if name == "llama" {
            assert!(
                g.tensor_info("rope_freqs.weight").is_some(),
                "Llama 3 scaling as a tensor"
            );
        }
        let mut kv = KvCache::new(m.info().kv, 64);
        let rel = prefill_and_decode(name, m.as_mut(), &mut kv, &e);
        eprintln!("{name} (GGUF): max |logit error| = {rel:.2e} x std");
        assert!(
            rel < tolerance(name),
            "{name} GGUF: logit error {rel:.2e} x std"
        );
    }
}

/// Sequence a is 44 positions, over five times Gemma's window of 8; a window
/// pool of exactly what one sequence needs serves it, and the sliding layers
/// hold only their window at the end.
#[test]
fn gemma3_sliding_layers_keep_only_the_window() {
    let e = expected("gemma3");
    let mut m = load("gemma3");
    let info = m.info().clone();
    let w = info.kv.window.expect("Gemma 3 has sliding layers");
    assert_eq!((w.size, w.layers.len()), (8, 5));
    assert!(e.a.len() >= 5 * w.size);
    let per_seq = info.kv.window_blocks_per_sequence(CHUNK);
    let mut kv = KvCache::with_window_blocks(info.kv, 64, per_seq);
    let rel = prefill_and_decode("gemma3", m.as_mut(), &mut kv, &e);
    assert!(rel < tolerance("gemma3"), "{rel}");

    // Without sliding, the small window pool runs out: the window is what it holds.
    let mut table = BlockTable::new();
    let err = table.reserve(&mut kv, e.a.len()).unwrap_err();
    assert!(err.to_string().contains("KV cache full"), "{err}");

    // After the last decode step only the blocks of the last 8 positions remain.
    let v = info.vocab_size;
    let mut logits = vec![0.0; CHUNK * v];
    let mut start = 0;
    let all: Vec<u32> = e.a.iter().chain(&e.decode).copied().collect();
    while start < all.len() {
        let end = (start + CHUNK).min(all.len());
        table.slide(&mut kv, start);
        table.reserve(&mut kv, end).unwrap();
        let b = [SeqBatch {
            tokens: &all[start..end],
            start_pos: start,
            embeds: &[],
            positions: Default::default(),
            table: &table,
            logits: Logits::Last,
        }];
        m.forward(&b, &mut kv, &mut logits).unwrap();
        start = end;
    }
    table.slide(&mut kv, all.len());
    assert_eq!(
        table.window_blocks_held(),
        2,
        "the next query sees 37..=44: blocks of 36..44 stay"
    );
    assert_eq!(
        table.blocks.len(),
        all.len().div_ceil(BLOCK),
        "global layers keep everything"
    );
    let last = &e.decode_logits[(e.decode.len() - 1) * v..];
    assert!(max_diff(&logits[..v], last, v, "chunked to the end") / e.std < tolerance("gemma3"));

    // A forward that needs a released window block is refused, not miscomputed.
    let b = [SeqBatch {
        tokens: &all[..1],
        start_pos: 20,
        embeds: &[],
        positions: Default::default(),
        table: &table,
        logits: Logits::Last,
    }];
    let err = m.forward(&b, &mut kv, &mut logits).unwrap_err().to_string();
    assert!(err.contains("sliding-window blocks"), "{err}");
    table.release(&mut kv);
    assert_eq!(kv.free_window_blocks(), per_seq);
}

/// Sequence b in full and the decode steps of sequence a in one ragged batch
/// give each sequence's own logits.
#[test]
fn ragged_batches_match_for_every_family() {
    for name in ["llama", "qwen2", "qwen3", "gemma3"] {
        let e = expected(name);
        let mut m = load(name);
        let info = m.info().clone();
        let v = info.vocab_size;
        let mut kv = KvCache::new(info.kv, 64);
        let (mut ta, mut tb) = (BlockTable::new(), BlockTable::new());
        let mut logits = vec![0.0; 64 * v];
        // Prefill a alone, without logits.
        for start in (0..e.a.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(e.a.len());
            ta.slide(&mut kv, start);
            ta.reserve(&mut kv, end).unwrap();
            let b = [SeqBatch {
                tokens: &e.a[start..end],
                start_pos: start,
                embeds: &[],
                positions: Default::default(),
                table: &ta,
                logits: Logits::None,
            }];
            m.forward(&b, &mut kv, &mut logits).unwrap();
        }
        // Then a's first decode token together with all of b.
        let pos = e.a.len();
        ta.slide(&mut kv, pos);
        ta.reserve(&mut kv, pos + 1).unwrap();
        tb.reserve(&mut kv, e.b.len()).unwrap();
        let batch = [
            SeqBatch {
                tokens: &e.b,
                start_pos: 0,
                embeds: &[],
                positions: Default::default(),
                table: &tb,
                logits: Logits::All,
            },
            SeqBatch {
                tokens: &e.decode[..1],
                start_pos: pos,
                embeds: &[],
                positions: Default::default(),
                table: &ta,
                logits: Logits::Last,
            },
        ];
        m.forward(&batch, &mut kv, &mut logits).unwrap();
        let nb = e.b.len();
        let db = max_diff(
            &logits[..nb * v],
            &e.b_logits,
            v,
            &format!("{name} ragged b"),
        );
        let da = max_diff(
            &logits[nb * v..(nb + 1) * v],
            &e.decode_logits[..v],
            v,
            &format!("{name} ragged a"),
        );
        let rel = db.max(da) / e.std;
        assert!(
            rel < tolerance(name),
            "{name}: ragged batch error {rel:.2e} x std"
        );
        ta.release(&mut kv);
        tb.release(&mut kv);
    }
}

/// The scalar reference backend runs every family through the same trunk
/// within the same transformers bounds, and the CPU backend's logits stay
/// within those bounds of the reference's.
#[test]
fn reference_backend_matches_transformers_and_the_cpu() {
    for name in FAMILIES {
        let e = expected(name);
        let mut r = load_on(name, Arc::new(ReferenceBackend));
        let mut kv = KvCache::new(r.info().kv, 64);
        let rel = prefill_and_decode(name, r.as_mut(), &mut kv, &e);
        let v = r.info().vocab_size;
        let on_ref = run_once(r.as_mut(), &e.b, &[], Positions::Sequential).unwrap();
        let on_cpu = run_once(load(name).as_mut(), &e.b, &[], Positions::Sequential).unwrap();
        let cpu_vs_ref = max_diff(&on_cpu, &on_ref, v, &format!("{name} cpu vs reference")) / e.std;
        eprintln!(
            "{name} (reference): max |logit error| = {rel:.2e} x std; CPU vs reference {cpu_vs_ref:.2e} x std"
        );
        assert!(rel < tolerance(name), "{name} reference: {rel:.2e} x std");
        assert!(
            cpu_vs_ref < tolerance(name),
            "{name} cpu vs reference: {cpu_vs_ref:.2e} x std"
        );
    }
}

/// Rows given as embeddings enter the trunk exactly as token rows do: the
/// tokens' own embeddings give the token forward's logits bit for bit, and
/// another token's embedding at a position gives the logits of the sequence
/// with that token there. Position ids given as data equal `start + index`.
#[test]
fn embedding_rows_and_position_ids_equal_the_token_forward() {
    for name in FAMILIES {
        let e = expected(name);
        let mut m = load(name);
        let d = m.info().d_model;
        let toks = &e.b[..e.b.len().min(12)];
        let n = toks.len();
        let want = run_once(m.as_mut(), toks, &[], Positions::Sequential).unwrap();

        let mut own = vec![0.0; n * d];
        m.token_embeddings(toks, &mut own).unwrap();
        let whole = [EmbedRows { at: 0, rows: &own }];
        let got = run_once(m.as_mut(), toks, &whole, Positions::Sequential).unwrap();
        assert!(got == want, "{name}: all rows given");
        let part = [EmbedRows {
            at: 2,
            rows: &own[2 * d..7 * d],
        }];
        let got = run_once(m.as_mut(), toks, &part, Positions::Sequential).unwrap();
        assert!(got == want, "{name}: rows 2..7 given");

        // Other tokens' rows at 2..7 (an image span, say): the logits of the
        // sequence holding those tokens, and not the original's.
        let mut other: Vec<u32> = toks.to_vec();
        for t in &mut other[2..7] {
            *t = (*t + 7) % m.info().vocab_size as u32;
        }
        let mut rows = vec![0.0; 5 * d];
        m.token_embeddings(&other[2..7], &mut rows).unwrap();
        let span = [EmbedRows { at: 2, rows: &rows }];
        let got = run_once(m.as_mut(), toks, &span, Positions::Sequential).unwrap();
        let swapped = run_once(m.as_mut(), &other, &[], Positions::Sequential).unwrap();
        assert!(got == swapped, "{name}: given rows stand for their tokens");
        assert!(got != want, "{name}: given rows change the logits");

        let ids: Vec<u32> = (0..n as u32).collect();
        let got = run_once(m.as_mut(), toks, &[], Positions::Ids(&ids)).unwrap();
        assert!(got == want, "{name}: position ids as data");
        let streams: Vec<[u32; 3]> = ids.iter().map(|&i| [i; 3]).collect();
        let got = run_once(m.as_mut(), toks, &[], Positions::MRope(&streams)).unwrap();
        assert!(got == want, "{name}: three equal streams");
        let shifted: Vec<u32> = (5..5 + n as u32).collect();
        let got = run_once(m.as_mut(), toks, &[], Positions::Ids(&shifted)).unwrap();
        assert!(got != want, "{name}: the ids are what rotates");

        // Malformed inputs are refused before anything runs.
        let ragged = [EmbedRows {
            at: 0,
            rows: &own[..d + 1],
        }];
        let bad_rows = [EmbedRows {
            at: n - 1,
            rows: &own[..2 * d],
        }];
        let overlap = [
            EmbedRows {
                at: 2,
                rows: &own[..2 * d],
            },
            EmbedRows {
                at: 3,
                rows: &own[..d],
            },
        ];
        for (what, embeds, positions) in [
            ("a partial row", &ragged[..], Positions::Sequential),
            ("rows past the end", &bad_rows[..], Positions::Sequential),
            ("overlapping spans", &overlap[..], Positions::Sequential),
            ("too few ids", &[][..], Positions::Ids(&ids[1..])),
        ] {
            let err = run_once(m.as_mut(), toks, embeds, positions).unwrap_err();
            assert!(
                matches!(err, embody_engine::Error::InvalidRequest(_)),
                "{name}: {what}: {err}"
            );
        }
    }
}

#[test]
fn tokenizer_json_matches_transformers() {
    for name in ["llama", "gemma3"] {
        let d = dir(name);
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("expected_tokens.json")).unwrap())
                .unwrap();
        let tok = Tokenizer::from_hf_dir(&d).unwrap();
        let ids = tok
            .encode(want["text"].as_str().unwrap(), false, false)
            .unwrap();
        let want_ids: Vec<u32> = want["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want_ids);
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            want["text"].as_str().unwrap()
        );
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
        assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    }
}

#[test]
fn generation_config_defaults_are_read() {
    let f = HfFolder::open(&dir("qwen2")).unwrap();
    let g = f.generation_config();
    assert_eq!(
        (g.do_sample, g.temperature, g.top_k, g.top_p),
        (Some(true), Some(0.7), Some(20), Some(0.8))
    );
    let s = g.sampling(Default::default());
    assert_eq!((s.temperature, s.top_k, s.repeat_penalty), (0.7, 20, 1.05));
    assert_eq!(
        HfFolder::open(&dir("llama"))
            .unwrap()
            .generation_config()
            .temperature,
        None
    );
}

#[test]
fn tensors_read_the_same_copied_or_mapped() {
    for name in ["llama", "qwen2", "qwen3", "gemma3"] {
        let (copied, mapped) = (
            HfFolder::open(&dir(name)).unwrap(),
            HfFolder::open_mapped(&dir(name)).unwrap(),
        );
        let names = mapped.tensor_names();
        assert!(!names.is_empty() && names == copied.tensor_names());
        for t in names {
            let (a, b) = (copied.tensor(t).unwrap(), mapped.tensor(t).unwrap());
            assert_eq!((a.ty, &a.shape), (b.ty, &b.shape), "{name} {t}");
            assert_eq!(&a.data[..], &b.data[..], "{name} {t}");
        }
    }
}

/// A copy of a fixture folder to break.
fn scratch_copy(name: &str, tag: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!("embody-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(dir(name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
    to
}

fn load_err(d: &Path) -> String {
    let opts = LoadOptions::default();
    match load_hf_dir(d, Arc::new(CpuBackend::new(1)), opts) {
        Ok(_) => panic!("{} loaded", d.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(d: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn broken_folders_name_the_file_and_field() {
    // A missing shard: the index and the shard are named.
    let d = scratch_copy("qwen3", "shard");
    std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model-00002-of-00003.safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();

    // A config field of the wrong type.
    let d = scratch_copy("llama", "type");
    edit_config(&d, |v| v["hidden_size"] = "64".into());
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("'hidden_size'") && e.contains("string"),
        "{e}"
    );
    // Nested fields are named with their path.
    edit_config(&d, |v| {
        v["hidden_size"] = 64.into();
        v["rope_parameters"]["factor"] = "eight".into();
    });
    let e = load_err(&d);
    assert!(e.contains("'rope_parameters.factor'"), "{e}");
    // A missing field.
    edit_config(&d, |v| {
        v["rope_parameters"]["factor"] = 8.0.into();
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("'num_hidden_layers'"),
        "{e}"
    );

    // An unknown architecture.
    edit_config(&d, |v| {
        v["num_hidden_layers"] = 2.into();
        v["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    });
    let e = load_err(&d);
    assert!(
        e.contains("config.json")
            && e.contains("'architectures'")
            && e.contains("MambaForCausalLM"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();

    // A tensor of the wrong shape: the config says the MLP is wider than the weights.
    let d = scratch_copy("gemma3", "shape");
    edit_config(&d, |v| v["intermediate_size"] = 96.into());
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("'model.layers.0.mlp.gate_proj.weight'")
            && e.contains("shape"),
        "{e}"
    );
    // A missing tensor is named too.
    edit_config(&d, |v| {
        v["intermediate_size"] = 128.into();
        v["num_hidden_layers"] = 7.into();
        v["layer_types"]
            .as_array_mut()
            .unwrap()
            .push("sliding_attention".into());
    });
    let e = load_err(&d);
    assert!(
        e.contains("'model.layers.6.input_layernorm.weight'") && e.contains("missing"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();

    // A sliding window of no positions, and a weight file that is not safetensors.
    let d = scratch_copy("gemma3", "window");
    edit_config(&d, |v| v["sliding_window"] = 0.into());
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("'sliding_window'"),
        "{e}"
    );
    edit_config(&d, |v| v["sliding_window"] = 8.into());
    std::fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();

    // No weights at all.
    let d = scratch_copy("llama", "empty");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Runs a family's reference sequence through a model loaded from `d`.
fn check_folder(name: &str, d: &Path) -> f32 {
    let e = expected(name);
    let opts = LoadOptions {
        max_batch_tokens: 64,
        block_size: BLOCK,
        ..Default::default()
    };
    let mut m = load_hf_dir(d, Arc::new(CpuBackend::new(2)), opts).unwrap();
    let mut kv = KvCache::new(m.info().kv, 64);
    prefill_and_decode(name, m.as_mut(), &mut kv, &e)
}

/// Configs written by transformers 4 (most published folders) name RoPE and
/// Gemma's layer pattern differently from transformers 5: the same weights
/// described the older way give the same logits.
#[test]
fn transformers_4_configs_read_the_same() {
    let d = scratch_copy("gemma3", "v4-gemma");
    edit_config(&d, |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("layer_types");
        o.remove("_sliding_window_pattern");
        o.remove("rope_parameters");
        o.insert("sliding_window_pattern".into(), 6.into());
        o.insert("rope_theta".into(), 1_000_000.0.into());
        o.insert("rope_local_base_freq".into(), 10_000.0.into());
        o.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "linear", "factor": 2.0}),
        );
    });
    assert!(check_folder("gemma3", &d) < tolerance("gemma3"));
    std::fs::remove_dir_all(&d).unwrap();

    let d = scratch_copy("llama", "v4-llama");
    edit_config(&d, |v| {
        let mut rope = v["rope_parameters"].take();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), rope["rope_theta"].take());
        o.insert("rope_scaling".into(), rope);
    });
    assert!(check_folder("llama", &d) < tolerance("llama"));
    std::fs::remove_dir_all(&d).unwrap();
}

/// A Gemma 3 vision-language checkpoint keeps the language model's config under
/// `text_config` and its weights under `model.language_model.`: the language
/// model loads from it.
#[test]
fn gemma3_vision_language_checkpoint_loads_its_language_model() {
    let d = scratch_copy("gemma3", "gemma3-vl");
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"hidden_size": 32},
    });
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.replacen("model.", "model.language_model.", 1), t))
        .collect();
    safetensors::serialize_to_file(renamed, None, &d.join("model.safetensors")).unwrap();
    assert!(check_folder("gemma3", &d) < tolerance("gemma3"));
    std::fs::remove_dir_all(&d).unwrap();
}

/// The Vulkan backend runs every family within the same transformers
/// bounds, its KV cache in device memory.
#[cfg(feature = "vulkan")]
#[test]
fn vulkan_backend_matches_transformers() {
    use embody_engine::backend::vulkan::VulkanBackend;
    let gpu: Arc<dyn Backend> = Arc::new(VulkanBackend::new(None).expect("a Vulkan device"));
    for name in FAMILIES {
        let e = expected(name);
        let mut m = load_on(name, gpu.clone());
        let window = if m.info().kv.window.is_some() { 64 } else { 0 };
        let mut kv = m.kv_cache(64, window).unwrap();
        let rel = prefill_and_decode(name, m.as_mut(), &mut kv, &e);
        eprintln!("{name} (vulkan): max |logit error| = {rel:.2e} x std");
        assert!(rel < tolerance(name), "{name} vulkan: {rel:.2e} x std");
    }
}

/// `quantize = Q8_0` at load: each family's float weight matrices become
/// Q8_0 as they load, and the logits stay next to transformers' (the error
/// of 8-bit weights and activations, a small part of the logits' spread).
#[test]
fn weights_quantized_at_load_stay_next_to_transformers() {
    for name in FAMILIES {
        let e = expected(name);
        let opts = LoadOptions {
            max_batch_tokens: 64,
            block_size: BLOCK,
            quantize: Some(embody_engine::quant::GgmlType::Q8_0),
            ..Default::default()
        };
        let mut m = load_hf_dir(&dir(name), Arc::new(CpuBackend::new(2)), opts).unwrap();
        let ours = run_once(m.as_mut(), &e.b, &[], Positions::Sequential).unwrap();
        let exact = run_once(load(name).as_mut(), &e.b, &[], Positions::Sequential).unwrap();
        // Random weights leave near-ties that 8-bit weights may flip, so the
        // logits are compared value by value.
        let worst = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let err = worst(&ours, &e.b_logits) / e.std;
        let moved = worst(&ours, &exact) / e.std;
        eprintln!("{name}: Q8_0 at load, max |logit error| = {err:.2e} x std (moved {moved:.2e})");
        assert!(
            err < 0.15,
            "{name}: Q8_0 weights moved the logits {err:.2e} x std"
        );
        assert!(moved > 0.0, "{name}: the weights were not quantized");
    }
}
