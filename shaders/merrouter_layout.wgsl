// MerRouter dispatch layout, the step between the per-block expert counts (from the routing
// kernel, or the histogram entry of merrouter_scatter.wgsl) and the stable scatter: per-expert
// counts, exclusive offsets of the padded segments, the running base of every (block, expert),
// the padding sentinels, the expert ids of blocks past the end, and the load per group of experts.
// Layouts: src/ops/merrouter/dispatch.rs (DispatchLayout).
//
// Entry `build_layout` does all of it in one workgroup of WG threads (it is the one global sync point
// between counting and scattering). The `staged_*` entries are the unfused baseline chain: the
// same steps as separate kernels.

override WG: u32 = 256u;
override E: u32 = 64u;
override G: u32 = 8u;
override E_PLUS_ONE: u32 = E + 1u;

struct Params {
    tokens: u32,     // t
    top_k: u32,      // k
    blocks: u32,     // token blocks: rows of block_counts
    block_size: u32, // rows per padded block (1: no padding)
    rows: u32,       // rows of sorted_slots: t * k + min(t * k, e) * (block_size - 1)
    row_blocks: u32, // entries of block_experts: ceil(rows / block_size)
    pad0: u32,
    pad1: u32,
}

// [blocks, e]: slots per (token block, expert) in; the exclusive prefix over blocks out.
@group(0) @binding(0) var<storage, read_write> block_counts: array<u32>;
@group(0) @binding(1) var<storage, read_write> counts: array<i32>;        // [e]
@group(0) @binding(2) var<storage, read_write> offsets: array<i32>;       // [e + 1]
@group(0) @binding(3) var<storage, read_write> sorted_slots: array<i32>;  // [rows]
@group(0) @binding(4) var<storage, read_write> block_experts: array<i32>; // [row_blocks]
@group(0) @binding(5) var<storage, read_write> group_loads: array<i32>;   // [g]
@group(0) @binding(6) var<storage, read_write> imbalance: array<f32>;     // [1]
@group(0) @binding(7) var<uniform> params: Params;

var<workgroup> expert_counts: array<u32, E>;
var<workgroup> expert_offsets: array<u32, E_PLUS_ONE>;
var<workgroup> partial: array<u32, WG>;
var<workgroup> loads: array<u32, G>;

fn padded(count: u32) -> u32 {
    return (count + params.block_size - 1u) / params.block_size * params.block_size;
}

// Total slots of expert x, with block_counts[., x] turned into its exclusive prefix over blocks.
fn scan_expert_column(x: u32) -> u32 {
    var run = 0u;
    for (var blk = 0u; blk < params.blocks; blk++) {
        let i = blk * E + x;
        let c = block_counts[i];
        block_counts[i] = run;
        run += c;
    }
    counts[x] = i32(run);
    return run;
}

// Padding rows of the expert whose segment is start .. end and holds `count` slots.
fn fill_padding(start: u32, count: u32, end: u32) {
    let sentinel = i32(params.tokens * params.top_k);
    for (var r = start + count; r < min(end, params.rows); r++) {
        sorted_slots[r] = sentinel;
    }
}

// Rows and blocks past the total, every `stride`-th one from `first`.
fn fill_tail(total: u32, first: u32, stride: u32) {
    let sentinel = i32(params.tokens * params.top_k);
    for (var r = total + first; r < params.rows; r += stride) {
        sorted_slots[r] = sentinel;
    }
    for (var blk = total / params.block_size + first; blk < params.row_blocks; blk += stride) {
        block_experts[blk] = -1;
    }
}

@compute @workgroup_size(WG)
fn build_layout(@builtin(local_invocation_index) lid: u32) {
    for (var x = lid; x < E; x += WG) {
        expert_counts[x] = scan_expert_column(x);
    }
    workgroupBarrier();
    // Exclusive scan of the padded counts: each thread sums a contiguous run of experts, a
    // Hillis-Steele scan over the threads gives each run its base.
    let per_thread = (E + WG - 1u) / WG;
    let begin = min(lid * per_thread, E);
    let end = min(begin + per_thread, E);
    var own = 0u;
    for (var x = begin; x < end; x++) {
        own += padded(expert_counts[x]);
    }
    partial[lid] = own;
    workgroupBarrier();
    for (var stride = 1u; stride < WG; stride *= 2u) {
        var add = 0u;
        if (lid >= stride) {
            add = partial[lid - stride];
        }
        workgroupBarrier();
        partial[lid] += add;
        workgroupBarrier();
    }
    var run = partial[lid] - own;
    for (var x = begin; x < end; x++) {
        expert_offsets[x] = run;
        offsets[x] = i32(run);
        run += padded(expert_counts[x]);
    }
    if (lid == WG - 1u) {
        expert_offsets[E] = partial[WG - 1u];
        offsets[E] = i32(partial[WG - 1u]);
    }
    workgroupBarrier();
    for (var x = lid; x < E; x += WG) {
        fill_padding(expert_offsets[x], expert_counts[x], expert_offsets[x + 1u]);
    }
    fill_tail(expert_offsets[E], lid, WG);
    let size = E / G;
    for (var g = lid; g < G; g += WG) {
        var sum = 0u;
        for (var i = 0u; i < size; i++) {
            sum += expert_counts[g * size + i];
        }
        loads[g] = sum;
        group_loads[g] = i32(sum);
    }
    workgroupBarrier();
    if (lid == 0u) {
        var most = loads[0];
        var least = loads[0];
        for (var g = 1u; g < G; g++) {
            most = max(most, loads[g]);
            least = min(least, loads[g]);
        }
        imbalance[0] = f32(most - least) / f32(params.tokens);
    }
}

// ---- Unfused chain ----

// One thread per expert: counts and the prefix over blocks.
@compute @workgroup_size(WG)
fn staged_expert_scan(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < E) {
        scan_expert_column(gid.x);
    }
}

// One thread: exclusive offsets of the padded counts.
@compute @workgroup_size(1)
fn staged_offsets() {
    var run = 0u;
    for (var x = 0u; x < E; x++) {
        offsets[x] = i32(run);
        run += padded(u32(counts[x]));
    }
    offsets[E] = i32(run);
}

// One thread per row of the capacity: its padding sentinel, found by a binary search of the
// offsets; threads past the total also clear the blocks past the end.
@compute @workgroup_size(WG)
fn staged_fill(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = linear_workgroup(wid, num) * WG + lid;
    let total = u32(offsets[E]);
    if (r >= params.rows) {
        return;
    }
    if (r < total) {
        var lo = 0u;
        var hi = E;
        // The last expert whose segment starts at or before r (empty segments come before it).
        while (hi - lo > 1u) {
            let mid = (lo + hi) / 2u;
            if (u32(offsets[mid]) <= r) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if (r >= u32(offsets[lo]) + u32(counts[lo])) {
            sorted_slots[r] = i32(params.tokens * params.top_k);
        }
    } else {
        fill_tail(total, r - total, params.rows);
    }
}

// One thread: tokens per group of experts and the imbalance.
@compute @workgroup_size(1)
fn staged_imbalance() {
    let size = E / G;
    var most = 0u;
    var least = 0xffffffffu;
    for (var g = 0u; g < G; g++) {
        var sum = 0u;
        for (var i = 0u; i < size; i++) {
            sum += u32(counts[g * size + i]);
        }
        group_loads[g] = i32(sum);
        most = max(most, sum);
        least = min(least, sum);
    }
    imbalance[0] = f32(most - least) / f32(params.tokens);
}
