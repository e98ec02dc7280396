// Shared by the kernels of ops.wgsl and kv.wgsl (build.rs puts it first):
// the workgroup reduction their 64-invocation workgroups use.

var<workgroup> red: array<f32, 64>;

// The sum (or the largest) of one value from each of the 64 invocations.
fn reduce(v: f32, i: u32, is_max: bool) -> f32 {
    red[i] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (i < s) {
            red[i] = select(red[i] + red[i + s], max(red[i], red[i + s]), is_max);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
