//! Tiny random-weight Qwen2-VL and Qwen2.5-VL folders (`tests/fixtures/hf/`,
//! written by `scripts/gen-vision-fixtures.py` with transformers) reproduce
//! transformers: the image processor's pixel values from the PNG files, the
//! vision encoder's rows, the multimodal RoPE position ids, the logits over a
//! prompt holding the images, and greedy generation after it.
//!
//! Tolerances are in units of the reference's standard deviation, as in
//! `hf_fixtures.rs`: the encoder runs its products on rounded activations
//! where the weights are BF16 (Qwen2.5-VL), and the decoder keeps its cache
//! in f16.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::backend::Backend;
use embody_engine::hf::HfFolder;
use embody_engine::kv_cache::{BlockTable, KvCache};
use embody_engine::models::{load_hf, EmbedRows, LoadOptions, Logits, Model, Positions, SeqBatch};
use embody_engine::speculate::Lookup;
use embody_engine::vision::prompt::{expand, positions, ImagePlace};
use embody_engine::vision::{Family, VisionEncoder};
use safetensors::SafeTensors;

const FAMILIES: [(&str, Family); 2] =
    [("qwen2vl", Family::Qwen2Vl), ("qwen25vl", Family::Qwen25Vl)];

/// Largest error of the encoder's rows and of the logits, per family, in
/// units of the reference's deviation.
fn tolerance(name: &str) -> (f32, f32) {
    match name {
        "qwen2vl" => (2e-5, 2e-3),
        "qwen25vl" => (2e-5, 3e-2),
        other => panic!("no tolerance for {other}"),
    }
}

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(name)
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load(name: &str) -> Self {
        Self {
            bytes: std::fs::read(dir(name).join("expected.safetensors")).unwrap(),
        }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn has(&self, k: &str) -> bool {
        self.st().tensor(k).is_ok()
    }

    fn ints(&self, k: &str) -> Vec<i64> {
        let st = self.st();
        let t = st.tensor(k).unwrap();
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn floats(&self, k: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(k).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn std_dev(v: &[f32]) -> f32 {
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn backend() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(2))
}

fn images(name: &str) -> Vec<Vec<u8>> {
    (0..)
        .map(|k| dir(name).join(format!("image{k}.png")))
        .take_while(|p| p.exists())
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// The folder's vision encoder on the CPU backend.
fn encoder(name: &str, family: Family) -> VisionEncoder {
    let folder = HfFolder::open(&dir(name)).unwrap();
    VisionEncoder::load_hf(&folder, family, backend()).unwrap()
}

#[test]
fn pixel_values_match_transformers_image_processor() {
    for (name, family) in FAMILIES {
        let enc = encoder(name, family);
        let e = Expected::load(name);
        for (k, bytes) in images(name).iter().enumerate() {
            let px = enc.processor().process(bytes).unwrap();
            let grid: Vec<i64> = px.grid.iter().map(|&g| g as i64).collect();
            assert_eq!(
                grid,
                e.ints(&format!("img{k}_grid")),
                "{name} image {k} grid"
            );
            let want = e.floats(&format!("img{k}_pixels"));
            let d = max_abs_diff(&px.patches, &want);
            // Same pixels after Pillow's resize; the normalisation's last bit.
            assert!(d <= 1e-6, "{name} image {k}: pixel values differ by {d}");
        }
    }
}

/// Every fixture's encoder on `backend` reproduces transformers' rows.
fn check_encoder_rows(backend: Arc<dyn Backend>, label: &str) {
    for (name, family) in FAMILIES {
        let folder = HfFolder::open(&dir(name)).unwrap();
        let enc = VisionEncoder::load_hf(&folder, family, backend.clone()).unwrap();
        let e = Expected::load(name);
        for (k, bytes) in images(name).iter().enumerate() {
            let px = enc.processor().process(bytes).unwrap();
            let rows = enc.encode(&px).unwrap();
            let want = e.floats(&format!("img{k}_embeds"));
            let err = max_abs_diff(&rows, &want) / std_dev(&want);
            println!("{name} image {k} ({label}): encoder error {err:.2e} of the rows' deviation");
            assert!(
                err <= tolerance(name).0,
                "{name} image {k} ({label}): encoder error {err}"
            );
        }
    }
}

#[test]
fn encoder_rows_match_transformers() {
    check_encoder_rows(backend(), "cpu");
}

/// A prompt with its images laid in.
struct PromptInputs {
    tokens: Vec<u32>,
    ids: Vec<[u32; 3]>,
    next: u32,
    images: Vec<(ImagePlace, Vec<f32>)>,
}

/// The prompt with every image: our expansion and positions must equal the
/// recorded ones; returns the rows for each image and their places.
fn prompt_inputs(name: &str, family: Family, e: &Expected) -> PromptInputs {
    let enc = encoder(name, family);
    let m = enc.processor().merge;
    let mut rows = Vec::new();
    let mut grids = Vec::new();
    for bytes in images(name) {
        let px = enc.processor().process(&bytes).unwrap();
        grids.push([px.grid[0], px.grid[1] / m, px.grid[2] / m]);
        rows.push(enc.encode(&px).unwrap());
    }
    let want: Vec<u32> = e.ints("prompt_tokens").iter().map(|&t| t as u32).collect();
    // Collapse the recorded expansion back to one placeholder per image.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(name).join("config.json")).unwrap()).unwrap();
    let pad = config["image_token_id"].as_u64().unwrap() as u32;
    let mut collapsed = want.clone();
    collapsed.dedup_by(|a, b| *a == pad && *b == pad);
    let (tokens, places) = expand(&collapsed, pad, &grids).unwrap();
    assert_eq!(tokens, want, "{name}: expanded prompt");
    let (ids, next) = positions(tokens.len(), &places);
    let p = e.ints("prompt_positions");
    let l = tokens.len();
    for (i, id) in ids.iter().enumerate() {
        let rec = [p[i] as u32, p[l + i] as u32, p[2 * l + i] as u32];
        assert_eq!(*id, rec, "{name}: position ids of row {i}");
    }
    PromptInputs {
        tokens,
        ids,
        next,
        images: places.into_iter().zip(rows).collect(),
    }
}

fn load_model(name: &str) -> Box<dyn Model> {
    let folder = HfFolder::open(&dir(name)).unwrap();
    let opts = LoadOptions {
        max_batch_tokens: 128,
        block_size: 4,
        ..Default::default()
    };
    load_hf(&folder, backend(), opts).unwrap()
}

#[test]
fn prompt_logits_and_greedy_tokens_match_transformers() {
    for (name, family) in FAMILIES {
        let e = Expected::load(name);
        let PromptInputs {
            tokens,
            ids,
            mut next,
            images,
        } = prompt_inputs(name, family, &e);
        let mut m = load_model(name);
        let v = m.info().vocab_size;
        let mut kv = KvCache::new(m.info().kv, 64);
        let mut table = BlockTable::new();
        table.reserve(&mut kv, tokens.len() + 16).unwrap();
        let embeds: Vec<EmbedRows<'_>> = images
            .iter()
            .map(|(p, rows)| EmbedRows { at: p.start, rows })
            .collect();
        let mut logits = vec![0.0; tokens.len() * v];
        let b = [SeqBatch {
            embeds: &embeds,
            positions: Positions::MRope(&ids),
            ..SeqBatch::text(&tokens, 0, &table, Logits::All)
        }];
        m.forward(&b, &mut kv, &mut logits).unwrap();
        let want = e.floats("prompt_logits");
        let err = max_abs_diff(&logits, &want) / std_dev(&want);
        println!("{name}: prompt logits error {err:.2e} of their deviation");
        assert!(err <= tolerance(name).1, "{name}: logits error {err}");

        // Greedy decoding, each new token one past the last position id.
        assert!(e.has("generated"));
        let generated: Vec<u32> = e.ints("generated").iter().map(|&t| t as u32).collect();
        let argmax = |row: &[f32]| {
            row.iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
                .0 as u32
        };
        let mut last = argmax(&logits[(tokens.len() - 1) * v..]);
        let mut ours = vec![last];
        let mut row = vec![0.0; v];
        for pos in tokens.len()..tokens.len() + generated.len() - 1 {
            let id = [[next; 3]];
            next += 1;
            let b = [SeqBatch {
                positions: Positions::MRope(&id),
                ..SeqBatch::text(std::slice::from_ref(&last), pos, &table, Logits::Last)
            }];
            m.forward(&b, &mut kv, &mut row).unwrap();
            last = argmax(&row);
            ours.push(last);
        }
        assert_eq!(ours, generated, "{name}: greedy tokens");
        table.release(&mut kv);
    }
}

/// The scheduler runs the same prompt in chunks smaller than an image, the
/// images' rows cut across forwards, twice at once (the second from the
/// prefix cache, keyed by the images' hashes), and generates transformers'
/// greedy tokens each time.
#[test]
fn the_scheduler_feeds_images_across_chunks_and_reuses_their_prefix() {
    use embody_engine::prefix_cache::{ImageSpan, SharedPrefixCache};
    use embody_engine::sampling::SamplingParams;
    use embody_engine::scheduler::{Scheduler, SchedulerConfig, SeqEvent, SeqRequest};
    use embody_engine::tokenizer::Tokenizer;
    use std::sync::Mutex;

    for (name, family) in FAMILIES {
        let e = Expected::load(name);
        let p = prompt_inputs(name, family, &e);
        let folder = HfFolder::open(&dir(name)).unwrap();
        let opts = LoadOptions {
            // Smaller than either image: rows are cut across forwards.
            max_batch_tokens: 5,
            block_size: 4,
            ..Default::default()
        };
        let model = load_hf(&folder, backend(), opts).unwrap();
        let tok = Arc::new(Tokenizer::from_hf_dir(&dir(name)).unwrap());
        let cfg = SchedulerConfig {
            kv_blocks: 256,
            max_running: 2,
            max_queued: 4,
            lookup: Lookup::OFF,
        };
        let cache = SharedPrefixCache::new(4, true);
        let mut s = Scheduler::new(model, tok, cfg)
            .unwrap()
            .with_prefix_cache(cache.clone());
        let generated: Vec<u32> = e.ints("generated").iter().map(|&t| t as u32).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        for id in 0..2u64 {
            let req = SeqRequest {
                id,
                prompt: p.tokens.clone(),
                sampling: SamplingParams::greedy(),
                max_tokens: generated.len(),
                stop: vec![],
                priority: 0,
                images: p
                    .images
                    .iter()
                    .enumerate()
                    .map(|(k, (place, _))| ImageSpan {
                        start: place.start,
                        len: place.len(),
                        hash: 1000 + k as u64,
                    })
                    .collect(),
                image_rows: p.images.iter().map(|(_, r)| Arc::from(&r[..])).collect(),
                positions: p.ids.clone(),
                next_position: p.next,
                constraint: None,
                logprobs: None,
            };
            let log = log.clone();
            s.submit(
                req,
                Box::new(move |ev| {
                    if let SeqEvent::Delta { token_ids, .. } = ev {
                        log.lock().unwrap().push((id, token_ids));
                    }
                    true
                }),
            )
            .unwrap();
            // The first runs its prompt alone, so the second finds it indexed.
            while id == 0 && s.stats().running + s.stats().queued > 0 && s.stats().steps < 30 {
                s.step().unwrap();
            }
        }
        while s.has_work() {
            s.step().unwrap();
        }
        for id in 0..2u64 {
            let ours: Vec<u32> = log
                .lock()
                .unwrap()
                .iter()
                .filter(|(i, _)| *i == id)
                .flat_map(|(_, t)| t.clone())
                .collect();
            assert_eq!(ours, generated, "{name}: request {id}'s greedy tokens");
        }
        let hits = cache.stats().hit_tokens;
        assert!(
            hits as usize >= p.tokens.len() / 2,
            "{name}: the second request reused {hits} of {} prompt positions",
            p.tokens.len()
        );
    }
}

/// llama.cpp's mmproj conversion of the Qwen2.5-VL folder (its Conv3d split
/// into two Conv2d kernels, Q/K/V split, window pattern as `n_wa_pattern`)
/// loads into the same encoder and gives transformers' rows.
#[test]
fn the_mmproj_conversion_encodes_as_the_folder_does() {
    let name = "qwen25vl";
    let g = embody_engine::gguf::Gguf::open(&dir(name).join("converted-mmproj.gguf")).unwrap();
    let enc = VisionEncoder::load_gguf(&g, backend()).unwrap();
    assert_eq!(enc.spec().full_blocks, [1]);
    let e = Expected::load(name);
    for (k, bytes) in images(name).iter().enumerate() {
        let px = enc.processor().process(bytes).unwrap();
        let want_px = e.floats(&format!("img{k}_pixels"));
        assert!(max_abs_diff(&px.patches, &want_px) <= 1e-6);
        let rows = enc.encode(&px).unwrap();
        let want = e.floats(&format!("img{k}_embeds"));
        let err = max_abs_diff(&rows, &want) / std_dev(&want);
        println!("{name} image {k} through the mmproj: encoder error {err:.2e}");
        // F32 weights here: the folder's BF16 products round activations to
        // BF16, these do not, and come as close as the F32 Qwen2-VL does.
        assert!(err <= 2e-5, "{name} image {k}: encoder error {err}");
    }
}

/// The vision encoders on the Vulkan backend (window attention, 2D rotary
/// embeddings, LayerNorm and RMSNorm blocks, the patch merger) within the
/// CPU's bounds of transformers' rows.
#[cfg(feature = "vulkan")]
#[test]
fn encoder_rows_match_transformers_on_vulkan() {
    use embody_engine::backend::vulkan::VulkanBackend;
    let gpu = VulkanBackend::new(None).expect("a Vulkan device");
    check_encoder_rows(Arc::new(gpu), "vulkan");
}
