//! # SwiftGMM with int8 weights: W8A16 and W8A8
//!
//! The grouped matmul of [`super`] with int8 expert weights `[e, k, n]` or `[e, n, k]` and a
//! per-output-channel f32 scale `w_scale [e, n]`, in the two formats deployments use
//! (CANN's GroupedMatmul with antiquant parameters, and with a per-token scale):
//!
//! - [`Quant::W8A16`] ("antiquant"): x f32, f16 or bf16; optional per-channel offset
//!   `w_offset [e, n]`; the weights stand for `(q + offset) · scale`. The kernels turn q into
//!   `q + offset` (f32) in registers (GEMV path) or while staging (GEMM path), accumulate in f32,
//!   and apply the scale, constant per output column, in the epilogue.
//! - [`Quant::W8A8`]: x int8 with a per-row (per-token) scale `x_scale [m_total]`, as
//!   [`crate::ops::quantize`] makes it; symmetric int8 weights (no offset). The int8 products are
//!   summed exactly in i32 with `dot4I8Packed` on packed words, and dequantized in the epilogue:
//!   `f32(acc) · x_scale[row] · w_scale[col]`.
//!
//! Then SwiftGMM's epilogue (SwiGLU on the dequantized gate and up columns, the row scale) and
//! output dtype (f32, f16, bf16). Scheduling, the GEMV / GEMM choice per group, persistent tiles,
//! weight shards and the tile configurations are SwiftGMM's; the plan is a [`GmmPlan`].
//!
//! Scales are only ever multiplied (no division follows them), so zero and negative scales are
//! accepted; non-finite weight scales or offsets given on the host are refused. A NaN in
//! `x_scale` (the quantizer's mark of a row that held NaN or ±inf) makes that row's output NaN.
//!
//! int8 rows hold whole 32-bit words: the contiguous weight dimension (k for `[e, n, k]`, n for
//! `[e, k, n]`, and with `[e, k, n]` SwiGLU also `n_out`) and, for W8A8, k must be multiples of 4.
//! W8A8 needs `k ≤ 131071` so that the i32 sums cannot overflow (`k · 128² < 2³¹`).

pub mod reference;

use super::tiling::{
    self, GemmPath, GemvConfig, KernelLimits, MAX_GEMV_ROWS, MAX_GEMV_UNROLL, ShapeKey, TileConfig,
};
use super::{
    Desc, DeviceGroups, ExpertWeights, GEMM_ARGS, GEMV_ARGS, GemmKernel, GmmParams, GmmPlan,
    Groups, Layout, OP, Options, PathDispatch, PlanInfo, Problem, Scheduler, Tiling, Validated,
    check_binding, check_offsets, effective_mode, gemm_path, weight_dims,
};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::tensor::{DType, DeviceTensor, Tensor};

const KERNEL: Kernel = Kernel {
    name: "swiftgmm_quant",
    source: include_str!("../../../../shaders/swiftgmm_quant.wgsl"),
};

/// Largest k of W8A8: `k · 128 · 128` fits an i32.
pub const MAX_W8A8_K: usize = (i32::MAX as usize) / (128 * 128);

/// The quantized format of a grouped matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// int8 weights with per-channel scale (and offset), 16-bit or f32 activations.
    W8A16,
    /// int8 weights with per-channel scale, int8 activations with per-row scale.
    W8A8,
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::W8A16 => "w8a16",
            Quant::W8A8 => "w8a8",
        }
    }
}

/// int8 expert weights on the GPU with their per-output-channel scales (and offsets, W8A16).
#[derive(Debug)]
pub struct QuantWeights {
    weights: ExpertWeights,
    scale: DeviceTensor,
    offset: Option<DeviceTensor>,
}

/// Check int8 weights `[e, a, b]` and their `[e, c]` f32 scale (and offset) tensors by shape and
/// dtype; the plan checks `c` against n.
fn check_weight_tensors(
    (experts, dims, dtype): (usize, [usize; 2], DType),
    scale: (&[usize], DType),
    offset: Option<(&[usize], DType)>,
) -> Result<()> {
    if dtype != DType::I8 {
        return Err(Error::unsupported(
            OP,
            format!("w of dtype {dtype} with scales (quantized weights are int8)"),
        ));
    }
    if !dims[1].is_multiple_of(4) {
        return Err(Error::unsupported(
            OP,
            format!(
                "int8 w of inner size {}: int8 rows hold whole 32-bit words, the last dimension \
                 must be a multiple of 4",
                dims[1]
            ),
        ));
    }
    for (what, t) in [("w_scale", Some(scale)), ("w_offset", offset)] {
        if let Some((shape, dtype)) = t {
            let ok = matches!(*shape, [e, n] if e == experts && (n == dims[0] || n == dims[1]));
            if !ok || dtype != DType::F32 {
                return Err(Error::shape(
                    OP,
                    what,
                    (shape, dtype),
                    format!("[e = {experts}, n] f32"),
                ));
            }
        }
    }
    Ok(())
}

/// Refuse a host scale or offset with a non-finite value, naming it and the first bad index.
fn check_finite(what: &str, t: &Tensor) -> Result<()> {
    match t.to_f32().iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::invalid(
            OP,
            what,
            format!(
                "element {i} is {} (scales and offsets must be finite)",
                t.to_f32()[i]
            ),
        )),
        None => Ok(()),
    }
}

impl QuantWeights {
    /// Upload int8 weights `w [e, k, n]` or `[e, n, k]` with `scale [e, n]` f32 and an optional
    /// `offset [e, n]` f32, split into shards that fit one binding. Scales and offsets must be
    /// finite.
    pub fn upload(gpu: &Gpu, w: &Tensor, scale: &Tensor, offset: Option<&Tensor>) -> Result<Self> {
        let limit = gpu.caps.max_storage_binding.min(gpu.caps.max_buffer_size);
        Self::upload_split(gpu, w, scale, offset, limit)
    }

    /// [`QuantWeights::upload`] with shards of at most `max_shard_bytes` each.
    pub fn upload_split(
        gpu: &Gpu,
        w: &Tensor,
        scale: &Tensor,
        offset: Option<&Tensor>,
        max_shard_bytes: u64,
    ) -> Result<Self> {
        let (experts, dims) = weight_dims(w.shape())?;
        check_weight_tensors(
            (experts, dims, w.dtype()),
            (scale.shape(), scale.dtype()),
            offset.map(|o| (o.shape(), o.dtype())),
        )?;
        check_finite("w_scale", scale)?;
        if let Some(o) = offset {
            check_finite("w_offset", o)?;
        }
        Ok(QuantWeights {
            weights: ExpertWeights::upload_split(gpu, w, max_shard_bytes)?,
            scale: gpu.upload(scale)?,
            offset: offset.map(|o| gpu.upload(o)).transpose()?,
        })
    }

    /// int8 weights and their scales already on the GPU (shapes and dtypes are checked; values
    /// on the device cannot be).
    pub fn from_device(
        weights: ExpertWeights,
        scale: DeviceTensor,
        offset: Option<DeviceTensor>,
    ) -> Result<Self> {
        check_weight_tensors(
            (weights.experts(), weights.dims(), weights.dtype()),
            (scale.shape(), scale.dtype()),
            offset.as_ref().map(|o| (o.shape(), o.dtype())),
        )?;
        Ok(QuantWeights {
            weights,
            scale,
            offset,
        })
    }

    pub fn weights(&self) -> &ExpertWeights {
        &self.weights
    }

    /// `[e, n]` f32.
    pub fn scale(&self) -> &DeviceTensor {
        &self.scale
    }

    /// `[e, n]` f32, if any.
    pub fn offset(&self) -> Option<&DeviceTensor> {
        self.offset.as_ref()
    }
}

/// The activations of a quantized grouped matmul on the GPU.
#[derive(Clone, Copy, Debug)]
pub enum QuantX<'a> {
    /// W8A16: `[m_total, k]` f32, f16 or bf16.
    Float(&'a DeviceTensor),
    /// W8A8: `q [m_total, k]` int8 and `scale [m_total]` f32 (see [`crate::ops::quantize`]).
    Int8 {
        q: &'a DeviceTensor,
        scale: &'a DeviceTensor,
    },
}

/// The device tensors of a quantized grouped matmul (as [`super::GmmArgs`]).
#[derive(Clone, Copy, Debug)]
pub struct QuantGmmArgs<'a> {
    pub x: QuantX<'a>,
    pub groups: DeviceGroups<'a>,
    pub weights: &'a QuantWeights,
    /// `[m_total]` f32, multiplies each output row (after the activation).
    pub row_scale: Option<&'a DeviceTensor>,
    /// `[m_total, n_out]` f32, f16 or bf16 (16-bit outputs need an even n_out).
    pub y: &'a DeviceTensor,
    /// The same offsets on the host, when the caller has them (as [`super::GmmArgs`]).
    pub host_offsets: Option<&'a [u32]>,
}

/// The host tensors of a quantized grouped matmul.
#[derive(Clone, Copy, Debug)]
pub struct QuantInputs<'a> {
    /// W8A16: `[m_total, k]` f32, f16 or bf16; W8A8: `[m_total, k]` int8.
    pub x: &'a Tensor,
    /// W8A8: `[m_total]` f32 (per-token scale); None for W8A16.
    pub x_scale: Option<&'a Tensor>,
    pub groups: &'a Groups,
    /// int8 `[e, k, n]` or `[e, n, k]` by `Options::layout`.
    pub w: &'a Tensor,
    /// `[e, n]` f32.
    pub w_scale: &'a Tensor,
    /// `[e, n]` f32, W8A16 only.
    pub w_offset: Option<&'a Tensor>,
    /// `[m_total]` f32.
    pub row_scale: Option<&'a Tensor>,
}

/// A validated quantized problem.
#[derive(Clone, Copy, Debug)]
struct QuantProblem {
    problem: Problem,
    quant: Quant,
    has_offset: bool,
    k: usize,
    n: usize,
    n_out: usize,
}

impl std::ops::Deref for QuantProblem {
    type Target = Problem;
    fn deref(&self) -> &Problem {
        &self.problem
    }
}

/// Shapes and dtypes of a quantized grouped matmul, host or device.
struct QuantDescs<'a> {
    x: Desc<'a>,
    x_scale: Option<Desc<'a>>,
    weights: (usize, [usize; 2], DType),
    w_scale: Desc<'a>,
    w_offset: Option<Desc<'a>>,
    groups: (Desc<'a>, bool),
    row_scale: Option<Desc<'a>>,
    y: Option<Desc<'a>>,
}

impl QuantProblem {
    fn check(d: QuantDescs, options: &Options) -> Result<Self> {
        let (x_shape, x_dtype) = (d.x.shape, d.x.dtype);
        let quant = match x_dtype {
            DType::I8 => Quant::W8A8,
            t if t.is_float() => Quant::W8A16,
            t => return Err(Error::unsupported(OP, format!("x of dtype {t}"))),
        };
        check_weight_tensors(
            d.weights,
            (d.w_scale.shape, d.w_scale.dtype),
            d.w_offset.as_ref().map(|o| (o.shape, o.dtype)),
        )?;
        let problem = Problem::check_shapes(d.x, d.weights, d.groups, d.row_scale, d.y, options)?;
        let (m_total, k, n, n_out) = (problem.m_total, problem.k, problem.n, problem.n_out);
        let experts = problem.experts;
        for (what, t) in [
            ("w_scale", Some(&d.w_scale)),
            ("w_offset", d.w_offset.as_ref()),
        ] {
            if let Some(t) = t {
                if t.shape != [experts, n] {
                    return Err(Error::shape(
                        OP,
                        what,
                        t.shape,
                        format!(
                            "[e, n] = [{experts}, {n}] ({} layout)",
                            options.layout.name()
                        ),
                    ));
                }
            }
        }
        if options.layout == Layout::Kn && problem.swiglu && !n_out.is_multiple_of(4) {
            return Err(Error::unsupported(
                OP,
                format!(
                    "int8 [e, k, n] weights with SwiGLU and n_out = {n_out}: the up half must \
                     start on a 32-bit word (n_out a multiple of 4)"
                ),
            ));
        }
        match quant {
            Quant::W8A8 => {
                crate::ops::quantize::check_rows(OP, "int8 x", x_shape)?;
                if k > MAX_W8A8_K {
                    return Err(Error::unsupported(
                        OP,
                        format!("W8A8 with k = {k} > {MAX_W8A8_K}: the i32 sums could overflow"),
                    ));
                }
                if d.w_offset.is_some() {
                    return Err(Error::invalid(
                        OP,
                        "w_offset",
                        "W8A8 takes symmetric weights (an offset is W8A16 only)",
                    ));
                }
                match d.x_scale {
                    Some(s) if s.shape == [m_total] && s.dtype == DType::F32 => {}
                    Some(s) => {
                        return Err(Error::shape(
                            OP,
                            "x_scale",
                            (s.shape, s.dtype),
                            format!("[m_total = {m_total}] f32"),
                        ));
                    }
                    None => {
                        return Err(Error::invalid(
                            OP,
                            "x_scale",
                            "int8 x needs its per-row scale (W8A8)",
                        ));
                    }
                }
            }
            Quant::W8A16 => {
                if d.x_scale.is_some() {
                    return Err(Error::invalid(
                        OP,
                        "x_scale",
                        format!("given with {x_dtype} x: a per-row scale is for int8 x (W8A8)"),
                    ));
                }
            }
        }
        Ok(QuantProblem {
            problem,
            quant,
            has_offset: d.w_offset.is_some(),
            k,
            n,
            n_out,
        })
    }

    /// Override constants shared by the entry points.
    fn constants(&self, has_scale: bool) -> Vec<(&'static str, f64)> {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let x_aligned = match self.quant {
            Quant::W8A16 => self.k.is_multiple_of(4),
            Quant::W8A8 => self.k.is_multiple_of(16),
        };
        vec![
            ("X_DTYPE", self.x_dtype.shader_code() as f64),
            ("OUT_DTYPE", self.out_dtype.shader_code() as f64),
            ("X_ALIGNED", flag(x_aligned)),
            ("W_ALIGNED", flag(self.k.is_multiple_of(16))),
            ("W_KN", flag(self.layout == Layout::Kn)),
            ("SWIGLU", flag(self.swiglu)),
            ("HAS_SCALE", flag(has_scale)),
            ("HAS_OFFSET", flag(self.has_offset)),
        ]
    }
}

/// Sizes the int8 GEMV kernels derive from a [`GemvConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantGemvGeometry {
    /// Weight columns per tile.
    pub weight_cols: u32,
    /// Output columns per tile.
    pub out_cols: u32,
    /// k per staged chunk of x.
    pub x_chunk: u32,
    /// Words of split-k scratch.
    pub scratch: u32,
    /// Workgroup memory in bytes.
    pub workgroup_bytes: u64,
}

/// The int8 GEMV tile of `c`: `[e, n, k]` invocations own two columns and read 16-value k
/// vectors; `[e, k, n]` invocations own four columns (one word per k row) and read groups of
/// 4 k rows.
pub fn gemv_geometry(
    c: &GemvConfig,
    layout: Layout,
    quant: Quant,
    swiglu: bool,
) -> QuantGemvGeometry {
    let groups = c.workgroup / c.split_k.max(1);
    let (weight_cols, x_chunk, scratch) = match layout {
        Layout::Nk => (
            groups.saturating_mul(2),
            c.split_k.saturating_mul(16).saturating_mul(c.unroll),
            c.workgroup.saturating_mul(2),
        ),
        Layout::Kn => (
            groups.saturating_mul(4),
            c.split_k.saturating_mul(4).saturating_mul(c.unroll),
            c.workgroup.saturating_mul(4),
        ),
    };
    let x_bytes = match quant {
        Quant::W8A16 => 4,
        Quant::W8A8 => 1,
    };
    let rows = c.rows as u64;
    QuantGemvGeometry {
        weight_cols,
        out_cols: if swiglu { weight_cols / 2 } else { weight_cols },
        x_chunk,
        scratch,
        workgroup_bytes: rows * x_chunk as u64 * x_bytes
            + 4 * scratch as u64
            + 4 * rows * weight_cols as u64,
    }
}

fn bad(what: &str, why: String) -> Error {
    Error::invalid(OP, format!("int8 tile configuration {what}"), why)
}

/// Check a tile configuration against the int8 kernels' rules and the device limits: the GEMV
/// tile, and the GEMM tile of `key.gemm` (int8 SIMT, or W8A16 on cooperative matrices).
pub fn validate_config(
    config: &TileConfig,
    key: &ShapeKey,
    quant: Quant,
    swiglu: bool,
    limits: &KernelLimits,
) -> Result<()> {
    let v = &config.gemv;
    if config.threshold > v.rows {
        return Err(bad(
            "threshold",
            format!("{} exceeds the GEMV row block {}", config.threshold, v.rows),
        ));
    }
    if !(1..=MAX_GEMV_ROWS).contains(&v.rows) || !(1..=MAX_GEMV_UNROLL).contains(&v.unroll) {
        return Err(bad(
            "gemv",
            format!(
                "rows {} must be in 1..={MAX_GEMV_ROWS}, unroll {} in 1..={MAX_GEMV_UNROLL}",
                v.rows, v.unroll
            ),
        ));
    }
    if v.split_k == 0 || v.workgroup == 0 || !v.workgroup.is_multiple_of(v.split_k) {
        return Err(bad(
            "gemv.split_k",
            format!(
                "{} must divide the workgroup size {}",
                v.split_k, v.workgroup
            ),
        ));
    }
    let groups = v.workgroup / v.split_k;
    if swiglu && !groups.is_multiple_of(2) {
        return Err(bad(
            "gemv",
            format!("SwiGLU needs an even number of column groups, got {groups}"),
        ));
    }
    let geo = gemv_geometry(v, key.layout, quant, swiglu);
    limits.check_workgroup("int8 gemv", v.workgroup, geo.workgroup_bytes)?;
    match key.gemm {
        GemmPath::Simt => {
            let m = &config.gemm;
            m.validate(swiglu, limits)?;
            if !m.tk.is_multiple_of(16) {
                return Err(bad(
                    "gemm.tk",
                    format!("{} must be a multiple of 16 (one int8 vector)", m.tk),
                ));
            }
        }
        GemmPath::Coop(fragment) => {
            let c = &config.coop;
            c.validate(fragment, key, swiglu, limits)?;
            // Staged in 16-value int8 vectors: along k ([e, n, k]) or along n ([e, k, n], within
            // one SwiGLU half).
            let f = fragment.size();
            let (bk, bn) = (c.k_frags * f, c.sg_n * c.frag_n * f);
            let along = match key.layout {
                Layout::Nk => bk,
                Layout::Kn if swiglu => bn / 2,
                Layout::Kn => bn,
            };
            if !along.is_multiple_of(16) {
                return Err(bad(
                    "coop",
                    format!(
                        "{} must hold whole 16-value int8 vectors ({} layout{})",
                        c.describe(fragment),
                        key.layout.name(),
                        if swiglu { ", SwiGLU halves" } else { "" }
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The GEMM kernel of an int8 plan: W8A8 sums on `dot4I8Packed` (SIMT: WGSL has no int8
/// fragments, and f16 fragments would lose the exact sums); W8A16 as [`gemm_path`].
fn quant_gemm_path(gpu: &Gpu, quant: Quant, kernel: GemmKernel) -> Result<GemmPath> {
    match (quant, kernel) {
        (Quant::W8A16, kernel) => gemm_path(gpu, kernel),
        (Quant::W8A8, GemmKernel::Coop) => Err(Error::unsupported(
            OP,
            "the cooperative-matrix GEMM kernel for W8A8 (its exact i32 sums run on \
             dot4I8Packed; use gemm_kernel auto or simt)",
        )),
        (Quant::W8A8, _) => Ok(GemmPath::Simt),
    }
}

/// The tile configuration of an int8 plan: `Fixed`, or the defaults for `Cached` and `Defaults`
/// (the tuner measures the 16-bit kernels, so the cache holds no int8 entries and
/// `Tiling::Tune` is refused).
fn resolve_config(
    gpu: &Gpu,
    p: &QuantProblem,
    options: &Options,
    routed: usize,
) -> Result<(TileConfig, GemmPath)> {
    if options.tiling == Tiling::Tune {
        return Err(Error::unsupported(
            OP,
            "Tiling::Tune for int8 weights (the tuner measures the 16-bit kernels): use \
             Tiling::Cached, Defaults or Fixed",
        ));
    }
    let gemm = quant_gemm_path(gpu, p.quant, options.gemm_kernel)?;
    let key = ShapeKey {
        rows_bucket: tiling::rows_bucket(routed, p.experts),
        ..p.key(None, gemm)
    };
    let config = match options.tiling {
        Tiling::Fixed(config) => config,
        _ => tiling::default_config(gpu, &key),
    };
    validate_config(&config, &key, p.quant, p.swiglu, &KernelLimits::of(gpu))?;
    Ok((config, gemm))
}

impl GmmPlan {
    /// A quantized grouped matmul ([`Quant::W8A8`] for int8 x, [`Quant::W8A16`] for float x):
    /// validated and planned as [`GmmPlan::new`]; nothing is recorded or dispatched here, and an
    /// error leaves every tensor untouched.
    pub fn new_quantized(gpu: &Gpu, args: &QuantGmmArgs, options: &Options) -> Result<Self> {
        let (x, x_scale) = match args.x {
            QuantX::Float(x) => (x, None),
            QuantX::Int8 { q, scale } => (q, Some(scale)),
        };
        let w = args.weights;
        let groups = args.groups.tensor();
        let desc = device_desc;
        let p = QuantProblem::check(
            QuantDescs {
                x: desc(x),
                x_scale: x_scale.map(desc),
                weights: (w.weights.experts(), w.weights.dims(), w.weights.dtype()),
                w_scale: desc(&w.scale),
                w_offset: w.offset.as_ref().map(desc),
                groups: (desc(groups), matches!(args.groups, DeviceGroups::Counts(_))),
                row_scale: args.row_scale.map(desc),
                y: Some(desc(args.y)),
            },
            options,
        )?;
        if let Some(offsets) = args.host_offsets {
            check_offsets(offsets, p.experts, p.m_total)?;
        }
        let bound = [
            ("x", Some(x.buffer())),
            ("x_scale", x_scale.map(|s| s.buffer())),
            ("y", Some(args.y.buffer())),
            ("group offsets", Some(groups.buffer())),
            ("row_scale", args.row_scale.map(|s| s.buffer())),
            ("w_scale", Some(w.scale.buffer())),
            ("w_offset", w.offset.as_ref().map(|o| o.buffer())),
        ];
        for (what, buffer) in bound {
            if let Some(buffer) = buffer {
                check_binding(gpu, what, buffer)?;
            }
        }
        for shard in w.weights.shards() {
            check_binding(gpu, "weight shard", shard.tensor.buffer())?;
        }
        let routed = match args.host_offsets {
            Some(o) => (o[p.experts] - o[0]) as usize,
            None => p.m_total,
        };
        let (config, gemm) = resolve_config(gpu, &p, options, routed)?;
        let geo = gemv_geometry(&config.gemv, p.layout, p.quant, p.swiglu);
        let gemv_n_tiles = (p.n_out as u32).div_ceil(geo.out_cols);
        let (gemm_rows, gemm_cols) = match gemm {
            GemmPath::Simt => (config.gemm.tm, config.gemm.tn),
            GemmPath::Coop(f) => {
                let c = &config.coop;
                (c.sg_m * c.frag_m * f.size(), c.sg_n * c.frag_n * f.size())
            }
        };
        let gemm_out_cols = if p.swiglu { gemm_cols / 2 } else { gemm_cols };
        let gemm_n_tiles = (p.n_out as u32).div_ceil(gemm_out_cols);
        let mode = effective_mode(options.mode, args.host_offsets, config.threshold);
        let scheduler = Scheduler::new(
            gpu,
            &w.weights,
            args.groups,
            (p.experts, p.m_total),
            &config,
            (mode, gemm_rows),
            (gemv_n_tiles, gemm_n_tiles),
            options.max_workgroups,
        )?;

        let placeholder = Validated::placeholder(gpu)?;
        let optional = |t| binding_or(t, &placeholder);
        // The int8 kernels bind x_scale last; the cooperative-matrix kernel (W8A16) does not.
        let bind_shards = |pipeline: &wgpu::ComputePipeline, n_tiles: u32, coop: bool| {
            w.weights
                .ranges()
                .map(|(lo, hi, shard)| {
                    let params = gpu.uniform(&GmmParams {
                        m_total: p.m_total as u32,
                        k: p.k as u32,
                        n: p.n as u32,
                        n_out: p.n_out as u32,
                        experts: p.experts as u32,
                        expert_lo: lo as u32,
                        expert_hi: hi as u32,
                        n_tiles,
                        ..GmmParams::default()
                    })?;
                    let mut resources = vec![
                        params.as_entire_binding(),
                        x.binding(),
                        shard.tensor.binding(),
                        scheduler.sched.as_entire_binding(),
                        optional(args.row_scale),
                        args.y.binding(),
                        w.scale.binding(),
                        optional(w.offset.as_ref()),
                    ];
                    if !coop {
                        resources.push(optional(x_scale));
                    }
                    gpu.bind_group(pipeline, &resources)
                })
                .collect::<Result<Vec<_>>>()
        };
        let (use_gemv, use_gemm) = mode.paths();
        let suffix = p.quant.name();
        let mut paths = Vec::new();
        if use_gemv {
            let g = &config.gemv;
            let mut constants = p.constants(args.row_scale.is_some());
            constants.extend([
                ("GEMV_WG", g.workgroup as f64),
                ("GEMV_ROWS", g.rows as f64),
                ("GEMV_SPLIT_K", g.split_k as f64),
                ("GEMV_UNROLL", g.unroll as f64),
                ("GEMV_XC", geo.x_chunk as f64),
                ("GEMV_NBW", geo.weight_cols as f64),
                ("GEMV_RED", geo.scratch as f64),
            ]);
            let entry = match (p.layout, p.quant) {
                (Layout::Nk, Quant::W8A16) => "gemv_nk_w8a16",
                (Layout::Kn, Quant::W8A16) => "gemv_kn_w8a16",
                (Layout::Nk, Quant::W8A8) => "gemv_nk_w8a8",
                (Layout::Kn, Quant::W8A8) => "gemv_kn_w8a8",
            };
            let pipeline = gpu.pipeline(&KERNEL, entry, &constants)?;
            let binds = bind_shards(&pipeline, gemv_n_tiles, false)?;
            paths.push(PathDispatch {
                pipeline,
                binds,
                args_offset: GEMV_ARGS,
            });
        }
        if use_gemm {
            let has_scale = args.row_scale.is_some();
            let pipeline = match gemm {
                GemmPath::Simt => {
                    let m = &config.gemm;
                    let mut constants = p.constants(has_scale);
                    constants.extend([
                        ("TM", m.tm as f64),
                        ("TN", m.tn as f64),
                        ("TK", m.tk as f64),
                        ("RM", m.rm as f64),
                        ("RN", m.rn as f64),
                        ("GEMM_WG", m.workgroup() as f64),
                    ]);
                    let entry = match p.quant {
                        Quant::W8A16 => "gemm_w8a16",
                        Quant::W8A8 => "gemm_w8a8",
                    };
                    gpu.pipeline(&KERNEL, entry, &constants)?
                }
                // W8A16: int8 becomes f16 q + offset while staging.
                GemmPath::Coop(fragment) => p.problem.coop_pipeline(
                    gpu,
                    (&config.coop, fragment),
                    has_scale,
                    &[("HAS_OFFSET", if p.has_offset { 1.0 } else { 0.0 })],
                    false,
                )?,
            };
            let coop = matches!(gemm, GemmPath::Coop(_));
            let binds = bind_shards(&pipeline, gemm_n_tiles, coop)?;
            paths.push(PathDispatch {
                pipeline,
                binds,
                args_offset: GEMM_ARGS,
            });
        }
        Ok(GmmPlan::assemble(
            scheduler,
            paths,
            PlanInfo {
                kind: &format!("{suffix} "),
                layout: p.layout,
                config,
                gemm,
                asked: options.mode,
                recorded: mode,
                shards: w.weights.shards().len(),
            },
        ))
    }
}

fn device_desc(t: &DeviceTensor) -> Desc<'_> {
    Desc {
        shape: t.shape(),
        dtype: t.dtype(),
    }
}

fn host_desc(t: &Tensor) -> Desc<'_> {
    Desc {
        shape: t.shape(),
        dtype: t.dtype(),
    }
}

/// The binding of an optional tensor, or the 16-byte placeholder.
fn binding_or<'a>(
    t: Option<&'a DeviceTensor>,
    placeholder: &'a wgpu::Buffer,
) -> wgpu::BindingResource<'a> {
    t.map_or_else(|| placeholder.as_entire_binding(), DeviceTensor::binding)
}

/// Validate host inputs as [`GmmPlan::new_quantized`] would (plus finite weight scales and
/// offsets), returning the problem and the offsets.
fn check_host(inputs: &QuantInputs, options: &Options) -> Result<(QuantProblem, Vec<u32>)> {
    let (experts, dims) = weight_dims(inputs.w.shape())?;
    let counts = matches!(inputs.groups, Groups::Counts(_));
    let groups_len = [inputs.groups.experts() + usize::from(!counts)];
    let desc = host_desc;
    let p = QuantProblem::check(
        QuantDescs {
            x: desc(inputs.x),
            x_scale: inputs.x_scale.map(desc),
            weights: (experts, dims, inputs.w.dtype()),
            w_scale: desc(inputs.w_scale),
            w_offset: inputs.w_offset.map(desc),
            groups: (
                Desc {
                    shape: &groups_len,
                    dtype: DType::U32,
                },
                counts,
            ),
            row_scale: inputs.row_scale.map(desc),
            y: None,
        },
        options,
    )?;
    check_finite("w_scale", inputs.w_scale)?;
    if let Some(o) = inputs.w_offset {
        check_finite("w_offset", o)?;
    }
    let offsets = inputs.groups.offsets(p.m_total)?;
    Ok((p, offsets))
}

/// The format and output shape `[m_total, n_out]` for these inputs.
pub fn output_shape(inputs: &QuantInputs, options: &Options) -> Result<(Quant, [usize; 2])> {
    let (p, _) = check_host(inputs, options)?;
    Ok((p.quant, [p.m_total, p.n_out]))
}

/// Validate, upload, run and read back: y `[m_total, n_out]` in `options.out_dtype`, rows outside
/// every group zero. Everything is checked before anything is uploaded.
pub fn run(gpu: &Gpu, inputs: &QuantInputs, options: &Options) -> Result<Tensor> {
    let (p, offsets) = check_host(inputs, options)?;
    let x = gpu.upload(inputs.x)?;
    let x_scale = inputs.x_scale.map(|s| gpu.upload(s)).transpose()?;
    let weights = QuantWeights::upload(gpu, inputs.w, inputs.w_scale, inputs.w_offset)?;
    let row_scale = inputs.row_scale.map(|s| gpu.upload(s)).transpose()?;
    let offsets_dev = gpu.upload(&Tensor::u32(&[p.experts + 1], offsets.clone())?)?;
    let y = gpu.zeros(&[p.m_total, p.n_out], p.out_dtype)?;
    let args = QuantGmmArgs {
        x: match &x_scale {
            Some(scale) => QuantX::Int8 { q: &x, scale },
            None => QuantX::Float(&x),
        },
        groups: DeviceGroups::Offsets(&offsets_dev),
        weights: &weights,
        row_scale: row_scale.as_ref(),
        y: &y,
        host_offsets: Some(&offsets),
    };
    let plan = GmmPlan::new_quantized(gpu, &args, options)?;
    gpu.run(|rec| plan.record(rec))?;
    gpu.download(&y)
}

/// How the W8A8 kernels sum int8 products on this adapter, for `fusedops info`:
/// `dot4I8Packed` is native where the driver has integer dot products, else naga polyfills it.
pub fn dot_product_path(gpu: &Gpu) -> String {
    let native = match gpu.info.backend {
        wgpu::Backend::Vulkan => {
            // SAFETY: the HAL adapter is only read (its reported properties), never used to
            // create or destroy anything.
            let hal = unsafe { gpu.adapter.as_hal::<wgpu::hal::api::Vulkan>() };
            hal.map(|a| {
                let caps = a.physical_device_capabilities();
                // wgpu's Vulkan backend emits OpSDot when the device has
                // VK_KHR_shader_integer_dot_product (core in Vulkan 1.3), else naga's polyfill.
                caps.properties().api_version >= (1 << 22 | 3 << 12)
                    || caps.supports_extension(c"VK_KHR_shader_integer_dot_product")
            })
        }
        _ => None,
    };
    match (gpu.info.backend, native) {
        (_, Some(true)) => "dot4I8Packed as SPIR-V OpSDot (VK_KHR_shader_integer_dot_product): \
                            exact i32 sums"
            .into(),
        (_, Some(false)) => "dot4I8Packed polyfilled by naga (4 sign-extended byte products per \
                             word; no integer dot product on this device): exact i32 sums"
            .into(),
        (wgpu::Backend::Metal, _) => "dot4I8Packed as MSL packed_char4 products (naga): exact i32 \
                                      sums"
            .into(),
        (wgpu::Backend::Dx12, _) => "dot4I8Packed as HLSL dot4add_i8packed on shader model 6.4+, \
                                     else naga's polyfill: exact i32 sums"
            .into(),
        (backend, _) => format!("dot4I8Packed on {backend:?} (naga's translation): exact i32 sums"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::swiftgmm::tiling::{GemmConfig, GemvConfig};

    fn limits() -> KernelLimits {
        KernelLimits {
            max_invocations: 1024,
            max_workgroup_size_x: 1024,
            max_workgroup_bytes: 32 << 10,
            subgroup_size: 8,
        }
    }

    fn key(layout: Layout, quant: Quant, gemm: GemmPath) -> ShapeKey {
        ShapeKey {
            x_dtype: if quant == Quant::W8A8 {
                DType::I8
            } else {
                DType::BF16
            },
            w_dtype: DType::I8,
            layout,
            k: 64,
            n: 64,
            rows_bucket: 16,
            gemm,
        }
    }

    #[test]
    fn geometry_per_layout_and_format() {
        let c = GemvConfig {
            rows: 8,
            workgroup: 256,
            split_k: 16,
            unroll: 2,
        };
        let nk = gemv_geometry(&c, Layout::Nk, Quant::W8A16, false);
        assert_eq!((nk.weight_cols, nk.x_chunk, nk.scratch), (32, 512, 512));
        assert_eq!(nk.workgroup_bytes, 8 * 512 * 4 + 4 * 512 + 4 * 8 * 32);
        let kn = gemv_geometry(&c, Layout::Kn, Quant::W8A8, true);
        assert_eq!((kn.weight_cols, kn.out_cols, kn.x_chunk), (64, 32, 128));
        assert_eq!(kn.workgroup_bytes, 8 * 128 + 4 * 1024 + 4 * 8 * 64);
    }

    #[test]
    fn int8_rules_are_enforced() {
        use crate::gpu::Fragment;
        use crate::ops::swiftgmm::tiling::CoopGemmConfig;
        let base = TileConfig {
            threshold: 8,
            gemv: GemvConfig {
                rows: 8,
                workgroup: 64,
                split_k: 8,
                unroll: 2,
            },
            gemm: GemmConfig {
                tm: 32,
                tn: 32,
                tk: 16,
                rm: 4,
                rn: 8,
            },
            coop: CoopGemmConfig {
                sg_m: 2,
                sg_n: 2,
                frag_m: 2,
                frag_n: 2,
                k_frags: 2,
            },
        };
        let coop8 = GemmPath::Coop(Fragment::Size8);
        for quant in [Quant::W8A16, Quant::W8A8] {
            for layout in [Layout::Nk, Layout::Kn] {
                let simt = key(layout, quant, GemmPath::Simt);
                validate_config(&base, &simt, quant, true, &limits()).unwrap();
            }
        }
        for layout in [Layout::Nk, Layout::Kn] {
            let k = key(layout, Quant::W8A16, coop8);
            validate_config(&base, &k, Quant::W8A16, true, &limits()).unwrap();
        }
        let simt = key(Layout::Nk, Quant::W8A8, GemmPath::Simt);
        let mut tk8 = base;
        tk8.gemm.tk = 8;
        assert!(validate_config(&tk8, &simt, Quant::W8A8, false, &limits()).is_err());
        // A coop stage of 8 k values at 8x8 cannot hold a 16-value int8 vector along k; nor a
        // 16-column tile's SwiGLU halves along n.
        let mut thin = base;
        thin.coop.k_frags = 1;
        let nk = key(Layout::Nk, Quant::W8A16, coop8);
        assert!(validate_config(&thin, &nk, Quant::W8A16, false, &limits()).is_err());
        let mut narrow = base;
        narrow.coop.sg_n = 1;
        let kn = key(Layout::Kn, Quant::W8A16, coop8);
        assert!(validate_config(&narrow, &kn, Quant::W8A16, true, &limits()).is_err());
        validate_config(&narrow, &kn, Quant::W8A16, false, &limits()).unwrap();
        let mut big = base;
        big.gemv = GemvConfig {
            rows: 16,
            workgroup: 1024,
            split_k: 16,
            unroll: 4,
        };
        // 16 rows x 1024 k x 4 bytes of x alone pass 32 KiB.
        let a16 = key(Layout::Nk, Quant::W8A16, GemmPath::Simt);
        assert!(matches!(
            validate_config(&big, &a16, Quant::W8A16, false, &limits()),
            Err(Error::Limit { .. })
        ));
    }

    #[test]
    fn weight_tensors_are_checked() {
        let dims = (2, [8, 12], DType::I8);
        let f32s = |shape: &'static [usize]| (shape, DType::F32);
        assert!(check_weight_tensors(dims, f32s(&[2, 8]), None).is_ok());
        assert!(check_weight_tensors(dims, f32s(&[2, 12]), Some(f32s(&[2, 12]))).is_ok());
        assert!(check_weight_tensors(dims, f32s(&[2, 7]), None).is_err());
        assert!(check_weight_tensors(dims, (&[2, 8], DType::F16), None).is_err());
        assert!(check_weight_tensors((2, [8, 12], DType::BF16), f32s(&[2, 8]), None).is_err());
        assert!(matches!(
            check_weight_tensors((2, [8, 10], DType::I8), f32s(&[2, 8]), None),
            Err(Error::Unsupported { .. })
        ));
        let nan = Tensor::f32(&[2], vec![1.0, f32::NAN]).unwrap();
        assert!(
            check_finite("w_scale", &nan)
                .unwrap_err()
                .to_string()
                .contains("w_scale")
        );
        assert_eq!(MAX_W8A8_K, 131071);
    }
}
