//! # SwiftGMM: grouped matmul for MoE experts
//!
//! `y[rows of g] = epilogue(x[rows of g] · W_g)` for every expert (group) g, where the rows of
//! `x [m_total, k]` are sorted by expert and `offsets [e + 1]` (or per-group counts) say where each
//! group starts. Weights are `[e, k, n]` ([`Layout::Kn`]) or `[e, n, k]` ([`Layout::Nk`], the
//! PyTorch `Linear` layout vLLM and SGLang store), in f32, f16 or bf16, accumulated in f32. The
//! epilogue is optionally SwiGLU (`n = 2i`: `y = silu(gate) * up`, gate = the first `i` weight
//! columns, up = the last `i`, as vLLM's and SGLang's `silu_and_mul`) and optionally a per-row
//! scale (the routing weight). Output f32, f16 or bf16.
//!
//! Each group takes one of two paths, chosen on the GPU from its row count: groups of at most
//! [`tiling::TileConfig::threshold`] rows take a GEMV-like kernel that streams the expert's
//! weights exactly once for all of its rows (16-byte vector loads, split-k reduced in workgroup
//! memory); larger groups take a tiled GEMM, on cooperative matrices (tensor cores, f16 operands
//! staged in workgroup memory, f32 accumulation) where the adapter has them, else on plain f32
//! FMA ([`GemmKernel`], [`gemm_path`]). A one-workgroup scheduling kernel turns the offsets
//! into per-path tile prefix sums and indirect dispatch sizes, and each path is one persistent
//! dispatch over a flat tile range (per weight shard), so offsets produced on the GPU by the router
//! are consumed without a host round trip.
//!
//! ```
//! use fusedops::gpu::Gpu;
//! use fusedops::ops::swiftgmm::{self, Groups, Options, Tiling};
//! use fusedops::tensor::{DType, Tensor};
//!
//! # fn main() -> fusedops::Result<()> {
//! let gpu = Gpu::new()?;
//! let (e, k, n) = (2, 8, 4);
//! let x = Tensor::from_f32(&[3, k], &vec![0.5; 3 * k], DType::BF16)?;
//! let w = Tensor::from_f32(&[e, k, n], &vec![0.25; e * k * n], DType::BF16)?;
//! // Expert 0 gets row 0, expert 1 rows 1 and 2.
//! let options = Options { tiling: Tiling::Defaults, ..Options::default() };
//! let y = swiftgmm::run(&gpu, &x, &Groups::Counts(vec![1, 2]), &w, None, &options)?;
//! assert_eq!(y.shape(), &[3, n]);
//! assert!(y.to_f32().iter().all(|&v| (v - 1.0).abs() < 1e-6));
//! # Ok(())
//! # }
//! ```
//!
//! For chaining (router → gate/up with SwiGLU → down with the row scale in one command buffer),
//! build a [`GmmPlan`] over device tensors with [`DeviceGroups`] and record it into a
//! [`Recorder`]. Offsets that live on the GPU cannot be validated on the host: the scheduler
//! repairs them instead (clamped to `[0, m_total]`, negative i32 values read as 0, made monotone by
//! a running max; counts are summed saturating at `m_total`), so bad offsets give wrong groups but
//! never an access outside x, y or the weights. Offsets given on the host are validated.

mod cases;
pub mod quant;
pub mod reference;
pub mod tiling;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use cases::{OPERATOR, SwiftGmmOperator};

use crate::check::Tolerance;
use crate::error::{Error, Result};
use crate::gpu::{Fragment, Gpu, Kernel, Recorder, grid};
use crate::tensor::{DType, DeviceTensor, Tensor, padded_size};
use tiling::{GemmPath, KernelLimits, ShapeKey, TileConfig};

const OP: &str = "swiftgmm";

const SCHEDULE: Kernel = Kernel {
    name: "swiftgmm_schedule",
    source: include_str!("../../../shaders/swiftgmm_schedule.wgsl"),
};
const MATMUL: Kernel = Kernel {
    name: "swiftgmm_matmul",
    source: include_str!("../../../shaders/swiftgmm_matmul.wgsl"),
};
const COOP: Kernel = Kernel {
    name: "swiftgmm_coop",
    source: include_str!("../../../shaders/swiftgmm_coop.wgsl"),
};

/// Weight layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `[e, k, n]`: each k row holds the n columns.
    #[default]
    Kn,
    /// `[e, n, k]`: each output column's k values are contiguous (PyTorch `Linear`, vLLM, SGLang).
    Nk,
}

impl Layout {
    /// The weight tensor shape for e experts.
    pub fn weight_shape(self, experts: usize, k: usize, n: usize) -> [usize; 3] {
        match self {
            Layout::Kn => [experts, k, n],
            Layout::Nk => [experts, n, k],
        }
    }

    /// (k, n) from the two inner weight dimensions.
    pub fn k_n(self, dims: [usize; 2]) -> (usize, usize) {
        match self {
            Layout::Kn => (dims[0], dims[1]),
            Layout::Nk => (dims[1], dims[0]),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::Kn => "kn",
            Layout::Nk => "nk",
        }
    }
}

/// Activation of the epilogue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    None,
    /// `n = 2i`: `y[:, j] = silu(acc[:, j]) * acc[:, i + j]`, output `[m_total, i]`.
    #[serde(rename = "swiglu")]
    SwiGlu,
}

/// Which path the groups take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Per group from its row count (the threshold of the tiling).
    #[default]
    Auto,
    /// Every group on the GEMV path (in row blocks of the GEMV configuration).
    Gemv,
    /// Every group on the tiled GEMM path.
    Gemm,
}

impl Mode {
    fn code(self) -> u32 {
        match self {
            Mode::Auto => 0,
            Mode::Gemv => 1,
            Mode::Gemm => 2,
        }
    }

    /// Whether the GEMV and the GEMM path are recorded.
    fn paths(self) -> (bool, bool) {
        match self {
            Mode::Auto => (true, true),
            Mode::Gemv => (true, false),
            Mode::Gemm => (false, true),
        }
    }
}

/// Where a plan's tile configuration comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tiling {
    /// The process's tiling cache (see [`tiling`]); the defaults when it has no entry.
    #[default]
    Cached,
    /// As `Cached`, but a missing entry is measured now and stored.
    Tune,
    /// The defaults for this adapter, ignoring the cache.
    Defaults,
    /// This configuration.
    Fixed(TileConfig),
}

/// The kernel of the GEMM path (the GEMV path for small groups is always plain WGSL: it is
/// bound by weight bandwidth).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmKernel {
    /// Cooperative matrices where the adapter has them (and `FUSEDOPS_DISABLE` does not switch
    /// them off), else SIMT.
    #[default]
    Auto,
    /// Plain f32 FMA on every adapter (f32 products of the inputs as stored).
    Simt,
    /// Cooperative matrices, or [`Error::Unsupported`] on an adapter without them.
    Coop,
}

/// What to compute and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    pub layout: Layout,
    pub activation: Activation,
    /// Output dtype for [`run`] (plans take the dtype of the output tensor they are given).
    pub out_dtype: DType,
    pub mode: Mode,
    pub tiling: Tiling,
    /// Cap on the workgroups of one path's dispatch (default: the device's per-dimension limit).
    /// The kernels are persistent: each workgroup loops over the tiles past the grid.
    pub max_workgroups: Option<u32>,
    /// The GEMM path's kernel.
    pub gemm_kernel: GemmKernel,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            layout: Layout::Kn,
            activation: Activation::None,
            out_dtype: DType::F32,
            mode: Mode::Auto,
            tiling: Tiling::Cached,
            max_workgroups: None,
            gemm_kernel: GemmKernel::Auto,
        }
    }
}

/// Why this device's GEMM path cannot run on cooperative matrices, or the fragment it uses.
pub fn coop_support(gpu: &Gpu) -> std::result::Result<Fragment, String> {
    let Some(fragment) = gpu.caps.coop_fragment() else {
        return Err(if gpu.caps.disabled.contains(&"coop") {
            "cooperative matrices switched off (FUSEDOPS_DISABLE=coop)".to_string()
        } else {
            "the adapter reports no f16 -> f32 cooperative-matrix fragment".to_string()
        });
    };
    if KernelLimits::of(gpu).subgroup_size == 0 {
        let (lo, hi) = gpu.caps.subgroup_size;
        return Err(format!(
            "the subgroup size is not fixed ({lo}..{hi}): fragments are assigned to subgroups by \
             invocation index"
        ));
    }
    Ok(fragment)
}

/// The GEMM path's kernel on this device under `kernel`: cooperative matrices with the adapter's
/// fragment size for [`GemmKernel::Auto`] where [`coop_support`] allows, else SIMT;
/// [`GemmKernel::Coop`] on a device without them is [`Error::Unsupported`].
pub fn gemm_path(gpu: &Gpu, kernel: GemmKernel) -> Result<GemmPath> {
    match (kernel, coop_support(gpu)) {
        (GemmKernel::Simt, _) | (GemmKernel::Auto, Err(_)) => Ok(GemmPath::Simt),
        (_, Ok(fragment)) => Ok(GemmPath::Coop(fragment)),
        (GemmKernel::Coop, Err(why)) => Err(Error::unsupported(
            OP,
            format!("the cooperative-matrix GEMM kernel: {why}"),
        )),
    }
}

/// Group boundaries on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Groups {
    /// `[e + 1]` row offsets: group g is rows `offsets[g] .. offsets[g + 1]`. Rows before
    /// `offsets[0]` and from `offsets[e]` on belong to no group (padding): they are not read, and
    /// their output rows are not written.
    Offsets(Vec<u32>),
    /// `[e]` rows per group, starting at row 0.
    Counts(Vec<u32>),
}

impl Groups {
    /// Number of groups (experts).
    pub fn experts(&self) -> usize {
        match self {
            Groups::Offsets(o) => o.len().saturating_sub(1),
            Groups::Counts(c) => c.len(),
        }
    }

    /// The validated offsets `[e + 1]` for `m_total` rows.
    pub fn offsets(&self, m_total: usize) -> Result<Vec<u32>> {
        let offsets = match self {
            Groups::Offsets(o) => o.clone(),
            Groups::Counts(c) => {
                let mut offsets = Vec::with_capacity(c.len() + 1);
                let mut sum = 0u64;
                offsets.push(0);
                for &count in c {
                    sum += count as u64;
                    if sum > m_total as u64 {
                        return Err(Error::invalid(
                            OP,
                            "group counts",
                            format!("they sum past m_total = {m_total}"),
                        ));
                    }
                    offsets.push(sum as u32);
                }
                offsets
            }
        };
        check_offsets(&offsets, self.experts(), m_total)?;
        Ok(offsets)
    }

    /// Groups from an i32 or u32 tensor of offsets `[e + 1]` (or counts `[e]`); negative values
    /// are an error.
    pub fn from_tensor(t: &Tensor, counts: bool) -> Result<Self> {
        let what = if counts { "counts" } else { "offsets" };
        if t.shape().len() != 1 {
            return Err(Error::shape(
                OP,
                what,
                t.shape(),
                "[e + 1] offsets or [e] counts",
            ));
        }
        if t.numel() < 1 + usize::from(!counts) {
            return Err(Error::shape(
                OP,
                what,
                t.shape(),
                if counts {
                    "[e] counts with e >= 1 (an empty list has no groups)"
                } else {
                    "[e + 1] offsets with e >= 1 (an empty list has no groups)"
                },
            ));
        }
        let values: Vec<u32> = match (t.as_i32(), t.as_u32()) {
            (Some(v), _) => v
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    u32::try_from(x).map_err(|_| {
                        Error::invalid(OP, format!("{what}[{i}]"), format!("{x} is negative"))
                    })
                })
                .collect::<Result<_>>()?,
            (_, Some(v)) => v.to_vec(),
            _ => {
                return Err(Error::unsupported(
                    OP,
                    format!("{what} dtype {}", t.dtype()),
                ));
            }
        };
        Ok(if counts {
            Groups::Counts(values)
        } else {
            Groups::Offsets(values)
        })
    }
}

/// Check host offsets: `[experts + 1]` entries, monotone, at most `m_total`.
pub fn check_offsets(offsets: &[u32], experts: usize, m_total: usize) -> Result<()> {
    if offsets.len() != experts + 1 || experts == 0 {
        return Err(Error::shape(
            OP,
            "group offsets",
            [offsets.len()],
            format!("[e + 1] = [{}] with e >= 1", experts + 1),
        ));
    }
    if let Some(g) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::invalid(
            OP,
            "group offsets",
            format!(
                "not monotone: offsets[{}] = {} > offsets[{}] = {}",
                g,
                offsets[g],
                g + 1,
                offsets[g + 1]
            ),
        ));
    }
    let last = offsets[experts] as usize;
    if last > m_total {
        return Err(Error::invalid(
            OP,
            "group offsets",
            format!("offsets[{experts}] = {last} is past m_total = {m_total}"),
        ));
    }
    Ok(())
}

/// Group boundaries on the GPU, i32 or u32 (e.g. the router's exclusive expert offsets).
#[derive(Clone, Copy, Debug)]
pub enum DeviceGroups<'a> {
    /// `[e + 1]` offsets.
    Offsets(&'a DeviceTensor),
    /// `[e]` counts, starting at row 0.
    Counts(&'a DeviceTensor),
}

impl DeviceGroups<'_> {
    fn tensor(&self) -> &DeviceTensor {
        match self {
            DeviceGroups::Offsets(t) | DeviceGroups::Counts(t) => t,
        }
    }
}

/// One buffer of consecutive experts' weights.
#[derive(Debug)]
pub struct WeightShard {
    /// First expert in this shard.
    pub first_expert: usize,
    /// `[experts in shard, a, b]`.
    pub tensor: DeviceTensor,
}

/// Expert weights on the GPU, split by whole experts into shards that each fit one storage
/// binding. Weights larger than one binding (1.76 GB of bf16 for pangu-pro-moe's gate/up, more
/// than lavapipe's 128 MiB or one binding on many GPUs) get one dispatch per shard and path; an
/// expert larger than a binding is refused with [`Error::Limit`].
#[derive(Debug)]
pub struct ExpertWeights {
    shards: Vec<WeightShard>,
    experts: usize,
    dims: [usize; 2],
    dtype: DType,
}

impl ExpertWeights {
    /// Upload `[e, a, b]` weights, split to fit the device's binding and buffer limits.
    pub fn upload(gpu: &Gpu, w: &Tensor) -> Result<Self> {
        let limit = gpu.caps.max_storage_binding.min(gpu.caps.max_buffer_size);
        Self::upload_split(gpu, w, limit)
    }

    /// Upload with shards of at most `max_shard_bytes` (padded) each.
    pub fn upload_split(gpu: &Gpu, w: &Tensor, max_shard_bytes: u64) -> Result<Self> {
        let (experts, dims) = weight_dims(w.shape())?;
        check_stored_weight_dtype(w.dtype())?;
        let expert_bytes = (dims[0] * dims[1] * w.dtype().size()) as u64;
        let per_shard = experts_per_shard(expert_bytes, experts, max_shard_bytes)?;
        let bytes = w.bytes();
        let mut shards = Vec::new();
        let mut first = 0;
        while first < experts {
            let count = per_shard.min(experts - first);
            let range = first * expert_bytes as usize..(first + count) * expert_bytes as usize;
            let buffer = gpu.storage_buffer_with("swiftgmm weights", &bytes[range])?;
            shards.push(WeightShard {
                first_expert: first,
                tensor: DeviceTensor::from_parts(buffer, &[count, dims[0], dims[1]], w.dtype())?,
            });
            first += count;
        }
        Ok(ExpertWeights {
            shards,
            experts,
            dims,
            dtype: w.dtype(),
        })
    }

    /// Weights already on the GPU in one tensor `[e, a, b]` (it must fit one binding).
    pub fn from_device(tensor: DeviceTensor) -> Result<Self> {
        Self::from_shards(vec![tensor])
    }

    /// Weights already on the GPU in shards of consecutive experts, `[e_s, a, b]` each.
    pub fn from_shards(tensors: Vec<DeviceTensor>) -> Result<Self> {
        let Some(first) = tensors.first() else {
            return Err(Error::invalid(OP, "weight shards", "none given"));
        };
        let (_, dims) = weight_dims(first.shape())?;
        let dtype = first.dtype();
        check_stored_weight_dtype(dtype)?;
        let mut shards = Vec::new();
        let mut experts = 0;
        for tensor in tensors {
            let (count, d) = weight_dims(tensor.shape())?;
            if d != dims || tensor.dtype() != dtype {
                return Err(Error::shape(
                    OP,
                    "weight shard",
                    (tensor.shape(), tensor.dtype()),
                    format!("[_, {}, {}] {dtype} like the first shard", dims[0], dims[1]),
                ));
            }
            shards.push(WeightShard {
                first_expert: experts,
                tensor,
            });
            experts += count;
        }
        Ok(ExpertWeights {
            shards,
            experts,
            dims,
            dtype,
        })
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// The two inner dimensions `[a, b]` (`[k, n]` or `[n, k]` by layout).
    pub fn dims(&self) -> [usize; 2] {
        self.dims
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shards(&self) -> &[WeightShard] {
        &self.shards
    }

    /// Expert range `[first, end)` of each shard.
    fn ranges(&self) -> impl Iterator<Item = (usize, usize, &WeightShard)> {
        self.shards
            .iter()
            .map(|s| (s.first_expert, s.first_expert + s.tensor.shape()[0], s))
    }
}

fn weight_dims(shape: &[usize]) -> Result<(usize, [usize; 2])> {
    match *shape {
        [e, a, b] if e > 0 && a > 0 && b > 0 => Ok((e, [a, b])),
        _ => Err(Error::shape(
            OP,
            "weights",
            shape,
            "[e, k, n] or [e, n, k], all dimensions >= 1",
        )),
    }
}

/// The 16-bit and f32 kernels take float weights; int8 weights need their scales
/// ([`quant`]).
fn check_weight_dtype(dtype: DType) -> Result<()> {
    match dtype {
        _ if dtype.is_float() => Ok(()),
        DType::I8 => Err(Error::unsupported(
            OP,
            "weights of dtype i8 without scales (int8 weights: swiftgmm::quant, W8A16 or W8A8)",
        )),
        _ => Err(Error::unsupported(OP, format!("weight dtype {dtype}"))),
    }
}

/// What [`ExpertWeights`] holds: float weights, or int8 ones for [`quant`].
fn check_stored_weight_dtype(dtype: DType) -> Result<()> {
    if dtype.is_float() || dtype == DType::I8 {
        Ok(())
    } else {
        Err(Error::unsupported(OP, format!("weight dtype {dtype}")))
    }
}

/// How many experts go in one shard of at most `max_bytes` (padded).
fn experts_per_shard(expert_bytes: u64, experts: usize, max_bytes: u64) -> Result<usize> {
    if padded_size(expert_bytes) > max_bytes {
        return Err(Error::Limit {
            what: "one expert's weights in a storage binding".into(),
            need: expert_bytes,
            max: max_bytes,
        });
    }
    let mut count = (max_bytes / expert_bytes.max(1)).min(experts as u64) as usize;
    while count > 1 && padded_size(count as u64 * expert_bytes) > max_bytes {
        count -= 1;
    }
    Ok(count.max(1))
}

/// The device tensors of one grouped matmul.
#[derive(Clone, Copy, Debug)]
pub struct GmmArgs<'a> {
    /// `[m_total, k]`, f32 | f16 | bf16, rows sorted by group.
    pub x: &'a DeviceTensor,
    pub groups: DeviceGroups<'a>,
    pub weights: &'a ExpertWeights,
    /// `[m_total]` f32, multiplies each output row (after the activation).
    pub row_scale: Option<&'a DeviceTensor>,
    /// `[m_total, n_out]`, f32 | f16 | bf16 (16-bit outputs need an even n_out). Rows outside
    /// every group are left as they are.
    pub y: &'a DeviceTensor,
    /// The same offsets on the host, when the caller has them: they are validated, the path no
    /// group takes is not recorded, and the tiling bucket uses the real row count.
    pub host_offsets: Option<&'a [u32]>,
}

/// Shapes and dtypes of a validated problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Problem {
    m_total: usize,
    k: usize,
    n: usize,
    n_out: usize,
    experts: usize,
    x_dtype: DType,
    w_dtype: DType,
    out_dtype: DType,
    layout: Layout,
    swiglu: bool,
}

/// A tensor's shape and dtype, host or device.
struct Desc<'a> {
    shape: &'a [usize],
    dtype: DType,
}

impl Problem {
    /// Validate shapes and dtypes; `y` None means the output will be allocated with
    /// `options.out_dtype`.
    fn check(
        x: Desc,
        weights: (usize, [usize; 2], DType),
        groups: (Desc, bool),
        row_scale: Option<Desc>,
        y: Option<Desc>,
        options: &Options,
    ) -> Result<Self> {
        if !x.dtype.is_float() {
            return Err(Error::unsupported(
                OP,
                format!(
                    "x dtype {} (int8 x with int8 weights: swiftgmm::quant)",
                    x.dtype
                ),
            ));
        }
        check_weight_dtype(weights.2)?;
        Self::check_shapes(x, weights, groups, row_scale, y, options)
    }

    /// The shape checks of [`Problem::check`], whatever the dtypes of x and the weights (the
    /// int8 plans check those themselves).
    fn check_shapes(
        x: Desc,
        weights: (usize, [usize; 2], DType),
        groups: (Desc, bool),
        row_scale: Option<Desc>,
        y: Option<Desc>,
        options: &Options,
    ) -> Result<Self> {
        let (m_total, k) = match *x.shape {
            [m, k] if k > 0 => (m, k),
            _ => return Err(Error::shape(OP, "x", x.shape, "[m_total, k] with k >= 1")),
        };
        let (experts, dims, w_dtype) = weights;
        let (wk, n) = options.layout.k_n(dims);
        if wk != k {
            let expected = match options.layout {
                Layout::Kn => format!("[e, k = {k}, n]"),
                Layout::Nk => format!("[e, n, k = {k}]"),
            };
            return Err(Error::shape(
                OP,
                "weights",
                [experts, dims[0], dims[1]],
                expected,
            ));
        }
        let swiglu = options.activation == Activation::SwiGlu;
        if swiglu && n % 2 != 0 {
            return Err(Error::invalid(
                OP,
                "n",
                format!("SwiGLU needs an even n (gate and up halves), got {n}"),
            ));
        }
        let n_out = if swiglu { n / 2 } else { n };
        let (groups, counts) = groups;
        let expected_len = if counts { experts } else { experts + 1 };
        if groups.shape != [expected_len] {
            return Err(Error::shape(
                OP,
                if counts {
                    "group counts"
                } else {
                    "group offsets"
                },
                groups.shape,
                format!("[{expected_len}] for e = {experts} experts"),
            ));
        }
        if !matches!(groups.dtype, DType::I32 | DType::U32) {
            return Err(Error::unsupported(
                OP,
                format!("group offsets dtype {} (use i32 or u32)", groups.dtype),
            ));
        }
        if let Some(s) = row_scale {
            if s.shape != [m_total] || s.dtype != DType::F32 {
                return Err(Error::shape(
                    OP,
                    "row_scale",
                    (s.shape, s.dtype),
                    format!("[{m_total}] f32"),
                ));
            }
        }
        let out_dtype = match y {
            Some(y) => {
                if y.shape != [m_total, n_out] {
                    return Err(Error::shape(
                        OP,
                        "y",
                        y.shape,
                        format!("[{m_total}, {n_out}]"),
                    ));
                }
                y.dtype
            }
            None => options.out_dtype,
        };
        if !out_dtype.is_float() {
            return Err(Error::unsupported(OP, format!("output dtype {out_dtype}")));
        }
        Ok(Problem {
            m_total,
            k,
            n,
            n_out,
            experts,
            x_dtype: x.dtype,
            w_dtype,
            out_dtype,
            layout: options.layout,
            swiglu,
        })
    }

    fn key(&self, host_offsets: Option<&[u32]>, gemm: GemmPath) -> ShapeKey {
        let routed = match host_offsets {
            Some(o) => (o[self.experts] - o[0]) as usize,
            None => self.m_total,
        };
        ShapeKey {
            x_dtype: self.x_dtype,
            w_dtype: self.w_dtype,
            layout: self.layout,
            k: self.k as u32,
            n: self.n as u32,
            rows_bucket: tiling::rows_bucket(routed, self.experts),
            gemm,
        }
    }

    /// Override constants shared by every matmul entry point (SIMT and cooperative-matrix).
    fn constants(&self, has_scale: bool) -> Vec<(&'static str, f64)> {
        let epv = tiling::elements_per_vector(self.w_dtype) as usize;
        let contiguous = match self.layout {
            Layout::Kn => self.n,
            Layout::Nk => self.k,
        };
        // [e, k, n] SwiGLU also starts vectors at column n_out (the up half).
        let w_aligned = contiguous.is_multiple_of(epv)
            && (self.layout == Layout::Nk || !self.swiglu || self.n_out.is_multiple_of(epv));
        vec![
            ("X_DTYPE", self.x_dtype.shader_code() as f64),
            ("W_DTYPE", self.w_dtype.shader_code() as f64),
            ("OUT_DTYPE", self.out_dtype.shader_code() as f64),
            ("W_EPV", epv as f64),
            ("W_ALIGNED", flag(w_aligned)),
            ("W_KN", flag(self.layout == Layout::Kn)),
            ("SWIGLU", flag(self.swiglu)),
            ("HAS_SCALE", flag(has_scale)),
        ]
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

impl Problem {
    /// The cooperative-matrix GEMM kernel (`coop_gemm`, or `coop_expert` for the per-expert
    /// baseline) with tiles `coop` at `fragment`, plus `extra` override constants (int8 weights'
    /// `HAS_OFFSET`).
    fn coop_pipeline(
        &self,
        gpu: &Gpu,
        (coop, fragment): (&tiling::CoopGemmConfig, Fragment),
        has_scale: bool,
        extra: &[(&'static str, f64)],
        per_expert: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let subgroup = KernelLimits::of(gpu).subgroup_size;
        let geo = coop.geometry(fragment, subgroup, self.layout, self.x_dtype, self.w_dtype);
        let x_epv = tiling::elements_per_vector(self.x_dtype) as usize;
        let mut c = self.constants(has_scale);
        c.extend([
            ("X_EPV", x_epv as f64),
            ("X_ALIGNED", flag(self.k.is_multiple_of(x_epv))),
            ("SG", subgroup as f64),
            ("SG_M", coop.sg_m as f64),
            ("SG_N", coop.sg_n as f64),
            ("FM", coop.frag_m as f64),
            ("FN", coop.frag_n as f64),
            ("KF", coop.k_frags as f64),
            ("COOP_WG", geo.workgroup as f64),
        ]);
        c.extend_from_slice(extra);
        let entry = if per_expert {
            "coop_expert"
        } else {
            "coop_gemm"
        };
        gpu.coop_pipeline(&COOP, fragment, entry, &c)
    }
}

/// Refuse a binding past the device limit, or too large for the kernels' 32-bit indices.
fn check_binding(gpu: &Gpu, what: &str, buffer: &wgpu::Buffer) -> Result<()> {
    let bytes = buffer.size();
    gpu.check_binding(what, bytes)?;
    if bytes > u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{what} with 32-bit element indices"),
            need: bytes,
            max: u32::MAX as u64,
        });
    }
    Ok(())
}

/// Params of the matmul kernels (`GmmParams` in swiftgmm_matmul.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct GmmParams {
    m_total: u32,   // rows of x [m_total, k] and y [m_total, n_out]
    k: u32,         // reduction length
    n: u32,         // weight columns: w [e, k, n] or [e, n, k]
    n_out: u32,     // output columns: n, or n / 2 with SwiGLU
    experts: u32,   // e: sched holds offsets [e + 1] and a tile prefix [e + 1] per path
    expert_lo: u32, // first expert of the bound weight shard
    expert_hi: u32, // one past the last expert of the shard
    n_tiles: u32,   // column tiles per row block of this path
    row_start: u32, // gemm_expert: first row of the expert
    row_end: u32,   // gemm_expert: one past its last row
    group: u32,     // gemm_expert: the expert
    _pad: u32,      // keeps the size a multiple of 16 bytes
}

/// Params of the scheduler (`ScheduleParams` in swiftgmm_schedule.wgsl); the threshold, row
/// block sizes and mode are its override constants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
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

/// One path's pipeline and a bind group per weight shard.
struct PathDispatch {
    pipeline: Arc<wgpu::ComputePipeline>,
    binds: Vec<wgpu::BindGroup>,
    /// Byte offset of this path's (x, y, z) within a shard's 24 bytes of dispatch arguments.
    args_offset: u64,
}

/// Bytes of indirect dispatch arguments per weight shard (GEMV then GEMM, 3 u32 each).
const ARGS_PER_SHARD: u64 = 24;

/// A grouped matmul ready to record: pipelines compiled, buffers and bind groups made. Record it
/// as often as needed; each recording reads the group offsets as they are on the GPU then.
pub struct GmmPlan {
    schedule: Arc<wgpu::ComputePipeline>,
    schedule_bind: wgpu::BindGroup,
    paths: Vec<PathDispatch>,
    args: wgpu::Buffer,
    sched: wgpu::Buffer,
    experts: usize,
    config: TileConfig,
    gemm: GemmPath,
    /// The mode asked for (the scheduler decides per group from it and the threshold).
    mode: Mode,
    variant: String,
}

/// The schedule the GPU built in the last run of a plan (see [`GmmPlan::read_schedule`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The offsets as the kernels used them (device offsets repaired, see the module docs).
    pub offsets: Vec<u32>,
    /// Tiles of each group on the GEMV path (0 when the group took the other path or is empty).
    pub gemv_tiles: Vec<u32>,
    /// Tiles of each group on the GEMM path.
    pub gemm_tiles: Vec<u32>,
}

impl std::fmt::Debug for GmmPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmmPlan")
            .field("variant", &self.variant)
            .finish_non_exhaustive()
    }
}

/// A validated problem with its tiling, shared by the plan and the baseline.
struct Validated<'a> {
    problem: Problem,
    config: TileConfig,
    /// The GEMM path's kernel.
    gemm: GemmPath,
    args: &'a GmmArgs<'a>,
}

impl<'a> Validated<'a> {
    fn new(gpu: &Gpu, args: &'a GmmArgs<'a>, options: &Options) -> Result<Self> {
        let w = args.weights;
        let counts = matches!(args.groups, DeviceGroups::Counts(_));
        let groups = args.groups.tensor();
        let problem = Problem::check(
            Desc {
                shape: args.x.shape(),
                dtype: args.x.dtype(),
            },
            (w.experts(), w.dims(), w.dtype()),
            (
                Desc {
                    shape: groups.shape(),
                    dtype: groups.dtype(),
                },
                counts,
            ),
            args.row_scale.map(|s| Desc {
                shape: s.shape(),
                dtype: s.dtype(),
            }),
            Some(Desc {
                shape: args.y.shape(),
                dtype: args.y.dtype(),
            }),
            options,
        )?;
        if let Some(offsets) = args.host_offsets {
            check_offsets(offsets, problem.experts, problem.m_total)?;
        }
        check_binding(gpu, "x", args.x.buffer())?;
        check_binding(gpu, "y", args.y.buffer())?;
        check_binding(gpu, "group offsets", groups.buffer())?;
        if let Some(s) = args.row_scale {
            check_binding(gpu, "row_scale", s.buffer())?;
        }
        for shard in w.shards() {
            check_binding(gpu, "weight shard", shard.tensor.buffer())?;
        }
        let gemm = gemm_path(gpu, options.gemm_kernel)?;
        let key = problem.key(args.host_offsets, gemm);
        let config = tiling::resolve(gpu, &key, &options.tiling, problem.swiglu)?;
        Ok(Validated {
            problem,
            config,
            gemm,
            args,
        })
    }

    /// Override constants of the SIMT kernels (GEMV and GEMM).
    fn simt_constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = self.problem.constants(self.args.row_scale.is_some());
        // x is read in quads of 4 elements.
        c.push(("X_ALIGNED", flag(self.problem.k.is_multiple_of(4))));
        c
    }

    /// The GEMM path's kernel, entry points (persistent, per expert) and override constants.
    fn gemm_pipeline(&self, gpu: &Gpu, per_expert: bool) -> Result<Arc<wgpu::ComputePipeline>> {
        let p = &self.problem;
        match self.gemm {
            GemmPath::Simt => {
                let g = &self.config.gemm;
                let mut c = self.simt_constants();
                c.extend([
                    ("TM", g.tm as f64),
                    ("TN", g.tn as f64),
                    ("TK", g.tk as f64),
                    ("RM", g.rm as f64),
                    ("RN", g.rn as f64),
                    ("GEMM_WG", g.workgroup() as f64),
                ]);
                let entry = if per_expert { "gemm_expert" } else { "gemm" };
                gpu.pipeline(&MATMUL, entry, &c)
            }
            GemmPath::Coop(fragment) => p.coop_pipeline(
                gpu,
                (&self.config.coop, fragment),
                self.args.row_scale.is_some(),
                &[],
                per_expert,
            ),
        }
    }

    /// Rows per GEMM tile.
    fn gemm_rows(&self) -> u32 {
        match self.gemm {
            GemmPath::Simt => self.config.gemm.tm,
            GemmPath::Coop(f) => self.config.coop.sg_m * self.config.coop.frag_m * f.size(),
        }
    }

    fn gemm_n_tiles(&self) -> u32 {
        let swiglu = self.problem.swiglu;
        let out_cols = match self.gemm {
            GemmPath::Simt => self.config.gemm.out_cols(swiglu),
            GemmPath::Coop(f) => {
                let bn = self.config.coop.sg_n * self.config.coop.frag_n * f.size();
                if swiglu { bn / 2 } else { bn }
            }
        };
        (self.problem.n_out as u32).div_ceil(out_cols)
    }

    fn params(&self, lo: usize, hi: usize, n_tiles: u32) -> GmmParams {
        let p = &self.problem;
        GmmParams {
            m_total: p.m_total as u32,
            k: p.k as u32,
            n: p.n as u32,
            n_out: p.n_out as u32,
            experts: p.experts as u32,
            expert_lo: lo as u32,
            expert_hi: hi as u32,
            n_tiles,
            ..GmmParams::default()
        }
    }

    /// A 16-byte stand-in for an absent optional binding.
    fn placeholder(gpu: &Gpu) -> Result<wgpu::Buffer> {
        gpu.storage_buffer("swiftgmm placeholder", 16)
    }

    /// The cooperative-matrix kernel's int8-weight bindings (scales, offsets; see
    /// [`quant`]), unused with float weights.
    fn int8_placeholders(placeholder: &wgpu::Buffer) -> [wgpu::BindingResource<'_>; 2] {
        [
            placeholder.as_entire_binding(),
            placeholder.as_entire_binding(),
        ]
    }
}

/// The mode a plan records: with the offsets on the host, the path no group takes is left out
/// (and the scheduler made to agree); with a threshold of 0 no group takes the GEMV path.
fn effective_mode(mode: Mode, host_offsets: Option<&[u32]>, threshold: u32) -> Mode {
    match (mode, host_offsets) {
        (Mode::Auto, Some(offsets)) => {
            let rows = offsets.windows(2).map(|w| w[1] - w[0]).filter(|&r| r > 0);
            let (mut small, mut large) = (false, false);
            for r in rows {
                if r <= threshold {
                    small = true;
                } else {
                    large = true;
                }
            }
            match (small, large) {
                (true, false) => Mode::Gemv,
                (false, true) => Mode::Gemm,
                _ => Mode::Auto,
            }
        }
        (Mode::Auto, None) if threshold == 0 => Mode::Gemm,
        (mode, _) => mode,
    }
}

/// What a plan reports and keeps besides its dispatches.
struct PlanInfo<'a> {
    /// Prefixes the variant (e.g. `w8a8 `).
    kind: &'a str,
    layout: Layout,
    config: TileConfig,
    gemm: GemmPath,
    /// The mode asked for (the scheduler decides per group from it and the threshold).
    asked: Mode,
    /// The paths recorded.
    recorded: Mode,
    shards: usize,
}

/// Byte offsets of the GEMV and GEMM paths' (x, y, z) within a shard's dispatch arguments.
const GEMV_ARGS: u64 = 0;
const GEMM_ARGS: u64 = 12;

/// The scheduling kernel of a plan (swiftgmm_schedule.wgsl) with the schedule and the indirect
/// dispatch arguments it writes; shared by the 16-bit and the int8 plans.
struct Scheduler {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind: wgpu::BindGroup,
    sched: wgpu::Buffer,
    args: wgpu::Buffer,
    experts: usize,
}

impl Scheduler {
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &Gpu,
        weights: &ExpertWeights,
        groups: DeviceGroups,
        (experts, m_total): (usize, usize),
        config: &TileConfig,
        (mode, gemm_rows): (Mode, u32),
        (gemv_n_tiles, gemm_n_tiles): (u32, u32),
        max_workgroups: Option<u32>,
    ) -> Result<Self> {
        let shards = weights.shards().len();
        let sched_bytes = 3 * (experts as u64 + 1) * 4;
        gpu.check_binding("swiftgmm schedule", sched_bytes)?;
        let sched = gpu.storage_buffer("swiftgmm schedule", sched_bytes)?;
        let args = gpu.checked(|| {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("swiftgmm dispatch args"),
                size: padded_size(ARGS_PER_SHARD * shards as u64),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::INDIRECT,
                mapped_at_creation: false,
            })
        })?;
        let mut bounds: Vec<u32> = weights.ranges().map(|(lo, _, _)| lo as u32).collect();
        bounds.push(experts as u32);
        let shard_bounds =
            gpu.storage_buffer_with("swiftgmm shard bounds", bytemuck::cast_slice(&bounds))?;
        let input = groups.tensor();
        let params = gpu.uniform(&ScheduleParams {
            experts: experts as u32,
            m_total: m_total as u32,
            counts: matches!(groups, DeviceGroups::Counts(_)) as u32,
            signed_input: (input.dtype() == DType::I32) as u32,
            gemv_n_tiles,
            gemm_n_tiles,
            shards: shards as u32,
            max_workgroups: max_workgroups
                .unwrap_or(u32::MAX)
                .clamp(1, gpu.caps.max_workgroups_per_dim.min(65535)),
        })?;
        let pipeline = gpu.pipeline(
            &SCHEDULE,
            "schedule",
            &[
                ("THRESHOLD", config.threshold as f64),
                ("GEMV_ROWS", config.gemv.rows as f64),
                ("GEMM_TM", gemm_rows as f64),
                ("MODE", mode.code() as f64),
            ],
        )?;
        let bind = gpu.bind_group(
            &pipeline,
            &[
                params.as_entire_binding(),
                input.binding(),
                shard_bounds.as_entire_binding(),
                sched.as_entire_binding(),
                args.as_entire_binding(),
            ],
        )?;
        Ok(Scheduler {
            pipeline,
            bind,
            sched,
            args,
            experts,
        })
    }
}

impl GmmPlan {
    /// Validate everything, choose the tiling and build the dispatches. Nothing is recorded or
    /// dispatched here; an error leaves every tensor untouched.
    pub fn new(gpu: &Gpu, args: &GmmArgs, options: &Options) -> Result<Self> {
        let prep = Validated::new(gpu, args, options)?;
        let p = prep.problem;
        let config = prep.config;
        let gemv_geo = config.gemv.geometry(p.layout, p.w_dtype, p.swiglu);
        let gemv_n_tiles = (p.n_out as u32).div_ceil(gemv_geo.out_cols);
        let gemm_n_tiles = prep.gemm_n_tiles();

        let mode = effective_mode(options.mode, args.host_offsets, config.threshold);
        let scheduler = Scheduler::new(
            gpu,
            args.weights,
            args.groups,
            (p.experts, p.m_total),
            &config,
            (mode, prep.gemm_rows()),
            (gemv_n_tiles, gemm_n_tiles),
            options.max_workgroups,
        )?;

        let weights = args.weights;
        let placeholder = Validated::placeholder(gpu)?;
        let scale = args
            .row_scale
            .map(|s| s.binding())
            .unwrap_or_else(|| placeholder.as_entire_binding());
        let bind_shards = |pipeline: &wgpu::ComputePipeline, n_tiles: u32, coop: bool| {
            weights
                .ranges()
                .map(|(lo, hi, shard)| {
                    let params = gpu.uniform(&prep.params(lo, hi, n_tiles))?;
                    let mut resources = vec![
                        params.as_entire_binding(),
                        args.x.binding(),
                        shard.tensor.binding(),
                        scheduler.sched.as_entire_binding(),
                        scale.clone(),
                        args.y.binding(),
                    ];
                    if coop {
                        resources.extend(Validated::int8_placeholders(&placeholder));
                    }
                    gpu.bind_group(pipeline, &resources)
                })
                .collect::<Result<Vec<_>>>()
        };
        let (use_gemv, use_gemm) = mode.paths();
        let mut paths = Vec::new();
        if use_gemv {
            let g = &config.gemv;
            let mut constants = prep.simt_constants();
            constants.extend([
                ("GEMV_WG", g.workgroup as f64),
                ("GEMV_ROWS", g.rows as f64),
                ("GEMV_SPLIT_K", g.split_k as f64),
                ("GEMV_UNROLL", g.unroll as f64),
                ("GEMV_XC", gemv_geo.x_chunk as f64),
                ("GEMV_NBW", gemv_geo.weight_cols as f64),
                ("GEMV_RED", gemv_geo.scratch as f64),
            ]);
            let entry = match p.layout {
                Layout::Nk => "gemv_nk",
                Layout::Kn => "gemv_kn",
            };
            let pipeline = gpu.pipeline(&MATMUL, entry, &constants)?;
            let binds = bind_shards(&pipeline, gemv_n_tiles, false)?;
            paths.push(PathDispatch {
                pipeline,
                binds,
                args_offset: GEMV_ARGS,
            });
        }
        if use_gemm {
            let pipeline = prep.gemm_pipeline(gpu, false)?;
            let coop = matches!(prep.gemm, GemmPath::Coop(_));
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
                kind: "",
                layout: p.layout,
                config,
                gemm: prep.gemm,
                asked: options.mode,
                recorded: mode,
                shards: weights.shards().len(),
            },
        ))
    }

    /// A plan from its scheduler and path dispatches.
    fn assemble(scheduler: Scheduler, paths: Vec<PathDispatch>, info: PlanInfo) -> Self {
        let shards = info.shards;
        let path_names = match info.recorded.paths() {
            (true, true) => "gemv+gemm",
            (true, false) => "gemv",
            _ => "gemm",
        };
        let variant = format!(
            "{}{path_names} {} [{}]{}",
            info.kind,
            info.layout.name(),
            info.config.describe(info.gemm),
            if shards > 1 {
                format!(", {shards} weight shards")
            } else {
                String::new()
            }
        );
        GmmPlan {
            schedule: scheduler.pipeline,
            schedule_bind: scheduler.bind,
            paths,
            args: scheduler.args,
            sched: scheduler.sched,
            experts: scheduler.experts,
            config: info.config,
            gemm: info.gemm,
            mode: info.asked,
            variant,
        }
    }

    /// Record the scheduler and the dispatches of each path into one compute pass.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.record_as(rec, OP)
    }

    /// [`GmmPlan::record`] with the compute pass named `label` (per-step timing of a chain).
    pub fn record_as(&self, rec: &mut Recorder, label: &str) -> Result<()> {
        let mut pass = rec.compute_pass(label);
        pass.set_pipeline(&self.schedule);
        pass.set_bind_group(0, &self.schedule_bind, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        for path in &self.paths {
            pass.set_pipeline(&path.pipeline);
            for (s, bind) in path.binds.iter().enumerate() {
                pass.set_bind_group(0, bind, &[]);
                pass.dispatch_workgroups_indirect(
                    &self.args,
                    s as u64 * ARGS_PER_SHARD + path.args_offset,
                );
            }
        }
        Ok(())
    }

    /// Read back the schedule of the last run: which path each group took, and the offsets the
    /// kernels used. For diagnostics and tests; it waits for the GPU.
    pub fn read_schedule(&self, gpu: &Gpu) -> Result<Schedule> {
        let len = self.experts + 1;
        let bytes = gpu.read_bytes(&self.sched, 3 * len as u64 * 4)?;
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let tiles = |prefix: &[u32]| prefix.windows(2).map(|w| w[1] - w[0]).collect();
        Ok(Schedule {
            offsets: words[..len].to_vec(),
            gemv_tiles: tiles(&words[len..2 * len]),
            gemm_tiles: tiles(&words[2 * len..]),
        })
    }

    /// The tile configuration in use.
    pub fn config(&self) -> &TileConfig {
        &self.config
    }

    /// The GEMM path's kernel.
    pub fn gemm_path(&self) -> GemmPath {
        self.gemm
    }

    /// For each group of these (valid) offsets, whether it runs on cooperative matrices, which
    /// stage its x rows and weights in f16 ([`reference::stage_f16`]): the groups on the GEMM
    /// path when its kernel is cooperative-matrix.
    pub fn coop_groups(&self, offsets: &[u32]) -> Vec<bool> {
        offsets
            .windows(2)
            .map(|w| {
                let rows = w[1].saturating_sub(w[0]);
                let gemm = match self.mode {
                    Mode::Auto => rows > self.config.threshold,
                    Mode::Gemv => false,
                    Mode::Gemm => rows > 0,
                };
                gemm && matches!(self.gemm, GemmPath::Coop(_))
            })
            .collect()
    }

    /// Which paths are recorded and with which tiles, for reports.
    pub fn variant(&self) -> &str {
        &self.variant
    }
}

/// The baseline SwiftGMM is compared with: the same math as one dispatch per expert with the
/// tiled GEMM kernel of the same GEMM path (SIMT or cooperative-matrix), rows taken from host
/// offsets.
pub struct PerExpertBaseline {
    pipeline: Arc<wgpu::ComputePipeline>,
    dispatches: Vec<(wgpu::BindGroup, (u32, u32, u32))>,
    gemm: GemmPath,
}

impl PerExpertBaseline {
    /// Needs `args.host_offsets` (a per-expert loop is planned on the host).
    pub fn new(gpu: &Gpu, args: &GmmArgs, options: &Options) -> Result<Self> {
        let Some(offsets) = args.host_offsets else {
            return Err(Error::invalid(
                OP,
                "per-expert baseline",
                "needs the group offsets on the host",
            ));
        };
        let prep = Validated::new(gpu, args, options)?;
        let pipeline = prep.gemm_pipeline(gpu, true)?;
        let n_tiles = prep.gemm_n_tiles();
        let placeholder = Validated::placeholder(gpu)?;
        let scale = args
            .row_scale
            .map(|s| s.binding())
            .unwrap_or_else(|| placeholder.as_entire_binding());
        let mut dispatches = Vec::new();
        for (lo, hi, shard) in args.weights.ranges() {
            for g in lo..hi {
                let (start, end) = (offsets[g], offsets[g + 1]);
                if start == end {
                    continue;
                }
                let params = gpu.uniform(&GmmParams {
                    row_start: start,
                    row_end: end,
                    group: g as u32,
                    ..prep.params(lo, hi, n_tiles)
                })?;
                let mut resources = vec![
                    params.as_entire_binding(),
                    args.x.binding(),
                    shard.tensor.binding(),
                    placeholder.as_entire_binding(),
                    scale.clone(),
                    args.y.binding(),
                ];
                if matches!(prep.gemm, GemmPath::Coop(_)) {
                    resources.extend(Validated::int8_placeholders(&placeholder));
                }
                let bind = gpu.bind_group(&pipeline, &resources)?;
                let tiles = (end - start).div_ceil(prep.gemm_rows()) * n_tiles;
                dispatches.push((bind, grid(tiles, gpu.caps.max_workgroups_per_dim)));
            }
        }
        Ok(PerExpertBaseline {
            pipeline,
            dispatches,
            gemm: prep.gemm,
        })
    }

    /// One dispatch per non-empty expert, in one compute pass.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        let mut pass = rec.compute_pass("swiftgmm per-expert");
        pass.set_pipeline(&self.pipeline);
        for (bind, (x, y, z)) in &self.dispatches {
            pass.set_bind_group(0, bind, &[]);
            pass.dispatch_workgroups(*x, *y, *z);
        }
        Ok(())
    }

    /// Number of dispatches (non-empty experts).
    pub fn dispatches(&self) -> usize {
        self.dispatches.len()
    }

    /// As [`GmmPlan::coop_groups`]: every non-empty group when the GEMM kernel is
    /// cooperative-matrix.
    pub fn coop_groups(&self, offsets: &[u32]) -> Vec<bool> {
        let coop = matches!(self.gemm, GemmPath::Coop(_));
        offsets.windows(2).map(|w| coop && w[1] > w[0]).collect()
    }
}

/// Validate host tensors as [`GmmPlan::new`] would, returning the problem and the offsets.
fn check_host(
    x: &Tensor,
    groups: &Groups,
    w: &Tensor,
    row_scale: Option<&Tensor>,
    options: &Options,
) -> Result<(Problem, Vec<u32>)> {
    let (experts, dims) = weight_dims(w.shape())?;
    let counts = matches!(groups, Groups::Counts(_));
    let groups_len = [match groups {
        Groups::Offsets(o) => o.len(),
        Groups::Counts(c) => c.len(),
    }];
    let problem = Problem::check(
        Desc {
            shape: x.shape(),
            dtype: x.dtype(),
        },
        (experts, dims, w.dtype()),
        (
            Desc {
                shape: &groups_len,
                dtype: DType::U32,
            },
            counts,
        ),
        row_scale.map(|s| Desc {
            shape: s.shape(),
            dtype: s.dtype(),
        }),
        None,
        options,
    )?;
    let offsets = groups.offsets(problem.m_total)?;
    Ok((problem, offsets))
}

/// The output shape `[m_total, n_out]` for these inputs.
pub fn output_shape(
    x: &Tensor,
    groups: &Groups,
    w: &Tensor,
    options: &Options,
) -> Result<[usize; 2]> {
    let (p, _) = check_host(x, groups, w, None, options)?;
    Ok([p.m_total, p.n_out])
}

/// Validate, upload, run and read back: y `[m_total, n_out]` in `options.out_dtype`, rows
/// outside every group zero. Everything is checked before anything is uploaded.
pub fn run(
    gpu: &Gpu,
    x: &Tensor,
    groups: &Groups,
    w: &Tensor,
    row_scale: Option<&Tensor>,
    options: &Options,
) -> Result<Tensor> {
    let (p, offsets) = check_host(x, groups, w, row_scale, options)?;
    let x_dev = gpu.upload(x)?;
    let weights = ExpertWeights::upload(gpu, w)?;
    let scale_dev = row_scale.map(|s| gpu.upload(s)).transpose()?;
    let offsets_dev = gpu.upload(&Tensor::u32(&[p.experts + 1], offsets.clone())?)?;
    let y = gpu.zeros(&[p.m_total, p.n_out], p.out_dtype)?;
    let args = GmmArgs {
        x: &x_dev,
        groups: DeviceGroups::Offsets(&offsets_dev),
        weights: &weights,
        row_scale: scale_dev.as_ref(),
        y: &y,
        host_offsets: Some(&offsets),
    };
    let plan = GmmPlan::new(gpu, &args, options)?;
    gpu.run(|rec| plan.record(rec))?;
    gpu.download(&y)
}

/// Tolerance of the output against the f64 reference, by output dtype: abs-or-rel a little above
/// the output's rounding (f32 accumulation adds far less at these sizes), and the cosine
/// difference below 1e-5 as DeepGEMM's grouped GEMM tests.
pub fn tolerance(out_dtype: DType) -> Tolerance {
    match out_dtype {
        DType::BF16 => Tolerance::new(1e-2, 8e-3),
        DType::F16 => Tolerance::new(1e-3, 1e-3),
        _ => Tolerance::new(1e-4, 1e-4),
    }
    .with_cos_diff(1e-5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_structs_are_16_byte_multiples() {
        assert_eq!(std::mem::size_of::<GmmParams>(), 48);
        assert_eq!(std::mem::size_of::<ScheduleParams>(), 32);
        assert_eq!(std::mem::size_of::<GmmParams>() % 16, 0);
        assert_eq!(std::mem::align_of::<GmmParams>(), 4);
        assert_eq!(std::mem::align_of::<ScheduleParams>(), 4);
    }

    #[test]
    fn host_offsets_are_validated() {
        assert!(check_offsets(&[0, 2, 2, 5], 3, 5).is_ok());
        assert!(matches!(
            check_offsets(&[0, 3, 2, 5], 3, 5),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            check_offsets(&[0, 2, 2, 6], 3, 5),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            check_offsets(&[0, 2, 5], 3, 5),
            Err(Error::Shape { .. })
        ));
        assert_eq!(
            Groups::Counts(vec![2, 0, 3]).offsets(6).unwrap(),
            vec![0, 2, 2, 5]
        );
        assert!(Groups::Counts(vec![4, 3]).offsets(6).is_err());
    }

    #[test]
    fn shards_hold_whole_experts_within_the_limit() {
        assert_eq!(experts_per_shard(100, 10, 1000).unwrap(), 9, "padding");
        assert_eq!(experts_per_shard(96, 10, 1000).unwrap(), 10);
        assert_eq!(experts_per_shard(96, 3, 1 << 20).unwrap(), 3);
        assert!(matches!(
            experts_per_shard(2000, 1, 1000),
            Err(Error::Limit { .. })
        ));
    }
}
