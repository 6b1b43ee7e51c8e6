//! MerRouter: fused MoE routing, dispatch layout and combine.
//!
//! **Routing** (one kernel): scores are a softmax over all experts or a sigmoid of the logits
//! (`logits [t, e]`, or `hidden [t, h] · gate_weight [h, e]` computed in the same kernel); experts
//! are chosen by
//! - [`Selection::Moge`] (Pangu Pro MoE): `e` experts in `g` equal groups, exactly `k / g` from
//!   every group, listed group by group;
//! - [`Selection::GroupLimited`] (DeepSeek-V3): each group is scored by the best, or the sum of
//!   the best two, of its `score + bias`; the best `k_group` groups are kept, then the top `k`
//!   of their experts are listed best first.
//!
//! Experts are ranked by `score + bias` with a bias, else by the logit itself (the same order,
//! since softmax and sigmoid are monotonic, without rounding ties). Ties go to the lower expert
//! (or group) index. The bias only chooses: a weight is the expert's unbiased score, optionally
//! renormalised over the chosen experts, times `routed_scaling_factor` and the optional
//! per-expert router scale. Outputs `topk_ids [t, k] i32`, `topk_weights [t, k] f32`.
//!
//! **NaN logits** never produce an out-of-range id: a NaN ranks below every number (and below
//! `-inf`), so it is chosen only when a group or the kept set has nothing else left, and among
//! NaNs the lower index wins. With softmax a NaN logit also makes that token's sum NaN, so all of
//! its scores and weights are NaN (the output flags the token instead of hiding the NaN); its ids
//! are then decided by the logits (without a bias) or fall to the lowest indices the mode allows
//! (with a bias). With sigmoid only the NaN expert's own score is NaN; if it is chosen, its weight
//! is NaN, and so is every weight of the token after renormalisation.
//!
//! **Dispatch layout** ([`DispatchLayout`], two more kernels in the same compute pass): per-expert
//! counts, exclusive offsets, the sorted slot list (slot = `token · k + j`, stable by expert,
//! optionally padded per expert to `block_size` rows with the sentinel `t · k`), the inverse map
//! slot → row, the expert of every block of rows, the load per group and the imbalance
//! `(max - min group load) / t`. **Combine** ([`Combiner`]): `out[token] = Σ_j w[token, j] ·
//! y[row(token, j)]`, f32 accumulation.
//!
//! ```
//! use fusedops::gpu::Gpu;
//! use fusedops::ops::merrouter::{self, HostInputs, RouterConfig, Scores};
//! use fusedops::tensor::Tensor;
//!
//! # fn main() -> fusedops::Result<()> {
//! let gpu = Gpu::new()?;
//! let config = RouterConfig::preset("deepseek-v3")?;
//! let (t, e) = (4, config.experts);
//! let logits = Tensor::f32(&[t, e], (0..t * e).map(|i| (i % 7) as f32 * 0.3).collect())?;
//! let bias = Tensor::f32(&[e], vec![0.0; e])?;
//! let inputs = HostInputs { scores: Scores::Logits(&logits), bias: Some(&bias), router_scale: None };
//! let out = merrouter::route_and_dispatch(&gpu, &config, &inputs)?;
//! assert_eq!(out.topk_ids.shape(), &[t, config.top_k]);
//! # Ok(())
//! # }
//! ```

mod baseline;
mod cases;
mod dispatch;
pub mod reference;
mod route;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::{DType, DeviceTensor, Tensor};

pub use baseline::UnfusedChain;
pub use cases::{
    IMBALANCE_TOLERANCE, MIN_MARGIN, MerRouterOp, OPERATOR, WEIGHT_TOLERANCE, check_router_output,
    combine_tolerance, tie_free_gate, tie_free_logits,
};
pub use dispatch::{Combiner, DispatchLayout, Dispatcher, HostLayout};
pub use route::{Router, Routing};

pub(crate) const OP: &str = "merrouter";

/// How logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// Softmax over all experts of a token.
    Softmax,
    /// Sigmoid of every logit.
    Sigmoid,
}

/// How a group is scored in [`Selection::GroupLimited`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupScore {
    /// The best `score + bias` of the group.
    Max,
    /// The sum of the best two `score + bias` of the group (DeepSeek-V3).
    SumTop2,
}

/// How experts are selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Selection {
    /// MoGE: exactly `top_k / groups` experts from every group, listed group by group.
    Moge,
    /// Keep the best `k_group` groups by `group_score`, then the top `k` of their experts.
    GroupLimited {
        k_group: usize,
        group_score: GroupScore,
    },
}

/// What the router computes. Presets: [`RouterConfig::preset`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Experts `e`.
    pub experts: usize,
    /// Equal groups of experts `g` (1: no grouping).
    pub groups: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    pub scoring: Scoring,
    pub selection: Selection,
    /// Divide the chosen weights by their sum.
    pub renormalize: bool,
    /// Every weight is multiplied by this.
    pub routed_scaling_factor: f32,
    /// Rows per block of the dispatch layout: each expert's segment is padded to a multiple of
    /// this (1: no padding).
    pub block_size: usize,
}

/// Preset names accepted by [`RouterConfig::preset`].
pub const PRESETS: [&str; 2] = ["pangu-pro-moe", "deepseek-v3"];

impl RouterConfig {
    /// Pangu Pro MoE: 64 experts in 8 groups, one per group (MoGE), softmax over all 64, no
    /// renormalisation; weights are multiplied by a per-expert router scale (an input).
    pub fn pangu_pro_moe() -> Self {
        RouterConfig {
            experts: 64,
            groups: 8,
            top_k: 8,
            scoring: Scoring::Softmax,
            selection: Selection::Moge,
            renormalize: false,
            routed_scaling_factor: 1.0,
            block_size: 1,
        }
    }

    /// DeepSeek-V3: 256 experts in 8 groups, the 4 best groups by the sum of their top-2 biased
    /// sigmoid scores, top-8 of those, renormalised, scaled by 2.5; the bias is an input.
    pub fn deepseek_v3() -> Self {
        RouterConfig {
            experts: 256,
            groups: 8,
            top_k: 8,
            scoring: Scoring::Sigmoid,
            selection: Selection::GroupLimited {
                k_group: 4,
                group_score: GroupScore::SumTop2,
            },
            renormalize: true,
            routed_scaling_factor: 2.5,
            block_size: 1,
        }
    }

    /// A preset by name (`pangu-pro-moe`, `deepseek-v3`).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "pangu-pro-moe" => Ok(Self::pangu_pro_moe()),
            "deepseek-v3" => Ok(Self::deepseek_v3()),
            _ => Err(Error::invalid(
                OP,
                "preset",
                format!("unknown preset {name:?} (expected one of {PRESETS:?})"),
            )),
        }
    }

    /// Experts per group.
    pub fn group_size(&self) -> usize {
        self.experts / self.groups.max(1)
    }

    /// Groups kept before the top-k (all of them in MoGE).
    pub fn kept_groups(&self) -> usize {
        match self.selection {
            Selection::Moge => self.groups,
            Selection::GroupLimited { k_group, .. } => k_group,
        }
    }

    /// Check that the parameters describe a valid routing.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, why: String| Err(Error::invalid(OP, what, why));
        let (e, g, k) = (self.experts, self.groups, self.top_k);
        if e == 0 || g == 0 {
            return bad(
                "shape",
                format!("experts ({e}) and groups ({g}) must be positive"),
            );
        }
        if !e.is_multiple_of(g) {
            return bad(
                "groups",
                format!("{e} experts do not split into {g} equal groups"),
            );
        }
        if k == 0 || k > e {
            return bad(
                "top_k",
                format!("top_k {k} must be in 1..={e} (the experts)"),
            );
        }
        match self.selection {
            Selection::Moge => {
                if !k.is_multiple_of(g) {
                    return bad(
                        "top_k",
                        format!(
                            "MoGE takes top_k / groups per group: {k} is not a multiple of {g}"
                        ),
                    );
                }
            }
            Selection::GroupLimited {
                k_group,
                group_score,
            } => {
                if k_group == 0 || k_group > g {
                    return bad("k_group", format!("k_group {k_group} must be in 1..={g}"));
                }
                if k > k_group * (e / g) {
                    return bad(
                        "top_k",
                        format!(
                            "top_k {k} exceeds the {} experts of {k_group} kept groups",
                            k_group * (e / g)
                        ),
                    );
                }
                if group_score == GroupScore::SumTop2 && e / g < 2 && k_group < g {
                    return bad(
                        "group_score",
                        format!(
                            "sum-top2 needs at least 2 experts per group, have {}",
                            e / g
                        ),
                    );
                }
            }
        }
        if !self.routed_scaling_factor.is_finite() {
            return bad(
                "routed_scaling_factor",
                format!("{} is not finite", self.routed_scaling_factor),
            );
        }
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return bad(
                "block_size",
                format!("{} must be in 1..={MAX_BLOCK_SIZE}", self.block_size),
            );
        }
        Ok(())
    }
}

/// Largest dispatch block size.
pub const MAX_BLOCK_SIZE: usize = 1 << 16;

/// A tensor's shape and dtype, on the host or the device (so inputs can be checked before upload).
pub trait Shaped {
    fn shape(&self) -> &[usize];
    fn dtype(&self) -> DType;
}

impl Shaped for Tensor {
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
}

impl Shaped for DeviceTensor {
    fn shape(&self) -> &[usize] {
        DeviceTensor::shape(self)
    }
    fn dtype(&self) -> DType {
        DeviceTensor::dtype(self)
    }
}

/// Where the router's logits come from.
#[derive(Debug)]
pub enum Scores<'a, T> {
    /// `logits [t, e]`, f32 | f16 | bf16.
    Logits(&'a T),
    /// The fused gate: `hidden [t, h]` and `weight [h, e]`, f32 | f16 | bf16 each.
    Gate { hidden: &'a T, weight: &'a T },
}

/// Inputs of the router.
#[derive(Debug)]
pub struct RouterInputs<'a, T> {
    pub scores: Scores<'a, T>,
    /// `[e]` f32 | f16 | bf16, added to the scores to choose experts (never to the weights).
    pub bias: Option<&'a T>,
    /// `[e]` f32 | f16 | bf16, multiplies the weight of each expert.
    pub router_scale: Option<&'a T>,
}

pub type HostInputs<'a> = RouterInputs<'a, Tensor>;
pub type DeviceInputs<'a> = RouterInputs<'a, DeviceTensor>;

/// Sizes the inputs describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InputShape {
    pub tokens: usize,
    /// Hidden size of the fused gate; `None` for logits.
    pub hidden: Option<usize>,
}

fn float_input(what: &str, t: &impl Shaped) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::unsupported(
            OP,
            format!("{what} of dtype {} (expected f32, f16 or bf16)", t.dtype()),
        ))
    }
}

/// Check the inputs against the config: shapes, dtypes, and that slot and row numbers fit i32.
pub(crate) fn check_inputs<T: Shaped>(
    config: &RouterConfig,
    inputs: &RouterInputs<'_, T>,
) -> Result<InputShape> {
    config.validate()?;
    let e = config.experts;
    let shape = match inputs.scores {
        Scores::Logits(logits) => {
            float_input("logits", logits)?;
            match logits.shape() {
                &[t, cols] if cols == e => InputShape {
                    tokens: t,
                    hidden: None,
                },
                other => return Err(Error::shape(OP, "logits", other, format!("[t, {e}]"))),
            }
        }
        Scores::Gate { hidden, weight } => {
            float_input("hidden", hidden)?;
            float_input("gate weight", weight)?;
            let (t, h) = match hidden.shape() {
                &[t, h] if h > 0 => (t, h),
                other => return Err(Error::shape(OP, "hidden", other, "[t, h >= 1]")),
            };
            if weight.shape() != [h, e] {
                return Err(Error::shape(
                    OP,
                    "gate weight",
                    weight.shape(),
                    format!("[{h}, {e}] (hidden size, experts)"),
                ));
            }
            InputShape {
                tokens: t,
                hidden: Some(h),
            }
        }
    };
    for (what, tensor) in [("bias", inputs.bias), ("router_scale", inputs.router_scale)] {
        if let Some(tensor) = tensor {
            if tensor.shape() != [e] || !tensor.dtype().is_float() {
                return Err(Error::shape(
                    OP,
                    what,
                    (tensor.shape(), tensor.dtype()),
                    format!("[{e}] f32, f16 or bf16"),
                ));
            }
        }
    }
    reference::row_capacity(shape.tokens, config.top_k, e, config.block_size)?;
    Ok(shape)
}

/// Everything the router computes, read back to the host.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterOutput {
    /// `[t, k]` i32.
    pub topk_ids: Tensor,
    /// `[t, k]` f32.
    pub topk_weights: Tensor,
    pub layout: HostLayout,
}

/// Convenience: upload the inputs, route and build the dispatch layout in one submission, and
/// read everything back. Bad input is refused before anything is uploaded.
pub fn route_and_dispatch(
    gpu: &Gpu,
    config: &RouterConfig,
    inputs: &HostInputs<'_>,
) -> Result<RouterOutput> {
    check_inputs(config, inputs)?;
    let upload = |t: Option<&Tensor>| t.map(|t| gpu.upload(t)).transpose();
    let (first, second) = match inputs.scores {
        Scores::Logits(logits) => (gpu.upload(logits)?, None),
        Scores::Gate { hidden, weight } => (gpu.upload(hidden)?, Some(gpu.upload(weight)?)),
    };
    let bias = upload(inputs.bias)?;
    let router_scale = upload(inputs.router_scale)?;
    let scores = match &second {
        None => Scores::Logits(&first),
        Some(weight) => Scores::Gate {
            hidden: &first,
            weight,
        },
    };
    let device_inputs = DeviceInputs {
        scores,
        bias: bias.as_ref(),
        router_scale: router_scale.as_ref(),
    };
    let router = Router::new(gpu, config, &device_inputs)?;
    gpu.run(|rec| router.record(rec))?;
    router.download(gpu)
}

/// Convenience: the dispatch layout of host `topk_ids [t, k]` i32 (every id in `0..experts`,
/// distinct within a token, as the router produces them).
pub fn dispatch(
    gpu: &Gpu,
    topk_ids: &Tensor,
    experts: usize,
    groups: usize,
    block_size: usize,
) -> Result<HostLayout> {
    dispatch::check_host_ids(topk_ids, experts)?;
    let ids = gpu.upload(topk_ids)?;
    let dispatcher = Dispatcher::new(gpu, &ids, experts, groups, block_size)?;
    gpu.run(|rec| dispatcher.record(rec))?;
    dispatcher.layout().download(gpu)
}

/// Convenience: `out [t, n] = Σ_j weights[t, j] · y[slot_rows[t, j]]` from host tensors, in
/// `out_dtype`. `slot_rows` values must be −1 (no row) or rows of `y`.
pub fn combine(
    gpu: &Gpu,
    topk_weights: &Tensor,
    slot_rows: &Tensor,
    y: &Tensor,
    out_dtype: DType,
) -> Result<Tensor> {
    dispatch::check_host_slot_rows(slot_rows, y)?;
    let (t, n) = dispatch::check_combine_shapes(topk_weights, slot_rows, y, out_dtype)?;
    let weights = gpu.upload(topk_weights)?;
    let rows = gpu.upload(slot_rows)?;
    let y = gpu.upload(y)?;
    let out = gpu.zeros(&[t, n], out_dtype)?;
    let combiner = Combiner::new(gpu, &weights, &rows, &y, &out)?;
    gpu.run(|rec| combiner.record(rec))?;
    gpu.download(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_as_specified() {
        for name in PRESETS {
            RouterConfig::preset(name).unwrap().validate().unwrap();
        }
        let p = RouterConfig::pangu_pro_moe();
        assert_eq!(
            (p.experts, p.groups, p.top_k, p.group_size()),
            (64, 8, 8, 8)
        );
        let d = RouterConfig::deepseek_v3();
        assert_eq!(
            (d.experts, d.kept_groups(), d.routed_scaling_factor),
            (256, 4, 2.5)
        );
        assert!(RouterConfig::preset("mixtral").is_err());
    }

    #[test]
    fn invalid_configs_are_refused() {
        let base = RouterConfig::deepseek_v3();
        let cases = [
            RouterConfig {
                groups: 3,
                ..base.clone()
            },
            RouterConfig {
                top_k: 257,
                ..base.clone()
            },
            RouterConfig {
                top_k: 0,
                ..base.clone()
            },
            RouterConfig {
                selection: Selection::GroupLimited {
                    k_group: 9,
                    group_score: GroupScore::Max,
                },
                ..base.clone()
            },
            RouterConfig {
                selection: Selection::GroupLimited {
                    k_group: 1,
                    group_score: GroupScore::Max,
                },
                top_k: 33,
                ..base.clone()
            },
            RouterConfig {
                selection: Selection::Moge,
                top_k: 12,
                ..base.clone()
            },
            RouterConfig {
                routed_scaling_factor: f32::NAN,
                ..base.clone()
            },
            RouterConfig {
                block_size: 0,
                ..base.clone()
            },
        ];
        for c in cases {
            assert!(matches!(c.validate(), Err(Error::Invalid { .. })), "{c:?}");
        }
    }
}
