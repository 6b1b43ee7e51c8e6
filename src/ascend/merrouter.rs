//! MerRouter (MoE routing, dispatch layout and combine) on Ascend: a vector-only kernel. Each
//! vector core owns a contiguous range of tokens and routes it tile by tile: scores (softmax or
//! sigmoid), group selection, top-k, weights; it sorts each tile's slots by expert and counts
//! them, publishes its counts, and after one all-core sync derives the dispatch layout (counts,
//! offsets, sorted slots, the inverse map, block expert ids, group loads, imbalance) for its own
//! slots. The combine is a separate kernel after the experts.
//!
//! Keys: `tokens`, `experts`, `groups`, `k_group` (groups kept, group-limited mode), `top_k`,
//! `scoring` (softmax | sigmoid), `select` (moge | group-limited), `topk_impl` (sort: Sort32 +
//! MrgSort on A2, the region-proposal Sort on 310P | reduce: k rounds of a max reduction),
//! `histogram` (workspace: each core's counts as one row of a table in workspace | atomic:
//! int32 DMA atomic adds into zeroed GM, as the WGSL's atomicAdd; A2 only), `rows` (tokens per
//! tile), and `peak_tflops`, `mem_gbps`.
//!
//! Defaults: 256 tokens, 8 groups, top-8; DeepSeek-V3 (256 experts, keep 4 groups, sigmoid,
//! group-limited) or Pangu Pro MoE (64 experts, softmax, MoGE); `topk_impl=sort` where the chip
//! has Sort32 (else `reduce`), `histogram=workspace`.

use super::chips::{ChipSpec, CoreArch, Memory};
use super::plan::{
    Args, CoreRole, CoreSplit, Correspondence, Io, Kernel, KernelShape, Layout, OP, OpDefSpec,
    Peak, Roofline, RooflineWork, Stage, StartPoint, TilingField, TilingKey, Workspace, add,
    first_fit, mul, product, round_up, soc_config, vector_unit,
};
use super::timeline::{Builder, Dep, Pipe, Timeline};
use super::{AscendPlan, Preset};
use crate::error::{Error, Result};

/// Shape keys `merrouter` takes.
pub const KEYS: &[&str] = &[
    "tokens",
    "experts",
    "groups",
    "k_group",
    "top_k",
    "scoring",
    "select",
    "topk_impl",
    "histogram",
    "rows",
    "peak_tflops",
    "mem_gbps",
];

/// MoeGatingTopK's documented limit on the expert count (aclnnMoeGatingTopK.md).
pub const CANN_MAX_EXPERTS: u64 = 2048;

/// The kernel's op type.
const KERNEL: &str = "MerRouter";

struct Problem {
    tokens: u64,
    experts: u64,
    groups: u64,
    k_group: u64,
    top_k: u64,
    sigmoid: bool,
    moge: bool,
    sort: bool,
    atomic_histogram: bool,
    renormalize: bool,
    scaling: f32,
}

/// Plan MerRouter on `chip`; see the module docs for the keys.
pub fn plan(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    shape: &[(String, String)],
) -> Result<AscendPlan> {
    let args = Args::parse("merrouter", shape, KEYS)?;
    let pangu = preset == Some(Preset::PanguProMoe);
    let (experts_d, k_group_d, scoring_d, select_d) = if pangu {
        (64, 8, "softmax", "moge")
    } else {
        (256, 4, "sigmoid", "group-limited")
    };
    // The presets' weights (SPEC.md): DeepSeek-V3 renormalises and scales by 2.5, Pangu Pro
    // MoE does neither.
    let (renormalize, scaling) = if pangu { (false, 1.0) } else { (true, 2.5) };
    let tokens = args.count("tokens")?.unwrap_or(256);
    let experts = args.count("experts")?.unwrap_or(experts_d);
    let groups = args.count("groups")?.unwrap_or(8);
    let top_k = args.count("top_k")?.unwrap_or(8);
    let sigmoid = args.choice("scoring", &["softmax", "sigmoid"], scoring_d)? == "sigmoid";
    let moge = args.choice("select", &["moge", "group-limited"], select_d)? == "moge";
    let k_group = args
        .count("k_group")?
        .unwrap_or(if moge { groups } else { k_group_d });
    if groups > experts || !experts.is_multiple_of(groups) {
        return Err(Error::invalid(
            OP,
            "groups",
            format!("{experts} experts do not split into {groups} equal groups"),
        ));
    }
    if k_group > groups {
        return Err(Error::invalid(
            OP,
            "k_group",
            format!("{k_group} kept groups of {groups}"),
        ));
    }
    let per_group = experts / groups;
    if moge {
        if !top_k.is_multiple_of(groups) || top_k / groups > per_group {
            return Err(Error::invalid(
                OP,
                "top_k",
                format!(
                    "MoGE picks the same number of experts from every group: top_k={top_k} \
                     must be a multiple of groups={groups} and at most {experts}"
                ),
            ));
        }
        if k_group != groups {
            return Err(Error::invalid(
                OP,
                "k_group",
                "MoGE keeps every group (k_group = groups)",
            ));
        }
    } else if top_k > k_group * per_group {
        return Err(Error::invalid(
            OP,
            "top_k",
            format!(
                "{top_k} is more than the {} experts of {k_group} kept groups",
                k_group * per_group
            ),
        ));
    }
    let sort = args.choice(
        "topk_impl",
        &["sort", "reduce"],
        if chip.features.sort32 {
            "sort"
        } else {
            "reduce"
        },
    )? == "sort";
    let atomic_histogram =
        args.choice("histogram", &["atomic", "workspace"], "workspace")? == "atomic";
    if atomic_histogram && !chip.features.int32_atomic_add {
        return Err(Error::unsupported(
            OP,
            format!(
                "histogram=atomic on {}: the Atlas inference AI Core has no int32 DMA atomic add \
                 (int16/half/float only); use histogram=workspace",
                chip.name
            ),
        ));
    }
    let peak = Peak::resolve(chip, &args)?;
    let problem = Problem {
        tokens,
        experts,
        groups,
        k_group,
        top_k,
        sigmoid,
        moge,
        sort,
        atomic_histogram,
        renormalize,
        scaling,
    };
    let tokens_per_core = tokens.div_ceil(u64::from(chip.vector_cores));
    let rows: Vec<u64> = match args.count("rows")? {
        Some(r) if !sort_keys_exact(&problem, r) => {
            return Err(Error::invalid(
                OP,
                "rows",
                format!(
                    "{r}: the dispatch sorts a tile's slots by the f32 key expert x (rows x \
                     top_k) + slot, exact only while experts x rows x top_k <= 2^24"
                ),
            ));
        }
        Some(r) => vec![r],
        None => [64, 32, 16, 8, 4, 2, 1]
            .into_iter()
            .filter(|&r| r <= tokens_per_core.max(1) && sort_keys_exact(&problem, r))
            .collect(),
    };
    if rows.is_empty() {
        return Err(Error::invalid(
            OP,
            "experts",
            format!(
                "experts x top_k = {experts} x {top_k} exceeds 2^24: the dispatch's f32 sort keys \
                 would not be exact even for one token per tile"
            ),
        ));
    }
    first_fit(rows, |r| build(chip, preset, &problem, r, peak.clone()))
}

/// The dispatch sorts the slots of an `r`-token tile by `expert * r * top_k + local slot` held as
/// an f32 sort key: exact (so the order is stable whatever the merge does with ties) while the
/// largest key stays within f32's 24-bit integer range.
fn sort_keys_exact(p: &Problem, r: u64) -> bool {
    product("experts x rows x top_k", &[p.experts, r, p.top_k])
        .is_ok_and(|span| span <= SORT_KEY_LIMIT)
}

/// Integers up to 2^24 are exact in f32.
pub const SORT_KEY_LIMIT: u64 = 1 << 24;

/// Bytes one sorted element takes in UB: a (score, index) pair from Sort32 on A2; a region
/// proposal of eight f32 values from the high-level Sort on the Atlas inference AI Core.
fn sort_element_bytes(chip: &ChipSpec) -> u64 {
    if chip.features.sort32 { 8 } else { 32 }
}

/// Experts per chunk of the counts table the layout stage reads at once.
const LAYOUT_EXPERT_CHUNK: u64 = 256;

/// Sizes the tiling struct reports.
struct Sizes {
    rows: u64,
    tokens_per_core: u64,
    tiles_per_core: u64,
    sort_key_span: u64,
    workspace: u64,
}

fn build(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    p: &Problem,
    r: u64,
    peak: Option<Peak>,
) -> Result<AscendPlan> {
    let e8 = round_up("experts", p.experts, 8)?;
    let g8 = round_up("groups", p.groups, 8)?;
    // Slots of one tile, in whole 32-element sort repeats.
    let rk = round_up("rows x top_k", mul("rows x top_k", r, p.top_k)?, 32)?;
    let sort_bytes = sort_element_bytes(chip);
    let separated = chip.arch == CoreArch::Separated;
    // Each core owns a contiguous token range, routed tile by tile.
    let tokens_per_core = p.tokens.div_ceil(u64::from(chip.vector_cores));
    let cores_used = p.tokens.div_ceil(tokens_per_core) as u32;
    let tiles_per_core = tokens_per_core.div_ceil(r);
    let last_core_tokens = p.tokens - (u64::from(cores_used) - 1) * tokens_per_core;
    let tiles_total = (u64::from(cores_used) - 1) * tiles_per_core + last_core_tokens.div_ceil(r);
    let chunk = e8.min(LAYOUT_EXPERT_CHUNK);

    let mut layout = Layout::new(
        chip,
        KERNEL,
        format!("merrouter on {} (rows={r})", chip.name),
    );
    // Routing.
    layout.add(
        Memory::Ub,
        "logits",
        format!("[{r}, {e8}] f32"),
        &[r, e8],
        4,
        2,
    );
    layout.add(
        Memory::Ub,
        "scores",
        format!("[{r}, {e8}] f32"),
        &[r, e8],
        4,
        1,
    );
    // The sort works group by group, each group padded to whole 32-element repeats (as
    // MoeGatingTopK pads them).
    let sel_width = if p.sort {
        mul(
            "groups",
            p.groups,
            round_up("experts per group", p.experts / p.groups, 32)?,
        )?
    } else {
        e8
    };
    layout.add(
        Memory::Ub,
        "choice values",
        format!("[{r}, {sel_width}] f32"),
        &[r, sel_width],
        4,
        1,
    );
    if p.sort {
        layout.add(
            Memory::Ub,
            "sorted choices",
            format!("[{r}, {sel_width}] x {sort_bytes} B"),
            &[r, sel_width],
            sort_bytes,
            2,
        );
        layout.add(
            Memory::Ub,
            "expert index",
            format!("[{sel_width}] u32"),
            &[sel_width],
            4,
            1,
        );
    } else {
        layout.add(
            Memory::Ub,
            "expert index",
            format!("[{e8}] u32"),
            &[e8],
            4,
            1,
        );
        layout.add(
            Memory::Ub,
            "max and index",
            format!("[{r}, 2] f32"),
            &[r, 2],
            4,
            1,
        );
    }
    if !p.moge {
        layout.add(
            Memory::Ub,
            "group scores",
            format!("[{r}, {g8}] f32"),
            &[r, g8],
            4,
            1,
        );
    }
    layout.add(
        Memory::Ub,
        "bias and scale",
        format!("[2, {e8}] f32"),
        &[2, e8],
        4,
        1,
    );
    layout.add(
        Memory::Ub,
        "topk ids",
        format!("[{r}, {}] i32", p.top_k),
        &[r, p.top_k],
        4,
        2,
    );
    layout.add(
        Memory::Ub,
        "topk weights",
        format!("[{r}, {}] f32", p.top_k),
        &[r, p.top_k],
        4,
        2,
    );
    // Dispatch layout.
    layout.add(Memory::Ub, "slot keys", format!("[{rk}] f32"), &[rk], 4, 1);
    layout.add(
        Memory::Ub,
        "sorted slots",
        format!("[{rk}] x {sort_bytes} B"),
        &[rk],
        sort_bytes,
        2,
    );
    layout.add(
        Memory::Ub,
        "expert counts",
        format!("[{e8}] i32"),
        &[e8],
        4,
        1,
    );
    layout.add(
        Memory::Ub,
        "counts of all cores",
        format!("[{cores_used}, {chunk}] i32"),
        &[u64::from(cores_used), chunk],
        4,
        1,
    );
    layout.add(
        Memory::Ub,
        "expert bases",
        format!("[{e8}] i32"),
        &[e8],
        4,
        1,
    );
    layout.add(Memory::Ub, "rows out", format!("[{rk}] i32"), &[rk], 4, 2);
    let (buffers, memory) = layout.finish()?;

    // The busiest core is core 0: a full token range plus the layout outputs.
    let slots = mul("tokens x top_k", tokens_per_core, p.top_k)?;
    let layout_out = product("layout bytes", &[2 * p.experts + 1 + p.groups + 1, 4])?;
    let hbm = [
        product("logit bytes", &[tokens_per_core, p.experts, 4])?,
        product("bias bytes", &[2, p.experts, 4])?,
        mul("id and weight bytes", slots, 8)?,
        product("dispatch bytes", &[slots, 4, 3])?,
        layout_out,
    ]
    .into_iter()
    .try_fold(0u64, |acc, b| add("GM bytes", acc, b))?;
    let sync_flags = if separated { 0 } else { 32 };
    let workspace_per_core = [
        mul("workspace", slots, 8)?,
        mul("workspace", p.experts, 4)?,
        sync_flags,
    ]
    .into_iter()
    .try_fold(0u64, |acc, b| add("workspace", acc, b))?;
    let workspace_traffic = [
        product("workspace", &[slots, 8, 2])?,
        mul("workspace", p.experts, 4)?,
        product("workspace", &[u64::from(cores_used), p.experts, 4])?,
    ]
    .into_iter()
    .try_fold(0u64, |acc, b| add("workspace", acc, b))?;
    let roofline = Roofline::estimate(
        chip,
        cores_used,
        RooflineWork {
            cube_flops: 0.0,
            gm_bytes: hbm as f64,
            workspace_bytes: workspace_traffic as f64,
            int8_cube: false,
        },
        peak,
    );

    let mut notes = vec![format!(
        "{} scores{}; {}",
        if p.sigmoid { "sigmoid" } else { "softmax" },
        if p.sigmoid {
            ", plus the per-expert bias for choosing only (weights use the unbiased scores)"
        } else {
            ""
        },
        if p.moge {
            format!(
                "MoGE: top-{} inside each of the {} groups of {} experts",
                p.top_k / p.groups,
                p.groups,
                p.experts / p.groups
            )
        } else {
            format!(
                "group-limited: keep the best {} of {} groups (max or top-2 sum), then top-{} \
                 over their experts",
                p.k_group, p.groups, p.top_k
            )
        }
    )];
    notes.push(if p.sort {
        if chip.features.sort32 {
            "top-k by Sort32 (32 per repeat, descending, equal scores keep their input order) and \
             MrgSort (up to 4 sorted lists); the first k (score, index) pairs are the answer"
                .into()
        } else {
            "top-k by the high-level Sort on region proposals (16 per repeat, 32 B per f32 \
             element; Sort32 and the basic MrgSort do not exist on this core)"
                .into()
        }
    } else {
        format!(
            "top-k by {} rounds of a max reduction; the lowest index among equal maxima comes \
             from Compare + Select + ReduceMin over the indices (the reduction's own index on \
             ties is not documented)",
            p.top_k
        )
    });
    let span = product("experts x rows x top_k", &[p.experts, r, p.top_k])?;
    notes.push(format!(
        "dispatch without a global sort: each core routes a contiguous range of \
         {tokens_per_core} tokens, sorts each tile's slots by the exact key expert x {} + slot, \
         counts per expert, publishes its counts ({}), and after SyncAll every core derives its \
         own bases from the counts of the cores before it, so the order is stable by slot and \
         needs no atomics",
        r * p.top_k,
        if p.atomic_histogram {
            "int32 DMA atomic adds into zeroed GM, as the WGSL's atomicAdd"
        } else {
            "one row of a [cores, experts] table in workspace"
        }
    ));
    notes.push(
        "expert segments are not padded (block_size 1): the grouped matmul splits M by the \
         group list at any row count, so block_experts names the expert of every row"
            .into(),
    );
    if !separated {
        notes.push(
            "SyncAll on this core is the soft variant: a zeroed GM flag area of 32 B per core \
             (in the workspace above)"
                .into(),
        );
    }
    notes.push(
        "no cube work: the plan is bandwidth and latency bound; the vector instruction count is \
         not modelled"
            .into(),
    );
    if p.experts > CANN_MAX_EXPERTS
        || mul(
            "experts",
            round_up("experts per group", p.experts / p.groups, 32)?,
            p.groups,
        )? > CANN_MAX_EXPERTS
    {
        notes.push(format!(
            "MoeGatingTopK would refuse this shape: it needs at most {CANN_MAX_EXPERTS} experts \
             after padding each group to 32"
        ));
    }
    let sizes = Sizes {
        rows: r,
        tokens_per_core,
        tiles_per_core,
        sort_key_span: span,
        workspace: workspace_per_core,
    };
    let kernel = Kernel {
        name: KERNEL.into(),
        split: CoreSplit {
            kernel: if separated {
                "vector only (AIV)".into()
            } else {
                "AI core (vector unit)".into()
            },
            block_dim: cores_used,
            cube_cores_used: 0,
            vector_cores_used: cores_used,
            work_unit: format!("tile of up to {r} tokens"),
            work_units: tiles_total,
            units_per_core: tiles_per_core,
        },
        tiling: tiling_fields(p, &sizes)?,
        key: tiling_key(p),
        workspace: Workspace::new(workspace_per_core, cores_used)?,
        op_def: op_def(chip),
        shape: kernel_shape(chip, p),
        timeline: timeline(chip, KERNEL),
    };

    Ok(AscendPlan {
        op: "merrouter",
        command: String::new(),
        chip,
        preset,
        problem: vec![
            ("tokens".into(), p.tokens.to_string()),
            ("experts".into(), p.experts.to_string()),
            ("groups".into(), p.groups.to_string()),
            ("k_group".into(), p.k_group.to_string()),
            ("top_k".into(), p.top_k.to_string()),
            (
                "scoring".into(),
                if p.sigmoid { "sigmoid" } else { "softmax" }.into(),
            ),
            (
                "select".into(),
                if p.moge { "moge" } else { "group-limited" }.into(),
            ),
        ],
        choices: vec![
            (
                "topk_impl".into(),
                if p.sort { "sort" } else { "reduce" }.into(),
            ),
            (
                "histogram".into(),
                if p.atomic_histogram {
                    "atomic"
                } else {
                    "workspace"
                }
                .into(),
            ),
            ("rows".into(), r.to_string()),
        ],
        kernels: vec![kernel],
        stages: stages(chip, p),
        buffers,
        memory,
        roofline,
        start: start_points(chip),
        correspondence: correspondence(chip, p),
        notes,
    })
}

/// The Ascend C stages of the port: one vector kernel for routing and the dispatch layout, and
/// the combine as its own kernel after the experts.
fn stages(chip: &ChipSpec, p: &Problem) -> Vec<Stage> {
    let vector = vector_unit(chip);
    let sorter = if chip.features.sort32 {
        "Sort32 + MrgSort"
    } else {
        "the region-proposal Sort"
    };
    let mut list = vec![
        Stage::new(
            "CopyIn logits",
            vector,
            "merrouter_route.wgsl: route (load_logits)",
            "MTE2 copies a tile of the core's tokens' logits GM -> UB (VECIN queue, 2 buffers)",
        ),
        Stage::new(
            "scores",
            vector,
            "merrouter_route.wgsl: route (compute_scores)",
            if p.sigmoid {
                "Sigmoid (or Muls -1, Exp, Adds 1, Reciprocal); choice values = score + bias \
                 (Add); NaN inputs replaced by -inf through Compare(x, x) + Select before ranking"
            } else {
                "softmax per row: ReduceMax, Sub (Brcb), Exp, ReduceSum, Div; choice values = \
                 the logits (same order); NaN inputs replaced by -inf through Compare(x, x) + \
                 Select before ranking"
            },
        ),
    ];
    if !p.moge {
        list.push(Stage::new(
            "group select",
            vector,
            "merrouter_route.wgsl: route (score_groups, mask_unkept_groups)",
            "per group: the max (WholeReduceMax) or the sum of the best two (the head of the \
             group's sorted run); keep the best k_group groups (a sort of the group scores, or \
             k_group max rounds); Select sets the other groups' choice values to -inf",
        ));
    }
    list.extend([
        Stage::new(
            "top-k",
            vector,
            "merrouter_route.wgsl: route (select_experts, select_round)",
            match (p.sort, p.moge) {
                (true, false) => format!(
                    "{sorter} of each group's choice values with the expert index (groups \
                     padded to 32 with -inf; equal values keep their input order inside a sort \
                     repeat), MrgSort of the kept groups' runs; the first {} entries",
                    p.top_k
                ),
                (true, true) => format!(
                    "{sorter} of each group's choice values with the expert index (groups \
                     padded to 32 with -inf; equal values keep their input order inside a sort \
                     repeat); the first {} entries of every group's run, group by group",
                    p.top_k / p.groups
                ),
                (false, false) => format!(
                    "{} rounds: ReduceMax, Compare == max + Select(index, e) + ReduceMin for the \
                     lowest tied index, Select masks the winner",
                    p.top_k
                ),
                (false, true) => format!(
                    "{} round(s) in each of the {} groups, group by group: ReduceMax over the \
                     group, Compare == max + Select(index, e) + ReduceMin for the lowest tied \
                     index, Select masks the winner",
                    p.top_k / p.groups,
                    p.groups
                ),
            },
        ),
        Stage::new(
            "weights",
            vector,
            "merrouter_route.wgsl: route (final_weight, write_outputs)",
            "Gather the unbiased scores of the chosen ids, ReduceSum + Div when renormalising, \
             Muls routed_scaling_factor, Mul by the gathered router_scale when given; CopyOut \
             topk_ids and topk_weights (VECOUT, 2 buffers)",
        ),
        Stage::new(
            "count",
            vector,
            "merrouter_route.wgsl: route (atomicAdd into block_counts)",
            format!(
                "{sorter} of the tile's slots by the key expert x (rows x top_k) + slot: expert \
                 by expert, ascending slot; CopyOut the sorted run to workspace; add the run \
                 length of each expert (Compare of neighbours + GatherMask) to the core's counts"
            ),
        ),
        Stage::new(
            "publish counts",
            vector,
            "(the pass boundary between route and build_layout)",
            if p.atomic_histogram {
                "SetAtomicAdd<int32_t> + DataCopy of the core's counts into a zeroed [blocks, \
                 experts] table in GM; SyncAll"
            } else {
                "CopyOut the core's counts as its row of a [cores, experts] table in workspace; \
                 SyncAll"
            },
        ),
        Stage::new(
            "layout",
            vector,
            "merrouter_layout.wgsl: build_layout",
            "every core: CopyIn the counts table in expert chunks; column sums = counts, \
             exclusive scan over experts = offsets, own base = offset + counts of the cores \
             before it; core 0 CopyOut counts, offsets, group_loads (ReduceSum per group) and \
             imbalance ((max - min) / tokens)",
        ),
        Stage::new(
            "scatter",
            vector,
            "merrouter_scatter.wgsl: scatter",
            "per tile: CopyIn its sorted run; the row of entry i = base + running count + rank \
             inside the expert's segment; CopyOut sorted_slots and block_experts one expert \
             segment at a time (DataCopyPad), and slot_rows in slot order (Scatter on 310P; A2 \
             has no vector Scatter: sort the (slot, row) pairs back); running counts += segment \
             lengths",
        ),
        Stage::new(
            "combine",
            vector,
            "merrouter_combine.wgsl: combine",
            "its own kernel after the experts: per token, CopyIn the k rows of y named by \
             slot_rows (one DataCopy each), Muls by the weight and Add in slot order (f32), \
             Cast, CopyOut",
        ),
    ]);
    list
}

/// The tiling struct, each field tied to the WGSL constant or host value it replaces.
fn tiling_fields(p: &Problem, s: &Sizes) -> Result<Vec<TilingField>> {
    Ok(vec![
        TilingField::u32("tokens", p.tokens, "t (Params::tokens)")?,
        TilingField::u32("experts", p.experts, "E override")?,
        TilingField::u32("groups", p.groups, "G override")?,
        TilingField::u32("kGroup", p.k_group, "K_GROUP override")?,
        TilingField::u32("topK", p.top_k, "K override")?,
        TilingField::u32(
            "rowsPerTile",
            s.rows,
            "TILE override (1 token per workgroup from logits, up to 8 with the fused gate)",
        )?,
        TilingField::u32(
            "tokensPerCore",
            s.tokens_per_core,
            "BT override: tokens per scatter block (256, fewer when e needs it)",
        )?,
        TilingField::u32(
            "tilesPerCore",
            s.tiles_per_core,
            "none: one workgroup per token in route",
        )?,
        TilingField::u32("blockSize", 1, "block_size (padding of expert segments)")?,
        TilingField::u32(
            "sortKeySpan",
            s.sort_key_span,
            "none: the WGSL scatter ranks with per-block bitmasks (atomicOr, popcount)",
        )?,
        TilingField::u32(
            "renormalize",
            u64::from(p.renormalize),
            "RENORMALIZE override (RouterConfig::renormalize)",
        )?,
        TilingField::f32(
            "routedScalingFactor",
            p.scaling,
            "Params::routed_scaling_factor",
        ),
        TilingField::u64(
            "workspaceBytesPerCore",
            s.workspace,
            "block_counts [blocks, e] (cleared before route)",
        ),
    ])
}

fn tiling_key(p: &Problem) -> TilingKey {
    TilingKey::new(&[
        (
            "scoring",
            &["softmax", "sigmoid"],
            if p.sigmoid { "sigmoid" } else { "softmax" },
            "SCORING override",
        ),
        (
            "select",
            &["moge", "group-limited"],
            if p.moge { "moge" } else { "group-limited" },
            "SELECTION override",
        ),
        (
            "topkImpl",
            &["sort", "reduce"],
            if p.sort { "sort" } else { "reduce" },
            "none: the WGSL takes k arg-max rounds over order keys (as reduce)",
        ),
        (
            "histogram",
            &["workspace", "atomic"],
            if p.atomic_histogram {
                "atomic"
            } else {
                "workspace"
            },
            "atomicAdd into block_counts [blocks, e] in route",
        ),
    ])
}

fn op_def(chip: &ChipSpec) -> OpDefSpec {
    let i32_out = |name: &str| Io::new(name, "DT_INT32", "FORMAT_ND");
    OpDefSpec {
        inputs: vec![
            Io::new("logits", "DT_FLOAT", "FORMAT_ND"),
            Io::new("bias", "DT_FLOAT", "FORMAT_ND").optional(),
            Io::new("router_scale", "DT_FLOAT", "FORMAT_ND").optional(),
        ],
        outputs: vec![
            i32_out("topk_ids"),
            Io::new("topk_weights", "DT_FLOAT", "FORMAT_ND"),
            i32_out("counts"),
            i32_out("offsets"),
            i32_out("sorted_slots"),
            i32_out("slot_rows"),
            i32_out("block_experts"),
            i32_out("group_loads"),
            Io::new("imbalance", "DT_FLOAT", "FORMAT_ND"),
        ],
        config: soc_config(chip).into(),
    }
}

fn kernel_shape(chip: &ChipSpec, p: &Problem) -> KernelShape {
    let separated = chip.arch == CoreArch::Separated;
    let mut params = vec![(
        "DataCopyExtParams + DataCopyPadExtParams".to_string(),
        "rows of e logits and expert segments whose length is not a multiple of 32 B".to_string(),
    )];
    if p.sort {
        params.push(if chip.features.sort32 {
            (
                "Sort32 / MrgSort (MrgSort4Info)".to_string(),
                "(score, index) pairs, 32 per repeat, merged four lists at a time".to_string(),
            )
        } else {
            (
                "Sort (region proposals)".to_string(),
                "16 proposals per repeat, eight f32 values per element".to_string(),
            )
        });
    }
    KernelShape {
        kernel_type: if separated {
            "KERNEL_TYPE_AIV_ONLY".into()
        } else {
            "the AI core's vector unit (no cube work)".into()
        },
        flags: Vec::new(),
        sync: if separated {
            "queues between MTE2, V and MTE3; one SyncAll (hardware) between publishing the \
             counts and reading the counts table"
                .into()
        } else {
            "queues between MTE2, V and MTE3; one soft SyncAll (a zeroed GM flag area of 32 B \
             per core) between publishing the counts and reading the counts table"
                .into()
        },
        params,
    }
}

/// Three token tiles routed and counted, the SyncAll, the layout, then the scatter of the
/// three tiles.
fn timeline(chip: &ChipSpec, kernel: &str) -> Timeline {
    const TILES: usize = 3;
    let core = if chip.arch == CoreArch::Separated {
        CoreRole::Aiv
    } else {
        CoreRole::AiCore
    };
    let mut b = Builder::new(kernel);
    let mut routed: Vec<usize> = Vec::new();
    let mut runs: Vec<usize> = Vec::new();
    for j in 0..TILES {
        let mut deps = Vec::new();
        if j >= 2 {
            deps.push(Dep::On(routed[j - 2]));
        }
        let logits = b.step(core, Pipe::Mte2, &format!("logits{j}"), &deps);
        let route = b.step(core, Pipe::V, &format!("route{j}"), &[Dep::On(logits)]);
        routed.push(route);
        b.step(core, Pipe::Mte3, &format!("ids{j}"), &[Dep::On(route)]);
        let count = b.step(core, Pipe::V, &format!("count{j}"), &[Dep::On(route)]);
        runs.push(b.step(core, Pipe::Mte3, &format!("run{j}"), &[Dep::On(count)]));
    }
    let published = b.step(core, Pipe::Mte3, "counts row", &[Dep::On(runs[TILES - 1])]);
    let table = b.step(
        core,
        Pipe::Mte2,
        "counts table",
        &[Dep::Named(published, "SyncAll")],
    );
    let layout = b.step(core, Pipe::V, "layout", &[Dep::On(table)]);
    b.step(core, Pipe::Mte3, "offsets", &[Dep::On(layout)]);
    for (j, &run) in runs.iter().enumerate() {
        let read = b.step(
            core,
            Pipe::Mte2,
            &format!("run{j} in"),
            &[Dep::On(run), Dep::On(layout)],
        );
        let scatter = b.step(core, Pipe::V, &format!("scatter{j}"), &[Dep::On(read)]);
        b.step(core, Pipe::Mte3, &format!("rows{j}"), &[Dep::On(scatter)]);
    }
    b.finish()
}

fn start_points(chip: &ChipSpec) -> Vec<StartPoint> {
    if chip.arch == CoreArch::Separated {
        vec![
            StartPoint::new(
                "compare with",
                "MoeGatingTopK (routing), MoeInitRoutingV2 (dispatch) and MoeFinalizeRouting / \
                 MoeFinalizeRoutingV2 (combine)",
                "hicann/ops-transformer moe/moe_gating_top_k, moe/moe_init_routing_v2, \
                 moe/moe_finalize_routing_v2",
            ),
            StartPoint::new(
                "torch_npu",
                "torch_npu.npu_moe_gating_top_k(x, k, bias=..., k_group=4, group_count=8, \
                 group_select_mode=1, renorm=0, norm_type=1, routed_scaling_factor=2.5); \
                 torch_npu.npu_moe_init_routing_v2(x, expert_idx, active_num=..., expert_num=e, \
                 drop_pad_mode=0, expert_tokens_num_type=1, expert_tokens_num_flag=True)",
                "Ascend Extension for PyTorch API, torch_npu.npu_moe_gating_top_k \
                 (https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_002365.html) \
                 and torch_npu.npu_moe_init_routing_v2 (.../ptaoplist_002366.html)",
            ),
            StartPoint::new(
                "port from",
                "hicann/ops-transformer moe/moe_gating_top_k (op_kernel), moe/moe_init_routing_v2",
                "hicann/ops-transformer",
            ),
        ]
    } else {
        vec![
            StartPoint::new(
                "compare with",
                "MoeInitRoutingV2 (its ascend310p configuration: x float16 or float32) for the \
                 dispatch; MoeFinalizeRoutingV2 for the combine (listed for the Atlas inference \
                 series in CANN 8.5: 2-D float16/float32 expandedX with H a multiple of 32, \
                 dropPadMode 2 only, x1/x2/bias/expertIdx null) or MoeTokenUnpermute (registers \
                 ascend310p); MoeGatingTopK is A2/A3 only: compare the routing with our f64 \
                 reference",
                "hicann/ops-transformer moe/moe_init_routing_v2/op_host/\
                 moe_init_routing_v2_def.cpp, moe/moe_token_unpermute/op_host/\
                 moe_token_unpermute_def.cpp; CANN 8.5.0 aclnnMoeFinalizeRoutingV2 \
                 (https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/850/API/aolapi/context/ops-transformer/aclnnMoeFinalizeRoutingV2.md)",
            ),
            StartPoint::new(
                "torch_npu",
                "torch_npu.npu_moe_init_routing_v2 for the dispatch, on float16 / float32 x",
                "Ascend Extension for PyTorch API, torch_npu.npu_moe_init_routing_v2 \
                 (https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_002366.html)",
            ),
            StartPoint::new(
                "port from",
                "hicann/ops-transformer moe/moe_init_routing_v2 op_kernel, the __CCE_AICORE__ == \
                 200 paths (moe_v2_common.h, moe_v2_expert_token_out.h)",
                "hicann/ops-transformer",
            ),
        ]
    }
}

fn correspondence(chip: &ChipSpec, p: &Problem) -> Vec<Correspondence> {
    let separated = chip.arch == CoreArch::Separated;
    vec![
        Correspondence::new(
            "logits staged in workgroup memory, one token per workgroup",
            "UB `logits`, a VECIN queue of 2 buffers holding a tile of rowsPerTile tokens",
        ),
        Correspondence::new(
            "order keys computed in place (compute_scores)",
            "UB `scores` and `choice values` (NaN replaced by -inf)",
        ),
        Correspondence::new(
            "subgroup / workgroup-memory arg-max rounds (select_round)",
            if p.sort {
                "UB `sorted choices` from Sort32 / MrgSort (or the region-proposal Sort), `expert \
                 index`"
            } else {
                "UB `max and index`: ReduceMax, Compare, Select, ReduceMin per round"
            },
        ),
        Correspondence::new(
            "atomicAdd into `block_counts [blocks, e]`",
            if p.atomic_histogram {
                "SetAtomicAdd<int32_t> + DataCopy into a zeroed GM table"
            } else {
                "UB `expert counts`, copied out as the core's row of a workspace table"
            },
        ),
        Correspondence::new(
            "the pass boundary between route and build_layout",
            if separated {
                "SyncAll (hardware) in the same kernel"
            } else {
                "soft SyncAll on a zeroed GM flag area"
            },
        ),
        Correspondence::new(
            "scatter's per-expert bitmasks (atomicOr, popcount) in workgroup memory",
            "UB `slot keys` / `sorted slots`: the rank inside an expert is the position in the \
             sorted run",
        ),
        Correspondence::new(
            "workgroupBarrier between the steps of route",
            "queue hand-offs (EnQue / DeQue) between MTE2, V and MTE3",
        ),
    ]
}
