// AMLA: MLA decode attention over a paged latent KV cache (flash-decoding, SIMT f32).
//
// One workgroup runs one work item of the split-KV schedule: a key range of one sequence for a
// head block of HB query rows (row = query token x head; all rows share the one latent KV head).
// It streams the range in tiles of TN keys; each cache element is loaded once into workgroup
// memory and used there by all HB rows, for the scores (all 576 dims) and for P·V (the first
// 512). Per tile:
//   1. load     the TN x 576 tile (vec4 loads, coalesced; keys past the range are zero-filled,
//               so NaN padding in the cache is never read)
//   2. scores   register tile RB rows x CB keys per invocation over a 1/DG slice of the dims,
//               q (pre-scaled by softmax_scale * log2 e, see `prep`) read as f32 vec4
//   3. reduce   the DG partial sums, mask (range end, causal limit)
//   4. softmax  one invocation per row: running max m (log2 units), row sum l, and the O rescale
//               step for this tile: AMLA's exponent add or the classic multiply (RESCALE_AMLA)
//   5. P·V      each invocation owns 4 output dims of all HB rows (O stays in registers)
// The result is the final output (unsplit sequence) or a normalised partial (O, lse) that
// amla_combine.wgsl merges.
//
// AMLA (RESCALE_AMLA): with n = -round(m) (m in log2 units), O is held as 2^n / cof times the
// unnormalised sum U = sum 2^s v; new contributions are p * c_hat with p = 2^(s - m),
// c = 2^(m + n) in [2^-0.5, 2^0.5], c_hat = c rounded to f16 when P is rounded (P_HALF), else c,
// and cof = c / c_hat. When m grows, O is rescaled by 2^(dn) * cof_old / cof_new, done as an
// integer add of round(N * 2^23) onto the f32 bits of O with
//   N = max(dn, -30) + 1.5 * (cof_old / cof_new - 1) + 1e-6
// (the 1.5 term compensates the rounding of c to first order, at mid-mantissa; the -30 clamp
// keeps big jumps from wrapping normal entries). An entry that is exactly
// +-0 (exact cancellation happens: f16 P times 16-bit V products are exact in f32) is left alone,
// since the add would wrap its exponent field and lose all later contributions. The final sum is
// L = l * c_hat; out = O / L, and entries with |O| > 1e10 (a denormal whose exponent wrapped) are
// zeroed first.

override HB: u32 = 16u;         // query rows per workgroup (head block), <= 16
override RB: u32 = 8u;          // rows per invocation in the score phase
override TN: u32 = 32u;         // keys per tile
override CB: u32 = 2u;          // keys per invocation in the score phase
override DG: u32 = 4u;          // groups splitting the 576 dims in the score phase
override KV_STRIDE: u32 = 148u; // vec2<u32> words per key row in workgroup memory (padded)
override KV_DTYPE: u32 = 2u;    // DTYPE_* of the cache
override OUT_DTYPE: u32 = 2u;   // DTYPE_* of out
override RESCALE_AMLA: bool = true;
override P_HALF: bool = false;  // round p * c_hat to f16 before P·V

override KG: u32 = TN / CB;     // key groups in the score phase

const WG: u32 = 128u;           // = 512 output dims / 4 per invocation
const QUADS: u32 = 144u;        // 576 dims in groups of 4
const V_QUADS: u32 = 128u;      // 512 dims in groups of 4
const MASKED: f32 = -3.0e38;    // score of a masked key and the initial max (finite on purpose:
                                // WGSL lets implementations assume there are no infinities)
const NEG_INF_BITS: u32 = 0xff800000u;
const GUARD_BITS: u32 = 0x501502f9u; // bits of 1e10
const INF_BITS: u32 = 0x7f800000u;
const LN2: f32 = 0.6931471805599453;
const TWO_POW_23: f32 = 8388608.0;

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

@group(0) @binding(0) var<storage, read> q_prep: array<vec4<f32>>;    // [b, rows_padded, 144]
@group(0) @binding(1) var<storage, read> kv_cache: array<vec4<u32>>;  // [num_blocks, page, 576] KV_DTYPE
@group(0) @binding(2) var<storage, read> sched: array<u32>;            // work items [num_items, 8], combine jobs, seqlens, block table
@group(0) @binding(3) var<storage, read_write> out: array<u32>;       // [b, s_q, h_q, 512] OUT_DTYPE
@group(0) @binding(4) var<storage, read_write> lse: array<u32>;       // [b, h_q, s_q] f32 bits
@group(0) @binding(5) var<storage, read_write> part_out: array<vec4<f32>>; // [slots, HB, 128]
@group(0) @binding(6) var<storage, read_write> part_lse: array<u32>;  // [slots, HB] f32 bits
@group(0) @binding(7) var<uniform> params: DecodeParams;

var<workgroup> kv_tile: array<vec2<u32>, TN * KV_STRIDE>;  // the key tile as stored in the cache
var<workgroup> partials: array<f32, DG * HB * TN>;         // [DG][HB][TN] partial scores, then P^T [TN][HB]
var<workgroup> scores: array<f32, HB * TN>;                // [HB][TN] scores (log2 units), MASKED
var<workgroup> row_step: array<u32, HB>;                   // this tile's O rescale (int add or f32 factor)
var<workgroup> row_norm: array<f32, HB>;                   // 1 / L at the end

// Dims 4 quad .. 4 quad + 3 of key `key` of the tile, as f32.
fn key_quad(key: u32, quad: u32) -> vec4<f32> {
    if (KV_DTYPE == DTYPE_F32) {
        let a = kv_tile[key * KV_STRIDE + 2u * quad];
        let b = kv_tile[key * KV_STRIDE + 2u * quad + 1u];
        return bitcast<vec4<f32>>(vec4<u32>(a, b));
    }
    let w = kv_tile[key * KV_STRIDE + quad];
    return vec4<f32>(unpack_pair(w.x, KV_DTYPE), unpack_pair(w.y, KV_DTYPE));
}

// acc + q.x k.x + q.y k.y + q.z k.z + q.w k.w as a chain of four fmas (no extra add).
fn fma4(q: vec4<f32>, k: vec4<f32>, acc: f32) -> f32 {
    return fma(q.w, k.w, fma(q.z, k.z, fma(q.y, k.y, fma(q.x, k.x, acc))));
}

// A non-negative finite f32 rounded to the nearest f16 value (ties to even), kept in f32.
fn round_f16(x: f32) -> f32 {
    if (x >= 6.103515625e-05) { // 2^-14: normal f16
        let bits = bitcast<u32>(x);
        return bitcast<f32>((bits + 0xfffu + ((bits >> 13u) & 1u)) & 0xffffe000u);
    }
    return round(x * 16777216.0) * 5.9604644775390625e-08; // f16 subnormals: multiples of 2^-24
}

// Keys 0 .. limit of the sequence are visible to row `row_seq`.
fn row_limit(row_seq: u32, seqlen: u32) -> u32 {
    if (params.causal == 0u) {
        return seqlen;
    }
    let token = row_seq / params.h_q;
    // L - s_q + token + 1, clamped at 0
    return select(0u, seqlen + token + 1u - params.s_q, seqlen + token + 1u > params.s_q);
}

@compute @workgroup_size(128)
fn decode(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let item_index = linear_workgroup(wid, num);
    if (item_index >= params.num_items) {
        return;
    }
    let seq = sched[8u * item_index];
    let row_block = sched[8u * item_index + 1u];
    let key_begin = sched[8u * item_index + 2u];
    let key_end = sched[8u * item_index + 3u];
    let slot = sched[8u * item_index + 4u];
    let seqlen = sched[params.seqlens_at + seq];
    let page_mask = (1u << params.page_shift) - 1u;
    let words_per_key = select(288u, 576u, KV_DTYPE == DTYPE_F32);
    let chunks_per_key = words_per_key / 4u;

    // Score-phase coordinates: d-group, key group, row group.
    let dg = tid % DG;
    let kg = (tid / DG) % KG;
    let rg = tid / (DG * KG);
    let q_base = (seq * params.rows_padded + row_block * HB + rg * RB) * QUADS;

    var o: array<vec4<f32>, 16>; // O[row][4 dims]: dims 4 tid .. 4 tid + 3 of every row
    for (var r = 0u; r < HB; r++) {
        o[r] = vec4<f32>(0.0);
    }
    // Running row state, held by invocation `tid` for row `tid` (tid < HB).
    var m_run = MASKED;
    var l_run = 0.0;
    var n_run = 0.0;
    var cof_run = 1.0;
    var c_hat_run = 1.0;

    for (var tile_begin = key_begin; tile_begin < key_end; tile_begin += TN) {
        let tile_keys = min(TN, key_end - tile_begin);

        // 1. load the tile
        for (var i = tid; i < TN * chunks_per_key; i += WG) {
            let key = i / chunks_per_key;
            let chunk = i % chunks_per_key;
            let kk = tile_begin + key;
            var v = vec4<u32>(0u);
            if (kk < key_end) {
                let block = sched[params.table_at + seq * params.max_blocks + (kk >> params.page_shift)];
                if (block < params.num_blocks) {
                    let row = (block << params.page_shift) + (kk & page_mask);
                    v = kv_cache[row * chunks_per_key + chunk];
                }
            }
            let at = key * KV_STRIDE + 2u * chunk;
            kv_tile[at] = v.xy;
            kv_tile[at + 1u] = v.zw;
        }
        workgroupBarrier();

        // 2. partial scores: RB rows x CB keys over quads dg, dg + DG, ...
        var acc: array<f32, 16>; // [RB][2]
        for (var i = 0u; i < 16u; i++) {
            acc[i] = 0.0;
        }
        for (var j = 0u; j < QUADS / DG; j++) {
            let quad = dg + j * DG;
            let k0 = key_quad(kg, quad);
            var k1 = vec4<f32>(0.0);
            if (CB == 2u) {
                k1 = key_quad(kg + KG, quad);
            }
            for (var r = 0u; r < RB; r++) {
                let qv = q_prep[q_base + r * QUADS + quad];
                acc[2u * r] = fma4(qv, k0, acc[2u * r]);
                acc[2u * r + 1u] = fma4(qv, k1, acc[2u * r + 1u]);
            }
        }
        for (var r = 0u; r < RB; r++) {
            let at = (dg * HB + rg * RB + r) * TN + kg;
            partials[at] = acc[2u * r];
            if (CB == 2u) {
                partials[at + KG] = acc[2u * r + 1u];
            }
        }
        workgroupBarrier();

        // 3. reduce the d-groups and mask
        for (var e = tid; e < HB * TN; e += WG) {
            let r = e / TN;
            let c = e % TN;
            var s = 0.0;
            for (var g = 0u; g < DG; g++) {
                s += partials[(g * HB + r) * TN + c];
            }
            let kk = tile_begin + c;
            let visible = kk < key_end && kk < row_limit(row_block * HB + r, seqlen);
            scores[e] = select(MASKED, s, visible);
        }
        workgroupBarrier();

        // 4. online softmax, one invocation per row; P^T goes to `partials`
        if (tid < HB) {
            var m_tile = MASKED;
            for (var c = 0u; c < TN; c++) {
                m_tile = max(m_tile, scores[tid * TN + c]);
            }
            let m_new = max(m_run, m_tile);
            let changed = m_new > m_run;
            let first = m_run == MASKED;
            var decay = 1.0; // factor on l (and on O in the multiply variant)
            if (changed) {
                decay = select(exp2(m_run - m_new), 0.0, first);
            }
            var step = bitcast<u32>(decay);
            if (RESCALE_AMLA) {
                step = 0u;
                if (changed) {
                    let n_new = -round(m_new);
                    let c = exp2(m_new + n_new);
                    let c_hat = select(c, round_f16(c), P_HALF);
                    let cof = c / c_hat;
                    if (!first) {
                        let dn = max(n_new - n_run, -30.0);
                        let frac = 1.5 * (cof_run / cof - 1.0) + 1e-6;
                        step = bitcast<u32>((i32(dn) << 23u) + i32(round(frac * TWO_POW_23)));
                    }
                    n_run = n_new;
                    cof_run = cof;
                    c_hat_run = c_hat;
                }
            }
            row_step[tid] = step;
            let p_mult = select(1.0, c_hat_run, RESCALE_AMLA);
            var l_tile = 0.0;
            for (var c = 0u; c < TN; c++) {
                let s = scores[tid * TN + c];
                var p = 0.0;
                if (s > MASKED) {
                    p = exp2(s - m_new);
                }
                l_tile += p;
                var pv = p * p_mult;
                if (P_HALF) {
                    pv = round_f16(pv);
                }
                partials[c * HB + tid] = pv;
            }
            l_run = l_run * decay + l_tile;
            m_run = m_new;
        }
        workgroupBarrier();

        // 5. rescale O, then O += P·V over the tile's keys
        for (var r = 0u; r < HB; r++) {
            if (RESCALE_AMLA) {
                // Exact zeros (from cancellation) keep their value: the add would wrap them.
                let bits = bitcast<vec4<u32>>(o[r]);
                let zero = (bits & vec4<u32>(0x7fffffffu)) == vec4<u32>(0u);
                o[r] = bitcast<vec4<f32>>(bits + select(vec4<u32>(row_step[r]), vec4<u32>(0u), zero));
            } else {
                o[r] = o[r] * bitcast<f32>(row_step[r]);
            }
        }
        for (var c = 0u; c < tile_keys; c++) {
            let v = key_quad(c, tid);
            for (var r = 0u; r < HB; r++) {
                o[r] = fma(vec4<f32>(partials[c * HB + r]), v, o[r]);
            }
        }
        workgroupBarrier();
    }

    // Row normaliser and lse (natural log); an empty row gives out = 0, lse = -inf.
    var lse_bits = NEG_INF_BITS;
    if (tid < HB) {
        var norm = 0.0;
        if (l_run > 0.0) {
            norm = 1.0 / select(l_run, l_run * c_hat_run, RESCALE_AMLA);
            lse_bits = bitcast<u32>((m_run + log2(l_run)) * LN2);
        }
        row_norm[tid] = norm;
    }
    workgroupBarrier();

    for (var r = 0u; r < HB; r++) {
        let row_seq = row_block * HB + r;
        if (row_seq >= params.rows) {
            break;
        }
        var v = o[r];
        if (RESCALE_AMLA) {
            // |O| > 1e10 (as bits, so that no infinity is compared with); NaN passes through.
            let magnitude = bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu);
            let wrapped = (magnitude > vec4<u32>(GUARD_BITS)) & (magnitude <= vec4<u32>(INF_BITS));
            v = select(v, vec4<f32>(0.0), wrapped);
        }
        v = v * row_norm[r];
        if (slot != 0xffffffffu) {
            part_out[(slot * HB + r) * V_QUADS + tid] = v;
        } else {
            let at = (seq * params.rows + row_seq) * 512u + 4u * tid;
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
