//! The pieces every operator plan is made of: the `key=value` shape arguments, buffer layouts
//! checked against a chip's memories (alignment and capacity), the core split and the roofline
//! estimate.

use std::collections::BTreeMap;

use serde::Serialize;

use super::chips::{ChipSpec, CoreArch, Memory};
use crate::error::{Error, Result};

/// The `op` of every error this module returns.
pub const OP: &str = "ascend-plan";

/// Round `x` up to a multiple of `to`.
pub fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
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

    /// A positive integer, or `None` when not given (`auto` also means not given).
    pub fn count(&self, key: &str) -> Result<Option<u64>> {
        match self.text(key) {
            None | Some("auto") => Ok(None),
            Some(text) => match text.parse::<u64>() {
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

/// Refuse a tile size that is not a multiple of the 16-element cube fractal.
pub fn require_fractal_multiple(key: &str, value: u64) -> Result<()> {
    if !value.is_multiple_of(16) {
        return Err(Error::invalid(
            OP,
            key,
            format!("{value} is not a multiple of 16 (the cube works on 16 x 16 fractals)"),
        ));
    }
    Ok(())
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
    label: String,
    buffers: Vec<Buffer>,
}

impl<'c> Layout<'c> {
    /// `label` names the plan in errors, e.g. `amla on 910B2`.
    pub fn new(chip: &'c ChipSpec, label: impl Into<String>) -> Self {
        Layout {
            chip,
            label: label.into(),
            buffers: Vec::new(),
        }
    }

    /// Add `copies` copies of a `bytes`-byte buffer to `memory`.
    pub fn add(&mut self, memory: Memory, name: &str, shape: String, bytes: u64, copies: u32) {
        let core = CoreRole::of(self.chip, memory);
        let offset = self
            .buffers
            .iter()
            .filter(|b| b.memory == memory && b.core == core)
            .map(Buffer::total)
            .sum();
        self.buffers.push(Buffer {
            core,
            memory,
            name: name.to_string(),
            shape,
            bytes,
            aligned_bytes: round_up(bytes.max(1), memory.alignment()),
            copies,
            offset,
        });
    }

    /// Check every memory against the chip: an [`Error::Limit`] naming the buffers of the first
    /// memory that overflows, else the buffers and how full each memory is.
    pub fn finish(self) -> Result<(Vec<Buffer>, Vec<MemoryUse>)> {
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
                let used: u64 = here.iter().map(|b| b.total()).sum();
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
    /// What kind of kernel: `mixed AIC + AIV`, `vector only`, `AI core`.
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

/// Peak figures used for the bound: public ones from the chip table or the caller's own.
#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    pub cube_fp16_tflops: f64,
    pub mem_gbps: f64,
    pub source: String,
}

impl Peak {
    /// The chip's public figures, overridden by `peak_tflops=` / `mem_gbps=`; `None` when
    /// neither a public figure nor an override gives both.
    pub fn resolve(chip: &ChipSpec, args: &Args) -> Result<Option<Peak>> {
        let tflops = args.number("peak_tflops")?;
        let gbps = args.number("mem_gbps")?;
        let public = chip.public_peak;
        let cube = tflops.or(public.map(|p| p.cube_fp16_tflops));
        let mem = gbps.or(public.map(|p| p.mem_gbps));
        Ok(match (cube, mem) {
            (Some(cube_fp16_tflops), Some(mem_gbps)) => Some(Peak {
                cube_fp16_tflops,
                mem_gbps,
                source: match (tflops.is_some() || gbps.is_some(), public) {
                    (false, Some(p)) => format!("public figure: {}", p.basis),
                    (true, Some(p)) => format!("caller-supplied, rest public figure: {}", p.basis),
                    (_, None) => "caller-supplied (peak_tflops=, mem_gbps=)".to_string(),
                },
            }),
            _ => None,
        })
    }
}

/// Which roof a core hits first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Compute,
    Memory,
}

/// The roofline estimate of the busiest core. Model arithmetic on public or caller-supplied
/// peaks: an estimate, never a measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Roofline {
    /// Cube FLOPs the busiest core executes (tiles padded to the 16-row fractal).
    pub cube_flops_per_core: f64,
    /// Off-chip (HBM or LPDDR) bytes the busiest core reads and writes for inputs and outputs.
    pub gm_bytes_per_core: f64,
    /// Bytes through global-memory workspace (AIC <-> AIV exchange, partial results); mostly
    /// served by L2, reported apart from the input and output bytes.
    pub workspace_bytes_per_core: f64,
    /// Cube FLOPs per off-chip byte.
    pub intensity: f64,
    pub peak: Option<Peak>,
    /// FLOP/byte where the chip's two roofs meet.
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
        cube_flops: f64,
        hbm_bytes: f64,
        workspace_bytes: f64,
        peak: Option<Peak>,
    ) -> Self {
        let intensity = if hbm_bytes > 0.0 {
            cube_flops / hbm_bytes
        } else {
            0.0
        };
        let (ridge, compute_us, memory_us, bound) = match &peak {
            Some(p) => {
                let core_flops = p.cube_fp16_tflops * 1e12 / f64::from(chip.cube_cores);
                let core_bytes = p.mem_gbps * 1e9 / f64::from(cores_used.max(1));
                let compute = cube_flops / core_flops * 1e6;
                let memory = hbm_bytes / core_bytes * 1e6;
                let bound = if compute > memory {
                    Bound::Compute
                } else {
                    Bound::Memory
                };
                (
                    Some(p.cube_fp16_tflops * 1e12 / (p.mem_gbps * 1e9)),
                    Some(compute),
                    Some(memory),
                    Some(bound),
                )
            }
            None => (None, None, None, None),
        };
        Roofline {
            cube_flops_per_core: cube_flops,
            gm_bytes_per_core: hbm_bytes,
            workspace_bytes_per_core: workspace_bytes,
            intensity,
            peak,
            ridge,
            compute_us,
            memory_us,
            bound,
        }
    }
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

/// One field of the host-side tiling struct (`TilingData`) a port hands to its kernel.
#[derive(Clone, Debug, Serialize)]
pub struct TilingField {
    /// Field name in the tiling struct.
    pub name: String,
    pub value: String,
    /// Where the value comes from in our WGSL configuration or host code.
    pub origin: String,
}

impl TilingField {
    pub fn new(name: &str, value: impl ToString, origin: &str) -> Self {
        TilingField {
            name: name.to_string(),
            value: value.to_string(),
            origin: origin.to_string(),
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
