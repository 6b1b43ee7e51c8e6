// Helpers shared by every kernel; the pipeline cache prepends this file (src/gpu/pipelines.rs).
//
// Tensors live in storage buffers as 32-bit words. 16-bit floats are packed two per word,
// element 2i in the low half; they are widened to f32 here, so reading f16 or bf16 data needs no
// shader feature. The codes match DType::shader_code in src/tensor.rs.

const DTYPE_F32: u32 = 0u;
const DTYPE_F16: u32 = 1u;
const DTYPE_BF16: u32 = 2u;
const DTYPE_I8: u32 = 6u;

// The two 16-bit elements of `word` as f32 (f16 or bf16 by `dtype`).
fn unpack_pair(word: u32, dtype: u32) -> vec2<f32> {
    if (dtype == DTYPE_BF16) {
        return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
    }
    return unpack2x16float(word);
}

// One 16-bit element (f16 or bf16 by `dtype`): the half of `word` selected by `high`.
fn unpack_half(word: u32, high: bool, dtype: u32) -> f32 {
    let pair = unpack_pair(word, dtype);
    return select(pair.x, pair.y, high);
}

// f32 -> bf16 bits (low 16 bits of the result), rounding to nearest even; NaN stays NaN.
fn bf16_bits(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (bits >> 16u) | 0x40u;
    }
    let rounding = 0x7fffu + ((bits >> 16u) & 1u);
    return (bits + rounding) >> 16u;
}

// Two f32 values packed into one word of the 16-bit `dtype` (x in the low half).
fn pack_pair(v: vec2<f32>, dtype: u32) -> u32 {
    if (dtype == DTYPE_BF16) {
        return bf16_bits(v.x) | (bf16_bits(v.y) << 16u);
    }
    return pack2x16float(v);
}

// Linear workgroup index of a 2-D dispatch made by gpu::grid().
fn linear_workgroup(wid: vec3<u32>, num: vec3<u32>) -> u32 {
    return wid.x + wid.y * num.x;
}
