// The f32 steps between the products: norms, rotary embeddings, gated
// units, activations, residual adds and attention inside image segments.
// Every kernel reads its own meaning of the parameters and bindings.

struct Params {
    n: u32,     // rows (or values, for element-wise kernels)
    d: u32,     // row width
    mode: u32,  // kernel-specific switch
    eps: f32,
    p0: u32,
    p1: u32,
    p2: u32,
    p3: u32,
    f0: f32,
}

var<immediate> pc: Params;

@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read> c: array<f32>;
@group(0) @binding(3) var<storage, read> d: array<f32>;
@group(0) @binding(4) var<storage, read> info: array<u32>;
@group(0) @binding(5) var<storage, read> e: array<f32>;

// The index of this invocation in a 2D grid of 64-wide workgroups.
fn flat(g: vec3<u32>, nw: vec3<u32>) -> u32 {
    return g.y * nw.x * 64u + g.x;
}

// RMSNorm of row wg.x, weight c. mode 0: a in place; 1: a's row into b;
// 2: b in place, then a += b (a block's output normalised, then added).
@compute @workgroup_size(64)
fn rms_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wg.y * 32768u + wg.x;
    let valid = row < pc.n;
    let o = row * pc.d;
    var ss = 0.0;
    if (valid) {
        for (var i = l.x; i < pc.d; i += 64u) {
            let v = select(a[o + i], b[o + i], pc.mode == 2u);
            ss += v * v;
        }
    }
    let total = reduce(ss, l.x, false);
    if (!valid) {
        return;
    }
    let scale = 1.0 / sqrt(total / f32(pc.d) + pc.eps);
    for (var i = l.x; i < pc.d; i += 64u) {
        switch pc.mode {
            case 0u: {
                a[o + i] = a[o + i] * scale * c[i];
            }
            case 1u: {
                b[o + i] = a[o + i] * scale * c[i];
            }
            default: {
                let v = b[o + i] * scale * c[i];
                b[o + i] = v;
                a[o + i] += v;
            }
        }
    }
}

// LayerNorm in place of row wg.x of a: weight c, bias d.
@compute @workgroup_size(64)
fn layer_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wg.y * 32768u + wg.x;
    let valid = row < pc.n;
    let o = row * pc.d;
    var s = 0.0;
    if (valid) {
        for (var i = l.x; i < pc.d; i += 64u) {
            s += a[o + i];
        }
    }
    let mean = reduce(s, l.x, false) / f32(pc.d);
    var v = 0.0;
    if (valid) {
        for (var i = l.x; i < pc.d; i += 64u) {
            let x = a[o + i] - mean;
            v += x * x;
        }
    }
    let var_ = reduce(v, l.x, false) / f32(pc.d);
    if (!valid) {
        return;
    }
    let scale = 1.0 / sqrt(var_ + pc.eps);
    for (var i = l.x; i < pc.d; i += 64u) {
        a[o + i] = (a[o + i] - mean) * scale * c[i] + d[i];
    }
}

fn silu(x: f32) -> f32 {
    return x / (1.0 + exp(-x));
}

fn gelu_tanh(x: f32) -> f32 {
    let u = 0.7978846 * (x + 0.044715 * x * x * x);
    return x / (1.0 + exp(-2.0 * u));
}

// Abramowitz and Stegun 7.1.26, as the CPU's reference.
fn erf_(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let y = 1.0 - poly * exp(-x * x);
    return select(y, -y, x < 0.0);
}

// Element-wise, n values. mode 0: a += c; 1: a[i] += c[i % d] (bias);
// 2: a = silu(c) * d; 3: a = gelu_tanh(c) * d; 4: a = gelu_erf(a);
// 5: a = quick_gelu(a); 6: a = f0 · tanh(a / f0) (soft-capping).
@compute @workgroup_size(64)
fn eltwise(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = flat(g, nw);
    if (i >= pc.n) {
        return;
    }
    switch pc.mode {
        case 0u: {
            a[i] += c[i];
        }
        case 1u: {
            a[i] += c[i % pc.d];
        }
        case 2u: {
            a[i] = silu(c[i]) * d[i];
        }
        case 3u: {
            a[i] = gelu_tanh(c[i]) * d[i];
        }
        case 4u: {
            let x = a[i];
            a[i] = 0.5 * x * (1.0 + erf_(x * 0.70710678));
        }
        case 5u: {
            let x = a[i];
            a[i] = x / (1.0 + exp(-1.702 * x));
        }
        default: {
            a[i] = pc.f0 * tanh(a[i] / pc.f0);
        }
    }
}

// Rotary embeddings of every head of n rows of a (q, p0 values a row) and
// b (k, p1 values), head_dim d, p2 rotary pairs whose (cos, sin) row r of
// c holds; mode bit 0: pairs are halves (else adjacent); bit 1: each head
// is RMS-normalised first by d (queries) or e (keys), eps.
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = flat(g, nw);
    let qh = pc.p0 / pc.d;
    let heads = qh + pc.p1 / pc.d;
    if (i >= pc.n * heads) {
        return;
    }
    let r = i / heads;
    let h = i % heads;
    let is_q = h < qh;
    let o = select(r * pc.p1 + (h - qh) * pc.d, r * pc.p0 + h * pc.d, is_q);
    if ((pc.mode & 2u) != 0u) {
        var ss = 0.0;
        for (var j = 0u; j < pc.d; j++) {
            let v = select(b[o + j], a[o + j], is_q);
            ss += v * v;
        }
        let scale = 1.0 / sqrt(ss / f32(pc.d) + pc.eps);
        for (var j = 0u; j < pc.d; j++) {
            if (is_q) {
                a[o + j] = a[o + j] * scale * d[j];
            } else {
                b[o + j] = b[o + j] * scale * e[j];
            }
        }
    }
    let half = pc.p2;
    for (var p = 0u; p < half; p++) {
        let cs = c[(r * half + p) * 2u];
        let sn = c[(r * half + p) * 2u + 1u];
        let ia = select(o + 2u * p, o + p, (pc.mode & 1u) != 0u);
        let ib = select(o + 2u * p + 1u, o + p + half, (pc.mode & 1u) != 0u);
        if (is_q) {
            let x0 = a[ia];
            let x1 = a[ib];
            a[ia] = x0 * cs - x1 * sn;
            a[ib] = x0 * sn + x1 * cs;
        } else {
            let x0 = b[ia];
            let x1 = b[ib];
            b[ia] = x0 * cs - x1 * sn;
            b[ib] = x0 * sn + x1 * cs;
        }
    }
}

var<workgroup> qrow: array<f32, 512>;
var<workgroup> probs: array<f32, 64>;

// Bidirectional attention inside segments (vision encoders): row wg.y,
// head wg.x of q (c), keys d, values e, all [rows, p0 heads * d]; info
// holds each row's segment as (start, end); f0 scales q·k; out into a.
@compute @workgroup_size(64)
fn attend_dense(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let h = wg.x;
    let t = wg.y;
    let hd = pc.d;
    let w = pc.p0 * hd;
    let qo = t * w + h * hd;
    for (var j = l.x; j < hd; j += 64u) {
        qrow[j] = c[qo + j];
    }
    workgroupBarrier();
    let start = info[2u * t];
    let end = info[2u * t + 1u];
    var m = -3.0e38;
    var s = 0.0;
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var j0 = start; j0 < end; j0 += 64u) {
        let j = j0 + l.x;
        var sc = -3.0e38;
        if (j < end) {
            var dot = 0.0;
            let ko = j * w + h * hd;
            for (var k = 0u; k < hd; k++) {
                dot += qrow[k] * d[ko + k];
            }
            sc = dot * pc.f0;
        }
        let m_new = max(m, reduce(sc, l.x, true));
        let p = select(0.0, exp(sc - m_new), j < end);
        probs[l.x] = p;
        let ps = reduce(p, l.x, false);
        let corr = exp(m - m_new);
        s = s * corr + ps;
        let last = min(64u, end - j0);
        for (var k = 0u; k < 8u; k++) {
            let dim = l.x + 64u * k;
            if (dim < hd) {
                var v = acc[k] * corr;
                for (var u = 0u; u < last; u++) {
                    v += probs[u] * e[(j0 + u) * w + h * hd + dim];
                }
                acc[k] = v;
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    for (var k = 0u; k < 8u; k++) {
        let dim = l.x + 64u * k;
        if (dim < hd) {
            a[qo + dim] = acc[k] / s;
        }
    }
}
