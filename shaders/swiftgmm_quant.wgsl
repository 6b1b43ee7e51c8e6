// SwiftGMM with int8 expert weights and a per-output-channel f32 scale w_scale [e, n]:
//
//   W8A16  x f32 | f16 | bf16; the weights become q + offset (f32) in registers (GEMV) or while
//          staging (GEMM), f32 accumulation, and the scale multiplies the sum in the epilogue
//          (it is constant per output column): y = w_scale[col] · Σ_k x[k] · (q[k, col] + offset[col]).
//   W8A8   x int8 with a per-row scale x_scale [m_total]; exact i32 accumulation of the int8
//          products with dot4I8Packed on packed words; dequantized in the epilogue:
//          y = f32(acc) · x_scale[row] · w_scale[col].
//
// Then the epilogue of swiftgmm_matmul.wgsl: SwiGLU on the dequantized gate and up columns, the
// per-row scale, the output dtype. The schedule (swiftgmm_schedule.wgsl), the persistent tile walk
// and the tile shapes are those of the 16-bit kernels.
//
// Entry points: gemv_nk_w8a16, gemv_kn_w8a16, gemm_w8a16, gemv_nk_w8a8, gemv_kn_w8a8, gemm_w8a8.
//
// int8 is packed four per u32 word (element 4i in the low byte). Rows of int8 hold whole words:
// the contiguous weight dimension (k for [e, n, k], n for [e, k, n]; with [e, k, n] SwiGLU also
// n_out) and k of int8 x are multiples of 4 (checked on the host). [e, n, k] weights are read as
// 16-byte vectors of 16 k values, [e, k, n] weights as words of 4 columns per k row.

struct GmmParams {
    m_total: u32,    // rows of x [m_total, k] and y [m_total, n_out]
    k: u32,          // reduction length
    n: u32,          // weight columns: w [e, k, n] or [e, n, k]
    n_out: u32,      // output columns: n, or n / 2 with SwiGLU
    experts: u32,    // e: sched holds offsets [e + 1] and a tile prefix [e + 1] per path
    expert_lo: u32,  // first expert of the bound weight shard
    expert_hi: u32,  // one past the last expert of the shard
    n_tiles: u32,    // column tiles per row block of this path
    row_start: u32,  // unused here (the per-expert baseline of swiftgmm_matmul.wgsl)
    row_end: u32,    // unused here
    group: u32,      // unused here
    _pad: u32,       // keeps the size a multiple of 16 bytes
}

override X_DTYPE: u32 = 2u;       // W8A16: DTYPE_* of x
override OUT_DTYPE: u32 = 0u;     // DTYPE_* of y
override X_ALIGNED: bool = true;  // W8A16: k % 4 == 0 (x quads); W8A8: k % 16 == 0 (x vectors)
override W_ALIGNED: bool = true;  // [e, n, k]: k % 16 == 0, weight vectors on 16-byte boundaries
override W_KN: bool = false;      // weights are [e, k, n] (else [e, n, k])
override SWIGLU: bool = false;    // y = silu(gate) * up, gate = columns [0, n_out), up = [n_out, n)
override HAS_SCALE: bool = false; // y[row] *= row_scale[row]
override HAS_OFFSET: bool = false; // W8A16: weights are q + w_offset[col]

@group(0) @binding(0) var<uniform> p: GmmParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;        // [m_total, k]
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;        // int8 [e_shard, k, n] or [e_shard, n, k]
@group(0) @binding(3) var<storage, read> sched: array<u32>;
@group(0) @binding(4) var<storage, read> row_scale: array<f32>;      // [m_total]
@group(0) @binding(5) var<storage, read_write> y: array<u32>;        // [m_total, n_out]
@group(0) @binding(6) var<storage, read> w_scale: array<f32>;        // [e, n] (all experts)
@group(0) @binding(7) var<storage, read> w_offset: array<f32>;       // [e, n], W8A16 (or unused)
@group(0) @binding(8) var<storage, read> x_scale: array<f32>;        // [m_total], W8A8 (or unused)

// ---- loads -------------------------------------------------------------------------------------

// Element i of a float x (W8A16).
fn x_at(i: u32) -> f32 {
    if (X_DTYPE == DTYPE_F32) {
        return bitcast<f32>(x[i >> 2u][i & 3u]);
    }
    return unpack_half(x[i >> 3u][(i >> 1u) & 3u], (i & 1u) == 1u, X_DTYPE);
}

// Float x elements i .. i + 3 (i % 4 == 0) as f32; elements from `end` on are 0.
fn x_quad(i: u32, end: u32) -> vec4<f32> {
    if (X_ALIGNED) {
        if (i >= end) {
            return vec4<f32>(0.0);
        }
        if (X_DTYPE == DTYPE_F32) {
            return bitcast<vec4<f32>>(x[i >> 2u]);
        }
        let v = x[i >> 3u];
        let words = select(v.xy, v.zw, (i & 4u) != 0u);
        return vec4<f32>(unpack_pair(words.x, X_DTYPE), unpack_pair(words.y, X_DTYPE));
    }
    var q = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (i + j < end) {
            q[j] = x_at(i + j);
        }
    }
    return q;
}

// 32-bit word i of an int8 buffer.
fn x_word(i: u32) -> u32 {
    return x[i >> 2u][i & 3u];
}

fn w_word(i: u32) -> u32 {
    return w[i >> 2u][i & 3u];
}

// 16 int8 x values (W8A8) from element i (i % 4 == 0), words from `avail` elements on zero.
fn x_vec(i: u32, avail: u32) -> vec4<u32> {
    if (X_ALIGNED && avail >= 16u) {
        return x[i >> 4u];
    }
    var v = vec4<u32>(0u);
    for (var j = 0u; j < 4u; j++) {
        if (4u * j < avail) {
            v[j] = x_word((i >> 2u) + j);
        }
    }
    return v;
}

// 16 int8 weights from element i (i % 4 == 0), words from `avail` elements on zero.
fn w_vec(i: u32, avail: u32) -> vec4<u32> {
    if (W_ALIGNED && avail >= 16u) {
        return w[i >> 4u];
    }
    var v = vec4<u32>(0u);
    for (var j = 0u; j < 4u; j++) {
        if (4u * j < avail) {
            v[j] = w_word((i >> 2u) + j);
        }
    }
    return v;
}

// The four int8 values of a word as f32, plus the offset (W8A16's dequantization before the scale).
fn dequant4(word: u32, offset: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(unpack4xI8(word)) + offset;
}

// The offset of weight column `col` of group g (0 without offsets or past n).
fn offset_at(g: u32, col: u32) -> f32 {
    if (HAS_OFFSET && col < p.n) {
        return w_offset[g * p.n + col];
    }
    return 0.0;
}

// Offsets of the four weight columns col .. col + 3.
fn offset4(g: u32, col: u32) -> vec4<f32> {
    return vec4<f32>(offset_at(g, col), offset_at(g, col + 1u), offset_at(g, col + 2u), offset_at(g, col + 3u));
}

// Transpose a 4 x 4 block of bytes: words[r] holds row r (k) of four columns; the result's word c
// holds column c of the four rows, the operand layout of dot4I8Packed.
fn transpose4(v: vec4<u32>) -> vec4<u32> {
    var t = vec4<u32>(0u);
    for (var c = 0u; c < 4u; c++) {
        let s = 8u * c;
        t[c] = ((v.x >> s) & 0xffu) | (((v.y >> s) & 0xffu) << 8u)
            | (((v.z >> s) & 0xffu) << 16u) | (((v.w >> s) & 0xffu) << 24u);
    }
    return t;
}

// The four dot products of x word xw with four column words.
fn dot4x4(xw: u32, cols: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(
        dot4I8Packed(xw, cols.x),
        dot4I8Packed(xw, cols.y),
        dot4I8Packed(xw, cols.z),
        dot4I8Packed(xw, cols.w),
    );
}

// ---- dequantization and epilogue -----------------------------------------------------------------

fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

// The scale of weight column col of group g (0 past n: such columns are never stored).
fn w_scale_at(g: u32, col: u32) -> f32 {
    if (col < p.n) {
        return w_scale[g * p.n + col];
    }
    return 0.0;
}

// W8A16: the f32 sum of weight column col, dequantized.
fn dequant_a16(g: u32, col: u32, sum: f32) -> f32 {
    return sum * w_scale_at(g, col);
}

// W8A8: the exact i32 sum of weight column col for `row`, dequantized.
fn dequant_a8(g: u32, row: u32, col: u32, acc: i32) -> f32 {
    return f32(acc) * x_scale[row] * w_scale_at(g, col);
}

// Output columns col, col + 1 of `row` (col even); the second only when `both`. 16-bit outputs
// have an even n_out (checked on the host), so a pair is one word owned by one invocation.
fn store_pair(row: u32, col: u32, v: vec2<f32>, both: bool) {
    var o = v;
    if (HAS_SCALE) {
        o *= row_scale[row];
    }
    let i = row * p.n_out + col;
    if (OUT_DTYPE == DTYPE_F32) {
        y[i] = bitcast<u32>(o.x);
        if (both) {
            y[i + 1u] = bitcast<u32>(o.y);
        }
    } else {
        y[i >> 1u] = pack_pair(o, OUT_DTYPE);
    }
}

// ---- schedule lookup ---------------------------------------------------------------------------

// The group g of this shard with prefix[g] <= t < prefix[g + 1] (prefix = sched[base ..]).
fn find_group(t: u32, base: u32) -> u32 {
    var lo = p.expert_lo;
    var hi = p.expert_hi;
    loop {
        if (hi - lo <= 1u) {
            break;
        }
        let mid = (lo + hi) / 2u;
        if (sched[base + mid] <= t) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// ---- GEMV path ---------------------------------------------------------------------------------

override GEMV_WG: u32 = 256u;     // invocations per workgroup
override GEMV_ROWS: u32 = 8u;     // rows per row block (<= 16)
override GEMV_SPLIT_K: u32 = 16u; // nk: lanes along k per column pair; kn: k slices
override GEMV_UNROLL: u32 = 2u;   // nk: 16-byte vectors per column; kn: groups of 4 k rows (<= 4)
override GEMV_XC: u32 = 512u;     // k per staged chunk of x: nk SPLIT_K·16·UNROLL, kn SPLIT_K·4·UNROLL
override GEMV_NBW: u32 = 32u;     // weight columns per tile
override GEMV_RED: u32 = 512u;    // words of split-k scratch

var<workgroup> xs: array<vec4<f32>, GEMV_ROWS * GEMV_XC / 4u>; // W8A16: [GEMV_ROWS][GEMV_XC] of x
var<workgroup> xq: array<u32, GEMV_ROWS * GEMV_XC / 4u>;       // W8A8: the same chunk as int8 words
var<workgroup> red: array<f32, GEMV_RED>;                      // W8A16: one row's split-k partials
var<workgroup> red_i: array<i32, GEMV_RED>;                    // W8A8: the same, exact
var<workgroup> res: array<f32, GEMV_ROWS * GEMV_NBW>;          // [rows][weight columns], dequantized

// W8A16: stage x[row0 .. row0 + rows][k0 .. k0 + GEMV_XC] as f32 (zero past the end of the row).
fn stage_x(row0: u32, rows: u32, k0: u32, tid: u32) {
    let quads = GEMV_XC / 4u;
    for (var q = tid; q < rows * quads; q += GEMV_WG) {
        let row_base = (row0 + q / quads) * p.k;
        xs[q] = x_quad(row_base + k0 + (q % quads) * 4u, row_base + p.k);
    }
}

// W8A8: stage the same chunk as int8 words (zero past the end of the row).
fn stage_xq(row0: u32, rows: u32, k0: u32, tid: u32) {
    let words = GEMV_XC / 4u;
    for (var q = tid; q < rows * words; q += GEMV_WG) {
        let kk = k0 + (q % words) * 4u;
        var v = 0u;
        if (kk < p.k) {
            v = x_word(((row0 + q / words) * p.k + kk) >> 2u);
        }
        xq[q] = v;
    }
}

fn gemv_out_cols() -> u32 {
    return select(GEMV_NBW, GEMV_NBW / 2u, SWIGLU);
}

// The weight column of res slot s (res holds the tile's columns in order; with SwiGLU the gate
// columns first, the matching up columns in the second half).
fn gemv_weight_col(nt: u32, s: u32) -> u32 {
    if (SWIGLU) {
        let half = GEMV_NBW / 2u;
        let o = nt * half + select(s, s - half, s >= half);
        if (o >= p.n_out) {
            return p.n;
        }
        return select(o, p.n_out + o, s >= half);
    }
    return min(nt * GEMV_NBW + s, p.n);
}

fn gemv_value(r: u32, oc: u32) -> f32 {
    if (SWIGLU) {
        return silu(res[r * GEMV_NBW + oc]) * res[r * GEMV_NBW + GEMV_NBW / 2u + oc];
    }
    return res[r * GEMV_NBW + oc];
}

fn gemv_epilogue(row0: u32, rows: u32, nt: u32, tid: u32) {
    let out_cols = gemv_out_cols();
    let pairs = out_cols / 2u;
    for (var i = tid; i < rows * pairs; i += GEMV_WG) {
        let r = i / pairs;
        let oc = 2u * (i % pairs);
        let col = nt * out_cols + oc;
        if (col < p.n_out) {
            let v = vec2<f32>(gemv_value(r, oc), gemv_value(r, oc + 1u));
            store_pair(row0 + r, col, v, col + 1u < p.n_out);
        }
    }
}

// Reduce one row's split-k partials (red or red_i, laid out [slot][lane]) into res, dequantized.
fn reduce_row_a16(g: u32, r: u32, nt: u32, tid: u32) {
    for (var s = tid; s < GEMV_NBW; s += GEMV_WG) {
        var sum = 0.0;
        for (var l = 0u; l < GEMV_SPLIT_K; l++) {
            sum += red[s * GEMV_SPLIT_K + l];
        }
        let dst = nk_res_slot(s);
        res[r * GEMV_NBW + dst] = dequant_a16(g, gemv_weight_col(nt, dst), sum);
    }
}

fn reduce_row_a8(g: u32, row: u32, r: u32, nt: u32, tid: u32) {
    for (var s = tid; s < GEMV_NBW; s += GEMV_WG) {
        var sum = 0;
        for (var l = 0u; l < GEMV_SPLIT_K; l++) {
            sum += red_i[s * GEMV_SPLIT_K + l];
        }
        let dst = nk_res_slot(s);
        res[r * GEMV_NBW + dst] = dequant_a8(g, row, gemv_weight_col(nt, dst), sum);
    }
}

// The res slot of split-k partial slot s. [e, n, k]: s = 2 cg + c is column c of column group
// cg; with SwiGLU c = 0 is the gate of output cg and c = 1 its up, which res keeps in its two
// halves. [e, k, n] partials are already in res order (see gemv_kn_*).
fn nk_res_slot(s: u32) -> u32 {
    if (SWIGLU && !W_KN) {
        return select(s / 2u, GEMV_NBW / 2u + s / 2u, (s & 1u) == 1u);
    }
    return s;
}

// [e, n, k]: the two weight columns of column group cg (adjacent, or with SwiGLU the gate and up
// column of one output) and whether each is in range.
struct NkCols {
    col0: u32,
    col1: u32,
    live0: bool,
    live1: bool,
}

fn nk_cols(nt: u32, cg: u32) -> NkCols {
    if (SWIGLU) {
        let o = nt * (GEMV_NBW / 2u) + cg;
        return NkCols(o, p.n_out + o, o < p.n_out, o < p.n_out);
    }
    let c0 = nt * GEMV_NBW + 2u * cg;
    return NkCols(c0, c0 + 1u, c0 < p.n, c0 + 1u < p.n);
}

// The weight vectors of one chunk: GEMV_UNROLL per column, zero past k or for a column out of
// range (bases: the columns' first elements).
fn gemv_nk_load(base0: u32, base1: u32, c: NkCols, k0: u32, lane: u32) -> array<vec4<u32>, 8> {
    var wv: array<vec4<u32>, 8>;
    for (var u = 0u; u < GEMV_UNROLL; u++) {
        let kk = k0 + (u * GEMV_SPLIT_K + lane) * 16u;
        if (kk < p.k) {
            if (c.live0) {
                wv[2u * u] = w_vec(base0 + kk, p.k - kk);
            }
            if (c.live1) {
                wv[2u * u + 1u] = w_vec(base1 + kk, p.k - kk);
            }
        }
    }
    return wv;
}

// W8A16, weights [e, n, k]: invocation (column group cg, lane) owns two weight columns and the
// 16-value k vectors lane, lane + GEMV_SPLIT_K, ...: the lanes of a column read consecutive
// 16-byte vectors of its k row.
fn gemv_nk_w8a16_tile(g: u32, row0: u32, rows: u32, nt: u32, tid: u32) {
    let lane = tid % GEMV_SPLIT_K;
    let cg = tid / GEMV_SPLIT_K;
    let c = nk_cols(nt, cg);
    let shard_g = g - p.expert_lo;
    let base0 = (shard_g * p.n + c.col0) * p.k;
    let base1 = (shard_g * p.n + c.col1) * p.k;
    let o0 = vec4<f32>(offset_at(g, c.col0));
    let o1 = vec4<f32>(offset_at(g, c.col1));
    var acc: array<f32, 32>;  // [row][column]
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        acc[i] = 0.0;
    }
    var wv = gemv_nk_load(base0, base1, c, 0u, lane);
    for (var k0 = 0u; k0 < p.k; k0 += GEMV_XC) {
        workgroupBarrier();
        stage_x(row0, rows, k0, tid);
        workgroupBarrier();
        // The next chunk's weights are requested before this chunk's arithmetic.
        let next = gemv_nk_load(base0, base1, c, k0 + GEMV_XC, lane);
        for (var u = 0u; u < GEMV_UNROLL; u++) {
            let kl = (u * GEMV_SPLIT_K + lane) * 16u;
            var d0: array<vec4<f32>, 4>;
            var d1: array<vec4<f32>, 4>;
            for (var j = 0u; j < 4u; j++) {
                d0[j] = dequant4(wv[2u * u][j], o0);
                d1[j] = dequant4(wv[2u * u + 1u][j], o1);
            }
            for (var r = 0u; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    let xi = (r * GEMV_XC + kl) / 4u;
                    var s0 = 0.0;
                    var s1 = 0.0;
                    for (var j = 0u; j < 4u; j++) {
                        s0 += dot(xs[xi + j], d0[j]);
                        s1 += dot(xs[xi + j], d1[j]);
                    }
                    acc[2u * r] += s0;
                    acc[2u * r + 1u] += s1;
                }
            }
        }
        wv = next;
    }
    // Split-k reduction one row at a time; the loop holds barriers and may stay rolled, so it
    // indexes a copy (acc itself is only indexed by barrier-free constant loops).
    var part: array<f32, 32>;
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        part[i] = acc[i];
    }
    for (var r = 0u; r < GEMV_ROWS; r++) {
        if (r < rows) {
            workgroupBarrier();
            red[(2u * cg) * GEMV_SPLIT_K + lane] = part[2u * r];
            red[(2u * cg + 1u) * GEMV_SPLIT_K + lane] = part[2u * r + 1u];
            workgroupBarrier();
            reduce_row_a16(g, r, nt, tid);
        }
    }
    workgroupBarrier();
    gemv_epilogue(row0, rows, nt, tid);
}

// W8A8, weights [e, n, k]: as gemv_nk_w8a16_tile, with int8 x words and dot4I8Packed.
fn gemv_nk_w8a8_tile(g: u32, row0: u32, rows: u32, nt: u32, tid: u32) {
    _ = arrayLength(&w_offset);
    let lane = tid % GEMV_SPLIT_K;
    let cg = tid / GEMV_SPLIT_K;
    let c = nk_cols(nt, cg);
    let shard_g = g - p.expert_lo;
    let base0 = (shard_g * p.n + c.col0) * p.k;
    let base1 = (shard_g * p.n + c.col1) * p.k;
    var acc: array<i32, 32>;  // [row][column]
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        acc[i] = 0;
    }
    var wv = gemv_nk_load(base0, base1, c, 0u, lane);
    for (var k0 = 0u; k0 < p.k; k0 += GEMV_XC) {
        workgroupBarrier();
        stage_xq(row0, rows, k0, tid);
        workgroupBarrier();
        let next = gemv_nk_load(base0, base1, c, k0 + GEMV_XC, lane);
        for (var u = 0u; u < GEMV_UNROLL; u++) {
            let kw = (u * GEMV_SPLIT_K + lane) * 4u;
            let w0 = wv[2u * u];
            let w1 = wv[2u * u + 1u];
            for (var r = 0u; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    let xi = r * (GEMV_XC / 4u) + kw;
                    var s0 = 0;
                    var s1 = 0;
                    for (var j = 0u; j < 4u; j++) {
                        s0 += dot4I8Packed(xq[xi + j], w0[j]);
                        s1 += dot4I8Packed(xq[xi + j], w1[j]);
                    }
                    acc[2u * r] += s0;
                    acc[2u * r + 1u] += s1;
                }
            }
        }
        wv = next;
    }
    var part: array<i32, 32>;
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        part[i] = acc[i];
    }
    for (var r = 0u; r < GEMV_ROWS; r++) {
        if (r < rows) {
            workgroupBarrier();
            red_i[(2u * cg) * GEMV_SPLIT_K + lane] = part[2u * r];
            red_i[(2u * cg + 1u) * GEMV_SPLIT_K + lane] = part[2u * r + 1u];
            workgroupBarrier();
            reduce_row_a8(g, row0 + r, r, nt, tid);
        }
    }
    workgroupBarrier();
    gemv_epilogue(row0, rows, nt, tid);
}

// [e, k, n]: the first weight column of column thread ct (4 columns, one word per k row; with
// SwiGLU the first half of the threads hold gate columns, the second half the matching up
// columns) and whether they are in range (n and n_out are multiples of 4: all four or none).
fn kn_col(nt: u32, ct: u32) -> vec2<u32> {
    let threads = GEMV_WG / GEMV_SPLIT_K;
    if (SWIGLU) {
        let half = threads / 2u;
        let o = nt * (GEMV_NBW / 2u) + (ct % half) * 4u;
        return vec2<u32>(select(o, p.n_out + o, ct >= half), u32(o < p.n_out));
    }
    let col = nt * GEMV_NBW + ct * 4u;
    return vec2<u32>(col, u32(col < p.n));
}

// One chunk of [e, k, n] weights: GEMV_UNROLL groups of 4 k rows, one word (4 columns) per row,
// zero past k or out of range. base: the word of k row 0.
fn gemv_kn_load(base: u32, live: bool, k0: u32, ks: u32) -> array<vec4<u32>, 4> {
    var wv: array<vec4<u32>, 4>;
    let row_words = p.n / 4u;
    for (var u = 0u; u < GEMV_UNROLL; u++) {
        let kg = k0 + (u * GEMV_SPLIT_K + ks) * 4u;
        for (var r = 0u; r < 4u; r++) {
            if (live && kg + r < p.k) {
                wv[u][r] = w_word(base + (kg + r) * row_words);
            }
        }
    }
    return wv;
}

// W8A16, weights [e, k, n]: invocation (column thread ct, k slice ks) owns 4 adjacent weight
// columns and the groups of 4 k rows ks, ks + GEMV_SPLIT_K, ...: the column threads of one k row
// read consecutive words.
fn gemv_kn_w8a16_tile(g: u32, row0: u32, rows: u32, nt: u32, tid: u32) {
    let threads = GEMV_WG / GEMV_SPLIT_K;
    let ct = tid % threads;
    let ks = tid / threads;
    let cw = kn_col(nt, ct);
    let live = cw.y == 1u;
    let base = ((g - p.expert_lo) * p.k * p.n + cw.x) / 4u;
    let o = offset4(g, cw.x);
    var acc: array<vec4<f32>, 16>;  // [row] x 4 columns
    for (var i = 0u; i < GEMV_ROWS; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    var wv = gemv_kn_load(base, live, 0u, ks);
    for (var k0 = 0u; k0 < p.k; k0 += GEMV_XC) {
        workgroupBarrier();
        stage_x(row0, rows, k0, tid);
        workgroupBarrier();
        let next = gemv_kn_load(base, live, k0 + GEMV_XC, ks);
        for (var u = 0u; u < GEMV_UNROLL; u++) {
            let kl = (u * GEMV_SPLIT_K + ks) * 4u;
            var d: array<vec4<f32>, 4>;
            for (var j = 0u; j < 4u; j++) {
                d[j] = dequant4(wv[u][j], o);
            }
            for (var r = 0u; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    let xv = xs[(r * GEMV_XC + kl) / 4u];
                    var a = acc[r];
                    for (var j = 0u; j < 4u; j++) {
                        a = fma(vec4<f32>(xv[j]), d[j], a);
                    }
                    acc[r] = a;
                }
            }
        }
        wv = next;
    }
    var part: array<vec4<f32>, 16>;
    for (var i = 0u; i < GEMV_ROWS; i++) {
        part[i] = acc[i];
    }
    for (var r = 0u; r < GEMV_ROWS; r++) {
        if (r < rows) {
            workgroupBarrier();
            for (var j = 0u; j < 4u; j++) {
                red[(ct * 4u + j) * GEMV_SPLIT_K + ks] = part[r][j];
            }
            workgroupBarrier();
            reduce_row_a16(g, r, nt, tid);
        }
    }
    workgroupBarrier();
    gemv_epilogue(row0, rows, nt, tid);
}

// W8A8, weights [e, k, n]: as gemv_kn_w8a16_tile; each group of 4 k rows is transposed into one
// word per column (4 k values), the operand of dot4I8Packed with the row's x word.
fn gemv_kn_w8a8_tile(g: u32, row0: u32, rows: u32, nt: u32, tid: u32) {
    _ = arrayLength(&w_offset);
    let threads = GEMV_WG / GEMV_SPLIT_K;
    let ct = tid % threads;
    let ks = tid / threads;
    let cw = kn_col(nt, ct);
    let live = cw.y == 1u;
    let base = ((g - p.expert_lo) * p.k * p.n + cw.x) / 4u;
    var acc: array<vec4<i32>, 16>;  // [row] x 4 columns
    for (var i = 0u; i < GEMV_ROWS; i++) {
        acc[i] = vec4<i32>(0);
    }
    var wv = gemv_kn_load(base, live, 0u, ks);
    for (var k0 = 0u; k0 < p.k; k0 += GEMV_XC) {
        workgroupBarrier();
        stage_xq(row0, rows, k0, tid);
        workgroupBarrier();
        let next = gemv_kn_load(base, live, k0 + GEMV_XC, ks);
        for (var u = 0u; u < GEMV_UNROLL; u++) {
            let kw = u * GEMV_SPLIT_K + ks;
            let cols = transpose4(wv[u]);
            for (var r = 0u; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    acc[r] += dot4x4(xq[r * (GEMV_XC / 4u) + kw], cols);
                }
            }
        }
        wv = next;
    }
    var part: array<vec4<i32>, 16>;
    for (var i = 0u; i < GEMV_ROWS; i++) {
        part[i] = acc[i];
    }
    for (var r = 0u; r < GEMV_ROWS; r++) {
        if (r < rows) {
            workgroupBarrier();
            for (var j = 0u; j < 4u; j++) {
                red_i[(ct * 4u + j) * GEMV_SPLIT_K + ks] = part[r][j];
            }
            workgroupBarrier();
            reduce_row_a8(g, row0 + r, r, nt, tid);
        }
    }
    workgroupBarrier();
    gemv_epilogue(row0, rows, nt, tid);
}

// Tile t of this shard's GEMV range: (group, row block, column tile), column tiles fastest.
fn gemv_tile_of(t: u32) -> vec4<u32> {
    let base = p.experts + 1u;
    let g = find_group(t, base);
    let local = t - sched[base + g];
    let row0 = sched[g] + (local / p.n_tiles) * GEMV_ROWS;
    let rows = min(GEMV_ROWS, sched[g + 1u] - row0);
    return vec4<u32>(g, row0, rows, local % p.n_tiles);
}

// The first GEMV tile of this workgroup in the shard's range, and the end of the range.
fn gemv_first(wid: vec3<u32>, num: vec3<u32>) -> u32 {
    return sched[p.experts + 1u + p.expert_lo] + linear_workgroup(wid, num);
}

fn gemv_last() -> u32 {
    return sched[p.experts + 1u + p.expert_hi];
}

@compute @workgroup_size(GEMV_WG)
fn gemv_nk_w8a16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    _ = arrayLength(&x_scale);
    for (var t = gemv_first(wid, num); t < gemv_last(); t += num.x * num.y) {
        let tile = gemv_tile_of(t);
        gemv_nk_w8a16_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}

@compute @workgroup_size(GEMV_WG)
fn gemv_kn_w8a16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    _ = arrayLength(&x_scale);
    for (var t = gemv_first(wid, num); t < gemv_last(); t += num.x * num.y) {
        let tile = gemv_tile_of(t);
        gemv_kn_w8a16_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}

@compute @workgroup_size(GEMV_WG)
fn gemv_nk_w8a8(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    for (var t = gemv_first(wid, num); t < gemv_last(); t += num.x * num.y) {
        let tile = gemv_tile_of(t);
        gemv_nk_w8a8_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}

@compute @workgroup_size(GEMV_WG)
fn gemv_kn_w8a8(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    for (var t = gemv_first(wid, num); t < gemv_last(); t += num.x * num.y) {
        let tile = gemv_tile_of(t);
        gemv_kn_w8a8_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}

// ---- GEMM path ---------------------------------------------------------------------------------

override TM: u32 = 64u;        // rows per tile
override TN: u32 = 64u;        // weight columns per tile (SwiGLU: TN / 2 gate + TN / 2 up)
override TK: u32 = 16u;        // k per workgroup-memory stage (multiple of 16)
override RM: u32 = 4u;         // rows per invocation (4 or 8)
override RN: u32 = 8u;         // weight columns per invocation (4 or 8; 8 with SwiGLU)
override GEMM_WG: u32 = 128u;  // (TM / RM) * (TN / RN)

var<workgroup> a_s: array<vec4<f32>, TK * TM / 4u>;   // W8A16: x tile, k-major [TK][TM]
var<workgroup> b_s: array<vec4<f32>, TK * TN / 4u>;   // W8A16: q + offset, [TK][TN]
var<workgroup> a_q: array<vec4<u32>, TK * TM / 16u>;  // W8A8: x words, [TK / 4][TM]
var<workgroup> b_q: array<vec4<u32>, TK * TN / 16u>;  // W8A8: weight words of 4 k, [TK / 4][TN]

// Most 16-byte units one invocation loads per stage and operand (checked on the host).
const GEMM_MAX_LOADS: u32 = 8u;

// Weight column of tile column c (tile output columns start at o0), and whether it is in range.
fn gemm_weight_col(o0: u32, c: u32) -> vec2<u32> {
    if (SWIGLU) {
        let half = TN / 2u;
        let up = c >= half;
        let oc = o0 + select(c, c - half, up);
        return vec2<u32>(select(oc, p.n_out + oc, up), u32(oc < p.n_out));
    }
    let col = o0 + c;
    return vec2<u32>(col, u32(col < p.n));
}

// Weight units per stage: [e, n, k] 16 k values of one column; [e, k, n] one word (4 columns)
// of 4 k rows. Both are 16 bytes: TK·TN / 16 per stage.
fn gemm_w_units() -> u32 {
    return TK * TN / 16u;
}

// Unit idx's first k (within the stage) and first tile column.
fn gemm_w_unit(idx: u32) -> vec2<u32> {
    if (W_KN) {
        let vn = TN / 4u;
        return vec2<u32>((idx / vn) * 4u, (idx % vn) * 4u);
    }
    let vk = TK / 16u;
    return vec2<u32>((idx % vk) * 16u, idx / vk);
}

// This invocation's share of the weight stage at k0, packed as stored (zero past k or n).
fn gemm_load_w(shard_g: u32, o0: u32, k0: u32, tid: u32) -> array<vec4<u32>, 8> {
    var v: array<vec4<u32>, 8>;
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let idx = tid + i * GEMM_WG;
        if (idx < gemm_w_units()) {
            let u = gemm_w_unit(idx);
            let kk = k0 + u.x;
            let wc = gemm_weight_col(o0, u.y);
            if (kk < p.k && wc.y == 1u) {
                if (W_KN) {
                    let row_words = p.n / 4u;
                    let base = ((shard_g * p.k + kk) * p.n + wc.x) / 4u;
                    for (var r = 0u; r < 4u; r++) {
                        if (kk + r < p.k) {
                            v[i][r] = w_word(base + r * row_words);
                        }
                    }
                } else {
                    v[i] = w_vec((shard_g * p.n + wc.x) * p.k + kk, p.k - kk);
                }
            }
        }
    }
    return v;
}

// W8A16: store the weight stage dequantized (q + offset) into b_s [TK][TN].
fn gemm_store_w_a16(g: u32, o0: u32, v: array<vec4<u32>, 8>, tid: u32) {
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let idx = tid + i * GEMM_WG;
        if (idx < gemm_w_units()) {
            let u = gemm_w_unit(idx);
            let c = u.y;
            if (W_KN) {
                let o = offset4(g, gemm_weight_col(o0, c).x);
                for (var r = 0u; r < 4u; r++) {
                    b_s[((u.x + r) * TN + c) / 4u] = dequant4(v[i][r], o);
                }
            } else {
                let o = vec4<f32>(offset_at(g, gemm_weight_col(o0, c).x));
                for (var j = 0u; j < 4u; j++) {
                    let d = dequant4(v[i][j], o);
                    for (var b = 0u; b < 4u; b++) {
                        b_s[((u.x + 4u * j + b) * TN + c) / 4u][c % 4u] = d[b];
                    }
                }
            }
        }
    }
}

// W8A8: store the weight stage as words of 4 k per column into b_q [TK / 4][TN].
fn gemm_store_w_a8(v: array<vec4<u32>, 8>, tid: u32) {
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let idx = tid + i * GEMM_WG;
        if (idx < gemm_w_units()) {
            let u = gemm_w_unit(idx);
            let c = u.y;
            if (W_KN) {
                b_q[((u.x / 4u) * TN + c) / 4u] = transpose4(v[i]);
            } else {
                for (var j = 0u; j < 4u; j++) {
                    b_q[((u.x / 4u + j) * TN + c) / 4u][c % 4u] = v[i][j];
                }
            }
        }
    }
}

// W8A16: this invocation's share of the x stage at k0 (quads; rows past row_end and k past the
// end are 0).
fn gemm_load_x_a16(row0: u32, row_end: u32, k0: u32, tid: u32) -> array<vec4<f32>, 8> {
    var v: array<vec4<f32>, 8>;
    let kq = TK / 4u;
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let q = tid + i * GEMM_WG;
        if (q < TM * kq) {
            let row = row0 + q / kq;
            if (row < row_end) {
                let row_base = row * p.k;
                v[i] = x_quad(row_base + k0 + (q % kq) * 4u, row_base + p.k);
            }
        }
    }
    return v;
}

fn gemm_store_x_a16(v: array<vec4<f32>, 8>, tid: u32) {
    let kq = TK / 4u;
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let q = tid + i * GEMM_WG;
        if (q < TM * kq) {
            let r = q / kq;
            let kk = (q % kq) * 4u;
            for (var j = 0u; j < 4u; j++) {
                a_s[((kk + j) * TM + r) / 4u][r % 4u] = v[i][j];
            }
        }
    }
}

// W8A8: this invocation's share of the x stage at k0 (16 int8 values per unit).
fn gemm_load_x_a8(row0: u32, row_end: u32, k0: u32, tid: u32) -> array<vec4<u32>, 8> {
    var v: array<vec4<u32>, 8>;
    let kv = TK / 16u;
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let q = tid + i * GEMM_WG;
        if (q < TM * kv) {
            let row = row0 + q / kv;
            let kk = k0 + (q % kv) * 16u;
            if (row < row_end && kk < p.k) {
                v[i] = x_vec(row * p.k + kk, p.k - kk);
            }
        }
    }
    return v;
}

fn gemm_store_x_a8(v: array<vec4<u32>, 8>, tid: u32) {
    let kv = TK / 16u;
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let q = tid + i * GEMM_WG;
        if (q < TM * kv) {
            let r = q / kv;
            let kw = (q % kv) * 4u;
            for (var j = 0u; j < 4u; j++) {
                a_q[((kw + j) * TM + r) / 4u][r % 4u] = v[i][j];
            }
        }
    }
}

// Store the RM x RN block of dequantized values `vals` (rows (i * ty_count + ty) * 4 + r,
// weight columns (j * tx_count + tx) * 4 + 0..3; with SwiGLU the quads j < qn / 2 are gate
// columns and quad j + qn / 2 holds their up columns).
fn gemm_epilogue(vals: array<vec4<f32>, 16>, row0: u32, row_end: u32, o0: u32, tid: u32) {
    let tx_count = TN / RN;
    let ty_count = TM / RM;
    let tx = tid % tx_count;
    let ty = tid / tx_count;
    let qm = RM / 4u;
    let qn = RN / 4u;
    let out_quads = select(qn, qn / 2u, SWIGLU);
    for (var i = 0u; i < qm; i++) {
        for (var r = 0u; r < 4u; r++) {
            let row = row0 + (i * ty_count + ty) * 4u + r;
            if (row < row_end) {
                for (var j = 0u; j < out_quads; j++) {
                    var v = vals[(i * 4u + r) * qn + j];
                    if (SWIGLU) {
                        let up = vals[(i * 4u + r) * qn + j + out_quads];
                        v = vec4<f32>(silu(v.x), silu(v.y), silu(v.z), silu(v.w)) * up;
                    }
                    let col = o0 + (j * tx_count + tx) * 4u;
                    if (col < p.n_out) {
                        store_pair(row, col, v.xy, col + 1u < p.n_out);
                    }
                    if (col + 2u < p.n_out) {
                        store_pair(row, col + 2u, v.zw, col + 3u < p.n_out);
                    }
                }
            }
        }
    }
}

// The weight scales of the four weight columns of quad j of this invocation.
fn gemm_scales(g: u32, o0: u32, j: u32, tx: u32) -> vec4<f32> {
    let c = (j * (TN / RN) + tx) * 4u;
    var s = vec4<f32>(0.0);
    for (var b = 0u; b < 4u; b++) {
        let wc = gemm_weight_col(o0, c + b);
        if (wc.y == 1u) {
            s[b] = w_scale[g * p.n + wc.x];
        }
    }
    return s;
}

fn gemm_o0(nt: u32) -> u32 {
    return select(nt * TN, nt * (TN / 2u), SWIGLU);
}

// W8A16: rows [row0, min(row0 + TM, row_end)) of group g, column tile nt.
fn gemm_w8a16_tile(g: u32, row0: u32, row_end: u32, nt: u32, tid: u32) {
    let shard_g = g - p.expert_lo;
    let tx_count = TN / RN;
    let ty_count = TM / RM;
    let tx = tid % tx_count;
    let ty = tid / tx_count;
    let qm = RM / 4u;
    let qn = RN / 4u;
    let o0 = gemm_o0(nt);
    var acc: array<vec4<f32>, 16>;  // [RM rows][RN / 4 column quads]
    for (var i = 0u; i < RM * qn; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    var xa = gemm_load_x_a16(row0, row_end, 0u, tid);
    var wb = gemm_load_w(shard_g, o0, 0u, tid);
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        workgroupBarrier();
        gemm_store_x_a16(xa, tid);
        gemm_store_w_a16(g, o0, wb, tid);
        workgroupBarrier();
        // The next stage's loads go out before this stage's arithmetic.
        if (k0 + TK < p.k) {
            xa = gemm_load_x_a16(row0, row_end, k0 + TK, tid);
            wb = gemm_load_w(shard_g, o0, k0 + TK, tid);
        }
        for (var kk = 0u; kk < TK; kk++) {
            var a: array<vec4<f32>, 2>;
            var b: array<vec4<f32>, 2>;
            for (var i = 0u; i < qm; i++) {
                a[i] = a_s[kk * (TM / 4u) + i * ty_count + ty];
            }
            for (var j = 0u; j < qn; j++) {
                b[j] = b_s[kk * (TN / 4u) + j * tx_count + tx];
            }
            for (var i = 0u; i < qm; i++) {
                for (var r = 0u; r < 4u; r++) {
                    let av = vec4<f32>(a[i][r]);
                    for (var j = 0u; j < qn; j++) {
                        let at = (i * 4u + r) * qn + j;
                        acc[at] = fma(av, b[j], acc[at]);
                    }
                }
            }
        }
    }
    for (var j = 0u; j < qn; j++) {
        let s = gemm_scales(g, o0, j, tx);
        for (var i = 0u; i < RM; i++) {
            acc[i * qn + j] *= s;
        }
    }
    gemm_epilogue(acc, row0, row_end, o0, tid);
}

// W8A8: as gemm_w8a16_tile with words of 4 k values and exact i32 accumulation.
fn gemm_w8a8_tile(g: u32, row0: u32, row_end: u32, nt: u32, tid: u32) {
    let shard_g = g - p.expert_lo;
    let tx_count = TN / RN;
    let ty_count = TM / RM;
    let tx = tid % tx_count;
    let ty = tid / tx_count;
    let qm = RM / 4u;
    let qn = RN / 4u;
    let o0 = gemm_o0(nt);
    var acc: array<vec4<i32>, 16>;  // [RM rows][RN / 4 column quads]
    for (var i = 0u; i < RM * qn; i++) {
        acc[i] = vec4<i32>(0);
    }
    var xa = gemm_load_x_a8(row0, row_end, 0u, tid);
    var wb = gemm_load_w(shard_g, o0, 0u, tid);
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        workgroupBarrier();
        gemm_store_x_a8(xa, tid);
        gemm_store_w_a8(wb, tid);
        workgroupBarrier();
        if (k0 + TK < p.k) {
            xa = gemm_load_x_a8(row0, row_end, k0 + TK, tid);
            wb = gemm_load_w(shard_g, o0, k0 + TK, tid);
        }
        for (var kw = 0u; kw < TK / 4u; kw++) {
            var a: array<vec4<u32>, 2>;
            var b: array<vec4<u32>, 2>;
            for (var i = 0u; i < qm; i++) {
                a[i] = a_q[kw * (TM / 4u) + i * ty_count + ty];
            }
            for (var j = 0u; j < qn; j++) {
                b[j] = b_q[kw * (TN / 4u) + j * tx_count + tx];
            }
            for (var i = 0u; i < qm; i++) {
                for (var r = 0u; r < 4u; r++) {
                    for (var j = 0u; j < qn; j++) {
                        let at = (i * 4u + r) * qn + j;
                        acc[at] += dot4x4(a[i][r], b[j]);
                    }
                }
            }
        }
    }
    // Dequantize: f32 of the exact sums, times the row's and the columns' scales.
    var vals: array<vec4<f32>, 16>;
    for (var j = 0u; j < qn; j++) {
        let s = gemm_scales(g, o0, j, tx);
        for (var i = 0u; i < qm; i++) {
            for (var r = 0u; r < 4u; r++) {
                let row = row0 + (i * ty_count + ty) * 4u + r;
                var sx = 0.0;
                if (row < row_end) {
                    sx = x_scale[row];
                }
                let at = (i * 4u + r) * qn + j;
                vals[at] = vec4<f32>(acc[at]) * sx * s;
            }
        }
    }
    gemm_epilogue(vals, row0, row_end, o0, tid);
}

// Tile t of this shard's GEMM range: (group, row tile, column tile), row tiles fastest.
fn gemm_tile_of(t: u32) -> vec4<u32> {
    let base = 2u * (p.experts + 1u);
    let g = find_group(t, base);
    let local = t - sched[base + g];
    let start = sched[g];
    let m_tiles = (sched[g + 1u] - start + TM - 1u) / TM;
    return vec4<u32>(g, start + (local % m_tiles) * TM, sched[g + 1u], local / m_tiles);
}

@compute @workgroup_size(GEMM_WG)
fn gemm_w8a16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    _ = arrayLength(&x_scale);
    let base = 2u * (p.experts + 1u);
    let last = sched[base + p.expert_hi];
    for (var t = sched[base + p.expert_lo] + linear_workgroup(wid, num); t < last; t += num.x * num.y) {
        let tile = gemm_tile_of(t);
        gemm_w8a16_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}

@compute @workgroup_size(GEMM_WG)
fn gemm_w8a8(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    _ = arrayLength(&w_offset);
    let base = 2u * (p.experts + 1u);
    let last = sched[base + p.expert_hi];
    for (var t = sched[base + p.expert_lo] + linear_workgroup(wid, num); t < last; t += num.x * num.y) {
        let tile = gemm_tile_of(t);
        gemm_w8a8_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}
