// SwiftGMM tile scheduler: one workgroup turns the group offsets (or counts) into the schedule the
// GEMV and GEMM kernels walk, and writes their indirect dispatch sizes, so offsets produced on the
// GPU (by the router) never travel to the host.
//
// sched layout (u32, L = experts + 1):
//   [0, L)      offsets, repaired: clamped to [0, m_total] and made monotone by a running max
//               (counts: a running sum saturating at m_total), so groups never overlap and no
//               kernel touches a row outside x or y whatever the input holds;
//   [L, 2L)     exclusive prefix of GEMV tiles per group (entry `experts` is the total);
//   [2L, 3L)    exclusive prefix of GEMM tiles per group.
// args: per weight shard s, (x, y, z) for the GEMV dispatch at 6s and for the GEMM one at 6s + 3.

struct ScheduleParams {
    experts: u32,        // e: groups
    m_total: u32,        // rows of x and y
    counts: u32,         // 1: groups_in holds per-group counts [e]; 0: offsets [e + 1]
    signed_input: u32,   // 1: groups_in holds i32 (negative values read as 0)
    gemv_n_tiles: u32,   // GEMV column tiles per row block
    gemm_n_tiles: u32,   // GEMM column tiles per row block
    shards: u32,         // weight shards; shard_bounds holds their first experts [shards + 1]
    max_workgroups: u32, // largest indirect dispatch (workgroups loop over the remaining tiles)
}

override THRESHOLD: u32 = 8u;   // groups of at most this many rows take the GEMV path (auto mode)
override GEMV_ROWS: u32 = 8u;   // rows per GEMV row block
override GEMM_TM: u32 = 64u;    // rows per GEMM tile
override MODE: u32 = 0u;        // 0: auto, 1: every group on the GEMV path, 2: every group on GEMM

const SCHED_WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: ScheduleParams;
@group(0) @binding(1) var<storage, read> groups_in: array<u32>;
@group(0) @binding(2) var<storage, read> shard_bounds: array<u32>;
@group(0) @binding(3) var<storage, read_write> sched: array<u32>;
@group(0) @binding(4) var<storage, read_write> args: array<u32>;

var<workgroup> scan_a: array<u32, SCHED_WG>;
var<workgroup> scan_b: array<u32, SCHED_WG>;

// Input value i clamped to [0, m_total].
fn input_value(i: u32) -> u32 {
    let raw = groups_in[i];
    if (p.signed_input == 1u && (raw & 0x80000000u) != 0u) {
        return 0u;
    }
    return min(raw, p.m_total);
}

// Term i of the offsets scan: offsets combine with max, counts with a saturating add (both
// associative on [0, m_total], identity 0).
fn offset_term(i: u32) -> u32 {
    if (p.counts == 1u) {
        return select(input_value(i - 1u), 0u, i == 0u);
    }
    return input_value(i);
}

fn combine(a: u32, b: u32) -> u32 {
    if (p.counts == 1u) {
        return min(a + b, p.m_total);
    }
    return max(a, b);
}

// (GEMV tiles, GEMM tiles) of group g, from the repaired offsets.
fn group_tiles(g: u32) -> vec2<u32> {
    let rows = sched[g + 1u] - sched[g];
    if (rows == 0u) {
        return vec2<u32>(0u);
    }
    let gemv = MODE == 1u || (MODE == 0u && rows <= THRESHOLD);
    if (gemv) {
        return vec2<u32>((rows + GEMV_ROWS - 1u) / GEMV_ROWS * p.gemv_n_tiles, 0u);
    }
    return vec2<u32>(0u, (rows + GEMM_TM - 1u) / GEMM_TM * p.gemm_n_tiles);
}

@compute @workgroup_size(SCHED_WG)
fn schedule(@builtin(local_invocation_index) tid: u32) {
    let len = p.experts + 1u;
    let chunk = (len + SCHED_WG - 1u) / SCHED_WG;
    let begin = min(tid * chunk, len);
    let end = min(begin + chunk, len);

    // Offsets: each invocation reduces its chunk, the workgroup scans the partials (inclusive,
    // Hillis-Steele), then each invocation rewrites its chunk from the exclusive prefix.
    var part = 0u;
    for (var i = begin; i < end; i++) {
        part = combine(part, offset_term(i));
    }
    scan_a[tid] = part;
    workgroupBarrier();
    for (var step = 1u; step < SCHED_WG; step *= 2u) {
        // select() evaluates both operands: the index is kept in range for tid < step.
        let other = select(0u, scan_a[tid - min(step, tid)], tid >= step);
        workgroupBarrier();
        scan_a[tid] = combine(scan_a[tid], other);
        workgroupBarrier();
    }
    var run = select(0u, scan_a[max(tid, 1u) - 1u], tid > 0u);
    for (var i = begin; i < end; i++) {
        run = combine(run, offset_term(i));
        sched[i] = run;
    }
    storageBarrier();

    // Tiles per group and path: exclusive prefix sums over the same chunks.
    var tiles = vec2<u32>(0u);
    for (var g = begin; g < min(end, p.experts); g++) {
        tiles += group_tiles(g);
    }
    scan_a[tid] = tiles.x;
    scan_b[tid] = tiles.y;
    workgroupBarrier();
    for (var step = 1u; step < SCHED_WG; step *= 2u) {
        let other_a = select(0u, scan_a[tid - min(step, tid)], tid >= step);
        let other_b = select(0u, scan_b[tid - min(step, tid)], tid >= step);
        workgroupBarrier();
        scan_a[tid] += other_a;
        scan_b[tid] += other_b;
        workgroupBarrier();
    }
    var prefix = vec2<u32>(0u);
    if (tid > 0u) {
        prefix = vec2<u32>(scan_a[tid - 1u], scan_b[tid - 1u]);
    }
    for (var g = begin; g < end; g++) {
        sched[len + g] = prefix.x;
        sched[2u * len + g] = prefix.y;
        if (g < p.experts) {
            prefix += group_tiles(g);
        }
    }
    storageBarrier();

    // One indirect dispatch per weight shard and path.
    for (var s = tid; s < p.shards; s += SCHED_WG) {
        let lo = shard_bounds[s];
        let hi = shard_bounds[s + 1u];
        let gemv = sched[len + hi] - sched[len + lo];
        let gemm = sched[2u * len + hi] - sched[2u * len + lo];
        args[6u * s] = min(gemv, p.max_workgroups);
        args[6u * s + 1u] = 1u;
        args[6u * s + 2u] = 1u;
        args[6u * s + 3u] = min(gemm, p.max_workgroups);
        args[6u * s + 4u] = 1u;
        args[6u * s + 5u] = 1u;
    }
}
