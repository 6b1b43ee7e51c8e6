// AMLA: MLA decode attention over a paged latent KV cache on cooperative matrices (tensor cores).
// The SIMT kernel (amla_decode.wgsl) is the fallback and the A/B baseline; the host chooses this
// one where the adapter reports f16 x f16 -> f32 fragments and q, the cache and P are 16-bit
// (src/ops/amla/coop.rs). Two entry points:
//
// `prep`: one workgroup per query row: q / 2^e in f16, with 2^e the power of two of the row's
//   largest |q| (exact for f16 and bf16 q: only the exponent moves), and the row's f32 factor
//   softmax_scale * log2(e) * 2^e, which turns q16 . k16 into the score in log2 units.
//
// `decode`: one workgroup per work item of the split-KV schedule (a key range of one sequence
//   for a head block of HB query rows), NSG subgroups of SG lanes, fragments FRAG x FRAG. Per tile
//   of TN keys:
//   1. stage    the TN x 576 key tile into workgroup memory as f16 (16-byte loads through the
//               block table; keys past the range are zero-filled, so NaN padding is never read;
//               bf16 values beyond the f16 range saturate at +-65504)
//   2. S        subgroup (ks, s fragment) multiplies q16 (from the workspace, A) by the key tile
//               (B) over its 1/KSPLIT share of the 576 dims and stores its partial S fragment
//   3. reduce   the KSPLIT partials are summed, scaled by the row factor and masked (range end,
//               causal limit)
//   4. softmax  one invocation per row: the reference max m_ref moves only when the tile's max
//               rises above it by more than LAZY binades; P^T (f16) goes into the rope columns
//               512..575 of the key tile, which S no longer needs
//   5. rescale  O lives in accumulator fragments, which have no per-element access: a row
//               fragment whose rows moved their reference makes one round trip through
//               workgroup memory (store, rescale every element by its row's step, reload)
//   6. P.V      subgroup g owns output columns g * DSG .. of all HB rows: O += P^T' . V
// The epilogue sends O through workgroup memory once more to normalise it (and apply AMLA's
// guard) and writes the output or a partial (O, lse) for amla_combine.wgsl.
//
// The rescale (AMLA's exponent add with its compensation, or the classic multiply) follows the
// SIMT kernel's formulas, with m_ref in the place of its running max: with LAZY = 0 the steps are
// the SIMT kernel's. P is p * c_hat (AMLA) or p (multiply) with p = 2^(s - m_ref) <= 2^LAZY,
// rounded as P_ROUND says and held as f16.

enable f16;
enable wgpu_cooperative_matrix;

override HB: u32 = 16u;         // query rows per workgroup: a multiple of FRAG, at most 64
override TN: u32 = 32u;         // keys per tile: a multiple of FRAG
override NSG: u32 = 8u;         // subgroups per workgroup
override SG: u32 = 32u;         // lanes per subgroup (the adapter's fixed subgroup size)
override KSPLIT: u32 = 4u;      // subgroups sharing one S fragment (NSG = KSPLIT x S fragments)
override LAZY: f32 = 8.0;       // binades a row's max may rise above m_ref before O is rescaled
override KV_DTYPE: u32 = 2u;    // DTYPE_* of the cache (f16 or bf16)
override OUT_DTYPE: u32 = 2u;   // DTYPE_* of out
override RESCALE_AMLA: bool = true;
override P_ROUND: u32 = 1u;     // 1: P rounded to f16; 2: to bf16 (then held as f16)

override WG: u32 = NSG * SG;
override NRF: u32 = HB / FRAG;               // row fragments
override NKF: u32 = TN / FRAG;               // key fragments of a tile
override DSG: u32 = 512u / NSG;              // output columns per subgroup
override NCF: u32 = DSG / FRAG;              // output column fragments per subgroup
override CHUNKS: u32 = 576u / FRAG / KSPLIT; // k-steps of one partial S fragment
override FV: u32 = FRAG / 4u;                // vec4s per fragment row
override FF4: u32 = FRAG * FV;               // vec4s per fragment

const MAX_ACC: u32 = 16u;       // accumulator fragments per subgroup (NRF x NCF), see coop.rs
const MAX_NCF: u32 = 8u;
const ROW4: u32 = 146u;         // vec4<f16> per staged key row and per q16 row (576 + 8 halves)
const FACTOR4: u32 = 144u;      // q16 row: the f32 row factor's bytes in halves 576 .. 579
const ROPE4: u32 = 128u;        // first rope column (512) of a staged key row, in vec4s
const MASKED: f32 = -3.0e38;    // score of a masked key and the initial reference max (finite:
                                // WGSL lets implementations assume there are no infinities)
const NEG_INF_BITS: u32 = 0xff800000u;
const GUARD_BITS: u32 = 0x501502f9u; // bits of 1e10
const INF_BITS: u32 = 0x7f800000u;
const LN2: f32 = 0.6931471805599453;
const TWO_POW_23: f32 = 8388608.0;
const F16_MAX: f32 = 65504.0;

struct DecodeParams {
    s_q: u32,          // query tokens per sequence
    h_q: u32,          // query heads
    rows: u32,         // s_q * h_q rows per sequence
    rows_padded: u32,  // row blocks * HB
    num_blocks: u32,   // pages in kv_cache [num_blocks, page, 576]
    page_shift: u32,   // log2(page size)
    max_blocks: u32,   // block_table [b, max_blocks] columns
    num_items: u32,    // work items in sched
    causal: u32,       // 1: query i of s_q sees keys 0 ..= L - s_q + i
    seqlens_at: u32,   // offset of cache_seqlens [b] in sched (words)
    table_at: u32,     // offset of block_table [b, max_blocks] in sched (words)
    _pad: u32,
}

struct PrepParams {
    rows_total: u32,   // b * s_q * h_q
    rows: u32,         // s_q * h_q
    rows_padded: u32,  // row blocks * HB: q16 rows per sequence
    scale_log2: f32,   // softmax_scale * log2(e)
}

// ---- prep ----

@group(0) @binding(0) var<storage, read> q_in: array<u32>;                 // [b, s_q, h_q, 576] Q_DTYPE
@group(0) @binding(1) var<storage, read_write> q_out: array<vec4<f16>>;  // [b, rows_padded, 146]
@group(0) @binding(2) var<uniform> prep_params: PrepParams;

override Q_DTYPE: u32 = 2u;     // DTYPE_* of q (f16 or bf16)

var<workgroup> prep_max: array<f32, 64>;

// A finite f32 rounded to the nearest f16 (ties to even), saturated at +-65504, as f16. WGSL
// leaves the rounding of f32 -> f16 conversions to the implementation: this rounds first.
fn to_f16(x: f32) -> f16 {
    let a = min(abs(x), F16_MAX);
    var r: f32;
    if (a >= 6.103515625e-05) { // 2^-14: normal f16
        let bits = bitcast<u32>(a);
        r = bitcast<f32>((bits + 0xfffu + ((bits >> 13u) & 1u)) & 0xffffe000u);
    } else {
        r = round(a * 16777216.0) * 5.9604644775390625e-08; // f16 subnormals: multiples of 2^-24
    }
    return f16(select(r, -r, x < 0.0));
}

@compute @workgroup_size(64)
fn prep(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = linear_workgroup(wid, num);
    if (row >= prep_params.rows_total) {
        return;
    }
    // 144 quads per row: invocation lid has quads lid, lid + 64 and (lid < 16) lid + 128.
    var v: array<vec4<f32>, 3>;
    var largest = 0.0;
    for (var j = 0u; j < 3u; j++) {
        let quad = lid + 64u * j;
        if (quad < 144u) {
            let w = 2u * (row * 144u + quad);
            v[j] = vec4<f32>(unpack_pair(q_in[w], Q_DTYPE), unpack_pair(q_in[w + 1u], Q_DTYPE));
            let a = abs(v[j]);
            largest = max(largest, max(max(a.x, a.y), max(a.z, a.w)));
        }
    }
    prep_max[lid] = largest;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (lid < half) {
            prep_max[lid] = max(prep_max[lid], prep_max[lid + half]);
        }
        workgroupBarrier();
    }
    // 2^e with the row's largest |q| in [2^e, 2^(e+1)); e = 0 for a row of zeros.
    let field = i32((bitcast<u32>(prep_max[0]) >> 23u) & 0xffu);
    var e = 0;
    if (prep_max[0] > 0.0) {
        e = max(field, 1) - 127;
    }
    let seq = row / prep_params.rows;
    let out_row = (seq * prep_params.rows_padded + row % prep_params.rows) * ROW4;
    for (var j = 0u; j < 3u; j++) {
        let quad = lid + 64u * j;
        if (quad < 144u) {
            let x = ldexp(v[j], vec4<i32>(-e));
            q_out[out_row + quad] = vec4<f16>(to_f16(x.x), to_f16(x.y), to_f16(x.z), to_f16(x.w));
        }
    }
    if (lid == 0u) {
        // The factor's f32 bits as four bytes, each an integer f16 holds exactly.
        let bits = vec4<u32>(bitcast<u32>(ldexp(prep_params.scale_log2, e)));
        q_out[out_row + FACTOR4] = vec4<f16>((bits >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu));
    }
}

// ---- decode ----

@group(0) @binding(0) var<storage, read> q16: array<vec4<f16>>;         // [b, rows_padded, 146] from prep
@group(0) @binding(1) var<storage, read> kv_cache: array<vec4<u32>>;    // [num_blocks, page, 576] KV_DTYPE
@group(0) @binding(2) var<storage, read> sched: array<u32>;              // work items [num_items, 8], combine jobs, seqlens, block table
@group(0) @binding(3) var<storage, read_write> out: array<u32>;         // [b, s_q, h_q, 512] OUT_DTYPE
@group(0) @binding(4) var<storage, read_write> lse: array<u32>;         // [b, h_q, s_q] f32 bits
@group(0) @binding(5) var<storage, read_write> part_out: array<vec4<f32>>; // [slots, HB, 128]
@group(0) @binding(6) var<storage, read_write> part_lse: array<u32>;    // [slots, HB] f32 bits
@group(0) @binding(7) var<uniform> params: DecodeParams;

// The key tile [TN][146] as f16; after the S phase its rope columns hold P^T [TN][HB].
var<workgroup> kv16: array<vec4<f16>, TN * ROW4>;
// S partials [KSPLIT][HB][TN] f32 (slot 0 then holds the scores); later, per subgroup, one O
// fragment [NSG][FRAG][FRAG] on its way through a rescale or the epilogue. Both are
// NSG x FRAG x FRAG floats.
var<workgroup> work: array<vec4<f32>, NSG * FF4>;
var<workgroup> row_step: array<u32, HB>;     // this tile's O rescale per row (int add or f32 factor), then 1 / L
var<workgroup> row_factor: array<f32, HB>;   // softmax_scale * log2(e) * 2^e per row
var<workgroup> rescale_frag: array<atomic<u32>, NRF>; // 1: the row fragment makes a round trip this tile

// Element `i` of `work` as a scalar array.
fn work_get(i: u32) -> f32 {
    return work[i / 4u][i % 4u];
}

fn work_set(i: u32, x: f32) {
    work[i / 4u][i % 4u] = x;
}

// A non-negative finite f32 rounded to the nearest f16 value (ties to even), kept in f32.
fn round_f16(x: f32) -> f32 {
    if (x >= 6.103515625e-05) {
        let bits = bitcast<u32>(x);
        return bitcast<f32>((bits + 0xfffu + ((bits >> 13u) & 1u)) & 0xffffe000u);
    }
    return round(x * 16777216.0) * 5.9604644775390625e-08;
}

// A non-negative finite f32 rounded to the nearest bf16 value (ties to even), kept in f32.
fn round_bf16(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    return bitcast<f32>((bits + 0x7fffu + ((bits >> 16u) & 1u)) & 0xffff0000u);
}

// P (and AMLA's c_hat) rounded as P_ROUND says.
fn round_p(x: f32) -> f32 {
    if (P_ROUND == 2u) {
        return round_bf16(x);
    }
    return round_f16(x);
}

// Eight 16-bit cache values (one 16-byte load) as f16; bf16 beyond the f16 range saturates.
fn stage8(w: vec4<u32>) -> array<vec4<f16>, 2> {
    if (KV_DTYPE == DTYPE_F16) {
        // f16 -> f32 -> f16 is exact (naga has no bitcast from u32 pairs to vec4<f16>).
        return array<vec4<f16>, 2>(
            vec4<f16>(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y))),
            vec4<f16>(vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w))),
        );
    }
    let a = vec4<f32>(unpack_pair(w.x, KV_DTYPE), unpack_pair(w.y, KV_DTYPE));
    let b = vec4<f32>(unpack_pair(w.z, KV_DTYPE), unpack_pair(w.w, KV_DTYPE));
    return array<vec4<f16>, 2>(
        vec4<f16>(to_f16(a.x), to_f16(a.y), to_f16(a.z), to_f16(a.w)),
        vec4<f16>(to_f16(b.x), to_f16(b.y), to_f16(b.z), to_f16(b.w)),
    );
}

// O rescaled by a row's step: AMLA's integer add on the f32 bits (exact zeros stay: the add
// would wrap them), or the multiply.
fn rescale(o: vec4<f32>, step: u32) -> vec4<f32> {
    if (RESCALE_AMLA) {
        let bits = bitcast<vec4<u32>>(o);
        let zero = (bits & vec4<u32>(0x7fffffffu)) == vec4<u32>(0u);
        return bitcast<vec4<f32>>(bits + select(vec4<u32>(step), vec4<u32>(0u), zero));
    }
    return o * bitcast<f32>(step);
}

// Keys 0 .. limit of the sequence are visible to row `row_seq`.
fn row_limit(row_seq: u32, seqlen: u32) -> u32 {
    if (params.causal == 0u) {
        return seqlen;
    }
    let token = row_seq / params.h_q;
    return select(0u, seqlen + token + 1u - params.s_q, seqlen + token + 1u > params.s_q);
}

@compute @workgroup_size(WG)
fn decode(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    // No early return: naga requires cooperative operations in uniform control flow, and a
    // return makes what follows non-uniform to it.
    let item_index = linear_workgroup(wid, num);
    if (item_index < params.num_items) {
        decode_item(item_index, tid, sg);
    }
}

// One work item; `sg` is this invocation's subgroup.
fn decode_item(item_index: u32, tid: u32, sg: u32) {
    let seq = sched[8u * item_index];
    let row_block = sched[8u * item_index + 1u];
    let key_begin = sched[8u * item_index + 2u];
    let key_end = sched[8u * item_index + 3u];
    let slot = sched[8u * item_index + 4u];
    let seqlen = sched[params.seqlens_at + seq];
    let page_mask = (1u << params.page_shift) - 1u;
    let q_row0 = seq * params.rows_padded + row_block * HB;

    // S-phase coordinates of this subgroup: its share of the dims and its S fragment.
    let ks = sg % KSPLIT;
    let s_frag = sg / KSPLIT;
    let s_row = (s_frag / NKF) * FRAG;
    let s_key = (s_frag % NKF) * FRAG;

    if (tid < HB) {
        let bytes = vec4<u32>(q16[(q_row0 + tid) * ROW4 + FACTOR4]) << vec4<u32>(0u, 8u, 16u, 24u);
        row_factor[tid] = bitcast<f32>(bytes.x | bytes.y | bytes.z | bytes.w);
    }
    var acc: array<FragC, MAX_ACC>; // O [rf][cf]: rows rf * FRAG .., columns sg * DSG + cf * FRAG ..
    for (var i = 0u; i < MAX_ACC; i++) {
        acc[i] = FragC();
    }
    // Row state, held by invocation `tid` for row `tid` (tid < HB).
    var m_ref = MASKED;
    var l_run = 0.0;
    var n_ref = 0.0;
    var cof_ref = 1.0;
    var c_hat_ref = 1.0;

    for (var tile_begin = key_begin; tile_begin < key_end; tile_begin += TN) {
        // 1. stage the key tile as f16
        if (tid < NRF) {
            atomicStore(&rescale_frag[tid], 0u);
        }
        for (var i = tid; i < TN * 72u; i += WG) {
            let key = i / 72u;
            let chunk = i % 72u;
            let kk = tile_begin + key;
            var w = vec4<u32>(0u);
            if (kk < key_end) {
                let block = sched[params.table_at + seq * params.max_blocks + (kk >> params.page_shift)];
                if (block < params.num_blocks) {
                    w = kv_cache[((block << params.page_shift) + (kk & page_mask)) * 72u + chunk];
                }
            }
            let h = stage8(w);
            kv16[key * ROW4 + 2u * chunk] = h[0];
            kv16[key * ROW4 + 2u * chunk + 1u] = h[1];
        }
        workgroupBarrier();

        // 2. partial S over this subgroup's dims
        var s_acc = FragC();
        for (var j = 0u; j < CHUNKS; j++) {
            let c = (ks * CHUNKS + j) * FV;
            let a_at = (q_row0 + s_row) * ROW4 + c;
            let a = coopLoadT<FragA>(&q16[a_at], ROW4);
            let b_at = s_key * ROW4 + c;
            let b = coopLoad<FragB>(&kv16[b_at], ROW4);
            s_acc = coopMultiplyAdd(a, b, s_acc);
        }
        let s_at = (ks * HB * TN + s_row * TN + s_key) / 4u;
        let s_stride = TN / 4u;
        let s_val = s_acc;
        coopStoreT(s_val, &work[s_at], s_stride);
        workgroupBarrier();

        // 3. sum the partials, scale to log2 units, mask (scores replace partial slot 0)
        for (var e = tid; e < HB * TN; e += WG) {
            var s = 0.0;
            for (var k = 0u; k < KSPLIT; k++) {
                s += work_get(k * HB * TN + e);
            }
            let r = e / TN;
            let kk = tile_begin + e % TN;
            let visible = kk < key_end && kk < row_limit(row_block * HB + r, seqlen);
            work_set(e, select(MASKED, s * row_factor[r], visible));
        }
        workgroupBarrier();

        // 4. online softmax with a lazy reference max, one invocation per row; P^T into the
        // rope columns of the tile
        if (tid < HB) {
            var m_tile = MASKED;
            for (var c = 0u; c < TN; c++) {
                m_tile = max(m_tile, work_get(tid * TN + c));
            }
            var step = bitcast<u32>(1.0);
            if (RESCALE_AMLA) {
                step = 0u;
            }
            if (m_tile > m_ref + LAZY) {
                let first = m_ref == MASKED;
                if (RESCALE_AMLA) {
                    let n_new = -round(m_tile);
                    let c = exp2(m_tile + n_new);
                    let c_hat = round_p(c);
                    let cof = c / c_hat;
                    if (!first) {
                        let dn = max(n_new - n_ref, -30.0);
                        let frac = 1.5 * (cof_ref / cof - 1.0) + 1e-6;
                        step = bitcast<u32>((i32(dn) << 23u) + i32(round(frac * TWO_POW_23)));
                    }
                    n_ref = n_new;
                    cof_ref = cof;
                    c_hat_ref = c_hat;
                } else if (!first) {
                    step = bitcast<u32>(exp2(m_ref - m_tile));
                }
                if (!first) {
                    l_run = l_run * exp2(m_ref - m_tile);
                    atomicStore(&rescale_frag[tid / FRAG], 1u);
                }
                m_ref = m_tile;
            }
            row_step[tid] = step;
            let p_mult = select(1.0, c_hat_ref, RESCALE_AMLA);
            for (var c = 0u; c < TN; c++) {
                let s = work_get(tid * TN + c);
                var p = 0.0;
                if (s > MASKED) {
                    p = exp2(s - m_ref);
                }
                l_run += p;
                let at = c * ROW4 + ROPE4 + tid / 4u;
                kv16[at][tid % 4u] = f16(round_f16(round_p(p * p_mult)));
            }
        }

        // 5. one round trip through workgroup memory per row fragment whose reference moved
        // (read with workgroupUniformLoad: naga must see the condition as uniform)
        for (var rf = 0u; rf < NRF; rf++) {
            if (workgroupUniformLoad(&rescale_frag[rf]) != 0u) {
                for (var cf = 0u; cf < NCF; cf++) {
                    let o_at = sg * FF4;
                    let o_stride = FV;
                    let o_val = acc[rf * NCF + cf];
                    coopStoreT(o_val, &work[o_at], o_stride);
                    workgroupBarrier();
                    for (var e = tid; e < NSG * FF4; e += WG) {
                        work[e] = rescale(work[e], row_step[rf * FRAG + (e % FF4) / FV]);
                    }
                    workgroupBarrier();
                    acc[rf * NCF + cf] = coopLoadT<FragC>(&work[o_at], o_stride);
                    workgroupBarrier();
                }
            }
        }

        // 6. O += P.V over the tile's keys
        for (var kf = 0u; kf < NKF; kf++) {
            var v: array<FragB, MAX_NCF>;
            for (var cf = 0u; cf < NCF; cf++) {
                let v_at = kf * FRAG * ROW4 + (sg * DSG + cf * FRAG) / 4u;
                v[cf] = coopLoadT<FragB>(&kv16[v_at], ROW4);
            }
            for (var rf = 0u; rf < NRF; rf++) {
                let p_at = kf * FRAG * ROW4 + ROPE4 + rf * FV;
                let p = coopLoad<FragA>(&kv16[p_at], ROW4);
                for (var cf = 0u; cf < NCF; cf++) {
                    acc[rf * NCF + cf] = coopMultiplyAdd(p, v[cf], acc[rf * NCF + cf]);
                }
            }
        }
        workgroupBarrier();
    }

    // Row normaliser and lse (natural log); an empty row gives out = 0, lse = -inf.
    var lse_bits = NEG_INF_BITS;
    if (tid < HB) {
        var norm = 0.0;
        if (l_run > 0.0) {
            norm = 1.0 / select(l_run, l_run * c_hat_ref, RESCALE_AMLA);
            lse_bits = bitcast<u32>((m_ref + log2(l_run)) * LN2);
        }
        row_step[tid] = bitcast<u32>(norm);
    }
    workgroupBarrier();

    // Epilogue: every O fragment through workgroup memory: guard, normalise, write.
    for (var rf = 0u; rf < NRF; rf++) {
        for (var cf = 0u; cf < NCF; cf++) {
            let o_at = sg * FF4;
            let o_stride = FV;
            let o_val = acc[rf * NCF + cf];
            coopStoreT(o_val, &work[o_at], o_stride);
            workgroupBarrier();
            for (var e = tid; e < NSG * FF4; e += WG) {
                let r = rf * FRAG + (e % FF4) / FV;
                let row_seq = row_block * HB + r;
                if (row_seq < params.rows) {
                    var v = work[e];
                    if (RESCALE_AMLA) {
                        // |O| > 1e10 (as bits, so that no infinity is compared with); NaN passes.
                        let magnitude = bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu);
                        let wrapped = (magnitude > vec4<u32>(GUARD_BITS)) & (magnitude <= vec4<u32>(INF_BITS));
                        v = select(v, vec4<f32>(0.0), wrapped);
                    }
                    v = v * bitcast<f32>(row_step[r]);
                    let col = (e / FF4) * DSG + cf * FRAG + 4u * (e % FV);
                    if (slot != 0xffffffffu) {
                        part_out[(slot * HB + r) * 128u + col / 4u] = v;
                    } else {
                        let at = (seq * params.rows + row_seq) * 512u + col;
                        if (OUT_DTYPE == DTYPE_F32) {
                            let bits = bitcast<vec4<u32>>(v);
                            out[at] = bits.x;
                            out[at + 1u] = bits.y;
                            out[at + 2u] = bits.z;
                            out[at + 3u] = bits.w;
                        } else {
                            out[at / 2u] = pack_pair(v.xy, OUT_DTYPE);
                            out[at / 2u + 1u] = pack_pair(v.zw, OUT_DTYPE);
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (tid < HB) {
        let row_seq = row_block * HB + tid;
        if (row_seq < params.rows) {
            if (slot != 0xffffffffu) {
                part_lse[slot * HB + tid] = lse_bits;
            } else {
                let token = row_seq / params.h_q;
                let head = row_seq % params.h_q;
                lse[(seq * params.h_q + head) * params.s_q + token] = lse_bits;
            }
        }
    }
}
