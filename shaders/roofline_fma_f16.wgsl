// Roofline probe: f16 FMA throughput (needs SHADER_F16). Same chains as roofline_fma.wgsl in
// vec4<f16>; the sum is written as f32.
enable f16;

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
fn fma_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = linear_workgroup(wid, num) * WG + lid;
    if (id >= arrayLength(&out)) {
        return;
    }
    let a = vec4<f16>(f16(params.a));
    let b = vec4<f16>(f16(params.b));
    let seed = f16(f32(id & 1023u) * 1e-3);
    var x0 = vec4<f16>(seed, seed + 0.1h, seed + 0.2h, seed + 0.3h);
    var x1 = x0 + 1.0h;
    var x2 = x0 + 2.0h;
    var x3 = x0 + 3.0h;
    var x4 = x0 + 4.0h;
    var x5 = x0 + 5.0h;
    var x6 = x0 + 6.0h;
    var x7 = x0 + 7.0h;
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
    let s = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7));
    out[id] = vec4<f32>(s);
}
