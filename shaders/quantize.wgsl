// Dynamic per-token int8 quantization: for each row, scale = max|x| / 127 and
// q = round(x / scale) to nearest, ties to even, saturated at ±127.
//
// Entry points:
//   quantize_rows    q [rows, k] and scale [rows] from x [rows, k] (ops::quantize, and the MoE
//                    layer's re-quantization of the SwiGLU intermediate).
//   gather_quantize  the MoE gather fused with the quantization: dispatch row r quantizes
//                    hidden[sorted_slots[r] / K] into q[r] and scale[r], and takes the routing weight
//                    topk_weights[sorted_slots[r]] into row_weights[r]; sentinel rows get zeros. With
//                    TOKEN_ROWS, the row of each token's slot 0 also writes the token-order copy
//                    (token_q [t, k], token_scale [t]) that the shared expert reads.
//
// Exactness: the GPU result must equal the reference bit for bit on any device, but WGSL's f32
// division is only accurate to 2.5 ulp and implementations may flush subnormals. So everything is
// integer arithmetic on the bit patterns: the scale is amax / 127 rounded to nearest f32
// (subnormal results included), and q is the exact quotient x / scale rounded half to even.
// Special rows: max|x| = 0 (or a scale that underflows to 0) gives scale 0 and q = 0; a row
// holding NaN or ±inf gives scale NaN and q = 0, so that a dequantized product is NaN, not a
// silently wrong number.
//
// One workgroup per row (persistent over rows); rows hold whole 32-bit words of int8 (k % 4 == 0,
// checked on the host). The row is read twice, the second time from cache.

override WG: u32 = 64u;
override X_DTYPE: u32 = 2u;       // DTYPE_* of the float input
override K: u32 = 8u;             // gather_quantize: top-k (slots per token)
override TOKEN_ROWS: bool = false; // gather_quantize: also write token_q / token_scale

struct QuantParams {
    rows: u32,      // rows of q [rows, k] and scale [rows]
    k: u32,         // elements per row (a multiple of 4)
    row_words: u32, // 32-bit words per int8 row: k / 4
    tokens: u32,    // gather_quantize: t, rows of hidden [t, k] (quantize_rows: = rows)
}

@group(0) @binding(0) var<uniform> params: QuantParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;            // [tokens or rows, k], X_DTYPE
@group(0) @binding(2) var<storage, read_write> q: array<u32>;        // [rows, k] int8, 4 per word
@group(0) @binding(3) var<storage, read_write> scale: array<u32>;    // [rows] f32 bits
// Bound by both entry points (quantize_row names them), a 16-byte stand-in when unused.
@group(0) @binding(4) var<storage, read_write> token_q: array<u32>;  // [t, k] int8
@group(0) @binding(5) var<storage, read_write> token_scale: array<u32>; // [t] f32 bits
// gather_quantize only.
@group(0) @binding(6) var<storage, read> sorted_slots: array<i32>;   // [rows]
@group(0) @binding(7) var<storage, read> topk_weights: array<f32>;   // [t, K]
@group(0) @binding(8) var<storage, read_write> row_weights: array<f32>; // [rows]

var<workgroup> amax_bits: atomic<u32>;

// ---- exact integer arithmetic on f32 bit patterns ----------------------------------------------

// f32 bits of an f16 value, exactly (subnormal halves included).
fn f16_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0x1fu) {
        return sign | 0x7f800000u | (m << 13u);
    }
    if (e == 0u) {
        if (m == 0u) {
            return sign;
        }
        // m · 2^-24: shift the leading one to bit 10.
        let s = 10u - firstLeadingBit(m);
        return sign | ((113u - s) << 23u) | (((m << s) & 0x3ffu) << 13u);
    }
    return sign | ((e + 112u) << 23u) | (m << 13u);
}

// The f32 bits of element i of src.
fn src_bits(i: u32) -> u32 {
    if (X_DTYPE == DTYPE_F32) {
        return src[i];
    }
    let word = src[i >> 1u];
    let half = select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
    if (X_DTYPE == DTYPE_BF16) {
        return half << 16u;
    }
    return f16_to_f32_bits(half);
}

// |value| of finite f32 bits as (significand, exponent): value = sig · 2^exp, sig < 2^24.
fn f32_parts(bits: u32) -> vec2<i32> {
    let e = i32((bits >> 23u) & 0xffu);
    let m = bits & 0x7fffffu;
    if (e == 0) {
        return vec2<i32>(i32(m), -149);
    }
    return vec2<i32>(i32(m | 0x800000u), e - 150);
}

// sig · 2^shift / div rounded to nearest, ties to even. The caller guarantees that
// sig · 2^(shift + 1) < 2^32 when shift + 1 >= 0.
fn div_round(sig: u32, shift: i32, div: u32) -> u32 {
    // n = floor(2 · sig · 2^shift); sticky: bits shifted out.
    let s = shift + 1;
    var n = 0u;
    var sticky = false;
    if (s >= 0) {
        n = sig << u32(s);
    } else if (s > -32) {
        let r = u32(-s);
        n = sig >> r;
        sticky = (sig & ((1u << r) - 1u)) != 0u;
    } else {
        sticky = sig != 0u;
    }
    let d = n / div;
    let floor = d >> 1u;
    if ((d & 1u) == 0u) {
        return floor;  // fraction below one half
    }
    if (n % div == 0u && !sticky) {
        return floor + (floor & 1u);  // exactly one half: to even
    }
    return floor + 1u;
}

// The f32 bits of amax / 127 rounded to nearest (amax: bits of a finite value > 0). 0 when the
// quotient underflows.
fn scale_of(amax: u32) -> u32 {
    let parts = f32_parts(amax);
    // Normalise: the leading one at bit 23.
    let up = 23u - firstLeadingBit(u32(parts.x));
    let sig = u32(parts.x) << up;
    let e = parts.y - i32(up);
    // sig · 2^s / 127 lands in [2^23, 2^24] with s = 7, or s = 6 for the largest significands.
    var s = 7;
    if (sig * 128u >= (127u << 24u)) {
        s = 6;
    }
    var m = div_round(sig, s, 127u);
    var ex = e - s;
    if (m == (1u << 24u)) {
        m = 1u << 23u;
        ex += 1;
    }
    let biased = ex + 150;  // m · 2^ex with m in [2^23, 2^24): exponent ex + 23, bias 127
    if (biased >= 1) {
        return (u32(biased) << 23u) | (m & 0x7fffffu);
    }
    // Subnormal: round the exact quotient to a multiple of 2^-149 (sig · 2^(e + 150) < 2^31).
    return div_round(sig, e + 149, 127u);
}

// round(x / scale), ties to even, saturated at ±127 (x, scale: f32 bits; scale finite, > 0,
// |x| <= 127-ish · scale as x is at most the row's max).
fn quantize_value(bits: u32, scale_bits: u32) -> i32 {
    let a = bits & 0x7fffffffu;
    if (a == 0u) {
        return 0;
    }
    let xp = f32_parts(a);
    let sp = f32_parts(scale_bits);
    let shift = xp.y - sp.y;
    var mag = 127u;
    // Quotients of 128 and more need no division (and would not fit the 32-bit numerator).
    let fits = shift + 1 < 0 || (shift + 1 < 32 && u32(xp.x) <= (0xffffffffu >> u32(shift + 1)));
    if (fits) {
        mag = min(div_round(u32(xp.x), shift, u32(sp.x)), 127u);
    }
    return select(i32(mag), -i32(mag), (bits >> 31u) != 0u);
}

// ---- one row -----------------------------------------------------------------------------------

// Quantize source row `src_row` (elements from src_row · k) into int8 row `dst_row` of q and
// scale; with `token_row` >= 0 also into row token_row of token_q / token_scale. `src_row` < 0
// writes a zero row. Called by the whole workgroup (it holds barriers).
fn quantize_row(src_row: i32, dst_row: u32, token_row: i32, tid: u32) {
    let k = params.k;
    let words = params.row_words;
    workgroupBarrier();
    if (tid == 0u) {
        atomicStore(&amax_bits, 0u);
    }
    workgroupBarrier();
    let base = u32(max(src_row, 0)) * k;
    if (src_row >= 0) {
        var m = 0u;
        for (var i = tid; i < k; i += WG) {
            m = max(m, src_bits(base + i) & 0x7fffffffu);
        }
        atomicMax(&amax_bits, m);
    }
    workgroupBarrier();
    let amax = atomicLoad(&amax_bits);
    // Non-finite rows: NaN scale, zero q. Zero rows (and underflow): zero scale, zero q.
    var s = 0u;
    if (amax >= 0x7f800000u) {
        s = 0x7fc00000u;
    } else if (amax != 0u) {
        s = scale_of(amax);
    }
    let live = s != 0u && amax < 0x7f800000u;
    if (tid == 0u) {
        scale[dst_row] = s;
        if (token_row >= 0) {
            token_scale[u32(token_row)] = s;
        }
    }
    for (var j = tid; j < words; j += WG) {
        var v = vec4<i32>(0);
        if (live) {
            let e = base + 4u * j;
            v = vec4<i32>(
                quantize_value(src_bits(e), s),
                quantize_value(src_bits(e + 1u), s),
                quantize_value(src_bits(e + 2u), s),
                quantize_value(src_bits(e + 3u), s),
            );
        }
        let word = pack4xI8(v);
        q[dst_row * words + j] = word;
        if (token_row >= 0) {
            token_q[u32(token_row) * words + j] = word;
        }
    }
}

@compute @workgroup_size(WG)
fn quantize_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    for (var r = linear_workgroup(wid, num); r < params.rows; r += num.x * num.y) {
        quantize_row(i32(r), r, -1, tid);
    }
}

@compute @workgroup_size(WG)
fn gather_quantize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    for (var r = linear_workgroup(wid, num); r < params.rows; r += num.x * num.y) {
        // A sentinel (or any slot out of range) gives a zero row with weight 0.
        var slot = sorted_slots[r];
        if (slot < 0 || u32(slot) >= params.tokens * K) {
            slot = -1;
        }
        var token = -1;
        var token_row = -1;
        if (slot >= 0) {
            token = slot / i32(K);
            if (TOKEN_ROWS && u32(slot) % K == 0u) {
                token_row = token;
            }
        }
        quantize_row(token, r, token_row, tid);
        if (tid == 0u) {
            var weight = 0.0;
            if (slot >= 0) {
                weight = topk_weights[slot];
            }
            row_weights[r] = weight;
        }
    }
}
