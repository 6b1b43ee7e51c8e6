//! The traits of the case registry that `fusedops check` and `fusedops bench` walk. Each operator
//! implements [`Operator`] and describes its cases; a case knows its bytes and FLOPs, prepares
//! inputs and the CPU reference, records the fused kernels (and a baseline, where one exists) and
//! verifies the GPU result. The list of operators is assembled above the operators, in
//! [`crate::suite::operators`], so that this floor never names them.

use std::collections::BTreeMap;

use crate::check::{Comparison, Tolerance};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::tensor::Tensor;

/// Named tensors in and out of `fusedops run` (the tensors of a safetensors file).
pub type NamedTensors = BTreeMap<String, Tensor>;

/// The input tensor `name`, or an [`Error::Invalid`] naming it.
pub fn input<'a>(op: &'static str, inputs: &'a NamedTensors, name: &str) -> Result<&'a Tensor> {
    inputs.get(name).ok_or_else(|| {
        let have: Vec<&str> = inputs.keys().map(String::as_str).collect();
        Error::invalid(
            op,
            format!("input tensor {name:?}"),
            format!("missing (the file has {have:?})"),
        )
    })
}

/// Parse an operator's parameters from JSON (`--params`); `null` means all defaults.
pub fn params_from_json<T: serde::de::DeserializeOwned + Default>(
    op: &'static str,
    params: &serde_json::Value,
) -> Result<T> {
    if params.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(params.clone()).map_err(|e| Error::Format {
        what: format!("{op} params"),
        why: e.to_string(),
    })
}

/// How large the case table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Small shapes that run in seconds on a CPU adapter (tests, CI, plain `fusedops check`).
    Ci,
    /// The real preset sizes (`fusedops check --full`).
    Full,
    /// The headline benchmark suite at the size this adapter affords:
    /// [`Operator::headline`] at full size on a GPU, shrunk on a CPU adapter.
    Bench,
}

/// Identity of a case: what `--op`, `--preset` and `--case key=value` filter on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseInfo {
    pub op: &'static str,
    /// Short label, unique within the operator, e.g. `b=128 h=16 sk=4096 bf16`.
    pub name: String,
    /// Preset the shapes come from (`deepseek-v3`, `pangu-pro-moe`) or `custom`.
    pub preset: String,
    /// Every parameter as key=value text, for filters and the JSON report.
    pub params: Vec<(String, String)>,
}

impl CaseInfo {
    /// Whether this case matches every `key=value` filter (keys `op`, `preset`, `name` too).
    pub fn matches(&self, filters: &[(String, String)]) -> bool {
        filters.iter().all(|(k, v)| match k.as_str() {
            "op" => self.op == v,
            "preset" => &self.preset == v,
            "name" => &self.name == v,
            _ => self.params.iter().any(|(pk, pv)| pk == k && pv == v),
        })
    }
}

/// One output checked against the reference.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Checked {
    pub output: String,
    pub shape: Vec<usize>,
    pub comparison: Comparison,
}

impl Checked {
    pub fn new(output: impl Into<String>, shape: &[usize], comparison: Comparison) -> Self {
        Checked {
            output: output.into(),
            shape: shape.to_vec(),
            comparison,
        }
    }
}

/// What bounds a case on the roofline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Memory,
    Compute,
}

/// How much of a case's output the reference checks: all of it, or a sample of rows, heads,
/// tokens or sequences on cases too large for a whole CPU reference.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    pub checked: usize,
    pub total: usize,
    /// What is counted: `rows`, `tokens`, `sequences`.
    pub unit: &'static str,
}

impl Coverage {
    pub fn new(checked: usize, total: usize, unit: &'static str) -> Self {
        Coverage {
            checked,
            total,
            unit,
        }
    }

    pub fn is_sampled(&self) -> bool {
        self.checked < self.total
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_sampled() {
            write!(f, "{}/{} {}", self.checked, self.total, self.unit)
        } else {
            write!(f, "all {} {}", self.total, self.unit)
        }
    }
}

/// What the host half of a case may depend on from the device it prepares for: AMLA's
/// emulation reference follows the tiles its plan picks from the workgroup-memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub max_workgroup_storage: u32,
}

impl Target {
    /// An NVIDIA GPU through Vulkan (48 KiB of workgroup memory per workgroup): what
    /// `fusedops bench --host-only` prepares for.
    pub const NVIDIA_VULKAN: Target = Target {
        max_workgroup_storage: 48 << 10,
    };

    pub fn of(gpu: &Gpu) -> Self {
        Target {
            max_workgroup_storage: gpu.caps.max_workgroup_storage,
        }
    }
}

/// A case of an operator.
pub trait Case {
    fn info(&self) -> CaseInfo;
    /// Bytes the fused operator must move at minimum (inputs read once, outputs written once).
    fn bytes(&self) -> u64;
    /// Useful floating-point operations.
    fn flops(&self) -> u64;
    /// Whether the kernels that run use tensor cores (selects the compute roof; `fusedops
    /// bench` then also times the case with cooperative matrices off, beside it).
    fn uses_tensor_cores(&self, _gpu: &Gpu) -> bool {
        false
    }
    /// The host half of preparing, which needs no GPU: generate the inputs the host must hold
    /// and compute the CPU reference (of sampled rows on large cases). Inputs only the GPU reads
    /// are made on the device from a seed by [`HostPrepared::upload`] ([`crate::seeded`]).
    fn host(&self, target: &Target) -> Result<Box<dyn HostPrepared>>;
    /// [`Case::host`] for `gpu`, then [`HostPrepared::upload`] to it.
    fn prepare<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        self.host(&Target::of(gpu))?.upload(gpu)
    }
}

/// A case's inputs and reference on the host, ready to go to any number of devices.
pub trait HostPrepared {
    /// Upload the inputs (making the seeded ones on the device), plan the operator and its
    /// baseline. May be called again for another device: the host work is shared (host work
    /// that depends on the device's plan is redone when the plan differs from the target's).
    fn upload<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>>;
    /// How much of the output [`Prepared::verify`] compares with the reference.
    fn coverage(&self) -> Coverage;
}

/// A case with its inputs on the GPU.
pub trait Prepared {
    /// The path or variant the operator chose, as reported (e.g. `gemv+gemm, subgroups`).
    fn variant(&self) -> String;
    /// Record the fused operator.
    fn record(&self, rec: &mut Recorder) -> Result<()>;
    /// Read the outputs of the last run back and compare them with the reference.
    fn verify(&self) -> Result<Vec<Checked>>;
    /// Name of the baseline this operator is compared with (unfused chain, per-expert loop).
    fn baseline(&self) -> Option<String> {
        None
    }
    /// Record the baseline; only called when [`Prepared::baseline`] is `Some`.
    fn record_baseline(&self, _rec: &mut Recorder) -> Result<()> {
        Err(crate::error::Error::unsupported("registry", "baseline"))
    }
}

/// An operator with its case tables.
pub trait Operator: Sync {
    fn name(&self) -> &'static str;
    /// The cases at this scale. Bench cases may depend on the adapter (sizes that fit).
    fn cases(&self, scale: Scale, gpu: &Gpu) -> Vec<Box<dyn Case>>;
    /// The operator's part of the headline suite that `fusedops bench` runs: at full size, or
    /// at the size a CPU adapter finishes. Needs no GPU (`fusedops bench --host-only`).
    fn headline(&self, full: bool) -> Vec<Box<dyn Case>>;
    /// The kernel paths this adapter gets (feature-dependent choices), as (what, choice) pairs
    /// for `fusedops info`.
    fn paths(&self, _gpu: &Gpu) -> Vec<(String, String)> {
        Vec::new()
    }
    /// `fusedops run`: run on user tensors (names, shapes and params in the operator's docs).
    fn run_named(
        &self,
        gpu: &Gpu,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors>;
    /// `fusedops run --reference`: the CPU reference outputs for the same inputs.
    fn reference_named(
        &self,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors>;
    /// Tolerance for comparing output `name` with its reference, given the inputs and params.
    fn tolerance(
        &self,
        output: &str,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Tolerance;
}
