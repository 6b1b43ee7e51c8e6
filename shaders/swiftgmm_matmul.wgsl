// SwiftGMM grouped matmul: y[rows of g] = epilogue(x[rows of g] · W_g) for every group g.
//
// Entry points (one file so that they share the loaders and the epilogue):
//   gemv_nk, gemv_kn  the GEMV-like path for small groups: a tile is (group, row block of at most
//                     GEMV_ROWS rows, GEMV_NBW weight columns) over the whole of k, so each
//                     expert's weights are streamed once for all of its rows; the k range is split
//                     across the workgroup and the partial sums are reduced in workgroup memory.
//   gemm              the tiled path for large groups: TM x TN tiles, TK-deep workgroup-memory
//                     stages, RM x RN register blocks per invocation.
//   gemm_expert       the same GEMM tile for one expert, one dispatch per expert (the baseline).
// gemv_* and gemm are persistent: they read the schedule written by swiftgmm_schedule.wgsl and
// walk the flat tile range of their weight shard, so one dispatch per path covers every expert.
//
// x, w are bound as array<vec4<u32>> and widened here (f32, or f16/bf16 packed two per word).
// Weight vectors are 16 bytes: W_EPV = 8 elements of f16/bf16, 4 of f32. Without W_ALIGNED (the
// contiguous dimension is not a multiple of W_EPV) the same vector is assembled from scalar loads.

struct GmmParams {
    m_total: u32,    // rows of x [m_total, k] and y [m_total, n_out]
    k: u32,          // reduction length
    n: u32,          // weight columns: w [e, k, n] or [e, n, k]
    n_out: u32,      // output columns: n, or n / 2 with SwiGLU
    experts: u32,    // e: sched holds offsets [e + 1] and a tile prefix [e + 1] per path
    expert_lo: u32,  // first expert of the bound weight shard
    expert_hi: u32,  // one past the last expert of the shard
    n_tiles: u32,    // column tiles per row block of this path
    row_start: u32,  // gemm_expert: first row of the expert
    row_end: u32,    // gemm_expert: one past its last row
    group: u32,      // gemm_expert: the expert
    _pad: u32,       // keeps the size a multiple of 16 bytes
}

override X_DTYPE: u32 = 2u;       // DTYPE_* of x
override W_DTYPE: u32 = 2u;       // DTYPE_* of w
override OUT_DTYPE: u32 = 0u;     // DTYPE_* of y
override W_EPV: u32 = 8u;         // weight elements per 16-byte vector (8, or 4 for f32)
override X_ALIGNED: bool = true;  // k % 4 == 0: x quads never straddle a row
override W_ALIGNED: bool = true;  // weight vectors start on 16-byte boundaries
override W_KN: bool = false;      // weights are [e, k, n] (else [e, n, k])
override SWIGLU: bool = false;    // y = silu(gate) * up, gate = columns [0, n_out), up = [n_out, n)
override HAS_SCALE: bool = false; // y[row] *= row_scale[row]

@group(0) @binding(0) var<uniform> p: GmmParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> sched: array<u32>;
@group(0) @binding(4) var<storage, read> row_scale: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<atomic<u32>>;

// ---- loads -------------------------------------------------------------------------------------

// Element i of x.
fn x_at(i: u32) -> f32 {
    if (X_DTYPE == DTYPE_F32) {
        return bitcast<f32>(x[i >> 2u][i & 3u]);
    }
    return unpack_half(x[i >> 3u][(i >> 1u) & 3u], (i & 1u) == 1u, X_DTYPE);
}

// x elements i .. i + 3 (i % 4 == 0) as f32; elements from `end` (the end of the row) on are 0.
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

// The weight vector of W_EPV elements starting at element i, packed as stored; elements from
// `avail` on are 0. With W_ALIGNED, i % W_EPV == 0 and avail >= W_EPV.
fn w_load(i: u32, avail: u32) -> vec4<u32> {
    if (W_ALIGNED) {
        return w[i / W_EPV];
    }
    var v = vec4<u32>(0u);
    for (var j = 0u; j < W_EPV; j++) {
        if (j < avail) {
            let e = i + j;
            if (W_DTYPE == DTYPE_F32) {
                v[j] = w[e >> 2u][e & 3u];
            } else {
                let half = (w[e >> 3u][(e >> 1u) & 3u] >> ((e & 1u) * 16u)) & 0xffffu;
                v[j >> 1u] |= half << ((j & 1u) * 16u);
            }
        }
    }
    return v;
}

// Elements 0..3 of a weight vector.
fn w_lo(v: vec4<u32>) -> vec4<f32> {
    if (W_DTYPE == DTYPE_F32) {
        return bitcast<vec4<f32>>(v);
    }
    return vec4<f32>(unpack_pair(v.x, W_DTYPE), unpack_pair(v.y, W_DTYPE));
}

// Elements 4..7 of a 16-bit weight vector (zero for f32, which has only 4).
fn w_hi(v: vec4<u32>) -> vec4<f32> {
    if (W_DTYPE == DTYPE_F32) {
        return vec4<f32>(0.0);
    }
    return vec4<f32>(unpack_pair(v.z, W_DTYPE), unpack_pair(v.w, W_DTYPE));
}

// ---- epilogue ----------------------------------------------------------------------------------

fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

// Half `i % 2` of word `i / 2` of a 16-bit y, the other half left as it is: two atomics, each
// touching only this half, so whoever writes the other half cannot be overwritten.
fn store_half(i: u32, h: u32) {
    let shift = (i & 1u) * 16u;
    atomicAnd(&y[i >> 1u], ~(0xffffu << shift));
    atomicOr(&y[i >> 1u], h << shift);
}

// Output columns col, col + 1 of `row` (col even); the second only when `both`. A 16-bit word
// holding both is written whole; with an odd n_out, odd rows start in the middle of a word and
// a row's last column shares its word with the next row, so those halves are written one by one.
fn store_pair(row: u32, col: u32, v: vec2<f32>, both: bool) {
    var o = v;
    if (HAS_SCALE) {
        o *= row_scale[row];
    }
    let i = row * p.n_out + col;
    if (OUT_DTYPE == DTYPE_F32) {
        atomicStore(&y[i], bitcast<u32>(o.x));
        if (both) {
            atomicStore(&y[i + 1u], bitcast<u32>(o.y));
        }
        return;
    }
    let bits = pack_pair(o, OUT_DTYPE);
    if ((i & 1u) == 0u && both) {
        atomicStore(&y[i >> 1u], bits);
        return;
    }
    store_half(i, bits & 0xffffu);
    if (both) {
        store_half(i + 1u, bits >> 16u);
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
override GEMV_SPLIT_K: u32 = 16u; // nk: lanes along k per column; kn: k slices
override GEMV_UNROLL: u32 = 2u;   // weight vectors per invocation and column per chunk (<= 4)
override GEMV_XC: u32 = 256u;     // k elements per staged x chunk (multiple of 4)
override GEMV_NBW: u32 = 32u;     // weight columns per tile
override GEMV_RED: u32 = 512u;    // floats of split-k scratch

var<workgroup> xs: array<vec4<f32>, GEMV_ROWS * GEMV_XC / 4u>;  // [GEMV_ROWS][GEMV_XC] chunk of x
var<workgroup> red: array<f32, GEMV_RED>;                       // one row's split-k partials
var<workgroup> res: array<f32, GEMV_ROWS * GEMV_NBW>;           // [rows][weight columns] sums

// Stage x[row0 .. row0 + rows][k0 .. k0 + GEMV_XC] into xs (zero past the end of the row;
// rows past `rows` are neither staged nor read).
fn stage_x(row0: u32, rows: u32, k0: u32, tid: u32) {
    let quads = GEMV_XC / 4u;
    for (var q = tid; q < rows * quads; q += GEMV_WG) {
        let row_base = (row0 + q / quads) * p.k;
        xs[q] = x_quad(row_base + k0 + (q % quads) * 4u, row_base + p.k);
    }
}

// Output columns of a GEMV tile. res holds the weight columns of the tile in order, with SwiGLU
// the gate columns first and the matching up columns in the second half.
fn gemv_out_cols() -> u32 {
    return select(GEMV_NBW, GEMV_NBW / 2u, SWIGLU);
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

// The weight vectors of one chunk for gemv_nk_tile: GEMV_UNROLL per column (bases: the
// columns' first elements), zero past k or for a column out of range.
fn gemv_nk_load(base0: u32, base1: u32, live0: bool, live1: bool, k0: u32, lane: u32)
    -> array<vec4<u32>, 8> {
    var wv: array<vec4<u32>, 8>;
    for (var u = 0u; u < GEMV_UNROLL; u++) {
        let kk = k0 + (u * GEMV_SPLIT_K + lane) * W_EPV;
        if (kk < p.k) {
            if (live0) {
                wv[2u * u] = w_load(base0 + kk, p.k - kk);
            }
            if (live1) {
                wv[2u * u + 1u] = w_load(base1 + kk, p.k - kk);
            }
        }
    }
    return wv;
}

// Weights [e, n, k]: invocation (column group cg, lane) owns two weight columns (adjacent ones, or
// with SwiGLU the gate and up column of one output column) and the k vectors lane, lane +
// GEMV_SPLIT_K, ...: the lanes of a column read consecutive 16-byte vectors of its k row.
fn gemv_nk_tile(g: u32, row0: u32, rows: u32, nt: u32, tid: u32) {
    let k = p.k;
    let lane = tid % GEMV_SPLIT_K;
    let cg = tid / GEMV_SPLIT_K;
    var col0: u32;
    var col1: u32;
    var live0: bool;
    var live1: bool;
    if (SWIGLU) {
        let o = nt * (GEMV_NBW / 2u) + cg;
        col0 = o;
        col1 = p.n_out + o;
        live0 = o < p.n_out;
        live1 = live0;
    } else {
        col0 = nt * GEMV_NBW + 2u * cg;
        col1 = col0 + 1u;
        live0 = col0 < p.n;
        live1 = col1 < p.n;
    }
    let shard_g = g - p.expert_lo;
    let base0 = (shard_g * p.n + col0) * k;
    let base1 = (shard_g * p.n + col1) * k;
    var acc: array<f32, 32>;  // [row][column]
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        acc[i] = 0.0;
    }
    var wv = gemv_nk_load(base0, base1, live0, live1, 0u, lane);
    for (var k0 = 0u; k0 < k; k0 += GEMV_XC) {
        workgroupBarrier();
        stage_x(row0, rows, k0, tid);
        workgroupBarrier();
        // The next chunk's weights are requested before this chunk's arithmetic, so that each
        // workgroup keeps its weight stream in flight.
        let next = gemv_nk_load(base0, base1, live0, live1, k0 + GEMV_XC, lane);
        for (var u = 0u; u < GEMV_UNROLL; u++) {
            let kl = (u * GEMV_SPLIT_K + lane) * W_EPV;
            let lo0 = w_lo(wv[2u * u]);
            let lo1 = w_lo(wv[2u * u + 1u]);
            let hi0 = w_hi(wv[2u * u]);
            let hi1 = w_hi(wv[2u * u + 1u]);
            for (var r = 0u; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    let xi = (r * GEMV_XC + kl) / 4u;
                    let xlo = xs[xi];
                    var s0 = dot(xlo, lo0);
                    var s1 = dot(xlo, lo1);
                    if (W_EPV == 8u) {
                        let xhi = xs[xi + 1u];
                        s0 += dot(xhi, hi0);
                        s1 += dot(xhi, hi1);
                    }
                    acc[2u * r] += s0;
                    acc[2u * r + 1u] += s1;
                }
            }
        }
        wv = next;
    }
    // Split-k reduction, one row at a time: partials are laid out [slot][lane] so that the
    // invocation summing a slot reads consecutive words. The loop holds barriers and may stay
    // rolled, so it indexes a copy: acc itself is only indexed by barrier-free constant loops
    // and stays in registers.
    var part: array<f32, 32>;
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        part[i] = acc[i];
    }
    for (var r = 0u; r < GEMV_ROWS; r++) {
        if (r < rows) {
            workgroupBarrier();
            for (var c = 0u; c < 2u; c++) {
                red[(2u * cg + c) * GEMV_SPLIT_K + lane] = part[2u * r + c];
            }
            workgroupBarrier();
            for (var s = tid; s < GEMV_NBW; s += GEMV_WG) {
                var sum = 0.0;
                for (var l = 0u; l < GEMV_SPLIT_K; l++) {
                    sum += red[s * GEMV_SPLIT_K + l];
                }
                // Slot s = 2 cg + c; with SwiGLU, c = 0 is the gate of output cg, c = 1 its up.
                var dst = s;
                if (SWIGLU) {
                    dst = select(s / 2u, GEMV_NBW / 2u + s / 2u, (s & 1u) == 1u);
                }
                res[r * GEMV_NBW + dst] = sum;
            }
        }
    }
    workgroupBarrier();
    gemv_epilogue(row0, rows, nt, tid);
}

// The weight vectors of one chunk for gemv_kn_tile: GEMV_UNROLL k rows of its columns (base:
// the first column's element in k row 0), zero past k.
fn gemv_kn_load(base: u32, avail: u32, k0: u32, ks: u32) -> array<vec4<u32>, 4> {
    var wv: array<vec4<u32>, 4>;
    for (var u = 0u; u < GEMV_UNROLL; u++) {
        let kk = k0 + u * GEMV_SPLIT_K + ks;
        if (avail > 0u && kk < p.k) {
            wv[u] = w_load(base + kk * p.n, avail);
        }
    }
    return wv;
}

// Weights [e, k, n]: invocation (column thread ct, k slice ks) owns W_EPV adjacent weight columns
// (with SwiGLU the first half of the column threads hold gate columns, the second half the
// matching up columns) and the k rows ks, ks + GEMV_SPLIT_K, ...: the column threads of one k
// row read consecutive 16-byte vectors.
fn gemv_kn_tile(g: u32, row0: u32, rows: u32, nt: u32, tid: u32) {
    let k = p.k;
    let n = p.n;
    let threads = GEMV_WG / GEMV_SPLIT_K;
    let ct = tid % threads;
    let ks = tid / threads;
    var col0: u32;
    var avail: u32;
    if (SWIGLU) {
        let half = threads / 2u;
        let o = nt * (GEMV_NBW / 2u) + (ct % half) * W_EPV;
        col0 = select(o, p.n_out + o, ct >= half);
        avail = select(0u, min(W_EPV, p.n_out - o), o < p.n_out);
    } else {
        col0 = nt * GEMV_NBW + ct * W_EPV;
        avail = select(0u, min(W_EPV, n - col0), col0 < n);
    }
    let base = (g - p.expert_lo) * k * n + col0;
    var acc: array<vec4<f32>, 32>;  // [row][low, high half of the vector]
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    var wv = gemv_kn_load(base, avail, 0u, ks);
    for (var k0 = 0u; k0 < k; k0 += GEMV_XC) {
        workgroupBarrier();
        stage_x(row0, rows, k0, tid);
        workgroupBarrier();
        // As in gemv_nk_tile: the next chunk's loads go out before this chunk's arithmetic.
        let next = gemv_kn_load(base, avail, k0 + GEMV_XC, ks);
        for (var u = 0u; u < GEMV_UNROLL; u++) {
            let kl = u * GEMV_SPLIT_K + ks;
            let lo = w_lo(wv[u]);
            let hi = w_hi(wv[u]);
            for (var r = 0u; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    let xv = vec4<f32>(xs[(r * GEMV_XC + kl) / 4u][kl % 4u]);
                    acc[2u * r] = fma(xv, lo, acc[2u * r]);
                    if (W_EPV == 8u) {
                        acc[2u * r + 1u] = fma(xv, hi, acc[2u * r + 1u]);
                    }
                }
            }
        }
        wv = next;
    }
    // As in gemv_nk_tile, the reduction loop indexes a copy of the accumulators.
    var part: array<vec4<f32>, 32>;
    for (var i = 0u; i < 2u * GEMV_ROWS; i++) {
        part[i] = acc[i];
    }
    for (var r = 0u; r < GEMV_ROWS; r++) {
        if (r < rows) {
            workgroupBarrier();
            for (var j = 0u; j < W_EPV; j++) {
                red[(ct * W_EPV + j) * GEMV_SPLIT_K + ks] = part[2u * r + j / 4u][j & 3u];
            }
            workgroupBarrier();
            for (var s = tid; s < GEMV_NBW; s += GEMV_WG) {
                var sum = 0.0;
                for (var l = 0u; l < GEMV_SPLIT_K; l++) {
                    sum += red[s * GEMV_SPLIT_K + l];
                }
                res[r * GEMV_NBW + s] = sum;
            }
        }
    }
    workgroupBarrier();
    gemv_epilogue(row0, rows, nt, tid);
}

// Tile t of this shard's GEMV range: (group, row block, column tile), column tiles fastest so
// that neighbouring workgroups stream neighbouring weight columns of one expert.
fn gemv_tile_of(t: u32) -> vec4<u32> {
    let base = p.experts + 1u;
    let g = find_group(t, base);
    let local = t - sched[base + g];
    let row0 = sched[g] + (local / p.n_tiles) * GEMV_ROWS;
    let rows = min(GEMV_ROWS, sched[g + 1u] - row0);
    return vec4<u32>(g, row0, rows, local % p.n_tiles);
}

@compute @workgroup_size(GEMV_WG)
fn gemv_nk(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let base = p.experts + 1u;
    let last = sched[base + p.expert_hi];
    for (var t = sched[base + p.expert_lo] + linear_workgroup(wid, num); t < last; t += num.x * num.y) {
        let tile = gemv_tile_of(t);
        gemv_nk_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}

@compute @workgroup_size(GEMV_WG)
fn gemv_kn(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let base = p.experts + 1u;
    let last = sched[base + p.expert_hi];
    for (var t = sched[base + p.expert_lo] + linear_workgroup(wid, num); t < last; t += num.x * num.y) {
        let tile = gemv_tile_of(t);
        gemv_kn_tile(tile.x, tile.y, tile.z, tile.w, tid);
    }
}

// ---- GEMM path ---------------------------------------------------------------------------------

override TM: u32 = 64u;        // rows per tile
override TN: u32 = 64u;        // weight columns per tile (SwiGLU: TN / 2 gate + TN / 2 up)
override TK: u32 = 16u;        // k per workgroup-memory stage (multiple of 8)
override RM: u32 = 4u;         // rows per invocation (4 or 8)
override RN: u32 = 8u;         // weight columns per invocation (4 or 8; 8 with SwiGLU)
override GEMM_WG: u32 = 128u;  // (TM / RM) * (TN / RN)

var<workgroup> a_s: array<vec4<f32>, TK * TM / 4u>;  // x tile, k-major [TK][TM]
var<workgroup> b_s: array<vec4<f32>, TK * TN / 4u>;  // weight tile, [TK][TN]

// Weight column of tile column c (tile output columns start at o0), and how many of the W_EPV
// columns from there are in range.
fn gemm_weight_col(o0: u32, c: u32) -> vec2<u32> {
    if (SWIGLU) {
        let half = TN / 2u;
        let up = c >= half;
        let oc = o0 + select(c, c - half, up);
        let avail = select(0u, min(W_EPV, p.n_out - oc), oc < p.n_out);
        return vec2<u32>(select(oc, p.n_out + oc, up), avail);
    }
    let col = o0 + c;
    return vec2<u32>(col, select(0u, min(W_EPV, p.n - col), col < p.n));
}

// Most 16-byte vectors one invocation loads per stage and operand (checked on the host).
const GEMM_MAX_LOADS: u32 = 8u;

// This invocation's share of the x stage at k0: quads tid, tid + GEMM_WG, ... of the TM x TK
// tile (rows past row_end and k past the end are 0).
fn gemm_load_x(row0: u32, row_end: u32, k0: u32, tid: u32) -> array<vec4<f32>, 8> {
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

// Store the x stage transposed: a_s is [TK][TM].
fn gemm_store_x(v: array<vec4<f32>, 8>, tid: u32) {
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

// Vectors per weight stage.
fn gemm_w_vectors() -> u32 {
    return TK * TN / W_EPV;
}

// This invocation's share of the weight stage at k0 (tile output columns start at o0): vectors
// along n for [e, k, n], along k for [e, n, k].
fn gemm_load_w(shard_g: u32, o0: u32, k0: u32, tid: u32) -> array<vec4<u32>, 8> {
    var v: array<vec4<u32>, 8>;
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let idx = tid + i * GEMM_WG;
        if (idx < gemm_w_vectors()) {
            if (W_KN) {
                let vn = TN / W_EPV;
                let kk = k0 + idx / vn;
                let wc = gemm_weight_col(o0, (idx % vn) * W_EPV);
                if (kk < p.k && wc.y > 0u) {
                    v[i] = w_load((shard_g * p.k + kk) * p.n + wc.x, wc.y);
                }
            } else {
                let vk = TK / W_EPV;
                let kk = k0 + (idx % vk) * W_EPV;
                let wc = gemm_weight_col(o0, idx / vk);
                if (kk < p.k && wc.y > 0u) {
                    v[i] = w_load((shard_g * p.n + wc.x) * p.k + kk, p.k - kk);
                }
            }
        }
    }
    return v;
}

// Store the weight stage: b_s is [TK][TN].
fn gemm_store_w(v: array<vec4<u32>, 8>, tid: u32) {
    for (var i = 0u; i < GEMM_MAX_LOADS; i++) {
        let idx = tid + i * GEMM_WG;
        if (idx < gemm_w_vectors()) {
            let lo = w_lo(v[i]);
            let hi = w_hi(v[i]);
            if (W_KN) {
                let vn = TN / W_EPV;
                let dst = ((idx / vn) * TN + (idx % vn) * W_EPV) / 4u;
                b_s[dst] = lo;
                if (W_EPV == 8u) {
                    b_s[dst + 1u] = hi;
                }
            } else {
                let vk = TK / W_EPV;
                let c = idx / vk;
                let kv = (idx % vk) * W_EPV;
                for (var j = 0u; j < 4u; j++) {
                    b_s[((kv + j) * TN + c) / 4u][c % 4u] = lo[j];
                    if (W_EPV == 8u) {
                        b_s[((kv + 4u + j) * TN + c) / 4u][c % 4u] = hi[j];
                    }
                }
            }
        }
    }
}

// Rows [row0, min(row0 + TM, row_end)) of group g, column tile nt.
fn gemm_tile(g: u32, row0: u32, row_end: u32, nt: u32, tid: u32) {
    let k = p.k;
    let shard_g = g - p.expert_lo;
    let tx_count = TN / RN;
    let ty_count = TM / RM;
    let tx = tid % tx_count;
    let ty = tid / tx_count;
    let qm = RM / 4u;
    let qn = RN / 4u;
    let o0 = select(nt * TN, nt * (TN / 2u), SWIGLU);
    var acc: array<vec4<f32>, 16>;  // [RM rows][RN / 4 column quads]
    for (var i = 0u; i < RM * qn; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    var xa = gemm_load_x(row0, row_end, 0u, tid);
    var wb = gemm_load_w(shard_g, o0, 0u, tid);
    for (var k0 = 0u; k0 < k; k0 += TK) {
        workgroupBarrier();
        gemm_store_x(xa, tid);
        gemm_store_w(wb, tid);
        workgroupBarrier();
        // The next stage's loads go out before this stage's arithmetic.
        if (k0 + TK < k) {
            xa = gemm_load_x(row0, row_end, k0 + TK, tid);
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
    // Invocation rows (i * ty_count + ty) * 4 + r, columns (j * tx_count + tx) * 4 + 0..3: with
    // SwiGLU the quads j < qn / 2 are gate columns and quad j + qn / 2 holds their up columns.
    let out_quads = select(qn, qn / 2u, SWIGLU);
    for (var i = 0u; i < qm; i++) {
        for (var r = 0u; r < 4u; r++) {
            let row = row0 + (i * ty_count + ty) * 4u + r;
            if (row < row_end) {
                for (var j = 0u; j < out_quads; j++) {
                    var v = acc[(i * 4u + r) * qn + j];
                    if (SWIGLU) {
                        let up = acc[(i * 4u + r) * qn + j + out_quads];
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

// Tiles of one group: row tiles fastest, so that the workgroups sharing a weight column strip
// run together and find it in cache.
@compute @workgroup_size(GEMM_WG)
fn gemm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let base = 2u * (p.experts + 1u);
    let last = sched[base + p.expert_hi];
    for (var t = sched[base + p.expert_lo] + linear_workgroup(wid, num); t < last; t += num.x * num.y) {
        let g = find_group(t, base);
        let local = t - sched[base + g];
        let start = sched[g];
        let end = sched[g + 1u];
        let m_tiles = (end - start + TM - 1u) / TM;
        gemm_tile(g, start + (local % m_tiles) * TM, end, local / m_tiles, tid);
    }
}

// The baseline: one dispatch per expert, rows and expert from the params.
@compute @workgroup_size(GEMM_WG)
fn gemm_expert(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    // Keeps the schedule binding in the layout, so both entry points bind the same resources.
    _ = arrayLength(&sched);
    let m_tiles = (p.row_end - p.row_start + TM - 1u) / TM;
    let t = linear_workgroup(wid, num);
    if (t >= m_tiles * p.n_tiles) {
        return;
    }
    gemm_tile(p.group, p.row_start + (t % m_tiles) * TM, p.row_end, t / m_tiles, tid);
}
