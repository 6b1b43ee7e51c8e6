// AMLA: MLA decode attention over a paged latent KV cache on cooperative matrices (tensor cores).
// The SIMT kernel (amla_decode.wgsl) is the fallback and the A/B baseline; the host chooses this
// one where the adapter reports f16 x f16 -> f32 fragments, q is 16-bit, the cache 16-bit or
// 8-bit and P 16-bit (src/ops/amla/coop.rs). Composed after amla_shared.wgsl (NaN checks, cache
// decoding, P rounding, AMLA's step, rescale and guard). Two entry points:
//
// `prep`: one workgroup per query row: q / 2^e in f16, with 2^e the power of two of the row's
//   largest |q| (exact for f16 and bf16 q: only the exponent moves), and the row's f32 factor
//   softmax_scale * log2(e) * 2^e, which turns q16 . k16 into the score in log2 units. A row
//   holding a NaN or inf gets zeros and a NaN factor: its scores are then poisoned.
//
// `decode`: one workgroup per work item of the split-KV schedule (a key range of one sequence
//   for a head block of HB query rows), NSG subgroups of SG lanes, fragments FRAG x FRAG. Per tile
//   of TN keys:
//   1. stage    the TN x 576 key tile into workgroup memory as f16 (16-byte loads through the
//               block table; keys past the range are zero-filled, so NaN padding is never read;
//               an 8-bit row is decoded (codes times scales) first; bf16 or decoded values
//               beyond the f16 range saturate at +-65504); NaN and infinities are cleared to 0
//               and their key flagged
//   2. S        subgroup (ks, s fragment) multiplies q16 (from the workspace, A) by the key tile
//               (B) over its 1/KSPLIT share of the 576 dims and stores its partial S fragment
//   3. reduce   the KSPLIT partials are summed, scaled by the row factor and masked (range end,
//               causal limit); a visible flagged key, or a non-finite score, is POISONED
//   4. softmax  one invocation per row: the reference max m_ref moves only when the tile's max
//               rises above it by more than LAZY binades; P^T (f16) goes into the rope columns
//               512..575 of the key tile, which S no longer needs
//   5. rescale  O lives in accumulator fragments, which have no per-element access: a row
//               fragment whose rows moved their reference makes one round trip through
//               workgroup memory (store, rescale every element by its row's step, reload)
//   6. P.V      subgroup g owns output columns g * DSG .. of all HB rows: O += P^T' . V
// The epilogue sends O through workgroup memory once more to normalise it (and apply AMLA's
// guard) and writes the output or a partial (O, lse) for amla_combine.wgsl; a row that saw a
// POISONED key writes NaN (out and lse).
//
// The softmax step is the SIMT kernel's with the reference max m_ref in the place of its running
// max (with LAZY = 0 they are the same): AMLA's exponent add with its compensation, or the
// classic multiply. P is p * c_hat (AMLA) or p (multiply) with p = 2^(s - m_ref) <= 2^LAZY,
// rounded as P_ROUND says and held as f16.

enable f16;
enable wgpu_cooperative_matrix;

override HB: u32 = 16u;         // query rows per workgroup: a multiple of FRAG, at most 64
override TN: u32 = 32u;         // keys per tile: a multiple of FRAG
override NSG: u32 = 8u;         // subgroups per workgroup
override SG: u32 = 32u;         // lanes per subgroup (the adapter's fixed subgroup size)
override KSPLIT: u32 = 4u;      // subgroups sharing one S fragment (NSG = KSPLIT x S fragments)
override LAZY: f32 = 8.0;       // binades a row's max may rise above m_ref before O is rescaled
override KV_FORMAT: u32 = 2u;   // DTYPE_F16 / DTYPE_BF16 of a float cache, or KV_FP8 / KV_INT8
override OUT_DTYPE: u32 = 2u;   // DTYPE_* of out
override RESCALE_AMLA: bool = true;
override P_ROUND: u32 = 1u;     // P_ROUND_F16 or P_ROUND_BF16 (P is then held as f16)

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
const QUADS: u32 = 144u;        // 576 dims in groups of 4
const V_QUADS: u32 = 128u;      // 512 dims in groups of 4
const LN2: f32 = 0.6931471805599453;
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
var<workgroup> prep_bad: atomic<u32>;   // 1: the row holds a NaN or inf

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
    if (lid == 0u) {
        atomicStore(&prep_bad, 0u);
    }
    workgroupBarrier();
    // 144 quads per row: invocation lid has quads lid, lid + 64 and (lid < 16) lid + 128.
    var v: array<vec4<f32>, 3>;
    var largest = 0.0;
    for (var j = 0u; j < 3u; j++) {
        let quad = lid + 64u * j;
        if (quad < QUADS) {
            let w = 2u * (row * QUADS + quad);
            let words = vec4<u32>(q_in[w], q_in[w + 1u], 0u, 0u);
            if (any(nonfinite_mask(words, Q_DTYPE) != vec4<u32>(0u))) {
                atomicStore(&prep_bad, 1u);
            } else {
                v[j] = vec4<f32>(unpack_pair(words.x, Q_DTYPE), unpack_pair(words.y, Q_DTYPE));
                let a = abs(v[j]);
                largest = max(largest, max(max(a.x, a.y), max(a.z, a.w)));
            }
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
    let bad = atomicLoad(&prep_bad) != 0u;
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
        if (quad < QUADS) {
            let x = select(ldexp(v[j], vec4<i32>(-e)), vec4<f32>(0.0), bad);
            q_out[out_row + quad] = vec4<f16>(to_f16(x.x), to_f16(x.y), to_f16(x.z), to_f16(x.w));
        }
    }
    if (lid == 0u) {
        // The factor's f32 bits as four bytes, each an integer f16 holds exactly.
        let factor_bits = select(bitcast<u32>(ldexp(prep_params.scale_log2, e)), NAN_BITS, bad);
        let bits = vec4<u32>(factor_bits);
        q_out[out_row + FACTOR4] = vec4<f16>((bits >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu));
    }
}

// ---- decode ----

@group(0) @binding(0) var<storage, read> q16: array<vec4<f16>>;         // [b, rows_padded, 146] from prep
@group(0) @binding(1) var<storage, read> kv_cache: array<vec4<u32>>;    // [num_blocks, page, 576] float, or [num_blocks, page, 656] bytes
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
var<workgroup> row_factor: array<f32, HB>;   // softmax_scale * log2(e) * 2^e per row (NaN: q row not finite)
var<workgroup> row_nan: array<u32, HB>;      // 1: the row saw a POISONED key
var<workgroup> key_flag: array<atomic<u32>, TN>; // 1: the tile's key held a NaN or inf
var<workgroup> rescale_frag: array<atomic<u32>, NRF>; // 1: the row fragment makes a round trip this tile

// Element `i` of `work` as a scalar array.
fn work_get(i: u32) -> f32 {
    return work[i / 4u][i % 4u];
}

fn work_set(i: u32, x: f32) {
    work[i / 4u][i % 4u] = x;
}

fn to_f16x4(v: vec4<f32>) -> vec4<f16> {
    return vec4<f16>(to_f16(v.x), to_f16(v.y), to_f16(v.z), to_f16(v.w));
}

// Word `i` of the cache (a packed row is read word by word).
fn cache_word(i: u32) -> u32 {
    return kv_cache[i >> 2u][i & 3u];
}

// Dims 4 quad .. 4 quad + 3 of packed cache row `row`, decoded to f32 (decode_packed).
fn packed_quad(row: u32, quad: u32) -> Decoded {
    let base = row * PACKED_WORDS;
    if (quad < V_QUADS) {
        let codes = vec2<u32>(cache_word(base + quad), 0u);
        return decode_packed(quad, codes, cache_word(base + PACKED_SCALES_AT + quad / 32u), KV_FORMAT);
    }
    let at = base + PACKED_ROPE_AT + 2u * (quad - V_QUADS);
    return decode_packed(quad, vec2<u32>(cache_word(at), cache_word(at + 1u)), 0u, KV_FORMAT);
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

    // Workgroup memory is not zero-initialised (the pipelines skip it): the key flags are reset
    // here and then after every use.
    if (tid < HB) {
        let bytes = vec4<u32>(q16[(q_row0 + tid) * ROW4 + FACTOR4]) << vec4<u32>(0u, 8u, 16u, 24u);
        row_factor[tid] = bitcast<f32>(bytes.x | bytes.y | bytes.z | bytes.w);
    }
    if (tid < TN) {
        atomicStore(&key_flag[tid], 0u);
    }
    workgroupBarrier();
    var acc: array<FragC, MAX_ACC>; // O [rf][cf]: rows rf * FRAG .., columns sg * DSG + cf * FRAG ..
    for (var i = 0u; i < MAX_ACC; i++) {
        acc[i] = FragC();
    }
    // Row state, held by invocation `tid` for row `tid` (tid < HB).
    var m_ref = MASKED;
    var l_run = 0.0;
    var split = AmlaSplit(0.0, 1.0, 1.0);
    var poisoned = false;

    for (var tile_begin = key_begin; tile_begin < key_end; tile_begin += TN) {
        // 1. stage the key tile as f16, NaN and infinities cleared and their key flagged
        if (tid < NRF) {
            atomicStore(&rescale_frag[tid], 0u);
        }
        if (KV_FORMAT >= KV_FP8) {
            for (var i = tid; i < TN * QUADS; i += WG) {
                let key = i / QUADS;
                let quad = i % QUADS;
                let kk = tile_begin + key;
                var d = Decoded(vec4<f32>(0.0), false);
                if (kk < key_end) {
                    let block = sched[params.table_at + seq * params.max_blocks + (kk >> params.page_shift)];
                    if (block < params.num_blocks) {
                        d = packed_quad((block << params.page_shift) + (kk & page_mask), quad);
                    }
                }
                if (d.bad) {
                    atomicOr(&key_flag[key], 1u);
                }
                kv16[key * ROW4 + quad] = to_f16x4(d.v);
            }
        } else {
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
                let bad = nonfinite_mask(w, KV_FORMAT);
                if (any(bad != vec4<u32>(0u))) {
                    atomicOr(&key_flag[key], 1u);
                    w &= ~bad;
                }
                // f16 values are exact in f32 and back; bf16 beyond the f16 range saturates.
                let a = vec4<f32>(unpack_pair(w.x, KV_FORMAT), unpack_pair(w.y, KV_FORMAT));
                let b = vec4<f32>(unpack_pair(w.z, KV_FORMAT), unpack_pair(w.w, KV_FORMAT));
                kv16[key * ROW4 + 2u * chunk] = to_f16x4(a);
                kv16[key * ROW4 + 2u * chunk + 1u] = to_f16x4(b);
            }
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
            let c = e % TN;
            let kk = tile_begin + c;
            var score = MASKED;
            if (kk < key_end && kk < row_limit(row_block * HB + r, seqlen)) {
                let factor = row_factor[r];
                score = s * factor;
                let bad = atomicLoad(&key_flag[c]) != 0u || is_nonfinite_f32(bitcast<u32>(factor))
                    || is_nonfinite_f32(bitcast<u32>(score));
                score = select(score, POISONED, bad);
            }
            work_set(e, score);
        }
        workgroupBarrier();

        // 4. online softmax with a lazy reference max, one invocation per row (the SIMT kernel's
        // step with m_ref for its running max); P^T into the rope columns of the tile
        if (tid < TN) {
            atomicStore(&key_flag[tid], 0u); // read in step 3 only; the next stage sets it again
        }
        if (tid < HB) {
            var m_tile = MASKED;
            for (var c = 0u; c < TN; c++) {
                let s = work_get(tid * TN + c);
                m_tile = max(m_tile, s);
                poisoned = poisoned || bitcast<u32>(s) == bitcast<u32>(POISONED);
            }
            let changed = m_tile > m_ref + LAZY;
            let first = m_ref == MASKED;
            let m_new = select(m_ref, m_tile, changed);
            let moved = move_max(m_ref, m_new, changed, RESCALE_AMLA, P_ROUND, &split);
            if (changed && !first) {
                atomicStore(&rescale_frag[tid / FRAG], 1u);
            }
            row_step[tid] = moved.step;
            let p_mult = select(1.0, split.c_hat, RESCALE_AMLA);
            var l_tile = 0.0;
            for (var c = 0u; c < TN; c++) {
                let s = work_get(tid * TN + c);
                var p = 0.0;
                if (s > MASKED) {
                    p = exp2(s - m_new);
                }
                l_tile += p;
                let at = c * ROW4 + ROPE4 + tid / 4u;
                kv16[at][tid % 4u] = f16(round_f16(round_p(p * p_mult, P_ROUND)));
            }
            l_run = l_run * moved.decay + l_tile;
            m_ref = m_new;
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
                        let step = row_step[rf * FRAG + (e % FF4) / FV];
                        if (RESCALE_AMLA) {
                            work[e] = amla_rescale(work[e], step);
                        } else {
                            work[e] = work[e] * bitcast<f32>(step);
                        }
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

    // Row normaliser and lse (natural log); an empty row gives out = 0, lse = -inf, a poisoned
    // one NaN.
    var lse_bits = NEG_INF_BITS;
    if (tid < HB) {
        var norm = 0.0;
        if (l_run > 0.0) {
            norm = 1.0 / select(l_run, l_run * split.c_hat, RESCALE_AMLA);
            lse_bits = bitcast<u32>((m_ref + log2(l_run)) * LN2);
        }
        if (poisoned) {
            lse_bits = NAN_BITS;
        }
        row_step[tid] = bitcast<u32>(norm);
        row_nan[tid] = u32(poisoned);
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
                        v = amla_guard(v);
                    }
                    v = v * bitcast<f32>(row_step[r]);
                    let nan = row_nan[r] != 0u;
                    let col = (e / FF4) * DSG + cf * FRAG + 4u * (e % FV);
                    if (slot != 0xffffffffu) {
                        // A poisoned partial is marked by its lse; the combine does not read its O.
                        part_out[(slot * HB + r) * V_QUADS + col / 4u] = v;
                    } else {
                        let at = (seq * params.rows + row_seq) * 512u + col;
                        if (OUT_DTYPE == DTYPE_F32) {
                            let bits = select(bitcast<vec4<u32>>(v), vec4<u32>(NAN_BITS), nan);
                            out[at] = bits.x;
                            out[at + 1u] = bits.y;
                            out[at + 2u] = bits.z;
                            out[at + 3u] = bits.w;
                        } else {
                            out[at / 2u] = select(pack_pair(v.xy, OUT_DTYPE), nan_pair(OUT_DTYPE), nan);
                            out[at / 2u + 1u] = select(pack_pair(v.zw, OUT_DTYPE), nan_pair(OUT_DTYPE), nan);
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
