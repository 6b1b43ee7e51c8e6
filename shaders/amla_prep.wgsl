// AMLA prologue: q [b, s_q, h_q, 576] (any float dtype) -> q_prep [b, rows_padded, 576] f32,
// multiplied by softmax_scale * log2(e), so that the decode kernel reads q as f32 vec4 without
// unpacking and its scores come out in log2 units. Rows rows..rows_padded of each sequence (the
// padding of the last head block) are never written and stay zero.

override Q_DTYPE: u32 = 2u; // DTYPE_* of q

const QUADS: u32 = 144u; // 576 dims in groups of 4

struct PrepParams {
    quads: u32,        // b * rows * 144: vec4 groups of q to convert
    rows: u32,         // s_q * h_q
    rows_padded: u32,  // row blocks * HB: row stride of q_prep per sequence
    scale_log2: f32,   // softmax_scale * log2(e)
}

@group(0) @binding(0) var<storage, read> q_in: array<u32>;                 // [b, s_q, h_q, 576] Q_DTYPE
@group(0) @binding(1) var<storage, read_write> q_out: array<vec4<f32>>;  // [b, rows_padded, 144]
@group(0) @binding(2) var<uniform> prep_params: PrepParams;

@compute @workgroup_size(256)
fn prep(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_workgroup(wid, num) * 256u + lid;
    if (i >= prep_params.quads) {
        return;
    }
    let row = i / QUADS;
    let quad = i % QUADS;
    var v: vec4<f32>;
    if (Q_DTYPE == DTYPE_F32) {
        let w = 4u * i;
        v = bitcast<vec4<f32>>(vec4<u32>(q_in[w], q_in[w + 1u], q_in[w + 2u], q_in[w + 3u]));
    } else {
        let w = 2u * i;
        v = vec4<f32>(unpack_pair(q_in[w], Q_DTYPE), unpack_pair(q_in[w + 1u], Q_DTYPE));
    }
    let seq = row / prep_params.rows;
    let r = row % prep_params.rows;
    q_out[(seq * prep_params.rows_padded + r) * QUADS + quad] = v * prep_params.scale_log2;
}
