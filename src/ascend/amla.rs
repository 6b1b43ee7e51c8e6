//! AMLA (MLA decode attention) on Ascend: one work unit is (sequence, group of query heads, KV
//! split). The cube core computes S = Q·Kᵀ and O += P·V for a KV tile; the vector core runs the
//! online softmax and the rescale of O. All heads share one latent KV head, so a head group is
//! one tall Q tile against each KV tile, and V is the first 512 columns of the same K block: one
//! L1 copy serves both products.
//!
//! Keys: `batch`, `heads` (query heads on this device), `s_q` (query tokens per sequence),
//! `kv_len` (keys per sequence), `page` (KV cache page size), `dtype` (f16|bf16),
//! `cache` (16bit: the cache in `dtype` | int8: the 656-byte int8 twin of FlashMLA's FP8 layout,
//! 512 int8 latent values, four f32 scales, 64 rope values in `dtype`), `update` (atomic: AMLA's
//! in-GM update by DMA atomics, A2 only | ub: O chunks through UB), `rescale` (amla: integer add
//! on the exponent bits | multiply), tiles `head_tile`, `kv_tile`, `k0` (L0 reduction chunk),
//! `n0` (output columns per PV chunk), `dq_keys` (keys per dequantisation chunk, int8 cache),
//! `splits` (KV splits per sequence), and `peak_tflops`, `mem_gbps`.
//!
//! Defaults (DeepSeek-V3 decode on one device): batch 32, heads 128, s_q 1, kv_len 4096, f16,
//! a 16-bit cache, and page 128, the page FusedInferAttentionScore's MLA mode uses (SPEC's GPU
//! preset pages by 64; pass `page=64` to plan that).

use super::chips::{ChipSpec, CoreArch, Memory};
use super::plan::{
    Args, CoreRole, CoreSplit, Correspondence, CrossFlag, Dtype, Io, Kernel, KernelShape, Layout,
    OP, OpDefSpec, Peak, Roofline, RooflineWork, Stage, StartPoint, TilingField, TilingKey,
    Workspace, add, cube_unit, first_fit, mul, product, require_fractal_multiple, round_up,
    soc_config, spread, tile_candidates, vector_unit,
};
use super::timeline::{Builder, Dep, Pipe, Timeline};
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
    "cache",
    "update",
    "rescale",
    "head_tile",
    "kv_tile",
    "k0",
    "n0",
    "dq_keys",
    "splits",
    "peak_tflops",
    "mem_gbps",
];

/// Latent (512) plus rope (64) width of Q and K.
pub const D_QK: u64 = 576;
/// Width of V (the first 512 columns of K) and of the output.
pub const D_V: u64 = 512;
/// Latent values sharing one f32 scale in the 8-bit cache layout (SPEC, "Quantized variants").
pub const SCALE_GROUP: u64 = 128;
/// Bytes per key of the 8-bit cache: 512 values, 4 f32 scales, 64 16-bit rope values.
pub const INT8_ROW_BYTES: u64 = D_V + 4 * (D_V / SCALE_GROUP) + 2 * (D_QK - D_V);

/// The kernel's op type.
const KERNEL: &str = "AmlaDecode";

#[derive(Clone, Copy)]
struct Problem {
    batch: u64,
    heads: u64,
    s_q: u64,
    kv_len: u64,
    page: u64,
    dtype: Dtype,
    int8_cache: bool,
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
    /// Keys per dequantisation chunk (int8 cache), 0 otherwise.
    dq_keys: u64,
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
    let int8_cache = args.choice("cache", &["16bit", "int8"], "16bit")? == "int8";
    let problem = Problem {
        batch: args.count("batch")?.unwrap_or(32),
        heads: args.count("heads")?.unwrap_or(128),
        s_q: args.count("s_q")?.unwrap_or(1),
        kv_len: args.count("kv_len")?.unwrap_or(4096),
        page: args.count("page")?.unwrap_or(128),
        dtype: args.dtype(chip)?,
        int8_cache,
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
    let dq_given = args.count("dq_keys")?;
    if dq_given.is_some() && !int8_cache {
        return Err(Error::invalid(
            OP,
            "dq_keys",
            "dequantisation chunks exist only with cache=int8",
        ));
    }
    let dqs = if int8_cache {
        tile_candidates(dq_given, &[32, 16, 8])
    } else {
        vec![0]
    };

    let mut combos = Vec::new();
    for &head_tile in &head_tiles {
        for &kv_tile in &kv_tiles {
            for &k0 in &k0s {
                for &n0 in &n0s {
                    for &dq_keys in &dqs {
                        combos.push(Tiles {
                            head_tile,
                            kv_tile,
                            k0,
                            n0,
                            dq_keys,
                        });
                    }
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
    let rows = mul("head_tile x s_q", t.head_tile, p.s_q)?;
    let rp = round_up("head_tile x s_q", rows, 16)?;
    let wide = t.kv_tile.max(t.n0);
    let separated = chip.arch == CoreArch::Separated;
    // The two AIV of an AIC split the Q rows between them (and the keys to dequantise).
    let rows_v = if separated { rp / 2 } else { rp };
    let dq_share = if separated { t.kv_tile / 2 } else { t.kv_tile };
    if p.int8_cache && !dq_share.is_multiple_of(t.dq_keys) {
        return Err(Error::invalid(
            OP,
            "dq_keys",
            format!(
                "{} does not divide the {dq_share} keys one vector core dequantises per KV tile",
                t.dq_keys
            ),
        ));
    }

    let mut layout = Layout::new(
        chip,
        KERNEL,
        format!(
            "amla on {} (head_tile={} kv_tile={} k0={} n0={}{})",
            chip.name,
            t.head_tile,
            t.kv_tile,
            t.k0,
            t.n0,
            if p.int8_cache {
                format!(" dq_keys={}", t.dq_keys)
            } else {
                String::new()
            }
        ),
    );
    layout.add(
        Memory::L1,
        "q",
        format!("[{rp}, {D_QK}] {dt}"),
        &[rp, D_QK],
        e,
        1,
    );
    layout.add(
        Memory::L1,
        "kv (K and V)",
        format!("[{}, {D_QK}] {dt}", t.kv_tile),
        &[t.kv_tile, D_QK],
        e,
        2,
    );
    layout.add(
        Memory::L1,
        "p",
        format!("[{rp}, {}] {dt}", t.kv_tile),
        &[rp, t.kv_tile],
        e,
        2,
    );
    layout.add(
        Memory::L0A,
        "a (Q or P chunk)",
        format!("[{rp}, {}] {dt}", t.k0),
        &[rp, t.k0],
        e,
        2,
    );
    layout.add(
        Memory::L0B,
        "b (Kᵀ or V chunk)",
        format!("[{}, {wide}] {dt}", t.k0),
        &[t.k0, wide],
        e,
        2,
    );
    layout.add(
        Memory::L0C,
        "c (S or O chunk)",
        format!("[{rp}, {wide}] f32"),
        &[rp, wide],
        4,
        2,
    );
    layout.add(
        Memory::Ub,
        "s",
        format!("[{rows_v}, {}] f32", t.kv_tile),
        &[rows_v, t.kv_tile],
        4,
        2,
    );
    layout.add(
        Memory::Ub,
        "p",
        format!("[{rows_v}, {}] {dt}", t.kv_tile),
        &[rows_v, t.kv_tile],
        e,
        2,
    );
    let state_row = round_up("rows", mul("rows", rows_v, 4)?, 32)?;
    layout.add(
        Memory::Ub,
        "row state (max, sum, n, c)",
        format!("[4, {rows_v}] f32"),
        &[4, state_row],
        1,
        1,
    );
    if p.atomic_update {
        layout.add(
            Memory::Ub,
            "exponent step",
            format!("[{rows_v}, {}] i32", t.n0),
            &[rows_v, t.n0],
            4,
            1,
        );
    } else {
        layout.add(
            Memory::Ub,
            "o",
            format!("[{rows_v}, {}] f32", t.n0),
            &[rows_v, t.n0],
            4,
            2,
        );
        layout.add(
            Memory::Ub,
            "pv",
            format!("[{rows_v}, {}] f32", t.n0),
            &[rows_v, t.n0],
            4,
            2,
        );
    }
    layout.add(
        Memory::Ub,
        "out",
        format!("[{rows_v}, {}] {dt}", t.n0),
        &[rows_v, t.n0],
        e,
        2,
    );
    if p.int8_cache {
        let dq = t.dq_keys;
        let groups = D_V / SCALE_GROUP;
        layout.add(
            Memory::Ub,
            "kv int8",
            format!("[{dq}, {D_V}] i8"),
            &[dq, D_V],
            1,
            2,
        );
        layout.add(
            Memory::Ub,
            "kv scales",
            format!("[{dq}, {groups}] f32"),
            &[dq, groups],
            4,
            2,
        );
        layout.add(
            Memory::Ub,
            "kv rope",
            format!("[{dq}, {}] {dt}", D_QK - D_V),
            &[dq, D_QK - D_V],
            e,
            2,
        );
        layout.add(
            Memory::Ub,
            "kv group f32",
            format!("[{dq}, {SCALE_GROUP}] f32"),
            &[dq, SCALE_GROUP],
            4,
            1,
        );
        layout.add(
            Memory::Ub,
            "kv dequantised",
            format!("[{dq}, {D_QK}] {dt}"),
            &[dq, D_QK],
            e,
            2,
        );
    }
    let (buffers, memory) = layout.finish()?;

    let head_groups = p.heads.div_ceil(t.head_tile);
    let kv_tiles_total = p.kv_len.div_ceil(t.kv_tile);
    let base_units = mul("batch x heads", p.batch, head_groups)?;
    let splits = match p.splits {
        Some(s) if s > kv_tiles_total => {
            return Err(Error::invalid(
                OP,
                "splits",
                format!("{s} is more than the {kv_tiles_total} KV tiles of a sequence"),
            ));
        }
        Some(s) => s,
        None => balanced_splits(base_units, kv_tiles_total, u64::from(chip.cube_cores))?,
    };
    let units = mul("batch x heads x splits", base_units, splits)?;
    let (cores_used, units_per_core) = spread(units, chip.cube_cores);

    let keys = p.kv_len.div_ceil(splits);
    let tiles_per_unit = keys.div_ceil(t.kv_tile);
    let keys_padded = mul("kv_len", tiles_per_unit, t.kv_tile)?;
    let flops_unit = product("cube work", &[2, rp, keys_padded, D_QK + D_V])?;
    let partials = if splits > 1 {
        product("partials", &[rows, D_V + 1, 4, 2])?
    } else {
        0
    };
    let key_bytes = if p.int8_cache {
        INT8_ROW_BYTES
    } else {
        D_QK * e
    };
    let hbm_unit = [
        mul("kv bytes", keys, key_bytes)?,
        product("q bytes", &[rows, D_QK, e])?,
        product("out bytes", &[rows, D_V, e])?,
        partials,
    ]
    .into_iter()
    .try_fold(0u64, |acc, b| add("GM bytes", acc, b))?;
    let o_bytes = product("O bytes", &[rp, D_V, 4])?;
    let s_p_tile = product("S and P tiles", &[rp, t.kv_tile, 4 + e])?;
    let kv_tile_bytes = product("KV tile", &[t.kv_tile, D_QK, e])?;
    let dequant_slots = if p.int8_cache && separated {
        mul("workspace", kv_tile_bytes, 2)?
    } else {
        0
    };
    let (workspace_unit, workspace_per_core) = if separated {
        let exchange = mul("workspace", s_p_tile, 2)?;
        let o_traffic = mul("workspace", o_bytes, if p.atomic_update { 2 } else { 4 })?;
        let dequant_traffic = if p.int8_cache {
            mul("workspace", kv_tile_bytes, 2)?
        } else {
            0
        };
        let per_tile = add(
            "workspace",
            add("workspace", exchange, o_traffic)?,
            dequant_traffic,
        )?;
        let size = [
            mul("workspace", s_p_tile, 2)?,
            mul("workspace", o_bytes, if p.atomic_update { 1 } else { 2 })?,
            dequant_slots,
        ]
        .into_iter()
        .try_fold(0u64, |acc, b| add("workspace", acc, b))?;
        (mul("workspace", tiles_per_unit, per_tile)?, size)
    } else {
        (mul("workspace", tiles_per_unit, 2 * o_bytes)?, o_bytes)
    };
    // Every unit of a split sequence keeps its partial (O, lse) until the combine.
    let partial_bytes = mul("workspace", units_per_core, partials)?;
    let workspace_per_core = add("workspace", workspace_per_core, partial_bytes)?;
    let roofline = Roofline::estimate(
        chip,
        cores_used,
        RooflineWork {
            cube_flops: (units_per_core as f64) * flops_unit as f64,
            gm_bytes: (units_per_core as f64) * hbm_unit as f64,
            workspace_bytes: (units_per_core as f64) * workspace_unit as f64,
            int8_cube: false,
        },
        peak,
    );

    let mut notes = vec![format!(
        "V is the first {D_V} columns of the K block, so one L1 copy (kv) serves Q·Kᵀ and P·V; \
         the {rows} query rows of a head group share every KV tile"
    )];
    if separated {
        notes.push(
            "S (f32) and P cross AIC -> GM workspace -> AIV and back: cube and vector cores share \
             no on-chip memory; hand-offs use CrossCoreSetFlag / CrossCoreWaitFlag (mode 2)"
                .into(),
        );
    } else {
        notes.push(
            "coupled core: S and P·V leave L0C for UB by DataCopy CO1 -> CO2, and P goes UB -> L1 \
             (VECOUT -> A1) without a round trip through GM"
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
    // The update moves O (f32) once each way per KV tile; compare that with the KV tile it
    // accompanies.
    let o_traffic = 2 * o_bytes;
    if o_traffic > kv_tile_bytes {
        notes.push(format!(
            "O traffic per KV tile ({o_traffic} B: {o_bytes} B each way) exceeds the KV tile \
             itself ({kv_tile_bytes} B): larger KV tiles cut it (catlass's 128-head kernel takes \
             four 128-key blocks per step and gives up keeping K resident in L1 to make room)"
        ));
    }
    if p.int8_cache {
        notes.push(format!(
            "int8 cache: {INT8_ROW_BYTES} B per key in GM instead of {} B; the vector core \
             dequantises {} keys at a time (Cast int8 -> half -> float, Mul by the key's scale of \
             each {SCALE_GROUP}-value group, Cast to {dt}) and the cube runs on {dt} as with a \
             16-bit cache; {}",
            D_QK * e,
            t.dq_keys,
            if separated {
                "the dequantised tile reaches L1 through a GM workspace slot (flag KV_READY)"
            } else {
                "the dequantised tile goes UB -> L1 directly (VECOUT -> B1)"
            }
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

    let kernel = Kernel {
        name: KERNEL.into(),
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
        tiling: tiling_fields(p, &t, rp, splits, units, units_per_core, workspace_per_core)?,
        key: tiling_key(p, splits),
        workspace: Workspace::new(workspace_per_core, cores_used)?,
        op_def: op_def(chip, p),
        shape: kernel_shape(chip, p),
        timeline: timeline(chip, p),
    };
    Ok(AscendPlan {
        op: "amla",
        command: String::new(),
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
            (
                "cache".into(),
                if p.int8_cache { "int8" } else { "16bit" }.into(),
            ),
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
            ("dq_keys".into(), t.dq_keys.to_string()),
            ("splits".into(), splits.to_string()),
        ],
        kernels: vec![kernel],
        stages: stages(chip, p, &t, splits),
        buffers,
        memory,
        roofline,
        start: start_points(chip, p),
        correspondence: correspondence(chip, p),
        notes,
    })
}

/// KV splits per sequence that fill the cube cores in whole waves: the smallest split count
/// whose last wave is at least 90% full, else the fullest (flash-decoding's split choice).
fn balanced_splits(base_units: u64, kv_tiles: u64, cores: u64) -> Result<u64> {
    let max_splits = kv_tiles.clamp(1, 16);
    let mut fills = Vec::new();
    for s in 1..=max_splits {
        let units = mul("batch x heads x splits", base_units, s)?;
        let waves = units.div_ceil(cores);
        fills.push((s, units as f64 / (waves as f64 * cores as f64)));
    }
    Ok(fills
        .iter()
        .find(|(_, fill)| *fill >= 0.9)
        .or_else(|| {
            fills
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
        })
        .map_or(1, |(s, _)| *s))
}

/// The Ascend C stages of the port, in the order one KV tile goes through them.
fn stages(chip: &ChipSpec, p: &Problem, t: &Tiles, splits: u64) -> Vec<Stage> {
    let (cube, vector) = (cube_unit(chip), vector_unit(chip));
    let separated = chip.arch == CoreArch::Separated;
    let s_out = if separated {
        "Fixpipe writes S (f32) to GM workspace, then CrossCoreSetFlag(QK_READY)"
    } else {
        "DataCopy CO1 -> CO2 (DataCopyEnhancedParams, BLOCK_MODE_MATRIX) moves S (f32) from L0C \
         to UB"
    };
    let p_out = if separated {
        "CopyOut P to GM workspace, CrossCoreSetFlag(SOFTMAX_READY)"
    } else {
        "DataCopy P VECOUT -> A1 (UB -> L1) for the cube"
    };
    let rescale_work = match (p.atomic_update, p.amla_rescale) {
        (true, _) => {
            "Brcb the row step N to a [rows, 128] i32 tile, wait until the previous P·V has \
             landed in O (CrossCoreWaitFlag PV_ADDED), then SetAtomicAdd<int32_t> + DataCopy adds \
             it to O's bits in GM; SetAtomicNone; CrossCoreSetFlag(STEP_ADDED)"
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
        "Fixpipe with SetAtomicAdd<float> adds P·V into O in GM, CrossCoreSetFlag(PV_ADDED)"
    } else if separated {
        "Fixpipe writes P·V (f32) to GM workspace for the rescale stage, \
         CrossCoreSetFlag(PV_READY)"
    } else {
        "DataCopy CO1 -> CO2 moves P·V (f32) to UB for the rescale stage"
    };
    let mut list = vec![Stage::new(
        "CopyIn Q",
        cube,
        "amla_prep.wgsl: prep",
        "MTE2 copies the unit's Q rows GM -> L1 once (A1 queue, 1 buffer, Nd2NzParams); Q stays \
         16-bit because it is a cube operand, so the softmax scale moves to the softmax stage",
    )];
    if p.int8_cache {
        list.push(Stage::new(
            "dequantise KV",
            vector,
            "amla_decode.wgsl: decode, step 1 (load)",
            format!(
                "MTE2 copies {} keys of int8 latent values, their four f32 scales and the rope \
                 values GM -> UB per chunk (2 buffers); Cast int8 -> half -> float, Mul by the \
                 Brcb'd scale of each 128-value group, Cast to {}; {}",
                t.dq_keys,
                p.dtype.name(),
                if separated {
                    "CopyOut the 16-bit rows to a KV slot in GM workspace (2 slots), \
                     CrossCoreSetFlag(KV_READY)"
                } else {
                    "DataCopy the 16-bit rows VECOUT -> B1 (UB -> L1) into the KV tile"
                }
            ),
        ));
    }
    list.extend([
        Stage::new(
            "CopyIn KV",
            cube,
            "amla_decode.wgsl: decode, step 1 (load)",
            format!(
                "{} {} keys into L1 (Nd2NzParams, ND -> NZ), 2 buffers: tile j + 1 loads while \
                 tile j computes; the same copy feeds Q·Kᵀ and P·V",
                match (p.int8_cache, separated) {
                    (false, _) =>
                        "MTE2 gathers, page by page through the block table (one \
                                   DataCopy per page),",
                    (true, true) =>
                        "MTE2 copies the dequantised slot (after CrossCoreWaitFlag \
                                     KV_READY),",
                    (true, false) => "the dequantise stage has written",
                },
                t.kv_tile
            ),
        ),
        Stage::new(
            "QK",
            cube,
            "amla_decode.wgsl: decode, steps 2-3 (scores, d-group sums)",
            format!(
                "MTE1 moves Q (LoadData2DParams) and Kᵀ (LoadData2DParams with ifTranspose) in \
                 {}-deep chunks L1 -> L0A / L0B, Mmad (MmadParams m = rows, n = kv_tile, k = k0) \
                 accumulates all {D_QK} dims in L0C (f32); {s_out}",
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
    ]);
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
fn tiling_fields(
    p: &Problem,
    t: &Tiles,
    rows_padded: u64,
    splits: u64,
    units: u64,
    units_per_core: u64,
    workspace_per_core: u64,
) -> Result<Vec<TilingField>> {
    let mut fields = vec![
        TilingField::u32("batch", p.batch, "b of q [b, s_q, h_q, 576]")?,
        TilingField::u32("numHeads", p.heads, "h_q (DecodeParams::h_q)")?,
        TilingField::u32("qSeqLen", p.s_q, "s_q (DecodeParams::s_q)")?,
        TilingField::u32(
            "kvSeqLen",
            p.kv_len,
            "cache_seqlens (read per sequence at run time; the plan's length)",
        )?,
        TilingField::u32("blockSize", p.page, "page size (DecodeParams::page_shift)")?,
        TilingField::u32(
            "embedLatent",
            D_V,
            "D_V: V is the first 512 columns of a row",
        )?,
        TilingField::u32("embedRope", D_QK - D_V, "D_QK - D_V")?,
        TilingField::u32(
            "headTile",
            t.head_tile,
            "HB override (GPU: at most 16 rows, 64 O registers per invocation)",
        )?,
        TilingField::u32(
            "rowsPerTask",
            rows_padded,
            "rows_padded of PrepParams / DecodeParams (HB x row blocks)",
        )?,
        TilingField::u32(
            "kvTile",
            t.kv_tile,
            "TN override (GPU: 32, 16 or 8 keys, by workgroup memory)",
        )?,
        TilingField::u32(
            "k0",
            t.k0,
            "none: DG invocations split the 576 dims, RB x CB register tiles",
        )?,
        TilingField::u32(
            "n0",
            t.n0,
            "none: each of the 128 invocations owns 4 of the 512 output dims",
        )?,
        TilingField::u32(
            "kvSplits",
            splits,
            "Split::Auto scheduler (AmlaPlan::schedule): key ranges of the WorkItems",
        )?,
        TilingField::u32(
            "taskNum",
            units,
            "WorkPlan::items: one workgroup per (sequence, head block, key range)",
        )?,
        TilingField::u32(
            "tasksPerCore",
            units_per_core,
            "none: the GPU schedules workgroups itself",
        )?,
    ];
    if p.int8_cache {
        fields.push(TilingField::u32(
            "dequantKeys",
            t.dq_keys,
            "none: the GPU dequantises while staging a key tile",
        )?);
    }
    fields.extend([
        TilingField::f32(
            "scaleValue",
            1.0 / (D_QK as f32).sqrt(),
            "softmax_scale (default 1/sqrt(576); PrepParams folds it into q)",
        ),
        TilingField::u64(
            "workspaceBytesPerCore",
            workspace_per_core,
            "part_out / part_lse (split partials); A2 adds the S, P and O exchange",
        ),
    ]);
    Ok(fields)
}

fn tiling_key(p: &Problem, splits: u64) -> TilingKey {
    TilingKey::new(&[
        (
            "rescale",
            &["amla", "multiply"],
            if p.amla_rescale { "amla" } else { "multiply" },
            "RESCALE_AMLA override (Rescale::Amla | Multiply)",
        ),
        (
            "update",
            &["atomic", "ub"],
            if p.atomic_update { "atomic" } else { "ub" },
            "none: O stays in registers on the GPU",
        ),
        (
            "pDtype",
            &["f16", "bf16"],
            p.dtype.name(),
            "P_ROUND override (PPrecision::F16 | BF16 | Cache): the cube takes P in 16 bits only",
        ),
        (
            "cache",
            &["16bit", "int8"],
            if p.int8_cache { "int8" } else { "16bit" },
            "KV_FORMAT override (KvFormat::Float | Int8)",
        ),
        (
            "split",
            &["off", "on"],
            if splits > 1 { "on" } else { "off" },
            "Split::Off | Auto (a combine dispatch when a sequence is split)",
        ),
    ])
}

fn op_def(chip: &ChipSpec, p: &Problem) -> OpDefSpec {
    let dt = p.dtype.ge();
    OpDefSpec {
        inputs: vec![
            Io::new("q", dt, "FORMAT_ND"),
            Io::new(
                "kv_cache",
                if p.int8_cache { "DT_INT8" } else { dt },
                "FORMAT_ND",
            ),
            Io::new("block_table", "DT_INT32", "FORMAT_ND"),
            Io::new("cache_seqlens", "DT_INT32", "FORMAT_ND"),
        ],
        outputs: vec![
            Io::new("out", dt, "FORMAT_ND"),
            Io::new("lse", "DT_FLOAT", "FORMAT_ND"),
        ],
        config: soc_config(chip).into(),
    }
}

fn kernel_shape(chip: &ChipSpec, p: &Problem) -> KernelShape {
    let separated = chip.arch == CoreArch::Separated;
    let mut flags = Vec::new();
    if separated {
        let mut flag = |name: &str, set_by: &str, waited_by: &str, meaning: &str| {
            flags.push(CrossFlag {
                id: flags.len() as u32,
                name: name.into(),
                set_by: set_by.into(),
                waited_by: waited_by.into(),
                meaning: meaning.into(),
            })
        };
        flag(
            "QK_READY",
            "AIC PIPE_FIX",
            "AIV",
            "S_j is in its workspace slot",
        );
        flag(
            "SOFTMAX_READY",
            "AIV PIPE_MTE3",
            "AIC",
            "P_j is in its workspace slot",
        );
        if p.atomic_update {
            flag(
                "PV_ADDED",
                "AIC PIPE_FIX",
                "AIV",
                "P·V_j has been atomically added into O",
            );
            flag(
                "STEP_ADDED",
                "AIV PIPE_MTE3",
                "AIC",
                "N_j has been atomically added onto O's bits",
            );
        } else {
            flag(
                "PV_READY",
                "AIC PIPE_FIX",
                "AIV",
                "P·V_j is in its workspace slot",
            );
        }
        if p.int8_cache {
            flag(
                "KV_READY",
                "AIV PIPE_MTE3",
                "AIC",
                "the dequantised KV tile j is in its workspace slot",
            );
            flag(
                "KV_FREE",
                "AIC PIPE_MTE2",
                "AIV",
                "the AIC has copied KV slot j % 2 into L1: it may be overwritten",
            );
        }
    }
    let mut params = vec![
        (
            "Nd2NzParams".to_string(),
            "DataCopy GM -> L1 of Q and of each K/V page, ND -> NZ".to_string(),
        ),
        (
            "LoadData2DParams".to_string(),
            "L1 -> L0A (Q, P) and L1 -> L0B (V); with ifTranspose = true for Kᵀ".to_string(),
        ),
        (
            "MmadParams".to_string(),
            "m = rowsPerTask, n = kvTile (Q·Kᵀ) or n0 (P·V), k = k0; cmatrixInitVal on the first \
             k chunk"
                .to_string(),
        ),
    ];
    if separated {
        params.push((
            "FixpipeParamsV220".to_string(),
            "L0C -> GM: S to workspace (NZ -> ND, f32), P·V into O with SetAtomicAdd<float> or to \
             workspace"
                .to_string(),
        ));
    } else {
        params.push((
            "DataCopyParams + DataCopyEnhancedParams".to_string(),
            "L0C -> UB (CO1 -> CO2) with blockMode = BLOCK_MODE_MATRIX: one 16 x 16 f32 fractal \
             (1024 B) per block"
                .to_string(),
        ));
        params.push((
            "DataCopyParams".to_string(),
            "P (and the dequantised KV rows) UB -> L1, VECOUT -> A1/B1".to_string(),
        ));
    }
    KernelShape {
        kernel_type: if separated {
            "KERNEL_TYPE_MIX_AIC_1_2".into()
        } else {
            "one AI core runs cube and vector (no mixed kernel type)".into()
        },
        flags,
        sync: if separated {
            "queues (EnQue / DeQue) and SetFlag / WaitFlag between the pipes of each core; \
             CrossCoreSetFlag<2, pipe> / CrossCoreWaitFlag between the AIC and its two AIV"
                .into()
        } else {
            "queues (EnQue / DeQue) and SetFlag / WaitFlag between the pipes of the one core".into()
        },
        params,
    }
}

/// Three KV tiles of the pipeline, with AMLA's preload: the cube issues Q·Kᵀ of tile j before
/// P·V of tile j - 1.
fn timeline(chip: &ChipSpec, p: &Problem) -> Timeline {
    const TILES: usize = 3;
    let separated = chip.arch == CoreArch::Separated;
    let (cube, vec) = if separated {
        (CoreRole::Aic, CoreRole::Aiv)
    } else {
        (CoreRole::AiCore, CoreRole::AiCore)
    };
    let out = if separated { Pipe::Fix } else { Pipe::Co1Co2 };
    let mut b = Builder::new(KERNEL);
    let q = b.step(cube, Pipe::Mte2, "Q", &[]);
    let mut pv_m: Vec<usize> = Vec::new();
    let mut pv_out: Vec<usize> = Vec::new();
    let mut p_ready: Vec<usize> = Vec::new();
    let mut step_added: Vec<Option<usize>> = Vec::new();
    let mut o_written: Vec<usize> = Vec::new();
    let mut kv_loaded: Vec<usize> = Vec::new();

    // P·V of tile i, issued after Q·Kᵀ of tile i + 1.
    let pv = |b: &mut Builder,
              i: usize,
              p_ready: &[usize],
              step_added: &[Option<usize>],
              pv_m: &mut Vec<usize>,
              pv_out: &mut Vec<usize>,
              o_written: &mut Vec<usize>| {
        let l1 = if separated {
            let p_in = b.step(
                cube,
                Pipe::Mte2,
                &format!("P{i}"),
                &[Dep::Named(p_ready[i], "SOFTMAX_READY")],
            );
            b.step(cube, Pipe::Mte1, &format!("PV{i} L0"), &[Dep::On(p_in)])
        } else {
            b.step(
                cube,
                Pipe::Mte1,
                &format!("PV{i} L0"),
                &[Dep::On(p_ready[i])],
            )
        };
        let m = b.step(cube, Pipe::M, &format!("PV{i}"), &[Dep::On(l1)]);
        pv_m.push(m);
        if p.atomic_update {
            let mut deps = vec![Dep::On(m)];
            if let Some(s) = step_added[i] {
                deps.push(Dep::Named(s, "STEP_ADDED"));
            }
            pv_out.push(b.step(cube, out, &format!("O+=PV{i}"), &deps));
        } else {
            let o = b.step(
                cube,
                out,
                &format!("PV{i}{}", if separated { "->ws" } else { "->UB" }),
                &[Dep::On(m)],
            );
            pv_out.push(o);
            let o_in = {
                let mut deps = Vec::new();
                if let Some(&prev) = o_written.last() {
                    deps.push(Dep::On(prev));
                }
                b.step(vec, Pipe::Mte2, &format!("O{i}"), &deps)
            };
            let ready = if separated {
                let pv_in = b.step(
                    vec,
                    Pipe::Mte2,
                    &format!("PV{i} in"),
                    &[Dep::Named(o, "PV_READY")],
                );
                Dep::On(pv_in)
            } else {
                Dep::On(o)
            };
            let v = b.step(
                vec,
                Pipe::V,
                &format!("rescale{i}"),
                &[ready, Dep::On(o_in)],
            );
            o_written.push(b.step(vec, Pipe::Mte3, &format!("O{i} out"), &[Dep::On(v)]));
        }
    };

    for j in 0..TILES {
        // The KV buffer of tile j was last used by P·V of tile j - 2.
        let mut kv_deps = vec![];
        if j >= 2 {
            kv_deps.push(Dep::On(pv_m[j - 2]));
        }
        let kv = if p.int8_cache {
            let mut deq_deps = Vec::new();
            if separated && j >= 2 {
                deq_deps.push(Dep::Named(kv_loaded[j - 2], "KV_FREE"));
            }
            let raw = b.step(vec, Pipe::Mte2, &format!("KV{j} i8"), &deq_deps);
            let deq = b.step(vec, Pipe::V, &format!("dequant{j}"), &[Dep::On(raw)]);
            if separated {
                let to_ws = b.step(vec, Pipe::Mte3, &format!("KV{j}->ws"), &[Dep::On(deq)]);
                kv_deps.push(Dep::Named(to_ws, "KV_READY"));
                b.step(cube, Pipe::Mte2, &format!("KV{j}"), &kv_deps)
            } else {
                kv_deps.push(Dep::On(deq));
                b.step(cube, Pipe::UbToL1, &format!("KV{j}->L1"), &kv_deps)
            }
        } else {
            b.step(cube, Pipe::Mte2, &format!("KV{j}"), &kv_deps)
        };
        kv_loaded.push(kv);
        // Q stays resident after the first tile.
        let mut l1_deps = vec![Dep::On(kv)];
        if j == 0 {
            l1_deps.push(Dep::On(q));
        }
        let l1 = b.step(cube, Pipe::Mte1, &format!("QK{j} L0"), &l1_deps);
        let m = b.step(cube, Pipe::M, &format!("QK{j}"), &[Dep::On(l1)]);
        let s = b.step(
            cube,
            out,
            &format!("S{j}{}", if separated { "->ws" } else { "->UB" }),
            &[Dep::On(m)],
        );
        let s_ready = if separated {
            let s_in = b.step(
                vec,
                Pipe::Mte2,
                &format!("S{j}"),
                &[Dep::Named(s, "QK_READY")],
            );
            Dep::On(s_in)
        } else {
            Dep::On(s)
        };
        let sm = b.step(vec, Pipe::V, &format!("softmax{j}"), &[s_ready]);
        let ready = if separated {
            b.step(vec, Pipe::Mte3, &format!("P{j}->ws"), &[Dep::On(sm)])
        } else {
            b.step(vec, Pipe::UbToL1, &format!("P{j}->L1"), &[Dep::On(sm)])
        };
        p_ready.push(ready);
        let n = (p.atomic_update && j > 0)
            .then(|| b.step(vec, Pipe::V, &format!("N{j}"), &[Dep::On(sm)]));
        if j > 0 {
            pv(
                &mut b,
                j - 1,
                &p_ready,
                &step_added,
                &mut pv_m,
                &mut pv_out,
                &mut o_written,
            );
        }
        // The step N_j lands on O once P·V_(j-1) has.
        step_added.push(n.map(|n| {
            b.step(
                vec,
                Pipe::Mte3,
                &format!("N{j}->O"),
                &[Dep::On(n), Dep::Named(pv_out[j - 1], "PV_ADDED")],
            )
        }));
    }
    pv(
        &mut b,
        TILES - 1,
        &p_ready,
        &step_added,
        &mut pv_m,
        &mut pv_out,
        &mut o_written,
    );
    let last = if p.atomic_update {
        Dep::Named(pv_out[TILES - 1], "PV_ADDED")
    } else {
        Dep::On(o_written[TILES - 1])
    };
    let o = b.step(vec, Pipe::Mte2, "O", &[last]);
    let v = b.step(vec, Pipe::V, "normalise", &[Dep::On(o)]);
    b.step(vec, Pipe::Mte3, "out, lse", &[Dep::On(v)]);
    b.finish()
}

fn start_points(chip: &ChipSpec, p: &Problem) -> Vec<StartPoint> {
    const FIA_V3: &str = "hicann/ops-transformer attention/fused_infer_attention_score/docs/\
                          aclnnFusedInferAttentionScoreV3.md";
    const FIA_V4: &str = "hicann/ops-transformer attention/fused_infer_attention_score/docs/\
                          aclnnFusedInferAttentionScoreV4.md";
    if chip.arch == CoreArch::Separated {
        let mut list = vec![
            StartPoint::new(
                "compare with",
                "FusedInferAttentionScore (V3/V4) in MLA mode: queryRope and keyRope given, key \
                 and value n = 1, d = 512 + rope 64, page attention with blockSize 16 or 128; \
                 BSND for any head count; TND (per-sequence actualSeqLengths for s_q > 1) needs \
                 numHeads 32, 64 or 128 and cumulative actualSeqLengths",
                FIA_V3,
            ),
            StartPoint::new(
                "torch_npu",
                "torch_npu.npu_fused_infer_attention_score(query, key, value, query_rope=..., \
                 key_rope=..., block_table=..., actual_seq_lengths_kv=..., num_heads=h_q, \
                 num_key_value_heads=1, input_layout=\"BSND\", block_size=128, scale=...)",
                "Ascend Extension for PyTorch API, torch_npu.npu_fused_infer_attention_score \
                 (https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_001232.html)",
            ),
            StartPoint::new(
                "port from",
                "hicann/catlass examples/19_mla (mla_kernel.cpp for 16/32/64 heads, \
                 amla_kernel_tp1_spec.cpp: the AMLA update with preload)",
                "hicann/catlass examples/19_mla",
            ),
        ];
        if p.int8_cache {
            list.push(StartPoint::new(
                "compare with",
                "FusedInferAttentionScoreV4 MLA full quantisation: int8 query (dequantScaleQuery \
                 per token and head, queryQuantMode 3), int8 key/value as [blockNum, 1, 16, 128, \
                 32] NZ, bf16 rope and output, blockSize 128; or torch_npu.atb.\
                 npu_multi_head_latent_attention with cache_mode \"int8_nzcache\". Both scale \
                 differently from our per-128-value scales: compare through the dequantised cache",
                FIA_V4,
            ));
        }
        list
    } else {
        vec![
            StartPoint::new(
                "compare with",
                "none: FusedInferAttentionScore registers Atlas A2/A3 only; IncreFlashAttention \
                 registers an ascend310p configuration (f16 query, f16 or int8 key/value) but \
                 allows a head dim of at most 512 (ours: 576); compare with our exact reference",
                "hicann/ops-transformer attention/incre_flash_attention/op_host/\
                 incre_flash_attention_def.cpp and docs/aclnnIncreFlashAttentionV4.md",
            ),
            StartPoint::new(
                "port from",
                "the cube side from GroupedMatmul's 310P branch (op_kernel/grouped_matmul.h, \
                 __CCE_AICORE__ == 200: the Matmul API with a UB local workspace), the vector \
                 side from IncreFlashAttention's 310P kernel, which is all-vector \
                 (op_kernel/incre_flash_attention_allvec_new.h)",
                "hicann/ops-transformer gmm/grouped_matmul, attention/incre_flash_attention",
            ),
            StartPoint::new(
                "torch_npu",
                "none for MLA on this chip",
                "torch_npu.npu_fused_infer_attention_score lists Atlas A2/A3 only",
            ),
        ]
    }
}

fn correspondence(chip: &ChipSpec, p: &Problem) -> Vec<Correspondence> {
    let separated = chip.arch == CoreArch::Separated;
    let mut list = vec![
        Correspondence::new(
            "`kv_tile` in workgroup memory (TN keys x 576, decode step 1)",
            "L1 `kv (K and V)`, a B1 queue of 2 buffers: one copy feeds Kᵀ (L0B, transposed) and \
             V (L0B)",
        ),
        Correspondence::new(
            "`q` read as f32 vec4 from the prep workspace",
            "L1 `q`, an A1 queue of 1 buffer, copied once per task",
        ),
        Correspondence::new(
            "register tiles RB x CB of the score dot products",
            "L0A `a` / L0B `b` chunks (A2 / B2 queues) and the L0C accumulator `c` (CO1)",
        ),
        Correspondence::new(
            "`p_t` (P transposed) in workgroup memory",
            if separated {
                "UB `p` (VECOUT) -> GM workspace slot -> L1 `p` (A1)"
            } else {
                "UB `p` (VECOUT) -> L1 `p` (A1) by DataCopy"
            },
        ),
        Correspondence::new(
            "running max, sum, n, cof per row (one invocation per row)",
            "UB `row state`, a TBuf of [4, rows] f32: one element per row, updated by whole-row \
             vector instructions",
        ),
        Correspondence::new(
            "O in 64 registers per invocation",
            if p.atomic_update {
                "O in GM, updated by DMA atomics (f32 add from L0C, int32 add of the step)"
            } else {
                "O in GM, streamed through UB `o` / `pv` chunks"
            },
        ),
        Correspondence::new(
            "workgroupBarrier after the key tile load",
            "HardEvent::MTE2_MTE1 (the A1/B1 queue hand-off)",
        ),
        Correspondence::new(
            "workgroupBarrier after the scores",
            if separated {
                "Fixpipe, then CrossCoreSetFlag QK_READY (AIC PIPE_FIX -> AIV)"
            } else {
                "DataCopy CO1 -> CO2, then the queue hand-off to the vector unit"
            },
        ),
        Correspondence::new(
            "workgroupBarrier after the softmax",
            if separated {
                "CrossCoreSetFlag SOFTMAX_READY (AIV PIPE_MTE3 -> AIC)"
            } else {
                "the VECOUT -> A1 queue hand-off"
            },
        ),
        Correspondence::new(
            "split-KV partials `part_out` / `part_lse` and the combine dispatch",
            "GM workspace partials, then SyncAll or a second launch",
        ),
    ];
    if p.int8_cache {
        list.push(Correspondence::new(
            "8-bit cache decoded while staging the key tile",
            if separated {
                "AIV dequantise chunk (UB `kv int8`, `kv scales`, `kv rope`, `kv group f32`, \
                 `kv dequantised`) -> GM slot, flags KV_READY / KV_FREE"
            } else {
                "dequantise chunk in UB (`kv int8` ... `kv dequantised`) -> L1 by DataCopy"
            },
        ));
    }
    list
}
