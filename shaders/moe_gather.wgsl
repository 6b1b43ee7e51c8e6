// MoE gather: the expert inputs in dispatch-row order, x_sorted[row] = hidden[sorted_slots[row] / K],
// and the routing weight of every row, row_weights[row] = topk_weights[sorted_slots[row]] (the
// down projection's per-row scale). Rows holding the sentinel t·K (per-expert padding and rows past
// the routed total) get zeros, so a padded group's extra rows contribute nothing.
//
// One invocation per 32-bit word of x_sorted: one f32 element, or two 16-bit elements. With an odd
// h a 16-bit row starts in the middle of a word, so one word may hold the last element of one row
// and the first of the next, gathered from two different tokens. The invocation that owns the word
// reads the two halves it needs, each from its own row, and writes the word whole, once. That is
// cheaper than letting each row write its own halves with atomics on the shared words (two
// read-modify-writes per boundary word and an atomic binding): over a plain word copy it costs only
// a second half read per word, usually from the same cached word. Neighbouring invocations
// handle neighbouring elements, so reads and writes stay coalesced. The grid covers the worst-case
// row count t·K + min(t·K, e)·(block_size − 1), so it does not depend on the routing; no host round
// trip is needed.

override WG: u32 = 256u;
override K: u32 = 8u;
override HALVES: bool = false;  // 16-bit hidden and x_sorted: two elements per word

struct Params {
    tokens: u32, // t: rows of hidden [t, h]
    cols: u32,   // h: elements per row of hidden [t, h] and x_sorted [rows, h]
    rows: u32,   // rows of x_sorted and row_weights: t·K + min(t·K, e)·(block_size − 1)
    words: u32,  // 32-bit words of x_sorted: rows·h, or ceil(rows·h / 2) with HALVES
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

// The bits of element e of the flattened x_sorted [rows, h] (e < rows·h): 32 bits, or 16 with
// HALVES; 0 in a sentinel row.
fn gathered(e: u32) -> u32 {
    let row = e / params.cols;
    let slot = slot_at(row);
    if (slot < 0) {
        return 0u;
    }
    let src = (u32(slot) / K) * params.cols + (e - row * params.cols);
    if (!HALVES) {
        return hidden[src];
    }
    return (hidden[src >> 1u] >> ((src & 1u) * 16u)) & 0xffffu;
}

@compute @workgroup_size(WG)
fn gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_workgroup(wid, num) * WG + lid;
    if (i < params.words) {
        if (HALVES) {
            // The second half of the last word exists only when rows·h is even.
            var word = gathered(2u * i);
            if (2u * i + 1u < params.rows * params.cols) {
                word |= gathered(2u * i + 1u) << 16u;
            }
            x_sorted[i] = word;
        } else {
            x_sorted[i] = gathered(i);
        }
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
