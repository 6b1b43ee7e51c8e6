//! Tile configurations of the two SwiftGMM paths (the GEMM path on plain f32 FMA or on
//! cooperative matrices), their defaults and candidate sets, and the tiling cache: the best
//! configuration per (adapter, dtypes, layout, k, n, rows-per-group bucket, GEMM kernel), found by
//! measuring the candidates once and kept in a JSON file between runs.
//!
//! The cache file is `swiftgmm_tiling.json` in `$FUSEDOPS_CACHE_DIR` if set, else
//! `$XDG_CACHE_HOME/fusedops`, else `$HOME/.cache/fusedops`. `FUSEDOPS_TILING_CACHE=off` disables
//! the file (nothing read or written; lookups give the defaults, tuning results live in memory).
//! [`load_cache`], [`clear_cache`], [`rebuild_cache`] and [`tune_shape`] are the entry points for
//! a command-line tuner.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use super::{
    Activation, ExpertWeights, GemmKernel, GmmArgs, GmmPlan, Layout, Mode, Options, Tiling,
};
use crate::error::{Error, Result};
use crate::gpu::{Fragment, Gpu};
use crate::tensor::{DType, Tensor};
use crate::util::{hashed, utc_now};

const OP: &str = "swiftgmm";

/// Largest GEMV row block (the kernel keeps one accumulator set per row in registers).
pub const MAX_GEMV_ROWS: u32 = 16;
/// Largest number of weight vectors an invocation loads per column and chunk.
pub const MAX_GEMV_UNROLL: u32 = 4;
/// Largest number of 16-byte vectors a GEMM invocation stages per operand and k step.
pub const MAX_GEMM_STAGE_LOADS: u32 = 8;
/// Largest accumulator fragments per subgroup, and weight fragments per k step, of the
/// cooperative-matrix kernel (its function-scope fragment arrays).
pub const MAX_COOP_ACC: u32 = 8;
pub const MAX_COOP_FN: u32 = 4;
/// Version of the cache file format; files of another version are ignored.
pub const CACHE_VERSION: u32 = 2;
/// File name inside the cache directory.
pub const CACHE_FILE: &str = "swiftgmm_tiling.json";

/// The GEMV-like path: a tile is (group, row block, weight-column block) over the whole of k.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemvConfig {
    /// Rows per row block (1..=16); a group larger than this takes several blocks when the GEMV
    /// path is forced.
    pub rows: u32,
    /// Invocations per workgroup.
    pub workgroup: u32,
    /// Invocations sharing one weight column's k range: lanes along k for `[e, n, k]` weights,
    /// k slices for `[e, k, n]`. The partial sums are reduced in workgroup memory.
    pub split_k: u32,
    /// 16-byte weight vectors each invocation loads per column before any arithmetic (1..=4).
    pub unroll: u32,
}

/// The tiled GEMM path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmConfig {
    /// Rows per tile.
    pub tm: u32,
    /// Weight columns per tile (with SwiGLU half gate, half up).
    pub tn: u32,
    /// k per workgroup-memory stage.
    pub tk: u32,
    /// Rows per invocation (4 or 8).
    pub rm: u32,
    /// Weight columns per invocation (4 or 8; 8 with SwiGLU).
    pub rn: u32,
}

/// The GEMM path on cooperative matrices (`shaders/swiftgmm_coop.wgsl`), in fragments so that one
/// configuration serves 8x8 and 16x16: a tile is `sg_m x sg_n` subgroups, each owning
/// `frag_m x frag_n` accumulator fragments, staged `k_frags` fragments deep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoopGemmConfig {
    /// Subgroups along the rows of a tile.
    pub sg_m: u32,
    /// Subgroups along its columns.
    pub sg_n: u32,
    /// Accumulator fragments per subgroup along rows.
    pub frag_m: u32,
    /// Along columns (SwiGLU: half gate, half up, so even).
    pub frag_n: u32,
    /// Fragments along k per workgroup-memory stage.
    pub k_frags: u32,
}

impl Default for CoopGemmConfig {
    /// The H200 design point (docs/swiftgmm.md): 8 subgroups of 4 x 2 fragments, 128 x 128 x 32
    /// at 16x16.
    fn default() -> Self {
        CoopGemmConfig {
            sg_m: 2,
            sg_n: 4,
            frag_m: 4,
            frag_n: 2,
            k_frags: 2,
        }
    }
}

/// Sizes the cooperative-matrix kernel derives from a [`CoopGemmConfig`] for one fragment size,
/// subgroup size, layout and dtypes (u64: unvalidated configurations must not overflow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopGeometry {
    /// Tile rows, weight columns, and k per stage.
    pub bm: u64,
    pub bn: u64,
    pub bk: u64,
    /// Invocations per workgroup.
    pub workgroup: u64,
    /// 16-byte vectors each invocation loads per stage, of x and of the weights.
    pub x_loads: u64,
    pub w_loads: u64,
    /// Workgroup memory in bytes: the f16 x and weight stages (rows padded by 8) and two f32
    /// fragments per subgroup for the epilogue.
    pub workgroup_bytes: u64,
}

impl CoopGemmConfig {
    /// The kernel's sizes with `fragment` and subgroups of `subgroup` invocations.
    pub fn geometry(
        &self,
        fragment: Fragment,
        subgroup: u32,
        layout: Layout,
        x_dtype: DType,
        w_dtype: DType,
    ) -> CoopGeometry {
        let f = u64::from(fragment.size());
        let subgroups = u64::from(self.sg_m) * u64::from(self.sg_n);
        let bm = u64::from(self.sg_m) * u64::from(self.frag_m) * f;
        let bn = u64::from(self.sg_n) * u64::from(self.frag_n) * f;
        let bk = u64::from(self.k_frags) * f;
        let workgroup = (subgroups * u64::from(subgroup)).max(1);
        let b_halves = match layout {
            Layout::Kn => bk * (bn + 8),
            Layout::Nk => bn * (bk + 8),
        };
        let x_epv = u64::from(elements_per_vector(x_dtype));
        let w_epv = u64::from(elements_per_vector(w_dtype));
        CoopGeometry {
            bm,
            bn,
            bk,
            workgroup,
            x_loads: (bm * bk / x_epv).div_ceil(workgroup),
            w_loads: (bk * bn / w_epv).div_ceil(workgroup),
            workgroup_bytes: 2 * (bm * (bk + 8) + b_halves) + 4 * subgroups * 2 * f * f,
        }
    }

    /// Check the configuration against the kernel's rules and the device limits.
    pub fn validate(
        &self,
        fragment: Fragment,
        key: &ShapeKey,
        swiglu: bool,
        limits: &KernelLimits,
    ) -> Result<()> {
        let c = self;
        if [c.sg_m, c.sg_n, c.frag_m, c.frag_n, c.k_frags].contains(&0) {
            return Err(bad("coop", format!("every size must be >= 1, got {c:?}")));
        }
        if c.frag_n > MAX_COOP_FN || u64::from(c.frag_m) * u64::from(c.frag_n) > MAX_COOP_ACC.into()
        {
            return Err(bad(
                "coop",
                format!(
                    "frag_n {} must be at most {MAX_COOP_FN} and frag_m x frag_n {} x {} at most \
                     {MAX_COOP_ACC} accumulator fragments",
                    c.frag_n, c.frag_m, c.frag_n
                ),
            ));
        }
        if swiglu && !c.frag_n.is_multiple_of(2) {
            return Err(bad(
                "coop",
                format!(
                    "SwiGLU needs an even frag_n (gate and up), got {}",
                    c.frag_n
                ),
            ));
        }
        if limits.subgroup_size == 0 {
            return Err(Error::unsupported(
                OP,
                "cooperative-matrix GEMM without a fixed subgroup size",
            ));
        }
        let geo = c.geometry(
            fragment,
            limits.subgroup_size,
            key.layout,
            key.x_dtype,
            key.w_dtype,
        );
        let max_loads = u64::from(MAX_GEMM_STAGE_LOADS);
        if geo.x_loads > max_loads || geo.w_loads > max_loads {
            return Err(bad(
                "coop",
                format!(
                    "a stage of {}x{}x{} needs {} x and {} weight loads per invocation, at most {}",
                    geo.bm, geo.bn, geo.bk, geo.x_loads, geo.w_loads, MAX_GEMM_STAGE_LOADS
                ),
            ));
        }
        let invocations = u32::try_from(geo.workgroup).unwrap_or(u32::MAX);
        limits.check_workgroup("coop gemm", invocations, geo.workgroup_bytes)
    }

    /// Short description, e.g. `128x128x32 sg2x4 fr4x2` at 16x16.
    pub fn describe(&self, fragment: Fragment) -> String {
        let f = fragment.size();
        format!(
            "{}x{}x{} sg{}x{} fr{}x{}",
            self.sg_m * self.frag_m * f,
            self.sg_n * self.frag_n * f,
            self.k_frags * f,
            self.sg_m,
            self.sg_n,
            self.frag_m,
            self.frag_n
        )
    }
}

/// The kernel the GEMM path runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GemmPath {
    /// Plain f32 FMA (`gemm` in `shaders/swiftgmm_matmul.wgsl`).
    Simt,
    /// Cooperative matrices of this fragment size (`shaders/swiftgmm_coop.wgsl`).
    Coop(Fragment),
}

impl GemmPath {
    /// `simt`, `coop8x8` or `coop16x16`, as reports and the cache file name it.
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Simt => "simt",
            GemmPath::Coop(Fragment::Size8) => "coop8x8",
            GemmPath::Coop(Fragment::Size16) => "coop16x16",
        }
    }
}

impl From<GemmPath> for String {
    fn from(path: GemmPath) -> String {
        path.name().to_string()
    }
}

impl TryFrom<String> for GemmPath {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        [
            GemmPath::Simt,
            GemmPath::Coop(Fragment::Size8),
            GemmPath::Coop(Fragment::Size16),
        ]
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| format!("unknown GEMM path {name:?} (simt, coop8x8 or coop16x16)"))
    }
}

/// A complete tiling: both paths and the row count at which groups switch path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TileConfig {
    /// Groups of at most this many rows take the GEMV path in [`Mode::Auto`] (0: none do).
    pub threshold: u32,
    pub gemv: GemvConfig,
    /// The GEMM path's tiles on the SIMT kernel.
    pub gemm: GemmConfig,
    /// The GEMM path's tiles on cooperative matrices (the default when not given).
    #[serde(default)]
    pub coop: CoopGemmConfig,
}

/// Sizes the GEMV kernel derives from a [`GemvConfig`] for one layout and weight dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvGeometry {
    /// Weight columns per tile.
    pub weight_cols: u32,
    /// Output columns per tile.
    pub out_cols: u32,
    /// k elements per staged chunk of x.
    pub x_chunk: u32,
    /// Floats of split-k scratch.
    pub scratch: u32,
    /// Workgroup memory in bytes.
    pub workgroup_bytes: u64,
}

/// Elements per 16-byte weight vector.
pub fn elements_per_vector(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 4,
        DType::I8 => 16,
        _ => 8,
    }
}

/// The device limits a configuration must respect.
#[derive(Clone, Copy, Debug)]
pub struct KernelLimits {
    pub max_invocations: u32,
    pub max_workgroup_size_x: u32,
    pub max_workgroup_bytes: u64,
    /// The adapter's subgroup size when it has exactly one (0 otherwise): the cooperative-matrix
    /// kernel assigns fragments to subgroups by invocation index.
    pub subgroup_size: u32,
}

impl KernelLimits {
    pub fn of(gpu: &Gpu) -> Self {
        let (lo, hi) = gpu.caps.subgroup_size;
        KernelLimits {
            max_invocations: gpu.caps.max_invocations_per_workgroup,
            max_workgroup_size_x: gpu.device.limits().max_compute_workgroup_size_x,
            max_workgroup_bytes: gpu.caps.max_workgroup_storage as u64,
            subgroup_size: if lo == hi && lo.is_power_of_two() {
                lo
            } else {
                0
            },
        }
    }

    pub(crate) fn check_workgroup(&self, what: &str, invocations: u32, bytes: u64) -> Result<()> {
        let max = self.max_invocations.min(self.max_workgroup_size_x);
        if invocations > max {
            return Err(Error::Limit {
                what: format!("{what} invocations per workgroup"),
                need: invocations as u64,
                max: max as u64,
            });
        }
        if bytes > self.max_workgroup_bytes {
            return Err(Error::Limit {
                what: format!("{what} workgroup memory"),
                need: bytes,
                max: self.max_workgroup_bytes,
            });
        }
        Ok(())
    }
}

fn bad(what: &str, why: String) -> Error {
    Error::invalid(OP, format!("tile configuration {what}"), why)
}

impl GemvConfig {
    /// The kernel's tile sizes for this layout and weight dtype.
    pub fn geometry(&self, layout: Layout, w_dtype: DType, swiglu: bool) -> GemvGeometry {
        let epv = elements_per_vector(w_dtype);
        let groups = self.workgroup / self.split_k.max(1);
        let (weight_cols, x_chunk, scratch) = match layout {
            // Saturating: an unvalidated configuration must not overflow (validate refuses it).
            Layout::Nk => (
                groups.saturating_mul(2),
                self.split_k.saturating_mul(epv).saturating_mul(self.unroll),
                self.workgroup.saturating_mul(2),
            ),
            Layout::Kn => (
                groups.saturating_mul(epv),
                self.split_k.saturating_mul(self.unroll),
                self.workgroup.saturating_mul(epv),
            ),
        };
        let out_cols = if swiglu { weight_cols / 2 } else { weight_cols };
        let floats = self.rows as u64 * x_chunk as u64
            + scratch as u64
            + self.rows as u64 * weight_cols as u64;
        GemvGeometry {
            weight_cols,
            out_cols,
            x_chunk,
            scratch,
            workgroup_bytes: 4 * floats,
        }
    }

    /// Check the configuration against the kernel's rules and the device limits.
    pub fn validate(
        &self,
        layout: Layout,
        w_dtype: DType,
        swiglu: bool,
        limits: &KernelLimits,
    ) -> Result<()> {
        if !(1..=MAX_GEMV_ROWS).contains(&self.rows) {
            return Err(bad(
                "gemv.rows",
                format!("{} not in 1..={MAX_GEMV_ROWS}", self.rows),
            ));
        }
        if !(1..=MAX_GEMV_UNROLL).contains(&self.unroll) {
            return Err(bad(
                "gemv.unroll",
                format!("{} not in 1..={MAX_GEMV_UNROLL}", self.unroll),
            ));
        }
        if self.split_k == 0 || self.workgroup == 0 || !self.workgroup.is_multiple_of(self.split_k)
        {
            return Err(bad(
                "gemv.split_k",
                format!(
                    "{} must divide the workgroup size {}",
                    self.split_k, self.workgroup
                ),
            ));
        }
        // The invocation limit first: the geometry below multiplies the workgroup size.
        limits.check_workgroup("gemv", self.workgroup, 0)?;
        let groups = self.workgroup / self.split_k;
        if swiglu && !groups.is_multiple_of(2) {
            return Err(bad(
                "gemv",
                format!("SwiGLU needs an even number of column groups, got {groups}"),
            ));
        }
        let geo = self.geometry(layout, w_dtype, swiglu);
        if !geo.x_chunk.is_multiple_of(4) {
            return Err(bad(
                "gemv",
                format!(
                    "split_k x unroll = {} must be a multiple of 4 for [e, k, n] weights",
                    geo.x_chunk
                ),
            ));
        }
        limits.check_workgroup("gemv", self.workgroup, geo.workgroup_bytes)
    }
}

impl GemmConfig {
    /// Invocations per workgroup.
    pub fn workgroup(&self) -> u32 {
        let invocations = u64::from(self.tm / self.rm.max(1)) * u64::from(self.tn / self.rn.max(1));
        // Saturating: the limit check then refuses it instead of a wrapped size passing.
        u32::try_from(invocations).unwrap_or(u32::MAX)
    }

    /// Output columns per tile.
    pub fn out_cols(&self, swiglu: bool) -> u32 {
        if swiglu { self.tn / 2 } else { self.tn }
    }

    /// Workgroup memory in bytes.
    pub fn workgroup_bytes(&self) -> u64 {
        4 * self.tk as u64 * (self.tm as u64 + self.tn as u64)
    }

    /// Check the configuration against the kernel's rules and the device limits.
    pub fn validate(&self, swiglu: bool, limits: &KernelLimits) -> Result<()> {
        if ![4, 8].contains(&self.rm) || ![4, 8].contains(&self.rn) {
            return Err(bad(
                "gemm",
                format!("rm and rn must be 4 or 8, got {} and {}", self.rm, self.rn),
            ));
        }
        if self.tm == 0
            || !self.tm.is_multiple_of(self.rm)
            || self.tn == 0
            || !self.tn.is_multiple_of(self.rn)
        {
            return Err(bad(
                "gemm",
                format!(
                    "tm {} and tn {} must be multiples of rm {} and rn {}",
                    self.tm, self.tn, self.rm, self.rn
                ),
            ));
        }
        if self.tk == 0 || !self.tk.is_multiple_of(8) || !self.tn.is_multiple_of(8) {
            return Err(bad(
                "gemm",
                format!(
                    "tk {} and tn {} must be multiples of 8 (one weight vector)",
                    self.tk, self.tn
                ),
            ));
        }
        // Each invocation stages at most 8 vectors per operand (f32 weights: 4 per vector).
        let wg = u64::from(self.workgroup().max(1));
        let x_loads = (u64::from(self.tm) * u64::from(self.tk) / 4).div_ceil(wg);
        let w_loads = (u64::from(self.tk) * u64::from(self.tn) / 4).div_ceil(wg);
        let max_loads = u64::from(MAX_GEMM_STAGE_LOADS);
        if x_loads > max_loads || w_loads > max_loads {
            return Err(bad(
                "gemm",
                format!(
                    "a stage of {}x{}x{} needs {} x and {} weight loads per invocation, at most {}",
                    self.tm, self.tn, self.tk, x_loads, w_loads, MAX_GEMM_STAGE_LOADS
                ),
            ));
        }
        if swiglu && (self.rn != 8 || !self.tn.is_multiple_of(16)) {
            return Err(bad(
                "gemm",
                format!(
                    "SwiGLU needs rn = 8 and tn a multiple of 16, got rn {} tn {}",
                    self.rn, self.tn
                ),
            ));
        }
        limits.check_workgroup("gemm", self.workgroup(), self.workgroup_bytes())
    }
}

impl TileConfig {
    /// Check the threshold, the GEMV path and the GEMM tiles of `key.gemm`'s kernel.
    pub fn validate(&self, key: &ShapeKey, swiglu: bool, limits: &KernelLimits) -> Result<()> {
        if self.threshold > self.gemv.rows {
            return Err(bad(
                "threshold",
                format!(
                    "{} exceeds the GEMV row block {}",
                    self.threshold, self.gemv.rows
                ),
            ));
        }
        self.gemv
            .validate(key.layout, key.w_dtype, swiglu, limits)?;
        match key.gemm {
            GemmPath::Simt => self.gemm.validate(swiglu, limits),
            GemmPath::Coop(fragment) => self.coop.validate(fragment, key, swiglu, limits),
        }
    }

    /// Short description for reports, e.g. `gemv<=8 r8/256/sk16/u2, gemm simt 64x128x16/4x8` or
    /// `gemv<=8 r8/256/sk16/u2, gemm coop16x16 128x128x32 sg2x4 fr4x2`.
    pub fn describe(&self, gemm: GemmPath) -> String {
        let v = &self.gemv;
        let m = &self.gemm;
        let gemm_tiles = match gemm {
            GemmPath::Simt => format!("simt {}x{}x{}/{}x{}", m.tm, m.tn, m.tk, m.rm, m.rn),
            GemmPath::Coop(f) => format!("{} {}", gemm.name(), self.coop.describe(f)),
        };
        format!(
            "gemv<={} r{}/{}/sk{}/u{}, gemm {gemm_tiles}",
            self.threshold, v.rows, v.workgroup, v.split_k, v.unroll
        )
    }
}

/// What a tiling is chosen for: the cache key (with the adapter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShapeKey {
    pub x_dtype: DType,
    pub w_dtype: DType,
    pub layout: Layout,
    pub k: u32,
    pub n: u32,
    /// Average rows per group, rounded up to a power of two (see [`rows_bucket`]).
    pub rows_bucket: u32,
    /// The kernel of the GEMM path.
    pub gemm: GemmPath,
}

impl ShapeKey {
    /// For messages, e.g. `bf16 x, bf16 w, nk, k 5120, n 2688, ~512 rows per group, coop16x16`.
    pub fn describe(&self) -> String {
        format!(
            "{} x, {} w, {}, k {}, n {}, ~{} rows per group, {}",
            self.x_dtype,
            self.w_dtype,
            self.layout.name(),
            self.k,
            self.n,
            self.rows_bucket,
            self.gemm.name()
        )
    }
}

/// The bucket of `routed_rows / experts`: the next power of two, at least 1, at most 65536.
pub fn rows_bucket(routed_rows: usize, experts: usize) -> u32 {
    let avg = routed_rows.div_ceil(experts.max(1)).clamp(1, 1 << 16);
    avg.next_power_of_two() as u32
}

/// The configuration used when the cache has none for a shape.
pub fn default_config(gpu: &Gpu, key: &ShapeKey) -> TileConfig {
    if gpu.is_cpu() {
        // Small workgroups: a CPU driver runs each as a loop with coroutine barriers.
        return TileConfig {
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
            coop: default_coop(gpu, key),
        };
    }
    let gemv = match key.layout {
        // 32 columns x (16 lanes x 16 bytes) per chunk: enough workgroups to fill a large GPU
        // even at 1344 output columns.
        Layout::Nk => GemvConfig {
            rows: 8,
            workgroup: 256,
            split_k: 16,
            unroll: 2,
        },
        // 16 column threads x 16 bytes = 256 contiguous bytes per k row, 16 k slices.
        Layout::Kn => GemvConfig {
            rows: 8,
            workgroup: 256,
            split_k: 16,
            unroll: 4,
        },
    };
    let gemm = if key.rows_bucket >= 128 {
        GemmConfig {
            tm: 128,
            tn: 128,
            tk: 16,
            rm: 8,
            rn: 8,
        }
    } else if key.rows_bucket >= 32 {
        GemmConfig {
            tm: 64,
            tn: 128,
            tk: 16,
            rm: 4,
            rn: 8,
        }
    } else {
        GemmConfig {
            tm: 32,
            tn: 64,
            tk: 32,
            rm: 4,
            rn: 8,
        }
    };
    TileConfig {
        threshold: 8,
        gemv,
        gemm,
        coop: default_coop(gpu, key),
    }
}

/// The default cooperative-matrix tiles: the first of a list, largest first, that fits this
/// adapter's workgroup memory and invocation limits for `key` (with SwiGLU): 128-row tiles for
/// large groups (the H200 design in docs/swiftgmm.md), 64 rows below, 32 x 32 x 16 at 8x8 on CPU
/// drivers (each workgroup runs as a loop there).
fn default_coop(gpu: &Gpu, key: &ShapeKey) -> CoopGemmConfig {
    let c = |sg_m, sg_n, frag_m, frag_n, k_frags| CoopGemmConfig {
        sg_m,
        sg_n,
        frag_m,
        frag_n,
        k_frags,
    };
    let smallest = c(1, 2, 2, 2, 1);
    let list = if gpu.is_cpu() {
        vec![c(2, 2, 2, 2, 2), smallest]
    } else if key.rows_bucket >= 128 {
        vec![
            c(2, 4, 4, 2, 2),
            c(2, 4, 2, 2, 2),
            c(2, 2, 2, 2, 2),
            smallest,
        ]
    } else {
        vec![c(2, 4, 2, 2, 2), c(2, 2, 2, 2, 2), smallest]
    };
    let GemmPath::Coop(fragment) = key.gemm else {
        return list[0];
    };
    let limits = KernelLimits::of(gpu);
    list.into_iter()
        .find(|c| c.validate(fragment, key, true, &limits).is_ok())
        .unwrap_or(smallest)
}

/// The candidates the tuner measures for each path and GEMM kernel (the row block of the GEMV
/// candidates is set by the tuner).
pub struct Candidates {
    pub gemv: Vec<GemvConfig>,
    pub gemm: Vec<GemmConfig>,
    pub coop: Vec<CoopGemmConfig>,
}

/// The candidate lists for this adapter, best-first guesses.
pub fn candidates(gpu: &Gpu) -> Candidates {
    let gemv = |workgroup, split_k, unroll| GemvConfig {
        rows: 8,
        workgroup,
        split_k,
        unroll,
    };
    let gemm = |tm, tn, tk, rm, rn| GemmConfig { tm, tn, tk, rm, rn };
    let coop = |sg_m, sg_n, frag_m, frag_n, k_frags| CoopGemmConfig {
        sg_m,
        sg_n,
        frag_m,
        frag_n,
        k_frags,
    };
    if gpu.is_cpu() {
        return Candidates {
            gemv: vec![gemv(64, 8, 2), gemv(128, 16, 2)],
            gemm: vec![gemm(32, 32, 16, 4, 8), gemm(32, 64, 16, 4, 8)],
            coop: vec![coop(2, 2, 2, 2, 2), coop(1, 2, 2, 2, 2)],
        };
    }
    let (gemv_list, gemm_list) = (
        vec![
            gemv(256, 16, 2),
            gemv(256, 32, 2),
            gemv(256, 8, 4),
            gemv(128, 16, 4),
        ],
        vec![
            gemm(32, 64, 32, 4, 8),
            gemm(64, 64, 16, 4, 8),
            gemm(64, 128, 16, 4, 8),
            gemm(128, 64, 16, 8, 8),
            gemm(128, 128, 16, 8, 8),
        ],
    );
    Candidates {
        gemv: gemv_list,
        gemm: gemm_list,
        // In fragments; at 16x16: 128x128x32, 64x128x32, 128x128x32 with 2x4 fragments,
        // 64x128x64, 64x128x32 on 4 subgroups.
        coop: vec![
            coop(2, 4, 4, 2, 2),
            coop(2, 4, 2, 2, 2),
            coop(4, 2, 2, 4, 2),
            coop(2, 4, 2, 2, 4),
            coop(1, 4, 4, 2, 2),
        ],
    }
}

/// Identity of the adapter in cache entries: name, backend and driver.
pub fn adapter_id(gpu: &Gpu) -> String {
    let i = &gpu.info;
    format!(
        "{} ({:?}, {} {})",
        i.name, i.backend, i.driver, i.driver_info
    )
}

/// One measured row count of the threshold search.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdProbe {
    pub rows: u32,
    pub gemv_us: f64,
    pub gemm_us: f64,
}

/// One cache entry: the winning configuration and what was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub adapter: String,
    pub key: ShapeKey,
    pub config: TileConfig,
    /// Median time of the best GEMV and GEMM candidates on the tuning problem (None: no
    /// candidate of that path was valid here, the defaults are kept).
    pub gemv_us: Option<f64>,
    pub gemm_us: Option<f64>,
    pub probes: Vec<ThresholdProbe>,
    pub measured_utc: String,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: Vec<CacheEntry>,
}

/// Where the cache file lives, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheLocation {
    /// `FUSEDOPS_TILING_CACHE=off`: no file is read or written.
    Disabled,
    File(PathBuf),
    /// No cache directory can be named (no HOME or XDG_CACHE_HOME): as disabled.
    Unavailable,
}

impl CacheLocation {
    /// The location from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The location from a variable lookup (tests pass their own).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = set("FUSEDOPS_TILING_CACHE") {
            if ["off", "0", "false", "no"].contains(&v.trim().to_ascii_lowercase().as_str()) {
                return CacheLocation::Disabled;
            }
        }
        let dir = if let Some(d) = set("FUSEDOPS_CACHE_DIR") {
            PathBuf::from(d)
        } else if let Some(d) = set("XDG_CACHE_HOME") {
            PathBuf::from(d).join("fusedops")
        } else if let Some(h) = set("HOME") {
            PathBuf::from(h).join(".cache").join("fusedops")
        } else {
            return CacheLocation::Unavailable;
        };
        CacheLocation::File(dir.join(CACHE_FILE))
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            CacheLocation::File(p) => Some(p),
            _ => None,
        }
    }
}

/// The tiling cache: entries in memory, optionally backed by a JSON file.
#[derive(Clone, Debug, Default)]
pub struct TilingCache {
    path: Option<PathBuf>,
    entries: Vec<CacheEntry>,
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl TilingCache {
    /// A cache with no file.
    pub fn in_memory() -> Self {
        TilingCache::default()
    }

    /// The cache stored at `path`; a missing file is an empty cache, an unreadable or malformed
    /// one an error. A file of another format version is an empty cache (tuning replaces it).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let malformed = |e: serde_json::Error| Error::Format {
            what: path.display().to_string(),
            why: format!("tiling cache: {e}"),
        };
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: serde_json::Value = serde_json::from_str(&text).map_err(malformed)?;
                if file.get("version") == Some(&CACHE_VERSION.into()) {
                    serde_json::from_value::<CacheFile>(file)
                        .map_err(malformed)?
                        .entries
                } else {
                    Vec::new()
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(&path, e)),
        };
        Ok(TilingCache {
            path: Some(path),
            entries,
        })
    }

    /// The cache at the environment's location (in memory when disabled or unavailable).
    pub fn open_default() -> Result<Self> {
        match CacheLocation::from_env() {
            CacheLocation::File(path) => TilingCache::open(path),
            _ => Ok(TilingCache::in_memory()),
        }
    }

    /// The backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn entries(&self) -> &[CacheEntry] {
        &self.entries
    }

    /// The entry for this adapter and shape.
    pub fn get(&self, adapter: &str, key: &ShapeKey) -> Option<&CacheEntry> {
        self.entries
            .iter()
            .find(|e| e.adapter == adapter && &e.key == key)
    }

    /// Add an entry, replacing one for the same adapter and shape.
    pub fn insert(&mut self, entry: CacheEntry) {
        self.entries
            .retain(|e| !(e.adapter == entry.adapter && e.key == entry.key));
        self.entries.push(entry);
    }

    /// Write the entries to the file (atomically: a temporary file renamed over it). No-op for
    /// an in-memory cache.
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
        let file = CacheFile {
            version: CACHE_VERSION,
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| Error::Format {
            what: "tiling cache".into(),
            why: e.to_string(),
        })?;
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))
    }

    /// Drop every entry and delete the file.
    pub fn clear(&mut self) -> Result<()> {
        self.entries.clear();
        if let Some(path) = &self.path {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(path, e)),
            }
        }
        Ok(())
    }

    /// The cached configuration for this shape, or the result of tuning it now (then stored
    /// and saved). A file that cannot be written is a warning, checked before tuning: the tuned
    /// configuration is used and kept in memory.
    pub fn lookup_or_tune(
        &mut self,
        gpu: &Gpu,
        key: &ShapeKey,
        settings: &TuneSettings,
    ) -> Result<TileConfig> {
        self.lookup_or_tune_valid(gpu, key, settings, |_| Ok(()))
    }

    /// As [`TilingCache::lookup_or_tune`]; an entry that `valid` refuses (a hand-edited file, a
    /// changed device limit) is a warning naming the file, and the shape is tuned again.
    fn lookup_or_tune_valid(
        &mut self,
        gpu: &Gpu,
        key: &ShapeKey,
        settings: &TuneSettings,
        valid: impl Fn(&TileConfig) -> Result<()>,
    ) -> Result<TileConfig> {
        if let Some(e) = self.get(&adapter_id(gpu), key) {
            match valid(&e.config) {
                Ok(()) => return Ok(e.config),
                Err(why) => warn(format!(
                    "{}: the entry for {} is not usable ({why}); tuning it again",
                    self.describe(),
                    key.describe()
                )),
            }
        }
        let writable = match self.check_writable() {
            Ok(()) => true,
            Err(e) => {
                warn(format!(
                    "{} cannot be written ({e}): tuning {} for this process only",
                    self.describe(),
                    key.describe()
                ));
                false
            }
        };
        let entry = tune(gpu, key, settings)?;
        let config = entry.config;
        self.insert(entry);
        if writable {
            if let Err(e) = self.save() {
                warn(format!("{} not saved: {e}", self.describe()));
            }
        }
        Ok(config)
    }

    /// Whether [`TilingCache::save`] can write the file: its directory can be made and a file
    /// created there (checked before tuning, which takes seconds).
    fn check_writable(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
        let probe = path.with_extension(format!("json.probe{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|e| io_error(path, e))?;
        std::fs::remove_file(&probe).map_err(|e| io_error(&probe, e))
    }

    /// The file for messages, or "the in-memory tiling cache".
    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("tiling cache {}", p.display()),
            None => "the in-memory tiling cache".to_string(),
        }
    }

    /// Measure every shape this adapter has an entry for again, and save. Returns how many.
    pub fn rebuild(&mut self, gpu: &Gpu, settings: &TuneSettings) -> Result<usize> {
        let adapter = adapter_id(gpu);
        let keys: Vec<ShapeKey> = self
            .entries
            .iter()
            .filter(|e| e.adapter == adapter)
            .map(|e| e.key)
            .collect();
        for key in &keys {
            let entry = tune(gpu, key, settings)?;
            self.insert(entry);
        }
        self.save()?;
        Ok(keys.len())
    }
}

/// Print a warning on stderr, once per distinct message in this process.
fn warn(message: String) {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock().unwrap();
    if seen.insert(message.clone()) {
        eprintln!("warning: swiftgmm: {message}");
    }
}

/// The process-wide cache at the environment's location, loaded on first use. A file that cannot
/// be read or parsed is a warning naming it and counts as empty here (so running never fails
/// because of it); tuning then replaces it.
fn process_cache() -> &'static Mutex<TilingCache> {
    static CACHE: OnceLock<Mutex<TilingCache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        let cache = match CacheLocation::from_env() {
            CacheLocation::File(path) => TilingCache::open(&path).unwrap_or_else(|e| {
                warn(format!("tiling cache ignored, starting empty: {e}"));
                TilingCache {
                    path: Some(path),
                    entries: Vec::new(),
                }
            }),
            _ => TilingCache::in_memory(),
        };
        Mutex::new(cache)
    })
}

/// The cache file at the environment's location, read now (errors if it is malformed).
pub fn load_cache() -> Result<TilingCache> {
    TilingCache::open_default()
}

/// Delete the cache file at the environment's location (even a malformed one) and forget the
/// entries of this process.
pub fn clear_cache() -> Result<()> {
    process_cache().lock().unwrap().entries.clear();
    match CacheLocation::from_env() {
        CacheLocation::File(path) => TilingCache {
            path: Some(path),
            entries: Vec::new(),
        }
        .clear(),
        _ => Ok(()),
    }
}

/// Measure every shape of the cache file again on this adapter and save it.
pub fn rebuild_cache(gpu: &Gpu, settings: &TuneSettings) -> Result<TilingCache> {
    let mut cache = TilingCache::open_default()?;
    cache.rebuild(gpu, settings)?;
    *process_cache().lock().unwrap() = cache.clone();
    Ok(cache)
}

/// Tune one shape now and store it in the cache at the environment's location.
pub fn tune_shape(gpu: &Gpu, key: &ShapeKey, settings: &TuneSettings) -> Result<CacheEntry> {
    let entry = tune(gpu, key, settings)?;
    let mut cache = process_cache().lock().unwrap();
    cache.insert(entry.clone());
    cache.save()?;
    Ok(entry)
}

/// The configuration a plan uses under `tiling`, validated for `key` (with SwiGLU when
/// `swiglu`). A fixed configuration that breaks a rule is an error; a cached one is a warning
/// naming the cache file, and the defaults are used (`Cached`) or the shape is tuned again
/// (`Tune`).
pub fn resolve(gpu: &Gpu, key: &ShapeKey, tiling: &Tiling, swiglu: bool) -> Result<TileConfig> {
    let limits = KernelLimits::of(gpu);
    let valid = |c: &TileConfig| c.validate(key, swiglu, &limits);
    let config = match tiling {
        Tiling::Fixed(config) => *config,
        Tiling::Defaults => default_config(gpu, key),
        Tiling::Cached => {
            let cache = process_cache().lock().unwrap();
            match cache.get(&adapter_id(gpu), key) {
                Some(e) => match valid(&e.config) {
                    Ok(()) => e.config,
                    Err(why) => {
                        warn(format!(
                            "{}: the entry for {} is not usable ({why}); using the defaults",
                            cache.describe(),
                            key.describe()
                        ));
                        default_config(gpu, key)
                    }
                },
                None => default_config(gpu, key),
            }
        }
        Tiling::Tune => process_cache().lock().unwrap().lookup_or_tune_valid(
            gpu,
            key,
            &TuneSettings::for_gpu(gpu),
            valid,
        )?,
    };
    valid(&config)?;
    Ok(config)
}

/// How much the tuner measures.
#[derive(Clone, Debug)]
pub struct TuneSettings {
    pub warmup: usize,
    pub iters: usize,
    /// Weight bytes of the synthetic problem: enough experts to stream more than the caches hold.
    pub weight_bytes: u64,
    pub max_experts: usize,
    /// Rows per group of the GEMM measurement are capped here.
    pub max_rows: u32,
    /// Row counts at which the two paths are compared to place the threshold.
    pub threshold_probes: Vec<u32>,
    /// Use at most this many candidates of each path (the candidate lists are best-first guesses).
    pub max_candidates: usize,
}

impl TuneSettings {
    /// Settings for this adapter (small problems on CPU drivers).
    pub fn for_gpu(gpu: &Gpu) -> Self {
        if gpu.is_cpu() {
            TuneSettings {
                warmup: 1,
                iters: 3,
                weight_bytes: 4 << 20,
                max_experts: 4,
                max_rows: 64,
                threshold_probes: vec![1, 4, 8],
                max_candidates: 2,
            }
        } else {
            TuneSettings {
                warmup: 3,
                iters: 10,
                weight_bytes: 256 << 20,
                max_experts: 64,
                max_rows: 2048,
                threshold_probes: vec![1, 2, 4, 8, 16],
                max_candidates: 8,
            }
        }
    }
}

/// The synthetic problem the tuner times: `experts` groups over shared inputs.
struct TuneProblem {
    x: crate::tensor::DeviceTensor,
    weights: ExpertWeights,
    y: crate::tensor::DeviceTensor,
    offsets: crate::tensor::DeviceTensor,
    experts: usize,
    layout: Layout,
    gemm: GemmPath,
}

impl TuneProblem {
    fn new(gpu: &Gpu, key: &ShapeKey, settings: &TuneSettings, max_rows: u32) -> Result<Self> {
        let (k, n) = (key.k as usize, key.n as usize);
        let expert_bytes = (k * n * key.w_dtype.size()) as u64;
        let experts = (settings.weight_bytes / expert_bytes.max(1))
            .clamp(1, settings.max_experts.max(1) as u64) as usize;
        let m_total = experts * max_rows as usize;
        let x = hashed(&[m_total, k], key.x_dtype, 1, 1.0)?;
        let w_shape = key.layout.weight_shape(experts, k, n);
        let w = hashed(&w_shape, key.w_dtype, 2, 1.0 / (k as f32).sqrt())?;
        Ok(TuneProblem {
            x: gpu.upload(&x)?,
            weights: ExpertWeights::upload(gpu, &w)?,
            y: gpu.zeros(&[m_total, n], DType::F32)?,
            offsets: gpu.zeros(&[experts + 1], DType::U32)?,
            experts,
            layout: key.layout,
            gemm: key.gemm,
        })
    }

    /// Median microseconds of one run with `rows` rows in every group.
    fn time(
        &self,
        gpu: &Gpu,
        settings: &TuneSettings,
        rows: u32,
        mode: Mode,
        config: TileConfig,
    ) -> Result<f64> {
        let offsets: Vec<u32> = (0..=self.experts as u32).map(|g| g * rows).collect();
        gpu.write(
            &self.offsets,
            &Tensor::u32(&[self.experts + 1], offsets.clone())?,
        )?;
        let args = GmmArgs {
            x: &self.x,
            groups: super::DeviceGroups::Offsets(&self.offsets),
            weights: &self.weights,
            row_scale: None,
            y: &self.y,
            host_offsets: Some(&offsets),
        };
        let options = Options {
            layout: self.layout,
            activation: Activation::None,
            mode,
            tiling: Tiling::Fixed(config),
            gemm_kernel: match self.gemm {
                GemmPath::Simt => GemmKernel::Simt,
                GemmPath::Coop(_) => GemmKernel::Coop,
            },
            ..Options::default()
        };
        let plan = GmmPlan::new(gpu, &args, &options)?;
        let timing = gpu.time(settings.warmup, settings.iters, |rec| plan.record(rec))?;
        Ok(timing.median_ns() / 1e3)
    }
}

/// Measure the candidates for `key` and return the winning entry (not stored anywhere).
///
/// 1. every GEMV candidate, forced, with min(bucket, 16) rows per group;
/// 2. every GEMM candidate, forced, with the bucket's rows per group (capped);
/// 3. the best of each at each threshold probe: the threshold is the largest probe up to which
///    GEMV is never slower.
pub fn tune(gpu: &Gpu, key: &ShapeKey, settings: &TuneSettings) -> Result<CacheEntry> {
    let limits = KernelLimits::of(gpu);
    let base = default_config(gpu, key);
    let all = candidates(gpu);
    let gemv_rows = key.rows_bucket.min(MAX_GEMV_ROWS);
    let gemm_rows = key.rows_bucket.min(settings.max_rows).max(1);
    let probe_rows = settings
        .threshold_probes
        .iter()
        .copied()
        .filter(|&r| (1..=MAX_GEMV_ROWS).contains(&r))
        .max()
        .unwrap_or(1);
    let problem = TuneProblem::new(gpu, key, settings, gemm_rows.max(gemv_rows).max(probe_rows))?;
    // Every stored configuration must also hold for SwiGLU (the key does not name the epilogue).
    let valid = |c: &TileConfig| c.validate(key, true, &limits).is_ok();
    let take = settings.max_candidates.max(1);

    let mut best_gemv: Option<(GemvConfig, f64)> = None;
    for cand in all.gemv.into_iter().take(take) {
        let config = TileConfig {
            threshold: 0,
            gemv: GemvConfig {
                rows: gemv_rows,
                ..cand
            },
            ..base
        };
        if !valid(&config) {
            continue;
        }
        let us = problem.time(gpu, settings, gemv_rows, Mode::Gemv, config)?;
        if best_gemv.is_none_or(|(_, b)| us < b) {
            best_gemv = Some((cand, us));
        }
    }
    // The GEMM candidates of the key's kernel; the other kernel's tiles stay the defaults.
    let gemm_candidates: Vec<TileConfig> = match key.gemm {
        GemmPath::Simt => all
            .gemm
            .into_iter()
            .take(take)
            .map(|gemm| TileConfig { gemm, ..base })
            .collect(),
        GemmPath::Coop(_) => all
            .coop
            .into_iter()
            .take(take)
            .map(|coop| TileConfig { coop, ..base })
            .collect(),
    };
    let mut best_gemm: Option<(TileConfig, f64)> = None;
    for cand in gemm_candidates {
        let config = TileConfig {
            threshold: 0,
            ..cand
        };
        if !valid(&config) {
            continue;
        }
        let us = problem.time(gpu, settings, gemm_rows, Mode::Gemm, config)?;
        if best_gemm.is_none_or(|(_, b)| us < b) {
            best_gemm = Some((cand, us));
        }
    }
    let (gemv, gemv_us) = best_gemv.map_or((base.gemv, None), |(c, t)| (c, Some(t)));
    let (gemm_tiles, gemm_us) = best_gemm.map_or((base, None), |(c, t)| (c, Some(t)));
    let (gemm, coop) = (gemm_tiles.gemm, gemm_tiles.coop);

    let mut probes = Vec::new();
    let mut threshold = 0;
    let mut gemv_still_wins = true;
    let mut rows_list = settings.threshold_probes.clone();
    rows_list.retain(|r| (1..=MAX_GEMV_ROWS).contains(r));
    rows_list.sort_unstable();
    rows_list.dedup();
    for rows in rows_list {
        let config = TileConfig {
            threshold: rows,
            gemv: GemvConfig { rows, ..gemv },
            gemm,
            coop,
        };
        if !valid(&config) {
            continue;
        }
        let gemv_us = problem.time(gpu, settings, rows, Mode::Gemv, config)?;
        let gemm_us = problem.time(gpu, settings, rows, Mode::Gemm, config)?;
        probes.push(ThresholdProbe {
            rows,
            gemv_us,
            gemm_us,
        });
        if gemv_still_wins && gemv_us <= gemm_us {
            threshold = rows;
        } else {
            gemv_still_wins = false;
        }
    }
    let config = TileConfig {
        threshold,
        gemv: GemvConfig {
            rows: if threshold > 0 {
                threshold
            } else {
                base.gemv.rows
            },
            ..gemv
        },
        gemm,
        coop,
    };
    Ok(CacheEntry {
        adapter: adapter_id(gpu),
        key: *key,
        config,
        gemv_us,
        gemm_us,
        probes,
        measured_utc: utc_now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_is_a_power_of_two_of_the_average() {
        assert_eq!(rows_bucket(0, 8), 1);
        assert_eq!(rows_bucket(128, 64), 2);
        assert_eq!(rows_bucket(130, 64), 4);
        assert_eq!(rows_bucket(32768, 64), 512);
        assert_eq!(rows_bucket(usize::MAX / 2, 1), 1 << 16);
    }

    #[test]
    fn location_follows_the_environment() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            CacheLocation::from_vars(vars(&[("FUSEDOPS_CACHE_DIR", "/c"), ("HOME", "/h")])),
            CacheLocation::File(PathBuf::from("/c").join(CACHE_FILE))
        );
        assert_eq!(
            CacheLocation::from_vars(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])),
            CacheLocation::File(PathBuf::from("/x/fusedops").join(CACHE_FILE))
        );
        assert_eq!(
            CacheLocation::from_vars(vars(&[("HOME", "/h")])),
            CacheLocation::File(PathBuf::from("/h/.cache/fusedops").join(CACHE_FILE))
        );
        assert_eq!(
            CacheLocation::from_vars(vars(&[
                ("FUSEDOPS_TILING_CACHE", "off"),
                ("FUSEDOPS_CACHE_DIR", "/c")
            ])),
            CacheLocation::Disabled
        );
        assert_eq!(
            CacheLocation::from_vars(vars(&[])),
            CacheLocation::Unavailable
        );
    }

    fn limits() -> KernelLimits {
        KernelLimits {
            max_invocations: 256,
            max_workgroup_size_x: 256,
            max_workgroup_bytes: 32 << 10,
            subgroup_size: 32,
        }
    }

    #[test]
    fn candidate_rules_are_enforced() {
        let ok = GemmConfig {
            tm: 64,
            tn: 64,
            tk: 16,
            rm: 4,
            rn: 8,
        };
        assert!(ok.validate(true, &limits()).is_ok());
        let rn4 = GemmConfig { rn: 4, ..ok };
        assert!(rn4.validate(false, &limits()).is_ok());
        assert!(
            rn4.validate(true, &limits()).is_err(),
            "SwiGLU pairs need rn 8"
        );
        let big = GemmConfig {
            tm: 256,
            tn: 256,
            tk: 32,
            rm: 4,
            rn: 4,
        };
        assert!(matches!(
            big.validate(false, &limits()),
            Err(Error::Limit { .. })
        ));
        let deep = GemmConfig {
            tm: 64,
            tn: 64,
            tk: 64,
            rm: 8,
            rn: 8,
        };
        assert!(
            matches!(deep.validate(false, &limits()), Err(Error::Invalid { .. })),
            "16 staged x vectors per invocation"
        );
        let gemv = GemvConfig {
            rows: 8,
            workgroup: 256,
            split_k: 16,
            unroll: 2,
        };
        assert!(
            gemv.validate(Layout::Nk, DType::BF16, true, &limits())
                .is_ok()
        );
        let rows17 = GemvConfig { rows: 17, ..gemv };
        assert!(
            rows17
                .validate(Layout::Nk, DType::BF16, false, &limits())
                .is_err()
        );
        let odd = GemvConfig { split_k: 3, ..gemv };
        assert!(
            odd.validate(Layout::Kn, DType::F16, false, &limits())
                .is_err()
        );
    }

    fn coop_key(layout: Layout, x_dtype: DType) -> ShapeKey {
        ShapeKey {
            x_dtype,
            w_dtype: DType::BF16,
            layout,
            k: 4096,
            n: 4096,
            rows_bucket: 128,
            gemm: GemmPath::Coop(Fragment::Size16),
        }
    }

    #[test]
    fn coop_geometry_is_the_documented_design() {
        // docs/swiftgmm.md: 128 x 128 x 32 at 16x16 with 8 subgroups of 32, 36 KiB for [e, n, k].
        let c = CoopGemmConfig::default();
        let nk = c.geometry(Fragment::Size16, 32, Layout::Nk, DType::BF16, DType::BF16);
        assert_eq!((nk.bm, nk.bn, nk.bk, nk.workgroup), (128, 128, 32, 256));
        assert_eq!((nk.x_loads, nk.w_loads), (2, 2));
        assert_eq!(nk.workgroup_bytes, 10240 + 10240 + 16384);
        let kn = c.geometry(Fragment::Size16, 32, Layout::Kn, DType::BF16, DType::BF16);
        assert_eq!(kn.workgroup_bytes, 10240 + 8704 + 16384);
        let lavapipe = c.geometry(Fragment::Size8, 8, Layout::Nk, DType::F32, DType::BF16);
        assert_eq!((lavapipe.bm, lavapipe.bn, lavapipe.bk), (64, 64, 16));
        assert_eq!(lavapipe.workgroup_bytes, 3072 + 3072 + 4096);
        assert_eq!(lavapipe.x_loads, 4, "f32 x: 4 elements per vector");
        assert_eq!(c.describe(Fragment::Size16), "128x128x32 sg2x4 fr4x2");
    }

    #[test]
    fn coop_rules_are_enforced() {
        let limits = KernelLimits {
            max_invocations: 1024,
            max_workgroup_size_x: 1024,
            max_workgroup_bytes: 48 << 10,
            subgroup_size: 32,
        };
        let key = coop_key(Layout::Nk, DType::BF16);
        let ok = CoopGemmConfig::default();
        assert!(ok.validate(Fragment::Size16, &key, true, &limits).is_ok());
        let odd = CoopGemmConfig { frag_n: 1, ..ok };
        assert!(odd.validate(Fragment::Size16, &key, false, &limits).is_ok());
        assert!(
            matches!(
                odd.validate(Fragment::Size16, &key, true, &limits),
                Err(Error::Invalid { .. })
            ),
            "SwiGLU needs gate and up fragments"
        );
        let many = CoopGemmConfig { frag_m: 8, ..ok };
        assert!(matches!(
            many.validate(Fragment::Size16, &key, false, &limits),
            Err(Error::Invalid { .. })
        ));
        let zero = CoopGemmConfig { k_frags: 0, ..ok };
        assert!(
            zero.validate(Fragment::Size16, &key, false, &limits)
                .is_err()
        );
        // 128 x 128 x 64 needs 53 KiB: past NVIDIA's 48 KiB.
        let deep = CoopGemmConfig { k_frags: 4, ..ok };
        assert!(matches!(
            deep.validate(Fragment::Size16, &key, false, &limits),
            Err(Error::Limit { .. })
        ));
        // The same at 8x8 fits lavapipe's 32 KiB.
        let lavapipe = KernelLimits {
            max_workgroup_bytes: 32 << 10,
            subgroup_size: 8,
            ..limits
        };
        assert!(
            deep.validate(Fragment::Size8, &key, true, &lavapipe)
                .is_ok()
        );
        let wide = CoopGemmConfig {
            sg_m: 1 << 20,
            ..ok
        };
        assert!(matches!(
            wide.validate(Fragment::Size16, &key, false, &limits),
            Err(Error::Limit { .. })
        ));
        let unfixed = KernelLimits {
            subgroup_size: 0,
            ..limits
        };
        assert!(matches!(
            ok.validate(Fragment::Size16, &key, false, &unfixed),
            Err(Error::Unsupported { .. })
        ));
        // A config naming the SIMT tiles is checked on those only.
        let simt = ShapeKey {
            gemm: GemmPath::Simt,
            ..key
        };
        let config = TileConfig {
            threshold: 8,
            gemv: GemvConfig {
                rows: 8,
                workgroup: 256,
                split_k: 16,
                unroll: 2,
            },
            gemm: GemmConfig {
                tm: 64,
                tn: 64,
                tk: 16,
                rm: 4,
                rn: 8,
            },
            coop: many,
        };
        assert!(config.validate(&simt, true, &limits).is_ok());
        assert!(config.validate(&key, true, &limits).is_err());
    }

    #[test]
    fn gemm_paths_round_trip_by_name() {
        for path in [
            GemmPath::Simt,
            GemmPath::Coop(Fragment::Size8),
            GemmPath::Coop(Fragment::Size16),
        ] {
            let json = serde_json::to_string(&path).unwrap();
            assert_eq!(json, format!("\"{}\"", path.name()));
            assert_eq!(serde_json::from_str::<GemmPath>(&json).unwrap(), path);
        }
        assert!(serde_json::from_str::<GemmPath>("\"coop32x32\"").is_err());
        // Fixed tilings written before the coop field existed still parse.
        let old = r#"{"threshold": 8, "gemv": {"rows": 8, "workgroup": 64, "split_k": 8,
            "unroll": 2}, "gemm": {"tm": 32, "tn": 32, "tk": 16, "rm": 4, "rn": 8}}"#;
        let config: TileConfig = serde_json::from_str(old).unwrap();
        assert_eq!(config.coop, CoopGemmConfig::default());
    }

    #[test]
    fn an_unwritable_cache_is_detected_before_tuning() {
        let dir = std::env::temp_dir().join(format!("swiftgmm-unwritable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The cache directory is a file.
        let file = dir.join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let cache = TilingCache {
            path: Some(file.join(CACHE_FILE)),
            entries: Vec::new(),
        };
        let err = cache.check_writable().unwrap_err();
        assert!(err.to_string().contains(CACHE_FILE) || err.to_string().contains("not-a-dir"));
        assert!(matches!(
            TilingCache::open(file.join(CACHE_FILE)),
            Err(Error::Io { .. })
        ));
        let fine = TilingCache {
            path: Some(dir.join(CACHE_FILE)),
            entries: Vec::new(),
        };
        fine.check_writable().unwrap();
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 1,
            "the probe file is removed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn huge_sizes_are_refused_without_overflow() {
        // Fixed tilings come from users (`--params`): sizes whose products pass u32 must be a
        // Limit error, not an arithmetic overflow.
        let gemv = GemvConfig {
            rows: 8,
            workgroup: 1 << 31,
            split_k: 1,
            unroll: 4,
        };
        for layout in [Layout::Nk, Layout::Kn] {
            assert!(matches!(
                gemv.validate(layout, DType::BF16, false, &limits()),
                Err(Error::Limit { .. })
            ));
        }
        let gemm = GemmConfig {
            tm: 1 << 20,
            tn: 1 << 20,
            tk: 1 << 16,
            rm: 4,
            rn: 8,
        };
        assert!(matches!(
            gemm.validate(false, &limits()),
            Err(Error::Limit { .. })
        ));
        assert_eq!(gemm.workgroup(), u32::MAX, "saturates");
    }

    #[test]
    fn gemv_geometry_per_layout() {
        let c = GemvConfig {
            rows: 8,
            workgroup: 256,
            split_k: 16,
            unroll: 2,
        };
        let nk = c.geometry(Layout::Nk, DType::BF16, false);
        assert_eq!((nk.weight_cols, nk.x_chunk, nk.scratch), (32, 256, 512));
        let kn = c.geometry(Layout::Kn, DType::BF16, true);
        assert_eq!((kn.weight_cols, kn.out_cols, kn.x_chunk), (128, 64, 32));
        let kn32 = c.geometry(Layout::Kn, DType::F32, false);
        assert_eq!(kn32.weight_cols, 64);
    }

    #[test]
    fn cache_file_round_trip_and_clear() {
        let dir = std::env::temp_dir().join(format!("swiftgmm-tiling-unit-{}", std::process::id()));
        let path = dir.join(CACHE_FILE);
        let mut cache = TilingCache::open(&path).unwrap();
        assert!(cache.entries().is_empty());
        let key = ShapeKey {
            x_dtype: DType::BF16,
            w_dtype: DType::BF16,
            layout: Layout::Nk,
            k: 64,
            n: 32,
            rows_bucket: 2,
            gemm: GemmPath::Coop(Fragment::Size16),
        };
        let entry = CacheEntry {
            adapter: "test adapter".into(),
            key,
            config: TileConfig {
                threshold: 4,
                gemv: GemvConfig {
                    rows: 4,
                    workgroup: 64,
                    split_k: 8,
                    unroll: 1,
                },
                gemm: GemmConfig {
                    tm: 32,
                    tn: 32,
                    tk: 16,
                    rm: 4,
                    rn: 8,
                },
                coop: CoopGemmConfig::default(),
            },
            gemv_us: Some(1.0),
            gemm_us: None,
            probes: vec![],
            measured_utc: "2026-01-01 00:00:00".into(),
        };
        cache.insert(entry.clone());
        cache.insert(entry.clone());
        assert_eq!(cache.entries().len(), 1, "same key replaces");
        cache.save().unwrap();
        let back = TilingCache::open(&path).unwrap();
        assert_eq!(back.get("test adapter", &key), Some(&entry));
        assert!(back.get("other adapter", &key).is_none());
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            TilingCache::open(&path),
            Err(Error::Format { .. })
        ));
        // A file of an older format (version 1 had no GEMM kernel in its keys) is empty.
        std::fs::write(&path, r#"{"version": 1, "entries": [{"key": {}}]}"#).unwrap();
        assert!(TilingCache::open(&path).unwrap().entries().is_empty());
        let mut stale = back.clone();
        stale.clear().unwrap();
        assert!(!path.exists() && stale.entries().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
