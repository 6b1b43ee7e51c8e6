//! AMLA (MLA decode attention) on Ascend: one work unit is (sequence, group of query heads, KV
//! split). The cube core computes S = Q·Kᵀ and O += P·V for a KV tile; the vector core runs the
//! online softmax and the rescale of O. All heads share one latent KV head, so a head group is
//! one tall Q tile against each KV tile, and V is the first 512 columns of the same K block: one
//! L1 copy serves both products.
//!
//! Keys: `batch`, `heads` (query heads on this device), `s_q` (query tokens per sequence),
//! `kv_len` (keys per sequence), `page` (KV cache page size), `dtype` (f16|bf16),
//! `update` (atomic: AMLA's in-GM update by DMA atomics, A2 only | ub: O chunks through UB),
//! `rescale` (amla: integer add on the exponent bits | multiply), tiles `head_tile`, `kv_tile`,
//! `k0` (L0 reduction chunk), `n0` (output columns per PV chunk), `splits` (KV splits per
//! sequence), and `peak_tflops`, `mem_gbps`.
//!
//! Defaults (DeepSeek-V3 decode on one device): batch 32, heads 128, s_q 1, kv_len 4096, f16,
//! and page 128, the page FusedInferAttentionScore's MLA mode uses (SPEC's GPU preset pages by
//! 64; pass `page=64` to plan that).

use super::chips::{ChipSpec, CoreArch, Memory};
use super::plan::{
    Args, CoreSplit, Dtype, Layout, OP, Peak, Roofline, Stage, TilingField, cube_unit, first_fit,
    require_fractal_multiple, round_up, spread, tile_candidates, vector_unit,
};
use super::{AscendPlan, Preset};
use crate::error::{Error, Result};

/// Shape keys `amla` takes.
pub const KEYS: &[&str] = &[
    "batch",
    "heads",
    "s_q",
    "kv_len",
    "page",
    "dtype",
    "update",
    "rescale",
    "head_tile",
    "kv_tile",
    "k0",
    "n0",
    "splits",
    "peak_tflops",
    "mem_gbps",
];

/// Latent (512) plus rope (64) width of Q and K.
pub const D_QK: u64 = 576;
/// Width of V (the first 512 columns of K) and of the output.
pub const D_V: u64 = 512;

#[derive(Clone, Copy)]
struct Problem {
    batch: u64,
    heads: u64,
    s_q: u64,
    kv_len: u64,
    page: u64,
    dtype: Dtype,
    atomic_update: bool,
    amla_rescale: bool,
    splits: Option<u64>,
}

#[derive(Clone, Copy)]
struct Tiles {
    head_tile: u64,
    kv_tile: u64,
    k0: u64,
    n0: u64,
}

/// Plan AMLA on `chip`; see the module docs for the keys.
pub fn plan(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    shape: &[(String, String)],
) -> Result<AscendPlan> {
    let args = Args::parse("amla", shape, KEYS)?;
    if preset == Some(Preset::PanguProMoe) {
        return Err(Error::unsupported(
            OP,
            "amla with preset pangu-pro-moe: Pangu Pro MoE uses GQA attention, not MLA; use \
             deepseek-v3 or give an MLA shape",
        ));
    }
    let can_update_in_gm = chip.features.int32_atomic_add && chip.features.l0c_atomic_to_gm;
    let update = args.choice(
        "update",
        &["atomic", "ub"],
        if can_update_in_gm { "atomic" } else { "ub" },
    )?;
    if update == "atomic" && !can_update_in_gm {
        return Err(Error::unsupported(
            OP,
            format!(
                "update=atomic on {}: the in-GM update needs an int32 DMA atomic add (the \
                 exponent step on O's bits) and atomic accumulation from L0C into GM; the Atlas \
                 inference AI Core has atomics for int16/half/float from UB only; use update=ub",
                chip.name
            ),
        ));
    }
    let rescale = args.choice("rescale", &["amla", "multiply"], "amla")?;
    if update == "atomic" && rescale == "multiply" {
        return Err(Error::invalid(
            OP,
            "rescale",
            "update=atomic rescales O with an integer atomic add on its exponent bits, which \
             only the AMLA rescale (rescale=amla) can do; use update=ub for rescale=multiply",
        ));
    }
    let problem = Problem {
        batch: args.count("batch")?.unwrap_or(32),
        heads: args.count("heads")?.unwrap_or(128),
        s_q: args.count("s_q")?.unwrap_or(1),
        kv_len: args.count("kv_len")?.unwrap_or(4096),
        page: args.count("page")?.unwrap_or(128),
        dtype: args.dtype(chip)?,
        atomic_update: update == "atomic",
        amla_rescale: rescale == "amla",
        splits: args.count("splits")?,
    };
    require_fractal_multiple("page", problem.page)?;
    let peak = Peak::resolve(chip, &args)?;

    let head_tiles = match args.count("head_tile")? {
        Some(h) if h > problem.heads => {
            return Err(Error::invalid(
                OP,
                "head_tile",
                format!("{h} is more than heads={}", problem.heads),
            ));
        }
        Some(h) => vec![h],
        None => {
            let mut h = problem.heads.min((128 / problem.s_q).max(1));
            let mut list = vec![h];
            while h > 1 {
                h /= 2;
                list.push(h);
            }
            list
        }
    };
    let kv_given = args.count("kv_tile")?;
    if let Some(kv) = kv_given {
        require_fractal_multiple("kv_tile", kv)?;
        if !kv.is_multiple_of(problem.page) && !problem.page.is_multiple_of(kv) {
            return Err(Error::invalid(
                OP,
                "kv_tile",
                format!(
                    "{kv} neither holds whole pages nor divides a page (page={})",
                    problem.page
                ),
            ));
        }
    }
    // Whole pages or whole divisors of a page; the page itself is always a candidate.
    let mut kv_auto: Vec<u64> = [512, 256, 128, 64, problem.page]
        .into_iter()
        .filter(|&kv| {
            kv <= 512 && (kv.is_multiple_of(problem.page) || problem.page.is_multiple_of(kv))
        })
        .collect();
    kv_auto.sort_unstable_by(|a, b| b.cmp(a));
    kv_auto.dedup();
    let kv_tiles = tile_candidates(kv_given, &kv_auto);
    let k0s = tile_candidates(args.count("k0")?, &[128, 64]);
    let n0s = tile_candidates(args.count("n0")?, &[256, 128, 64]);
    for (key, values) in [("k0", &k0s), ("n0", &n0s)] {
        for &v in values.iter() {
            require_fractal_multiple(key, v)?;
        }
    }
    if let Some(&n0) = n0s.iter().find(|&&n0| n0 > D_V) {
        return Err(Error::invalid(
            OP,
            "n0",
            format!("{n0} is wider than the output ({D_V} columns)"),
        ));
    }

    let mut combos = Vec::new();
    for &head_tile in &head_tiles {
        for &kv_tile in &kv_tiles {
            for &k0 in &k0s {
                for &n0 in &n0s {
                    combos.push(Tiles {
                        head_tile,
                        kv_tile,
                        k0,
                        n0,
                    });
                }
            }
        }
    }
    first_fit(combos, |tiles| {
        build(chip, preset, &problem, tiles, peak.clone())
    })
}

fn build(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    p: &Problem,
    t: Tiles,
    peak: Option<Peak>,
) -> Result<AscendPlan> {
    let e = p.dtype.bytes();
    let dt = p.dtype.name();
    let rows = t.head_tile * p.s_q;
    let rp = round_up(rows, 16);
    let wide = t.kv_tile.max(t.n0);
    let separated = chip.arch == CoreArch::Separated;
    // The two AIV of an AIC split the Q rows between them.
    let rows_v = if separated { rp / 2 } else { rp };

    let mut layout = Layout::new(
        chip,
        format!(
            "amla on {} (head_tile={} kv_tile={} k0={} n0={})",
            chip.name, t.head_tile, t.kv_tile, t.k0, t.n0
        ),
    );
    layout.add(
        Memory::L1,
        "q",
        format!("[{rp}, {D_QK}] {dt}"),
        rp * D_QK * e,
        1,
    );
    layout.add(
        Memory::L1,
        "kv (K and V)",
        format!("[{}, {D_QK}] {dt}", t.kv_tile),
        t.kv_tile * D_QK * e,
        2,
    );
    layout.add(
        Memory::L1,
        "p",
        format!("[{rp}, {}] {dt}", t.kv_tile),
        rp * t.kv_tile * e,
        2,
    );
    layout.add(
        Memory::L0A,
        "a (Q or P chunk)",
        format!("[{rp}, {}] {dt}", t.k0),
        rp * t.k0 * e,
        2,
    );
    layout.add(
        Memory::L0B,
        "b (Kᵀ or V chunk)",
        format!("[{}, {wide}] {dt}", t.k0),
        t.k0 * wide * e,
        2,
    );
    layout.add(
        Memory::L0C,
        "c (S or O chunk)",
        format!("[{rp}, {wide}] f32"),
        rp * wide * 4,
        2,
    );
    layout.add(
        Memory::Ub,
        "s",
        format!("[{rows_v}, {}] f32", t.kv_tile),
        rows_v * t.kv_tile * 4,
        2,
    );
    layout.add(
        Memory::Ub,
        "p",
        format!("[{rows_v}, {}] {dt}", t.kv_tile),
        rows_v * t.kv_tile * e,
        2,
    );
    layout.add(
        Memory::Ub,
        "row state (max, sum, n, c)",
        format!("[4, {rows_v}] f32"),
        4 * round_up(rows_v * 4, 32),
        1,
    );
    if p.atomic_update {
        layout.add(
            Memory::Ub,
            "exponent step",
            format!("[{rows_v}, {}] i32", t.n0),
            rows_v * t.n0 * 4,
            1,
        );
    } else {
        layout.add(
            Memory::Ub,
            "o",
            format!("[{rows_v}, {}] f32", t.n0),
            rows_v * t.n0 * 4,
            2,
        );
        layout.add(
            Memory::Ub,
            "pv",
            format!("[{rows_v}, {}] f32", t.n0),
            rows_v * t.n0 * 4,
            2,
        );
    }
    layout.add(
        Memory::Ub,
        "out",
        format!("[{rows_v}, {}] {dt}", t.n0),
        rows_v * t.n0 * e,
        2,
    );
    let (buffers, memory) = layout.finish()?;

    let head_groups = p.heads.div_ceil(t.head_tile);
    let kv_tiles_total = p.kv_len.div_ceil(t.kv_tile);
    let base_units = p.batch * head_groups;
    let splits = match p.splits {
        Some(s) if s > kv_tiles_total => {
            return Err(Error::invalid(
                OP,
                "splits",
                format!("{s} is more than the {kv_tiles_total} KV tiles of a sequence"),
            ));
        }
        Some(s) => s,
        None => balanced_splits(base_units, kv_tiles_total, u64::from(chip.cube_cores)),
    };
    let units = base_units * splits;
    let (cores_used, units_per_core) = spread(units, chip.cube_cores);

    let keys = p.kv_len.div_ceil(splits);
    let tiles_per_unit = keys.div_ceil(t.kv_tile);
    let flops_unit = 2 * rp * tiles_per_unit * t.kv_tile * (D_QK + D_V);
    let partials = if splits > 1 {
        rows * (D_V + 1) * 4 * 2
    } else {
        0
    };
    let hbm_unit = keys * D_QK * e + rows * D_QK * e + rows * D_V * e + partials;
    let o_bytes = rp * D_V * 4;
    let (workspace_unit, workspace_size) = if separated {
        let exchange = rp * t.kv_tile * (4 + e) * 2;
        let o_traffic = if p.atomic_update {
            2 * o_bytes
        } else {
            4 * o_bytes
        };
        let size = rp * t.kv_tile * (4 + e) * 2 + o_bytes * if p.atomic_update { 1 } else { 2 };
        (tiles_per_unit * (exchange + o_traffic), size)
    } else {
        (tiles_per_unit * 2 * o_bytes, o_bytes)
    };
    let roofline = Roofline::estimate(
        chip,
        cores_used,
        (units_per_core * flops_unit) as f64,
        (units_per_core * hbm_unit) as f64,
        (units_per_core * workspace_unit) as f64,
        peak,
    );

    let mut notes = vec![format!(
        "V is the first {D_V} columns of the K block, so one L1 copy (kv) serves Q·Kᵀ and P·V; \
         the {} query rows of a head group share every KV tile",
        rows
    )];
    if separated {
        notes.push(
            "S (f32) and P cross AIC -> GM workspace -> AIV and back: cube and vector cores share \
             no on-chip memory; hand-offs use CrossCoreSetFlag / CrossCoreWaitFlag (mode 2)"
                .into(),
        );
    } else {
        notes.push(
            "coupled core: S and P·V leave L0C straight for UB, no workspace for the exchange"
                .into(),
        );
    }
    if p.atomic_update {
        notes.push(
            "AMLA update: P·V is accumulated into O in GM by an f32 atomic add from L0C, and the \
             rescale by 2^(n_j - n_(j-1)) is an int32 DMA atomic add of the step << 23 onto O's \
             bits (SetAtomicAdd<int32_t>); the step is clamped at -30 so it never wraps a zero \
             or denormal"
                .into(),
        );
    } else if p.amla_rescale {
        notes.push(
            "O chunks stream GM -> UB; the rescale is ReinterpretCast<int32_t>, Adds(step << 23), \
             ReinterpretCast<float> on the vector unit, then the P·V chunk is added"
                .into(),
        );
    } else {
        notes.push(
            "O chunks stream GM -> UB; classic rescale: Muls by exp(m_old - m_new), then the P·V \
             chunk is added"
                .into(),
        );
    }
    if 2 * o_bytes > t.kv_tile * D_QK * e {
        notes.push(format!(
            "O traffic per KV tile ({} B each way) exceeds the KV tile itself ({} B): larger KV \
             tiles cut it (catlass's 128-head kernel takes four 128-key blocks per step and gives \
             up keeping K resident in L1 to make room)",
            o_bytes,
            t.kv_tile * D_QK * e
        ));
    }
    if splits > 1 {
        notes.push(format!(
            "each sequence's KV is split {splits} ways to fill the cores: a combine pass on the \
             vector cores merges the partial (O, lse) pairs from workspace"
        ));
    }
    if t.kv_tile > p.page {
        notes.push(format!(
            "a KV tile gathers {} pages through the block table (one DataCopy per page)",
            t.kv_tile / p.page
        ));
    } else if t.kv_tile < p.page {
        notes.push(format!(
            "each page is read as {} KV tiles",
            p.page / t.kv_tile
        ));
    }

    let shape = Shape {
        rows_padded: rp,
        splits,
        units,
        cores_used,
        units_per_core,
        workspace: workspace_size,
    };
    Ok(AscendPlan {
        op: "amla",
        chip,
        preset,
        problem: vec![
            ("batch".into(), p.batch.to_string()),
            ("heads".into(), p.heads.to_string()),
            ("s_q".into(), p.s_q.to_string()),
            ("kv_len".into(), p.kv_len.to_string()),
            ("page".into(), p.page.to_string()),
            ("d_qk".into(), D_QK.to_string()),
            ("d_v".into(), D_V.to_string()),
            ("dtype".into(), dt.into()),
        ],
        choices: vec![
            (
                "update".into(),
                if p.atomic_update { "atomic" } else { "ub" }.into(),
            ),
            (
                "rescale".into(),
                if p.amla_rescale { "amla" } else { "multiply" }.into(),
            ),
            ("head_tile".into(), t.head_tile.to_string()),
            ("rows".into(), format!("{rows} (padded {rp})")),
            ("kv_tile".into(), t.kv_tile.to_string()),
            ("k0".into(), t.k0.to_string()),
            ("n0".into(), t.n0.to_string()),
            ("splits".into(), splits.to_string()),
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
            work_unit: format!("(sequence, {} heads, KV split)", t.head_tile),
            work_units: units,
            units_per_core,
        },
        stages: stages(chip, p, &t, splits),
        tiling: tiling_fields(p, &t, &shape),
        buffers,
        memory,
        workspace_bytes_per_core: workspace_size,
        roofline,
        cann_builtin: if separated {
            "FusedInferAttentionScore in MLA mode (rope dim 64, one KV head, page 128): \
             hicann/ops-transformer attention/fused_infer_attention_score"
                .into()
        } else {
            "none: FusedInferAttentionScore lists Atlas A2/A3 only".into()
        },
        template: "hicann/catlass examples/19_mla (mla_kernel.cpp for 16/32/64 heads, \
                   mla_kernel_tp1_spec.cpp for 128); hicann/ops-transformer \
                   attention/incre_flash_attention"
            .into(),
        notes,
    })
}

/// KV splits per sequence that fill the cube cores in whole waves: the smallest split count
/// whose last wave is at least 90% full, else the fullest (flash-decoding's split choice).
fn balanced_splits(base_units: u64, kv_tiles: u64, cores: u64) -> u64 {
    let fill = |s: u64| {
        let units = base_units * s;
        units as f64 / (units.div_ceil(cores) * cores) as f64
    };
    let max_splits = kv_tiles.clamp(1, 16);
    (1..=max_splits)
        .find(|&s| fill(s) >= 0.9)
        .unwrap_or_else(|| {
            (1..=max_splits)
                .max_by(|&a, &b| fill(a).total_cmp(&fill(b)).then(b.cmp(&a)))
                .unwrap_or(1)
        })
}

/// The derived sizes the tiling struct reports.
struct Shape {
    rows_padded: u64,
    splits: u64,
    units: u64,
    cores_used: u32,
    units_per_core: u64,
    workspace: u64,
}

/// The Ascend C stages of the port, in the order one KV tile goes through them.
fn stages(chip: &ChipSpec, p: &Problem, t: &Tiles, splits: u64) -> Vec<Stage> {
    let (cube, vector) = (cube_unit(chip), vector_unit(chip));
    let separated = chip.arch == CoreArch::Separated;
    let s_out = if separated {
        "Fixpipe writes S (f32) to GM workspace, then CrossCoreSetFlag(qkReady)"
    } else {
        "Fixpipe moves S (f32) from L0C to UB"
    };
    let p_out = if separated {
        "CopyOut P to GM workspace, CrossCoreSetFlag(softmaxReady)"
    } else {
        "P goes UB -> L1 for the cube"
    };
    let rescale_work = match (p.atomic_update, p.amla_rescale) {
        (true, _) => {
            "Brcb the row step N to a [rows, 128] i32 tile, wait until the previous P·V has \
             landed in O (CrossCoreWaitFlag), then SetAtomicAdd<int32_t> + DataCopy adds it to \
             O's bits in GM; SetAtomicNone"
        }
        (false, true) => {
            "CopyIn an [rows, n0] f32 chunk of O from GM, ReinterpretCast<int32_t>, Adds of N \
             (Compare + Select keep exact zeros), add the P·V chunk, CopyOut; 2 buffers each"
        }
        (false, false) => {
            "CopyIn an [rows, n0] f32 chunk of O from GM, Muls by exp(m_old - m_new), add the P·V \
             chunk, CopyOut; 2 buffers each"
        }
    };
    let pv_out = if p.atomic_update {
        "Fixpipe with SetAtomicAdd<float> adds P·V into O in GM"
    } else if separated {
        "Fixpipe writes P·V (f32) to GM workspace for the rescale stage"
    } else {
        "Fixpipe moves P·V (f32) to UB for the rescale stage"
    };
    let mut list = vec![
        Stage::new(
            "CopyIn Q",
            cube,
            "amla_prep.wgsl: prep",
            "MTE2 copies the unit's Q rows GM -> L1 once (A1 queue, 1 buffer); Q stays 16-bit \
             because it is a cube operand, so the softmax scale moves to the softmax stage",
        ),
        Stage::new(
            "CopyIn KV",
            cube,
            "amla_decode.wgsl: decode, step 1 (load)",
            format!(
                "MTE2 gathers {} keys page by page through the block table (one DataCopy per \
                 page) into L1, 2 buffers: tile j + 1 loads while tile j computes; the same copy \
                 feeds Q·Kᵀ and P·V",
                t.kv_tile
            ),
        ),
        Stage::new(
            "QK",
            cube,
            "amla_decode.wgsl: decode, steps 2-3 (scores, d-group sums)",
            format!(
                "MTE1 moves Q and K in {}-deep chunks L1 -> L0A / L0B, Mmad accumulates all {D_QK} \
                 dims in L0C (f32); {s_out}",
                t.k0
            ),
        ),
        Stage::new(
            "softmax",
            vector,
            "amla_decode.wgsl: decode, steps 3-4 (mask, online softmax)",
            format!(
                "Muls S by the softmax scale, mask keys past the range or the causal limit, row \
                 max m, then {}; P cast to {} (Cast), row sum l; {p_out}",
                if p.amla_rescale {
                    "n = round(-m / ln 2), c, ĉ = c rounded to P's type, cof = c / ĉ, P = \
                     exp(S - m)·ĉ and the step N = max(dn, -30) + 1.5 (cof_old / cof - 1) + 1e-6"
                } else {
                    "P = exp(S - m) and the factor exp(m_old - m)"
                },
                p.dtype.name()
            ),
        ),
    ];
    // In the atomic update the step lands on O before P·V_j is added; through UB the vector
    // core rescales O and adds P·V_j in one pass, after the cube produced it.
    let (pv, rescale) = (
        Stage::new(
            "PV",
            cube,
            "amla_decode.wgsl: decode, step 5 (P·V FMAs)",
            format!(
                "wait for P, P -> L1 -> L0A, V = the first {D_V} columns of the resident KV tile \
                 -> L0B in {}-wide chunks, Mmad; {pv_out}",
                t.n0
            ),
        ),
        Stage::new(
            "rescale O",
            vector,
            "amla_decode.wgsl: decode, step 5 (rescale of o[r])",
            rescale_work,
        ),
    );
    if p.atomic_update {
        list.extend([rescale, pv]);
    } else {
        list.extend([pv, rescale]);
    }
    list.push(Stage::new(
        "epilogue",
        vector,
        "amla_decode.wgsl: decode, end (normalise, guard, write)",
        if p.amla_rescale {
            "after the last tile: CopyIn O, zero |O| > 1e10 (Abs, CompareScalar, Select), \
                 Div by L = l·ĉ, Cast to the out dtype, CopyOut out and lse (or the split's \
                 partial (O, lse))"
        } else {
            "after the last tile: CopyIn O, Div by l, Cast to the out dtype, CopyOut out and \
                 lse (or the split's partial (O, lse))"
        },
    ));
    if splits > 1 {
        list.push(Stage::new(
            "combine",
            vector,
            "amla_combine.wgsl: combine",
            "after SyncAll (or in a second launch): w_i = exp(lse_i - max lse), out = Σ w_i out_i \
             / Σ w_i, lse = max lse + ln Σ w_i, from the partials in workspace",
        ));
    }
    list
}

/// The tiling struct, each field tied to the WGSL constant or host value it replaces.
fn tiling_fields(p: &Problem, t: &Tiles, s: &Shape) -> Vec<TilingField> {
    vec![
        TilingField::new("batch", p.batch, "b of q [b, s_q, h_q, 576]"),
        TilingField::new("numHeads", p.heads, "h_q (DecodeParams::h_q)"),
        TilingField::new("qSeqLen", p.s_q, "s_q (DecodeParams::s_q)"),
        TilingField::new(
            "kvSeqLen",
            p.kv_len,
            "cache_seqlens (read per sequence at run time; the plan's length)",
        ),
        TilingField::new("blockSize", p.page, "page size (DecodeParams::page_shift)"),
        TilingField::new(
            "embedLatent",
            D_V,
            "D_V: V is the first 512 columns of a row",
        ),
        TilingField::new("embedRope", D_QK - D_V, "D_QK - D_V"),
        TilingField::new(
            "headTile",
            t.head_tile,
            "HB override (GPU: at most 16 rows, 64 O registers per invocation)",
        ),
        TilingField::new(
            "rowsPerTask",
            s.rows_padded,
            "rows_padded of PrepParams / DecodeParams (HB x row blocks)",
        ),
        TilingField::new(
            "kvTile",
            t.kv_tile,
            "TN override (GPU: 32, 16 or 8 keys, by workgroup memory)",
        ),
        TilingField::new(
            "k0",
            t.k0,
            "none: DG invocations split the 576 dims, RB x CB register tiles",
        ),
        TilingField::new(
            "n0",
            t.n0,
            "none: each of the 128 invocations owns 4 of the 512 output dims",
        ),
        TilingField::new(
            "kvSplits",
            s.splits,
            "Split::Auto scheduler (AmlaPlan::schedule): key ranges of the WorkItems",
        ),
        TilingField::new(
            "taskNum",
            s.units,
            "WorkPlan::items: one workgroup per (sequence, head block, key range)",
        ),
        TilingField::new(
            "blockDim",
            s.cores_used,
            "dispatch grid: one workgroup per work item (linear_workgroup)",
        ),
        TilingField::new(
            "tasksPerCore",
            s.units_per_core,
            "none: the GPU schedules workgroups itself",
        ),
        TilingField::new(
            "rescaleMode (tiling key)",
            if p.amla_rescale { "amla" } else { "multiply" },
            "RESCALE_AMLA override (Rescale::Amla | Multiply)",
        ),
        TilingField::new(
            "updateMode (tiling key)",
            if p.atomic_update { "atomic" } else { "ub" },
            "none: O stays in registers on the GPU",
        ),
        TilingField::new(
            "pDtype",
            p.dtype.name(),
            "P_ROUND override (PPrecision::F16 | BF16 | Cache): the cube takes P in 16 bits only",
        ),
        TilingField::new(
            "workspaceBytesPerCore",
            s.workspace,
            "part_out / part_lse (split partials); A2 adds the S, P and O exchange",
        ),
    ]
}
