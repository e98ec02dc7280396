// Products with a weight stored in a GGUF type, and token embedding rows
// taken from one. build.rs prepends, per type, `const QTYPE: u32` (the
// GGUF type id), `const BLOCK: u32` (values per block) and `const BYTES:
// u32` (bytes per block); the driver folds the type switch away.
//
// Weights keep the file's bytes, each block padded to whole 4-byte words
// where the file's is not (Q4_0, Q5_0 and Q8_0 get two bytes after their
// scale, Q6_K two at its end; the backend repacks them at upload), so the
// common types are read a word at a time.

struct Params {
    // Rows of this chunk of the weight, and values per row.
    rows: u32,
    cols: u32,
    // Token rows of x (or ids to embed).
    n: u32,
    // The chunk's first row in the whole weight.
    row0: u32,
    // Bytes per weight row.
    row_bytes: u32,
    // Values per row of y (the whole weight's rows, for products).
    y_stride: u32,
    // 1: y += product; 0: y = product.
    add: u32,
    // Embedding: the first row of y written, and the scale (0: none).
    out_row: u32,
    scale: f32,
}

var<immediate> pc: Params;

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;

fn byte_at(off: u32) -> u32 {
    return (w[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

fn bits16_at(off: u32) -> u32 {
    return byte_at(off) | (byte_at(off + 1u) << 8u);
}

fn half_at(off: u32) -> f32 {
    return unpack2x16float(bits16_at(off)).x;
}

fn u32_at(off: u32) -> u32 {
    return bits16_at(off) | (bits16_at(off + 2u) << 16u);
}

fn i8_of(b: u32) -> f32 {
    return f32(bitcast<i32>(b << 24u) >> 24u);
}

// The 6-bit scale (`which` 0) or min (1) of sub-block j of a Q4_K/Q5_K block
// whose scales start at `s` (ggml's get_scale_min_k4).
fn scale_min_k4(s: u32, j: u32, which: u32) -> f32 {
    if (j < 4u) {
        return f32(byte_at(s + j + 4u * which) & 63u);
    }
    let lo = select(byte_at(s + j + 4u) & 0xfu, byte_at(s + j + 4u) >> 4u, which == 1u);
    let hi = byte_at(s + j - 4u + 4u * which) >> 6u;
    return f32(lo | (hi << 4u));
}

// Values per sub-block: the span over which one scale and offset hold.
const SUB: u32 = select(select(32u, 16u, QTYPE == 14u), 1u, BLOCK == 1u);

// The integer level of value jj of the block at byte offset `base` (for
// float types, the value itself): value = level * p.x + p.y, with `p` from
// `sub_params` of its sub-block.
fn level(base: u32, jj: u32) -> f32 {
    switch QTYPE {
        case 0u: { // F32
            return bitcast<f32>(u32_at(base));
        }
        case 1u: { // F16
            return half_at(base);
        }
        case 30u: { // BF16
            return bitcast<f32>(bits16_at(base) << 16u);
        }
        case 2u, 3u: { // Q4_0, Q4_1
            let b = byte_at(base + 4u + (jj & 15u));
            return f32(select(b & 0xfu, b >> 4u, jj >= 16u));
        }
        case 6u, 7u: { // Q5_0, Q5_1
            let b = byte_at(base + 8u + (jj & 15u));
            let lo = select(b & 0xfu, b >> 4u, jj >= 16u);
            return f32(lo | (((w[(base >> 2u) + 1u] >> jj) & 1u) << 4u));
        }
        case 8u: { // Q8_0
            return i8_of(byte_at(base + 4u + jj));
        }
        case 12u, 13u: { // Q4_K, Q5_K
            let qs = select(16u, 48u, QTYPE == 13u);
            let b = byte_at(base + qs + (jj / 64u) * 32u + (jj & 31u));
            var q = select(b & 0xfu, b >> 4u, (jj & 63u) >= 32u);
            if (QTYPE == 13u) {
                q = q | (((byte_at(base + 16u + (jj & 31u)) >> (jj / 32u)) & 1u) << 4u);
            }
            return f32(q);
        }
        case 14u: { // Q6_K
            let half = jj / 128u;
            let k = jj & 127u;
            let row = k / 32u;
            let l = k & 31u;
            let ql = byte_at(base + half * 64u + (row & 1u) * 32u + l);
            let low = select(ql & 0xfu, ql >> 4u, row >= 2u);
            let high = (byte_at(base + 128u + half * 32u + l) >> (2u * row)) & 3u;
            return f32(low | (high << 4u));
        }
        default: {
            return 0.0;
        }
    }
}

// Scale and offset of sub-block s of the block at `base`.
fn sub_params(base: u32, s: u32) -> vec2<f32> {
    switch QTYPE {
        case 2u: {
            let d = half_at(base);
            return vec2<f32>(d, -8.0 * d);
        }
        case 6u: {
            let d = half_at(base);
            return vec2<f32>(d, -16.0 * d);
        }
        case 3u, 7u: {
            return vec2<f32>(half_at(base), half_at(base + 2u));
        }
        case 8u: {
            return vec2<f32>(half_at(base), 0.0);
        }
        case 12u, 13u: {
            let d = half_at(base) * scale_min_k4(base + 4u, s, 0u);
            let m = half_at(base + 2u) * scale_min_k4(base + 4u, s, 1u);
            return vec2<f32>(d, -m);
        }
        case 14u: {
            let d = half_at(base + 208u) * i8_of(byte_at(base + 192u + s));
            return vec2<f32>(d, -32.0 * d);
        }
        default: {
            return vec2<f32>(1.0, 0.0);
        }
    }
}

// Value jj of the block at byte offset `base`.
fn deq(base: u32, jj: u32) -> f32 {
    let p = sub_params(base, jj / SUB);
    return level(base, jj) * p.x + p.y;
}

const TOK: u32 = 8u;

// y[t][row0 + r] (+)= w.row(r) · x[t]: one invocation per weight row and
// TOK token rows, so no invocation waits on another (no barriers, no
// workgroup memory), whatever the device's subgroup size.
@compute @workgroup_size(64)
fn matmul(@builtin(global_invocation_id) g: vec3<u32>) {
    let r = g.x;
    let t0 = g.y * TOK;
    if (r >= pc.rows) {
        return;
    }
    let nt = min(TOK, pc.n - t0);
    var acc = array<f32, TOK>();
    let nb = pc.cols / BLOCK;
    let row = r * pc.row_bytes;
    for (var b = 0u; b < nb; b++) {
        let base = row + b * BYTES;
        let c0 = b * BLOCK;
        let wb = base >> 2u;
        // Whole words: four 8-bit or eight 4-bit levels per load.
        if (QTYPE == 2u || QTYPE == 3u) {
            let p = sub_params(base, 0u);
            for (var k = 0u; k < 4u; k++) {
                let word = w[wb + 1u + k];
                for (var i = 0u; i < 4u; i++) {
                    let lo = f32((word >> (8u * i)) & 0xfu) * p.x + p.y;
                    let hi = f32((word >> (8u * i + 4u)) & 0xfu) * p.x + p.y;
                    let c = c0 + 4u * k + i;
                    for (var t = 0u; t < nt; t++) {
                        let xr = (t0 + t) * pc.cols;
                        acc[t] += lo * x[xr + c] + hi * x[xr + c + 16u];
                    }
                }
            }
            continue;
        }
        if (QTYPE == 8u) {
            let d = half_at(base);
            for (var k = 0u; k < 8u; k++) {
                let word = w[wb + 1u + k];
                for (var i = 0u; i < 4u; i++) {
                    let v = f32(bitcast<i32>(word << (24u - 8u * i)) >> 24u) * d;
                    let c = c0 + 4u * k + i;
                    for (var t = 0u; t < nt; t++) {
                        acc[t] += v * x[(t0 + t) * pc.cols + c];
                    }
                }
            }
            continue;
        }
        if (QTYPE == 12u) {
            for (var ch = 0u; ch < 4u; ch++) {
                let pl = sub_params(base, 2u * ch);
                let ph = sub_params(base, 2u * ch + 1u);
                for (var k = 0u; k < 8u; k++) {
                    let word = w[wb + 4u + ch * 8u + k];
                    for (var i = 0u; i < 4u; i++) {
                        let lo = f32((word >> (8u * i)) & 0xfu) * pl.x + pl.y;
                        let hi = f32((word >> (8u * i + 4u)) & 0xfu) * ph.x + ph.y;
                        let c = c0 + ch * 64u + 4u * k + i;
                        for (var t = 0u; t < nt; t++) {
                            let xr = (t0 + t) * pc.cols;
                            acc[t] += lo * x[xr + c] + hi * x[xr + c + 32u];
                        }
                    }
                }
            }
            continue;
        }
        for (var s = 0u; s < BLOCK / SUB; s++) {
            let p = sub_params(base, s);
            for (var e = 0u; e < SUB; e++) {
                let jj = s * SUB + e;
                let v = level(base, jj) * p.x + p.y;
                for (var t = 0u; t < nt; t++) {
                    acc[t] += v * x[(t0 + t) * pc.cols + c0 + jj];
                }
            }
        }
    }
    for (var t = 0u; t < nt; t++) {
        let at = (t0 + t) * pc.y_stride + pc.row0 + r;
        y[at] = select(acc[t], y[at] + acc[t], pc.add == 1u);
    }
}

// y[out_row + t] = scale · w.row(ids[t]) for the ids in this chunk's rows.
@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) g: vec3<u32>) {
    let c = g.x;
    let t = g.y;
    if (c >= pc.cols || t >= pc.n) {
        return;
    }
    let id = ids[t];
    if (id < pc.row0 || id >= pc.row0 + pc.rows) {
        return;
    }
    let base = (id - pc.row0) * pc.row_bytes + (c / BLOCK) * BYTES;
    var v = deq(base, c % BLOCK);
    if (pc.scale != 0.0) {
        v *= pc.scale;
    }
    y[(pc.out_row + t) * pc.cols + c] = v;
}
