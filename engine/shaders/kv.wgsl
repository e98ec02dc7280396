// The KV cache in device memory and causal attention over it. Each pool
// layer is one buffer of f16 pairs, laid out [block][slot][kv head][dim]:
// a token's keys (or values) are one contiguous row.

struct Params {
    n: u32,         // token rows
    n_heads: u32,   // query heads
    group: u32,     // query heads per KV head
    head_dim: u32,
    block: u32,     // tokens per block
    scale: f32,
}

var<immediate> pc: Params;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> kin: array<f32>;
@group(0) @binding(2) var<storage, read> vin: array<f32>;
@group(0) @binding(3) var<storage, read_write> kc: array<u32>;
@group(0) @binding(4) var<storage, read_write> vc: array<u32>;
@group(0) @binding(5) var<storage, read> info: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

// Row t of kin/vin (kv width values, packed in pairs) into slot info[t].
@compute @workgroup_size(64)
fn kv_write(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let pairs = pc.n_heads * pc.head_dim / 2u;
    let i = g.y * nw.x * 64u + g.x;
    if (i >= pc.n * pairs) {
        return;
    }
    let t = i / pairs;
    let p = i % pairs;
    let src = t * pairs * 2u + 2u * p;
    let dst = info[t] * pairs + p;
    kc[dst] = pack2x16float(vec2<f32>(kin[src], kin[src + 1u]));
    vc[dst] = pack2x16float(vec2<f32>(vin[src], vin[src + 1u]));
}

var<workgroup> qrow: array<f32, 512>;
var<workgroup> probs: array<f32, 64>;
var<workgroup> slots: array<u32, 64>;

// Query head wg.x of token row wg.y over its visible positions: info
// holds (position, first visible position, offset of the sequence's block
// list in info) per row. Softmax online, one chunk of 64 positions at a time.
@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let h = wg.x;
    let t = wg.y;
    let hd = pc.head_dim;
    let kvh = h / pc.group;
    let kvw = (pc.n_heads / pc.group) * hd;
    let qo = t * pc.n_heads * hd + h * hd;
    for (var j = l.x; j < hd; j += 64u) {
        qrow[j] = q[qo + j];
    }
    let pos = info[3u * t];
    let first = info[3u * t + 1u];
    let table = info[3u * t + 2u];
    workgroupBarrier();
    var m = -3.0e38;
    var s = 0.0;
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var j0 = first; j0 <= pos; j0 += 64u) {
        let j = j0 + l.x;
        var sc = -3.0e38;
        if (j <= pos) {
            let slot = info[table + j / pc.block] * pc.block + j % pc.block;
            slots[l.x] = slot;
            let ko = (slot * kvw + kvh * hd) / 2u;
            var dot = 0.0;
            for (var k = 0u; k < hd / 2u; k++) {
                let kv = unpack2x16float(kc[ko + k]);
                dot += qrow[2u * k] * kv.x + qrow[2u * k + 1u] * kv.y;
            }
            sc = dot * pc.scale;
        }
        let m_new = max(m, reduce(sc, l.x, true));
        let p = select(0.0, exp(sc - m_new), j <= pos);
        probs[l.x] = p;
        let ps = reduce(p, l.x, false);
        let corr = exp(m - m_new);
        s = s * corr + ps;
        let last = min(64u, pos + 1u - j0);
        for (var k = 0u; k < 4u; k++) {
            let pair = l.x + 64u * k;
            if (pair < hd / 2u) {
                var v0 = acc[2u * k] * corr;
                var v1 = acc[2u * k + 1u] * corr;
                for (var u = 0u; u < last; u++) {
                    let vv = unpack2x16float(vc[(slots[u] * kvw + kvh * hd) / 2u + pair]);
                    v0 += probs[u] * vv.x;
                    v1 += probs[u] * vv.y;
                }
                acc[2u * k] = v0;
                acc[2u * k + 1u] = v1;
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    for (var k = 0u; k < 4u; k++) {
        let pair = l.x + 64u * k;
        if (pair < hd / 2u) {
            out[qo + 2u * pair] = acc[2u * k] / s;
            out[qo + 2u * pair + 1u] = acc[2u * k + 1u] / s;
        }
    }
}
