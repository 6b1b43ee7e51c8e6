//! The traits of the case registry that `fusedops check` and `fusedops bench` walk. Each operator
//! implements [`Operator`] and describes its cases; a case knows its bytes and FLOPs, prepares
//! inputs and the CPU reference, records the fused kernels (and a baseline, where one exists) and
//! verifies the GPU result. The list of operators is assembled above the operators, in
//! [`crate::suite::operators`], so that this floor never names them.

use std::collections::BTreeMap;

use crate::check::{Comparison, Tolerance};
use crate::error::{Error, Result};
use crate::gpu::{Fragment, Gpu, Recorder};
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

/// Refuse tensors the operator does not take: a misspelled optional input (`row_scales`) must
/// not be ignored silently.
pub fn check_input_names(op: &'static str, inputs: &NamedTensors, accepted: &[&str]) -> Result<()> {
    match inputs
        .keys()
        .find(|name| !accepted.contains(&name.as_str()))
    {
        None => Ok(()),
        Some(name) => Err(Error::invalid(
            op,
            format!("input tensor {name:?}"),
            format!("not an input of {op} (accepted: {accepted:?})"),
        )),
    }
}

/// Parse the text of `--params`: JSON in which no object has a key twice (plain JSON parsing
/// keeps the last one silently). What the value must hold is checked by [`params_from_json`].
pub fn parse_params(text: &str) -> Result<serde_json::Value> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = StrictJson::deserialize(&mut de).and_then(|v| de.end().map(|()| v.0));
    value.map_err(|e| Error::Format {
        what: "--params".into(),
        why: e.to_string(),
    })
}

/// A JSON value whose objects have distinct keys.
struct StrictJson(serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictJson)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        // JSON text has no NaN or infinity, so the number is finite.
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictJson(value) = map.next_value()?;
            if object.insert(key.clone(), value).is_some() {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {key:?} (each parameter may be given once)"
                )));
            }
        }
        Ok(object.into())
    }
}

/// Parse an operator's parameters from JSON (`--params`); `null` means all defaults. The value
/// must be an object of named fields: unknown fields are refused by the params structs, arrays
/// (which serde would read positionally) and numbers an f32 cannot hold (which would become
/// ±inf or 0) anywhere in it are refused here, and every error names the field, the value and
/// what is allowed.
pub fn params_from_json<T: serde::de::DeserializeOwned + Default>(
    op: &'static str,
    params: &serde_json::Value,
) -> Result<T> {
    let error = |why: String| Error::Format {
        what: format!("{op} params"),
        why,
    };
    match params {
        serde_json::Value::Null => return Ok(T::default()),
        serde_json::Value::Object(_) => {}
        other => {
            return Err(error(format!(
                "expected a JSON object of named fields ({{\"field\": value, ...}}), got {}",
                json_kind(other)
            )));
        }
    }
    check_param_values("", params).map_err(error)?;
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            error(e.inner().to_string())
        } else {
            error(format!("{path}: {}", e.inner()))
        }
    })
}

/// What kind of JSON value `v` is, with the value itself (for error messages).
fn json_kind(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(_) => format!("the array {v}"),
        serde_json::Value::Object(_) => format!("the object {v}"),
        _ => format!("{v}"),
    }
}

/// No parameter takes a list, and every number fits an f32 (the widest float a parameter has;
/// integers beyond it are out of range for every integer field too).
fn check_param_values(path: &str, value: &serde_json::Value) -> std::result::Result<(), String> {
    match value {
        serde_json::Value::Array(_) => Err(format!(
            "{path}: {} is a list; no parameter takes one (give an object of named fields)",
            json_kind(value)
        )),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(key, v)| {
            let path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            check_param_values(&path, v)
        }),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(v) if n.is_f64() && (v as f32).is_infinite() => Err(format!(
                "{path}: {v:e} is outside the f32 range (magnitude at most {:e})",
                f32::MAX
            )),
            Some(v) if n.is_f64() && v != 0.0 && v as f32 == 0.0 => Err(format!(
                "{path}: {v:e} is too small for an f32 (it would become 0)"
            )),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
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
/// emulation reference follows the kernel its plan picks (cooperative-matrix or SIMT) and that
/// kernel's tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub max_workgroup_storage: u32,
    /// The cooperative-matrix fragment and the fixed subgroup size, where the device has both.
    pub coop: Option<(Fragment, u32)>,
}

impl Target {
    /// An NVIDIA GPU through Vulkan (48 KiB of workgroup memory per workgroup, 16x16 f16 -> f32
    /// fragments, subgroups of 32): what `fusedops bench --host-only` prepares for.
    pub const NVIDIA_VULKAN: Target = Target {
        max_workgroup_storage: 48 << 10,
        coop: Some((Fragment::Size16, 32)),
    };

    pub fn of(gpu: &Gpu) -> Self {
        Target {
            max_workgroup_storage: gpu.caps.max_workgroup_storage,
            coop: gpu.caps.coop_fragment().zip(gpu.caps.fixed_subgroup_size()),
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
