// MerRouter routing: scores (softmax over all experts, or sigmoid), expert selection (MoGE: K/G
// experts from every group; group-limited: keep the best K_GROUP groups, then top-K), weights, and
// the per-block expert counts the dispatch layout starts from (src/ops/merrouter/route.rs).
//
// Entry `route` is the fused kernel: one workgroup routes TILE consecutive tokens one after the
// other with all of its WG threads; thread `lid` owns experts lid, lid + WG, ... With the fused
// gate (FUSED_GATE) the workgroup first computes the TILE rows of hidden · gate_weight, so each
// weight element is read once per TILE tokens.
//
// Selection is a series of workgroup arg-max rounds over 32-bit order keys: a larger key is a
// larger value, equal keys go to the lower expert index. Key 0 marks an expert that may not be
// chosen (taken, or outside the kept groups); NaN maps to key 1, below every number. Every round
// starts from a valid index and the host guarantees enough available experts, so a NaN can lower
// an expert's rank but never produce an out-of-range id.
//
// The `staged_*` entries are the unfused baseline chain: the same steps as separate kernels that
// pass their results through global memory (src/ops/merrouter/baseline.rs).
//
// The section between the reduction markers uses workgroup memory; the subgroup variant replaces
// exactly that section with shaders/merrouter_route_subgroup.wgsl.

override WG: u32 = 64u;
override E: u32 = 64u;
override G: u32 = 8u;
override K: u32 = 8u;
override K_GROUP: u32 = 8u;
override TILE: u32 = 1u;
override SCORING: u32 = 0u;
override SELECTION: u32 = 0u;
override GROUP_SCORE: u32 = 0u;
override HAS_BIAS: bool = false;
override HAS_SCALE: bool = false;
override RENORMALIZE: bool = false;
override FUSED_GATE: bool = false;
override IN_DTYPE: u32 = 0u;
override W_DTYPE: u32 = 0u;
override BIAS_DTYPE: u32 = 0u;
override SCALE_DTYPE: u32 = 0u;
override TILE_LEN: u32 = TILE * E;
override HIDDEN_TILE_LEN: u32 = TILE * HIDDEN_TILE;

const SCORING_SOFTMAX: u32 = 0u;
const SELECT_MOGE: u32 = 0u;
const GROUP_MAX: u32 = 0u;
// Columns of hidden staged in workgroup memory per step of the fused gate.
const HIDDEN_TILE: u32 = 32u;
const KEY_UNAVAILABLE: u32 = 0u;
const KEY_NAN: u32 = 1u;

struct Params {
    tokens: u32,       // t
    hidden: u32,       // h: columns of hidden [t, h], rows of gate_weight [h, e] (fused gate)
    block_tokens: u32, // tokens per dispatch block: block_counts row = token / block_tokens
    scaling: f32,      // routed_scaling_factor
}

@group(0) @binding(0) var<storage, read> scores_in: array<u32>;    // logits [t, e] or hidden [t, h], IN_DTYPE
@group(0) @binding(1) var<storage, read> gate_weight: array<u32>;  // [h, e], W_DTYPE (fused gate)
@group(0) @binding(2) var<storage, read> bias: array<u32>;         // [e], BIAS_DTYPE (HAS_BIAS)
@group(0) @binding(3) var<storage, read> router_scale: array<u32>; // [e], SCALE_DTYPE (HAS_SCALE)
@group(0) @binding(4) var<storage, read_write> topk_ids: array<i32>;     // [t, k]
@group(0) @binding(5) var<storage, read_write> topk_weights: array<f32>; // [t, k]
@group(0) @binding(6) var<storage, read_write> block_counts: array<atomic<u32>>; // [blocks, e]
@group(0) @binding(7) var<uniform> params: Params;
// Unfused chain only.
@group(0) @binding(8) var<storage, read_write> staged_logits: array<f32>; // [t, e] gate output
@group(0) @binding(9) var<storage, read_write> staged_scores: array<f32>; // [t, e]
@group(0) @binding(10) var<storage, read_write> staged_keys: array<u32>;  // [t, e] choice keys
@group(0) @binding(11) var<storage, read_write> staged_kept: array<u32>;  // [t, g] 1 = group kept

var<workgroup> tile: array<f32, TILE_LEN>;            // logits, then scores, of TILE tokens
var<workgroup> keys: array<u32, E>;                   // choice keys of the token being routed
var<workgroup> group_keys: array<u32, G>;
var<workgroup> group_kept: array<u32, G>;
var<workgroup> chosen: array<u32, K>;                 // selected experts in selection order
var<workgroup> hidden_tile: array<f32, HIDDEN_TILE_LEN>;

// @reductions-begin
struct Thread {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> reduce_keys: array<u32, WG>;
var<workgroup> reduce_index: array<u32, WG>;
var<workgroup> reduce_sums: array<f32, WG>;

// (key, index) beats (best_key, best_index): a larger key, or the same key at a lower index.
fn beats(key: u32, index: u32, best_key: u32, best_index: u32) -> bool {
    return key > best_key || (key == best_key && index < best_index);
}

// The best (key, index) of the workgroup, returned to every thread (tree in workgroup memory).
fn reduce_best(candidate: vec2<u32>, th: Thread) -> vec2<u32> {
    reduce_keys[th.lid] = candidate.x;
    reduce_index[th.lid] = candidate.y;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (th.lid < stride) {
            let other = th.lid + stride;
            if (beats(reduce_keys[other], reduce_index[other], reduce_keys[th.lid], reduce_index[th.lid])) {
                reduce_keys[th.lid] = reduce_keys[other];
                reduce_index[th.lid] = reduce_index[other];
            }
        }
        workgroupBarrier();
    }
    let best = vec2<u32>(reduce_keys[0], reduce_index[0]);
    workgroupBarrier();
    return best;
}

// The workgroup sum of `value`, returned to every thread.
fn reduce_sum(value: f32, th: Thread) -> f32 {
    reduce_sums[th.lid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (th.lid < stride) {
            reduce_sums[th.lid] = reduce_sums[th.lid] + reduce_sums[th.lid + stride];
        }
        workgroupBarrier();
    }
    let total = reduce_sums[0];
    workgroupBarrier();
    return total;
}
// @reductions-end

fn f32_from_bits(bits: u32) -> f32 {
    return bitcast<f32>(bits);
}

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// Order key of a value: unsigned order equals float order; -0 equals +0; NaN is KEY_NAN, below
// every number (the smallest number, -inf, has key 0x007fffff).
fn order_key(x: f32) -> u32 {
    var bits = bitcast<u32>(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return KEY_NAN;
    }
    if (bits == 0x80000000u) {
        bits = 0u;
    }
    if ((bits & 0x80000000u) != 0u) {
        return ~bits;
    }
    return bits | 0x80000000u;
}

// The value of an order key (NaN for KEY_NAN and KEY_UNAVAILABLE).
fn key_value(key: u32) -> f32 {
    if (key <= KEY_NAN) {
        return f32_from_bits(0x7fc00000u | key);
    }
    if ((key & 0x80000000u) != 0u) {
        return f32_from_bits(key & 0x7fffffffu);
    }
    return f32_from_bits(~key);
}

// e^x to about 2 ulp: Cody-Waite reduction by ln 2 and a degree-7 polynomial (the builtin exp
// may be as coarse as 3 + 2|x| ulp, too coarse for weights checked to 1e-6).
fn exp_accurate(x: f32) -> f32 {
    if (is_nan(x)) {
        return x;
    }
    if (x > 88.72) {
        return f32_from_bits(0x7f800000u);
    }
    if (x < -86.0) {
        return 0.0;
    }
    let n = round(x * 1.44269504);
    let r = fma(-n, 1.42860677e-6, fma(-n, 0.693145752, x));
    var p = 1.98412698e-4;
    p = fma(p, r, 1.38888889e-3);
    p = fma(p, r, 8.33333333e-3);
    p = fma(p, r, 4.16666667e-2);
    p = fma(p, r, 0.166666667);
    p = fma(p, r, 0.5);
    p = fma(p, r, 1.0);
    p = fma(p, r, 1.0);
    return ldexp(p, i32(n));
}

fn load_input(i: u32) -> f32 {
    if (IN_DTYPE == DTYPE_F32) {
        return bitcast<f32>(scores_in[i]);
    }
    return unpack_half(scores_in[i >> 1u], (i & 1u) == 1u, IN_DTYPE);
}

// Bias and router scale may be f32, f16 or bf16 (sglang's DeepSeek tests use a bf16 bias); they
// are widened exactly to f32, as torch's type promotion does for `f32 scores + bf16 bias`.
fn load_bias(x: u32) -> f32 {
    if (BIAS_DTYPE == DTYPE_F32) {
        return bitcast<f32>(bias[x]);
    }
    return unpack_half(bias[x >> 1u], (x & 1u) == 1u, BIAS_DTYPE);
}

fn load_router_scale(x: u32) -> f32 {
    if (SCALE_DTYPE == DTYPE_F32) {
        return bitcast<f32>(router_scale[x]);
    }
    return unpack_half(router_scale[x >> 1u], (x & 1u) == 1u, SCALE_DTYPE);
}

fn load_gate_weight(i: u32) -> f32 {
    if (W_DTYPE == DTYPE_F32) {
        return bitcast<f32>(gate_weight[i]);
    }
    return unpack_half(gate_weight[i >> 1u], (i & 1u) == 1u, W_DTYPE);
}

// score + bias of expert x, with the scores in tile[row ..] and, with a bias, the unmasked choice
// keys in keys[] (a key is exactly invertible, so this is the value the key was made from).
fn group_value(row: u32, x: u32) -> f32 {
    if (HAS_BIAS) {
        return key_value(keys[x]);
    }
    return tile[row + x];
}

// Logits of tokens first .. first + TILE into `tile`.
fn load_logits(first: u32, th: Thread) {
    for (var r = 0u; r < TILE; r++) {
        if (first + r < params.tokens) {
            for (var x = th.lid; x < E; x += WG) {
                tile[r * E + x] = load_input((first + r) * E + x);
            }
        }
    }
}

// The fused gate: tile[r, x] = Σ_c hidden[first + r, c] · gate_weight[c, x], f32 accumulation in
// column order. Hidden columns are staged HIDDEN_TILE at a time; each thread keeps its weight
// column chunk in registers and applies it to all TILE tokens.
fn gate_logits(first: u32, th: Thread) {
    let h = params.hidden;
    for (var x = th.lid; x < E; x += WG) {
        for (var r = 0u; r < TILE; r++) {
            tile[r * E + x] = 0.0;
        }
    }
    for (var c0 = 0u; c0 < h; c0 += HIDDEN_TILE) {
        workgroupBarrier();
        for (var i = th.lid; i < TILE * HIDDEN_TILE; i += WG) {
            let token = first + i / HIDDEN_TILE;
            let c = c0 + i % HIDDEN_TILE;
            var v = 0.0;
            if (token < params.tokens && c < h) {
                v = load_input(token * h + c);
            }
            hidden_tile[i] = v;
        }
        workgroupBarrier();
        for (var x = th.lid; x < E; x += WG) {
            var w: array<f32, HIDDEN_TILE>;
            for (var c = 0u; c < HIDDEN_TILE; c++) {
                w[c] = 0.0;
                if (c0 + c < h) {
                    w[c] = load_gate_weight((c0 + c) * E + x);
                }
            }
            for (var r = 0u; r < TILE; r++) {
                var acc = tile[r * E + x];
                for (var c = 0u; c < HIDDEN_TILE; c++) {
                    acc = fma(hidden_tile[r * HIDDEN_TILE + c], w[c], acc);
                }
                tile[r * E + x] = acc;
            }
        }
    }
}

// Scores of the token in tile[row ..] (in place) and its choice keys: score + bias with a bias,
// else the logit itself (same order: softmax and sigmoid are monotonic). Softmax leaves NaN logits
// out of the maximum; a NaN then poisons the sum, so every score of that token is NaN.
fn compute_scores(row: u32, th: Thread) {
    if (SCORING == SCORING_SOFTMAX) {
        var local = KEY_UNAVAILABLE;
        for (var x = th.lid; x < E; x += WG) {
            local = max(local, order_key(tile[row + x]));
        }
        let top = key_value(reduce_best(vec2<u32>(local, 0u), th).x);
        var sum = 0.0;
        for (var x = th.lid; x < E; x += WG) {
            let logit = tile[row + x];
            if (!HAS_BIAS) {
                keys[x] = order_key(logit);
            }
            let ex = exp_accurate(logit - top);
            tile[row + x] = ex;
            sum += ex;
        }
        let total = reduce_sum(sum, th);
        for (var x = th.lid; x < E; x += WG) {
            tile[row + x] = tile[row + x] / total;
        }
    } else {
        for (var x = th.lid; x < E; x += WG) {
            let logit = tile[row + x];
            if (!HAS_BIAS) {
                keys[x] = order_key(logit);
            }
            tile[row + x] = 1.0 / (1.0 + exp_accurate(-logit));
        }
    }
    if (HAS_BIAS) {
        for (var x = th.lid; x < E; x += WG) {
            keys[x] = order_key(tile[row + x] + load_bias(x));
        }
    }
    workgroupBarrier();
}

// Group keys (the best value, or the sum of the best two, of score + bias; lowest index on ties)
// and the K_GROUP best groups into group_kept. Scores and keys must be complete.
fn score_groups(row: u32, th: Thread) {
    let size = E / G;
    for (var g = th.lid; g < G; g += WG) {
        var key1 = KEY_UNAVAILABLE;
        var key2 = KEY_UNAVAILABLE;
        var value1 = 0.0;
        var value2 = 0.0;
        for (var i = 0u; i < size; i++) {
            let x = g * size + i;
            let v = group_value(row, x);
            let key = order_key(v);
            if (key > key1) {
                key2 = key1;
                value2 = value1;
                key1 = key;
                value1 = v;
            } else if (key > key2) {
                key2 = key;
                value2 = v;
            }
        }
        if (GROUP_SCORE == GROUP_MAX) {
            group_keys[g] = key1;
        } else {
            group_keys[g] = order_key(value1 + value2);
        }
        group_kept[g] = 0u;
    }
    workgroupBarrier();
    if (th.lid == 0u) {
        for (var r = 0u; r < K_GROUP; r++) {
            var best = 0u;
            var best_key = KEY_UNAVAILABLE;
            for (var g = 0u; g < G; g++) {
                if (group_kept[g] == 0u && group_keys[g] > best_key) {
                    best = g;
                    best_key = group_keys[g];
                }
            }
            group_kept[best] = 1u;
        }
    }
    workgroupBarrier();
}

// Experts outside the kept groups become unavailable (each thread masks the experts it owns).
fn mask_unkept_groups(th: Thread) {
    let size = E / G;
    for (var x = th.lid; x < E; x += WG) {
        if (group_kept[x / size] == 0u) {
            keys[x] = KEY_UNAVAILABLE;
        }
    }
}

// One selection round over experts lo .. lo + count: the best available key wins (lowest index on
// ties) and goes to chosen[slot]; the thread that scans the winner marks it unavailable.
fn select_round(lo: u32, count: u32, slot: u32, th: Thread) {
    var best = vec2<u32>(KEY_UNAVAILABLE, lo);
    for (var i = th.lid; i < count; i += WG) {
        let key = keys[lo + i];
        if (key > best.x) {
            best = vec2<u32>(key, lo + i);
        }
    }
    let winner = min(reduce_best(best, th).y, E - 1u);
    if (winner >= lo && (winner - lo) % WG == th.lid) {
        keys[winner] = KEY_UNAVAILABLE;
    }
    if (th.lid == 0u) {
        chosen[slot] = winner;
    }
}

// K selection rounds: MoGE takes K / G from every group in group order, group-limited takes the
// top K of the available experts (mask_unkept_groups first). Ends with chosen[] complete.
fn select_experts(th: Thread) {
    if (SELECTION == SELECT_MOGE) {
        let per_group = K / G;
        let size = E / G;
        for (var g = 0u; g < G; g++) {
            for (var r = 0u; r < per_group; r++) {
                select_round(g * size, size, g * per_group + r, th);
            }
        }
    } else {
        for (var r = 0u; r < K; r++) {
            select_round(0u, E, r, th);
        }
    }
    workgroupBarrier();
}

// Final weight of the expert chosen in slot j: the unbiased score, renormalised over the chosen
// experts (in slot order), times routed_scaling_factor and the expert's router scale.
fn final_weight(score: f32, total: f32, id: u32) -> f32 {
    var w = score;
    if (RENORMALIZE) {
        w = w / total;
    }
    w = w * params.scaling;
    if (HAS_SCALE) {
        w = w * load_router_scale(id);
    }
    return w;
}

fn write_outputs(row: u32, token: u32, th: Thread) {
    var total = 1.0;
    if (RENORMALIZE) {
        total = 0.0;
        for (var j = 0u; j < K; j++) {
            total += tile[row + chosen[j]];
        }
    }
    for (var j = th.lid; j < K; j += WG) {
        let id = chosen[j];
        let slot = token * K + j;
        topk_ids[slot] = i32(id);
        topk_weights[slot] = final_weight(tile[row + id], total, id);
        atomicAdd(&block_counts[(token / params.block_tokens) * E + id], 1u);
    }
}

@compute @workgroup_size(WG)
fn route(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    th: Thread,
) {
    let first = linear_workgroup(wid, num) * TILE;
    if (first >= params.tokens) {
        return;
    }
    if (FUSED_GATE) {
        gate_logits(first, th);
    } else {
        load_logits(first, th);
    }
    workgroupBarrier();
    for (var r = 0u; r < TILE; r++) {
        if (first + r < params.tokens) {
            let row = r * E;
            compute_scores(row, th);
            if (SELECTION != SELECT_MOGE && K_GROUP < G) {
                score_groups(row, th);
                mask_unkept_groups(th);
            }
            select_experts(th);
            write_outputs(row, first + r, th);
            // chosen[] and keys[] are reused by the next token.
            workgroupBarrier();
        }
    }
}

// ---- Unfused chain: one step per kernel, results through global memory ----

// Step 0 (fused gate only): logits = hidden · gate_weight, one thread per (token, expert).
@compute @workgroup_size(WG)
fn staged_gate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    th: Thread,
) {
    let i = linear_workgroup(wid, num) * WG + th.lid;
    if (i >= params.tokens * E) {
        return;
    }
    let token = i / E;
    let x = i % E;
    var acc = 0.0;
    for (var c = 0u; c < params.hidden; c++) {
        acc = fma(load_input(token * params.hidden + c), load_gate_weight(c * E + x), acc);
    }
    staged_logits[i] = acc;
}

// Step 1: scores and choice keys of one token per workgroup.
@compute @workgroup_size(WG)
fn staged_score(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    th: Thread,
) {
    let token = linear_workgroup(wid, num);
    if (token >= params.tokens) {
        return;
    }
    for (var x = th.lid; x < E; x += WG) {
        if (FUSED_GATE) {
            tile[x] = staged_logits[token * E + x];
        } else {
            tile[x] = load_input(token * E + x);
        }
    }
    compute_scores(0u, th);
    for (var x = th.lid; x < E; x += WG) {
        staged_scores[token * E + x] = tile[x];
        staged_keys[token * E + x] = keys[x];
    }
}

// Step 2 (group-limited): the kept groups of one token per workgroup.
@compute @workgroup_size(WG)
fn staged_groups(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    th: Thread,
) {
    let token = linear_workgroup(wid, num);
    if (token >= params.tokens) {
        return;
    }
    for (var x = th.lid; x < E; x += WG) {
        tile[x] = staged_scores[token * E + x];
        keys[x] = staged_keys[token * E + x];
    }
    workgroupBarrier();
    score_groups(0u, th);
    for (var g = th.lid; g < G; g += WG) {
        staged_kept[token * G + g] = group_kept[g];
    }
}

// Step 3: top-k of one token per workgroup; writes ids and the unbiased scores as weights.
@compute @workgroup_size(WG)
fn staged_topk(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    th: Thread,
) {
    let token = linear_workgroup(wid, num);
    if (token >= params.tokens) {
        return;
    }
    for (var x = th.lid; x < E; x += WG) {
        keys[x] = staged_keys[token * E + x];
    }
    if (SELECTION != SELECT_MOGE && K_GROUP < G) {
        for (var g = th.lid; g < G; g += WG) {
            group_kept[g] = staged_kept[token * G + g];
        }
        workgroupBarrier();
        mask_unkept_groups(th);
    }
    workgroupBarrier();
    select_experts(th);
    for (var j = th.lid; j < K; j += WG) {
        topk_ids[token * K + j] = i32(chosen[j]);
        topk_weights[token * K + j] = staged_scores[token * E + chosen[j]];
    }
}

// Step 4: final weights, one thread per token.
@compute @workgroup_size(WG)
fn staged_weights(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    th: Thread,
) {
    let token = linear_workgroup(wid, num) * WG + th.lid;
    if (token >= params.tokens) {
        return;
    }
    var total = 1.0;
    if (RENORMALIZE) {
        total = 0.0;
        for (var j = 0u; j < K; j++) {
            total += topk_weights[token * K + j];
        }
    }
    for (var j = 0u; j < K; j++) {
        let slot = token * K + j;
        topk_weights[slot] = final_weight(topk_weights[slot], total, u32(topk_ids[slot]));
    }
}
