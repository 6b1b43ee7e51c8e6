//! The cooperative-matrix (tensor-core) decode: `shaders/amla_decode_coop.wgsl`, its
//! configuration, the plan that runs it, and the emulation of its steps.
//!
//! S = q·Kᵀ over the 576 dims and O += P·V run on f16 x f16 -> f32 fragments of the size the
//! adapter reports (8x8 or 16x16), with the head block's query rows as the M dimension. q and P
//! must be 16-bit and the cache 16-bit or 8-bit: f32 q, an f32 cache or P in f32 keep the f32
//! SIMT kernel, which stays the fallback and the A/B baseline. The split-KV schedule, the
//! workspace layout of the partial results, the combine kernel, the NaN rule and P's rounding
//! are the SIMT path's (shaders/amla_shared.wgsl).
//!
//! Numerics, beyond the SIMT kernel's (docs/amla.md has the design and its arithmetic):
//! - q is divided by the power of two of its row's largest |q| and rounded to f16 (exact for f16
//!   and bf16 q); the power of two and softmax_scale·log2(e) scale S in f32.
//! - The cache is rounded to f16 while staged: exact for f16 and for bf16 within the f16 range;
//!   values beyond ±65504 **saturate** at ±65504 (they never become inf), and values below 2^-14
//!   in magnitude lose the bits an f16 subnormal cannot hold. An 8-bit row is decoded (codes
//!   times scales, in f32) and then rounded: [`exact_tolerances`] says what that costs.
//! - The reference max of a row moves only when a tile's max exceeds it by more than
//!   [`CoopConfig::lazy_binades`]; P = 2^(s - m_ref) (times AMLA's c_hat) then stays below
//!   2^(lazy + 0.5). O lives in accumulator fragments, which WGSL gives no per-element access,
//!   so a rescale is a round trip of the row fragment through workgroup memory: lazy moves make
//!   them rare. With a lazy threshold of 0 the rescale steps are the SIMT kernel's.

use half::f16;

use super::reference::{self, AmlaStats, Bounds, Emulation, POISONED, Part, RowState, U};
use super::schedule::{self, D_QK, D_V, TileConfig};
use super::{
    AmlaParams, AmlaPlan, AmlaShape, COMBINE, DECODE_COOP, DECODE_STORAGE_BUFFERS, KvFormat,
    NEXT_PLAN_ID, PPrecision, Rescale, dtype_code, quant,
};
use crate::check::Tolerance;
use crate::error::{Error, Result};
use crate::gpu::{Fragment, Gpu};
use crate::tensor::{DType, Tensor};

const OP: &str = "amla";

/// Largest head block: P^T of a tile is held in the 64 rope columns of the staged key tile.
pub const MAX_HEAD_BLOCK: u32 = 64;
/// Accumulator fragments per subgroup (`MAX_ACC` in the kernel): 16 fragments of 16x16 f32 are
/// 128 registers per lane of a 32-wide subgroup.
const MAX_ACCUMULATORS: u32 = 16;
/// Output column fragments per subgroup (`MAX_NCF` in the kernel).
const MAX_COLUMN_FRAGMENTS: u32 = 8;
/// f16 values per staged key row and per q16 row: 576 + 8 (the padding keeps 16-byte rows; the
/// q16 row holds its f32 factor's bytes there).
const ROW_HALVES: u32 = 584;
/// Key tile sizes tried, largest first.
const TILE_KEYS: [u32; 3] = [32, 16, 8];
/// Subgroup counts tried, smallest first (8 fills a 16x16 workgroup to 256 lanes on NVIDIA).
const SUBGROUPS: [u32; 4] = [8, 16, 32, 64];
/// Largest lazy threshold: P = 2^(s - m_ref) · c_hat <= 2^(lazy + 0.5) must stay an f16.
pub const MAX_LAZY_BINADES: u32 = 14;
/// The default lazy threshold (binades a row's max may rise above its reference before O is
/// rescaled): after the first tile random scores hardly ever rise that far, and P <= 2^8.5
/// keeps O far from AMLA's 1e10 guard.
pub const DEFAULT_LAZY_BINADES: u32 = 8;

/// The cooperative-matrix decode's configuration (all of it becomes WGSL override constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CoopConfig {
    /// Fragment size (an f16 x f16 -> f32 configuration the adapter reports).
    pub fragment: Fragment,
    /// Lanes per subgroup: the adapter's fixed subgroup size.
    pub subgroup_size: u32,
    /// Query rows per workgroup (a multiple of the fragment, at most [`MAX_HEAD_BLOCK`]).
    pub head_block: u32,
    /// Keys per tile.
    pub tile_keys: u32,
    /// Binades a row's max may rise above its reference max before O is rescaled (0: at every
    /// rise, as the SIMT kernel).
    pub lazy_binades: u32,
    /// Subgroups per workgroup.
    pub subgroups: u32,
    /// Subgroups sharing one S fragment (each takes 576 / k_split dims).
    pub k_split: u32,
    /// Workgroup memory of the decode entry point, in bytes.
    pub workgroup_bytes: u32,
}

impl CoopConfig {
    /// The configuration for `head_block` rows and `tile_keys` keys per tile on fragments of
    /// `fragment` with subgroups of `subgroup_size`; an error if they do not tile the kernel.
    pub fn new(
        fragment: Fragment,
        subgroup_size: u32,
        head_block: u32,
        tile_keys: u32,
        lazy_binades: u32,
    ) -> Result<Self> {
        let f = fragment.size();
        if !(1..=128).contains(&subgroup_size) || !subgroup_size.is_power_of_two() {
            return Err(Error::invalid(
                OP,
                "subgroup size",
                format!("{subgroup_size} (a power of two up to 128)"),
            ));
        }
        if !head_block.is_power_of_two() || head_block < f || head_block > MAX_HEAD_BLOCK {
            return Err(Error::invalid(
                OP,
                "coop head block",
                format!("{head_block} (a power of two from {f} to {MAX_HEAD_BLOCK})"),
            ));
        }
        if !TILE_KEYS.contains(&tile_keys) || !tile_keys.is_multiple_of(f) {
            return Err(Error::invalid(
                OP,
                "coop key tile",
                format!("{tile_keys} (one of {TILE_KEYS:?}, a multiple of {f})"),
            ));
        }
        if lazy_binades > MAX_LAZY_BINADES {
            return Err(Error::invalid(
                OP,
                "lazy_binades",
                format!("{lazy_binades} (at most {MAX_LAZY_BINADES}: P must stay an f16)"),
            ));
        }
        let row_frags = head_block / f;
        let s_frags = row_frags * (tile_keys / f);
        let chunks = D_QK as u32 / f;
        // The fewest subgroups whose accumulators fit and whose count splits the S fragments
        // evenly over the dims.
        let subgroups = SUBGROUPS.into_iter().find(|&n| {
            let columns = D_V as u32 / (n * f);
            (1..=MAX_COLUMN_FRAGMENTS).contains(&columns)
                && row_frags * columns <= MAX_ACCUMULATORS
                && n.is_multiple_of(s_frags)
                && chunks.is_multiple_of(n / s_frags)
        });
        let Some(subgroups) = subgroups else {
            return Err(Error::invalid(
                OP,
                "coop tiles",
                format!(
                    "head block {head_block} x {tile_keys}-key tiles on {} fragments: no subgroup \
                     count holds the accumulators and splits S evenly",
                    fragment.name()
                ),
            ));
        };
        // Key tile (f16) + S partials / O fragments in transit + row step, row factor, flags.
        let workgroup_bytes =
            tile_keys * ROW_HALVES * 2 + subgroups * f * f * 4 + 2 * head_block * 4 + row_frags * 4;
        Ok(CoopConfig {
            fragment,
            subgroup_size,
            head_block,
            tile_keys,
            lazy_binades,
            subgroups,
            k_split: subgroups / s_frags,
            workgroup_bytes,
        })
    }

    /// The configuration [`super::AmlaPlan::new`] takes for `shape` and `params` on `gpu`, or why
    /// the SIMT kernel runs instead.
    pub fn choose(
        gpu: &Gpu,
        shape: &AmlaShape,
        params: &AmlaParams,
    ) -> std::result::Result<CoopConfig, String> {
        let caps = &gpu.caps;
        CoopConfig::choose_for(
            caps.coop_fragment(),
            caps.fixed_subgroup_size(),
            caps.max_workgroup_storage,
            caps.max_invocations_per_workgroup,
            shape,
            params,
        )
    }

    /// [`CoopConfig::choose`] for a device described by its fragment, fixed subgroup size and
    /// limits (no GPU needed: the bench prepares its references for a target device).
    pub fn choose_for(
        fragment: Option<Fragment>,
        subgroup_size: Option<u32>,
        max_workgroup_bytes: u32,
        max_invocations: u32,
        shape: &AmlaShape,
        params: &AmlaParams,
    ) -> std::result::Result<CoopConfig, String> {
        let fragment = fragment.ok_or(
            "no f16 x f16 -> f32 cooperative-matrix fragments (adapter, or FUSEDOPS_DISABLE=coop)",
        )?;
        let subgroup_size = subgroup_size
            .ok_or("no fixed subgroup size (subgroups off, or the adapter varies it)")?;
        eligible(shape, params)?;
        let f = fragment.size();
        let head_block = (shape.rows().max(1).next_power_of_two() as u32).clamp(f, MAX_HEAD_BLOCK);
        TILE_KEYS
            .into_iter()
            .filter_map(|tn| {
                CoopConfig::new(
                    fragment,
                    subgroup_size,
                    head_block,
                    tn,
                    DEFAULT_LAZY_BINADES,
                )
                .ok()
            })
            .find(|c| {
                c.workgroup_bytes <= max_workgroup_bytes && c.workgroup_size() <= max_invocations
            })
            .ok_or_else(|| {
                format!(
                    "no configuration for head block {head_block} fits {max_workgroup_bytes} B of \
                     workgroup memory and {max_invocations} invocations"
                )
            })
    }

    /// Invocations per workgroup.
    pub fn workgroup_size(&self) -> u32 {
        self.subgroups * self.subgroup_size
    }

    /// Row fragments of the head block.
    pub fn row_fragments(&self) -> u32 {
        self.head_block / self.fragment.size()
    }

    /// Output column fragments each subgroup owns (of all rows of the head block).
    pub fn column_fragments(&self) -> u32 {
        D_V as u32 / (self.subgroups * self.fragment.size())
    }

    /// Head blocks per sequence for `rows` query rows.
    pub fn row_blocks(&self, rows: usize) -> usize {
        rows.div_ceil(self.head_block as usize)
    }

    /// An error unless this is what [`CoopConfig::new`] gives for its inputs (the fields are
    /// public; the kernel's arrays are sized for those configurations only).
    pub(crate) fn check(&self) -> Result<()> {
        let derived = CoopConfig::new(
            self.fragment,
            self.subgroup_size,
            self.head_block,
            self.tile_keys,
            self.lazy_binades,
        )?;
        if derived != *self {
            return Err(Error::invalid(
                OP,
                "coop config",
                format!("{self:?} is not what CoopConfig::new gives for its inputs ({derived:?})"),
            ));
        }
        Ok(())
    }

    /// The variant string of `fusedops check`/`bench`, e.g. `amla p=bf16 coop16x16 hb=64 tn=32
    /// lazy=8` (P as the plan resolves it for `kv_dtype`).
    pub fn variant(&self, params: &AmlaParams, kv_dtype: DType) -> String {
        format!(
            "{} p={} coop{} hb={} tn={} lazy={}",
            match params.rescale {
                Rescale::Amla => "amla",
                Rescale::Multiply => "multiply",
            },
            params.p_precision.resolve(kv_dtype).name(),
            self.fragment.name(),
            self.head_block,
            self.tile_keys,
            self.lazy_binades
        )
    }

    /// How `fusedops info` describes this configuration.
    pub fn describe(&self, max_workgroup_bytes: u32) -> String {
        format!(
            "cooperative matrices {f} (f16 x f16 -> f32), head block {hb} x {tn}-key tiles, {n} \
             subgroups of {sg} ({k} per S fragment), {b} B of {max} B workgroup memory; O round \
             trips through workgroup memory: one per row fragment of {fs} rows and tile in which \
             a row's max rises more than {lazy} binades above its reference",
            f = self.fragment.name(),
            hb = self.head_block,
            tn = self.tile_keys,
            n = self.subgroups,
            sg = self.subgroup_size,
            k = self.k_split,
            b = self.workgroup_bytes,
            max = max_workgroup_bytes,
            fs = self.fragment.size(),
            lazy = self.lazy_binades,
        )
    }
}

/// Whether the cooperative-matrix decode can run `shape` with `params`: 16-bit q (its f16
/// rounding after the row's power-of-two scaling is then exact), a 16-bit float cache (exact in
/// f16 within the f16 range) or an 8-bit one (decoded, then rounded to f16: see
/// [`exact_tolerances`]), and 16-bit P. The reason otherwise.
pub fn eligible(shape: &AmlaShape, params: &AmlaParams) -> std::result::Result<(), String> {
    let sixteen = |d: DType| matches!(d, DType::F16 | DType::BF16);
    if !sixteen(shape.q_dtype) {
        return Err(format!(
            "q is {} (the f32 SIMT kernel keeps it)",
            shape.q_dtype
        ));
    }
    if params.kv_format == KvFormat::Float && !sixteen(shape.kv_dtype) {
        return Err(format!(
            "the cache is {} (the f32 SIMT kernel keeps it)",
            shape.kv_dtype
        ));
    }
    if params.p_precision.resolve(shape.kv_dtype) == PPrecision::F32 {
        return Err("P in f32 (fragments multiply 16-bit P)".into());
    }
    Ok(())
}

/// What rounding a decoded 8-bit cache to f16 can do to the scores: for every q row and every
/// finite cache row, `score_abs` bounds Σ_d |q'_d k_d| (log2 units, q' = q · softmax_scale ·
/// log2 e) by Cauchy–Schwarz as max‖q'‖₂ · max‖k‖₂, and `score_l2` bounds ‖q' ⊙ k‖₂ as
/// max‖q'‖∞ · max‖k‖₂.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StagingBound {
    pub score_abs: f64,
    pub score_l2: f64,
}

impl StagingBound {
    /// The bound for `q` and the finite rows of `kv_cache` (NaN padding is skipped; rows holding
    /// a NaN or inf make their rows NaN anyway).
    pub fn of(q: &Tensor, kv_cache: &Tensor, params: &AmlaParams) -> StagingBound {
        let finite_norm = |row: &[f64]| -> Option<f64> {
            row.iter()
                .all(|v| v.is_finite())
                .then(|| row.iter().map(|v| v * v).sum::<f64>().sqrt())
        };
        let k_max = match kv_cache.as_u8() {
            Some(bytes) => bytes
                .chunks_exact(quant::ROW_BYTES)
                .filter_map(|r| finite_norm(&quant::decode_row(r, params.kv_format)))
                .fold(0.0, f64::max),
            None => kv_cache
                .to_f64()
                .chunks_exact(D_QK)
                .filter_map(finite_norm)
                .fold(0.0, f64::max),
        };
        let scale = params.scale_log2().abs() as f64;
        let (mut q_l2, mut q_inf) = (0.0f64, 0.0f64);
        for row in q.to_f64().chunks_exact(D_QK) {
            if let Some(norm) = finite_norm(row) {
                q_l2 = q_l2.max(norm);
                q_inf = q_inf.max(row.iter().fold(0.0, |m, v| m.max(v.abs())));
            }
        }
        StagingBound {
            score_abs: scale * q_l2 * k_max,
            score_l2: scale * q_inf * k_max,
        }
    }
}

/// Tolerances of the coop kernel's `out` and `lse` against the exact reference, from those of
/// the SIMT kernel (`out`, `lse`): unchanged for a 16-bit float cache (staged exactly), relaxed
/// for an 8-bit one, whose decoded values are rounded to f16 (relative error at most 2^-11, or
/// 2^-25 absolute below 2^-14):
/// - V: an output, an average of v, moves by at most 2^-11 · max|v| (`max_abs_v`);
/// - K: a score moves by at most δ = ln2 · 2^-11 · Σ_d|q'_d k_d| (natural units), so the lse by
///   at most δ and the softmax weights by a factor within e^{±2δ}: an output by at most
///   (e^{2δ} - 1) · max|v|;
/// - cosine: independent rounding errors (uniform, relative half-width 2^-11, variance
///   2^-22/3) give about 2^-22/6 from V and (ln2 · σ_s)²/2 from the scores, σ_s² =
///   2^-22/3 · ‖q' ⊙ k‖²; the bound grows by six times their sum.
pub fn exact_tolerances(
    out: Tolerance,
    lse: Tolerance,
    params: &AmlaParams,
    max_abs_v: f64,
    bound: &StagingBound,
) -> (Tolerance, Tolerance) {
    if params.kv_format == KvFormat::Float {
        return (out, lse);
    }
    let u = (-11f64).exp2();
    let ln2 = std::f64::consts::LN_2;
    let delta = ln2 * u * bound.score_abs;
    let sigma = ln2 * u * bound.score_l2;
    let out = Tolerance {
        abs: out.abs + u * max_abs_v + (2.0 * delta).exp_m1() * max_abs_v + (-25f64).exp2(),
        max_cos_diff: out
            .max_cos_diff
            .map(|c| c + 6.0 * (u * u / 6.0 + sigma * sigma / 6.0)),
        ..out
    };
    (
        out,
        Tolerance {
            abs: lse.abs + delta,
            ..lse
        },
    )
}

/// Uniform of the coop prep entry (`PrepParams` in shaders/amla_decode_coop.wgsl).
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct CoopPrepParams {
    /// b * s_q * h_q: one workgroup each.
    pub rows_total: u32,
    /// s_q * h_q rows per sequence.
    pub rows: u32,
    /// row blocks * head block: q16 rows per sequence.
    pub rows_padded: u32,
    /// softmax_scale * log2(e).
    pub scale_log2: f32,
}

impl AmlaPlan {
    /// Plan for the cooperative-matrix decode with an explicit configuration (validated against
    /// the adapter and the shape). [`AmlaPlan::new`] takes it wherever it can.
    pub fn with_coop(
        gpu: &Gpu,
        shape: &AmlaShape,
        params: &AmlaParams,
        config: CoopConfig,
    ) -> Result<Self> {
        params.validate()?;
        // The fields are public: checked as `AmlaShape::of` checks tensors.
        shape.validate()?;
        shape.check_format(params.kv_format)?;
        eligible(shape, params)
            .map_err(|why| Error::unsupported(OP, format!("cooperative-matrix decode: {why}")))?;
        config.check()?;
        let caps = &gpu.caps;
        if caps.fixed_subgroup_size() != Some(config.subgroup_size) {
            return Err(Error::unsupported(
                OP,
                format!(
                    "cooperative-matrix decode for subgroups of {}: the device has subgroups {}, \
                     sizes {:?}",
                    config.subgroup_size, caps.subgroups, caps.subgroup_size
                ),
            ));
        }
        let limits = [
            (
                "amla coop workgroup memory",
                config.workgroup_bytes,
                caps.max_workgroup_storage,
            ),
            (
                "amla coop invocations per workgroup",
                config.workgroup_size(),
                caps.max_invocations_per_workgroup,
            ),
            (
                "amla storage buffers per shader stage",
                DECODE_STORAGE_BUFFERS,
                caps.max_storage_buffers_per_stage,
            ),
        ];
        for (what, need, max) in limits {
            if need > max {
                return Err(Error::Limit {
                    what: what.into(),
                    need: need as u64,
                    max: max as u64,
                });
            }
        }
        // The SIMT tiles stay in the plan: what runs with cooperative matrices off.
        let tiles = TileConfig::choose(shape.rows(), shape.kv_dtype, caps.max_workgroup_storage)?;
        let rows = shape.rows();
        let row_blocks = config.row_blocks(rows);
        let rows_padded = row_blocks * config.head_block as usize;
        let b = shape.batch as u64;
        let q16_bytes = b * rows_padded as u64 * ROW_HALVES as u64 * 2;
        let (slots, part_out_bytes, part_lse_bytes) = super::check_bindings(
            gpu,
            shape,
            params.split,
            (row_blocks, config.head_block, config.tile_keys),
            ("q16 workspace", q16_bytes),
        )?;
        let fragment = config.fragment;
        let prep = gpu.coop_pipeline(
            &DECODE_COOP,
            fragment,
            "prep",
            &[("Q_DTYPE", dtype_code(shape.q_dtype))],
        )?;
        let decode = gpu.coop_pipeline(
            &DECODE_COOP,
            fragment,
            "decode",
            &[
                ("HB", config.head_block as f64),
                ("TN", config.tile_keys as f64),
                ("NSG", config.subgroups as f64),
                ("SG", config.subgroup_size as f64),
                ("KSPLIT", config.k_split as f64),
                ("LAZY", config.lazy_binades as f64),
                (
                    "KV_FORMAT",
                    params.kv_format.kernel_code(shape.kv_dtype) as f64,
                ),
                ("OUT_DTYPE", dtype_code(shape.out_dtype)),
                (
                    "RESCALE_AMLA",
                    f64::from(u8::from(params.rescale == Rescale::Amla)),
                ),
                (
                    "P_ROUND",
                    params.p_precision.resolve(shape.kv_dtype).round_code() as f64,
                ),
            ],
        )?;
        let combine = gpu.pipeline(
            &COMBINE,
            "combine",
            &[
                ("HB", config.head_block as f64),
                ("OUT_DTYPE", dtype_code(shape.out_dtype)),
            ],
        )?;
        let prep_params = gpu.uniform(&CoopPrepParams {
            rows_total: (b * rows as u64) as u32,
            rows: rows as u32,
            rows_padded: rows_padded as u32,
            scale_log2: params.scale_log2(),
        })?;
        Ok(AmlaPlan {
            id: NEXT_PLAN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            shape: *shape,
            params: *params,
            tiles,
            coop: Some(config),
            row_blocks,
            max_partial_slots: slots as u32,
            prep,
            decode,
            combine,
            prep_params,
            q_prep: gpu.storage_buffer("amla q16 workspace", q16_bytes)?,
            part_out: gpu.storage_buffer("amla partial out", part_out_bytes)?,
            part_lse: gpu.storage_buffer("amla partial lse", part_lse_bytes)?,
        })
    }

    /// A plan for `params` on the same path (the same tiles or cooperative-matrix
    /// configuration) as this one: the baseline of an A/B comparison.
    pub fn sibling(&self, gpu: &Gpu, params: &AmlaParams) -> Result<AmlaPlan> {
        match self.coop {
            Some(config) => AmlaPlan::with_coop(gpu, &self.shape, params, config),
            None => AmlaPlan::with_tiles(gpu, &self.shape, params, self.tiles),
        }
    }
}

/// What the emulation of the cooperative-matrix decode produced.
#[derive(Clone, Debug, PartialEq)]
pub struct CoopEmulation {
    /// Outputs, the AMLA counters and the per-entry bounds, as [`reference::emulate`] gives them
    /// ([`Emulation::out_tolerance`], [`Emulation::lse_tolerance`]).
    pub emulation: Emulation,
    /// Round trips of a row fragment's O through workgroup memory (tiles in which some row of
    /// the fragment moved its reference max after its first tile).
    pub round_trips: u64,
    /// (row fragment, tile) pairs processed: the round trips' denominator.
    pub fragment_tiles: u64,
}

/// A finite f32 rounded to the nearest f16 (ties to even) and saturated at ±65504, as the kernel
/// stages the cache.
pub fn to_f16_saturating(x: f32) -> f32 {
    f16::from_f32(x.clamp(-65504.0, 65504.0)).to_f32()
}

/// Roundings in a kernel score: 576 products summed, the k-split partials added, the factor.
const SUM_ROUNDINGS: f64 = 578.0;

/// The cooperative-matrix decode's steps in f32 in its block order, on the SIMT emulation's
/// machinery ([`reference::emulate`]: the same row state, bounds and combine): q scaled by a
/// power of two per row and rounded to f16 (a row holding a NaN or inf poisons its visible
/// keys), the cache staged as f16 (NaN and inf cleared and flagged, beyond ±65504 saturated), S
/// summed per dim share (in dim order within a share, the shares in order), the lazy reference
/// max, the rescale steps of the row fragments that make a round trip, P rounded as the plan
/// says and held as f16, the AMLA guard and the combine of split partials.
///
/// The bounds follow the SIMT emulation's model (docs/amla.md, "Emulation bounds") with one
/// difference: fragments sum the 576 exact f16 products in the hardware's order, the emulation
/// in dim order. Each of the at most n = 578 roundings of either sum is modelled as an
/// independent error of at most 2^-24 of its running sum, so a score's noise is taken as
/// σ = 6·2^-24·√n·‖q16 ⊙ k16‖₂·|factor| (six standard deviations, as the SIMT bounds' noise):
/// a P whose rounding input lies within that noise of a 16-bit boundary may round the other way.
pub fn emulate(
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &Tensor,
    cache_seqlens: &Tensor,
    params: &AmlaParams,
    config: &CoopConfig,
) -> Result<CoopEmulation> {
    let x = reference::Checked::new(q, kv_cache, block_table, cache_seqlens, params)?;
    let s = x.shape;
    config.check()?;
    eligible(&s, params)
        .map_err(|why| Error::unsupported(OP, format!("cooperative-matrix decode: {why}")))?;
    let rows = s.rows();
    let frag = config.fragment.size() as usize;
    let work = schedule::plan_work(
        &x.lengths,
        config.row_blocks(rows),
        config.tile_keys,
        params.split,
    )?;
    let amla = params.rescale == Rescale::Amla;
    let rounding = params.p_precision.resolve(s.kv_dtype);
    let tn = config.tile_keys as usize;
    let lazy = config.lazy_binades as f32;
    let share = D_QK / config.k_split as usize;
    let scale_log2 = params.scale_log2();
    let q_all = x.q.to_f32();
    let per_seq = reference::per_sequence(s.batch, |seq| {
        let len = x.lengths[seq];
        let (keys, flagged): (Vec<Vec<f32>>, Vec<bool>) = x
            .rows(seq)
            .into_iter()
            .map(|r| {
                let (tile, bad) = x.row_tile(r);
                (tile.into_iter().map(to_f16_saturating).collect(), bad)
            })
            .unzip();
        let mut stats = AmlaStats::default();
        let mut rows_out = Vec::with_capacity(rows);
        // Per split range: for each (row fragment, tile), whether some row moved its reference.
        let ranges = &work.ranges[seq];
        let mut moved = vec![Vec::<bool>::new(); ranges.len()];
        let mut seen = vec![Vec::<bool>::new(); ranges.len()];
        for row in 0..rows {
            let limit = s.visible_keys(len, row / s.h_q, params.causal);
            let q_row = &q_all[(seq * rows + row) * D_QK..][..D_QK];
            let q_bad = q_row.iter().any(|v| !v.is_finite());
            let (q16, factor) = q_row_f16(q_row, scale_log2);
            let fragment = row / frag; // head blocks are whole row fragments
            let mut parts = Vec::new();
            for (r, &(begin, end)) in ranges.iter().enumerate() {
                let (begin, end) = (begin as usize, end as usize);
                let tiles = (end - begin).div_ceil(tn);
                if moved[r].len() < (fragment + 1) * tiles {
                    moved[r].resize((fragment + 1) * tiles, false);
                    seen[r].resize((fragment + 1) * tiles, false);
                }
                let mut state = RowState::new();
                let mut bounds = Bounds::new();
                let mut o = vec![0.0f32; D_V];
                for (t_index, tile_begin) in (begin..end).step_by(tn).enumerate() {
                    let tile_keys = tn.min(end - tile_begin);
                    seen[r][fragment * tiles + t_index] = true;
                    let mut scores = vec![reference::MASKED; tn];
                    let mut sigmas = vec![0.0f64; tn];
                    for (c, (score, sigma)) in scores.iter_mut().zip(&mut sigmas).enumerate() {
                        let k = tile_begin + c;
                        if k < end && k < limit {
                            let key = &keys[k];
                            let mut sc = 0.0f32;
                            for part in 0..config.k_split as usize {
                                let mut acc = 0.0f32;
                                for d in part * share..(part + 1) * share {
                                    acc = q16[d].mul_add(key[d], acc);
                                }
                                sc += acc;
                            }
                            let sc = sc * factor;
                            if flagged[k] || q_bad || !sc.is_finite() {
                                *score = POISONED;
                                continue;
                            }
                            *score = sc;
                            let norm: f64 = q16
                                .iter()
                                .zip(key)
                                .map(|(a, b)| (*a as f64 * *b as f64).powi(2))
                                .sum::<f64>()
                                .sqrt();
                            *sigma = 6.0 * U * SUM_ROUNDINGS.sqrt() * norm * factor.abs() as f64;
                        }
                    }
                    let m_old = state.m;
                    let t = state.tile(&scores, amla, rounding, lazy, &mut stats);
                    if t.rescales {
                        moved[r][fragment * tiles + t_index] = true;
                        for v in o.iter_mut() {
                            if amla {
                                *v = reference::add_to_exponent(*v, t.step);
                            } else {
                                *v *= f32::from_bits(t.step);
                            }
                        }
                    }
                    let tile_rows: Vec<&[f32]> = (tile_begin..tile_begin + tile_keys)
                        .map(|k| keys[k].as_slice())
                        .collect();
                    bounds.tile(
                        &t,
                        m_old,
                        &o,
                        &tile_rows,
                        &scores[..tile_keys],
                        &sigmas[..tile_keys],
                        amla,
                        rounding,
                        &mut stats,
                    );
                    for (&pc, key) in t.p.iter().zip(&tile_rows) {
                        // P is held as f16 (bf16-rounded P below 2^-14 loses bits there).
                        let pc = reference::round_f16(pc);
                        for (od, &vd) in o.iter_mut().zip(&key[..D_V]) {
                            *od = pc.mul_add(vd, *od);
                        }
                    }
                }
                if state.poisoned {
                    parts.push(Part::poisoned());
                    continue;
                }
                let lse = state.finish(&mut o, amla, &mut stats);
                let norm = if state.l > 0.0 {
                    1.0 / if amla { state.l * state.c_hat } else { state.l }
                } else {
                    0.0
                };
                let (bound, lse_bound) = bounds.finish(&o, norm, state.l, lse);
                parts.push(Part {
                    o,
                    lse,
                    bound,
                    lse_bound,
                });
            }
            rows_out.push(if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                reference::combine(&parts)
            });
        }
        let count = |v: &Vec<Vec<bool>>| v.iter().flatten().filter(|&&b| b).count() as u64;
        (rows_out, stats, count(&moved), count(&seen))
    });
    let mut out = Vec::with_capacity(s.batch * rows * D_V);
    let mut out_bound = Vec::with_capacity(s.batch * rows * D_V);
    let (mut lses, mut lse_bounds) = (Vec::new(), Vec::new());
    let mut stats = AmlaStats::default();
    let (mut round_trips, mut fragment_tiles) = (0, 0);
    for (parts, st, trips, tiles) in per_seq {
        stats += st;
        round_trips += trips;
        fragment_tiles += tiles;
        let (mut l, mut lb) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for p in parts {
            out.extend(p.o);
            out_bound.extend(p.bound);
            l.push(p.lse);
            lb.push(p.lse_bound);
        }
        lses.push(l);
        lse_bounds.push(lb);
    }
    Ok(CoopEmulation {
        emulation: Emulation {
            out,
            lse: reference::scatter_lse(&s, lses),
            out_bound,
            lse_bound: reference::scatter_lse(&s, lse_bounds),
            stats,
        },
        round_trips,
        fragment_tiles,
    })
}

/// A q row as the coop prep writes it: divided by 2^e (the power of two of its largest |q|) and
/// rounded to f16, with the factor softmax_scale·log2(e)·2^e.
fn q_row_f16(q: &[f32], scale_log2: f32) -> (Vec<f32>, f32) {
    let largest = q.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let e = if largest > 0.0 {
        (((largest.to_bits() >> 23) & 0xff) as i32).max(1) - 127
    } else {
        0
    };
    let q16 = q
        .iter()
        .map(|&x| f16::from_f32(x * 2f32.powi(-e)).to_f32())
        .collect();
    (q16, scale_log2 * 2f32.powi(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_fit_their_budgets() {
        use Fragment::{Size8, Size16};
        // (fragment, subgroup, head block, tile) -> (subgroups, k split, bytes)
        let table = [
            (Size16, 32, 16, 32, 8, 4, 45_700),
            (Size16, 32, 32, 32, 8, 2, 45_832),
            (Size16, 32, 64, 32, 8, 1, 46_096),
            (Size16, 32, 64, 16, 8, 2, 27_408),
            (Size8, 8, 8, 16, 8, 4, 20_804),
            (Size8, 8, 16, 16, 8, 2, 20_872),
            (Size8, 8, 32, 16, 16, 2, 23_056),
            (Size8, 8, 64, 16, 32, 2, 27_424),
        ];
        for (f, sg, hb, tn, n, k, bytes) in table {
            let c = CoopConfig::new(f, sg, hb, tn, 8).unwrap();
            assert_eq!(
                (c.subgroups, c.k_split, c.workgroup_bytes),
                (n, k, bytes),
                "{c:?}"
            );
            assert!(c.row_fragments() * c.column_fragments() <= MAX_ACCUMULATORS);
            assert!(c.column_fragments() <= MAX_COLUMN_FRAGMENTS);
            c.check().unwrap();
        }
        // 48 KiB (NVIDIA under Vulkan) holds the largest 16x16 configuration; 32 KiB (lavapipe)
        // the largest 8x8 one at 16-key tiles.
        assert!(
            CoopConfig::new(Size16, 32, 64, 32, 8)
                .unwrap()
                .workgroup_bytes
                <= 48 << 10
        );
        assert!(
            CoopConfig::new(Size8, 8, 64, 16, 8)
                .unwrap()
                .workgroup_bytes
                <= 32 << 10
        );
        assert!(
            CoopConfig::new(Size8, 8, 64, 32, 8)
                .unwrap()
                .workgroup_bytes
                > 32 << 10
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        use Fragment::{Size8, Size16};
        for (f, sg, hb, tn, lazy) in [
            (Size16, 32, 8, 32, 8),   // head block below the fragment
            (Size16, 32, 128, 32, 8), // above 64
            (Size16, 32, 48, 32, 8),  // not a power of two
            (Size16, 32, 16, 8, 8),   // tile below the fragment
            (Size8, 8, 16, 24, 8),    // tile not offered
            (Size8, 8, 16, 16, 15),   // P past the f16 range
            (Size8, 0, 16, 16, 8),    // no subgroup
            (Size8, 12, 16, 16, 8),   // not a power of two
        ] {
            assert!(
                matches!(
                    CoopConfig::new(f, sg, hb, tn, lazy),
                    Err(Error::Invalid { .. })
                ),
                "{f:?} {sg} {hb} {tn} {lazy}"
            );
        }
        let c = CoopConfig::new(Size8, 8, 16, 16, 8).unwrap();
        for forged in [
            CoopConfig { subgroups: 4, ..c },
            CoopConfig { k_split: 1, ..c },
            CoopConfig {
                workgroup_bytes: 100,
                ..c
            },
        ] {
            assert!(matches!(forged.check(), Err(Error::Invalid { .. })));
        }
    }

    #[test]
    fn prep_params_match_the_wgsl_struct() {
        assert_eq!(std::mem::size_of::<CoopPrepParams>(), 16);
    }

    #[test]
    fn staging_saturates_and_rounds_to_f16() {
        assert_eq!(to_f16_saturating(1.0e6), 65504.0);
        assert_eq!(to_f16_saturating(-3.0e38), -65504.0);
        assert_eq!(to_f16_saturating(65519.0), 65504.0);
        assert_eq!(to_f16_saturating(1.5), 1.5);
        // bf16 values within the f16 normal range are exact.
        let x = half::bf16::from_f32(0.123_456).to_f32();
        assert_eq!(to_f16_saturating(x), x);
    }

    #[test]
    fn q_rows_are_scaled_by_a_power_of_two() {
        let q = [3.0f32, -0.75, 1.0e-3, 0.0];
        let (q16, factor) = q_row_f16(&q, 0.5);
        // Largest |q| = 3 in [2, 4): e = 1, q / 2 is exact in f16 where representable.
        assert_eq!(factor, 1.0);
        assert_eq!(&q16[..2], &[1.5, -0.375]);
        assert!((q16[2] - 5.0e-4).abs() <= 2.5e-7); // half an f16 ulp at 2^-11
        let (zeros, factor) = q_row_f16(&[0.0; 4], 0.5);
        assert_eq!((zeros, factor), (vec![0.0; 4], 0.5));
        // Large bf16 q stays finite: scaled down before the f16 rounding.
        let (big, factor) = q_row_f16(&[1.0e10, 2.0e9], 1.0);
        assert!(big.iter().all(|v| v.is_finite() && v.abs() < 2.0));
        assert_eq!(factor, 2f32.powi(33));
    }
}
