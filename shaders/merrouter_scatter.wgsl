// MerRouter stable scatter: the sorted slot list (slots grouped by expert, ascending slot within an
// expert), the inverse map slot -> row, and the expert id of every block a segment starts.
//
// One workgroup handles BT consecutive tokens, one thread per token. A token holds at most one
// slot per expert, so a slot's rank within its expert and block is the number of earlier tokens of
// the block that chose the same expert. Each thread sets its token's bit in a per-expert bitmask
// of the block (atomicOr in workgroup memory: the result does not depend on the order), then
// rank = base + popcount of the mask below the thread's bit. Deterministic, no serial loop.
//
// Entry `histogram` counts the slots per (block, expert) the same way, for ids that did not come
// from the routing kernel (which counts them itself).

override BT: u32 = 256u;
override E: u32 = 64u;
override K: u32 = 8u;
// 32-bit words per expert mask (BT is a multiple of 32).
override WORDS: u32 = BT / 32u;
override MASK_LEN: u32 = E * WORDS;

struct Params {
    tokens: u32,     // t
    block_size: u32, // rows per padded block
    rows: u32,       // rows of sorted_slots
    pad0: u32,
}

@group(0) @binding(0) var<storage, read> topk_ids: array<i32>;           // [t, k]
@group(0) @binding(1) var<storage, read_write> block_bases: array<u32>;  // [blocks, e]
@group(0) @binding(2) var<storage, read> offsets: array<i32>;            // [e + 1]
@group(0) @binding(3) var<storage, read_write> sorted_slots: array<i32>; // [rows]
@group(0) @binding(4) var<storage, read_write> slot_rows: array<i32>;    // [t, k]
@group(0) @binding(5) var<storage, read_write> block_experts: array<i32>; // [ceil(rows / block_size)]
@group(0) @binding(6) var<uniform> params: Params;

var<workgroup> masks: array<atomic<u32>, MASK_LEN>; // [e, WORDS]: tokens of the block per expert
var<workgroup> bases: array<u32, MASK_LEN>;         // [e, WORDS]: first row of each mask word

fn expert_of(slot: u32) -> u32 {
    let x = topk_ids[slot];
    return select(E, u32(x), x >= 0 && u32(x) < E);
}

// Bitmasks of the tokens of block `blk` per expert; ids out of range are left out.
fn mark_tokens(blk: u32, lid: u32) {
    for (var i = lid; i < MASK_LEN; i += BT) {
        atomicStore(&masks[i], 0u);
    }
    workgroupBarrier();
    let token = blk * BT + lid;
    if (token < params.tokens) {
        for (var j = 0u; j < K; j++) {
            let x = expert_of(token * K + j);
            if (x < E) {
                atomicOr(&masks[x * WORDS + lid / 32u], 1u << (lid % 32u));
            }
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(BT)
fn histogram(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let blk = linear_workgroup(wid, num);
    if (blk * BT >= params.tokens) {
        return;
    }
    mark_tokens(blk, lid);
    for (var x = lid; x < E; x += BT) {
        var count = 0u;
        for (var w = 0u; w < WORDS; w++) {
            count += countOneBits(atomicLoad(&masks[x * WORDS + w]));
        }
        block_bases[blk * E + x] = count;
    }
}

@compute @workgroup_size(BT)
fn scatter(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let blk = linear_workgroup(wid, num);
    if (blk * BT >= params.tokens) {
        return;
    }
    mark_tokens(blk, lid);
    for (var x = lid; x < E; x += BT) {
        var run = u32(offsets[x]) + block_bases[blk * E + x];
        for (var w = 0u; w < WORDS; w++) {
            bases[x * WORDS + w] = run;
            run += countOneBits(atomicLoad(&masks[x * WORDS + w]));
        }
    }
    workgroupBarrier();
    let token = blk * BT + lid;
    if (token >= params.tokens) {
        return;
    }
    let word = lid / 32u;
    let below = (1u << (lid % 32u)) - 1u;
    for (var j = 0u; j < K; j++) {
        let slot = token * K + j;
        let x = expert_of(slot);
        var row = params.rows;
        if (x < E) {
            row = bases[x * WORDS + word] + countOneBits(atomicLoad(&masks[x * WORDS + word]) & below);
        }
        if (row < params.rows) {
            sorted_slots[row] = i32(slot);
            slot_rows[slot] = i32(row);
            if (row % params.block_size == 0u) {
                block_experts[row / params.block_size] = i32(x);
            }
        } else {
            slot_rows[slot] = -1;
        }
    }
}
