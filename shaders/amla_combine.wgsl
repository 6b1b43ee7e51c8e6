// AMLA split-KV combine: merges the normalised partial results (out_i, lse_i) of the splits of
// one sequence into out = sum_i w_i out_i / sum_i w_i with w_i = exp(lse_i - max lse), and
// lse = max lse + ln(sum_i w_i). One workgroup per (combine job, row of the head block); each
// invocation owns 4 of the 512 output dims. A split whose row saw no key (lse = -inf, stored as
// bits so that no infinity is ever computed with) has weight 0; a row with no key at all gets
// out = 0, lse = -inf, like the unsplit path. A split whose row saw a NaN or infinity (lse NaN)
// makes the row NaN.

override HB: u32 = 16u;       // rows per head block (as the decode kernel)
override OUT_DTYPE: u32 = 2u; // DTYPE_* of out

const V_QUADS: u32 = 128u;

struct CombineParams {
    s_q: u32,           // query tokens per sequence
    h_q: u32,           // query heads
    rows: u32,          // s_q * h_q rows per sequence
    num_combines: u32,  // combine jobs in sched
    combines_at: u32,   // offset of the jobs [num_combines, 4] in sched (words)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> sched: array<u32>;            // jobs: seq, row_block, first slot, splits
@group(0) @binding(1) var<storage, read> part_out: array<vec4<f32>>;  // [slots, HB, 128]
@group(0) @binding(2) var<storage, read> part_lse: array<u32>;        // [slots, HB] f32 bits
@group(0) @binding(3) var<storage, read_write> out: array<u32>;       // [b, s_q, h_q, 512] OUT_DTYPE
@group(0) @binding(4) var<storage, read_write> lse: array<u32>;       // [b, h_q, s_q] f32 bits
@group(0) @binding(5) var<uniform> params: CombineParams;

@compute @workgroup_size(128)
fn combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let job = linear_workgroup(wid, num);
    let index = job / HB;
    let r = job % HB;
    if (index >= params.num_combines) {
        return;
    }
    let at = params.combines_at + 4u * index;
    let seq = sched[at];
    let row_seq = sched[at + 1u] * HB + r;
    let first = sched[at + 2u];
    let splits = sched[at + 3u];
    if (row_seq >= params.rows) {
        return;
    }
    var m = MASKED;
    var nan = false;
    for (var s = 0u; s < splits; s++) {
        let bits = part_lse[(first + s) * HB + r];
        nan = nan || (is_nonfinite_f32(bits) && bits != NEG_INF_BITS);
        if (!is_nonfinite_f32(bits)) {
            m = max(m, bitcast<f32>(bits));
        }
    }
    var acc = vec4<f32>(0.0);
    var total = 0.0;
    for (var s = 0u; s < splits; s++) {
        let bits = part_lse[(first + s) * HB + r];
        if (!is_nonfinite_f32(bits)) {
            let w = exp(bitcast<f32>(bits) - m);
            total += w;
            acc = fma(vec4<f32>(w), part_out[((first + s) * HB + r) * V_QUADS + tid], acc);
        }
    }
    var lse_bits = NEG_INF_BITS;
    if (total > 0.0) {
        acc = acc / total;
        lse_bits = bitcast<u32>(m + log(total));
    }
    if (nan) {
        lse_bits = NAN_BITS;
    }
    let o = (seq * params.rows + row_seq) * 512u + 4u * tid;
    if (OUT_DTYPE == DTYPE_F32) {
        let bits = select(bitcast<vec4<u32>>(acc), vec4<u32>(NAN_BITS), nan);
        out[o] = bits.x;
        out[o + 1u] = bits.y;
        out[o + 2u] = bits.z;
        out[o + 3u] = bits.w;
    } else {
        out[o / 2u] = select(pack_pair(acc.xy, OUT_DTYPE), nan_pair(OUT_DTYPE), nan);
        out[o / 2u + 1u] = select(pack_pair(acc.zw, OUT_DTYPE), nan_pair(OUT_DTYPE), nan);
    }
    if (tid == 0u) {
        let token = row_seq / params.h_q;
        let head = row_seq % params.h_q;
        lse[(seq * params.h_q + head) * params.s_q + token] = lse_bits;
    }
}
