// MoE gather: the expert inputs in dispatch-row order, x_sorted[row] = hidden[sorted_slots[row] / K],
// and the routing weight of every row, row_weights[row] = topk_weights[sorted_slots[row]] (the
// down projection's per-row scale). Rows holding the sentinel t·K (per-expert padding and rows past
// the routed total) get zeros, so a padded group's extra rows contribute nothing.
//
// Rows are copied as 32-bit words (one f32, or two 16-bit elements: 16-bit rows have an even
// length, checked on the host), one word per invocation: neighbouring invocations copy neighbouring
// words of the same row, so reads and writes are coalesced. The copy is the same for every dtype.
// The grid covers the worst-case row count t·K + min(t·K, e)·(block_size − 1), so it does not
// depend on the routing; no host round trip is needed.

override WG: u32 = 256u;
override K: u32 = 8u;

struct Params {
    tokens: u32,    // t: rows of hidden [t, h]
    row_words: u32, // 32-bit words per row of hidden [t, h] and x_sorted [rows, h]
    rows: u32,      // rows of x_sorted and row_weights: t·K + min(t·K, e)·(block_size − 1)
    words: u32,     // rows · row_words
}

@group(0) @binding(0) var<storage, read> hidden: array<u32>;             // [t, h]
@group(0) @binding(1) var<storage, read> sorted_slots: array<i32>;       // [rows]
@group(0) @binding(2) var<storage, read> topk_weights: array<f32>;       // [t, K]
@group(0) @binding(3) var<storage, read_write> x_sorted: array<u32>;     // [rows, h]
@group(0) @binding(4) var<storage, read_write> row_weights: array<f32>;  // [rows]
@group(0) @binding(5) var<uniform> params: Params;

// The slot at `row`, or -1 for a sentinel (or any value out of range).
fn slot_at(row: u32) -> i32 {
    let slot = sorted_slots[row];
    if (slot < 0 || u32(slot) >= params.tokens * K) {
        return -1;
    }
    return slot;
}

@compute @workgroup_size(WG)
fn gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_workgroup(wid, num) * WG + lid;
    if (i < params.words) {
        let row = i / params.row_words;
        let col = i - row * params.row_words;
        let slot = slot_at(row);
        var word = 0u;
        if (slot >= 0) {
            word = hidden[(u32(slot) / K) * params.row_words + col];
        }
        x_sorted[i] = word;
    }
    if (i < params.rows) {
        let slot = slot_at(i);
        var weight = 0.0;
        if (slot >= 0) {
            weight = topk_weights[slot];
        }
        row_weights[i] = weight;
    }
}
