// AMLA: MLA decode attention over a paged latent KV cache (flash-decoding, SIMT f32).
//
// One workgroup runs one work item of the split-KV schedule: a key range of one sequence for a
// head block of HB query rows (row = query token x head; all rows share the one latent KV head).
// It streams the range in tiles of TN keys; each cache element is loaded once into workgroup
// memory and used there by all HB rows, for the scores (all 576 dims) and for P·V (the first
// 512). Per tile:
//   1. load     the TN x 576 tile (vec4 loads, coalesced; keys past the range are zero-filled,
//               so NaN padding in the cache is never read). A packed 8-bit cache is decoded to
//               f32 here (codes times scales, bf16 rope). NaN and infinities are cleared to 0 and
//               their key flagged, so that all arithmetic stays finite.
//   2. scores   register tile RB rows x CB keys per invocation over a 1/DG slice of the dims,
//               q (pre-scaled by softmax_scale * log2 e, see `prep`) read as f32 vec4
//   3. reduce   the DG partial sums, mask (range end, causal limit); a visible key that was
//               flagged, or whose score is not finite (NaN or inf in q), scores POISONED
//   4. softmax  one invocation per row: running max m (log2 units), row sum l, and the O rescale
//               step for this tile: AMLA's exponent add or the classic multiply (RESCALE_AMLA)
//   5. P·V      each invocation owns 4 output dims of all HB rows (O stays in registers)
// The result is the final output (unsplit sequence) or a normalised partial (O, lse) that
// amla_combine.wgsl merges. A row that saw a POISONED key writes NaN (out and lse).
//
// AMLA (RESCALE_AMLA): with n = -round(m) (m in log2 units), O is held as 2^n / cof times the
// unnormalised sum U = sum 2^s v; new contributions are p * c_hat with p = 2^(s - m),
// c = 2^(m + n) in [2^-0.5, 2^0.5], c_hat = c rounded to P's 16-bit type when P is rounded
// (P_ROUND), else c, and cof = c / c_hat. When m grows, O is rescaled by 2^(dn) * cof_old /
// cof_new, done as an integer add onto the f32 bits of O (amla_exponent_step, amla_rescale in
// amla_shared.wgsl; entries whose exponent field is 0 are left alone). The final sum is
// L = l * c_hat; out = O / L, after amla_guard.

override HB: u32 = 16u;         // query rows per workgroup (head block), <= 16
override RB: u32 = 8u;          // rows per invocation in the score phase
override TN: u32 = 32u;         // keys per tile
override CB: u32 = 2u;          // keys per invocation in the score phase
override DG: u32 = 4u;          // groups splitting the 576 dims in the score phase
override KV_STRIDE: u32 = 148u; // vec2<u32> words per key row in workgroup memory (padded)
override KV_FORMAT: u32 = 2u;   // DTYPE_* of a float cache, or KV_FP8 / KV_INT8 (packed rows)
override OUT_DTYPE: u32 = 2u;   // DTYPE_* of out
override RESCALE_AMLA: bool = true;
override P_ROUND: u32 = 0u;     // P_ROUND_*: rounding of p * c_hat before P·V

override KG: u32 = TN / CB;     // key groups in the score phase
// The tile holds f32 values for an f32 cache and for a packed one (decoded while loading).
override TILE_F32: bool = KV_FORMAT == DTYPE_F32 || KV_FORMAT >= KV_FP8;

const WG: u32 = 128u;           // = 512 output dims / 4 per invocation
const QUADS: u32 = 144u;        // 576 dims in groups of 4
const V_QUADS: u32 = 128u;      // 512 dims in groups of 4
const LN2: f32 = 0.6931471805599453;

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
@group(0) @binding(1) var<storage, read> kv_cache: array<vec4<u32>>;  // [num_blocks, page, 576] float, or [num_blocks, page, 656] bytes
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
var<workgroup> row_nan: array<u32, HB>;                    // 1: the row saw a POISONED key
var<workgroup> key_flag: array<atomic<u32>, TN>;           // 1: the tile's key held a NaN or inf

// Dims 4 quad .. 4 quad + 3 of key `key` of the tile, as f32.
fn key_quad(key: u32, quad: u32) -> vec4<f32> {
    if (TILE_F32) {
        let a = kv_tile[key * KV_STRIDE + 2u * quad];
        let b = kv_tile[key * KV_STRIDE + 2u * quad + 1u];
        return bitcast<vec4<f32>>(vec4<u32>(a, b));
    }
    let w = kv_tile[key * KV_STRIDE + quad];
    return vec4<f32>(unpack_pair(w.x, KV_FORMAT), unpack_pair(w.y, KV_FORMAT));
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

// acc + q.x k.x + q.y k.y + q.z k.z + q.w k.w as a chain of four fmas (no extra add).
fn fma4(q: vec4<f32>, k: vec4<f32>, acc: f32) -> f32 {
    return fma(q.w, k.w, fma(q.z, k.z, fma(q.y, k.y, fma(q.x, k.x, acc))));
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
    let words_per_key = select(288u, 576u, KV_FORMAT == DTYPE_F32);
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
    var split = AmlaSplit(0.0, 1.0, 1.0);
    var poisoned = false;
    // Workgroup memory is not zero-initialised (the pipelines skip it); the flags are reset here
    // and then after every use (step 4).
    if (tid < TN) {
        atomicStore(&key_flag[tid], 0u);
    }
    workgroupBarrier();

    for (var tile_begin = key_begin; tile_begin < key_end; tile_begin += TN) {
        let tile_keys = min(TN, key_end - tile_begin);

        // 1. load the tile: as stored (float cache) or decoded to f32 (packed cache), with NaN and
        // infinities cleared and their key flagged
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
                let bits = bitcast<vec4<u32>>(d.v);
                let at = key * KV_STRIDE + 2u * quad;
                kv_tile[at] = bits.xy;
                kv_tile[at + 1u] = bits.zw;
            }
        } else {
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
                let bad = nonfinite_mask(v, KV_FORMAT);
                if (any(bad != vec4<u32>(0u))) {
                    atomicOr(&key_flag[key], 1u);
                    v &= ~bad;
                }
                let at = key * KV_STRIDE + 2u * chunk;
                kv_tile[at] = v.xy;
                kv_tile[at + 1u] = v.zw;
            }
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
            var score = MASKED;
            if (kk < key_end && kk < row_limit(row_block * HB + r, seqlen)) {
                let bad = atomicLoad(&key_flag[c]) != 0u || is_nonfinite_f32(bitcast<u32>(s));
                score = select(s, POISONED, bad);
            }
            scores[e] = score;
        }
        workgroupBarrier();

        // 4. online softmax, one invocation per row; P^T goes to `partials`
        if (tid < TN) {
            atomicStore(&key_flag[tid], 0u); // read in step 3 only; the next load sets it again
        }
        if (tid < HB) {
            var m_tile = MASKED;
            for (var c = 0u; c < TN; c++) {
                let s = scores[tid * TN + c];
                m_tile = max(m_tile, s);
                poisoned = poisoned || bitcast<u32>(s) == bitcast<u32>(POISONED);
            }
            let m_new = max(m_run, m_tile);
            let changed = m_new > m_run;
            let moved = move_max(m_run, m_new, changed, RESCALE_AMLA, P_ROUND, &split);
            row_step[tid] = moved.step;
            let p_mult = select(1.0, split.c_hat, RESCALE_AMLA);
            var l_tile = 0.0;
            for (var c = 0u; c < TN; c++) {
                let s = scores[tid * TN + c];
                var p = 0.0;
                if (s > MASKED) {
                    p = exp2(s - m_new);
                }
                l_tile += p;
                partials[c * HB + tid] = round_p(p * p_mult, P_ROUND);
            }
            l_run = l_run * moved.decay + l_tile;
            m_run = m_new;
        }
        workgroupBarrier();

        // 5. rescale O, then O += P·V over the tile's keys
        for (var r = 0u; r < HB; r++) {
            if (RESCALE_AMLA) {
                o[r] = amla_rescale(o[r], row_step[r]);
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

    // Row normaliser and lse (natural log); an empty row gives out = 0, lse = -inf, a poisoned
    // one NaN.
    var lse_bits = NEG_INF_BITS;
    if (tid < HB) {
        var norm = 0.0;
        if (l_run > 0.0) {
            norm = 1.0 / select(l_run, l_run * split.c_hat, RESCALE_AMLA);
            lse_bits = bitcast<u32>((m_run + log2(l_run)) * LN2);
        }
        if (poisoned) {
            lse_bits = NAN_BITS;
        }
        row_norm[tid] = norm;
        row_nan[tid] = u32(poisoned);
    }
    workgroupBarrier();

    for (var r = 0u; r < HB; r++) {
        let row_seq = row_block * HB + r;
        if (row_seq >= params.rows) {
            break;
        }
        var v = o[r];
        if (RESCALE_AMLA) {
            v = amla_guard(v);
        }
        v = v * row_norm[r];
        let nan = row_nan[r] != 0u;
        if (slot != 0xffffffffu) {
            // A poisoned partial is marked by its lse; the combine does not read its O.
            part_out[(slot * HB + r) * V_QUADS + tid] = v;
        } else {
            let at = (seq * params.rows + row_seq) * 512u + 4u * tid;
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
