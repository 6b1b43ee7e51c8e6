//! SwiftGMM (grouped matmul over MoE experts) on Ascend: one launch walks all
//! (expert, m-tile, n-tile) items. Experts with few rows take the GEMV-like mode (16-row tiles,
//! wide N tiles, deep K staging: the expert's weights stream through once); experts with many
//! rows take the tiled GEMM mode. As in the WGSL schedule the path is chosen per group at run
//! time, so with `mode=auto` the plan carries both tile shapes in its tiling struct and reports
//! the buffers of the path uniform routing takes. The epilogue (SwiGLU for the gate/up
//! projection, the routing weight as a row scale) runs on the vector cores.
//!
//! Keys: `tokens`, `top_k`, `experts` (experts on this device), `proj` (gate_up | down), `k`, `n`
//! (override the preset's projection), `dtype` (f16|bf16), `mode` (auto | gemv | gemm), tiles
//! `m0`, `n0`, `k0` (L0 reduction chunk), `k1` (L1 reduction depth), and `peak_tflops`,
//! `mem_gbps`.
//!
//! Defaults: 256 tokens, f16, the gate/up projection; experts, top-k and FFN sizes from the preset
//! (DeepSeek-V3 without one). Routing is taken as uniform: every active expert gets the same rows.

use super::chips::{ChipSpec, CoreArch, Memory};
use super::plan::{
    Args, Buffer, CoreSplit, Layout, MemoryUse, OP, Peak, Roofline, Stage, TilingField, cube_unit,
    first_fit, require_fractal_multiple, round_up, spread, tile_candidates, vector_unit,
};
use super::{AscendPlan, Preset};
use crate::error::{Error, Result};

/// Shape keys `swiftgmm` takes.
pub const KEYS: &[&str] = &[
    "tokens",
    "top_k",
    "experts",
    "proj",
    "k",
    "n",
    "dtype",
    "mode",
    "m0",
    "n0",
    "k0",
    "k1",
    "peak_tflops",
    "mem_gbps",
];

/// Expert counts, routing and FFN sizes of a preset: (experts, top_k, hidden, intermediate).
fn preset_moe(preset: Option<Preset>) -> (u64, u64, u64, u64) {
    match preset {
        Some(Preset::PanguProMoe) => (64, 8, 5120, 1344),
        Some(Preset::DeepseekV3) | None => (256, 8, 7168, 2048),
    }
}

/// Rows per expert up to which the GEMV-like mode is chosen: one 16-row cube fractal.
pub const GEMV_ROWS: u64 = 16;

#[derive(Clone, Copy)]
struct Tiles {
    m0: u64,
    n0: u64,
    k0: u64,
    k1: u64,
}

/// Plan SwiftGMM on `chip`; see the module docs for the keys.
pub fn plan(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    shape: &[(String, String)],
) -> Result<AscendPlan> {
    let args = Args::parse("swiftgmm", shape, KEYS)?;
    let (experts_default, top_k_default, hidden, inter) = preset_moe(preset);
    let tokens = args.count("tokens")?.unwrap_or(256);
    let top_k = args.count("top_k")?.unwrap_or(top_k_default);
    let experts = args.count("experts")?.unwrap_or(experts_default);
    let gate_up = args.choice("proj", &["gate_up", "down"], "gate_up")? == "gate_up";
    let (k_default, n_default) = if gate_up {
        (hidden, 2 * inter)
    } else {
        (inter, hidden)
    };
    let k = args.count("k")?.unwrap_or(k_default);
    let n = args.count("n")?.unwrap_or(n_default);
    if gate_up && !n.is_multiple_of(2) {
        return Err(Error::invalid(
            OP,
            "n",
            format!("{n} is odd: the gate/up projection holds gate and up halves (SwiGLU)"),
        ));
    }
    let dtype = args.dtype(chip)?;
    let peak = Peak::resolve(chip, &args)?;

    let rows_total = tokens * top_k;
    let active = experts.min(rows_total);
    // Uniform routing: the busiest expert sets the tile count.
    let rows_per_expert = rows_total.div_ceil(active);
    let forced = match args.choice("mode", &["auto", "gemv", "gemm"], "auto")? {
        "gemv" => Some(true),
        "gemm" => Some(false),
        _ => None,
    };
    let gemv = forced.unwrap_or(rows_per_expert <= GEMV_ROWS);
    let given = Tiles {
        m0: args.count("m0")?.unwrap_or(0),
        n0: args.count("n0")?.unwrap_or(0),
        k0: args.count("k0")?.unwrap_or(0),
        k1: args.count("k1")?.unwrap_or(0),
    };
    let problem = Problem {
        tokens,
        top_k,
        experts,
        active,
        rows_per_expert,
        k,
        n,
        gate_up,
        gemv,
        both_paths: forced.is_none(),
        dtype,
    };
    let combos = candidates(gemv, &given, round_up(rows_per_expert, 16))?;
    // With mode=auto the kernel holds both tile shapes, as the WGSL schedule does: each group
    // takes its path at run time from its row count. The path uniform routing does not use
    // gets the largest automatic tiles that fit (groups above 16 rows may have any size).
    let other = if problem.both_paths {
        let auto = Tiles {
            m0: 0,
            n0: 0,
            k0: 0,
            k1: 0,
        };
        let other_combos = candidates(!gemv, &auto, round_up(rows_total, 16))?;
        Some(first_fit(other_combos, |t| {
            layout(chip, &problem, t, !gemv).map(|_| t)
        })?)
    } else {
        None
    };
    first_fit(combos, |tiles| {
        build(chip, preset, &problem, tiles, other, peak.clone())
    })
}

/// The tile combinations to try for one path, best first; a given size (non-zero in `given`)
/// replaces the automatic candidates. `m_cap` bounds the GEMM path's automatic row tiles.
fn candidates(gemv: bool, given: &Tiles, m_cap: u64) -> Result<Vec<Tiles>> {
    let fixed = |v: u64| (v > 0).then_some(v);
    let m0s = if gemv {
        match fixed(given.m0) {
            Some(m) if m != GEMV_ROWS => {
                return Err(Error::invalid(
                    OP,
                    "m0",
                    format!("{m}: the GEMV-like mode uses one 16-row fractal (m0=16)"),
                ));
            }
            _ => vec![GEMV_ROWS],
        }
    } else {
        let auto: Vec<u64> = [128, 64, 32, 16]
            .into_iter()
            .filter(|&m| m <= m_cap.max(16))
            .collect();
        tile_candidates(fixed(given.m0), &auto)
    };
    let (n_auto, k0_auto, k1_auto): (&[u64], &[u64], &[u64]) = if gemv {
        (
            &[256, 128, 64, 32, 16],
            &[128, 64, 32, 16],
            &[1024, 512, 256, 128],
        )
    } else {
        (&[256, 128, 64, 32, 16], &[64, 32, 16], &[256, 128, 64])
    };
    let n0s = tile_candidates(fixed(given.n0), n_auto);
    let k0s = tile_candidates(fixed(given.k0), k0_auto);
    let k1s = tile_candidates(fixed(given.k1), k1_auto);
    for (key, values) in [("m0", &m0s), ("n0", &n0s), ("k0", &k0s), ("k1", &k1s)] {
        for &v in values.iter() {
            require_fractal_multiple(key, v)?;
        }
    }
    let mut combos = Vec::new();
    for &m0 in &m0s {
        for &n0 in &n0s {
            for &k1 in &k1s {
                for &k0 in &k0s {
                    if k1.is_multiple_of(k0) {
                        combos.push(Tiles { m0, n0, k0, k1 });
                    }
                }
            }
        }
    }
    if combos.is_empty() {
        return Err(Error::invalid(
            OP,
            "k1",
            "k1 must be a multiple of k0 (L1 holds whole L0 chunks)",
        ));
    }
    Ok(combos)
}

struct Problem {
    tokens: u64,
    top_k: u64,
    experts: u64,
    active: u64,
    rows_per_expert: u64,
    k: u64,
    n: u64,
    gate_up: bool,
    /// The path uniform routing takes (or the forced one).
    gemv: bool,
    /// mode=auto: both paths are compiled and chosen per group at run time.
    both_paths: bool,
    dtype: super::plan::Dtype,
}

/// The on-chip buffers of one path's tile configuration, checked against the chip.
fn layout(
    chip: &ChipSpec,
    p: &Problem,
    t: Tiles,
    gemv: bool,
) -> Result<(Vec<Buffer>, Vec<MemoryUse>)> {
    let e = p.dtype.bytes();
    let dt = p.dtype.name();
    // The epilogue takes an output tile in two row halves: one per AIV on A2, one after the
    // other on a coupled core.
    let rows_v = t.m0 / 2;

    let mut layout = Layout::new(
        chip,
        format!(
            "swiftgmm {} path on {} (m0={} n0={} k0={} k1={})",
            if gemv { "GEMV" } else { "GEMM" },
            chip.name,
            t.m0,
            t.n0,
            t.k0,
            t.k1
        ),
    );
    layout.add(
        Memory::L1,
        "x",
        format!("[{}, {}] {dt}", t.m0, t.k1),
        t.m0 * t.k1 * e,
        2,
    );
    layout.add(
        Memory::L1,
        "w",
        format!("[{}, {}] {dt}", t.k1, t.n0),
        t.k1 * t.n0 * e,
        2,
    );
    layout.add(
        Memory::L0A,
        "a",
        format!("[{}, {}] {dt}", t.m0, t.k0),
        t.m0 * t.k0 * e,
        2,
    );
    layout.add(
        Memory::L0B,
        "b",
        format!("[{}, {}] {dt}", t.k0, t.n0),
        t.k0 * t.n0 * e,
        2,
    );
    layout.add(
        Memory::L0C,
        "c",
        format!("[{}, {}] f32", t.m0, t.n0),
        t.m0 * t.n0 * 4,
        2,
    );
    let tile = format!("[{rows_v}, {}]", t.n0);
    if p.gate_up {
        layout.add(
            Memory::Ub,
            "gate",
            format!("{tile} f32"),
            rows_v * t.n0 * 4,
            2,
        );
        layout.add(
            Memory::Ub,
            "up",
            format!("{tile} f32"),
            rows_v * t.n0 * 4,
            2,
        );
    } else {
        layout.add(
            Memory::Ub,
            "acc",
            format!("{tile} f32"),
            rows_v * t.n0 * 4,
            2,
        );
    }
    layout.add(
        Memory::Ub,
        "y",
        format!("{tile} {dt}"),
        rows_v * t.n0 * e,
        2,
    );
    layout.add(
        Memory::Ub,
        "row scale",
        format!("[{rows_v}] f32"),
        rows_v * 4,
        1,
    );
    layout.finish()
}

fn build(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    p: &Problem,
    t: Tiles,
    other: Option<Tiles>,
    peak: Option<Peak>,
) -> Result<AscendPlan> {
    let e = p.dtype.bytes();
    let dt = p.dtype.name();
    let separated = chip.arch == CoreArch::Separated;
    let (buffers, memory) = layout(chip, p, t, p.gemv)?;

    let n_out = if p.gate_up { p.n / 2 } else { p.n };
    let tiles_per_item = if p.gate_up { 2 } else { 1 };
    let m_tiles = p.rows_per_expert.div_ceil(t.m0);
    let items = p.active * m_tiles * n_out.div_ceil(t.n0);
    let (cores_used, items_per_core) = spread(items, chip.cube_cores);
    let k_pad = round_up(p.k, 16);
    let flops_item = tiles_per_item * 2 * t.m0 * t.n0 * k_pad;
    let rows_total = p.tokens * p.top_k;
    let hbm_total =
        p.active * p.k * p.n * e + rows_total * p.k * e + rows_total * n_out * e + rows_total * 4;
    let share = items_per_core as f64 / items as f64;
    let c_tile = t.m0 * t.n0 * 4;
    let (workspace_item, workspace_size) = if separated {
        (tiles_per_item * c_tile * 2, tiles_per_item * c_tile * 2)
    } else {
        (0, 0)
    };
    let roofline = Roofline::estimate(
        chip,
        cores_used,
        (items_per_core * flops_item) as f64,
        hbm_total as f64 * share,
        (items_per_core * workspace_item) as f64,
        peak,
    );

    let mut notes = vec![format!(
        "{} mode: about {} rows per expert ({} of {} experts hold rows; uniform routing assumed, \
         the busiest expert sets the tile count)",
        if p.gemv { "GEMV-like" } else { "GEMM" },
        p.rows_per_expert,
        p.active,
        p.experts
    )];
    notes.push(if p.both_paths {
        format!(
            "one launch: each cube core reads the group list from GM and walks (expert, m-tile, \
             n-tile) items; a group of at most {GEMV_ROWS} rows takes the GEMV-like tiles, a \
             larger one the GEMM tiles (chosen per group at run time, like the WGSL schedule's \
             threshold), so the kernel holds both tile shapes; the buffers above are the {} \
             path's",
            if p.gemv { "GEMV-like" } else { "GEMM" }
        )
    } else {
        format!(
            "one launch: each cube core reads the group list from GM and walks (expert, m-tile, \
             n-tile) items; mode={} forces every group onto one path (Options::mode)",
            if p.gemv { "gemv" } else { "gemm" }
        )
    });
    if p.gemv {
        notes.push(format!(
            "weights stream through once: L1 stages {} K rows of one expert's [{}, {}] slice, \
             so the MTE2 bursts stay long",
            t.k1, t.k1, t.n0
        ));
    }
    if p.gate_up {
        notes.push(
            "SwiGLU: an item computes the gate tile and the matching up tile (n/2 apart), the \
             vector core writes silu(gate) * up times the routing weight"
                .into(),
        );
    }
    if separated {
        notes.push(
            "the f32 tiles reach the vector cores through GM workspace (Fixpipe L0C -> GM); a \
             plain row-scaled down projection can skip the AIV and let Fixpipe cast to the \
             output dtype"
                .into(),
        );
    } else {
        notes.push(
            "coupled core: L0C goes to UB for the epilogue without workspace, one row half of \
             the tile at a time"
                .into(),
        );
    }
    notes.push(
        "store the expert weights in NZ (fractal) layout ahead of time so each GM -> L1 copy \
         is one contiguous burst; ND weights need the ND2NZ copy on the way in"
            .into(),
    );

    Ok(AscendPlan {
        op: "swiftgmm",
        chip,
        preset,
        problem: vec![
            ("tokens".into(), p.tokens.to_string()),
            ("top_k".into(), p.top_k.to_string()),
            ("experts".into(), p.experts.to_string()),
            (
                "proj".into(),
                if p.gate_up { "gate_up" } else { "down" }.into(),
            ),
            ("k".into(), p.k.to_string()),
            ("n".into(), p.n.to_string()),
            ("dtype".into(), dt.into()),
        ],
        choices: vec![
            (
                "mode".into(),
                match (p.both_paths, p.gemv) {
                    (true, true) => "auto (uniform routing: gemv)",
                    (true, false) => "auto (uniform routing: gemm)",
                    (false, true) => "gemv",
                    (false, false) => "gemm",
                }
                .into(),
            ),
            ("m0".into(), t.m0.to_string()),
            ("n0".into(), t.n0.to_string()),
            ("k0".into(), t.k0.to_string()),
            ("k1".into(), t.k1.to_string()),
            ("rows_per_expert".into(), p.rows_per_expert.to_string()),
        ],
        split: CoreSplit {
            kernel: if separated {
                "mixed AIC + AIV (1:2)".into()
            } else {
                "AI core (cube + vector)".into()
            },
            block_dim: cores_used,
            cube_cores_used: cores_used,
            vector_cores_used: cores_used * chip.vector_per_cube(),
            work_unit: format!(
                "(expert, {}-row tile, {}-column tile{})",
                t.m0,
                t.n0,
                if p.gate_up { " of gate and up" } else { "" }
            ),
            work_units: items,
            units_per_core: items_per_core,
        },
        stages: stages(chip, p, &t),
        tiling: tiling_fields(p, &t, other, items, cores_used, items_per_core),
        buffers,
        memory,
        workspace_bytes_per_core: workspace_size,
        roofline,
        cann_builtin: if separated {
            "aclnnGroupedMatmulV4 (groupType 0: split M; group list as cumsum or counts): \
             hicann/ops-transformer gmm/grouped_matmul"
                .into()
        } else {
            "aclnnGroupedMatmulV4 with its Ascend310P configuration: float16 only, weight in \
             FRACTAL_NZ, no activation (hicann/ops-transformer gmm/grouped_matmul op_host)"
                .into()
        },
        template: "hicann/catlass examples/02_grouped_matmul_slice_m; hicann/ops-transformer \
                   gmm/grouped_matmul_swiglu_quant for a fused SwiGLU epilogue"
            .into(),
        notes,
    })
}

/// The Ascend C stages of the port, in the order one tile goes through them.
fn stages(chip: &ChipSpec, p: &Problem, t: &Tiles) -> Vec<Stage> {
    let (cube, vector) = (cube_unit(chip), vector_unit(chip));
    let separated = chip.arch == CoreArch::Separated;
    let fixpipe = if separated {
        "Fixpipe writes the f32 tile(s) to GM workspace, then CrossCoreSetFlag"
    } else {
        "Fixpipe moves the f32 tile(s) from L0C to UB"
    };
    let epilogue = if p.gate_up {
        "CopyIn the gate and up halves (one row half per vector core on A2), silu(gate)·up \
         (Exp, Adds, Div, Mul), Mul by the routing weight (Brcb), Cast to y's dtype, CopyOut to \
         the group's rows"
    } else {
        "CopyIn the tile (one row half per vector core on A2), Mul by the routing weight \
         (Brcb), Cast to y's dtype, CopyOut to the group's rows"
    };
    vec![
        Stage::new(
            "schedule",
            cube,
            "swiftgmm_schedule.wgsl: schedule",
            "scalar code at kernel start: read the group list (cumsum or counts) from GM, walk \
             the groups in order and take every blockDim-th tile of the running tile count; \
             no separate launch, no indirect dispatch",
        ),
        Stage::new(
            "CopyIn x",
            cube,
            "swiftgmm_matmul.wgsl: stage_x | gemm_load_x",
            format!(
                "MTE2 copies the tile's rows [{}, {}] GM -> L1 (ND -> NZ), 2 buffers",
                t.m0, t.k1
            ),
        ),
        Stage::new(
            "CopyIn w",
            cube,
            "swiftgmm_matmul.wgsl: gemv_nk_load / gemv_kn_load | gemm_load_w",
            format!(
                "MTE2 copies [{}, {}] of expert g's weights GM -> L1, 2 buffers: the next k1 \
                 slice loads while this one is multiplied{}",
                t.k1,
                t.n0,
                if p.gate_up {
                    "; gate and up slices n/2 apart"
                } else {
                    ""
                }
            ),
        ),
        Stage::new(
            "Mmad",
            cube,
            "swiftgmm_matmul.wgsl: gemv_nk / gemv_kn (tile FMAs, split-k reduction) | gemm (gemm_tile)",
            format!(
                "MTE1 L1 -> L0A / L0B in {}-deep chunks, Mmad accumulates the whole k in L0C \
                 (f32): no split-k partial sums to reduce",
                t.k0
            ),
        ),
        Stage::new("Fixpipe", cube, "-", fixpipe),
        Stage::new(
            "epilogue",
            vector,
            "swiftgmm_matmul.wgsl: gemv_epilogue | gemm_tile stores (silu, row_scale, store_pair)",
            epilogue,
        ),
    ]
}

/// The tiling struct, each field tied to the WGSL constant or host value it replaces.
fn tiling_fields(
    p: &Problem,
    t: &Tiles,
    other: Option<Tiles>,
    items: u64,
    cores_used: u32,
    items_per_core: u64,
) -> Vec<TilingField> {
    let n_out = if p.gate_up { p.n / 2 } else { p.n };
    let mut fields = vec![
        TilingField::new(
            "groupNum",
            p.experts,
            "e: GmmParams::experts (offsets [e + 1])",
        ),
        TilingField::new(
            "groupListType",
            "0 (cumsum) or 1 (counts)",
            "Groups::Offsets | Groups::Counts (ScheduleParams::counts)",
        ),
        TilingField::new(
            "m",
            p.tokens * p.top_k,
            "m_total: rows of x (tokens x top_k)",
        ),
        TilingField::new("k", p.k, "GmmParams::k"),
        TilingField::new("n", p.n, "GmmParams::n"),
        TilingField::new("nOut", n_out, "GmmParams::n_out (n / 2 with SwiGLU)"),
        TilingField::new(
            "swiglu",
            u8::from(p.gate_up),
            "SWIGLU override (Activation::SwiGlu)",
        ),
        TilingField::new(
            "mode (tiling key)",
            if p.both_paths {
                "auto"
            } else if p.gemv {
                "gemv"
            } else {
                "gemm"
            },
            "MODE override of swiftgmm_schedule.wgsl (Options::mode)",
        ),
    ];
    if p.both_paths {
        fields.push(TilingField::new(
            "gemvMaxRows",
            GEMV_ROWS,
            "THRESHOLD override (TileConfig::threshold; GPU default 8, tuned per adapter)",
        ));
    }
    let (gemv, gemm) = match (p.gemv, other) {
        (true, other) => (Some(*t), other),
        (false, other) => (other, Some(*t)),
    };
    if let Some(g) = gemv {
        fields.extend([
            TilingField::new("gemvM0", g.m0, "GEMV_ROWS (TileConfig::gemv.rows)"),
            TilingField::new("gemvN0", g.n0, "GEMV_NBW (weight columns per GEMV tile)"),
            TilingField::new(
                "gemvK0",
                g.k0,
                "none: GEMV_SPLIT_K lanes split k, reduced in workgroup memory",
            ),
            TilingField::new("gemvK1", g.k1, "GEMV_XC (k per staged chunk of x)"),
        ]);
    }
    if let Some(g) = gemm {
        fields.extend([
            TilingField::new("gemmM0", g.m0, "TM (TileConfig::gemm.tm)"),
            TilingField::new("gemmN0", g.n0, "TN (TileConfig::gemm.tn)"),
            TilingField::new(
                "gemmK0",
                g.k0,
                "none: RM x RN register blocks per invocation",
            ),
            TilingField::new("gemmK1", g.k1, "TK (k per workgroup-memory stage)"),
        ]);
    }
    fields.extend([
        TilingField::new(
            "tiles",
            items,
            "GEMV / GEMM tile prefix sums in sched (uniform routing here)",
        ),
        TilingField::new(
            "blockDim",
            cores_used,
            "indirect dispatch args: min(tiles, max_workgroups)",
        ),
        TilingField::new(
            "tilesPerCore",
            items_per_core,
            "persistent loop: workgroup w takes tiles w, w + grid, ...",
        ),
    ]);
    fields
}
