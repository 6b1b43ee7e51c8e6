//! The pieces every operator plan is made of: the `key=value` shape arguments, checked size
//! arithmetic, buffer layouts checked against a chip's memories (alignment and capacity), the
//! core split, the host-side tiling struct with its C types, the tiling key, the workspace, the
//! op_host registration, the kernel's shape and the roofline estimate.

use std::collections::BTreeMap;

use serde::Serialize;

use super::chips::{ChipSpec, CoreArch, Memory};
use super::timeline::Timeline;
use crate::error::{Error, Result};

/// The `op` of every error this module returns.
pub const OP: &str = "ascend-plan";

/// The error for a size whose arithmetic overflows: the shape cannot be planned.
pub fn too_large(what: &str) -> Error {
    Error::invalid(
        OP,
        what,
        "the size overflows 64-bit arithmetic: this shape cannot be planned",
    )
}

/// `a * b`, or an error naming `what` when it overflows.
pub fn mul(what: &str, a: u64, b: u64) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| too_large(what))
}

/// `a + b`, or an error naming `what` when it overflows.
pub fn add(what: &str, a: u64, b: u64) -> Result<u64> {
    a.checked_add(b).ok_or_else(|| too_large(what))
}

/// The product of `factors`, or an error naming `what` when it overflows.
pub fn product(what: &str, factors: &[u64]) -> Result<u64> {
    factors.iter().try_fold(1u64, |acc, &f| mul(what, acc, f))
}

/// `x` rounded up to a multiple of `to` (`to > 0`), or an error naming `what` on overflow.
pub fn round_up(what: &str, x: u64, to: u64) -> Result<u64> {
    mul(what, x.div_ceil(to), to)
}

/// Element types a plan can use for tensors in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    Bf16,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        2
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The GE data type of this element type in an op_host registration.
    pub fn ge(self) -> &'static str {
        match self {
            Dtype::F16 => "DT_FLOAT16",
            Dtype::Bf16 => "DT_BF16",
        }
    }

    /// Refuse bf16 on a chip without it.
    pub fn check(self, chip: &ChipSpec) -> Result<()> {
        if self == Dtype::Bf16 && !chip.features.bf16 {
            return Err(Error::unsupported(
                OP,
                format!(
                    "dtype=bf16 on {}: the Atlas inference AI Core has no bf16 (data, cube or \
                     atomics); use dtype=f16",
                    chip.name
                ),
            ));
        }
        Ok(())
    }
}

/// The `key=value` shape arguments of one request, checked against the keys an operator knows.
pub struct Args {
    values: BTreeMap<String, String>,
}

impl Args {
    /// Parse `shape`, refusing keys outside `known` and keys given twice.
    pub fn parse(op: &str, shape: &[(String, String)], known: &[&str]) -> Result<Self> {
        let mut values = BTreeMap::new();
        for (key, value) in shape {
            if !known.contains(&key.as_str()) {
                return Err(Error::Format {
                    what: format!("{op} shape flag"),
                    why: format!("unknown key {key:?}; {op} takes {known:?}"),
                });
            }
            if values.insert(key.clone(), value.clone()).is_some() {
                return Err(Error::Format {
                    what: format!("{op} shape flag"),
                    why: format!("{key:?} given twice"),
                });
            }
        }
        Ok(Args { values })
    }

    /// The text of `key`, if given.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// A positive integer that fits the `uint32_t` field of the tiling struct it ends up in,
    /// or `None` when not given (`auto` also means not given).
    pub fn count(&self, key: &str) -> Result<Option<u64>> {
        match self.text(key) {
            None | Some("auto") => Ok(None),
            Some(text) => match text.parse::<u64>() {
                Ok(v) if v > u64::from(u32::MAX) => Err(Error::invalid(
                    OP,
                    key,
                    format!(
                        "{v} does not fit the uint32_t field of the tiling struct (at most {})",
                        u32::MAX
                    ),
                )),
                Ok(v) if v > 0 => Ok(Some(v)),
                _ => Err(Error::invalid(
                    OP,
                    key,
                    format!("{text:?} is not a positive integer"),
                )),
            },
        }
    }

    /// A positive number, or `None` when not given.
    pub fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.text(key) {
            None => Ok(None),
            Some(text) => match text.parse::<f64>() {
                Ok(v) if v > 0.0 && v.is_finite() => Ok(Some(v)),
                _ => Err(Error::invalid(
                    OP,
                    key,
                    format!("{text:?} is not a positive number"),
                )),
            },
        }
    }

    /// One of `choices`, or `default` when not given.
    pub fn choice<'a>(
        &'a self,
        key: &str,
        choices: &[&'a str],
        default: &'a str,
    ) -> Result<&'a str> {
        match self.text(key) {
            None => Ok(default),
            Some(text) => choices.iter().copied().find(|c| *c == text).ok_or_else(|| {
                Error::invalid(OP, key, format!("{text:?} is not one of {choices:?}"))
            }),
        }
    }

    /// The element type (`dtype=f16|bf16`, default f16), refused where the chip lacks it.
    pub fn dtype(&self, chip: &ChipSpec) -> Result<Dtype> {
        let dtype = match self.choice("dtype", &["f16", "bf16"], "f16")? {
            "bf16" => Dtype::Bf16,
            _ => Dtype::F16,
        };
        dtype.check(chip)?;
        Ok(dtype)
    }
}

/// A tile size: fixed when given, otherwise the candidates to try, best first.
pub fn tile_candidates(given: Option<u64>, auto: &[u64]) -> Vec<u64> {
    match given {
        Some(v) => vec![v],
        None => auto.to_vec(),
    }
}

/// Refuse a tile size that is not a multiple of `fractal` (16 for the 16-bit cube fractal, 32
/// for the K side of the int8 fractal).
pub fn require_multiple(key: &str, value: u64, fractal: u64) -> Result<()> {
    if !value.is_multiple_of(fractal) {
        return Err(Error::invalid(
            OP,
            key,
            format!(
                "{value} is not a multiple of {fractal} (the cube works on whole fractals: \
                 16 x 16 for 16-bit operands, 16 x 32 for int8)"
            ),
        ));
    }
    Ok(())
}

/// Refuse a tile size that is not a multiple of the 16-element cube fractal.
pub fn require_fractal_multiple(key: &str, value: u64) -> Result<()> {
    require_multiple(key, value, 16)
}

/// Which core a buffer lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CoreRole {
    /// A2 cube core.
    Aic,
    /// A2 vector core.
    Aiv,
    /// 310P AI core (cube and vector together).
    AiCore,
}

impl CoreRole {
    pub fn name(self) -> &'static str {
        match self {
            CoreRole::Aic => "AIC",
            CoreRole::Aiv => "AIV",
            CoreRole::AiCore => "AI core",
        }
    }

    /// The core that owns `memory` on `chip`.
    pub fn of(chip: &ChipSpec, memory: Memory) -> Self {
        match (chip.arch, memory) {
            (CoreArch::Coupled, _) => CoreRole::AiCore,
            (CoreArch::Separated, Memory::Ub) => CoreRole::Aiv,
            (CoreArch::Separated, _) => CoreRole::Aic,
        }
    }
}

/// One on-chip buffer of a plan (per core).
#[derive(Clone, Debug, Serialize)]
pub struct Buffer {
    /// The kernel the buffer belongs to (a chain of kernels has several).
    pub kernel: String,
    pub core: CoreRole,
    pub memory: Memory,
    pub name: String,
    /// Logical shape and element type, e.g. `[128, 576] f16`.
    pub shape: String,
    /// Bytes of one copy as the shape needs them.
    pub bytes: u64,
    /// Bytes of one copy after rounding up to the memory's alignment.
    pub aligned_bytes: u64,
    /// 2 for double buffering (load the next tile while computing on this one).
    pub copies: u32,
    /// Start of the first copy; each copy starts on an aligned address.
    pub offset: u64,
}

impl Buffer {
    pub fn total(&self) -> u64 {
        self.aligned_bytes * u64::from(self.copies)
    }
}

/// How full one memory is.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryUse {
    pub kernel: String,
    pub core: CoreRole,
    pub memory: Memory,
    pub used: u64,
    pub capacity: u64,
    /// Alignment every buffer start in this memory respects.
    pub alignment: u64,
}

/// Buffers laid out one after another in each memory, each copy on an aligned start.
pub struct Layout<'c> {
    chip: &'c ChipSpec,
    kernel: String,
    label: String,
    buffers: Vec<Buffer>,
    /// The first size that overflowed while adding buffers.
    overflow: Option<Error>,
}

impl<'c> Layout<'c> {
    /// `kernel` names the kernel the buffers belong to; `label` names the plan in errors, e.g.
    /// `amla on 910B2`.
    pub fn new(chip: &'c ChipSpec, kernel: &str, label: impl Into<String>) -> Self {
        Layout {
            chip,
            kernel: kernel.to_string(),
            label: label.into(),
            buffers: Vec::new(),
            overflow: None,
        }
    }

    /// Add `copies` copies of a buffer of `dims` elements of `elem_bytes` bytes to `memory`.
    pub fn add(
        &mut self,
        memory: Memory,
        name: &str,
        shape: String,
        dims: &[u64],
        elem_bytes: u64,
        copies: u32,
    ) {
        if self.overflow.is_some() {
            return;
        }
        let sized = product(name, dims)
            .and_then(|n| mul(name, n, elem_bytes))
            .and_then(|bytes| {
                let aligned = round_up(name, bytes.max(1), memory.alignment())?;
                mul(name, aligned, u64::from(copies))?;
                Ok((bytes, aligned))
            });
        let (bytes, aligned_bytes) = match sized {
            Ok(sizes) => sizes,
            Err(e) => {
                self.overflow = Some(e);
                return;
            }
        };
        let core = CoreRole::of(self.chip, memory);
        let offset = self
            .buffers
            .iter()
            .filter(|b| b.memory == memory && b.core == core)
            .try_fold(0u64, |acc, b| add(name, acc, b.total()));
        let offset = match offset {
            Ok(offset) => offset,
            Err(e) => {
                self.overflow = Some(e);
                return;
            }
        };
        self.buffers.push(Buffer {
            kernel: self.kernel.clone(),
            core,
            memory,
            name: name.to_string(),
            shape,
            bytes,
            aligned_bytes,
            copies,
            offset,
        });
    }

    /// Check every memory against the chip: an [`Error::Limit`] naming the buffers of the first
    /// memory that overflows, else the buffers and how full each memory is.
    pub fn finish(self) -> Result<(Vec<Buffer>, Vec<MemoryUse>)> {
        if let Some(e) = self.overflow {
            return Err(e);
        }
        let mut uses = Vec::new();
        for memory in Memory::ALL {
            let mut cores: Vec<CoreRole> = self
                .buffers
                .iter()
                .filter(|b| b.memory == memory)
                .map(|b| b.core)
                .collect();
            cores.dedup();
            for core in cores {
                let here: Vec<&Buffer> = self
                    .buffers
                    .iter()
                    .filter(|b| b.memory == memory && b.core == core)
                    .collect();
                let used = here
                    .iter()
                    .try_fold(0u64, |acc, b| add(memory.name(), acc, b.total()))?;
                let capacity = self.chip.capacity(memory);
                if used > capacity {
                    let list: Vec<String> = here
                        .iter()
                        .map(|b| format!("{} {} x {}", b.name, b.copies, b.shape))
                        .collect();
                    return Err(Error::Limit {
                        what: format!(
                            "{}: {} of one {} ({}) for {}",
                            self.label,
                            memory.name(),
                            core.name(),
                            self.chip.name,
                            list.join(", ")
                        ),
                        need: used,
                        max: capacity,
                    });
                }
                uses.push(MemoryUse {
                    kernel: self.kernel.clone(),
                    core,
                    memory,
                    used,
                    capacity,
                    alignment: memory.alignment(),
                });
            }
        }
        Ok((self.buffers, uses))
    }
}

/// How the work is spread over the cores.
#[derive(Clone, Debug, Serialize)]
pub struct CoreSplit {
    /// What kind of kernel: `mixed AIC + AIV (1:2)`, `vector only (AIV)`, `AI core`.
    pub kernel: String,
    /// The launch's blockDim (AIC count for mixed A2 kernels, each with its AIV pair).
    pub block_dim: u32,
    pub cube_cores_used: u32,
    pub vector_cores_used: u32,
    /// What one unit of work is.
    pub work_unit: String,
    pub work_units: u64,
    /// Units on the busiest core.
    pub units_per_core: u64,
}

/// Work `units` spread over `cores`: (cores used, units on the busiest core).
pub fn spread(units: u64, cores: u32) -> (u32, u64) {
    let used = units.min(u64::from(cores)) as u32;
    (used.max(1), units.div_ceil(u64::from(cores)).max(1))
}

/// Try tile choices best first: the first that lays out, or the last choice's error.
pub fn first_fit<T, P>(
    choices: impl IntoIterator<Item = T>,
    mut build: impl FnMut(T) -> Result<P>,
) -> Result<P> {
    let mut last = None;
    for choice in choices {
        match build(choice) {
            Ok(plan) => return Ok(plan),
            Err(e @ Error::Limit { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::invalid(OP, "tiles", "no tile size to try")))
}

/// Peak figures used for the bound: the chip's public or estimated ones, or the caller's own.
#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    /// Dense fp16 cube throughput of the whole chip, TFLOP/s (the int8 cube runs at twice it).
    pub cube_fp16_tflops: Option<f64>,
    /// Off-chip memory bandwidth of the whole chip, GB/s.
    pub mem_gbps: Option<f64>,
    pub source: String,
}

impl Peak {
    /// The chip's figures, overridden by `peak_tflops=` / `mem_gbps=` (the caller's number
    /// wins); `None` when there is neither a figure nor an override for either.
    pub fn resolve(chip: &ChipSpec, args: &Args) -> Result<Option<Peak>> {
        let tflops = args.number("peak_tflops")?;
        let gbps = args.number("mem_gbps")?;
        let (chip_cube, cube_basis) = match chip.cube_peak() {
            Some((v, basis)) => (Some(v), Some(basis)),
            None => (None, None),
        };
        let chip_mem = chip.public_mem_gbps;
        let cube = tflops.or(chip_cube);
        let mem = gbps.or(chip_mem.map(|m| m.0));
        if cube.is_none() && mem.is_none() {
            return Ok(None);
        }
        let mut source = Vec::new();
        match (tflops, cube_basis) {
            (Some(_), _) => source.push("cube: caller-supplied (peak_tflops=)".to_string()),
            (None, Some(basis)) => source.push(format!("cube: {basis}")),
            (None, None) => {}
        }
        match (gbps, chip_mem) {
            (Some(_), _) => source.push("memory: caller-supplied (mem_gbps=)".to_string()),
            (None, Some((_, basis))) => source.push(format!("memory: {basis}")),
            (None, None) => {}
        }
        Ok(Some(Peak {
            cube_fp16_tflops: cube,
            mem_gbps: mem,
            source: source.join("; "),
        }))
    }
}

/// Which roof a core hits first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Compute,
    Memory,
}

/// The roofline estimate of the busiest core. Model arithmetic on public, estimated or
/// caller-supplied peaks: an estimate, never a measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Roofline {
    /// Cube operations the busiest core executes (tiles padded to the fractal).
    pub cube_flops_per_core: f64,
    /// True when the cube works on int8 operands, at twice the fp16 rate.
    pub int8_cube: bool,
    /// Off-chip (HBM or LPDDR) bytes the busiest core reads and writes for inputs and outputs.
    pub gm_bytes_per_core: f64,
    /// Bytes through global-memory workspace (AIC <-> AIV exchange, partial results); mostly
    /// served by L2, reported apart from the input and output bytes.
    pub workspace_bytes_per_core: f64,
    /// Cube operations per off-chip byte.
    pub intensity: f64,
    pub peak: Option<Peak>,
    /// Operations per byte where the chip's two roofs meet (at the rate this plan's cube uses).
    pub ridge: Option<f64>,
    /// Time at the per-core cube peak, microseconds.
    pub compute_us: Option<f64>,
    /// Time at the core's share of the memory bandwidth (all busy cores stream at once).
    pub memory_us: Option<f64>,
    pub bound: Option<Bound>,
}

impl Roofline {
    /// The estimate for the busiest core when `cores_used` cores of `chip` run at once.
    pub fn estimate(
        chip: &ChipSpec,
        cores_used: u32,
        work: RooflineWork,
        peak: Option<Peak>,
    ) -> Self {
        let rate = if work.int8_cube { 2.0 } else { 1.0 };
        let intensity = if work.gm_bytes > 0.0 {
            work.cube_flops / work.gm_bytes
        } else {
            0.0
        };
        let cube = peak.as_ref().and_then(|p| p.cube_fp16_tflops);
        let mem = peak.as_ref().and_then(|p| p.mem_gbps);
        let compute_us = cube.map(|tflops| {
            let core_flops = tflops * rate * 1e12 / f64::from(chip.cube_cores);
            work.cube_flops / core_flops * 1e6
        });
        let memory_us = mem.map(|gbps| {
            let core_bytes = gbps * 1e9 / f64::from(cores_used.max(1));
            work.gm_bytes / core_bytes * 1e6
        });
        let ridge = match (cube, mem) {
            (Some(tflops), Some(gbps)) => Some(tflops * rate * 1e12 / (gbps * 1e9)),
            _ => None,
        };
        let bound = match (compute_us, memory_us) {
            (Some(c), Some(m)) if c > m => Some(Bound::Compute),
            (Some(_), Some(_)) => Some(Bound::Memory),
            _ => None,
        };
        Roofline {
            cube_flops_per_core: work.cube_flops,
            int8_cube: work.int8_cube,
            gm_bytes_per_core: work.gm_bytes,
            workspace_bytes_per_core: work.workspace_bytes,
            intensity,
            peak,
            ridge,
            compute_us,
            memory_us,
            bound,
        }
    }
}

/// What the busiest core moves and computes, the input of [`Roofline::estimate`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RooflineWork {
    pub cube_flops: f64,
    pub gm_bytes: f64,
    pub workspace_bytes: f64,
    pub int8_cube: bool,
}

/// One stage of the Ascend C kernel a plan describes, and the WGSL it replaces.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// Stage name in the Ascend C kernel.
    pub name: String,
    /// The unit that runs it: `AIC` or `AIV` on A2, `AI core (cube)` or `AI core (vector)` on
    /// 310P.
    pub unit: String,
    /// The WGSL entry point and step it replaces (`file: entry, step`).
    pub wgsl: String,
    /// What it does on Ascend: queues, pipes, copies, flags.
    pub work: String,
}

impl Stage {
    pub fn new(name: &str, unit: &str, wgsl: &str, work: impl Into<String>) -> Self {
        Stage {
            name: name.to_string(),
            unit: unit.to_string(),
            wgsl: wgsl.to_string(),
            work: work.into(),
        }
    }
}

/// The C type of a tiling-struct field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CType {
    U32,
    U64,
    F32,
}

impl CType {
    pub fn c_name(self) -> &'static str {
        match self {
            CType::U32 => "uint32_t",
            CType::U64 => "uint64_t",
            CType::F32 => "float",
        }
    }
}

/// The value of a tiling-struct field.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FieldValue {
    Int(u64),
    Float(f32),
}

impl std::fmt::Display for FieldValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldValue::Int(v) => write!(f, "{v}"),
            // Enough digits to read the same f32 back.
            FieldValue::Float(v) => write!(f, "{v:?}"),
        }
    }
}

/// One field of the host-side tiling struct (`TilingData`) a port hands to its kernel.
#[derive(Clone, Debug, Serialize)]
pub struct TilingField {
    /// Field name in the tiling struct.
    pub name: String,
    pub ctype: CType,
    pub value: FieldValue,
    /// Where the value comes from in our WGSL configuration or host code.
    pub origin: String,
}

impl TilingField {
    /// A `uint32_t` field; a value that does not fit is an error naming the field.
    pub fn u32(name: &str, value: u64, origin: &str) -> Result<Self> {
        if value > u64::from(u32::MAX) {
            return Err(Error::invalid(
                OP,
                name,
                format!(
                    "{value} does not fit the uint32_t field {name} of the tiling struct: this \
                     shape cannot be planned"
                ),
            ));
        }
        Ok(Self::with(name, CType::U32, FieldValue::Int(value), origin))
    }

    /// A `uint64_t` field (byte sizes and offsets).
    pub fn u64(name: &str, value: u64, origin: &str) -> Self {
        Self::with(name, CType::U64, FieldValue::Int(value), origin)
    }

    /// A `float` field.
    pub fn f32(name: &str, value: f32, origin: &str) -> Self {
        Self::with(name, CType::F32, FieldValue::Float(value), origin)
    }

    fn with(name: &str, ctype: CType, value: FieldValue, origin: &str) -> Self {
        TilingField {
            name: name.to_string(),
            ctype,
            value,
            origin: origin.to_string(),
        }
    }
}

/// One part of a tiling key: a code path chosen at compile time.
#[derive(Clone, Debug, Serialize)]
pub struct KeyPart {
    pub name: String,
    /// The options in code order: the digit of the key is the index of the choice.
    pub options: Vec<String>,
    pub choice: String,
    pub code: u64,
    /// What the choice replaces in our WGSL (an override constant, a host option).
    pub origin: String,
}

/// The tiling key (`SetTilingKey` on the host, `TILING_KEY_IS` in the kernel): decimal digit `i`
/// of `value` is the code of part `i` (part 0 is the units digit).
#[derive(Clone, Debug, Serialize)]
pub struct TilingKey {
    pub parts: Vec<KeyPart>,
    pub value: u64,
}

impl TilingKey {
    /// Parts as (name, options, chosen option, origin); the chosen option must be one of the
    /// options (a programming error otherwise).
    pub fn new(parts: &[(&str, &[&str], &str, &str)]) -> Self {
        let mut value = 0;
        let mut place = 1;
        let parts = parts
            .iter()
            .map(|(name, options, choice, origin)| {
                let code = options
                    .iter()
                    .position(|o| o == choice)
                    .expect("a key part's choice is one of its options")
                    as u64;
                value += code * place;
                place *= 10;
                KeyPart {
                    name: name.to_string(),
                    options: options.iter().map(|o| o.to_string()).collect(),
                    choice: choice.to_string(),
                    code,
                    origin: origin.to_string(),
                }
            })
            .collect();
        TilingKey { parts, value }
    }
}

/// System workspace the host reserves besides the operator's own (GroupedMatmul's host code
/// reserves 16 MiB, `SYS_WORKSPACE_SIZE` in hicann/ops-transformer
/// gmm/grouped_matmul/op_host/grouped_matmul_host_util.h).
pub const SYSTEM_WORKSPACE: u64 = 16 * 1024 * 1024;

/// The global-memory workspace a launch asks for (`GetWorkspaceSizes(1)[0]`).
#[derive(Clone, Debug, Serialize)]
pub struct Workspace {
    /// Bytes one core (block) uses.
    pub per_core: u64,
    /// Blocks that use it (`blockDim`).
    pub cores: u32,
    /// `per_core x cores`.
    pub user: u64,
    /// [`SYSTEM_WORKSPACE`].
    pub system: u64,
    /// `user + system`: what the tiling function sets.
    pub total: u64,
}

impl Workspace {
    pub fn new(per_core: u64, cores: u32) -> Result<Self> {
        let user = mul("workspace", per_core, u64::from(cores))?;
        Ok(Workspace {
            per_core,
            cores,
            user,
            system: SYSTEM_WORKSPACE,
            total: add("workspace", user, SYSTEM_WORKSPACE)?,
        })
    }
}

/// One input or output of an op_host registration.
#[derive(Clone, Debug, Serialize)]
pub struct Io {
    pub name: String,
    /// GE data type (`DT_FLOAT16`, `DT_INT8`, ...).
    pub dtype: String,
    /// GE format (`FORMAT_ND`, `FORMAT_FRACTAL_NZ`).
    pub format: String,
    pub optional: bool,
}

impl Io {
    pub fn new(name: &str, dtype: &str, format: &str) -> Self {
        Io {
            name: name.to_string(),
            dtype: dtype.to_string(),
            format: format.to_string(),
            optional: false,
        }
    }

    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

/// The op_host registration (`OpDef`) of a kernel for one chip.
#[derive(Clone, Debug, Serialize)]
pub struct OpDefSpec {
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    /// The `AddConfig` SoC name: `ascend910b` or `ascend310p`.
    pub config: String,
}

/// A cross-core flag (`CrossCoreSetFlag<mode, pipe>` / `CrossCoreWaitFlag`) a mixed A2 kernel
/// uses.
#[derive(Clone, Debug, Serialize)]
pub struct CrossFlag {
    pub id: u32,
    pub name: String,
    /// The core and pipe that set it, e.g. `AIC PIPE_FIX`.
    pub set_by: String,
    pub waited_by: String,
    pub meaning: String,
}

/// Flag ids a mixed A2 kernel can use (0-10, CrossCoreSetFlag page of the Ascend C API).
pub const CROSS_FLAG_IDS: u32 = 11;
/// Sets a flag's counter can hold before a wait consumes one (15 in the current API page).
pub const CROSS_FLAG_MAX_PENDING: u32 = 15;

/// The kernel's shape in Ascend C: kernel type, synchronisation, the cube parameter structs.
#[derive(Clone, Debug, Serialize)]
pub struct KernelShape {
    /// `KERNEL_TASK_TYPE_DEFAULT(...)` value, or the plain AI-core kernel on 310P.
    pub kernel_type: String,
    /// Cross-core flags (A2 mixed kernels only).
    pub flags: Vec<CrossFlag>,
    /// How the pipes of one core are synchronised.
    pub sync: String,
    /// The parameter structs the cube path fills, with what each is used for.
    pub params: Vec<(String, String)>,
}

/// A kernel of a plan: its launch, tiling struct, tiling key, workspace, registration and
/// pipeline.
#[derive(Clone, Debug, Serialize)]
pub struct Kernel {
    /// The op type of the kernel (`AmlaDecode`); the tiling struct is `<name>TilingData`.
    pub name: String,
    pub split: CoreSplit,
    /// The host-side tiling struct the kernel reads, each field with its origin in our code.
    pub tiling: Vec<TilingField>,
    pub key: TilingKey,
    pub workspace: Workspace,
    pub op_def: OpDefSpec,
    pub shape: KernelShape,
    /// The pipeline of a few tiles, scheduled in slots.
    pub timeline: Timeline,
}

/// Where a port starts on one chip: the CANN built-in to compare with, the code to start from,
/// the torch_npu call that runs the built-in.
#[derive(Clone, Debug, Serialize)]
pub struct StartPoint {
    /// `compare with`, `port from` or `torch_npu`.
    pub kind: String,
    pub what: String,
    /// Where the claim comes from.
    pub source: String,
}

impl StartPoint {
    pub fn new(kind: &str, what: impl Into<String>, source: &str) -> Self {
        StartPoint {
            kind: kind.to_string(),
            what: what.into(),
            source: source.to_string(),
        }
    }
}

/// How one piece of our WGSL kernel's structure becomes a piece of the Ascend C kernel.
#[derive(Clone, Debug, Serialize)]
pub struct Correspondence {
    /// The WGSL side: a workgroup-memory array, a barrier, a loop.
    pub wgsl: String,
    /// The Ascend C side: a queue or buffer in UB/L1/L0, an event, a flag.
    pub ascend: String,
}

impl Correspondence {
    pub fn new(wgsl: impl Into<String>, ascend: impl Into<String>) -> Self {
        Correspondence {
            wgsl: wgsl.into(),
            ascend: ascend.into(),
        }
    }
}

/// The unit that runs cube work on `chip`.
pub fn cube_unit(chip: &ChipSpec) -> &'static str {
    match chip.arch {
        CoreArch::Separated => "AIC",
        CoreArch::Coupled => "AI core (cube)",
    }
}

/// The unit that runs vector work on `chip`.
pub fn vector_unit(chip: &ChipSpec) -> &'static str {
    match chip.arch {
        CoreArch::Separated => "AIV",
        CoreArch::Coupled => "AI core (vector)",
    }
}

/// The `AddConfig` SoC name of `chip` in an op_host registration.
pub fn soc_config(chip: &ChipSpec) -> &'static str {
    match chip.arch {
        CoreArch::Separated => "ascend910b",
        CoreArch::Coupled => "ascend310p",
    }
}
