//! AMLA: MLA decode attention over a paged latent KV cache, with the online-softmax rescale of
//! the output done as an integer add on its f32 exponent bits (Huawei's AMLA, arXiv 2509.25224)
//! or, as a second variant of the same kernel, as the classic multiply.
//!
//! Inputs: `q [b, s_q, h_q, 576]`, the paged cache `kv_cache [num_blocks, page, 576]` or
//! FlashMLA's `[num_blocks, page, 1, 576]` (one latent KV head; V is its first 512 columns) in
//! f32, f16 or bf16, or packed 8-bit (FP8 or int8 codes with scales, 656 bytes per token, see
//! [`quant`]), `block_table [b, max_blocks] i32`, `cache_seqlens [b] i32`. Outputs:
//! `out [b, s_q, h_q, 512]` (q's dtype by default) and `lse [b, h_q, s_q] f32` (natural log).
//!
//! A row that sees no key (a sequence of length 0, or a causal row with no visible key) gives
//! `out = 0` and `lse = -inf` (ln of the empty sum; FlashMLA returns `lse = +inf` there). A row
//! that sees a key and whose q row or one of whose visible keys holds a NaN or ±inf gives
//! `out = NaN` (all 512 values) and `lse = NaN`; rows that do not see such a key are not
//! affected, and cache slots no row sees are never read.
//!
//! Use it in three steps, the way FlashMLA is used in a decode loop:
//! - [`AmlaPlan::new`] once per shape: picks the tiles from the device limits, compiles the
//!   kernels and allocates the workspace (reused by every call);
//! - [`AmlaPlan::schedule`] once per decode step (shared by all layers): validates the block
//!   table and the lengths on the host and splits long sequences across workgroups
//!   ([`schedule::plan_work`], the counterpart of `get_mla_metadata`);
//! - [`AmlaPlan::record`] per layer: checks the device tensors and records the passes.
//!
//! [`amla`] does all of it for host tensors. [`mod@reference`] holds the exact f64 reference and an
//! emulation of the kernel's AMLA steps in its block order. The kernel design and numerics are in
//! `docs/amla.md`.
//!
//! ```
//! use fusedops::gpu::Gpu;
//! use fusedops::ops::amla::{self, AmlaParams, inputs::{InputSpec, AmlaInputs}};
//! use fusedops::tensor::DType;
//!
//! # fn main() -> fusedops::Result<()> {
//! let gpu = Gpu::new()?;
//! let spec = InputSpec::new(&[5, 70], 1, 16, 64, DType::BF16);
//! let x = AmlaInputs::generate(&spec, 7)?;
//! let got = amla::amla(&gpu, &x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens,
//!                      &AmlaParams::default())?;
//! assert_eq!(got.out.shape(), &[2, 1, 16, 512]);
//! assert_eq!(got.lse.shape(), &[2, 16, 1]);
//! # Ok(())
//! # }
//! ```

pub mod cases;
pub mod coop;
pub mod inputs;
pub mod quant;
pub mod reference;
pub mod schedule;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Recorder, grid};
use crate::tensor::{DType, DeviceTensor, Tensor};

pub use cases::OPERATOR;
pub use coop::CoopConfig;
pub use quant::quantize_cache;
pub use schedule::{D_QK, D_V, Split, TileConfig, WorkPlan};

const OP: &str = "amla";

/// The AMLA kernels are each composed with shaders/amla_shared.wgsl (cache-row decoding, the
/// non-finite checks, P rounding and the AMLA rescale step), which a second decode kernel can
/// reuse the same way.
macro_rules! amla_kernel {
    ($name:literal) => {
        Kernel {
            name: $name,
            source: concat!(
                include_str!("../../../shaders/amla_shared.wgsl"),
                include_str!(concat!("../../../shaders/", $name, ".wgsl"))
            ),
        }
    };
}
const PREP: Kernel = amla_kernel!("amla_prep");
const DECODE: Kernel = amla_kernel!("amla_decode");
const COMBINE: Kernel = amla_kernel!("amla_combine");
const DECODE_COOP: Kernel = amla_kernel!("amla_decode_coop");

/// Storage buffers the decode kernel binds (the most of the three kernels).
const DECODE_STORAGE_BUFFERS: u32 = 7;

/// How the running output is rescaled when the running max grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rescale {
    /// AMLA: the max kept as a power of two, O rescaled by an integer add on its f32 bits.
    #[default]
    Amla,
    /// The classic multiply by exp(m_old - m_new).
    Multiply,
}

/// Precision of P in the P·V product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PPrecision {
    /// P stays f32.
    #[default]
    F32,
    /// P (times AMLA's c_hat) is rounded to f16 first, as the 16-bit P of a tensor-core kernel;
    /// AMLA then compensates the rounding of c in the exponent step.
    F16,
    /// P and c_hat rounded to bf16 (CANN rounds them to a bf16 cache's dtype).
    BF16,
    /// 16 bits in the cache's type, as CANN does: bf16 for a bf16 or 8-bit cache (FlashMLA
    /// computes with its FP8 cache in bf16), f16 for an f16 or f32 cache.
    Cache,
}

impl PPrecision {
    /// The rounding P gets with a cache of `kv_dtype`: `F32`, `F16` or `BF16` (never `Cache`).
    pub fn resolve(self, kv_dtype: DType) -> PPrecision {
        match (self, kv_dtype) {
            (PPrecision::Cache, DType::BF16 | DType::U8) => PPrecision::BF16,
            (PPrecision::Cache, _) => PPrecision::F16,
            (p, _) => p,
        }
    }

    /// Lower-case name, as in the JSON parameters.
    pub fn name(self) -> &'static str {
        match self {
            PPrecision::F32 => "f32",
            PPrecision::F16 => "f16",
            PPrecision::BF16 => "bf16",
            PPrecision::Cache => "cache",
        }
    }

    /// The kernel's `P_ROUND` code: 0 none, 1 f16, 2 bf16 (after [`PPrecision::resolve`]).
    fn round_code(self) -> u32 {
        match self {
            PPrecision::F32 => 0,
            PPrecision::F16 => 1,
            PPrecision::BF16 | PPrecision::Cache => 2,
        }
    }
}

/// How the cache stores a token's 576 values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// 576 values of the cache tensor's float dtype (f32, f16 or bf16).
    #[default]
    Float,
    /// FlashMLA's FP8 row in a u8 tensor: 656 bytes, 512 E4M3 codes, four f32 scales (one per
    /// 128 values), 64 bf16 rope values ([`quant`]).
    Fp8,
    /// The same row with int8 codes (Ascend 910B has int8 but no FP8).
    Int8,
}

impl KvFormat {
    /// Lower-case name, as in the JSON parameters.
    pub fn name(self) -> &'static str {
        match self {
            KvFormat::Float => "float",
            KvFormat::Fp8 => "fp8",
            KvFormat::Int8 => "int8",
        }
    }

    /// The kernel's `KV_FORMAT` code for a cache of `kv_dtype` (the `DTYPE_*` code for a float
    /// cache, `KV_FP8` / `KV_INT8` of shaders/amla_shared.wgsl for a packed one).
    fn kernel_code(self, kv_dtype: DType) -> u32 {
        match self {
            KvFormat::Float => kv_dtype.shader_code(),
            KvFormat::Fp8 => 8,
            KvFormat::Int8 => 9,
        }
    }
}

/// Operator parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AmlaParams {
    /// Scale of q·k; `None` means 1/sqrt(576).
    pub softmax_scale: Option<f32>,
    /// For s_q > 1: query i of a sequence of length L sees keys 0 ..= L - s_q + i.
    pub causal: bool,
    pub rescale: Rescale,
    pub p_precision: PPrecision,
    pub split: Split,
    /// What the cache holds: `Float` for an f32/f16/bf16 cache, `Fp8` or `Int8` for a packed
    /// u8 cache (FlashMLA's `is_fp8_kvcache`).
    pub kv_format: KvFormat,
}

impl AmlaParams {
    /// The softmax scale in use.
    pub fn scale(&self) -> f32 {
        self.softmax_scale.unwrap_or(1.0 / (D_QK as f32).sqrt())
    }

    /// softmax_scale · log2(e) in f32: the factor the prologue multiplies q by.
    pub fn scale_log2(&self) -> f32 {
        (self.scale() as f64 * std::f64::consts::LOG2_E) as f32
    }

    fn validate(&self) -> Result<()> {
        // The prologue multiplies q by scale · log2(e) in f32: that factor must exist.
        if !self.scale().is_finite() || !self.scale_log2().is_finite() {
            return Err(Error::invalid(
                OP,
                "softmax_scale",
                format!(
                    "{:e}: softmax_scale · log2(e) must be finite in f32 (|softmax_scale| <= {:e})",
                    self.scale(),
                    f32::MAX as f64 / std::f64::consts::LOG2_E
                ),
            ));
        }
        match self.split {
            Split::Auto {
                target_workgroups: 0,
            } => Err(Error::invalid(
                OP,
                "split",
                "target_workgroups must be >= 1",
            )),
            Split::Chunk { keys: 0 } => Err(Error::invalid(OP, "split", "chunk must be >= 1 key")),
            _ => Ok(()),
        }
    }
}

/// The shapes and dtypes an [`AmlaPlan`] is built for.
///
/// The fields are public; [`AmlaPlan::new`] and [`AmlaPlan::with_tiles`] check a hand-built shape
/// exactly as [`AmlaShape::of`] checks tensors ([`AmlaShape::validate`]), sizes included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmlaShape {
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub num_blocks: usize,
    pub page_size: usize,
    pub max_blocks: usize,
    pub q_dtype: DType,
    /// f32, f16 or bf16 (576 values per token), or u8 for a packed 8-bit cache (656 bytes).
    pub kv_dtype: DType,
    /// dtype of `out` (f32, f16 or bf16).
    pub out_dtype: DType,
}

fn expect_float(what: &str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::unsupported(
            OP,
            format!("{what} dtype {dtype} (expected f32, f16 or bf16)"),
        ))
    }
}

fn expect_i32(what: &str, dtype: DType) -> Result<()> {
    if dtype == DType::I32 {
        Ok(())
    } else {
        Err(Error::unsupported(
            OP,
            format!("{what} dtype {dtype} (expected i32)"),
        ))
    }
}

/// Bytes of one cached token: 576 values of a float dtype, or a packed 656-byte row.
pub fn kv_row_bytes(kv_dtype: DType) -> usize {
    if quant::is_packed(kv_dtype) {
        quant::ROW_BYTES
    } else {
        D_QK * kv_dtype.size()
    }
}

/// Elements per token in a cache tensor's last dimension.
fn kv_row_width(kv_dtype: DType) -> usize {
    kv_row_bytes(kv_dtype) / kv_dtype.size()
}

/// The device-limit checks both decode kernels make before anything is dispatched: every
/// binding (inputs, outputs, the kernel's q `workspace`, the split-KV partials) against the
/// adapter's binding size, and its element count against the kernels' u32 indices. `blocks` is
/// (row blocks, head block, keys per tile). Returns the partial slots the split may need and the
/// bytes of the partial out and lse buffers.
pub(crate) fn check_bindings(
    gpu: &Gpu,
    shape: &AmlaShape,
    split: Split,
    (row_blocks, head_block, tile_keys): (usize, u32, u32),
    workspace: (&str, u64),
) -> Result<(u64, u64, u64)> {
    let slots = schedule::max_partial_slots(
        split,
        shape.batch,
        row_blocks,
        shape.max_blocks * shape.page_size,
        tile_keys,
    );
    let rows = (shape.batch * shape.rows()) as u64;
    let hb = head_block as u64;
    let part_out_bytes = slots.max(1) * hb * D_V as u64 * 4;
    let part_lse_bytes = slots.max(1) * hb * 4;
    let bindings = [
        ("q", rows * (D_QK * shape.q_dtype.size()) as u64),
        (
            "kv_cache",
            (shape.num_blocks * shape.page_size) as u64 * kv_row_bytes(shape.kv_dtype) as u64,
        ),
        ("out", rows * (D_V * shape.out_dtype.size()) as u64),
        ("lse", rows * 4),
        workspace,
        ("partial out", part_out_bytes),
        ("partial lse", part_lse_bytes),
    ];
    for (what, bytes) in bindings {
        gpu.check_binding(&format!("amla {what}"), bytes)?;
        // The kernels index elements (at most 2 bytes each) with u32.
        if bytes / 2 > u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("amla {what} elements indexed with u32"),
                need: bytes / 2,
                max: u32::MAX as u64,
            });
        }
    }
    Ok((slots, part_out_bytes, part_lse_bytes))
}

impl AmlaShape {
    /// Validate the input shapes and dtypes; `out` gets q's dtype.
    pub fn of(
        q: &Tensor,
        kv_cache: &Tensor,
        block_table: &Tensor,
        cache_seqlens: &Tensor,
    ) -> Result<Self> {
        AmlaShape::from_parts(
            (q.shape(), q.dtype()),
            (kv_cache.shape(), kv_cache.dtype()),
            (block_table.shape(), block_table.dtype()),
            (cache_seqlens.shape(), cache_seqlens.dtype()),
        )
    }

    /// [`AmlaShape::of`] from (shape, dtype) pairs. The cache may be `[num_blocks, page, W]` or
    /// FlashMLA's `[num_blocks, page, 1, W]`, with W = 576 for a float cache and 656 for a
    /// packed u8 one.
    pub fn from_parts(
        q: (&[usize], DType),
        kv_cache: (&[usize], DType),
        block_table: (&[usize], DType),
        cache_seqlens: (&[usize], DType),
    ) -> Result<Self> {
        let (qs, kvs, bts, sls) = (q.0, kv_cache.0, block_table.0, cache_seqlens.0);
        if qs.len() != 4 || qs[3] != D_QK || qs[..3].contains(&0) {
            return Err(Error::shape(
                OP,
                "q",
                qs,
                "[b, s_q, h_q, 576] with b, s_q, h_q >= 1",
            ));
        }
        expect_float("q", q.1)?;
        if !kv_cache.1.is_float() && !quant::is_packed(kv_cache.1) {
            return Err(Error::unsupported(
                OP,
                format!(
                    "kv_cache dtype {} (expected f32, f16 or bf16, or u8 for a packed 8-bit cache)",
                    kv_cache.1
                ),
            ));
        }
        let width = kv_row_width(kv_cache.1);
        let rows_ok = match kvs.len() {
            3 => kvs[2] == width,
            4 => kvs[2] == 1 && kvs[3] == width,
            _ => false,
        };
        if !rows_ok {
            return Err(Error::shape(
                OP,
                "kv_cache",
                kvs,
                format!(
                    "[num_blocks, page, {width}] or [num_blocks, page, 1, {width}] for a {} cache \
                     ({} bytes per token)",
                    kv_cache.1,
                    kv_row_bytes(kv_cache.1)
                ),
            ));
        }
        let batch = qs[0];
        if bts.len() != 2 || bts[0] != batch || bts[1] == 0 {
            return Err(Error::shape(
                OP,
                "block_table",
                bts,
                format!("[{batch}, max_blocks >= 1] (b of q)"),
            ));
        }
        if sls != [batch] {
            return Err(Error::shape(
                OP,
                "cache_seqlens",
                sls,
                format!("[{batch}] (b of q)"),
            ));
        }
        expect_i32("block_table", block_table.1)?;
        expect_i32("cache_seqlens", cache_seqlens.1)?;
        let shape = AmlaShape {
            batch,
            s_q: qs[1],
            h_q: qs[2],
            num_blocks: kvs[0],
            page_size: kvs[1],
            max_blocks: bts[1],
            q_dtype: q.1,
            kv_dtype: kv_cache.1,
            out_dtype: q.1,
        };
        shape.validate()?;
        Ok(shape)
    }

    /// Check what the kernels rely on: every dimension at least 1, a page size that is a power
    /// of two >= 16, float q and out, a float or packed cache, and every size the plan and the
    /// kernels compute: element counts in u64 without overflow, and within u32 where the
    /// kernels index with u32 (every tensor and the query rows), the block-table capacity
    /// within i32 (the lengths are i32).
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("b", self.batch),
            ("s_q", self.s_q),
            ("h_q", self.h_q),
            ("num_blocks", self.num_blocks),
            ("max_blocks", self.max_blocks),
        ];
        for (name, value) in dims {
            if value == 0 {
                return Err(Error::invalid(OP, name, "0 (must be >= 1)"));
            }
        }
        let page = self.page_size;
        if page < 16 || !page.is_power_of_two() {
            return Err(Error::invalid(
                OP,
                "page size",
                format!("{page} (a power of two >= 16)"),
            ));
        }
        expect_float("q", self.q_dtype)?;
        expect_float("out", self.out_dtype)?;
        if !self.kv_dtype.is_float() && !quant::is_packed(self.kv_dtype) {
            return Err(Error::unsupported(
                OP,
                format!(
                    "kv_cache dtype {} (expected f32, f16, bf16 or u8)",
                    self.kv_dtype
                ),
            ));
        }
        let product = |what: &str, factors: &[usize], max: u64| -> Result<u64> {
            let n = factors
                .iter()
                .try_fold(1u64, |n, &f| n.checked_mul(f as u64))
                .filter(|&n| n <= max)
                .ok_or_else(|| {
                    Error::invalid(
                        OP,
                        what,
                        format!("{factors:?}: the product exceeds {max} (indexed with 32 bits)"),
                    )
                })?;
            Ok(n)
        };
        let u32_max = u32::MAX as u64;
        let rows = product("s_q x h_q", &[self.s_q, self.h_q], u32_max)?;
        // The head-block padding adds at most 15 rows per sequence.
        product(
            "q workspace (b x padded rows x 576)",
            &[self.batch, rows as usize + 15, D_QK],
            u32_max,
        )?;
        product(
            "q (b x s_q x h_q x 576)",
            &[self.batch, rows as usize, D_QK],
            u32_max,
        )?;
        product(
            "kv_cache (num_blocks x page x row bytes)",
            &[self.num_blocks, page, kv_row_bytes(self.kv_dtype)],
            u32_max,
        )?;
        product(
            "block_table (b x max_blocks)",
            &[self.batch, self.max_blocks],
            u32_max,
        )?;
        product(
            "max_blocks x page",
            &[self.max_blocks, page],
            i32::MAX as u64,
        )?;
        Ok(())
    }

    /// Query rows per sequence (s_q x h_q; saturating, for a shape not yet validated).
    pub fn rows(&self) -> usize {
        self.s_q.saturating_mul(self.h_q)
    }

    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.s_q, self.h_q, D_QK]
    }

    /// The cache shape, 3-D (`[num_blocks, page, 576]`, or `656` bytes for a packed cache);
    /// FlashMLA's 4-D form with a 1 in the third place is accepted everywhere too.
    pub fn kv_shape(&self) -> [usize; 3] {
        [self.num_blocks, self.page_size, kv_row_width(self.kv_dtype)]
    }

    /// True if `shape` is this cache's shape in its 3-D or its 4-D (h_kv = 1) form.
    pub fn kv_shape_matches(&self, shape: &[usize]) -> bool {
        let [n, p, w] = self.kv_shape();
        shape == [n, p, w] || shape == [n, p, 1, w]
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.s_q, self.h_q, D_V]
    }

    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.h_q, self.s_q]
    }

    /// An error unless `format` fits the cache dtype: `Float` for a float cache, `Fp8` or
    /// `Int8` for a packed one.
    pub fn check_format(&self, format: KvFormat) -> Result<()> {
        let packed = quant::is_packed(self.kv_dtype);
        match (format, packed) {
            (KvFormat::Float, false) | (KvFormat::Fp8 | KvFormat::Int8, true) => Ok(()),
            (KvFormat::Float, true) => Err(Error::invalid(
                OP,
                "kv_format",
                "float, but kv_cache is u8 (packed 656-byte rows): set kv_format to fp8 or int8",
            )),
            (_, false) => Err(Error::invalid(
                OP,
                "kv_format",
                format!(
                    "{}, but kv_cache is {} (an 8-bit format needs the packed u8 cache that \
                     amla::quantize_cache makes)",
                    format.name(),
                    self.kv_dtype
                ),
            )),
        }
    }

    /// Check the block table and lengths: every length within its row's pages, every block id a
    /// sequence uses within the cache (entries past the pages in use are ignored, so padding with
    /// -1 is fine). Returns the lengths.
    pub fn validate_indices(&self, block_table: &[i32], seqlens: &[i32]) -> Result<Vec<usize>> {
        self.validate()?;
        if block_table.len() != self.batch * self.max_blocks {
            return Err(Error::shape(
                OP,
                "block_table",
                [block_table.len()],
                format!("{} x {} entries", self.batch, self.max_blocks),
            ));
        }
        if seqlens.len() != self.batch {
            return Err(Error::shape(
                OP,
                "cache_seqlens",
                [seqlens.len()],
                format!("[{}]", self.batch),
            ));
        }
        let capacity = self.max_blocks * self.page_size;
        let mut lengths = Vec::with_capacity(self.batch);
        for (b, &len) in seqlens.iter().enumerate() {
            if len < 0 || len as usize > capacity {
                return Err(Error::invalid(
                    OP,
                    format!("cache_seqlens[{b}]"),
                    format!(
                        "{len}: must be in 0..={capacity} ({} pages of {} in its block-table row)",
                        self.max_blocks, self.page_size
                    ),
                ));
            }
            let len = len as usize;
            let row = &block_table[b * self.max_blocks..(b + 1) * self.max_blocks];
            for (p, &id) in row[..len.div_ceil(self.page_size)].iter().enumerate() {
                if id < 0 || id as usize >= self.num_blocks {
                    return Err(Error::invalid(
                        OP,
                        format!("block_table[{b}, {p}]"),
                        format!("block id {id} out of range 0..{}", self.num_blocks),
                    ));
                }
            }
            lengths.push(len);
        }
        Ok(lengths)
    }

    /// The cache rows (`block · page + slot`) that sequence `seq` of `len` keys uses, in key order
    /// (indices validated by [`AmlaShape::validate_indices`]).
    pub fn sequence_rows<'a>(
        &'a self,
        block_table: &'a [i32],
        seq: usize,
        len: usize,
    ) -> impl Iterator<Item = usize> + 'a {
        let row = &block_table[seq * self.max_blocks..(seq + 1) * self.max_blocks];
        (0..len)
            .map(move |k| row[k / self.page_size] as usize * self.page_size + k % self.page_size)
    }

    /// Keys visible to query token `token` of a sequence of `len` keys.
    pub fn visible_keys(&self, len: usize, token: usize, causal: bool) -> usize {
        visible_keys(len, self.s_q, token, causal)
    }
}

/// Check what the host can see of a call's inputs beyond their shapes, before anything is
/// uploaded: the scales of every cache row a sequence uses (packed caches, see
/// [`quant::check_scales`]), and that q, prescaled by softmax_scale · log2(e) in f32, stays finite
/// wherever q is finite (`softmax_scale` names the error).
pub fn check_values(
    shape: &AmlaShape,
    params: &AmlaParams,
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &[i32],
    lengths: &[usize],
) -> Result<()> {
    if let Some(bytes) = kv_cache.as_u8() {
        for (seq, &len) in lengths.iter().enumerate() {
            quant::check_scales(
                OP,
                bytes,
                params.kv_format,
                shape.page_size,
                shape.sequence_rows(block_table, seq, len),
            )?;
        }
    }
    let q_max = q
        .to_f32()
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(0.0f32, |m, v| m.max(v.abs()));
    if !(q_max * params.scale_log2().abs()).is_finite() {
        return Err(Error::invalid(
            OP,
            "softmax_scale",
            format!(
                "{:e}: q (max |q| {q_max:e}) times softmax_scale · log2(e) overflows f32",
                params.scale()
            ),
        ));
    }
    Ok(())
}

/// Keys visible to query token `token` (of `s_q`) of a sequence of `len` keys: all of them, or
/// with `causal` keys 0 ..= len - s_q + token.
pub fn visible_keys(len: usize, s_q: usize, token: usize, causal: bool) -> usize {
    if causal {
        (len + token + 1).saturating_sub(s_q)
    } else {
        len
    }
}

/// Uniform of the prep kernel (`PrepParams` in shaders/amla_prep.wgsl).
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct PrepParams {
    /// b * s_q * h_q * 144: vec4 groups of q.
    pub quads: u32,
    /// s_q * h_q rows per sequence.
    pub rows: u32,
    /// row blocks * head block: row stride of q_prep per sequence.
    pub rows_padded: u32,
    /// softmax_scale * log2(e).
    pub scale_log2: f32,
}

/// Uniform of the decode kernel (`DecodeParams` in shaders/amla_decode.wgsl).
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct DecodeParams {
    /// Query tokens per sequence.
    pub s_q: u32,
    /// Query heads.
    pub h_q: u32,
    /// s_q * h_q rows per sequence.
    pub rows: u32,
    /// row blocks * head block.
    pub rows_padded: u32,
    /// Pages in kv_cache [num_blocks, page, 576].
    pub num_blocks: u32,
    /// log2(page size).
    pub page_shift: u32,
    /// Columns of block_table [b, max_blocks].
    pub max_blocks: u32,
    /// Work items at the start of the schedule buffer.
    pub num_items: u32,
    /// 1: causal masking for s_q > 1.
    pub causal: u32,
    /// Offset of cache_seqlens `[b]` in the schedule buffer (words).
    pub seqlens_at: u32,
    /// Offset of block_table [b, max_blocks] in the schedule buffer (words).
    pub table_at: u32,
    pub _pad: u32,
}

/// Uniform of the combine kernel (`CombineParams` in shaders/amla_combine.wgsl).
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct CombineParams {
    /// Query tokens per sequence.
    pub s_q: u32,
    /// Query heads.
    pub h_q: u32,
    /// s_q * h_q rows per sequence.
    pub rows: u32,
    /// Combine jobs [num_combines, 4] in the schedule buffer.
    pub num_combines: u32,
    /// Offset of the jobs in the schedule buffer (words).
    pub combines_at: u32,
    pub _pad: [u32; 3],
}

static NEXT_PLAN_ID: AtomicU64 = AtomicU64::new(1);

/// Kernels, tiles and workspace for one shape; see the module docs.
pub struct AmlaPlan {
    id: u64,
    shape: AmlaShape,
    params: AmlaParams,
    /// The SIMT kernel's tiles: what runs when `coop` is `None` (and what would run with
    /// cooperative matrices off).
    tiles: TileConfig,
    /// The cooperative-matrix decode, which replaces the SIMT prep and decode kernels.
    coop: Option<CoopConfig>,
    row_blocks: usize,
    max_partial_slots: u32,
    prep: Arc<wgpu::ComputePipeline>,
    decode: Arc<wgpu::ComputePipeline>,
    combine: Arc<wgpu::ComputePipeline>,
    prep_params: wgpu::Buffer,
    /// Workspace: q as pre-scaled f32 [b, rows_padded, 576], and the partial (O, lse) of split
    /// sequences [slots, head_block, 512] and [slots, head_block].
    q_prep: wgpu::Buffer,
    part_out: wgpu::Buffer,
    part_lse: wgpu::Buffer,
}

impl std::fmt::Debug for AmlaPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmlaPlan")
            .field("shape", &self.shape)
            .field("params", &self.params)
            .field("tiles", &self.tiles)
            .field("coop", &self.coop)
            .field("max_partial_slots", &self.max_partial_slots)
            .finish_non_exhaustive()
    }
}

fn dtype_code(dtype: DType) -> f64 {
    dtype.shader_code() as f64
}

impl AmlaPlan {
    /// Plan for `shape` on `gpu`: the cooperative-matrix decode where the adapter and the
    /// dtypes allow it ([`CoopConfig::choose`]), else the SIMT kernel, with tiles chosen from the
    /// device limits.
    pub fn new(gpu: &Gpu, shape: &AmlaShape, params: &AmlaParams) -> Result<Self> {
        shape.validate()?;
        if let Ok(config) = CoopConfig::choose(gpu, shape, params) {
            return AmlaPlan::with_coop(gpu, shape, params, config);
        }
        let tiles =
            TileConfig::choose(shape.rows(), shape.kv_dtype, gpu.caps.max_workgroup_storage)?;
        AmlaPlan::with_tiles(gpu, shape, params, tiles)
    }

    /// Plan for the SIMT kernel with explicit tiles (validated against the device limits).
    pub fn with_tiles(
        gpu: &Gpu,
        shape: &AmlaShape,
        params: &AmlaParams,
        tiles: TileConfig,
    ) -> Result<Self> {
        params.validate()?;
        // The fields are public: a shape not made by `AmlaShape::of` is checked the same way (a
        // page size that is not a power of two would make the kernel's page shift wrong, a
        // size that wraps would bind too little).
        shape.validate()?;
        shape.check_format(params.kv_format)?;
        tiles.check(shape.kv_dtype)?;
        let caps = &gpu.caps;
        if tiles.workgroup_bytes > caps.max_workgroup_storage {
            return Err(Error::Limit {
                what: "amla workgroup memory".into(),
                need: tiles.workgroup_bytes as u64,
                max: caps.max_workgroup_storage as u64,
            });
        }
        if schedule::WORKGROUP > caps.max_invocations_per_workgroup {
            return Err(Error::Limit {
                what: "amla invocations per workgroup".into(),
                need: schedule::WORKGROUP as u64,
                max: caps.max_invocations_per_workgroup as u64,
            });
        }
        if DECODE_STORAGE_BUFFERS > caps.max_storage_buffers_per_stage {
            return Err(Error::Limit {
                what: "amla storage buffers per shader stage".into(),
                need: DECODE_STORAGE_BUFFERS as u64,
                max: caps.max_storage_buffers_per_stage as u64,
            });
        }
        let rows = shape.rows();
        let row_blocks = tiles.row_blocks(rows);
        let rows_padded = row_blocks * tiles.head_block as usize;
        let b = shape.batch as u64;
        let q_prep_bytes = b * rows_padded as u64 * D_QK as u64 * 4;
        let (slots, part_out_bytes, part_lse_bytes) = check_bindings(
            gpu,
            shape,
            params.split,
            (row_blocks, tiles.head_block, tiles.tile_keys),
            ("q workspace", q_prep_bytes),
        )?;
        let prep = gpu.pipeline(&PREP, "prep", &[("Q_DTYPE", dtype_code(shape.q_dtype))])?;
        let decode = gpu.pipeline(
            &DECODE,
            "decode",
            &[
                ("HB", tiles.head_block as f64),
                ("RB", tiles.rows_per_thread as f64),
                ("TN", tiles.tile_keys as f64),
                ("CB", tiles.keys_per_thread as f64),
                ("DG", tiles.d_groups as f64),
                ("KV_STRIDE", tiles.kv_stride as f64),
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
                ("HB", tiles.head_block as f64),
                ("OUT_DTYPE", dtype_code(shape.out_dtype)),
            ],
        )?;
        let prep_params = gpu.uniform(&PrepParams {
            quads: (b * rows as u64 * schedule::QUADS as u64) as u32,
            rows: rows as u32,
            rows_padded: rows_padded as u32,
            scale_log2: params.scale_log2(),
        })?;
        Ok(AmlaPlan {
            id: NEXT_PLAN_ID.fetch_add(1, Ordering::Relaxed),
            shape: *shape,
            params: *params,
            tiles,
            coop: None,
            row_blocks,
            max_partial_slots: slots as u32,
            prep,
            decode,
            combine,
            prep_params,
            q_prep: gpu.storage_buffer("amla q workspace", q_prep_bytes)?,
            part_out: gpu.storage_buffer("amla partial out", part_out_bytes)?,
            part_lse: gpu.storage_buffer("amla partial lse", part_lse_bytes)?,
        })
    }

    pub fn shape(&self) -> &AmlaShape {
        &self.shape
    }

    pub fn params(&self) -> &AmlaParams {
        &self.params
    }

    /// The SIMT kernel's tiles (see [`AmlaPlan::coop`] for the kernel that runs).
    pub fn tiles(&self) -> &TileConfig {
        &self.tiles
    }

    /// The cooperative-matrix configuration when that decode runs, `None` for the SIMT one.
    pub fn coop(&self) -> Option<&CoopConfig> {
        self.coop.as_ref()
    }

    /// Query rows per work item of the kernel that runs.
    fn head_block(&self) -> u32 {
        self.coop.map_or(self.tiles.head_block, |c| c.head_block)
    }

    /// Keys per tile of the kernel that runs (the split boundaries are whole tiles).
    fn tile_keys(&self) -> u32 {
        self.coop.map_or(self.tiles.tile_keys, |c| c.tile_keys)
    }

    /// Head blocks per sequence.
    pub fn row_blocks(&self) -> usize {
        self.row_blocks
    }

    /// Partial slots the workspace holds.
    pub fn partial_slots(&self) -> u32 {
        self.max_partial_slots
    }

    /// The rounding P gets in this plan ([`PPrecision::resolve`] for its cache).
    pub fn p_rounding(&self) -> PPrecision {
        self.params.p_precision.resolve(self.shape.kv_dtype)
    }

    /// The kernel variant, as reported by `fusedops check`/`bench`.
    pub fn variant(&self) -> String {
        if let Some(c) = &self.coop {
            return c.variant(&self.params, self.shape.kv_dtype);
        }
        let t = &self.tiles;
        let kv = match self.params.kv_format {
            KvFormat::Float => String::new(),
            f => format!(" kv={}", f.name()),
        };
        format!(
            "{} p={}{kv} hb={} tn={}",
            match self.params.rescale {
                Rescale::Amla => "amla",
                Rescale::Multiply => "multiply",
            },
            self.p_rounding().name(),
            t.head_block,
            t.tile_keys
        )
    }

    /// Validate `block_table` and `cache_seqlens` (host tensors) and split the batch; the
    /// result is uploaded and can be recorded any number of times with this plan.
    pub fn schedule(
        &self,
        gpu: &Gpu,
        block_table: &Tensor,
        cache_seqlens: &Tensor,
    ) -> Result<AmlaSchedule> {
        let s = &self.shape;
        let expected_table = [s.batch, s.max_blocks];
        if block_table.shape() != expected_table {
            return Err(Error::shape(
                OP,
                "block_table",
                block_table.shape(),
                format!("{expected_table:?} (as planned)"),
            ));
        }
        if cache_seqlens.shape() != [s.batch] {
            return Err(Error::shape(
                OP,
                "cache_seqlens",
                cache_seqlens.shape(),
                format!("[{}] (as planned)", s.batch),
            ));
        }
        let table = block_table.as_i32().ok_or_else(|| {
            Error::unsupported(OP, format!("block_table dtype {}", block_table.dtype()))
        })?;
        let seqlens = cache_seqlens.as_i32().ok_or_else(|| {
            Error::unsupported(OP, format!("cache_seqlens dtype {}", cache_seqlens.dtype()))
        })?;
        let lengths = s.validate_indices(table, seqlens)?;
        let work = schedule::plan_work(
            &lengths,
            self.row_blocks,
            self.tile_keys(),
            self.params.split,
        )?;
        if work.partial_slots > self.max_partial_slots {
            return Err(Error::Limit {
                what: "amla partial slots of the planned workspace".into(),
                need: work.partial_slots as u64,
                max: self.max_partial_slots as u64,
            });
        }
        let mut words: Vec<u32> = Vec::new();
        words.extend_from_slice(bytemuck::cast_slice(&work.items));
        let combines_at = words.len() as u32;
        words.extend_from_slice(bytemuck::cast_slice(&work.combines));
        let seqlens_at = words.len() as u32;
        words.extend(lengths.iter().map(|&l| l as u32));
        let table_at = words.len() as u32;
        words.extend(table.iter().map(|&id| id as u32));
        gpu.check_binding("amla schedule", words.len() as u64 * 4)?;
        let rows = s.rows() as u32;
        let decode_params = DecodeParams {
            s_q: s.s_q as u32,
            h_q: s.h_q as u32,
            rows,
            rows_padded: (self.row_blocks * self.head_block() as usize) as u32,
            num_blocks: s.num_blocks as u32,
            page_shift: s.page_size.trailing_zeros(),
            max_blocks: s.max_blocks as u32,
            num_items: work.items.len() as u32,
            causal: u32::from(self.params.causal),
            seqlens_at,
            table_at,
            _pad: 0,
        };
        let combine_params = CombineParams {
            s_q: s.s_q as u32,
            h_q: s.h_q as u32,
            rows,
            num_combines: work.combines.len() as u32,
            combines_at,
            _pad: [0; 3],
        };
        Ok(AmlaSchedule {
            plan_id: self.id,
            buffer: gpu.storage_buffer_with("amla schedule", bytemuck::cast_slice(&words))?,
            decode_params: gpu.uniform(&decode_params)?,
            combine_params: gpu.uniform(&combine_params)?,
            work,
            lengths,
        })
    }

    fn check_tensor(
        &self,
        what: &str,
        t: &DeviceTensor,
        shape_ok: bool,
        shape: &[usize],
        dtype: DType,
    ) -> Result<()> {
        if !shape_ok {
            return Err(Error::shape(
                OP,
                what,
                t.shape(),
                format!("{shape:?} (as planned)"),
            ));
        }
        if t.dtype() != dtype {
            return Err(Error::unsupported(
                OP,
                format!("{what} dtype {} (planned for {dtype})", t.dtype()),
            ));
        }
        Ok(())
    }

    /// Validate the device tensors against the plan and build the bind groups for one call.
    pub fn bind(
        &self,
        gpu: &Gpu,
        schedule: &AmlaSchedule,
        q: &DeviceTensor,
        kv_cache: &DeviceTensor,
        out: &DeviceTensor,
        lse: &DeviceTensor,
    ) -> Result<AmlaBindings> {
        if schedule.plan_id != self.id {
            return Err(Error::invalid(OP, "schedule", "was made by another plan"));
        }
        let s = &self.shape;
        let (qs, os, ls) = (s.q_shape(), s.out_shape(), s.lse_shape());
        self.check_tensor("q", q, q.shape() == qs, &qs, s.q_dtype)?;
        let kv_ok = s.kv_shape_matches(kv_cache.shape());
        self.check_tensor("kv_cache", kv_cache, kv_ok, &s.kv_shape(), s.kv_dtype)?;
        self.check_tensor("out", out, out.shape() == os, &os, s.out_dtype)?;
        self.check_tensor("lse", lse, lse.shape() == ls, &ls, DType::F32)?;
        let prep = gpu.bind_group(
            &self.prep,
            &[
                q.binding(),
                self.q_prep.as_entire_binding(),
                self.prep_params.as_entire_binding(),
            ],
        )?;
        let decode = gpu.bind_group(
            &self.decode,
            &[
                self.q_prep.as_entire_binding(),
                kv_cache.binding(),
                schedule.buffer.as_entire_binding(),
                out.binding(),
                lse.binding(),
                self.part_out.as_entire_binding(),
                self.part_lse.as_entire_binding(),
                schedule.decode_params.as_entire_binding(),
            ],
        )?;
        let combine = if schedule.work.combines.is_empty() {
            None
        } else {
            Some(gpu.bind_group(
                &self.combine,
                &[
                    schedule.buffer.as_entire_binding(),
                    self.part_out.as_entire_binding(),
                    self.part_lse.as_entire_binding(),
                    out.binding(),
                    lse.binding(),
                    schedule.combine_params.as_entire_binding(),
                ],
            )?)
        };
        let max = gpu.caps.max_workgroups_per_dim;
        // The SIMT prep converts a quad per invocation, the coop prep a row per workgroup.
        let prep_groups = match self.coop {
            Some(_) => (s.batch * s.rows()) as u32,
            None => ((s.batch * s.rows()) as u32 * schedule::QUADS).div_ceil(256),
        };
        Ok(AmlaBindings {
            plan_id: self.id,
            prep,
            decode,
            combine,
            prep_grid: grid(prep_groups, max),
            decode_grid: grid(schedule.work.items.len() as u32, max),
            combine_grid: grid(schedule.work.combines.len() as u32 * self.head_block(), max),
        })
    }

    /// Record one call with bindings from [`AmlaPlan::bind`]: a pass `amla decode` (q prep and
    /// the decode kernel) and, when some sequence is split, a pass `amla combine`.
    pub fn record_bound(&self, rec: &mut Recorder, bindings: &AmlaBindings) -> Result<()> {
        if bindings.plan_id != self.id {
            return Err(Error::invalid(OP, "bindings", "were made by another plan"));
        }
        {
            let mut pass = rec.compute_pass("amla decode");
            pass.set_pipeline(&self.prep);
            pass.set_bind_group(0, &bindings.prep, &[]);
            let (x, y, z) = bindings.prep_grid;
            pass.dispatch_workgroups(x, y, z);
            pass.set_pipeline(&self.decode);
            pass.set_bind_group(0, &bindings.decode, &[]);
            let (x, y, z) = bindings.decode_grid;
            pass.dispatch_workgroups(x, y, z);
        }
        if let Some(combine) = &bindings.combine {
            let mut pass = rec.compute_pass("amla combine");
            pass.set_pipeline(&self.combine);
            pass.set_bind_group(0, combine, &[]);
            let (x, y, z) = bindings.combine_grid;
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    }

    /// Validate, bind and record one call (nothing is recorded when validation fails).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        schedule: &AmlaSchedule,
        q: &DeviceTensor,
        kv_cache: &DeviceTensor,
        out: &DeviceTensor,
        lse: &DeviceTensor,
    ) -> Result<()> {
        let bindings = self.bind(gpu, schedule, q, kv_cache, out, lse)?;
        self.record_bound(rec, &bindings)
    }
}

/// A validated, uploaded split of one batch (see [`AmlaPlan::schedule`]).
#[derive(Debug)]
pub struct AmlaSchedule {
    plan_id: u64,
    buffer: wgpu::Buffer,
    decode_params: wgpu::Buffer,
    combine_params: wgpu::Buffer,
    work: WorkPlan,
    lengths: Vec<usize>,
}

impl AmlaSchedule {
    /// The work items, combine jobs and key ranges.
    pub fn work(&self) -> &WorkPlan {
        &self.work
    }

    /// The validated sequence lengths.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
}

/// Bind groups and grids of one call (see [`AmlaPlan::bind`]).
#[derive(Debug)]
pub struct AmlaBindings {
    plan_id: u64,
    prep: wgpu::BindGroup,
    decode: wgpu::BindGroup,
    combine: Option<wgpu::BindGroup>,
    prep_grid: (u32, u32, u32),
    decode_grid: (u32, u32, u32),
    combine_grid: (u32, u32, u32),
}

/// Outputs of [`amla`].
#[derive(Clone, Debug, PartialEq)]
pub struct AmlaOutput {
    /// `[b, s_q, h_q, 512]` in q's dtype.
    pub out: Tensor,
    /// `[b, h_q, s_q]` f32, natural log; -inf for rows that see no key, NaN for rows whose
    /// inputs hold NaN or ±inf.
    pub lse: Tensor,
}

/// Validate, upload, run and read back: the convenience path for host tensors.
pub fn amla(
    gpu: &Gpu,
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &Tensor,
    cache_seqlens: &Tensor,
    params: &AmlaParams,
) -> Result<AmlaOutput> {
    // Everything the host can check, before any GPU object is made.
    params.validate()?;
    let shape = AmlaShape::of(q, kv_cache, block_table, cache_seqlens)?;
    shape.check_format(params.kv_format)?;
    let table = block_table.as_i32().unwrap_or_default(); // i32: checked by AmlaShape::of
    let lengths = shape.validate_indices(table, cache_seqlens.as_i32().unwrap_or_default())?;
    check_values(&shape, params, q, kv_cache, table, &lengths)?;
    let plan = AmlaPlan::new(gpu, &shape, params)?;
    let schedule = plan.schedule(gpu, block_table, cache_seqlens)?;
    let q_dev = gpu.upload(q)?;
    let kv_dev = gpu.upload(kv_cache)?;
    let out = gpu.zeros(&shape.out_shape(), shape.out_dtype)?;
    let lse = gpu.zeros(&shape.lse_shape(), DType::F32)?;
    let bindings = plan.bind(gpu, &schedule, &q_dev, &kv_dev, &out, &lse)?;
    gpu.run(|rec| plan.record_bound(rec, &bindings))?;
    Ok(AmlaOutput {
        out: gpu.download(&out)?,
        lse: gpu.download(&lse)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout<T>(size: usize) {
        assert_eq!(std::mem::size_of::<T>(), size);
        assert_eq!(std::mem::size_of::<T>() % 16, 0);
    }

    #[test]
    fn uniforms_match_their_wgsl_structs() {
        layout::<PrepParams>(16);
        layout::<DecodeParams>(48);
        layout::<CombineParams>(32);
        layout::<schedule::WorkItem>(32);
        assert_eq!(std::mem::size_of::<schedule::CombineItem>(), 16);
    }

    #[test]
    fn guard_constant_is_1e10() {
        assert!(
            include_str!("../../../shaders/amla_shared.wgsl")
                .contains(&format!("0x{:08x}u; // bits of 1e10", 1e10f32.to_bits()))
        );
    }

    fn shape_error(q: &[usize], kv: &[usize], bt: &[usize], sl: &[usize]) -> Error {
        AmlaShape::from_parts(
            (q, DType::BF16),
            (kv, DType::BF16),
            (bt, DType::I32),
            (sl, DType::I32),
        )
        .unwrap_err()
    }

    #[test]
    fn shapes_are_validated() {
        let ok = AmlaShape::from_parts(
            (&[2, 1, 16, 576], DType::BF16),
            (&[8, 64, 576], DType::F16),
            (&[2, 4], DType::I32),
            (&[2], DType::I32),
        )
        .unwrap();
        assert_eq!((ok.rows(), ok.out_dtype), (16, DType::BF16));
        assert!(matches!(
            shape_error(&[2, 1, 16, 512], &[8, 64, 576], &[2, 4], &[2]),
            Error::Shape { .. }
        ));
        assert!(matches!(
            shape_error(&[2, 1, 16, 576], &[8, 64, 512], &[2, 4], &[2]),
            Error::Shape { .. }
        ));
        assert!(matches!(
            shape_error(&[2, 1, 16, 576], &[8, 0, 576], &[2, 4], &[2]),
            Error::Invalid { .. }
        ));
        assert!(matches!(
            shape_error(&[2, 1, 16, 576], &[8, 48, 576], &[2, 4], &[2]),
            Error::Invalid { .. }
        ));
        assert!(matches!(
            shape_error(&[2, 1, 16, 576], &[8, 64, 576], &[3, 4], &[2]),
            Error::Shape { .. }
        ));
        assert!(matches!(
            shape_error(&[2, 1, 16, 576], &[8, 64, 576], &[2, 4], &[3]),
            Error::Shape { .. }
        ));
        assert!(matches!(
            AmlaShape::from_parts(
                (&[2, 1, 16, 576], DType::BF16),
                (&[8, 64, 576], DType::BF16),
                (&[2, 4], DType::U32),
                (&[2], DType::I32),
            ),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn p_precision_cache_follows_the_cache_dtype() {
        assert_eq!(PPrecision::Cache.resolve(DType::BF16), PPrecision::BF16);
        assert_eq!(PPrecision::Cache.resolve(DType::U8), PPrecision::BF16);
        assert_eq!(PPrecision::Cache.resolve(DType::F16), PPrecision::F16);
        assert_eq!(PPrecision::Cache.resolve(DType::F32), PPrecision::F16);
        assert_eq!(PPrecision::F16.resolve(DType::BF16), PPrecision::F16);
        assert_eq!(PPrecision::F32.resolve(DType::U8), PPrecision::F32);
        let p: PPrecision = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!((p, p.round_code()), (PPrecision::BF16, 2));
    }

    #[test]
    fn caches_in_flashmla_and_packed_layouts() {
        let ok = |kv: &[usize], dtype| {
            AmlaShape::from_parts(
                (&[2, 1, 16, 576], DType::BF16),
                (kv, dtype),
                (&[2, 4], DType::I32),
                (&[2], DType::I32),
            )
        };
        let four = ok(&[8, 64, 1, 576], DType::BF16).unwrap();
        assert_eq!(four, ok(&[8, 64, 576], DType::BF16).unwrap());
        assert!(four.kv_shape_matches(&[8, 64, 1, 576]) && four.kv_shape_matches(&[8, 64, 576]));
        assert!(!four.kv_shape_matches(&[8, 64, 2, 576]));
        let packed = ok(&[8, 64, 1, 656], DType::U8).unwrap();
        assert_eq!(packed.kv_shape(), [8, 64, 656]);
        assert!(packed.check_format(KvFormat::Fp8).is_ok());
        assert!(packed.check_format(KvFormat::Float).is_err());
        assert!(four.check_format(KvFormat::Int8).is_err());
        for (kv, dtype) in [
            (&[8, 64, 2, 576][..], DType::BF16),
            (&[8, 64, 576][..], DType::U8),
            (&[8, 64, 656][..], DType::BF16),
            (&[8, 64, 1, 1, 576][..], DType::BF16),
        ] {
            assert!(
                matches!(ok(kv, dtype), Err(Error::Shape { .. })),
                "{kv:?} {dtype}"
            );
        }
    }

    #[test]
    fn indices_are_validated() {
        let s = AmlaShape::from_parts(
            (&[2, 1, 1, 576], DType::F32),
            (&[3, 16, 576], DType::F32),
            (&[2, 2], DType::I32),
            (&[2], DType::I32),
        )
        .unwrap();
        // Unused entries may hold anything.
        assert_eq!(
            s.validate_indices(&[2, -1, 0, 1], &[16, 17]).unwrap(),
            vec![16, 17]
        );
        assert!(s.validate_indices(&[2, -1, 0, 3], &[16, 17]).is_err());
        assert!(s.validate_indices(&[2, -1, 0, 1], &[16, 33]).is_err());
        assert!(s.validate_indices(&[2, -1, 0, 1], &[-1, 3]).is_err());
        assert_eq!(s.visible_keys(10, 0, true), 10);
    }
}
