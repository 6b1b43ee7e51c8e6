// Subgroup reductions for the MerRouter routing kernel: this file replaces the section between
// the reduction markers of merrouter_route.wgsl (src/ops/merrouter/route.rs splices it), so the
// routing code itself exists once. Each subgroup reduces with subgroupMax/subgroupMin/subgroupAdd,
// its first lane posts the result, and every thread combines the posts in subgroup order (so the
// sums are deterministic). Size-agnostic: the subgroup count comes from the builtin; SG_SLOTS is
// set from the adapter's smallest subgroup size (workgroup size / smallest size, rounded up).
// (naga takes subgroup operations without an `enable`; wgpu accepts the module only on a device
// with the SUBGROUP feature, which is why the plain variant exists.)

override SG_SLOTS: u32 = 32u;

struct Thread {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(num_subgroups) subgroups: u32,
    @builtin(subgroup_invocation_id) lane: u32,
}

var<workgroup> reduce_keys: array<u32, SG_SLOTS>;
var<workgroup> reduce_index: array<u32, SG_SLOTS>;
var<workgroup> reduce_sums: array<f32, SG_SLOTS>;

// (key, index) beats (best_key, best_index): a larger key, or the same key at a lower index.
fn beats(key: u32, index: u32, best_key: u32, best_index: u32) -> bool {
    return key > best_key || (key == best_key && index < best_index);
}

// The best (key, index) of the workgroup, returned to every thread.
fn reduce_best(candidate: vec2<u32>, th: Thread) -> vec2<u32> {
    let key = subgroupMax(candidate.x);
    let index = subgroupMin(select(0xffffffffu, candidate.y, candidate.x == key));
    if (th.lane == 0u) {
        reduce_keys[th.subgroup] = key;
        reduce_index[th.subgroup] = index;
    }
    workgroupBarrier();
    var best = vec2<u32>(reduce_keys[0], reduce_index[0]);
    for (var s = 1u; s < th.subgroups; s++) {
        if (beats(reduce_keys[s], reduce_index[s], best.x, best.y)) {
            best = vec2<u32>(reduce_keys[s], reduce_index[s]);
        }
    }
    workgroupBarrier();
    return best;
}

// The workgroup sum of `value`, returned to every thread.
fn reduce_sum(value: f32, th: Thread) -> f32 {
    let part = subgroupAdd(value);
    if (th.lane == 0u) {
        reduce_sums[th.subgroup] = part;
    }
    workgroupBarrier();
    var total = reduce_sums[0];
    for (var s = 1u; s < th.subgroups; s++) {
        total += reduce_sums[s];
    }
    workgroupBarrier();
    return total;
}
