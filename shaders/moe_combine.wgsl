// MoE combine: out[token, c] = Σ_j y[slot_rows[token·K + j], c] (+ shared[token, c]), accumulated in
// f32 in slot order, then the shared expert's output. The routing weights were already applied by
// the down projection (its per-row scale), so this is a plain sum. y rows are in dispatch-row order;
// a slot without a row (−1, or out of range) contributes nothing.
//
// One invocation per 32-bit word of the output: one f32 element, or two 16-bit elements (which may
// belong to different tokens when h is odd). Neighbouring invocations read neighbouring words of the
// same y rows, so the reads are coalesced.

override WG: u32 = 256u;
override K: u32 = 8u;
override Y_DTYPE: u32 = 0u;   // dtype of y and shared
override OUT_DTYPE: u32 = 0u;
override HAS_SHARED: bool = false;

struct Params {
    tokens: u32, // t
    cols: u32,   // h: columns of y [y_rows, h], shared [t, h] and out [t, h]
    y_rows: u32, // rows of y
    words: u32,  // 32-bit words of out
}

@group(0) @binding(0) var<storage, read> slot_rows: array<i32>;    // [t, K]
@group(0) @binding(1) var<storage, read> y: array<u32>;            // [y_rows, h], Y_DTYPE
@group(0) @binding(2) var<storage, read> shared_y: array<u32>;     // [t, h], Y_DTYPE (or unused)
@group(0) @binding(3) var<storage, read_write> out: array<u32>;    // [t, h], OUT_DTYPE
@group(0) @binding(4) var<uniform> params: Params;

fn load_y(i: u32) -> f32 {
    if (Y_DTYPE == DTYPE_F32) {
        return bitcast<f32>(y[i]);
    }
    return unpack_half(y[i >> 1u], (i & 1u) == 1u, Y_DTYPE);
}

fn load_shared(i: u32) -> f32 {
    if (Y_DTYPE == DTYPE_F32) {
        return bitcast<f32>(shared_y[i]);
    }
    return unpack_half(shared_y[i >> 1u], (i & 1u) == 1u, Y_DTYPE);
}

// Element i of the flattened output [t, h].
fn combined(i: u32) -> f32 {
    let token = i / params.cols;
    let c = i - token * params.cols;
    var acc = 0.0;
    for (var j = 0u; j < K; j++) {
        let row = slot_rows[token * K + j];
        if (row >= 0 && u32(row) < params.y_rows) {
            acc += load_y(u32(row) * params.cols + c);
        }
    }
    if (HAS_SHARED) {
        acc += load_shared(i);
    }
    return acc;
}

@compute @workgroup_size(WG)
fn combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let word = linear_workgroup(wid, num) * WG + lid;
    if (word >= params.words) {
        return;
    }
    if (OUT_DTYPE == DTYPE_F32) {
        out[word] = bitcast<u32>(combined(word));
        return;
    }
    let elements = params.tokens * params.cols;
    let first = combined(2u * word);
    var second = 0.0;
    if (2u * word + 1u < elements) {
        second = combined(2u * word + 1u);
    }
    out[word] = pack_pair(vec2<f32>(first, second), OUT_DTYPE);
}
