//! Matmul kernel throughput per weight type and kernel path.
//!
//! For each type, a weight matrix of the size of a real model's projection is
//! multiplied with several activation rows (1 and 4 unless `ACTS` says), one weight row at a time as the
//! CPU backend does (`vec_dot_multi`, so ×4 decodes each weight row once). Prints
//! the time per weight row and the weight bytes streamed per second, both with
//! the matrix hot in cache (the same matrix again and again) and from RAM
//! (cycling through copies that together exceed the last-level cache), on one
//! thread.
//!
//! Shapes: 576 inputs × 1536 rows (SmolLM2-135M `ffn_up`) and 896 × 4864
//! (Qwen2.5-0.5B `ffn_up`). K-quant rows must be multiples of 256, so those use
//! the transposed `ffn_down` shapes, 1536 × 576 and 4864 × 896: the same bytes.
//!
//! ```text
//! [ACTS=1,4] cargo run --release -p embody-engine --example kernel_bench [TYPE ...]
//! ```
//!
//! `ACTS` lists the activation-row counts to time (default 1 and 4).

use std::hint::black_box;
use std::time::{Duration, Instant};

#[cfg(target_arch = "x86_64")]
use embody_engine::quant::x86::{self, Level};
use embody_engine::quant::{reference, GgmlType};

/// The weight types, most used first.
const TYPES: [GgmlType; 11] = [
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::Q5_0,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
    GgmlType::Q4_0,
    GgmlType::Q5_1,
    GgmlType::Q5_K,
];

/// (inputs, rows) of the two matrices.
const SHAPES: [(usize, usize); 2] = [(576, 1536), (896, 4864)];

/// Bytes of weight copies cycled through for the from-RAM figure: 6× a 32 MiB L3.
const RAM_BYTES: usize = 192 << 20;

/// A kernel path.
#[derive(Copy, Clone)]
enum Path {
    Reference,
    /// Row kernels ([`x86::vec_dot_multi_at`]).
    #[cfg(target_arch = "x86_64")]
    X86(Level),
    /// Tiled kernels straight from the rows, eight at a time.
    #[cfg(target_arch = "x86_64")]
    Rows(Level),
    /// Tiled kernels: unpack a panel of eight rows, then multiply.
    #[cfg(target_arch = "x86_64")]
    Panel(Level),
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Reference => "reference",
            #[cfg(target_arch = "x86_64")]
            Path::X86(level) => level.name(),
            #[cfg(target_arch = "x86_64")]
            Path::Rows(Level::Avx2) => "avx2 rows",
            #[cfg(target_arch = "x86_64")]
            Path::Rows(Level::Avx512) => "512 rows",
            #[cfg(target_arch = "x86_64")]
            Path::Panel(Level::Avx2) => "avx2 panel",
            #[cfg(target_arch = "x86_64")]
            Path::Panel(Level::Avx512) => "512 panel",
        }
    }

    /// The reference or a row kernel (every kernel has one).
    fn is_row_kernel(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Path::Rows(_) | Path::Panel(_) = self {
            return false;
        }
        true
    }

    fn available() -> Vec<Path> {
        #[allow(unused_mut)]
        let mut paths = vec![Path::Reference];
        #[cfg(target_arch = "x86_64")]
        for level in Level::ALL.into_iter().filter(|l| l.is_available()) {
            paths.extend([Path::X86(level), Path::Rows(level), Path::Panel(level)]);
        }
        paths
    }
}

/// xorshift64*, seeded: reproducible data without a dependency.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (v >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn row(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| 0.5 * (0..4).map(|_| self.uniform()).sum::<f32>())
            .collect()
    }
}

fn quantized(ty: GgmlType, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(v.len()).expect("whole blocks")];
    reference::quantize_row(ty, v, &mut out);
    out
}

/// A `rows × k` weight matrix: 64 distinct quantized rows, tiled.
fn weights(rng: &mut Rng, ty: GgmlType, k: usize, rows: usize) -> Vec<u8> {
    let distinct: Vec<Vec<u8>> = (0..64).map(|_| quantized(ty, &rng.row(k))).collect();
    (0..rows).flat_map(|r| distinct[r % 64].clone()).collect()
}

/// `out[r * acts + t] = w_r · x_t` for every weight row r.
#[allow(clippy::too_many_arguments)]
fn matmul(
    path: Path,
    ty: GgmlType,
    k: usize,
    w: &[u8],
    x: &[u8],
    meta: &[u8],
    acts: usize,
    out: &mut [f32],
    panel: &mut [u8],
) {
    let w_row = ty.row_bytes(k).unwrap();
    let x_row = x.len() / acts;
    #[cfg(target_arch = "x86_64")]
    if let Path::Rows(level) | Path::Panel(level) = path {
        let rows = embody_engine::quant::gemm::PANEL_ROWS;
        for (wr, o) in w
            .chunks_exact(rows * w_row)
            .zip(out.chunks_exact_mut(rows * acts))
        {
            if let Path::Rows(_) = path {
                x86::gemm::multiply_rows_at(level, ty, k, wr, x, meta, acts, o, rows);
            } else {
                x86::gemm::pack_at(level, ty, k, wr, panel);
                x86::gemm::multiply_at(level, ty, k, panel, x, meta, acts, o, rows);
            }
        }
        return;
    }
    let _ = (meta, &panel);
    for (wr, o) in w.chunks_exact(w_row).zip(out.chunks_exact_mut(acts)) {
        match path {
            Path::Reference => {
                for (o, xr) in o.iter_mut().zip(x.chunks_exact(x_row)) {
                    *o = reference::vec_dot(ty, wr, xr, k);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::X86(level) => {
                // Four activation rows per call at most, as the backend passes them.
                for (xs, o) in x.chunks(4 * x_row).zip(o.chunks_mut(4)) {
                    x86::vec_dot_multi_at(level, ty, k, wr, xs, o);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Rows(_) | Path::Panel(_) => unreachable!(),
        }
    }
}

fn time(min_batch: Duration, batches: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..batches {
        let start = Instant::now();
        let (mut calls, mut step) = (0u64, 1u64);
        // Read the clock only between doubling runs of calls: short kernels would
        // otherwise time the clock.
        while start.elapsed() < min_batch {
            for _ in 0..step {
                f();
            }
            calls += step;
            step *= 2;
        }
        best = best.min(start.elapsed().as_secs_f64() / calls as f64);
    }
    best
}

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).map(|a| a.to_uppercase()).collect();
    let paths = Path::available();
    println!(
        "kernel paths: {}",
        paths
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "one thread; GB/s = weight bytes / time; RAM = cycling through {} MiB of copies",
        RAM_BYTES >> 20
    );
    println!();
    println!(
        "{:<5} {:>11} {:>4}  {:<9} {:>10} {:>9} {:>9}",
        "type", "k × rows", "acts", "path", "ns/row", "GB/s hot", "GB/s RAM"
    );
    let acts_list: Vec<usize> = std::env::var("ACTS")
        .unwrap_or_else(|_| String::from("1,4"))
        .split(',')
        .map(|a| a.trim().parse().expect("ACTS: a list of token counts"))
        .collect();
    let mut rng = Rng(0x5eed_b3c4);
    for ty in TYPES {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == ty.name()) {
            continue;
        }
        for (k, rows) in SHAPES {
            // K-quants take the transposed shape (see the module docs).
            let (k, rows) = if k % ty.block_size() == 0 {
                (k, rows)
            } else {
                (rows, k)
            };
            let w = weights(&mut rng, ty, k, rows);
            let copies = (RAM_BYTES / w.len()).max(2);
            let cold: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
            let bytes = w.len() as f64;
            for &acts in &acts_list {
                let x: Vec<u8> = (0..acts)
                    .flat_map(|_| quantized(ty.vec_dot_type(), &rng.row(k)))
                    .collect();
                let mut out = vec![0.0f32; rows * acts];
                let x_row = ty.vec_dot_type().row_bytes(k).unwrap();
                let meta_row = embody_engine::quant::gemm::meta_bytes(k);
                let mut meta = vec![0u8; acts * meta_row];
                let tiled = embody_engine::quant::gemm::supported(ty);
                if tiled {
                    for (xr, m) in x.chunks_exact(x_row).zip(meta.chunks_exact_mut(meta_row)) {
                        embody_engine::quant::gemm::prepare(ty.vec_dot_type(), k, xr, m);
                    }
                }
                let mut panel = vec![0u8; embody_engine::quant::gemm::max_panel_bytes(k)];
                for &path in &paths {
                    #[cfg(target_arch = "x86_64")]
                    if let Path::Rows(level) | Path::Panel(level) = path {
                        if !x86::gemm::supported(level, ty) {
                            continue;
                        }
                    }
                    let panel = &mut panel[..if tiled {
                        embody_engine::quant::gemm::panel_bytes(ty, k)
                    } else {
                        0
                    }];
                    let slow = matches!(path, Path::Reference);
                    let (batch, batches) = if slow {
                        (Duration::from_millis(100), 2)
                    } else {
                        (Duration::from_millis(60), 5)
                    };
                    let hot = time(batch, batches, || {
                        matmul(path, ty, k, black_box(&w), &x, &meta, acts, &mut out, panel);
                        black_box(&out);
                    });
                    // From RAM: one pass over all copies per call.
                    let ram = if slow {
                        String::from("-")
                    } else {
                        let t = time(Duration::from_millis(1), 3, || {
                            for c in &cold {
                                matmul(path, ty, k, black_box(c), &x, &meta, acts, &mut out, panel);
                            }
                            black_box(&out);
                        }) / copies as f64;
                        format!("{:.1}", bytes / t / 1e9)
                    };
                    println!(
                        "{:<5} {:>11} {:>4}  {:<9} {:>10.1} {:>9.1} {:>9}",
                        ty.name(),
                        format!("{k}×{rows}"),
                        acts,
                        path.name(),
                        hot * 1e9 / rows as f64,
                        bytes / hot / 1e9,
                        ram
                    );
                }
            }
        }
    }

    // Activation quantization and the f16 attention helpers.
    println!();
    println!("{:<24} {:<9} {:>10}", "kernel", "path", "ns/call");
    let v = rng.row(4864);
    for ty in [GgmlType::Q8_1, GgmlType::Q8_0, GgmlType::Q8_K] {
        let mut dst = vec![0u8; ty.row_bytes(v.len()).unwrap()];
        for &path in paths.iter().filter(|p| p.is_row_kernel()) {
            let t = time(Duration::from_millis(30), 3, || {
                match path {
                    Path::Reference => reference::quantize_row(ty, black_box(&v), &mut dst),
                    #[cfg(target_arch = "x86_64")]
                    Path::X86(level) => {
                        x86::quantize_row_at(level, ty, black_box(&v), &mut dst);
                    }
                    #[cfg(target_arch = "x86_64")]
                    Path::Rows(_) | Path::Panel(_) => unreachable!(),
                }
                black_box(&dst);
            });
            let label = format!("quantize_row {ty} ×4864");
            println!("{label:<24} {:<9} {:>10.1}", path.name(), t * 1e9);
        }
    }
    let src: Vec<half::f16> = rng.row(1024).into_iter().map(half::f16::from_f32).collect();
    let mut dst = vec![0.0f32; 1024];
    for &path in paths.iter().filter(|p| p.is_row_kernel()) {
        let t = time(Duration::from_millis(30), 3, || {
            match path {
                Path::Reference => reference::f16_to_f32_slice(black_box(&src), &mut dst),
                #[cfg(target_arch = "x86_64")]
                Path::X86(level) => x86::f16_to_f32_slice_at(level, black_box(&src), &mut dst),
                #[cfg(target_arch = "x86_64")]
                Path::Rows(_) | Path::Panel(_) => unreachable!(),
            }
            black_box(&dst);
        });
        println!(
            "{:<24} {:<9} {:>10.1}",
            "f16_to_f32 ×1024",
            path.name(),
            t * 1e9
        );
    }
}
