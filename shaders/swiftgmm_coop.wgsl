// SwiftGMM's GEMM path on cooperative matrices (tensor cores): the same tiles, schedule and
// epilogue as `gemm` in swiftgmm_matmul.wgsl, with the multiply-adds on f16 fragments and f32
// accumulators. Written once against FragA / FragB / FragC and FRAG (8 or 16), which the pipeline
// cache declares for the fragment size the adapter reports (src/gpu/mod.rs, Fragment).
//
// Entry points:
//   coop_gemm    persistent over the GEMM tiles of the schedule (swiftgmm_schedule.wgsl), one
//                dispatch per weight shard covers every expert on the GEMM path;
//   coop_expert  the same tile for one expert, one dispatch per expert (the baseline).
//
// A tile is BM x BN outputs (BN weight columns; with SwiGLU BN / 2 gate columns and the matching
// BN / 2 up columns). SG_M x SG_N subgroups each own FM x FN accumulator fragments. Per BK-deep
// stage, x [BM, BK] and w [BK, BN] are converted to f16 and staged in workgroup memory (the next
// stage is loaded into registers while this one is multiplied); rows past the group, columns past
// n and k past the end are zero there, because cooperative loads are not bounds-checked. The
// epilogue stores each subgroup's fragments (with SwiGLU a gate fragment and its up fragment) to
// workgroup memory and writes the outputs from there.
//
// Staging saturates finite values past the f16 range at +-65504, so that a finite input never
// becomes inf (NaN and inf pass through), and converts to f16 (round to nearest even on NVIDIA
// and lavapipe; WGSL leaves the direction to the driver). f16 inputs are exact; bf16 inputs are
// exact from 2^-14 to 65504; f32 inputs keep 11 significant bits. reference::stage_f16 is the
// same on the CPU.
//
// int8 weights (W8A16, W_DTYPE = DTYPE_I8, 16 per vector; WGSL has no int8 fragments) are staged
// as q + w_offset[col] in f16, exact for integer offsets, and the per-channel w_scale multiplies
// the sums in the epilogue (swiftgmm::quant). Other weights leave bindings 6 and 7 unused.
enable f16;
enable wgpu_cooperative_matrix;

struct GmmParams {
    m_total: u32,    // rows of x [m_total, k] and y [m_total, n_out]
    k: u32,          // reduction length
    n: u32,          // weight columns: w [e, k, n] or [e, n, k]
    n_out: u32,      // output columns: n, or n / 2 with SwiGLU
    experts: u32,    // e: sched holds offsets [e + 1] and a tile prefix [e + 1] per path
    expert_lo: u32,  // first expert of the bound weight shard
    expert_hi: u32,  // one past the last expert of the shard
    n_tiles: u32,    // column tiles per row block of this path
    row_start: u32,  // coop_expert: first row of the expert
    row_end: u32,    // coop_expert: one past its last row
    group: u32,      // coop_expert: the expert
    _pad: u32,       // keeps the size a multiple of 16 bytes
}

override X_DTYPE: u32 = 2u;       // DTYPE_* of x
override W_DTYPE: u32 = 2u;       // DTYPE_* of w
override OUT_DTYPE: u32 = 0u;     // DTYPE_* of y
override X_EPV: u32 = 8u;         // x elements per 16-byte vector (8, or 4 for f32)
override W_EPV: u32 = 8u;         // weight elements per 16-byte vector
override X_ALIGNED: bool = true;  // k % X_EPV == 0: x vectors start on 16-byte boundaries
override W_ALIGNED: bool = true;  // weight vectors start on 16-byte boundaries
override W_KN: bool = false;      // weights are [e, k, n] (else [e, n, k])
override SWIGLU: bool = false;    // y = silu(gate) * up, gate = columns [0, n_out), up = [n_out, n)
override HAS_SCALE: bool = false; // y[row] *= row_scale[row]
override HAS_OFFSET: bool = false; // int8 weights: q + w_offset[col]

override SG: u32 = 32u;           // the adapter's (fixed) subgroup size
override SG_M: u32 = 2u;          // subgroups along the rows of a tile
override SG_N: u32 = 4u;          // subgroups along its columns
override FM: u32 = 4u;            // accumulator fragments per subgroup along rows
override FN: u32 = 2u;            // along columns (SwiGLU: FN / 2 gate + FN / 2 up, FN even)
override KF: u32 = 2u;            // fragments along k per stage
override COOP_WG: u32 = 256u;     // SG_M * SG_N * SG invocations

override BM: u32 = SG_M * FM * FRAG;   // rows per tile
override BN: u32 = SG_N * FN * FRAG;   // weight columns per tile
override BK: u32 = KF * FRAG;          // k per stage
// Row strides of the staged tiles in f16, padded by 8 (16 bytes, the alignment NVIDIA wants for
// cooperative loads, and it shifts consecutive rows across memory banks).
override A_LD: u32 = BK + 8u;                      // x tile [BM][A_LD], row-major
override B_LD: u32 = select(BK, BN, W_KN) + 8u;    // w tile [BK][B_LD] (kn) or [BN][B_LD] (nk)
override B_ROWS: u32 = select(BN, BK, W_KN);

@group(0) @binding(0) var<uniform> p: GmmParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> sched: array<u32>;
@group(0) @binding(4) var<storage, read> row_scale: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<atomic<u32>>;
@group(0) @binding(6) var<storage, read> w_scale: array<f32>;   // [e, n], int8 weights
@group(0) @binding(7) var<storage, read> w_offset: array<f32>;  // [e, n], int8 weights

var<workgroup> a_s: array<vec4<f16>, BM * A_LD / 4u>;
var<workgroup> b_s: array<vec4<f16>, B_ROWS * B_LD / 4u>;
// Per subgroup two fragments of f32 (a gate fragment and its up fragment with SwiGLU).
var<workgroup> c_s: array<f32, SG_M * SG_N * 2u * FRAG * FRAG>;

// Largest accumulator set per subgroup (FM * FN) and B fragments per k step (FN), checked on the
// host: function-scope arrays need constant sizes.
const MAX_ACC: u32 = 8u;
const MAX_FN: u32 = 4u;
// Most 16-byte vectors one invocation loads per stage and operand (checked on the host).
const MAX_LOADS: u32 = 8u;

// ---- staging ----------------------------------------------------------------------------------

// Four values of `dtype` as f16: finite values past the f16 range saturated at +-65504 (NaN and
// inf unchanged, which clamp would not keep); f16 data converts back exactly. A few ALU
// operations per staged element (docs/swiftgmm.md counts them against the tensor rate).
fn to_half4(q: vec4<f32>, dtype: u32) -> vec4<f16> {
    if (dtype == DTYPE_F16) {
        return vec4<f16>(q);
    }
    let finite = (bitcast<vec4<u32>>(q) & vec4<u32>(0x7fffffffu)) < vec4<u32>(0x7f800000u);
    return vec4<f16>(select(q, clamp(q, vec4<f32>(-65504.0), vec4<f32>(65504.0)), finite));
}

// A 16-byte vector of `dtype` elements written as f16 at a_s / b_s index `at` (one vec4<f16>
// for f32, two for 16-bit data).
fn stage_vector(v: vec4<u32>, dtype: u32, into_a: bool, at: u32) {
    if (dtype == DTYPE_F32) {
        let h = to_half4(bitcast<vec4<f32>>(v), dtype);
        if (into_a) {
            a_s[at] = h;
        } else {
            b_s[at] = h;
        }
        return;
    }
    let lo = to_half4(vec4<f32>(unpack_pair(v.x, dtype), unpack_pair(v.y, dtype)), dtype);
    let hi = to_half4(vec4<f32>(unpack_pair(v.z, dtype), unpack_pair(v.w, dtype)), dtype);
    if (into_a) {
        a_s[at] = lo;
        a_s[at + 1u] = hi;
    } else {
        b_s[at] = lo;
        b_s[at + 1u] = hi;
    }
}

// The x vector of X_EPV elements starting at element i, packed as stored; elements from `avail`
// on are 0. With X_ALIGNED, i % X_EPV == 0 and avail >= X_EPV.
fn x_load(i: u32, avail: u32) -> vec4<u32> {
    if (X_ALIGNED) {
        return x[i / X_EPV];
    }
    var v = vec4<u32>(0u);
    for (var j = 0u; j < X_EPV; j++) {
        if (j < avail) {
            let e = i + j;
            if (X_DTYPE == DTYPE_F32) {
                v[j] = x[e >> 2u][e & 3u];
            } else {
                let half = (x[e >> 3u][(e >> 1u) & 3u] >> ((e & 1u) * 16u)) & 0xffffu;
                v[j >> 1u] |= half << ((j & 1u) * 16u);
            }
        }
    }
    return v;
}

// As x_load, for the weights.
fn w_load(i: u32, avail: u32) -> vec4<u32> {
    if (W_ALIGNED) {
        return w[i / W_EPV];
    }
    var v = vec4<u32>(0u);
    if (W_DTYPE == DTYPE_I8) {
        // int8 rows hold whole words (checked on the host): four word loads.
        for (var j = 0u; j < 4u; j++) {
            if (4u * j < avail) {
                let word = (i >> 2u) + j;
                v[j] = w[word >> 2u][word & 3u];
            }
        }
        return v;
    }
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

// This invocation's share of the x stage at k0: vectors tid, tid + COOP_WG, ... of the BM x BK
// tile, along k (rows past row_end and k past the end are 0).
fn load_x(row0: u32, row_end: u32, k0: u32, tid: u32) -> array<vec4<u32>, 8> {
    var v: array<vec4<u32>, 8>;
    let per_row = BK / X_EPV;
    for (var i = 0u; i < MAX_LOADS; i++) {
        let q = tid + i * COOP_WG;
        if (q < BM * per_row) {
            let row = row0 + q / per_row;
            let kk = k0 + (q % per_row) * X_EPV;
            if (row < row_end && kk < p.k) {
                v[i] = x_load(row * p.k + kk, p.k - kk);
            }
        }
    }
    return v;
}

fn store_x(v: array<vec4<u32>, 8>, tid: u32) {
    let per_row = BK / X_EPV;
    for (var i = 0u; i < MAX_LOADS; i++) {
        let q = tid + i * COOP_WG;
        if (q < BM * per_row) {
            let at = ((q / per_row) * A_LD + (q % per_row) * X_EPV) / 4u;
            stage_vector(v[i], X_DTYPE, true, at);
        }
    }
}

// Weight column of tile column c (tile output columns start at o0), and how many of the W_EPV
// columns from there are in range.
fn weight_col(o0: u32, c: u32) -> vec2<u32> {
    if (SWIGLU) {
        let half = BN / 2u;
        let up = c >= half;
        let oc = o0 + select(c, c - half, up);
        let avail = select(0u, min(W_EPV, p.n_out - oc), oc < p.n_out);
        return vec2<u32>(select(oc, p.n_out + oc, up), avail);
    }
    let col = o0 + c;
    return vec2<u32>(col, select(0u, min(W_EPV, p.n - col), col < p.n));
}

// Vectors per weight stage: along n for [e, k, n], along k for [e, n, k].
fn w_vectors() -> u32 {
    return BK * BN / W_EPV;
}

fn load_w(shard_g: u32, o0: u32, k0: u32, tid: u32) -> array<vec4<u32>, 8> {
    var v: array<vec4<u32>, 8>;
    for (var i = 0u; i < MAX_LOADS; i++) {
        let idx = tid + i * COOP_WG;
        if (idx < w_vectors()) {
            if (W_KN) {
                let vn = BN / W_EPV;
                let kk = k0 + idx / vn;
                let wc = weight_col(o0, (idx % vn) * W_EPV);
                if (kk < p.k && wc.y > 0u) {
                    v[i] = w_load((shard_g * p.k + kk) * p.n + wc.x, wc.y);
                }
            } else {
                let vk = BK / W_EPV;
                let kk = k0 + (idx % vk) * W_EPV;
                let wc = weight_col(o0, idx / vk);
                if (kk < p.k && wc.y > 0u) {
                    v[i] = w_load((shard_g * p.n + wc.x) * p.k + kk, p.k - kk);
                }
            }
        }
    }
    return v;
}

// The offset of weight column col of group g (int8 weights; 0 without offsets or past n).
fn offset_at(g: u32, col: u32) -> f32 {
    if (HAS_OFFSET && col < p.n) {
        return w_offset[g * p.n + col];
    }
    return 0.0;
}

// 16 int8 weights as f16 q + offset at b_s index `at` (four vec4<f16>). [e, k, n]: 16 columns
// from weight column col; [e, n, k]: 16 k values of column col.
fn stage_int8(v: vec4<u32>, g: u32, col: u32, at: u32) {
    for (var j = 0u; j < 4u; j++) {
        var o = vec4<f32>(offset_at(g, col));
        if (W_KN) {
            let c = col + 4u * j;
            o = vec4<f32>(offset_at(g, c), offset_at(g, c + 1u), offset_at(g, c + 2u), offset_at(g, c + 3u));
        }
        b_s[at + j] = to_half4(vec4<f32>(unpack4xI8(v[j])) + o, DTYPE_F32);
    }
}

// b_s is [BK][B_LD] for [e, k, n] weights (rows of n), [BN][B_LD] for [e, n, k] (rows of k).
// Group g and the tile's first output column o0 place int8 weights' offsets.
fn store_w(g: u32, o0: u32, v: array<vec4<u32>, 8>, tid: u32) {
    for (var i = 0u; i < MAX_LOADS; i++) {
        let idx = tid + i * COOP_WG;
        if (idx < w_vectors()) {
            var at: u32;
            var c: u32;
            if (W_KN) {
                let vn = BN / W_EPV;
                c = (idx % vn) * W_EPV;
                at = ((idx / vn) * B_LD + c) / 4u;
            } else {
                let vk = BK / W_EPV;
                c = idx / vk;
                at = ((idx / vk) * B_LD + (idx % vk) * W_EPV) / 4u;
            }
            if (W_DTYPE == DTYPE_I8) {
                stage_int8(v[i], g, weight_col(o0, c).x, at);
            } else {
                stage_vector(v[i], W_DTYPE, false, at);
            }
        }
    }
}

// int8 weights: the scales of weight columns col and col + 1 of group g (0 past n).
fn scale_pair(g: u32, col: u32) -> vec2<f32> {
    var s = vec2<f32>(0.0);
    for (var j = 0u; j < 2u; j++) {
        if (col + j < p.n) {
            s[j] = w_scale[g * p.n + col + j];
        }
    }
    return s;
}

// ---- fragments --------------------------------------------------------------------------------

// First tile column of fragment j of subgroup column sn. With SwiGLU, fragments j < FN / 2 are
// gate columns and fragment j + FN / 2 holds the matching up columns (BN / 2 further on).
fn frag_col(sn: u32, j: u32) -> u32 {
    if (SWIGLU) {
        let half = FN / 2u;
        let gate = (sn * half + j % half) * FRAG;
        return select(gate, BN / 2u + gate, j >= half);
    }
    return (sn * FN + j) * FRAG;
}

// Fragment i of subgroup row sm, k fragment kf: x rows, row-major.
fn load_a(sm: u32, i: u32, kf: u32) -> FragA {
    let at = ((sm * FM + i) * FRAG * A_LD + kf * FRAG) / 4u;
    let stride = A_LD / 4u;
    return coopLoadT<FragA>(&a_s[at], stride);
}

// Fragment j of subgroup column sn, k fragment kf: a k x n block of the weights, row-major in
// the [e, k, n] staging and column-major in the [e, n, k] one.
fn load_b(sn: u32, j: u32, kf: u32) -> FragB {
    let col = frag_col(sn, j);
    let stride = B_LD / 4u;
    if (W_KN) {
        let at = (kf * FRAG * B_LD + col) / 4u;
        return coopLoadT<FragB>(&b_s[at], stride);
    }
    let at = (col * B_LD + kf * FRAG) / 4u;
    return coopLoad<FragB>(&b_s[at], stride);
}

// ---- epilogue ---------------------------------------------------------------------------------

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

// Rows [row0, min(row0 + BM, row_end)) of group g, column tile nt. Every invocation reaches every
// cooperative operation: the loops' trip counts are uniform (override constants, p.k).
fn coop_tile(g: u32, row0: u32, row_end: u32, nt: u32, tid: u32) {
    let shard_g = g - p.expert_lo;
    let sub = tid / SG;
    let lane = tid % SG;
    let sm = sub / SG_N;
    let sn = sub % SG_N;
    let o0 = select(nt * BN, nt * (BN / 2u), SWIGLU);
    var acc: array<FragC, MAX_ACC>;
    var xa = load_x(row0, row_end, 0u, tid);
    var wb = load_w(shard_g, o0, 0u, tid);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        workgroupBarrier();
        store_x(xa, tid);
        store_w(g, o0, wb, tid);
        workgroupBarrier();
        // The next stage's loads go out before this stage's multiply-adds.
        if (k0 + BK < p.k) {
            xa = load_x(row0, row_end, k0 + BK, tid);
            wb = load_w(shard_g, o0, k0 + BK, tid);
        }
        for (var kf = 0u; kf < KF; kf++) {
            var b: array<FragB, MAX_FN>;
            for (var j = 0u; j < FN; j++) {
                b[j] = load_b(sn, j, kf);
            }
            for (var i = 0u; i < FM; i++) {
                let a = load_a(sm, i, kf);
                for (var j = 0u; j < FN; j++) {
                    acc[i * FN + j] = coopMultiplyAdd(a, b[j], acc[i * FN + j]);
                }
            }
        }
    }

    // Each subgroup stores one output fragment (SwiGLU: its gate and up fragments) to its part
    // of c_s, then its lanes write the outputs in column pairs.
    let frag_cols = select(FN, FN / 2u, SWIGLU);
    let base = sub * 2u * FRAG * FRAG;
    let pairs = FRAG * FRAG / 2u;
    for (var i = 0u; i < FM; i++) {
        for (var j = 0u; j < frag_cols; j++) {
            let value = acc[i * FN + j];
            let stride = FRAG;
            coopStoreT(value, &c_s[base], stride);
            if (SWIGLU) {
                let up = acc[i * FN + j + frag_cols];
                let up_at = base + FRAG * FRAG;
                coopStoreT(up, &c_s[up_at], stride);
            }
            workgroupBarrier();
            let tile_row = row0 + (sm * FM + i) * FRAG;
            let out_col = o0 + frag_col(sn, j);
            for (var q = lane; q < pairs; q += SG) {
                let r = q / (FRAG / 2u);
                let c = 2u * (q % (FRAG / 2u));
                let row = tile_row + r;
                let col = out_col + c;
                if (row < row_end && col < p.n_out) {
                    var v = vec2<f32>(c_s[base + r * FRAG + c], c_s[base + r * FRAG + c + 1u]);
                    if (W_DTYPE == DTYPE_I8) {
                        v *= scale_pair(g, col);
                    }
                    if (SWIGLU) {
                        let u = base + FRAG * FRAG + r * FRAG + c;
                        var up = vec2<f32>(c_s[u], c_s[u + 1u]);
                        if (W_DTYPE == DTYPE_I8) {
                            up *= scale_pair(g, p.n_out + col);
                        }
                        v = vec2<f32>(silu(v.x) * up.x, silu(v.y) * up.y);
                    }
                    store_pair(row, col, v, col + 1u < p.n_out);
                }
            }
            workgroupBarrier();
        }
    }
}

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

// Tiles of one group: row tiles fastest, so that the workgroups sharing a weight column strip
// run together and find it in cache.
@compute @workgroup_size(COOP_WG)
fn coop_gemm(
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
        let m_tiles = (end - start + BM - 1u) / BM;
        coop_tile(g, start + (local % m_tiles) * BM, end, local / m_tiles, tid);
    }
}

// The baseline: one dispatch per expert, rows and expert from the params. The grid is exact, so
// no workgroup returns early (cooperative operations need uniform control flow).
@compute @workgroup_size(COOP_WG)
fn coop_expert(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    // Keeps the schedule binding in the layout, so both entry points bind the same resources.
    _ = arrayLength(&sched);
    let m_tiles = (p.row_end - p.row_start + BM - 1u) / BM;
    let t = linear_workgroup(wid, num);
    if (t < m_tiles * p.n_tiles) {
        coop_tile(p.group, p.row_start + (t % m_tiles) * BM, p.row_end, t / m_tiles, tid);
    }
}
