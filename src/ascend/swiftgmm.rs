//! SwiftGMM (grouped matmul over MoE experts) on Ascend: one launch walks all
//! (expert, m-tile, n-tile) items. Experts with few rows take the GEMV-like mode (16-row tiles,
//! wide N tiles, deep K staging: the expert's weights stream through once); experts with many
//! rows take the tiled GEMM mode. As in the WGSL schedule the path is chosen per group at run
//! time, so with `mode=auto` the plan carries both tile shapes in its tiling struct and reports
//! the buffers of the path uniform routing takes. The epilogue (SwiGLU for the gate/up
//! projection, the routing weight as a row scale, dequantisation) runs on the vector cores.
//!
//! Keys: `tokens`, `top_k`, `experts` (experts on this device), `proj` (gate_up | down), `k`, `n`
//! (override the preset's projection), `dtype` (f16|bf16), `quant` (none | w8a16: int8 weights
//! with a per-channel scale, dequantised on the vector core for a 16-bit cube | w8a8: int8
//! activations with a per-token scale and int8 weights with a per-channel scale on the int8
//! cube, int32 accumulation, dequantised in the epilogue), `layout` (nk: weights `[e, n, k]` |
//! kn: `[e, k, n]`), `group_list` (cumsum | counts), `mode` (auto | gemv | gemm), tiles `m0`,
//! `n0`, `k0` (L0 reduction chunk), `k1` (L1 reduction depth), and `peak_tflops`, `mem_gbps`.
//!
//! Defaults: 256 tokens, f16, no quantisation, `[e, n, k]` weights, the gate/up projection;
//! experts, top-k and FFN sizes from the preset (DeepSeek-V3 without one). Routing is taken as
//! uniform: every active expert gets the same rows.

use super::chips::{ChipSpec, CoreArch, Memory};
use super::plan::{
    Args, Buffer, CoreRole, CoreSplit, Correspondence, CrossFlag, Dtype, Io, Kernel, KernelShape,
    Layout, MemoryUse, OP, OpDefSpec, Peak, Roofline, RooflineWork, Stage, StartPoint, TilingField,
    TilingKey, Workspace, add, cube_unit, first_fit, mul, product, require_multiple, round_up,
    soc_config, spread, tile_candidates, vector_unit,
};
use super::timeline::{Builder, Dep, Pipe, Timeline};
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
    "quant",
    "layout",
    "group_list",
    "mode",
    "m0",
    "n0",
    "k0",
    "k1",
    "peak_tflops",
    "mem_gbps",
];

/// Expert counts, routing and FFN sizes of a preset: (experts, top_k, hidden, intermediate).
pub fn preset_moe(preset: Option<Preset>) -> (u64, u64, u64, u64) {
    match preset {
        Some(Preset::PanguProMoe) => (64, 8, 5120, 1344),
        Some(Preset::DeepseekV3) | None => (256, 8, 7168, 2048),
    }
}

/// Rows per expert up to which the GEMV-like mode is chosen: one 16-row cube fractal.
pub const GEMV_ROWS: u64 = 16;

/// The kernel's op type.
const KERNEL: &str = "SwiftGmm";

/// How the matmul is quantised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    None,
    /// int8 weights, 16-bit activations (CANN: antiquant).
    W8A16,
    /// int8 activations and weights, int32 accumulation.
    W8A8,
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::None => "none",
            Quant::W8A16 => "w8a16",
            Quant::W8A8 => "w8a8",
        }
    }
}

#[derive(Clone, Copy)]
struct Tiles {
    m0: u64,
    n0: u64,
    k0: u64,
    k1: u64,
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
    dtype: Dtype,
    quant: Quant,
    /// Weights `[e, k, n]` (true) or `[e, n, k]`.
    kn: bool,
    counts: bool,
}

impl Problem {
    /// Bytes of one x or w element as the cube reads it.
    fn x_bytes(&self) -> u64 {
        if self.quant == Quant::W8A8 {
            1
        } else {
            self.dtype.bytes()
        }
    }

    /// Bytes of one stored weight element in GM.
    fn w_gm_bytes(&self) -> u64 {
        if self.quant == Quant::None {
            self.dtype.bytes()
        } else {
            1
        }
    }

    /// The K side of the cube fractal: 32 for int8 operands, 16 for 16-bit ones.
    fn k_fractal(&self) -> u64 {
        if self.quant == Quant::W8A8 { 32 } else { 16 }
    }

    fn n_out(&self) -> u64 {
        if self.gate_up { self.n / 2 } else { self.n }
    }
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
    let quant = match args.choice("quant", &["none", "w8a16", "w8a8"], "none")? {
        "w8a16" => Quant::W8A16,
        "w8a8" => Quant::W8A8,
        _ => Quant::None,
    };
    let kn = args.choice("layout", &["nk", "kn"], "nk")? == "kn";
    let counts = args.choice("group_list", &["cumsum", "counts"], "cumsum")? == "counts";
    let peak = Peak::resolve(chip, &args)?;

    let rows_total = mul("tokens x top_k", tokens, top_k)?;
    if rows_total > u64::from(u32::MAX) {
        return Err(Error::invalid(
            OP,
            "tokens",
            format!(
                "tokens x top_k = {rows_total} does not fit the uint32_t field m of the tiling \
                 struct: this shape cannot be planned"
            ),
        ));
    }
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
        quant,
        kn,
        counts,
    };
    let combos = candidates(
        &problem,
        gemv,
        &given,
        round_up("rows per expert", rows_per_expert, 16)?,
    )?;
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
        let other_combos = candidates(
            &problem,
            !gemv,
            &auto,
            round_up("tokens x top_k", rows_total, 16)?,
        )?;
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
fn candidates(p: &Problem, gemv: bool, given: &Tiles, m_cap: u64) -> Result<Vec<Tiles>> {
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
    let int8 = p.quant == Quant::W8A8;
    let (n_auto, k0_auto, k1_auto): (&[u64], &[u64], &[u64]) = match (gemv, int8) {
        (true, false) => (
            &[256, 128, 64, 32, 16],
            &[128, 64, 32, 16],
            &[1024, 512, 256, 128],
        ),
        (true, true) => (
            &[256, 128, 64, 32, 16],
            &[256, 128, 64, 32],
            &[2048, 1024, 512, 256],
        ),
        (false, false) => (&[256, 128, 64, 32, 16], &[64, 32, 16], &[256, 128, 64]),
        (false, true) => (&[256, 128, 64, 32, 16], &[128, 64, 32], &[512, 256, 128]),
    };
    let n0s = tile_candidates(fixed(given.n0), n_auto);
    let k0s = tile_candidates(fixed(given.k0), k0_auto);
    let k1s = tile_candidates(fixed(given.k1), k1_auto);
    for (key, values, fractal) in [
        ("m0", &m0s, 16),
        ("n0", &n0s, 16),
        ("k0", &k0s, p.k_fractal()),
        ("k1", &k1s, p.k_fractal()),
    ] {
        for &v in values.iter() {
            require_multiple(key, v, fractal)?;
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

/// The on-chip buffers of one path's tile configuration, checked against the chip.
fn layout(
    chip: &ChipSpec,
    p: &Problem,
    t: Tiles,
    gemv: bool,
) -> Result<(Vec<Buffer>, Vec<MemoryUse>)> {
    let e = p.dtype.bytes();
    let dt = p.dtype.name();
    let xe = p.x_bytes();
    let xt = if p.quant == Quant::W8A8 { "i8" } else { dt };
    let separated = chip.arch == CoreArch::Separated;
    // The epilogue takes an output tile in two row halves: one per AIV on A2, one after the
    // other on a coupled core. The weight dequantisation of W8A16 splits the k1 rows the same
    // way.
    let rows_v = t.m0 / 2;
    let k_v = if separated { t.k1 / 2 } else { t.k1 };

    let mut layout = Layout::new(
        chip,
        KERNEL,
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
        format!("[{}, {}] {xt}", t.m0, t.k1),
        &[t.m0, t.k1],
        xe,
        2,
    );
    layout.add(
        Memory::L1,
        "w",
        format!("[{}, {}] {xt}", t.k1, t.n0),
        &[t.k1, t.n0],
        xe,
        2,
    );
    layout.add(
        Memory::L0A,
        "a",
        format!("[{}, {}] {xt}", t.m0, t.k0),
        &[t.m0, t.k0],
        xe,
        2,
    );
    layout.add(
        Memory::L0B,
        "b",
        format!("[{}, {}] {xt}", t.k0, t.n0),
        &[t.k0, t.n0],
        xe,
        2,
    );
    let acc = if p.quant == Quant::W8A8 { "i32" } else { "f32" };
    layout.add(
        Memory::L0C,
        "c",
        format!("[{}, {}] {acc}", t.m0, t.n0),
        &[t.m0, t.n0],
        4,
        2,
    );
    if p.quant == Quant::W8A16 {
        layout.add(
            Memory::Ub,
            "w int8",
            format!("[{k_v}, {}] i8", t.n0),
            &[k_v, t.n0],
            1,
            2,
        );
        layout.add(
            Memory::Ub,
            "w scale",
            format!("[{}] f32", t.n0),
            &[t.n0],
            4,
            1,
        );
        layout.add(
            Memory::Ub,
            "w f32",
            format!("[{k_v}, {}] f32", t.n0),
            &[k_v, t.n0],
            4,
            1,
        );
        layout.add(
            Memory::Ub,
            "w dequantised",
            format!("[{k_v}, {}] {dt}", t.n0),
            &[k_v, t.n0],
            e,
            2,
        );
    }
    let tile = format!("[{rows_v}, {}]", t.n0);
    if p.gate_up {
        for half in ["gate", "up"] {
            layout.add(
                Memory::Ub,
                half,
                format!("{tile} {acc}"),
                &[rows_v, t.n0],
                4,
                2,
            );
        }
    } else {
        layout.add(
            Memory::Ub,
            "acc",
            format!("{tile} {acc}"),
            &[rows_v, t.n0],
            4,
            2,
        );
    }
    if p.quant == Quant::W8A8 {
        layout.add(
            Memory::Ub,
            "x scale",
            format!("[{rows_v}] f32"),
            &[rows_v],
            4,
            1,
        );
        let halves = if p.gate_up { 2 } else { 1 };
        layout.add(
            Memory::Ub,
            "w scale",
            format!("[{halves}, {}] f32", t.n0),
            &[halves, t.n0],
            4,
            1,
        );
    }
    layout.add(
        Memory::Ub,
        "y",
        format!("{tile} {dt}"),
        &[rows_v, t.n0],
        e,
        2,
    );
    layout.add(
        Memory::Ub,
        "row scale",
        format!("[{rows_v}] f32"),
        &[rows_v],
        4,
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

    let n_out = p.n_out();
    let tiles_per_item: u64 = if p.gate_up { 2 } else { 1 };
    let m_tiles = p.rows_per_expert.div_ceil(t.m0);
    let items = product(
        "experts x tiles",
        &[p.active, m_tiles, n_out.div_ceil(t.n0)],
    )?;
    let (cores_used, items_per_core) = spread(items, chip.cube_cores);
    let k_pad = round_up("k", p.k, p.k_fractal())?;
    let flops_item = product("cube work", &[tiles_per_item, 2, t.m0, t.n0, k_pad])?;
    let rows_total = mul("tokens x top_k", p.tokens, p.top_k)?;
    let weights = product("weight bytes", &[p.active, p.k, p.n, p.w_gm_bytes()])?;
    let scales = match p.quant {
        Quant::None => 0,
        _ => product("weight scale bytes", &[p.active, p.n, 4])?,
    };
    let x_bytes = product("x bytes", &[rows_total, p.k, p.x_bytes()])?;
    let x_scales = if p.quant == Quant::W8A8 {
        mul("x scale bytes", rows_total, 4)?
    } else {
        0
    };
    let y_bytes = product("y bytes", &[rows_total, n_out, e])?;
    let hbm_total = [
        weights,
        scales,
        x_bytes,
        x_scales,
        y_bytes,
        mul("row scale bytes", rows_total, 4)?,
    ]
    .into_iter()
    .try_fold(0u64, |acc, b| add("GM bytes", acc, b))?;
    let share = items_per_core as f64 / items as f64;
    let c_tile = product("C tile", &[t.m0, t.n0, 4])?;
    let dequant_slot = product("weight slice", &[t.k1, t.n0, e])?;
    let (workspace_item, workspace_per_core) = if separated {
        let exchange = product("workspace", &[tiles_per_item, c_tile, 2])?;
        let (dq_traffic, dq_size) = if p.quant == Quant::W8A16 {
            // Every k1 slice of the item's weights is written and read once.
            let slices = p.k.div_ceil(t.k1);
            (
                product("workspace", &[tiles_per_item, slices, dequant_slot, 2])?,
                mul("workspace", dequant_slot, 2)?,
            )
        } else {
            (0, 0)
        };
        (
            add("workspace", exchange, dq_traffic)?,
            add("workspace", exchange, dq_size)?,
        )
    } else {
        (0, 0)
    };
    let roofline = Roofline::estimate(
        chip,
        cores_used,
        RooflineWork {
            cube_flops: (items_per_core as f64) * flops_item as f64,
            gm_bytes: hbm_total as f64 * share,
            workspace_bytes: (items_per_core as f64) * workspace_item as f64,
            int8_cube: p.quant == Quant::W8A8,
        },
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
    match p.quant {
        Quant::None => {}
        Quant::W8A16 => notes.push(format!(
            "W8A16: int8 weights (1 B per element in GM) with a per-channel scale; the vector \
             core dequantises each [k1, n0] slice (Cast int8 -> half -> float, Mul by the \
             channel scale, Cast to {dt}) and {}; the cube runs on {dt}",
            if separated {
                "writes it to one of two GM workspace slots the AIC reads, as CANN's \
                 GroupedMatmul antiquant kernel does (flags W_READY / W_FREE)"
            } else {
                "copies it UB -> L1 (VECOUT -> B1) for the cube"
            }
        )),
        Quant::W8A8 => notes.push(format!(
            "W8A8: int8 x and w on the int8 cube (16 x 32 fractal, twice the fp16 MAC rate), \
             exact int32 accumulation in L0C; the epilogue casts the int32 tile to f32 and \
             multiplies by the token's scale (Brcb) and the channel's scale, then {} and casts \
             to {dt}; k0 and k1 are multiples of 32",
            if p.gate_up {
                "applies SwiGLU and the routing weight"
            } else {
                "the routing weight"
            }
        )),
    }
    if separated {
        notes.push(format!(
            "the {} tiles reach the vector cores through GM workspace (Fixpipe L0C -> GM); a \
             plain row-scaled down projection can skip the AIV and let Fixpipe cast to the \
             output dtype",
            if p.quant == Quant::W8A8 {
                "int32"
            } else {
                "f32"
            }
        ));
    } else {
        notes.push(
            "coupled core: L0C goes to UB by DataCopy CO1 -> CO2 for the epilogue without \
             workspace, one row half of the tile at a time"
                .into(),
        );
    }
    notes.push(format!(
        "store the expert weights in NZ (fractal) layout ahead of time so each GM -> L1 copy is \
         one contiguous burst; ND weights need the ND2NZ copy on the way in{}",
        if p.quant == Quant::W8A8 && p.kn {
            "; int8 [e, k, n] weights (B row-major) need LoadDataWithTranspose into L0B, [e, n, \
             k] weights a plain LoadData"
        } else {
            ""
        }
    ));

    let tiling = tiling_fields(p, &t, other, items, items_per_core, workspace_per_core)?;
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
            work_unit: format!(
                "(expert, {}-row tile, {}-column tile{})",
                t.m0,
                t.n0,
                if p.gate_up { " of gate and up" } else { "" }
            ),
            work_units: items,
            units_per_core: items_per_core,
        },
        tiling,
        key: tiling_key(p),
        workspace: Workspace::new(workspace_per_core, cores_used)?,
        op_def: op_def(chip, p),
        shape: kernel_shape(chip, p),
        timeline: timeline(chip, p, KERNEL),
    };

    Ok(AscendPlan {
        op: "swiftgmm",
        command: String::new(),
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
            ("quant".into(), p.quant.name().into()),
            ("layout".into(), if p.kn { "kn" } else { "nk" }.into()),
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
        kernels: vec![kernel],
        stages: stages(chip, p, &t),
        buffers,
        memory,
        roofline,
        start: start_points(chip, p),
        correspondence: correspondence(chip, p),
        notes,
    })
}

/// The Ascend C stages of the port, in the order one tile goes through them.
fn stages(chip: &ChipSpec, p: &Problem, t: &Tiles) -> Vec<Stage> {
    let (cube, vector) = (cube_unit(chip), vector_unit(chip));
    let separated = chip.arch == CoreArch::Separated;
    let acc = if p.quant == Quant::W8A8 {
        "int32"
    } else {
        "f32"
    };
    let (out_name, out_work) = if separated {
        (
            "Fixpipe",
            format!(
                "Fixpipe (FixpipeParamsV220) writes the {acc} tile(s) to GM workspace, then \
                 CrossCoreSetFlag(TILE_READY)"
            ),
        )
    } else {
        (
            "CO1 -> CO2",
            format!(
                "DataCopy CO1 -> CO2 (DataCopyEnhancedParams, BLOCK_MODE_MATRIX) moves the {acc} \
                 tile(s) from L0C to UB"
            ),
        )
    };
    let dequant = match p.quant {
        Quant::W8A8 => {
            "Cast the int32 tile to f32, Mul by the per-token scale (Brcb) and the \
                        per-channel scale, "
        }
        _ => "",
    };
    let epilogue = if p.gate_up {
        format!(
            "CopyIn the gate and up halves (one row half per vector core on A2), {dequant}\
             silu(gate)·up (Exp, Adds, Div, Mul), Mul by the routing weight (Brcb), Cast to y's \
             dtype, CopyOut to the group's rows"
        )
    } else {
        format!(
            "CopyIn the tile (one row half per vector core on A2), {dequant}Mul by the routing \
             weight (Brcb), Cast to y's dtype, CopyOut to the group's rows"
        )
    };
    let xt = if p.quant == Quant::W8A8 {
        "int8"
    } else {
        p.dtype.name()
    };
    let mut list = vec![
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
                "MTE2 copies the tile's rows [{}, {}] {xt} GM -> L1 (Nd2NzParams, ND -> NZ), 2 \
                 buffers",
                t.m0, t.k1
            ),
        ),
    ];
    if p.quant == Quant::W8A16 {
        list.push(Stage::new(
            "dequantise w",
            vector,
            "swiftgmm_matmul.wgsl: gemv_nk_load / gemv_kn_load | gemm_load_w",
            format!(
                "MTE2 copies an int8 [{}, {}] weight slice and its channel scales GM -> UB (each \
                 AIV half the k1 rows on A2), Cast int8 -> half -> float, Mul by the scale, Cast \
                 to {}; {}",
                t.k1,
                t.n0,
                p.dtype.name(),
                if separated {
                    "CopyOut to a GM workspace slot, CrossCoreSetFlag(W_READY)"
                } else {
                    "DataCopy VECOUT -> B1 (UB -> L1)"
                }
            ),
        ));
    }
    list.extend([
        Stage::new(
            "CopyIn w",
            cube,
            if p.quant == Quant::W8A16 {
                "-"
            } else {
                "swiftgmm_matmul.wgsl: gemv_nk_load / gemv_kn_load | gemm_load_w"
            },
            format!(
                "{} [{}, {}] of expert g's weights into L1, 2 buffers: the next k1 slice loads \
                 while this one is multiplied{}",
                match (p.quant, separated) {
                    (Quant::W8A16, true) => "MTE2 copies the dequantised slot (after \
                                             CrossCoreWaitFlag W_READY) of",
                    (Quant::W8A16, false) => "the dequantise stage has written",
                    _ => "MTE2 copies",
                },
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
                "MTE1 L1 -> L0A / L0B in {}-deep chunks (LoadData2DParams{}), Mmad (MmadParams) \
                 accumulates the whole k in L0C ({acc}{}): no split-k partial sums to reduce",
                t.k0,
                if p.quant == Quant::W8A8 && p.kn {
                    "; LoadDataWithTranspose for the int8 [k, n] weights"
                } else {
                    ""
                },
                if p.quant == Quant::W8A8 {
                    ", 16 x 32 int8 fractals"
                } else {
                    ""
                }
            ),
        ),
        Stage::new(out_name, cube, "-", out_work),
        Stage::new(
            "epilogue",
            vector,
            "swiftgmm_matmul.wgsl: gemv_epilogue | gemm_tile stores (silu, row_scale, store_pair)",
            epilogue,
        ),
    ]);
    list
}

/// The tiling struct, each field tied to the WGSL constant or host value it replaces.
fn tiling_fields(
    p: &Problem,
    t: &Tiles,
    other: Option<Tiles>,
    items: u64,
    items_per_core: u64,
    workspace_per_core: u64,
) -> Result<Vec<TilingField>> {
    let mut fields = vec![
        TilingField::u32(
            "groupNum",
            p.experts,
            "e: GmmParams::experts (offsets [e + 1])",
        )?,
        TilingField::u32(
            "groupListType",
            u64::from(p.counts),
            "Groups::Offsets (0, cumsum) | Groups::Counts (1) (ScheduleParams::counts)",
        )?,
        TilingField::u32(
            "m",
            mul("tokens x top_k", p.tokens, p.top_k)?,
            "m_total: rows of x (tokens x top_k)",
        )?,
        TilingField::u32("k", p.k, "GmmParams::k")?,
        TilingField::u32("n", p.n, "GmmParams::n")?,
        TilingField::u32("nOut", p.n_out(), "GmmParams::n_out (n / 2 with SwiGLU)")?,
    ];
    if p.both_paths {
        fields.push(TilingField::u32(
            "gemvMaxRows",
            GEMV_ROWS,
            "THRESHOLD override (TileConfig::threshold; GPU default 8, tuned per adapter)",
        )?);
    }
    let (gemv, gemm) = match (p.gemv, other) {
        (true, other) => (Some(*t), other),
        (false, other) => (other, Some(*t)),
    };
    if let Some(g) = gemv {
        fields.extend([
            TilingField::u32("gemvM0", g.m0, "GEMV_ROWS (TileConfig::gemv.rows)")?,
            TilingField::u32("gemvN0", g.n0, "GEMV_NBW (weight columns per GEMV tile)")?,
            TilingField::u32(
                "gemvK0",
                g.k0,
                "none: GEMV_SPLIT_K lanes split k, reduced in workgroup memory",
            )?,
            TilingField::u32("gemvK1", g.k1, "GEMV_XC (k per staged chunk of x)")?,
        ]);
    }
    if let Some(g) = gemm {
        fields.extend([
            TilingField::u32("gemmM0", g.m0, "TM (TileConfig::gemm.tm)")?,
            TilingField::u32("gemmN0", g.n0, "TN (TileConfig::gemm.tn)")?,
            TilingField::u32(
                "gemmK0",
                g.k0,
                "none: RM x RN register blocks per invocation",
            )?,
            TilingField::u32("gemmK1", g.k1, "TK (k per workgroup-memory stage)")?,
        ]);
    }
    fields.extend([
        TilingField::u32(
            "tiles",
            items,
            "GEMV / GEMM tile prefix sums in sched (uniform routing here)",
        )?,
        TilingField::u32(
            "tilesPerCore",
            items_per_core,
            "persistent loop: workgroup w takes tiles w, w + grid, ...",
        )?,
        TilingField::u64(
            "workspaceBytesPerCore",
            workspace_per_core,
            "none: the GPU epilogue reads the accumulators from registers",
        ),
    ]);
    Ok(fields)
}

fn tiling_key(p: &Problem) -> TilingKey {
    TilingKey::new(&[
        (
            "mode",
            &["auto", "gemv", "gemm"],
            match (p.both_paths, p.gemv) {
                (true, _) => "auto",
                (false, true) => "gemv",
                (false, false) => "gemm",
            },
            "MODE override of swiftgmm_schedule.wgsl (Options::mode)",
        ),
        (
            "swiglu",
            &["off", "on"],
            if p.gate_up { "on" } else { "off" },
            "SWIGLU override (Activation::SwiGlu)",
        ),
        (
            "dtype",
            &["f16", "bf16"],
            p.dtype.name(),
            "X_DTYPE / W_DTYPE / OUT_DTYPE overrides",
        ),
        (
            "quant",
            &["none", "w8a16", "w8a8"],
            p.quant.name(),
            "the quantised kernels' dtype overrides",
        ),
        (
            "layout",
            &["nk", "kn"],
            if p.kn { "kn" } else { "nk" },
            "W_KN override (Layout::Kn | Nk)",
        ),
    ])
}

fn op_def(chip: &ChipSpec, p: &Problem) -> OpDefSpec {
    let dt = p.dtype.ge();
    let w_format = if chip.arch == CoreArch::Coupled {
        "FORMAT_FRACTAL_NZ"
    } else {
        "FORMAT_ND"
    };
    let mut inputs = match p.quant {
        Quant::W8A8 => vec![
            Io::new("x", "DT_INT8", "FORMAT_ND"),
            Io::new("weight", "DT_INT8", w_format),
            Io::new("scale", "DT_FLOAT", "FORMAT_ND"),
            Io::new("per_token_scale", "DT_FLOAT", "FORMAT_ND"),
        ],
        Quant::W8A16 => vec![
            Io::new("x", dt, "FORMAT_ND"),
            Io::new("weight", "DT_INT8", w_format),
            Io::new("antiquant_scale", "DT_FLOAT", "FORMAT_ND"),
            Io::new("antiquant_offset", "DT_FLOAT", "FORMAT_ND").optional(),
        ],
        Quant::None => vec![
            Io::new("x", dt, "FORMAT_ND"),
            Io::new("weight", dt, w_format),
        ],
    };
    inputs.extend([
        Io::new("group_list", "DT_INT64", "FORMAT_ND"),
        Io::new("row_scale", "DT_FLOAT", "FORMAT_ND").optional(),
    ]);
    OpDefSpec {
        inputs,
        outputs: vec![Io::new("y", dt, "FORMAT_ND")],
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
            "TILE_READY",
            "AIC PIPE_FIX",
            "AIV",
            "an output tile is in its workspace slot",
        );
        flag(
            "SLOT_FREE",
            "AIV PIPE_MTE2",
            "AIC",
            "the AIV has read a slot: the AIC may write it again two tiles later",
        );
        if p.quant == Quant::W8A16 {
            flag(
                "W_READY",
                "AIV PIPE_MTE3",
                "AIC",
                "a dequantised weight slice is in its workspace slot",
            );
            flag(
                "W_FREE",
                "AIC PIPE_MTE2",
                "AIV",
                "the AIC has copied a weight slot into L1",
            );
        }
    }
    let int8 = p.quant == Quant::W8A8;
    let mut params = vec![
        (
            "Nd2NzParams".to_string(),
            "DataCopy GM -> L1 of the x rows (and of ND weights), ND -> NZ".to_string(),
        ),
        (
            "LoadData2DParams".to_string(),
            if int8 && p.kn {
                "x -> L0A; the int8 [k, n] weights (B row-major) need LoadDataWithTranspose \
                 (LoadData2dTransposeParams) into L0B"
                    .to_string()
            } else {
                "x -> L0A, w -> L0B (ifTranspose for the [n, k] layout)".to_string()
            },
        ),
        (
            "MmadParams".to_string(),
            format!(
                "m = m0, n = n0, k = k0{}; cmatrixInitVal on the first k chunk",
                if int8 { ", int8 x int8 -> int32" } else { "" }
            ),
        ),
    ];
    params.push(if separated {
        (
            "FixpipeParamsV220".to_string(),
            format!(
                "L0C -> GM workspace, NZ -> ND, {} kept for the AIV epilogue",
                if int8 { "int32" } else { "f32" }
            ),
        )
    } else {
        (
            "DataCopyParams + DataCopyEnhancedParams".to_string(),
            format!(
                "L0C -> UB (CO1 -> CO2), blockMode = BLOCK_MODE_MATRIX{}",
                if int8 {
                    "; int32 copied as is (deqScale VDEQ16 could apply the channel scale on the \
                     way, to half)"
                } else {
                    ""
                }
            ),
        )
    });
    KernelShape {
        kernel_type: if separated {
            "KERNEL_TYPE_MIX_AIC_1_2".into()
        } else {
            "one AI core runs cube and vector (no mixed kernel type)".into()
        },
        flags,
        sync: if separated {
            "queues between the pipes of each core; CrossCoreSetFlag<2, pipe> / \
             CrossCoreWaitFlag between the AIC and its two AIV"
                .into()
        } else {
            "queues and SetFlag / WaitFlag between the pipes of the one core".into()
        },
        params,
    }
}

/// Two output tiles of three k1 slices each, then their epilogues.
fn timeline(chip: &ChipSpec, p: &Problem, kernel: &str) -> Timeline {
    const TILES: usize = 2;
    const SLICES: usize = 3;
    let separated = chip.arch == CoreArch::Separated;
    let (cube, vec) = if separated {
        (CoreRole::Aic, CoreRole::Aiv)
    } else {
        (CoreRole::AiCore, CoreRole::AiCore)
    };
    let mut b = Builder::new(kernel);
    let mut l0_loads: Vec<usize> = Vec::new();
    let mut w_loads: Vec<usize> = Vec::new();
    let mut out: Vec<usize> = Vec::new();
    let mut freed: Vec<usize> = Vec::new();
    for tile in 0..TILES {
        let mut last_m = None;
        for s in 0..SLICES {
            let g = tile * SLICES + s;
            // L1 slot g % 2 was last read by the L0 load of slice g - 2.
            let mut deps = Vec::new();
            if g >= 2 {
                deps.push(Dep::On(l0_loads[g - 2]));
            }
            let w = if p.quant == Quant::W8A16 {
                let mut raw_deps = Vec::new();
                if separated && g >= 2 {
                    raw_deps.push(Dep::Named(w_loads[g - 2], "W_FREE"));
                }
                let raw = b.step(vec, Pipe::Mte2, &format!("w{g} i8"), &raw_deps);
                let deq = b.step(vec, Pipe::V, &format!("dequant{g}"), &[Dep::On(raw)]);
                if separated {
                    let ws = b.step(vec, Pipe::Mte3, &format!("w{g}->ws"), &[Dep::On(deq)]);
                    deps.push(Dep::Named(ws, "W_READY"));
                    b.step(cube, Pipe::Mte2, &format!("x,w{g}"), &deps)
                } else {
                    deps.push(Dep::On(deq));
                    let x = b.step(cube, Pipe::Mte2, &format!("x{g}"), &[]);
                    deps.push(Dep::On(x));
                    b.step(cube, Pipe::UbToL1, &format!("w{g}->L1"), &deps)
                }
            } else {
                b.step(cube, Pipe::Mte2, &format!("x,w{g}"), &deps)
            };
            w_loads.push(w);
            let l0 = b.step(cube, Pipe::Mte1, &format!("L0 {g}"), &[Dep::On(w)]);
            l0_loads.push(l0);
            last_m = Some(b.step(cube, Pipe::M, &format!("mmad{g}"), &[Dep::On(l0)]));
        }
        let m = last_m.expect("a tile has slices");
        if separated {
            let mut deps = vec![Dep::On(m)];
            if tile >= 2 {
                deps.push(Dep::Named(freed[tile - 2], "SLOT_FREE"));
            }
            let fix = b.step(cube, Pipe::Fix, &format!("C{tile}->ws"), &deps);
            let c_in = b.step(
                vec,
                Pipe::Mte2,
                &format!("C{tile}"),
                &[Dep::Named(fix, "TILE_READY")],
            );
            freed.push(c_in);
            out.push(c_in);
        } else {
            out.push(b.step(cube, Pipe::Co1Co2, &format!("C{tile}->UB"), &[Dep::On(m)]));
        }
        let v = b.step(
            vec,
            Pipe::V,
            &format!("epilogue{tile}"),
            &[Dep::On(out[tile])],
        );
        b.step(vec, Pipe::Mte3, &format!("y{tile}"), &[Dep::On(v)]);
    }
    b.finish()
}

fn start_points(chip: &ChipSpec, p: &Problem) -> Vec<StartPoint> {
    const GMM_V4: &str = "hicann/ops-transformer gmm/grouped_matmul/docs/aclnnGroupedMatmulV4.md";
    const GMM_V5: &str = "hicann/ops-transformer gmm/grouped_matmul/op_host/op_api/\
                          aclnn_grouped_matmul_v5.h";
    const TORCH: &str = "Ascend Extension for PyTorch API, torch_npu.npu_grouped_matmul \
                         (https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000524.html)";
    if chip.arch == CoreArch::Separated {
        let compare = match p.quant {
            Quant::None => "aclnnGroupedMatmulV5 (V4 announces its deprecation in favour of V5): \
                            groupType 0 (split M), group list as cumsum or counts; V5's \
                            tuningConfigOptional takes the expected tokens per expert"
                .to_string(),
            Quant::W8A16 => "aclnnGroupedMatmulV5, A16W8 (fake quantisation): x f16/bf16, \
                             weight INT8 ND, antiquantScaleOptional / antiquantOffsetOptional \
                             [e, n] in x's dtype (our f32 scale is rounded once), per-channel \
                             only, actType 0"
                .to_string(),
            Quant::W8A8 => "aclnnGroupedMatmulV5, A8W8: x INT8, weight INT8 (ND or NZ), \
                            scaleOptional FLOAT [e, n], perTokenScaleOptional FLOAT [m], out \
                            FLOAT16 or BFLOAT16, groupType 0; the activations from \
                            aclnnDynamicQuant; GroupedMatmulSwigluQuant fuses the gate/up \
                            projection's SwiGLU and re-quantisation"
                .to_string(),
        };
        vec![
            StartPoint::new(
                "compare with",
                compare,
                if p.quant == Quant::None {
                    GMM_V5
                } else {
                    GMM_V4
                },
            ),
            StartPoint::new(
                "torch_npu",
                match p.quant {
                    Quant::None => {
                        "torch_npu.npu_grouped_matmul([x], [w], group_list=..., \
                                    split_item=2, group_type=0, group_list_type=0|1)"
                    }
                    Quant::W8A16 => {
                        "torch_npu.npu_grouped_matmul([x], [w_int8], \
                                     antiquant_scale=[s], antiquant_offset=[o], \
                                     group_list=..., split_item=2, group_type=0)"
                    }
                    Quant::W8A8 => {
                        "x_q, x_s = torch_npu.npu_dynamic_quant(x); \
                                    torch_npu.npu_grouped_matmul([x_q], [w_int8], scale=[s_w], \
                                    per_token_scale=[x_s], group_list=..., split_item=2, \
                                    group_type=0, output_dtype=torch.float16)"
                    }
                },
                TORCH,
            ),
            StartPoint::new(
                "port from",
                match p.quant {
                    Quant::None => {
                        "hicann/catlass examples/02_grouped_matmul_slice_m; \
                                    hicann/ops-transformer gmm/grouped_matmul_swiglu_quant for a \
                                    fused SwiGLU epilogue"
                    }
                    Quant::W8A16 => {
                        "hicann/ops-transformer gmm/grouped_matmul op_kernel/\
                                     grouped_matmul_antiquant.h (the AIV casts int8 weight slices \
                                     into a double-buffered GM workspace the AIC's matmul reads)"
                    }
                    Quant::W8A8 => {
                        "hicann/ops-transformer gmm/grouped_matmul op_kernel/\
                                    grouped_matmul_quant_mixcore.h (int32 tiles to workspace, \
                                    per-token and per-channel dequantisation on the AIV)"
                    }
                },
                "hicann/ops-transformer, hicann/catlass",
            ),
        ]
    } else {
        vec![
            StartPoint::new(
                "compare with",
                match p.quant {
                    Quant::None => "aclnnGroupedMatmulV4 / V5 with their Ascend310P \
                                    configuration: float16 only, weight in FRACTAL_NZ, \
                                    groupType 0, groupListType 0 or 1, no activation"
                        .to_string(),
                    _ => "none for the quantised matmul: on the Atlas inference series \
                          GroupedMatmul takes float16 only and scale, offset, antiquant and \
                          per-token scales must be null; compare with our exact reference (the \
                          dequantised f16 GroupedMatmul is a partial check)"
                        .to_string(),
                },
                "hicann/ops-transformer gmm/grouped_matmul/op_host/grouped_matmul_def.cpp and \
                 docs/aclnnGroupedMatmulV4_en.md",
            ),
            StartPoint::new(
                "torch_npu",
                if p.quant == Quant::W8A8 {
                    "torch_npu.npu_dynamic_quant(x) (DynamicQuant runs on the inference series: \
                     f16 in, int8 out); the quantised grouped matmul has no torch_npu call here"
                } else {
                    "torch_npu.npu_grouped_matmul([x], [w_nz], group_list=..., split_item=2, \
                     group_type=0) with f16 tensors"
                },
                TORCH,
            ),
            StartPoint::new(
                "port from",
                "hicann/ops-transformer gmm/grouped_matmul op_kernel/grouped_matmul.h, the \
                 __CCE_AICORE__ == 200 branch (the Matmul API with a UB local workspace of half \
                 the UB); catlass targets Atlas A2/A3 only",
                "hicann/ops-transformer gmm/grouped_matmul; hicann/catlass README",
            ),
        ]
    }
}

fn correspondence(chip: &ChipSpec, p: &Problem) -> Vec<Correspondence> {
    let separated = chip.arch == CoreArch::Separated;
    let mut list = vec![
        Correspondence::new(
            "`sched` (offsets, GEMV / GEMM tile prefixes) written by the schedule dispatch",
            "scalar registers: each core walks the group list itself",
        ),
        Correspondence::new(
            "`x_stage` (GEMV_XC k of the group's rows) / GEMM `TM x TK` x tile",
            "L1 `x`, an A1 queue of 2 buffers, then L0A `a` (A2 queue)",
        ),
        Correspondence::new(
            "weights streamed as 16-byte vectors into registers / GEMM `TK x TN` w tile",
            "L1 `w`, a B1 queue of 2 buffers, then L0B `b` (B2 queue)",
        ),
        Correspondence::new(
            "split-k partial sums reduced in workgroup memory / RM x RN register blocks",
            "the L0C accumulator `c` (CO1): Mmad sums all of k, nothing to reduce",
        ),
        Correspondence::new(
            "workgroupBarrier between the x / w stage and the FMAs",
            "HardEvent::MTE2_MTE1 and MTE1_M (queue hand-offs A1 -> A2 -> Mmad)",
        ),
        Correspondence::new(
            "epilogue reading the accumulators (silu, row_scale, store_pair)",
            if separated {
                "Fixpipe to a workspace slot, CrossCoreSetFlag TILE_READY, AIV `gate` / `up` / \
                 `acc` (VECIN) and `y` (VECOUT)"
            } else {
                "DataCopy CO1 -> CO2 into UB `gate` / `up` / `acc`, then `y` (VECOUT)"
            },
        ),
    ];
    if p.quant == Quant::W8A16 {
        list.push(Correspondence::new(
            "int8 weights widened in registers (GEMV) or while staging (GEMM)",
            "UB `w int8` -> `w f32` -> `w dequantised`, then a GM slot (A2) or L1 (310P)",
        ));
    }
    if p.quant == Quant::W8A8 {
        list.push(Correspondence::new(
            "dot4I8Packed on packed int8 words, int32 accumulators",
            "the int8 cube: L0A / L0B int8 fractals (16 x 32), L0C int32",
        ));
    }
    list
}
