// AMLA helpers shared by the AMLA kernels (src/ops/amla/mod.rs composes each amla_*.wgsl kernel
// as common.wgsl + this file + the kernel): the cache formats and the decoding of a cache row to
// f32, the checks that keep NaN and infinities out of the arithmetic, P's 16-bit rounding, and
// AMLA's exponent step and rescale of O. Every function is pure, so a second decode kernel (a
// cooperative-matrix one, say) can reuse them as they are.

// ---- constants ----

// Score of a masked key and the initial running max (finite on purpose: WGSL lets
// implementations assume there are no infinities or NaNs, so none is ever computed with).
const MASKED: f32 = -3.0e38;
// Score of a visible key that holds a NaN or infinity (or whose score is not finite): below
// MASKED, so it never becomes the max and gets p = 0; its row's output becomes NaN.
const POISONED: f32 = -3.2e38;
const NEG_INF_BITS: u32 = 0xff800000u;
const NAN_BITS: u32 = 0x7fc00000u;  // f32 quiet NaN
const EXPONENT_BITS: u32 = 0x7f800000u;
const MIN_NORMAL_BITS: u32 = 0x00800000u;  // 2^-126: magnitudes below have exponent field 0
const GUARD_BITS: u32 = 0x501502f9u; // bits of 1e10
const TWO_POW_23: f32 = 8388608.0;
const MIN_EXPONENT_STEP: f32 = -30.0;

// Cache formats (KV_FORMAT of the decode kernel): a float cache uses its DTYPE_* code (576
// values per token); a packed cache is FlashMLA's 656-byte row: 512 8-bit codes, four f32 scales
// (scale i for values 128 i ..), 64 bf16 rope values.
const KV_FP8: u32 = 8u;   // codes are FP8 E4M3 (e4m3fn: bias 7, S.1111.111 is NaN, no infinity)
const KV_INT8: u32 = 9u;  // codes are int8
const PACKED_WORDS: u32 = 164u;     // 656 bytes
const PACKED_SCALES_AT: u32 = 128u; // word of scale 0
const PACKED_ROPE_AT: u32 = 132u;   // word of the first rope pair (values 512, 513)

// P's rounding before P·V (P_ROUND of the decode kernel).
const P_ROUND_NONE: u32 = 0u;
const P_ROUND_F16: u32 = 1u;
const P_ROUND_BF16: u32 = 2u;

// ---- non-finite checks (on bits: no float compare can be relied on to see NaN) ----

fn is_nonfinite_f32(bits: u32) -> bool {
    return (bits & EXPONENT_BITS) == EXPONENT_BITS;
}

// The bits to clear in four words of a float cache so that no NaN or infinity remains: whole
// f32 words, or the 16-bit halves of f16/bf16 pairs.
fn nonfinite_mask(words: vec4<u32>, dtype: u32) -> vec4<u32> {
    if (dtype == DTYPE_F32) {
        let bad = (words & vec4<u32>(EXPONENT_BITS)) == vec4<u32>(EXPONENT_BITS);
        return select(vec4<u32>(0u), vec4<u32>(0xffffffffu), bad);
    }
    let e = select(0x7c00u, 0x7f80u, dtype == DTYPE_BF16); // exponent field of the half
    let lo = (words & vec4<u32>(e)) == vec4<u32>(e);
    let hi = ((words >> vec4<u32>(16u)) & vec4<u32>(e)) == vec4<u32>(e);
    return select(vec4<u32>(0u), vec4<u32>(0x0000ffffu), lo)
        | select(vec4<u32>(0u), vec4<u32>(0xffff0000u), hi);
}

// The bytes of `word` that are E4M3 NaN codes (x.1111.111), as a byte mask.
fn fp8_nan_mask(word: u32) -> u32 {
    // Per byte: (b & 0x7f) + 1 carries into bit 7 only for 0x7f; no carry crosses a byte.
    let high = ((word & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;
    return (high >> 7u) * 0xffu;
}

// ---- cache-row decoding ----

// Four E4M3 codes (byte j of `word` is value j) as f32, exactly; NaN codes must be cleared
// first (they decode as 480).
fn e4m3x4(word: u32) -> vec4<f32> {
    let b = (vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
    let e = (b >> vec4<u32>(3u)) & vec4<u32>(0xfu);
    let m = vec4<f32>(b & vec4<u32>(7u));
    let normal = ldexp(m + 8.0, vec4<i32>(e) - vec4<i32>(10));
    let subnormal = m * 0.001953125; // m / 8 * 2^-6
    let magnitude = select(subnormal, normal, e != vec4<u32>(0u));
    return select(magnitude, -magnitude, (b & vec4<u32>(0x80u)) != vec4<u32>(0u));
}

// Four int8 codes (byte j of `word` is value j) as f32.
fn int8x4(word: u32) -> vec4<f32> {
    let shifted = bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u));
    return vec4<f32>(shifted >> vec4<u32>(24u));
}

// Values 4 quad .. 4 quad + 3 (quad < 128) of a packed row: the codes in `word` times `scale`.
fn packed_values(word: u32, scale: f32, format: u32) -> vec4<f32> {
    if (format == KV_FP8) {
        return e4m3x4(word) * scale;
    }
    return int8x4(word) * scale;
}

// Dims 4 quad .. 4 quad + 3 of a packed cache row, decoded to f32 from its words: `w.x` holds
// the four codes (quad < 128, with the group's scale in `scale_bits`) or `w` the two words of
// the bf16 rope pair (quad >= 128); and whether a NaN code, a non-finite scale, rope value or
// product was cleared to 0 on the way. Pure, so that each decode kernel fetches the words its way.
struct Decoded {
    v: vec4<f32>,
    bad: bool,
}

fn decode_packed(quad: u32, w: vec2<u32>, scale_bits: u32, format: u32) -> Decoded {
    var v: vec4<f32>;
    var bad = false;
    if (quad < 128u) {
        var word = w.x;
        if (format == KV_FP8) {
            let nan = fp8_nan_mask(word);
            bad = nan != 0u;
            word &= ~nan;
        }
        let scale_bad = is_nonfinite_f32(scale_bits);
        bad = bad || scale_bad;
        v = packed_values(word, select(bitcast<f32>(scale_bits), 0.0, scale_bad), format);
    } else {
        let pair = vec4<u32>(w, 0u, 0u);
        let clean = pair & ~nonfinite_mask(pair, DTYPE_BF16);
        bad = any(clean != pair);
        v = vec4<f32>(unpack_pair(clean.x, DTYPE_BF16), unpack_pair(clean.y, DTYPE_BF16));
    }
    // A finite code times a large finite scale can still overflow.
    let overflow = is_nonfinite_f32(bitcast<u32>(v.x)) || is_nonfinite_f32(bitcast<u32>(v.y))
        || is_nonfinite_f32(bitcast<u32>(v.z)) || is_nonfinite_f32(bitcast<u32>(v.w));
    if (overflow) {
        v = vec4<f32>(0.0);
    }
    return Decoded(v, bad || overflow);
}

// ---- P ----

// A non-negative finite f32 rounded to the nearest f16 (ties to even), kept in f32.
fn round_f16(x: f32) -> f32 {
    if (x >= 6.103515625e-05) { // 2^-14: normal f16
        let bits = bitcast<u32>(x);
        return bitcast<f32>((bits + 0xfffu + ((bits >> 13u) & 1u)) & 0xffffe000u);
    }
    return round(x * 16777216.0) * 5.9604644775390625e-08; // f16 subnormals: multiples of 2^-24
}

// A non-negative finite f32 rounded to the nearest bf16 (ties to even), kept in f32.
fn round_bf16(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    return bitcast<f32>((bits + 0x7fffu + ((bits >> 16u) & 1u)) & 0xffff0000u);
}

// P (and AMLA's c_hat) as the P·V product sees it.
fn round_p(x: f32, mode: u32) -> f32 {
    if (mode == P_ROUND_F16) {
        return round_f16(x);
    }
    if (mode == P_ROUND_BF16) {
        return round_bf16(x);
    }
    return x;
}

// ---- AMLA rescale ----

// The integer to add to O's f32 bits when the running max moves from 2^-n_old to 2^-n_new with
// compensation factors cof_old, cof_new: round(N · 2^23), N = max(dn, -30) + 1.5 (cof_old /
// cof_new - 1) + 1e-6 (the CANN constants; the 1.5 term compensates the 16-bit rounding of c to
// first order at mid-mantissa, the clamp keeps big jumps from wrapping normal entries).
fn amla_exponent_step(n_old: f32, n_new: f32, cof_old: f32, cof_new: f32) -> u32 {
    let dn = max(n_new - n_old, MIN_EXPONENT_STEP);
    let frac = 1.5 * (cof_old / cof_new - 1.0) + 1e-6;
    return bitcast<u32>((i32(dn) << 23u) + i32(round(frac * TWO_POW_23)));
}

// AMLA's split of a row's 2^-m: 2^n with n = -round(m) (exact in the f32 exponent) times
// c = 2^(m + n), rounded to c_hat as P is; cof = c / c_hat goes into the exponent step.
struct AmlaSplit {
    n: f32,
    cof: f32,
    c_hat: f32,
}

// What moving a row's max from m_old to m_new costs (nothing unless `changed`; from MASKED, the
// first max, nothing is rescaled): `decay` multiplies l (and O in the multiply variant), `step`
// is what O gets, the f32 bits of decay (multiply) or AMLA's exponent step (`amla`, whose split
// moves to m_new). Both decode kernels call it, the SIMT one with its running max, the
// cooperative-matrix one with its lazy reference max.
struct MaxStep {
    decay: f32,
    step: u32,
}

fn move_max(
    m_old: f32,
    m_new: f32,
    changed: bool,
    amla: bool,
    p_round: u32,
    split: ptr<function, AmlaSplit>,
) -> MaxStep {
    let first = m_old == MASKED;
    var decay = 1.0;
    if (changed) {
        decay = select(exp2(m_old - m_new), 0.0, first);
    }
    var step = bitcast<u32>(decay);
    if (amla) {
        step = 0u;
        if (changed) {
            let n_new = -round(m_new);
            let c = exp2(m_new + n_new);
            let c_hat = round_p(c, p_round);
            let cof = c / c_hat;
            if (!first) {
                step = amla_exponent_step((*split).n, n_new, (*split).cof, cof);
            }
            *split = AmlaSplit(n_new, cof, c_hat);
        }
    }
    return MaxStep(decay, step);
}

// O multiplied by 2^N as an integer add of `step` on its bits. Entries whose exponent field is 0
// (exact ±0 and denormals) keep their value: the add would wrap them (0x000AE3A0 + the bits of
// a -1 step is a NaN pattern), and leaving them unscaled is at most a denormal's error.
fn amla_rescale(o: vec4<f32>, step: u32) -> vec4<f32> {
    let bits = bitcast<vec4<u32>>(o);
    let tiny = (bits & vec4<u32>(0x7fffffffu)) < vec4<u32>(MIN_NORMAL_BITS);
    return bitcast<vec4<f32>>(bits + select(vec4<u32>(step), vec4<u32>(0u), tiny));
}

// CANN's guard before the final division: entries with |O| > 1e10 (compared as bits, so that
// no infinity or NaN is compared with) are zeroed. What exceeds it is a wrapped entry: a normal
// entry below 2^-96 that a step pushed under 2^-126 (its true value is below that, so 0 is
// right); NaN and infinities never reach O (they are caught when the tile is loaded), so NaN
// and infinity patterns here are wrapped entries too.
fn amla_guard(o: vec4<f32>) -> vec4<f32> {
    let magnitude = bitcast<vec4<u32>>(o) & vec4<u32>(0x7fffffffu);
    return select(o, vec4<f32>(0.0), magnitude > vec4<u32>(GUARD_BITS));
}

// Two NaNs packed as `dtype` (f32 out is written word by word with NAN_BITS).
fn nan_pair(dtype: u32) -> u32 {
    return select(0x7e007e00u, 0x7fc07fc0u, dtype == DTYPE_BF16);
}
