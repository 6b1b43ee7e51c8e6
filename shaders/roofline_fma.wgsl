// Roofline probe: f32 FMA throughput. Eight independent vec4 chains x = fma(x, a, b) per
// invocation hide the FMA latency; a and b come from a uniform so nothing folds at compile time.

override WG: u32 = 256;
override ITERS: u32 = 256;

struct Params {
    a: f32,  // multiplier, |a| < 1 so the chains converge
    b: f32,  // addend
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<vec4<f32>>;  // [invocations]
@group(0) @binding(1) var<uniform> params: Params;

@compute @workgroup_size(WG)
fn fma_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = linear_workgroup(wid, num) * WG + lid;
    if (id >= arrayLength(&out)) {
        return;
    }
    let a = vec4<f32>(params.a);
    let b = vec4<f32>(params.b);
    let seed = f32(id & 1023u) * 1e-3;
    var x0 = vec4<f32>(seed, seed + 0.1, seed + 0.2, seed + 0.3);
    var x1 = x0 + 1.0;
    var x2 = x0 + 2.0;
    var x3 = x0 + 3.0;
    var x4 = x0 + 4.0;
    var x5 = x0 + 5.0;
    var x6 = x0 + 6.0;
    var x7 = x0 + 7.0;
    for (var i = 0u; i < ITERS; i++) {
        x0 = fma(x0, a, b);
        x1 = fma(x1, a, b);
        x2 = fma(x2, a, b);
        x3 = fma(x3, a, b);
        x4 = fma(x4, a, b);
        x5 = fma(x5, a, b);
        x6 = fma(x6, a, b);
        x7 = fma(x7, a, b);
    }
    out[id] = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7));
}
