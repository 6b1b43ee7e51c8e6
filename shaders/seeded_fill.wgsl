// Seeded inputs made on the device (src/seeded.rs): element i of slab s (an expert, a cache page,
// a row) is level(s, i) / 256 * 2^-shift, with level a signed 9-bit integer from a 32-bit hash.
// Every value is exact in f32, f16 and bf16, so the CPU reproduces it bit for bit. int8 elements
// take the hash's top 8 bits instead: max(h >> 24 - 128, -127), four per word.

struct Params {
    key: u32,        // lowbias32(seed)
    first_slab: u32, // slab of element 0 of this buffer
    slab_len: u32,   // elements per slab
    elements: u32,   // elements in this buffer
    dtype: u32,      // DTYPE_F32 | DTYPE_F16 | DTYPE_BF16 | DTYPE_I8
    scale: f32,      // 2^-(8 + shift): exact
    pad0: u32,
    pad1: u32,
}

override WG: u32 = 256;

@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@group(0) @binding(1) var<uniform> p: Params;

// Chris Wellons' lowbias32: a bijection of u32 with low bias.
fn lowbias32(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn hash(e: u32) -> u32 {
    let slab = p.first_slab + e / p.slab_len;
    return lowbias32((e % p.slab_len) ^ lowbias32(slab ^ p.key));
}

fn value(e: u32) -> f32 {
    return f32(i32(hash(e) >> 23u) - 256) * p.scale;
}

fn int8(e: u32) -> i32 {
    return max(i32(hash(e) >> 24u) - 128, -127);
}

@compute @workgroup_size(WG)
fn seeded_fill(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let word = linear_workgroup(wid, num) * WG + lid;
    if (p.dtype == DTYPE_I8) {
        let e = 4u * word;
        if (e >= p.elements) {
            return;
        }
        // A partial last word leaves its high bytes 0.
        var v = vec4<i32>(0);
        for (var j = 0u; j < 4u; j++) {
            if (e + j < p.elements) {
                v[j] = int8(e + j);
            }
        }
        out[word] = pack4xI8(v);
        return;
    }
    if (p.dtype == DTYPE_F32) {
        if (word < p.elements) {
            out[word] = bitcast<u32>(value(word));
        }
        return;
    }
    let e = 2u * word;
    if (e >= p.elements) {
        return;
    }
    // An odd element count leaves the last word's high half 0.
    let high = select(0.0, value(e + 1u), e + 1u < p.elements);
    out[word] = pack_pair(vec2<f32>(value(e), high), p.dtype);
}
