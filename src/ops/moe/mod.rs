//! # MoE layer: router → grouped matmuls → combine, in one submission
//!
//! `out [t, h] = Σ_j w[t, j] · FFN_{id[t, j]}(hidden[t]) + FFN_shared(hidden[t])`, where every
//! FFN is `down · (silu(gate · x) ⊙ (up · x))` and the routing (`id`, `w`) comes from the fused
//! MerRouter gate `hidden · gate_weight [h, e]`. The steps, each its own compute pass of one command
//! buffer, with no host round trip between them:
//!
//! 1. **route** ([`merrouter::Router`] with the fused gate): `topk_ids`, `topk_weights` and the
//!    dispatch layout (per-expert offsets, the sorted slot list, the inverse map);
//! 2. **gather** (`shaders/moe_gather.wgsl`): the expert inputs in dispatch-row order,
//!    `x_sorted[row] = hidden[sorted_slots[row] / k]`, and each row's routing weight;
//! 3. **gate_up** ([`swiftgmm::GmmPlan`], SwiGLU epilogue) over the router's device offsets;
//! 4. **down** (`GmmPlan`, the routing weight as the per-row scale);
//! 5. **shared gate_up** and **shared down** (optional): the shared expert as a one-group
//!    `GmmPlan` pair over `hidden` itself (Pangu Pro MoE's 4 shared experts are one MLP of
//!    4 × 1344 = 5376 intermediate columns; DeepSeek-V3 has one of 2048);
//! 6. **combine** (`shaders/moe_combine.wgsl`): `out[t] = Σ_j y[slot_rows[t, j]] + shared[t]`.
//!
//! Everything that depends on the routing is resolved on the GPU: the grouped matmuls schedule
//! their tiles from the router's offsets with indirect, persistent dispatches, and the buffers
//! are sized for the worst case, `rows = t·k + min(t·k, e)·(block_size − 1)` dispatch rows.
//! An empty batch (`t = 0`) gives empty outputs and records nothing.
//!
//! ```
//! use fusedops::gpu::Gpu;
//! use fusedops::ops::moe::{self, HostWeights, MoeConfig, MoeOptions};
//! use fusedops::ops::swiftgmm::Tiling;
//! use fusedops::tensor::{DType, Tensor};
//!
//! # fn main() -> fusedops::Result<()> {
//! let gpu = Gpu::new()?;
//! let config = MoeConfig::preset("pangu-pro-moe-small")?;
//! let (t, h, e) = (3, config.hidden, config.router.experts);
//! let (i, shared_i) = (config.intermediate, config.shared_intermediate.unwrap());
//! // Small deterministic values in bf16 (a model would load its weights).
//! let tensor = |shape: &[usize], scale: f32| {
//!     let n: usize = shape.iter().product();
//!     let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) * scale).collect();
//!     Tensor::from_f32(shape, &v, DType::BF16)
//! };
//! let hidden = tensor(&[t, h], 0.125)?;
//! let gate = tensor(&[h, e], 1.0 / 256.0)?;
//! let router_scale = Tensor::f32(&[e], vec![1.0; e])?;
//! let (gate_up, down) = (tensor(&[e, 2 * i, h], 0.02)?, tensor(&[e, h, i], 0.02)?);
//! let shared_gate_up = tensor(&[1, 2 * shared_i, h], 0.02)?;
//! let shared_down = tensor(&[1, h, shared_i], 0.02)?;
//! let weights = HostWeights {
//!     gate: &gate,
//!     bias: None,
//!     router_scale: Some(&router_scale),
//!     gate_up: &gate_up,
//!     down: &down,
//!     shared: Some((&shared_gate_up, &shared_down)),
//! };
//! let options = MoeOptions { tiling: Tiling::Defaults, ..MoeOptions::default() };
//! let out = moe::run(&gpu, &config, &hidden, &weights, DType::BF16, &options)?;
//! assert_eq!(out.out.shape(), &[t, h]);
//! assert_eq!(out.router.topk_ids.shape(), &[t, 8]);
//! # Ok(())
//! # }
//! ```
//!
//! For chaining with other operators, build a [`MoeLayer`] over device tensors and record it into
//! a [`Recorder`]; [`MoeLayer::record`] names its compute passes [`STEPS`], so GPU timing reports
//! the time of every step.

mod cases;
mod kernels;
pub mod quant;
pub mod reference;

use serde::{Deserialize, Serialize};

pub use cases::{MoeOperator, OPERATOR};

use crate::check::Tolerance;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::ops::merrouter::{
    self, DeviceInputs, RouterConfig, RouterInputs, RouterOutput, Scores, Shaped,
};
use crate::ops::swiftgmm::{
    Activation, DeviceGroups, ExpertWeights, GmmArgs, GmmPlan, Layout, Mode, Options,
    PerExpertBaseline, Tiling,
};
use crate::tensor::{DType, DeviceTensor, Tensor};

pub(crate) const OP: &str = "moe";

/// Compute-pass labels of [`MoeLayer::record`], in order (the shared steps only with a shared
/// expert).
pub const STEPS: [&str; 7] = [
    "moe route",
    "moe gather",
    "moe gate_up",
    "moe down",
    "moe shared gate_up",
    "moe shared down",
    "moe combine",
];

/// The passes a W8A8 layer ([`MoeLayer::new_w8a8`]) adds after each SwiGLU: the dynamic int8
/// re-quantization of the intermediate for the down projection (the gather quantizes the inputs).
pub const QUANT_STEPS: [&str; 2] = ["moe quantize", "moe shared quantize"];

/// Preset names accepted by [`MoeConfig::preset`]. The `-w8a8` presets have the shapes of their
/// 16-bit twins; they name the deployments' int8 format (W8A8 weights, see [`quant`]).
pub const PRESETS: [&str; 8] = [
    "pangu-pro-moe",
    "deepseek-v3",
    "pangu-pro-moe-small",
    "deepseek-v3-small",
    "pangu-pro-moe-w8a8",
    "deepseek-v3-w8a8",
    "pangu-pro-moe-small-w8a8",
    "deepseek-v3-small-w8a8",
];

/// Hidden size of the small presets.
const SMALL_HIDDEN: usize = 96;
/// Routed-expert intermediate size of the small presets.
const SMALL_INTERMEDIATE: usize = 48;

/// The shape of a MoE layer. Presets: [`MoeConfig::preset`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Routing: experts, groups, top-k, scoring, selection, weights, dispatch block size.
    pub router: RouterConfig,
    /// `h`: columns of hidden and out.
    pub hidden: usize,
    /// `i`: intermediate size of each routed expert (gate/up have `2i` columns).
    pub intermediate: usize,
    /// Intermediate size of the shared expert (`None`: no shared expert). Several shared experts
    /// of the same input are one MLP with their intermediate sizes added up.
    pub shared_intermediate: Option<usize>,
    /// Layout of every expert weight: [`Layout::Nk`] (`gate_up [e, 2i, h]`, `down [e, h, i]`,
    /// PyTorch `Linear`, vLLM, SGLang) or [`Layout::Kn`] (`[e, h, 2i]`, `[e, i, h]`).
    pub layout: Layout,
}

impl MoeConfig {
    /// Pangu Pro MoE: MoGE routing of 64 experts (one of each of 8 groups), hidden 5120, expert
    /// intermediate 1344, and its 4 shared experts as one MLP of intermediate 5376.
    pub fn pangu_pro_moe() -> Self {
        MoeConfig {
            router: RouterConfig::pangu_pro_moe(),
            hidden: 5120,
            intermediate: 1344,
            shared_intermediate: Some(4 * 1344),
            layout: Layout::Nk,
        }
    }

    /// DeepSeek-V3: 256 experts, group-limited top-8, hidden 7168, expert intermediate 2048, and
    /// its one shared expert of intermediate 2048.
    pub fn deepseek_v3() -> Self {
        MoeConfig {
            router: RouterConfig::deepseek_v3(),
            hidden: 7168,
            intermediate: 2048,
            shared_intermediate: Some(2048),
            layout: Layout::Nk,
        }
    }

    /// A preset by name: `pangu-pro-moe`, `deepseek-v3`, or their `-small` variants for CI (the
    /// same routing, hidden 96, expert intermediate 48, shared intermediate 4 × 48 and 48).
    pub fn preset(name: &str) -> Result<Self> {
        if let Some(base) = name.strip_suffix(quant::PRESET_SUFFIX) {
            return Self::preset(base);
        }
        let small = |mut c: MoeConfig, shared_experts: usize| {
            c.hidden = SMALL_HIDDEN;
            c.intermediate = SMALL_INTERMEDIATE;
            c.shared_intermediate = Some(shared_experts * SMALL_INTERMEDIATE);
            c
        };
        match name {
            "pangu-pro-moe" => Ok(Self::pangu_pro_moe()),
            "deepseek-v3" => Ok(Self::deepseek_v3()),
            "pangu-pro-moe-small" => Ok(small(Self::pangu_pro_moe(), 4)),
            "deepseek-v3-small" => Ok(small(Self::deepseek_v3(), 1)),
            _ => Err(Error::invalid(
                OP,
                "preset",
                format!("unknown preset {name:?} (expected one of {PRESETS:?})"),
            )),
        }
    }

    /// Check the routing and the sizes.
    pub fn validate(&self) -> Result<()> {
        self.router.validate()?;
        let sizes = [
            ("hidden", Some(self.hidden)),
            ("intermediate", Some(self.intermediate)),
            ("shared_intermediate", self.shared_intermediate),
        ];
        for (what, size) in sizes {
            if size == Some(0) {
                return Err(Error::invalid(OP, what, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Inner dimensions of the gate/up weights of an expert with intermediate size `i`.
    pub fn gate_up_dims(&self, i: usize) -> [usize; 2] {
        let [_, a, b] = self.layout.weight_shape(1, self.hidden, 2 * i);
        [a, b]
    }

    /// Inner dimensions of the down weights of an expert with intermediate size `i`.
    pub fn down_dims(&self, i: usize) -> [usize; 2] {
        let [_, a, b] = self.layout.weight_shape(1, i, self.hidden);
        [a, b]
    }

    /// Dispatch rows for `tokens` tokens (see [`merrouter::reference::row_capacity`]): `t·k`
    /// plus `block_size − 1` padding rows for each expert that can receive a token.
    pub fn rows(&self, tokens: usize) -> Result<usize> {
        let r = &self.router;
        merrouter::reference::row_capacity(tokens, r.top_k, r.experts, r.block_size)
    }
}

/// How the grouped matmuls are planned (passed to every [`GmmPlan`] of the layer).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MoeOptions {
    /// Tile configurations: the tiling cache (default), tuned on a miss, the defaults, or fixed.
    pub tiling: Tiling,
    /// GEMV or GEMM per expert from its row count (default), or one path forced.
    pub mode: Mode,
    /// Cap on the workgroups of one grouped-matmul path (the kernels are persistent).
    pub max_workgroups: Option<u32>,
}

impl MoeOptions {
    fn gmm(&self, layout: Layout, activation: Activation) -> Options {
        Options {
            layout,
            activation,
            out_dtype: DType::F32,
            mode: self.mode,
            tiling: self.tiling,
            max_workgroups: self.max_workgroups,
            ..Options::default()
        }
    }
}

/// The shared expert's weights, each a one-expert [`ExpertWeights`]: `gate_up [1, 2·is, h]` and
/// `down [1, h, is]` (Nk; Kn transposed).
#[derive(Clone, Copy, Debug)]
pub struct SharedWeights<'a> {
    pub gate_up: &'a ExpertWeights,
    pub down: &'a ExpertWeights,
}

/// The layer's weights on the device.
#[derive(Clone, Copy, Debug)]
pub struct MoeWeights<'a> {
    /// Router gate `[h, e]`, f32 | f16 | bf16.
    pub gate: &'a DeviceTensor,
    /// `[e]` f32 | f16 | bf16: added to the scores to choose experts (DeepSeek-V3), never to the
    /// weights.
    pub bias: Option<&'a DeviceTensor>,
    /// `[e]` f32 | f16 | bf16: multiplies each expert's routing weight (Pangu Pro MoE).
    pub router_scale: Option<&'a DeviceTensor>,
    /// `[e, 2i, h]` (Nk) or `[e, h, 2i]` (Kn): gate in the first `i` columns, up in the last `i`.
    pub gate_up: &'a ExpertWeights,
    /// `[e, h, i]` (Nk) or `[e, i, h]` (Kn).
    pub down: &'a ExpertWeights,
    /// Present exactly when [`MoeConfig::shared_intermediate`] is.
    pub shared: Option<SharedWeights<'a>>,
}

/// The layer's weights on the host (shapes as [`MoeWeights`]; `shared` is `(gate_up, down)`).
#[derive(Clone, Copy, Debug)]
pub struct HostWeights<'a> {
    pub gate: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub router_scale: Option<&'a Tensor>,
    pub gate_up: &'a Tensor,
    pub down: &'a Tensor,
    pub shared: Option<(&'a Tensor, &'a Tensor)>,
}

/// Experts, inner dimensions and dtype of an expert weight tensor (host or device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ExpertShape {
    experts: usize,
    dims: [usize; 2],
    dtype: DType,
}

impl ExpertShape {
    fn of_device(w: &ExpertWeights) -> Self {
        ExpertShape {
            experts: w.experts(),
            dims: w.dims(),
            dtype: w.dtype(),
        }
    }

    fn of_host(what: &str, w: &Tensor) -> Result<Self> {
        match *w.shape() {
            [experts, a, b] => Ok(ExpertShape {
                experts,
                dims: [a, b],
                dtype: w.dtype(),
            }),
            _ => Err(Error::shape(OP, what, w.shape(), "[experts, a, b]")),
        }
    }

    /// Check against the expected experts and inner dimensions, and the dtype: float, or int8
    /// for a quantized layer.
    fn check(
        &self,
        what: &str,
        (experts, dims): (usize, [usize; 2]),
        layout: Layout,
        int8: bool,
    ) -> Result<()> {
        if self.experts != experts || self.dims != dims {
            return Err(Error::shape(
                OP,
                what,
                [self.experts, self.dims[0], self.dims[1]],
                format!(
                    "[{experts}, {}, {}] ({} layout)",
                    dims[0],
                    dims[1],
                    layout.name()
                ),
            ));
        }
        match (int8, self.dtype) {
            (true, DType::I8) => Ok(()),
            (true, dtype) => Err(Error::unsupported(
                OP,
                format!("{what} of dtype {dtype} in a W8A8 layer (expected i8)"),
            )),
            (false, dtype) => float(what, dtype),
        }
    }
}

fn float(what: &str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        let hint = if dtype == DType::I8 {
            " (int8 weights with scales: moe::quant, W8A8)"
        } else {
            ""
        };
        Err(Error::unsupported(
            OP,
            format!("{what} of dtype {dtype} (expected f32, f16 or bf16){hint}"),
        ))
    }
}

/// The expert weights of a layer, for validation.
struct WeightShapes {
    gate_up: ExpertShape,
    down: ExpertShape,
    shared: Option<(ExpertShape, ExpertShape)>,
    /// int8 weights (a W8A8 layer).
    int8: bool,
}

impl WeightShapes {
    fn of_host(weights: &HostWeights<'_>) -> Result<Self> {
        Ok(WeightShapes {
            gate_up: ExpertShape::of_host("gate_up weights", weights.gate_up)?,
            down: ExpertShape::of_host("down weights", weights.down)?,
            shared: match weights.shared {
                Some((gate_up, down)) => Some((
                    ExpertShape::of_host("shared gate_up weights", gate_up)?,
                    ExpertShape::of_host("shared down weights", down)?,
                )),
                None => None,
            },
            int8: false,
        })
    }
}

/// [`check_layer`] for host tensors: the config, hidden, gate, bias, scale and expert weights.
fn check_host_layer(
    config: &MoeConfig,
    hidden: &Tensor,
    weights: &HostWeights<'_>,
    out_dtype: DType,
) -> Result<usize> {
    let router_inputs = RouterInputs {
        scores: Scores::Gate {
            hidden,
            weight: weights.gate,
        },
        bias: weights.bias,
        router_scale: weights.router_scale,
    };
    let shapes = WeightShapes::of_host(weights)?;
    check_layer(config, hidden, &router_inputs, &shapes, out_dtype)
}

/// Check the config, hidden, router inputs, expert weights and the output dtype; returns `t`.
fn check_layer<T: Shaped>(
    config: &MoeConfig,
    hidden: &T,
    router: &RouterInputs<'_, T>,
    weights: &WeightShapes,
    out_dtype: DType,
) -> Result<usize> {
    config.validate()?;
    let shape = merrouter::check_inputs(&config.router, router)?;
    let (t, h) = (shape.tokens, config.hidden);
    if hidden.shape() != [t, h] {
        return Err(Error::shape(
            OP,
            "hidden",
            hidden.shape(),
            format!("[t, {h}] (the config's hidden size)"),
        ));
    }
    let act = hidden.dtype();
    float("hidden", act)?;
    float("out", out_dtype)?;
    let (e, i, layout) = (config.router.experts, config.intermediate, config.layout);
    let int8 = weights.int8;
    weights
        .gate_up
        .check("gate_up weights", (e, config.gate_up_dims(i)), layout, int8)?;
    weights
        .down
        .check("down weights", (e, config.down_dims(i)), layout, int8)?;
    match (config.shared_intermediate, &weights.shared) {
        (Some(is), Some((gate_up, down))) => {
            let (gate_up_dims, down_dims) = (config.gate_up_dims(is), config.down_dims(is));
            gate_up.check("shared gate_up weights", (1, gate_up_dims), layout, int8)?;
            down.check("shared down weights", (1, down_dims), layout, int8)?;
        }
        (None, None) => {}
        (Some(is), None) => {
            return Err(Error::invalid(
                OP,
                "shared expert",
                format!("the config has one (intermediate {is}) but no weights were given"),
            ));
        }
        (None, Some(_)) => {
            return Err(Error::invalid(
                OP,
                "shared expert",
                "weights were given but the config has none (shared_intermediate: None)",
            ));
        }
    }
    Ok(t)
}

/// Check that every buffer the layer allocates or binds fits one storage binding.
fn check_limits(gpu: &Gpu, config: &MoeConfig, t: usize, act: DType, out: DType) -> Result<()> {
    let (h, i) = (config.hidden as u64, config.intermediate as u64);
    let rows = config.rows(t)? as u64;
    let a = act.size() as u64;
    let mut buffers = vec![
        ("hidden", t as u64 * h * a),
        ("x_sorted", rows * h * a),
        ("intermediate", rows * i * a),
        ("expert outputs", rows * h * a),
        ("row_weights", rows * 4),
        ("out", t as u64 * h * out.size() as u64),
    ];
    if let Some(is) = config.shared_intermediate {
        buffers.push(("shared intermediate", t as u64 * is as u64 * a));
        buffers.push(("shared output", t as u64 * h * a));
    }
    for (what, bytes) in buffers {
        gpu.check_binding(what, bytes)?;
    }
    // The gather and the combine index elements of [rows, h] and [t, h] with u32.
    let elements = rows.max(t as u64) * h;
    if elements >= u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{OP} elements of one buffer (32-bit indices)"),
            need: elements,
            max: u32::MAX as u64 - 1,
        });
    }
    Ok(())
}

/// The layer's intermediate tensors on the device (for inspection after a run).
#[derive(Debug)]
pub struct Intermediates {
    /// `[rows, h]` activation dtype: expert inputs in dispatch-row order (zero rows for padding).
    pub x_sorted: DeviceTensor,
    /// `[rows]` f32: each row's routing weight (0 for padding).
    pub row_weights: DeviceTensor,
    /// `[rows, i]` activation dtype: `silu(gate) ⊙ up` of every routed row.
    pub intermediate: DeviceTensor,
    /// `[rows, h]` activation dtype: each routed row's expert output times its routing weight.
    pub expert_out: DeviceTensor,
    /// `[t, is]` and `[t, h]`: the shared expert's intermediate and output.
    pub shared: Option<(DeviceTensor, DeviceTensor)>,
    /// A W8A8 layer's int8 tensors (`x_sorted` is then int8 itself).
    pub quantized: Option<quant::QuantIntermediates>,
}

/// The shared expert's plans and its one-group offsets `[0, t]`; a W8A8 layer re-quantizes its
/// intermediate between the two.
struct SharedPlans {
    gate_up: GmmPlan,
    requantize: Option<crate::ops::quantize::QuantizePlan>,
    down: GmmPlan,
    _offsets: DeviceTensor,
}

/// A MoE layer bound to its inputs, weights and output: validated, planned and compiled, ready to
/// record any number of times into a caller's [`Recorder`] (one command buffer, no host round
/// trip). An empty batch (`t = 0`, as serving loops send) is valid: its outputs are empty and it
/// records nothing.
pub struct MoeLayer {
    config: MoeConfig,
    tokens: usize,
    router: merrouter::Router,
    /// Everything after the routing; `None` for an empty batch.
    steps: Option<LayerSteps>,
    intermediates: Intermediates,
}

/// The layer's steps after the routing (a W8A8 layer's gather quantizes, and it re-quantizes
/// the intermediate before the down projection).
struct LayerSteps {
    gather: kernels::Step,
    gate_up: GmmPlan,
    requantize: Option<crate::ops::quantize::QuantizePlan>,
    down: GmmPlan,
    shared: Option<SharedPlans>,
    combine: kernels::Step,
}

impl std::fmt::Debug for MoeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeLayer")
            .field("config", &self.config)
            .field("tokens", &self.tokens)
            .field("variant", &self.variant())
            .finish_non_exhaustive()
    }
}

impl MoeLayer {
    /// Validate everything (config, shapes, dtypes, device limits) before allocating or compiling
    /// anything; then plan the router and the grouped matmuls, allocate the intermediates and bind
    /// the kernels. `hidden [t, h]`, `out [t, h]` (f32 | f16 | bf16); intermediates are stored in
    /// hidden's dtype. Nothing is recorded here; an error leaves `out` untouched.
    pub fn new(
        gpu: &Gpu,
        config: &MoeConfig,
        hidden: &DeviceTensor,
        weights: &MoeWeights<'_>,
        out: &DeviceTensor,
        options: &MoeOptions,
    ) -> Result<Self> {
        let router_inputs = DeviceInputs {
            scores: Scores::Gate {
                hidden,
                weight: weights.gate,
            },
            bias: weights.bias,
            router_scale: weights.router_scale,
        };
        let shapes = WeightShapes {
            gate_up: ExpertShape::of_device(weights.gate_up),
            down: ExpertShape::of_device(weights.down),
            shared: weights.shared.map(|s| {
                (
                    ExpertShape::of_device(s.gate_up),
                    ExpertShape::of_device(s.down),
                )
            }),
            int8: false,
        };
        let t = check_layer(config, hidden, &router_inputs, &shapes, out.dtype())?;
        if out.shape() != [t, config.hidden] {
            return Err(Error::shape(
                OP,
                "out",
                out.shape(),
                format!("[{t}, {}]", config.hidden),
            ));
        }
        check_limits(gpu, config, t, hidden.dtype(), out.dtype())?;

        let (h, i, act) = (config.hidden, config.intermediate, hidden.dtype());
        let rows = config.rows(t)?;
        let router = merrouter::Router::new(gpu, &config.router, &router_inputs)?;
        let intermediates = Intermediates {
            x_sorted: gpu.zeros(&[rows, h], act)?,
            row_weights: gpu.zeros(&[rows], DType::F32)?,
            intermediate: gpu.zeros(&[rows, i], act)?,
            expert_out: gpu.zeros(&[rows, h], act)?,
            shared: match config.shared_intermediate {
                Some(is) => Some((gpu.zeros(&[t, is], act)?, gpu.zeros(&[t, h], act)?)),
                None => None,
            },
            quantized: None,
        };
        let steps = if t == 0 {
            None
        } else {
            Some(LayerSteps::new(
                gpu,
                config,
                (hidden, weights, out),
                &router,
                &intermediates,
                options,
            )?)
        };
        Ok(MoeLayer {
            config: config.clone(),
            tokens: t,
            router,
            steps,
            intermediates,
        })
    }

    /// Record the whole layer: one compute pass per step, named as in [`STEPS`] (and
    /// [`QUANT_STEPS`] for a W8A8 layer); nothing for an empty batch.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.record_steps(rec, |rec, steps, step, label| match step {
            RoutedStep::GateUp => steps.gate_up.record_as(rec, label),
            RoutedStep::Down => steps.down.record_as(rec, label),
        })
    }

    /// Record the layer, with `routed` recording the routed experts' two grouped matmuls.
    fn record_steps(
        &self,
        rec: &mut Recorder,
        routed: impl Fn(&mut Recorder, &LayerSteps, RoutedStep, &str) -> Result<()>,
    ) -> Result<()> {
        let Some(steps) = &self.steps else {
            return Ok(());
        };
        self.router.record_as(rec, STEPS[0])?;
        steps.gather.record(rec, STEPS[1]);
        routed(rec, steps, RoutedStep::GateUp, STEPS[2])?;
        if let Some(q) = &steps.requantize {
            q.record_as(rec, QUANT_STEPS[0])?;
        }
        routed(rec, steps, RoutedStep::Down, STEPS[3])?;
        if let Some(shared) = &steps.shared {
            shared.gate_up.record_as(rec, STEPS[4])?;
            if let Some(q) = &shared.requantize {
                q.record_as(rec, QUANT_STEPS[1])?;
            }
            shared.down.record_as(rec, STEPS[5])?;
        }
        steps.combine.record(rec, STEPS[6]);
        Ok(())
    }

    /// Labels of the compute passes [`MoeLayer::record`] makes, in order (none for an empty
    /// batch).
    pub fn steps(&self) -> Vec<&'static str> {
        let Some(steps) = &self.steps else {
            return Vec::new();
        };
        let quantized = steps.requantize.is_some();
        let mut labels = vec![STEPS[0], STEPS[1], STEPS[2]];
        labels.extend(quantized.then_some(QUANT_STEPS[0]));
        labels.push(STEPS[3]);
        if steps.shared.is_some() {
            labels.push(STEPS[4]);
            labels.extend(quantized.then_some(QUANT_STEPS[1]));
            labels.push(STEPS[5]);
        }
        labels.push(STEPS[6]);
        labels
    }

    /// The router (its routing outputs and dispatch layout live on the device).
    pub fn router(&self) -> &merrouter::Router {
        &self.router
    }

    pub fn intermediates(&self) -> &Intermediates {
        &self.intermediates
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The variants the steps got on this adapter.
    pub fn variant(&self) -> String {
        let Some(steps) = &self.steps else {
            return "empty batch: nothing recorded".to_string();
        };
        let quantized = if steps.requantize.is_some() {
            "gather: int8 quantization fused; "
        } else {
            ""
        };
        let mut v = format!(
            "route: {}; {quantized}gate_up: {}; down: {}",
            self.router.variant(),
            steps.gate_up.variant(),
            steps.down.variant()
        );
        if let Some(shared) = &steps.shared {
            v += &format!(
                "; shared: {} / {}",
                shared.gate_up.variant(),
                shared.down.variant()
            );
        }
        v
    }

    /// The comparison baseline: the same layer with the routed experts' grouped matmuls replaced
    /// by one dispatch per non-empty expert ([`PerExpertBaseline`]). It needs the router's offsets
    /// on the host (`[e + 1]`), i.e. a host round trip a real layer would not make; `weights` must
    /// be the ones the layer was built with. An empty batch has an empty baseline.
    pub fn per_expert_baseline(
        &self,
        gpu: &Gpu,
        weights: &MoeWeights<'_>,
        host_offsets: &[u32],
        options: &MoeOptions,
    ) -> Result<PerExpertChain> {
        if self.steps.is_none() {
            return Ok(PerExpertChain { routed: None });
        }
        if self.intermediates.quantized.is_some() {
            return Err(Error::unsupported(
                OP,
                "a per-expert baseline for a W8A8 layer (the baseline kernel is 16-bit)",
            ));
        }
        let offsets = DeviceGroups::Offsets(&self.router.layout().offsets);
        let m = &self.intermediates;
        let gate_up = PerExpertBaseline::new(
            gpu,
            &GmmArgs {
                x: &m.x_sorted,
                groups: offsets,
                weights: weights.gate_up,
                row_scale: None,
                y: &m.intermediate,
                host_offsets: Some(host_offsets),
            },
            &options.gmm(self.config.layout, Activation::SwiGlu),
        )?;
        let down = PerExpertBaseline::new(
            gpu,
            &GmmArgs {
                x: &m.intermediate,
                groups: offsets,
                weights: weights.down,
                row_scale: Some(&m.row_weights),
                y: &m.expert_out,
                host_offsets: Some(host_offsets),
            },
            &options.gmm(self.config.layout, Activation::None),
        )?;
        Ok(PerExpertChain {
            routed: Some((gate_up, down)),
        })
    }

    /// Record the layer with the per-expert baseline in place of the routed grouped matmuls.
    pub fn record_baseline(&self, rec: &mut Recorder, chain: &PerExpertChain) -> Result<()> {
        self.record_steps(rec, |rec, _, step, _| match (&chain.routed, step) {
            (Some((gate_up, _)), RoutedStep::GateUp) => gate_up.record(rec),
            (Some((_, down)), RoutedStep::Down) => down.record(rec),
            (None, _) => Err(Error::invalid(
                OP,
                "per-expert baseline",
                "it was made for an empty batch, not for this layer",
            )),
        })
    }
}

impl LayerSteps {
    /// Plan and bind the gather, the grouped matmuls and the combine (`t >= 1`).
    fn new(
        gpu: &Gpu,
        config: &MoeConfig,
        (hidden, weights, out): (&DeviceTensor, &MoeWeights<'_>, &DeviceTensor),
        router: &merrouter::Router,
        intermediates: &Intermediates,
        options: &MoeOptions,
    ) -> Result<Self> {
        let t = hidden.shape()[0];
        let layout = router.layout();
        let gather = kernels::gather(
            gpu,
            hidden,
            &layout.sorted_slots,
            &router.routing().topk_weights,
            &intermediates.x_sorted,
            &intermediates.row_weights,
        )?;
        let offsets = DeviceGroups::Offsets(&layout.offsets);
        let gate_up = GmmPlan::new(
            gpu,
            &GmmArgs {
                x: &intermediates.x_sorted,
                groups: offsets,
                weights: weights.gate_up,
                row_scale: None,
                y: &intermediates.intermediate,
                host_offsets: None,
            },
            &options.gmm(config.layout, Activation::SwiGlu),
        )?;
        let down = GmmPlan::new(
            gpu,
            &GmmArgs {
                x: &intermediates.intermediate,
                groups: offsets,
                weights: weights.down,
                row_scale: Some(&intermediates.row_weights),
                y: &intermediates.expert_out,
                host_offsets: None,
            },
            &options.gmm(config.layout, Activation::None),
        )?;
        let shared = match (&intermediates.shared, weights.shared) {
            (Some((shared_inter, shared_out)), Some(w)) => {
                // One group of all t rows, known on the host: the plans record only the path it
                // takes.
                let host_offsets = [0, t as u32];
                let offsets = gpu.upload(&Tensor::u32(&[2], host_offsets.to_vec())?)?;
                let gate_up = GmmPlan::new(
                    gpu,
                    &GmmArgs {
                        x: hidden,
                        groups: DeviceGroups::Offsets(&offsets),
                        weights: w.gate_up,
                        row_scale: None,
                        y: shared_inter,
                        host_offsets: Some(&host_offsets),
                    },
                    &options.gmm(config.layout, Activation::SwiGlu),
                )?;
                let down = GmmPlan::new(
                    gpu,
                    &GmmArgs {
                        x: shared_inter,
                        groups: DeviceGroups::Offsets(&offsets),
                        weights: w.down,
                        row_scale: None,
                        y: shared_out,
                        host_offsets: Some(&host_offsets),
                    },
                    &options.gmm(config.layout, Activation::None),
                )?;
                Some(SharedPlans {
                    gate_up,
                    requantize: None,
                    down,
                    _offsets: offsets,
                })
            }
            _ => None,
        };
        let unused = gpu.storage_buffer("moe unused", 16)?;
        let combine = kernels::combine(
            gpu,
            &layout.slot_rows,
            &intermediates.expert_out,
            intermediates.shared.as_ref().map(|(_, out)| out),
            &unused,
            out,
        )?;
        Ok(LayerSteps {
            gather,
            gate_up,
            requantize: None,
            down,
            shared,
            combine,
        })
    }
}

/// The routed experts' grouped matmuls.
#[derive(Clone, Copy)]
enum RoutedStep {
    GateUp,
    Down,
}

/// The per-expert baseline of a layer's routed grouped matmuls (see
/// [`MoeLayer::per_expert_baseline`]).
pub struct PerExpertChain {
    /// gate_up and down; `None` for an empty batch.
    routed: Option<(PerExpertBaseline, PerExpertBaseline)>,
}

impl PerExpertChain {
    /// Dispatches of the two grouped matmuls (two per non-empty expert).
    pub fn dispatches(&self) -> usize {
        self.routed.as_ref().map_or(0, |(gate_up, down)| {
            gate_up.dispatches() + down.dispatches()
        })
    }
}

/// What [`run`] reads back.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeOutput {
    /// `[t, h]` in the requested dtype.
    pub out: Tensor,
    /// The routing and the dispatch layout.
    pub router: RouterOutput,
}

/// Validate, upload, run the layer in one submission and read back. Everything is checked before
/// anything is uploaded.
pub fn run(
    gpu: &Gpu,
    config: &MoeConfig,
    hidden: &Tensor,
    weights: &HostWeights<'_>,
    out_dtype: DType,
    options: &MoeOptions,
) -> Result<MoeOutput> {
    let t = check_host_layer(config, hidden, weights, out_dtype)?;
    check_limits(gpu, config, t, hidden.dtype(), out_dtype)?;
    let upload = |t: Option<&Tensor>| t.map(|t| gpu.upload(t)).transpose();
    let hidden_dev = gpu.upload(hidden)?;
    let gate = gpu.upload(weights.gate)?;
    let bias = upload(weights.bias)?;
    let router_scale = upload(weights.router_scale)?;
    let gate_up = ExpertWeights::upload(gpu, weights.gate_up)?;
    let down = ExpertWeights::upload(gpu, weights.down)?;
    let shared = match weights.shared {
        Some((g, d)) => Some((
            ExpertWeights::upload(gpu, g)?,
            ExpertWeights::upload(gpu, d)?,
        )),
        None => None,
    };
    let out = gpu.zeros(&[t, config.hidden], out_dtype)?;
    let device_weights = MoeWeights {
        gate: &gate,
        bias: bias.as_ref(),
        router_scale: router_scale.as_ref(),
        gate_up: &gate_up,
        down: &down,
        shared: shared
            .as_ref()
            .map(|(gate_up, down)| SharedWeights { gate_up, down }),
    };
    let layer = MoeLayer::new(gpu, config, &hidden_dev, &device_weights, &out, options)?;
    gpu.run(|rec| layer.record(rec))?;
    Ok(MoeOutput {
        out: gpu.download(&out)?,
        router: layer.router().download(gpu)?,
    })
}

/// Tolerance of the layer output against [`reference`], by the coarser of the activation dtype
/// (the intermediates' storage) and the output dtype. The reference rounds every intermediate
/// where the GPU stores it, so the two differ by the f32-vs-f64 accumulation and by the rare value
/// that lands on the other side of a rounding boundary: elementwise, about two ulps relative
/// (bf16 2⁻⁷, f16 2⁻⁹; f32 1e-4, SwiftGMM's bound) with an absolute floor of two ulps at 1 (the
/// inputs are scaled so that outputs are O(1)); plus DeepGEMM's cosine difference below 1e-5.
pub fn tolerance(act_dtype: DType, out_dtype: DType) -> Tolerance {
    let coarse = |d: DType| match d {
        DType::BF16 => 2,
        DType::F16 => 1,
        _ => 0,
    };
    let coarsest = if coarse(act_dtype) >= coarse(out_dtype) {
        act_dtype
    } else {
        out_dtype
    };
    match coarsest {
        DType::BF16 => Tolerance::new(1.0 / 64.0, 1.0 / 128.0),
        DType::F16 => Tolerance::new(1.0 / 512.0, 1.0 / 512.0),
        _ => Tolerance::new(1e-4, 1e-4),
    }
    .with_cos_diff(1e-5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_specified_shapes() {
        for name in PRESETS {
            MoeConfig::preset(name).unwrap().validate().unwrap();
        }
        let p = MoeConfig::preset("pangu-pro-moe").unwrap();
        assert_eq!(
            (
                p.router.experts,
                p.hidden,
                p.intermediate,
                p.shared_intermediate
            ),
            (64, 5120, 1344, Some(5376))
        );
        assert_eq!(p.gate_up_dims(p.intermediate), [2688, 5120]);
        assert_eq!(p.down_dims(p.intermediate), [5120, 1344]);
        let d = MoeConfig::preset("deepseek-v3").unwrap();
        assert_eq!(
            (
                d.router.experts,
                d.hidden,
                d.intermediate,
                d.shared_intermediate
            ),
            (256, 7168, 2048, Some(2048))
        );
        let small = MoeConfig::preset("deepseek-v3-small").unwrap();
        assert_eq!(small.router, d.router, "same routing structure");
        assert_eq!(small.rows(5).unwrap(), 40);
        assert!(MoeConfig::preset("mixtral").is_err());
    }

    #[test]
    fn kn_layout_transposes_the_weight_dims() {
        let mut c = MoeConfig::preset("pangu-pro-moe-small").unwrap();
        c.layout = Layout::Kn;
        assert_eq!(c.gate_up_dims(48), [96, 96]);
        assert_eq!(c.down_dims(48), [48, 96]);
    }

    #[test]
    fn zero_sizes_are_refused() {
        let mut c = MoeConfig::preset("deepseek-v3-small").unwrap();
        c.shared_intermediate = Some(0);
        assert!(matches!(c.validate(), Err(Error::Invalid { .. })));
        c.shared_intermediate = None;
        c.intermediate = 0;
        assert!(matches!(c.validate(), Err(Error::Invalid { .. })));
    }

    #[test]
    fn tolerance_follows_the_coarsest_dtype() {
        assert_eq!(
            tolerance(DType::F32, DType::BF16),
            tolerance(DType::BF16, DType::F32)
        );
        assert!(tolerance(DType::F16, DType::F16).rel < tolerance(DType::BF16, DType::F16).rel);
        assert_eq!(tolerance(DType::F32, DType::F32).max_cos_diff, Some(1e-5));
    }
}
