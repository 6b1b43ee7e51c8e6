//! MerRouter (MoE routing, dispatch layout and combine) on Ascend: a vector-only kernel. Each
//! vector core takes tiles of tokens: scores (softmax or sigmoid), group selection, top-k,
//! weights, then counts its tokens per expert for the dispatch layout.
//!
//! Keys: `tokens`, `experts`, `groups`, `k_group` (groups kept, group-limited mode), `top_k`,
//! `scoring` (softmax | sigmoid), `select` (moge | group-limited), `topk_impl` (sort: Sort32 +
//! MrgSort | reduce: k rounds of a max reduction), `histogram` (atomic: int32 DMA atomic add |
//! workspace: partial counts and a second pass), `rows` (tokens per tile), and `peak_tflops`,
//! `mem_gbps`.
//!
//! Defaults: 256 tokens, 8 groups, top-8; DeepSeek-V3 (256 experts, keep 4 groups, sigmoid,
//! group-limited) or Pangu Pro MoE (64 experts, softmax, MoGE); Sort32 and the atomic histogram
//! where the chip has them.

use super::chips::{ChipSpec, CoreArch, Memory};
use super::plan::{Args, CoreSplit, Layout, OP, Peak, Roofline, first_fit, round_up, spread};
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
    let tokens = args.count("tokens")?.unwrap_or(256);
    let experts = args.count("experts")?.unwrap_or(experts_d);
    let groups = args.count("groups")?.unwrap_or(8);
    let top_k = args.count("top_k")?.unwrap_or(8);
    let sigmoid = args.choice("scoring", &["softmax", "sigmoid"], scoring_d)? == "sigmoid";
    let moge = args.choice("select", &["moge", "group-limited"], select_d)? == "moge";
    let k_group = args
        .count("k_group")?
        .unwrap_or(if moge { groups } else { k_group_d });
    if !experts.is_multiple_of(groups) {
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
    if sort && !chip.features.sort32 {
        return Err(Error::unsupported(
            OP,
            format!(
                "topk_impl=sort on {}: Sort32 / MrgSort are not available on the Atlas inference \
                 AI Core; use topk_impl=reduce",
                chip.name
            ),
        ));
    }
    let atomic_histogram = args.choice(
        "histogram",
        &["atomic", "workspace"],
        if chip.features.int32_atomic_add {
            "atomic"
        } else {
            "workspace"
        },
    )? == "atomic";
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
    };
    let per_core = tokens.div_ceil(u64::from(chip.vector_cores));
    let rows: Vec<u64> = match args.count("rows")? {
        Some(r) => vec![r],
        None => [64, 32, 16, 8, 4, 2, 1]
            .into_iter()
            .filter(|&r| r <= per_core.max(1))
            .collect(),
    };
    first_fit(rows, |r| build(chip, preset, &problem, r, peak.clone()))
}

fn build(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    p: &Problem,
    r: u64,
    peak: Option<Peak>,
) -> Result<AscendPlan> {
    let e8 = round_up(p.experts, 8);
    let e32 = round_up(p.experts, 32);
    let separated = chip.arch == CoreArch::Separated;
    let mut layout = Layout::new(chip, format!("merrouter on {} (rows={r})", chip.name));
    layout.add(
        Memory::Ub,
        "logits",
        format!("[{r}, {e8}] f32"),
        r * e8 * 4,
        2,
    );
    layout.add(
        Memory::Ub,
        "scores",
        format!("[{r}, {e8}] f32"),
        r * e8 * 4,
        1,
    );
    let sel_width = if p.sort { e32 } else { e8 };
    layout.add(
        Memory::Ub,
        "selection values",
        format!("[{r}, {sel_width}] f32"),
        r * sel_width * 4,
        1,
    );
    if p.sort {
        layout.add(
            Memory::Ub,
            "sorted (score, index)",
            format!("[{r}, {e32}] x 8 B"),
            r * e32 * 8,
            2,
        );
        layout.add(
            Memory::Ub,
            "expert index",
            format!("[{e32}] u32"),
            e32 * 4,
            1,
        );
    } else {
        layout.add(
            Memory::Ub,
            "max and index",
            format!("[{r}, 2] f32"),
            r * 2 * 4,
            1,
        );
    }
    layout.add(
        Memory::Ub,
        "group scores",
        format!("[{r}, {}] f32", round_up(p.groups, 8)),
        r * round_up(p.groups, 8) * 4,
        1,
    );
    layout.add(
        Memory::Ub,
        "bias and scale",
        format!("[2, {e8}] f32"),
        2 * e8 * 4,
        1,
    );
    layout.add(
        Memory::Ub,
        "topk ids",
        format!("[{r}, {}] i32", p.top_k),
        r * p.top_k * 4,
        2,
    );
    layout.add(
        Memory::Ub,
        "topk weights",
        format!("[{r}, {}] f32", p.top_k),
        r * p.top_k * 4,
        2,
    );
    layout.add(
        Memory::Ub,
        "expert counts",
        format!("[{e8}] i32"),
        e8 * 4,
        1,
    );
    let (buffers, memory) = layout.finish()?;

    let tiles = p.tokens.div_ceil(r);
    let (cores_used, tiles_per_core) = spread(tiles, chip.vector_cores);
    let slots = p.tokens * p.top_k;
    let hbm_total =
        p.tokens * p.experts * 4 + 2 * p.experts * 4 + slots * 8 + slots * 4 * 2 + p.experts * 8;
    let share = tiles_per_core as f64 / tiles as f64;
    let (workspace_core, workspace_size) = if p.atomic_histogram {
        (0, 0)
    } else {
        (2 * p.experts * 4, p.experts * 4)
    };
    let roofline = Roofline::estimate(
        chip,
        cores_used,
        0.0,
        hbm_total as f64 * share,
        workspace_core as f64,
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
        "top-k by Sort32 (32-element blocks, descending, ties to the lower index) and MrgSort \
         (merges up to 4 sorted lists); the first k (score, index) pairs are the answer"
            .into()
    } else {
        format!(
            "top-k by {} rounds of a max reduction with its index, masking each winner; check \
             the tie order against the reference (lower expert index must win)",
            p.top_k
        )
    });
    notes.push(if p.atomic_histogram {
        "dispatch: each core counts its slots per expert in UB and adds the counts to GM with an \
         int32 DMA atomic add (SetAtomicAdd<int32_t>); one core then turns counts into offsets \
         and every core scatters its slots"
            .into()
    } else {
        "dispatch: each core writes its partial counts to workspace; a second pass sums and \
         prefix-sums them (no int32 atomics needed), then every core scatters its slots"
            .into()
    });
    notes.push(
        "no cube work: the plan is bandwidth and latency bound; the vector instruction count is \
         not modelled"
            .into(),
    );
    if p.experts > CANN_MAX_EXPERTS
        || round_up(p.experts / p.groups, 32) * p.groups > CANN_MAX_EXPERTS
    {
        notes.push(format!(
            "MoeGatingTopK would refuse this shape: it needs at most {CANN_MAX_EXPERTS} experts \
             after padding each group to 32"
        ));
    }

    Ok(AscendPlan {
        op: "merrouter",
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
        split: CoreSplit {
            kernel: if separated {
                "vector only (AIV)".into()
            } else {
                "AI core (vector unit)".into()
            },
            block_dim: cores_used,
            cube_cores_used: 0,
            vector_cores_used: cores_used,
            work_unit: format!("{r} tokens"),
            work_units: tiles,
            units_per_core: tiles_per_core,
        },
        buffers,
        memory,
        workspace_bytes_per_core: workspace_size,
        roofline,
        cann_builtin: if separated {
            "MoeGatingTopK, then MoeInitRoutingV2 (dispatch) and MoeFinalizeRouting (combine): \
             hicann/ops-transformer moe/moe_gating_top_k, moe/moe_init_routing_v2, \
             moe/moe_finalize_routing"
                .into()
        } else {
            "none: MoeGatingTopK, MoeInitRoutingV2 and MoeFinalizeRouting list Atlas A2/A3 only"
                .into()
        },
        template: "hicann/ops-transformer moe/moe_gating_top_k (op_kernel), \
                   moe/moe_init_routing_v2"
            .into(),
        notes,
    })
}
