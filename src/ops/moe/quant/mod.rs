//! # The MoE layer in W8A8
//!
//! The layer of [`super`] as the int8 deployments run it (DeepSeek-V3/R1 on Atlas 800I A2,
//! Pangu Pro MoE on 300I Duo): every expert weight (routed and shared) is int8 with a
//! per-output-channel f32 scale, and the activations are quantized per token on the fly:
//!
//! | # | pass | what |
//! |---|---|---|
//! | 1 | `moe route` | MerRouter, unchanged (the gate stays in the activation dtype) |
//! | 2 | `moe gather` | the gather **fused with the quantization**: each dispatch row is the int8 quantization of its token's hidden row, with its per-row scale and routing weight; the row of each token's first slot also writes the token-order copy the shared expert reads |
//! | 3 | `moe gate_up` | W8A8 grouped matmul, SwiGLU on the dequantized gate and up, stored in the activation dtype |
//! | 4 | `moe quantize` | the intermediate re-quantized per row for the down projection |
//! | 5 | `moe down` | W8A8 grouped matmul, the routing weight as row scale |
//! | 6–8 | `moe shared gate_up`, `moe shared quantize`, `moe shared down` | the shared expert, the same way |
//! | 9 | `moe combine` | unchanged |
//!
//! The quantization is [`crate::ops::quantize`]'s (scale = max|row| / 127, round to nearest with
//! ties to even, saturated at ±127, bit-exact on every device), the grouped matmuls are
//! [`crate::ops::swiftgmm::quant`]'s W8A8 (exact i32 sums, dequantized in the epilogue). The
//! reference ([`reference`]) emulates every quantization step exactly.
//!
//! Presets: `pangu-pro-moe-w8a8`, `deepseek-v3-w8a8` and their `-small-w8a8` CI twins have the
//! shapes of the 16-bit presets ([`MoeConfig::preset`]); int8 rows need `h`, `i` and the shared
//! intermediate to be multiples of 4.

pub mod reference;

use super::{
    ExpertShape, Intermediates, LayerSteps, MoeConfig, MoeLayer, MoeOptions, MoeOutput, OP,
    SharedPlans, WeightShapes, check_layer, check_limits, kernels,
};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::merrouter::{self, DeviceInputs, RouterInputs, Scores};
use crate::ops::quantize::QuantizePlan;
use crate::ops::swiftgmm::quant::{QuantGmmArgs, QuantWeights, QuantX};
use crate::ops::swiftgmm::{Activation, DeviceGroups, GmmPlan};
use crate::tensor::{DType, DeviceTensor, Tensor};

/// The suffix of the W8A8 preset names.
pub const PRESET_SUFFIX: &str = "-w8a8";

/// Whether `preset` names a W8A8 deployment (`pangu-pro-moe-w8a8`, …).
pub fn is_w8a8_preset(preset: &str) -> bool {
    preset.ends_with(PRESET_SUFFIX)
}

/// The shared expert's int8 weights: `gate_up [1, 2·is, h]` and `down [1, h, is]` (Nk).
#[derive(Clone, Copy, Debug)]
pub struct QuantSharedWeights<'a> {
    pub gate_up: &'a QuantWeights,
    pub down: &'a QuantWeights,
}

/// A W8A8 layer's weights on the device: the router's as [`super::MoeWeights`], the experts'
/// int8 with their `[e, n]` scales (no offsets: W8A8 weights are symmetric).
#[derive(Clone, Copy, Debug)]
pub struct QuantMoeWeights<'a> {
    pub gate: &'a DeviceTensor,
    pub bias: Option<&'a DeviceTensor>,
    pub router_scale: Option<&'a DeviceTensor>,
    /// `[e, 2i, h]` (Nk) or `[e, h, 2i]` (Kn) int8, scale `[e, 2i]`.
    pub gate_up: &'a QuantWeights,
    /// `[e, h, i]` (Nk) or `[e, i, h]` (Kn) int8, scale `[e, h]`.
    pub down: &'a QuantWeights,
    pub shared: Option<QuantSharedWeights<'a>>,
}

/// An int8 weight tensor and its per-output-channel f32 scale, on the host.
#[derive(Clone, Copy, Debug)]
pub struct QuantTensor<'a> {
    pub q: &'a Tensor,
    pub scale: &'a Tensor,
}

/// A W8A8 layer's weights on the host (shapes as [`QuantMoeWeights`]).
#[derive(Clone, Copy, Debug)]
pub struct QuantHostWeights<'a> {
    pub gate: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub router_scale: Option<&'a Tensor>,
    pub gate_up: QuantTensor<'a>,
    pub down: QuantTensor<'a>,
    /// `(gate_up, down)`.
    pub shared: Option<(QuantTensor<'a>, QuantTensor<'a>)>,
}

/// A W8A8 layer's int8 tensors (see [`super::Intermediates`]; its `x_sorted` is int8 too).
#[derive(Debug)]
pub struct QuantIntermediates {
    /// `[rows]` f32: the per-row scale of the int8 `x_sorted` (0 for padding rows).
    pub x_scale: DeviceTensor,
    /// `[rows, i]` int8 and `[rows]` f32: the intermediate, re-quantized for the down projection.
    pub intermediate: (DeviceTensor, DeviceTensor),
    /// `[t, h]` int8 and `[t]` f32: hidden quantized in token order, the shared expert's input.
    pub hidden: Option<(DeviceTensor, DeviceTensor)>,
    /// `[t, is]` int8 and `[t]` f32: the shared intermediate, re-quantized.
    pub shared_intermediate: Option<(DeviceTensor, DeviceTensor)>,
}

/// Experts, dims and dtype of int8 weights (for the layer's shape checks).
fn shape_of(w: &QuantWeights) -> ExpertShape {
    ExpertShape::of_device(w.weights())
}

/// int8 rows hold whole words: h, i and the shared intermediate must be multiples of 4.
fn check_word_rows(config: &MoeConfig) -> Result<()> {
    let sizes = [
        ("hidden", Some(config.hidden)),
        ("intermediate", Some(config.intermediate)),
        ("shared_intermediate", config.shared_intermediate),
    ];
    for (what, size) in sizes {
        if let Some(n) = size.filter(|n| !n.is_multiple_of(4)) {
            return Err(Error::unsupported(
                OP,
                format!(
                    "W8A8 with {what} = {n}: int8 rows hold whole 32-bit words (a multiple of 4)"
                ),
            ));
        }
    }
    Ok(())
}

/// A scale tensor's shape and dtype.
type ScaleDesc = (Vec<usize>, DType);

/// Each weight's scale is `[e, n]` f32 for its n: gate/up n = 2i, down n = h, the shared
/// expert's 2·is and h (one expert).
fn check_scales(
    config: &MoeConfig,
    (gate_up, down): (ScaleDesc, ScaleDesc),
    shared: Option<(ScaleDesc, ScaleDesc)>,
) -> Result<()> {
    let (e, h, i) = (config.router.experts, config.hidden, config.intermediate);
    let mut expected = vec![
        ("gate_up scale", gate_up, e, 2 * i),
        ("down scale", down, e, h),
    ];
    if let (Some(is), Some((g, d))) = (config.shared_intermediate, shared) {
        expected.push(("shared gate_up scale", g, 1, 2 * is));
        expected.push(("shared down scale", d, 1, h));
    }
    for (what, (shape, dtype), e, n) in expected {
        if shape != [e, n] || dtype != DType::F32 {
            return Err(Error::shape(
                OP,
                what,
                (shape, dtype),
                format!("[{e}, {n}] f32"),
            ));
        }
    }
    Ok(())
}

impl MoeLayer {
    /// A W8A8 layer (see [`crate::ops::moe::quant`]): validated like [`MoeLayer::new`] (int8
    /// weights with `[e, n]` f32 scales, `h`, `i` and the shared intermediate multiples of 4)
    /// before anything is allocated or compiled. `hidden [t, h]` and `out [t, h]` are f32, f16
    /// or bf16; the SwiGLU intermediates are stored in hidden's dtype before re-quantization.
    pub fn new_w8a8(
        gpu: &Gpu,
        config: &MoeConfig,
        hidden: &DeviceTensor,
        weights: &QuantMoeWeights<'_>,
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
            gate_up: shape_of(weights.gate_up),
            down: shape_of(weights.down),
            shared: weights
                .shared
                .map(|s| (shape_of(s.gate_up), shape_of(s.down))),
            int8: true,
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
        check_word_rows(config)?;
        let desc = |w: &QuantWeights| (w.scale().shape().to_vec(), w.scale().dtype());
        check_scales(
            config,
            (desc(weights.gate_up), desc(weights.down)),
            weights.shared.map(|s| (desc(s.gate_up), desc(s.down))),
        )?;
        check_limits(gpu, config, t, hidden.dtype(), out.dtype())?;

        let (h, i, act) = (config.hidden, config.intermediate, hidden.dtype());
        let rows = config.rows(t)?;
        let router = merrouter::Router::new(gpu, &config.router, &router_inputs)?;
        let pair = |rows: usize, cols: usize| -> Result<(DeviceTensor, DeviceTensor)> {
            Ok((
                gpu.zeros(&[rows, cols], DType::I8)?,
                gpu.zeros(&[rows], DType::F32)?,
            ))
        };
        let intermediates = Intermediates {
            x_sorted: gpu.zeros(&[rows, h], DType::I8)?,
            row_weights: gpu.zeros(&[rows], DType::F32)?,
            intermediate: gpu.zeros(&[rows, i], act)?,
            expert_out: gpu.zeros(&[rows, h], act)?,
            shared: match config.shared_intermediate {
                Some(is) => Some((gpu.zeros(&[t, is], act)?, gpu.zeros(&[t, h], act)?)),
                None => None,
            },
            quantized: Some(QuantIntermediates {
                x_scale: gpu.zeros(&[rows], DType::F32)?,
                intermediate: pair(rows, i)?,
                hidden: config.shared_intermediate.map(|_| pair(t, h)).transpose()?,
                shared_intermediate: config
                    .shared_intermediate
                    .map(|is| pair(t, is))
                    .transpose()?,
            }),
        };
        let steps = if t == 0 {
            None
        } else {
            Some(LayerSteps::new_w8a8(
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
}

impl LayerSteps {
    /// Plan and bind a W8A8 layer's steps (`t >= 1`).
    fn new_w8a8(
        gpu: &Gpu,
        config: &MoeConfig,
        (hidden, weights, out): (&DeviceTensor, &QuantMoeWeights<'_>, &DeviceTensor),
        router: &merrouter::Router,
        m: &Intermediates,
        options: &MoeOptions,
    ) -> Result<Self> {
        let q = m
            .quantized
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "intermediates", "not those of a W8A8 layer"))?;
        let t = hidden.shape()[0];
        let layout = router.layout();
        let unused = gpu.storage_buffer("moe unused", 16)?;
        let gather = kernels::gather_quantize(
            gpu,
            hidden,
            &layout.sorted_slots,
            &router.routing().topk_weights,
            (&m.x_sorted, &q.x_scale),
            &m.row_weights,
            q.hidden.as_ref().map(|(q, s)| (q, s)),
            &unused,
        )?;
        let offsets = DeviceGroups::Offsets(&layout.offsets);
        let plan = |x: QuantX, groups, w, row_scale, y, host_offsets, act| {
            GmmPlan::new_quantized(
                gpu,
                &QuantGmmArgs {
                    x,
                    groups,
                    weights: w,
                    row_scale,
                    y,
                    host_offsets,
                },
                &options.gmm(config.layout, act),
            )
        };
        let gate_up = plan(
            QuantX::Int8 {
                q: &m.x_sorted,
                scale: &q.x_scale,
            },
            offsets,
            weights.gate_up,
            None,
            &m.intermediate,
            None,
            Activation::SwiGlu,
        )?;
        let (inter_q, inter_scale) = &q.intermediate;
        let requantize = QuantizePlan::new(gpu, &m.intermediate, inter_q, inter_scale)?;
        let down = plan(
            QuantX::Int8 {
                q: inter_q,
                scale: inter_scale,
            },
            offsets,
            weights.down,
            Some(&m.row_weights),
            &m.expert_out,
            None,
            Activation::None,
        )?;
        let shared = match (&m.shared, weights.shared, &q.hidden, &q.shared_intermediate) {
            (Some((inter, shared_out)), Some(w), Some((hq, hs)), Some((iq, is))) => {
                let host_offsets = [0, t as u32];
                let one_group = gpu.upload(&Tensor::u32(&[2], host_offsets.to_vec())?)?;
                let groups = DeviceGroups::Offsets(&one_group);
                let gate_up = plan(
                    QuantX::Int8 { q: hq, scale: hs },
                    groups,
                    w.gate_up,
                    None,
                    inter,
                    Some(&host_offsets),
                    Activation::SwiGlu,
                )?;
                let requantize = QuantizePlan::new(gpu, inter, iq, is)?;
                let down = plan(
                    QuantX::Int8 { q: iq, scale: is },
                    groups,
                    w.down,
                    None,
                    shared_out,
                    Some(&host_offsets),
                    Activation::None,
                )?;
                Some(SharedPlans {
                    gate_up,
                    requantize: Some(requantize),
                    down,
                    _offsets: one_group,
                })
            }
            _ => None,
        };
        let combine = kernels::combine(
            gpu,
            &layout.slot_rows,
            &m.expert_out,
            m.shared.as_ref().map(|(_, out)| out),
            &unused,
            out,
        )?;
        Ok(LayerSteps {
            gather,
            gate_up,
            requantize: Some(requantize),
            down,
            shared,
            combine,
        })
    }
}

/// Validate the host inputs of a W8A8 layer (as [`MoeLayer::new_w8a8`], plus finite scales);
/// returns `t`.
pub(crate) fn check_host(
    config: &MoeConfig,
    hidden: &Tensor,
    weights: &QuantHostWeights<'_>,
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
    let shape = |what, w: &QuantTensor| ExpertShape::of_host(what, w.q);
    let shapes = WeightShapes {
        gate_up: shape("gate_up weights", &weights.gate_up)?,
        down: shape("down weights", &weights.down)?,
        shared: match &weights.shared {
            Some((g, d)) => Some((
                shape("shared gate_up weights", g)?,
                shape("shared down weights", d)?,
            )),
            None => None,
        },
        int8: true,
    };
    let t = check_layer(config, hidden, &router_inputs, &shapes, out_dtype)?;
    check_word_rows(config)?;
    let desc = |w: &QuantTensor<'_>| (w.scale.shape().to_vec(), w.scale.dtype());
    check_scales(
        config,
        (desc(&weights.gate_up), desc(&weights.down)),
        weights.shared.map(|(g, d)| (desc(&g), desc(&d))),
    )?;
    let mut scales = vec![
        ("gate_up scale", weights.gate_up.scale),
        ("down scale", weights.down.scale),
    ];
    if let Some((g, d)) = weights.shared {
        scales.extend([
            ("shared gate_up scale", g.scale),
            ("shared down scale", d.scale),
        ]);
    }
    for (what, scale) in scales {
        if let Some(i) = scale.to_f32().iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                OP,
                what,
                format!("element {i} is not finite (scales must be finite)"),
            ));
        }
    }
    Ok(t)
}

/// Validate, upload, run a W8A8 layer in one submission and read back. Everything is checked
/// before anything is uploaded.
pub fn run_w8a8(
    gpu: &Gpu,
    config: &MoeConfig,
    hidden: &Tensor,
    weights: &QuantHostWeights<'_>,
    out_dtype: DType,
    options: &MoeOptions,
) -> Result<MoeOutput> {
    let t = check_host(config, hidden, weights, out_dtype)?;
    check_limits(gpu, config, t, hidden.dtype(), out_dtype)?;
    let upload = |t: Option<&Tensor>| t.map(|t| gpu.upload(t)).transpose();
    let experts = |w: &QuantTensor<'_>| QuantWeights::upload(gpu, w.q, w.scale, None);
    let hidden_dev = gpu.upload(hidden)?;
    let gate = gpu.upload(weights.gate)?;
    let bias = upload(weights.bias)?;
    let router_scale = upload(weights.router_scale)?;
    let gate_up = experts(&weights.gate_up)?;
    let down = experts(&weights.down)?;
    let shared = match &weights.shared {
        Some((g, d)) => Some((experts(g)?, experts(d)?)),
        None => None,
    };
    let out = gpu.zeros(&[t, config.hidden], out_dtype)?;
    let device_weights = QuantMoeWeights {
        gate: &gate,
        bias: bias.as_ref(),
        router_scale: router_scale.as_ref(),
        gate_up: &gate_up,
        down: &down,
        shared: shared
            .as_ref()
            .map(|(gate_up, down)| QuantSharedWeights { gate_up, down }),
    };
    let layer = MoeLayer::new_w8a8(gpu, config, &hidden_dev, &device_weights, &out, options)?;
    gpu.run(|rec| layer.record(rec))?;
    Ok(MoeOutput {
        out: gpu.download(&out)?,
        router: layer.router().download(gpu)?,
    })
}
