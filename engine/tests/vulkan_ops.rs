//! Every operation of the Vulkan backend against the host: products and
//! embedding rows for every GGUF type against the dequantized weights in
//! f32, the element-wise steps and attention against the scalar reference
//! backend. Run on whatever Vulkan device is present (lavapipe in CI,
//! installed by scripts/test.sh).
//!
//! Bounds: products and attention differ from the host only in the order
//! of f32 sums (and the f16 cache, which both backends share), so the
//! largest difference must stay below 1e-4 of the largest value compared;
//! a wrong index or type is off by the values themselves.
#![cfg(feature = "vulkan")]

use std::ops::Range;

use embody_engine::backend::reference::ReferenceBackend;
use embody_engine::backend::vulkan::VulkanBackend;
use embody_engine::backend::{Activation, AttnParams, AttnSeq, Backend, HeadNorms, MatIn, MatOut};
use embody_engine::kv_cache::{BlockTable, KvLayout, LayerSet, SlidingWindow};
use embody_engine::ops::{RopeSpec, RopeStyle};
use embody_engine::quant::{dequantize_row, quantize_row, GgmlType};
use embody_engine::tensor::{Bytes, QTensor};

fn gpu() -> VulkanBackend {
    VulkanBackend::new(None).expect("a Vulkan device (scripts/test.sh installs lavapipe)")
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn host(be: &dyn Backend, b: &embody_engine::backend::Buf) -> Vec<f32> {
    let mut v = vec![0.0; b.len()];
    be.read(b, 0, &mut v);
    v
}

/// Asserts the largest difference is below `tol` of the largest |want|.
fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let (i, d) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold(
            (0, 0f32),
            |m, (i, d)| if d > m.1 || d.is_nan() { (i, d) } else { m },
        );
    assert!(
        d <= tol * scale,
        "{what}: |difference| {d:e} at {i} (got {}, want {}) exceeds {tol:e} x {scale}",
        got[i],
        want[i]
    );
}

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// A `rows x cols` weight of type `ty`, and its values dequantized.
fn tensor(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<f32>) {
    let v = values(rows * cols, seed);
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    let mut deq = vec![0.0; rows * cols];
    for r in 0..rows {
        quantize_row(
            ty,
            &v[r * cols..(r + 1) * cols],
            &mut data[r * rb..(r + 1) * rb],
        );
        dequantize_row(
            ty,
            &data[r * rb..(r + 1) * rb],
            &mut deq[r * cols..(r + 1) * cols],
        );
    }
    let t = QTensor {
        name: format!("w.{}", ty.name()),
        ty,
        shape: vec![cols, rows],
        data: Bytes::from_vec(data),
    };
    (t, deq)
}

fn products(w: &[f32], rows: usize, x: &[f32], n: usize) -> Vec<f32> {
    let k = x.len() / n;
    let mut y = vec![0.0; n * rows];
    for t in 0..n {
        for r in 0..rows {
            y[t * rows + r] = (0..k).map(|i| w[r * k + i] * x[t * k + i]).sum();
        }
    }
    y
}

#[test]
fn products_and_embedding_rows_for_every_type() {
    let be = gpu();
    let (rows, cols) = (67, 512);
    for (i, ty) in TYPES.into_iter().enumerate() {
        let (t, deq) = tensor(ty, rows, cols, i as u64);
        let w = be.weight(t).unwrap();
        let mut ws = be.workspace(8, cols, 64);
        for n in [1, 7] {
            let xs = values(n * cols, 100 + n as u64);
            let x = be.upload(xs.clone()).unwrap();
            let mut y = be.alloc(8 * rows).unwrap();
            be.matmul(&w, &x, n, &mut y, &mut ws);
            let want = products(&deq, rows, &xs, n);
            close(
                &host(&be, &y)[..n * rows],
                &want,
                1e-5,
                &format!("{ty:?} product, {n} rows"),
            );

            // Added into what is there, from rows an RMSNorm makes.
            let norm_w = values(cols, 7);
            let nw = be.upload(norm_w.clone()).unwrap();
            let base = values(8 * rows, 9);
            let mut y = be.upload(base.clone()).unwrap();
            let input = MatIn::RmsNorm {
                x: &x,
                weight: &nw,
                eps: 1e-6,
            };
            be.matmul_add_in(&w, input, n, &mut y, &mut ws);
            let mut normed = xs.clone();
            embody_engine::ops::rms_norm_inplace(&mut normed, &norm_w, 1e-6);
            let mut want = products(&deq, rows, &normed, n);
            want.iter_mut().zip(&base).for_each(|(a, b)| *a += b);
            close(
                &host(&be, &y)[..n * rows],
                &want,
                1e-5,
                &format!("{ty:?} norm, product added"),
            );
        }

        // Embedding rows, scaled, written from row 2 on.
        let ids = [5u32, 0, 66, 5];
        let mut x = be.alloc(6 * cols).unwrap();
        be.embed_rows(&w, &ids, Some(0.5), &mut x, 2);
        let got = host(&be, &x);
        let mut want = vec![0.0; 6 * cols];
        for (j, &id) in ids.iter().enumerate() {
            for c in 0..cols {
                want[(2 + j) * cols + c] = deq[id as usize * cols + c] * 0.5;
            }
        }
        close(&got, &want, 1e-6, &format!("{ty:?} embedding rows"));
    }
}

#[test]
fn a_group_of_products_shares_its_gated_input() {
    let be = gpu();
    let (rows, cols, n) = (33, 256, 3);
    let (t1, d1) = tensor(GgmlType::Q8_0, rows, cols, 1);
    let (t2, d2) = tensor(GgmlType::Q4_K, rows, cols, 2);
    let (w1, w2) = (be.weight(t1).unwrap(), be.weight(t2).unwrap());
    let (g, u) = (values(n * cols, 3), values(n * cols, 4));
    let (gb, ub) = (be.upload(g.clone()).unwrap(), be.upload(u.clone()).unwrap());
    let mut ws = be.workspace(n, cols, 16);
    for geglu in [false, true] {
        let (mut y1, mut y2) = (be.alloc(n * rows).unwrap(), be.alloc(n * rows).unwrap());
        let input = if geglu {
            MatIn::GeGlu { gate: &gb, up: &ub }
        } else {
            MatIn::SwiGlu { gate: &gb, up: &ub }
        };
        let mut outs = [MatOut { w: &w1, y: &mut y1 }, MatOut { w: &w2, y: &mut y2 }];
        be.matmul_group_in(input, n, &mut outs, &mut ws);
        let mut h = g.clone();
        if geglu {
            embody_engine::ops::geglu_inplace(&mut h, &u);
        } else {
            embody_engine::ops::swiglu_inplace(&mut h, &u);
        }
        close(
            &host(&be, &y1),
            &products(&d1, rows, &h, n),
            1e-5,
            "first of the group",
        );
        close(
            &host(&be, &y2),
            &products(&d2, rows, &h, n),
            1e-5,
            "second of the group",
        );
    }
}

/// Runs `f` on both backends over buffers holding `inputs`; returns each
/// backend's buffers afterwards.
fn both(
    inputs: &[Vec<f32>],
    f: impl Fn(&dyn Backend, &mut [embody_engine::backend::Buf]),
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let run = |be: &dyn Backend| {
        let mut bufs: Vec<_> = inputs
            .iter()
            .map(|v| be.upload(v.clone()).unwrap())
            .collect();
        f(be, &mut bufs);
        bufs.iter().map(|b| host(be, b)).collect::<Vec<_>>()
    };
    (run(&gpu()), run(&ReferenceBackend))
}

fn all_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f32, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(g, w, tol, &format!("{what}, buffer {i}"));
    }
}

#[test]
fn element_wise_steps_match_the_reference() {
    let (n, d) = (5, 96);
    let inputs = vec![
        values(n * d, 1),
        values(n * d, 2),
        values(d, 3),
        values(d, 4),
    ];
    let run = |what: &str, f: &dyn Fn(&dyn Backend, &mut [embody_engine::backend::Buf])| {
        let (g, r) = both(&inputs, f);
        all_close(&g, &r, 2e-6, what);
    };
    run("rms_norm", &|be, b| {
        let (x, rest) = b.split_at_mut(1);
        be.rms_norm(&mut x[0], n - 1, &rest[1], 1e-5);
    });
    run("norm_add", &|be, b| {
        let (x, rest) = b.split_at_mut(1);
        let (y, w) = rest.split_at_mut(1);
        be.norm_add(&mut x[0], &mut y[0], n, &w[0], 1e-6);
    });
    run("layer_norm", &|be, b| {
        let (x, rest) = b.split_at_mut(2);
        be.layer_norm(&mut x[0], n, &rest[0], &rest[1], 1e-6);
    });
    run("add_bias", &|be, b| {
        let (x, rest) = b.split_at_mut(2);
        be.add_bias(&mut x[0], n - 2, &rest[0]);
    });
    run("add", &|be, b| {
        let (x, rest) = b.split_at_mut(1);
        be.add(&mut x[0], &rest[0], n * d - 7);
    });
    run("swiglu", &|be, b| {
        let (x, rest) = b.split_at_mut(1);
        be.swiglu(&mut x[0], &rest[0], n * d);
    });
    run("gelu_erf", &|be, b| {
        be.activate(&mut b[0], n * d - 1, Activation::GeluErf)
    });
    run("quick_gelu", &|be, b| {
        be.activate(&mut b[1], n * d, Activation::QuickGelu)
    });
    run("copy_rows", &|be, b| {
        let (x, rest) = b.split_at_mut(1);
        be.copy_rows(&x[0], 1, &mut rest[0], 3, 2, d);
    });
    run("write at an offset", &|be, b| {
        be.write(&mut b[1], 17, &[1.0, -2.0, 3.5])
    });
}

#[test]
fn rotary_embeddings_match_the_reference() {
    let (n, hd, nh, nkv) = (3, 32, 4, 2);
    let (qd, kvd) = (nh * hd, nkv * hd);
    for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
        for (sections, dim) in [(None, hd), (None, hd / 2), (Some([4, 6, 6]), hd)] {
            for with_norms in [false, true] {
                let rope = RopeSpec {
                    base: 10000.0,
                    linear_factor: 1.0,
                    dim,
                    style,
                    freq_factors: None,
                    sections,
                };
                let pos = [[3, 3, 3], [9, 1, 4], [100, 7, 2]];
                let inputs = vec![
                    values(n * qd, 1),
                    values(n * kvd, 2),
                    vec![0.0; n * dim],
                    values(hd, 3),
                    values(hd, 4),
                ];
                let (g, r) = both(&inputs, |be, b| {
                    let (qk, rest) = b.split_at_mut(2);
                    let (angles, norms) = rest.split_at_mut(1);
                    be.rope_angles(&rope, &pos, &mut angles[0]);
                    let norms = with_norms.then(|| HeadNorms {
                        q: &norms[0],
                        k: &norms[1],
                        eps: 1e-6,
                    });
                    let (q, k) = qk.split_at_mut(1);
                    be.rope_qk(
                        &mut q[0],
                        &mut k[0],
                        n,
                        (qd, kvd),
                        hd,
                        style,
                        (&angles[0], dim / 2),
                        norms,
                    );
                });
                all_close(
                    &g,
                    &r,
                    2e-6,
                    &format!("rope {style:?} {sections:?} dim {dim} norms {with_norms}"),
                );
            }
        }
    }
}

/// Three sequences of different lengths in one batch, over block tables
/// of scattered blocks, with grouped KV heads, then a sliding window.
#[test]
fn paged_attention_matches_the_reference() {
    let (hd, nh, nkv, bs) = (64, 4, 2, 4);
    for window in [None, Some(5)] {
        let layout = KvLayout {
            n_layers: 2,
            n_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            dtype: Default::default(),
            window: window.map(|size| SlidingWindow {
                size,
                layers: {
                    let mut l = LayerSet::default();
                    l.insert(1);
                    l
                },
            }),
        };
        // (tokens already cached, new tokens)
        let shape = [(0usize, 6usize), (9, 1), (3, 4)];
        let run = |be: &dyn Backend| {
            let mut kv = be.kv_cache(layout, 32, 32).unwrap();
            let mut ws = be.workspace(16, nh * hd, 64);
            // Interleaved allocations scatter each table's blocks.
            let mut tables = [BlockTable::new(), BlockTable::new(), BlockTable::new()];
            for step in 1..=4 {
                for (t, &(old, new)) in tables.iter_mut().zip(&shape) {
                    t.reserve(&mut kv, ((old + new) * step / 4).max(1)).unwrap();
                }
            }
            let mut out = Vec::new();
            for layer in 0..2 {
                // The cached tokens first, one sequence at a time, then the batch.
                for (i, (t, &(old, _))) in tables.iter().zip(&shape).enumerate() {
                    if old > 0 {
                        let s = [AttnSeq {
                            table: t,
                            start_pos: 0,
                            n_tokens: old,
                        }];
                        let k = be.upload(values(old * nkv * hd, 10 + i as u64)).unwrap();
                        let v = be.upload(values(old * nkv * hd, 20 + i as u64)).unwrap();
                        be.kv_write(&mut kv, layer, &s, &k, &v);
                    }
                }
                let seqs: Vec<_> = tables
                    .iter()
                    .zip(&shape)
                    .map(|(t, &(old, new))| AttnSeq {
                        table: t,
                        start_pos: old,
                        n_tokens: new,
                    })
                    .collect();
                let rows: usize = shape.iter().map(|s| s.1).sum();
                let k = be
                    .upload(values(rows * nkv * hd, 30 + layer as u64))
                    .unwrap();
                let v = be
                    .upload(values(rows * nkv * hd, 40 + layer as u64))
                    .unwrap();
                be.kv_write(&mut kv, layer, &seqs, &k, &v);
                let q = be
                    .upload(values(rows * nh * hd, 50 + layer as u64))
                    .unwrap();
                let mut o = be.alloc(rows * nh * hd).unwrap();
                let p = AttnParams {
                    layer,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    scale: 0.125,
                    window: if layer == 1 { window } else { None },
                };
                be.attention(&p, &q, &kv, &seqs, &mut o, &mut ws);
                out.push(host(be, &o));
            }
            out
        };
        let (g, r) = (run(&gpu()), run(&ReferenceBackend));
        all_close(&g, &r, 1e-4, &format!("attention, window {window:?}"));
    }
}

#[test]
fn segment_attention_and_logits_match_the_reference() {
    let (nh, hd, rows) = (3, 40, 11);
    let w = nh * hd;
    let segments: Vec<Range<usize>> = vec![0..4, 4..5, 5..11];
    let inputs = vec![
        values(rows * w, 1),
        values(rows * w, 2),
        values(rows * w, 3),
        vec![0.0; rows * w],
    ];
    let (g, r) = both(&inputs, |be, b| {
        let (qkv, out) = b.split_at_mut(3);
        be.attention_segments(
            &qkv[0],
            &qkv[1],
            &qkv[2],
            (nh, hd),
            0.3,
            &segments,
            &mut out[0],
        );
    });
    all_close(&g, &r, 1e-5, "segment attention");

    // Logits of two rows, soft-capped, against the dequantized weight.
    let be = gpu();
    let vocab = 300;
    let (t, deq) = tensor(GgmlType::Q6_K, vocab, 256, 5);
    let w = be.weight(t).unwrap();
    let xs = values(2 * 256, 6);
    let x = be.upload(xs.clone()).unwrap();
    let mut ws = be.workspace(4, 256, 16);
    let mut out = vec![0.0; 2 * vocab];
    be.logits(&w, &x, 2, Some(3.0), &mut out, &mut ws);
    let want: Vec<f32> = products(&deq, vocab, &xs, 2)
        .into_iter()
        .map(|v| 3.0 * (v / 3.0).tanh())
        .collect();
    close(&out, &want, 1e-5, "soft-capped logits");
}

/// A cache whose layer does not fit one binding is refused with the sizes,
/// not made and then misused.
#[test]
fn memory_beyond_the_device_is_a_clear_error() {
    let be = gpu();
    let layout = KvLayout {
        n_layers: 1,
        n_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        window: None,
        dtype: Default::default(),
    };
    // Blocks of 32 KiB: more than 128 MiB for one layer's keys.
    let e = be
        .kv_cache(layout, 4100, 0)
        .err()
        .expect("too large for one binding");
    let msg = e.to_string();
    assert!(msg.contains("exceeds the largest storage buffer"), "{msg}");
    let e = be.alloc(1 << 30).expect_err("a 4 GiB buffer");
    assert!(e.to_string().contains("MiB"), "{e}");
    // Quantized KV runs on the CPU backend only, and says so.
    let q8 = KvLayout {
        dtype: embody_engine::kv_cache::KvType::Q8_0,
        ..layout
    };
    let e = be.kv_cache(q8, 4, 0).err().expect("a q8_0 cache");
    assert!(
        e.to_string().contains("q8_0 runs on the CPU backend"),
        "{e}"
    );
}

#[test]
fn a_device_that_is_not_there_is_named_in_the_error() {
    let e = VulkanBackend::new(Some("no-such-gpu"))
        .err()
        .expect("no device of that name");
    let msg = e.to_string();
    assert!(
        msg.contains("no-such-gpu") && msg.contains("devices: 0:"),
        "{msg}"
    );
}

/// Two threads on one device (the decoder and the vision encoder share the
/// backend): one looks rows up by token id while the other keeps forcing
/// submissions; every lookup reads its own ids.
#[test]
fn threads_sharing_the_device_keep_their_own_data() {
    let be = std::sync::Arc::new(gpu());
    let cols = 64;
    let (t, deq) = tensor(GgmlType::Q8_0, 50, cols, 11);
    let w = be.weight(t).unwrap();
    let other = {
        let be = be.clone();
        std::thread::spawn(move || {
            let mut b = be.upload(values(1000, 1)).unwrap();
            let (v, mut out) = (values(1000, 2), vec![0.0; 1000]);
            for _ in 0..300 {
                // Staged host data, then a submission.
                be.write(&mut b, 0, &v);
                be.read(&b, 0, &mut out);
                assert_eq!(out, v);
            }
        })
    };
    let mut x = be.alloc(8 * cols).unwrap();
    for round in 0..300u32 {
        let ids: Vec<u32> = (0..8).map(|i| (round * 7 + i * 3) % 50).collect();
        be.embed_rows(&w, &ids, None, &mut x, 0);
        let got = host(be.as_ref(), &x);
        for (r, &id) in ids.iter().enumerate() {
            let want = &deq[id as usize * cols..(id as usize + 1) * cols];
            assert_eq!(
                &got[r * cols..(r + 1) * cols],
                want,
                "round {round}, row {r}"
            );
        }
    }
    other.join().unwrap();
}
